//! Re-planning after a membership change: prefer the plan that moves the fewest weights
//! unless the fastest plan is materially faster.
//!
//! Candidates: the new optimum; the previous layout unchanged (if all its nodes remain, it
//! still fits and it keeps the pinned first node); the previous order's surviving nodes with
//! the layers re-split by the DP. Among those predicted within
//! [`REPLAN_GAIN_FRACTION_MIN`] of the optimum's tokens/s, the one moving the fewest bytes
//! wins (then the faster, then the earlier in that list).

use std::collections::BTreeMap;

use crate::cost::CostModel;
use crate::limits::REPLAN_GAIN_FRACTION_MIN;
use crate::plan::{Plan, Replan, ReplanDecision};
use crate::search::{layout_cost_s, solve_order, Layout};

/// What a node held in the previous plan.
struct Held {
    start: u32,
    end: u32,
    embedding: bool,
    head: bool,
}

/// Weight bytes a layout needs to send to nodes that did not hold them before.
fn moved_bytes(cm: &CostModel, previous: &BTreeMap<&str, Held>, layout: &Layout) -> u64 {
    let n = cm.n_layers();
    let mut moved = 0u64;
    for &(node, start, end) in layout {
        let held = previous.get(cm.nodes[node].id.as_str());
        for layer_idx in start..end {
            if !held.is_some_and(|h| (h.start..h.end).contains(&layer_idx)) {
                moved = moved.saturating_add(cm.model.layer_weight_bytes[layer_idx as usize]);
            }
        }
        let new_embedding = start == 0 && !held.is_some_and(|h| h.embedding);
        let new_head = end == n && !held.is_some_and(|h| h.head);
        moved = moved.saturating_add(cm.model.ends_weight_bytes(new_embedding, new_head));
    }
    moved
}

/// The previous plan as a layout over the current nodes, if every stage's node remains and
/// the stages still tile this model's layers.
fn previous_layout(cm: &CostModel, previous: &Plan) -> Option<Layout> {
    let mut layout = Vec::with_capacity(previous.stages.len());
    let mut expected_start = 0;
    for stage in &previous.stages {
        let node = cm.nodes.iter().position(|n| n.id == stage.node_id)?;
        if stage.layers.start != expected_start || stage.layers.end <= stage.layers.start {
            return None;
        }
        expected_start = stage.layers.end;
        layout.push((node, stage.layers.start, stage.layers.end));
    }
    (expected_start == cm.n_layers()).then_some(layout)
}

/// Chooses between the optimum and the previous plan's layouts. Returns the layout, its
/// cost, and the record of the decision.
pub(crate) fn choose(
    cm: &CostModel,
    first: Option<usize>,
    previous: &Plan,
    optimum: (f64, Layout),
) -> (f64, Layout, Replan) {
    // A different model (even with as many layers) shares no weights with the old plan.
    let same_model = previous.n_layers == cm.n_layers() && previous.model_name == cm.model.name;
    let held: BTreeMap<&str, Held> = if same_model {
        previous
            .stages
            .iter()
            .map(|stage| {
                let held = Held {
                    start: stage.layers.start,
                    end: stage.layers.end,
                    embedding: stage.holds_embedding,
                    head: stage.holds_head,
                };
                (stage.node_id.as_str(), held)
            })
            .collect()
    } else {
        BTreeMap::new()
    };
    let pinned_ok = |layout: &Layout| first.is_none_or(|node| layout[0].0 == node);

    let mut candidates: Vec<(ReplanDecision, f64, Layout)> = Vec::new();
    if same_model {
        if let Some(layout) = previous_layout(cm, previous) {
            let fits = layout
                .iter()
                .all(|&(node, start, end)| cm.stage_fits(node, start, end));
            if fits && pinned_ok(&layout) {
                candidates.push((
                    ReplanDecision::KeptPrevious,
                    layout_cost_s(cm, &layout),
                    layout,
                ));
            }
        }
        let survivors: Vec<usize> = previous
            .stages
            .iter()
            .filter_map(|stage| cm.nodes.iter().position(|n| n.id == stage.node_id))
            .collect();
        if let Some((cost_s, layout)) = solve_order(cm, &survivors) {
            if pinned_ok(&layout) {
                candidates.push((ReplanDecision::ResplitPreviousOrder, cost_s, layout));
            }
        }
    }
    let (optimum_cost_s, optimum_layout) = optimum;
    let optimum_moved = moved_bytes(cm, &held, &optimum_layout);
    candidates.push((ReplanDecision::NewOptimum, optimum_cost_s, optimum_layout));

    // Tokens/s within the threshold of the optimum's: time ≤ optimum × (1 + threshold).
    let acceptable_s = optimum_cost_s * (1.0 + REPLAN_GAIN_FRACTION_MIN);
    let (decision, cost_s, layout, moved) = candidates
        .into_iter()
        .filter(|(decision, cost_s, _)| {
            *decision == ReplanDecision::NewOptimum || *cost_s <= acceptable_s
        })
        .map(|(decision, cost_s, layout)| {
            let moved = moved_bytes(cm, &held, &layout);
            (decision, cost_s, layout, moved)
        })
        // `min_by` keeps the first of equals: the list is in order of preference.
        .min_by(|a, b| a.3.cmp(&b.3).then(a.1.total_cmp(&b.1)))
        .expect("the optimum is always a candidate");
    let replan = Replan {
        decision,
        moved_bytes: moved,
        optimum_token_time_ms: optimum_cost_s * 1e3,
        optimum_moved_bytes: optimum_moved,
        gain_fraction_min: REPLAN_GAIN_FRACTION_MIN,
    };
    (cost_s, layout, replan)
}
