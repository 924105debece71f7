//! CRC-32C (Castagnoli; the `crc` crate's CRC_32_ISCSI), the checksum of every persisted
//! record. It runs on every page read and written, so on x86-64 CPUs it takes the fastest
//! way the CPU has: carry-less multiplication over 512-bit or 256-bit registers (`clmul`,
//! VPCLMULQDQ + AVX-512 or AVX2) for inputs of 256 bytes and more, else the `crc32`
//! instruction (SSE4.2) in three interleaved lanes (about 10x the table-driven speed);
//! elsewhere the `crc` crate's slice-by-16 tables. All give identical values (tested below).

mod clmul;

use crc::{Crc, Table, CRC_32_ISCSI};

pub static CRC32C: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISCSI);

pub fn crc32c(data: &[u8]) -> u32 {
    let mut d = Digest::new();
    d.update(data);
    d.finalize()
}

/// An incremental CRC-32C.
pub enum Digest {
    /// The raw register (before the final inversion), advanced with the CPU instruction.
    Hw(u32),
    Sw(crc::Digest<'static, u32, Table<16>>),
}

impl Default for Digest {
    fn default() -> Self {
        Self::new()
    }
}

impl Digest {
    pub fn new() -> Digest {
        if hw_available() {
            Digest::Hw(!0)
        } else {
            Digest::Sw(CRC32C.digest())
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Digest::Hw(reg) => *reg = hw_update(*reg, data),
            Digest::Sw(d) => d.update(data),
        }
    }

    pub fn finalize(self) -> u32 {
        match self {
            Digest::Hw(reg) => !reg,
            Digest::Sw(d) => d.finalize(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn hw_available() -> bool {
    std::arch::is_x86_feature_detected!("sse4.2")
}

#[cfg(not(target_arch = "x86_64"))]
fn hw_available() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn hw_update(reg: u32, data: &[u8]) -> u32 {
    debug_assert!(hw_available());
    if data.len() >= clmul::MIN_BYTES {
        // SAFETY: `width` is what the CPU has (detected once, then cached); `None` runs the
        // `crc32` loop, whose SSE4.2 Digest::Hw implies.
        return unsafe { clmul::update(clmul::width(), reg, data) };
    }
    // SAFETY: only reached through Digest::Hw, which exists only when SSE4.2 was detected.
    unsafe { hw_update_sse42(reg, data) }
}

#[cfg(not(target_arch = "x86_64"))]
fn hw_update(_reg: u32, _data: &[u8]) -> u32 {
    unreachable!("Digest::Hw is never built without the instruction")
}

/// Bytes per lane of the three-lane loop. The `crc32` instruction takes 3 cycles but can
/// start one per cycle, so three independent lanes run about 3x as fast as one; the lanes'
/// registers are then joined by "shifting" a register past `LANE_BYTES` bytes (a linear map,
/// done with the tables of [`lane_shift`]). 680 = 85 words: a 4 KiB page is two rounds.
const LANE_BYTES: usize = 680;

/// `shift(reg)` = the register after feeding `LANE_BYTES` zero bytes to `reg`.
fn lane_shift() -> &'static ZeroShift {
    static TABLES: std::sync::OnceLock<ZeroShift> = std::sync::OnceLock::new();
    TABLES.get_or_init(|| ZeroShift::new(LANE_BYTES))
}

/// The map "feed `len` zero bytes to the register". CRC is linear over GF(2), so the map is
/// fixed by the images of the 32 single-bit registers; the tables hold it byte by byte:
/// `shift(r) = t[0][r & 0xff] ^ t[1][r >> 8 & 0xff] ^ ...`.
pub struct ZeroShift(Box<[[u32; 256]; 4]>);

impl ZeroShift {
    fn new(len: usize) -> ZeroShift {
        let zeros = vec![0u8; len];
        let bit_image: Vec<u32> = (0..32).map(|b| sw_update(1u32 << b, &zeros)).collect();
        let mut t = Box::new([[0u32; 256]; 4]);
        for (k, table) in t.iter_mut().enumerate() {
            for (v, slot) in table.iter_mut().enumerate() {
                *slot = (0..8)
                    .filter(|bit| v >> bit & 1 == 1)
                    .fold(0, |acc, bit| acc ^ bit_image[8 * k + bit]);
            }
        }
        ZeroShift(t)
    }

    fn apply(&self, r: u32) -> u32 {
        let t = &self.0;
        t[0][(r & 0xff) as usize]
            ^ t[1][(r >> 8 & 0xff) as usize]
            ^ t[2][(r >> 16 & 0xff) as usize]
            ^ t[3][(r >> 24) as usize]
    }

    /// The shift past one page of `1 << bits` bytes (9 ..= 16; built once per size).
    pub fn page(bits: u32) -> &'static ZeroShift {
        const SIZES: usize = 8;
        static PAGES: [std::sync::OnceLock<ZeroShift>; SIZES] =
            [const { std::sync::OnceLock::new() }; SIZES];
        assert!(
            (9..9 + SIZES as u32).contains(&bits),
            "page size bits {bits}"
        );
        PAGES[(bits - 9) as usize].get_or_init(|| ZeroShift::new(1 << bits))
    }

    /// `crc32c(a ++ b)` from `crc32c(a)` and `crc32c(b)`, where `b` is the length this shift
    /// was built for: the checksum of a record from the checksums of its pages.
    pub fn combine(&self, crc_a: u32, crc_b: u32) -> u32 {
        self.apply(crc_a) ^ crc_b
    }
}

/// The raw-register update, one byte at a time (for building the shift tables only).
fn sw_update(mut reg: u32, data: &[u8]) -> u32 {
    const POLY_REFLECTED: u32 = 0x82F6_3B78;
    for &b in data {
        reg ^= b as u32;
        for _ in 0..8 {
            reg = if reg & 1 == 1 {
                (reg >> 1) ^ POLY_REFLECTED
            } else {
                reg >> 1
            };
        }
    }
    reg
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn hw_update_sse42(reg: u32, data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let word = |c: &[u8]| u64::from_le_bytes(c.try_into().unwrap());
    let mut crc = reg;
    let mut rounds = data.chunks_exact(3 * LANE_BYTES);
    if data.len() >= 3 * LANE_BYTES {
        let t = lane_shift();
        for round in &mut rounds {
            let (a, rest) = round.split_at(LANE_BYTES);
            let (b, c) = rest.split_at(LANE_BYTES);
            let (mut ra, mut rb, mut rc) = (crc as u64, 0u64, 0u64);
            for ((x, y), z) in a
                .chunks_exact(8)
                .zip(b.chunks_exact(8))
                .zip(c.chunks_exact(8))
            {
                ra = _mm_crc32_u64(ra, word(x));
                rb = _mm_crc32_u64(rb, word(y));
                rc = _mm_crc32_u64(rc, word(z));
            }
            // Lane b continued from lane a's register = shift(a) ^ b, by linearity.
            crc = t.apply(t.apply(ra as u32) ^ rb as u32) ^ rc as u32;
        }
    }
    let rest = rounds.remainder();
    let mut reg64 = crc as u64;
    let mut words = rest.chunks_exact(8);
    for c in &mut words {
        reg64 = _mm_crc32_u64(reg64, word(c));
    }
    let mut crc = reg64 as u32;
    for &b in words.remainder() {
        crc = _mm_crc32_u8(crc, b);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytewise_update_matches_the_crate() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        assert_eq!(!sw_update(!0, &data), CRC32C.checksum(&data));
    }

    /// A record's checksum from its pages' checksums equals the checksum of the whole.
    #[test]
    fn combining_page_checksums_gives_the_whole() {
        let data: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
            .collect();
        for bits in [9u32, 12, 16] {
            let page = 1usize << bits;
            let shift = ZeroShift::page(bits);
            for (head, pages) in [(0usize, 1usize), (52, 1), (52, 3), (13, 4)] {
                let whole = &data[..head + pages * page];
                let mut crc = crc32c(&whole[..head]);
                for p in whole[head..].chunks(page) {
                    crc = shift.combine(crc, crc32c(p));
                }
                assert_eq!(crc, crc32c(whole), "bits {bits} head {head} pages {pages}");
            }
        }
    }

    #[test]
    fn known_vector() {
        // The standard check value of CRC-32C over "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn hardware_and_tables_agree() {
        let data: Vec<u8> = (0..10_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let lanes = 3 * LANE_BYTES;
        for len in [
            0,
            1,
            7,
            8,
            9,
            63,
            lanes - 1,
            lanes,
            lanes + 1,
            4096,
            8191,
            10_000,
        ] {
            let want = CRC32C.checksum(&data[..len]);
            assert_eq!(crc32c(&data[..len]), want, "len {len}");
            // Split updates give the same value as one.
            let mut d = Digest::new();
            d.update(&data[..len / 3]);
            d.update(&data[len / 3..len]);
            assert_eq!(d.finalize(), want);
            let mut sw = Digest::Sw(CRC32C.digest());
            sw.update(&data[..len]);
            assert_eq!(sw.finalize(), want);
        }
    }

    /// Each folding loop the CPU has against the tables, at every length around its block
    /// boundaries, from unaligned starts and with a non-initial register. A CPU without
    /// VPCLMULQDQ runs neither (it says so); `clmul`'s own test checks the constants on any
    /// CPU.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn carry_less_folding_matches_the_tables() {
        use clmul::Width;
        let widths: &[Width] = match clmul::width() {
            Width::Bits512 => &[Width::Bits512, Width::Bits256],
            Width::Bits256 => &[Width::Bits256],
            Width::None => {
                eprintln!("no VPCLMULQDQ on this CPU: the folding loops were not run");
                return;
            }
        };
        let data: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        let mut lens: Vec<usize> = (256..1100).collect();
        lens.extend([4095, 4096, 4097, 8192, 65_536, 65_536 + 255]);
        for &w in widths {
            for &len in &lens {
                for start in [0, 1, 5, 64] {
                    let d = &data[start..start + len];
                    // SAFETY: `w` is at most `width()`, checked above.
                    let got = !unsafe { clmul::update(w, !0, d) };
                    assert_eq!(got, CRC32C.checksum(d), "{w:?} len {len} start {start}");
                    if len - 13 < clmul::MIN_BYTES {
                        continue;
                    }
                    // Continuing from a register: the rest after a 13-byte head.
                    let head = sw_update(!0, &d[..13]);
                    // SAFETY: as above.
                    let got = !unsafe { clmul::update(w, head, &d[13..]) };
                    assert_eq!(
                        got,
                        CRC32C.checksum(d),
                        "{w:?} len {len} start {start}, continued"
                    );
                }
            }
        }
    }
}
