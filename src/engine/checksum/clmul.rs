//! CRC-32C by carry-less multiplication: 256 bytes per step in four 512-bit accumulators
//! (VPCLMULQDQ + AVX-512), about twice the three-lane `crc32` loop's speed on a 4 KiB page
//! (docs/PERFORMANCE.md); on CPUs with VPCLMULQDQ but no AVX-512 (AMD Zen 3, Intel Alder
//! Lake and later client cores) the same folding over four 256-bit accumulators, 128 bytes
//! per step. Used for inputs of at least `MIN_BYTES` when the CPU has the instructions
//! ([`width`]); everything here advances the raw register, like `hw_update_sse42`.
//!
//! The math (reflected bit order, as CRC-32C and the `crc32` instruction use): a 128-bit
//! block loaded little-endian holds the message polynomial with bit `i` as the coefficient
//! of x^(127-i). Splitting it into halves H (bytes 0-7) and L (bytes 8-15), the block moved
//! `D` bits further along the message is `H·x^(64+D) + L·x^D`, and modulo the CRC polynomial
//! P that is `H·(x^(64+D) mod P) + L·(x^D mod P)`: two 64×32-bit carry-less products whose
//! sum (< 96 bits) lands inside the block `D` bits on, where it is XORed in. The reflected
//! product comes out one bit "low" (bit `i+j` holds x^(126-i-j)), so the constants are taken
//! one power lower: `x^(D+63) mod P` and `x^(D-1) mod P`, bit-reversed into 64-bit lanes.
//! Folding keeps the remainder of (what is left of the message) unchanged, so the last
//! 16-byte block and the tail are finished with the `crc32` instruction. The register is
//! XORed into the first four bytes first: CRC is linear, and that is what the register means.

// The constants are used by the x86-64 loop only (and by the portable test everywhere).
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Shortest input the folding loop takes; shorter ones go to the `crc32` loop.
pub const MIN_BYTES: usize = 256;

/// CRC-32C's polynomial without its x^32 term, normal (not reflected) bit order.
const POLY_NORMAL: u32 = 0x1EDC_6F41;

/// x^n mod P, normal bit order (bit d is the coefficient of x^d).
const fn x_pow_mod(n: u32) -> u32 {
    let mut r: u32 = 1;
    let mut i = 0;
    while i < n {
        let carry = r & 0x8000_0000 != 0;
        r <<= 1;
        if carry {
            r ^= POLY_NORMAL;
        }
        i += 1;
    }
    r
}

/// The constants that move a 128-bit block `d` bits along: (for the low 64 bits, for the
/// high 64 bits), each `x^e mod P` bit-reversed into 64 bits.
const fn fold_by(d: u32) -> (u64, u64) {
    (
        (x_pow_mod(d + 63) as u64).reverse_bits(),
        (x_pow_mod(d - 1) as u64).reverse_bits(),
    )
}

/// The 512-bit loop moves each accumulator past the other three (and itself): 256 bytes.
const FOLD_2048: (u64, u64) = fold_by(2048);
/// Joining the four accumulators (the first is 192 bytes before the last, ...).
const FOLD_1536: (u64, u64) = fold_by(1536);
/// The 256-bit loop's step (128 bytes), and the 512-bit join.
const FOLD_1024: (u64, u64) = fold_by(1024);
/// Joining the 256-bit loop's accumulators (the first is 96 bytes before the last, ...).
const FOLD_768: (u64, u64) = fold_by(768);
const FOLD_512: (u64, u64) = fold_by(512);
/// Joining the 128-bit lanes of the last accumulator.
const FOLD_384: (u64, u64) = fold_by(384);
const FOLD_256: (u64, u64) = fold_by(256);
const FOLD_128: (u64, u64) = fold_by(128);

/// Which folding loop this CPU can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// Neither: the `crc32` loop does everything.
    None,
    /// VPCLMULQDQ on 256-bit registers (AVX2).
    Bits256,
    /// VPCLMULQDQ on 512-bit registers (AVX-512).
    Bits512,
}

/// The widest folding loop the CPU has (detected once).
#[cfg(target_arch = "x86_64")]
pub fn width() -> Width {
    use std::sync::atomic::{AtomicU8, Ordering};
    static DETECTED: AtomicU8 = AtomicU8::new(u8::MAX);
    match DETECTED.load(Ordering::Relaxed) {
        0 => Width::None,
        1 => Width::Bits256,
        2 => Width::Bits512,
        _ => {
            // AVX2 in the base too, so that a `Bits512` CPU can also run the 256-bit loop
            // (the safety contract of `update` is "at most `width()`").
            let base = std::arch::is_x86_feature_detected!("vpclmulqdq")
                && std::arch::is_x86_feature_detected!("pclmulqdq")
                && std::arch::is_x86_feature_detected!("sse4.2")
                && std::arch::is_x86_feature_detected!("avx2");
            let w = if base && std::arch::is_x86_feature_detected!("avx512f") {
                Width::Bits512
            } else if base {
                Width::Bits256
            } else {
                Width::None
            };
            DETECTED.store(w as u8, Ordering::Relaxed);
            w
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub fn width() -> Width {
    Width::None
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn lanes_512((lo, hi): (u64, u64)) -> __m512i {
    let (lo, hi) = (lo as i64, hi as i64);
    _mm512_set_epi64(hi, lo, hi, lo, hi, lo, hi, lo)
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn lanes_256((lo, hi): (u64, u64)) -> __m256i {
    let (lo, hi) = (lo as i64, hi as i64);
    _mm256_set_epi64x(hi, lo, hi, lo)
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn lanes_128((lo, hi): (u64, u64)) -> __m128i {
    _mm_set_epi64x(hi as i64, lo as i64)
}

/// Each 128-bit lane of `x` moved along by the distance `k` is for, XORed with `next`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn fold_512(x: __m512i, k: __m512i, next: __m512i) -> __m512i {
    let lo = _mm512_clmulepi64_epi128(x, k, 0x00);
    let hi = _mm512_clmulepi64_epi128(x, k, 0x11);
    _mm512_ternarylogic_epi64(lo, hi, next, 0x96) // lo ^ hi ^ next
}

/// As `fold_512`, on 256-bit registers.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn fold_256(x: __m256i, k: __m256i, next: __m256i) -> __m256i {
    let lo = _mm256_clmulepi64_epi128(x, k, 0x00);
    let hi = _mm256_clmulepi64_epi128(x, k, 0x11);
    _mm256_xor_si256(_mm256_xor_si256(lo, hi), next)
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn fold_128(x: __m128i, k: __m128i) -> __m128i {
    _mm_xor_si128(
        _mm_clmulepi64_si128(x, k, 0x00),
        _mm_clmulepi64_si128(x, k, 0x11),
    )
}

/// Advances raw register `reg` over `data` (at least `MIN_BYTES`) with the loop `w`.
///
/// # Safety
/// `w` must be at most what [`width`] returns on this CPU.
#[cfg(target_arch = "x86_64")]
pub unsafe fn update(w: Width, reg: u32, data: &[u8]) -> u32 {
    match w {
        Width::Bits512 => update_512(reg, data),
        Width::Bits256 => update_256(reg, data),
        Width::None => super::hw_update_sse42(reg, data),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,vpclmulqdq,pclmulqdq,sse4.2")]
unsafe fn update_256(reg: u32, data: &[u8]) -> u32 {
    const STEP: usize = 128;
    assert!(data.len() >= MIN_BYTES);
    let p = data.as_ptr();
    // SAFETY (all loads): `o + 32 <= data.len()` at every call below.
    let load = |o: usize| _mm256_loadu_si256(p.add(o).cast());
    let first = _mm256_zextsi128_si256(_mm_cvtsi32_si128(reg as i32));
    let mut x0 = _mm256_xor_si256(load(0), first);
    let mut x1 = load(32);
    let mut x2 = load(64);
    let mut x3 = load(96);
    let k = lanes_256(FOLD_1024);
    let mut off = STEP;
    while data.len() - off >= STEP {
        x0 = fold_256(x0, k, load(off));
        x1 = fold_256(x1, k, load(off + 32));
        x2 = fold_256(x2, k, load(off + 64));
        x3 = fold_256(x3, k, load(off + 96));
        off += STEP;
    }
    let x = fold_256(x0, lanes_256(FOLD_768), x3);
    let x = fold_256(x1, lanes_256(FOLD_512), x);
    let x = fold_256(x2, lanes_256(FOLD_256), x);
    let l0 = fold_128(_mm256_extracti128_si256(x, 0), lanes_128(FOLD_128));
    let last = _mm_xor_si128(l0, _mm256_extracti128_si256(x, 1));
    let mut block = [0u8; 16];
    _mm_storeu_si128(block.as_mut_ptr().cast(), last);
    let reg = super::hw_update_sse42(0, &block);
    super::hw_update_sse42(reg, &data[off..])
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,vpclmulqdq,pclmulqdq,sse4.2")]
unsafe fn update_512(reg: u32, data: &[u8]) -> u32 {
    assert!(data.len() >= MIN_BYTES);
    let p = data.as_ptr();
    // SAFETY (all loads): `o + 64 <= data.len()` at every call below.
    let load = |o: usize| _mm512_loadu_si512(p.add(o).cast());
    let first = _mm512_zextsi128_si512(_mm_cvtsi32_si128(reg as i32));
    let mut x0 = _mm512_xor_si512(load(0), first);
    let mut x1 = load(64);
    let mut x2 = load(128);
    let mut x3 = load(192);
    let k = lanes_512(FOLD_2048);
    let mut off = MIN_BYTES;
    while data.len() - off >= MIN_BYTES {
        x0 = fold_512(x0, k, load(off));
        x1 = fold_512(x1, k, load(off + 64));
        x2 = fold_512(x2, k, load(off + 128));
        x3 = fold_512(x3, k, load(off + 192));
        off += MIN_BYTES;
    }
    let x = fold_512(x0, lanes_512(FOLD_1536), x3);
    let x = fold_512(x1, lanes_512(FOLD_1024), x);
    let x = fold_512(x2, lanes_512(FOLD_512), x);
    let l0 = fold_128(_mm512_extracti32x4_epi32(x, 0), lanes_128(FOLD_384));
    let l1 = fold_128(_mm512_extracti32x4_epi32(x, 1), lanes_128(FOLD_256));
    let l2 = fold_128(_mm512_extracti32x4_epi32(x, 2), lanes_128(FOLD_128));
    let last = _mm_xor_si128(
        _mm_xor_si128(l0, l1),
        _mm_xor_si128(l2, _mm512_extracti32x4_epi32(x, 3)),
    );
    let mut block = [0u8; 16];
    _mm_storeu_si128(block.as_mut_ptr().cast(), last);
    let reg = super::hw_update_sse42(0, &block);
    super::hw_update_sse42(reg, &data[off..])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 64×64 → 128-bit carry-less product, in software.
    fn clmul(a: u64, b: u64) -> u128 {
        (0..64)
            .filter(|i| b >> i & 1 == 1)
            .fold(0u128, |acc, i| acc ^ ((a as u128) << i))
    }

    /// The fold constants, checked without the instructions: moving a 16-byte block `d`
    /// bits along (two software carry-less products) leaves the CRC of block + `d/8` zero
    /// bytes unchanged — the identity the hardware loop relies on, on any machine.
    #[test]
    fn fold_constants_preserve_the_remainder() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for d in [128u32, 256, 384, 512, 768, 1024, 1536, 2048] {
            let (k_lo, k_hi) = fold_by(d);
            for _ in 0..20 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let block = (seed as u128) << 64 | seed.rotate_left(17) as u128;
                let moved = clmul(block as u64, k_lo) ^ clmul((block >> 64) as u64, k_hi);
                let mut original = block.to_le_bytes().to_vec();
                original.extend(std::iter::repeat_n(0u8, d as usize / 8));
                let mut folded = vec![0u8; d as usize / 8];
                folded.extend_from_slice(&moved.to_le_bytes());
                assert_eq!(
                    super::super::sw_update(0, &folded),
                    super::super::sw_update(0, &original),
                    "d {d}"
                );
            }
        }
    }
}
