//! The GGML type table: GGUF's numeric type ids (`enum ggml_type` in ggml.h) and candle's
//! [`GgmlDType`], both ways. The wire (`TensorRef.dtype`) and the slice cache's manifest
//! carry these ids, so they are GGUF's numbers, never candle's enum order.

use candle_core::quantized::GgmlDType;

/// GGML type ids as stored in GGUF (`enum ggml_type` in ggml.h), for the types candle loads;
/// candle's own `GgmlDType::from_u32` is crate-private.
pub fn ggml_dtype_from_id(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// ggml's name for a type id the engine does not load (`ggml_type_name`), for error messages:
/// the i-quants, integer and other types a GGUF may hold.
pub fn unloadable_ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// The inverse of [`ggml_dtype_from_id`] (for whoever builds a `TensorRef` from a GGUF).
pub fn ggml_dtype_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_for_every_known_type() {
        for id in 0..64 {
            if let Some(dtype) = ggml_dtype_from_id(id) {
                assert_eq!(ggml_dtype_id(dtype), id);
            }
        }
        assert_eq!(ggml_dtype_from_id(2), Some(GgmlDType::Q4_0), "Q4_0 is GGML type 2 (ggml.h)");
        assert_eq!(ggml_dtype_from_id(4), None, "4 and 5 were Q4_2/Q4_3, removed from ggml");
    }
}
