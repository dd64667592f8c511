//! The tokenizer and chat template against llama.cpp, on the real SmolLM2-135M-Instruct GGUF.
//!
//! Reference data: `tests/fixtures/smollm2-q4_1-llamacpp.json`, recorded from llama-server's
//! `/tokenize`, `/detokenize` and `/apply-template` for the same file. Only the GGUF header is
//! read, so this runs in well under a second.
//!
//! The model comes from `POTLUCK_MODEL`, else
//! `$HOME/.cache/potluck/models/SmolLM2-135M-Instruct.Q4_1.gguf`. A missing model fails the
//! test (it must never pass by checking nothing).

use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use potluck_engine::chat_template::{ChatMessage, ChatTemplate};
use potluck_engine::tokenizer::{StreamDecoder, Tokenizer};
use serde_json::Value;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/smollm2-q4_1-llamacpp.json"
);
const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_path() -> PathBuf {
    if let Some(path) = std::env::var_os("POTLUCK_MODEL") {
        return PathBuf::from(path);
    }
    let home = std::env::var_os("HOME").expect("HOME is not set and neither is POTLUCK_MODEL");
    PathBuf::from(home)
        .join(".cache/potluck/models")
        .join(MODEL_FILE)
}

fn load() -> (gguf_file::Content, Tokenizer, Value) {
    let path = model_path();
    let mut file = std::fs::File::open(&path).unwrap_or_else(|e| {
        panic!(
            "cannot open the model {} ({e}). Fetch {MODEL_FILE} into ~/.cache/potluck/models/ \
             (run `coordinator fetch-model`, as scripts/test.sh does) or point POTLUCK_MODEL at it.",
            path.display()
        )
    });
    let content = gguf_file::Content::read(&mut file).expect("read GGUF header");
    let tokenizer = Tokenizer::from_gguf(&content).expect("tokenizer from GGUF");
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string(FIXTURE).expect("read fixture"))
            .expect("fixture JSON");
    (content, tokenizer, fixture)
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("id array")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

fn cases(fixture: &Value) -> &[Value] {
    let cases = fixture["tokenize"].as_array().expect("tokenize cases");
    assert!(!cases.is_empty());
    cases
}

#[test]
fn encode_matches_llama_cpp() {
    let (_, tok, fixture) = load();
    for case in cases(&fixture) {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, true),
            ids(&case["ids"]),
            "parse_special=true: {text:?}"
        );
        assert_eq!(
            tok.encode(text, false),
            ids(&case["ids_parse_special_false"]),
            "parse_special=false: {text:?}"
        );
    }
}

#[test]
fn decode_matches_llama_cpp() {
    let (_, tok, fixture) = load();
    for case in cases(&fixture) {
        let expected = case["detokenized"].as_str().unwrap();
        assert_eq!(tok.decode(&ids(&case["ids"]), true), expected);
        // Per-token pieces, where the fixture has them as text (others are raw bytes).
        for piece in case["pieces"].as_array().unwrap() {
            let id = piece["id"].as_u64().unwrap() as u32;
            let bytes: Vec<u8> = match &piece["piece"] {
                Value::String(s) => s.as_bytes().to_vec(),
                Value::Array(b) => b.iter().map(|v| v.as_u64().unwrap() as u8).collect(),
                other => panic!("unexpected piece {other:?}"),
            };
            assert_eq!(
                &*tok.token_bytes(id, true),
                &bytes[..],
                "piece of token {id}"
            );
        }
    }
}

#[test]
fn stream_decode_never_splits_characters() {
    let (_, tok, fixture) = load();
    let mut split_seen = false;
    for case in cases(&fixture) {
        let expected = case["detokenized"].as_str().unwrap();
        let mut stream = StreamDecoder::new(true);
        let mut text = String::new();
        for id in ids(&case["ids"]) {
            let piece = stream.push(&tok, id);
            // `piece` is a String, so it is valid UTF-8; what matters is that no U+FFFD was
            // invented for a character split across tokens.
            assert!(!piece.contains('\u{FFFD}'), "{expected:?}: piece {piece:?}");
            split_seen |=
                piece.is_empty() && std::str::from_utf8(&tok.token_bytes(id, true)).is_err();
            text.push_str(&piece);
        }
        text.push_str(&stream.finish());
        assert_eq!(text, expected);
    }
    assert!(
        split_seen,
        "the fixture should include a character split across tokens"
    );
}

#[test]
fn chat_template_matches_llama_cpp() {
    let (content, tok, fixture) = load();
    let reference = &fixture["chat_template_render"];
    let messages: Vec<ChatMessage> =
        serde_json::from_value(reference["messages"].clone()).expect("messages");
    let template = ChatTemplate::from_gguf(&content, &tok).expect("chat template").expect("the model has a chat template");
    assert_eq!(
        template.source(),
        fixture["server_props"]["chat_template"].as_str().unwrap()
    );
    let prompt = template.render(&messages, true).expect("render");
    assert_eq!(prompt, reference["prompt"].as_str().unwrap());
    assert_eq!(tok.encode(&prompt, true), ids(&reference["ids"]));
}

#[test]
fn special_tokens_and_stops() {
    let (_, tok, fixture) = load();
    assert!(
        tok.stop_ids().contains(&2),
        "<|im_end|> ends generation: {:?}",
        tok.stop_ids()
    );
    assert_eq!(tok.token_text(2), Some("<|im_end|>"));
    assert!(tok.is_special(1) && tok.is_special(2));
    assert!(
        !tok.add_bos(),
        "this GGUF sets tokenizer.ggml.add_bos_token = false"
    );
    let props = &fixture["server_props"];
    let text = |id: Option<u32>| {
        String::from_utf8(tok.token_bytes(id.unwrap(), true).into_owned()).unwrap()
    };
    assert_eq!(text(tok.bos_id()), props["bos_token"].as_str().unwrap());
    assert_eq!(text(tok.eos_id()), props["eos_token"].as_str().unwrap());
    assert_eq!(tok.token_text(4649), Some("ĠFrance"));
    assert_eq!(tok.vocab_size(), 49_152);
}

/// The same model run by Hugging Face transformers: its prompt ids and greedy outputs must
/// round-trip through our tokenizer too.
#[test]
fn agrees_with_transformers() {
    const HF_FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/smollm2-fp32-transformers.json"
    );
    let (content, tok, _) = load();
    let hf: Value =
        serde_json::from_str(&std::fs::read_to_string(HF_FIXTURE).expect("read fixture"))
            .expect("fixture JSON");
    let template = ChatTemplate::from_gguf(&content, &tok).expect("chat template").expect("the model has a chat template");
    for run in [&hf, &hf["chat"]] {
        let prompt = run["prompt"].as_str().unwrap();
        assert_eq!(
            tok.encode(prompt, true),
            ids(&run["prompt_ids"]),
            "{prompt:?}"
        );
        let greedy_ids = ids(&run["greedy_ids"]);
        let greedy_text = run["greedy_text"].as_str().unwrap();
        assert_eq!(tok.decode(&greedy_ids, false), greedy_text);
        let mut stream = StreamDecoder::new(false);
        let mut streamed: String = greedy_ids.iter().map(|&id| stream.push(&tok, id)).collect();
        streamed.push_str(&stream.finish());
        assert_eq!(streamed, greedy_text);
    }
    let messages: Vec<ChatMessage> =
        serde_json::from_value(hf["chat"]["messages"].clone()).expect("messages");
    assert_eq!(
        template.render(&messages, true).unwrap(),
        hf["chat"]["prompt"].as_str().unwrap()
    );
}
