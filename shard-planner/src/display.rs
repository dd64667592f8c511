//! The plan as a table for people (the CLI, logs); the dashboard reads the serde form.

use std::fmt;

use crate::limits::REPLAN_GAIN_FRACTION_MIN;
use crate::plan::{ExclusionReason, Plan, PlanMethod, ReplanDecision};

/// Bytes in binary units, two decimals: "39.62 GiB", "512.00 MiB", "8.00 KiB", "12 B".
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if bytes >= size {
            return format!("{:.2} {unit}", bytes as f64 / size as f64);
        }
    }
    format!("{bytes} B")
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let method = match &self.method {
            PlanMethod::Exhaustive { orders_evaluated } => {
                format!("exhaustive search, {orders_evaluated} orders")
            }
            PlanMethod::Heuristic { orders_evaluated } => {
                format!("heuristic search, {orders_evaluated} orders")
            }
            PlanMethod::MemoryProportional => "layers ∝ memory, in the given node order".into(),
            PlanMethod::Given => "given layout".into(),
        };
        let method = match self.objective {
            crate::cluster::Objective::Latency => method,
            crate::cluster::Objective::Throughput => format!(
                "{method}, for throughput (bottleneck {:.1} ms: the slowest stage or hop)",
                self.bottleneck_ms()
            ),
        };
        writeln!(
            f,
            "{} · {} layers · context {} × {} sequence{} · {} stage{} · {}",
            self.model_name,
            self.n_layers,
            self.context_tokens,
            self.sequences,
            if self.sequences == 1 { "" } else { "s" },
            self.stages.len(),
            if self.stages.len() == 1 { "" } else { "s" },
            method,
        )?;
        writeln!(
            f,
            "predicted {:.1} ms/token = {:.2} tokens/s ({:.1} ms of it in hops){}",
            self.token_time_ms,
            self.tokens_per_s,
            self.hops_time_ms(),
            if self.fits {
                ""
            } else {
                " — DOES NOT FIT: a stage is over its budget"
            },
        )?;
        let rows: Vec<[String; 9]> = self
            .stages
            .iter()
            .enumerate()
            .map(|(i, stage)| {
                let ends = match (stage.holds_embedding, stage.holds_head) {
                    (true, true) => " +emb +head",
                    (true, false) => " +emb",
                    (false, true) => " +head",
                    (false, false) => "",
                };
                let (hop, to) = match &stage.hop {
                    Some(hop) => (
                        format!("{:.2}", hop.time_ms),
                        format!("→ {}", hop.to_node_id),
                    ),
                    None => ("-".into(), String::new()),
                };
                [
                    i.to_string(),
                    stage.node_id.clone(),
                    stage.backend.as_str().into(),
                    format!("{}..{}{ends}", stage.layers.start, stage.layers.end),
                    format!(
                        "{} / {}{}",
                        format_bytes(stage.memory_used_bytes),
                        format_bytes(stage.memory_budget_bytes),
                        if stage.fits { "" } else { " OVER" }
                    ),
                    format_bytes(stage.kv_cache_bytes),
                    format!("{:.2}", stage.stage_time_ms),
                    hop,
                    to,
                ]
            })
            .collect();
        let header = [
            "stage",
            "node",
            "backend",
            "layers",
            "memory used / budget",
            "of it KV",
            "stage ms",
            "hop ms",
            "hop to",
        ]
        .map(String::from);
        let mut widths = header.clone().map(|h| h.chars().count());
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        for row in std::iter::once(&header).chain(&rows) {
            let mut line = String::new();
            for (column, (cell, width)) in row.iter().zip(widths).enumerate() {
                // Text columns left-aligned, numbers right-aligned.
                let numeric = matches!(column, 0 | 6 | 7);
                let pad = width - cell.chars().count();
                if numeric {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                }
                line.push_str("  ");
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        for excluded in &self.excluded {
            let why = match &excluded.reason {
                ExclusionReason::CannotHoldOneLayer { needed_bytes, budget_bytes } => format!(
                    "cannot hold one layer with its KV cache ({} needed, budget {})",
                    format_bytes(*needed_bytes),
                    format_bytes(*budget_bytes)
                ),
                ExclusionReason::SlowsPipeline { best_token_time_ms_with_node } => match self.objective {
                    crate::cluster::Objective::Latency => format!(
                        "would slow the pipeline: the best plan using it predicts {:.1} ms/token (+{:.1} ms)",
                        best_token_time_ms_with_node,
                        best_token_time_ms_with_node - self.token_time_ms
                    ),
                    // Under the throughput objective the search's costs are bottlenecks.
                    crate::cluster::Objective::Throughput => format!(
                        "would not lower the bottleneck: the best plan using it has {:.1} ms (+{:.1} ms)",
                        best_token_time_ms_with_node,
                        best_token_time_ms_with_node - self.bottleneck_ms()
                    ),
                },
                ExclusionReason::NoFeasiblePlanWithNode => {
                    "no plan that uses it fits in the cluster's memory".into()
                }
                ExclusionReason::PreviousPlanKept { optimum_token_time_ms } => format!(
                    "kept the previous plan: the optimum using it ({optimum_token_time_ms:.1} ms/token) \
                     is less than {:.0}% faster",
                    REPLAN_GAIN_FRACTION_MIN * 100.0
                ),
                ExclusionReason::NoProportionalShare => {
                    "its memory share rounds to zero layers".into()
                }
            };
            writeln!(f, "left out: {} — {why}", excluded.node_id)?;
        }
        if let Some(replan) = &self.replan {
            let decision = match replan.decision {
                ReplanDecision::KeptPrevious => "kept the previous plan",
                ReplanDecision::ResplitPreviousOrder => "re-split the previous order",
                ReplanDecision::NewOptimum => "moved to the new optimum",
            };
            writeln!(
                f,
                "re-plan: {decision}, moving {} (the optimum: {:.1} ms/token, moving {}; a move must \
                 gain ≥ {:.0}%)",
                format_bytes(replan.moved_bytes),
                replan.optimum_token_time_ms,
                format_bytes(replan.optimum_moved_bytes),
                replan.gain_fraction_min * 100.0
            )?;
        }
        Ok(())
    }
}
