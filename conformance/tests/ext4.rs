//! A real file system on the device: qemu-storage-daemon exports the NBD device as a FUSE
//! file, `mkfs.ext4` formats it, the kernel mounts it through a loop device, files are
//! written and checksummed; then everything is torn down, the server is killed with SIGKILL
//! and restarted, the device re-exported and re-mounted, the checksums must match and
//! `e2fsck -fn` must find nothing. Guards the end-to-end path a user takes (DESIGN §5:
//! flushed data survives), with the irregular request mix a file system produces.

use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::{cmd, heavy, run, sh, wait_for, wait_timeout};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(300);
const SIZE: u64 = 512 << 20;

/// A qemu-storage-daemon exporting the device as a FUSE file; stopped on drop.
struct Qsd {
    child: Child,
    file: PathBuf,
}

impl Qsd {
    fn start(s: &Server, tok: &str, file: &Path) -> Qsd {
        std::fs::write(file, b"").unwrap();
        let log = std::fs::File::create(file.with_extension("qsd.log")).unwrap();
        let child = cmd(
            "qemu-storage-daemon",
            [
                "--blockdev".to_string(),
                format!("{},node-name=n", s.qemu_opts(tok)),
                "--export".to_string(),
                format!(
                    "type=fuse,id=e,node-name=n,mountpoint={},writable=on",
                    file.display()
                ),
            ],
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting qemu-storage-daemon");
        let mut q = Qsd {
            child,
            file: file.to_owned(),
        };
        wait_for("the FUSE export", Duration::from_secs(30), || {
            if let Some(st) = q.child.try_wait().unwrap() {
                panic!("qemu-storage-daemon exited: {st}\n{}", q.log());
            }
            (std::fs::metadata(file).ok()?.len() == SIZE).then_some(())
        });
        q
    }

    fn log(&self) -> String {
        mvps_conformance::tools::read(&self.file.with_extension("qsd.log"))
    }

    /// SIGTERM, wait, and require a clean exit (qemu flushes the device on the way out).
    fn stop(mut self) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let st = wait_timeout(&mut self.child, Duration::from_secs(60));
        assert!(
            st.is_some_and(|s| s.success()),
            "qemu-storage-daemon: {st:?}\n{}",
            self.log()
        );
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = run(cmd("fusermount3", ["-u", "-z"]).arg(&self.file), T);
    }
}

/// A loop mount of a file; lazily unmounted on drop if still mounted.
struct Mount {
    dir: PathBuf,
    mounted: bool,
}

impl Mount {
    fn new(image: &Path, dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        run(cmd("mount", ["-o", "loop"]).arg(image).arg(dir), T).ok();
        Mount {
            dir: dir.to_owned(),
            mounted: true,
        }
    }

    fn umount(mut self) {
        run(&mut cmd("umount", [&self.dir]), T).ok();
        self.mounted = false;
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = run(cmd("umount", ["-l"]).arg(&self.dir), T);
        }
    }
}

#[test]
fn ext4_files_survive_unmount_kill_9_and_remount() {
    let _h = heavy();
    let mut s = Server::start();
    let tok = token::token(&token::image_id("ext4"), SIZE);
    let (img, mnt) = (s.dir().join("fuse.img"), s.dir().join("mnt"));
    let sums = s.dir().join("sums");

    let q = Qsd::start(&s, &tok, &img);
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

    let q = Qsd::start(&s, &tok, &img);
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
