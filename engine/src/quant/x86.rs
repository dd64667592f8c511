//! AVX2 and AVX-512-VNNI kernels for the 32-value block types, and AVX2 kernels for
//! F32/F16/BF16 weights.
//!
//! Two shapes of kernel, picked by the number of activation rows:
//!
//! * **Few rows (decode, small batches):** [`legacy_row`] walks one weight row at a time
//!   against up to `ROW_KERNEL_ROWS_MAX` activation rows, so the weights are read as one
//!   sequential stream. That is what the hardware prefetchers follow best: interleaving 4 rows
//!   of a tile (4 streams a row apart) measured 6 GB/s for the Q8_0 head from DRAM on Zen 4,
//!   the single stream 26 GB/s. The blocks of a row rotate over `U` accumulators so the FMA
//!   chains overlap.
//! * **Many rows (prefill):** [`legacy_tile`] computes an `O × R` tile (`R <= 8`): each weight
//!   block is unpacked once and multiplied with the same block of all `R` activation rows
//!   (llama.cpp gets the same reuse from `ggml_compute_forward_mul_mat`'s blocking). The
//!   output rows are walked in L2-sized blocks so the weights are re-read from L2, not DRAM.
//!
//! Per block the integer dot is `vpmaddubsw` + `vpmaddwd` (AVX2, ggml's
//! `mul_sum_us8_pairs_float`) or one `vpdpbusd` (AVX-512 VNNI on 256-bit registers, which also
//! gives the compiler 32 vector registers); it is converted to f32 and accumulated times
//! `d_w · d_x`. The offset term `m · s` of the unsigned-code types (see [`super::blocks`]) is
//! summed apart. In the tile both scale products are done once per weight row for all `R`
//! activation rows (their scales are stored transposed for that), leaving one FMA per pair:
//! the FMA ports, not the integer dots, are what bounds prefill on Zen 4.
//!
//! The per-format decoding and the kernel bodies are `#[inline(always)]` without target
//! features: they are only ever inlined into the `#[target_feature]` entry points
//! (`*_avx2`, `*_vnni`), which is where the instructions get their encoding.

// The kernels index their register tiles `acc[o][r]` by tile coordinates on purpose: the
// loops have const-generic bounds and unroll fully, and iterator chains would obscure which
// operand pairs with which.
#![allow(clippy::needless_range_loop)]

use super::blocks::{Legacy, QK};
use super::activations::Q8KBlock;
use super::{FloatArgs, LegacyArgs, WEIGHT_BLOCK_BYTES};
use std::arch::x86_64::*;

// ---------------------------------------------------------------------------------------------
// Block decoding

/// One legacy block format as the SIMD kernels see it.
pub(crate) trait SimdBlock {
    const BYTES: usize;
    /// Q8_0, Q4_0, Q5_0: codes are signed weights and there is no offset term.
    const SIGNED: bool;
    /// The 32 codes of the block at `p`, value `j` in byte `j`.
    unsafe fn codes(p: *const u8) -> __m256i;
    /// `[d, m, 0, 0]`.
    unsafe fn dm(p: *const u8) -> __m128;
}

#[inline(always)]
unsafe fn read_u16(p: *const u8) -> u16 {
    std::ptr::read_unaligned(p as *const u16)
}

#[inline(always)]
unsafe fn read_u32(p: *const u8) -> u32 {
    std::ptr::read_unaligned(p as *const u32)
}

/// ggml `bytes_from_nibbles_32`: 16 bytes of nibble pairs to 32 codes (low nibbles first).
#[inline(always)]
unsafe fn nibbles_32(p: *const u8) -> __m256i {
    let lo = _mm_loadu_si128(p as *const __m128i);
    let hi = _mm_srli_epi16(lo, 4);
    _mm256_and_si256(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(0x0F))
}

/// ggml `bytes_from_bits_32` masked to 0x10: bit `j` of `qh` becomes 16 in byte `j`.
#[inline(always)]
unsafe fn fifth_bits_32(qh: u32) -> __m256i {
    let shuffle = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0x0000000000000000,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuffle);
    let bit_mask = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
    let set = _mm256_cmpeq_epi8(_mm256_or_si256(bytes, bit_mask), _mm256_set1_epi64x(-1));
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// `[d, m, 0, 0]` of the two adjacent f16 at `p`.
#[inline(always)]
unsafe fn f16_pair(p: *const u8) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi32_si128(read_u32(p) as i32))
}

pub(crate) struct Q4_0;
pub(crate) struct Q4_1;
pub(crate) struct Q5_0;
pub(crate) struct Q5_1;
pub(crate) struct Q8_0;

// Q4_0 and Q5_0 run as signed codes (`u - 8`, `u - 16`) with no offset term, as ggml's
// `ggml_vec_dot_q4_0_q8_0` / `_q5_0_q8_0` do: the same integer dot, and one FMA of `d·d_x`
// per block, so the sums are bit-identical to llama.cpp's (checked on Gemma 3's Q5_0
// projections). Computing them unsigned with an `m = -16d` offset, as Q4_1/Q5_1, rounds
// differently (0.13 off on a Q projection of magnitude 270).
impl SimdBlock for Q4_0 {
    const BYTES: usize = Legacy::Q4_0.block_bytes();
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn codes(p: *const u8) -> __m256i {
        _mm256_sub_epi8(nibbles_32(p.add(2)), _mm256_set1_epi8(8))
    }
    #[inline(always)]
    unsafe fn dm(p: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128(read_u16(p) as i32))
    }
}

impl SimdBlock for Q4_1 {
    const BYTES: usize = Legacy::Q4_1.block_bytes();
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn codes(p: *const u8) -> __m256i {
        nibbles_32(p.add(4))
    }
    #[inline(always)]
    unsafe fn dm(p: *const u8) -> __m128 {
        f16_pair(p)
    }
}

impl SimdBlock for Q5_0 {
    const BYTES: usize = Legacy::Q5_0.block_bytes();
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn codes(p: *const u8) -> __m256i {
        let codes = _mm256_or_si256(nibbles_32(p.add(6)), fifth_bits_32(read_u32(p.add(2))));
        _mm256_sub_epi8(codes, _mm256_set1_epi8(16))
    }
    #[inline(always)]
    unsafe fn dm(p: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128(read_u16(p) as i32))
    }
}

impl SimdBlock for Q5_1 {
    const BYTES: usize = Legacy::Q5_1.block_bytes();
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn codes(p: *const u8) -> __m256i {
        _mm256_or_si256(nibbles_32(p.add(8)), fifth_bits_32(read_u32(p.add(4))))
    }
    #[inline(always)]
    unsafe fn dm(p: *const u8) -> __m128 {
        f16_pair(p)
    }
}

impl SimdBlock for Q8_0 {
    const BYTES: usize = Legacy::Q8_0.block_bytes();
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn codes(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p.add(2) as *const __m256i)
    }
    #[inline(always)]
    unsafe fn dm(p: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128(read_u16(p) as i32))
    }
}

// ---------------------------------------------------------------------------------------------
// Integer dot of 32 unsigned × 32 signed bytes into 8 i32 lanes

pub(crate) trait DotU8I8 {
    unsafe fn dot(u: __m256i, s: __m256i) -> __m256i;
}

/// AVX2: `vpmaddubsw` then `vpmaddwd` with ones. The i16 pair sums cannot saturate: codes are
/// at most 31 (or 128 for |Q8_0|) and activations at most 127 in magnitude, 2·128·127 < 2¹⁵.
pub(crate) struct Maddubs;
impl DotU8I8 for Maddubs {
    #[inline(always)]
    unsafe fn dot(u: __m256i, s: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }
}

/// AVX-512 VNNI (256-bit, needs AVX512VL): one `vpdpbusd`, no intermediate i16 at all.
pub(crate) struct Vnni;
// The AVX-512 intrinsics and target features are stable since Rust 1.89. candle-core 0.11
// already needs 1.89 for the same reason (its `repack_x86` enables `avx512vnni`), so this
// raises nothing; the workspace's `rust-version` should say 1.89.
#[clippy::msrv = "1.89"]
impl DotU8I8 for Vnni {
    #[inline(always)]
    unsafe fn dot(u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
    }
}

// ---------------------------------------------------------------------------------------------
// Horizontal sums

/// The sum of 8 lanes in the order of ggml's `hsum_float_8`: ((0+4)+(2+6)) + ((1+5)+(3+7)).
/// Every kernel finishes every dot product with this tree (see "batch invariance" in mod.rs).
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `[sum(a), sum(b), sum(c), sum(d)]`, each exactly as [`hsum`] adds it.
#[inline(always)]
unsafe fn hsum4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
    _mm_setr_ps(hsum(a), hsum(b), hsum(c), hsum(d))
}

/// Writes `acc[o][r]`'s sum to `out[r * out_stride + o]`.
#[inline(always)]
unsafe fn store_tile<const O: usize, const R: usize>(
    acc: &[[__m256; R]; O],
    out: *mut f32,
    out_stride: usize,
) {
    for r in 0..R {
        let mut o = 0;
        while o + 4 <= O {
            let sums = hsum4(acc[o][r], acc[o + 1][r], acc[o + 2][r], acc[o + 3][r]);
            _mm_storeu_ps(out.add(r * out_stride + o), sums);
            o += 4;
        }
        while o < O {
            *out.add(r * out_stride + o) = hsum(acc[o][r]);
            o += 1;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The legacy-block micro-kernel and the loop around it

/// One block of one weight row against `R` activation rows, into accumulator set `u`.
///
/// The scales go through one 128-bit multiply per pair: `[d, m] · [d_x, s]` gives the dot's
/// scale `d·d_x` in lane 0 (broadcast for the FMA) and the offset term `m·s` in lane 1, which
/// is summed on the side in `offsets`.
#[inline(always)]
unsafe fn row_block<B: SimdBlock, D: DotU8I8, const R: usize, const U: usize>(
    a: &LegacyArgs,
    w_row: *const u8,
    r0: usize,
    b: usize,
    u: usize,
    acc: &mut [[__m256; U]; R],
    offsets: &mut [__m128; R],
) {
    let p = w_row.add(b * B::BYTES);
    let w = B::codes(p);
    let wu = if B::SIGNED { _mm256_sign_epi8(w, w) } else { w };
    let dm = B::dm(p);
    for r in 0..R {
        let i = (r0 + r) * a.nb + b;
        let x = _mm256_load_si256(a.codes.add(i) as *const __m256i);
        let dot = if B::SIGNED {
            D::dot(wu, _mm256_sign_epi8(x, w))
        } else {
            D::dot(wu, x)
        };
        let scales = _mm_mul_ps(
            dm,
            _mm_castpd_ps(_mm_load_sd(a.scales.add(i) as *const f64)),
        );
        if !B::SIGNED {
            // Lane 1: offset + m·s, multiplied then added as ggml's `summs += m * s`.
            offsets[r] = _mm_add_ps(offsets[r], scales);
        }
        acc[r][u] = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(dot),
            _mm256_broadcastss_ps(scales),
            acc[r][u],
        );
    }
}

/// Outputs `[r0, r0 + R) × [o0, o0 + O)`, `R <= 8`, with the scales handled per weight row
/// across the tile's activation rows: one multiply gives `d_o · d_x` for all `R` rows and one
/// FMA accumulates the offset terms `m_o · s_r` for all of them, so each pair costs only its
/// integer dot, a conversion, a lane broadcast and one FMA.
#[inline(always)]
unsafe fn legacy_tile<B: SimdBlock, D: DotU8I8, const O: usize, const R: usize>(
    a: &LegacyArgs,
    o0: usize,
    r0: usize,
) {
    const { assert!(R <= 8, "the transposed scales are loaded 8 rows at a time") };
    let mut acc = [[_mm256_setzero_ps(); R]; O];
    let mut offsets = [_mm256_setzero_ps(); O];
    let w0 = a.weights.add(o0 * a.row_bytes);
    for b in 0..a.nb {
        let xd = _mm256_loadu_ps(a.d_t.add(b * a.n_rows + r0));
        let xs = _mm256_loadu_ps(a.s_t.add(b * a.n_rows + r0));
        for o in 0..O {
            let p = w0.add(o * a.row_bytes + b * B::BYTES);
            let w = B::codes(p);
            let wu = if B::SIGNED { _mm256_sign_epi8(w, w) } else { w };
            let dm = B::dm(p);
            let scales = _mm256_mul_ps(_mm256_broadcastss_ps(dm), xd);
            if !B::SIGNED {
                let m = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
                // Multiplied then added, as ggml's `summs += m * s` and the row kernels.
                offsets[o] = _mm256_add_ps(offsets[o], _mm256_mul_ps(m, xs));
            }
            for r in 0..R {
                let x = _mm256_load_si256(a.codes.add((r0 + r) * a.nb + b) as *const __m256i);
                let dot = if B::SIGNED {
                    D::dot(wu, _mm256_sign_epi8(x, w))
                } else {
                    D::dot(wu, x)
                };
                let scale = if r == 0 {
                    _mm256_broadcastss_ps(_mm256_castps256_ps128(scales))
                } else {
                    _mm256_permutevar8x32_ps(scales, _mm256_set1_epi32(r as i32))
                };
                acc[o][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[o][r]);
            }
        }
    }
    let out = a.out.add(r0 * a.n_out + o0);
    store_tile::<O, R>(&acc, out, a.n_out);
    if !B::SIGNED {
        for o in 0..O {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), offsets[o]);
            for r in 0..R {
                *out.add(r * a.n_out + o) += lanes[r];
            }
        }
    }
}

/// Weight row `o` against activation rows `[r0, r0 + R)`: one 8-lane partial sum per row.
/// The blocks rotate over `U` accumulators so consecutive FMAs do not wait on each other.
#[inline(always)]
unsafe fn legacy_row<B: SimdBlock, D: DotU8I8, const R: usize, const U: usize>(
    a: &LegacyArgs,
    o: usize,
    r0: usize,
) -> ([__m256; R], [f32; R]) {
    let mut acc = [[_mm256_setzero_ps(); U]; R];
    let mut offsets = [_mm_setzero_ps(); R];
    let w_row = a.weights.add(o * a.row_bytes);
    let full = a.nb / U * U;
    let mut b = 0;
    while b < full {
        prefetch_ahead(w_row.add(b * B::BYTES));
        for u in 0..U {
            row_block::<B, D, R, U>(a, w_row, r0, b + u, u, &mut acc, &mut offsets);
        }
        b += U;
    }
    while b < a.nb {
        row_block::<B, D, R, U>(a, w_row, r0, b, 0, &mut acc, &mut offsets);
        b += 1;
    }
    let mut sums = [_mm256_setzero_ps(); R];
    let mut offset_sums = [0f32; R];
    for r in 0..R {
        let mut sum = acc[r][0];
        for u in 1..U {
            sum = _mm256_add_ps(sum, acc[r][u]);
        }
        sums[r] = sum;
        // Lane 1 of `offsets` is Σ m·s, added after the horizontal sum as the tile does.
        offset_sums[r] = _mm_cvtss_f32(_mm_movehdup_ps(offsets[r]));
    }
    (sums, offset_sums)
}

/// Output columns `[o_start, o_end)` for activation rows `[r0, r0 + R)`, one weight row at a
/// time: the weights are read as one sequential stream, which the hardware prefetchers follow
/// far better than the interleaved rows of a tile (see the module comment). For few activation
/// rows, where reading the weights is the cost.
#[inline(always)]
unsafe fn legacy_rows_range<B: SimdBlock, D: DotU8I8, const R: usize, const U: usize>(
    a: &LegacyArgs,
    o_start: usize,
    o_end: usize,
    r0: usize,
) {
    let mut o = o_start;
    while o + 4 <= o_end {
        let (s0, f0) = legacy_row::<B, D, R, U>(a, o, r0);
        let (s1, f1) = legacy_row::<B, D, R, U>(a, o + 1, r0);
        let (s2, f2) = legacy_row::<B, D, R, U>(a, o + 2, r0);
        let (s3, f3) = legacy_row::<B, D, R, U>(a, o + 3, r0);
        for r in 0..R {
            let sums = hsum4(s0[r], s1[r], s2[r], s3[r]);
            let mut lanes = [0f32; 4];
            _mm_storeu_ps(lanes.as_mut_ptr(), sums);
            let out = a.out.add((r0 + r) * a.n_out + o);
            for (k, f) in [f0[r], f1[r], f2[r], f3[r]].into_iter().enumerate() {
                *out.add(k) = if B::SIGNED { lanes[k] } else { lanes[k] + f };
            }
        }
        o += 4;
    }
    while o < o_end {
        let (s, f) = legacy_row::<B, D, R, U>(a, o, r0);
        for r in 0..R {
            let sum = hsum(s[r]);
            *a.out.add((r0 + r) * a.n_out + o) = if B::SIGNED { sum } else { sum + f[r] };
        }
        o += 1;
    }
}

/// Output columns `[o_start, o_end)` for all activation rows with `OT × RT` tiles, `1 × RT`
/// tiles for the last columns and smaller `R` for the last rows.
#[inline(always)]
unsafe fn legacy_range<B: SimdBlock, D: DotU8I8, const OT: usize, const RT: usize>(
    a: &LegacyArgs,
    o_start: usize,
    o_end: usize,
) {
    macro_rules! tile {
        ($o:expr, $rt:expr, $o0:expr, $r0:expr) => {
            match $rt {
                1 => legacy_tile::<B, D, $o, 1>(a, $o0, $r0),
                2 => legacy_tile::<B, D, $o, 2>(a, $o0, $r0),
                3 => legacy_tile::<B, D, $o, 3>(a, $o0, $r0),
                4 => legacy_tile::<B, D, $o, 4>(a, $o0, $r0),
                5 => legacy_tile::<B, D, $o, 5>(a, $o0, $r0),
                6 => legacy_tile::<B, D, $o, 6>(a, $o0, $r0),
                7 => legacy_tile::<B, D, $o, 7>(a, $o0, $r0),
                _ => legacy_tile::<B, D, $o, 8>(a, $o0, $r0),
            }
        };
    }
    let block_rows = (WEIGHT_BLOCK_BYTES / a.row_bytes.max(1)).max(OT) / OT * OT;
    let mut ob = o_start;
    while ob < o_end {
        let ob_end = (ob + block_rows).min(o_end);
        let mut r0 = 0;
        while r0 < a.n_rows {
            let rt = RT.min(a.n_rows - r0);
            let mut o0 = ob;
            while o0 + OT <= ob_end {
                tile!(OT, rt, o0, r0);
                o0 += OT;
            }
            while o0 < ob_end {
                tile!(1, rt, o0, r0);
                o0 += 1;
            }
            r0 += rt;
        }
        ob = ob_end;
    }
}

/// Tile shapes for many activation rows (`O` weight rows × `R` activation rows), measured on
/// Zen 4 for Q4_1 at 128 rows: with AVX2's 16 registers 1 × 8 ran at 90 GFLOP/s (2 × 4: 76);
/// with AVX-512VL's 32, 2 × 8 at 104 (4 × 4: 94).
const AVX2_TILE: (usize, usize) = (1, 8);
const VNNI_TILE: (usize, usize) = (2, 8);
/// Activation rows up to which the row-at-a-time kernels are used: up to here they were as
/// fast or faster than the tiles (both compute-bound from 2 rows on) and read DRAM better.
const ROW_KERNEL_ROWS_MAX: usize = 4;

/// Output columns `[o_start, o_end)` for all activation rows.
#[inline(always)]
unsafe fn legacy_columns<B: SimdBlock, D: DotU8I8, const OT: usize, const RT: usize>(
    a: &LegacyArgs,
    o_start: usize,
    o_end: usize,
) {
    const { assert!(ROW_KERNEL_ROWS_MAX == 4) };
    match a.n_rows {
        // One accumulator per (weight row, activation row) in every kernel, blocks in order:
        // the tiles can afford no more registers, and the sums must match theirs exactly.
        1 => legacy_rows_range::<B, D, 1, 1>(a, o_start, o_end, 0),
        2 => legacy_rows_range::<B, D, 2, 1>(a, o_start, o_end, 0),
        3 => legacy_rows_range::<B, D, 3, 1>(a, o_start, o_end, 0),
        4 => legacy_rows_range::<B, D, 4, 1>(a, o_start, o_end, 0),
        _ => legacy_range::<B, D, OT, RT>(a, o_start, o_end),
    }
}

/// Output columns `[o_start, o_end)` of a 32-value-block matmul, AVX2 kernels.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `a` must describe live buffers of the sizes it
/// claims; no other thread may write these output columns meanwhile.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn legacy_columns_avx2<B: SimdBlock>(
    a: &LegacyArgs,
    o_start: usize,
    o_end: usize,
) {
    legacy_columns::<B, Maddubs, { AVX2_TILE.0 }, { AVX2_TILE.1 }>(a, o_start, o_end)
}

/// [`legacy_columns_avx2`] with AVX-512 VNNI dots.
///
/// # Safety
/// As for [`legacy_columns_avx2`], and the CPU must have AVX-512 F, BW, VL and VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
pub(crate) unsafe fn legacy_columns_vnni<B: SimdBlock>(
    a: &LegacyArgs,
    o_start: usize,
    o_end: usize,
) {
    legacy_columns::<B, Vnni, { VNNI_TILE.0 }, { VNNI_TILE.1 }>(a, o_start, o_end)
}

// ---------------------------------------------------------------------------------------------
// F32 / F16 weights

pub(crate) trait SimdFloat {
    const BYTES: usize;
    /// 8 weights from `p`.
    unsafe fn load8(p: *const u8) -> __m256;
    fn scalar(p: *const u8) -> f32;
}

pub(crate) struct F16;
pub(crate) struct BF16;

impl SimdFloat for F16 {
    const BYTES: usize = 2;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    fn scalar(p: *const u8) -> f32 {
        // SAFETY: callers pass a pointer to a weight inside the matrix.
        half::f16::from_bits(unsafe { std::ptr::read_unaligned(p as *const u16) }).to_f32()
    }
}

impl SimdFloat for BF16 {
    const BYTES: usize = 2;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        // bf16 is the top half of an f32.
        let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))
    }
    #[inline(always)]
    fn scalar(p: *const u8) -> f32 {
        // SAFETY: callers pass a pointer to a weight inside the matrix.
        half::bf16::from_bits(unsafe { std::ptr::read_unaligned(p as *const u16) }).to_f32()
    }
}

#[inline(always)]
unsafe fn float_tile<W: SimdFloat, const O: usize, const R: usize>(
    a: &FloatArgs,
    o0: usize,
    r0: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); R]; O];
    let w0 = a.weights.add(o0 * a.row_bytes);
    let x0 = a.x.add(r0 * a.n_in);
    let n8 = a.n_in / 8 * 8;
    let mut i = 0;
    while i < n8 {
        let mut w = [_mm256_setzero_ps(); O];
        for o in 0..O {
            w[o] = W::load8(w0.add(o * a.row_bytes + i * W::BYTES));
        }
        for r in 0..R {
            let x = _mm256_loadu_ps(x0.add(r * a.n_in + i));
            for o in 0..O {
                acc[o][r] = _mm256_fmadd_ps(w[o], x, acc[o][r]);
            }
        }
        i += 8;
    }
    store_tile::<O, R>(&acc, a.out.add(r0 * a.n_out + o0), a.n_out);
    if n8 < a.n_in {
        for o in 0..O {
            for r in 0..R {
                let mut tail = 0.0;
                for i in n8..a.n_in {
                    tail +=
                        W::scalar(w0.add(o * a.row_bytes + i * W::BYTES)) * *x0.add(r * a.n_in + i);
                }
                *a.out.add((r0 + r) * a.n_out + o0 + o) += tail;
            }
        }
    }
}

/// Weight row `o` against activation rows `[0, R)`, one 8-float accumulator per row; the
/// sums, tail included.
#[inline(always)]
unsafe fn float_row<W: SimdFloat, const R: usize>(a: &FloatArgs, o: usize) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    let w_row = a.weights.add(o * a.row_bytes);
    let n8 = a.n_in / 8 * 8;
    let mut i = 0;
    while i < n8 {
        let w = W::load8(w_row.add(i * W::BYTES));
        for r in 0..R {
            acc[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(a.x.add(r * a.n_in + i)), acc[r]);
        }
        i += 8;
    }
    let mut sums = [0f32; R];
    for r in 0..R {
        sums[r] = hsum(acc[r]);
        if n8 < a.n_in {
            // The tail summed on its own, then added, as the tile does.
            let mut tail = 0.0;
            for i in n8..a.n_in {
                tail += W::scalar(w_row.add(i * W::BYTES)) * *a.x.add(r * a.n_in + i);
            }
            sums[r] += tail;
        }
    }
    sums
}

/// One F32 dot product as ggml's `ggml_vec_dot_f32` computes it in an AVX-512 build (the
/// kernel llama.cpp's CPU backend multiplies F32 weights with for one activation row, e.g.
/// a mixture of experts' router at decode): four 16-float FMA chains over 64-float steps,
/// folded as `(c₀ + c₂) + (c₁ + c₃)` and reduced in `_mm512_reduce_add_ps`'s order, then the
/// last `n % 64` products added one by one with a fused multiply-add (GCC contracts
/// `sumf += x*y`). Eight 8-float accumulators hold the four 16-float ones as (low, high).
#[inline(always)]
unsafe fn f32_dot_ggml(w: *const f32, x: *const f32, n: usize) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 8];
    let n64 = n / 64 * 64;
    let mut i = 0;
    while i < n64 {
        for (u, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(_mm256_loadu_ps(w.add(i + 8 * u)), _mm256_loadu_ps(x.add(i + 8 * u)), *acc);
        }
        i += 64;
    }
    // c_j = (acc[2j], acc[2j+1]); (c0 + c2) + (c1 + c3), by halves.
    let lo = _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6]));
    let hi = _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7]));
    // `_mm512_reduce_add_ps`: high 256 + low 256, then as `hsum`.
    let mut sum = hsum(_mm256_add_ps(hi, lo));
    for i in n64..n {
        sum = (*w.add(i)).mul_add(*x.add(i), sum);
    }
    sum
}

/// Output columns `[o_start, o_end)` of an F32-weight matmul, every row and column by
/// [`f32_dot_ggml`], so a row's result does not depend on what else shares its step.
///
/// # Safety
/// As for [`legacy_columns_avx2`]; `a.weights` holds F32 rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f32_columns_ggml_avx2(a: &FloatArgs, o_start: usize, o_end: usize) {
    let w = a.weights as *const f32;
    for r in 0..a.n_rows {
        let x = a.x.add(r * a.n_in);
        for o in o_start..o_end {
            *a.out.add(r * a.n_out + o) = f32_dot_ggml(w.add(o * a.n_in), x, a.n_in);
        }
    }
}

#[inline(always)]
unsafe fn float_rows_range<W: SimdFloat, const R: usize>(
    a: &FloatArgs,
    o_start: usize,
    o_end: usize,
) {
    for o in o_start..o_end {
        let sums = float_row::<W, R>(a, o);
        for r in 0..R {
            *a.out.add(r * a.n_out + o) = sums[r];
        }
    }
}

/// Output columns `[o_start, o_end)` of a float-weight matmul: row-at-a-time kernels for few
/// activation rows (one sequential weight stream, as for the block types), `4 × 2` tiles over
/// L2-sized blocks of weight rows otherwise.
///
/// # Safety
/// As for [`legacy_columns_avx2`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn float_columns_avx2<W: SimdFloat>(a: &FloatArgs, o_start: usize, o_end: usize) {
    const OT: usize = 4;
    const RT: usize = 2;
    match a.n_rows {
        1 => return float_rows_range::<W, 1>(a, o_start, o_end),
        2 => return float_rows_range::<W, 2>(a, o_start, o_end),
        3 => return float_rows_range::<W, 3>(a, o_start, o_end),
        4 => return float_rows_range::<W, 4>(a, o_start, o_end),
        _ => {}
    }
    let block_rows = (WEIGHT_BLOCK_BYTES / a.row_bytes.max(1)).max(OT) / OT * OT;
    let mut ob = o_start;
    while ob < o_end {
        let ob_end = (ob + block_rows).min(o_end);
        let mut r0 = 0;
        while r0 < a.n_rows {
            let rt = RT.min(a.n_rows - r0);
            let mut o0 = ob;
            while o0 + OT <= ob_end {
                match rt {
                    1 => float_tile::<W, OT, 1>(a, o0, r0),
                    _ => float_tile::<W, OT, RT>(a, o0, r0),
                }
                o0 += OT;
            }
            while o0 < ob_end {
                match rt {
                    1 => float_tile::<W, 1, 1>(a, o0, r0),
                    _ => float_tile::<W, 1, RT>(a, o0, r0),
                }
                o0 += 1;
            }
            r0 += rt;
        }
        ob = ob_end;
    }
}

// ---------------------------------------------------------------------------------------------
// Activation quantization

/// [`super::activations::quantize_block_scalar`] with AVX2 (ggml `quantize_row_q8_1`, AVX2
/// branch). Bit-identical to the scalar version: max and the integer sum are exact, and both
/// round half to even.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_block_avx2(values: &[f32], codes: &mut [i8; QK]) -> [f32; 2] {
    assert!(values.len() >= QK);
    let p = values.as_ptr();
    let v0 = _mm256_loadu_ps(p);
    let v1 = _mm256_loadu_ps(p.add(8));
    let v2 = _mm256_loadu_ps(p.add(16));
    let v3 = _mm256_loadu_ps(p.add(24));
    let sign = _mm256_set1_ps(-0.0);
    let max = _mm256_max_ps(
        _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
        _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)),
    );
    let max4 = _mm_max_ps(_mm256_extractf128_ps(max, 1), _mm256_castps256_ps128(max));
    let max4 = _mm_max_ps(max4, _mm_movehl_ps(max4, max4));
    let max4 = _mm_max_ss(max4, _mm_movehdup_ps(max4));
    let amax = _mm_cvtss_f32(max4);
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    const ROUND: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let i0 = _mm256_cvtps_epi32(_mm256_round_ps::<ROUND>(_mm256_mul_ps(v0, id)));
    let i1 = _mm256_cvtps_epi32(_mm256_round_ps::<ROUND>(_mm256_mul_ps(v1, id)));
    let i2 = _mm256_cvtps_epi32(_mm256_round_ps::<ROUND>(_mm256_mul_ps(v2, id)));
    let i3 = _mm256_cvtps_epi32(_mm256_round_ps::<ROUND>(_mm256_mul_ps(v3, id)));
    let sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    let sum4 = _mm_add_epi32(
        _mm256_castsi256_si128(sum),
        _mm256_extracti128_si256(sum, 1),
    );
    let sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0b01_00_11_10));
    let sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0b10_11_00_01));
    let sum = _mm_cvtsi128_si32(sum4);
    // Pack to bytes; the two packs interleave 128-bit lanes, the permute restores order.
    let i01 = _mm256_packs_epi32(i0, i1);
    let i23 = _mm256_packs_epi32(i2, i3);
    let bytes = _mm256_packs_epi16(i01, i23);
    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(codes.as_mut_ptr() as *mut __m256i, bytes);
    [d, d * sum as f32]
}

// ---------------------------------------------------------------------------------------------
// Q6_K · Q8_K, in llama.cpp's summation order

/// How far ahead of the block in hand the row kernels (legacy and K-quant) ask for weights:
/// a weight row
/// is read once, front to back, and the next row follows it in memory, so the bytes a few
/// superblocks on are the next ones needed. Without it the Q6_K dot spent 58% of its time on
/// its first load of a superblock (perf, decode of a Qwen3-8B-shaped Q4_K_M file, one
/// thread). Decode tok/s on that file: 9.6 without, 9.3 at 512 bytes ahead, 11.2 at 1024,
/// 12.5–13.0 at 2048, 12.5–13.1 at 4096, 12.2–13.1 at 8192: the nearest of the plateau.
/// The same in the legacy row kernel took Gemma 3 270M's decode (its Q8_0 head is 178 MB
/// of short rows) from 20.6–21.3 to 29.5–31.3 tok/s and SmolLM2's from 44.5–51.8 to
/// 74.8–87.2 (`engine-bench`, one thread, alternating runs).
const PREFETCH_AHEAD_BYTES: usize = 2048;

/// Prefetches the two cache lines `PREFETCH_AHEAD_BYTES` past `p`, which may lie past the
/// row's end (the next row, or nothing: a prefetch never faults).
#[inline(always)]
unsafe fn prefetch_ahead(p: *const u8) {
    let ahead = p.wrapping_add(PREFETCH_AHEAD_BYTES);
    _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64) as *const i8);
}


/// Bytes of one Q6_K superblock (ggml `block_q6_K`: `ql[128]`, `qh[64]`, `scales[16]` as
/// i8, `d` as f16).
const Q6K_BLOCK_BYTES: usize = 210;

/// One Q6_K weight row (`act.len()` superblocks at `w`) against one Q8_K activation row,
/// summed as llama.cpp's AVX2 `ggml_vec_dot_q6_K_q8_K` sums, so the result is bit-identical
/// to its: per superblock, eight i32 lanes where lane `L` holds codes `4L..4L+3` of every
/// 32-code group times their activations and scales, minus `32 ·` the scaled 16-code sums
/// (`bsums`) of codes `32L..32L+31` (the 6-bit codes are stored `+32`); then one FMA of
/// `d_x · d_w` into an f32 accumulator per lane, and the lanes summed at the end by
/// [`hsum`]. The integer parts are exact, so only that lane split and the float order must
/// match (candle's dot subtracts the 32 inside each lane instead: the same total, other
/// lanes, other roundings).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` must hold `act.len()` superblocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q6k_q8k(w: &[u8], act: &[Q8KBlock]) -> f32 {
    q6k_rows::<1>(w, [act])[0]
}

/// One K-quant type's kernels for 1, 4 and 8 activation rows (each row's result the same
/// whichever runs it).
pub(crate) struct KRowKernels {
    pub(crate) one: unsafe fn(&[u8], &[Q8KBlock]) -> f32,
    pub(crate) four: unsafe fn(&[u8], [&[Q8KBlock]; 4]) -> [f32; 4],
    pub(crate) eight: unsafe fn(&[u8], [&[Q8KBlock]; 8]) -> [f32; 8],
}

pub(crate) const Q4K_AVX2: KRowKernels = KRowKernels { one: dot_q4k_q8k, four: dot_q4k_q8k_4, eight: dot_q4k_q8k_8 };
pub(crate) const Q4K_VNNI: KRowKernels = KRowKernels { one: dot_q4k_q8k, four: dot_q4k_q8k_4_vnni, eight: dot_q4k_q8k_8_vnni };
pub(crate) const Q6K_AVX2: KRowKernels = KRowKernels { one: dot_q6k_q8k, four: dot_q6k_q8k_4, eight: dot_q6k_q8k_8 };
pub(crate) const Q6K_VNNI: KRowKernels = KRowKernels { one: dot_q6k_q8k, four: dot_q6k_q8k_4_vnni, eight: dot_q6k_q8k_8_vnni };

/// The multi-row kernels' entry points: `$name(w, acts)` runs `$body::<R>` (each row's
/// arithmetic the one-row kernel's, in the same order: bit-identical results, batch
/// invariance) with `$features` enabled.
///
/// # Safety (of every function it defines)
/// The CPU must have `$features`; `w` must hold `acts[r].len()` superblocks for every row.
macro_rules! rows_kernel {
    ($name:ident, $features:literal, $body:ident, $rows:literal) => {
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name(w: &[u8], acts: [&[Q8KBlock]; $rows]) -> [f32; $rows] {
            $body::<$rows>(w, acts)
        }
    };
}

// 4 and 8 rows of Q6_K: each weight superblock's codes and scales unpacked once for every
// row. With AVX-512 two 32-code groups share a 512-bit register, and their i32 lanes are
// folded into the 8 lanes the one-row kernel keeps (exact integers) before the float part.
rows_kernel!(dot_q6k_q8k_4, "avx2,fma,f16c", q6k_rows, 4);
rows_kernel!(dot_q6k_q8k_8, "avx2,fma,f16c", q6k_rows_two_fours, 8);
rows_kernel!(dot_q6k_q8k_4_vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni", q6k_rows_512, 4);
rows_kernel!(dot_q6k_q8k_8_vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni", q6k_rows_512, 8);


/// The 32 six-bit codes of group `g` (0..4) of a Q6_K half-superblock: four low bits from
/// `ql` (`lo_a` for groups 0 and 2, `lo_b` for 1 and 3; low nibbles for 0 and 1), two high
/// bits from `qh` (bits 2g and 2g+1 of each byte, moved to bits 4 and 5).
#[inline(always)]
unsafe fn q6k_group_codes(lo_a: __m256i, lo_b: __m256i, hi: __m256i, g: usize) -> __m256i {
    let low4 = _mm256_set1_epi8(0x0F);
    let lo = if g % 2 == 0 { lo_a } else { lo_b };
    let lo = if g < 2 { lo } else { _mm256_srli_epi16(lo, 4) };
    let bits = _mm256_and_si256(hi, _mm256_set1_epi8((3u8 << (2 * g)) as i8));
    let hi_bits = match g {
        0 => _mm256_slli_epi16(bits, 4),
        1 => _mm256_slli_epi16(bits, 2),
        2 => bits,
        _ => _mm256_srli_epi16(bits, 2),
    };
    _mm256_or_si256(_mm256_and_si256(lo, low4), hi_bits)
}

/// Q6_K for `R` rows: the superblock loop and its float part (the one-row kernel's order),
/// around `S::sums`, which gives each row's 8 i32 lanes of `Σ scale · code · x` for superblock
/// `b` (lane `L`: codes `4L..4L+3` of every 32-code group) from its `ql`, `qh` and scales.
#[inline(always)]
unsafe fn q6k_rows_with<S: Q6KSums, const R: usize>(w: &[u8], acts: [&[Q8KBlock]; R]) -> [f32; R] {
    let n_blocks = acts[0].len();
    debug_assert!(acts.iter().all(|a| a.len() == n_blocks));
    debug_assert_eq!(w.len(), n_blocks * Q6K_BLOCK_BYTES);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..n_blocks {
        let p = w.as_ptr().add(b * Q6K_BLOCK_BYTES);
        prefetch_ahead(p);
        let d_w = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(read_u16(p.add(208)) as i32)));
        let scales = _mm_loadu_si128(p.add(192) as *const __m128i);
        let sum = S::sums(p, p.add(128), scales, acts, b);
        let wide_scales = _mm256_cvtepi8_epi16(scales);
        for r in 0..R {
            let x = &acts[r][b];
            // 32 · Σ_k bsums[k] · scale[k], paired into the 8 lanes (the codes are stored +32).
            let bsums = _mm256_loadu_si256(x.bsums.as_ptr() as *const __m256i);
            let offset = _mm256_slli_epi32(_mm256_madd_epi16(bsums, wide_scales), 5);
            let total = _mm256_sub_epi32(sum[r], offset);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(x.d * d_w), _mm256_cvtepi32_ps(total), acc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(acc[r]);
    }
    out
}

/// The 16 i16 scales of Q6_K group `g` of half `half`: codes 0..16 and 16..32 of the group
/// take scales `8·half + 2g` and `+1`.
#[inline(always)]
unsafe fn q6k_group_scales(scales: __m128i, half: usize, g: usize) -> __m128i {
    let s = (8 * half + 2 * g) as i8;
    _mm_shuffle_epi8(scales, _mm_setr_epi8(s, s, s, s, s, s, s, s, s + 1, s + 1, s + 1, s + 1, s + 1, s + 1, s + 1, s + 1))
}

/// How a Q6_K superblock's integer sums are made (AVX2 or AVX-512): a trait rather than a
/// closure, because a closure does not inherit its caller's `#[target_feature]`s and its
/// intrinsics would then be calls (30× slower prefill when that happened).
trait Q6KSums {
    /// Each row's 8 i32 lanes of `Σ scale · code · x` for superblock `b` (`ql`, `qh` and the
    /// 16 scales given).
    unsafe fn sums<const R: usize>(ql: *const u8, qh: *const u8, scales: __m128i, acts: [&[Q8KBlock]; R], b: usize) -> [__m256i; R];
}

struct Q6KAvx2;
impl Q6KSums for Q6KAvx2 {
    #[inline(always)]
    unsafe fn sums<const R: usize>(ql: *const u8, qh: *const u8, scales: __m128i, acts: [&[Q8KBlock]; R], b: usize) -> [__m256i; R] {
        let mut sum = [_mm256_setzero_si256(); R];
        for half in 0..2 {
            let lo_a = _mm256_loadu_si256(ql.add(64 * half) as *const __m256i);
            let lo_b = _mm256_loadu_si256(ql.add(64 * half + 32) as *const __m256i);
            let hi = _mm256_loadu_si256(qh.add(32 * half) as *const __m256i);
            for g in 0..4 {
                let codes = q6k_group_codes(lo_a, lo_b, hi, g);
                let group_scales = _mm256_cvtepi8_epi16(q6k_group_scales(scales, half, g));
                for r in 0..R {
                    let xq = _mm256_loadu_si256(acts[r][b].qs.as_ptr().add(128 * half + 32 * g) as *const __m256i);
                    let pairs = _mm256_maddubs_epi16(codes, xq);
                    sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(group_scales, pairs));
                }
            }
        }
        sum
    }
}

#[inline(always)]
unsafe fn q6k_rows<const R: usize>(w: &[u8], acts: [&[Q8KBlock]; R]) -> [f32; R] {
    q6k_rows_with::<Q6KAvx2, R>(w, acts)
}

/// [`Q6KAvx2`] with two 32-code groups per 512-bit register (their activations are 64
/// contiguous bytes), `vpmaddubsw` then `vpdpwssd` with the scales; the two groups' i32 lanes
/// are folded into the one-row kernel's 8 (exact integers).
struct Q6KAvx512;
impl Q6KSums for Q6KAvx512 {
    #[inline(always)]
    unsafe fn sums<const R: usize>(ql: *const u8, qh: *const u8, scales: __m128i, acts: [&[Q8KBlock]; R], b: usize) -> [__m256i; R] {
        let mut sum = [_mm512_setzero_si512(); R];
        for half in 0..2 {
            let lo_a = _mm256_loadu_si256(ql.add(64 * half) as *const __m256i);
            let lo_b = _mm256_loadu_si256(ql.add(64 * half + 32) as *const __m256i);
            let hi = _mm256_loadu_si256(qh.add(32 * half) as *const __m256i);
            for two in 0..2 {
                let (g0, g1) = (2 * two, 2 * two + 1);
                let codes = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q6k_group_codes(lo_a, lo_b, hi, g0)), q6k_group_codes(lo_a, lo_b, hi, g1));
                let picked = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(q6k_group_scales(scales, half, g0)), q6k_group_scales(scales, half, g1));
                let group_scales = _mm512_cvtepi8_epi16(picked);
                for r in 0..R {
                    let xq = _mm512_loadu_si512(acts[r][b].qs.as_ptr().add(128 * half + 64 * two) as *const _);
                    sum[r] = _mm512_dpwssd_epi32(sum[r], _mm512_maddubs_epi16(codes, xq), group_scales);
                }
            }
        }
        fold_512(&sum)
    }
}

#[inline(always)]
unsafe fn q6k_rows_512<const R: usize>(w: &[u8], acts: [&[Q8KBlock]; R]) -> [f32; R] {
    q6k_rows_with::<Q6KAvx512, R>(w, acts)
}

/// Each 512-bit vector's two 256-bit halves added (exact for integers).
#[inline(always)]
unsafe fn fold_512<const R: usize>(sum: &[__m512i; R]) -> [__m256i; R] {
    let mut out = [_mm256_setzero_si256(); R];
    for r in 0..R {
        out[r] = _mm256_add_epi32(_mm512_castsi512_si256(sum[r]), _mm512_extracti64x4_epi64::<1>(sum[r]));
    }
    out
}


// ---------------------------------------------------------------------------------------------
// Q4_K · Q8_K, in llama.cpp's summation order

/// Bytes of one Q4_K superblock (ggml `block_q4_K`: `d`, `dmin` as f16, `scales[12]` packing
/// eight 6-bit scales and mins, `qs[128]`).
const Q4K_BLOCK_BYTES: usize = 144;

/// The eight 6-bit scales (bytes 0..8) and mins (bytes 8..16) of a Q4_K superblock, unpacked
/// from its 12 bytes four at a time: the layout `get_scale_min_k4` reads one by one.
#[inline(always)]
fn q4k_scales_mins(packed: &[u8]) -> [u8; 16] {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let word = |i: usize| u32::from_le_bytes([packed[4 * i], packed[4 * i + 1], packed[4 * i + 2], packed[4 * i + 3]]);
    let (w0, w1, w2) = (word(0), word(1), word(2));
    let scales_lo = w0 & LOW6;
    let scales_hi = (w2 & LOW4) | (((w0 >> 6) & LOW2) << 4);
    let mins_lo = w1 & LOW6;
    let mins_hi = ((w2 >> 4) & LOW4) | (((w1 >> 6) & LOW2) << 4);
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&scales_lo.to_le_bytes());
    out[4..8].copy_from_slice(&scales_hi.to_le_bytes());
    out[8..12].copy_from_slice(&mins_lo.to_le_bytes());
    out[12..16].copy_from_slice(&mins_hi.to_le_bytes());
    out
}

/// One Q4_K weight row against one Q8_K activation row, summed as llama.cpp sums it on AVX2
/// machines, where it repacks Q4_K weights (`q4_K_8x8`, `ggml_gemv_q4_K_8x8_q8_K`): per
/// superblock the exact integers `S = Σ_sub scale·Σ q·x` and `M = Σ_sub min·Σ x`, then two
/// f32 chains, `acc = fma(S, d·d_x, acc)` and `acc_min = fma(M, dmin·d_x, acc_min)`, and the
/// result `acc − acc_min`. (llama.cpp's non-repacked `ggml_vec_dot_q4_K_q8_K`, and candle's
/// dot, split the sums over lanes instead: the same total, other roundings.)
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` must hold `act.len()` superblocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4k_q8k(w: &[u8], act: &[Q8KBlock]) -> f32 {
    q4k_rows::<1>(w, [act])[0]
}

// 4 and 8 rows of Q4_K: each weight superblock's nibbles, scales and mins unpacked once for
// every row; with AVX-512 a sub-block pair's 64 codes sit in one register against the pair's
// 64 activations. The per-superblock integer totals are exact whatever the lanes.
rows_kernel!(dot_q4k_q8k_4, "avx2,fma,f16c", q4k_rows, 4);
rows_kernel!(dot_q4k_q8k_8, "avx2,fma,f16c", q4k_rows_two_fours, 8);
rows_kernel!(dot_q4k_q8k_4_vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni", q4k_rows_512, 4);
rows_kernel!(dot_q4k_q8k_8_vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni", q4k_rows_512, 8);

/// 8 rows as two groups of 4 (AVX2's 16 registers hold 4 rows' accumulators).
#[inline(always)]
unsafe fn q4k_rows_two_fours<const R: usize>(w: &[u8], acts: [&[Q8KBlock]; R]) -> [f32; R] {
    let mut out = [0f32; R];
    for g in 0..R / 4 {
        let four = [acts[4 * g], acts[4 * g + 1], acts[4 * g + 2], acts[4 * g + 3]];
        out[4 * g..4 * g + 4].copy_from_slice(&q4k_rows::<4>(w, four));
    }
    out
}

/// See [`q4k_rows_two_fours`].
#[inline(always)]
unsafe fn q6k_rows_two_fours<const R: usize>(w: &[u8], acts: [&[Q8KBlock]; R]) -> [f32; R] {
    let mut out = [0f32; R];
    for g in 0..R / 4 {
        let four = [acts[4 * g], acts[4 * g + 1], acts[4 * g + 2], acts[4 * g + 3]];
        out[4 * g..4 * g + 4].copy_from_slice(&q6k_rows::<4>(w, four));
    }
    out
}

/// Q4_K for `R` rows: the superblock loop, its scales and mins, and its float part (the
/// one-row kernel's order), around `S::sums`, which gives each row's i32 lanes of
/// `Σ scale · code · x` for superblock `b` (any lanes: only their total is used) from its
/// `qs` and unpacked scales.
#[inline(always)]
unsafe fn q4k_rows_with<S: Q4KSums, const R: usize>(w: &[u8], acts: [&[Q8KBlock]; R]) -> [f32; R] {
    let n_blocks = acts[0].len();
    debug_assert!(acts.iter().all(|a| a.len() == n_blocks));
    debug_assert_eq!(w.len(), n_blocks * Q4K_BLOCK_BYTES);
    let (mut acc, mut acc_min) = ([0f32; R], [0f32; R]);
    for b in 0..n_blocks {
        let block = w.as_ptr().add(b * Q4K_BLOCK_BYTES);
        prefetch_ahead(block);
        // [d, dmin] from the two f16 at the block's start.
        let d_dmin = _mm_cvtph_ps(_mm_cvtsi32_si128(read_u32(block) as i32));
        let (d, dmin) = (_mm_cvtss_f32(d_dmin), _mm_cvtss_f32(_mm_movehdup_ps(d_dmin)));
        let sm = q4k_scales_mins(std::slice::from_raw_parts(block.add(4), 12));
        let sum = S::sums(block.add(16), &sm, acts, b);
        if R == 1 {
            let mins = _mm_cvtepu8_epi16(_mm_loadl_epi64(sm.as_ptr().add(8) as *const __m128i));
            let x = &acts[0][b];
            // Σ_sub min · (sum of the sub-block's 32 activations): the 16-value sums paired.
            let bsums = _mm256_loadu_si256(x.bsums.as_ptr() as *const __m256i);
            let sub_sums = _mm_hadd_epi16(_mm256_castsi256_si128(bsums), _mm256_extracti128_si256::<1>(bsums));
            let m4 = _mm_madd_epi16(sub_sums, mins);
            // The integer totals (exact in any order), then one rounding to f32 each, as
            // llama.cpp's `_mm256_cvtepi32_ps` does.
            let s128 = _mm_add_epi32(_mm256_castsi256_si128(sum[0]), _mm256_extracti128_si256::<1>(sum[0]));
            let both = _mm_hadd_epi32(s128, m4); // [s0+s1, s2+s3, m0+m1, m2+m3]
            let both = _mm_hadd_epi32(both, both); // [S, M, S, M]
            let total = _mm_cvtsi128_si32(both);
            let mins_total = _mm_extract_epi32::<1>(both);
            acc[0] = (total as f32).mul_add(d * x.d, acc[0]);
            acc_min[0] = (mins_total as f32).mul_add(dmin * x.d, acc_min[0]);
        } else {
            q4k_superblock_floats(&sum, &sm, acts, b, d, dmin, &mut acc, &mut acc_min);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = acc[r] - acc_min[r];
    }
    out
}

/// How a Q4_K superblock's integer sums are made (AVX2 or AVX-512); a trait, not a closure,
/// for the reason given at [`Q6KSums`].
trait Q4KSums {
    /// Each row's i32 lanes of `Σ scale · code · x` for superblock `b` (`qs` and the unpacked
    /// scales given); only their total is used.
    unsafe fn sums<const R: usize>(qs: *const u8, sm: &[u8; 16], acts: [&[Q8KBlock]; R], b: usize) -> [__m256i; R];
}

struct Q4KAvx2;
impl Q4KSums for Q4KAvx2 {
    #[inline(always)]
    unsafe fn sums<const R: usize>(qs: *const u8, sm: &[u8; 16], acts: [&[Q8KBlock]; R], b: usize) -> [__m256i; R] {
        let low4 = _mm256_set1_epi8(0x0F);
        let mut sum = [_mm256_setzero_si256(); R];
        for pair in 0..4 {
            let q = _mm256_loadu_si256(qs.add(32 * pair) as *const __m256i);
            let lo = _mm256_and_si256(q, low4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
            let (s_lo, s_hi) = (_mm256_set1_epi16(sm[2 * pair] as i16), _mm256_set1_epi16(sm[2 * pair + 1] as i16));
            for r in 0..R {
                let x = &acts[r][b];
                let x_lo = _mm256_loadu_si256(x.qs.as_ptr().add(64 * pair) as *const __m256i);
                let x_hi = _mm256_loadu_si256(x.qs.as_ptr().add(64 * pair + 32) as *const __m256i);
                let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x_lo), s_lo);
                let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x_hi), s_hi);
                sum[r] = _mm256_add_epi32(sum[r], _mm256_add_epi32(p_lo, p_hi));
            }
        }
        sum
    }
}

/// [`Q4KAvx2`] with a sub-block pair's 64 codes (`[low nibbles | high nibbles]`, as the
/// activations lie) in one 512-bit register, `vpmaddubsw` then `vpdpwssd` with the two scales.
struct Q4KAvx512;
impl Q4KSums for Q4KAvx512 {
    #[inline(always)]
    unsafe fn sums<const R: usize>(qs: *const u8, sm: &[u8; 16], acts: [&[Q8KBlock]; R], b: usize) -> [__m256i; R] {
        let low4 = _mm512_set1_epi8(0x0F);
        let mut sum = [_mm512_setzero_si512(); R];
        for pair in 0..4 {
            let q = _mm256_loadu_si256(qs.add(32 * pair) as *const __m256i);
            let codes = _mm512_and_si512(_mm512_inserti64x4::<1>(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 4)), low4);
            let scales = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_set1_epi16(sm[2 * pair] as i16)),
                _mm256_set1_epi16(sm[2 * pair + 1] as i16),
            );
            for r in 0..R {
                let x = _mm512_loadu_si512(acts[r][b].qs.as_ptr().add(64 * pair) as *const _);
                sum[r] = _mm512_dpwssd_epi32(sum[r], _mm512_maddubs_epi16(codes, x), scales);
            }
        }
        fold_512(&sum)
    }
}

#[inline(always)]
unsafe fn q4k_rows<const R: usize>(w: &[u8], acts: [&[Q8KBlock]; R]) -> [f32; R] {
    q4k_rows_with::<Q4KAvx2, R>(w, acts)
}

#[inline(always)]
unsafe fn q4k_rows_512<const R: usize>(w: &[u8], acts: [&[Q8KBlock]; R]) -> [f32; R] {
    q4k_rows_with::<Q4KAvx512, R>(w, acts)
}

/// The end of one Q4_K superblock for `R` (4 or 8) rows: each row's integer total `S` (the
/// lanes of `sum[r]`) and `M = Σ_sub min · (sub-block's activation sum)`, reduced for all
/// rows at once by one tree of horizontal adds (exact integers: any order), then each row's
/// two f32 chains exactly as the one-row kernel advances them.
#[inline(always)]
unsafe fn q4k_superblock_floats<const R: usize>(
    sum: &[__m256i; R],
    sm: &[u8; 16],
    acts: [&[Q8KBlock]; R],
    b: usize,
    d: f32,
    dmin: f32,
    acc: &mut [f32; R],
    acc_min: &mut [f32; R],
) {
    // Each min twice, for the two 16-value sums (`bsums`) of its 32-value sub-block.
    let dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    let mins = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(_mm_loadl_epi64(sm.as_ptr().add(8) as *const __m128i), dup));
    let mut m = [_mm256_setzero_si256(); R];
    for r in 0..R {
        m[r] = _mm256_madd_epi16(_mm256_loadu_si256(acts[r][b].bsums.as_ptr() as *const __m256i), mins);
    }
    let (totals, mins_totals) = (lane_totals(sum), lane_totals(&m));
    for r in 0..R {
        let x_d = acts[r][b].d;
        acc[r] = (totals[r] as f32).mul_add(d * x_d, acc[r]);
        acc_min[r] = (mins_totals[r] as f32).mul_add(dmin * x_d, acc_min[r]);
    }
}

/// `[a, b, c, e]`'s sums of their low halves' lanes, then of their high halves'.
#[inline(always)]
unsafe fn quad(a: __m256i, b: __m256i, c: __m256i, e: __m256i) -> __m256i {
    _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, e))
}

/// The sum of each vector's eight i32 lanes, for 4 or 8 vectors: `vphaddd` pairs them up (a
/// tree, exact for integers), then the two 128-bit halves are added.
#[inline(always)]
unsafe fn lane_totals<const R: usize>(v: &[__m256i; R]) -> [i32; R] {
    let mut out = [0i32; R];
    if R == 4 {
        let q = quad(v[0], v[1], v[2], v[3]);
        let t = _mm_add_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
        _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, t);
    } else if R == 8 {
        let (lo, hi) = (quad(v[0], v[1], v[2], v[3]), quad(v[4], v[5], v[6], v[7]));
        let t = _mm256_add_epi32(_mm256_permute2x128_si256::<0x20>(lo, hi), _mm256_permute2x128_si256::<0x31>(lo, hi));
        _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, t);
    } else {
        for r in 0..R {
            let h = _mm_add_epi32(_mm256_castsi256_si128(v[r]), _mm256_extracti128_si256::<1>(v[r]));
            let h = _mm_hadd_epi32(h, h);
            out[r] = _mm_cvtsi128_si32(_mm_hadd_epi32(h, h));
        }
    }
    out
}


