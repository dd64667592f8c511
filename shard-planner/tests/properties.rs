//! Property tests: the planner against brute force on small instances.
//!
//! The brute force enumerates every ordered subset of nodes and every way to cut the layers
//! into that many non-empty contiguous ranges, prices each with `evaluate` (the same cost
//! model, applied stage by stage) and keeps the fastest that fits.

use std::ops::Range;

use potluck_shard_planner::{
    evaluate, plan, proportional_plan, Backend, LinkMatrix, LinkProfile, ModelProfile, NodeProfile,
    Plan, PlanError, PlanRequest, Workload,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Instance {
    model: ModelProfile,
    nodes: Vec<NodeProfile>,
    links: LinkMatrix,
    workload: Workload,
    first: Option<usize>,
}

impl Instance {
    fn request(&self) -> PlanRequest<'_> {
        let mut request = PlanRequest::new(&self.model, &self.nodes, &self.links, self.workload);
        if let Some(first) = self.first {
            request = request.with_first_node(&self.nodes[first].id);
        }
        request
    }
}

fn instance(nodes_max: usize, layers_max: u32) -> impl Strategy<Value = Instance> {
    (1..=nodes_max, 1..=layers_max).prop_flat_map(|(n_nodes, n_layers)| {
        let layers = prop::collection::vec((1u64..=100, 1u64..=100, 1u64..=100), n_layers as usize);
        let ends = (0u64..=60, 0u64..=90, 0u64..=60, any::<bool>());
        let kv = (0u64..=3, 0u32..=8, 1u32..=3, 1u64..=64);
        let nodes = prop::collection::vec((0u64..=400, 1u64..=100, 1u64..=100), n_nodes);
        let links = prop::collection::vec((0u64..=2_000_000, 1u64..=100), n_nodes * n_nodes);
        let first = prop::option::of(0..n_nodes);
        (layers, ends, kv, nodes, links, first).prop_map(
            move |(
                layers,
                (embedding, head, head_flops, tied),
                (kv, context, sequences, activation),
                nodes,
                links,
                first,
            )| {
                let model = ModelProfile {
                    name: "test".into(),
                    n_layers,
                    layer_weight_bytes: layers.iter().map(|l| l.0).collect(),
                    layer_read_bytes_per_token: layers.iter().map(|l| l.1).collect(),
                    layer_flops_per_token: layers.iter().map(|l| l.2).collect(),
                    embedding_bytes: embedding,
                    head_bytes: if tied { embedding + head } else { head },
                    head_flops_per_token: head_flops,
                    tied_embeddings: tied,
                    kv_bytes_per_token_per_layer: kv,
                    layer_kv_positions_max: Vec::new(),
                    activation_bytes_per_token: activation,
                };
                let nodes: Vec<NodeProfile> = nodes
                    .iter()
                    .enumerate()
                    .map(|(i, &(budget, bandwidth, flops))| NodeProfile {
                        id: format!("node-{i}"),
                        backend: Backend::Cpu,
                        memory_budget_bytes: budget,
                        memory_bandwidth_bytes_per_s: bandwidth,
                        matmul_flops_per_s: flops,
                    })
                    .collect();
                let mut matrix = LinkMatrix::uniform(
                    n_nodes,
                    LinkProfile {
                        rtt_us: 0,
                        bandwidth_bytes_per_s: 1,
                    },
                );
                for from in 0..n_nodes {
                    for to in 0..n_nodes {
                        let (rtt_us, bandwidth) = links[from * n_nodes + to];
                        matrix.set(
                            from,
                            to,
                            LinkProfile {
                                rtt_us,
                                bandwidth_bytes_per_s: bandwidth,
                            },
                        );
                    }
                }
                Instance {
                    model,
                    nodes,
                    links: matrix,
                    workload: Workload {
                        context_tokens: context,
                        sequences,
                    },
                    first,
                }
            },
        )
    })
}

/// Every way to write `n` as an ordered sum of `k` positive parts, as range lists.
fn compositions(n: u32, k: usize) -> Vec<Vec<Range<u32>>> {
    fn go(
        start: u32,
        n: u32,
        k: usize,
        current: &mut Vec<Range<u32>>,
        out: &mut Vec<Vec<Range<u32>>>,
    ) {
        if k == 1 {
            if start < n {
                current.push(start..n);
                out.push(current.clone());
                current.pop();
            }
            return;
        }
        for end in start + 1..n {
            current.push(start..end);
            go(end, n, k - 1, current, out);
            current.pop();
        }
    }
    let mut out = Vec::new();
    go(0, n, k, &mut Vec::new(), &mut out);
    out
}

/// Every ordered subset of `0..n` (non-empty).
fn orders(n: usize) -> Vec<Vec<usize>> {
    fn go(n: usize, current: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if !current.is_empty() {
            out.push(current.clone());
        }
        for node in 0..n {
            if !current.contains(&node) {
                current.push(node);
                go(n, current, out);
                current.pop();
            }
        }
    }
    let mut out = Vec::new();
    go(n, &mut Vec::new(), &mut out);
    out
}

/// The fastest feasible plan by enumeration, or None.
fn brute_force(instance: &Instance) -> Option<Plan> {
    let request = instance.request();
    let mut best: Option<Plan> = None;
    for order in orders(instance.nodes.len()) {
        if instance.first.is_some_and(|first| order[0] != first) {
            continue;
        }
        for ranges in compositions(instance.model.n_layers, order.len()) {
            let stages: Vec<(&str, Range<u32>)> = order
                .iter()
                .zip(ranges)
                .map(|(&node, range)| (instance.nodes[node].id.as_str(), range))
                .collect();
            let candidate = evaluate(&request, &stages).expect("enumerated layouts are valid");
            if candidate.fits
                && best
                    .as_ref()
                    .is_none_or(|b| candidate.token_time_ms < b.token_time_ms)
            {
                best = Some(candidate);
            }
        }
    }
    best
}

/// The invariants every returned plan keeps, checked from first principles.
fn check_plan_invariants(instance: &Instance, plan: &Plan) {
    let model = &instance.model;
    // Every layer exactly once, in contiguous non-empty ranges from 0.
    let mut next_layer = 0;
    for stage in &plan.stages {
        assert_eq!(stage.layers.start, next_layer, "ranges are contiguous");
        assert!(stage.layers.end > stage.layers.start, "no empty stage");
        next_layer = stage.layers.end;
    }
    assert_eq!(next_layer, model.n_layers, "every layer is assigned");
    // Each node at most once; stages and left-out nodes together are the cluster.
    let mut seen: Vec<&str> = plan.stages.iter().map(|s| s.node_id.as_str()).collect();
    seen.extend(plan.excluded.iter().map(|e| e.node_id.as_str()));
    seen.sort_unstable();
    let mut all: Vec<&str> = instance.nodes.iter().map(|n| n.id.as_str()).collect();
    all.sort_unstable();
    assert_eq!(seen, all, "each node is either a stage or left out, once");
    // Memory, recomputed here: blocks + KV cache + embedding (first) + head (last).
    let kv_per_layer = u64::from(instance.workload.context_tokens)
        * u64::from(instance.workload.sequences)
        * model.kv_bytes_per_token_per_layer;
    for stage in &plan.stages {
        let node = instance
            .nodes
            .iter()
            .find(|n| n.id == stage.node_id)
            .unwrap();
        let (start, end) = (stage.layers.start as usize, stage.layers.end as usize);
        let blocks: u64 = model.layer_weight_bytes[start..end].iter().sum();
        let first = start == 0;
        let last = end == model.n_layers as usize;
        let ends = match (first, last) {
            (true, true) if model.tied_embeddings => model.head_bytes,
            _ => u64::from(first) * model.embedding_bytes + u64::from(last) * model.head_bytes,
        };
        let memory = blocks + ends + kv_per_layer * (end - start) as u64;
        assert_eq!(stage.memory_used_bytes, memory);
        assert!(
            memory <= node.memory_budget_bytes,
            "stage on {} within budget",
            node.id
        );
    }
    assert!(plan.fits);
    if let Some(first) = instance.first {
        assert_eq!(
            plan.stages[0].node_id, instance.nodes[first].id,
            "pinned node is stage 0"
        );
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()) + 1e-12
}

proptest! {
    // 1024 cases by default; PROPTEST_CASES raises it for a longer soak.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1024),
        ..ProptestConfig::default()
    })]

    /// Exhaustive search + DP = brute force, on every instance small enough to enumerate.
    #[test]
    fn optimal_against_brute_force(instance in instance(4, 7)) {
        let brute = brute_force(&instance);
        if std::env::var_os("PLANNER_STATS").is_some() {
            eprintln!("STAT nodes={} layers={} feasible={} stages={}", instance.nodes.len(), instance.model.n_layers,
                brute.is_some(), brute.as_ref().map_or(0, |b| b.stages.len()));
        }
        match (plan(&instance.request()), brute) {
            (Ok(ours), Some(brute)) => {
                check_plan_invariants(&instance, &ours);
                prop_assert!(
                    ours.token_time_ms <= brute.token_time_ms * (1.0 + 1e-9) + 1e-12,
                    "ours {} ms, brute force {} ms\n{ours}\n{brute}", ours.token_time_ms, brute.token_time_ms
                );
                prop_assert!(close(ours.token_time_ms, brute.token_time_ms));
            }
            (Err(error), None) => {
                // Infeasible both ways, and said clearly.
                prop_assert!(matches!(
                    error,
                    PlanError::ModelDoesNotFit { .. } | PlanError::NoFeasibleSplit { .. } | PlanError::FirstNodeTooSmall { .. }
                ), "{error}");
            }
            (Ok(ours), None) => prop_assert!(false, "planner found a plan brute force says is infeasible:\n{ours}"),
            (Err(error), Some(brute)) => prop_assert!(false, "planner failed ({error}) but this fits:\n{brute}"),
        }
    }

    /// Same inputs, same plan, and its serde form round-trips.
    #[test]
    fn deterministic(instance in instance(5, 10)) {
        let a = plan(&instance.request());
        let b = plan(&instance.request());
        prop_assert_eq!(&a, &b);
        if let Ok(plan) = a {
            let json = serde_json::to_string(&plan).unwrap();
            let back: Plan = serde_json::from_str(&json).unwrap();
            // serde_json's default float parsing may be off by an ulp: compare the rest exactly.
            prop_assert_eq!(back.layer_ranges(), plan.layer_ranges());
            prop_assert_eq!(&back.excluded.len(), &plan.excluded.len());
            prop_assert!(close(back.token_time_ms, plan.token_time_ms));
        }
    }

    /// Never slower than the memory-proportional split when that split fits and is allowed.
    #[test]
    fn never_worse_than_proportional(instance in instance(5, 10)) {
        let baseline = proportional_plan(&instance.request()).unwrap();
        let pin_allows = instance.first.is_none_or(|f| baseline.stages[0].node_id == instance.nodes[f].id);
        if baseline.fits && pin_allows {
            let ours = plan(&instance.request()).expect("the baseline fits, so a plan exists");
            check_plan_invariants(&instance, &ours);
            prop_assert!(ours.token_time_ms <= baseline.token_time_ms * (1.0 + 1e-9));
        }
    }

    /// Beyond the exhaustive limit the heuristic still returns valid plans, deterministically,
    /// never slower than the proportional split.
    #[test]
    fn heuristic_plans_are_valid(instance in instance(10, 12).prop_filter("heuristic sizes", |i| i.nodes.len() > 7)) {
        let result = plan(&instance.request());
        prop_assert_eq!(&result, &plan(&instance.request()));
        if let Ok(ours) = &result {
            check_plan_invariants(&instance, ours);
            let heuristic = matches!(ours.method, potluck_shard_planner::PlanMethod::Heuristic { .. });
            prop_assert!(heuristic);
            let baseline = proportional_plan(&instance.request()).unwrap();
            let pin_allows = instance.first.is_none_or(|f| baseline.stages[0].node_id == instance.nodes[f].id);
            if baseline.fits && pin_allows {
                prop_assert!(ours.token_time_ms <= baseline.token_time_ms * (1.0 + 1e-9));
            }
        }
    }

    /// A re-plan stays within the threshold of the optimum and never moves more than it.
    #[test]
    fn replan_trades_speed_for_fewer_moves_within_the_threshold(
        instance in instance(5, 8),
        dropped in any::<prop::sample::Index>(),
    ) {
        let Ok(previous) = plan(&instance.request()) else { return Ok(()) };
        // One node leaves.
        let mut smaller = instance.clone();
        let gone = dropped.index(smaller.nodes.len());
        if smaller.nodes.len() < 2 || smaller.first == Some(gone) {
            return Ok(());
        }
        smaller.nodes.remove(gone);
        let n = smaller.nodes.len();
        let mut links = LinkMatrix::uniform(n, LinkProfile { rtt_us: 0, bandwidth_bytes_per_s: 1 });
        let keep: Vec<usize> = (0..instance.nodes.len()).filter(|&i| i != gone).collect();
        for (a, &from) in keep.iter().enumerate() {
            for (b, &to) in keep.iter().enumerate() {
                links.set(a, b, instance.links.get(from, to));
            }
        }
        smaller.links = links;
        smaller.first = instance.first.map(|f| if f > gone { f - 1 } else { f });
        let Ok(optimum) = plan(&smaller.request()) else { return Ok(()) };
        let replanned = plan(&smaller.request().with_previous(&previous)).unwrap();
        check_plan_invariants(&smaller, &replanned);
        let replan = replanned.replan.clone().unwrap();
        prop_assert!(close(replan.optimum_token_time_ms, optimum.token_time_ms));
        prop_assert!(replanned.token_time_ms <= optimum.token_time_ms * 1.1 * (1.0 + 1e-9));
        prop_assert!(replan.moved_bytes <= replan.optimum_moved_bytes);
        // Re-planning an unchanged cluster keeps everything in place.
        let again = plan(&instance.request().with_previous(&previous)).unwrap();
        prop_assert_eq!(again.replan.as_ref().unwrap().moved_bytes, 0);
        prop_assert_eq!(again.layer_ranges(), previous.layer_ranges());
    }
}
