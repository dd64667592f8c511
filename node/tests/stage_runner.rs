//! The stage runner in process, on tiny random-weight GGUFs (the engine's `random_gguf`
//! writer): the messages a stage really receives, handed from one `StageRunner` to the next
//! as the data plane would, without the network. A split pipeline must sample what one
//! stage holding every layer samples, and every bad input must be an error that leaves the
//! stage serving.

use std::path::PathBuf;

use candle_core::quantized::GgmlDType;
use potluck_engine::arch::ModelSlice;
use potluck_engine::backend::Backend;
use potluck_engine::random_gguf::{ModelShape, RandomGguf};
use potluck_node::stage::{StageError, StageRunner};
use potluck_protocol::{Dtype, Message, SampledToken, SamplingWire, Segment, SequenceStart};

const CONTEXT_POSITIONS: usize = 64;
const SEQUENCES_MAX: usize = 4;

fn tiny_model(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("potluck-stage-runner-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{tag}.gguf"));
    RandomGguf::new(ModelShape::tiny(), GgmlDType::Q8_0, 7).write(&path).unwrap();
    path
}

/// Stages over `ranges` of the model at `path`, sending `dtype` activations.
fn pipeline(path: &PathBuf, ranges: &[std::ops::Range<u32>], dtype: Dtype) -> Vec<StageRunner> {
    ranges
        .iter()
        .map(|r| {
            let slice = ModelSlice::load(path, r.clone(), Backend::cpu(1)).unwrap();
            StageRunner::new(slice, CONTEXT_POSITIONS, SEQUENCES_MAX, dtype)
        })
        .collect()
}

/// Hands `message` through every stage, as the data plane does; returns the last stage's output.
fn through(stages: &mut [StageRunner], message: Message) -> Option<Message> {
    let mut message = Some(message);
    for stage in stages.iter_mut() {
        message = stage.handle(message?).unwrap();
    }
    message
}

fn greedy(seed: u64) -> SamplingWire {
    SamplingWire {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repetition_penalty: 1.0,
        frequency_penalty: 0.0,
        presence_penalty: 0.0,
        penalty_last_n: 64,
        seed,
        logit_bias: Vec::new(),
    }
}

fn start(sequence_id: u64, sampling: SamplingWire) -> Message {
    Message::SequenceStart(SequenceStart { sequence_id, sampling, logprobs: true, top_logprobs: 2, history: Vec::new(), prompt: Vec::new(), prefix: None })
}

/// Prefill `prompt`, then decode `n` tokens one step at a time; the sampled tokens.
fn generate(stages: &mut [StageRunner], sequence_id: u64, prompt: &[u32], n: usize) -> Vec<SampledToken> {
    assert!(through(stages, start(sequence_id, greedy(1))).is_none(), "the last stage answers nothing to a start");
    let mut out = Vec::new();
    let mut position = 0u32;
    let mut input = prompt.to_vec();
    for step in 0..n as u64 {
        let segment = Segment { sequence_id, first_position: position, n_rows: input.len() as u32, sample: true, allowed: None, draft: Vec::new() };
        let Some(Message::SampledTokens(sampled)) = through(stages, Message::step_tokens(step, vec![segment], input.clone())) else {
            panic!("the last stage must answer a sampling step with SampledTokens");
        };
        assert_eq!(sampled.step, step);
        assert_eq!(sampled.tokens.len(), 1);
        position += input.len() as u32;
        input = vec![sampled.tokens[0].token];
        out.push(sampled.tokens[0].clone());
    }
    assert!(through(stages, Message::release(sequence_id)).is_none());
    out
}

#[test]
fn a_split_pipeline_samples_what_one_stage_samples() {
    let path = tiny_model("split");
    let prompt = [5u32, 17, 300, 42, 7];
    let whole = generate(&mut pipeline(&path, &[0..4], Dtype::F32), 1, &prompt, 8);
    for ranges in [vec![0..1, 1..4], vec![0..2, 2..4], vec![0..1, 1..3, 3..4]] {
        let mut stages = pipeline(&path, &ranges, Dtype::F32);
        let split = generate(&mut stages, 1, &prompt, 8);
        // f32 activations cross the hops unchanged: the same tokens and the same logprobs.
        assert_eq!(split, whole, "split {ranges:?}");
        assert!(stages.iter().all(|s| s.sequences_held() == 0), "release frees every stage's cache");
    }
    // f16 activations round at each hop: the greedy tokens of this model survive it.
    let halved: Vec<u32> =
        generate(&mut pipeline(&path, &[0..2, 2..4], Dtype::F16), 1, &prompt, 8).iter().map(|t| t.token).collect();
    assert_eq!(halved, whole.iter().map(|t| t.token).collect::<Vec<_>>());
}

#[test]
fn bad_messages_are_errors_and_the_stage_keeps_serving() {
    let path = tiny_model("bad");
    let mut stages = pipeline(&path, &[0..2, 2..4], Dtype::F32);
    let segment = |id, first_position, n_rows| Segment { sequence_id: id, first_position, n_rows, sample: true, allowed: None, draft: Vec::new() };

    // A step for a sequence nobody started.
    let unknown = stages[0].handle(Message::step_tokens(0, vec![segment(9, 0, 1)], vec![1]));
    assert!(matches!(unknown, Err(StageError::UnknownSequence(9))), "{unknown:?}");
    stages[0].handle(start(1, greedy(1))).unwrap();
    // A token outside the vocabulary, a row count that does not match, a position gap.
    let vocab = ModelShape::tiny().vocab_size as u32;
    let outside = stages[0].handle(Message::step_tokens(1, vec![segment(1, 0, 1)], vec![vocab]));
    assert!(matches!(outside, Err(StageError::Engine(_) | StageError::TokenOutOfVocabulary { .. })), "{outside:?}");
    let shape = stages[0].handle(Message::step_tokens(2, vec![segment(1, 0, 3)], vec![1, 2]));
    assert!(matches!(shape, Err(StageError::Shape { .. })), "{shape:?}");
    let gap = stages[0].handle(Message::step_tokens(3, vec![segment(1, 5, 1)], vec![1]));
    assert!(matches!(gap, Err(StageError::PositionMismatch { .. })), "{gap:?}");
    // Token ids sent past the first stage.
    let wrong = stages[1].handle(Message::step_tokens(4, vec![segment(1, 0, 1)], vec![1]));
    assert!(matches!(wrong, Err(StageError::WrongInput { .. })), "{wrong:?}");
    // More sequences than the budget.
    for id in 2..=SEQUENCES_MAX as u64 {
        stages[0].handle(start(id, greedy(1))).unwrap();
    }
    let over = stages[0].handle(start(99, greedy(1)));
    assert!(matches!(over, Err(StageError::TooManySequences { .. })), "{over:?}");
    for id in 1..=SEQUENCES_MAX as u64 {
        stages[0].handle(Message::release(id)).unwrap();
    }

    // After all of that, the pipeline still answers as a fresh one does.
    let prompt = [3u32, 1, 4, 1, 5];
    let fresh = generate(&mut pipeline(&path, &[0..2, 2..4], Dtype::F32), 1, &prompt, 4);
    assert_eq!(generate(&mut stages, 1, &prompt, 4), fresh);
}

/// A grammar's mask travels with the step through every stage, and the last stage draws only
/// what it allows; a mask over another vocabulary is refused before any cache moves.
#[test]
fn the_last_stage_draws_only_what_the_mask_allows() {
    use potluck_protocol::AllowedTokens;
    let path = tiny_model("mask");
    let mut stages = pipeline(&path, &[0..2, 2..4], Dtype::F32);
    let vocab = ModelShape::tiny().vocab_size as u32;
    let prompt = vec![5u32, 17, 300];
    let free = generate(&mut stages, 1, &prompt, 1)[0].token;
    // Allow two tokens, neither the free choice: the greedy draw is the likelier of the two.
    let (a, b) = ((free + 1) % vocab, (free + 2) % vocab);
    let mut words = vec![0u64; vocab.div_ceil(64) as usize];
    for t in [a, b] {
        words[t as usize / 64] |= 1 << (t % 64);
    }
    let allowed = AllowedTokens { vocab, words };
    assert!(through(&mut stages, start(2, greedy(1))).is_none());
    let segment = Segment { sequence_id: 2, first_position: 0, n_rows: 3, sample: true, allowed: Some(allowed.clone()), draft: Vec::new() };
    let Some(Message::SampledTokens(sampled)) = through(&mut stages, Message::step_tokens(1, vec![segment], prompt.clone())) else {
        panic!("a sampling step answers SampledTokens");
    };
    let drawn = &sampled.tokens[0];
    assert!(drawn.token == a || drawn.token == b, "drew {} outside the mask {{{a}, {b}}}", drawn.token);
    // Log-probabilities stay those of the raw logits: the free choice is still the likeliest.
    assert_eq!(drawn.top[0].token, free);
    // A mask for another vocabulary: an error on the last stage, nothing cached, still serving.
    assert!(through(&mut stages, start(3, greedy(1))).is_none());
    let wrong = AllowedTokens { vocab: vocab + 64, words: vec![1; (vocab + 64).div_ceil(64) as usize] };
    let hidden = stages[0]
        .handle(Message::step_tokens(2, vec![Segment { sequence_id: 3, first_position: 0, n_rows: 3, sample: true, allowed: Some(wrong), draft: Vec::new() }], prompt.clone()))
        .unwrap()
        .unwrap();
    let refused = stages[1].handle(hidden);
    assert!(matches!(refused, Err(StageError::MaskVocabulary { .. })), "{refused:?}");
    assert_eq!(generate(&mut stages, 4, &prompt, 1)[0].token, free);
}

/// A draft's rows travel through every stage; the last one keeps what its sampler draws
/// itself, and the next step rolls every stage's cache back over the rejected rows — the
/// tokens are those of plain decoding. A step may not start before the last draft.
#[test]
fn drafts_roll_back_on_every_stage_and_change_no_token() {
    let path = tiny_model("draft");
    let prompt = vec![5u32, 17, 300, 42, 7];
    let plain: Vec<u32> = generate(&mut pipeline(&path, &[0..4], Dtype::F32), 1, &prompt, 6).iter().map(|t| t.token).collect();
    let mut stages = pipeline(&path, &[0..1, 1..3, 3..4], Dtype::F32);
    assert!(through(&mut stages, start(1, greedy(1))).is_none());
    let step = |stages: &mut [StageRunner], n: u64, first: u32, input: Vec<u32>, draft: Vec<u32>| {
        let segment = Segment { sequence_id: 1, first_position: first, n_rows: input.len() as u32, sample: true, allowed: None, draft };
        let Some(Message::SampledTokens(sampled)) = through(stages, Message::step_tokens(n, vec![segment], input)) else {
            panic!("a sampling step answers SampledTokens");
        };
        sampled.tokens[0].clone()
    };
    let first = step(&mut stages, 0, 0, prompt.clone(), vec![]);
    assert_eq!(first.token, plain[0]);
    let at = prompt.len() as u32;
    // Right draft (plain's next two tokens): both accepted, then the token after them.
    let good = step(&mut stages, 1, at, vec![plain[0], plain[1], plain[2]], vec![plain[1], plain[2]]);
    assert_eq!((good.accepted, good.token), (2, plain[3]));
    // Wrong draft: nothing accepted; the next token is plain's, and 2 rows are to roll back.
    let wrong_token = (plain[4] + 1) % 256;
    let bad = step(&mut stages, 2, at + 3, vec![plain[3], wrong_token, wrong_token], vec![wrong_token, wrong_token]);
    assert_eq!((bad.accepted, bad.token), (0, plain[4]));
    // Starting before the draft is refused; inside it rolls back.
    let early = Segment { sequence_id: 1, first_position: at + 2, n_rows: 1, sample: true, allowed: None, draft: vec![] };
    let refused = stages[0].handle(Message::step_tokens(3, vec![early], vec![plain[4]]));
    assert!(matches!(refused, Err(StageError::PositionMismatch { .. })), "{refused:?}");
    let after = step(&mut stages, 4, at + 4, vec![plain[4]], vec![]);
    assert_eq!(after.token, plain[5], "the rolled-back caches give plain decoding's token");
}
