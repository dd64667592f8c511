//! Quantizing the activation rows once per matmul, into the weight type's "vec-dot type"
//! (ggml's `vec_dot_type`): 8-bit blocks of 32 for the legacy types, candle's `BlockQ8K`
//! (256 values with 16-value partial sums) for the K-quants.
//!
//! The 32-value blocks follow ggml's `block_q8_1` (`d = amax / 127`, `q = round(x / d)`,
//! `s = d * sum(q)`), but the scratch is laid out for the kernels rather than for a file: the
//! codes of each block sit in their own 32-byte-aligned slot (so a 256-bit load never splits a
//! cache line) and `[d, s]` are kept apart as `f32` values rounded to f16, exactly the values
//! ggml's f16 fields hold. Q8_0 weights ignore `s`; the unsigned-code types need it for their
//! offset term.
//!
//! Rounding is round-half-to-even with `id = 127 / amax`, as ggml's AVX2 `quantize_row_q8_1`
//! does, in both the scalar and the SIMD path, so the two produce identical bytes.

use super::blocks::QK;
use super::Isa;
use candle_core::quantized::k_quants::BlockQ8K;
use candle_core::quantized::GgmlType;

/// The codes of one 32-value activation block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(32))]
pub(crate) struct Codes32(pub(crate) [i8; QK]);

/// Quantized activation rows for the legacy kernels: row `r`'s block `b` is at `r * nb + b`.
#[derive(Default)]
pub(crate) struct Q8Rows {
    pub(crate) codes: Vec<Codes32>,
    /// `[d, s]` per block: the scale and `d * sum(codes)`.
    pub(crate) scales: Vec<[f32; 2]>,
    /// Blocks per row.
    pub(crate) nb: usize,
    /// `d` and `s` again, transposed (`[b * n_rows + r]`) so a tile's rows load as one vector,
    /// with `TRANSPOSED_PADDING` zeros after the last block for loads past the last row.
    pub(crate) d_t: Vec<f32>,
    pub(crate) s_t: Vec<f32>,
}

/// Lanes a tile kernel may load past the last activation row of a block (one 8-lane vector).
pub(crate) const TRANSPOSED_PADDING: usize = 8;

impl Q8Rows {
    /// Quantizes `n_rows` rows of `n_in` values (`n_in` a multiple of 32), reusing the buffers.
    pub(crate) fn quantize(&mut self, x: &[f32], n_rows: usize, n_in: usize, isa: Isa) {
        debug_assert_eq!(n_in % QK, 0);
        debug_assert_eq!(x.len(), n_rows * n_in);
        self.nb = n_in / QK;
        let n_blocks = n_rows * self.nb;
        // resize only grows the buffers; every used slot is overwritten below.
        if self.codes.len() < n_blocks {
            self.codes.resize(n_blocks, Codes32([0; QK]));
            self.scales.resize(n_blocks, [0.0; 2]);
        }
        let transposed_len = n_blocks + TRANSPOSED_PADDING;
        if self.d_t.len() < transposed_len {
            self.d_t.resize(transposed_len, 0.0);
            self.s_t.resize(transposed_len, 0.0);
        }
        let blocks = x.chunks_exact(QK);
        let slots = self.codes[..n_blocks]
            .iter_mut()
            .zip(&mut self.scales[..n_blocks]);
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2 {
            for (values, (codes, scale)) in blocks.zip(slots) {
                // SAFETY: Isa::Avx2 and above are only handed out when AVX2, FMA and F16C are
                // present (Isa::detect / Isa::clamp), and `values` holds 32 floats.
                *scale = unsafe { super::x86::quantize_block_avx2(values, &mut codes.0) };
            }
        } else {
            for (values, (codes, scale)) in blocks.zip(slots) {
                *scale = quantize_block_scalar(values, &mut codes.0);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = isa;
            for (values, (codes, scale)) in blocks.zip(slots) {
                *scale = quantize_block_scalar(values, &mut codes.0);
            }
        }
        for (i, scale) in self.scales[..n_blocks].iter_mut().enumerate() {
            // ggml stores `d` and `s` as f16 (block_q8_0 / block_q8_1) and the dot products
            // read them back: round the same way, or every block's scale is off by up to
            // 2^-11 relative, enough to move llama.cpp-comparable log-probabilities by 0.1.
            let [d, s] = scale.map(|v| half::f16::from_f32(v).to_f32());
            *scale = [d, s];
            let (r, b) = (i / self.nb, i % self.nb);
            self.d_t[b * n_rows + r] = d;
            self.s_t[b * n_rows + r] = s;
        }
        self.d_t[n_blocks..transposed_len].fill(0.0);
        self.s_t[n_blocks..transposed_len].fill(0.0);
    }
}

/// ggml `quantize_row_q8_1` for one block, returning `[d, s]`.
pub(crate) fn quantize_block_scalar(values: &[f32], codes: &mut [i8; QK]) -> [f32; 2] {
    let amax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (code, &v) in codes.iter_mut().zip(values) {
        let q = (v * id).round_ties_even() as i32;
        *code = q as i8;
        sum += q;
    }
    [d, d * sum as f32]
}

/// Quantized activation rows for the K-quants: row `r`'s superblock `b` at `r * nb + b`.
#[derive(Default)]
pub(crate) struct Q8KRows {
    pub(crate) blocks: Vec<BlockQ8K>,
    pub(crate) nb: usize,
}

impl Q8KRows {
    /// Quantizes `n_rows` rows of `n_in` values (`n_in` a multiple of 256) with candle's
    /// `quantize_row_q8_K`.
    pub(crate) fn quantize(&mut self, x: &[f32], n_rows: usize, n_in: usize) {
        let qk_k = candle_core::quantized::k_quants::QK_K;
        debug_assert_eq!(n_in % qk_k, 0);
        self.nb = n_in / qk_k;
        let n_blocks = n_rows * self.nb;
        if self.blocks.len() < n_blocks {
            self.blocks.resize(n_blocks, BlockQ8K::zeros());
        }
        for (row, blocks) in x
            .chunks_exact(n_in)
            .zip(self.blocks.chunks_exact_mut(self.nb))
        {
            BlockQ8K::from_float(row, blocks);
        }
    }
}

/// The per-thread activation scratch, reused across calls so the hot path allocates only when
/// a call needs more rows than any before it on this thread.
#[derive(Default)]
pub(crate) struct Scratch {
    pub(crate) q8: Q8Rows,
    pub(crate) q8k: Q8KRows,
}

impl Scratch {
    /// Heap bytes held.
    pub(crate) fn bytes(&self) -> usize {
        use std::mem::size_of;
        self.q8.codes.capacity() * size_of::<Codes32>()
            + self.q8.scales.capacity() * size_of::<[f32; 2]>()
            + (self.q8.d_t.capacity() + self.q8.s_t.capacity()) * size_of::<f32>()
            + self.q8k.blocks.capacity() * size_of::<BlockQ8K>()
    }
}
