//! A real file system on the device: qemu-storage-daemon exports the NBD device as a FUSE
//! file, `mkfs.ext4` formats it, the kernel mounts it through a loop device, files are
//! written and checksummed; then everything is torn down, the server is killed with SIGKILL
//! and restarted, the device re-exported and re-mounted, the checksums must match and
//! `e2fsck -fn` must find nothing. Guards the end-to-end path a user takes (DESIGN §5:
//! flushed data survives), with the irregular request mix a file system produces.

use mvps_conformance::fs::{Mount, Qsd};
use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::{cmd, heavy, run, sh};
use std::time::Duration;

const T: Duration = Duration::from_secs(300);
const SIZE: u64 = 512 << 20;

#[test]
fn ext4_files_survive_unmount_kill_9_and_remount() {
    let _h = heavy();
    let mut s = Server::start();
    let tok = token::token(&token::image_id("ext4"), SIZE);
    let (img, mnt) = (s.dir().join("fuse.img"), s.dir().join("mnt"));
    let sums = s.dir().join("sums");

    let q = Qsd::start(&s, &tok, &img, SIZE);
    run(cmd("mkfs.ext4", ["-q", "-F"]).arg(&img), T).ok();
    let m = Mount::new(&img, &mnt);
    let script = format!(
        "set -e; cd '{mnt}'; mkdir -p a/b/c; \
         dd if=/dev/urandom of=big bs=1M count=40 status=none; \
         dd if=/dev/urandom of=a/odd bs=1 count=4097 status=none; \
         for i in $(seq 1 200); do head -c $((i * 37)) /dev/urandom > a/b/c/f$i; done; \
         echo hello > a/hello; ln -s hello a/link; \
         find . -type f -print0 | sort -z | xargs -0 sha256sum > '{sums}'",
        mnt = mnt.display(),
        sums = sums.display()
    );
    sh(&script, T);
    assert_eq!(std::fs::read_to_string(&sums).unwrap().lines().count(), 203);
    m.umount();
    q.stop();

    s.kill9();
    s.restart();

    let q = Qsd::start(&s, &tok, &img, SIZE);
    let m = Mount::new(&img, &mnt);
    let out = sh(
        &format!(
            "cd '{}' && sha256sum -c --quiet '{}' && readlink a/link",
            mnt.display(),
            sums.display()
        ),
        T,
    );
    assert_eq!(out.trim(), "hello");
    m.umount();
    let fsck = run(cmd("e2fsck", ["-fn"]).arg(&img), T);
    assert_eq!(fsck.status.code(), Some(0), "e2fsck found problems: {fsck}");
    q.stop();
}
