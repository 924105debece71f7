//! Fixed-newstyle handshake (spec: "Handshake" and "Option types").
//!
//! Every option payload is length-checked before it is sliced. Unknown options are answered
//! with NBD_REP_ERR_UNSUP after their payload is drained; malformed ones with
//! NBD_REP_ERR_INVALID; the loop is bounded by OPTIONS_COUNT_MAX.

use super::consts::*;
use super::stream::Stream;
use super::{Export, ExportInfo, Exports, Kill, Refusal};
use crate::limits::{OPTIONS_COUNT_MAX, OPTION_LENGTH_MAX, REQUEST_PAYLOAD_BYTES_MAX};
use std::io::{self, Read, Write};

/// Where a handshake ended.
pub enum Outcome {
    /// Enter transmission with this export.
    Serve(Box<dyn Export>),
    /// The client aborted, or the handshake failed in a way that closes the connection.
    Closed(String),
}

fn read_u32(mut s: &Stream) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn send_reply(mut s: &Stream, opt: u32, reply: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&NBD_OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)
}

/// Transmission flags we advertise. CAN_MULTI_CONN holds because all connections to an image
/// share one session: a FLUSH on any of them syncs the WAL every one of them appends to.
pub const TRANSMISSION_FLAGS: u16 = NBD_FLAG_HAS_FLAGS
    | NBD_FLAG_SEND_FLUSH
    | NBD_FLAG_SEND_FUA
    | NBD_FLAG_SEND_TRIM
    | NBD_FLAG_SEND_WRITE_ZEROES
    | NBD_FLAG_CAN_MULTI_CONN;

fn info_export(info: &ExportInfo) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&info.size.to_be_bytes());
    b.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
    b
}

fn info_block_size(info: &ExportInfo) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&1u32.to_be_bytes()); // any byte offset and length works
    b.extend_from_slice(&info.preferred_block_size.to_be_bytes());
    b.extend_from_slice(&REQUEST_PAYLOAD_BYTES_MAX.to_be_bytes());
    b
}

/// Runs the handshake. `Err` is an I/O failure (the connection is gone).
pub fn run(s: &Stream, exports: &dyn Exports, peer: &str, kill: Kill) -> io::Result<Outcome> {
    let mut greet = Vec::with_capacity(18);
    greet.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greet.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greet.extend_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    { s }.write_all(&greet)?;
    let client_flags = read_u32(s)?;
    if client_flags & NBD_FLAG_C_FIXED_NEWSTYLE == 0 {
        return Ok(Outcome::Closed(
            "client does not speak fixed newstyle".into(),
        ));
    }
    if client_flags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        return Ok(Outcome::Closed(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & NBD_FLAG_C_NO_ZEROES != 0;
    for _ in 0..OPTIONS_COUNT_MAX {
        let mut h = [0u8; 16];
        { s }.read_exact(&mut h)?;
        let magic = u64::from_be_bytes(h[0..8].try_into().unwrap());
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        if magic != IHAVEOPT {
            return Ok(Outcome::Closed("bad option magic".into()));
        }
        if len > OPTION_LENGTH_MAX {
            // Drain it anyway (bounded by u32) so the client reads a clean refusal.
            io::copy(&mut { s }.take(len as u64), &mut io::sink())?;
            send_reply(s, opt, NBD_REP_ERR_TOO_BIG, b"option payload too long")?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        { s }.read_exact(&mut data)?;
        log::debug!("{peer}: option {}", name_of_opt(opt));
        if let Some(out) = handle_option(s, exports, peer, &kill, opt, &data, no_zeroes)? {
            return Ok(out);
        }
    }
    Ok(Outcome::Closed(format!(
        "more than {OPTIONS_COUNT_MAX} options"
    )))
}

/// Handles one option. `Some` ends the handshake.
fn handle_option(
    s: &Stream,
    exports: &dyn Exports,
    peer: &str,
    kill: &Kill,
    opt: u32,
    data: &[u8],
    no_zeroes: bool,
) -> io::Result<Option<Outcome>> {
    match opt {
        NBD_OPT_EXPORT_NAME => {
            // No error reply exists for this option: a refusal closes the connection.
            match exports.open(data, peer, kill.clone()) {
                Ok(export) => {
                    let info = export.info();
                    let mut b = Vec::with_capacity(134);
                    b.extend_from_slice(&info.size.to_be_bytes());
                    b.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                    if !no_zeroes {
                        b.extend_from_slice(&[0u8; 124]);
                    }
                    { s }.write_all(&b)?;
                    Ok(Some(Outcome::Serve(export)))
                }
                Err(r) => Ok(Some(Outcome::Closed(format!(
                    "export refused: {}",
                    r.message
                )))),
            }
        }
        NBD_OPT_INFO | NBD_OPT_GO => handle_info_go(s, exports, peer, kill, opt, data),
        NBD_OPT_ABORT => {
            let _ = send_reply(s, opt, NBD_REP_ACK, &[]);
            Ok(Some(Outcome::Closed("client aborted".into())))
        }
        NBD_OPT_LIST => {
            // Export names are secrets (tokens): there is nothing to list.
            send_reply(
                s,
                opt,
                NBD_REP_ERR_POLICY,
                b"export names are tokens; listing is refused",
            )?;
            Ok(None)
        }
        _ => {
            send_reply(s, opt, NBD_REP_ERR_UNSUP, b"option not supported")?;
            Ok(None)
        }
    }
}

/// Parses `u32 name length, name, u16 count, count × u16 info request`.
pub fn parse_info_request(data: &[u8]) -> Result<(&[u8], Vec<u16>), &'static str> {
    if data.len() < 6 {
        return Err("payload shorter than its fixed part");
    }
    let name_len = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
    if name_len > data.len() - 6 {
        return Err("export name length exceeds the payload");
    }
    let name = &data[4..4 + name_len];
    let rest = &data[4 + name_len..];
    let n = u16::from_be_bytes(rest[0..2].try_into().unwrap()) as usize;
    if rest.len() != 2 + 2 * n {
        return Err("information request count does not match the payload");
    }
    let reqs = rest[2..]
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok((name, reqs))
}

fn handle_info_go(
    s: &Stream,
    exports: &dyn Exports,
    peer: &str,
    kill: &Kill,
    opt: u32,
    data: &[u8],
) -> io::Result<Option<Outcome>> {
    let (name, _reqs) = match parse_info_request(data) {
        Ok(x) => x,
        Err(why) => {
            send_reply(s, opt, NBD_REP_ERR_INVALID, why.as_bytes())?;
            return Ok(None);
        }
    };
    let (info, export) = if opt == NBD_OPT_GO {
        match exports.open(name, peer, kill.clone()) {
            Ok(e) => (e.info(), Some(e)),
            Err(r) => return refuse(s, opt, r),
        }
    } else {
        match exports.describe(name) {
            Ok(i) => (i, None),
            Err(r) => return refuse(s, opt, r),
        }
    };
    // Block sizes are always sent, requested or not: we accept any alignment, so a client
    // that ignores them loses nothing, and qemu uses them to pick its request sizes.
    send_reply(s, opt, NBD_REP_INFO, &info_export(&info))?;
    send_reply(s, opt, NBD_REP_INFO, &info_block_size(&info))?;
    send_reply(s, opt, NBD_REP_ACK, &[])?;
    Ok(export.map(Outcome::Serve))
}

fn refuse(s: &Stream, opt: u32, r: Refusal) -> io::Result<Option<Outcome>> {
    send_reply(s, opt, r.reply, r.message.as_bytes())?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut b = (name.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(name);
        b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            b.extend_from_slice(&i.to_be_bytes());
        }
        b
    }

    #[test]
    fn info_request_parsing() {
        let good = req(b"abc", &[3, 0]);
        let (n, r) = parse_info_request(&good).unwrap();
        assert_eq!(n, b"abc");
        assert_eq!(r, vec![3, 0]);
        assert!(parse_info_request(&[0, 0, 0]).is_err());
        let mut long_name = req(b"abc", &[]);
        long_name[3] = 200;
        assert!(parse_info_request(&long_name).is_err());
        let mut extra = req(b"abc", &[1]);
        extra.push(0);
        assert!(parse_info_request(&extra).is_err());
        let mut short_count = req(b"", &[1, 2]);
        short_count.pop();
        assert!(parse_info_request(&short_count).is_err());
    }
}
