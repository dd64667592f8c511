//! The checks the fuzz target (`protocol/fuzz/fuzz_targets/decode.rs`, which includes this
//! file) and the stable smoke test (`fuzz_smoke.rs`) run on every buffer.

use potluck_protocol::{decode, encode, FrameDecoder, ProtocolError};

/// What the fuzz target checks: never a panic; whatever decodes re-encodes to a frame that
/// decodes the same (compared as bytes: a sampled logprob may be NaN); the incremental
/// decoder agrees with `decode`.
pub fn check(buffer: &[u8], split: usize) {
    let whole = decode(buffer);
    if let Ok(message) = &whole {
        let again = encode(message).expect("a decoded message re-encodes");
        let twice = encode(&decode(&again).expect("a re-encoded message decodes")).unwrap();
        assert_eq!(again, twice);
    }
    let mut decoder = FrameDecoder::new();
    let split = split.min(buffer.len());
    let mut first = None;
    let mut failed = false;
    for part in [&buffer[..split], &buffer[split..]] {
        if decoder.push(part).is_err() {
            failed = true;
            break;
        }
        match decoder.poll() {
            Ok(Some(message)) if first.is_none() => first = Some(message),
            Ok(_) => {}
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    match whole {
        Ok(message) => {
            assert!(!failed);
            assert_eq!(encode(&first.expect("the decoder yields the frame")).unwrap(), encode(&message).unwrap());
        }
        // The decoder waits for more bytes, or has stopped at the end of the first frame.
        Err(ProtocolError::Truncated { .. } | ProtocolError::TrailingBytes { .. }) => {}
        Err(_) => assert!(failed && first.is_none(), "decode refused what the decoder accepted"),
    }
}
