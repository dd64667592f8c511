//! Worked scenarios: a hand-checked cost, clear errors, explanations, re-plans, and the
//! search's time at the planner's limits.

use potluck_shard_planner::limits::{
    EXHAUSTIVE_ORDER_NODES_MAX, NODES_MAX, REPLAN_GAIN_FRACTION_MIN,
};
use potluck_shard_planner::specs::{builtin_model, KV_ELEMENT_BYTES_DEFAULT};
use potluck_shard_planner::{
    evaluate, plan, proportional_plan, Backend, ExclusionReason, LinkMatrix, LinkProfile,
    ModelProfile, NodeProfile, Objective, PlanError, PlanMethod, PlanRequest, ReplanDecision, Workload,
};

const GIB: u64 = 1 << 30;
const GB_PER_S: u64 = 1_000_000_000;
const GFLOPS: u64 = 1_000_000_000;

fn node(
    id: &str,
    backend: Backend,
    budget_gib: u64,
    bandwidth_gb_per_s: u64,
    gflops: u64,
) -> NodeProfile {
    NodeProfile {
        id: id.into(),
        backend,
        memory_budget_bytes: budget_gib * GIB,
        memory_bandwidth_bytes_per_s: bandwidth_gb_per_s * GB_PER_S,
        matmul_flops_per_s: gflops * GFLOPS,
    }
}

/// docs/planner.md's home cluster (examples/clusters/home-ethernet.toml).
fn home_cluster() -> (Vec<NodeProfile>, LinkMatrix) {
    let nodes = vec![
        node("macbook-pro", Backend::Metal, 27, 400, 10_000),
        node("gaming-laptop-gpu", Backend::Cuda, 7, 250, 20_000),
        node("gaming-laptop-cpu", Backend::Cpu, 24, 50, 400),
        node("cpu-laptop", Backend::Cpu, 11, 40, 150),
        node("desktop-gpu", Backend::Cuda, 22, 900, 40_000),
    ];
    let mut links = LinkMatrix::uniform(
        5,
        LinkProfile {
            rtt_us: 300,
            bandwidth_bytes_per_s: 125_000_000,
        },
    );
    links.set_symmetric(
        1,
        2,
        LinkProfile {
            rtt_us: 0,
            bandwidth_bytes_per_s: 16 * GB_PER_S,
        },
    );
    (nodes, links)
}

fn llama_70b() -> ModelProfile {
    builtin_model("llama-3.1-70b-q4_k_m")
        .unwrap()
        .profile(KV_ELEMENT_BYTES_DEFAULT)
}

const CONTEXT_4K: Workload = Workload {
    context_tokens: 4096,
    sequences: 1,
};

/// 4 layers of 100 bytes (100 FLOPs), embedding 10, head 20 (40 FLOPs), KV 1 byte per token
/// per layer, activation 8 bytes.
fn toy_model() -> ModelProfile {
    ModelProfile {
        name: "toy".into(),
        n_layers: 4,
        layer_weight_bytes: vec![100; 4],
        layer_read_bytes_per_token: vec![100; 4],
        layer_flops_per_token: vec![100; 4],
        embedding_bytes: 10,
        head_bytes: 20,
        head_flops_per_token: 40,
        tied_embeddings: false,
        kv_bytes_per_token_per_layer: 1,
        layer_kv_positions_max: Vec::new(),
        activation_bytes_per_token: 8,
    }
}

#[test]
fn two_stage_cost_matches_the_formula_by_hand() {
    // 4 layers of 100 bytes (100 FLOPs), embedding 10, head 20 (40 FLOPs), KV 1 byte per
    // token per layer, context 5 × 2 sequences, activation 8 bytes.
    let model = toy_model();
    let nodes = vec![
        NodeProfile {
            id: "a".into(),
            backend: Backend::Cpu,
            memory_budget_bytes: 1000,
            memory_bandwidth_bytes_per_s: 100,
            matmul_flops_per_s: 1000,
        },
        NodeProfile {
            id: "b".into(),
            backend: Backend::Cpu,
            memory_budget_bytes: 1000,
            memory_bandwidth_bytes_per_s: 50,
            matmul_flops_per_s: 500,
        },
    ];
    let links = LinkMatrix::uniform(
        2,
        LinkProfile {
            rtt_us: 2_000_000,
            bandwidth_bytes_per_s: 4,
        },
    );
    let workload = Workload {
        context_tokens: 5,
        sequences: 2,
    };
    let request = PlanRequest::new(&model, &nodes, &links, workload);
    let plan = evaluate(&request, &[("a", 0..3), ("b", 3..4)]).unwrap();
    // a: read 3×100 + 3×5 (one sequence's KV) = 315 B at 100 B/s = 3.15 s; 300 FLOPs / 1000 = 0.3 s.
    // b: read 100 + 5 + 20 (head) = 125 B at 50 B/s = 2.5 s; 140 FLOPs / 500 = 0.28 s.
    // hops: a→b 1 s + 8/4 = 3 s; b→a (token id, 4 B) 1 s + 1 s = 2 s.
    let expected_s = 3.15 + 0.3 + 2.5 + 0.28 + 3.0 + 2.0;
    assert!(
        (plan.token_time_ms - expected_s * 1e3).abs() < 1e-6,
        "{}",
        plan.token_time_ms
    );
    // Memory: a holds 300 + 10 (embedding) + 3 layers × 5 × 2 KV = 340; b 100 + 20 + 10 = 130.
    assert_eq!(plan.stages[0].memory_used_bytes, 340);
    assert_eq!(plan.stages[1].memory_used_bytes, 130);
    assert_eq!(plan.stages[1].hop.as_ref().unwrap().payload_bytes, 4);
}

/// Sliding-window layers (Gemma 3's local ones) cache their window, not the context: the
/// same split as above with blocks 0 and 2 windowed at 2 positions.
#[test]
fn a_sliding_window_layer_holds_and_reads_only_its_window() {
    let mut model = toy_model();
    model.layer_kv_positions_max = vec![Some(2), None, Some(2), None];
    let nodes = vec![node("a", Backend::Cpu, 1, 1, 1), node("b", Backend::Cpu, 1, 1, 1)];
    let links = LinkMatrix::uniform(2, LinkProfile { rtt_us: 0, bandwidth_bytes_per_s: 1 << 30 });
    let workload = Workload { context_tokens: 5, sequences: 2 };
    let plan = evaluate(&PlanRequest::new(&model, &nodes, &links, workload), &[("a", 0..3), ("b", 3..4)]).unwrap();
    // a: 300 + 10 + (2 + 5 + 2) positions × 2 sequences = 328; b: 100 + 20 + 5 × 2 = 130.
    assert_eq!(plan.stages[0].memory_used_bytes, 328);
    assert_eq!(plan.stages[1].memory_used_bytes, 130);
    // A window longer than the context changes nothing.
    model.layer_kv_positions_max = vec![Some(50), None, Some(50), None];
    let plan = evaluate(&PlanRequest::new(&model, &nodes, &links, workload), &[("a", 0..3), ("b", 3..4)]).unwrap();
    assert_eq!(plan.stages[0].memory_used_bytes, 340);
}

#[test]
fn a_cluster_too_small_gets_the_missing_bytes() {
    let model = llama_70b();
    let nodes = vec![
        node("a", Backend::Cpu, 16, 50, 400),
        node("b", Backend::Cpu, 16, 50, 400),
    ];
    let links = LinkMatrix::uniform(
        2,
        LinkProfile {
            rtt_us: 300,
            bandwidth_bytes_per_s: 125_000_000,
        },
    );
    let error = plan(&PlanRequest::new(&model, &nodes, &links, CONTEXT_4K)).unwrap_err();
    // 80 layers × 4096 positions × K and V of 8 heads × 128, at the engine's element size.
    let kv = 80 * 4096 * 2 * 8 * 128 * KV_ELEMENT_BYTES_DEFAULT;
    // Split across nodes: every block, the embedding on the first stage, the head on the last.
    let required = model.layers_weight_bytes() + model.embedding_bytes + model.head_bytes + kv;
    let PlanError::ModelDoesNotFit {
        missing_bytes,
        required_bytes,
        kv_cache_bytes,
        ..
    } = error.clone()
    else {
        panic!("{error}");
    };
    assert_eq!(kv_cache_bytes, kv);
    assert_eq!(required_bytes, required);
    assert_eq!(missing_bytes, required - 32 * GIB);
    let message = error.to_string();
    assert!(
        message.contains("missing") && message.contains("GiB"),
        "{message}"
    );
    // The baseline cannot be made to fit either: it is priced and marked.
    let baseline =
        proportional_plan(&PlanRequest::new(&model, &nodes, &links, CONTEXT_4K)).unwrap();
    assert!(!baseline.fits);
}

#[test]
fn budgets_that_add_up_but_cannot_be_split_are_explained() {
    // Two nodes each a little over half the model cannot take the embedding + head + halves
    // when layers are indivisible and heavy.
    let model = ModelProfile::dense("chunky", vec![100, 100, 100], 1, 50, 50, 1, false, 0, 8);
    let nodes = vec![
        NodeProfile {
            id: "a".into(),
            backend: Backend::Cpu,
            memory_budget_bytes: 240,
            memory_bandwidth_bytes_per_s: 1,
            matmul_flops_per_s: 1,
        },
        NodeProfile {
            id: "b".into(),
            backend: Backend::Cpu,
            memory_budget_bytes: 240,
            memory_bandwidth_bytes_per_s: 1,
            matmul_flops_per_s: 1,
        },
    ];
    let links = LinkMatrix::uniform(
        2,
        LinkProfile {
            rtt_us: 0,
            bandwidth_bytes_per_s: 1,
        },
    );
    let error = plan(&PlanRequest::new(
        &model,
        &nodes,
        &links,
        Workload {
            context_tokens: 0,
            sequences: 1,
        },
    ))
    .unwrap_err();
    assert!(
        matches!(error, PlanError::NoFeasibleSplit { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("indivisible"));
}

#[test]
fn the_home_cluster_plan_beats_the_memory_proportional_split() {
    let model = llama_70b();
    let (nodes, links) = home_cluster();
    let request = PlanRequest::new(&model, &nodes, &links, CONTEXT_4K);
    let ours = plan(&request).unwrap();
    let baseline = proportional_plan(&request).unwrap();
    println!("{ours}\n{baseline}");
    assert!(matches!(ours.method, PlanMethod::Exhaustive { .. }));
    assert!(ours.fits && baseline.fits);
    assert!(ours.tokens_per_s > 2.0 * baseline.tokens_per_s);
    // The slow CPU nodes are left out, each with its reason.
    for id in ["gaming-laptop-cpu", "cpu-laptop"] {
        let excluded = ours
            .excluded
            .iter()
            .find(|e| e.node_id == id)
            .expect("left out");
        let ExclusionReason::SlowsPipeline {
            best_token_time_ms_with_node,
        } = excluded.reason
        else {
            panic!("{:?}", excluded.reason);
        };
        assert!(best_token_time_ms_with_node > ours.token_time_ms);
    }
    let table = ours.to_string();
    assert!(
        table.contains("desktop-gpu") && table.contains("left out: cpu-laptop"),
        "{table}"
    );
}

#[test]
fn the_pinned_node_is_stage_zero() {
    let model = llama_70b();
    let (nodes, links) = home_cluster();
    let request =
        PlanRequest::new(&model, &nodes, &links, CONTEXT_4K).with_first_node("gaming-laptop-gpu");
    let pinned = plan(&request).unwrap();
    assert_eq!(pinned.stages[0].node_id, "gaming-laptop-gpu");
    assert!(pinned.stages[0].holds_embedding);
    let free = plan(&PlanRequest::new(&model, &nodes, &links, CONTEXT_4K)).unwrap();
    assert!(free.token_time_ms <= pinned.token_time_ms);

    let missing = PlanRequest::new(&model, &nodes, &links, CONTEXT_4K).with_first_node("phone");
    assert_eq!(
        plan(&missing).unwrap_err(),
        PlanError::UnknownFirstNode("phone".into())
    );
}

#[test]
fn a_tiny_pinned_node_is_reported() {
    let model = llama_70b();
    let (mut nodes, links) = home_cluster();
    nodes[3].memory_budget_bytes = GIB / 2;
    let request =
        PlanRequest::new(&model, &nodes, &links, CONTEXT_4K).with_first_node("cpu-laptop");
    let error = plan(&request).unwrap_err();
    assert!(
        matches!(error, PlanError::FirstNodeTooSmall { .. }),
        "{error}"
    );
}

#[test]
fn a_node_too_small_for_one_layer_says_so() {
    let model = llama_70b();
    let (mut nodes, links) = home_cluster();
    nodes[3].memory_budget_bytes = 100 << 20;
    let ours = plan(&PlanRequest::new(&model, &nodes, &links, CONTEXT_4K)).unwrap();
    let excluded = ours
        .excluded
        .iter()
        .find(|e| e.node_id == "cpu-laptop")
        .unwrap();
    assert!(matches!(
        excluded.reason,
        ExclusionReason::CannotHoldOneLayer { .. }
    ));
}

#[test]
fn a_joining_node_that_gains_little_does_not_reshuffle() {
    let model = llama_70b();
    let (nodes, links) = home_cluster();
    // Before: the Mac and the desktop only.
    let before_nodes = vec![nodes[0].clone(), nodes[4].clone()];
    let mut before_links = LinkMatrix::uniform(2, links.get(0, 4));
    before_links.set_symmetric(0, 1, links.get(0, 4));
    let previous = plan(&PlanRequest::new(
        &model,
        &before_nodes,
        &before_links,
        CONTEXT_4K,
    ))
    .unwrap();
    // The CPU laptop joins: it would only slow things down, so nothing changes.
    let after_nodes = vec![nodes[0].clone(), nodes[4].clone(), nodes[3].clone()];
    let after_links = LinkMatrix::uniform(3, links.get(0, 4));
    let request =
        PlanRequest::new(&model, &after_nodes, &after_links, CONTEXT_4K).with_previous(&previous);
    let replanned = plan(&request).unwrap();
    let replan = replanned.replan.clone().unwrap();
    assert_eq!(replan.decision, ReplanDecision::KeptPrevious);
    assert_eq!(replan.moved_bytes, 0);
    assert_eq!(replanned.layer_ranges(), previous.layer_ranges());
}

#[test]
fn a_faster_node_joining_is_worth_the_move_only_past_the_threshold() {
    let model = llama_70b();
    // Before: two slow CPU boxes that just hold the model.
    let slow = |id: &str| node(id, Backend::Cpu, 40, 50, 400);
    let before = vec![slow("a"), slow("b")];
    let links2 = LinkMatrix::uniform(
        2,
        LinkProfile {
            rtt_us: 300,
            bandwidth_bytes_per_s: 125_000_000,
        },
    );
    let previous = plan(&PlanRequest::new(&model, &before, &links2, CONTEXT_4K)).unwrap();
    let links3 = LinkMatrix::uniform(
        3,
        LinkProfile {
            rtt_us: 300,
            bandwidth_bytes_per_s: 125_000_000,
        },
    );

    // A marginally faster box joins (optimum < 10% faster): keep the old plan.
    let marginal = vec![slow("a"), slow("b"), node("c", Backend::Cpu, 40, 53, 400)];
    let kept =
        plan(&PlanRequest::new(&model, &marginal, &links3, CONTEXT_4K).with_previous(&previous))
            .unwrap();
    let replan = kept.replan.clone().unwrap();
    assert!(kept.token_time_ms <= replan.optimum_token_time_ms * (1.0 + REPLAN_GAIN_FRACTION_MIN));
    assert_eq!(replan.decision, ReplanDecision::KeptPrevious, "{kept}");
    assert!(
        kept.excluded
            .iter()
            .any(|e| matches!(e.reason, ExclusionReason::PreviousPlanKept { .. })),
        "{kept}"
    );

    // A GPU box joins: the optimum is far faster, so the layers move.
    let gpu = vec![
        slow("a"),
        slow("b"),
        node("gpu", Backend::Cuda, 48, 900, 40_000),
    ];
    let moved = plan(&PlanRequest::new(&model, &gpu, &links3, CONTEXT_4K).with_previous(&previous))
        .unwrap();
    let replan = moved.replan.clone().unwrap();
    assert_eq!(replan.decision, ReplanDecision::NewOptimum, "{moved}");
    assert!(replan.moved_bytes > 0);
    assert!(moved.stages.iter().any(|s| s.node_id == "gpu"));
}

#[test]
fn a_leaving_node_moves_only_its_share_when_that_is_fast_enough() {
    let model = llama_70b();
    let box_ = |id: &str| node(id, Backend::Cpu, 24, 50, 400);
    let three = vec![box_("a"), box_("b"), box_("c")];
    let links3 = LinkMatrix::uniform(
        3,
        LinkProfile {
            rtt_us: 300,
            bandwidth_bytes_per_s: 125_000_000,
        },
    );
    let previous =
        plan(&PlanRequest::new(&model, &three, &links3, CONTEXT_4K).with_first_node("a")).unwrap();
    // "c" leaves and a bigger "d" joins.
    let after = vec![box_("a"), box_("b"), node("d", Backend::Cpu, 30, 50, 400)];
    let request = PlanRequest::new(&model, &after, &links3, CONTEXT_4K)
        .with_first_node("a")
        .with_previous(&previous);
    let replanned = plan(&request).unwrap();
    let replan = replanned.replan.clone().unwrap();
    assert!(replan.moved_bytes <= replan.optimum_moved_bytes);
    assert!(
        replanned.token_time_ms <= replan.optimum_token_time_ms * (1.0 + REPLAN_GAIN_FRACTION_MIN)
    );
}

#[test]
fn the_search_is_fast_at_its_limits() {
    let model = llama_70b();
    let workload = CONTEXT_4K;
    for n_nodes in [EXHAUSTIVE_ORDER_NODES_MAX, NODES_MAX] {
        let nodes: Vec<NodeProfile> = (0..n_nodes)
            .map(|i| {
                node(
                    &format!("n{i}"),
                    Backend::Cpu,
                    4 + (i as u64 * 7) % 13,
                    40 + (i as u64 * 37) % 300,
                    400,
                )
            })
            .collect();
        let mut links = LinkMatrix::uniform(
            n_nodes,
            LinkProfile {
                rtt_us: 300,
                bandwidth_bytes_per_s: 125_000_000,
            },
        );
        for a in 0..n_nodes {
            for b in 0..n_nodes {
                links.set(
                    a,
                    b,
                    LinkProfile {
                        rtt_us: 100 + ((a * 31 + b * 17) % 50) as u64 * 100,
                        bandwidth_bytes_per_s: 125_000_000,
                    },
                );
            }
        }
        let started = std::time::Instant::now();
        let ours = plan(&PlanRequest::new(&model, &nodes, &links, workload)).unwrap();
        let elapsed = started.elapsed();
        println!("{n_nodes} nodes: {elapsed:?}, {:?}\n{ours}", ours.method);
        // Generous: CI machines are small and shared; typical is well under a second.
        assert!(elapsed.as_secs() < 20, "{n_nodes} nodes took {elapsed:?}");
        let baseline =
            proportional_plan(&PlanRequest::new(&model, &nodes, &links, workload)).unwrap();
        if baseline.fits {
            assert!(ours.token_time_ms <= baseline.token_time_ms);
        }
    }
}

/// Two equal CPU machines and a model either holds alone: for one sequence the fastest is
/// one machine (a hop only adds time); for many sequences in flight the bottleneck halves
/// with both, and the split is balanced by time, not by layers — the last stage, which also
/// runs the head, gets fewer layers than the first.
#[test]
fn the_throughput_objective_uses_both_machines_and_balances_their_time() {
    let model = builtin_model("llama-3.1-8b-q4_k_m").unwrap().profile(KV_ELEMENT_BYTES_DEFAULT);
    let nodes = vec![node("a", Backend::Cpu, 16, 20, 100), node("b", Backend::Cpu, 16, 20, 100)];
    let links = LinkMatrix::uniform(
        2,
        LinkProfile {
            rtt_us: 300,
            bandwidth_bytes_per_s: 125_000_000,
        },
    );
    let workload = Workload {
        context_tokens: 2048,
        sequences: 2,
    };
    let request = PlanRequest::new(&model, &nodes, &links, workload).with_first_node("a");
    let latency = plan(&request).unwrap();
    assert_eq!(latency.stages.len(), 1, "{latency}");
    let throughput = plan(&request.with_objective(Objective::Throughput)).unwrap();
    println!("{latency}\n{throughput}");
    assert_eq!(throughput.stages.len(), 2, "{throughput}");
    assert_eq!(throughput.objective, Objective::Throughput);
    let (first, last) = (&throughput.stages[0], &throughput.stages[1]);
    assert!(last.layers.len() < first.layers.len(), "the head's stage gets fewer layers: {throughput}");
    // Balanced: the two stages' times differ by less than one layer's.
    let one_layer_ms = first.stage_time_ms / first.layers.len() as f64;
    assert!((first.stage_time_ms - last.stage_time_ms).abs() < one_layer_ms, "{throughput}");
    assert!(throughput.bottleneck_ms() < 0.6 * latency.bottleneck_ms(), "{throughput}");
    assert!(throughput.to_string().contains("for throughput (bottleneck"), "{throughput}");
}
