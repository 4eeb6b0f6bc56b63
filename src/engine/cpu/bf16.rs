//! f32 → bf16 rounding (to nearest even, as PyTorch's autocast rounds), one value at a time and in the pairs the
//! bf16 kernels read (`packed`: rows k and k+1 of an operand in one 32-bit word, k in the low half).
//!
//! The pairs are made on every call for operands that change every call (training's activations, gradients
//! and weights); rounded one value at a time, that conversion took a quarter of a bf16 training step (CIFAR
//! ResNet-34, batch 64, AMD EPYC with AVX512-BF16: `pack` 9.4 %, the right operand's pairs 6.5 %, against 21 %
//! in the products themselves), so with AVX512-BF16 it runs 16 values per instruction (`vcvtneps2bf16`,
//! the same rounding; like `vdpbf16ps` itself it treats f32 subnormals, below 1.2e-38, as zero).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::isa;

/// f32 → bf16 bits, rounded to nearest even (NaN stays NaN).
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// bf16 bits → f32 (exact).
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `lo` and `hi` rounded into one word, `lo` in the low half.
pub fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

/// out[i] = pair(lo[i], hi[i]), hi 0 when absent: two rows of a row-major operand into one row of pairs.
pub fn pairs_of_rows(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
    let n = out.len();
    assert!(lo.len() >= n && hi.is_none_or(|h| h.len() >= n), "rows shorter than the pairs");
    #[cfg(target_arch = "x86_64")]
    if isa::avx512_bf16() {
        // SAFETY: the CPU has AVX-512F and AVX512-BF16 (checked just above); the lengths are checked above.
        return unsafe { pairs_of_rows_avx512(lo, hi, out) };
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = pair(lo[i], hi.map_or(0.0, |h| h[i]));
    }
}

/// out[i] = pair(src[2i], src[2i + 1]) (an odd last value pairs with 0): one row of an operand whose pairs are
/// adjacent in memory (a transposed view's columns, a row-major left operand's rows).
pub fn adjacent_pairs(src: &[f32], out: &mut [u32]) {
    assert!(out.len() >= src.len().div_ceil(2), "too few words for the pairs");
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa::avx512_bf16() {
        // SAFETY: as in `pairs_of_rows`; the vector loop reads whole runs of 32 values inside `src`.
        done = unsafe { adjacent_pairs_avx512(src, out) };
    }
    for (i, o) in out.iter_mut().enumerate().take(src.len().div_ceil(2)).skip(done) {
        *o = pair(src[2 * i], src.get(2 * i + 1).copied().unwrap_or(0.0));
    }
}

/// # Safety
/// The CPU must have AVX-512F and AVX512-BF16; `lo` (and `hi`) at least `out.len()` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pairs_of_rows_avx512(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
    let n = out.len();
    for i in (0..n).step_by(16) {
        let m = if n - i >= 16 { 0xffff } else { ((1u32 << (n - i)) - 1) as __mmask16 };
        // SAFETY: lanes i..i+16 under mask m lie inside lo, hi and out (each at least n long).
        unsafe {
            let round =
                |v: __m512| _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v)));
            let l = round(_mm512_maskz_loadu_ps(m, lo.as_ptr().add(i)));
            let h = match hi {
                Some(h) => _mm512_slli_epi32::<16>(round(_mm512_maskz_loadu_ps(m, h.as_ptr().add(i)))),
                None => _mm512_setzero_si512(),
            };
            _mm512_mask_storeu_epi32(out.as_mut_ptr().add(i).cast(), m, _mm512_or_si512(l, h));
        }
    }
}

/// The whole runs of 32 values of `adjacent_pairs`; returns the words written.
///
/// # Safety
/// As `pairs_of_rows_avx512`; `out` holds at least `src.len() / 2` words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn adjacent_pairs_avx512(src: &[f32], out: &mut [u32]) -> usize {
    let runs = src.len() / 32;
    for r in 0..runs {
        // SAFETY: values 32r..32r+32 lie in src, words 16r..16r+16 in out (runs·16 ≤ src.len()/2 ≤ out.len()).
        unsafe {
            let lo = _mm512_loadu_ps(src.as_ptr().add(32 * r));
            let hi = _mm512_loadu_ps(src.as_ptr().add(32 * r + 16));
            // the first 16 bf16 from `lo`, then `hi`'s: in memory order, i.e. 16 words of adjacent pairs
            let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(out.as_mut_ptr().add(16 * r).cast(), v);
        }
    }
    runs * 16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::test_util::values;

    #[test]
    fn rounds_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0)
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
    }

    /// The vector conversions give the scalar rounding's words, ties and tails included.
    #[test]
    fn vector_pairs_match_the_scalar_rounding() {
        let mut src = values(203, 9);
        // exact ties, both ways, and values beyond bf16's precision
        src[..4].copy_from_slice(&[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -(1.0 + 1.0 / 256.0), 3.0e38]);
        for len in [0, 1, 31, 32, 33, 64, 203] {
            let s = &src[..len];
            let mut got = vec![0u32; len.div_ceil(2)];
            adjacent_pairs(s, &mut got);
            let want: Vec<u32> =
                (0..len.div_ceil(2)).map(|i| pair(s[2 * i], s.get(2 * i + 1).copied().unwrap_or(0.0))).collect();
            assert_eq!(got, want, "adjacent, {len} values");
        }
        for n in [1, 15, 16, 17, 100] {
            let (lo, hi) = (&src[..n], &src[100..100 + n]);
            let mut got = vec![0u32; n];
            pairs_of_rows(lo, Some(hi), &mut got);
            assert_eq!(got, (0..n).map(|i| pair(lo[i], hi[i])).collect::<Vec<_>>(), "rows, {n}");
            pairs_of_rows(lo, None, &mut got);
            assert_eq!(got, (0..n).map(|i| pair(lo[i], 0.0)).collect::<Vec<_>>(), "last row, {n}");
        }
    }
}
