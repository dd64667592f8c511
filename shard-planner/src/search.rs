//! Finding the layout: an exact DP for a given stage order, and a search over orders.
//!
//! For a fixed order of nodes `n₀ … n_{k−1}` (each holding at least one layer) the hop costs
//! are fixed and the only choice is where the k − 1 boundaries go. `cost[j][l]`, the least
//! time for layers `0..l` on the first j + 1 nodes, satisfies
//! `cost[j][l] = min over s < l of cost[j−1][s] + hop(n_{j−1}, n_j) + stage(n_j, s..l)`,
//! over the `s` whose stage fits in `n_j`'s memory — exact, in O(k × L × window).
//!
//! Orders: up to [`EXHAUSTIVE_ORDER_NODES_MAX`] nodes every ordered subset is tried. The DFS
//! walks a trie of order prefixes and shares each prefix's DP row among all orders that begin
//! with it (13,699 prefixes for 7 nodes). Beyond that, a heuristic seeds orders by speed, by
//! memory and in the given order, improves the best few with local search (drop, add,
//! replace, swap, move a node; reverse a segment), then kicks and re-searches (iterated local
//! search), bounded by [`HEURISTIC_ORDERS_MAX`] solved orders. Each order is solved exactly.

use crate::cost::CostModel;
use crate::limits::{
    EXHAUSTIVE_ORDER_NODES_MAX, HEURISTIC_KICKS_WITHOUT_GAIN_MAX, HEURISTIC_ORDERS_MAX,
    HEURISTIC_RESTARTS,
};

/// Stages as (node index, first layer, end layer), in pipeline order.
pub(crate) type Layout = Vec<(usize, u32, u32)>;

/// What a search found.
pub(crate) struct SearchResult {
    /// The fastest feasible layout and its predicted token time in seconds.
    pub best: Option<(f64, Layout)>,
    /// Per node, the fastest feasible layout that includes it (∞ when none does): the
    /// evidence behind "left out because it would slow the pipeline".
    pub best_with_node_s: Vec<f64>,
    pub orders_evaluated: u64,
    pub exhaustive: bool,
}

/// One DP row: the least cost of covering layers `0..l`, and where its last stage starts.
#[derive(Clone)]
struct Row {
    cost_s: Vec<f64>,
    start: Vec<u32>,
}

impl Row {
    fn unreachable(n_layers: u32) -> Self {
        Self {
            cost_s: vec![f64::INFINITY; n_layers as usize + 1],
            start: vec![0; n_layers as usize + 1],
        }
    }

    fn any_reachable(&self) -> bool {
        self.cost_s.iter().any(|c| c.is_finite())
    }
}

/// The row for the first stage alone (it starts at layer 0 and leaves some layers to others).
fn first_row(cm: &CostModel, node: usize) -> Row {
    let n = cm.n_layers();
    let mut row = Row::unreachable(n);
    for end in 1..n {
        // Memory only grows with `end`: past the first misfit nothing fits.
        if !cm.stage_fits(node, 0, end) {
            break;
        }
        row.cost_s[end as usize] = cm.stage_time_s(node, 0, end);
    }
    row
}

/// The row after appending `node` as a middle stage behind `prev`.
fn extend_row(cm: &CostModel, row: &Row, prev: usize, node: usize) -> Row {
    let n = cm.n_layers();
    let hop_s = cm.activation_hop_s(prev, node);
    let mut next = Row::unreachable(n);
    for end in 2..n {
        let mut best_s = f64::INFINITY;
        let mut best_start = 0;
        // Walk the start backwards so the stage grows; stop at the first that does not fit.
        for start in (1..end).rev() {
            if !cm.stage_fits(node, start, end) {
                break;
            }
            let before_s = row.cost_s[start as usize];
            if !before_s.is_finite() {
                continue;
            }
            let cost_s = cm.chain_s(cm.chain_s(before_s, hop_s), cm.stage_time_s(node, start, end));
            if cost_s < best_s {
                best_s = cost_s;
                best_start = start;
            }
        }
        next.cost_s[end as usize] = best_s;
        next.start[end as usize] = best_start;
    }
    next
}

/// Completes the order with `node` as the last stage: its layers, the head, and the hop that
/// returns the token to `first`. Returns the total and where the last stage starts.
fn finish(cm: &CostModel, row: &Row, prev: usize, node: usize, first: usize) -> Option<(f64, u32)> {
    let n = cm.n_layers();
    let hops_s = cm.chain_s(cm.activation_hop_s(prev, node), cm.token_hop_s(node, first));
    let mut best: Option<(f64, u32)> = None;
    for start in (1..n).rev() {
        if !cm.stage_fits(node, start, n) {
            break;
        }
        let before_s = row.cost_s[start as usize];
        if !before_s.is_finite() {
            continue;
        }
        let cost_s = cm.chain_s(cm.chain_s(before_s, hops_s), cm.stage_time_s(node, start, n));
        if best.is_none_or(|(b, _)| cost_s < b) {
            best = Some((cost_s, start));
        }
    }
    best
}

fn single(cm: &CostModel, node: usize) -> Option<f64> {
    let n = cm.n_layers();
    cm.stage_fits(node, 0, n)
        .then(|| cm.stage_time_s(node, 0, n))
}

/// Walks the rows back from the last stage's start to the stages' ranges.
fn reconstruct(order: &[usize], rows: &[Row], last_node: usize, last_start: u32, n: u32) -> Layout {
    let mut layout = vec![(last_node, last_start, n)];
    let mut end = last_start;
    for depth in (0..order.len()).rev() {
        let start = if depth == 0 {
            0
        } else {
            rows[depth].start[end as usize]
        };
        layout.push((order[depth], start, end));
        end = start;
    }
    layout.reverse();
    layout
}

/// The exact optimum for one order (every node in it holds at least one layer).
pub(crate) fn solve_order(cm: &CostModel, order: &[usize]) -> Option<(f64, Layout)> {
    let n = cm.n_layers();
    match order {
        [] => None,
        [node] => single(cm, *node).map(|cost_s| (cost_s, vec![(*node, 0, n)])),
        [.., prev, last] => {
            let mut rows = vec![first_row(cm, order[0])];
            for pair in order[..order.len() - 1].windows(2) {
                let row = extend_row(
                    cm,
                    rows.last().expect("rows start non-empty"),
                    pair[0],
                    pair[1],
                );
                if !row.any_reachable() {
                    return None;
                }
                rows.push(row);
            }
            let (cost_s, start) = finish(
                cm,
                rows.last().expect("rows start non-empty"),
                *prev,
                *last,
                order[0],
            )?;
            Some((
                cost_s,
                reconstruct(&order[..order.len() - 1], &rows, *last, start, n),
            ))
        }
    }
}

/// The cost the DP minimises of any layout, in stage order (the token time for latency).
pub(crate) fn layout_cost_s(cm: &CostModel, layout: &Layout) -> f64 {
    let mut total_s = 0.0;
    for (i, &(node, start, end)) in layout.iter().enumerate() {
        total_s = cm.chain_s(total_s, cm.stage_time_s(node, start, end));
        if let Some(&(next, _, _)) = layout.get(i + 1) {
            total_s = cm.chain_s(total_s, cm.activation_hop_s(node, next));
        } else if layout.len() > 1 {
            total_s = cm.chain_s(total_s, cm.token_hop_s(node, layout[0].0));
        }
    }
    total_s
}

/// Exhaustive search or heuristic, by cluster size. `seeds` are extra orders for the
/// heuristic to start from (the memory-proportional split's), so it never does worse.
pub(crate) fn search(cm: &CostModel, first: Option<usize>, seeds: &[Vec<usize>]) -> SearchResult {
    if cm.nodes.len() <= EXHAUSTIVE_ORDER_NODES_MAX {
        exhaustive(cm, first)
    } else {
        heuristic(cm, first, seeds)
    }
}

struct Dfs<'c, 'a> {
    cm: &'c CostModel<'a>,
    order: Vec<usize>,
    rows: Vec<Row>,
    used: Vec<bool>,
    best: Option<(f64, Layout)>,
    best_with_node_s: Vec<f64>,
    orders_evaluated: u64,
}

impl Dfs<'_, '_> {
    fn consider(&mut self, cost_s: f64, last_node: usize, last_start: u32) {
        self.orders_evaluated += 1;
        for &node in self.order.iter().chain(std::iter::once(&last_node)) {
            if cost_s < self.best_with_node_s[node] {
                self.best_with_node_s[node] = cost_s;
            }
        }
        if self.best.as_ref().is_none_or(|(b, _)| cost_s < *b) {
            let layout = reconstruct(
                &self.order,
                &self.rows,
                last_node,
                last_start,
                self.cm.n_layers(),
            );
            self.best = Some((cost_s, layout));
        }
    }

    /// Tries every unused node as the last stage after the current prefix, then as the next
    /// middle stage (recursing).
    fn descend(&mut self) {
        let k = self.cm.nodes.len();
        let prev = *self
            .order
            .last()
            .expect("descend starts from a non-empty prefix");
        for node in 0..k {
            if self.used[node] {
                continue;
            }
            let row = self.rows.last().expect("one row per prefix node");
            let finished = finish(self.cm, row, prev, node, self.order[0]);
            let next = (self.order.len() + 1 < k).then(|| extend_row(self.cm, row, prev, node));
            match finished {
                Some((cost_s, start)) => self.consider(cost_s, node, start),
                None => self.orders_evaluated += 1,
            }
            if let Some(next) = next {
                if next.any_reachable() {
                    self.order.push(node);
                    self.rows.push(next);
                    self.used[node] = true;
                    self.descend();
                    self.used[node] = false;
                    self.rows.pop();
                    self.order.pop();
                }
            }
        }
    }
}

fn exhaustive(cm: &CostModel, first: Option<usize>) -> SearchResult {
    let k = cm.nodes.len();
    let mut dfs = Dfs {
        cm,
        order: Vec::with_capacity(k),
        rows: Vec::with_capacity(k),
        used: vec![false; k],
        best: None,
        best_with_node_s: vec![f64::INFINITY; k],
        orders_evaluated: 0,
    };
    let firsts: Vec<usize> = match first {
        Some(node) => vec![node],
        None => (0..k).collect(),
    };
    for node in firsts {
        match single(cm, node) {
            Some(cost_s) => dfs.consider(cost_s, node, 0),
            None => dfs.orders_evaluated += 1,
        }
        if k > 1 {
            let row = first_row(cm, node);
            if row.any_reachable() {
                dfs.order.push(node);
                dfs.rows.push(row);
                dfs.used[node] = true;
                dfs.descend();
                dfs.used[node] = false;
                dfs.rows.pop();
                dfs.order.pop();
            }
        }
    }
    SearchResult {
        best: dfs.best,
        best_with_node_s: dfs.best_with_node_s,
        orders_evaluated: dfs.orders_evaluated,
        exhaustive: true,
    }
}

/// Orders one move away from `order`; position 0 stays put when the first node is pinned.
fn neighbours(order: &[usize], k: usize, pinned: bool) -> Vec<Vec<usize>> {
    let lo = usize::from(pinned);
    let outside: Vec<usize> = (0..k).filter(|node| !order.contains(node)).collect();
    let mut moves = Vec::new();
    // Drop a node.
    if order.len() > 1 {
        for i in lo..order.len() {
            let mut next = order.to_vec();
            next.remove(i);
            moves.push(next);
        }
    }
    // Add a node that is out, at any position.
    for &node in &outside {
        for position in lo..=order.len() {
            let mut next = order.to_vec();
            next.insert(position, node);
            moves.push(next);
        }
    }
    // Replace a node with one that is out.
    for i in lo..order.len() {
        for &node in &outside {
            let mut next = order.to_vec();
            next[i] = node;
            moves.push(next);
        }
    }
    // Reverse a segment (2-opt: links may be asymmetric or uneven).
    for i in lo..order.len() {
        for j in i + 2..order.len() {
            let mut next = order.to_vec();
            next[i..=j].reverse();
            moves.push(next);
        }
    }
    // Swap two nodes; move one elsewhere.
    for i in lo..order.len() {
        for j in i + 1..order.len() {
            let mut next = order.to_vec();
            next.swap(i, j);
            moves.push(next);
        }
        for position in lo..order.len() {
            if position != i && position != i + 1 {
                let mut next = order.to_vec();
                let node = next.remove(i);
                next.insert(if position > i { position - 1 } else { position }, node);
                moves.push(next);
            }
        }
    }
    moves
}

/// A small deterministic generator for the heuristic's kicks: varied, never random.
pub(crate) struct Lcg(pub u64);

impl Lcg {
    pub fn below(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % bound.max(1)
    }
}

/// First-improvement local search from `start`; records any order better than `best`.
fn descend(
    cm: &CostModel,
    start: Vec<usize>,
    pinned: bool,
    orders_evaluated: &mut u64,
    best: &mut Option<(f64, Layout, Vec<usize>)>,
) {
    let k = cm.nodes.len();
    let mut current_s = match solve_order(cm, &start) {
        Some((cost_s, layout)) => {
            if best.as_ref().is_none_or(|(b, _, _)| cost_s < *b) {
                *best = Some((cost_s, layout, start.clone()));
            }
            cost_s
        }
        None => f64::INFINITY,
    };
    *orders_evaluated += 1;
    let mut current = start;
    'improve: loop {
        for next in neighbours(&current, k, pinned) {
            if *orders_evaluated >= HEURISTIC_ORDERS_MAX {
                return;
            }
            *orders_evaluated += 1;
            if let Some((cost_s, layout)) = solve_order(cm, &next) {
                // Strictly better by more than rounding, so ties cannot cycle.
                if cost_s < current_s * (1.0 - 1e-12) {
                    if best.as_ref().is_none_or(|(b, _, _)| cost_s < *b) {
                        *best = Some((cost_s, layout, next.clone()));
                    }
                    current = next;
                    current_s = cost_s;
                    continue 'improve;
                }
            }
        }
        return;
    }
}

fn heuristic(cm: &CostModel, first: Option<usize>, seeds: &[Vec<usize>]) -> SearchResult {
    let k = cm.nodes.len();
    let mut orders_evaluated = 0u64;
    let mut best: Option<(f64, Layout, Vec<usize>)> = None;
    let mut seeds_found: Vec<(f64, Vec<usize>)> = Vec::new();
    let mut try_order =
        |order: Vec<usize>, evaluated: &mut u64, best: &mut Option<(f64, Layout, Vec<usize>)>| {
            *evaluated += 1;
            if let Some((cost_s, layout)) = solve_order(cm, &order) {
                seeds_found.push((cost_s, order.clone()));
                if best.as_ref().is_none_or(|(b, _, _)| cost_s < *b) {
                    *best = Some((cost_s, layout, order));
                }
            }
        };

    // Seeds: the fastest nodes first (by time per layer) and the largest first, each cut to
    // every prefix length, so both "few fast nodes" and "enough memory" are represented.
    let arrange = |mut ranked: Vec<usize>| -> Vec<usize> {
        if let Some(pinned) = first {
            ranked.retain(|&node| node != pinned);
            ranked.insert(0, pinned);
        }
        ranked
    };
    let mut by_speed: Vec<usize> = (0..k).collect();
    by_speed.sort_by(|&a, &b| {
        cm.mean_layer_time_s(a)
            .total_cmp(&cm.mean_layer_time_s(b))
            .then(a.cmp(&b))
    });
    let mut by_memory: Vec<usize> = (0..k).collect();
    by_memory.sort_by_key(|&node| (std::cmp::Reverse(cm.nodes[node].memory_budget_bytes), node));
    for ranked in [
        arrange(by_speed),
        arrange(by_memory),
        arrange((0..k).collect()),
    ] {
        for length in 1..=k {
            try_order(ranked[..length].to_vec(), &mut orders_evaluated, &mut best);
        }
    }
    for seed in seeds {
        if first.is_none_or(|pinned| seed.first() == Some(&pinned)) {
            try_order(seed.clone(), &mut orders_evaluated, &mut best);
        }
    }

    // Local search from each of the best few distinct seeds (a single start gets stuck on
    // uneven links), then iterated local search: kick the best order with two random moves
    // (a fixed-seed generator: same inputs, same plan) and descend again, until the budget
    // of solved orders is spent or kicks stop paying.
    seeds_found.sort_by(|a, b| a.0.total_cmp(&b.0));
    seeds_found.dedup_by(|a, b| a.1 == b.1);
    let pinned = first.is_some();
    for (_, start) in seeds_found.into_iter().take(HEURISTIC_RESTARTS) {
        descend(cm, start, pinned, &mut orders_evaluated, &mut best);
    }
    let mut rng = Lcg(0x5eed);
    let mut kicks_without_gain = 0;
    while orders_evaluated < HEURISTIC_ORDERS_MAX
        && kicks_without_gain < HEURISTIC_KICKS_WITHOUT_GAIN_MAX
    {
        let Some((best_s, _, best_order)) = best.as_ref() else {
            break;
        };
        let best_s = *best_s;
        let mut kicked = best_order.clone();
        for _ in 0..2 {
            let moves = neighbours(&kicked, k, pinned);
            if moves.is_empty() {
                break;
            }
            kicked = moves[rng.below(moves.len() as u64) as usize].clone();
        }
        descend(cm, kicked, pinned, &mut orders_evaluated, &mut best);
        let improved = best
            .as_ref()
            .is_some_and(|(b, _, _)| *b < best_s * (1.0 - 1e-12));
        kicks_without_gain = if improved { 0 } else { kicks_without_gain + 1 };
    }

    // Evidence for each node left out: the best order with it added anywhere or swapped in.
    let mut best_with_node_s = vec![f64::INFINITY; k];
    if let Some((cost_s, layout, order)) = &best {
        for &(node, _, _) in layout {
            best_with_node_s[node] = *cost_s;
        }
        let lo = usize::from(first.is_some());
        for (node, slot) in best_with_node_s.iter_mut().enumerate() {
            if order.contains(&node) {
                continue;
            }
            for position in lo..=order.len() {
                let mut with = order.clone();
                with.insert(position, node);
                if let Some((c, _)) = solve_order(cm, &with) {
                    *slot = slot.min(c);
                }
                if position < order.len() {
                    let mut swapped = order.clone();
                    swapped[position] = node;
                    if let Some((c, _)) = solve_order(cm, &swapped) {
                        *slot = slot.min(c);
                    }
                }
            }
        }
    }
    SearchResult {
        best: best.map(|(cost_s, layout, _)| (cost_s, layout)),
        best_with_node_s,
        orders_evaluated,
        exhaustive: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Backend, LinkMatrix, LinkProfile, NodeProfile, Workload};
    use crate::model::ModelProfile;

    /// The heuristic is what runs past 7 nodes, where nothing can check it; on clusters small
    /// enough to search exhaustively, it must find the optimum nearly always.
    #[test]
    fn the_heuristic_nearly_always_finds_the_exhaustive_optimum() {
        let mut rng = Lcg(7);
        let (mut cases, mut optimal, mut worst_ratio) = (0, 0, 1.0f64);
        for _ in 0..300 {
            let n_nodes = 3 + rng.below(5) as usize;
            let n_layers = 8 + rng.below(40) as u32;
            let layer_bytes = 50 + rng.below(100);
            let model = ModelProfile::dense(
                "m",
                vec![layer_bytes; n_layers as usize],
                layer_bytes * 2,
                rng.below(200),
                rng.below(300),
                rng.below(600),
                false,
                rng.below(3),
                1 + rng.below(64),
            );
            let total = layer_bytes * u64::from(n_layers) + 500;
            let nodes: Vec<NodeProfile> = (0..n_nodes)
                .map(|i| NodeProfile {
                    id: format!("n{i}"),
                    backend: Backend::Cpu,
                    memory_budget_bytes: total * (10 + rng.below(60)) / 100,
                    memory_bandwidth_bytes_per_s: 1 + rng.below(1000),
                    matmul_flops_per_s: 100 + rng.below(10_000),
                })
                .collect();
            let mut links = LinkMatrix::uniform(
                n_nodes,
                LinkProfile {
                    rtt_us: 0,
                    bandwidth_bytes_per_s: 1,
                },
            );
            for a in 0..n_nodes {
                for b in 0..n_nodes {
                    let link = LinkProfile {
                        rtt_us: rng.below(2_000_000),
                        bandwidth_bytes_per_s: 1 + rng.below(100),
                    };
                    links.set(a, b, link);
                }
            }
            let workload = Workload {
                context_tokens: rng.below(20) as u32,
                sequences: 1,
            };
            let cm = CostModel::new(&model, &nodes, &links, workload);
            let first = (rng.below(3) == 0).then(|| rng.below(n_nodes as u64) as usize);
            let (Some((exact_s, _)), Some((found_s, _))) =
                (exhaustive(&cm, first).best, heuristic(&cm, first, &[]).best)
            else {
                continue;
            };
            cases += 1;
            assert!(
                found_s >= exact_s * (1.0 - 1e-9),
                "the heuristic cannot beat the optimum"
            );
            if found_s <= exact_s * (1.0 + 1e-9) {
                optimal += 1;
            }
            worst_ratio = worst_ratio.max(found_s / exact_s);
        }
        eprintln!("heuristic optimal in {optimal}/{cases}, worst {worst_ratio:.3}× the optimum");
        assert!(cases >= 100);
        assert!(
            optimal * 100 >= cases * 98,
            "optimal in only {optimal} of {cases}"
        );
        assert!(worst_ratio < 1.05, "worst case {worst_ratio}× the optimum");
    }
}
