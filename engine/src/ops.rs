//! The element-wise and row-wise operations every architecture shares: norms, RoPE in both
//! of llama.cpp's layouts, activations, the residual add. Each matches the ggml kernel it
//! names bit for bit on the CPU (the reference-model test checks the llama path).

use half::f16;

use crate::profile::{ModelProfile, RopeScaling};
use crate::quant::Isa;

/// cos/sin pairs for every row's position: `[row][pair] = (cos, sin)` flattened, `n_rot`
/// floats per row. Computed as ggml's `ggml_rope_cache_init` does (theta advanced by
/// repeated multiplication in f32), so positions rotate bit-for-bit like llama.cpp's.
/// `freq_factors` are Llama-3's per-pair divisors (`rope_freqs.weight`), if the model has them.
/// The model's scaling (linear, YaRN) and `rope.scaling.attn_factor` are applied as llama.cpp
/// applies them.
pub fn rope_table(p: &ModelProfile, freq_factors: Option<&[f32]>, positions: &[usize]) -> Vec<f32> {
    let freq_scale = p.rope_scaling.freq_scale();
    let yarn = match p.rope_scaling {
        RopeScaling::Yarn { original_context, .. } => {
            Yarn::new(p.n_rot, original_context, p.rope_freq_base, freq_scale, p.rope_attn_factor)
        }
        _ => Yarn::off(p.rope_attn_factor),
    };
    rope_table_with(p.rope_freq_base, freq_scale, p.n_rot, freq_factors, yarn, positions)
}

/// ggml's `rope_yarn` parameters for one model, as llama.cpp fixes them when it creates a
/// context (`llama_context`'s constructor, then `ggml_rope_yarn_corr_dims`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Yarn {
    /// The dimension pairs between which the angles ramp from extrapolated to interpolated.
    corr_dims: [f32; 2],
    /// 1 with YaRN (llama.cpp's default for a YaRN file), 0 without: then no ramp.
    ext_factor: f32,
    /// What every cos/sin is multiplied by (before YaRN's own magnitude factor).
    attn_factor: f32,
}

impl Yarn {
    /// llama.cpp's β_fast and β_slow: it reads no file key for them.
    const BETA_FAST: f32 = 32.0;
    const BETA_SLOW: f32 = 1.0;

    /// No YaRN: the angles as they are, cos/sin times `attn_factor`.
    pub fn off(attn_factor: f32) -> Self {
        Self { corr_dims: [0.0, 0.0], ext_factor: 0.0, attn_factor }
    }

    /// YaRN over `n_rot` dimensions for a model trained at `original_context` positions with
    /// RoPE base `base`, stretched by `1 / freq_scale`. The attention factor is computed as
    /// llama.cpp's context does it (`get_mscale(factor, 1)`, then divided by the `1 + 0.1·ln`
    /// that ggml's `rope_yarn` multiplies back, times the file's `attn_factor`), in plain f32
    /// arithmetic: that file is compiled without FMA contraction.
    pub fn new(n_rot: usize, original_context: u32, base: f32, freq_scale: f32, rope_attn_factor: f32) -> Self {
        // ggml_rope_yarn_corr_dim: n_dims · ln(n_ctx_orig / (β · 2π)) / (2 · ln(base)).
        let corr_dim = |beta: f32| {
            n_rot as f32 * (original_context as f32 / (beta * 2.0 * std::f32::consts::PI)).ln() / (2.0 * base.ln())
        };
        let start = corr_dim(Self::BETA_FAST).floor();
        let end = corr_dim(Self::BETA_SLOW).ceil();
        let corr_dims = [if start > 0.0 { start } else { 0.0 }, if end < (n_rot as f32 - 1.0) { end } else { n_rot as f32 - 1.0 }];
        let factor = 1.0 / freq_scale;
        let mut attn_factor = if factor <= 1.0 { 1.0 } else { 0.1 * factor.ln() + 1.0 };
        attn_factor *= 1.0 / (1.0 + 0.1 * factor.ln());
        attn_factor *= rope_attn_factor;
        Self { corr_dims, ext_factor: 1.0, attn_factor }
    }

    /// ggml's `rope_yarn` for pair `pair` (i0 = 2·pair): (cos, sin) of the blended angle, times
    /// the magnitude factor. ggml-cpu is compiled with FMA contraction, hence the `mul_add`s.
    #[inline(always)]
    fn cos_sin(&self, theta_extrap: f32, freq_scale: f32, pair: usize) -> (f32, f32) {
        let theta_interp = freq_scale * theta_extrap;
        let mut theta = theta_interp;
        let mut mscale = self.attn_factor;
        if self.ext_factor != 0.0 {
            let [low, high] = self.corr_dims;
            let y = (pair as f32 - low) / (high - low).max(0.001);
            let ramp_mix = (1.0 - y.clamp(0.0, 1.0)) * self.ext_factor;
            theta = theta_interp.mul_add(1.0 - ramp_mix, theta_extrap * ramp_mix);
            mscale *= 0.1f32.mul_add((1.0 / freq_scale).ln(), 1.0);
        }
        (theta.cos() * mscale, theta.sin() * mscale)
    }
}

/// [`rope_table`] for an explicit base, frequency scale and YaRN (Gemma 3's local layers
/// rotate with their own base, unscaled).
pub fn rope_table_with(base: f32, freq_scale: f32, n_rot: usize, freq_factors: Option<&[f32]>, yarn: Yarn, positions: &[usize]) -> Vec<f32> {
    let theta_scale = base.powf(-2.0 / n_rot as f32);
    let mut table = vec![0f32; positions.len() * n_rot];
    for (row, &pos) in table.chunks_exact_mut(n_rot).zip(positions) {
        let mut theta = pos as f32;
        for (pair, cs) in row.chunks_exact_mut(2).enumerate() {
            let ff = freq_factors.map_or(1.0, |f| f[pair]);
            (cs[0], cs[1]) = yarn.cos_sin(theta / ff, freq_scale, pair);
            theta *= theta_scale;
        }
    }
    table
}

/// RMSNorm of every row of `x` times `weight`, into `out`, as ggml's
/// `ggml_compute_forward_rms_norm_f32` then `ggml_mul`: squares in f32, summed in f64.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    for (row, out_row) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let scale = rms_scale(row, eps);
        for ((o, &v), &w) in out_row.iter_mut().zip(row).zip(weight) {
            *o = v * scale * w;
        }
    }
}

/// [`rms_norm`] in place (per-head Q/K norms: rows of `head_dim`), the same roundings.
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(weight.len()) {
        let scale = rms_scale(row, eps);
        for (v, &w) in row.iter_mut().zip(weight) {
            *v = *v * scale * w;
        }
    }
}

/// 1/√(mean of squares + eps): squares in f32, summed in f64, as ggml.
#[inline(always)]
fn rms_scale(row: &[f32], eps: f32) -> f32 {
    let sum: f64 = row.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / row.len() as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

/// Rotates adjacent pairs (x[2i], x[2i+1]) of the first `n_rot` dims by the row's angles:
/// llama.cpp's `LLAMA_ROPE_TYPE_NORM` (llama, mistral: convert_hf_to_gguf.py permutes their
/// Q/K rows so that HF's halves become adjacent pairs).
pub fn apply_rope(head: &mut [f32], cos_sin: &[f32]) {
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
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        // `Isa::Avx2` and above imply FMA; `POTLUCK_ISA=scalar` caps this kernel too.
        if Isa::detect() >= Isa::Avx2 {
            // SAFETY: the CPU has FMA (checked by `Isa::detect`).
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
pub(crate) fn ggml_expf(x: f32) -> f32 {
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

/// gate ← gelu(gate) · up, as ggml's `ggml_vec_geglu_f32` with `GGML_GELU_FP16` (its CPU
/// default): the gate is rounded to f16 and looked up in a table of GELU (tanh form) values
/// stored as f16; beyond ±10 it is 0 or the identity.
pub fn geglu(gate: &mut [f32], up: &[f32]) {
    let table = gelu_f16_table();
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x * u
        } else {
            f16::from_bits(table[f16::from_f32(x).to_bits() as usize]).to_f32() * u
        };
    }
}

/// ggml's `ggml_table_gelu_f16`: for every f16 bit pattern, GELU of its value rounded to f16.
/// Built once (65,536 entries, 128 KiB), as `ggml_cpu_init` builds it.
fn gelu_f16_table() -> &'static [u16] {
    static TABLE: std::sync::OnceLock<Vec<u16>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| (0..=u16::MAX).map(|bits| f16::from_f32(gelu(f16::from_bits(bits).to_f32())).to_bits()).collect())
}

/// ggml's `ggml_gelu_f32`: 0.5·x·(1 + tanh(√(2/π)·x·(1 + 0.044715·x²))), with libm's tanhf.
/// `1 + a·x·x` is one fused multiply-add, as GCC contracts it in ggml-cpu.c's table init.
#[allow(clippy::excessive_precision)]
fn gelu(x: f32) -> f32 {
    const GELU_COEF_A: f32 = 0.044715;
    // ggml's literal, rounded to f32 by the compiler as there.
    const SQRT_2_OVER_PI: f32 = 0.797_884_560_802_865_355_879_892_119_868_76;
    let inner = (GELU_COEF_A * x).mul_add(x, 1.0);
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * inner).tanh())
}

pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Rotates the pairs (x[i], x[i + n_rot/2]) of the first `n_rot` dims by the row's angles:
/// llama.cpp's `LLAMA_ROPE_TYPE_NEOX` (Qwen2/3, Gemma, Phi-3, GPT-NeoX: their Q/K rows are
/// not permuted, so RoPE rotates the two halves of the rotated dims against each other).
/// Pair `i` uses angle `i`, as in `rotate_pairs` with `n_offset = n_dims / 2`.
pub fn apply_rope_neox(head: &mut [f32], cos_sin: &[f32]) {
    let half = cos_sin.len() / 2;
    for (i, cs) in cos_sin.chunks_exact(2).enumerate() {
        let (x0, x1) = (head[i], head[i + half]);
        head[i] = x0.mul_add(cs[0], -(x1 * cs[1]));
        head[i + half] = x0.mul_add(cs[1], x1 * cs[0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both layouts rotate the same pairs of values by the same angles; only which dims form
    /// a pair differs. Permuting the input into the other layout must give the permuted
    /// output, bit for bit.
    #[test]
    fn neox_rope_is_adjacent_rope_on_permuted_dims() {
        let n_rot = 8;
        let cos_sin: Vec<f32> = (0..n_rot).map(|i| if i % 2 == 0 { (i as f32 * 0.3).cos() } else { (i as f32 * 0.3).sin() }).collect();
        let x: Vec<f32> = (0..n_rot).map(|i| i as f32 * 0.7 - 2.0).collect();
        let mut neox = x.clone();
        apply_rope_neox(&mut neox, &cos_sin);
        // adjacent layout: pair i = (x[i], x[i + half]) interleaved.
        let half = n_rot / 2;
        let mut adjacent: Vec<f32> = (0..half).flat_map(|i| [x[i], x[i + half]]).collect();
        apply_rope(&mut adjacent, &cos_sin);
        for i in 0..half {
            assert_eq!(neox[i].to_bits(), adjacent[2 * i].to_bits());
            assert_eq!(neox[i + half].to_bits(), adjacent[2 * i + 1].to_bits());
        }
        assert_ne!(neox, x, "it rotated something");
    }

    /// YaRN at Qwen2.5's long-context setting (factor 4 over 32768 positions, base 10⁶, 128
    /// rotated dims): the ramp runs between the dims the formula gives, angles below it are
    /// kept (extrapolated), above it divided by the factor (interpolated), and every cos/sin
    /// carries YaRN's 1 + 0.1·ln 4.
    #[test]
    fn yarn_ramps_between_its_correction_dims() {
        let (n_rot, base, factor) = (128usize, 1e6f32, 4.0f32);
        let yarn = Yarn::new(n_rot, 32_768, base, 1.0 / factor, 1.0);
        // n·ln(32768 / (β·2π)) / (2·ln 10⁶): 23.59 for β = 32 (floored), 39.65 for β = 1 (ceiled).
        assert_eq!(yarn.corr_dims, [23.0, 40.0]);
        let mscale = 1.0 + 0.1 * factor.ln();
        let pos = 1000usize;
        let table = rope_table_with(base, 1.0 / factor, n_rot, None, yarn, &[pos]);
        let theta = |pair: usize| pos as f64 * (base as f64).powf(-2.0 * pair as f64 / n_rot as f64);
        for (pair, cs) in table.chunks_exact(2).enumerate() {
            let angle = match pair {
                p if p <= 23 => theta(p),
                p if p >= 40 => theta(p) / factor as f64,
                _ => continue,
            };
            assert!((cs[0] as f64 - angle.cos() * mscale as f64).abs() < 2e-3, "pair {pair}: {cs:?}");
            assert!((cs[1] as f64 - angle.sin() * mscale as f64).abs() < 2e-3, "pair {pair}: {cs:?}");
        }
        // Without YaRN the table is plain RoPE's: cos² + sin² = 1.
        let plain = rope_table_with(base, 1.0, n_rot, None, Yarn::off(1.0), &[pos]);
        assert!(plain.chunks_exact(2).all(|cs| (cs[0] * cs[0] + cs[1] * cs[1] - 1.0).abs() < 1e-5));
    }

    #[test]
    fn rms_norm_of_a_constant_row_is_the_weight() {
        let x = [3.0f32; 4];
        let w = [1.0, 2.0, 0.5, -1.0];
        let mut out = [0f32; 4];
        rms_norm(&x, &w, 0.0, &mut out);
        assert_eq!(out, w);
    }
}
