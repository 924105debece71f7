//! Writer fencing between buffer stores (DESIGN §3, §4): two servers share one image store
//! but have their own buffer stores. When B opens an image that A serves, B takes it over
//! and reads everything A had checkpointed; A's next manifest write is then refused, A stops
//! writing the image (its clients get errors), and nothing A wrote after the take-over ever
//! shows on B. A restarted A refuses the image, naming both writer ids, instead of serving a
//! split brain. Also: a token whose page size differs from the image's is refused.

use mvps_conformance::manifest;
use mvps_conformance::nbd::OptError;
use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::pattern;
use std::path::Path;
use std::time::{Duration, Instant};

const SIZE: u64 = 16 << 20;

fn server_on(image_store: &Path) -> Server {
    Server::builder()
        .args([
            "--checkpoint-interval-ms",
            "200",
            "--checkpoint-interval-jitter-ms",
            "0",
        ])
        .args(["--image-store-local-path", image_store.to_str().unwrap()])
        .start()
}

/// The writer id a server log says it took the image over as.
fn takeover_writer_id(log: &str, id: &str) -> String {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(id) && l.contains("took over as writer "))
        .unwrap_or_else(|| panic!("no take-over of {id} in the log:\n{log}"));
    let rest = line.split("took over as writer ").nth(1).unwrap();
    rest.split_whitespace().next().unwrap().to_string()
}

#[test]
fn a_take_over_fences_the_old_writer() {
    let shared = tempfile::tempdir().unwrap();
    let store = shared.path();
    let id = token::image_id("fence");
    let tok = token::token(&id, SIZE);

    let mut a = server_on(store);
    let mut ca = a.open(&tok);
    let d1 = pattern(80, 100_000);
    ca.write(0, &d1).unwrap();
    ca.flush().unwrap();
    // 100 000 bytes at 0: pages 0..=24.
    manifest::wait_for_pages(25, Duration::from_secs(60), || {
        manifest::newest_local(store, &id)
    });

    let b = server_on(store);
    let mut cb = b.open(&tok);
    assert!(
        cb.read(0, d1.len() as u32) == Ok(d1.clone()),
        "B does not see A's checkpoint"
    );
    cb.write(200_000, b"written by B").unwrap();
    cb.flush().unwrap();
    let b_writer = takeover_writer_id(&b.log(), &id);

    // A goes on writing; within a few checkpoint intervals it must notice and refuse.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut fenced = false;
    let mut i = 0u64;
    while Instant::now() < deadline {
        i += 1;
        let off = 300_000 + (i % 100) * 4096;
        let w = ca.send_request(0, 1, off, 4096, &[0xa0; 4096]);
        if w.is_err() || !matches!(ca.read_reply(), Ok((_, Ok(_)))) {
            fenced = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        fenced,
        "A kept accepting writes 20 s after B took the image over\n{}",
        a.log_tail()
    );

    // Nothing A wrote after the take-over shows on B, now or after B restarts.
    let zeros = vec![0u8; 100 * 4096];
    assert!(
        cb.read(300_000, zeros.len() as u32) == Ok(zeros.clone()),
        "A's write leaked to B"
    );
    assert_eq!(cb.read(200_000, 12), Ok(b"written by B".to_vec()));
    drop(cb);
    let mut b = b;
    b.kill9();
    b.restart();
    let mut cb = b.open(&tok);
    assert!(
        cb.read(300_000, zeros.len() as u32) == Ok(zeros),
        "A's write leaked to B"
    );
    assert!(
        cb.read(0, d1.len() as u32) == Ok(d1),
        "A's checkpointed data lost"
    );
    drop(cb);
    b.kill9();

    // A restarted on its old buffer store refuses the image and says who owns it.
    a.kill9();
    a.restart();
    let mut c = a.handshake();
    match c.go(&tok) {
        Err(OptError::Refused(_)) => {}
        other => panic!("A served an image B owns: {other:?}\n{}", a.log_tail()),
    }
    assert!(
        a.log().contains(&b_writer),
        "refusal does not name the owner {b_writer}"
    );
}

#[test]
fn a_token_with_another_page_size_is_refused_once_the_image_has_data() {
    let s = Server::start();
    let id = token::image_id("pagesize-change");
    let mut c = s.open(&token::token(&id, SIZE));
    c.write(0, b"data").unwrap();
    c.disconnect();
    let mut cl = token::claims(&id, SIZE);
    cl.page_size_bits = 9;
    let mut c = s.handshake();
    assert!(
        matches!(c.go(&token::mint(&cl)), Err(OptError::Refused(_))),
        "page size changed"
    );
    assert_eq!(
        s.open(&token::token(&id, SIZE)).read(0, 4),
        Ok(b"data".to_vec())
    );
}
