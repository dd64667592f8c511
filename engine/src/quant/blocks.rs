//! The GGUF block layouts of the 32-value ("legacy") quant types, and their scalar decoders.
//!
//! Every layout here is byte-for-byte ggml's (`ggml-common.h`: `block_q4_0`, `block_q4_1`,
//! `block_q5_0`, `block_q5_1`, `block_q8_0`). The weight bytes are kept exactly as the GGUF
//! file stores them, so nothing here is a Rust struct: a block is read at a byte offset with
//! little-endian loads, which needs no alignment.
//!
//! **Decoding convention.** The kernels see every 4- and 5-bit format as "unsigned codes
//! `u` in `0..=31`, a scale `d` and an offset `m`", the weight being `d * u + m`. Q4_1 and Q5_1
//! store `m`; Q4_0 (`d * (u - 8)`) and Q5_0 (`d * (u - 16)`) have `m = -8d` and `m = -16d`.
//! With the activation block's `s = d_x * sum(q_x)` (ggml's `block_q8_1::s`) the dot of one
//! block is `d * d_x * sum(u * q_x) + m * s`, exactly ggml's `ggml_vec_dot_q4_1_q8_1`. Keeping
//! the codes unsigned lets the AVX2 kernels use `vpmaddubsw`/`vpdpbusd` (unsigned × signed)
//! directly. Q8_0 weights are signed and have no offset; so are Q4_0 and Q5_0 in the dot
//! kernels ([`decode_signed`]: `u - 8`, `u - 16`, ggml's own form), because the offset form
//! rounds differently from llama.cpp's.

use half::f16;

/// Values per block of every non-K quant type (ggml `QK4_0` … `QK8_0`).
pub(crate) const QK: usize = 32;

/// The five 32-value block formats this module has its own kernels for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Legacy {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
}

impl Legacy {
    /// Bytes per block (ggml `sizeof(block_q…)`).
    pub(crate) const fn block_bytes(self) -> usize {
        match self {
            Legacy::Q4_0 => 18,
            Legacy::Q4_1 => 20,
            Legacy::Q5_0 => 22,
            Legacy::Q5_1 => 24,
            Legacy::Q8_0 => 34,
        }
    }
}

#[inline(always)]
fn f16_at(b: &[u8], offset: usize) -> f32 {
    f16::from_le_bytes([b[offset], b[offset + 1]]).to_f32()
}

#[inline(always)]
fn u32_at(b: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes([b[offset], b[offset + 1], b[offset + 2], b[offset + 3]])
}

/// Decodes the 4-bit codes of `qs` (16 bytes): value `j` is the low nibble of byte `j`, value
/// `j + 16` its high nibble (ggml `dequantize_row_q4_0`).
#[inline(always)]
fn nibbles(qs: &[u8], codes: &mut [u8; QK]) {
    for j in 0..QK / 2 {
        codes[j] = qs[j] & 0x0F;
        codes[j + QK / 2] = qs[j] >> 4;
    }
}

/// Adds the fifth bits of `qh` (bit `j` belongs to value `j`) as 16 (ggml
/// `dequantize_row_q5_0`).
#[inline(always)]
fn fifth_bits(qh: u32, codes: &mut [u8; QK]) {
    for (j, code) in codes.iter_mut().enumerate() {
        *code |= (((qh >> j) & 1) as u8) << 4;
    }
}

/// Decodes one unsigned-code block (Q4_0, Q4_1, Q5_0, Q5_1) into its codes, returning
/// `(d, m)` with the weight being `d * code + m`.
#[inline(always)]
pub(crate) fn decode_unsigned(format: Legacy, block: &[u8], codes: &mut [u8; QK]) -> (f32, f32) {
    match format {
        // block_q4_0 { f16 d; u8 qs[16]; }
        Legacy::Q4_0 => {
            let d = f16_at(block, 0);
            nibbles(&block[2..18], codes);
            (d, -8.0 * d)
        }
        // block_q4_1 { f16 d; f16 m; u8 qs[16]; }
        Legacy::Q4_1 => {
            nibbles(&block[4..20], codes);
            (f16_at(block, 0), f16_at(block, 2))
        }
        // block_q5_0 { f16 d; u8 qh[4]; u8 qs[16]; }
        Legacy::Q5_0 => {
            let d = f16_at(block, 0);
            nibbles(&block[6..22], codes);
            fifth_bits(u32_at(block, 2), codes);
            (d, -16.0 * d)
        }
        // block_q5_1 { f16 d; f16 m; u8 qh[4]; u8 qs[16]; }
        Legacy::Q5_1 => {
            nibbles(&block[8..24], codes);
            fifth_bits(u32_at(block, 4), codes);
            (f16_at(block, 0), f16_at(block, 2))
        }
        Legacy::Q8_0 => unreachable!("Q8_0 has signed codes"),
    }
}

/// Decodes one block_q8_0 { f16 d; i8 qs[32]; } into its codes, returning `d`.
#[inline(always)]
pub(crate) fn decode_q8_0(block: &[u8], codes: &mut [i8; QK]) -> f32 {
    for (code, &byte) in codes.iter_mut().zip(&block[2..34]) {
        *code = byte as i8;
    }
    f16_at(block, 0)
}

/// Decodes a block of a signed-code format (Q8_0; Q4_0 and Q5_0 as `u - 8`, `u - 16`, the
/// way ggml's dot kernels see them) into its codes, returning `d`.
pub(crate) fn decode_signed(format: Legacy, block: &[u8], codes: &mut [i8; QK]) -> f32 {
    let zero_point = match format {
        Legacy::Q8_0 => return decode_q8_0(block, codes),
        Legacy::Q4_0 => 8,
        Legacy::Q5_0 => 16,
        Legacy::Q4_1 | Legacy::Q5_1 => unreachable!("{format:?} stores an offset; see decode_unsigned"),
    };
    let mut unsigned = [0u8; QK];
    let (d, _) = decode_unsigned(format, block, &mut unsigned);
    for (code, &u) in codes.iter_mut().zip(&unsigned) {
        *code = u as i8 - zero_point;
    }
    d
}

/// Dequantizes a whole row of `format` blocks into `out` (`out.len()` values).
pub(crate) fn dequantize_row(format: Legacy, row: &[u8], out: &mut [f32]) {
    let block_bytes = format.block_bytes();
    for (block, values) in row.chunks_exact(block_bytes).zip(out.chunks_exact_mut(QK)) {
        if format == Legacy::Q8_0 {
            let mut codes = [0i8; QK];
            let d = decode_q8_0(block, &mut codes);
            for (v, &c) in values.iter_mut().zip(&codes) {
                *v = d * c as f32;
            }
        } else {
            let mut codes = [0u8; QK];
            let (d, m) = decode_unsigned(format, block, &mut codes);
            // Round exactly as ggml's dequantize_row_* does: `d * (u - 8)` for the offset-free
            // types, `d * u + m` for the ones that store `m`.
            let zero_point = match format {
                Legacy::Q4_0 => Some(8.0),
                Legacy::Q5_0 => Some(16.0),
                _ => None,
            };
            for (v, &c) in values.iter_mut().zip(&codes) {
                *v = match zero_point {
                    Some(z) => d * (c as f32 - z),
                    None => d * c as f32 + m,
                };
            }
        }
    }
}
