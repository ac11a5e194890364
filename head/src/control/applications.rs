//! The serve config in force: parsing a config document, applying it to the cluster and to the
//! OpenAI API's per-model options, remembering it (with deploy times) for the status document,
//! and persisting it in the [`StateStore`].
//!
//! Invariants:
//! - Applying is serialized by one lock (never held across an `.await`): the persisted file, the
//!   cluster's deployments and the API's model options always describe the same config.
//! - The file is written before the cluster changes; if the cluster then refuses the deployments
//!   the previous file is put back, so a restart never restores a config that was refused.
//! - A document is fully validated (shape, field types, names, plans) before anything changes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde_json::Value;

use super::status::{self, AppliedApplication, ServeStatus};
use crate::api::ApiState;
use crate::api::edge::keys::{self, KeyEntry, KeysError};
use crate::cluster::{Cluster, ClusterError, ClusterSnapshot, Deployment};
use crate::config::{self, ConfigError, ServeConfig};
use crate::plan::{DeploymentPlan, plans_from_config};
use crate::state_store::{StateStore, StateStoreError, StoredServeConfig};

/// A serve config as given (YAML on disk, JSON over REST), validated, with its deployments.
#[derive(Clone, Debug)]
pub struct ServeDocument {
    raw: Value,
    config: ServeConfig,
    plans: Vec<DeploymentPlan>,
}

impl ServeDocument {
    /// Validates `raw` ([`ServeConfig::from_value`]: every rule, the first broken one named by
    /// its field's path) and plans its deployments.
    pub fn from_value(raw: Value) -> Result<Self, ConfigError> {
        let config = ServeConfig::from_value(&raw)?;
        let plans = plans_from_config(&config)?;
        Ok(Self { raw, config, plans })
    }

    /// Parses YAML (JSON is YAML too).
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        Self::from_value(config::parse_yaml(text)?)
    }

    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        Self::from_value(config::parse_json(text)?)
    }

    /// No applications (what `DELETE /api/serve/applications/` applies).
    pub fn empty() -> Self {
        Self { raw: serde_json::json!({ "applications": [] }), config: ServeConfig::default(), plans: Vec::new() }
    }

    /// The document as given.
    pub fn raw(&self) -> &Value {
        &self.raw
    }

    pub fn config(&self) -> &ServeConfig {
        &self.config
    }

    pub fn plans(&self) -> &[DeploymentPlan] {
        &self.plans
    }

    /// The application `name` as given.
    fn raw_application(&self, name: &str) -> Option<&Value> {
        self.raw["applications"].as_array()?.iter().find(|app| app["name"] == name)
    }
}

/// Why a config could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The config itself is wrong (the message names the field).
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// The cluster refused the deployments it describes.
    #[error("serve config: {0}")]
    Refused(#[from] ClusterError),
    /// The state directory could not be read or written.
    #[error(transparent)]
    Store(#[from] StateStoreError),
    /// The named API keys were refused (the message names the field).
    #[error(transparent)]
    Keys(#[from] KeysError),
}

/// Where the named API keys a head started with came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeysOrigin {
    /// `--api-keys-file` or the `--config` file's section (now also persisted).
    Given,
    /// The state directory's last saved keys.
    Restored,
    /// Neither: no named keys.
    None,
}

/// Where the deployments a head started with came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartingPoint {
    /// The `--config` file (now also persisted).
    ConfigFile,
    /// The state directory's last applied config.
    Restored,
    /// Neither: the fallback deployments (`lumen serve --model`), or none.
    Fallback,
}

/// The serve config in force and the cluster and API it drives. Cheap to clone.
#[derive(Clone)]
pub struct Applications {
    inner: Arc<Inner>,
}

struct Inner {
    cluster: Cluster,
    api: ApiState,
    store: Option<StateStore>,
    applied: Mutex<Applied>,
}

#[derive(Default)]
struct Applied {
    /// `None` while the deployments did not come from a serve config (`lumen serve --model`).
    current: Option<Current>,
    /// Deployments removed by an apply, listed as `DELETING` until their replicas are gone.
    removed: Vec<Deployment>,
}

struct Current {
    document: ServeDocument,
    deployed_time_s: f64,
    applications_deployed_time_s: BTreeMap<String, f64>,
}

impl Current {
    fn stored(&self) -> StoredServeConfig {
        StoredServeConfig {
            config: self.document.raw.clone(),
            deployed_time_s: self.deployed_time_s,
            applications_deployed_time_s: self.applications_deployed_time_s.clone(),
        }
    }
}

impl Applications {
    /// `store`: where applied configs are persisted (`--state-dir`); `None` keeps them in memory.
    pub fn new(cluster: Cluster, api: ApiState, store: Option<StateStore>) -> Self {
        Self { inner: Arc::new(Inner { cluster, api, store, applied: Mutex::default() }) }
    }

    /// The OpenAI API these applications configure (its models' options, its API keys).
    pub fn api(&self) -> &ApiState {
        &self.inner.api
    }

    pub fn cluster(&self) -> &Cluster {
        &self.inner.cluster
    }

    /// What a head deploys at start: `config` (the `--config` file) is applied and persisted, as
    /// the source of truth; without it the state directory's last applied config is restored;
    /// without either, `fallback` is deployed (and not persisted: it is not a serve config).
    pub fn initialize(
        &self,
        config: Option<ServeDocument>,
        fallback: Vec<DeploymentPlan>,
    ) -> Result<StartingPoint, ApplyError> {
        if let Some(document) = config {
            self.apply(document)?;
            return Ok(StartingPoint::ConfigFile);
        }
        let stored = match &self.inner.store {
            Some(store) => store.load_serve_config()?,
            None => None,
        };
        match stored {
            Some(stored) => {
                self.restore(stored)?;
                Ok(StartingPoint::Restored)
            }
            None => {
                let mut applied = self.lock();
                self.install(&mut applied, &fallback)?;
                applied.current = None;
                Ok(StartingPoint::Fallback)
            }
        }
    }

    /// The named API keys a head starts with: `given` (the keys file or the `--config` file's
    /// section) replaces them and is persisted, as the source of truth; without it the state
    /// directory's last saved keys are restored.
    pub fn initialize_keys(&self, given: Option<Vec<KeyEntry>>) -> Result<KeysOrigin, ApplyError> {
        if let Some(named) = given {
            self.replace_keys(named)?;
            return Ok(KeysOrigin::Given);
        }
        let Some(store) = &self.inner.store else { return Ok(KeysOrigin::None) };
        let Some(document) = store.load_api_keys()? else { return Ok(KeysOrigin::None) };
        let named = keys::parse(&document)
            .map_err(|e| StateStoreError::Corrupt { path: store.api_keys_path(), reason: e.to_string() })?;
        self.inner.api.keys().replace(named)?;
        Ok(KeysOrigin::Restored)
    }

    /// Replaces the named API keys, live, and persists them (as their hashes) in the state
    /// directory. Refused, changing nothing, as [`crate::api::edge::keys::Keys::replace`]
    /// refuses; a table the directory cannot take is not applied either.
    pub fn replace_keys(&self, named: Vec<KeyEntry>) -> Result<(), ApplyError> {
        let _applying = self.lock();
        self.replace_keys_locked(named)
    }

    /// [`Self::replace_keys`], the caller holding the lock.
    fn replace_keys_locked(&self, named: Vec<KeyEntry>) -> Result<(), ApplyError> {
        let keys = self.inner.api.keys();
        let before = keys.named_document();
        keys.replace(named)?;
        if let Some(store) = &self.inner.store
            && let Err(e) = store.save_api_keys(&keys.named_document())
        {
            let previous = keys::parse(&before).expect("the table in force reads back");
            keys.replace(previous)?;
            return Err(e.into());
        }
        Ok(())
    }

    /// Applies `document` (declarative: applications absent from it are removed) and persists it.
    pub fn apply(&self, document: ServeDocument) -> Result<(), ApplyError> {
        self.apply_locked(&mut self.lock(), document)
    }

    /// Applies `document` and, when a serve config carries an `api_keys:` section, replaces the
    /// named API keys with `named`, as one change: the keys are replaced (and persisted) first
    /// and put back when the document is then refused or cannot be persisted, so a refusal of
    /// either changes neither.
    pub fn apply_with_keys(&self, document: ServeDocument, named: Option<Vec<KeyEntry>>) -> Result<(), ApplyError> {
        let mut applied = self.lock();
        let Some(named) = named else { return self.apply_locked(&mut applied, document) };
        let before = self.inner.api.keys().named_document();
        self.replace_keys_locked(named)?;
        if let Err(refused) = self.apply_locked(&mut applied, document) {
            let previous = keys::parse(&before).expect("the table in force reads back");
            if let Err(e) = self.replace_keys_locked(previous) {
                tracing::error!(error = %e, "the serve config was refused and the API keys it replaced could not be put back");
            }
            return Err(refused);
        }
        Ok(())
    }

    /// [`Self::apply`], the caller holding the lock.
    fn apply_locked(&self, applied: &mut MutexGuard<'_, Applied>, document: ServeDocument) -> Result<(), ApplyError> {
        let now = crate::clock::since_epoch().as_secs_f64();
        // An application given exactly as before keeps its deploy time, as Ray's does.
        let applications_deployed_time_s = document
            .config
            .applications
            .iter()
            .map(|app| {
                let unchanged = applied.current.as_ref().and_then(|current| {
                    let before = current.document.raw_application(&app.name)?;
                    let time = current.applications_deployed_time_s.get(&app.name)?;
                    (Some(before) == document.raw_application(&app.name)).then_some(*time)
                });
                (app.name.clone(), unchanged.unwrap_or(now))
            })
            .collect();
        let next = Current { document, deployed_time_s: now, applications_deployed_time_s };
        if let Some(store) = &self.inner.store {
            store.save_serve_config(&next.stored())?;
        }
        if let Err(refused) = self.install(applied, &next.document.plans) {
            self.roll_back_store(applied);
            return Err(refused.into());
        }
        applied.current = Some(next);
        Ok(())
    }

    /// Removes every application (persisted as an empty config).
    pub fn delete_all(&self) -> Result<(), ApplyError> {
        self.apply(ServeDocument::empty())
    }

    /// Re-applies a persisted config without writing it again.
    fn restore(&self, stored: StoredServeConfig) -> Result<(), ApplyError> {
        let document = ServeDocument::from_value(stored.config)?;
        let mut applied = self.lock();
        self.install(&mut applied, &document.plans)?;
        // The workers that served them are likely still up and about to register again.
        self.inner.cluster.expect_workers_back();
        let applications_deployed_time_s = document
            .config
            .applications
            .iter()
            .map(|app| {
                let time = stored.applications_deployed_time_s.get(&app.name).copied();
                (app.name.clone(), time.unwrap_or(stored.deployed_time_s))
            })
            .collect();
        applied.current =
            Some(Current { document, deployed_time_s: stored.deployed_time_s, applications_deployed_time_s });
        Ok(())
    }

    /// Sets the cluster's deployments and the API's model options to `plans`, and remembers the
    /// deployments this removes. On error nothing changed.
    fn install(&self, applied: &mut Applied, plans: &[DeploymentPlan]) -> Result<(), ClusterError> {
        let cluster = &self.inner.cluster;
        let before = cluster.deployments();
        cluster.set_deployments(plans.iter().map(|p| p.deployment.clone()).collect())?;
        let models: HashMap<_, _> = plans.iter().map(|p| (p.deployment.model_name.clone(), p.api.clone())).collect();
        self.inner.api.set_models(models);
        let kept = |d: &Deployment| plans.iter().any(|p| p.deployment.name == d.name);
        applied.removed.retain(|d| !kept(d));
        for gone in before.into_iter().filter(|d| !kept(d)) {
            if !applied.removed.iter().any(|d| d.name == gone.name) {
                applied.removed.push(gone);
            }
        }
        forget_stopped(&mut applied.removed, &cluster.snapshot());
        Ok(())
    }

    /// Puts the previous config back on disk after the cluster refused a new one.
    fn roll_back_store(&self, applied: &Applied) {
        let Some(store) = &self.inner.store else { return };
        let restored = match &applied.current {
            Some(current) => store.save_serve_config(&current.stored()),
            None => store.remove_serve_config(),
        };
        if let Err(e) = restored {
            tracing::error!(error = %e, "could not restore the previous serve config after a refused apply");
        }
    }

    /// Ray's status document of every application, from a fresh cluster snapshot.
    pub fn status(&self) -> ServeStatus {
        let mut applied = self.lock();
        let snapshot = self.inner.cluster.snapshot();
        forget_stopped(&mut applied.removed, &snapshot);
        let applications: Vec<AppliedApplication> = applied
            .current
            .iter()
            .flat_map(|current| {
                current.document.config.applications.iter().map(|app| AppliedApplication {
                    name: app.name.clone(),
                    route_prefix: app.route_prefix.clone(),
                    config: current.document.raw_application(&app.name).cloned(),
                    deployed_time_s: current.applications_deployed_time_s.get(&app.name).copied(),
                    deployments: app.deployments.iter().map(|d| d.name.clone()).collect(),
                })
            })
            .collect();
        status::build(&snapshot, &applications, &applied.removed)
    }

    fn lock(&self) -> MutexGuard<'_, Applied> {
        // Every update leaves `Applied` consistent before anything can panic: keep serving.
        self.inner.applied.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Removed deployments are listed until the last of their replicas is gone.
fn forget_stopped(removed: &mut Vec<Deployment>, snapshot: &ClusterSnapshot) {
    removed.retain(|d| snapshot.replicas.iter().any(|r| r.deployment == d.name));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_type_error_names_the_field_by_its_path() {
        let err = ServeDocument::from_yaml(
            "applications:\n  - name: a\n    deployments:\n      - name: d\n        max_ongoing_requests: lots\n        model: {source: m.gguf}\n",
        )
        .unwrap_err();
        assert_eq!(err.field, "applications[0].deployments[0].max_ongoing_requests", "{err}");
    }

    #[test]
    fn the_document_keeps_fields_lumen_ignores() {
        let doc = ServeDocument::from_json(
            r#"{"applications": [{"name": "a", "runtime_env": {"pip": ["vllm"]}, "deployments": [{"name": "d", "model": {"source": "m.gguf"}}]}]}"#,
        )
        .unwrap();
        assert_eq!(doc.raw_application("a").unwrap()["runtime_env"]["pip"][0], "vllm");
        assert_eq!(doc.plans()[0].deployment.name, "a-d");
    }

    #[test]
    fn semantic_errors_are_found_before_anything_is_applied() {
        let unknown_parser = r#"{"applications": [{"name": "a", "deployments": [{"name": "d", "model": {"source": "m", "reasoning_parser": "nope"}}]}]}"#;
        assert!(ServeDocument::from_json(unknown_parser).unwrap_err().message.contains("nope"));
        assert!(ServeDocument::from_json("[1, 2]").is_err());
        assert!(ServeDocument::from_json("[]").is_err(), "a list is not a config with no applications");
        assert!(ServeDocument::from_yaml("applications: [").unwrap_err().message.contains("YAML"));
    }
}
