#!/usr/bin/env bash
# The packages, tested as an admin would use them (run by conformance/test-all.sh, as root, on
# a machine without the mvps package; needs lintian, rpm, systemd, man-db, mandoc, strace,
# qemu-utils, python3):
#  1. man pages: groff -ww and mandoc -T lint clean; the maintainer scripts parse;
#  2. packaging/build.sh from the working tree; lintian clean (kept warnings are overridden
#     in the package, with reasons: packaging/debian/lintian-overrides);
#  3. dpkg -i: files, owners and modes, the mvps account, nothing enabled, --version, man -w,
#     systemd-analyze verify and security of the installed units;
#  4. the installed mvps-te started as its unit's ExecStart (user mvps, the unit's
#     Environment= and the installed environment file, working directory /), without
#     systemd as PID 1: READY=1 and STOPPING=1 over NOTIFY_SOCKET, a token from the installed
#     mvpsctl, a write and a read-back through qemu-io, a checkpoint into /var/lib/mvps, a
#     clean stop on SIGTERM; every system call it made is allowed by the unit's
#     SystemCallFilter;
#  5. dpkg -i again (an upgrade) keeps the edited configuration, its mode and the data;
#     dpkg -r keeps /etc/mvps and /var/lib/mvps; dpkg --purge deletes /etc/mvps, keeps the
#     data and says so;
#  6. the .rpm: rpm -qlp lists the same payload; rpm -i --nodeps into a scratch root puts
#     the files in place; on this system, its scriptlets make the account, the data
#     directory and the env files' group, and rpm -e keeps the data and edited config.
# The machine is left as it was: the test's account, data directory and package are removed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
start=$SECONDS
step() { printf '  -- %s (%ds)\n' "$*" $((SECONDS - start)) >&2; }
fail() {
  echo "packaging test: FAILED: $*" >&2
  exit 1
}
# expect_stat PATH MODE OWNER GROUP
expect_stat() {
  local got
  got=$(stat -c '%a %U %G' "$1") || fail "$1 is missing"
  [ "$got" = "$2 $3 $4" ] || fail "$1: mode/owner/group are '$got', expected '$2 $3 $4'"
}

[ "$(id -u)" -eq 0 ] || fail "run as root (it installs the package)"
# One run at a time per machine: runs of other checkouts would install the same package.
exec 9>/run/lock/mvps-package-test.lock
flock -w 900 9 || fail "another packaging/test.sh holds /run/lock/mvps-package-test.lock"
if dpkg-query -W -f='${Status}' mvps 2>/dev/null | grep -q 'installed\|config-files'; then
  fail "the mvps package is already on this machine; the test installs and purges it"
fi
MARKER=.mvps-package-test
if [ -e /var/lib/mvps ] && [ ! -e /var/lib/mvps/$MARKER ]; then
  fail "/var/lib/mvps exists and is not the test's: it may hold images"
fi

work=$(mktemp -d /tmp/mvps-package-test.XXXXXX)
created_account=false
getent passwd mvps >/dev/null || created_account=true
server_pid=
notify_pid=
cleanup() {
  set +e
  [ -n "$server_pid" ] && kill -KILL "$server_pid" 2>/dev/null
  [ -n "$notify_pid" ] && kill "$notify_pid" 2>/dev/null
  if dpkg-query -W -f='${Status}' mvps 2>/dev/null | grep -q 'installed\|config-files'; then
    dpkg --purge mvps >/dev/null 2>&1
  fi
  rpm -q mvps >/dev/null 2>&1 && rpm -e --noscripts mvps >/dev/null 2>&1
  [ -e /var/lib/mvps/$MARKER ] && rm -rf /var/lib/mvps
  [ -e /etc/mvps/mvps-te.env.rpmsave ] && rm -rf /etc/mvps
  $created_account && getent passwd mvps >/dev/null && userdel mvps
  rm -rf "$work"
}
trap cleanup EXIT

with_gc=false
[ -f gc/Cargo.toml ] && with_gc=true
binaries=(mvps-te mvpsctl)
units=(mvps-te.service)
envs=(mvps-te.env)
manpages=(man/mvps-te.8 man/mvpsctl.1)
if $with_gc; then
  binaries+=(mvps-s3-gc)
  units+=(mvps-s3-gc.service mvps-s3-gc.timer)
  envs+=(mvps-s3-gc.env)
  manpages+=(man/mvps-s3-gc.8)
fi

step "man pages: groff -ww, mandoc -T lint"
for page in "${manpages[@]}"; do
  out=$(groff -man -ww -z "$page" 2>&1) || fail "groff $page: $out"
  [ -z "$out" ] || fail "groff warns on $page: $out"
  out=$(mandoc -T lint "$page" 2>&1) || fail "mandoc $page: $out"
  [ -z "$out" ] || fail "mandoc -T lint $page: $out"
done

step "maintainer scripts parse (sh -n)"
for script in packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm \
  packaging/rpm/*.sh; do
  sh -n "$script" || fail "$script does not parse"
done

step "packaging/build.sh"
./packaging/build.sh "$work/out" >"$work/build.log" 2>&1 || {
  cat "$work/build.log" >&2
  fail "packaging/build.sh"
}
deb=$(ls "$work"/out/mvps_*.deb)
rpm_file=$(ls "$work"/out/mvps-*.rpm)

step "lintian $(basename "$deb")"
lintian --pedantic --fail-on error,warning "$deb" >"$work/lintian.log" 2>&1 || {
  cat "$work/lintian.log" >&2
  fail "lintian"
}
# Every hint must be overridden (O:) or informational (I:, P:); the overrides carry reasons.
if grep -E '^[EW]: ' "$work/lintian.log"; then
  fail "lintian errors or warnings above"
fi

step "dpkg -i"
dpkg -i "$deb" >"$work/install.log" 2>&1 || {
  cat "$work/install.log" >&2
  fail "dpkg -i"
}
grep -q "Recommends: nbd-client" <(dpkg-deb -f "$deb" Recommends | sed 's/^/Recommends: /') ||
  fail "the .deb does not recommend nbd-client"
dpkg-deb -f "$deb" Depends | grep -q 'libc6 (>= ' || fail "Depends lacks the shlibs libc6"
touch /var/lib/mvps/$MARKER
passwd_line=$(getent passwd mvps) || fail "no mvps user after install"
[ "$(echo "$passwd_line" | cut -d: -f6)" = /var/lib/mvps ] || fail "mvps home: $passwd_line"
case "$(echo "$passwd_line" | cut -d: -f7)" in
  */nologin) ;;
  *) fail "mvps can log in: $passwd_line" ;;
esac
getent group mvps >/dev/null || fail "no mvps group"
for b in "${binaries[@]}"; do expect_stat "/usr/bin/$b" 755 root root; done
for u in "${units[@]}"; do expect_stat "/lib/systemd/system/$u" 644 root root; done
for e in "${envs[@]}"; do expect_stat "/etc/mvps/$e" 640 root mvps; done
expect_stat /var/lib/mvps 750 mvps mvps
expect_stat /usr/lib/sysusers.d/mvps.conf 644 root root
expect_stat /usr/share/doc/mvps/nbdtab.example 644 root root
for u in "${units[@]}"; do
  if ls /etc/systemd/system/*.wants/"$u" >/dev/null 2>&1; then
    fail "$u was enabled at install"
  fi
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
[ "$(/usr/bin/mvps-te --version)" = "mvps-te $version" ] ||
  fail "mvps-te --version: $(/usr/bin/mvps-te --version)"
# What ships is only the product: the SeaweedFS test launcher (mvps::s3::testing) is not in it.
for b in "${binaries[@]}"; do
  if grep -q -a MVPS_TEST_WEED "/usr/bin/$b"; then fail "/usr/bin/$b holds test scaffolding"; fi
done
for page in "${manpages[@]}"; do
  name=$(basename "$page")
  found=$(man -w "${name%.*}") || fail "man -w ${name%.*} finds nothing"
  [ "$found" = "/usr/share/man/man${name##*.}/$name.gz" ] || fail "man -w ${name%.*}: $found"
done

step "systemd-analyze verify, security"
for u in "${units[@]}"; do
  out=$(systemd-analyze verify "/lib/systemd/system/$u" 2>&1) || fail "verify $u: $out"
  [ -z "$out" ] || fail "systemd-analyze verify $u is not clean: $out"
done
for u in "${units[@]}"; do
  [[ "$u" == *.service ]] || continue
  # Exposure 0-10 (0 = fully sandboxed) in tenths: 1.1 when this was written; at most 1.5.
  systemd-analyze security --offline=true --threshold=15 --no-pager \
    "/lib/systemd/system/$u" >"$work/security.log" 2>&1 || {
    cat "$work/security.log" >&2
    fail "systemd-analyze security $u: exposure above 1.5"
  }
  tail -1 "$work/security.log" | sed 's/^/    /' >&2
done

step "mvps-te as its unit runs it: user mvps, installed environment file"
unit=/lib/systemd/system/mvps-te.service
unit_value() { sed -n "s/^$1=//p" "$unit"; }
exec_start=$(unit_value ExecStart)
[ "$(unit_value User)" = mvps ] || fail "the unit does not run as mvps"
[ "$(unit_value Type)" = notify ] || fail "the unit is not Type=notify"
env_file=$(unit_value EnvironmentFile)
[ "$env_file" = /etc/mvps/mvps-te.env ] || fail "EnvironmentFile=$env_file"
# The environment systemd would give: the unit's Environment= lines, then the file's
# assignments (which win), nothing inherited; PATH, HOME, USER, LOGNAME as systemd sets them
# for a service with User=.
as_unit() { # [VAR=value...] -- command...: runs as the unit would, from /
  local extra=()
  while [ "$1" != -- ]; do extra+=("$1"); shift; done
  shift
  mapfile -t unit_env < <(unit_value Environment)
  mapfile -t file_env < <(grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$env_file")
  cd / && exec setpriv --reuid=mvps --regid=mvps --init-groups --no-new-privs \
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin HOME=/var/lib/mvps \
    USER=mvps LOGNAME=mvps "${unit_env[@]}" "${file_env[@]}" "${extra[@]}" "$@"
}
# As installed (no secret), the service cannot start: it fails with one clear line.
status=0
(as_unit -- $exec_start) >"$work/unconfigured.log" 2>&1 || status=$?
[ "$status" -eq 1 ] && grep -q 'no JWT secret: set MVPS_TE_JWT_SECRET' "$work/unconfigured.log" ||
  fail "unconfigured mvps-te: status $status, $(cat "$work/unconfigured.log")"
# Configure as the README says: a secret, and (here) a free port and frequent checkpoints.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
secret=$(head -c 32 /dev/urandom | base64)
sed -i -e "s|^MVPS_TE_JWT_SECRET=.*|MVPS_TE_JWT_SECRET=$secret|" \
  -e "s|^MVPS_TE_LISTEN=.*|MVPS_TE_LISTEN=127.0.0.1:$port|" \
  -e "s|^#MVPS_TE_CHECKPOINT_INTERVAL_MS=.*|MVPS_TE_CHECKPOINT_INTERVAL_MS=500|" "$env_file"
expect_stat "$env_file" 640 root mvps
# A directory the server (user mvps) may write to: the notify socket, strace's table.
run=$work/run
install -d -o mvps -g mvps -m 0750 "$run"
chmod 711 "$work"
notify_socket=$run/notify.sock
python3 - "$notify_socket" "$work/notify.log" <<'EOF' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
with open(sys.argv[2], "ab", buffering=0) as log:
    while True:
        log.write(s.recv(4096))
EOF
notify_pid=$!
for _ in $(seq 50); do [ -S "$notify_socket" ] && break; sleep 0.1; done
chown mvps "$notify_socket"
# strace -f records every system call for the SystemCallFilter check below.
(as_unit NOTIFY_SOCKET="$notify_socket" -- strace -f -qq -c -o "$run/syscalls.txt" \
  $exec_start) 2>"$work/server.log" &
tracer_pid=$!
for _ in $(seq 100); do grep -q 'READY=1' "$work/notify.log" 2>/dev/null && break; sleep 0.2; done
grep -q 'READY=1' "$work/notify.log" 2>/dev/null || {
  cat "$work/server.log" >&2
  fail "no READY=1 on NOTIFY_SOCKET within 20 s"
}
server_pid=$(pgrep -P "$tracer_pid" -x mvps-te) || fail "no mvps-te process under strace"
[ "$(stat -c %U /proc/"$server_pid")" = mvps ] || fail "mvps-te does not run as mvps"

step "mvpsctl token, qemu-io write and read"
token=$(sh -c ". $env_file && export MVPS_TE_JWT_SECRET &&
  /usr/bin/mvpsctl token --image-id pkgtest.mvps-image --size 64M") || fail "mvpsctl token"
uri="nbd://127.0.0.1:$port/$token"
qemu-io -f raw -c 'write -P 0x5a 1M 2M' -c flush "$uri" >"$work/qemu-io.log" 2>&1 || {
  cat "$work/qemu-io.log" >&2
  fail "qemu-io write"
}
qemu-io -f raw -c 'read -P 0x5a 1M 2M' -c 'read -P 0 0 1M' "$uri" >"$work/qemu-io.log" 2>&1 || {
  cat "$work/qemu-io.log" >&2
  fail "qemu-io read-back"
}
grep -q 'Pattern verification failed' "$work/qemu-io.log" && fail "read-back differs"
# A checkpoint (every 500 ms here) puts the writes into a layer blob of the local image store
# under the state directory.
blobs() { find /var/lib/mvps/image-store/blobs -type f 2>/dev/null; }
for _ in $(seq 100); do
  [ -n "$(blobs)" ] && break
  sleep 0.2
done
[ -n "$(blobs)" ] || fail "no layer blob in /var/lib/mvps/image-store after 20 s"
foreign=$(find /var/lib/mvps -not -user mvps -not -name $MARKER)
[ -z "$foreign" ] || fail "files in /var/lib/mvps not owned by mvps: $foreign"

step "SIGTERM"
kill -TERM "$server_pid"
status=0
wait "$tracer_pid" || status=$?
server_pid=
[ "$status" -eq 0 ] || {
  cat "$work/server.log" >&2
  fail "mvps-te exited with status $status after SIGTERM"
}
grep -q 'STOPPING=1' "$work/notify.log" || fail "no STOPPING=1 on NOTIFY_SOCKET"
grep -q 'stopped cleanly' "$work/server.log" || fail "no 'stopped cleanly' in the log"
kill "$notify_pid" && notify_pid=

step "system calls against the unit's SystemCallFilter"
# The names strace counted (the last column of its table).
used=$(awk '$NF ~ /^[a-z_0-9]+$/ && $NF != "total" && $NF != "syscall" {print $NF}' \
  "$run/syscalls.txt" | sort -u)
[ -n "$used" ] || fail "strace recorded no system calls"
expand_set() { # the system calls of filter groups and names, recursively
  local item
  for item in "$@"; do
    if [[ "$item" == @* ]]; then
      expand_set $(systemd-analyze syscall-filter --no-pager "$item" |
        awk 'NR > 1 && $1 !~ /^#/ && NF {print $1}')
    else
      echo "$item"
    fi
  done
}
mapfile -t filters < <(unit_value SystemCallFilter)
allowed=$(expand_set ${filters[0]} | sort -u)
denied=$(expand_set ${filters[1]#\~} | sort -u)
outside=$(comm -23 <(echo "$used") <(comm -23 <(echo "$allowed") <(echo "$denied")))
[ -z "$outside" ] || fail "mvps-te made system calls its unit forbids: $outside"
echo "    $(echo "$used" | wc -l) distinct system calls, all allowed" >&2

step "mvps-s3-gc as its unit runs it: a dry-run pass over the image store mvps-te wrote"
te_unit=$unit te_env_file=$env_file
unit=/lib/systemd/system/mvps-s3-gc.service
[ "$(unit_value User)" = mvps ] || fail "the collector's unit does not run as mvps"
[ "$(unit_value Type)" = oneshot ] || fail "the collector's unit is not Type=oneshot"
env_file=$(unit_value EnvironmentFile)
[ "$env_file" = /etc/mvps/mvps-s3-gc.env ] || fail "EnvironmentFile=$env_file"
status=0
(as_unit -- $(unit_value ExecStart) --dry-run --json) >"$work/gc.log" 2>"$work/gc.err" || status=$?
[ "$status" -eq 0 ] || fail "mvps-s3-gc --dry-run: status $status, $(cat "$work/gc.err")"
grep -Eq '"manifests_kept":[1-9]' "$work/gc.log" && grep -Eq '"blobs_referenced":[1-9]' "$work/gc.log" || fail "the dry run did not see the image: $(cat "$work/gc.log")"
grep -q '"dry_run":true' "$work/gc.log" || fail "not a dry run: $(cat "$work/gc.log")"
unit=$te_unit env_file=$te_env_file

step "dpkg -i again (an upgrade): the edited configuration and the data stay as they are"
dpkg -i "$deb" >"$work/upgrade.log" 2>&1 || {
  cat "$work/upgrade.log" >&2
  fail "dpkg -i over the installed package"
}
grep -q "^MVPS_TE_JWT_SECRET=$secret" "$env_file" || fail "the upgrade replaced the configuration"
expect_stat "$env_file" 640 root mvps
expect_stat /var/lib/mvps 750 mvps mvps
[ -n "$(blobs)" ] || fail "the upgrade lost the data"
[ "$(getent passwd mvps)" = "$passwd_line" ] || fail "the upgrade changed the mvps account"

step "dpkg -r keeps configuration and data"
dpkg -r mvps >"$work/remove.log" 2>&1 || {
  cat "$work/remove.log" >&2
  fail "dpkg -r"
}
[ ! -e /usr/bin/mvps-te ] || fail "/usr/bin/mvps-te left after dpkg -r"
grep -q "^MVPS_TE_JWT_SECRET=$secret" "$env_file" || fail "dpkg -r lost the configuration"
[ -n "$(blobs)" ] || fail "dpkg -r lost the data"

step "dpkg --purge deletes the configuration and says the data was left"
dpkg --purge mvps >"$work/purge.log" 2>&1 || {
  cat "$work/purge.log" >&2
  fail "dpkg --purge"
}
[ ! -e /etc/mvps ] || fail "/etc/mvps left after purge"
! dpkg-statoverride --list /etc/mvps/mvps-te.env >/dev/null || fail "statoverride left"
[ -n "$(blobs)" ] || fail "dpkg --purge deleted the data"
grep -q '/var/lib/mvps .* was left in place' "$work/purge.log" ||
  fail "purge does not say the data directory was left"

step "rpm: same payload, install into a scratch root"
# The .deb's files, with the Debian-only ones left out and /lib/systemd as /usr/lib/systemd.
dpkg-deb -c "$deb" | awk '$1 !~ /^d/ {print substr($6, 2)}' |
  grep -v -e '^/usr/share/doc/mvps/copyright$' -e '^/usr/share/doc/mvps/changelog.Debian.gz$' \
    -e '^/usr/share/lintian/' | sed 's|^/lib/systemd/|/usr/lib/systemd/|' | sort >"$work/deb.list"
rpm -qlp "$rpm_file" | sort >"$work/rpm.list"
diff -u "$work/deb.list" "$work/rpm.list" >&2 || fail "the .rpm and the .deb hold different files"
rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME} %{FILEGROUPNAME} %{FILENAMES}\n]' \
  "$rpm_file" >"$work/rpm.attrs"
for e in "${envs[@]}"; do
  grep -qx -- "-rw-r----- root mvps /etc/mvps/$e" "$work/rpm.attrs" || fail "rpm: /etc/mvps/$e"
done
rpm -qp --configfiles "$rpm_file" | grep -qx /etc/mvps/mvps-te.env || fail "rpm: not %config"
rpm -qp --scripts "$rpm_file" | grep -q 'useradd --system' || fail "rpm: no account creation"
rpm -qp --recommends "$rpm_file" | grep -qx nbd || fail "rpm: does not recommend nbd"
rpm -qp --requires "$rpm_file" | grep -q '^libc.so.6' || fail "rpm: no generated Requires"
scratch=$work/rpmroot
mkdir -p "$scratch"
# --noscripts: the scratch root has no shell or useradd to run them with.
rpm -i --nodeps --noscripts --root "$scratch" "$rpm_file" >"$work/rpm.log" 2>&1 || {
  cat "$work/rpm.log" >&2
  fail "rpm -i --root"
}
while read -r f; do
  [ -f "$scratch$f" ] || fail "rpm -i: $f missing in the scratch root"
done <"$work/rpm.list"
for b in "${binaries[@]}"; do [ -x "$scratch/usr/bin/$b" ] || fail "rpm: $b not executable"; done
[ "$(stat -c %a "$scratch/etc/mvps/mvps-te.env")" = 640 ] || fail "rpm: env file mode"
"$scratch/usr/bin/mvps-te" --version | grep -qx "mvps-te $version" || fail "rpm: mvps-te"

step "rpm -i on this system: the scriptlets make the account and /var/lib/mvps; rpm -e"
# As on a machine that never had mvps: no account, no data directory.
rm -rf /var/lib/mvps
userdel mvps
rpm -i --nodeps "$rpm_file" >"$work/rpm-system.log" 2>&1 || {
  cat "$work/rpm-system.log" >&2
  fail "rpm -i --nodeps on this system"
}
getent passwd mvps >/dev/null || fail "rpm %pre made no mvps account"
for e in "${envs[@]}"; do expect_stat "/etc/mvps/$e" 640 root mvps; done
expect_stat /var/lib/mvps 750 mvps mvps
touch /var/lib/mvps/$MARKER
echo "# edited" >>/etc/mvps/mvps-te.env
rpm -e mvps >"$work/rpm-erase.log" 2>&1 || {
  cat "$work/rpm-erase.log" >&2
  fail "rpm -e"
}
[ ! -e /usr/bin/mvps-te ] || fail "rpm -e left /usr/bin/mvps-te"
[ -e /etc/mvps/mvps-te.env.rpmsave ] || fail "rpm -e did not keep the edited config as .rpmsave"
[ -e /var/lib/mvps/$MARKER ] || fail "rpm -e deleted the data directory"
grep -q '/var/lib/mvps .* was left in place' "$work/rpm-erase.log" ||
  fail "rpm -e does not say the data directory was left"
rm -rf /etc/mvps

step "packages pass: $(basename "$deb"), $(basename "$rpm_file")"
