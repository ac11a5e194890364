//! Hugging Face hub ids (`org/name`, optionally `@revision`) resolved to a local snapshot
//! directory that holds `config.json`, the tokenizer files and the safetensors weights.
//!
//! Contract:
//! - The local cache is read first, in the layout every Hugging Face client shares:
//!   `<cache>/models--org--name/refs/<revision>` holds a commit hash and
//!   `<cache>/models--org--name/snapshots/<commit>/` the files (usually symlinks into `blobs/`; a
//!   dangling link counts as missing). A revision that is a 40-hex commit needs no ref.
//! - A snapshot is complete when it has every file of its [`HubFileSet`]; for weights that means
//!   `model.safetensors`, or `model.safetensors.index.json` and every shard its `weight_map` names.
//! - When incomplete and not offline, the missing files are downloaded with `hf-hub` (blocking:
//!   call [`resolve_hub_model`] off the async runtime, e.g. in `spawn_blocking`), with progress in
//!   `tracing` logs. Offline (`HF_HUB_OFFLINE=1`), an incomplete snapshot is an error listing the
//!   missing files.
//! - Every error names the repository, the file when there is one, and what to do about it.
//! - Only [`HubSettings::from_env`] reads environment variables; everything else takes the cache
//!   root and settings as parameters (tests run in parallel threads).

use std::ffi::OsString;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hf_hub::progress::{DownloadEvent, FileStatus, ProgressEvent, ProgressHandler};
use hf_hub::{HFClient, HFError};

use super::safetensors::{INDEX_FILE, SINGLE_FILE};
use crate::{Result, WorkerError};

/// The branch used when an id names no revision.
pub const DEFAULT_REVISION: &str = "main";

/// A model repository on the hub and the revision wanted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubModelId {
    /// `org/name`.
    pub repo: String,
    /// A branch, tag or commit; `None` means `main`.
    pub revision: Option<String>,
}

impl HubModelId {
    /// Parses `org/name` or `org/name@revision`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| WorkerError::Hub(format!("`{s}` is not a hub model id (org/name[@revision]): {why}"));
        let (repo, revision) = match s.split_once('@') {
            Some((repo, rev)) => (repo, Some(rev)),
            None => (s, None),
        };
        let (org, name) = repo.split_once('/').ok_or_else(|| bad("expected exactly one `/`"))?;
        for part in [org, name] {
            let ok_chars = part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if part.is_empty() || !ok_chars || part.starts_with('.') || part.contains("..") || part.contains("--") {
                return Err(bad("names use letters, digits, `-`, `_` and `.`"));
            }
        }
        if let Some(rev) = revision {
            let ok = !rev.is_empty() && Path::new(rev).components().all(|c| matches!(c, Component::Normal(_)));
            if !ok {
                return Err(bad("the revision must be a branch, tag or commit"));
            }
        }
        Ok(HubModelId { repo: repo.to_string(), revision: revision.map(str::to_string) })
    }

    /// The revision, `main` when none was given.
    pub fn revision_or_main(&self) -> &str {
        self.revision.as_deref().unwrap_or(DEFAULT_REVISION)
    }

    /// The repository's folder in the cache: `models--org--name`.
    pub fn cache_folder(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }
}

impl fmt::Display for HubModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.revision {
            Some(rev) => write!(f, "{}@{rev}", self.repo),
            None => f.write_str(&self.repo),
        }
    }
}

/// Which files a snapshot must hold to be usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HubFileSet {
    /// config.json, tokenizer.json, tokenizer_config.json and the safetensors weights.
    Full,
    /// config.json only (dummy weights); tokenizer files are fetched when available.
    ConfigOnly,
}

impl HubFileSet {
    fn required(self) -> &'static [&'static str] {
        match self {
            HubFileSet::Full => &["config.json", "tokenizer.json", "tokenizer_config.json"],
            HubFileSet::ConfigOnly => &["config.json"],
        }
    }

    /// Files fetched when the repo has them, never required.
    fn optional(self) -> &'static [&'static str] {
        match self {
            HubFileSet::Full => &["generation_config.json", "special_tokens_map.json"],
            HubFileSet::ConfigOnly => {
                &["tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"]
            }
        }
    }
}

/// Where the cache is, whether the network may be used, and the token to use.
#[derive(Clone, Default)]
pub struct HubSettings {
    pub cache_dir: PathBuf,
    pub offline: bool,
    pub token: Option<String>,
    /// Hub base URL; `None` lets hf-hub pick (`HF_ENDPOINT` or <https://huggingface.co>).
    pub endpoint: Option<String>,
}

impl HubSettings {
    /// Reads `HF_HUB_CACHE`, `HF_HOME`, `HOME`, `HF_HUB_OFFLINE`, `HF_TOKEN` /
    /// `HUGGING_FACE_HUB_TOKEN` and `HF_ENDPOINT`.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let text = |k: &str| var(k).and_then(|v| v.into_string().ok());
        HubSettings {
            cache_dir: hub_cache_dir(var("HF_HUB_CACHE"), var("HF_HOME"), var("HOME")),
            offline: text("HF_HUB_OFFLINE").is_some_and(|v| is_truthy(&v)),
            token: text("HF_TOKEN").or_else(|| text("HUGGING_FACE_HUB_TOKEN")),
            endpoint: text("HF_ENDPOINT"),
        }
    }
}

/// Debug output never shows the token.
impl fmt::Debug for HubSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubSettings")
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$HOME/.cache/huggingface/hub`.
pub fn hub_cache_dir(hf_hub_cache: Option<OsString>, hf_home: Option<OsString>, home: Option<OsString>) -> PathBuf {
    if let Some(dir) = hf_hub_cache {
        return PathBuf::from(dir);
    }
    if let Some(dir) = hf_home {
        return PathBuf::from(dir).join("hub");
    }
    PathBuf::from(home.unwrap_or_else(|| "/tmp".into())).join(".cache/huggingface/hub")
}

fn is_truthy(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

/// What the local cache holds for one id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheStatus {
    /// The snapshot directory the revision points at, when the cache knows the revision.
    pub snapshot: Option<PathBuf>,
    /// Files the snapshot lacks (all of them when there is no snapshot).
    pub missing: Vec<String>,
}

impl CacheStatus {
    /// The snapshot directory when nothing is missing.
    pub fn complete(&self) -> Option<&Path> {
        if self.missing.is_empty() { self.snapshot.as_deref() } else { None }
    }
}

/// Looks `id` up in the cache rooted at `cache_dir` without touching the network.
pub fn check_cache(cache_dir: &Path, id: &HubModelId, files: HubFileSet) -> Result<CacheStatus> {
    let repo_dir = cache_dir.join(id.cache_folder());
    let revision = id.revision_or_main();
    let ref_path = repo_dir.join("refs").join(revision);
    let commit = match std::fs::read_to_string(&ref_path) {
        Ok(text) => Some(text.trim().to_string()),
        Err(_) if is_commit_hash(revision) => Some(revision.to_string()),
        Err(_) => None,
    };
    let snapshot = commit
        .filter(|c| !c.is_empty() && Path::new(c).components().all(|p| matches!(p, Component::Normal(_))))
        .map(|c| repo_dir.join("snapshots").join(c))
        .filter(|dir| dir.is_dir());
    let missing = match &snapshot {
        Some(dir) => missing_files(dir, files)?,
        None => {
            let mut all: Vec<String> = files.required().iter().map(|f| f.to_string()).collect();
            if files == HubFileSet::Full {
                all.push(format!("{SINGLE_FILE} (or {INDEX_FILE} and its shards)"));
            }
            all
        }
    };
    Ok(CacheStatus { snapshot, missing })
}

/// The files of `files` that `dir` lacks; an unreadable index is an error naming it.
fn missing_files(dir: &Path, files: HubFileSet) -> Result<Vec<String>> {
    let mut missing: Vec<String> =
        files.required().iter().filter(|f| !dir.join(f).is_file()).map(|f| f.to_string()).collect();
    if files == HubFileSet::Full {
        if dir.join(INDEX_FILE).is_file() {
            missing.extend(index_shards(&dir.join(INDEX_FILE))?.into_iter().filter(|s| !dir.join(s).is_file()));
        } else if !dir.join(SINGLE_FILE).is_file() {
            missing.push(format!("{SINGLE_FILE} (or {INDEX_FILE} and its shards)"));
        }
    }
    Ok(missing)
}

/// The distinct shard file names of a safetensors index, sorted.
fn index_shards(index: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let text =
        std::fs::read_to_string(index).map_err(|e| WorkerError::model_file(index, format!("cannot read: {e}")))?;
    let parsed: Index = serde_json::from_str(&text).map_err(|e| {
        WorkerError::model_file(index, format!("not a valid safetensors index (needs a `weight_map` object): {e}"))
    })?;
    let mut shards: Vec<String> = parsed.weight_map.into_values().collect();
    shards.sort();
    shards.dedup();
    if let Some(bad) = shards.iter().find(|s| !Path::new(s).components().all(|c| matches!(c, Component::Normal(_)))) {
        return Err(WorkerError::model_file(index, format!("shard name `{bad}` is not a file inside the repository")));
    }
    Ok(shards)
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Resolves `id` to a complete local snapshot, downloading what the cache lacks unless offline.
/// Blocking.
pub fn resolve_hub_model(id: &HubModelId, files: HubFileSet, settings: &HubSettings) -> Result<PathBuf> {
    let status = check_cache(&settings.cache_dir, id, files)?;
    if let Some(dir) = status.complete() {
        tracing::info!(model = %id, snapshot = %dir.display(), "using cached hub snapshot");
        return Ok(dir.to_path_buf());
    }
    if settings.offline {
        let where_ = match &status.snapshot {
            Some(dir) => format!("the cached snapshot {} is incomplete", dir.display()),
            None => format!("not in the local cache {}", settings.cache_dir.display()),
        };
        return Err(WorkerError::Hub(format!(
            "{id}: {where_} and HF_HUB_OFFLINE=1; missing: {}. Unset HF_HUB_OFFLINE to download, or fetch it first \
             (`huggingface-cli download {}`)",
            status.missing.join(", "),
            id.repo
        )));
    }
    tracing::info!(model = %id, missing = %status.missing.join(", "), cache = %settings.cache_dir.display(), "downloading from the hub");
    download(id, files, settings)
}

/// Downloads every file of `files` for `id` into the cache and returns the snapshot directory.
fn download(id: &HubModelId, files: HubFileSet, settings: &HubSettings) -> Result<PathBuf> {
    let mut builder = HFClient::builder().cache_dir(&settings.cache_dir);
    if let Some(token) = &settings.token {
        builder = builder.token(token.clone());
    }
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.endpoint(endpoint.clone());
    }
    let client =
        builder.build_sync().map_err(|e| WorkerError::Hub(format!("{id}: cannot create the hub client: {e}")))?;
    let (org, name) = hf_hub::split_id(&id.repo);
    let repo = client.model(org, name);
    let fetch = |file: &str| -> std::result::Result<PathBuf, HFError> {
        repo.download_file().filename(file).revision(id.revision_or_main()).progress(LogProgress::new(&id.repo)).send()
    };
    let fetch_required = |file: &str| fetch(file).map_err(|e| hub_error(id, file, e));

    let config = fetch_required("config.json")?;
    let snapshot = config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| WorkerError::Hub(format!("{id}: odd cache path {}", config.display())))?;
    for file in files.required().iter().filter(|f| **f != "config.json") {
        fetch_required(file)?;
    }
    for file in files.optional() {
        match fetch(file) {
            Ok(_) | Err(HFError::EntryNotFound { .. }) => {}
            Err(e) => return Err(hub_error(id, file, e)),
        }
    }
    if files == HubFileSet::Full {
        match fetch(INDEX_FILE) {
            Ok(index) => {
                for shard in index_shards(&index)? {
                    fetch_required(&shard)?;
                }
            }
            Err(HFError::EntryNotFound { .. }) => {
                fetch_required(SINGLE_FILE)?;
            }
            Err(e) => return Err(hub_error(id, INDEX_FILE, e)),
        }
    }
    let missing = missing_files(&snapshot, files)?;
    if !missing.is_empty() {
        return Err(WorkerError::Hub(format!(
            "{id}: downloaded into {}, but it still lacks {} (the revision may have moved during the download; retry)",
            snapshot.display(),
            missing.join(", ")
        )));
    }
    tracing::info!(model = %id, snapshot = %snapshot.display(), "hub download complete");
    Ok(snapshot)
}

/// Turns an hf-hub error into a message naming repo, file and the fix.
fn hub_error(id: &HubModelId, file: &str, e: HFError) -> WorkerError {
    let advice = match &e {
        HFError::AuthRequired { .. } => "authentication required: set HF_TOKEN to a token with read access \
                                         (gated models also need their license accepted on huggingface.co)"
            .to_string(),
        HFError::Forbidden { .. } => {
            "access denied: request access on the model's page on huggingface.co and make sure \
                                      HF_TOKEN belongs to an account that has it"
                .to_string()
        }
        HFError::RepoNotFound { .. } => {
            "repository not found (check the spelling; private or gated repos also need HF_TOKEN)".to_string()
        }
        HFError::RevisionNotFound { revision, .. } => format!("revision `{revision}` does not exist"),
        HFError::EntryNotFound { .. } => {
            "the repository has no such file (is it a safetensors Llama checkpoint?)".to_string()
        }
        HFError::Request { source, .. } => format!(
            "cannot reach the hub ({source}); check the network or proxy, or set HF_HUB_OFFLINE=1 to use only the local cache"
        ),
        HFError::RateLimited { .. } => format!("rate limited by the hub ({e}); retry later or set HF_TOKEN"),
        _ => e.to_string(),
    };
    WorkerError::Hub(format!("{id}: {file}: {advice}"))
}

/// Logs download progress through `tracing`: a line when a file starts, at most one every
/// few seconds while bytes flow, and one when it completes.
struct LogProgress {
    repo: String,
    state: Mutex<ProgressState>,
}

struct ProgressState {
    last_log: Instant,
}

const LOG_EVERY: Duration = Duration::from_secs(5);

impl LogProgress {
    fn new(repo: &str) -> Self {
        LogProgress { repo: repo.to_string(), state: Mutex::new(ProgressState { last_log: Instant::now() }) }
    }

    /// Whether enough time has passed since the last periodic line (and, if so, resets the clock).
    fn due(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.last_log.elapsed() >= LOG_EVERY {
            state.last_log = Instant::now();
            true
        } else {
            false
        }
    }
}

impl ProgressHandler for LogProgress {
    fn on_progress(&self, event: &ProgressEvent) {
        let ProgressEvent::Download(event) = event else {
            return;
        };
        match event {
            DownloadEvent::Start { total_files, total_bytes } if *total_bytes > 0 => {
                tracing::info!(repo = %self.repo, files = total_files, bytes = total_bytes, "download started ({})", human_bytes(*total_bytes));
            }
            DownloadEvent::Progress { files } => {
                for f in files {
                    if f.status == FileStatus::Complete && f.total_bytes > 0 {
                        tracing::info!(repo = %self.repo, file = %f.filename, bytes = f.total_bytes, "downloaded {}", human_bytes(f.total_bytes));
                    } else if f.status == FileStatus::InProgress && f.total_bytes > 0 && self.due() {
                        log_fraction(&self.repo, &f.filename, f.bytes_completed, f.total_bytes);
                    }
                }
            }
            DownloadEvent::AggregateProgress { bytes_completed, total_bytes, .. } if *total_bytes > 0 && self.due() => {
                log_fraction(&self.repo, "(xet batch)", *bytes_completed, *total_bytes);
            }
            _ => {}
        }
    }
}

fn log_fraction(repo: &str, file: &str, done: u64, total: u64) {
    let pct = done as f64 * 100.0 / total as f64;
    tracing::info!(repo = %repo, file = %file, bytes = done, total, "downloading: {} / {} ({pct:.1}%)", human_bytes(done), human_bytes(total));
}

fn human_bytes(n: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let n = n as f64;
    if n >= GIB { format!("{:.2} GiB", n / GIB) } else { format!("{:.1} MiB", n / MIB) }
}

// Cache-layout resolution is tested in `tests/model_loading_hub.rs` on caches built in temp dirs.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_with_and_without_revision() {
        let id = HubModelId::parse("deepseek-ai/DeepSeek-R1-Distill-Llama-8B").unwrap();
        assert_eq!((id.repo.as_str(), id.revision_or_main()), ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "main"));
        assert_eq!(id.cache_folder(), "models--deepseek-ai--DeepSeek-R1-Distill-Llama-8B");
        let id = HubModelId::parse("HuggingFaceTB/SmolLM2-135M-Instruct@refs/pr/3").unwrap();
        assert_eq!(id.revision.as_deref(), Some("refs/pr/3"));
        assert_eq!(id.to_string(), "HuggingFaceTB/SmolLM2-135M-Instruct@refs/pr/3");
    }

    #[test]
    fn rejects_things_that_are_not_hub_ids() {
        for bad in
            ["gpt2", "a/b/c", "org/", "/abs/path", "../x", "org/name@", "org/name@../../etc", "org/na me", "./model"]
        {
            assert!(HubModelId::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn cache_dir_prefers_hf_hub_cache_then_hf_home_then_home() {
        let p = |s: &str| Some(OsString::from(s));
        assert_eq!(hub_cache_dir(p("/c"), p("/h"), p("/home/u")), PathBuf::from("/c"));
        assert_eq!(hub_cache_dir(None, p("/h"), p("/home/u")), PathBuf::from("/h/hub"));
        assert_eq!(hub_cache_dir(None, None, p("/home/u")), PathBuf::from("/home/u/.cache/huggingface/hub"));
    }

    #[test]
    fn offline_flag_accepts_the_usual_spellings() {
        assert!(["1", "true", "YES", "on "].iter().all(|v| is_truthy(v)));
        assert!(!["0", "false", "", "no"].iter().any(|v| is_truthy(v)));
    }
}
