//! CRC-32C (Castagnoli; the `crc` crate's CRC_32_ISCSI), the checksum of every persisted
//! record. It runs on every page read and written, so on x86-64 CPUs with SSE4.2 it uses the
//! `crc32` instruction (about 4x the table-driven speed); elsewhere the `crc` crate's
//! slice-by-16 tables. Both give identical values (tested below).

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
    // SAFETY: only reached through Digest::Hw, which exists only when SSE4.2 was detected.
    unsafe { hw_update_sse42(reg, data) }
}

#[cfg(not(target_arch = "x86_64"))]
fn hw_update(_reg: u32, _data: &[u8]) -> u32 {
    unreachable!("Digest::Hw is never built without the instruction")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn hw_update_sse42(reg: u32, data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut crc = reg as u64;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        crc = _mm_crc32_u64(crc, u64::from_le_bytes(c.try_into().unwrap()));
    }
    let mut crc = crc as u32;
    for &b in chunks.remainder() {
        crc = _mm_crc32_u8(crc, b);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

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
        for len in [0, 1, 7, 8, 9, 63, 4096, 10_000] {
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
}
