//! Graceful shutdown: SIGTERM and SIGINT make `mvps-te` finish in-flight requests and exit
//! with status 0, also with idle clients still connected and with a writer streaming
//! requests; everything replied before the signal is readable after a restart. Guards a
//! shutdown that hangs on open connections, exits non-zero (which systemd reports as a
//! failure), or drops replied writes.

use mvps_conformance::nbd;
use mvps_conformance::server::Server;
use mvps_conformance::token;
use mvps_conformance::tools::pattern;
use std::time::Duration;

#[test]
fn sigterm_exits_zero_and_keeps_the_data() {
    let mut s = Server::start();
    let tok = token::token(&token::image_id("term"), 16 << 20);
    let data = pattern(40, 300_001);
    let mut c = s.open(&tok);
    c.write(77, &data).unwrap();
    c.disconnect();
    let st = s.terminate();
    assert_eq!(st.code(), Some(0), "SIGTERM exit: {st}\n{}", s.log_tail());
    s.restart();
    assert!(s.open(&tok).read(77, data.len() as u32) == Ok(data));
}

#[test]
fn sigint_exits_zero() {
    let mut s = Server::start();
    s.assert_serves();
    let st = s.signal_and_wait(libc::SIGINT);
    assert_eq!(st.code(), Some(0), "SIGINT exit: {st}\n{}", s.log_tail());
}

#[test]
fn sigterm_with_idle_clients_connected_exits_zero() {
    let mut s = Server::start();
    let tok = token::token(&token::image_id("term-idle"), 16 << 20);
    let mut idle = s.open(&tok);
    idle.write(0, b"idle").unwrap();
    let _in_handshake = s.handshake();
    let st = s.terminate();
    assert_eq!(st.code(), Some(0), "SIGTERM exit: {st}\n{}", s.log_tail());
    assert!(
        idle.closed_within(Duration::from_secs(5)),
        "client not disconnected"
    );
    s.restart();
    assert_eq!(s.open(&tok).read(0, 4), Ok(b"idle".to_vec()));
}

#[test]
fn sigterm_during_a_stream_of_writes_keeps_every_replied_one() {
    let mut s = Server::start();
    let tok = token::token(&token::image_id("term-stream"), 1 << 30);
    const BLOCK: u64 = 4096 + 7;
    let mut c = s.open(&tok);
    let writer = std::thread::spawn(move || {
        let mut acked = Vec::new();
        for i in 0..100_000u64 {
            let data = pattern(i, BLOCK as usize);
            if c.send_request(0, nbd::CMD_WRITE, i * BLOCK, BLOCK as u32, &data)
                .is_err()
            {
                break;
            }
            match c.read_reply() {
                Ok((_, Ok(_))) => acked.push(i),
                Ok((_, Err(_))) | Err(_) => break, // refused or cut off by the shutdown
            }
        }
        acked
    });
    std::thread::sleep(Duration::from_millis(400));
    let st = s.terminate();
    let acked = writer.join().unwrap();
    assert_eq!(st.code(), Some(0), "SIGTERM exit: {st}\n{}", s.log_tail());
    assert!(acked.len() > 20, "too few writes: {}", acked.len());
    s.restart();
    let mut c = s.open(&tok);
    for i in acked {
        let got = c.read(i * BLOCK, BLOCK as u32).unwrap();
        assert!(
            got == pattern(i, BLOCK as usize),
            "replied write {i} lost over SIGTERM"
        );
    }
}

#[test]
fn sigterm_answers_every_request_it_has_read() {
    let mut s = Server::start();
    let tok = token::token(&token::image_id("term-inflight"), 64 << 20);
    let mut c = s.open(&tok);
    // 48 writes of 256 KiB in flight at once, then SIGTERM before reading any reply.
    const N: u64 = 48;
    const LEN: usize = 256 << 10;
    let mut sent = Vec::new();
    for i in 0..N {
        let h = c.send_request(
            0,
            nbd::CMD_WRITE,
            i * LEN as u64,
            LEN as u32,
            &pattern(i, LEN),
        );
        match h {
            Ok(h) => sent.push((h, i)),
            Err(_) => break,
        }
    }
    s.signal(libc::SIGTERM);
    let mut ok = Vec::new();
    let mut answered = Vec::new();
    while let Ok((h, r)) = c.read_reply() {
        answered.push(h);
        if r.is_ok() {
            ok.push(
                sent.iter()
                    .find(|x| x.0 == h)
                    .expect("reply to a request we sent")
                    .1,
            );
        }
    }
    let st = s.wait_exit();
    assert_eq!(st.code(), Some(0), "SIGTERM exit: {st}\n{}", s.log_tail());
    eprintln!(
        "{} sent, {} answered, {} acknowledged",
        sent.len(),
        answered.len(),
        ok.len()
    );
    // Requests are read in order: those answered must be the first ones sent, none skipped.
    answered.sort_unstable();
    let first: Vec<u64> = sent.iter().take(answered.len()).map(|x| x.0).collect();
    assert_eq!(
        answered, first,
        "a request read before the shutdown got no reply"
    );
    s.restart();
    let mut c = s.open(&tok);
    for i in ok {
        let got = c.read(i * LEN as u64, LEN as u32).unwrap();
        assert!(
            got == pattern(i, LEN),
            "write {i} was acknowledged but is lost"
        );
    }
}
