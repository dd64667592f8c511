//! # potluck-shard-planner
//!
//! Pure planning logic (no tokio, no candle, no other workspace crate): given the model's
//! per-layer costs and the nodes' measured profiles it returns contiguous layer ranges.
//!
//! Status: the shard-planner issue builds the cost model and the search. Until then the
//! single-machine case is the only plan: every layer on the one node.

use std::ops::Range;

/// The plan for one machine with no workers: it runs every layer itself.
pub fn single_node_plan(n_layers: u32) -> Vec<Range<u32>> {
    vec![0..n_layers]
}

#[cfg(test)]
mod tests {
    #[test]
    fn single_node_covers_every_layer() {
        assert_eq!(super::single_node_plan(30), vec![0..30]);
    }
}
