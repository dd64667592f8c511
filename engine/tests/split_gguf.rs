//! Split GGUFs (`<prefix>-00001-of-0000N.gguf`, as llama.cpp's `llama-gguf-split` writes
//! them) load as one model: a tiny random model split into parts by the engine's
//! `gguf::write_split` gives the unsplit file's profile and bit-identical logits, whichever
//! part's path is given; parts that do not make one model are refused with an error naming
//! the file at fault.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Content;
use potluck_engine::arch::ModelSlice;
use potluck_engine::backend::Backend;
use potluck_engine::gguf::{split_part_path, write_split, GgufModel, SPLIT_COUNT_KEY, SPLIT_TENSORS_COUNT_KEY};
use potluck_engine::profile::ModelProfile;
use potluck_engine::random_gguf::RandomGguf;

const N_LAYERS: u32 = 4;
const PARTS: usize = 3;
const PROMPT: [u32; 6] = [5, 17, 300, 42, 7, 19];

/// A fresh directory holding the tiny mixed-type model (`whole.gguf`) and its split into
/// [`PARTS`] parts (`model-0000i-of-00003.gguf`).
struct Fixture {
    dir: PathBuf,
    whole: PathBuf,
    parts: Vec<PathBuf>,
}

impl Fixture {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("potluck-split-gguf-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let whole = dir.join("whole.gguf");
        RandomGguf::tiny_mixed(1).write(&whole).unwrap();
        let parts = write_split(&whole, &dir.join("model"), PARTS).unwrap();
        Self { dir, whole, parts }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn header(path: &Path) -> Content {
    Content::read(&mut std::fs::File::open(path).unwrap()).unwrap()
}

/// Logits of every position of the prompt through `slices` in order.
fn logits(slices: &[ModelSlice]) -> Vec<f32> {
    let mut caches: Vec<_> = slices.iter().map(|s| s.new_cache(64)).collect();
    let mut hidden = slices[0].embed(&PROMPT).unwrap();
    for (slice, cache) in slices.iter().zip(caches.iter_mut()) {
        slice.forward_layers(&mut hidden, &[PROMPT.len()], &mut [cache]).unwrap();
    }
    slices.last().unwrap().head(&hidden).unwrap()
}

fn assert_same_bits(expected: &[f32], got: &[f32], what: &str) {
    assert_eq!(expected.len(), got.len(), "{what}: lengths differ");
    assert!(expected.iter().zip(got).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: logits differ");
}

/// Overwrites the bytes of metadata key `key`'s value (after its type id) in the file.
fn patch_value(path: &Path, key: &str, value: &[u8]) {
    let mut bytes = std::fs::read(path).unwrap();
    let mut encoded = (key.len() as u64).to_le_bytes().to_vec();
    encoded.extend_from_slice(key.as_bytes());
    let at = bytes.windows(encoded.len()).position(|w| w == encoded).unwrap_or_else(|| panic!("{key} not in {}", path.display()));
    let value_at = at + encoded.len() + 4;
    bytes[value_at..value_at + value.len()].copy_from_slice(value);
    std::fs::write(path, bytes).unwrap();
}

fn error_of(path: &Path) -> String {
    GgufModel::open(path).unwrap_err().to_string()
}

#[test]
fn a_split_model_loads_as_the_whole_file() {
    let fixture = Fixture::new("load");
    assert_eq!(fixture.parts.len(), PARTS);
    assert_eq!(fixture.parts[0], fixture.dir.join("model-00001-of-00003.gguf"));
    assert_eq!(fixture.parts[2], split_part_path(&fixture.dir.join("model"), 2, PARTS));

    // The split is real: every part holds some of the tensors, only the first the model's
    // metadata, and no part's tensors are another's.
    let whole = header(&fixture.whole);
    let headers: Vec<Content> = fixture.parts.iter().map(|p| header(p)).collect();
    assert!(headers.iter().all(|h| !h.tensor_infos.is_empty() && h.tensor_infos.len() < whole.tensor_infos.len()));
    assert_eq!(headers.iter().map(|h| h.tensor_infos.len()).sum::<usize>(), whole.tensor_infos.len());
    assert!(headers[0].metadata.contains_key("general.architecture"));
    assert!(headers[1..].iter().all(|h| !h.metadata.contains_key("general.architecture")));

    let model = GgufModel::open(&fixture.parts[0]).unwrap();
    assert_eq!(model.parts().len(), PARTS);
    assert_eq!(model.tensor_count(), whole.tensor_infos.len());
    assert_eq!(model.path(), fixture.parts[0]);
    let single = GgufModel::open(&fixture.whole).unwrap();
    assert_eq!(single.parts().len(), 1);
    for (name, tensor) in single.tensors() {
        let split = model.tensor(name).unwrap_or_else(|| panic!("`{name}` missing from the split"));
        assert_eq!((split.dtype, &split.dims, split.bytes()), (tensor.dtype, &tensor.dims, tensor.bytes()), "{name}");
        assert!(headers[split.part].tensor_infos.contains_key(name), "{name} is located in the wrong part");
    }

    // The same profile, whichever part is named.
    let (expected, _) = ModelProfile::from_path(&fixture.whole).unwrap();
    for part in &fixture.parts {
        let (profile, first_header) = ModelProfile::from_path(part).unwrap();
        assert_eq!(format!("{profile:?}"), format!("{expected:?}"), "profile through {}", part.display());
        assert!(first_header.metadata.contains_key("general.architecture"), "the first part's header");
    }

    // Bit-identical logits: the whole model from the split, and two stages each reading their
    // own tensors out of several parts.
    let backend = Backend::cpu(1);
    let reference = logits(&[ModelSlice::load(&fixture.whole, 0..N_LAYERS, backend.clone()).unwrap()]);
    assert!(reference.iter().all(|l| l.is_finite()));
    for part in [&fixture.parts[0], &fixture.parts[2]] {
        let got = logits(&[ModelSlice::load(part, 0..N_LAYERS, backend.clone()).unwrap()]);
        assert_same_bits(&reference, &got, &format!("whole model through {}", part.display()));
    }
    let stages = [
        ModelSlice::load(&fixture.parts[1], 0..2, backend.clone()).unwrap(),
        ModelSlice::load(&fixture.parts[0], 2..N_LAYERS, backend.clone()).unwrap(),
    ];
    assert_same_bits(&reference, &logits(&stages), "two stages from the split");
}

#[test]
fn a_file_is_split_by_its_metadata_not_its_name() {
    let fixture = Fixture::new("name");
    let lookalike = fixture.dir.join("single-00001-of-00002.gguf");
    std::fs::copy(&fixture.whole, &lookalike).unwrap();
    assert_eq!(GgufModel::open(&lookalike).unwrap().parts().len(), 1);

    // A part renamed away from the pattern: its siblings cannot be found, and the error says so.
    let renamed = fixture.dir.join("renamed.gguf");
    std::fs::copy(&fixture.parts[0], &renamed).unwrap();
    let error = error_of(&renamed);
    assert!(error.contains("renamed.gguf") && error.contains("-00001-of-00003.gguf"), "{error}");
}

#[test]
fn a_missing_part_is_named() {
    let fixture = Fixture::new("missing");
    std::fs::remove_file(&fixture.parts[1]).unwrap();
    for given in [&fixture.parts[0], &fixture.parts[2]] {
        let error = error_of(given);
        assert!(error.contains("model-00002-of-00003.gguf"), "{error}");
        assert!(error.contains("is missing") && error.contains("all 3"), "{error}");
    }
    let error = ModelSlice::load(&fixture.parts[0], 0..N_LAYERS, Backend::cpu(1)).err().unwrap().to_string();
    assert!(error.contains("model-00002-of-00003.gguf"), "{error}");
}

#[test]
fn parts_of_different_splits_are_refused() {
    // A part that says it is one of 4.
    let fixture = Fixture::new("count");
    patch_value(&fixture.parts[2], SPLIT_COUNT_KEY, &4u16.to_le_bytes());
    let error = error_of(&fixture.parts[0]);
    assert!(error.contains("model-00003-of-00003.gguf") && error.contains("split.count is 4"), "{error}");
    // Named as part 3 of 3, it says part 3 of 4.
    let error = error_of(&fixture.parts[2]);
    assert!(error.contains("part 3 of 4"), "{error}");
    drop(fixture);

    // A tensor total other than `split.tensors.count`.
    let fixture = Fixture::new("total");
    let total = header(&fixture.whole).tensor_infos.len() as i32;
    patch_value(&fixture.parts[0], SPLIT_TENSORS_COUNT_KEY, &(total + 1).to_le_bytes());
    let error = error_of(&fixture.parts[1]);
    assert!(error.contains(&format!("split.tensors.count is {}", total + 1)), "{error}");
    drop(fixture);

    // The same tensor in two parts: rename a block tensor of the last part to its block-0
    // twin, which the first part holds (same length, so the header stays well formed).
    let fixture = Fixture::new("duplicate");
    let first = header(&fixture.parts[0]);
    let last = header(&fixture.parts[PARTS - 1]);
    let (name, twin) = last
        .tensor_infos
        .keys()
        .filter_map(|name| {
            let rest = name.strip_prefix("blk.")?.split_once('.')?.1;
            let twin = format!("blk.0.{rest}");
            (twin.len() == name.len() && first.tensor_infos.contains_key(&twin)).then(|| (name.clone(), twin))
        })
        .next()
        .expect("the last part holds a block tensor whose block-0 twin is in the first part");
    let mut bytes = std::fs::read(&fixture.parts[PARTS - 1]).unwrap();
    let at = bytes.windows(name.len()).position(|w| w == name.as_bytes()).unwrap();
    bytes[at..at + name.len()].copy_from_slice(twin.as_bytes());
    std::fs::write(&fixture.parts[PARTS - 1], bytes).unwrap();
    let error = error_of(&fixture.parts[0]);
    assert!(error.contains(&format!("`{twin}` is in both")), "{error}");
    assert!(error.contains("model-00001-of-00003.gguf") && error.contains("model-00003-of-00003.gguf"), "{error}");
}
