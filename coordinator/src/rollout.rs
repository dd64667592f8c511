//! The rollout of a new plan, as a pure state machine: from "the planner chose these stages"
//! to "switch the generation loop onto their pipeline".
//!
//! A rollout goes through two phases. **Preparing**: each worker stage's assignment is being
//! built off the driver (hashing its tensors is blocking work); the driver reports each one
//! with [`Rollout::assignment_ready`]. **Loading**: every assignment has gone out and each
//! worker fetches and loads its slice; the driver reports each stage's Ready with
//! [`Rollout::stage_ready`]. When the last stage is ready the rollout hands back the plan to
//! activate. A plan with no worker stage (every layer back on the coordinator) activates at
//! once.
//!
//! Every rollout has a **generation**; a newer plan replaces the one in progress, and any
//! input that names an older generation — an assignment hashed for it, a Ready that answers
//! its assignment — is ignored. A stage whose connection closes mid-rollout aborts it (the
//! membership change that follows re-plans), and so does a rollout that hears nothing for
//! [`ROLLOUT_STALL_TIMEOUT_MS`].
//!
//! Like [`crate::membership`], this module does no I/O and never reads the clock: time comes
//! in as milliseconds since the driver started, and what to do comes out as [`Action`]s, which
//! the cluster driver (`cluster.rs`) carries out in order. It is generic over the plan and
//! the assignment it carries, so its tests need neither the planner nor the wire format.

use std::collections::{BTreeMap, BTreeSet};

use crate::membership::ConnectionId;

/// A rollout that hears nothing — no assignment built, no stage ready, no load progress —
/// for this long is given up (the plan in force stays). Loading reports progress at least
/// every few seconds while bytes move, and a worker that cannot fetch gives up and
/// disconnects long before this (`PEER_WAIT_TIMEOUT_MS`), so only a wedged rollout reaches
/// it; it bounds the wait all the same.
pub const ROLLOUT_STALL_TIMEOUT_MS: u64 = 10 * 60 * 1000;

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action<P, A> {
    /// Send `assignment` to `node_id` on `connection` (the one it had when planned). One per
    /// worker stage, in node id order, once every assignment is built.
    SendAssignment { generation: u64, node_id: String, connection: ConnectionId, assignment: A },
    /// Every stage is ready: build this plan's pipeline and switch to it. `connections` are
    /// the worker stages' connections (a stage later seen on another one has restarted).
    Activate { generation: u64, plan: P, connections: BTreeMap<String, ConnectionId> },
    /// The rollout cannot finish; the plan in force stays.
    Abort { generation: u64, reason: String },
}

#[derive(Debug)]
enum Phase<A> {
    /// Assignments being built; those built so far.
    Preparing { assignments: BTreeMap<String, A> },
    /// Assignments sent; the stages not yet ready.
    Loading { waiting: BTreeSet<String> },
}

#[derive(Debug)]
struct InProgress<P, A> {
    generation: u64,
    plan: P,
    /// The worker stages and the connection each had when planned.
    stages: BTreeMap<String, ConnectionId>,
    phase: Phase<A>,
    /// When the rollout last heard anything (for [`ROLLOUT_STALL_TIMEOUT_MS`]).
    last_heard_ms: u64,
}

/// At most one rollout in progress.
#[derive(Debug)]
pub struct Rollout<P, A> {
    current: Option<InProgress<P, A>>,
}

impl<P, A> Default for Rollout<P, A> {
    fn default() -> Self {
        Self { current: None }
    }
}

impl<P, A> Rollout<P, A> {
    pub fn new() -> Self {
        Self::default()
    }

    /// The generation being rolled out, if any.
    pub fn generation(&self) -> Option<u64> {
        self.current.as_ref().map(|c| c.generation)
    }

    /// Starts rolling out `plan` (replacing any rollout in progress). `stages` are its worker
    /// stages with their connections; the driver builds their assignments and reports each
    /// with [`Self::assignment_ready`]. `generation` must grow with every call.
    pub fn plan(&mut self, now_ms: u64, generation: u64, plan: P, stages: BTreeMap<String, ConnectionId>) -> Vec<Action<P, A>> {
        debug_assert!(self.generation().is_none_or(|g| g < generation), "plan generations grow");
        let rollout = InProgress {
            generation,
            plan,
            stages,
            phase: Phase::Preparing { assignments: BTreeMap::new() },
            last_heard_ms: now_ms,
        };
        self.current = Some(rollout);
        self.advance()
    }

    /// A worker stage's assignment is built.
    pub fn assignment_ready(&mut self, now_ms: u64, generation: u64, node_id: &str, assignment: A) -> Vec<Action<P, A>> {
        let Some(rollout) = self.current.as_mut().filter(|r| r.generation == generation) else {
            return Vec::new(); // a superseded plan's
        };
        if !rollout.stages.contains_key(node_id) {
            return Vec::new();
        }
        let Phase::Preparing { assignments } = &mut rollout.phase else { return Vec::new() };
        assignments.insert(node_id.to_owned(), assignment);
        rollout.last_heard_ms = now_ms;
        self.advance()
    }

    /// Building an assignment failed: the rollout cannot go on.
    pub fn assignment_failed(&mut self, _now_ms: u64, generation: u64, reason: &str) -> Vec<Action<P, A>> {
        if self.generation() != Some(generation) {
            return Vec::new();
        }
        self.abort(reason.to_owned())
    }

    /// `node_id` says its stage is ready, answering the assignment of `generation`. A Ready
    /// for an older generation's assignment, from a node that is not a stage, or said twice,
    /// changes nothing.
    pub fn stage_ready(&mut self, now_ms: u64, node_id: &str, generation: u64) -> Vec<Action<P, A>> {
        let Some(rollout) = self.current.as_mut().filter(|r| r.generation == generation) else {
            return Vec::new();
        };
        let Phase::Loading { waiting } = &mut rollout.phase else { return Vec::new() };
        if waiting.remove(node_id) {
            rollout.last_heard_ms = now_ms;
        }
        self.advance()
    }

    /// `node_id` reported loading progress: the rollout is alive.
    pub fn stage_progress(&mut self, now_ms: u64, node_id: &str) {
        if let Some(rollout) = self.current.as_mut() {
            if matches!(&rollout.phase, Phase::Loading { waiting } if waiting.contains(node_id)) {
                rollout.last_heard_ms = now_ms;
            }
        }
    }

    /// `node_id`'s connection `connection` closed (or was closed). If it is a stage of the
    /// rollout on that connection, the rollout aborts: its assignment (and any Ready) died
    /// with the connection.
    pub fn stage_left(&mut self, _now_ms: u64, node_id: &str, connection: ConnectionId) -> Vec<Action<P, A>> {
        let Some(rollout) = self.current.as_ref() else { return Vec::new() };
        if rollout.stages.get(node_id) != Some(&connection) {
            return Vec::new();
        }
        self.abort(format!("stage node {node_id} left during the rollout"))
    }

    /// Gives up a rollout that has heard nothing for [`ROLLOUT_STALL_TIMEOUT_MS`].
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action<P, A>> {
        let Some(rollout) = self.current.as_ref() else { return Vec::new() };
        let silent_ms = now_ms.saturating_sub(rollout.last_heard_ms);
        if silent_ms < ROLLOUT_STALL_TIMEOUT_MS {
            return Vec::new();
        }
        self.abort(format!("the rollout heard nothing for {} s", silent_ms / 1000))
    }

    fn abort(&mut self, reason: String) -> Vec<Action<P, A>> {
        let Some(rollout) = self.current.take() else { return Vec::new() };
        vec![Action::Abort { generation: rollout.generation, reason }]
    }

    /// Moves on as far as the inputs so far allow: every assignment built → send them all;
    /// no stage waiting → activate.
    fn advance(&mut self) -> Vec<Action<P, A>> {
        let mut actions = Vec::new();
        let Some(rollout) = self.current.as_mut() else { return actions };
        if let Phase::Preparing { assignments } = &mut rollout.phase {
            if assignments.len() < rollout.stages.len() {
                return actions;
            }
            for (node_id, assignment) in std::mem::take(assignments) {
                let connection = rollout.stages[&node_id];
                actions.push(Action::SendAssignment { generation: rollout.generation, node_id, connection, assignment });
            }
            rollout.phase = Phase::Loading { waiting: rollout.stages.keys().cloned().collect() };
        }
        if matches!(&rollout.phase, Phase::Loading { waiting } if waiting.is_empty()) {
            let done = self.current.take().expect("looked at above");
            actions.push(Action::Activate { generation: done.generation, plan: done.plan, connections: done.stages });
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type R = Rollout<&'static str, u32>;
    type Act = Action<&'static str, u32>;

    fn stages(list: &[(&str, ConnectionId)]) -> BTreeMap<String, ConnectionId> {
        list.iter().map(|(n, c)| (n.to_string(), *c)).collect()
    }

    fn sends(actions: &[Act]) -> Vec<(u64, String, u32)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SendAssignment { generation, node_id, assignment, .. } => Some((*generation, node_id.clone(), *assignment)),
                _ => None,
            })
            .collect()
    }

    fn activated(actions: &[Act]) -> Option<(u64, &'static str)> {
        actions.iter().find_map(|a| match a {
            Action::Activate { generation, plan, .. } => Some((*generation, *plan)),
            _ => None,
        })
    }

    /// Rolls `plan` out to `a` (connection 1) and `b` (connection 2) up to the sends.
    fn sent(r: &mut R, now: u64, generation: u64, plan: &'static str) {
        assert!(r.plan(now, generation, plan, stages(&[("a", 1), ("b", 2)])).is_empty());
        assert!(r.assignment_ready(now, generation, "b", 20).is_empty(), "a is not built yet");
        let actions = r.assignment_ready(now, generation, "a", 10);
        assert_eq!(sends(&actions), [(generation, "a".into(), 10), (generation, "b".into(), 20)]);
        assert_eq!(activated(&actions), None);
    }

    #[test]
    fn a_plan_activates_when_every_stage_is_ready() {
        let mut r = R::new();
        sent(&mut r, 0, 1, "p1");
        assert!(r.stage_ready(5, "a", 1).is_empty());
        let actions = r.stage_ready(6, "b", 1);
        assert_eq!(
            actions,
            [Action::Activate { generation: 1, plan: "p1", connections: stages(&[("a", 1), ("b", 2)]) }]
        );
        assert_eq!(r.generation(), None, "done");
    }

    #[test]
    fn a_plan_with_no_worker_stage_activates_at_once() {
        let mut r = R::new();
        let actions = r.plan(0, 1, "local", BTreeMap::new());
        assert_eq!(actions, [Action::Activate { generation: 1, plan: "local", connections: BTreeMap::new() }]);
    }

    #[test]
    fn a_newer_plan_supersedes_one_mid_rollout_and_old_readiness_is_ignored() {
        let mut r = R::new();
        sent(&mut r, 0, 1, "p1");
        assert!(r.stage_ready(1, "a", 1).is_empty());
        // A node joins: plan 2 replaces plan 1 while b is still loading plan 1's slice.
        assert!(r.plan(2, 2, "p2", stages(&[("a", 1), ("b", 2)])).is_empty());
        // Plan 1's last Ready and an assignment hashed for plan 1 arrive late: nothing.
        assert!(r.stage_ready(3, "b", 1).is_empty());
        assert!(r.assignment_ready(3, 1, "a", 99).is_empty());
        assert!(r.assignment_ready(4, 2, "a", 11).is_empty());
        let actions = r.assignment_ready(4, 2, "b", 21);
        assert_eq!(sends(&actions), [(2, "a".into(), 11), (2, "b".into(), 21)], "plan 2's assignments, not plan 1's");
        // a's Ready for plan 1 came before plan 2's assignment: it does not count for plan 2.
        assert!(r.stage_ready(5, "b", 2).is_empty(), "a has not answered plan 2");
        assert_eq!(activated(&r.stage_ready(6, "a", 2)), Some((2, "p2")));
    }

    #[test]
    fn readiness_before_the_assignments_go_out_is_ignored() {
        let mut r = R::new();
        assert!(r.plan(0, 3, "p", stages(&[("a", 1)])).is_empty());
        // A Ready tagged with this generation cannot answer an assignment not yet sent.
        assert!(r.stage_ready(1, "a", 3).is_empty());
        assert_eq!(sends(&r.assignment_ready(2, 3, "a", 1)), [(3, "a".into(), 1)]);
        assert_eq!(activated(&r.stage_ready(3, "a", 3)), Some((3, "p")));
    }

    #[test]
    fn readiness_said_twice_counts_once() {
        let mut r = R::new();
        sent(&mut r, 0, 1, "p1");
        assert!(r.stage_ready(1, "a", 1).is_empty());
        assert!(r.stage_ready(2, "a", 1).is_empty(), "a again: b is still loading");
        assert!(r.stage_ready(2, "c", 1).is_empty(), "not a stage of this plan");
        let actions = r.stage_ready(3, "b", 1);
        assert_eq!(activated(&actions), Some((1, "p1")));
        assert!(r.stage_ready(4, "b", 1).is_empty(), "after activation: nothing to do");
    }

    #[test]
    fn a_stage_leaving_mid_rollout_aborts_it() {
        let mut r = R::new();
        sent(&mut r, 0, 1, "p1");
        assert!(r.stage_ready(1, "a", 1).is_empty());
        assert!(r.stage_left(2, "c", 7).is_empty(), "not a stage");
        assert!(r.stage_left(2, "b", 9).is_empty(), "b's old connection closing is not b leaving");
        let actions = r.stage_left(3, "b", 2);
        assert!(matches!(&actions[..], [Action::Abort { generation: 1, reason }] if reason.contains('b')), "{actions:?}");
        assert_eq!(r.generation(), None);
        assert!(r.stage_ready(4, "b", 1).is_empty(), "an aborted rollout never activates");
    }

    #[test]
    fn a_stage_leaving_while_assignments_are_built_aborts_too() {
        let mut r = R::new();
        assert!(r.plan(0, 1, "p1", stages(&[("a", 1), ("b", 2)])).is_empty());
        assert!(matches!(&r.stage_left(1, "a", 1)[..], [Action::Abort { generation: 1, .. }]));
        assert!(r.assignment_ready(2, 1, "a", 1).is_empty());
        assert!(r.assignment_ready(2, 1, "b", 2).is_empty(), "no sends for an aborted plan");
    }

    #[test]
    fn a_failed_assignment_aborts_only_its_own_generation() {
        let mut r = R::new();
        assert!(r.plan(0, 1, "p1", stages(&[("a", 1)])).is_empty());
        assert!(r.plan(1, 2, "p2", stages(&[("a", 1)])).is_empty());
        assert!(r.assignment_failed(2, 1, "disk error").is_empty(), "plan 1 is gone already");
        let actions = r.assignment_failed(3, 2, "disk error");
        assert_eq!(actions, [Action::Abort { generation: 2, reason: "disk error".into() }]);
    }

    #[test]
    fn a_silent_rollout_times_out_and_progress_keeps_it_alive() {
        let mut r = R::new();
        sent(&mut r, 0, 1, "p1");
        let almost = ROLLOUT_STALL_TIMEOUT_MS - 1;
        assert!(r.tick(almost).is_empty());
        r.stage_progress(almost, "a");
        assert!(r.tick(almost + ROLLOUT_STALL_TIMEOUT_MS - 1).is_empty(), "progress restarted the clock");
        r.stage_progress(almost + 10, "c"); // not a stage: no effect
        let actions = r.tick(almost + ROLLOUT_STALL_TIMEOUT_MS);
        assert!(matches!(&actions[..], [Action::Abort { generation: 1, .. }]), "{actions:?}");
        assert!(r.tick(u64::MAX).is_empty(), "nothing left to time out");
    }
}
