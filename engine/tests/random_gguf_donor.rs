//! A random-weight model with the real SmolLM2-135M-Instruct tokenizer copied in: what the
//! scale tests and benchmarks serve. The file renders a chat prompt, tokenizes it the same way
//! the donor does, and runs it through the engine.
//!
//! The donor comes from `$POTLUCK_MODEL`, else the coordinator's cache
//! (`random_gguf::default_donor_path`, filled by `coordinator fetch-model`); a missing donor
//! is a failure, never a silent pass.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use potluck_engine::chat_template::{ChatMessage, ChatTemplate};
use potluck_engine::arch::ModelSlice;
use potluck_engine::backend::Backend;
use potluck_engine::profile::ModelProfile;
use potluck_engine::random_gguf::{self, ModelShape, RandomGguf, TokenizerMetadata};
use potluck_engine::tokenizer::Tokenizer;

fn donor_path() -> PathBuf {
    random_gguf::default_donor_path().unwrap_or_else(|| {
        panic!(
            "the donor model {} is missing: run `cargo run -p potluck-coordinator -- fetch-model` (or set POTLUCK_MODEL)",
            random_gguf::DEFAULT_DONOR_FILE
        )
    })
}

/// Deletes the file when the test ends, passed or failed.
struct Removed(PathBuf);
impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn header(path: &Path) -> Content {
    Content::read(&mut std::fs::File::open(path).unwrap()).unwrap()
}

#[test]
fn random_gguf_with_the_smollm2_tokenizer_is_servable() {
    let donor_path = donor_path();
    let donor = header(&donor_path);
    let model = RandomGguf::new(ModelShape::preset("tiny", Some(2)).unwrap(), GgmlDType::Q4_0, 5)
        .with_tokenizer(TokenizerMetadata::from_gguf(&donor_path).unwrap());
    assert_eq!(model.shape.vocab_size, 49152, "SmolLM2's vocabulary");
    let path = Removed(std::env::temp_dir().join(format!("potluck-random-donor-{}.gguf", std::process::id())));
    model.write(&path.0).unwrap();
    let written = header(&path.0);

    // Every tokenizer key, byte for byte, and nothing of the donor's model keys.
    let tokenizer_keys: Vec<&String> = donor.metadata.keys().filter(|k| k.starts_with("tokenizer.")).collect();
    assert!(tokenizer_keys.iter().any(|k| *k == "tokenizer.chat_template"));
    for key in tokenizer_keys {
        assert_eq!(format!("{:?}", written.metadata[key]), format!("{:?}", donor.metadata[key]), "{key}");
    }
    assert_eq!(written.metadata["llama.block_count"].to_u32().unwrap(), 2);
    assert_eq!(written.metadata["llama.embedding_length"].to_u32().unwrap(), 256);

    // Served as the donor would be: same template, same prompt ids.
    let donor_tokenizer = Tokenizer::from_gguf(&donor).unwrap();
    let tokenizer = Tokenizer::from_gguf(&written).unwrap();
    let messages = [ChatMessage::new("user", "What is the capital of France?")];
    let prompt = ChatTemplate::from_gguf(&written, &tokenizer).unwrap().expect("the donor has a template").render(&messages, true).unwrap();
    assert_eq!(prompt, ChatTemplate::from_gguf(&donor, &donor_tokenizer).unwrap().expect("the donor has a template").render(&messages, true).unwrap());
    let ids = tokenizer.encode(&prompt, true);
    assert_eq!(ids, donor_tokenizer.encode(&prompt, true));

    // And run: logits over the whole vocabulary for every prompt position.
    let (profile, _) = ModelProfile::from_path(&path.0).unwrap();
    assert_eq!((profile.n_layers, profile.vocab_size), (2, 49152));
    let slice = ModelSlice::load(&path.0, 0..profile.n_layers, Backend::cpu(2)).unwrap();
    let mut cache = slice.new_cache(ids.len());
    let mut hidden = slice.embed(&ids).unwrap();
    slice.forward_layers(&mut hidden, &[ids.len()], &mut [&mut cache]).unwrap();
    let logits = slice.head(&hidden).unwrap();
    assert_eq!(logits.len(), ids.len() * 49152);
    assert!(logits.iter().all(|l| l.is_finite()));
}
