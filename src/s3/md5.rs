//! MD5 (RFC 1321), small and dependency-free, for the `Content-MD5` header of request bodies.
//!
//! S3 (and SeaweedFS, MinIO, R2, Ceph) check a request body against `Content-MD5` before
//! storing anything and answer `400 BadDigest` on a mismatch. That is what keeps a PUT whose
//! connection was cut short from being stored as a shorter object (docs/S3.md, *Request
//! integrity*). MD5 is used here as a checksum against truncation and transmission errors,
//! not for security; the request signature covers the header.
//!
//! Not constant-time. Throughput is measured by `md5::tests::throughput` (ignored; run it
//! with `--release -- --ignored --nocapture`).

/// Digest length in bytes.
pub const DIGEST_BYTES: usize = 16;
use crate::hash_block::{BlockBuffer, BLOCK_BYTES};

/// Per-step additive constants: `floor(abs(sin(i + 1)) · 2^32)` (RFC 1321 §3.4).
const K: [u32; 64] = [
    0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613, 0xfd469501,
    0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193, 0xa679438e, 0x49b40821,
    0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d, 0x02441453, 0xd8a1e681, 0xe7d3fbc8,
    0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed, 0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a,
    0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70,
    0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665,
    0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
    0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb, 0xeb86d391,
];

/// Initial state A, B, C, D (RFC 1321 §3.3).
const H0: [u32; 4] = [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476];

/// An incremental MD5 computation.
#[derive(Clone)]
pub struct Md5 {
    state: [u32; 4],
    input: BlockBuffer,
}

impl Default for Md5 {
    fn default() -> Self {
        Md5::new()
    }
}

impl Md5 {
    pub fn new() -> Md5 {
        Md5 {
            state: H0,
            input: BlockBuffer::new(),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        let state = &mut self.state;
        self.input.update(data, |block| compress(state, block));
    }

    pub fn finish(mut self) -> [u8; DIGEST_BYTES] {
        let bit_len = self.input.total_bytes().wrapping_mul(8);
        // Padding: a 1 bit, zeros up to 56 bytes mod 64, then the bit length (little-endian).
        let zeros = (BLOCK_BYTES + 55 - self.input.pending_len()) % BLOCK_BYTES;
        let mut tail = [0u8; 1 + BLOCK_BYTES + 8];
        tail[0] = 0x80;
        tail[1 + zeros..1 + zeros + 8].copy_from_slice(&bit_len.to_le_bytes());
        self.update(&tail[..1 + zeros + 8]);
        debug_assert_eq!(self.input.pending_len(), 0);
        let mut out = [0u8; DIGEST_BYTES];
        for (o, s) in out.chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&s.to_le_bytes());
        }
        out
    }
}

/// The MD5 digest of `data`.
pub fn digest(data: &[u8]) -> [u8; DIGEST_BYTES] {
    let mut h = Md5::new();
    h.update(data);
    h.finish()
}

/// The value of a `Content-MD5` header for `body`: its MD5 digest in base64 (RFC 1864).
pub fn content_md5(body: &[u8]) -> String {
    crate::base64::standard(&digest(body))
}

#[inline(always)]
fn step(f: u32, a: u32, b: u32, m: u32, k: u32, s: u32) -> u32 {
    // a + k + m does not depend on the previous step: only one addition waits for f.
    b.wrapping_add(
        a.wrapping_add(k)
            .wrapping_add(m)
            .wrapping_add(f)
            .rotate_left(s),
    )
}

/// One 64-byte block: four rounds of 16 steps (RFC 1321 §3.4), written out in full. The
/// round functions are in equivalent forms that keep the newest value (`b`) late.
fn compress(state: &mut [u32; 4], block: &[u8; BLOCK_BYTES]) {
    let mut m = [0u32; 16];
    for (w, b) in m.iter_mut().zip(block.chunks_exact(4)) {
        *w = u32::from_le_bytes(b.try_into().expect("4-byte chunk"));
    }
    let [mut a, mut b, mut c, mut d] = *state;
    macro_rules! steps {
        ($f:expr, $x:expr, $i:expr, $s0:expr, $s1:expr, $s2:expr, $s3:expr) => {
            a = step($f(b, c, d), a, b, m[$x($i)], K[$i], $s0);
            d = step($f(a, b, c), d, a, m[$x($i + 1)], K[$i + 1], $s1);
            c = step($f(d, a, b), c, d, m[$x($i + 2)], K[$i + 2], $s2);
            b = step($f(c, d, a), b, c, m[$x($i + 3)], K[$i + 3], $s3);
        };
    }
    let f = |b: u32, c: u32, d: u32| d ^ (b & (c ^ d));
    // (b & d) and (c & !d) have no bit in common, so | is +: the half without b (the value
    // the previous step just made) is added first, off the critical path.
    let g = |b: u32, c: u32, d: u32| (c & !d).wrapping_add(b & d);
    let h = |b: u32, c: u32, d: u32| b ^ (c ^ d);
    let i = |b: u32, c: u32, d: u32| c ^ (b | !d);
    let x1 = |j: usize| j;
    let x2 = |j: usize| (5 * j + 1) % 16;
    let x3 = |j: usize| (3 * j + 5) % 16;
    let x4 = |j: usize| (7 * j) % 16;
    steps!(f, x1, 0, 7, 12, 17, 22);
    steps!(f, x1, 4, 7, 12, 17, 22);
    steps!(f, x1, 8, 7, 12, 17, 22);
    steps!(f, x1, 12, 7, 12, 17, 22);
    steps!(g, x2, 16, 5, 9, 14, 20);
    steps!(g, x2, 20, 5, 9, 14, 20);
    steps!(g, x2, 24, 5, 9, 14, 20);
    steps!(g, x2, 28, 5, 9, 14, 20);
    steps!(h, x3, 32, 4, 11, 16, 23);
    steps!(h, x3, 36, 4, 11, 16, 23);
    steps!(h, x3, 40, 4, 11, 16, 23);
    steps!(h, x3, 44, 4, 11, 16, 23);
    steps!(i, x4, 48, 6, 10, 15, 21);
    steps!(i, x4, 52, 6, 10, 15, 21);
    steps!(i, x4, 56, 6, 10, 15, 21);
    steps!(i, x4, 60, 6, 10, 15, 21);
    state[0] = state[0].wrapping_add(a);
    state[1] = state[1].wrapping_add(b);
    state[2] = state[2].wrapping_add(c);
    state[3] = state[3].wrapping_add(d);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: &[u8]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The test suite of RFC 1321 §A.5.
    #[test]
    fn rfc1321_vectors() {
        let cases = [
            ("", "d41d8cd98f00b204e9800998ecf8427e"),
            ("a", "0cc175b9c0f1b6a831c399e269772661"),
            ("abc", "900150983cd24fb0d6963f7d28e17f72"),
            ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
            (
                "abcdefghijklmnopqrstuvwxyz",
                "c3fcd3d76192e4007dfb496cca67e13b",
            ),
            (
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
                "d174ab98d277d9f5a5611c2c9f419d9f",
            ),
            (
                "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "57edf4a22be3c955ac49da2e2107b67a",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(hex(&digest(input.as_bytes())), want, "{input:?}");
        }
        assert_eq!(
            hex(&digest(&vec![b'a'; 1_000_000])),
            "7707d6ae4e027c70eea2a935c2296f21"
        );
    }

    /// Lengths around the padding boundaries (55/56 bytes, one and two blocks), against
    /// digests computed with Python's hashlib; fed whole and in uneven pieces.
    #[test]
    fn block_boundaries_and_incremental_updates() {
        let cases = [
            (0, "d41d8cd98f00b204e9800998ecf8427e"),
            (1, "89e74e640b8c46257a29de0616794d5d"),
            (3, "3b704fb2660febf62921a0caaa8de56b"),
            (55, "d39f7454bbe034082797e66c125a31ad"),
            (56, "8e9dbcce67719f0304ad52c59ff3d743"),
            (57, "a299b8643026995363f4eb94158bce68"),
            (63, "19a31d9b1afbd6867266fd6cf4c8821f"),
            (64, "8d9cfa334d4e690843fa68e59c798b84"),
            (65, "72d8b171f7f46898ee558ad1a86fb907"),
            (119, "ae6c390e7155118a1660c98861bc0d69"),
            (120, "b4a4ce125f8932c19665e554892473c4"),
            (127, "57aaebf11a34753459f9b60e725d4f4a"),
            (128, "8ce39ed43121181a0846c282c5ce287a"),
            (129, "5a9404193c887c3ea510ca8550471c2c"),
            (1000, "e722bbb0c3185d08f1a31567e66a825b"),
        ];
        for (n, want) in cases {
            let data: Vec<u8> = (0..n).map(|i| ((i * 31 + 7) % 251) as u8).collect();
            assert_eq!(hex(&digest(&data)), want, "length {n}");
            for piece in [1, 7, 63, 64, 65] {
                let mut h = Md5::new();
                for c in data.chunks(piece) {
                    h.update(c);
                }
                assert_eq!(hex(&h.finish()), want, "length {n} in {piece}-byte pieces");
            }
        }
    }

    #[test]
    fn content_md5_is_base64() {
        // RFC 1864's example body is not given with a digest; these are S3's documented
        // value for an empty body and rusty-s3's DeleteObjects test body.
        assert_eq!(content_md5(b""), "1B2M2Y8AsgTpgAmY7PhCfg==");
    }

    /// Cross-check with the `Content-MD5` rusty-s3 computes (with the `md-5` crate) for a
    /// DeleteObjects body.
    #[test]
    fn matches_rusty_s3() {
        let (b, _) = super::super::request::bucket(Some("http://h:1"), "us-east-1", "bkt").unwrap();
        let c = rusty_s3::Credentials::new("AKIAIOSFODNN7EXAMPLE", "secret");
        for n in [1, 7, 100, 1000] {
            let keys: Vec<String> = (0..n).map(|i| format!("t/key-{i}")).collect();
            let (r, body) = super::super::request::delete_objects(&b, &c, &keys);
            let theirs = &r
                .headers
                .iter()
                .find(|(h, _)| *h == "Content-MD5")
                .unwrap()
                .1;
            assert_eq!(&content_md5(&body), theirs, "{n} keys");
        }
    }

    /// `cargo test --release --lib s3::md5::tests::throughput -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn throughput() {
        let data: Vec<u8> = (0..64u32 << 20)
            .map(|i| (i * 2_654_435_761) as u8)
            .collect();
        let _ = digest(&data[..1 << 20]);
        let t = std::time::Instant::now();
        let rounds = 4;
        for _ in 0..rounds {
            std::hint::black_box(digest(std::hint::black_box(&data)));
        }
        let secs = t.elapsed().as_secs_f64();
        let mib = (rounds * data.len()) as f64 / f64::from(1 << 20);
        eprintln!("md5: {:.0} MiB/s", mib / secs);
    }
}
