//! docs/protocol.md's limits table says what `potluck_protocol::limits` says: every row's
//! value is the constant's (in the units the table writes), and every constant has a row.

use potluck_protocol::limits::*;

/// "33 MiB", "8 MiB + 64 KiB", "2²⁴", "1024", "10..=60000" → the number (a range: its ends).
fn parse(text: &str) -> Vec<u64> {
    if let Some((a, b)) = text.split_once("..=") {
        return vec![a.parse().unwrap(), b.parse().unwrap()];
    }
    if let Some(exponent) = text.strip_prefix('2') .filter(|e| !e.is_empty() && e.chars().all(|c| "⁰¹²³⁴⁵⁶⁷⁸⁹".contains(c))) {
        let digits: String = exponent.chars().map(|c| char::from_digit("⁰¹²³⁴⁵⁶⁷⁸⁹".chars().position(|d| d == c).unwrap() as u32, 10).unwrap()).collect();
        return vec![1u64 << digits.parse::<u32>().unwrap()];
    }
    let total = text
        .split(" + ")
        .map(|term| {
            let (number, unit) = term.split_once(' ').unwrap_or((term, ""));
            let scale = match unit {
                "" => 1,
                "KiB" => 1 << 10,
                "MiB" => 1 << 20,
                "GiB" => 1 << 30,
                other => panic!("unit {other:?} in {text:?}"),
            };
            number.parse::<u64>().unwrap_or_else(|_| panic!("{text:?}")) * scale
        })
        .sum();
    vec![total]
}

#[test]
fn the_limits_table_is_the_code() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md")).unwrap();
    let section = doc.split("\n## Limits\n").nth(1).expect("docs/protocol.md has no \"## Limits\" section");
    let rows: Vec<(String, String)> = section
        .lines()
        .skip_while(|l| !l.starts_with("| `"))
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_owned(), cells[2].to_owned())
        })
        .collect();
    let code: Vec<(&str, Vec<u64>)> = vec![
        ("FRAME_BYTES_MAX", vec![FRAME_BYTES_MAX.into()]),
        ("ACTIVATIONS_FRAME_BYTES_MAX", vec![ACTIVATIONS_FRAME_BYTES_MAX.into()]),
        ("WEIGHT_CHUNK_FRAME_BYTES_MAX", vec![WEIGHT_CHUNK_FRAME_BYTES_MAX.into()]),
        ("CONTROL_FRAME_BYTES_MAX", vec![CONTROL_FRAME_BYTES_MAX.into()]),
        ("DECODER_BUFFER_BYTES_MAX", vec![DECODER_BUFFER_BYTES_MAX.into()]),
        ("WEIGHT_CHUNK_BYTES_MAX", vec![WEIGHT_CHUNK_BYTES_MAX.into()]),
        ("ACTIVATION_ROWS_MAX", vec![ACTIVATION_ROWS_MAX.into()]),
        ("HIDDEN_DIM_MAX", vec![HIDDEN_DIM_MAX.into()]),
        ("SEGMENTS_MAX", vec![SEGMENTS_MAX.into()]),
        ("SAMPLED_TOKENS_MAX", vec![SAMPLED_TOKENS_MAX.into()]),
        ("SEQUENCE_POSITIONS_MAX", vec![SEQUENCE_POSITIONS_MAX.into()]),
        ("TOP_LOGPROBS_MAX", vec![TOP_LOGPROBS_MAX.into()]),
        ("PENALTY_WINDOW_TOKENS_MAX", vec![PENALTY_WINDOW_TOKENS_MAX.into()]),
        ("PROMPT_LOGPROBS_TOKENS_MAX", vec![PROMPT_LOGPROBS_TOKENS_MAX.into()]),
        ("LOGIT_BIAS_TOKENS_MAX", vec![LOGIT_BIAS_TOKENS_MAX.into()]),
        ("TOKEN_MASK_VOCAB_MAX", vec![TOKEN_MASK_VOCAB_MAX.into()]),
        ("MASKED_SEGMENTS_MAX", vec![MASKED_SEGMENTS_MAX.into()]),
        ("DRAFT_TOKENS_MAX", vec![DRAFT_TOKENS_MAX.into()]),
        ("LOGIT_BIAS_ABS_MAX", vec![LOGIT_BIAS_ABS_MAX as u64]),
        ("NAME_BYTES_MAX", vec![NAME_BYTES_MAX.into()]),
        ("ADDRESS_BYTES_MAX", vec![ADDRESS_BYTES_MAX.into()]),
        ("MODEL_PROFILE_BYTES_MAX", vec![MODEL_PROFILE_BYTES_MAX.into()]),
        ("REASON_BYTES_MAX", vec![REASON_BYTES_MAX.into()]),
        ("TENSORS_PER_ASSIGNMENT_MAX", vec![TENSORS_PER_ASSIGNMENT_MAX.into()]),
        ("TENSOR_DIMS_MAX", vec![TENSOR_DIMS_MAX.into()]),
        ("TENSOR_BYTES_MAX", vec![TENSOR_BYTES_MAX]),
        ("LAYERS_MAX", vec![LAYERS_MAX.into()]),
        ("HEARTBEAT_INTERVAL_MS_MIN..=MAX", vec![HEARTBEAT_INTERVAL_MS_MIN.into(), HEARTBEAT_INTERVAL_MS_MAX.into()]),
    ];
    for (name, value) in &code {
        let row = rows.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("docs/protocol.md's limits table lacks {name}"));
        assert_eq!(&parse(&row.1), value, "docs/protocol.md says {name} is {}", row.1);
    }
    for (name, _) in &rows {
        assert!(code.iter().any(|(n, _)| n == name), "docs/protocol.md lists {name}, which this test does not know");
    }
}
