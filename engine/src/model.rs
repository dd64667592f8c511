//! The llama-family forward pass over one slice of a model (a contiguous layer range).
//!
//! Covers Llama 2/3, SmolLM2 and Mistral-style GGUFs: RMSNorm, grouped-query attention with
//! RoPE as llama.cpp applies it (`LLAMA_ROPE_TYPE_NORM`: adjacent pairs, because
//! convert_hf_to_gguf.py permutes the Q/K rows; see `llama_model_rope_type()` in llama.cpp),
//! SwiGLU feed-forward, tied or separate output head.
//!
//! The pass is split so that stages on different machines can each run their part:
//! [`LlamaSlice::embed`] (first stage) → [`LlamaSlice::forward_layers`] (every stage, its own
//! layers) → [`LlamaSlice::head`] (last stage). The KV cache is not in here: callers pass one
//! [`SequenceCache`] per sequence, so one slice serves many sequences, and one step may carry
//! rows (tokens) of several sequences at once.
//!
//! The CPU path works on plain f32 rows with the kernels in [`crate::quant`]; every
//! intermediate buffer is sized by the step, not by the context.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;

use crate::attention::attend_head;
use crate::error::{EngineError, Result};
use crate::kv_cache::SequenceCache;
use crate::profile::{tensor_size_in_bytes, ModelProfile, RopeScaling};
use crate::quant::QMatrix;
use crate::threads::ComputePool;

/// Where a slice's tensors come from: a local GGUF file now, bytes received from the
/// coordinator in the cluster.
pub trait TensorSource {
    /// The tensor's type, its dims as candle reports them (outermost first, e.g.
    /// `[n_out, n_in]`), and its raw bytes in GGUF block format; `None` if absent.
    fn tensor(&mut self, name: &str) -> Result<Option<(GgmlDType, Vec<usize>, Vec<u8>)>>;
}

/// Reads tensors straight out of a GGUF file, seeking to each one, so a slice reads only
/// its own bytes.
pub struct GgufFileSource<'a> {
    content: &'a Content,
    file: std::fs::File,
}

impl<'a> GgufFileSource<'a> {
    pub fn new(content: &'a Content, path: &Path) -> Result<Self> {
        Ok(Self { content, file: std::fs::File::open(path)? })
    }
}

impl TensorSource for GgufFileSource<'_> {
    fn tensor(&mut self, name: &str) -> Result<Option<(GgmlDType, Vec<usize>, Vec<u8>)>> {
        use std::io::{Read, Seek, SeekFrom};
        let Some(info) = self.content.tensor_infos.get(name) else {
            return Ok(None);
        };
        let size = tensor_size_in_bytes(info.ggml_dtype, info.shape.elem_count());
        let mut bytes = vec![0u8; size as usize];
        self.file
            .seek(SeekFrom::Start(self.content.tensor_data_offset + info.offset))?;
        self.file.read_exact(&mut bytes).map_err(|e| {
            EngineError::BadGguf(format!("tensor `{name}` is truncated ({e})"))
        })?;
        Ok(Some((info.ggml_dtype, info.shape.dims().to_vec(), bytes)))
    }
}

/// The GGUF tensor names a slice holding `layers` needs (what a worker is sent).
pub fn slice_tensor_names(profile: &ModelProfile, layers: Range<u32>) -> Vec<String> {
    let mut names = Vec::new();
    if layers.start == 0 {
        names.push("token_embd.weight".to_owned());
    }
    for layer_idx in layers.clone() {
        for role in BLOCK_TENSORS {
            names.push(format!("blk.{layer_idx}.{role}.weight"));
        }
    }
    if layers.end == profile.n_layers {
        names.push("output_norm.weight".to_owned());
        names.push(if profile.tied_embeddings { "token_embd.weight" } else { "output.weight" }.to_owned());
        if profile.has_rope_freqs {
            names.push("rope_freqs.weight".to_owned());
        }
    }
    if profile.has_rope_freqs && !names.iter().any(|n| n == "rope_freqs.weight") {
        names.push("rope_freqs.weight".to_owned());
    }
    names.dedup();
    names
}

const BLOCK_TENSORS: [&str; 9] = [
    "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down",
];

struct Block {
    attn_norm: Vec<f32>,
    attn_q: QMatrix,
    attn_k: QMatrix,
    attn_v: QMatrix,
    attn_output: QMatrix,
    ffn_norm: Vec<f32>,
    ffn_gate: QMatrix,
    ffn_up: QMatrix,
    ffn_down: QMatrix,
}

/// One contiguous layer range of a model, loaded and ready to run.
pub struct LlamaSlice {
    profile: ModelProfile,
    layers: Range<u32>,
    /// First stage only: `token_embd.weight` (vocab × n_embd).
    token_embd: Option<Arc<QMatrix>>,
    /// Last stage only.
    output_norm: Option<Vec<f32>>,
    /// Last stage only: `output.weight`, or the token embedding when tied.
    output: Option<Arc<QMatrix>>,
    blocks: Vec<Block>,
    /// Per rotated pair, the divisor llama.cpp calls `freq_factors` (Llama-3 `rope_freqs`).
    rope_freq_factors: Option<Vec<f32>>,
}

impl LlamaSlice {
    /// Loads layers `layers` of the GGUF at `path` (plus the embedding if the range starts at
    /// 0 and the head if it ends at the last layer), reading only those tensors.
    pub fn load(path: &Path, layers: Range<u32>) -> Result<Self> {
        let (profile, content) = ModelProfile::from_path(path)?;
        let mut source = GgufFileSource::new(&content, path)?;
        Self::from_source(profile, layers, &mut source)
    }

    pub fn from_source(profile: ModelProfile, layers: Range<u32>, source: &mut dyn TensorSource) -> Result<Self> {
        if layers.start >= layers.end || layers.end > profile.n_layers {
            return Err(EngineError::BadLayerRange {
                start: layers.start,
                end: layers.end,
                n_layers: profile.n_layers,
            });
        }
        let p = &profile;
        let q_width = p.n_head * p.head_dim;
        let kv_width = p.n_head_kv * p.head_dim;
        let first = layers.start == 0;
        let last = layers.end == p.n_layers;

        let token_embd = if first || (last && p.tied_embeddings) {
            Some(Arc::new(load_matrix(source, "token_embd.weight", p.vocab_size, p.n_embd)?))
        } else {
            None
        };
        let mut blocks = Vec::with_capacity((layers.end - layers.start) as usize);
        for i in layers.clone() {
            let name = |role: &str| format!("blk.{i}.{role}.weight");
            blocks.push(Block {
                attn_norm: load_vector(source, &name("attn_norm"), p.n_embd)?,
                attn_q: load_matrix(source, &name("attn_q"), q_width, p.n_embd)?,
                attn_k: load_matrix(source, &name("attn_k"), kv_width, p.n_embd)?,
                attn_v: load_matrix(source, &name("attn_v"), kv_width, p.n_embd)?,
                attn_output: load_matrix(source, &name("attn_output"), p.n_embd, q_width)?,
                ffn_norm: load_vector(source, &name("ffn_norm"), p.n_embd)?,
                ffn_gate: load_matrix(source, &name("ffn_gate"), p.n_ff, p.n_embd)?,
                ffn_up: load_matrix(source, &name("ffn_up"), p.n_ff, p.n_embd)?,
                ffn_down: load_matrix(source, &name("ffn_down"), p.n_embd, p.n_ff)?,
            });
        }
        let (output_norm, output) = if last {
            let norm = load_vector(source, "output_norm.weight", p.n_embd)?;
            let output = if p.tied_embeddings {
                token_embd.clone().expect("loaded above for a tied last stage")
            } else {
                Arc::new(load_matrix(source, "output.weight", p.vocab_size, p.n_embd)?)
            };
            (Some(norm), Some(output))
        } else {
            (None, None)
        };
        let rope_freq_factors = if p.has_rope_freqs {
            Some(load_vector(source, "rope_freqs.weight", p.n_rot / 2)?)
        } else {
            None
        };
        // A tied last stage that is not also the first keeps the embedding only as its head.
        let token_embd = if first { token_embd } else { None };
        Ok(Self { profile, layers, token_embd, output_norm, output, blocks, rope_freq_factors })
    }

    pub fn profile(&self) -> &ModelProfile {
        &self.profile
    }

    pub fn layers(&self) -> Range<u32> {
        self.layers.clone()
    }

    pub fn is_first(&self) -> bool {
        self.token_embd.is_some()
    }

    pub fn is_last(&self) -> bool {
        self.output.is_some()
    }

    /// Weight bytes this slice holds in memory.
    pub fn size_in_bytes(&self) -> usize {
        let matrices: usize = self
            .blocks
            .iter()
            .map(|b| {
                [&b.attn_q, &b.attn_k, &b.attn_v, &b.attn_output, &b.ffn_gate, &b.ffn_up, &b.ffn_down]
                    .iter()
                    .map(|m| m.size_in_bytes())
                    .sum::<usize>()
                    + (b.attn_norm.len() + b.ffn_norm.len()) * 4
            })
            .sum();
        let embd = self.token_embd.as_ref().map_or(0, |m| m.size_in_bytes());
        let head = match (&self.output, &self.token_embd) {
            (Some(o), Some(e)) if Arc::ptr_eq(o, e) => 0,
            (Some(o), _) => o.size_in_bytes(),
            _ => 0,
        };
        matrices + embd + head + self.output_norm.as_ref().map_or(0, |n| n.len() * 4)
    }

    /// A fresh KV cache for one sequence on this slice, holding at most `context_length`
    /// positions (clamped to the model's trained context).
    pub fn new_cache(&self, context_length: usize) -> SequenceCache {
        let p = &self.profile;
        SequenceCache::new(
            self.layers.start,
            self.blocks.len(),
            p.n_head_kv * p.head_dim,
            context_length.min(p.context_length).max(1),
        )
    }

    /// Token ids → hidden rows (`tokens.len() × n_embd`). First stage only.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let embd = self.token_embd.as_ref().ok_or_else(|| {
            EngineError::BadLayerRange { start: self.layers.start, end: self.layers.end, n_layers: self.profile.n_layers }
        })?;
        let n_embd = self.profile.n_embd;
        let mut hidden = vec![0f32; tokens.len() * n_embd];
        for (row, &token) in hidden.chunks_exact_mut(n_embd).zip(tokens) {
            if token as usize >= self.profile.vocab_size {
                return Err(EngineError::TokenOutOfRange(token));
            }
            embd.dequantize_row(token as usize, row);
        }
        Ok(hidden)
    }

    /// Runs this slice's layers over a step's rows, in place.
    ///
    /// `hidden` holds `sum(segments)` rows of `n_embd`; `segments[i]` consecutive rows belong
    /// to the sequence whose cache is `caches[i]`, at the positions following what that cache
    /// already holds. Every row's K and V are appended to its cache. Nothing is changed if an
    /// error is returned.
    pub fn forward_layers(
        &self,
        hidden: &mut [f32],
        segments: &[usize],
        caches: &mut [&mut SequenceCache],
        pool: &ComputePool,
    ) -> Result<()> {
        let p = &self.profile;
        let n_rows: usize = segments.iter().sum();
        assert_eq!(segments.len(), caches.len(), "one cache per segment");
        assert_eq!(hidden.len(), n_rows * p.n_embd, "hidden must hold n_rows × n_embd");
        // Validate everything before touching a cache.
        let mut row_seq = Vec::with_capacity(n_rows);
        let mut row_pos = Vec::with_capacity(n_rows);
        for (seq, (&n, cache)) in segments.iter().zip(caches.iter()).enumerate() {
            assert!(
                cache.layer_start() == self.layers.start && cache.n_layers() == self.blocks.len(),
                "cache made for another slice"
            );
            let start = cache.layer_len(0);
            if (1..cache.n_layers()).any(|l| cache.layer_len(l) != start) {
                panic!("cache layers disagree: a previous step was interrupted");
            }
            if start + n > cache.capacity_max() {
                return Err(EngineError::ContextLengthExceeded {
                    position: start + n - 1,
                    context_length: cache.capacity_max(),
                });
            }
            for i in 0..n {
                row_seq.push(seq);
                row_pos.push(start + i);
            }
        }
        for (cache, &n) in caches.iter_mut().zip(segments) {
            let start = cache.layer_len(0);
            cache.reserve(start, n)?;
        }
        if n_rows == 0 {
            return Ok(());
        }

        // The whole step runs on a pool thread (see `ComputePool::run`).
        pool.run(|| {
            let rope = self.rope_table(&row_pos);
            let q_width = p.n_head * p.head_dim;
            let kv_width = p.n_head_kv * p.head_dim;
            let mut normed = vec![0f32; n_rows * p.n_embd];
            let mut q = vec![0f32; n_rows * q_width];
            let mut k = vec![0f32; n_rows * kv_width];
            let mut v = vec![0f32; n_rows * kv_width];
            let mut attn = vec![0f32; n_rows * q_width];
            let mut proj = vec![0f32; n_rows * p.n_embd];
            let mut gate = vec![0f32; n_rows * p.n_ff];
            let mut up = vec![0f32; n_rows * p.n_ff];

            for (local_layer, block) in self.blocks.iter().enumerate() {
                // Attention.
                rms_norm(hidden, &block.attn_norm, p.rms_norm_eps, &mut normed);
                QMatrix::matmul_shared_input(
                    &[&block.attn_q, &block.attn_k, &block.attn_v],
                    &normed,
                    n_rows,
                    &mut [&mut q, &mut k, &mut v],
                    pool,
                );
                for row in 0..n_rows {
                    let cos_sin = &rope[row * p.n_rot..(row + 1) * p.n_rot];
                    for head in q[row * q_width..(row + 1) * q_width].chunks_exact_mut(p.head_dim) {
                        apply_rope(head, cos_sin);
                    }
                    for head in k[row * kv_width..(row + 1) * kv_width].chunks_exact_mut(p.head_dim) {
                        apply_rope(head, cos_sin);
                    }
                    caches[row_seq[row]].push(
                        local_layer,
                        &k[row * kv_width..(row + 1) * kv_width],
                        &v[row * kv_width..(row + 1) * kv_width],
                    );
                }
                self.attention(local_layer, &q, &row_seq, &row_pos, caches, &mut attn, pool);
                block.attn_output.matmul(&attn, n_rows, &mut proj, pool);
                add_in_place(hidden, &proj);

                // Feed-forward (SwiGLU).
                rms_norm(hidden, &block.ffn_norm, p.rms_norm_eps, &mut normed);
                QMatrix::matmul_shared_input(
                    &[&block.ffn_gate, &block.ffn_up],
                    &normed,
                    n_rows,
                    &mut [&mut gate, &mut up],
                    pool,
                );
                swiglu(&mut gate, &up);
                block.ffn_down.matmul(&gate, n_rows, &mut proj, pool);
                add_in_place(hidden, &proj);
            }
        });
        Ok(())
    }

    /// Hidden rows → logits (`n_rows × vocab_size`), after the output norm. Last stage only.
    pub fn head(&self, hidden: &[f32], pool: &ComputePool) -> Result<Vec<f32>> {
        let (Some(norm), Some(output)) = (&self.output_norm, &self.output) else {
            return Err(EngineError::BadLayerRange {
                start: self.layers.start,
                end: self.layers.end,
                n_layers: self.profile.n_layers,
            });
        };
        let p = &self.profile;
        assert_eq!(hidden.len() % p.n_embd, 0, "hidden must hold whole rows");
        let n_rows = hidden.len() / p.n_embd;
        let mut normed = vec![0f32; hidden.len()];
        rms_norm(hidden, norm, p.rms_norm_eps, &mut normed);
        let mut logits = vec![0f32; n_rows * p.vocab_size];
        output.matmul(&normed, n_rows, &mut logits, pool);
        Ok(logits)
    }

    /// cos/sin pairs for every row's position: `[row][pair] = (cos, sin)` flattened, `n_rot`
    /// floats per row. Computed as ggml's `ggml_rope_cache_init` does (theta advanced by
    /// repeated multiplication in f32), so positions rotate bit-for-bit like llama.cpp's.
    fn rope_table(&self, positions: &[usize]) -> Vec<f32> {
        let p = &self.profile;
        let theta_scale = p.rope_freq_base.powf(-2.0 / p.n_rot as f32);
        let freq_scale = match p.rope_scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear { factor } => 1.0 / factor,
        };
        let mut table = vec![0f32; positions.len() * p.n_rot];
        for (row, &pos) in table.chunks_exact_mut(p.n_rot).zip(positions) {
            let mut theta = pos as f32;
            for (pair, cs) in row.chunks_exact_mut(2).enumerate() {
                let ff = self.rope_freq_factors.as_ref().map_or(1.0, |f| f[pair]);
                let t = freq_scale * (theta / ff);
                cs[0] = t.cos();
                cs[1] = t.sin();
                theta *= theta_scale;
            }
        }
        table
    }

    /// Causal attention of every row over its own sequence's cache (positions `0..=pos`).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        local_layer: usize,
        q: &[f32],
        row_seq: &[usize],
        row_pos: &[usize],
        caches: &[&mut SequenceCache],
        out: &mut [f32],
        pool: &ComputePool,
    ) {
        let p = &self.profile;
        let head_dim = p.head_dim;
        let group = p.n_head / p.n_head_kv;
        let kv_width = p.n_head_kv * head_dim;
        let scale = 1.0 / (head_dim as f32).sqrt();
        // One chunk per (row, head): independent, so they spread over the pool.
        pool.for_each_chunk(out, head_dim, |chunk_idx, out_head| {
            let row = chunk_idx / p.n_head;
            let head = chunk_idx % p.n_head;
            let kv_head = head / group;
            let n_pos = row_pos[row] + 1;
            let (keys, values) = caches[row_seq[row]].layer(local_layer, n_pos);
            let q_head = &q[chunk_idx * head_dim..(chunk_idx + 1) * head_dim];
            attend_head(q_head, keys, values, kv_width, kv_head * head_dim, n_pos, scale, out_head);
        });
    }
}

fn load_matrix(source: &mut dyn TensorSource, name: &str, n_out: usize, n_in: usize) -> Result<QMatrix> {
    let (dtype, dims, bytes) = source.tensor(name)?.ok_or_else(|| EngineError::MissingTensor(name.to_owned()))?;
    if dims != [n_out, n_in] {
        return Err(EngineError::BadTensorShape { name: name.to_owned(), expected: vec![n_out, n_in], actual: dims });
    }
    QMatrix::new(dtype, n_out, n_in, bytes)
}

fn load_vector(source: &mut dyn TensorSource, name: &str, len: usize) -> Result<Vec<f32>> {
    let (dtype, dims, bytes) = source.tensor(name)?.ok_or_else(|| EngineError::MissingTensor(name.to_owned()))?;
    if dims.iter().product::<usize>() != len {
        return Err(EngineError::BadTensorShape { name: name.to_owned(), expected: vec![len], actual: dims });
    }
    let matrix = QMatrix::new(dtype, 1, len, bytes)?;
    let mut out = vec![0f32; len];
    matrix.dequantize_row(0, &mut out);
    Ok(out)
}

/// RMSNorm of every row of `x` times `weight`, into `out`, as ggml's
/// `ggml_compute_forward_rms_norm_f32` then `ggml_mul`: squares in f32, summed in f64.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    for (row, out_row) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let sum: f64 = row.iter().map(|&v| (v * v) as f64).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &w) in out_row.iter_mut().zip(row).zip(weight) {
            *o = v * scale * w;
        }
    }
}

/// Rotates adjacent pairs (x[2i], x[2i+1]) of the first `n_rot` dims by the row's angles.
fn apply_rope(head: &mut [f32], cos_sin: &[f32]) {
    for (pair, cs) in head.chunks_exact_mut(2).zip(cos_sin.chunks_exact(2)) {
        let (x0, x1) = (pair[0], pair[1]);
        // As GCC compiles ggml's `rotate_pairs` (C++, -ffp-contract=fast on an FMA target):
        // one fused multiply-add each, checked bit for bit against llama.cpp's tensors.
        pair[0] = x0.mul_add(cs[0], -(x1 * cs[1]));
        pair[1] = x0.mul_add(cs[1], x1 * cs[0]);
    }
}

/// gate ← silu(gate) · up, as ggml's `ggml_vec_swiglu_f32`. The polynomial's `mul_add`s are
/// a libm `fmaf` call each unless the code is compiled for FMA, so this runs in a function
/// that enables FMA when the CPU has it (an FMA is exact either way: same bits, ~10× faster).
fn swiglu(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has FMA.
            return unsafe { swiglu_fma(gate, up) };
        }
    }
    swiglu_portable(gate, up)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn swiglu_fma(gate: &mut [f32], up: &[f32]) {
    swiglu_portable(gate, up)
}

#[inline(always)]
fn swiglu_portable(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// SiLU as ggml's `ggml_v_silu` computes it in `ggml_vec_swiglu_f32` (x / (1 + e^-x) with
/// ggml's `ggml_v_expf` polynomial, not libm's expf), so the feed-forward matches llama.cpp
/// bit for bit. Every operation is element-wise, so this scalar form gives the SIMD result.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + ggml_expf(0.0 - x))
}

/// ggml's `ggml_v_expf` (AVX-512 form), one lane: range reduction by a shifter constant,
/// a degree-5 polynomial, then scaling by 2^n; ±inf/0 past |n| > 192.
#[inline(always)]
fn ggml_expf(x: f32) -> f32 {
    let c = f32::from_bits;
    let shifter = c(0x4B40_0000); // 0x1.8p23
    let z = x.mul_add(c(0x3FB8_AA3B), shifter); // log2(e)
    let n = z - shifter;
    let b = (-n).mul_add(c(0x35BF_BE8E), (-n).mul_add(c(0x3F31_7200), x)); // ln2 hi/lo
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    let u = b * b;
    let j = c(0x3C07_2010)
        .mul_add(b, c(0x3D2B_9F17))
        .mul_add(u, c(0x3E2A_AF33).mul_add(b, c(0x3EFF_FEDB)))
        .mul_add(u, c(0x3F7F_FFF6).mul_add(b, 1.0));
    // _mm512_scalef_ps(j, n): j · 2^n, rounded once (exact while 2^n is a normal f32).
    let n = n as i32;
    if (-126..=127).contains(&n) {
        j * f32::from_bits(((n + 127) as u32) << 23)
    } else {
        (j as f64 * 2f64.powi(n)) as f32
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
