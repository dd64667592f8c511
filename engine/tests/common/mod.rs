//! What several reference tests share.

use potluck_engine::tokenizer::Tokenizer;
use serde_json::Value;

/// Checks a fixture's `tokenizer` cases (`text`, llama.cpp's `ids`; `plain`: no BOS and no
/// special-token parsing, else both as llama.cpp's `add_bos=True, special=True`) against
/// `tok`; the plain ids must also decode back to the text. Returns one line per difference.
pub fn tokenizer_differences(tok: &Tokenizer, cases: &Value) -> Vec<String> {
    let mut bad = Vec::new();
    for case in cases.as_array().expect("tokenizer cases") {
        let text = case["text"].as_str().unwrap();
        let plain = case["plain"].as_bool().unwrap_or(false);
        let mut ours: Vec<u32> = Vec::new();
        if !plain && tok.add_bos() {
            ours.extend(tok.bos_id());
        }
        ours.extend(tok.encode(text, !plain));
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        if ours != want {
            bad.push(format!("{text:?} (special: {}): ours {ours:?}\n  llama.cpp {want:?}", !plain));
        }
        if plain && tok.decode(&want, false) != text {
            bad.push(format!("{text:?}: llama.cpp's ids decode to {:?}", tok.decode(&want, false)));
        }
    }
    bad
}
