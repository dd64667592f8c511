//! Shared helpers: valid sample messages, and frames built *without* validation, as a buggy
//! or hostile peer would send them.

use potluck_protocol::*;
use rkyv::rancor;

pub fn device() -> DeviceSummary {
    DeviceSummary {
        backend: "cpu".into(),
        memory_budget_bytes: 8 << 30,
        memory_bandwidth_bytes_per_s: 40e9,
        matmul_flops_per_s: 25e9,
        threads: 8,
    }
}

pub fn hello() -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        node_id: "node-7f3a".into(),
        name: "kitchen-laptop".into(),
        token_proof: [7; 32],
        device: device(),
        data_port: 7071,
    }
}

pub fn tensor(name: &str) -> TensorRef {
    TensorRef { name: name.into(), dtype: 12, dims: vec![4096, 4096], bytes: 9_437_184, sha256: [1; 32] }
}

pub fn assignment() -> Assignment {
    Assignment {
        model_hash: [9; 32],
        layer_start: 8,
        layer_end: 16,
        n_layers: 32,
        next_stage: Some("192.0.2.10:7420".into()),
        tensors: vec![tensor("blk.8.attn_q.weight"), tensor("blk.8.attn_k.weight")],
        upstream_id: "12D3KooWUpstream".into(),
        next_stage_id: Some("12D3KooWNext".into()),
        stage_index: 1,
        n_stages: 3,
        context_length: 4096,
        sequences_max: 16,
        activation_dtype: Dtype::F16,
        model_profile: "{}".into(),
    }
}

pub fn weight_chunk() -> WeightChunk {
    WeightChunk { tensor_index: 1, offset: 4096, data: vec![0xAB; 1000], sha256: [3; 32] }
}

pub fn sampling() -> SamplingWire {
    SamplingWire {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
        repetition_penalty: 1.1,
        frequency_penalty: 0.0,
        presence_penalty: 0.0,
        penalty_last_n: 64,
        seed: 42,
        logit_bias: vec![LogitBiasEntry { token: 7, bias: -100.0 }, LogitBiasEntry { token: 9, bias: f32::NEG_INFINITY }],
    }
}

pub fn sequence_start() -> SequenceStart {
    SequenceStart {
        sequence_id: 5,
        sampling: sampling(),
        logprobs: true,
        top_logprobs: 3,
        history: vec![1, 2, 3],
        prompt: vec![9, 1, 2, 3],
        prefix: Some(PrefixReuse { sequence_id: 4, positions: 12 }),
    }
}

pub fn segment(sequence_id: u64, first_position: u32, n_rows: u32) -> Segment {
    Segment { sequence_id, first_position, n_rows, sample: true, allowed: None, draft: Vec::new() }
}

pub fn step_tokens() -> StepTokens {
    StepTokens { step: 3, segments: vec![segment(1, 0, 3), segment(2, 17, 1)], tokens: vec![10, 11, 12, 99] }
}

/// 4 rows of `hidden` f16 values.
pub fn activations(hidden: u32) -> Activations {
    let rows: Vec<f32> = (0..4 * hidden).map(|i| i as f32 * 0.25 - 3.0).collect();
    Activations::from_rows(3, vec![segment(1, 0, 3), segment(2, 17, 1)], hidden, Dtype::F16, &rows).unwrap()
}

pub fn sampled_tokens() -> SampledTokens {
    SampledTokens {
        step: 3,
        tokens: vec![
            SampledToken {
                sequence_id: 1,
                token: 42,
                logprob: Some(-0.5),
                top: vec![TokenLogprob { token: 42, logprob: -0.5 }],
                accepted: 0,
            },
            SampledToken { sequence_id: 2, token: 7, logprob: None, top: vec![], accepted: 3 },
        ],
        prompt: vec![PromptLogprob {
            sequence_id: 1,
            position: 1,
            token: 11,
            logprob: -2.5,
            top: vec![TokenLogprob { token: 12, logprob: -0.25 }],
        }],
    }
}

/// One valid message of every kind.
pub fn one_of_each() -> Vec<Message> {
    vec![
        Message::Hello(hello()),
        Message::Welcome(Welcome { heartbeat_interval_ms: 1000, token_proof: [7; 32] }),
        Message::Refused(Refused { code: RefusalCode::BadToken, reason: "wrong join token".into() }),
        Message::Assignment(assignment()),
        Message::LoadProgress(LoadProgress { bytes_done: 10, bytes_total: 100 }),
        Message::Ready,
        Message::Heartbeat(Heartbeat {
            now_ms: 123_456,
            stats: StageStats { steps: 10, rows: 300, busy_us: 5_000_000, kv_bytes: 1 << 20, next_hop_rtt_us: 180, resident_bytes: 300 << 20, peak_resident_bytes: 310 << 20 },
        }),
        Message::ReleaseSequence(ReleaseSequence { sequence_id: 5 }),
        Message::Shutdown,
        Message::WeightChunk(weight_chunk()),
        Message::SequenceStart(sequence_start()),
        Message::StepTokens(step_tokens()),
        Message::Activations(activations(8)),
        Message::SampledTokens(sampled_tokens()),
        Message::FetchTensors(FetchTensors { tensor_indices: vec![0, 3, 4] }),
    ]
}

fn body<T>(value: &T) -> Vec<u8>
where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<rkyv::util::AlignedVec, rkyv::ser::allocator::ArenaHandle<'a>, rancor::Error>,
    >,
{
    rkyv::to_bytes::<rancor::Error>(value).unwrap().to_vec()
}

/// Header + body with no validation: what a peer that ignores the rules would send.
pub fn frame(version: u16, kind: u8, flags: u8, body: &[u8]) -> Vec<u8> {
    let header = FrameHeader { version, kind, flags, body_len: body.len() as u32 };
    let mut bytes = header.to_bytes().to_vec();
    bytes.extend_from_slice(body);
    bytes
}

/// The frame of `message`, skipping the validation `encode` does.
pub fn unchecked_frame(message: &Message) -> Vec<u8> {
    let body = match message {
        Message::Hello(m) => body(m),
        Message::Welcome(m) => body(m),
        Message::Refused(m) => body(m),
        Message::Assignment(m) => body(m),
        Message::LoadProgress(m) => body(m),
        Message::Heartbeat(m) => body(m),
        Message::ReleaseSequence(m) => body(m),
        Message::WeightChunk(m) => body(m),
        Message::SequenceStart(m) => body(m),
        Message::StepTokens(m) => body(m),
        Message::Activations(m) => body(m),
        Message::SampledTokens(m) => body(m),
        Message::FetchTensors(m) => body(m),
        Message::Ready | Message::Shutdown => Vec::new(),
    };
    frame(PROTOCOL_VERSION, message.kind() as u8, 0, &body)
}

/// `message` breaks a rule: `encode` refuses to send it, and a receiver refuses it with the
/// same error when a peer sends it anyway.
#[track_caller]
pub fn assert_refused(message: Message, expected: ProtocolError) {
    assert_eq!(encode(&message), Err(expected.clone()), "encode");
    assert_eq!(decode(&unchecked_frame(&message)), Err(expected.clone()), "decode");
    let mut decoder = FrameDecoder::new();
    decoder.push(&unchecked_frame(&message)).unwrap();
    assert_eq!(decoder.poll(), Err(expected), "FrameDecoder");
}
