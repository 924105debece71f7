//! SHA-256 for `mvpsctl txn --expect`, which compares image ranges against digests that
//! users compute with `sha256sum`: the hashing is the `sha2` crate's (rusty-s3 already
//! builds on it); this module adds the hex form `sha256sum` prints and reads.

pub use sha2::{Digest, Sha256};

/// Digest length in bytes.
pub const DIGEST_BYTES: usize = 32;

/// SHA-256 of `data`.
pub fn digest(data: &[u8]) -> [u8; DIGEST_BYTES] {
    Sha256::digest(data).into()
}

/// The digest of an incremental computation, as an array.
pub fn finish(h: Sha256) -> [u8; DIGEST_BYTES] {
    h.finalize().into()
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parses a 64-digit hex SHA-256 digest (either case).
pub fn parse_hex(s: &str) -> Result<[u8; DIGEST_BYTES], String> {
    let s = s.trim();
    if s.len() != DIGEST_BYTES * 2 || !s.is_ascii() {
        return Err(format!("{s:?} is not a SHA-256 digest: want 64 hex digits"));
    }
    let mut out = [0u8; DIGEST_BYTES];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("{s:?} is not a SHA-256 digest: not hex"))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex_digest(data: &[u8]) -> String {
        to_hex(&digest(data))
    }

    /// FIPS 180-4 vectors, whole and incremental: proves the wiring (digest length, byte
    /// order of the hex form), not the crate.
    #[test]
    fn fips_180_vectors() {
        assert_eq!(
            hex_digest(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex_digest(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut h = Sha256::new();
        let chunk = [b'a'; 1000];
        for _ in 0..1000 {
            h.update(chunk);
        }
        assert_eq!(
            to_hex(&finish(h)),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
    }

    #[test]
    fn hex_round_trip_and_errors() {
        let d = digest(b"abc");
        assert_eq!(parse_hex(&to_hex(&d)), Ok(d));
        assert_eq!(parse_hex(&to_hex(&d).to_uppercase()), Ok(d));
        assert!(parse_hex("abc").is_err());
        assert!(parse_hex(&"g".repeat(64)).is_err());
        assert!(parse_hex(&"é".repeat(32)).is_err());
    }
}
