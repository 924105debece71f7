//! A file system on the device: `qemu-storage-daemon` exports an NBD export as a FUSE file,
//! which the kernel loop-mounts. Used by the ext4 suites (local and S3 image store).

use crate::server::Server;
use crate::tools::{cmd, read, run, wait_for, wait_timeout};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

/// Timeout of the tools run here (mkfs, mount, umount, fusermount).
const T: Duration = Duration::from_secs(300);

/// A qemu-storage-daemon exporting the device as a FUSE file; stopped on drop.
pub struct Qsd {
    child: Child,
    file: PathBuf,
}

impl Qsd {
    /// Exports `tok`'s image on `s` (of `size` bytes) as the file `file`, and waits until the
    /// file has the device's size.
    pub fn start(s: &Server, tok: &str, file: &Path, size: u64) -> Qsd {
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
            (std::fs::metadata(file).ok()?.len() == size).then_some(())
        });
        q
    }

    pub fn log(&self) -> String {
        read(&self.file.with_extension("qsd.log"))
    }

    /// SIGTERM, wait, and require a clean exit (qemu flushes the device on the way out).
    pub fn stop(mut self) {
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
pub struct Mount {
    dir: PathBuf,
    mounted: bool,
}

impl Mount {
    pub fn new(image: &Path, dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        run(cmd("mount", ["-o", "loop"]).arg(image).arg(dir), T).ok();
        Mount {
            dir: dir.to_owned(),
            mounted: true,
        }
    }

    pub fn umount(mut self) {
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
