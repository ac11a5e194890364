//! From what the user typed (`--model`) and the load format to where the model's files are.
//!
//! Rules, in order:
//! - a path ending in `.gguf` is a GGUF file and must exist;
//! - an existing directory must hold `config.json` (a Hugging Face model directory);
//! - with the dummy format, a path to a `config.json` file stands for its directory (only the
//!   config is needed);
//! - anything else that parses as `org/name[@revision]` and is not a local path goes to the hub
//!   ([`super::hub`]), fetching the whole checkpoint, or just the config (and tokenizer when
//!   present) for dummy weights.
//!
//! Errors name the path or id and say what was expected there. Resolution may download, so it
//! blocks: call it off the async runtime.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::hub::{HubFileSet, HubModelId, HubSettings, resolve_hub_model};
use crate::{Result, WorkerError};

/// Where a model's files are on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelLocation {
    /// A GGUF file: weights, config and tokenizer in one.
    Gguf(PathBuf),
    /// A Hugging Face directory: config.json, tokenizer files and (unless dummy) safetensors.
    HfDir(PathBuf),
}

/// How weights are loaded (`--load-format`, vLLM's names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadFormat {
    /// GGUF for `.gguf` paths, safetensors otherwise.
    #[default]
    Auto,
    Safetensors,
    Gguf,
    /// Random weights of the model's shape (config only).
    Dummy,
}

impl LoadFormat {
    /// Every format, in the order `--help` lists them.
    pub const ALL: [LoadFormat; 4] = [LoadFormat::Auto, LoadFormat::Safetensors, LoadFormat::Gguf, LoadFormat::Dummy];

    /// The lowercase name used in flags and config files.
    pub fn as_str(self) -> &'static str {
        match self {
            LoadFormat::Auto => "auto",
            LoadFormat::Safetensors => "safetensors",
            LoadFormat::Gguf => "gguf",
            LoadFormat::Dummy => "dummy",
        }
    }
}

impl fmt::Display for LoadFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LoadFormat {
    type Err = WorkerError;

    fn from_str(s: &str) -> Result<Self> {
        let wanted = s.trim().to_ascii_lowercase();
        LoadFormat::ALL.into_iter().find(|f| f.as_str() == wanted).ok_or_else(|| {
            let names: Vec<&str> = LoadFormat::ALL.iter().map(|f| f.as_str()).collect();
            WorkerError::invalid(
                "load_format",
                format!("unknown load format `{s}` (expected one of: {})", names.join(", ")),
            )
        })
    }
}

/// Resolves `source` for `load_format`, using the hub settings from the environment.
pub fn resolve_model(source: &str, load_format: LoadFormat) -> Result<ModelLocation> {
    resolve_model_with(source, load_format, &HubSettings::from_env())
}

/// [`resolve_model`] with explicit hub settings.
pub fn resolve_model_with(source: &str, load_format: LoadFormat, hub: &HubSettings) -> Result<ModelLocation> {
    let path = Path::new(source);
    let is_gguf_name = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if is_gguf_name {
        if load_format == LoadFormat::Safetensors {
            return Err(WorkerError::model_file(
                path,
                "is a GGUF file but the load format is safetensors (use --load-format gguf or auto)",
            ));
        }
        if !path.is_file() {
            let what = if path.exists() { "is not a regular file" } else { "does not exist" };
            return Err(WorkerError::model_file(path, format!("GGUF model file {what}")));
        }
        return Ok(ModelLocation::Gguf(path.to_path_buf()));
    }
    if load_format == LoadFormat::Gguf {
        return Err(WorkerError::model_file(
            path,
            "the load format is gguf, so the model must be a path to a .gguf file",
        ));
    }
    if path.is_dir() {
        return hf_dir(path, load_format);
    }
    if path.is_file() {
        return config_file(path, load_format);
    }
    if looks_local(source) {
        return Err(WorkerError::model_file(path, not_found_hint()));
    }
    let id = HubModelId::parse(source).map_err(|_| WorkerError::model_file(path, not_found_hint()))?;
    let files = if load_format == LoadFormat::Dummy { HubFileSet::ConfigOnly } else { HubFileSet::Full };
    resolve_hub_model(&id, files, hub).map(ModelLocation::HfDir)
}

/// An existing directory: must hold config.json.
fn hf_dir(dir: &Path, load_format: LoadFormat) -> Result<ModelLocation> {
    if dir.join("config.json").is_file() {
        return Ok(ModelLocation::HfDir(dir.to_path_buf()));
    }
    let gguf_hint = match single_gguf_in(dir) {
        Some(g) if load_format != LoadFormat::Safetensors => {
            format!("; it holds {}: pass that file's path instead", g.display())
        }
        _ => String::new(),
    };
    Err(WorkerError::model_file(
        dir,
        format!(
            "has no config.json (expected a Hugging Face model directory: config.json, tokenizer.json, *.safetensors){gguf_hint}"
        ),
    ))
}

/// An existing file that is not `.gguf`: only a config.json, and only for dummy weights.
fn config_file(path: &Path, load_format: LoadFormat) -> Result<ModelLocation> {
    let is_config = path.file_name().is_some_and(|n| n == "config.json");
    match (load_format, is_config) {
        (LoadFormat::Dummy, true) => {
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            Ok(ModelLocation::HfDir(dir.to_path_buf()))
        }
        (LoadFormat::Dummy, false) => Err(WorkerError::model_file(
            path,
            "dummy weights need a config.json file, or a directory or hub id that has one",
        )),
        _ => Err(WorkerError::model_file(
            path,
            "is a file, not a model: expected a .gguf file, a Hugging Face model directory or a hub id (org/name)",
        )),
    }
}

/// Whether `s` is plainly meant as a local path (so a miss is "no such file", not a hub lookup).
fn looks_local(s: &str) -> bool {
    s.starts_with('/')
        || s.starts_with("./")
        || s.starts_with("../")
        || s.starts_with('~')
        || s.contains('\\')
        || s.ends_with('/')
}

fn not_found_hint() -> &'static str {
    "no such file or directory (expected a .gguf file, a Hugging Face model directory, or a hub id org/name[@revision])"
}

/// The only `.gguf` file directly inside `dir`, if there is exactly one.
fn single_gguf_in(dir: &Path) -> Option<PathBuf> {
    let mut found = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")));
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offline_empty_cache(root: &Path) -> HubSettings {
        HubSettings { cache_dir: root.join("hub"), offline: true, token: None, endpoint: None }
    }

    #[test]
    fn load_format_parses_case_insensitively_and_rejects_unknown_names() {
        assert_eq!("Dummy".parse::<LoadFormat>().unwrap(), LoadFormat::Dummy);
        assert_eq!("safetensors".parse::<LoadFormat>().unwrap(), LoadFormat::Safetensors);
        let err = "pt".parse::<LoadFormat>().unwrap_err().to_string();
        assert!(err.contains("`pt`") && err.contains("auto, safetensors, gguf, dummy"), "{err}");
        assert_eq!(serde_json::to_string(&LoadFormat::Gguf).unwrap(), "\"gguf\"");
        assert_eq!(serde_json::from_str::<LoadFormat>("\"dummy\"").unwrap(), LoadFormat::Dummy);
    }

    #[test]
    fn gguf_paths_must_exist_and_match_the_format() {
        let tmp = tempfile::tempdir().unwrap();
        let hub = offline_empty_cache(tmp.path());
        let gguf = tmp.path().join("m.Q4_1.gguf");
        let missing = resolve_model_with(gguf.to_str().unwrap(), LoadFormat::Auto, &hub).unwrap_err().to_string();
        assert!(missing.contains("m.Q4_1.gguf") && missing.contains("does not exist"), "{missing}");
        std::fs::write(&gguf, b"GGUF").unwrap();
        assert_eq!(
            resolve_model_with(gguf.to_str().unwrap(), LoadFormat::Gguf, &hub).unwrap(),
            ModelLocation::Gguf(gguf.clone())
        );
        assert!(resolve_model_with(gguf.to_str().unwrap(), LoadFormat::Safetensors, &hub).is_err());
        // A directory under the gguf format is refused with the reason.
        let err = resolve_model_with(tmp.path().to_str().unwrap(), LoadFormat::Gguf, &hub).unwrap_err().to_string();
        assert!(err.contains(".gguf"), "{err}");
    }

    #[test]
    fn directories_need_config_json_and_hint_at_a_lone_gguf() {
        let tmp = tempfile::tempdir().unwrap();
        let hub = offline_empty_cache(tmp.path());
        let dir = tmp.path().join("model");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("x.gguf"), b"GGUF").unwrap();
        let err = resolve_model_with(dir.to_str().unwrap(), LoadFormat::Auto, &hub).unwrap_err().to_string();
        assert!(err.contains("no config.json") && err.contains("x.gguf"), "{err}");
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        assert_eq!(
            resolve_model_with(dir.to_str().unwrap(), LoadFormat::Auto, &hub).unwrap(),
            ModelLocation::HfDir(dir.clone())
        );
    }

    #[test]
    fn dummy_accepts_a_config_json_path_and_other_formats_do_not() {
        let tmp = tempfile::tempdir().unwrap();
        let hub = offline_empty_cache(tmp.path());
        let config = tmp.path().join("config.json");
        std::fs::write(&config, "{}").unwrap();
        let got = resolve_model_with(config.to_str().unwrap(), LoadFormat::Dummy, &hub).unwrap();
        assert_eq!(got, ModelLocation::HfDir(tmp.path().to_path_buf()));
        assert!(resolve_model_with(config.to_str().unwrap(), LoadFormat::Auto, &hub).is_err());
        let other = tmp.path().join("llama.json");
        std::fs::write(&other, "{}").unwrap();
        assert!(resolve_model_with(other.to_str().unwrap(), LoadFormat::Dummy, &hub).is_err());
    }

    #[test]
    fn missing_local_paths_are_not_sent_to_the_hub() {
        let tmp = tempfile::tempdir().unwrap();
        let hub = offline_empty_cache(tmp.path());
        let err = resolve_model_with("./models/llama", LoadFormat::Auto, &hub).unwrap_err().to_string();
        assert!(err.contains("./models/llama") && err.contains("no such file or directory"), "{err}");
        // A bare id goes to the hub, which (offline, empty cache) says so.
        let err = resolve_model_with("meta-llama/Llama-3.1-8B", LoadFormat::Auto, &hub).unwrap_err().to_string();
        assert!(err.contains("meta-llama/Llama-3.1-8B") && err.contains("HF_HUB_OFFLINE"), "{err}");
    }
}
