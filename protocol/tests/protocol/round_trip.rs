//! Round-trip properties: every valid message of every kind decodes to itself, whole or fed
//! to a `FrameDecoder` byte by byte or in random splits; and the largest legal message of
//! each kind fits its frame limit (what the compile-time asserts in limits.rs promise).

use potluck_protocol::limits::*;
use potluck_protocol::*;
use proptest::collection::vec;
use proptest::prelude::*;

use crate::common::*;

fn name(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[a-z0-9.:_é-]{{1,{max}}}")).unwrap()
}

fn finite_f64() -> impl Strategy<Value = f64> {
    0.0..1e12f64
}

fn hash() -> impl Strategy<Value = [u8; 32]> {
    any::<[u8; 32]>()
}

fn device_strategy() -> impl Strategy<Value = DeviceSummary> {
    (name(16), any::<u64>(), finite_f64(), finite_f64(), 1..=1024u32).prop_map(
        |(backend, memory_budget_bytes, memory_bandwidth_bytes_per_s, matmul_flops_per_s, threads)| {
            DeviceSummary {
                backend,
                memory_budget_bytes,
                memory_bandwidth_bytes_per_s,
                matmul_flops_per_s,
                threads,
            }
        },
    )
}

fn hello_strategy() -> impl Strategy<Value = Hello> {
    (name(64), proptest::string::string_regex("[ -~]{0,64}").unwrap(), hash(), device_strategy(), 1u16..).prop_map(
        |(node_id, name, token_proof, device, data_port)| Hello {
            protocol_version: PROTOCOL_VERSION,
            node_id,
            name,
            token_proof,
            device,
            data_port,
        },
    )
}

fn refusal_code() -> impl Strategy<Value = RefusalCode> {
    prop_oneof![
        Just(RefusalCode::UnsupportedVersion),
        Just(RefusalCode::BadToken),
        Just(RefusalCode::DuplicateNodeId),
        Just(RefusalCode::NotNeeded),
        Just(RefusalCode::Other),
    ]
}

fn tensor_strategy() -> impl Strategy<Value = TensorRef> {
    (name(40), any::<u32>(), vec(any::<u64>(), 1..=TENSOR_DIMS_MAX as usize), 0..=TENSOR_BYTES_MAX, hash())
        .prop_map(|(name, dtype, dims, bytes, sha256)| TensorRef { name, dtype, dims, bytes, sha256 })
}

fn assignment_strategy() -> impl Strategy<Value = Assignment> {
    (1..=LAYERS_MAX, hash(), proptest::option::of(name(40)), vec(tensor_strategy(), 0..8)).prop_flat_map(
        |(n_layers, model_hash, next_stage, tensors)| {
            (0..n_layers).prop_flat_map(move |layer_start| {
                let (model_hash, next_stage, tensors) = (model_hash, next_stage.clone(), tensors.clone());
                (layer_start + 1..=n_layers).prop_map(move |layer_end| Assignment {
                    model_hash,
                    layer_start,
                    layer_end,
                    n_layers,
                    next_stage_id: next_stage.as_ref().map(|_| "12D3KooWNext".to_string()),
                    next_stage: next_stage.clone(),
                    tensors: tensors.clone(),
                    upstream_id: "12D3KooWUp".into(),
                    stage_index: 0,
                    n_stages: 1,
                    context_length: 2048,
                    sequences_max: 16,
                    activation_dtype: Dtype::F32,
                    model_profile: "{\"n_layers\":32}".into(),
                })
            })
        },
    )
}

fn sampling_strategy() -> impl Strategy<Value = SamplingWire> {
    (
        (0.0..4.0f32, any::<u32>(), 0.0..=1.0f32, 0.0..=1.0f32),
        (0.01..4.0f32, -2.0..2.0f32, -2.0..2.0f32, 0..=PENALTY_WINDOW_TOKENS_MAX, any::<u64>()),
        proptest::collection::vec((any::<u32>(), -100.0..=100.0f32), 0..8),
    )
        .prop_map(
            |(
                (temperature, top_k, top_p, min_p),
                (repetition_penalty, frequency_penalty, presence_penalty, penalty_last_n, seed),
                biases,
            )| SamplingWire {
                temperature,
                top_k,
                top_p,
                min_p,
                repetition_penalty,
                frequency_penalty,
                presence_penalty,
                penalty_last_n,
                seed,
                logit_bias: biases.into_iter().map(|(token, bias)| LogitBiasEntry { token, bias }).collect(),
            },
        )
}

fn sequence_start_strategy() -> impl Strategy<Value = SequenceStart> {
    (
        any::<u64>(),
        sampling_strategy(),
        any::<bool>(),
        0..=TOP_LOGPROBS_MAX,
        vec(any::<u32>(), 0..200),
        vec(any::<u32>(), 0..200),
        proptest::option::of(1..SEQUENCE_POSITIONS_MAX),
    )
        .prop_map(|(sequence_id, sampling, logprobs, top_logprobs, history, prompt, positions)| SequenceStart {
            sequence_id,
            sampling,
            logprobs,
            top_logprobs,
            history,
            prompt,
            prefix: positions.map(|positions| PrefixReuse { sequence_id: sequence_id.wrapping_add(1), positions }),
        })
}

/// 1..8 segments of distinct sequences, 1..=8 rows each.
fn segments_strategy() -> impl Strategy<Value = Vec<Segment>> {
    vec((0..SEQUENCE_POSITIONS_MAX - 8, 1..=8u32, any::<bool>()), 1..8).prop_flat_map(|shapes| {
        let n = shapes.len();
        proptest::sample::subsequence((0..64u64).collect::<Vec<_>>(), n).prop_shuffle().prop_map(move |ids| {
            ids.into_iter()
                .zip(&shapes)
                .map(|(sequence_id, &(first_position, n_rows, sample))| Segment {
                    sequence_id,
                    first_position,
                    n_rows,
                    sample,
                    // A grammar's mask rides on sampling segments (tested apart below).
                    allowed: None,
                    draft: Vec::new(),
                })
                .collect()
        })
    })
}

fn rows_of(segments: &[Segment]) -> usize {
    segments.iter().map(|s| s.n_rows as usize).sum()
}

fn step_tokens_strategy() -> impl Strategy<Value = StepTokens> {
    (any::<u64>(), segments_strategy()).prop_flat_map(|(step, segments)| {
        let rows = rows_of(&segments);
        vec(any::<u32>(), rows).prop_map(move |tokens| StepTokens { step, segments: segments.clone(), tokens })
    })
}

fn dtype_strategy() -> impl Strategy<Value = Dtype> {
    prop_oneof![Just(Dtype::F16), Just(Dtype::F32)]
}

fn activations_strategy() -> impl Strategy<Value = Activations> {
    (any::<u64>(), segments_strategy(), dtype_strategy(), 1..=64u32).prop_flat_map(|(step, segments, dtype, hidden)| {
        let len = rows_of(&segments) * hidden as usize * dtype.size_bytes() as usize;
        vec(any::<u8>(), len).prop_map(move |payload| Activations {
            step,
            segments: segments.clone(),
            dtype,
            hidden,
            payload,
        })
    })
}

fn sampled_tokens_strategy() -> impl Strategy<Value = SampledTokens> {
    let token = (
        any::<u32>(),
        proptest::option::of(-30.0..=0.0f32),
        vec((any::<u32>(), -30.0..=0.0f32), 0..=TOP_LOGPROBS_MAX as usize),
    );
    let prompt = (
        any::<u64>(),
        1..SEQUENCE_POSITIONS_MAX,
        any::<u32>(),
        -30.0..=0.0f32,
        vec((any::<u32>(), -30.0..=0.0f32), 0..=TOP_LOGPROBS_MAX as usize),
    )
        .prop_map(|(sequence_id, position, token, logprob, top)| PromptLogprob {
            sequence_id,
            position,
            token,
            logprob,
            top: top.into_iter().map(|(token, logprob)| TokenLogprob { token, logprob }).collect(),
        });
    (
        any::<u64>(),
        proptest::sample::subsequence((0..64u64).collect::<Vec<_>>(), 0..16),
        vec(token, 16),
        vec(prompt, 0..8),
    )
        .prop_map(|(step, ids, shapes, prompt)| SampledTokens {
            step,
            tokens: ids
                .into_iter()
                .zip(shapes)
                .map(|(sequence_id, (token, logprob, top))| SampledToken {
                    sequence_id,
                    token,
                    logprob,
                    top: top.into_iter().map(|(token, logprob)| TokenLogprob { token, logprob }).collect(),
                    accepted: token % 5,
                })
                .collect(),
            prompt,
        })
}

fn weight_chunk_strategy() -> impl Strategy<Value = WeightChunk> {
    (0..TENSORS_PER_ASSIGNMENT_MAX, 0..TENSOR_BYTES_MAX / 2, vec(any::<u8>(), 1..2048), hash())
        .prop_map(|(tensor_index, offset, data, sha256)| WeightChunk { tensor_index, offset, data, sha256 })
}

pub fn message_strategy() -> impl Strategy<Value = Message> {
    prop_oneof![
        hello_strategy().prop_map(Message::Hello),
        (HEARTBEAT_INTERVAL_MS_MIN..=HEARTBEAT_INTERVAL_MS_MAX)
            .prop_map(|heartbeat_interval_ms| Message::Welcome(Welcome { heartbeat_interval_ms, token_proof: [5; 32] })),
        (refusal_code(), proptest::string::string_regex(".{0,200}").unwrap())
            .prop_filter("reason within limit", |(_, reason)| reason.len() <= REASON_BYTES_MAX as usize)
            .prop_map(|(code, reason)| Message::Refused(Refused { code, reason })),
        assignment_strategy().prop_map(Message::Assignment),
        (any::<u64>(), any::<u64>())
            .prop_map(|(a, b)| Message::LoadProgress(LoadProgress { bytes_done: a.min(b), bytes_total: a.max(b) })),
        Just(Message::Ready),
        (any::<u64>(), any::<[u64; 7]>()).prop_map(
            |(now_ms, [steps, rows, busy_us, kv_bytes, next_hop_rtt_us, resident_bytes, peak_resident_bytes])| {
                Message::Heartbeat(Heartbeat {
                    now_ms,
                    stats: StageStats { steps, rows, busy_us, kv_bytes, next_hop_rtt_us, resident_bytes, peak_resident_bytes },
                })
            }
        ),
        any::<u64>().prop_map(|sequence_id| Message::ReleaseSequence(ReleaseSequence { sequence_id })),
        Just(Message::Shutdown),
        weight_chunk_strategy().prop_map(Message::WeightChunk),
        sequence_start_strategy().prop_map(Message::SequenceStart),
        step_tokens_strategy().prop_map(Message::StepTokens),
        activations_strategy().prop_map(Message::Activations),
        sampled_tokens_strategy().prop_map(Message::SampledTokens),
    ]
}

/// Feeds `bytes` to a fresh decoder in pieces cut at `cuts` and collects every frame.
fn decode_stream(bytes: &[u8], cuts: &[usize]) -> Vec<Message> {
    let mut decoder = FrameDecoder::new();
    let mut messages = Vec::new();
    let mut start = 0;
    for end in cuts.iter().copied().chain([bytes.len()]) {
        let end = end.clamp(start, bytes.len());
        decoder.push(&bytes[start..end]).unwrap();
        while let Some(message) = decoder.poll().unwrap() {
            messages.push(message);
        }
        start = end;
    }
    assert_eq!(decoder.buffered_bytes(), 0);
    messages
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512),
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_message_round_trips(message in message_strategy()) {
        let frame = encode(&message).unwrap();
        prop_assert_eq!(decode(&frame).unwrap(), message.clone());
        let header = FrameHeader::parse(frame.first_chunk().unwrap()).unwrap();
        prop_assert_eq!(header.check().unwrap(), message.kind());
        prop_assert_eq!(header.frame_len(), frame.len() as u64);
    }

    #[test]
    fn a_stream_of_frames_decodes_in_random_splits(
        messages in vec(message_strategy(), 1..6),
        mut cuts in vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let mut stream = Vec::new();
        for message in &messages {
            encode_into(message, &mut stream).unwrap();
        }
        let mut cuts: Vec<usize> = cuts.drain(..).map(|i| i.index(stream.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(decode_stream(&stream, &cuts), messages);
    }

    #[test]
    fn a_stream_of_frames_decodes_byte_by_byte(messages in vec(message_strategy(), 1..4)) {
        let mut stream = Vec::new();
        for message in &messages {
            encode_into(message, &mut stream).unwrap();
        }
        let cuts: Vec<usize> = (1..stream.len()).collect();
        prop_assert_eq!(decode_stream(&stream, &cuts), messages);
    }

    #[test]
    fn f32_rows_survive_the_f32_payload_exactly(rows in vec(any::<f32>().prop_filter("not NaN", |v| !v.is_nan()), 0..300)) {
        prop_assert_eq!(payload_to_rows(&rows_to_payload(&rows, Dtype::F32), Dtype::F32).unwrap(), rows);
    }

    #[test]
    fn f16_payload_rounds_to_nearest_f16(rows in vec(-70000.0..70000.0f32, 0..300)) {
        let back = payload_to_rows(&rows_to_payload(&rows, Dtype::F16), Dtype::F16).unwrap();
        prop_assert_eq!(back.len(), rows.len());
        for (&v, &b) in rows.iter().zip(&back) {
            prop_assert_eq!(b, half::f16::from_f32(v).to_f32());
        }
    }
}

#[test]
fn activations_from_rows_round_trip_through_the_wire() {
    let rows: Vec<f32> = (0..3 * 16).map(|i| (i as f32 - 20.0) / 8.0).collect();
    for dtype in [Dtype::F16, Dtype::F32] {
        let message = Activations::from_rows(9, vec![segment(1, 4, 2), segment(2, 0, 1)], 16, dtype, &rows).unwrap();
        assert_eq!(message.n_rows(), 3);
        let Message::Activations(back) = decode(&encode(&Message::Activations(message)).unwrap()).unwrap() else {
            panic!("wrong kind");
        };
        // These values are exact in f16 too.
        assert_eq!(back.rows().unwrap(), rows);
    }
}

#[test]
fn f16_is_the_default_dtype_and_halves_the_payload() {
    assert_eq!(Dtype::default(), Dtype::F16);
    assert_eq!(rows_to_payload(&[1.0; 10], Dtype::default()).len(), 20);
}

#[test]
fn every_kind_has_a_distinct_wire_number() {
    for (i, kind) in Kind::ALL.iter().enumerate() {
        assert_eq!(*kind as u8, i as u8 + 1);
        assert_eq!(Kind::from_u8(*kind as u8), Some(*kind));
    }
    let kinds: Vec<Kind> = one_of_each().iter().map(Message::kind).collect();
    assert_eq!(kinds, Kind::ALL, "one_of_each covers every kind");
}

#[test]
fn one_of_each_round_trips() {
    for message in one_of_each() {
        assert_eq!(decode(&encode(&message).unwrap()).unwrap(), message);
    }
}

// ---- The largest legal message of each kind fits its frame limit ---------------------

fn assert_fits(message: Message) {
    let kind = message.kind();
    let frame = encode(&message).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
    assert!(frame.len() as u64 <= u64::from(kind.frame_bytes_max()), "{kind:?}");
    assert_eq!(decode(&frame).unwrap(), message, "{kind:?}");
}

fn longest(max: u32) -> String {
    "x".repeat(max as usize)
}

/// Every segment a step may hold, the first [`MASKED_SEGMENTS_MAX`] with the widest mask.
fn largest_segments(rows_per_segment: u32) -> Vec<Segment> {
    (0..SEGMENTS_MAX)
        .map(|i| Segment {
            allowed: (i < MASKED_SEGMENTS_MAX).then(|| AllowedTokens {
                vocab: TOKEN_MASK_VOCAB_MAX,
                words: vec![u64::MAX; (TOKEN_MASK_VOCAB_MAX / 64) as usize],
            }),
            ..segment(u64::from(i), 0, rows_per_segment)
        })
        .collect()
}

#[test]
fn a_token_mask_round_trips() {
    let allowed = AllowedTokens { vocab: 130, words: vec![1 << 7, 0, 0b11] };
    assert!(allowed.is_allowed(7) && allowed.is_allowed(128) && allowed.is_allowed(129));
    assert!(!allowed.is_allowed(8) && !allowed.is_allowed(130));
    let message = Message::StepTokens(StepTokens {
        step: 2,
        segments: vec![Segment { allowed: Some(allowed), ..segment(5, 3, 1) }],
        tokens: vec![11],
    });
    assert_eq!(decode(&encode(&message).unwrap()).unwrap(), message);
}

#[test]
fn largest_activation_frame_fits() {
    let rows_per_segment = ACTIVATION_ROWS_MAX / SEGMENTS_MAX;
    let segments = largest_segments(rows_per_segment);
    let payload = vec![0x3C; ACTIVATION_PAYLOAD_BYTES_MAX as usize];
    assert_fits(Message::Activations(Activations {
        step: u64::MAX,
        segments,
        dtype: Dtype::F32,
        hidden: HIDDEN_DIM_MAX,
        payload,
    }));
}

#[test]
fn largest_weight_chunk_fits() {
    assert_fits(Message::WeightChunk(WeightChunk { data: vec![7; WEIGHT_CHUNK_BYTES_MAX as usize], ..weight_chunk() }));
}

#[test]
fn largest_assignment_fits() {
    let tensor =
        TensorRef { name: longest(NAME_BYTES_MAX), dims: vec![u64::MAX; TENSOR_DIMS_MAX as usize], ..tensor("t") };
    assert_fits(Message::Assignment(Assignment {
        next_stage: Some(longest(ADDRESS_BYTES_MAX)),
        tensors: vec![tensor; TENSORS_PER_ASSIGNMENT_MAX as usize],
        ..assignment()
    }));
}

#[test]
fn largest_control_messages_fit() {
    assert_fits(Message::Hello(Hello {
        node_id: longest(NAME_BYTES_MAX),
        name: longest(NAME_BYTES_MAX),
        device: DeviceSummary { backend: longest(NAME_BYTES_MAX), ..device() },
        ..hello()
    }));
    assert_fits(Message::Refused(Refused { code: RefusalCode::Other, reason: longest(REASON_BYTES_MAX) }));
    assert_fits(Message::SequenceStart(SequenceStart {
        history: vec![u32::MAX; PENALTY_WINDOW_TOKENS_MAX as usize],
        prompt: vec![u32::MAX; PROMPT_LOGPROBS_TOKENS_MAX as usize],
        ..sequence_start()
    }));
    let rows_per_segment = ACTIVATION_ROWS_MAX / SEGMENTS_MAX;
    assert_fits(Message::StepTokens(StepTokens {
        step: 1,
        segments: largest_segments(rows_per_segment),
        tokens: vec![u32::MAX; ACTIVATION_ROWS_MAX as usize],
    }));
    let top = vec![TokenLogprob { token: 1, logprob: -1.0 }; TOP_LOGPROBS_MAX as usize];
    assert_fits(Message::SampledTokens(SampledTokens {
        step: 1,
        tokens: (0..SAMPLED_TOKENS_MAX)
            .map(|i| SampledToken { sequence_id: u64::from(i), token: 1, logprob: Some(-1.0), top: top.clone(), accepted: 0 })
            .collect(),
        prompt: (0..ACTIVATION_ROWS_MAX)
            .map(|i| PromptLogprob { sequence_id: 1, position: i + 1, token: 1, logprob: -1.0, top: top.clone() })
            .collect(),
    }));
}

#[test]
fn encode_into_appends_and_leaves_the_buffer_alone_on_error() {
    let mut out = encode(&Message::Ready).unwrap();
    let before = out.clone();
    let bad = Message::LoadProgress(LoadProgress { bytes_done: 2, bytes_total: 1 });
    assert!(encode_into(&bad, &mut out).is_err());
    assert_eq!(out, before);
    encode_into(&Message::Shutdown, &mut out).unwrap();
    assert_eq!(out.len(), 2 * HEADER_BYTES);
}
