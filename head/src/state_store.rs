//! The head's persisted state: the last applied serve config, so a restarted head comes back
//! with the applications it was running (Ray keeps this in the GCS; Lumen in a directory, e.g. a
//! Kubernetes persistent volume).
//!
//! Layout: `STATE_DIR/serve-config.json` holds one [`StoredServeConfig`]; `STATE_DIR/api-keys.json`
//! the named API keys last set (an `api_keys:` document with each key as its SHA-256, never the
//! key itself); `STATE_DIR/usage.json` the tenants' usage (`control/usage_store.rs`). Writes are atomic (a
//! temporary file in the same directory, flushed, then renamed over the old one), so a crash
//! mid-write leaves the previous config, never half a file. A file that cannot be parsed is an
//! error naming it: the head refuses to guess what it was meant to serve.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The name of the serve config file inside the state directory.
pub const SERVE_CONFIG_FILE: &str = "serve-config.json";

/// The name of the named API keys' file inside the state directory.
pub const API_KEYS_FILE: &str = "api-keys.json";

/// The name of the tenants' usage file inside the state directory.
pub const USAGE_FILE: &str = "usage.json";

/// The last applied serve config, as it was given, and when each application was deployed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredServeConfig {
    /// The serve config document exactly as it was applied (JSON).
    pub config: serde_json::Value,
    /// Unix seconds of the PUT (or start-up) that applied it.
    pub deployed_time_s: f64,
    /// Unix seconds each application was last (re)deployed: an application a later config left
    /// unchanged keeps its time.
    #[serde(default)]
    pub applications_deployed_time_s: BTreeMap<String, f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateStoreError {
    #[error("the state directory {path} cannot be used: {source}")]
    Directory { path: PathBuf, source: std::io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is corrupt ({reason}); fix or remove it, or start the head with --config")]
    Corrupt { path: PathBuf, reason: String },
}

/// A directory holding the head's persisted state.
#[derive(Clone, Debug)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// Opens `dir`, creating it (and its parents) if missing.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StateStoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| StateStoreError::Directory { path: dir.clone(), source })?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the serve config lives.
    pub fn serve_config_path(&self) -> PathBuf {
        self.dir.join(SERVE_CONFIG_FILE)
    }

    /// Where the named API keys live.
    pub fn api_keys_path(&self) -> PathBuf {
        self.dir.join(API_KEYS_FILE)
    }

    /// The last saved serve config; `None` if none was ever saved.
    pub fn load_serve_config(&self) -> Result<Option<StoredServeConfig>, StateStoreError> {
        load_json(self.serve_config_path())
    }

    /// Replaces the saved serve config atomically.
    pub fn save_serve_config(&self, stored: &StoredServeConfig) -> Result<(), StateStoreError> {
        save_json(self.serve_config_path(), stored)
    }

    /// The last saved named API keys (an `api_keys:` document of hashes); `None` if none were
    /// ever saved.
    pub fn load_api_keys(&self) -> Result<Option<serde_json::Value>, StateStoreError> {
        load_json(self.api_keys_path())
    }

    /// Replaces the saved named API keys atomically.
    pub fn save_api_keys(&self, document: &serde_json::Value) -> Result<(), StateStoreError> {
        save_json(self.api_keys_path(), document)
    }

    /// Where the tenants' usage lives.
    pub fn usage_path(&self) -> PathBuf {
        self.dir.join(USAGE_FILE)
    }

    /// The last saved usage (`{"usage": [rows]}`); `None` if none was ever saved.
    pub fn load_usage(&self) -> Result<Option<serde_json::Value>, StateStoreError> {
        load_json(self.usage_path())
    }

    /// Replaces the saved usage atomically.
    pub fn save_usage(&self, document: &serde_json::Value) -> Result<(), StateStoreError> {
        save_json(self.usage_path(), document)
    }

    /// Forgets the saved serve config (a missing file is fine).
    pub fn remove_serve_config(&self) -> Result<(), StateStoreError> {
        let path = self.serve_config_path();
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StateStoreError::Write { path, source: e }),
            _ => Ok(()),
        }
    }
}

fn load_json<T: serde::de::DeserializeOwned>(path: PathBuf) -> Result<Option<T>, StateStoreError> {
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateStoreError::Read { path, source }),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| StateStoreError::Corrupt { path, reason: e.to_string() })
}

fn save_json(path: PathBuf, value: &impl Serialize) -> Result<(), StateStoreError> {
    let text = serde_json::to_vec_pretty(value).map_err(|e| StateStoreError::Write {
        path: path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    write_atomically(&path, &text).map_err(|source| StateStoreError::Write { path, source })
}

/// Writes `bytes` to a temporary sibling of `path`, flushes it to disk, and renames it over
/// `path`; the temporary file is removed if anything fails.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // Make the rename itself durable; not every platform lets a directory be opened and synced.
    if let Some(dir) = path.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(apps: &[&str]) -> StoredServeConfig {
        let applications: Vec<serde_json::Value> = apps
            .iter()
            .map(
                |name| serde_json::json!({"name": name, "deployments": [{"name": "d", "model": {"source": "m.gguf"}}]}),
            )
            .collect();
        StoredServeConfig {
            config: serde_json::json!({ "applications": applications }),
            deployed_time_s: 1_700_000_000.5,
            applications_deployed_time_s: apps.iter().map(|a| (a.to_string(), 1_700_000_000.5)).collect(),
        }
    }

    #[test]
    fn a_saved_config_loads_back_unchanged_and_replaces_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        assert_eq!(store.load_serve_config().unwrap(), None);
        store.save_serve_config(&stored(&["a", "b"])).unwrap();
        store.save_serve_config(&stored(&["c"])).unwrap();
        assert_eq!(store.load_serve_config().unwrap(), Some(stored(&["c"])));
        // Only the config file is left: no temporary files.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [SERVE_CONFIG_FILE]);
        store.remove_serve_config().unwrap();
        assert_eq!(store.load_serve_config().unwrap(), None);
        store.remove_serve_config().unwrap();
    }

    #[test]
    fn a_missing_directory_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b/state");
        let store = StateStore::open(&nested).unwrap();
        store.save_serve_config(&stored(&["a"])).unwrap();
        assert!(nested.join(SERVE_CONFIG_FILE).is_file());
        assert_eq!(StateStore::open(&nested).unwrap().load_serve_config().unwrap(), Some(stored(&["a"])));
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        std::fs::write(store.serve_config_path(), "{\"config\": {\"applications\": [").unwrap();
        let err = store.load_serve_config().unwrap_err();
        assert!(matches!(err, StateStoreError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains(&store.serve_config_path().display().to_string()), "{err}");
    }

    #[test]
    fn a_directory_that_cannot_be_created_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").unwrap();
        let err = StateStore::open(file.join("state")).unwrap_err();
        assert!(err.to_string().contains("not-a-dir"), "{err}");
    }
}
