#!/usr/bin/env bash
# Builds the mvps packages from the working tree:
#   ./packaging/build.sh [OUTDIR]        (default OUTDIR: target/packages)
# writes OUTDIR/mvps_<version>-1_<arch>.deb (cargo-deb) and OUTDIR/mvps-<version>-1.<arch>.rpm
# (cargo-generate-rpm), installing those two cargo tools first when they are missing.
#
# The payload is staged once, in <target>/packaging/pkgroot/<kind>/, and both packages take
# each staging directory whole (the asset lists in Cargo.toml), so they hold the same files.
# mvps-s3-gc (its binary, man page, units and environment file) is staged only when the gc/
# package exists in the workspace.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
outdir=${1:-target/packages}
profile=packaging

# Versions these scripts and the asset lists were written against (same major).
CARGO_DEB_VERSION="^3.8"
CARGO_GENERATE_RPM_VERSION="^0.21"

log() { printf '==> %s\n' "$*" >&2; }

ensure_tool() { # subcommand, crate, version requirement
  if ! cargo "$1" --version >/dev/null 2>&1; then
    log "installing $2 ($3)"
    cargo install --locked --quiet "$2" --version "$3"
  fi
}
ensure_tool deb cargo-deb "$CARGO_DEB_VERSION"
ensure_tool generate-rpm cargo-generate-rpm "$CARGO_GENERATE_RPM_VERSION"

target_dir=$(cargo metadata --format-version 1 --no-deps |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target_dir" ] || { echo "build.sh: cannot find cargo's target directory" >&2; exit 1; }
bin_dir=$target_dir/$profile

with_gc=false
packages=(-p mvps-te)
if [ -f gc/Cargo.toml ]; then
  with_gc=true
  packages+=(-p mvps-s3-gc)
fi

log "cargo build --profile $profile ${packages[*]}"
cargo build --locked --quiet --profile "$profile" "${packages[@]}"

# The asset lists name target/release/pkgroot/...; both tools map target/release/ to
# <target>/<profile>/.
stage=$bin_dir/pkgroot
rm -rf "$stage"
mkdir -p "$stage"/{bin,man1,man8,units,etc,doc}
put() { # mode, source, staging directory
  install -m "$1" "$2" "$stage/$3/"
}
put 755 "$bin_dir/mvps-te" bin
put 755 "$bin_dir/mvpsctl" bin
put 644 packaging/systemd/mvps-te.service units
put 640 packaging/etc/mvps-te.env etc
put 644 README.md doc
put 644 packaging/nbdtab.example doc
manpages=(man/mvps-te.8 man/mvpsctl.1)
if $with_gc; then
  put 755 "$bin_dir/mvps-s3-gc" bin
  put 644 packaging/systemd/mvps-s3-gc.service units
  put 644 packaging/systemd/mvps-s3-gc.timer units
  put 640 packaging/etc/mvps-s3-gc.env etc
  manpages+=(man/mvps-s3-gc.8)
fi
for page in "${manpages[@]}"; do
  section=${page##*.}
  # -n: no name or time stamp in the header, so the package is reproducible.
  gzip -9n <"$page" >"$stage/man$section/$(basename "$page").gz"
  chmod 644 "$stage/man$section/$(basename "$page").gz"
done

mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
log "cargo deb -> $outdir"
cargo deb --no-build --quiet --profile "$profile" -p mvps-te -o "$outdir" >/dev/null
log "cargo generate-rpm -> $outdir"
cargo generate-rpm --profile "$profile" -p . --target-dir "$target_dir" -o "$outdir"
ls -1 "$outdir"/*.deb "$outdir"/*.rpm
