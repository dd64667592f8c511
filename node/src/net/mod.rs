//! Everything that crosses the network between nodes: identities, the QUIC endpoint with
//! identity-bound certificates, the join token's proofs, LAN discovery, and protocol frames
//! over streams. The coordinator uses this module too (it is a node like any other).

pub mod data;
pub mod framed;
pub mod discovery;
pub mod identity;
pub mod tls;
pub mod token;
