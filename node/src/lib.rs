//! # potluck-node
//!
//! What every node of a potluck cluster shares, the coordinator included (it is a node that
//! also serves the API): the library that the `worker` and `coordinator` binaries are built
//! around.
//!
//! * [`net`] — everything that crosses the network between nodes: node identities, the QUIC
//!   endpoints with identity-bound certificates, the join token's proofs, LAN discovery
//!   (libp2p mDNS), protocol frames over streams, and the data plane (dialling the next
//!   stage, accepting members' data streams, reading them into a stage's inbox).
//! * [`stage`] — [`stage::StageRunner`]: a layer range, its sequences' KV caches and, on the
//!   last stage, their samplers. Message in → message out, no I/O: a worker's stage and the
//!   coordinator's own stage run the same code, so one machine and many sample identically.
//! * [`weights`] — a slice's weights over the network, both halves: [`weights::serve`]
//!   streams tensors out of a GGUF in verified chunks (the coordinator today; a worker that
//!   holds a slice later), [`weights::fetch`] receives what the [`weights::slice_cache`]
//!   lacks and verifies it before anything is renamed into place.
//! * [`model`] — model resolution: `--model` (a path, or the default model fetched on
//!   first use) to a file on this machine.
//! * [`planner_glue`] — this device and this model as the shard planner sees them.
//! * [`resident`] — this process's resident memory now and at its peak (VmRSS, VmHWM).
//! * [`signal`] — SIGTERM and Ctrl-C, which both binaries treat as a clean stop.
//! * [`logging`] — the binaries' log set-up (stderr, `RUST_LOG`, colours only on a terminal).
//!
//! **Architecture Invariant:** `node`, `worker` and `coordinator` are the only crates with
//! sockets; nothing here knows OpenAI JSON or HTML, and nothing here depends on the `worker`
//! or `coordinator` crates (both depend on this one).

pub mod hub;
pub mod logging;
pub mod model;
pub mod net;
pub mod planner_glue;
pub mod resident;
pub mod signal;
pub mod stage;
pub mod weights;

pub use planner_glue::{default_threads, device_summary, node_profile, node_profile_from_summary, planner_model};
