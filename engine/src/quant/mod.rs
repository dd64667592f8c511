//! Weight matrices kept in their GGUF block format, and the CPU matmul over them.
//!
//! A [`QMatrix`] owns one weight tensor's raw bytes exactly as the GGUF file stores them
//! (`n_out` rows of `n_in` values, each row a run of ggml blocks) and computes
//! `out = x · Wᵀ` for a batch of f32 activation rows. It follows llama.cpp's CPU path
//! (`ggml_compute_forward_mul_mat` in ggml-cpu):
//!
//! 1. the activation rows are quantized once per call into the weight type's "vec-dot type"
//!    (8-bit blocks of 32 with `d` and `s = d·Σq` for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, ggml's
//!    `block_q8_K` for the K-quants, quantized as `quantize_row_q8_K_ref`; F32/F16/BF16
//!    weights use the activations as they are),
//!    into a per-thread scratch that is reused across calls (`activations`);
//! 2. the output columns (`n_out`) are split into chunks over the [`ComputePool`]'s threads,
//!    unless the matmul is too small for that to pay;
//! 3. each chunk runs integer block dot products: our own AVX2 / AVX-512-VNNI kernels (`x86`)
//!    for the 32-value types and floats and for Q4_K and Q6_K (`x86::dot_q4k_q8k`, llama.cpp's
//!    repacked one-row order; `x86::dot_q6k_q8k`, its lane order), candle's
//!    `GgmlType::vec_dot` (which has its own AVX2 code) for the other K-quants, and the
//!    portable `scalar` kernels where the CPU has no AVX2.
//!    For a few activation rows (decode) the SIMD kernels stream the weights row after row at
//!    close to memory bandwidth; for many (prefill) they reuse each unpacked weight block for
//!    a tile of up to 8 rows (Q4_K/Q6_K: groups of 8 and 4 rows, `matmul_k_rows`), which
//!    makes prefill compute-bound. Every row is computed with the one-row arithmetic whatever
//!    its group (batch invariance; `tests::each_row_is_independent_of_the_batch`).
//!
//! The kernel family is picked at run time ([`Isa::detect`]), so one binary runs on any
//! x86-64 (and, through the scalar kernels, anywhere else).
//!
//! **Invariant:** a SIMD function is only called with an [`Isa`] that [`Isa::detect`]
//! returned on this CPU (every entry point clamps the requested one), which is what makes the
//! `unsafe` calls into `#[target_feature]` code sound.

mod activations;
pub mod dtype;
mod blocks;
mod scalar;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

use crate::error::EngineError;
use crate::threads::ComputePool;
use activations::{Codes32, Scratch};
use blocks::{Legacy, QK};
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K,
};
use candle_core::quantized::GgmlType;
use scalar::FloatKind;
use std::cell::RefCell;
use std::sync::OnceLock;

pub use candle_core::quantized::GgmlDType;

/// Output columns per parallel task are rounded up to a multiple of this, so a task never
/// splits a micro-kernel tile (4 columns) and neighbouring tasks rarely share a cache line of
/// the output.
const COLUMN_CHUNK_ALIGN: usize = 16;
/// Tasks per pool thread: a few more tasks than threads lets rayon even out a thread that
/// another process is holding up, without making tasks so small that their overhead shows.
pub(crate) const TASKS_PER_THREAD: usize = 4;
/// Least work per task, in weight bytes × activation rows (about 10 µs of decode): handing a
/// task to another thread costs microseconds, so a decode matmul over a small matrix (SmolLM2's
/// 576×192 is 69 KB) runs on the caller alone.
/// (Tests split even tiny matrices, to exercise the parallel path.)
const TASK_WORK_MIN: usize = if cfg!(test) { 1 } else { 128 * 1024 };
/// The per-thread activation scratch is freed after a call that grew it beyond this, so one
/// very long prompt does not pin its scratch for the life of the thread.
const SCRATCH_RETAIN_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Weight bytes per cache block: the output rows are walked in blocks of about this many
/// weight bytes, all activation rows against one block before the next, so that with many
/// activation rows the weights are re-read from L2 rather than from memory (Zen 4 and most
/// recent x86 cores have ≥ 1 MiB of L2 per core; this leaves room for the activations).
pub(crate) const WEIGHT_BLOCK_BYTES: usize = 256 * 1024;
/// Alignment the weight bytes are kept at: candle's K-quant blocks (read in place as
/// `&[BlockQ4K]` …) need 2; 8 costs nothing.
const WEIGHT_ALIGN: usize = 8;

/// A kernel family. [`Isa::detect`] picks the best one this CPU supports; tests and
/// benchmarks may ask for a lower one with [`QMatrix::matmul_with_isa`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable Rust, no SIMD intrinsics.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C (Haswell / Zen 1 and later).
    Avx2,
    /// AVX2 plus AVX-512 F/BW/VL and VNNI (Ice Lake, Zen 4 and later): `vpdpbusd` dots and 32
    /// vector registers for larger tiles.
    Avx512Vnni,
}

impl Isa {
    /// The best kernel family this CPU supports (detected once).
    pub fn detect() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            // `POTLUCK_ISA=scalar|avx2` caps the kernels, to rule them out when chasing a
            // numerical difference or to measure what SIMD buys.
            let cap = match std::env::var("POTLUCK_ISA").as_deref() {
                Ok("scalar") => Isa::Scalar,
                Ok("avx2") => Isa::Avx2,
                _ => Isa::Avx512Vnni,
            };
            Self::detect_hardware().min(cap)
        })
    }

    fn detect_hardware() -> Isa {
        {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx2") && has!("fma") && has!("f16c") {
                    if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni")
                    {
                        return Isa::Avx512Vnni;
                    }
                    return Isa::Avx2;
                }
            }
            Isa::Scalar
        }
    }

    /// `self`, or the best supported family below it if this CPU lacks it.
    fn clamp(self) -> Isa {
        self.min(Isa::detect())
    }
}

/// The kernels a dtype uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Float(FloatKind),
    Legacy(Legacy),
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl Format {
    fn of(dtype: GgmlDType) -> Option<Format> {
        Some(match dtype {
            GgmlDType::F32 => Format::Float(FloatKind::F32),
            GgmlDType::F16 => Format::Float(FloatKind::F16),
            GgmlDType::BF16 => Format::Float(FloatKind::BF16),
            GgmlDType::Q4_0 => Format::Legacy(Legacy::Q4_0),
            GgmlDType::Q4_1 => Format::Legacy(Legacy::Q4_1),
            GgmlDType::Q5_0 => Format::Legacy(Legacy::Q5_0),
            GgmlDType::Q5_1 => Format::Legacy(Legacy::Q5_1),
            GgmlDType::Q8_0 => Format::Legacy(Legacy::Q8_0),
            GgmlDType::Q2K => Format::Q2K,
            GgmlDType::Q3K => Format::Q3K,
            GgmlDType::Q4K => Format::Q4K,
            GgmlDType::Q5K => Format::Q5K,
            GgmlDType::Q6K => Format::Q6K,
            // Q8_1 and Q8K are activation ("vec-dot") types, never stored weights.
            GgmlDType::Q8_1 | GgmlDType::Q8K => return None,
        })
    }
}

/// The weight bytes, kept where the caller's `Vec` put them when that is aligned enough
/// (always, with the system allocators we know) and copied into aligned words otherwise.
enum WeightBytes {
    Owned(Vec<u8>),
    Realigned { words: Vec<u64>, len: usize },
}

impl WeightBytes {
    fn new(bytes: Vec<u8>) -> Self {
        const _: () = assert!(WEIGHT_ALIGN <= std::mem::align_of::<u64>());
        if (bytes.as_ptr() as usize).is_multiple_of(WEIGHT_ALIGN) {
            WeightBytes::Owned(bytes)
        } else {
            Self::realigned(&bytes)
        }
    }

    fn realigned(bytes: &[u8]) -> Self {
        let len = bytes.len();
        let mut words = vec![0u64; len.div_ceil(8)];
        // SAFETY: `words` has at least `len` bytes, and u64 has no invalid bit patterns.
        let dst = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, len) };
        dst.copy_from_slice(bytes);
        WeightBytes::Realigned { words, len }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            WeightBytes::Owned(bytes) => bytes,
            // SAFETY: `words` holds at least `len` initialised bytes.
            WeightBytes::Realigned { words, len } => unsafe {
                std::slice::from_raw_parts(words.as_ptr() as *const u8, *len)
            },
        }
    }
}

/// A weight matrix in its GGUF block format: `n_out` rows of `n_in` values; row r's blocks are
/// contiguous (GGUF tensor with ne0 = n_in, ne1 = n_out).
pub struct QMatrix {
    dtype: GgmlDType,
    format: Format,
    n_out: usize,
    n_in: usize,
    /// Bytes per row: `n_in / block_size * type_size`.
    row_bytes: usize,
    bytes: WeightBytes,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QMatrix")
            .field("dtype", &self.dtype)
            .field("n_out", &self.n_out)
            .field("n_in", &self.n_in)
            .finish()
    }
}

/// Raw views of one matmul over 32-value blocks, shared by the column-range tasks.
pub(crate) struct LegacyArgs {
    /// The whole weight matrix and its row stride.
    pub(crate) weights: *const u8,
    pub(crate) row_bytes: usize,
    /// Blocks per row (weights and activations alike).
    pub(crate) nb: usize,
    /// The quantized activations, `n_rows × nb` blocks.
    pub(crate) codes: *const Codes32,
    pub(crate) scales: *const [f32; 2],
    /// The same scales transposed, `[b * n_rows + r]`, readable 8 lanes past any row.
    pub(crate) d_t: *const f32,
    pub(crate) s_t: *const f32,
    pub(crate) n_rows: usize,
    /// The output, `n_rows × n_out`.
    pub(crate) out: *mut f32,
    pub(crate) n_out: usize,
}

/// Raw views of one matmul over F32/F16/BF16 weights.
pub(crate) struct FloatArgs {
    pub(crate) weights: *const u8,
    pub(crate) row_bytes: usize,
    pub(crate) n_in: usize,
    /// The activations, `n_rows × n_in`.
    pub(crate) x: *const f32,
    pub(crate) n_rows: usize,
    pub(crate) out: *mut f32,
    pub(crate) n_out: usize,
}

// SAFETY: the pointers borrow buffers that outlive the parallel loop (it finishes inside
// `matmul`), the inputs are only read, and each task writes only its own output columns.
unsafe impl Send for LegacyArgs {}
unsafe impl Sync for LegacyArgs {}
unsafe impl Send for FloatArgs {}
unsafe impl Sync for FloatArgs {}

/// The output pointer for the K-quant tasks (same reasoning as for [`LegacyArgs`]).
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's activation scratch.
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => {
            let result = f(&mut scratch);
            if scratch.bytes() > SCRATCH_RETAIN_BYTES_MAX {
                *scratch = Scratch::default();
            }
            result
        }
        // Only reachable if a matmul runs inside another's task on the same thread; it gets a
        // scratch of its own rather than a panic.
        Err(_) => f(&mut Scratch::default()),
    })
}

impl QMatrix {
    /// Takes the raw tensor bytes as stored in the GGUF file. Errors (not panics) on
    /// unsupported dtype, n_in not a multiple of the block size, or a byte length that doesn't
    /// match.
    pub fn new(
        dtype: GgmlDType,
        n_out: usize,
        n_in: usize,
        bytes: Vec<u8>,
    ) -> Result<Self, EngineError> {
        let bad = |reason: String| EngineError::BadQuantizedMatrix {
            dtype: format!("{dtype:?}"),
            n_out,
            n_in,
            reason,
        };
        let format = Format::of(dtype).ok_or_else(|| {
            bad(
                "unsupported type (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, \
                 Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)"
                    .into(),
            )
        })?;
        if n_out == 0 || n_in == 0 {
            return Err(bad("a dimension is zero".into()));
        }
        let block_size = dtype.block_size();
        if !n_in.is_multiple_of(block_size) {
            return Err(bad(format!(
                "n_in is not a multiple of the block size {block_size}"
            )));
        }
        let row_bytes = n_in / block_size * dtype.type_size();
        let expected = row_bytes
            .checked_mul(n_out)
            .ok_or_else(|| bad("the size overflows usize".into()))?;
        if bytes.len() != expected {
            return Err(bad(format!(
                "{} bytes given, {expected} expected",
                bytes.len()
            )));
        }
        Ok(QMatrix {
            dtype,
            format,
            n_out,
            n_in,
            row_bytes,
            bytes: WeightBytes::new(bytes),
        })
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    pub fn n_out(&self) -> usize {
        self.n_out
    }

    pub fn n_in(&self) -> usize {
        self.n_in
    }

    /// Bytes of weights held (as in the GGUF file).
    pub fn size_in_bytes(&self) -> usize {
        self.bytes.as_slice().len()
    }

    /// out[r * n_out + o] = sum_i x[r * n_in + i] * W[o, i] for r in 0..n_rows.
    /// (x: n_rows×n_in f32 row-major; out: n_rows×n_out)
    ///
    /// Panics if `x` or `out` do not have those lengths (a caller bug, not bad input).
    pub fn matmul(&self, x: &[f32], n_rows: usize, out: &mut [f32], pool: &ComputePool) {
        self.matmul_with_isa(x, n_rows, out, pool, Isa::detect())
    }

    /// [`QMatrix::matmul`] with the kernels of `isa`, or of the best family below it that this
    /// CPU supports. For tests and benchmarks.
    pub fn matmul_with_isa(
        &self,
        x: &[f32],
        n_rows: usize,
        out: &mut [f32],
        pool: &ComputePool,
        isa: Isa,
    ) {
        assert_eq!(x.len(), n_rows * self.n_in, "x must be n_rows × n_in");
        assert_eq!(out.len(), n_rows * self.n_out, "out must be n_rows × n_out");
        if n_rows == 0 {
            return;
        }
        let isa = isa.clamp();
        match self.format {
            Format::Float(kind) => self.matmul_float(kind, x, n_rows, out, pool, isa),
            Format::Legacy(format) => with_scratch(|scratch| {
                scratch.q8.quantize(x, n_rows, self.n_in, isa);
                self.matmul_legacy(format, &scratch.q8, n_rows, out, pool, isa)
            }),
            Format::Q2K => self.matmul_k::<BlockQ2K>(x, n_rows, out, pool, isa),
            Format::Q3K => self.matmul_k::<BlockQ3K>(x, n_rows, out, pool, isa),
            #[cfg(target_arch = "x86_64")]
            Format::Q4K if isa >= Isa::Avx2 => {
                let kernels = if isa >= Isa::Avx512Vnni { &x86::Q4K_VNNI } else { &x86::Q4K_AVX2 };
                // SAFETY: `isa` is supported by this CPU (clamped above).
                unsafe { self.matmul_k_kernels(x, n_rows, out, pool, kernels) }
            }
            Format::Q4K => self.matmul_k::<BlockQ4K>(x, n_rows, out, pool, isa),
            Format::Q5K => self.matmul_k::<BlockQ5K>(x, n_rows, out, pool, isa),
            #[cfg(target_arch = "x86_64")]
            Format::Q6K if isa >= Isa::Avx2 => {
                let kernels = if isa >= Isa::Avx512Vnni { &x86::Q6K_VNNI } else { &x86::Q6K_AVX2 };
                // SAFETY: as for Q4_K.
                unsafe { self.matmul_k_kernels(x, n_rows, out, pool, kernels) }
            }
            Format::Q6K => self.matmul_k::<BlockQ6K>(x, n_rows, out, pool, isa),
        }
    }

    /// Dequantize row `row` (used for embedding lookup). Panics if `row >= n_out` or
    /// `out.len() != n_in` (caller bugs: token ids are checked against the vocabulary first).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(
            row < self.n_out,
            "row {row} out of range ({} rows)",
            self.n_out
        );
        assert_eq!(out.len(), self.n_in, "out must hold n_in values");
        let bytes = &self.bytes.as_slice()[row * self.row_bytes..(row + 1) * self.row_bytes];
        match self.format {
            Format::Float(kind) => {
                for (i, v) in out.iter_mut().enumerate() {
                    *v = kind.load(bytes, i);
                }
            }
            Format::Legacy(format) => blocks::dequantize_row(format, bytes, out),
            Format::Q2K => BlockQ2K::to_float(self.k_blocks(bytes), out),
            Format::Q3K => BlockQ3K::to_float(self.k_blocks(bytes), out),
            Format::Q4K => BlockQ4K::to_float(self.k_blocks(bytes), out),
            Format::Q5K => BlockQ5K::to_float(self.k_blocks(bytes), out),
            Format::Q6K => BlockQ6K::to_float(self.k_blocks(bytes), out),
        }
    }

    /// `outs[i] = x · mats[i]ᵀ` for matrices that read the same input (a layer's Q, K and V,
    /// or its gate and up): `x` is quantized once, and the column ranges of every matrix go
    /// to the pool as one loop, so small matrices (K and V are a third of Q in grouped-query
    /// attention) run beside the others instead of one after another. Each output is
    /// bit-identical to `mats[i].matmul(x, …)`: the same kernels over the same columns.
    /// Matrices that are not all of the 32-value block formats are multiplied one by one.
    pub fn matmul_shared_input(
        mats: &[&QMatrix],
        x: &[f32],
        n_rows: usize,
        outs: &mut [&mut [f32]],
        pool: &ComputePool,
    ) {
        assert_eq!(mats.len(), outs.len(), "one output per matrix");
        let legacy: Option<Vec<Legacy>> = mats
            .iter()
            .map(|m| match m.format {
                Format::Legacy(format) if m.n_in == mats[0].n_in => Some(format),
                _ => None,
            })
            .collect();
        let (Some(formats), Some(first)) = (legacy, mats.first()) else {
            for (m, out) in mats.iter().zip(outs.iter_mut()) {
                m.matmul(x, n_rows, out, pool);
            }
            return;
        };
        assert_eq!(x.len(), n_rows * first.n_in, "x must be n_rows × n_in");
        for (m, out) in mats.iter().zip(outs.iter()) {
            assert_eq!(out.len(), n_rows * m.n_out, "out must be n_rows × n_out");
        }
        if n_rows == 0 {
            return;
        }
        let isa = Isa::detect().clamp();
        with_scratch(|scratch| {
            scratch.q8.quantize(x, n_rows, first.n_in, isa);
            let acts = &scratch.q8;
            let args: Vec<LegacyArgs> = mats
                .iter()
                .zip(outs.iter_mut())
                .map(|(m, out)| m.legacy_args(acts, n_rows, out))
                .collect();
            // (matrix, first column, end column) for every task of every matrix.
            let mut tasks = Vec::new();
            for (i, m) in mats.iter().enumerate() {
                let chunk = m.column_chunk(pool.n_threads(), n_rows);
                tasks.extend((0..m.n_out).step_by(chunk.max(1)).map(|o| (i, o, (o + chunk).min(m.n_out))));
            }
            pool.for_each_index(tasks.len(), |t| {
                let (i, o_start, o_end) = tasks[t];
                // SAFETY: as in `matmul_legacy`; every task owns one column range of one
                // matrix's output, and the outputs are distinct slices.
                unsafe { legacy_range(formats[i], isa, &args[i], o_start, o_end) }
            });
        });
    }

    /// Output columns per pool task: enough tasks to balance the threads, none so small that
    /// handing it out costs more than computing it; all of them with one thread.
    fn column_chunk(&self, n_threads: usize, n_rows: usize) -> usize {
        if n_threads == 1 {
            return self.n_out;
        }
        let work_per_column = self.row_bytes * n_rows;
        self.n_out
            .div_ceil(n_threads * TASKS_PER_THREAD)
            .max(TASK_WORK_MIN.div_ceil(work_per_column))
            .next_multiple_of(COLUMN_CHUNK_ALIGN)
    }

    /// Splits the output columns into tasks over the pool: `task(o_start, o_end)`.
    fn for_each_column_range(
        &self,
        pool: &ComputePool,
        n_rows: usize,
        task: impl Fn(usize, usize) + Send + Sync,
    ) {
        let chunk = self.column_chunk(pool.n_threads(), n_rows);
        if chunk >= self.n_out {
            return task(0, self.n_out);
        }
        let n_chunks = self.n_out.div_ceil(chunk);
        pool.for_each_index(n_chunks, |c| {
            task(c * chunk, ((c + 1) * chunk).min(self.n_out))
        });
    }

    fn matmul_legacy(
        &self,
        format: Legacy,
        acts: &activations::Q8Rows,
        n_rows: usize,
        out: &mut [f32],
        pool: &ComputePool,
        isa: Isa,
    ) {
        let args = self.legacy_args(acts, n_rows, out);
        self.for_each_column_range(pool, n_rows, |o_start, o_end| {
            // SAFETY: `args` describes live buffers of the right sizes (checked in `matmul`
            // and by construction), tasks get disjoint column ranges, and `isa` was clamped
            // to this CPU (module invariant).
            unsafe { legacy_range(format, isa, &args, o_start, o_end) }
        });
    }

    /// The raw views of `self · acts` into `out` for the 32-value block kernels.
    fn legacy_args(&self, acts: &activations::Q8Rows, n_rows: usize, out: &mut [f32]) -> LegacyArgs {
        let args = LegacyArgs {
            weights: self.bytes.as_slice().as_ptr(),
            row_bytes: self.row_bytes,
            nb: self.n_in / QK,
            codes: acts.codes.as_ptr(),
            scales: acts.scales.as_ptr(),
            d_t: acts.d_t.as_ptr(),
            s_t: acts.s_t.as_ptr(),
            n_rows,
            out: out.as_mut_ptr(),
            n_out: self.n_out,
        };
        debug_assert!(acts.codes.len() >= n_rows * args.nb && acts.nb == args.nb);
        debug_assert_eq!(out.len(), n_rows * self.n_out);
        args
    }

    fn matmul_float(
        &self,
        kind: FloatKind,
        x: &[f32],
        n_rows: usize,
        out: &mut [f32],
        pool: &ComputePool,
        isa: Isa,
    ) {
        let args = FloatArgs {
            weights: self.bytes.as_slice().as_ptr(),
            row_bytes: self.row_bytes,
            n_in: self.n_in,
            x: x.as_ptr(),
            n_rows,
            out: out.as_mut_ptr(),
            n_out: self.n_out,
        };
        self.for_each_column_range(pool, n_rows, |o_start, o_end| {
            // SAFETY: as in `matmul_legacy`.
            unsafe { float_range(kind, isa, &args, o_start, o_end) }
        });
    }

    /// The K-quant blocks of `bytes` (a whole number of `T` blocks inside `self.bytes`).
    fn k_blocks<'a, T: GgmlType>(&self, bytes: &'a [u8]) -> &'a [T] {
        const { assert!(std::mem::align_of::<T>() <= WEIGHT_ALIGN) };
        let size = std::mem::size_of::<T>();
        assert!(
            bytes.len().is_multiple_of(size)
                && (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
        );
        // SAFETY: aligned (WeightBytes keeps WEIGHT_ALIGN, rows are whole blocks), in bounds,
        // and candle's K-quant blocks are plain `repr(C)` integers and f16, for which every
        // bit pattern is valid.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) }
    }

    /// K-quants: our loop, threading and activation quantization around candle's block dots.
    fn matmul_k<T: GgmlType<VecDotType = BlockQ8K>>(
        &self,
        x: &[f32],
        n_rows: usize,
        out: &mut [f32],
        pool: &ComputePool,
        isa: Isa,
    ) {
        let n_in = self.n_in;
        self.matmul_k_with(x, n_rows, out, pool, |w, act| {
            let w: &[T] = self.k_blocks(w);
            let act = activations::as_candle(act);
            if isa == Isa::Scalar {
                T::vec_dot_unopt(n_in, w, act)
            } else {
                T::vec_dot(n_in, w, act)
            }
        })
    }

    /// K-quants: our loop, threading and (ggml's) activation quantization around `dot`, which
    /// takes one weight row's bytes and one activation row's superblocks.
    fn matmul_k_with(
        &self,
        x: &[f32],
        n_rows: usize,
        out: &mut [f32],
        pool: &ComputePool,
        dot: impl Fn(&[u8], &[activations::Q8KBlock]) -> f32 + Sync,
    ) {
        self.matmul_k_rows(x, n_rows, out, pool, &dot, |w, acts: [&[activations::Q8KBlock]; 4]| acts.map(|act| dot(w, act)), |w, acts: [&[activations::Q8KBlock]; 8]| acts.map(|act| dot(w, act)))
    }

    /// [`Self::matmul_k_rows`] with one type's x86 kernels.
    ///
    /// # Safety
    /// The CPU must support the kernels' features; the matrix must be of their type.
    #[cfg(target_arch = "x86_64")]
    unsafe fn matmul_k_kernels(&self, x: &[f32], n_rows: usize, out: &mut [f32], pool: &ComputePool, kernels: &x86::KRowKernels) {
        // SAFETY (each closure): the caller's promise; `w` holds `act.len()` blocks of the
        // matrix's type for every activation row (`matmul_k_rows` slices them so).
        self.matmul_k_rows(
            x,
            n_rows,
            out,
            pool,
            |w, act| unsafe { (kernels.one)(w, act) },
            |w, acts| unsafe { (kernels.four)(w, acts) },
            |w, acts| unsafe { (kernels.eight)(w, acts) },
        )
    }

    /// [`Self::matmul_k_with`] with kernels for 4 and 8 activation rows at once (`dot4`,
    /// `dot8`, which must give each row exactly what `dot` gives it): a step's rows go through
    /// them in groups of 8, then 4, the rest one by one, so prefill and batched decode unpack
    /// each weight superblock once per group instead of once per row. Measured on a
    /// Qwen3-8B-shaped Q4_K_M file, 128-token prefill, one thread (`engine-bench`, old and new
    /// binaries alternating): 36 tok/s one row at a time, 53 with the AVX2 groups, 65 with
    /// the AVX-512 ones; decode unchanged (15–16).
    #[allow(clippy::too_many_arguments)]
    fn matmul_k_rows(
        &self,
        x: &[f32],
        n_rows: usize,
        out: &mut [f32],
        pool: &ComputePool,
        dot: impl Fn(&[u8], &[activations::Q8KBlock]) -> f32 + Sync,
        dot4: impl Fn(&[u8], [&[activations::Q8KBlock]; 4]) -> [f32; 4] + Sync,
        dot8: impl Fn(&[u8], [&[activations::Q8KBlock]; 8]) -> [f32; 8] + Sync,
    ) {
        let nb = self.n_in / activations::QK_K;
        let n_in = self.n_in;
        let n_out = self.n_out;
        let bytes = self.bytes.as_slice();
        let row_bytes = self.row_bytes;
        // Rows of weights per cache block, as in the legacy kernels: all activation rows go
        // through one L2-sized block of weight rows before the next is loaded.
        let block_rows = (WEIGHT_BLOCK_BYTES / self.row_bytes).max(1);
        let out_ptr = OutPtr(out.as_mut_ptr());
        with_scratch(|scratch| {
            scratch.q8k.quantize(x, n_rows, n_in);
            let acts = &scratch.q8k.blocks[..n_rows * nb];
            let row = |r: usize| &acts[r * nb..(r + 1) * nb];
            // The size of the group starting at row `r0`: 8s, then a 4, then ones (computed,
            // not collected: this runs for every matmul of every decode step).
            let group_size = |r0: usize| match n_rows - r0 {
                left if left >= 8 => 8,
                left if left >= 4 => 4,
                _ => 1,
            };
            self.for_each_column_range(pool, n_rows, |o_start, o_end| {
                let out = out_ptr;
                let store = |r: usize, o: usize, v: f32| {
                    // SAFETY: in bounds (o < n_out, r < n_rows) and this task's column.
                    unsafe { *out.0.add(r * n_out + o) = v };
                };
                for ob in (o_start..o_end).step_by(block_rows) {
                    let mut r0 = 0;
                    while r0 < n_rows {
                        let size = group_size(r0);
                        for o in ob..(ob + block_rows).min(o_end) {
                            let w = &bytes[o * row_bytes..(o + 1) * row_bytes];
                            match size {
                                8 => dot8(w, std::array::from_fn(|i| row(r0 + i))).into_iter().enumerate().for_each(|(i, v)| store(r0 + i, o, v)),
                                4 => dot4(w, std::array::from_fn(|i| row(r0 + i))).into_iter().enumerate().for_each(|(i, v)| store(r0 + i, o, v)),
                                _ => store(r0, o, dot(w, row(r0))),
                            }
                        }
                        r0 += size;
                    }
                }
            });
        });
    }
}

/// Dispatches a column range of a 32-value-block matmul to the kernels of `isa`.
///
/// # Safety
/// `a` must describe live buffers, no other thread may write columns `[o_start, o_end)`, and
/// `isa` must be supported by this CPU.
unsafe fn legacy_range(format: Legacy, isa: Isa, a: &LegacyArgs, o_start: usize, o_end: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! simd {
            ($range:ident) => {
                match format {
                    Legacy::Q4_0 => x86::$range::<x86::Q4_0>(a, o_start, o_end),
                    Legacy::Q4_1 => x86::$range::<x86::Q4_1>(a, o_start, o_end),
                    Legacy::Q5_0 => x86::$range::<x86::Q5_0>(a, o_start, o_end),
                    Legacy::Q5_1 => x86::$range::<x86::Q5_1>(a, o_start, o_end),
                    Legacy::Q8_0 => x86::$range::<x86::Q8_0>(a, o_start, o_end),
                }
            };
        }
        match isa {
            Isa::Avx512Vnni => return simd!(legacy_columns_vnni),
            Isa::Avx2 => return simd!(legacy_columns_avx2),
            Isa::Scalar => {}
        }
    }
    let _ = isa;
    scalar::legacy_range(format, a, o_start, o_end)
}

/// Dispatches a column range of a float-weight matmul (see [`legacy_range`]).
///
/// # Safety
/// As for [`legacy_range`].
unsafe fn float_range(kind: FloatKind, isa: Isa, a: &FloatArgs, o_start: usize, o_end: usize) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        return match kind {
            // F32 weights in llama.cpp's order for one activation row (`ggml_vec_dot_f32`;
            // from 2 rows on it takes its tinyBLAS sgemm, another order, which a batch
            // invariant engine cannot follow as well): a mixture of experts' F32 router
            // then picks and weighs its experts at decode bit for bit as llama.cpp does
            // (engine/tests/arch_agreement.rs). F32 weights are routers and norms in the
            // files people run, so the row-at-a-time kernel's speed does not matter.
            FloatKind::F32 => x86::f32_columns_ggml_avx2(a, o_start, o_end),
            FloatKind::F16 => x86::float_columns_avx2::<x86::F16>(a, o_start, o_end),
            FloatKind::BF16 => x86::float_columns_avx2::<x86::BF16>(a, o_start, o_end),
        };
    }
    let _ = isa;
    scalar::float_range(kind, a, o_start, o_end)
}
