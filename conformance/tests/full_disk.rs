//! A full disk is an answer, not a failure (DESIGN §7). The buffer store and the local image
//! store live on a 160 MiB tmpfs of their own, 112 MiB of it taken by a filler file (the
//! buffer, once full, needs as much free space again to be checkpointed: layers are staged
//! in the buffer store before they are uploaded or linked into place). Writes go on
//! until the disk is full: from then on they get ENOSPC (the server stays up, reads keep
//! working, everything replied reads back); once the filler is deleted the server carries on
//! by itself — writes are replied again and the buffer is checkpointed — without a restart.
//! After a stop and a restart every replied write is still there.

use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::{cmd, pattern, run, wait_for};
use std::path::{Path, PathBuf};
use std::time::Duration;

const CHUNK: usize = 256 << 10;
const ENOSPC: u32 = 28;

/// A size-limited tmpfs mounted on a temp dir; unmounted on drop.
struct SmallFs {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl SmallFs {
    fn mount(size: &str) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let opts = format!("size={size}");
        run(
            cmd("mount", ["-t", "tmpfs", "-o", &opts, "tmpfs"]).arg(&path),
            Duration::from_secs(30),
        )
        .ok();
        SmallFs { _dir: dir, path }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = cmd("umount", ["-l"]).arg(&self.path).status();
    }
}

fn fill(path: &Path, bytes: usize) {
    std::fs::write(path, vec![0xA5u8; bytes]).unwrap();
}

#[test]
fn writes_get_enospc_on_a_full_disk_and_resume_when_space_returns() {
    let fs = SmallFs::mount("160m");
    let filler = fs.path.join("filler");
    fill(&filler, 112 << 20);
    let buffer = fs.path.join("buffer-store");
    let images = fs.path.join("image-store");
    let mut s = Server::builder()
        .args(["--buffer-store-path", buffer.to_str().unwrap()])
        .args(["--image-store-local-path", images.to_str().unwrap()])
        .args([
            "--drain-timeout-ms",
            "20000",
            "--checkpoint-interval-ms",
            "8000",
        ])
        .start();
    let tok = token::token(&token::image_id("full"), 1 << 30);
    let mut c = s.open(&tok);

    // Until the disk is full.
    let mut replied = Vec::new();
    let mut refused = None;
    for i in 0..1024u64 {
        match c.write(i * CHUNK as u64, &pattern(i, CHUNK)) {
            Ok(()) => replied.push(i),
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (first_refused, errno) = refused.expect("48 MiB of free space never ran out");
    assert_eq!(
        errno,
        ENOSPC,
        "a full disk answers ENOSPC\n{}",
        s.log_tail()
    );
    assert!(
        replied.len() >= 32,
        "only {} writes before ENOSPC",
        replied.len()
    );
    // Still full: refused again, not hung, not crashed; reads and FLUSH work.
    assert_eq!(
        c.write(first_refused * CHUNK as u64, &pattern(first_refused, CHUNK)),
        Err(ENOSPC)
    );
    c.flush().unwrap();
    for &i in replied.iter().step_by(7) {
        let got = c.read(i * CHUNK as u64, CHUNK as u32).unwrap();
        assert!(
            got == pattern(i, CHUNK),
            "replied write {i} unreadable on a full disk"
        );
    }
    s.assert_running();

    // Space returns: the server carries on by itself.
    std::fs::remove_file(&filler).unwrap();
    wait_for(
        "writes to be replied again",
        Duration::from_secs(60),
        || match c.write(first_refused * CHUNK as u64, &pattern(first_refused, CHUNK)) {
            Ok(()) => Some(()),
            Err(ENOSPC) => {
                std::thread::sleep(Duration::from_millis(200));
                None
            }
            Err(e) => panic!("write after space returned: error {e}"),
        },
    );
    replied.push(first_refused);
    // …and checkpoints again (the failed attempts are retried with backoff): the buffer
    // moves into a layer.
    wait_for(
        "a checkpoint after space returned",
        Duration::from_secs(90),
        || s.log().contains(": checkpoint: ").then_some(()),
    );
    // Nothing half-written: every replied write reads back, on this connection and after a
    // stop (which drains the buffer into layers) and a restart.
    for &i in &replied {
        let got = c.read(i * CHUNK as u64, CHUNK as u32).unwrap();
        assert!(got == pattern(i, CHUNK), "replied write {i} lost");
    }
    drop(c);
    let st = s.terminate();
    assert_eq!(st.code(), Some(0), "{st}\n{}", s.log_tail());
    s.restart();
    let mut c = s.open(&tok);
    for &i in &replied {
        let got = c.read(i * CHUNK as u64, CHUNK as u32).unwrap();
        assert!(
            got == pattern(i, CHUNK),
            "replied write {i} lost over the restart"
        );
    }
}
