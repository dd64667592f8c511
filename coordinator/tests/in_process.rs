//! In-process tests with the real model: the HTTP API served by [`potluck_coordinator::serve`]
//! on a listener bound to `127.0.0.1:0`, and the generation loop ([`GenerationService`])
//! driven through the real single-machine pipeline ([`LocalPipeline`] over a
//! [`StageRunner`]). No child processes: each test runs in this one, so a failure points at
//! the library rather than at process plumbing (the end-to-end tests cover that).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use potluck_coordinator::generation::{
    GenerationOptions,
    FinishReason, GenerateEvent, GenerateRequest, GenerationService, ACTIVE_SEQUENCES_MAX,
};
use potluck_coordinator::pipeline::{LocalPipeline, UnavailablePipeline};
use potluck_coordinator::{LocalLayers, ServeConfig};
use potluck_engine::arch::ModelSlice;
use potluck_engine::backend::Backend;
use potluck_engine::profile::ModelProfile;
use potluck_engine::sampler::SamplingParams;
use potluck_engine::tokenizer::Tokenizer;
use potluck_node::stage::StageRunner;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every wait in these tests is bounded by this.
const WAIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Context per sequence: enough for the prompts here, small enough to keep KV caches tiny.
const CONTEXT_TOKENS: usize = 256;
/// An HTTP answer larger than this is not one these tests expect.
const RESPONSE_BYTES_MAX: u64 = 1 << 20;

fn model_path() -> PathBuf {
    let path = std::env::var_os("POTLUCK_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/potluck/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(path.exists(), "model missing at {}: run `coordinator fetch-model` or set POTLUCK_MODEL", path.display());
    path
}

// ---------------------------------------------------------------------------------------
// The API, served in-process

/// One HTTP/1.1 request on a fresh connection (`Connection: close`, so the answer ends with
/// the connection): the status code and the body.
async fn http(address: std::net::SocketAddr, method: &str, path: &str, body: Option<&serde_json::Value>) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connecting to the server");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("sending the request");
    let mut response = Vec::new();
    stream.take(RESPONSE_BYTES_MAX).read_to_end(&mut response).await.expect("reading the answer");
    let response = String::from_utf8(response).expect("a UTF-8 answer");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status code");
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "a JSON answer has a length: {head}");
    (status, body.to_owned())
}

/// The default model served alone, one thread, speculative decoding on, with `draft`.
fn serve_config(draft: Option<std::path::PathBuf>) -> ServeConfig {
    ServeConfig {
        model: Some(model_path()),
        threads: 1,
        api_key: None,
        context_length: CONTEXT_TOKENS,
        local: LocalLayers::IfFits { memory_budget_bytes: u64::MAX },
        speculative: true,
        draft,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_in_process_and_stops_on_shutdown() {
    let config = serve_config(None);
    let state = tokio::task::spawn_blocking(move || potluck_coordinator::load(&config)).await.unwrap().expect("loading the model");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(potluck_coordinator::serve(state, listener, async {
        let _ = stopped.await;
    }));

    // llama.cpp's answers for this model (tests/fixtures), recorded by llama-server.
    let reference: serde_json::Value = serde_json::from_str(include_str!("../../tests/fixtures/smollm2-q4_1-llamacpp.json")).unwrap();
    let chat_reference = &reference["chat_template_render"];
    let request = serde_json::json!({
        "model": "any",
        "messages": chat_reference["messages"],
        "temperature": 0,
        "max_tokens": 24,
    });
    let (status, body) = tokio::time::timeout(WAIT_TIMEOUT, http(address, "POST", "/v1/chat/completions", Some(&request)))
        .await
        .expect("an answer in time");
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("a JSON answer");
    assert_eq!(answer["object"], "chat.completion", "{answer}");
    assert_eq!(answer["choices"][0]["message"]["role"], "assistant", "{answer}");
    let content = answer["choices"][0]["message"]["content"].as_str().expect("a message");
    assert!(!content.trim().is_empty(), "an answer: {answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "length", "24 tokens, greedy, no end of turn: {answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 24, "{answer}");
    let prompt_ids = chat_reference["ids"].as_array().unwrap().len();
    assert_eq!(answer["usage"]["prompt_tokens"], prompt_ids, "the chat template renders as llama.cpp's: {answer}");

    // A greedy completion is llama.cpp's, token for token.
    let greedy = &reference["greedy"][0];
    let request = serde_json::json!({"prompt": greedy["prompt"], "temperature": 0, "max_tokens": greedy["request"]["n_predict"]});
    let (status, body) = http(address, "POST", "/v1/completions", Some(&request)).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["choices"][0]["text"], greedy["generated_text"], "{answer}");
    assert!(answer["choices"][0]["text"].as_str().unwrap().starts_with(" Paris"));

    // The cluster snapshot reads back as the type that wrote it.
    let (status, body) = http(address, "GET", "/health", None).await;
    assert_eq!(status, 200);
    let health: potluck_coordinator::snapshot::ClusterSnapshot = serde_json::from_str(&body).expect("/health is a ClusterSnapshot");
    assert_eq!(health.status, "ok");
    assert_eq!(health.stages.len(), 1, "one stage, this machine: {health:?}");
    assert_eq!(health.recent_requests.len(), 2, "both requests are listed: {health:?}");
    assert_eq!(health.recent_requests[1].endpoint, "chat", "oldest last: {health:?}");

    // An open dashboard stream must not hold up the shutdown.
    let mut events = tokio::net::TcpStream::connect(address).await.unwrap();
    events.write_all(format!("GET /events HTTP/1.1\r\nHost: {address}\r\n\r\n").as_bytes()).await.unwrap();
    let mut first = [0u8; 64];
    let n = tokio::time::timeout(WAIT_TIMEOUT, events.read(&mut first)).await.expect("the stream opens").unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));

    stop.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(30), server).await.expect("the server stops after shutdown");
    result.expect("the server task did not panic").expect("the server ended cleanly");
    assert!(tokio::net::TcpStream::connect(address).await.is_err(), "nothing listens after shutdown");
}

// ---------------------------------------------------------------------------------------
// The generation loop over the real local pipeline

struct Model {
    profile: ModelProfile,
    tokenizer: Tokenizer,
}

fn open_model() -> Model {
    let (profile, content) = ModelProfile::from_path(&model_path()).expect("reading the GGUF header");
    let tokenizer = Tokenizer::from_gguf(&content).expect("the tokenizer");
    Model { profile, tokenizer }
}

/// A generation service over every layer of the model on this thread's machine, whose one
/// stage holds `sequences_max` sequences at most.
fn local_service(model: &Model, sequences_max: usize) -> GenerationService {
    let slice = ModelSlice::load(&model_path(), 0..model.profile.n_layers, Backend::cpu(1)).expect("loading the model");
    let runner = StageRunner::new(slice, CONTEXT_TOKENS, sequences_max, potluck_protocol::Dtype::F32);
    GenerationService::start(Box::new(LocalPipeline::new(runner)), CONTEXT_TOKENS, model.tokenizer.stop_ids().to_vec(), GenerationOptions::default())
}

fn request(model: &Model, prompt: &str, max_tokens: usize, sampling: SamplingParams) -> GenerateRequest {
    let mut ids: Vec<u32> = Vec::new();
    if model.tokenizer.add_bos() {
        ids.extend(model.tokenizer.bos_id());
    }
    ids.extend(model.tokenizer.encode(prompt, true));
    GenerateRequest {
        prompt: ids,
        max_tokens,
        sampling,
        ignore_eos: true,
        logprobs: false,
        top_logprobs: 0,
        prompt_logprobs: false,
        grammar: None,
        cache_prompt: true,
        speculative: true,
    }
}

/// Every token of one request, and how it finished.
async fn tokens_of(events: tokio::sync::mpsc::UnboundedReceiver<GenerateEvent>) -> (Vec<u32>, FinishReason) {
    let (tokens, reason, _) = tokens_and_cached(events).await;
    (tokens, reason)
}

/// Every token of one request, how it finished, and how many prompt tokens came from a kept
/// cache.
async fn tokens_and_cached(mut events: tokio::sync::mpsc::UnboundedReceiver<GenerateEvent>) -> (Vec<u32>, FinishReason, usize) {
    let mut tokens = Vec::new();
    let mut cached = 0;
    let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await.expect("the request ends in time") {
            Some(GenerateEvent::PromptCached(n)) => {
                assert!(tokens.is_empty(), "the cached count comes first");
                cached = n;
            }
            Some(GenerateEvent::Token { id, .. }) => tokens.push(id),
            Some(GenerateEvent::Finished { reason, completion_tokens, .. }) => {
                assert_eq!(completion_tokens, tokens.len());
                return (tokens, reason, cached);
            }
            Some(other) => panic!("unexpected event {other:?}"),
            None => panic!("the service dropped the request"),
        }
    }
}

#[tokio::test]
async fn sequences_batched_together_sample_what_each_samples_alone() {
    let model = open_model();
    let service = local_service(&model, ACTIVE_SEQUENCES_MAX);
    let greedy = request(&model, "The capital of France is", 12, SamplingParams::greedy());
    // A drawn sequence (temperature, top-p) with a fixed seed draws the same way each time.
    let seeded = SamplingParams { temperature: 0.9, seed: Some(42), ..SamplingParams::default() };
    let drawn = request(&model, "Once upon a time, in a small village,", 12, seeded);

    let greedy_alone = tokens_of(service.submit(greedy.clone()).unwrap()).await;
    let drawn_alone = tokens_of(service.submit(drawn.clone()).unwrap()).await;
    assert_eq!((greedy_alone.0.len(), greedy_alone.1), (12, FinishReason::Length));

    // Both at once: their rows share steps (one prompt is longer, so prefill and decode mix).
    let (a, b) = (service.submit(greedy).unwrap(), service.submit(drawn).unwrap());
    let (greedy_together, drawn_together) = tokio::join!(tokens_of(a), tokens_of(b));
    assert_eq!(greedy_together, greedy_alone, "the greedy sequence, batched vs alone");
    assert_eq!(drawn_together, drawn_alone, "the seeded sequence, batched vs alone");
    assert!(service.stats().steps.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

/// Prefix caching: a conversation's next turn starts from the kept cache of the one before
/// (its prompt and answer), computes only what is new, and draws exactly the tokens a
/// service without the cache draws.
#[tokio::test]
async fn a_kept_prefix_gives_the_same_tokens_and_skips_its_computation() {
    let model = open_model();
    let cached = local_service(&model, ACTIVE_SEQUENCES_MAX);
    let slice = ModelSlice::load(&model_path(), 0..model.profile.n_layers, Backend::cpu(1)).expect("loading the model");
    let runner = StageRunner::new(slice, CONTEXT_TOKENS, ACTIVE_SEQUENCES_MAX, potluck_protocol::Dtype::F32);
    let plain = GenerationService::start(
        Box::new(LocalPipeline::new(runner)),
        CONTEXT_TOKENS,
        model.tokenizer.stop_ids().to_vec(),
        GenerationOptions { prefix_caching: false, ..GenerationOptions::default() },
    );
    let first = request(&model, "The three primary colors of light are red, green and blue. Mixing all three gives", 12, SamplingParams::greedy());
    let (answer, _, none) = tokens_and_cached(cached.submit(first.clone()).unwrap()).await;
    assert_eq!(none, 0, "nothing is kept before the first request");
    let mut second = first.clone();
    second.prompt.extend(&answer);
    second.prompt.extend(model.tokenizer.encode(" In the same way, mixing red and green light gives", false));
    second.sampling = SamplingParams { temperature: 0.8, seed: Some(7), ..SamplingParams::default() };
    let (with_cache, _, reused) = tokens_and_cached(cached.submit(second.clone()).unwrap()).await;
    // Every position the first request computed: its prompt and all but its last token (and
    // that one too when a speculative draft brought it, already computed).
    assert!((first.prompt.len() + answer.len() - 1..=first.prompt.len() + answer.len()).contains(&reused), "{reused}");
    let (without, _, none) = tokens_and_cached(plain.submit(second.clone()).unwrap()).await;
    assert_eq!(none, 0);
    assert_eq!(with_cache, without, "the same tokens with and without the kept cache");
    assert_eq!(cached.stats().prompt_tokens_cached.load(std::sync::atomic::Ordering::Relaxed), reused as u64);
    // Opting out computes everything.
    let mut opted_out = second.clone();
    opted_out.cache_prompt = false;
    let (again, _, none) = tokens_and_cached(cached.submit(opted_out).unwrap()).await;
    assert_eq!((none, again), (0, without));
}

/// Speculative decoding changes no token: greedy and seeded sampling give the same text with
/// prompt-lookup drafts and without, on a prompt whose answer repeats it (so drafts are
/// proposed and accepted) and on one that does not.
#[tokio::test]
async fn drafts_change_no_token() {
    let model = open_model();
    let service = |speculative: bool| {
        let slice = ModelSlice::load(&model_path(), 0..model.profile.n_layers, Backend::cpu(1)).expect("loading the model");
        let runner = StageRunner::new(slice, CONTEXT_TOKENS, ACTIVE_SEQUENCES_MAX, potluck_protocol::Dtype::F32);
        let options = GenerationOptions { speculative, prefix_caching: false, draft: None };
        GenerationService::start(Box::new(LocalPipeline::new(runner)), CONTEXT_TOKENS, model.tokenizer.stop_ids().to_vec(), options)
    };
    let (with, without) = (service(true), service(false));
    let repeat = "Copy the list exactly.\nList: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon, mango.\nCopy: apple, banana,";
    let free = "Write a short story about a robot who learns to paint.";
    for prompt in [repeat, free] {
        for sampling in [SamplingParams::greedy(), SamplingParams { temperature: 0.8, seed: Some(11), ..SamplingParams::default() }] {
            let request = request(&model, prompt, 48, sampling);
            let (a, _) = tokens_of(with.submit(request.clone()).unwrap()).await;
            let (b, _) = tokens_of(without.submit(request).unwrap()).await;
            assert_eq!(a, b, "{prompt:?}: the same tokens with drafts and without");
        }
    }
    let stats = with.stats();
    let (proposed, accepted) = (stats.draft_tokens_proposed.load(std::sync::atomic::Ordering::Relaxed), stats.draft_tokens_accepted.load(std::sync::atomic::Ordering::Relaxed));
    println!("drafts: {proposed} tokens proposed, {accepted} accepted");
    assert!(accepted >= 20, "the repeating prompt's drafts are accepted: {accepted} of {proposed}");
    assert_eq!(without.stats().draft_tokens_proposed.load(std::sync::atomic::Ordering::Relaxed), 0);
}

/// A draft model changes no token either: with the served model as its own draft (a perfect
/// draft: its greedy guesses are the target's greedy tokens) and with a random-weight model
/// of the same vocabulary (an imperfect one), greedy and seeded answers are plain decoding's;
/// the perfect draft's tokens are accepted at greedy, the random one's rarely.
#[tokio::test]
async fn a_draft_model_changes_no_token() {
    use potluck_coordinator::speculative::DraftModel;
    use potluck_engine::random_gguf::{ModelShape, RandomGguf, TokenizerMetadata};
    let model = open_model();
    let random_draft = std::env::temp_dir().join(format!("potluck-draft-{}.gguf", std::process::id()));
    RandomGguf::new(ModelShape::tiny(), potluck_engine::quant::GgmlDType::Q8_0, 5)
        .with_tokenizer(TokenizerMetadata::from_gguf(&model_path()).unwrap())
        .write(&random_draft)
        .unwrap();
    let service = |draft: Option<&std::path::Path>| {
        let slice = ModelSlice::load(&model_path(), 0..model.profile.n_layers, Backend::cpu(1)).expect("loading the model");
        let runner = StageRunner::new(slice, CONTEXT_TOKENS, ACTIVE_SEQUENCES_MAX, potluck_protocol::Dtype::F32);
        let draft = draft.map(|path| {
            let profile = potluck_engine::profile::ModelProfile::from_path(path).unwrap().0;
            DraftModel::new(ModelSlice::load(path, 0..profile.n_layers, Backend::cpu(1)).unwrap(), CONTEXT_TOKENS)
        });
        let speculative = draft.is_some();
        let options = GenerationOptions { speculative, prefix_caching: false, draft };
        GenerationService::start(Box::new(LocalPipeline::new(runner)), CONTEXT_TOKENS, model.tokenizer.stop_ids().to_vec(), options)
    };
    let plain = service(None);
    let perfect = service(Some(&model_path()));
    let random = service(Some(&random_draft));
    let prompts = ["Write a short story about a robot who learns to paint.", "The three primary colours are"];
    let acceptance = |s: &GenerationService| {
        let stats = s.stats();
        (stats.draft_tokens_accepted.load(std::sync::atomic::Ordering::Relaxed), stats.draft_tokens_proposed.load(std::sync::atomic::Ordering::Relaxed))
    };
    for prompt in prompts {
        for sampling in [SamplingParams::greedy(), SamplingParams { temperature: 0.8, seed: Some(5), ..SamplingParams::default() }] {
            let request = request(&model, prompt, 40, sampling);
            let (want, _) = tokens_of(plain.submit(request.clone()).unwrap()).await;
            for (name, drafted) in [("perfect", &perfect), ("random", &random)] {
                let (got, _) = tokens_of(drafted.submit(request.clone()).unwrap()).await;
                assert_eq!(got, want, "{prompt:?} with the {name} draft: the same tokens as plain decoding");
            }
        }
        if prompt == prompts[0] {
            // Greedy and seeded runs of the first prompt: the perfect draft's greedy guesses.
            let (accepted, proposed) = acceptance(&perfect);
            println!("perfect draft after {prompt:?}: {accepted} of {proposed} accepted");
        }
    }
    let ((p_acc, p_prop), (r_acc, r_prop)) = (acceptance(&perfect), acceptance(&random));
    println!("perfect draft: {p_acc} of {p_prop} drafted tokens accepted; random draft: {r_acc} of {r_prop}");
    assert!(p_prop > 0 && r_prop > 0, "both drafts proposed");
    assert!(p_acc * 2 > p_prop, "the perfect draft is mostly accepted: {p_acc} of {p_prop}");
    assert!(r_acc * 10 < r_prop, "the random draft is mostly rejected: {r_acc} of {r_prop}");
    let _ = std::fs::remove_file(&random_draft);
}

/// `--draft` with another vocabulary is refused at start, saying how they differ: Gemma 3's
/// 262k-token vocabulary as a draft for SmolLM2.
#[test]
fn a_draft_of_another_vocabulary_is_refused() {
    let gemma = std::env::var_os("POTLUCK_GEMMA3_MODEL").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/potluck/models/gemma-3-270m-q4_k_m.gguf")
    });
    assert!(gemma.exists(), "Gemma 3 missing at {}: run `coordinator fetch-model gemma3-270m`", gemma.display());
    let config = serve_config(Some(gemma));
    let error = format!("{:#}", potluck_coordinator::load(&config).err().expect("a draft of another vocabulary is refused"));
    assert!(error.contains("does not share the served model's vocabulary") && error.contains("262144 tokens against the served model's 49152"), "{error}");
}

#[tokio::test]
async fn a_cancelled_request_releases_its_sequence() {
    let model = open_model();
    // One sequence at most on the stage: the next request can only start if the cancelled
    // one's KV cache was freed there.
    let service = local_service(&model, 1);
    let long = request(&model, "Count from one to one hundred:", 200, SamplingParams::greedy());
    let mut events = service.submit(long).unwrap();
    let first = tokio::time::timeout(WAIT_TIMEOUT, events.recv()).await.expect("a first token in time");
    assert!(matches!(first, Some(GenerateEvent::Token { .. })), "{first:?}");
    drop(events); // the client goes away

    let stats = service.stats();
    let deadline = Instant::now() + WAIT_TIMEOUT;
    while stats.active.load(std::sync::atomic::Ordering::Relaxed) != 0 {
        assert!(Instant::now() < deadline, "the cancelled sequence is still active");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let next = request(&model, "The capital of France is", 4, SamplingParams::greedy());
    let (tokens, reason) = tokens_of(service.submit(next).unwrap()).await;
    assert_eq!((tokens.len(), reason), (4, FinishReason::Length), "the stage had room again");
    assert_eq!(stats.requests_finished.load(std::sync::atomic::Ordering::Relaxed), 1, "only the second request finished");
}

/// A request submitted after a pipeline was offered runs on it, even when the generation
/// loop sat idle on the one before: the cluster publishes a new pipeline as ready right after
/// offering it, and a client that then asks must not get the old pipeline's refusal.
#[tokio::test]
async fn a_request_after_a_new_pipeline_runs_on_it() {
    let model = open_model();
    let service = GenerationService::start(
        Box::new(UnavailablePipeline::new("no worker yet".into())),
        CONTEXT_TOKENS,
        model.tokenizer.stop_ids().to_vec(),
        GenerationOptions::default(),
    );
    let mut refused = service.submit(request(&model, "Hi", 2, SamplingParams::greedy())).unwrap();
    let first = tokio::time::timeout(WAIT_TIMEOUT, refused.recv()).await.expect("an answer in time");
    assert!(matches!(first, Some(GenerateEvent::Unavailable(_))), "{first:?}");
    // Let the loop settle into its idle wait on the jobs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let slice = ModelSlice::load(&model_path(), 0..model.profile.n_layers, Backend::cpu(1)).expect("loading the model");
    let runner = StageRunner::new(slice, CONTEXT_TOKENS, 1, potluck_protocol::Dtype::F32);
    service.replace_pipeline(Box::new(LocalPipeline::new(runner))).unwrap();
    let next = request(&model, "The capital of France is", 4, SamplingParams::greedy());
    let (tokens, reason) = tokens_of(service.submit(next).unwrap()).await;
    assert_eq!((tokens.len(), reason), (4, FinishReason::Length));
}
