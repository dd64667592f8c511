//! Portable kernels: the fallback for CPUs without AVX2/FMA/F16C (and for other
//! architectures), and the reference the SIMD kernels are tested against. They compute the
//! same integer block dots as the SIMD code (ggml's `ggml_vec_dot_*_generic`), so the two
//! differ only in the order of the f32 additions.

use super::activations::Codes32;
use super::blocks::{decode_signed, decode_unsigned, Legacy, QK};
use super::{FloatArgs, LegacyArgs};

/// Activation rows handled together, so each weight block is decoded once per this many rows.
const ROW_TILE: usize = 4;

#[inline(always)]
fn dot_unsigned(codes: &[u8; QK], x: &Codes32) -> i32 {
    codes
        .iter()
        .zip(&x.0)
        .map(|(&u, &q)| u as i32 * q as i32)
        .sum()
}

#[inline(always)]
fn dot_signed(codes: &[i8; QK], x: &Codes32) -> i32 {
    codes
        .iter()
        .zip(&x.0)
        .map(|(&w, &q)| w as i32 * q as i32)
        .sum()
}

/// Output columns `[o_start, o_end)` for all activation rows.
///
/// # Safety
/// `a` must describe live buffers of the sizes it claims, and no other thread may write the
/// output columns `[o_start, o_end)` meanwhile.
pub(crate) unsafe fn legacy_range(format: Legacy, a: &LegacyArgs, o_start: usize, o_end: usize) {
    let block_bytes = format.block_bytes();
    let codes = std::slice::from_raw_parts(a.codes, a.n_rows * a.nb);
    let scales = std::slice::from_raw_parts(a.scales, a.n_rows * a.nb);
    let mut r0 = 0;
    while r0 < a.n_rows {
        let rt = ROW_TILE.min(a.n_rows - r0);
        for o in o_start..o_end {
            let row = std::slice::from_raw_parts(a.weights.add(o * a.row_bytes), a.row_bytes);
            let mut acc = [0f32; ROW_TILE];
            for (b, block) in row.chunks_exact(block_bytes).enumerate() {
                if matches!(format, Legacy::Q8_0 | Legacy::Q4_0 | Legacy::Q5_0) {
                    let mut w = [0i8; QK];
                    let d = decode_signed(format, block, &mut w);
                    for (r, acc) in acc.iter_mut().enumerate().take(rt) {
                        let i = (r0 + r) * a.nb + b;
                        *acc += dot_signed(&w, &codes[i]) as f32 * (d * scales[i][0]);
                    }
                } else {
                    let mut w = [0u8; QK];
                    let (d, m) = decode_unsigned(format, block, &mut w);
                    for (r, acc) in acc.iter_mut().enumerate().take(rt) {
                        let i = (r0 + r) * a.nb + b;
                        let [dx, s] = scales[i];
                        *acc += dot_unsigned(&w, &codes[i]) as f32 * (d * dx) + m * s;
                    }
                }
            }
            for (r, &acc) in acc.iter().enumerate().take(rt) {
                *a.out.add((r0 + r) * a.n_out + o) = acc;
            }
        }
        r0 += rt;
    }
}

/// How F32, F16 and BF16 weights become f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FloatKind {
    F32,
    F16,
    BF16,
}

impl FloatKind {
    #[inline(always)]
    pub(crate) fn load(self, bytes: &[u8], i: usize) -> f32 {
        match self {
            FloatKind::F32 => f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()),
            FloatKind::F16 => half::f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32(),
            FloatKind::BF16 => half::bf16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32(),
        }
    }
}

/// Output columns `[o_start, o_end)` for all activation rows, F32/F16/BF16 weights.
///
/// # Safety
/// As for [`legacy_range`].
pub(crate) unsafe fn float_range(kind: FloatKind, a: &FloatArgs, o_start: usize, o_end: usize) {
    let x = std::slice::from_raw_parts(a.x, a.n_rows * a.n_in);
    let mut w = vec![0f32; a.n_in];
    for o in o_start..o_end {
        let row = std::slice::from_raw_parts(a.weights.add(o * a.row_bytes), a.row_bytes);
        for (i, w) in w.iter_mut().enumerate() {
            *w = kind.load(row, i);
        }
        for (r, x) in x.chunks_exact(a.n_in).enumerate() {
            *a.out.add(r * a.n_out + o) = w.iter().zip(x).map(|(w, x)| w * x).sum();
        }
    }
}
