//! A model's GGUF, whole or split into parts: what every reader of a model file opens.
//!
//! Large models are published split by llama.cpp's `llama-gguf-split` into
//! `<prefix>-00001-of-0000N.gguf` … `<prefix>-0000N-of-0000N.gguf`. Each part is a complete
//! GGUF (its own header, tensor infos and data section, its tensors' offsets relative to its
//! own data start) carrying `split.no` (0-based), `split.count` and `split.tensors.count`;
//! the first part also carries the model's metadata (architecture, hyperparameters,
//! tokenizer), later parts little besides `split.*`. [`GgufModel::open`] reads every part's
//! header and merges the tensor infos into one map of name → [`GgufTensor`] (the part, and
//! the absolute offset in that part's file), so the profile, the engine's file source and
//! the coordinator's weight server see one model, and none of them can add one part's offset
//! to another part's data start. A file that is not split is a model of one part.
//!
//! **Which path:** any part's path opens the whole model: the others are found by name
//! ([`split_part_path`], as llama.cpp's `llama_split_path` builds it) in the same directory.
//! Whether a file is split is its metadata's say (`split.count` > 1), never its name's.
//!
//! **Refusals** ([`EngineError::BadSplitGguf`], naming the file): a missing part (all N are
//! needed, in one directory), a part whose name does not follow the pattern (the others
//! could not be found), a part whose `split.no` / `split.count` disagree with its name or
//! with the other parts, a tensor named in two parts, and a tensor total other than
//! `split.tensors.count`. Each is a download gone wrong or parts of two splits mixed; loading
//! anyway would run another model than the one published, or fail later with an error that
//! no longer says which file is at fault.
//!
//! [`write_split`] writes a split as `llama-gguf-split` lays it out, for tests and tools.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;

use crate::error::{EngineError, Result};
use crate::profile::{tensor_size_in_bytes, value_to_u64};
use crate::quant::dtype::ggml_dtype_id;
use crate::random_gguf::{put_string, put_value, value_type_id};

/// The most parts a split model may have. `split.count` is a u16, but a published split has
/// tens of parts (Hugging Face caps a file at 50 GB, so a 1 TB model needs about 20), and a
/// [`crate::source::GgufFileSource`] keeps every part open: 512 stays well under the usual
/// soft limit of 1024 open files while leaving room for any real model.
pub const SPLIT_PARTS_MAX: u16 = 512;

/// `split.no`: the part's 0-based index (u16).
pub const SPLIT_NO_KEY: &str = "split.no";
/// `split.count`: how many parts the model has (u16).
pub const SPLIT_COUNT_KEY: &str = "split.count";
/// `split.tensors.count`: tensors over all parts (i32).
pub const SPLIT_TENSORS_COUNT_KEY: &str = "split.tensors.count";

/// GGUF's alignment when `general.alignment` is absent (`GGUF_DEFAULT_ALIGNMENT` in ggml).
const GGUF_DEFAULT_ALIGNMENT_BYTES: u64 = 32;

/// One file of a model: its path, its length when opened and its parsed header.
#[derive(Debug)]
pub struct GgufPart {
    path: PathBuf,
    file_bytes: u64,
    content: Content,
}

impl GgufPart {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length when it was opened.
    pub fn file_bytes(&self) -> u64 {
        self.file_bytes
    }

    /// Bytes before this part's tensor data (header, tensor infos, alignment padding).
    pub fn header_bytes(&self) -> u64 {
        self.content.tensor_data_offset
    }

    /// The part's own header: its metadata and its tensors only.
    pub fn content(&self) -> &Content {
        &self.content
    }
}

/// Where one tensor lies, whichever part holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensor {
    /// Index into [`GgufModel::parts`].
    pub part: usize,
    /// Absolute offset of the tensor's data in that part's file.
    pub offset: u64,
    pub dtype: GgmlDType,
    /// Dimensions as candle reports them, outermost first (e.g. `[n_out, n_in]`).
    pub dims: Vec<usize>,
}

impl GgufTensor {
    pub fn elem_count(&self) -> usize {
        self.dims.iter().product()
    }

    /// Bytes of the tensor in its block format (whole blocks only: see
    /// [`tensor_size_in_bytes`]).
    pub fn bytes(&self) -> u64 {
        tensor_size_in_bytes(self.dtype, self.elem_count())
    }
}

/// A model's GGUF: one file, or every part of a split (see the module docs).
#[derive(Debug)]
pub struct GgufModel {
    /// In `split.no` order; the first carries the model's metadata.
    parts: Vec<GgufPart>,
    tensors: HashMap<String, GgufTensor>,
}

impl GgufModel {
    /// Reads the header of the GGUF at `path` and, when it is one part of a split, the headers
    /// of all the others. Reads no tensor data.
    pub fn open(path: &Path) -> Result<Self> {
        let given = read_part(path)?;
        let count = split_value(&given, SPLIT_COUNT_KEY)?.unwrap_or(1);
        if count <= 1 {
            return Self::merge(vec![given]);
        }
        let bad = |message: String| EngineError::BadSplitGguf(format!("{}: {message}", path.display()));
        if count > u64::from(SPLIT_PARTS_MAX) {
            return Err(bad(format!("{SPLIT_COUNT_KEY} is {count}; at most {SPLIT_PARTS_MAX} parts are supported")));
        }
        let count = count as usize;
        let index = split_value(&given, SPLIT_NO_KEY)?
            .ok_or_else(|| bad(format!("{SPLIT_COUNT_KEY} is {count} but {SPLIT_NO_KEY} is missing")))?;
        if index >= count as u64 {
            return Err(bad(format!("{SPLIT_NO_KEY} is {index}, past the {count} parts of {SPLIT_COUNT_KEY}")));
        }
        let index = index as usize;
        let Some((prefix, named_number, named_count)) = parse_split_name(path) else {
            return Err(bad(format!(
                "this is part {} of a model split in {count} parts, but its name does not end in \
                 `-{:05}-of-{count:05}.gguf` as llama-gguf-split names the parts, so the others cannot be found: \
                 give the parts the names llama-gguf-split gave them",
                index + 1,
                index + 1,
            )));
        };
        if (named_number, named_count) != (index + 1, count) {
            return Err(bad(format!(
                "the name says part {named_number} of {named_count}, the metadata part {} of {count}: \
                 was a part renamed?",
                index + 1
            )));
        }
        let mut given = Some(given);
        let mut parts = Vec::with_capacity(count);
        for part_index in 0..count {
            let part = if part_index == index {
                given.take().expect("the given part is taken once")
            } else {
                let part_path = split_part_path(&prefix, part_index, count);
                let part = match read_part(&part_path) {
                    Err(EngineError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                        let dir = part_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
                        return Err(EngineError::BadSplitGguf(format!(
                            "part {} of {count}, {}, is missing: a model split in {count} parts needs all {count} of them \
                             in the same directory ({}), with the names llama-gguf-split gave them",
                            part_index + 1,
                            part_path.display(),
                            dir.display(),
                        )));
                    }
                    Err(EngineError::Io(e)) => {
                        return Err(EngineError::BadSplitGguf(format!("cannot read {}: {e}", part_path.display())))
                    }
                    other => other?,
                };
                check_part(&part, part_index, count)?;
                part
            };
            parts.push(part);
        }
        Self::merge(parts)
    }

    /// One map of every part's tensors, with absolute offsets; refuses a name found twice and,
    /// for a split, a total other than the first part's `split.tensors.count`.
    fn merge(parts: Vec<GgufPart>) -> Result<Self> {
        let total: usize = parts.iter().map(|p| p.content.tensor_infos.len()).sum();
        let mut tensors: HashMap<String, GgufTensor> = HashMap::with_capacity(total);
        for (index, part) in parts.iter().enumerate() {
            for (name, info) in &part.content.tensor_infos {
                let offset = part.content.tensor_data_offset.checked_add(info.offset).ok_or_else(|| {
                    EngineError::BadGguf(format!("{}: tensor `{name}` has an offset past any file", part.path.display()))
                })?;
                let tensor = GgufTensor { part: index, offset, dtype: info.ggml_dtype, dims: info.shape.dims().to_vec() };
                if let Some(earlier) = tensors.get(name) {
                    return Err(EngineError::BadSplitGguf(format!(
                        "tensor `{name}` is in both {} and {}: these parts are not of one split",
                        parts[earlier.part].path.display(),
                        part.path.display()
                    )));
                }
                tensors.insert(name.clone(), tensor);
            }
        }
        if parts.len() > 1 {
            if let Some(expected) = split_value(&parts[0], SPLIT_TENSORS_COUNT_KEY)? {
                if expected != total as u64 {
                    return Err(EngineError::BadSplitGguf(format!(
                        "{}: {SPLIT_TENSORS_COUNT_KEY} is {expected}, but the {} parts hold {total} tensors: \
                         these parts are not of one split",
                        parts[0].path.display(),
                        parts.len()
                    )));
                }
            }
        }
        Ok(Self { parts, tensors })
    }

    /// The first part's path: the name of the model.
    pub fn path(&self) -> &Path {
        &self.parts[0].path
    }

    /// The model's metadata (the first part's: later parts carry little besides `split.*`).
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.parts[0].content.metadata
    }

    /// Every file of the model, in `split.no` order (one for a model that is not split).
    pub fn parts(&self) -> &[GgufPart] {
        &self.parts
    }

    /// Every tensor of every part, in no particular order.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &GgufTensor)> {
        self.tensors.iter().map(|(name, tensor)| (name.as_str(), tensor))
    }

    /// Where tensor `name` lies, if the model has it.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.get(name)
    }

    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// The first part's header, which carries the model's metadata (tokenizer, chat
    /// template); its `tensor_infos` are the first part's tensors only.
    pub fn into_first_header(mut self) -> Content {
        self.parts.swap_remove(0).content
    }
}

/// The path of part `index` (0-based) of `count`: `<prefix>-%05d-of-%05d.gguf`, numbered from
/// 1, as `llama_split_path` in llama.cpp builds it.
pub fn split_part_path(prefix: &Path, index: usize, count: usize) -> PathBuf {
    let mut name = prefix.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!("-{:05}-of-{count:05}.gguf", index + 1));
    prefix.with_file_name(name)
}

/// `<prefix>-NNNNN-of-MMMMM.gguf` → (`<prefix>` with its directory, NNNNN, MMMMM).
fn parse_split_name(path: &Path) -> Option<(PathBuf, usize, usize)> {
    let name = path.file_name()?.to_str()?;
    let (rest, count) = name.strip_suffix(".gguf")?.rsplit_once("-of-")?;
    let (prefix, number) = rest.rsplit_once('-')?;
    let digits = |s: &str| s.len() >= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if prefix.is_empty() || !digits(number) || !digits(count) {
        return None;
    }
    Some((path.with_file_name(prefix), number.parse().ok()?, count.parse().ok()?))
}

fn read_part(path: &Path) -> Result<GgufPart> {
    let mut file = std::fs::File::open(path)?;
    let file_bytes = file.metadata()?.len();
    let content = Content::read(&mut file).map_err(|e| {
        // candle stops at the first tensor of a type it has no block format for, with
        // "unknown dtype for tensor N" (N the ggml type id): say which type that is and
        // what the engine runs instead.
        let message = e.to_string();
        let unknown = message.lines().next().and_then(|line| line.strip_prefix("unknown dtype for tensor "));
        match unknown.and_then(|id| id.trim().parse::<u32>().ok()) {
            Some(id) => EngineError::UnsupportedTensorType {
                tensor: format!("a tensor of {}", path.display()),
                dtype: crate::quant::dtype::unloadable_ggml_type_name(id).map_or(format!("ggml type {id}"), |n| format!("{n} (ggml type {id})")),
            },
            None => EngineError::BadGguf(format!("{}: {message}", path.display())),
        }
    })?;
    Ok(GgufPart { path: path.to_owned(), file_bytes, content })
}

/// A `split.*` value as an integer; `None` when absent.
fn split_value(part: &GgufPart, key: &str) -> Result<Option<u64>> {
    match part.content.metadata.get(key) {
        None => Ok(None),
        Some(value) => value_to_u64(value).map(Some).ok_or_else(|| {
            EngineError::BadSplitGguf(format!("{}: {key} is not a non-negative integer", part.path.display()))
        }),
    }
}

/// Part `index` of `count` must say so itself.
fn check_part(part: &GgufPart, index: usize, count: usize) -> Result<()> {
    let says_count = split_value(part, SPLIT_COUNT_KEY)?;
    let says_index = split_value(part, SPLIT_NO_KEY)?;
    if says_count != Some(count as u64) {
        return Err(EngineError::BadSplitGguf(format!(
            "{}: {SPLIT_COUNT_KEY} is {}, but the other parts say {count}: these parts are not of one split",
            part.path.display(),
            says_count.map_or_else(|| "missing".to_owned(), |c| c.to_string()),
        )));
    }
    if says_index != Some(index as u64) {
        return Err(EngineError::BadSplitGguf(format!(
            "{}: {SPLIT_NO_KEY} is {}, but its name makes it part {} (split.no {index})",
            part.path.display(),
            says_index.map_or_else(|| "missing".to_owned(), |c| c.to_string()),
            index + 1,
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Writing a split
// ---------------------------------------------------------------------------------------------

/// Splits the (unsplit) GGUF at `source` into `parts` files named by [`split_part_path`] from
/// `prefix`, as `llama-gguf-split --split-max-tensors` lays them out: the tensors in file
/// order, in `parts` runs of near-equal count; every metadata key in the first part; each
/// part with `split.no` (u16), `split.count` (u16) and `split.tensors.count` (i32), and
/// `general.alignment` where the source has it. Tensor bytes are copied unchanged. Returns
/// the parts' paths, first to last.
pub fn write_split(source: &Path, prefix: &Path, parts: usize) -> Result<Vec<PathBuf>> {
    let mut file = std::fs::File::open(source)?;
    let content =
        Content::read(&mut file).map_err(|e| EngineError::BadGguf(format!("{}: {e}", source.display())))?;
    if content.metadata.contains_key(SPLIT_COUNT_KEY) {
        return Err(EngineError::BadSplitGguf(format!("{}: is already a split part", source.display())));
    }
    let mut tensors: Vec<(&String, &candle_core::quantized::gguf_file::TensorInfo)> =
        content.tensor_infos.iter().collect();
    tensors.sort_by_key(|(_, info)| info.offset);
    if parts == 0 || parts > tensors.len() || parts > usize::from(SPLIT_PARTS_MAX) {
        return Err(EngineError::BadSplitGguf(format!(
            "cannot split {} tensors into {parts} parts (1..={SPLIT_PARTS_MAX}, at most one per tensor)",
            tensors.len()
        )));
    }
    let alignment = content.metadata.get("general.alignment").and_then(value_to_u64).unwrap_or(GGUF_DEFAULT_ALIGNMENT_BYTES);
    let total = i32::try_from(tensors.len()).map_err(|_| EngineError::BadSplitGguf("too many tensors".into()))?;
    let mut paths = Vec::with_capacity(parts);
    for index in 0..parts {
        let run = &tensors[index * tensors.len() / parts..(index + 1) * tensors.len() / parts];
        let mut metadata: BTreeMap<&str, Value> = BTreeMap::new();
        if index == 0 {
            metadata.extend(content.metadata.iter().map(|(k, v)| (k.as_str(), v.clone())));
        } else if let Some(value) = content.metadata.get("general.alignment") {
            metadata.insert("general.alignment", value.clone());
        }
        metadata.insert(SPLIT_NO_KEY, Value::U16(index as u16));
        metadata.insert(SPLIT_COUNT_KEY, Value::U16(parts as u16));
        metadata.insert(SPLIT_TENSORS_COUNT_KEY, Value::I32(total));

        let mut header = Vec::new();
        header.extend_from_slice(b"GGUF");
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(run.len() as u64).to_le_bytes());
        header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in &metadata {
            put_string(&mut header, key);
            header.extend_from_slice(&value_type_id(value).to_le_bytes());
            put_value(&mut header, key, value)?;
        }
        let mut offset = 0u64;
        for (name, info) in run {
            put_string(&mut header, name);
            let dims = info.shape.dims();
            header.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            // GGUF lists dimensions innermost first; candle reports them outermost first.
            for &dim in dims.iter().rev() {
                header.extend_from_slice(&(dim as u64).to_le_bytes());
            }
            header.extend_from_slice(&ggml_dtype_id(info.ggml_dtype).to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset += tensor_size_in_bytes(info.ggml_dtype, info.shape.elem_count()).next_multiple_of(alignment);
        }

        let path = split_part_path(prefix, index, parts);
        let mut out = BufWriter::new(std::fs::File::create(&path)?);
        out.write_all(&header)?;
        let mut position = header.len() as u64;
        for (name, info) in run {
            position = pad_to(&mut out, position, alignment)?;
            let bytes = tensor_size_in_bytes(info.ggml_dtype, info.shape.elem_count());
            file.seek(SeekFrom::Start(content.tensor_data_offset + info.offset))?;
            let copied = std::io::copy(&mut (&mut file).take(bytes), &mut out)?;
            if copied != bytes {
                return Err(EngineError::BadGguf(format!("{}: tensor `{name}` is truncated", source.display())));
            }
            position += bytes;
        }
        pad_to(&mut out, position, alignment)?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        paths.push(path);
    }
    Ok(paths)
}

/// Zero bytes up to the next multiple of `alignment`; returns the new position.
fn pad_to(out: &mut impl Write, position: u64, alignment: u64) -> Result<u64> {
    let aligned = position.next_multiple_of(alignment);
    out.write_all(&vec![0u8; (aligned - position) as usize])?;
    Ok(aligned)
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names_follow_llama_gguf_split() {
        let prefix = Path::new("/models/big");
        assert_eq!(split_part_path(prefix, 0, 3), Path::new("/models/big-00001-of-00003.gguf"));
        assert_eq!(
            parse_split_name(Path::new("/models/big-00002-of-00003.gguf")),
            Some((prefix.to_owned(), 2, 3))
        );
        assert_eq!(parse_split_name(Path::new("big-7-of-00003.gguf")), None);
        assert_eq!(parse_split_name(Path::new("big.gguf")), None);
        assert_eq!(parse_split_name(Path::new("-00001-of-00003.gguf")), None);
        assert_eq!(parse_split_name(Path::new("big-00001-of-00003.bin")), None);
    }
}
