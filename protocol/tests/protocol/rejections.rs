//! One test per rejection: each rule of the wire format, broken once, on the receiving path
//! (and, where our own code could build the message, on the sending path too).

use potluck_protocol::limits::*;
use potluck_protocol::*;

use crate::common::*;

// ---- Framing ----------------------------------------------------------------------------

#[test]
fn frame_too_large_is_refused_from_the_header_alone() {
    // Only the header has arrived; it declares one byte more than an activation frame may be.
    let body_len = ACTIVATIONS_FRAME_BYTES_MAX - HEADER_BYTES as u32 + 1;
    let header = FrameHeader { version: PROTOCOL_VERSION, kind: Kind::Activations as u8, flags: 0, body_len };
    let expected = ProtocolError::FrameTooLarge {
        len: u64::from(ACTIVATIONS_FRAME_BYTES_MAX) + 1,
        max: u64::from(ACTIVATIONS_FRAME_BYTES_MAX),
    };
    assert_eq!(decode(&header.to_bytes()), Err(expected.clone()));
    let mut decoder = FrameDecoder::new();
    decoder.push(&header.to_bytes()).unwrap();
    assert_eq!(decoder.poll(), Err(expected));
    assert_eq!(decoder.buffered_bytes(), 0, "nothing buffered for the refused frame");
}

#[test]
fn control_frame_over_its_own_limit_is_refused() {
    // Legal for an activation frame, far too large for a heartbeat.
    let body_len = CONTROL_FRAME_BYTES_MAX;
    let header = FrameHeader { version: PROTOCOL_VERSION, kind: Kind::Heartbeat as u8, flags: 0, body_len };
    assert_eq!(
        decode(&header.to_bytes()),
        Err(ProtocolError::FrameTooLarge {
            len: u64::from(CONTROL_FRAME_BYTES_MAX) + HEADER_BYTES as u64,
            max: u64::from(CONTROL_FRAME_BYTES_MAX),
        })
    );
}

#[test]
fn largest_u32_body_length_is_refused() {
    let header = FrameHeader { version: PROTOCOL_VERSION, kind: Kind::Activations as u8, flags: 0, body_len: u32::MAX };
    assert!(matches!(decode(&header.to_bytes()), Err(ProtocolError::FrameTooLarge { .. })));
}

#[test]
fn truncated_header_is_refused() {
    let frame = encode(&Message::Ready).unwrap();
    assert_eq!(decode(&frame[..HEADER_BYTES - 1]), Err(ProtocolError::Truncated { needed: 12, got: 11 }));
}

#[test]
fn truncated_body_is_refused() {
    let frame = encode(&Message::Hello(hello())).unwrap();
    let cut = frame.len() - 1;
    assert_eq!(decode(&frame[..cut]), Err(ProtocolError::Truncated { needed: frame.len() as u64, got: cut as u64 }));
}

#[test]
fn trailing_bytes_are_refused() {
    let mut frame = encode(&Message::Shutdown).unwrap();
    frame.extend_from_slice(&[0, 0, 0]);
    assert_eq!(decode(&frame), Err(ProtocolError::TrailingBytes { extra: 3 }));
}

#[test]
fn bad_magic_is_refused() {
    let mut frame = encode(&Message::Ready).unwrap();
    frame[0..4].copy_from_slice(b"HTTP");
    assert_eq!(decode(&frame), Err(ProtocolError::BadMagic { got: *b"HTTP" }));
}

#[test]
fn wrong_header_version_is_refused() {
    let frame = frame(PROTOCOL_VERSION + 1, Kind::Ready as u8, 0, &[]);
    assert_eq!(
        decode(&frame),
        Err(ProtocolError::UnsupportedVersion { got: PROTOCOL_VERSION + 1, supported: PROTOCOL_VERSION })
    );
}

#[test]
fn version_is_reported_even_with_a_kind_this_version_lacks() {
    // A newer peer's new kind: the version mismatch is what the user needs to hear.
    let frame = frame(PROTOCOL_VERSION + 1, 200, 0, &[]);
    assert!(matches!(decode(&frame), Err(ProtocolError::UnsupportedVersion { .. })));
}

#[test]
fn hello_claiming_another_version_is_refused() {
    let message = Message::Hello(Hello { protocol_version: PROTOCOL_VERSION + 1, ..hello() });
    assert_refused(message, ProtocolError::UnsupportedVersion { got: PROTOCOL_VERSION + 1, supported: PROTOCOL_VERSION });
}

#[test]
fn unknown_kind_is_refused() {
    for kind in [0u8, 16, 255] {
        assert_eq!(decode(&frame(PROTOCOL_VERSION, kind, 0, &[])), Err(ProtocolError::UnknownKind { kind }));
    }
}

#[test]
fn unknown_flags_are_refused() {
    let frame = frame(PROTOCOL_VERSION, Kind::Ready as u8, 0x01, &[]);
    assert_eq!(decode(&frame), Err(ProtocolError::UnknownFlags { flags: 0x01 }));
}

#[test]
fn body_on_a_bodiless_kind_is_refused() {
    let frame = frame(PROTOCOL_VERSION, Kind::Shutdown as u8, 0, &[0]);
    assert!(matches!(decode(&frame), Err(ProtocolError::Malformed(_))));
}

#[test]
fn empty_body_is_malformed() {
    let frame = frame(PROTOCOL_VERSION, Kind::Heartbeat as u8, 0, &[]);
    assert!(matches!(decode(&frame), Err(ProtocolError::Malformed(_))));
}

#[test]
fn out_of_range_relative_pointer_is_malformed() {
    // A Refused whose reason string is out of line: point its offset outside the body.
    let message = Message::Refused(Refused { code: RefusalCode::Other, reason: "x".repeat(40) });
    let mut frame = encode(&message).unwrap();
    let n = frame.len();
    // Archived Refused (last 9 bytes): code u8, then the string's (len u32, offset i32).
    frame[n - 4..].copy_from_slice(&i32::MIN.to_le_bytes());
    assert!(matches!(decode(&frame), Err(ProtocolError::Malformed(_))));
}

#[test]
fn invalid_utf8_string_is_malformed() {
    let message = Message::Refused(Refused { code: RefusalCode::Other, reason: "a".repeat(40) });
    let mut frame = encode(&message).unwrap();
    let at = frame.iter().position(|&b| b == b'a').unwrap();
    frame[at] = 0xFF;
    assert!(matches!(decode(&frame), Err(ProtocolError::Malformed(_))));
}

#[test]
fn invalid_enum_tag_is_malformed() {
    let message = Message::Refused(Refused { code: RefusalCode::BadToken, reason: String::new() });
    let mut frame = encode(&message).unwrap();
    // Archived Refused: code (1 byte) then the inline empty string (8 bytes).
    let n = frame.len();
    assert_eq!(frame[n - 9], RefusalCode::BadToken as u8);
    frame[n - 9] = 200;
    assert!(matches!(decode(&frame), Err(ProtocolError::Malformed(_))));
}

#[test]
fn invalid_bool_is_malformed() {
    let message = Message::StepTokens(StepTokens { step: 1, segments: vec![segment(1, 0, 1)], tokens: vec![5] });
    let frame = encode(&message).unwrap();
    let body = &frame[HEADER_BYTES..];
    // The segment is the only place the bytes 01 (sample = true) follow n_rows = 1.
    let at = body.windows(5).position(|w| w == [1, 0, 0, 0, 1]).unwrap() + 4;
    let mut broken = frame.clone();
    broken[HEADER_BYTES + at] = 2;
    assert!(matches!(decode(&broken), Err(ProtocolError::Malformed(_))));
}

#[test]
fn decoder_backlog_over_its_limit_is_refused() {
    let mut decoder = FrameDecoder::new();
    let chunk = vec![0u8; 1 << 20];
    let mut result = Ok(());
    for _ in 0..=DECODER_BUFFER_BYTES_MAX / (1 << 20) {
        result = decoder.push(&chunk);
        if result.is_err() {
            break;
        }
    }
    assert!(matches!(result, Err(ProtocolError::DecoderBacklog { .. })));
}

#[test]
fn decoder_stays_failed_after_an_error() {
    let mut decoder = FrameDecoder::new();
    decoder.push(b"GET / HTTP/1.1\r\n").unwrap();
    let error = decoder.poll().unwrap_err();
    assert!(matches!(error, ProtocolError::BadMagic { .. }));
    // A valid frame afterwards does not resynchronise a stream that lost its framing.
    assert_eq!(decoder.push(&encode(&Message::Ready).unwrap()), Err(error.clone()));
    assert_eq!(decoder.poll(), Err(error));
}

// ---- Activations and steps ------------------------------------------------------------

#[test]
fn payload_one_byte_short_is_refused() {
    let mut activations = activations(8);
    activations.payload.pop();
    assert_refused(Message::Activations(activations), ProtocolError::PayloadSizeMismatch { expected: 64, actual: 63 });
}

#[test]
fn payload_of_the_wrong_dtype_is_refused() {
    // f16 bytes labelled f32: shape × dtype size is twice the payload.
    let mut activations = activations(8);
    activations.dtype = Dtype::F32;
    assert_refused(Message::Activations(activations), ProtocolError::PayloadSizeMismatch { expected: 128, actual: 64 });
}

#[test]
fn too_many_rows_are_refused() {
    let rows = ACTIVATION_ROWS_MAX + 1;
    let message = Activations {
        step: 1,
        segments: vec![segment(1, 0, rows)],
        dtype: Dtype::F16,
        hidden: 1,
        payload: vec![0; rows as usize * 2],
    };
    assert_refused(
        Message::Activations(message),
        ProtocolError::TooManyRows { rows: u64::from(rows), max: u64::from(ACTIVATION_ROWS_MAX) },
    );
}

#[test]
fn hidden_too_large_is_refused() {
    let hidden = HIDDEN_DIM_MAX + 1;
    let message = Activations {
        step: 1,
        segments: vec![segment(1, 0, 1)],
        dtype: Dtype::F16,
        hidden,
        payload: vec![0; hidden as usize * 2],
    };
    assert_refused(
        Message::Activations(message),
        ProtocolError::HiddenTooLarge { hidden: u64::from(hidden), max: u64::from(HIDDEN_DIM_MAX) },
    );
}

#[test]
fn zero_hidden_is_refused() {
    let message =
        Activations { step: 1, segments: vec![segment(1, 0, 1)], dtype: Dtype::F16, hidden: 0, payload: vec![] };
    assert_refused(
        Message::Activations(message),
        ProtocolError::InvalidValue { field: "hidden", reason: "must be at least 1" },
    );
}

#[test]
fn too_many_segments_are_refused() {
    let n = SEGMENTS_MAX + 1;
    let message = StepTokens {
        step: 1,
        segments: (0..n).map(|i| segment(u64::from(i), 0, 1)).collect(),
        tokens: vec![0; n as usize],
    };
    assert_refused(
        Message::StepTokens(message),
        ProtocolError::TooLong { field: "segments", len: u64::from(n), max: u64::from(SEGMENTS_MAX) },
    );
}

#[test]
fn step_without_segments_is_refused() {
    let message = StepTokens { step: 1, segments: vec![], tokens: vec![] };
    assert_refused(
        Message::StepTokens(message),
        ProtocolError::InvalidValue { field: "segments", reason: "a step carries at least one segment" },
    );
}

#[test]
fn empty_segment_is_refused() {
    let message = StepTokens { step: 1, segments: vec![segment(1, 0, 0)], tokens: vec![] };
    assert_refused(
        Message::StepTokens(message),
        ProtocolError::InvalidValue { field: "n_rows", reason: "a segment has at least one row" },
    );
}

#[test]
fn segment_past_the_last_position_is_refused() {
    let message = StepTokens { step: 1, segments: vec![segment(1, SEQUENCE_POSITIONS_MAX, 1)], tokens: vec![0] };
    assert_refused(
        Message::StepTokens(message),
        ProtocolError::InvalidValue { field: "first_position", reason: "segment ends past SEQUENCE_POSITIONS_MAX" },
    );
}

#[test]
fn duplicate_sequence_in_a_step_is_refused() {
    let message = StepTokens { step: 1, segments: vec![segment(4, 0, 1), segment(4, 1, 1)], tokens: vec![0, 0] };
    assert_refused(Message::StepTokens(message), ProtocolError::DuplicateSequence { sequence_id: 4 });
}

#[test]
fn tokens_not_matching_rows_are_refused() {
    let mut message = step_tokens();
    message.tokens.push(1);
    assert_refused(Message::StepTokens(message), ProtocolError::RowCountMismatch { expected: 4, actual: 5 });
}

// ---- Sampled tokens and sequences ------------------------------------------------------

#[test]
fn too_many_sampled_tokens_are_refused() {
    let n = SAMPLED_TOKENS_MAX + 1;
    let tokens =
        (0..n).map(|i| SampledToken { sequence_id: u64::from(i), token: 1, logprob: None, top: vec![], accepted: 0 }).collect();
    assert_refused(
        Message::SampledTokens(SampledTokens { step: 1, tokens, prompt: vec![] }),
        ProtocolError::TooLong { field: "tokens", len: u64::from(n), max: u64::from(SAMPLED_TOKENS_MAX) },
    );
}

#[test]
fn too_many_top_logprobs_are_refused() {
    let n = TOP_LOGPROBS_MAX + 1;
    let top = (0..n).map(|token| TokenLogprob { token, logprob: -1.0 }).collect();
    let tokens = vec![SampledToken { sequence_id: 1, token: 0, logprob: Some(-1.0), top, accepted: 0 }];
    assert_refused(
        Message::SampledTokens(SampledTokens { step: 1, tokens, prompt: vec![] }),
        ProtocolError::TooLong { field: "top", len: u64::from(n), max: u64::from(TOP_LOGPROBS_MAX) },
    );
}

#[test]
fn too_many_prompt_logprobs_are_refused() {
    let n = ACTIVATION_ROWS_MAX + 1;
    let prompt = (0..n)
        .map(|i| PromptLogprob { sequence_id: 1, position: i + 1, token: 0, logprob: -1.0, top: vec![] })
        .collect();
    assert_refused(
        Message::SampledTokens(SampledTokens { step: 1, tokens: vec![], prompt }),
        ProtocolError::TooLong { field: "prompt", len: u64::from(n), max: u64::from(ACTIVATION_ROWS_MAX) },
    );
}

#[test]
fn a_prompt_logprob_for_position_zero_is_refused() {
    let mut message = sampled_tokens();
    message.prompt[0].position = 0;
    assert_refused(
        Message::SampledTokens(message),
        ProtocolError::InvalidValue {
            field: "position",
            reason: "a prompt log-probability is for a position in 1..SEQUENCE_POSITIONS_MAX",
        },
    );
}

#[test]
fn too_many_top_logprobs_for_a_prompt_token_are_refused() {
    let mut message = sampled_tokens();
    message.prompt[0].top = (0..=TOP_LOGPROBS_MAX).map(|token| TokenLogprob { token, logprob: -1.0 }).collect();
    assert_refused(
        Message::SampledTokens(message),
        ProtocolError::TooLong { field: "top", len: u64::from(TOP_LOGPROBS_MAX) + 1, max: u64::from(TOP_LOGPROBS_MAX) },
    );
}

#[test]
fn too_long_prompt_in_a_sequence_start_is_refused() {
    let n = PROMPT_LOGPROBS_TOKENS_MAX + 1;
    let message = SequenceStart { prompt: vec![0; n as usize], ..sequence_start() };
    assert_refused(
        Message::SequenceStart(message),
        ProtocolError::TooLong { field: "prompt", len: u64::from(n), max: u64::from(PROMPT_LOGPROBS_TOKENS_MAX) },
    );
}

#[test]
fn duplicate_sequence_in_sampled_tokens_is_refused() {
    let mut message = sampled_tokens();
    message.tokens[1].sequence_id = message.tokens[0].sequence_id;
    assert_refused(Message::SampledTokens(message), ProtocolError::DuplicateSequence { sequence_id: 1 });
}

#[test]
fn too_long_history_is_refused() {
    let n = PENALTY_WINDOW_TOKENS_MAX + 1;
    let message = SequenceStart { history: vec![0; n as usize], ..sequence_start() };
    assert_refused(
        Message::SequenceStart(message),
        ProtocolError::TooLong { field: "history", len: u64::from(n), max: u64::from(PENALTY_WINDOW_TOKENS_MAX) },
    );
}

#[test]
fn too_large_penalty_window_is_refused() {
    let mut message = sequence_start();
    message.sampling.penalty_last_n = PENALTY_WINDOW_TOKENS_MAX + 1;
    assert_refused(
        Message::SequenceStart(message),
        ProtocolError::TooLong {
            field: "penalty_last_n",
            len: u64::from(PENALTY_WINDOW_TOKENS_MAX) + 1,
            max: u64::from(PENALTY_WINDOW_TOKENS_MAX),
        },
    );
}

#[test]
fn too_many_requested_top_logprobs_are_refused() {
    let message = SequenceStart { top_logprobs: TOP_LOGPROBS_MAX + 1, ..sequence_start() };
    assert_refused(
        Message::SequenceStart(message),
        ProtocolError::TooLong {
            field: "top_logprobs",
            len: u64::from(TOP_LOGPROBS_MAX) + 1,
            max: u64::from(TOP_LOGPROBS_MAX),
        },
    );
}

#[test]
fn nan_temperature_is_refused() {
    let mut message = sequence_start();
    message.sampling.temperature = f32::NAN;
    assert_refused(
        Message::SequenceStart(message),
        ProtocolError::InvalidValue { field: "temperature", reason: "must be finite and non-negative" },
    );
}

#[test]
fn top_p_above_one_is_refused() {
    let mut message = sequence_start();
    message.sampling.top_p = 1.5;
    assert_refused(
        Message::SequenceStart(message),
        ProtocolError::InvalidValue { field: "top_p", reason: "must be in [0, 1]" },
    );
}

#[test]
fn min_p_below_zero_is_refused() {
    let mut message = sequence_start();
    message.sampling.min_p = -0.1;
    assert_refused(
        Message::SequenceStart(message),
        ProtocolError::InvalidValue { field: "min_p", reason: "must be in [0, 1]" },
    );
}

#[test]
fn zero_repetition_penalty_is_refused() {
    let mut message = sequence_start();
    message.sampling.repetition_penalty = 0.0;
    assert_refused(
        Message::SequenceStart(message),
        ProtocolError::InvalidValue { field: "repetition_penalty", reason: "must be finite and positive" },
    );
}

#[test]
fn infinite_frequency_penalty_is_refused() {
    let mut message = sequence_start();
    message.sampling.frequency_penalty = f32::INFINITY;
    assert_refused(
        Message::SequenceStart(message),
        ProtocolError::InvalidValue { field: "frequency_penalty", reason: "must be finite" },
    );
}

#[test]
fn nan_presence_penalty_is_refused() {
    let mut message = sequence_start();
    message.sampling.presence_penalty = f32::NAN;
    assert_refused(
        Message::SequenceStart(message),
        ProtocolError::InvalidValue { field: "presence_penalty", reason: "must be finite" },
    );
}

// ---- Weights -----------------------------------------------------------------------------

#[test]
fn weight_chunk_too_large_is_refused() {
    let len = WEIGHT_CHUNK_BYTES_MAX + 1;
    let message = WeightChunk { data: vec![0; len as usize], ..weight_chunk() };
    assert_refused(
        Message::WeightChunk(message),
        ProtocolError::ChunkTooLarge { len: u64::from(len), max: u64::from(WEIGHT_CHUNK_BYTES_MAX) },
    );
}

#[test]
fn empty_weight_chunk_is_refused() {
    let message = WeightChunk { data: vec![], ..weight_chunk() };
    assert_refused(
        Message::WeightChunk(message),
        ProtocolError::InvalidValue { field: "data", reason: "a chunk carries at least one byte" },
    );
}

#[test]
fn weight_chunk_ending_past_the_largest_tensor_is_refused() {
    let message = WeightChunk { offset: u64::MAX - 10, ..weight_chunk() };
    assert_refused(
        Message::WeightChunk(message),
        ProtocolError::InvalidValue { field: "offset", reason: "chunk ends past TENSOR_BYTES_MAX" },
    );
}

#[test]
fn weight_chunk_tensor_index_past_the_limit_is_refused() {
    let message = WeightChunk { tensor_index: TENSORS_PER_ASSIGNMENT_MAX, ..weight_chunk() };
    assert_refused(
        Message::WeightChunk(message),
        ProtocolError::InvalidValue { field: "tensor_index", reason: "not below TENSORS_PER_ASSIGNMENT_MAX" },
    );
}

// ---- Handshake and control ---------------------------------------------------------------

#[test]
fn too_long_node_id_is_refused() {
    let len = NAME_BYTES_MAX + 1;
    let message = Hello { node_id: "n".repeat(len as usize), ..hello() };
    assert_refused(
        Message::Hello(message),
        ProtocolError::TooLong { field: "node_id", len: u64::from(len), max: u64::from(NAME_BYTES_MAX) },
    );
}

#[test]
fn empty_node_id_is_refused() {
    let message = Hello { node_id: String::new(), ..hello() };
    assert_refused(
        Message::Hello(message),
        ProtocolError::InvalidValue { field: "node_id", reason: "must not be empty" },
    );
}

#[test]
fn too_long_name_is_refused() {
    let len = NAME_BYTES_MAX + 1;
    let message = Hello { name: "n".repeat(len as usize), ..hello() };
    assert_refused(
        Message::Hello(message),
        ProtocolError::TooLong { field: "name", len: u64::from(len), max: u64::from(NAME_BYTES_MAX) },
    );
}

#[test]
fn too_long_backend_is_refused() {
    let len = NAME_BYTES_MAX + 1;
    let message = Hello { device: DeviceSummary { backend: "b".repeat(len as usize), ..device() }, ..hello() };
    assert_refused(
        Message::Hello(message),
        ProtocolError::TooLong { field: "backend", len: u64::from(len), max: u64::from(NAME_BYTES_MAX) },
    );
}

#[test]
fn nan_bandwidth_is_refused() {
    let message = Hello { device: DeviceSummary { memory_bandwidth_bytes_per_s: f64::NAN, ..device() }, ..hello() };
    assert_refused(
        Message::Hello(message),
        ProtocolError::InvalidValue {
            field: "memory_bandwidth_bytes_per_s",
            reason: "must be finite and non-negative",
        },
    );
}

#[test]
fn negative_matmul_speed_is_refused() {
    let message = Hello { device: DeviceSummary { matmul_flops_per_s: -1.0, ..device() }, ..hello() };
    assert_refused(
        Message::Hello(message),
        ProtocolError::InvalidValue { field: "matmul_flops_per_s", reason: "must be finite and non-negative" },
    );
}

#[test]
fn zero_threads_are_refused() {
    let message = Hello { device: DeviceSummary { threads: 0, ..device() }, ..hello() };
    assert_refused(
        Message::Hello(message),
        ProtocolError::InvalidValue { field: "threads", reason: "must be at least 1" },
    );
}

#[test]
fn hello_without_a_data_port_is_refused() {
    assert_refused(
        Message::Hello(Hello { data_port: 0, ..hello() }),
        ProtocolError::InvalidValue { field: "data_port", reason: "must be a port number, not 0" },
    );
}

#[test]
fn heartbeat_interval_out_of_range_is_refused() {
    for heartbeat_interval_ms in [0, HEARTBEAT_INTERVAL_MS_MIN - 1, HEARTBEAT_INTERVAL_MS_MAX + 1] {
        assert_refused(
            Message::Welcome(Welcome { heartbeat_interval_ms, token_proof: [0; 32] }),
            ProtocolError::InvalidValue {
                field: "heartbeat_interval_ms",
                reason: "outside HEARTBEAT_INTERVAL_MS_MIN..=HEARTBEAT_INTERVAL_MS_MAX",
            },
        );
    }
}

#[test]
fn too_long_refusal_reason_is_refused() {
    let len = REASON_BYTES_MAX + 1;
    let message = Refused { code: RefusalCode::Other, reason: "r".repeat(len as usize) };
    assert_refused(
        Message::Refused(message),
        ProtocolError::TooLong { field: "reason", len: u64::from(len), max: u64::from(REASON_BYTES_MAX) },
    );
}

#[test]
fn empty_layer_range_is_refused() {
    let message = Assignment { layer_start: 16, layer_end: 16, ..assignment() };
    assert_refused(
        Message::Assignment(message),
        ProtocolError::InvalidValue { field: "layer range", reason: "need layer_start < layer_end <= n_layers" },
    );
}

#[test]
fn layer_range_past_the_model_is_refused() {
    let message = Assignment { layer_end: 33, ..assignment() };
    assert_refused(
        Message::Assignment(message),
        ProtocolError::InvalidValue { field: "layer range", reason: "need layer_start < layer_end <= n_layers" },
    );
}

#[test]
fn too_many_layers_are_refused() {
    let message = Assignment { n_layers: LAYERS_MAX + 1, ..assignment() };
    assert_refused(
        Message::Assignment(message),
        ProtocolError::InvalidValue { field: "n_layers", reason: "outside 1..=LAYERS_MAX" },
    );
}

#[test]
fn too_many_tensors_are_refused() {
    let n = TENSORS_PER_ASSIGNMENT_MAX + 1;
    let message = Assignment { tensors: vec![tensor("t"); n as usize], ..assignment() };
    assert_refused(
        Message::Assignment(message),
        ProtocolError::TooLong { field: "tensors", len: u64::from(n), max: u64::from(TENSORS_PER_ASSIGNMENT_MAX) },
    );
}

#[test]
fn too_long_tensor_name_is_refused() {
    let len = NAME_BYTES_MAX + 1;
    let message = Assignment { tensors: vec![tensor(&"t".repeat(len as usize))], ..assignment() };
    assert_refused(
        Message::Assignment(message),
        ProtocolError::TooLong { field: "tensor name", len: u64::from(len), max: u64::from(NAME_BYTES_MAX) },
    );
}

#[test]
fn too_many_tensor_dims_are_refused() {
    let dims = vec![1; TENSOR_DIMS_MAX as usize + 1];
    let message = Assignment { tensors: vec![TensorRef { dims, ..tensor("t") }], ..assignment() };
    assert_refused(
        Message::Assignment(message),
        ProtocolError::TooLong { field: "dims", len: u64::from(TENSOR_DIMS_MAX) + 1, max: u64::from(TENSOR_DIMS_MAX) },
    );
}

#[test]
fn tensor_without_dims_is_refused() {
    let message = Assignment { tensors: vec![TensorRef { dims: vec![], ..tensor("t") }], ..assignment() };
    assert_refused(
        Message::Assignment(message),
        ProtocolError::InvalidValue { field: "dims", reason: "a tensor has at least one dimension" },
    );
}

#[test]
fn too_large_tensor_is_refused() {
    let message =
        Assignment { tensors: vec![TensorRef { bytes: TENSOR_BYTES_MAX + 1, ..tensor("t") }], ..assignment() };
    assert_refused(
        Message::Assignment(message),
        ProtocolError::TooLong { field: "tensor bytes", len: TENSOR_BYTES_MAX + 1, max: TENSOR_BYTES_MAX },
    );
}

#[test]
fn too_long_next_stage_address_is_refused() {
    let len = ADDRESS_BYTES_MAX + 1;
    let message = Assignment { next_stage: Some("a".repeat(len as usize)), ..assignment() };
    assert_refused(
        Message::Assignment(message),
        ProtocolError::TooLong { field: "next_stage", len: u64::from(len), max: u64::from(ADDRESS_BYTES_MAX) },
    );
}

#[test]
fn load_progress_past_the_total_is_refused() {
    let message = LoadProgress { bytes_done: 101, bytes_total: 100 };
    assert_refused(
        Message::LoadProgress(message),
        ProtocolError::InvalidValue { field: "bytes_done", reason: "exceeds bytes_total" },
    );
}

#[test]
fn bad_token_masks_are_refused() {
    let masked = |allowed: AllowedTokens, sample: bool| {
        Message::StepTokens(StepTokens {
            step: 1,
            segments: vec![Segment { allowed: Some(allowed), sample, ..segment(1, 0, 1) }],
            tokens: vec![0],
        })
    };
    let ok = AllowedTokens { vocab: 100, words: vec![1, 1] };
    let invalid = |field, reason| ProtocolError::InvalidValue { field, reason };
    assert_refused(masked(ok.clone(), false), invalid("allowed", "a mask on a segment that does not sample"));
    assert_refused(
        masked(AllowedTokens { vocab: 100, words: vec![1] }, true),
        invalid("allowed.words", "not vocab.div_ceil(64) words"),
    );
    assert_refused(
        masked(AllowedTokens { vocab: 100, words: vec![0, 1 << 36] }, true),
        invalid("allowed.words", "a bit past the vocabulary is set"),
    );
    assert_refused(masked(AllowedTokens { vocab: 100, words: vec![0, 0] }, true), invalid("allowed.words", "the mask allows no token"));
    assert_refused(
        masked(AllowedTokens { vocab: TOKEN_MASK_VOCAB_MAX + 64, words: vec![1; (TOKEN_MASK_VOCAB_MAX / 64 + 1) as usize] }, true),
        invalid("allowed.vocab", "not in 1..=TOKEN_MASK_VOCAB_MAX"),
    );
    let n = MASKED_SEGMENTS_MAX + 1;
    let message = StepTokens {
        step: 1,
        segments: (0..n).map(|i| Segment { allowed: Some(ok.clone()), ..segment(u64::from(i), 0, 1) }).collect(),
        tokens: vec![0; n as usize],
    };
    assert_refused(
        Message::StepTokens(message),
        ProtocolError::TooLong { field: "masked segments", len: u64::from(n), max: u64::from(MASKED_SEGMENTS_MAX) },
    );
}

#[test]
fn bad_prefix_reuse_is_refused() {
    let own = SequenceStart { prefix: Some(PrefixReuse { sequence_id: 5, positions: 3 }), ..sequence_start() };
    assert_refused(
        Message::SequenceStart(own),
        ProtocolError::InvalidValue { field: "prefix.sequence_id", reason: "a sequence cannot start from itself" },
    );
    for positions in [0, SEQUENCE_POSITIONS_MAX] {
        let message = SequenceStart { prefix: Some(PrefixReuse { sequence_id: 4, positions }), ..sequence_start() };
        assert_refused(
            Message::SequenceStart(message),
            ProtocolError::InvalidValue { field: "prefix.positions", reason: "not in 1..SEQUENCE_POSITIONS_MAX" },
        );
    }
}

#[test]
fn bad_drafts_are_refused() {
    let drafted = |draft: Vec<u32>, n_rows: u32, sample: bool| {
        Message::StepTokens(StepTokens {
            step: 1,
            segments: vec![Segment { draft, sample, ..segment(1, 0, n_rows) }],
            tokens: vec![0; n_rows as usize],
        })
    };
    let reason = "a draft ends a sampling segment and leaves it at least one row of its own";
    assert_refused(drafted(vec![5, 6], 2, true), ProtocolError::InvalidValue { field: "draft", reason });
    assert_refused(drafted(vec![5], 3, false), ProtocolError::InvalidValue { field: "draft", reason });
    let long = DRAFT_TOKENS_MAX as usize + 1;
    assert_refused(
        drafted(vec![1; long], long as u32 + 1, true),
        ProtocolError::TooLong { field: "draft", len: long as u64, max: u64::from(DRAFT_TOKENS_MAX) },
    );
}
