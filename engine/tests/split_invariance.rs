//! Split invariance on tiny random-weight GGUFs of every llama-family architecture (llama,
//! qwen2, qwen3, phi3, and the mixtures of experts: llama with experts as Mixtral, qwen3moe;
//! written by `random_gguf`): running layers `[0,k)` on one slice and `[k,n)` on
//! another gives the same logits as the unsplit model, for every k; a step batching several
//! sequences gives what each gives alone; a slice holding part of the layers holds about
//! that part of the weights.

use std::path::PathBuf;

use potluck_engine::kv_cache::SequenceCache;
use potluck_engine::arch::ModelSlice;
use potluck_engine::backend::Backend;
use potluck_engine::profile::ModelProfile;
use potluck_engine::random_gguf::{Architecture, ModelShape, RandomGguf};

const N_LAYERS: u32 = 4;
const N_EMBD: usize = 256;
const VOCAB: usize = 320;
/// Every architecture the engine's llama family runs, and with `true` its mixture-of-experts
/// form (the tiny shape with 8 experts, 2 per token).
#[derive(Debug, Clone, Copy)]
struct Model(Architecture, bool);
const ARCHITECTURES: [Model; 6] = [
    Model(Architecture::Llama, false),
    Model(Architecture::Qwen2, false),
    Model(Architecture::Qwen3, false),
    Model(Architecture::Phi3, false),
    Model(Architecture::Llama, true),
    Model(Architecture::Qwen3Moe, true),
];

/// The tiny model: each layer uses another quantization type, so every kernel the engine has
/// is exercised (Q5K for the Q4K layer's ffn_down), with a Q8_0 embedding, a Q4_0 head and
/// F32 norms.
fn write_tiny_gguf(path: &std::path::Path, tied: bool, Model(architecture, experts): Model) {
    let mut model = RandomGguf::tiny_mixed(1);
    model.architecture = architecture;
    if experts {
        model.shape = ModelShape::tiny_moe();
    }
    let shape = &model.shape;
    assert_eq!((shape.n_layers, shape.n_embd, shape.vocab_size), (N_LAYERS, N_EMBD, VOCAB));
    model.tied_embeddings = tied;
    model.write(path).unwrap();
}

fn tiny_model(tied: bool, architecture: Model) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("potluck-split-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Tests run in parallel threads: each gets its own file.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("tiny-{}-{}-{}-{n}.gguf", architecture.0.gguf_name(), architecture.1, if tied { "tied" } else { "untied" }));
    write_tiny_gguf(&path, tied, architecture);
    path
}

/// Logits of every position of `steps` (each a chunk of tokens fed as one step) through a
/// pipeline of slices.
fn run_pipeline(slices: &[ModelSlice], steps: &[&[u32]]) -> Vec<Vec<f32>> {
    let mut caches: Vec<SequenceCache> = slices.iter().map(|s| s.new_cache(256)).collect();
    let mut all = Vec::new();
    for tokens in steps {
        let mut hidden = slices[0].embed(tokens).unwrap();
        for (slice, cache) in slices.iter().zip(caches.iter_mut()) {
            slice.forward_layers(&mut hidden, &[tokens.len()], &mut [cache]).unwrap();
        }
        let logits = slices.last().unwrap().head(&hidden).unwrap();
        all.extend(logits.chunks(VOCAB).map(<[f32]>::to_vec));
    }
    all
}

const PROMPT: [u32; 9] = [5, 17, 300, 42, 42, 7, 255, 0, 19];

#[test]
fn split_at_every_layer_gives_the_unsplit_logits() {
    for (tied, architecture) in [false, true].into_iter().flat_map(|t| ARCHITECTURES.map(|a| (t, a))) {
        let path = tiny_model(tied, architecture);
        let backend = Backend::cpu(1);
        let steps: [&[u32]; 3] = [&PROMPT, &[11], &[12]];
        let whole = run_pipeline(&[ModelSlice::load(&path, 0..N_LAYERS, backend.clone()).unwrap()], &steps);
        assert_eq!(whole.len(), PROMPT.len() + 2);
        assert!(whole.iter().flatten().all(|l| l.is_finite()));
        for k in 1..N_LAYERS {
            let split = [ModelSlice::load(&path, 0..k, backend.clone()).unwrap(), ModelSlice::load(&path, k..N_LAYERS, backend.clone()).unwrap()];
            assert!(split[0].is_first() && !split[0].is_last());
            assert!(!split[1].is_first() && split[1].is_last());
            let got = run_pipeline(&split, &steps);
            assert_eq!(got, whole, "{architecture:?} tied={tied}: split at {k} changed the logits");
        }
        // Three stages, and two threads.
        let two_threads = Backend::cpu(2);
        let three = [
            ModelSlice::load(&path, 0..1, two_threads.clone()).unwrap(),
            ModelSlice::load(&path, 1..3, two_threads.clone()).unwrap(),
            ModelSlice::load(&path, 3..N_LAYERS, two_threads.clone()).unwrap(),
        ];
        let got = run_pipeline(&three, &steps);
        for (a, b) in got.iter().flatten().zip(whole.iter().flatten()) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{architecture:?}: three stages on two threads: {a} vs {b}");
        }
    }
}

#[test]
fn prefill_in_chunks_equals_one_step() {
    for architecture in ARCHITECTURES {
        let path = tiny_model(false, architecture);
        let backend = Backend::cpu(1);
        let slice = [ModelSlice::load(&path, 0..N_LAYERS, backend.clone()).unwrap()];
        let one = run_pipeline(&slice, &[&PROMPT]);
        let chunked = run_pipeline(&slice, &[&PROMPT[..4], &PROMPT[4..5], &PROMPT[5..]]);
        for (a, b) in chunked.iter().flatten().zip(one.iter().flatten()) {
            assert!((a - b).abs() <= 1e-3 * (1.0 + b.abs()), "{architecture:?}: chunked prefill: {a} vs {b}");
        }
    }
}

#[test]
fn batched_sequences_match_each_sequence_alone() {
    for architecture in ARCHITECTURES {
        let path = tiny_model(false, architecture);
        let backend = Backend::cpu(2);
        let slice = ModelSlice::load(&path, 0..N_LAYERS, backend.clone()).unwrap();
        // 5 + 3 rows: the batched step takes the tile kernels, each alone the row kernels.
        let a: Vec<u32> = vec![1, 2, 3, 4, 5];
        let b: Vec<u32> = vec![300, 200, 100];
        let alone_a = run_pipeline(std::slice::from_ref(&slice), &[&a]);
        let alone_b = run_pipeline(std::slice::from_ref(&slice), &[&b]);
        let mut cache_a = slice.new_cache(64);
        let mut cache_b = slice.new_cache(64);
        let tokens: Vec<u32> = a.iter().chain(&b).copied().collect();
        let mut hidden = slice.embed(&tokens).unwrap();
        slice.forward_layers(&mut hidden, &[a.len(), b.len()], &mut [&mut cache_a, &mut cache_b]).unwrap();
        let logits = slice.head(&hidden).unwrap();
        let together: Vec<&[f32]> = logits.chunks(VOCAB).collect();
        // Bit for bit: a sequence's tokens must not depend on what else shares its step.
        for (got, want) in together.iter().zip(alone_a.iter().chain(&alone_b)) {
            assert_eq!(*got, &want[..], "{architecture:?}: a batched row differs from the sequence alone");
        }
        assert_eq!(cache_a.len(), a.len());
        assert_eq!(cache_b.len(), b.len());
    }
}

#[test]
fn a_slice_holds_only_its_share_of_the_weights() {
    for architecture in ARCHITECTURES {
        let path = tiny_model(false, architecture);
        let (profile, _) = ModelProfile::from_path(&path).unwrap();
        let backend = Backend::cpu(1);
        let whole = ModelSlice::load(&path, 0..N_LAYERS, backend.clone()).unwrap();
        let first = ModelSlice::load(&path, 0..2, backend.clone()).unwrap();
        let second = ModelSlice::load(&path, 2..N_LAYERS, backend.clone()).unwrap();
        assert_eq!(first.size_in_bytes() as u64, profile.slice_weight_bytes(0..2));
        assert_eq!(second.size_in_bytes() as u64, profile.slice_weight_bytes(2..N_LAYERS));
        assert_eq!(whole.size_in_bytes() as u64, profile.slice_weight_bytes(0..N_LAYERS));
        assert!(first.size_in_bytes() < whole.size_in_bytes());
        assert!(second.size_in_bytes() < whole.size_in_bytes());
    }
}

#[test]
fn errors_not_panics_for_bad_input() {
    let path = tiny_model(false, Model(Architecture::Llama, false));
    let backend = Backend::cpu(1);
    let slice = ModelSlice::load(&path, 0..N_LAYERS, backend.clone()).unwrap();
    assert!(slice.embed(&[VOCAB as u32]).is_err(), "token outside the vocabulary");
    assert!(ModelSlice::load(&path, 2..2, backend.clone()).is_err(), "empty range");
    assert!(ModelSlice::load(&path, 0..N_LAYERS + 1, backend.clone()).is_err(), "range past the model");
    let mut cache = slice.new_cache(4);
    let mut hidden = slice.embed(&[1, 2, 3, 4, 5]).unwrap();
    let err = slice.forward_layers(&mut hidden, &[5], &mut [&mut cache]).unwrap_err();
    assert!(err.to_string().contains("context"), "{err}");
    assert_eq!(cache.len(), 0, "a refused step changes nothing");
    let middle = ModelSlice::load(&path, 1..2, backend.clone()).unwrap();
    assert!(middle.embed(&[1]).is_err() && middle.head(&[0.0; N_EMBD]).is_err());
    // A truncated file is an error, not a crash.
    let bytes = std::fs::read(&path).unwrap();
    let cut = path.with_extension("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(ModelSlice::load(&cut, 0..N_LAYERS, backend.clone()).is_err());
}

/// A slice loads from exactly the tensors `slice_tensor_names` lists for its range (what a
/// worker is sent and its slice cache keeps): every architecture, experts and LongRoPE's
/// factor sets included; asking for any other tensor fails the test.
#[test]
fn a_slice_needs_only_the_tensors_its_names_list() {
    use potluck_engine::arch::slice_tensor_names;
    use potluck_engine::gguf::GgufModel;
    use potluck_engine::source::{GgufFileSource, TensorSource};
    struct Listed<'a> {
        inner: GgufFileSource<'a>,
        names: Vec<String>,
    }
    impl TensorSource for Listed<'_> {
        fn tensor(&mut self, name: &str) -> Result<Option<(candle_core::quantized::GgmlDType, Vec<usize>, Vec<u8>)>, potluck_engine::EngineError> {
            assert!(self.names.iter().any(|n| n == name), "`{name}` is loaded but not listed: {:?}", self.names);
            self.inner.tensor(name)
        }
    }
    let longrope = {
        let dir = std::env::temp_dir().join(format!("potluck-split-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny-phi3-longrope.gguf");
        let mut model = RandomGguf::tiny_mixed(3);
        model.architecture = Architecture::Phi3;
        model.with_rope_scaling("longrope:1.19:64").unwrap().write(&path).unwrap();
        path
    };
    let paths: Vec<PathBuf> = ARCHITECTURES.iter().map(|&m| tiny_model(false, m)).chain([longrope]).collect();
    for path in paths {
        let model = GgufModel::open(&path).unwrap();
        let profile = ModelProfile::from_model(&model).unwrap();
        for layers in [0..1, 1..3, 3..N_LAYERS, 0..N_LAYERS] {
            let names = slice_tensor_names(&profile, layers.clone());
            let mut source = Listed { inner: GgufFileSource::new(&model).unwrap(), names };
            ModelSlice::from_source(profile.clone(), layers.clone(), &mut source, Backend::cpu(1))
                .unwrap_or_else(|e| panic!("{}: layers {layers:?}: {e}", path.display()));
        }
    }
}
