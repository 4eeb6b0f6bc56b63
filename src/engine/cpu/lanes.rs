//! Lane shuffles between interleaved rows and lane-major arrays: the gathers and scatters around the
//! Winograd transforms, stride-2 im2col and max pooling. Each has an AVX-512 path (two-source permutes, 16
//! outputs at a time) and a scalar rest, which is the whole of it on CPUs without AVX-512.

use super::isa;

/// Permute indices picking the even and the odd entries of two concatenated vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn even_odd() -> (std::arch::x86_64::__m512i, std::arch::x86_64::__m512i) {
    use std::arch::x86_64::*;
    (
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
        _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31),
    )
}

/// even[k] = row[2k], odd[k] = row[2k + 1] (odd one shorter for an odd-length row; its last entry untouched).
pub fn deinterleave2(row: &[f32], even: &mut [f32], odd: &mut [f32]) {
    let pairs = row.len() / 2;
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa::avx512() {
        // SAFETY: `isa::avx512` checked the CPU for AVX-512F.
        done = unsafe { deinterleave2_avx512(&row[..2 * pairs], &mut even[..pairs], &mut odd[..pairs]) };
    }
    for k in done..pairs {
        (even[k], odd[k]) = (row[2 * k], row[2 * k + 1]);
    }
    if row.len() % 2 == 1 {
        even[pairs] = row[2 * pairs];
    }
}

/// `deinterleave2` for whole groups of 16 pairs; returns how many pairs it did.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn deinterleave2_avx512(row: &[f32], even: &mut [f32], odd: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let pairs = (row.len() / 2).min(even.len()).min(odd.len());
    let groups = pairs - pairs % 16;
    let (even_idx, odd_idx) = even_odd();
    for k in (0..groups).step_by(16) {
        // SAFETY: k + 16 ≤ groups ≤ pairs, so entries 2k..2k+32 of row and k..k+16 of even and odd exist.
        unsafe {
            let (a, b) = (_mm512_loadu_ps(row.as_ptr().add(2 * k)), _mm512_loadu_ps(row.as_ptr().add(2 * k + 16)));
            _mm512_storeu_ps(even.as_mut_ptr().add(k), _mm512_permutex2var_ps(a, even_idx, b));
            _mm512_storeu_ps(odd.as_mut_ptr().add(k), _mm512_permutex2var_ps(a, odd_idx, b));
        }
    }
    groups
}

/// The four phases of `row` (`d_j[k] = row[4k + j]`) for k < `d0.len()`: the gather that lays a tile row's
/// columns out lane-major. Scalar it was a third of the input transform; AVX-512 does 16 tiles in 6 permutes.
#[inline(always)]
pub fn deinterleave4(row: &[f32], d: [&mut [f32]; 4]) {
    let tiles = d[0].len();
    let row = &row[..4 * tiles];
    let [d0, d1, d2, d3] = d;
    let (d1, d2, d3) = (&mut d1[..tiles], &mut d2[..tiles], &mut d3[..tiles]);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa::avx512() {
        // SAFETY: `isa::avx512` checked the CPU for AVX-512F; every slice was cut to `tiles` (or 4·tiles) above.
        done = unsafe { deinterleave4_avx512(row, [d0, d1, d2, d3]) };
    }
    for k in done..tiles {
        (d0[k], d1[k], d2[k], d3[k]) = (row[4 * k], row[4 * k + 1], row[4 * k + 2], row[4 * k + 3]);
    }
}

/// `deinterleave4` for whole groups of 16 tiles; returns how many tiles it did.
///
/// # Safety
/// The CPU must have AVX-512F; `row` must hold 4 entries per tile of `d[0]`, and each `d[j]` as many as `d[0]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn deinterleave4_avx512(row: &[f32], d: [&mut [f32]; 4]) -> usize {
    use std::arch::x86_64::*;
    let tiles = d[0].len() - d[0].len() % 16;
    assert!(row.len() >= 4 * tiles && d.iter().all(|d| d.len() >= tiles), "deinterleave4: short slices");
    let (even, odd) = even_odd();
    for k in (0..tiles).step_by(16) {
        // SAFETY: entries 4k..4k+64 of row and k..k+16 of each d_j lie inside the slices (asserted above).
        unsafe {
            let p = row.as_ptr().add(4 * k);
            let (a0, a1, a2, a3) = (
                _mm512_loadu_ps(p),
                _mm512_loadu_ps(p.add(16)),
                _mm512_loadu_ps(p.add(32)),
                _mm512_loadu_ps(p.add(48)),
            );
            // row[2i] and row[2i + 1] over the 64 entries, then every other one of those
            let (e01, o01) = (_mm512_permutex2var_ps(a0, even, a1), _mm512_permutex2var_ps(a0, odd, a1));
            let (e23, o23) = (_mm512_permutex2var_ps(a2, even, a3), _mm512_permutex2var_ps(a2, odd, a3));
            _mm512_storeu_ps(d[0].as_mut_ptr().add(k), _mm512_permutex2var_ps(e01, even, e23));
            _mm512_storeu_ps(d[2].as_mut_ptr().add(k), _mm512_permutex2var_ps(e01, odd, e23));
            _mm512_storeu_ps(d[1].as_mut_ptr().add(k), _mm512_permutex2var_ps(o01, even, o23));
            _mm512_storeu_ps(d[3].as_mut_ptr().add(k), _mm512_permutex2var_ps(o01, odd, o23));
        }
    }
    tiles
}

/// out[4k + j] = q_j[k] for k < `q[0].len()`: `deinterleave4` backwards, for the output scatter.
#[inline(always)]
pub fn interleave4(q: [&[f32]; 4], out: &mut [f32]) {
    let tiles = q[0].len();
    let out = &mut out[..4 * tiles];
    let (q1, q2, q3) = (&q[1][..tiles], &q[2][..tiles], &q[3][..tiles]);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if isa::avx512() {
        // SAFETY: `isa::avx512` checked the CPU for AVX-512F; every slice was cut to `tiles` (or 4·tiles).
        done = unsafe { interleave4_avx512([q[0], q1, q2, q3], out) };
    }
    for k in done..tiles {
        out[4 * k..4 * k + 4].copy_from_slice(&[q[0][k], q1[k], q2[k], q3[k]]);
    }
}

/// `interleave4` for whole groups of 16 tiles; returns how many tiles it did.
///
/// # Safety
/// The CPU must have AVX-512F; `out` must hold 4 entries per tile of `q[0]`, and each `q[j]` as many as `q[0]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn interleave4_avx512(q: [&[f32]; 4], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let tiles = q[0].len() - q[0].len() % 16;
    assert!(out.len() >= 4 * tiles && q.iter().all(|q| q.len() >= tiles), "interleave4: short slices");
    // (a0 b0 a1 b1 ..) from a and b: low and high halves
    let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    // pairs of 64-bit lanes (x0 x1 y0 y1 ..) from x and y, as f64 lanes: low and high halves
    let lo64 = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
    let hi64 = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
    for k in (0..tiles).step_by(16) {
        // SAFETY: entries k..k+16 of each q_j and 4k..4k+64 of out lie inside the slices (asserted above).
        unsafe {
            let [a, b, c, d] = q.map(|q| _mm512_loadu_ps(q.as_ptr().add(k)));
            // ab: a0 b0 a1 b1 ..; cd: c0 d0 c1 d1 ..
            let (ab_lo, ab_hi) = (_mm512_permutex2var_ps(a, lo, b), _mm512_permutex2var_ps(a, hi, b));
            let (cd_lo, cd_hi) = (_mm512_permutex2var_ps(c, lo, d), _mm512_permutex2var_ps(c, hi, d));
            // (a_k b_k) and (c_k d_k) are 64-bit units: interleave those
            let (ab_lo, ab_hi, cd_lo, cd_hi) =
                (_mm512_castps_pd(ab_lo), _mm512_castps_pd(ab_hi), _mm512_castps_pd(cd_lo), _mm512_castps_pd(cd_hi));
            let p = out.as_mut_ptr().add(4 * k);
            _mm512_storeu_ps(p, _mm512_castpd_ps(_mm512_permutex2var_pd(ab_lo, lo64, cd_lo)));
            _mm512_storeu_ps(p.add(16), _mm512_castpd_ps(_mm512_permutex2var_pd(ab_lo, hi64, cd_lo)));
            _mm512_storeu_ps(p.add(32), _mm512_castpd_ps(_mm512_permutex2var_pd(ab_hi, lo64, cd_hi)));
            _mm512_storeu_ps(p.add(48), _mm512_castpd_ps(_mm512_permutex2var_pd(ab_hi, hi64, cd_hi)));
        }
    }
    tiles
}
