//! Quantizing the activation rows once per matmul, into the weight type's "vec-dot type"
//! (ggml's `vec_dot_type`): 8-bit blocks of 32 for the legacy types, `Q8KBlock` (ggml's
//! `block_q8_K`: 256 values with 16-value partial sums, laid out as candle's `BlockQ8K`) for
//! the K-quants.
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

/// Values per K-quant superblock (ggml `QK_K`).
pub(crate) const QK_K: usize = 256;

/// ggml's `block_q8_K`: 256 codes, their scale as f32, and the sums of each 16 codes. Laid
/// out as candle's `BlockQ8K` (`repr(C)`, asserted below), so candle's K-quant dots read it.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct Q8KBlock {
    pub(crate) d: f32,
    pub(crate) qs: [i8; QK_K],
    pub(crate) bsums: [i16; QK_K / 16],
}

const _: () = assert!(
    std::mem::size_of::<Q8KBlock>() == std::mem::size_of::<BlockQ8K>()
        && std::mem::align_of::<Q8KBlock>() == std::mem::align_of::<BlockQ8K>()
);

impl Q8KBlock {
    const ZERO: Self = Self { d: 0.0, qs: [0; QK_K], bsums: [0; QK_K / 16] };

    /// ggml's `quantize_row_q8_K_ref`: the scale from the value of largest magnitude (the
    /// first one, with its sign), `q = nearest(x · -127/max)` capped at 127, `d = 1/iscale`.
    /// `nearest` is ggml's `nearest_int` (add 1.5·2²³, keep the low mantissa bits): the
    /// product rounded to f32, then to an integer half to even. (ggml-quants.c is built into
    /// ggml-base without FMA flags, so the product and the add are not fused there; candle's
    /// `from_float` rounds halves away from zero instead, so its codes can differ.)
    fn quantize(values: &[f32]) -> Self {
        let (mut amax, mut max) = (0f32, 0f32);
        for &x in values {
            if x.abs() > amax {
                amax = x.abs();
                max = x;
            }
        }
        if amax == 0.0 {
            return Self::ZERO;
        }
        let iscale = -127.0 / max;
        let mut block = Self::ZERO;
        for (q, &x) in block.qs.iter_mut().zip(values) {
            *q = ((iscale * x).round_ties_even() as i32).min(127) as i8;
        }
        for (sum, codes) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
            *sum = codes.iter().map(|&q| q as i16).sum();
        }
        block.d = 1.0 / iscale;
        block
    }
}

/// Quantized activation rows for the K-quants: row `r`'s superblock `b` at `r * nb + b`.
#[derive(Default)]
pub(crate) struct Q8KRows {
    pub(crate) blocks: Vec<Q8KBlock>,
    pub(crate) nb: usize,
}

impl Q8KRows {
    /// Quantizes `n_rows` rows of `n_in` values (`n_in` a multiple of 256) as ggml's
    /// `quantize_row_q8_K` does.
    pub(crate) fn quantize(&mut self, x: &[f32], n_rows: usize, n_in: usize) {
        debug_assert_eq!(n_in % QK_K, 0);
        self.nb = n_in / QK_K;
        let n_blocks = n_rows * self.nb;
        if self.blocks.len() < n_blocks {
            self.blocks.resize(n_blocks, Q8KBlock::ZERO);
        }
        for (row, blocks) in x.chunks_exact(n_in).zip(self.blocks.chunks_exact_mut(self.nb)) {
            for (block, values) in blocks.iter_mut().zip(row.chunks_exact(QK_K)) {
                *block = Q8KBlock::quantize(values);
            }
        }
    }

}

/// `blocks` as candle's type, for its K-quant dots.
pub(crate) fn as_candle(blocks: &[Q8KBlock]) -> &[BlockQ8K] {
    // SAFETY: same size, alignment and field layout (both `repr(C)`, asserted above), and
    // every bit pattern is a valid f32/i8/i16.
    unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const BlockQ8K, blocks.len()) }
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
            + self.q8k.blocks.capacity() * size_of::<Q8KBlock>()
    }
}
