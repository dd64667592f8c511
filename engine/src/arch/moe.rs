//! The mixture-of-experts feed-forward (Mixtral's `llama` files with experts, `qwen3moe`),
//! as llama.cpp's `build_moe_ffn` computes it for them (softmax gating, weights renormalised
//! over the chosen experts, no weight scale):
//!
//! 1. the router (`ffn_gate_inp`, `count × n_embd`, F32 in real files) gives each row a
//!    logit per expert; `ggml_soft_max` turns them into probabilities;
//! 2. the `used` most probable experts are taken in descending order (`ggml_argsort_top_k`)
//!    and their probabilities divided by their sum (clamped below at 2⁻¹⁴, as there);
//! 3. each chosen expert runs its SwiGLU FFN (`ffn_{gate,up,down}_exps`, one `n_ff × n_embd`
//!    slab per expert in a 3-D tensor) on the rows routed to it, its output scaled by the
//!    row's weight for it;
//! 4. the scaled outputs are added in the order of step 2 (`((e₀ + e₁) + e₂) + …`).
//!
//! A step's rows are grouped by expert, so every expert's matrices are read once per step
//! however many rows chose it (the memory traffic of decode is `used / count` of the
//! experts', which is what the planner prices). Each row's result depends only on that row:
//! the matmul kernels are batch invariant, and a row is gathered, computed and scattered on
//! its own, so a row alone and the same row in a batch are bit-identical.

use crate::attention::reduce16;
use crate::error::Result;
use crate::ops::{ggml_expf, swiglu};
use crate::profile::{Experts, ModelProfile};
use crate::quant::QMatrix;
use crate::source::{load_expert_matrices, load_matrix, TensorSource};
use crate::threads::ComputePool;

/// llama.cpp's floor under the sum of the chosen experts' probabilities (the smallest
/// normal f16), so that renormalising never divides by zero.
const WEIGHT_SUM_MIN: f32 = 6.103_515_6e-5;

/// The GGUF names of block `layer_idx`'s expert FFN tensors, router first.
pub(crate) fn tensor_names(layer_idx: u32) -> [String; 4] {
    ["ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"].map(|role| format!("blk.{layer_idx}.{role}.weight"))
}

/// One block's experts and their router.
pub(crate) struct ExpertFfn {
    /// `count × n_embd`: a logit per expert.
    router: QMatrix,
    gate: Vec<QMatrix>,
    up: Vec<QMatrix>,
    down: Vec<QMatrix>,
    used: usize,
}

impl ExpertFfn {
    pub(crate) fn load(p: &ModelProfile, experts: Experts, layer_idx: u32, source: &mut dyn TensorSource) -> Result<Self> {
        let [router, gate, up, down] = tensor_names(layer_idx);
        let count = experts.count as usize;
        Ok(Self {
            router: load_matrix(source, &router, count, p.n_embd)?,
            gate: load_expert_matrices(source, &gate, count, experts.n_ff, p.n_embd)?,
            up: load_expert_matrices(source, &up, count, experts.n_ff, p.n_embd)?,
            down: load_expert_matrices(source, &down, count, p.n_embd, experts.n_ff)?,
            used: experts.used as usize,
        })
    }

    pub(crate) fn size_in_bytes(&self) -> usize {
        self.router.size_in_bytes()
            + [&self.gate, &self.up, &self.down].iter().flat_map(|m| m.iter()).map(QMatrix::size_in_bytes).sum::<usize>()
    }

    /// `out = MoE(x)` for `n_rows` rows of `n_embd` (`x` normed by the block's `ffn_norm`).
    pub(crate) fn forward(&self, x: &[f32], n_rows: usize, out: &mut [f32], pool: &ComputePool) {
        let n_embd = self.router.n_in();
        let count = self.router.n_out();
        let n_ff = self.gate.first().map_or(0, QMatrix::n_out);
        let mut logits = vec![0f32; n_rows * count];
        self.router.matmul(x, n_rows, &mut logits, pool);
        // routes[row * used + rank] = (expert, weight), best first.
        let routes: Vec<(usize, f32)> = logits.chunks_exact_mut(count).flat_map(|row| route(row, self.used)).collect();

        // Each (row, rank)'s scaled expert output; summed per row in rank order below.
        let mut scaled = vec![0f32; n_rows * self.used * n_embd];
        let (mut input, mut gate, mut up, mut down) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for expert in 0..count {
            let picks: Vec<usize> = (0..routes.len()).filter(|&slot| routes[slot].0 == expert).collect();
            if picks.is_empty() {
                continue;
            }
            let m = picks.len();
            input.clear();
            for &slot in &picks {
                let row = slot / self.used;
                input.extend_from_slice(&x[row * n_embd..(row + 1) * n_embd]);
            }
            gate.resize(m * n_ff, 0.0);
            up.resize(m * n_ff, 0.0);
            down.resize(m * n_embd, 0.0);
            QMatrix::matmul_shared_input(&[&self.gate[expert], &self.up[expert]], &input, m, &mut [&mut gate, &mut up], pool);
            swiglu(&mut gate, &up);
            self.down[expert].matmul(&gate, m, &mut down, pool);
            for (&slot, result) in picks.iter().zip(down.chunks_exact(n_embd)) {
                let weight = routes[slot].1;
                for (o, &v) in scaled[slot * n_embd..(slot + 1) * n_embd].iter_mut().zip(result) {
                    *o = v * weight;
                }
            }
        }
        for (row_out, row_scaled) in out.chunks_exact_mut(n_embd).zip(scaled.chunks_exact(self.used * n_embd)) {
            row_out.copy_from_slice(&row_scaled[..n_embd]);
            for expert_out in row_scaled.chunks_exact(n_embd).skip(1) {
                crate::ops::add_in_place(row_out, expert_out);
            }
        }
    }
}

/// One row's router logits → its `used` experts, most probable first, with their weights
/// (probabilities renormalised over the chosen). `logits` is overwritten with the
/// probabilities.
pub(crate) fn route(logits: &mut [f32], used: usize) -> Vec<(usize, f32)> {
    soft_max(logits);
    let probs: &[f32] = logits;
    let mut order: Vec<usize> = (0..probs.len()).collect();
    // Descending; equal probabilities keep the lower index first (llama.cpp's std::sort
    // leaves ties in no promised order: the random test models keep their choices clear).
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    let chosen = &order[..used.min(order.len())];
    // ggml_sum_rows: summed in f64, rounded once.
    let sum = chosen.iter().map(|&e| probs[e] as f64).sum::<f64>() as f32;
    let sum = sum.max(WEIGHT_SUM_MIN);
    chosen.iter().map(|&e| (e, probs[e] / sum)).collect()
}

/// `ggml_soft_max` over one row in place, as its CPU kernel does it in an AVX-512 build
/// (llama.cpp's reference build here): the maximum subtracted, exponentials of 16 lanes at a
/// time by ggml's polynomial with each group's sum reduced in `_mm512_reduce_add_ps`'s order
/// and added in f64, the rest by libm's `expf`, then every value times 1/sum (in f64, rounded
/// to f32).
pub(crate) fn soft_max(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| if m > v { m } else { v });
    let mut sum = 0f64;
    let groups = x.len() / 16 * 16;
    for group in x[..groups].chunks_exact_mut(16) {
        let mut values = [0f32; 16];
        for (v, g) in values.iter_mut().zip(group.iter_mut()) {
            *v = ggml_expf(*g - max);
            *g = *v;
        }
        sum += reduce16(&values) as f64;
    }
    for v in &mut x[groups..] {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inverse = (1.0 / sum) as f32;
    x.iter_mut().for_each(|v| *v *= inverse);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_keeps_the_order() {
        for n in [8usize, 16, 60, 128] {
            let mut x: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7).collect();
            let before = x.clone();
            soft_max(&mut x);
            let sum: f32 = x.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "n {n}: sum {sum}");
            for i in 0..n {
                for j in 0..n {
                    if before[i] > before[j] {
                        assert!(x[i] >= x[j]);
                    }
                }
            }
        }
    }

    #[test]
    fn route_takes_the_most_probable_and_renormalises() {
        let mut logits = vec![0.1, 3.0, -1.0, 2.0, 0.5, 2.5, -4.0, 0.0];
        let routes = route(&mut logits, 2);
        assert_eq!(routes.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 5]);
        // softmax then renormalising over {3.0, 2.5} is the softmax of those two.
        let e = (-0.5f32).exp();
        assert!((routes[0].1 - 1.0 / (1.0 + e)).abs() < 1e-6, "{routes:?}");
        assert!((routes[0].1 + routes[1].1 - 1.0).abs() < 1e-6);
        let all = route(&mut [0.0, 1.0, 2.0], 3);
        assert_eq!(all.iter().map(|r| r.0).collect::<Vec<_>>(), [2, 1, 0]);
    }
}
