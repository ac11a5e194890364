//! Named API keys: the key table, its document (`api_keys:` in a keys file or a serve config),
//! and who a request is ([`Caller`]).
//!
//! A key belongs to a tenant (a name, the only thing metrics, logs and status pages show) and
//! carries the models it may use, its [`Limits`], a priority class and a weight. `--api-key` keys belong to
//! the tenant `default`, with every model and no limits.
//!
//! Contract: key material never leaves this module in the clear. A plaintext key is hashed
//! (SHA-256) as the document is read and then dropped; the table holds only hashes, and lookup
//! hashes the presented token and compares it with every entry's hash in constant time
//! ([`crate::secret`]). A key is shown only as its fingerprint (`sha256:` and the first 8 hex
//! digits of its hash). Documents are checked whole: a refused one changes nothing.
//!
//! Priority (vLLM's `priority`, lower runs first under `--scheduling-policy priority`): a key's
//! `priority` is what its requests get when they send none, and the best (lowest) they may ask
//! for: a lower value is raised to the key's.
//!
//! Weight: when requests wait at the head for a model's slot, tenants take turns in proportion to
//! their keys' `weight` (default 1; [`crate::api::generate::fair_queue`]).

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, RwLock};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::limits::{Limiter, Limits, RateHeaders};
use crate::secret;

/// The tenant of `--api-key` keys.
pub const DEFAULT_TENANT: &str = "default";
/// The longest tenant name (it is a metric label).
pub const MAX_TENANT_LEN: usize = 64;
/// The largest `weight` of a key.
pub const MAX_WEIGHT: u64 = 10_000;

/// One key as a document writes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeySpec {
    tenant: String,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    key_sha256: Option<String>,
    #[serde(default)]
    models: Option<Vec<String>>,
    #[serde(default)]
    requests_per_minute: Option<u64>,
    #[serde(default)]
    tokens_per_minute: Option<u64>,
    #[serde(default)]
    max_concurrent_requests: Option<u64>,
    #[serde(default)]
    tokens_per_day: Option<u64>,
    #[serde(default)]
    priority: Option<i64>,
    #[serde(default)]
    weight: Option<u64>,
}

/// One key of the table: its hash and what it allows.
pub struct KeyEntry {
    pub tenant: Arc<str>,
    hash: [u8; 32],
    /// `None`: every model.
    pub models: Option<Vec<String>>,
    pub limits: Limits,
    pub priority: Option<i64>,
    /// The tenant's share of a model's queue when requests wait at the head (1 to
    /// [`MAX_WEIGHT`]).
    pub weight: u32,
}

impl KeyEntry {
    fn new(tenant: &str, hash: [u8; 32]) -> Self {
        let limits = Limits::default();
        KeyEntry { tenant: Arc::from(tenant), hash, models: None, limits, priority: None, weight: 1 }
    }

    /// `sha256:` and the first 8 hex digits of the key's hash.
    pub fn fingerprint(&self) -> String {
        format!("sha256:{}", hex(&self.hash[..4]))
    }
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEntry")
            .field("tenant", &self.tenant)
            .field("fingerprint", &self.fingerprint())
            .field("models", &self.models)
            .field("limits", &self.limits)
            .field("priority", &self.priority)
            .field("weight", &self.weight)
            .finish()
    }
}

/// What `GET /api/lumen/keys` shows of a key: never its material.
#[derive(Debug, Serialize)]
pub struct KeyView {
    pub tenant: String,
    pub fingerprint: String,
    pub models: Option<Vec<String>>,
    #[serde(flatten)]
    pub limits: Limits,
    pub priority: Option<i64>,
    pub weight: u32,
    /// Set by `--api-key` (not replaceable through the API).
    pub from_flags: bool,
}

/// A refused keys document: what and where (`api_keys[2].key_sha256`).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct KeysError {
    pub field: String,
    pub message: String,
}

fn refuse(field: impl Into<String>, message: impl Into<String>) -> KeysError {
    KeysError { field: field.into(), message: message.into() }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(text: &str) -> Option<[u8; 32]> {
    let text = text.strip_prefix("sha256:").unwrap_or(text);
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Removes a serve config's `api_keys:` section and reads it; `None` when there is none.
pub fn take_section(config: &mut Value) -> Result<Option<Vec<KeyEntry>>, KeysError> {
    match config.as_object_mut().and_then(|map| map.remove("api_keys")) {
        Some(list) => parse(&list).map(Some),
        None => Ok(None),
    }
}

/// Reads a keys document: `{"api_keys": [...]}` (or the list alone), each entry checked; the
/// first broken rule is named by its field's path. Plaintext keys are hashed here.
pub fn parse(document: &Value) -> Result<Vec<KeyEntry>, KeysError> {
    let list = match document {
        Value::Object(map) => match map.get("api_keys") {
            Some(list) => list,
            None => return Err(refuse("api_keys", "the document has no `api_keys` list")),
        },
        other => other,
    };
    let Value::Array(items) = list else { return Err(refuse("api_keys", "must be a list of keys")) };
    let mut entries = Vec::with_capacity(items.len());
    let (mut tenants, mut hashes) = (HashSet::new(), HashSet::new());
    for (i, item) in items.iter().enumerate() {
        let at = |field: &str| format!("api_keys[{i}]{}{field}", if field.is_empty() { "" } else { "." });
        let spec: KeySpec = serde_path_to_error::deserialize(item).map_err(|e| {
            let path = e.path().to_string();
            refuse(at(if path == "." { "" } else { &path }), e.into_inner().to_string())
        })?;
        let entry = check(spec, &at)?;
        if !tenants.insert(entry.tenant.clone()) {
            return Err(refuse(at("tenant"), format!("tenant `{}` is named twice", entry.tenant)));
        }
        if !hashes.insert(entry.hash) {
            return Err(refuse(at("key"), "the same key is listed twice"));
        }
        entries.push(entry);
    }
    Ok(entries)
}

fn check(spec: KeySpec, at: &dyn Fn(&str) -> String) -> Result<KeyEntry, KeysError> {
    let tenant = spec.tenant;
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if tenant.is_empty() || tenant.len() > MAX_TENANT_LEN || !tenant.chars().all(valid) {
        return Err(refuse(
            at("tenant"),
            format!("must be 1 to {MAX_TENANT_LEN} letters, digits, `-`, `_` or `.` (it is a metric label)"),
        ));
    }
    let hash = match (spec.key, spec.key_sha256) {
        (Some(key), None) if key.trim() == key && !key.is_empty() => sha256(key.as_bytes()),
        (Some(_), None) => return Err(refuse(at("key"), "must be non-empty, without surrounding spaces")),
        (None, Some(hashed)) => {
            parse_hex(&hashed).ok_or_else(|| refuse(at("key_sha256"), "must be the key's SHA-256 as 64 hex digits"))?
        }
        _ => return Err(refuse(at("key"), "give exactly one of `key` and `key_sha256`")),
    };
    if let Some(models) = &spec.models
        && (models.is_empty() || models.iter().any(String::is_empty))
    {
        return Err(refuse(at("models"), "must list model names (leave it out to allow every model)"));
    }
    let limits = Limits {
        requests_per_minute: spec.requests_per_minute,
        tokens_per_minute: spec.tokens_per_minute,
        max_concurrent_requests: spec.max_concurrent_requests,
        tokens_per_day: spec.tokens_per_day,
    };
    for (field, value) in [
        ("requests_per_minute", limits.requests_per_minute),
        ("tokens_per_minute", limits.tokens_per_minute),
        ("max_concurrent_requests", limits.max_concurrent_requests),
        ("tokens_per_day", limits.tokens_per_day),
    ] {
        if value == Some(0) || value.is_some_and(|v| v > i64::MAX as u64) {
            return Err(refuse(at(field), "must be a positive integer (leave it out for no limit)"));
        }
    }
    if let Some(p) = spec.priority
        && i32::try_from(p).is_err()
    {
        return Err(refuse(at("priority"), "must fit in 32 bits"));
    }
    let weight = match spec.weight {
        None => 1,
        Some(w @ 1..=MAX_WEIGHT) => w as u32,
        Some(_) => return Err(refuse(at("weight"), format!("must be an integer from 1 to {MAX_WEIGHT}"))),
    };
    let (models, priority) = (spec.models, spec.priority);
    Ok(KeyEntry { tenant: Arc::from(tenant), hash, models, limits, priority, weight })
}

/// The live key table (the `--api-key` keys and the replaceable named keys) and the tenants'
/// limits. Empty: the API is open.
pub struct Keys {
    fixed: Vec<Arc<KeyEntry>>,
    named: RwLock<Arc<Vec<Arc<KeyEntry>>>>,
    limiter: Limiter,
}

impl Keys {
    /// `flag_keys` (`--api-key`, plaintext, hashed here), with no named keys yet.
    pub fn with_flag_keys(flag_keys: &[String], limiter: Limiter) -> Self {
        let fixed = flag_keys
            .iter()
            .filter(|k| !k.is_empty())
            .map(|k| Arc::new(KeyEntry::new(DEFAULT_TENANT, sha256(k.as_bytes()))))
            .collect();
        Keys { fixed, named: RwLock::new(Arc::default()), limiter }
    }

    /// Replaces every named key at once (requests in flight finish under the limits they were
    /// admitted with, counted on their tenant). Refused, changing nothing, if a named tenant
    /// clashes with `--api-key`'s tenant or a named key is also an `--api-key`.
    pub fn replace(&self, named: Vec<KeyEntry>) -> Result<(), KeysError> {
        self.check(&named)?;
        let tenants: Vec<&str> = named.iter().map(|e| &*e.tenant).collect();
        self.limiter.retain(&tenants);
        let named = Arc::new(named.into_iter().map(Arc::new).collect());
        *self.named.write().unwrap_or_else(|p| p.into_inner()) = named;
        Ok(())
    }

    /// What [`Keys::replace`] would refuse of `named`.
    pub fn check(&self, named: &[KeyEntry]) -> Result<(), KeysError> {
        for (i, entry) in named.iter().enumerate() {
            if !self.fixed.is_empty() && &*entry.tenant == DEFAULT_TENANT {
                return Err(refuse(format!("api_keys[{i}].tenant"), "`default` is the tenant of --api-key"));
            }
            if self.fixed.iter().any(|f| f.hash == entry.hash) {
                return Err(refuse(format!("api_keys[{i}].key"), "this key is also given by --api-key"));
            }
        }
        Ok(())
    }

    fn named(&self) -> Arc<Vec<Arc<KeyEntry>>> {
        self.named.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// No key at all: every request is let in.
    pub fn is_open(&self) -> bool {
        self.fixed.is_empty() && self.named().is_empty()
    }

    /// The entry whose key is `token`. Every entry's hash is compared, in constant time.
    pub fn lookup(&self, token: &str) -> Option<Arc<KeyEntry>> {
        let presented = sha256(token.as_bytes());
        let named = self.named();
        self.fixed.iter().chain(named.iter()).fold(None, |found, entry| {
            let equal = secret::constant_time_eq(&entry.hash, &presented);
            if equal && found.is_none() { Some(entry.clone()) } else { found }
        })
    }

    /// Every key, as `GET /api/lumen/keys` shows it.
    pub fn list(&self) -> Vec<KeyView> {
        let named = self.named();
        let view = |entry: &Arc<KeyEntry>, from_flags| KeyView {
            tenant: entry.tenant.to_string(),
            fingerprint: entry.fingerprint(),
            models: entry.models.clone(),
            limits: entry.limits,
            priority: entry.priority,
            weight: entry.weight,
            from_flags,
        };
        self.fixed.iter().map(|e| view(e, true)).chain(named.iter().map(|e| view(e, false))).collect()
    }

    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// The named keys (not `--api-key`'s) as an `api_keys:` document that [`parse`] reads back
    /// to the same table, each key given as its SHA-256 (`key_sha256`): what the state
    /// directory keeps.
    pub fn named_document(&self) -> Value {
        let entry = |e: &Arc<KeyEntry>| {
            let mut spec = serde_json::json!({
                "tenant": &*e.tenant,
                "key_sha256": hex(&e.hash),
                "models": e.models,
                "priority": e.priority,
                "weight": e.weight,
            });
            if let (Some(map), Ok(Value::Object(limits))) = (spec.as_object_mut(), serde_json::to_value(e.limits)) {
                map.extend(limits);
            }
            spec
        };
        serde_json::json!({"api_keys": self.named().iter().map(entry).collect::<Vec<_>>()})
    }
}

/// Who sent a request: its key's entry (none when the API is open), and what its handling noted
/// for the way out: the `x-ratelimit-*` values its admission measured, for the response, and
/// the model it was admitted for, for the tenant's usage.
#[derive(Clone, Default)]
pub struct Caller {
    key: Option<Arc<KeyEntry>>,
    notes: Arc<Mutex<Notes>>,
}

#[derive(Default)]
struct Notes {
    headers: Option<RateHeaders>,
    model: Option<Arc<str>>,
}

impl Caller {
    pub fn new(key: Arc<KeyEntry>) -> Self {
        Caller { key: Some(key), notes: Arc::default() }
    }

    pub fn key(&self) -> Option<&Arc<KeyEntry>> {
        self.key.as_ref()
    }

    /// Whether the caller's key allows `model`.
    pub fn may_use(&self, model: &str) -> bool {
        match self.key.as_ref().and_then(|k| k.models.as_ref()) {
            Some(models) => models.iter().any(|m| m == model),
            None => true,
        }
    }

    /// The priority a request runs at: its own, never better (lower) than its key's; the key's
    /// when it sends none.
    pub fn priority(&self, requested: Option<i64>) -> Option<i64> {
        match (requested, self.key.as_ref().and_then(|k| k.priority)) {
            (Some(asked), Some(floor)) => Some(asked.max(floor)),
            (None, floor) => floor,
            (asked, None) => asked,
        }
    }

    fn notes(&self) -> std::sync::MutexGuard<'_, Notes> {
        self.notes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes the admission's `x-ratelimit-*` values for the response.
    pub fn set_headers(&self, headers: RateHeaders) {
        self.notes().headers = Some(headers);
    }

    pub fn headers(&self) -> Option<RateHeaders> {
        self.notes().headers.clone()
    }

    /// Notes the (deployed) model the request is for.
    pub fn set_model(&self, model: &str) {
        self.notes().model = Some(Arc::from(model));
    }

    /// The model noted by [`Caller::set_model`], if the request got that far.
    pub fn model(&self) -> Option<Arc<str>> {
        self.notes().model.clone()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Infallible> {
        Ok(parts.extensions.get::<Caller>().cloned().unwrap_or_default())
    }
}

#[cfg(test)]
#[path = "keys_tests.rs"]
mod tests;
