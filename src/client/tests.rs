//! The client's framing, against scripted servers on a socket pair: handshake variants
//! (GO with block sizes, refusal with a message, EXPORT_NAME fallback), request splitting,
//! error replies, and protocol violations.

use super::*;
use std::thread::JoinHandle;

/// The server end of a socket pair, with helpers that speak the server side of the spec.
struct Peer(UnixStream);

impl Peer {
    fn greet(&mut self, flags: u16) {
        let mut g = NBDMAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&flags.to_be_bytes());
        self.0.write_all(&g).unwrap();
        let client_flags = be32(&read_array::<4>(&mut self.0).unwrap());
        assert_eq!(
            client_flags & NBD_FLAG_C_FIXED_NEWSTYLE,
            NBD_FLAG_C_FIXED_NEWSTYLE
        );
    }

    fn option(&mut self) -> (u32, Vec<u8>) {
        let h = read_array::<16>(&mut self.0).unwrap();
        assert_eq!(be64(&h), IHAVEOPT);
        let mut data = vec![0u8; be32(&h[12..]) as usize];
        self.0.read_exact(&mut data).unwrap();
        (be32(&h[8..]), data)
    }

    fn opt_reply(&mut self, opt: u32, typ: u32, data: &[u8]) {
        let mut m = NBD_OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&typ.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.0.write_all(&m).unwrap();
    }

    /// Answers NBD_OPT_GO with an export of `size` and, if given, a maximum payload.
    fn go(&mut self, size: u64, payload_max: Option<u32>) {
        let (opt, data) = self.option();
        assert_eq!(opt, NBD_OPT_GO);
        assert_eq!(
            data,
            go_payload("tok"),
            "GO payload asks for NBD_INFO_BLOCK_SIZE"
        );
        let mut e = NBD_INFO_EXPORT.to_be_bytes().to_vec();
        e.extend_from_slice(&size.to_be_bytes());
        e.extend_from_slice(&0x016du16.to_be_bytes());
        self.opt_reply(NBD_OPT_GO, NBD_REP_INFO, &e);
        if let Some(max) = payload_max {
            let mut b = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
            for v in [1u32, 4096, max] {
                b.extend_from_slice(&v.to_be_bytes());
            }
            self.opt_reply(NBD_OPT_GO, NBD_REP_INFO, &b);
        }
        self.opt_reply(NBD_OPT_GO, NBD_REP_ACK, &[]);
    }

    /// (flags, command, cookie, offset, length, payload) of the next request.
    fn request(&mut self) -> Option<(u16, u16, u64, u64, u32, Vec<u8>)> {
        let h = read_array::<28>(&mut self.0).ok()?;
        assert_eq!(be32(&h), NBD_REQUEST_MAGIC);
        let (flags, cmd, cookie) = (be16(&h[4..]), be16(&h[6..]), be64(&h[8..]));
        let (offset, length) = (be64(&h[16..]), be32(&h[24..]));
        let mut payload = Vec::new();
        if cmd == NBD_CMD_WRITE {
            payload = vec![0u8; length as usize];
            self.0.read_exact(&mut payload).unwrap();
        }
        Some((flags, cmd, cookie, offset, length, payload))
    }

    fn reply(&mut self, errno: u32, cookie: u64, data: &[u8]) {
        let mut m = NBD_SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&errno.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(data);
        self.0.write_all(&m).unwrap();
    }
}

/// Runs `server` on one end of a socket pair and the handshake on the other.
fn scripted<T: Send + 'static>(
    server: impl FnOnce(&mut Peer) -> T + Send + 'static,
) -> (Result<Client>, JoinHandle<T>) {
    let (a, b) = UnixStream::pair().unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let h = std::thread::spawn(move || server(&mut Peer(b)));
    (Client::handshake(Stream::Unix(a), "tok"), h)
}

#[test]
fn request_header_layout() {
    let h = encode_request(NBD_CMD_FLAG_FUA, NBD_CMD_MVPS_COMMIT_TXN, 0x0102, 0x0a0b, 7);
    assert_eq!(&h[0..4], &[0x25, 0x60, 0x95, 0x13]);
    assert_eq!(&h[4..6], &[0, 1]);
    assert_eq!(&h[6..8], &[0, 65]);
    assert_eq!(&h[8..16], &[0, 0, 0, 0, 0, 0, 1, 2]);
    assert_eq!(&h[16..24], &[0, 0, 0, 0, 0, 0, 0x0a, 0x0b]);
    assert_eq!(&h[24..28], &[0, 0, 0, 7]);
}

#[test]
fn reply_header_parsing() {
    let mut r = [0u8; 16];
    r[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    r[4..8].copy_from_slice(&NBD_EPERM.to_be_bytes());
    r[8..16].copy_from_slice(&9u64.to_be_bytes());
    assert_eq!(parse_simple_reply(&r).unwrap(), (NBD_EPERM, 9));
    r[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    assert!(matches!(parse_simple_reply(&r), Err(Error::Protocol(m)) if m.contains("structured")));
    r[0] = 0;
    assert!(matches!(parse_simple_reply(&r), Err(Error::Protocol(_))));
}

#[test]
fn greeting_checks() {
    let mut g = [0u8; 18];
    g[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..18].copy_from_slice(&3u16.to_be_bytes());
    assert_eq!(parse_greeting(&g).unwrap(), 3);
    g[17] = 2; // newstyle, not fixed
    assert!(matches!(parse_greeting(&g), Err(Error::Handshake(m)) if m.contains("fixed")));
    g[8..16].copy_from_slice(&CLISERV_MAGIC.to_be_bytes());
    assert!(matches!(parse_greeting(&g), Err(Error::Handshake(m)) if m.contains("oldstyle")));
    g[0] = b'X';
    assert!(matches!(parse_greeting(&g), Err(Error::Handshake(_))));
}

#[test]
fn splitting_and_payload_limits() {
    let v: Vec<_> = split(10, 25, 10).collect();
    assert_eq!(v, vec![(10, 10), (20, 10), (30, 5)]);
    assert_eq!(split(5, 0, 10).count(), 0);
    assert_eq!(split(0, 10, 10).collect::<Vec<_>>(), vec![(0, 10)]);
    assert_eq!(payload_bytes_max(None), 1 << 25);
    let b = |minimum, maximum| {
        Some(BlockSizes {
            minimum,
            preferred: 4096,
            maximum,
        })
    };
    assert_eq!(payload_bytes_max(b(1, 1 << 25)), 1 << 25);
    assert_eq!(payload_bytes_max(b(512, 10_000)), 9728);
    assert_eq!(payload_bytes_max(b(1, u32::MAX)), PAYLOAD_BYTES_MAX);
    assert_eq!(payload_bytes_max(b(4096, 0)), 4096);
}

#[test]
fn info_parsing() {
    let mut e = NBD_INFO_EXPORT.to_be_bytes().to_vec();
    e.extend_from_slice(&(1u64 << 30).to_be_bytes());
    e.extend_from_slice(&5u16.to_be_bytes());
    assert_eq!(parse_info(&e).unwrap(), Info::Export(1 << 30, 5));
    e.push(0);
    assert!(parse_info(&e).is_err());
    assert_eq!(parse_info(&[0, 1, 9, 9, 9]).unwrap(), Info::Other);
    assert!(parse_info(&[0]).is_err());
}

#[test]
fn go_with_block_sizes_and_split_reads_and_writes() {
    let (c, server) = scripted(|p| {
        p.greet(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        p.go(1 << 20, Some(4096));
        let mut seen = Vec::new();
        while let Some((flags, cmd, cookie, offset, length, payload)) = p.request() {
            if cmd == NBD_CMD_DISC {
                break;
            }
            seen.push((flags, cmd, offset, length, payload.len()));
            let data: Vec<u8> = if cmd == NBD_CMD_READ {
                (0..length).map(|i| (offset + i as u64) as u8).collect()
            } else {
                vec![]
            };
            p.reply(0, cookie, &data);
        }
        seen
    });
    let mut c = c.unwrap();
    assert_eq!(c.size(), 1 << 20);
    assert_eq!(c.payload_bytes_max(), 4096);
    assert_eq!(c.block_sizes().unwrap().preferred, 4096);
    c.write_fua(100, &[7u8; 10_000]).unwrap();
    let got = c.read(5000, 9000).unwrap();
    assert_eq!(got, (5000..14_000u64).map(|i| i as u8).collect::<Vec<_>>());
    c.begin().unwrap();
    c.commit_fua().unwrap();
    c.disconnect().unwrap();
    let fua = NBD_CMD_FLAG_FUA;
    let commit = NBD_CMD_MVPS_COMMIT_TXN;
    assert_eq!(
        server.join().unwrap(),
        vec![
            (fua, NBD_CMD_WRITE, 100, 4096, 4096),
            (fua, NBD_CMD_WRITE, 4196, 4096, 4096),
            (fua, NBD_CMD_WRITE, 8292, 1808, 1808),
            (0, NBD_CMD_READ, 5000, 4096, 0),
            (0, NBD_CMD_READ, 9096, 4096, 0),
            (0, NBD_CMD_READ, 13_192, 808, 0),
            (0, NBD_CMD_MVPS_BEGIN_TXN, 0, 0, 0),
            (fua, commit, 0, 0, 0),
        ]
    );
}

#[test]
fn refusal_carries_the_server_message() {
    let (c, server) = scripted(|p| {
        p.greet(NBD_FLAG_FIXED_NEWSTYLE);
        let (opt, _) = p.option();
        p.opt_reply(opt, NBD_REP_ERR_POLICY, b"token refused: expired");
    });
    let e = c.unwrap_err();
    server.join().unwrap();
    let text = e.to_string();
    assert!(matches!(e, Error::Handshake(_)), "{e:?}");
    assert!(text.contains("token refused: expired"), "{text}");
    assert!(text.contains("NBD_REP_ERR_POLICY"), "{text}");
}

#[test]
fn falls_back_to_export_name_when_go_is_unsupported() {
    let (c, server) = scripted(|p| {
        p.greet(NBD_FLAG_FIXED_NEWSTYLE); // no NO_ZEROES: the 124 zero bytes follow
        let (opt, _) = p.option();
        p.opt_reply(opt, NBD_REP_ERR_UNSUP, b"");
        let (opt, name) = p.option();
        assert_eq!((opt, name.as_slice()), (NBD_OPT_EXPORT_NAME, &b"tok"[..]));
        let mut m = (3u64 << 30).to_be_bytes().to_vec();
        m.extend_from_slice(&(NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_TRIM).to_be_bytes());
        m.extend_from_slice(&[0u8; 124]);
        p.0.write_all(&m).unwrap();
        let mut lengths = Vec::new();
        while let Some((_, cmd, cookie, _, length, _)) = p.request() {
            if cmd == NBD_CMD_DISC {
                break;
            }
            lengths.push(length);
            p.reply(0, cookie, &[]);
        }
        lengths
    });
    let mut c = c.unwrap();
    assert_eq!((c.size(), c.block_sizes()), (3 << 30, None));
    assert_eq!(c.payload_bytes_max(), PAYLOAD_BYTES_DEFAULT);
    // TRIM longer than EFFECT_BYTES_MAX is split; FLUSH was not advertised.
    c.trim(0, (2 << 30) + 5).unwrap();
    assert!(matches!(c.flush(), Err(Error::Unsupported(_))));
    drop(c); // sends NBD_CMD_DISC
    assert_eq!(server.join().unwrap(), vec![1 << 30, 1 << 30, 5]);
}

#[test]
fn export_name_refusal_is_a_handshake_error() {
    let (c, server) = scripted(|p| {
        p.greet(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        let (opt, _) = p.option();
        p.opt_reply(opt, NBD_REP_ERR_UNSUP, b"");
        p.option();
        // Close without a word, as a server must after refusing NBD_OPT_EXPORT_NAME.
    });
    let e = c.unwrap_err();
    server.join().unwrap();
    assert!(
        matches!(&e, Error::Handshake(m) if m.contains("NBD_OPT_EXPORT_NAME")),
        "{e:?}"
    );
}

#[test]
fn error_replies_keep_the_connection_and_violations_break_it() {
    let (c, server) = scripted(|p| {
        p.greet(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        p.go(1 << 20, None);
        let (_, cmd, cookie, ..) = p.request().unwrap();
        assert_eq!(cmd, NBD_CMD_MVPS_LOCK_TXN);
        p.reply(NBD_EPERM, cookie, &[]);
        let (_, cmd, cookie, ..) = p.request().unwrap();
        assert_eq!(cmd, NBD_CMD_MVPS_ROLLBACK_TXN);
        p.reply(0, cookie, &[]);
        let (_, _, cookie, ..) = p.request().unwrap();
        p.reply(0, cookie + 1, &[]); // wrong cookie
        p.request().is_none()
    });
    let mut c = c.unwrap();
    let e = c.lock().unwrap_err();
    assert!(e.is_conflict(), "{e:?}");
    assert_eq!(e.to_string(), "NBD_CMD_MVPS_LOCK_TXN failed: EPERM (1)");
    c.rollback().unwrap();
    assert!(matches!(c.begin(), Err(Error::Protocol(_))));
    assert!(matches!(c.read(0, 1), Err(Error::Io(e)) if e.kind() == io::ErrorKind::NotConnected));
    // Out of range: refused locally, nothing sent.
    assert!(matches!(
        c.write(1 << 20, &[1]),
        Err(Error::OutOfRange { .. })
    ));
    drop(c); // broken: no DISC, the socket just closes
    assert!(
        server.join().unwrap(),
        "nothing is sent after a protocol violation"
    );
}

#[test]
fn einval_is_not_a_conflict() {
    let e = Error::Nbd {
        command: "NBD_CMD_MVPS_COMMIT_TXN",
        errno: NBD_EINVAL,
    };
    assert!(!e.is_conflict());
    assert_eq!(e.errno(), Some(22));
    assert!(e.to_string().contains("EINVAL"));
}
