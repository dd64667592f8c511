//! The memory-proportional split exo and llama.cpp use, for comparison.
//!
//! llama.cpp's `--tensor-split` (and its default, by free memory) and exo's placement give
//! each device a share of the layers proportional to its memory, in the order the devices are
//! listed, with no regard to speed, links, the KV cache or the head. Boundaries here are the
//! rounded cumulative shares: node i ends at `round(n_layers × Σ_{j≤i} budget_j / Σ budget)`.

use crate::cost::CostModel;
use crate::search::Layout;

pub(crate) fn proportional_layout(cm: &CostModel) -> Layout {
    let n = u128::from(cm.n_layers());
    let total: u128 = cm
        .nodes
        .iter()
        .map(|node| u128::from(node.memory_budget_bytes))
        .sum();
    if total == 0 {
        return vec![(0, 0, cm.n_layers())];
    }
    let mut layout = Vec::new();
    let mut cumulative = 0u128;
    let mut start = 0u32;
    for (node, profile) in cm.nodes.iter().enumerate() {
        cumulative += u128::from(profile.memory_budget_bytes);
        // Round half up, in integers so the split is exact and platform-independent.
        let end = ((2 * n * cumulative + total) / (2 * total)) as u32;
        if end > start {
            layout.push((node, start, end));
            start = end;
        }
    }
    layout
}
