//! Cluster membership: which workers are in the cluster and how far each has got.
//!
//! A pure state machine in the quinn-proto style: the coordinator's one async driver owns
//! the sockets and the clock, feeds events in through `handle_*(now_ms, …)`, drains
//! [`Action`]s with [`Membership::poll_action`], and calls [`Membership::handle_timeout`]
//! when [`Membership::poll_timeout`]'s deadline passes. Nothing here reads a clock, spawns a
//! task or touches a socket, so the tests drive it with simulated time and no sleeps.
//!
//! Lifecycle of one node id (the `Hello::node_id`, stable across restarts):
//!
//! ```text
//! Hello, token ok ──▶ Joining ──assignment sent──▶ Loading{done,total} ──Ready──▶ Ready
//!        │               └──────────────── silence / disconnect / superseded ───────────┴──▶ Gone{reason}
//!        └─ bad token / cluster full ──▶ Refuse (never a member, never planned)
//! ```
//!
//! **Connections, not node ids, key the per-connection events.** The driver numbers its
//! connections ([`ConnectionId`]) and tags every event with the connection it came from. A
//! node that restarts before its old connection is noticed dead says Hello on a new
//! connection: the new one supersedes the old ([`GoneReason::Superseded`], a `Close` for the
//! old connection), and anything still arriving on the old connection is ignored instead of
//! killing the new session.

use std::collections::{BTreeMap, VecDeque};

use potluck_protocol::limits::{HEARTBEAT_INTERVAL_MS_MAX, HEARTBEAT_INTERVAL_MS_MIN};
use potluck_protocol::{DeviceSummary, RefusalCode, StageStats};

/// How often a worker must send a heartbeat (sent to it in `Welcome`). Short enough that a
/// few missed ones fit in [`PEER_SILENCE_TIMEOUT_MS`]; long enough to cost nothing.
pub const HEARTBEAT_INTERVAL_MS: u64 = 500;

/// A node that sends nothing for this long is declared gone. The resilience issue asks that
/// a dead node be noticed within 3 s; six heartbeat intervals tolerate a few lost or late
/// heartbeats (a GC pause, a Wi-Fi hiccup) without flapping.
pub const PEER_SILENCE_TIMEOUT_MS: u64 = 3_000;

/// Most nodes that may be members at once (Joining, Loading or Ready): the planner's own bound
/// less one, for the coordinator, which the planner sees as a node too. It bounds the
/// planner's input (its search grows with the node count) and this module's memory; a home
/// cluster has a handful of machines, so 31 leaves room for a GPU node and a CPU node per
/// machine.
pub const NODES_MAX: usize = potluck_shard_planner::limits::NODES_MAX - 1;

/// Gone nodes kept for the dashboard ("laptop: gone, silent for 3 s") beyond the members;
/// the oldest are forgotten first, so churn cannot grow the table without bound.
pub const GONE_NODES_RETAINED_MAX: usize = 32;

const _: () = assert!(
    PEER_SILENCE_TIMEOUT_MS >= 4 * HEARTBEAT_INTERVAL_MS,
    "the silence timeout must tolerate several lost heartbeats"
);
const _: () = assert!(
    HEARTBEAT_INTERVAL_MS >= HEARTBEAT_INTERVAL_MS_MIN as u64 && HEARTBEAT_INTERVAL_MS <= HEARTBEAT_INTERVAL_MS_MAX as u64,
    "the interval must be one that Welcome may carry"
);
const _: () = assert!(NODES_MAX >= 1 && GONE_NODES_RETAINED_MAX >= 1);

/// The driver's number for one worker connection; never reused within a process.
pub type ConnectionId = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeState {
    /// Welcomed; a member the planner may use, with no assignment yet.
    Joining,
    /// An assignment was sent; the node is fetching or loading its slice.
    Loading { bytes_done: u64, bytes_total: u64 },
    /// The slice is loaded and the stage serves steps.
    Ready,
    /// No longer a member (kept for the dashboard until evicted).
    Gone { reason: GoneReason, since_ms: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GoneReason {
    /// Nothing heard for [`PEER_SILENCE_TIMEOUT_MS`].
    Silent,
    /// The connection closed or failed; the driver's words.
    Disconnected(String),
    /// The same node id said Hello on a new connection (a restart).
    Superseded,
    /// It broke the protocol (e.g. a second Hello on one connection).
    ProtocolViolation(String),
}

/// What the driver must do; drained with [`Membership::poll_action`] after every input.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send `Refused` on this connection and close it.
    Refuse { connection: ConnectionId, code: RefusalCode, reason: String },
    /// Send `Welcome { heartbeat_interval_ms }` on this connection.
    Welcome { connection: ConnectionId, node_id: String, heartbeat_interval_ms: u32 },
    /// Close this connection: its node is gone from membership.
    Close { connection: ConnectionId, reason: String },
    /// The set of members changed (one joined or went): plan again from [`Membership::members`]
    /// and send assignments. Several may queue after one input; plan once after draining.
    Replan { reason: String },
    /// A node finished loading its assigned slice.
    StageReady { node_id: String },
}

/// One row of the dashboard / status view.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSnapshot {
    pub node_id: String,
    pub name: String,
    pub state: NodeState,
    /// Milliseconds since anything was heard from the node.
    pub last_seen_age_ms: u64,
    /// The latest heartbeat's counters, if any heartbeat has arrived in this session.
    pub stats: Option<StageStats>,
    /// Measured milliseconds per step between the last two heartbeats that saw steps run
    /// (kept while the stage idles; `None` before a stage has run steps).
    pub step_ms: Option<f64>,
}

#[derive(Debug, Clone)]
struct Node {
    name: String,
    device: DeviceSummary,
    state: NodeState,
    /// The live connection; `None` once gone.
    connection: Option<ConnectionId>,
    last_heard_ms: u64,
    stats: Option<StageStats>,
    step_ms: Option<f64>,
}

impl Node {
    fn is_member(&self) -> bool {
        !matches!(self.state, NodeState::Gone { .. })
    }
}

/// The membership table. `BTreeMap`s so that iteration (and so every output) is ordered by
/// key: the same inputs give the same actions, bit for bit.
#[derive(Debug, Default)]
pub struct Membership {
    nodes: BTreeMap<String, Node>,
    /// Live connections only: connection → node id.
    connections: BTreeMap<ConnectionId, String>,
    /// Bounded by the inputs of one `handle_*` call; the driver drains it after each.
    actions: VecDeque<Action>,
}

impl Membership {
    pub fn new() -> Self {
        Self::default()
    }

    /// A worker said Hello on `connection`. `token_ok` is the driver's verdict on the token
    /// proof (the crypto lives in the driver).
    pub fn handle_hello(
        &mut self,
        now_ms: u64,
        connection: ConnectionId,
        node_id: &str,
        name: &str,
        device: DeviceSummary,
        token_ok: bool,
    ) {
        // Checked first: a peer without the token must not be able to evict a real node by
        // reusing its id.
        if !token_ok {
            return self.refuse(connection, RefusalCode::BadToken, "the join token proof did not verify".into());
        }
        if let Some(previous) = self.connections.get(&connection).cloned() {
            self.set_gone(now_ms, &previous, GoneReason::ProtocolViolation("a second Hello on one connection".into()));
            return;
        }
        let rejoining_member = self.nodes.get(node_id).is_some_and(Node::is_member);
        let members = self.nodes.values().filter(|n| n.is_member()).count();
        if !rejoining_member && members >= NODES_MAX {
            let reason = format!("the cluster is full ({NODES_MAX} nodes, NODES_MAX)");
            return self.refuse(connection, RefusalCode::NotNeeded, reason);
        }
        if rejoining_member {
            // A restart: the old connection is dead or dying; this one wins.
            self.set_gone(now_ms, node_id, GoneReason::Superseded);
        } else if !self.nodes.contains_key(node_id) {
            self.evict_gone_beyond_retention();
        }
        let node = Node {
            name: name.to_owned(),
            device,
            state: NodeState::Joining,
            connection: Some(connection),
            last_heard_ms: now_ms,
            stats: None,
            step_ms: None,
        };
        self.nodes.insert(node_id.to_owned(), node);
        self.connections.insert(connection, node_id.to_owned());
        self.actions.push_back(Action::Welcome {
            connection,
            node_id: node_id.to_owned(),
            heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS as u32,
        });
        self.actions.push_back(Action::Replan { reason: format!("{node_id} joined") });
    }

    /// The driver sent this node an assignment of `bytes_total` bytes of weights.
    pub fn handle_assignment_sent(&mut self, node_id: &str, bytes_total: u64) {
        if let Some(node) = self.nodes.get_mut(node_id).filter(|n| n.is_member()) {
            node.state = NodeState::Loading { bytes_done: 0, bytes_total };
        }
    }

    pub fn handle_load_progress(&mut self, now_ms: u64, connection: ConnectionId, bytes_done: u64, bytes_total: u64) {
        let Some(node) = self.heard(now_ms, connection) else { return };
        if matches!(node.state, NodeState::Joining | NodeState::Loading { .. }) {
            // The protocol validates done <= total; clamp anyway so the dashboard never shows >100 %.
            node.state = NodeState::Loading { bytes_done: bytes_done.min(bytes_total), bytes_total };
        }
    }

    pub fn handle_ready(&mut self, now_ms: u64, connection: ConnectionId) {
        let Some(node) = self.heard(now_ms, connection) else { return };
        if node.state != NodeState::Ready {
            node.state = NodeState::Ready;
            let node_id = self.connections[&connection].clone();
            self.actions.push_back(Action::StageReady { node_id });
        }
    }

    pub fn handle_heartbeat(&mut self, now_ms: u64, connection: ConnectionId, stats: StageStats) {
        if let Some(node) = self.heard(now_ms, connection) {
            node.step_ms = match &node.stats {
                Some(previous) if stats.steps > previous.steps && stats.busy_us >= previous.busy_us => {
                    Some((stats.busy_us - previous.busy_us) as f64 / (stats.steps - previous.steps) as f64 / 1000.0)
                }
                // Counters went backwards: the stage restarted, its old figure is stale.
                Some(previous) if stats.steps < previous.steps => None,
                _ => node.step_ms,
            };
            node.stats = Some(stats);
        }
    }

    /// The connection closed or failed. Unknown (refused, superseded) connections are ignored.
    pub fn handle_disconnect(&mut self, now_ms: u64, connection: ConnectionId, reason: &str) {
        if let Some(node_id) = self.connections.get(&connection).cloned() {
            self.set_gone(now_ms, &node_id, GoneReason::Disconnected(reason.to_owned()));
        }
    }

    /// Declares gone every member silent for [`PEER_SILENCE_TIMEOUT_MS`] or more.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        let silent: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.is_member() && now_ms >= n.last_heard_ms.saturating_add(PEER_SILENCE_TIMEOUT_MS))
            .map(|(id, _)| id.clone())
            .collect();
        for node_id in silent {
            self.set_gone(now_ms, &node_id, GoneReason::Silent);
        }
    }

    /// When [`Self::handle_timeout`] must next be called; `None` with no members.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.nodes
            .values()
            .filter(|n| n.is_member())
            .map(|n| n.last_heard_ms.saturating_add(PEER_SILENCE_TIMEOUT_MS))
            .min()
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The members the planner may use, ordered by node id.
    pub fn members(&self) -> impl Iterator<Item = (&str, &DeviceSummary)> {
        self.nodes.iter().filter(|(_, n)| n.is_member()).map(|(id, n)| (id.as_str(), &n.device))
    }

    pub fn state(&self, node_id: &str) -> Option<&NodeState> {
        self.nodes.get(node_id).map(|n| &n.state)
    }

    /// Every known node (members and retained gone ones), ordered by node id.
    pub fn snapshot(&self, now_ms: u64) -> Vec<NodeSnapshot> {
        self.nodes
            .iter()
            .map(|(id, n)| NodeSnapshot {
                node_id: id.clone(),
                name: n.name.clone(),
                state: n.state.clone(),
                last_seen_age_ms: now_ms.saturating_sub(n.last_heard_ms),
                stats: n.stats.clone(),
                step_ms: n.step_ms,
            })
            .collect()
    }

    /// The member behind a live connection, its silence clock reset.
    fn heard(&mut self, now_ms: u64, connection: ConnectionId) -> Option<&mut Node> {
        let node = self.nodes.get_mut(self.connections.get(&connection)?)?;
        node.last_heard_ms = node.last_heard_ms.max(now_ms);
        Some(node)
    }

    fn refuse(&mut self, connection: ConnectionId, code: RefusalCode, reason: String) {
        self.actions.push_back(Action::Refuse { connection, code, reason });
    }

    fn set_gone(&mut self, now_ms: u64, node_id: &str, reason: GoneReason) {
        let Some(node) = self.nodes.get_mut(node_id).filter(|n| n.is_member()) else { return };
        let text = format!("{node_id} is gone: {reason:?}");
        node.state = NodeState::Gone { reason, since_ms: now_ms };
        if let Some(connection) = node.connection.take() {
            self.connections.remove(&connection);
            self.actions.push_back(Action::Close { connection, reason: text.clone() });
        }
        self.actions.push_back(Action::Replan { reason: text });
    }

    /// Makes room for one more node id by forgetting the longest-gone nodes.
    fn evict_gone_beyond_retention(&mut self) {
        let gone = |n: &Node| match n.state {
            NodeState::Gone { since_ms, .. } => Some(since_ms),
            _ => None,
        };
        while self.nodes.values().filter_map(gone).count() >= GONE_NODES_RETAINED_MAX {
            let oldest = self
                .nodes
                .iter()
                .filter_map(|(id, n)| gone(n).map(|since| (since, id.clone())))
                .min()
                .map(|(_, id)| id);
            match oldest {
                Some(id) => self.nodes.remove(&id),
                None => break,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> DeviceSummary {
        DeviceSummary {
            backend: "cpu".into(),
            memory_budget_bytes: 8 << 30,
            memory_bandwidth_bytes_per_s: 20e9,
            matmul_flops_per_s: 10e9,
            threads: 4,
        }
    }

    fn stats(steps: u64) -> StageStats {
        StageStats { steps, rows: steps, busy_us: 10 * steps, kv_bytes: 0, next_hop_rtt_us: 0, resident_bytes: 0, peak_resident_bytes: 0 }
    }

    fn drain(m: &mut Membership) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).take(1000).collect()
    }

    fn replans(actions: &[Action]) -> usize {
        actions.iter().filter(|a| matches!(a, Action::Replan { .. })).count()
    }

    fn join(m: &mut Membership, now_ms: u64, connection: ConnectionId, node_id: &str) -> Vec<Action> {
        m.handle_hello(now_ms, connection, node_id, node_id, device(), true);
        drain(m)
    }

    #[test]
    fn join_load_ready() {
        let mut m = Membership::new();
        let actions = join(&mut m, 0, 1, "a");
        assert_eq!(
            actions[0],
            Action::Welcome { connection: 1, node_id: "a".into(), heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS as u32 }
        );
        assert_eq!(replans(&actions), 1);
        assert_eq!(m.state("a"), Some(&NodeState::Joining));
        assert_eq!(m.members().map(|(id, _)| id).collect::<Vec<_>>(), ["a"]);

        m.handle_assignment_sent("a", 100);
        assert_eq!(m.state("a"), Some(&NodeState::Loading { bytes_done: 0, bytes_total: 100 }));
        m.handle_load_progress(10, 1, 40, 100);
        assert_eq!(m.state("a"), Some(&NodeState::Loading { bytes_done: 40, bytes_total: 100 }));
        m.handle_load_progress(20, 1, 100, 100);
        m.handle_ready(30, 1);
        assert_eq!(m.state("a"), Some(&NodeState::Ready));
        assert_eq!(drain(&mut m), [Action::StageReady { node_id: "a".into() }]);
        let snapshot = m.snapshot(130);
        assert_eq!(snapshot[0].last_seen_age_ms, 100);
        assert_eq!(snapshot[0].state, NodeState::Ready);
    }

    #[test]
    fn wrong_token_is_refused_and_never_a_member() {
        let mut m = Membership::new();
        join(&mut m, 0, 1, "a");
        m.handle_hello(5, 2, "a", "impostor", device(), false);
        let actions = drain(&mut m);
        assert!(matches!(actions[..], [Action::Refuse { connection: 2, code: RefusalCode::BadToken, .. }]));
        // The real "a" keeps its session; the impostor's events are ignored.
        assert_eq!(m.state("a"), Some(&NodeState::Joining));
        m.handle_ready(6, 2);
        assert_eq!(m.state("a"), Some(&NodeState::Joining));
        m.handle_hello(7, 3, "b", "b", device(), false);
        drain(&mut m);
        assert_eq!(m.state("b"), None);
        assert_eq!(m.members().count(), 1);
    }

    #[test]
    fn silence_means_gone_after_exactly_the_timeout() {
        let mut m = Membership::new();
        join(&mut m, 1_000, 1, "a");
        assert_eq!(m.poll_timeout(), Some(1_000 + PEER_SILENCE_TIMEOUT_MS));
        m.handle_timeout(1_000 + PEER_SILENCE_TIMEOUT_MS - 1);
        assert_eq!(m.state("a"), Some(&NodeState::Joining));
        assert!(drain(&mut m).is_empty());
        m.handle_timeout(1_000 + PEER_SILENCE_TIMEOUT_MS);
        assert!(matches!(m.state("a"), Some(NodeState::Gone { reason: GoneReason::Silent, .. })));
        let actions = drain(&mut m);
        assert!(matches!(actions[0], Action::Close { connection: 1, .. }));
        assert_eq!(replans(&actions), 1);
        assert_eq!(m.poll_timeout(), None);
        assert_eq!(m.members().count(), 0);
        // A late heartbeat on the dead connection does not revive it.
        m.handle_heartbeat(5_000, 1, stats(1));
        assert!(matches!(m.state("a"), Some(NodeState::Gone { .. })));
    }

    #[test]
    fn heartbeats_keep_a_node_alive() {
        let mut m = Membership::new();
        join(&mut m, 0, 1, "a");
        let mut now_ms = 0;
        for step in 1..=100 {
            now_ms += HEARTBEAT_INTERVAL_MS;
            m.handle_heartbeat(now_ms, 1, stats(step));
            if let Some(deadline) = m.poll_timeout().filter(|d| *d <= now_ms) {
                m.handle_timeout(deadline);
            }
        }
        assert_eq!(m.state("a"), Some(&NodeState::Joining));
        assert_eq!(m.poll_timeout(), Some(now_ms + PEER_SILENCE_TIMEOUT_MS));
        assert_eq!(m.snapshot(now_ms)[0].stats, Some(stats(100)));
    }

    #[test]
    fn step_time_is_measured_between_heartbeats_and_survives_idling() {
        let mut m = Membership::new();
        join(&mut m, 0, 1, "a");
        let beat = |steps, busy_us| StageStats { steps, rows: steps, busy_us, kv_bytes: 0, next_hop_rtt_us: 0, resident_bytes: 0, peak_resident_bytes: 0 };
        m.handle_heartbeat(100, 1, beat(0, 0));
        assert_eq!(m.snapshot(100)[0].step_ms, None, "no steps yet");
        m.handle_heartbeat(200, 1, beat(10, 30_000));
        assert_eq!(m.snapshot(200)[0].step_ms, Some(3.0));
        m.handle_heartbeat(300, 1, beat(30, 130_000));
        assert_eq!(m.snapshot(300)[0].step_ms, Some(5.0), "the latest interval, not the average");
        m.handle_heartbeat(400, 1, beat(30, 130_000));
        assert_eq!(m.snapshot(400)[0].step_ms, Some(5.0), "idle: the last figure stays");
        m.handle_heartbeat(500, 1, beat(2, 1_000));
        assert_eq!(m.snapshot(500)[0].step_ms, None, "counters went back: a restarted stage");
    }

    #[test]
    fn disconnect_means_gone() {
        let mut m = Membership::new();
        join(&mut m, 0, 1, "a");
        m.handle_disconnect(10, 1, "connection reset");
        let expected = NodeState::Gone { reason: GoneReason::Disconnected("connection reset".into()), since_ms: 10 };
        assert_eq!(m.state("a"), Some(&expected));
        assert_eq!(replans(&drain(&mut m)), 1);
    }

    #[test]
    fn nodes_max_refuses_with_a_reason() {
        let mut m = Membership::new();
        for i in 0..NODES_MAX {
            join(&mut m, 0, i as u64, &format!("n{i:02}"));
        }
        m.handle_hello(1, 999, "extra", "extra", device(), true);
        let actions = drain(&mut m);
        assert!(matches!(&actions[..], [Action::Refuse { connection: 999, code: RefusalCode::NotNeeded, reason }] if reason.contains("full")));
        assert_eq!(m.members().count(), NODES_MAX);
        // A member restarting is not turned away, and a gone one frees a place.
        assert_eq!(replans(&join(&mut m, 2, 1_000, "n00")), 2);
        m.handle_disconnect(3, 1, "bye");
        drain(&mut m);
        assert!(matches!(join(&mut m, 4, 1_001, "extra")[0], Action::Welcome { .. }));
    }

    #[test]
    fn rejoin_after_gone_and_restart_supersedes() {
        let mut m = Membership::new();
        join(&mut m, 0, 1, "a");
        m.handle_assignment_sent("a", 100);
        m.handle_ready(10, 1);
        drain(&mut m);
        // A restart before the silence was noticed: the new connection wins.
        let actions = join(&mut m, 20, 2, "a");
        assert!(matches!(actions[0], Action::Close { connection: 1, .. }));
        assert!(matches!(actions[2], Action::Welcome { connection: 2, .. }));
        assert_eq!(m.state("a"), Some(&NodeState::Joining));
        // Late events from the old connection touch nothing.
        m.handle_disconnect(21, 1, "old connection closed");
        assert_eq!(m.state("a"), Some(&NodeState::Joining));
        assert!(drain(&mut m).is_empty());
        // Gone by silence, then back.
        m.handle_timeout(20 + PEER_SILENCE_TIMEOUT_MS);
        drain(&mut m);
        let actions = join(&mut m, 10_000, 3, "a");
        assert!(matches!(actions[0], Action::Welcome { connection: 3, .. }));
        assert_eq!(m.state("a"), Some(&NodeState::Joining));
        assert_eq!(m.snapshot(10_000).len(), 1);
    }

    #[test]
    fn gone_nodes_are_retained_within_a_bound() {
        let mut m = Membership::new();
        for i in 0..(GONE_NODES_RETAINED_MAX as u64 + 10) {
            join(&mut m, i, i, &format!("n{i:03}"));
            m.handle_disconnect(i, i, "bye");
        }
        assert!(m.snapshot(0).len() <= GONE_NODES_RETAINED_MAX + 1);
        assert_eq!(m.members().count(), 0);
    }

    #[test]
    fn same_inputs_same_outputs() {
        fn run() -> (Vec<Action>, Vec<NodeSnapshot>) {
            let mut m = Membership::new();
            let mut actions = Vec::new();
            for (i, id) in ["c", "a", "b"].iter().enumerate() {
                m.handle_hello(i as u64, i as u64, id, id, device(), true);
            }
            m.handle_heartbeat(1_000, 0, stats(3));
            m.handle_timeout(2 + PEER_SILENCE_TIMEOUT_MS);
            actions.extend(drain(&mut m));
            (actions, m.snapshot(5_000))
        }
        let (first, second) = (run(), run());
        assert_eq!(first, second);
        // "a" and "b" fall silent together; they go in node id order.
        let closed: Vec<_> = first.0.iter().filter_map(|a| match a {
            Action::Close { connection, .. } => Some(*connection),
            _ => None,
        }).collect();
        assert_eq!(closed, [1, 2]);
    }
}
