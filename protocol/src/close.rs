//! QUIC application close codes: the number a node puts in `CONNECTION_CLOSE` when it ends
//! a connection on purpose, so the peer's log (`connection closed: closed by peer: N`) says
//! why without guessing. One table for every node, because either side may read them.
//!
//! They are part of the wire contract (docs/protocol.md, "Close codes"): a code keeps its
//! meaning across versions; a new reason takes a new number.

/// A node leaving, or done with the connection: not an error.
pub const LEAVING: u32 = 0;
/// The worker found the coordinator's token proof wrong: it may not know the token.
pub const COORDINATOR_PROOF_FAILED: u32 = 1;
/// A data connection whose peer showed no identity certificate.
pub const NO_IDENTITY: u32 = 2;
/// A data connection from a node that is not a member of the current pipeline.
pub const NOT_A_MEMBER: u32 = 3;
/// A data stream broke the protocol (garbage, a frame over its limit, a truncated frame, a
/// shape that does not match its payload).
pub const DATA_PROTOCOL_ERROR: u32 = 4;
/// The first control message was not a valid `Hello`.
pub const BAD_HELLO: u32 = 5;
/// The node id in `Hello` is not the one its certificate proves.
pub const IDENTITY_MISMATCH: u32 = 6;
/// The worker's join-token proof was wrong.
pub const BAD_JOIN_TOKEN: u32 = 7;
/// The coordinator removed a member (silence past its timeout, a newer connection of the
/// same node, a protocol error on the control stream); the reason travels as the close's
/// reason bytes.
pub const REMOVED: u32 = 8;
/// A dialled node answered with another node id than the one the dialler expected.
pub const UNEXPECTED_NODE_ID: u32 = 9;

#[cfg(test)]
mod tests {
    #[test]
    fn codes_are_distinct() {
        use super::*;
        let codes = [
            LEAVING, COORDINATOR_PROOF_FAILED, NO_IDENTITY, NOT_A_MEMBER, DATA_PROTOCOL_ERROR, BAD_HELLO,
            IDENTITY_MISMATCH, BAD_JOIN_TOKEN, REMOVED, UNEXPECTED_NODE_ID,
        ];
        let mut sorted = codes.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), codes.len());
    }
}
