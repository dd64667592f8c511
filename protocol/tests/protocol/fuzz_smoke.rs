//! A stable-toolchain stand-in for `cargo +nightly fuzz run decode` (protocol/fuzz/): a few
//! hundred thousand random and mutated buffers from a seeded generator, each run through
//! the same checks as the fuzz target. Deterministic, so a failure reproduces; set
//! `FUZZ_SMOKE_ITERATIONS` / `FUZZ_SMOKE_SEED` for a longer or different soak.

use potluck_protocol::*;

use crate::common::one_of_each;
use crate::fuzz_check::check;

/// SplitMix64: tiny, seeded, good enough to drive mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING_BYTES: [u8; 8] = [0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF, 0x20, 0x0C];

/// One mutation of a valid frame (or of random bytes).
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], buffer: &mut Vec<u8>) {
    match rng.below(9) {
        // Flip a few bits.
        0 => {
            for _ in 0..1 + rng.below(8) {
                if !buffer.is_empty() {
                    let at = rng.below(buffer.len());
                    buffer[at] ^= 1 << rng.below(8);
                }
            }
        }
        // Overwrite a byte with a boundary value.
        1 => {
            if !buffer.is_empty() {
                let at = rng.below(buffer.len());
                buffer[at] = INTERESTING_BYTES[rng.below(INTERESTING_BYTES.len())];
            }
        }
        // Truncate.
        2 => buffer.truncate(rng.below(buffer.len() + 1)),
        // Append random bytes.
        3 => (0..1 + rng.below(32)).for_each(|_| buffer.push(rng.next() as u8)),
        // Rewrite the declared body length (near the truth, or anything).
        4 => {
            if buffer.len() >= HEADER_BYTES {
                let truth = (buffer.len() - HEADER_BYTES) as u32;
                let len = match rng.below(3) {
                    0 => truth.wrapping_add(rng.below(16) as u32).wrapping_sub(8),
                    1 => rng.next() as u32,
                    _ => truth,
                };
                buffer[8..12].copy_from_slice(&len.to_le_bytes());
            }
        }
        // Swap the kind, keeping another kind's body.
        5 => {
            if buffer.len() >= HEADER_BYTES {
                buffer[6] = rng.below(16) as u8;
            }
        }
        // Overwrite a little-endian u32 somewhere in the body (lengths and offsets).
        6 => {
            if buffer.len() >= HEADER_BYTES + 4 {
                let at = HEADER_BYTES + rng.below(buffer.len() - HEADER_BYTES - 3);
                let value = [0u32, 1, u32::MAX, 0x8000_0000, rng.next() as u32][rng.below(5)];
                buffer[at..at + 4].copy_from_slice(&value.to_le_bytes());
            }
        }
        // Splice the tail of another frame.
        7 => {
            let other = &seeds[rng.below(seeds.len())];
            let from = rng.below(other.len() + 1);
            let at = rng.below(buffer.len() + 1);
            buffer.truncate(at);
            buffer.extend_from_slice(&other[from..]);
        }
        // Pure random bytes, sometimes behind a valid-looking header.
        _ => {
            let len = rng.below(256);
            let mut random: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if rng.below(2) == 0 && random.len() >= HEADER_BYTES {
                let header = FrameHeader {
                    version: PROTOCOL_VERSION,
                    kind: 1 + rng.below(14) as u8,
                    flags: 0,
                    body_len: (len - HEADER_BYTES) as u32,
                };
                random[..HEADER_BYTES].copy_from_slice(&header.to_bytes());
            }
            *buffer = random;
        }
    }
}

#[test]
fn decoder_survives_random_and_mutated_buffers() {
    let iterations: usize = std::env::var("FUZZ_SMOKE_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(500_000);
    let seed: u64 = std::env::var("FUZZ_SMOKE_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5EED_0001);
    let seeds: Vec<Vec<u8>> = one_of_each().iter().map(|m| encode(m).unwrap()).collect();
    let mut rng = Rng(seed);
    let mut buffer = Vec::new();
    let mut decoded = 0usize;
    for i in 0..iterations {
        // Start from a valid frame most of the time, then stack a few mutations.
        if i % 4 != 3 {
            buffer.clone_from(&seeds[rng.below(seeds.len())]);
        }
        for _ in 0..1 + rng.below(3) {
            mutate(&mut rng, &seeds, &mut buffer);
        }
        let split = rng.below(buffer.len() + 1);
        check(&buffer, split);
        decoded += usize::from(decode(&buffer).is_ok());
        buffer.truncate(4096); // Keep stacked splices small.
    }
    eprintln!("fuzz smoke: {decoded} of {iterations} buffers decoded");
    // The mutations must reach past the header checks often enough to exercise the body.
    assert!(decoded > iterations / 100, "only {decoded} of {iterations} buffers decoded");
}
