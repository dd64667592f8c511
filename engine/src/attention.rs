//! Attention of one query head over a sequence's f16 KV cache: an online softmax (running
//! max `M`, running sum `S`) over the positions, accumulating the weighted values in f32.
//!
//! K and V are stored in f16 as llama.cpp's default cache does (half the memory of f32).
//! We deliberately do *not* copy one detail of llama.cpp's CPU flash-attention
//! (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`): it rounds the query to f16 and
//! keeps the value accumulator in f16, rounding after every position. Rounding makes the
//! result a discontinuous function of its inputs: measured on the reference model, an
//! f16 accumulator turns ulp-level differences (SIMD vs scalar summation order) into
//! log-probability differences of up to 0.1 nats, and llama.cpp itself moves by up to
//! 0.22 nats between its flash and non-flash paths. With an f32 accumulator our scalar,
//! AVX2 and AVX-512 paths agree to 0.003 nats. See docs/benchmarks.md ("agreement").

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
        if head_dim % 8 == 0
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the features are present; bounds are asserted above.
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
    let mut acc = vec![0f32; head_dim];
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
    for t in 0..n_pos {
        let base = t * stride + offset;
        let k = &keys[base..base + head_dim];
        let s = q.iter().zip(k).map(|(a, b)| a * b.to_f32()).sum::<f32>() * scale;
        let (mut ms, mut vs) = (1f32, 1f32);
        if s > max {
            let old = max;
            max = s;
            ms = (old - max).exp();
            for a in &mut acc {
                *a *= ms;
            }
        } else {
            vs = (s - max).exp();
        }
        let v = &values[base..base + head_dim];
        for (a, b) in acc.iter_mut().zip(v) {
            *a = b.to_f32().mul_add(vs, *a);
        }
        sum = sum * ms + vs;
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = a * inv;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

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
        let mut qv = [_mm256_setzero_ps(); LANES_MAX];
        let mut acc = [_mm256_setzero_ps(); LANES_MAX];
        for l in 0..lanes {
            qv[l] = _mm256_loadu_ps(q.as_ptr().add(l * 8));
        }
        let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
        for t in 0..n_pos {
            let base = t * stride + offset;
            let k = keys.as_ptr().add(base);
            let mut dot = _mm256_setzero_ps();
            for l in 0..lanes {
                dot = _mm256_fmadd_ps(qv[l], load_f16(k.add(l * 8)), dot);
            }
            let s = hsum(dot) * scale;
            let (mut ms, mut vs) = (1f32, 1f32);
            if s > max {
                let old = max;
                max = s;
                ms = (old - max).exp();
                let msv = _mm256_set1_ps(ms);
                for a in acc.iter_mut().take(lanes) {
                    *a = _mm256_mul_ps(*a, msv);
                }
            } else {
                vs = (s - max).exp();
            }
            let vsv = _mm256_set1_ps(vs);
            let v = values.as_ptr().add(base);
            for (l, a) in acc.iter_mut().take(lanes).enumerate() {
                *a = _mm256_fmadd_ps(load_f16(v.add(l * 8)), vsv, *a);
            }
            sum = sum * ms + vs;
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
            assert!((simd[d] - scalar[d]).abs() < 1e-5, "simd {} scalar {}", simd[d], scalar[d]);
            assert!((simd[d] - exact).abs() < 1e-5, "simd {} exact {}", simd[d], exact);
        }
    }
}
