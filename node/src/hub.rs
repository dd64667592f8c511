//! Models by name: `hf:ORG/REPO[/FILE.gguf]` or `hf:ORG/REPO:QUANT` from the Hugging Face hub,
//! and `ollama:NAME[:TAG]` from the store of a local Ollama.
//!
//! **The hub.** What `huggingface_hub` and llama.cpp do, over the hub's documented HTTP API:
//! the file list comes from `GET {endpoint}/api/models/{repo}/revision/{rev}` (`siblings`);
//! a file's identity from `HEAD {endpoint}/{repo}/resolve/{rev}/{file}` without following
//! the redirect (`X-Linked-Etag`: the LFS object's sha256; `X-Linked-Size`); its bytes from
//! the same URL, following the redirect to the file store, with `Range: bytes=N-` to resume
//! a partial download. The file lands in `{cache}/hub/{org}--{repo}/`, checked against the
//! sha256 before it is renamed into place, so a cached file is always a verified one and a
//! later start needs no network. `HF_TOKEN` is sent as a bearer token (gated and private
//! repositories answer 401 or 403 without one); `HF_ENDPOINT` points elsewhere (a mirror, or
//! the test's local server).
//!
//! **Ollama.** A pulled model is a manifest (`manifests/{host}/{namespace}/{name}/{tag}`, JSON)
//! whose layer of media type `application/vnd.ollama.image.model` names a blob
//! (`blobs/sha256-{hex}`): that blob is the GGUF, served where it lies, never copied.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The hub's address unless `HF_ENDPOINT` says otherwise.
pub const HF_ENDPOINT_DEFAULT: &str = "https://huggingface.co";
/// The quantization picked when a repository holds several and none is named (llama.cpp's
/// default too): the usual best size for quality.
pub const QUANT_DEFAULT: &str = "Q4_K_M";
/// How long a connection may take to open, and a read may stall, before the download is
/// given up (and can be resumed).
const CONNECT_TIMEOUT_S: u64 = 30;
const READ_TIMEOUT_S: u64 = 120;
/// Largest file list read from the hub (a repository of a thousand files is ~100 KiB).
const FILE_LIST_BYTES_MAX: u64 = 16 << 20;

/// `hf:` as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    /// `ORG/REPO`.
    pub repo: String,
    /// A file named in the repository (`ORG/REPO/FILE.gguf`).
    pub file: Option<String>,
    /// A quantization to pick among the repository's files (`ORG/REPO:Q8_0`).
    pub quant: Option<String>,
    pub revision: String,
}

impl HubModel {
    /// Parses what follows `hf:`: `ORG/REPO`, `ORG/REPO:QUANT`, `ORG/REPO/FILE.gguf` (the file
    /// may sit in folders), each optionally `@REVISION` after the repository.
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = || anyhow::anyhow!("`hf:{spec}` is not a hub model: write hf:ORG/REPO, hf:ORG/REPO:QUANT or hf:ORG/REPO/FILE.gguf");
        let mut parts = spec.splitn(3, '/');
        let (org, rest) = (parts.next().ok_or_else(bad)?, parts.next().ok_or_else(bad)?);
        let file = parts.next().map(str::to_string);
        let (rest, quant) = match (rest.split_once(':'), &file) {
            (Some((repo, quant)), None) => (repo, Some(quant.to_string())),
            (Some(_), Some(_)) => return Err(bad()),
            (None, _) => (rest, None),
        };
        let (name, revision) = rest.split_once('@').unwrap_or((rest, "main"));
        let valid = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !valid(org) || !valid(name) || !valid(revision) || quant.as_deref().is_some_and(|q| !valid(q)) {
            return Err(bad());
        }
        if let Some(f) = &file {
            if !f.ends_with(".gguf") || f.split('/').any(|p| p.is_empty() || p == "..") {
                bail!("`hf:{spec}`: the file must be a .gguf path inside the repository");
            }
        }
        Ok(Self { repo: format!("{org}/{name}"), file, quant, revision: revision.to_string() })
    }
}

/// The GGUF files to fetch from a repository's file list: the named quantization's (all
/// parts of a split file, in order), or [`QUANT_DEFAULT`]'s, or the only GGUF there is.
pub fn pick_files(siblings: &[String], quant: Option<&str>) -> Result<Vec<String>, String> {
    let ggufs: Vec<&String> = siblings.iter().filter(|s| s.ends_with(".gguf") && !is_projector(s)).collect();
    if ggufs.is_empty() {
        return Err("the repository holds no .gguf file".into());
    }
    let matching = |q: &str| -> Vec<String> {
        let q = q.to_ascii_lowercase();
        ggufs
            .iter()
            .filter(|s| {
                let name = s.rsplit('/').next().unwrap_or(s).to_ascii_lowercase();
                // A whole token of the name: Q4_K matches `-Q4_K.gguf`, not `-Q4_K_M.gguf`.
                name.split(['-', '.']).any(|t| t == q) || s.to_ascii_lowercase().split('/').any(|d| d == q)
            })
            .map(|s| s.to_string())
            .collect()
    };
    let mut chosen = match quant {
        Some(q) => matching(q),
        None if ggufs.len() == 1 => vec![ggufs[0].clone()],
        None => matching(QUANT_DEFAULT),
    };
    if chosen.is_empty() {
        let names: Vec<&str> = ggufs.iter().map(|s| s.as_str()).collect();
        let what = quant.map_or(format!("several GGUFs and none is {QUANT_DEFAULT}: name one as hf:ORG/REPO:QUANT"), |q| format!("no {q} file"));
        return Err(format!("{what}; the repository holds {}", names.join(", ")));
    }
    chosen.sort();
    // One model: a single file, or the parts of one split file.
    let first = chosen[0].clone();
    if let Some(stem) = split_stem(&first) {
        chosen.retain(|c| split_stem(c).as_deref() == Some(stem.as_str()));
    } else {
        chosen.truncate(1);
    }
    Ok(chosen)
}

/// Vision projectors (`mmproj-*.gguf`) are not models on their own.
fn is_projector(name: &str) -> bool {
    name.rsplit('/').next().is_some_and(|n| n.to_ascii_lowercase().starts_with("mmproj"))
}

/// `NAME` of `NAME-00001-of-00003.gguf`.
fn split_stem(name: &str) -> Option<String> {
    let stem = name.strip_suffix(".gguf")?;
    let (head, of) = stem.rsplit_once("-of-")?;
    let (base, index) = head.rsplit_once('-')?;
    (index.len() == 5 && of.len() == 5 && index.bytes().chain(of.bytes()).all(|b| b.is_ascii_digit())).then(|| base.to_string())
}

/// Where the hub is and who asks.
#[derive(Debug, Clone)]
pub struct HubClient {
    pub endpoint: String,
    pub token: Option<String>,
    /// Downloads land in `{cache}/hub/{org}--{repo}/`.
    pub cache: PathBuf,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

impl HubClient {
    /// `HF_ENDPOINT`, `HF_TOKEN`, and potluck's cache directory.
    pub fn from_env() -> Result<Self> {
        let endpoint = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()).unwrap_or_else(|| HF_ENDPOINT_DEFAULT.into());
        let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
        Ok(Self { endpoint: endpoint.trim_end_matches('/').to_string(), token, cache: crate::model::cache_dir()?, progress: true })
    }

    fn agent(&self, follow_redirects: bool) -> ureq::Agent {
        ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(CONNECT_TIMEOUT_S)))
            .timeout_recv_body(Some(Duration::from_secs(READ_TIMEOUT_S)))
            .max_redirects(if follow_redirects { 10 } else { 0 })
            .http_status_as_error(false)
            .user_agent(concat!("potluck/", env!("CARGO_PKG_VERSION")))
            .build()
            .into()
    }

    fn authorized<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(token) => request.header("Authorization", format!("Bearer {token}")),
            None => request,
        }
    }

    /// The model's first (or only) file on this machine, downloading what is missing. A
    /// file already in the cache is used without asking the hub.
    pub fn fetch(&self, model: &HubModel) -> Result<PathBuf> {
        let dir = self.cache.join("hub").join(model.repo.replace('/', "--"));
        let files = match &model.file {
            Some(file) => vec![file.clone()],
            None => {
                if let Some(cached) = cached_choice(&dir, model.quant.as_deref()) {
                    return Ok(cached);
                }
                let siblings = self.list(model)?;
                pick_files(&siblings, model.quant.as_deref()).map_err(|e| anyhow::anyhow!("hf:{}: {e}", model.repo))?
            }
        };
        let files = match files.as_slice() {
            [one] if split_stem(one).is_some() => self.list(model).ok().and_then(|s| pick_split(&s, one)).unwrap_or(files),
            _ => files,
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut paths = Vec::new();
        for file in &files {
            paths.push(self.fetch_file(model, file, &dir)?);
        }
        Ok(paths.into_iter().next().expect("at least one file"))
    }

    /// The repository's file names at the revision.
    fn list(&self, model: &HubModel) -> Result<Vec<String>> {
        let url = format!("{}/api/models/{}/revision/{}", self.endpoint, model.repo, model.revision);
        let mut response = self
            .authorized(self.agent(true).get(&url))
            .call()
            .with_context(|| format!("cannot reach the hub at {}", self.endpoint))?;
        check_status(response.status().as_u16(), &model.repo, None, self.token.is_some())?;
        let text = response.body_mut().with_config().limit(FILE_LIST_BYTES_MAX).read_to_string().context("cannot read the hub's file list")?;
        let body: Value = serde_json::from_str(&text).context("the hub's file list is not JSON")?;
        let siblings = body["siblings"].as_array().context("the hub's answer lists no files (no `siblings`)")?;
        Ok(siblings.iter().filter_map(|s| s["rfilename"].as_str().map(str::to_string)).collect())
    }

    fn fetch_file(&self, model: &HubModel, file: &str, dir: &Path) -> Result<PathBuf> {
        let name = file.rsplit('/').next().unwrap_or(file);
        let path = dir.join(name);
        if path.is_file() {
            return Ok(path);
        }
        let url = format!("{}/{}/resolve/{}/{}", self.endpoint, model.repo, model.revision, file);
        // The file's identity, from the hub itself (not the file store it redirects to).
        let head = self
            .authorized(self.agent(false).head(&url))
            .call()
            .with_context(|| format!("cannot reach the hub at {}", self.endpoint))?;
        check_status(head.status().as_u16(), &model.repo, Some(file), self.token.is_some())?;
        let header = |name: &str| head.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let etag = header("x-linked-etag").or_else(|| header("etag")).unwrap_or_default();
        let sha256 = etag.trim_start_matches("W/").trim_matches('"').to_ascii_lowercase();
        let sha256 = (sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit())).then_some(sha256);
        let size: Option<u64> = header("x-linked-size").or_else(|| header("content-length")).and_then(|s| s.parse().ok());
        let partial = dir.join(format!("{name}.part"));
        let have = partial.metadata().map_or(0, |m| m.len());
        let mut request = self.authorized(self.agent(true).get(&url));
        if have > 0 {
            request = request.header("Range", format!("bytes={have}-"));
        }
        let mut response = request.call().with_context(|| format!("cannot download {file} from hf:{}", model.repo))?;
        let status = response.status().as_u16();
        check_status(status, &model.repo, Some(file), self.token.is_some())?;
        let resumed = status == 206 && have > 0;
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(resumed)
            .truncate(!resumed)
            .open(&partial)
            .with_context(|| format!("cannot write {}", partial.display()))?;
        let start = if resumed { have } else { 0 };
        let bar = self.progress.then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(size, indicatif::ProgressDrawTarget::stderr());
            bar.set_style(
                indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message(format!("hf:{} {name}{}", model.repo, if resumed { " (resumed)" } else { "" }));
            bar.set_position(start);
            bar
        });
        let mut reader = response.body_mut().with_config().limit(u64::MAX).reader();
        let mut buffer = vec![0u8; 1 << 20];
        let mut written = start;
        loop {
            let n = reader.read(&mut buffer).with_context(|| {
                format!("the download of {file} broke off after {written} bytes; run again to resume it")
            })?;
            if n == 0 {
                break;
            }
            out.write_all(&buffer[..n]).with_context(|| format!("cannot write {}", partial.display()))?;
            written += n as u64;
            if let Some(bar) = &bar {
                bar.set_position(written);
            }
        }
        out.sync_all().ok();
        drop(out);
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        if let Some(size) = size.filter(|&s| s != written) {
            bail!("the download of {file} ended at {written} of {size} bytes; run again to resume it");
        }
        if let Some(expected) = &sha256 {
            let got = crate::model::sha256_file(&partial)?;
            if &got != expected {
                let _ = std::fs::remove_file(&partial);
                bail!("{file} from hf:{} has sha256 {got}, the hub says {expected}: the download is corrupt and was deleted; run again", model.repo);
            }
        }
        std::fs::rename(&partial, &path).with_context(|| format!("cannot move the model into {}", path.display()))?;
        eprintln!(
            "potluck: hf:{} {name} downloaded ({written} bytes{}) into {}",
            model.repo,
            if sha256.is_some() { ", sha256 verified" } else { "" },
            path.display()
        );
        Ok(path)
    }
}

/// All parts of the split file `one` belongs to, from the repository's list.
fn pick_split(siblings: &[String], one: &str) -> Option<Vec<String>> {
    let stem = split_stem(one)?;
    let mut parts: Vec<String> = siblings.iter().filter(|s| split_stem(s).as_deref() == Some(stem.as_str())).cloned().collect();
    parts.sort();
    (!parts.is_empty()).then_some(parts)
}

/// A complete download of the quantization already in the cache (offline starts).
fn cached_choice(dir: &Path, quant: Option<&str>) -> Option<PathBuf> {
    let names: Vec<String> = std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    let first = pick_files(&names, quant).ok()?.into_iter().next()?;
    Some(dir.join(first))
}

/// The hub's refusals, said plainly.
fn check_status(status: u16, repo: &str, file: Option<&str>, have_token: bool) -> Result<()> {
    let what = file.map_or(format!("hf:{repo}"), |f| format!("{f} in hf:{repo}"));
    match status {
        200..=399 => Ok(()),
        401 | 403 if !have_token => bail!("{what} is gated or private: accept its terms on the hub and set HF_TOKEN to a token with access"),
        401 | 403 => bail!("{what}: the hub refused HF_TOKEN ({status}); check that the token is valid and has access to the repository"),
        404 => bail!("{what} does not exist (404): check the repository and file names"),
        416 => bail!("{what}: the hub refused to resume the download (416); delete the .part file and run again"),
        429 => bail!("{what}: the hub is rate-limiting this machine (429); wait and run again"),
        _ => bail!("{what}: the hub answered {status}"),
    }
}

/// `ollama:` as the user wrote it, resolved in the local Ollama store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OllamaModel {
    /// `registry.ollama.ai` unless the name says otherwise (`hf.co/org/repo`).
    pub host: String,
    pub namespace: String,
    pub name: String,
    pub tag: String,
}

impl OllamaModel {
    /// `NAME`, `NAME:TAG`, `NAMESPACE/NAME[:TAG]` or `HOST/NAMESPACE/NAME[:TAG]`, as `ollama
    /// pull` takes them.
    pub fn parse(spec: &str) -> Result<Self> {
        let (path, tag) = match spec.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') => (p, t),
            _ => (spec, "latest"),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (host, namespace, name) = match parts.as_slice() {
            [name] => ("registry.ollama.ai", "library".to_string(), *name),
            [namespace, name] => ("registry.ollama.ai", namespace.to_string(), *name),
            [host, rest @ .., name] if !rest.is_empty() => (*host, rest.join("/"), *name),
            _ => bail!("`ollama:{spec}` is not an Ollama model name"),
        };
        let valid = |s: &str| !s.is_empty() && s != ".." && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !valid(host) || !namespace.split('/').all(valid) || !valid(name) || !valid(tag) {
            bail!("`ollama:{spec}` is not an Ollama model name");
        }
        Ok(Self { host: host.to_string(), namespace, name: name.to_string(), tag: tag.to_string() })
    }

    /// The GGUF blob in `store` (Ollama's `models` directory), checked against the manifest's
    /// size (Ollama verified its digest when it pulled it).
    pub fn locate(&self, store: &Path) -> Result<PathBuf> {
        let manifest_path = store.join("manifests").join(&self.host).join(&self.namespace).join(&self.name).join(&self.tag);
        let text = match std::fs::read_to_string(&manifest_path) {
            Ok(text) => text,
            Err(_) => {
                let tags = std::fs::read_dir(manifest_path.parent().expect("a manifest has a folder"))
                    .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default();
                bail!(
                    "Ollama has no {}:{} in {} ({}); run `ollama pull {}:{}`",
                    self.name,
                    self.tag,
                    store.display(),
                    if tags.is_empty() { "no tag of that model".to_string() } else { format!("its tags: {tags}") },
                    self.name,
                    self.tag
                );
            }
        };
        let manifest: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", manifest_path.display()))?;
        let layer = manifest["layers"]
            .as_array()
            .and_then(|layers| layers.iter().find(|l| l["mediaType"] == "application/vnd.ollama.image.model"))
            .with_context(|| format!("{} names no model layer", manifest_path.display()))?;
        let digest = layer["digest"].as_str().unwrap_or_default();
        let hex = digest.strip_prefix("sha256:").filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        let hex = hex.with_context(|| format!("{}: the model layer's digest {digest:?} is not a sha256", manifest_path.display()))?;
        let blob = store.join("blobs").join(format!("sha256-{hex}"));
        let len = blob.metadata().with_context(|| format!("the model's blob {} is missing; run `ollama pull` again", blob.display()))?.len();
        if let Some(size) = layer["size"].as_u64().filter(|&s| s != len) {
            bail!("the model's blob {} holds {len} bytes, its manifest says {size}; run `ollama pull` again", blob.display());
        }
        Ok(blob)
    }
}

/// Ollama's store: `$OLLAMA_MODELS`, else `~/.ollama/models`, else the Linux service's
/// `/usr/share/ollama/.ollama/models`.
pub fn ollama_store() -> PathBuf {
    if let Some(dir) = std::env::var_os("OLLAMA_MODELS").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = dirs::home_dir().map(|h| h.join(".ollama/models"));
    match home {
        Some(h) if h.is_dir() => h,
        _ => {
            let service = PathBuf::from("/usr/share/ollama/.ollama/models");
            if service.is_dir() {
                service
            } else {
                home.unwrap_or(service)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_names_parse() {
        let m = HubModel::parse("bartowski/Llama-3.2-3B-Instruct-GGUF:Q8_0").unwrap();
        assert_eq!((m.repo.as_str(), m.quant.as_deref(), m.file, m.revision.as_str()), ("bartowski/Llama-3.2-3B-Instruct-GGUF", Some("Q8_0"), None, "main"));
        let m = HubModel::parse("org/repo@v2/sub/model-Q4_0.gguf").unwrap();
        assert_eq!((m.repo.as_str(), m.file.as_deref(), m.revision.as_str()), ("org/repo", Some("sub/model-Q4_0.gguf"), "v2"));
        for bad in ["", "org", "org/", "org/repo/../x.gguf", "org/repo/file.bin", "or g/repo", "org/repo:Q4/x.gguf"] {
            assert!(HubModel::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_quantization_picks_one_model() {
        let files: Vec<String> = ["README.md", "m-Q4_K.gguf", "m-Q4_K_M.gguf", "m-Q8_0.gguf", "mmproj-m-f16.gguf", "big/m-Q6_K-00002-of-00002.gguf", "big/m-Q6_K-00001-of-00002.gguf"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(pick_files(&files, Some("q8_0")).unwrap(), ["m-Q8_0.gguf"]);
        assert_eq!(pick_files(&files, Some("Q4_K")).unwrap(), ["m-Q4_K.gguf"], "a whole token, not a prefix");
        assert_eq!(pick_files(&files, None).unwrap(), ["m-Q4_K_M.gguf"], "the default");
        assert_eq!(pick_files(&files, Some("Q6_K")).unwrap(), ["big/m-Q6_K-00001-of-00002.gguf", "big/m-Q6_K-00002-of-00002.gguf"]);
        let error = pick_files(&files, Some("Q2_K")).unwrap_err();
        assert!(error.contains("no Q2_K file") && error.contains("m-Q8_0.gguf"), "{error}");
        assert_eq!(pick_files(&["only.gguf".to_string()], None).unwrap(), ["only.gguf"]);
        assert!(pick_files(&["a.txt".to_string()], None).is_err());
    }

    #[test]
    fn ollama_names_parse() {
        let m = OllamaModel::parse("llama3.2").unwrap();
        assert_eq!((m.host.as_str(), m.namespace.as_str(), m.name.as_str(), m.tag.as_str()), ("registry.ollama.ai", "library", "llama3.2", "latest"));
        let m = OllamaModel::parse("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M").unwrap();
        assert_eq!((m.host.as_str(), m.namespace.as_str(), m.name.as_str(), m.tag.as_str()), ("hf.co", "bartowski", "Llama-3.2-1B-Instruct-GGUF", "Q4_K_M"));
        assert!(OllamaModel::parse("../etc:passwd").is_err());
        assert!(OllamaModel::parse("").is_err());
    }
}
