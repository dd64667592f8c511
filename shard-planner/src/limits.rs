//! Every bound the planner works within, in one place, units last.

/// Most nodes one plan may consider. Home clusters are a handful of machines; the bound keeps
/// the heuristic search's worst case (orders × layers² per order) to well under a second.
pub const NODES_MAX: usize = 32;

/// Most layers a model may have. The largest open models have ~128 blocks; the DP's cost per
/// order grows with the square of this.
pub const LAYERS_MAX: u32 = 512;

/// Up to this many nodes every order of every subset is searched (13,699 orders for 7 nodes,
/// each solved exactly by the DP), so the plan is optimal under the cost model. Beyond it the
/// number of orders explodes (8 nodes: 109,600) and a heuristic takes over.
pub const EXHAUSTIVE_ORDER_NODES_MAX: usize = 7;

/// Most orders the heuristic search (more than [`EXHAUSTIVE_ORDER_NODES_MAX`] nodes) solves,
/// seeds and local-search moves together: bounds its time to a fraction of a second at
/// [`NODES_MAX`] nodes and a typical layer count.
pub const HEURISTIC_ORDERS_MAX: u64 = 4_000;

/// Local searches the heuristic runs, each from one of the best distinct seed orders: one
/// start gets stuck where links are uneven; a few share [`HEURISTIC_ORDERS_MAX`].
pub const HEURISTIC_RESTARTS: usize = 4;

/// The heuristic stops kicking (perturbing the best order and searching again) after this
/// many kicks in a row found nothing better, even with budget left.
pub const HEURISTIC_KICKS_WITHOUT_GAIN_MAX: u32 = 64;

/// A re-plan after a membership change moves weights over the LAN (tens of seconds for a 70B
/// model). Among plans whose predicted tokens/s is within this fraction of the new optimum's,
/// the planner keeps the one that moves the fewest bytes: a re-plan must buy at least a 10%
/// speed-up before it pays for a reshuffle.
pub const REPLAN_GAIN_FRACTION_MIN: f64 = 0.10;

/// Bytes the last stage sends back to stage 0 per generated token: one sampled token id (u32).
pub const TOKEN_ID_BYTES: u64 = 4;

const _: () = assert!(EXHAUSTIVE_ORDER_NODES_MAX <= NODES_MAX);
const _: () = assert!(HEURISTIC_ORDERS_MAX as usize >= NODES_MAX * 2);
