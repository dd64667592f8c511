//! # potluck-protocol
//!
//! The only crate that knows the wire format between potluck nodes (handshake, control
//! messages, activation frames). It does no I/O: codecs take and return bytes, so every
//! rejection is tested without sockets.
//!
//! Status: the cluster issue fills this crate in (rkyv frames with checked access, named
//! limits, a fuzz target). Until then only the protocol version is defined, so that the
//! coordinator can report it.

/// Version of the node-to-node protocol. Bumped on any incompatible change to the wire format;
/// peers with a different version are refused at the handshake.
pub const PROTOCOL_VERSION: u16 = 1;
