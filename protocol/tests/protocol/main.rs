//! The protocol's integration tests, one crate (one link) for all of them:
//! - `rejections`: one test per rule of the wire format, broken once;
//! - `round_trip`: property round trips of every message kind, whole and through a
//!   `FrameDecoder` fed byte by byte and in random splits; the largest legal messages fit;
//! - `fuzz_smoke`: the fuzz target's checks over seeded random and mutated buffers, for
//!   machines without nightly.

mod close_codes_doc;
mod common;
mod fuzz_check;
mod fuzz_smoke;
mod limits_doc;
mod rejections;
mod round_trip;
