//! # potluck-worker
//!
//! The `worker` binary's logic, kept in a library so that it can be tested: [`join`] finds
//! the coordinator, proves the join token, fetches its slice (only what the slice cache
//! lacks) and runs its stage until the coordinator goes away, then joins again. Everything a
//! worker shares with the coordinator (the network, the stage runner, weight transfer, the
//! slice cache, the planner glue) is in `potluck-node`.
//!
//! **Architecture Invariant:** nothing depends on this crate.

pub mod join;
