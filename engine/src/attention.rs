//! Attention of one query head over a sequence's f16 KV cache, computed the way llama.cpp's
//! CPU flash attention does it (`ggml_compute_forward_flash_attn_ext_f16_one_chunk` in
//! ggml-cpu/ops.cpp, llama-server's default path): K and V in f16, the query rounded to f16,
//! q·k summed in `ggml_vec_dot_f16`'s order (AVX-512 build), an online softmax (running max
//! `M`, running sum `S = fma(S, ms, vs)` as GCC contracts it), and the weighted values
//! accumulated in an **f16** accumulator (`VKQ16`) rounded after every update.
//!
//! Why mirror it operation for operation: the f16 accumulator makes the result jump with
//! ulp-level differences of its inputs, so agreeing with llama.cpp's log-probabilities needs
//! the same roundings in the same order, not just the same math. Checked against llama.cpp's
//! own intermediate tensors (its eval callback, llama-cpp-python 0.3.36): together with the
//! matmul kernels' summation order, RoPE's and SiLU's roundings (model.rs), every layer's
//! output is bit-identical to llama.cpp's, prefill and decode. The SIMD and scalar paths
//! compute the same sums, bit for bit.

use half::f16;

/// out = softmax(q·Kᵀ · scale) · V over `n_pos` positions. `keys`/`values` hold position `t`'s
/// head at `[t * stride + offset ..][..head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn attend_head(
    q: &[f32],
    keys: &[f16],
    values: &[f16],
    stride: usize,
    offset: usize,
    n_pos: usize,
    scale: f32,
    out: &mut [f32],
) {
    let head_dim = q.len();
    assert_eq!(out.len(), head_dim);
    assert!(n_pos == 0 || (n_pos - 1) * stride + offset + head_dim <= keys.len().min(values.len()));
    #[cfg(target_arch = "x86_64")]
    {
        // `Isa::Avx2` and above mean AVX2 + FMA + F16C; `POTLUCK_ISA=scalar` caps this kernel
        // like every other.
        if head_dim % 8 == 0 && crate::quant::Isa::detect() >= crate::quant::Isa::Avx2 {
            // SAFETY: the features are present (checked by `Isa::detect`); bounds are asserted above.
            unsafe { x86::attend_head(q, keys, values, stride, offset, n_pos, scale, out) };
            return;
        }
    }
    attend_head_scalar(q, keys, values, stride, offset, n_pos, scale, out);
}

#[allow(clippy::too_many_arguments)]
fn attend_head_scalar(
    q: &[f32],
    keys: &[f16],
    values: &[f16],
    stride: usize,
    offset: usize,
    n_pos: usize,
    scale: f32,
    out: &mut [f32],
) {
    let head_dim = q.len();
    let q16: Vec<f32> = q.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
    // The f16 accumulator, kept as f32 values that are always f16-representable.
    let mut acc = vec![0f32; head_dim];
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
    for t in 0..n_pos {
        let base = t * stride + offset;
        let k = &keys[base..base + head_dim];
        let s = dot_f16_ggml(&q16, k) * scale;
        let (mut ms, mut vs) = (1f32, 1f32);
        if s > max {
            let old = max;
            max = s;
            ms = (old - max).exp();
            for a in &mut acc {
                *a = f16::from_f32(*a * ms).to_f32();
            }
        } else {
            vs = (s - max).exp();
        }
        let v = &values[base..base + head_dim];
        for (a, b) in acc.iter_mut().zip(v) {
            *a = f16::from_f32(b.to_f32().mul_add(vs, *a)).to_f32();
        }
        // `S = S*ms + vs` in ggml, contracted to one FMA by GCC (C++, -ffp-contract=fast).
            sum = sum.mul_add(ms, vs);
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = a * inv;
    }
}

/// q·k summed in the order of ggml's `ggml_vec_dot_f16` as built for AVX-512 (the reference
/// machine): per 64 values, four accumulators of 16 lanes (`sum[j] = fma(x, y, sum[j])`),
/// then `(s0 + s2) + (s1 + s3)` and GCC's `_mm512_reduce_add_ps` tree; the tail (head_dim not
/// a multiple of 64) in f64 as ggml adds it. The SIMD path computes the same sums.
fn dot_f16_ggml(q16: &[f32], k: &[f16]) -> f32 {
    let n64 = q16.len() / 64 * 64;
    let mut acc = [[0f32; 16]; 4];
    for step in (0..n64).step_by(64) {
        for (j, lanes) in acc.iter_mut().enumerate() {
            for (i, a) in lanes.iter_mut().enumerate() {
                let idx = step + j * 16 + i;
                *a = q16[idx].mul_add(k[idx].to_f32(), *a);
            }
        }
    }
    let mut x = [0f32; 16];
    for i in 0..16 {
        x[i] = (acc[0][i] + acc[2][i]) + (acc[1][i] + acc[3][i]);
    }
    let sum = reduce16(&x) as f64;
    let tail: f64 = (n64..q16.len()).map(|i| (q16[i] * k[i].to_f32()) as f64).sum();
    (sum + tail) as f32
}

/// GCC's `_mm512_reduce_add_ps`: lanes i + (i+8), then i + (i+4), then (0+2) + (1+3).
pub(crate) fn reduce16(x: &[f32; 16]) -> f32 {
    let mut t3 = [0f32; 8];
    for i in 0..8 {
        t3[i] = x[i + 8] + x[i];
    }
    let mut t6 = [0f32; 4];
    for i in 0..4 {
        t6[i] = t3[i + 4] + t3[i];
    }
    (t6[0] + t6[2]) + (t6[1] + t6[3])
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    /// Round 8 f32 lanes to f16 precision (round to nearest even, as `_mm256_cvtps_ph(x, 0)`
    /// in ggml's `GGML_F32Cx8_STORE`).
    #[inline(always)]
    unsafe fn round_f16(x: __m256) -> __m256 {
        _mm256_cvtph_ps(_mm256_cvtps_ph::<0>(x))
    }

    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    #[inline(always)]
    unsafe fn hsum(x: __m256) -> f32 {
        let hi = _mm256_extractf128_ps::<1>(x);
        let lo = _mm256_castps256_ps128(x);
        let s = _mm_add_ps(hi, lo);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Head dimensions up to this many lanes of 8 keep the accumulator in registers.
    const LANES_MAX: usize = 32; // head_dim ≤ 256

    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn attend_head(
        q: &[f32],
        keys: &[f16],
        values: &[f16],
        stride: usize,
        offset: usize,
        n_pos: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let lanes = q.len() / 8;
        if lanes > LANES_MAX {
            return super::attend_head_scalar(q, keys, values, stride, offset, n_pos, scale, out);
        }
        let mut q16 = [_mm256_setzero_ps(); LANES_MAX];
        let mut acc = [_mm256_setzero_ps(); LANES_MAX];
        for l in 0..lanes {
            q16[l] = round_f16(_mm256_loadu_ps(q.as_ptr().add(l * 8)));
        }
        let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
        for t in 0..n_pos {
            let base = t * stride + offset;
            let k = keys.as_ptr().add(base);
            let s = if lanes % 8 == 0 {
                // ggml_vec_dot_f16's order (see `dot_f16_ggml`): per 64 values, accumulator j
                // holds lanes j*16 .. j*16+15 as two 8-lane halves.
                let mut acc = [_mm256_setzero_ps(); 8];
                for step in 0..lanes / 8 {
                    for (h, a) in acc.iter_mut().enumerate() {
                        let l = step * 8 + h;
                        *a = _mm256_fmadd_ps(q16[l], load_f16(k.add(l * 8)), *a);
                    }
                }
                // acc[2j] = accumulator j lanes 0-7, acc[2j+1] = lanes 8-15.
                let lo = _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6]));
                let hi = _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7]));
                // _mm512_reduce_add_ps: (i + i+8), then the 8-lane tree of `hsum`.
                hsum(_mm256_add_ps(hi, lo)) * scale
            } else {
                let q: Vec<f32> = (0..lanes).flat_map(|l| {
                    let mut tmp = [0f32; 8];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), q16[l]);
                    tmp
                }).collect();
                super::dot_f16_ggml(&q, std::slice::from_raw_parts(k, lanes * 8)) * scale
            };
            let (mut ms, mut vs) = (1f32, 1f32);
            if s > max {
                let old = max;
                max = s;
                ms = (old - max).exp();
                let msv = _mm256_set1_ps(ms);
                for a in acc.iter_mut().take(lanes) {
                    *a = round_f16(_mm256_mul_ps(*a, msv));
                }
            } else {
                vs = (s - max).exp();
            }
            let vsv = _mm256_set1_ps(vs);
            let v = values.as_ptr().add(base);
            for (l, a) in acc.iter_mut().take(lanes).enumerate() {
                *a = round_f16(_mm256_fmadd_ps(load_f16(v.add(l * 8)), vsv, *a));
            }
            // `S = S*ms + vs` in ggml, contracted to one FMA by GCC (C++, -ffp-contract=fast).
            sum = sum.mul_add(ms, vs);
        }
        let inv = _mm256_set1_ps(if sum == 0.0 { 0.0 } else { 1.0 / sum });
        for l in 0..lanes {
            _mm256_storeu_ps(out.as_mut_ptr().add(l * 8), _mm256_mul_ps(acc[l], inv));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_and_scalar_agree_and_match_exact_softmax() {
        let head_dim = 64;
        let n_pos = 37;
        let stride = 3 * head_dim;
        let offset = head_dim;
        let gen = |i: usize| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.8;
        let q: Vec<f32> = (0..head_dim).map(|i| gen(i + 11)).collect();
        let keys: Vec<f16> = (0..n_pos * stride).map(|i| f16::from_f32(gen(i + 101))).collect();
        let values: Vec<f16> = (0..n_pos * stride).map(|i| f16::from_f32(gen(i + 5003))).collect();
        let scale = 0.125;
        let mut simd = vec![0f32; head_dim];
        let mut scalar = vec![0f32; head_dim];
        attend_head(&q, &keys, &values, stride, offset, n_pos, scale, &mut simd);
        attend_head_scalar(&q, &keys, &values, stride, offset, n_pos, scale, &mut scalar);
        // Exact f32 softmax attention for comparison.
        let scores: Vec<f32> = (0..n_pos)
            .map(|t| (0..head_dim).map(|d| q[d] * keys[t * stride + offset + d].to_f32()).sum::<f32>() * scale)
            .collect();
        let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
        let total: f32 = w.iter().sum();
        for d in 0..head_dim {
            let exact: f32 = (0..n_pos).map(|t| w[t] * values[t * stride + offset + d].to_f32()).sum::<f32>() / total;
            assert_eq!(simd[d].to_bits(), scalar[d].to_bits(), "simd {} scalar {}", simd[d], scalar[d]);
            // f16 query and accumulator: about 3 significant digits.
            assert!((simd[d] - exact).abs() < 1e-2, "simd {} exact {}", simd[d], exact);
        }
    }
}
