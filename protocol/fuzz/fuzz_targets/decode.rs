//! Fuzz target `decode`: arbitrary bytes into `decode` and a `FrameDecoder` (split where the
//! first byte says). Nothing may panic; whatever decodes must re-encode and decode the same;
//! the incremental decoder must agree with `decode`. The checks live in
//! `protocol/tests/protocol/fuzz_check.rs`, shared with the stable smoke test.
//!
//! Run (nightly only): `cd protocol && cargo +nightly fuzz run decode -- -dict=fuzz/decode.dict`

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/protocol/fuzz_check.rs"]
mod fuzz_check;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |&b| usize::from(b) * data.len() / 256);
    fuzz_check::check(data, split);
});
