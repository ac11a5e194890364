//! The tenants' usage kept across restarts. With `--state-dir` the [`UsageLedger`] is restored
//! from `usage.json` at start (before any request is served), saved there every
//! [`SAVE_INTERVAL`] when it changed, and once more when the head stops (after its HTTP servers
//! drained, so the requests that finished during the drain count).
//!
//! Invariants: the file holds what `GET /api/lumen/usage` answers for every day kept (the same
//! rows, read back by [`crate::api::edge::usage::UsageRow::from_json`]); each save is atomic (the
//! state store's temporary file and rename), so a crash loses at most the counts of the last
//! interval, never the file; an unreadable file stops the head with an error naming it, as an
//! unreadable serve config does (billing data is not silently dropped).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::api::edge::usage::UsageLedger;
use crate::state_store::{StateStore, StateStoreError};

/// How often changed usage is saved.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(30);

/// The ledger and the directory it is saved in.
pub struct UsageStore {
    ledger: Arc<UsageLedger>,
    store: StateStore,
    /// The ledger's change count at the last save.
    saved: AtomicU64,
    /// Held by a save: the periodic one (off the async threads, not stopped by an abort) and
    /// the final one never write the file at once.
    saving: std::sync::Mutex<()>,
}

impl UsageStore {
    /// Adds the usage saved in `store` (if any) to `ledger`, which then saves there.
    pub fn restore(ledger: Arc<UsageLedger>, store: StateStore) -> Result<Self, StateStoreError> {
        if let Some(document) = store.load_usage()? {
            let rows = ledger
                .restore(&document)
                .map_err(|reason| StateStoreError::Corrupt { path: store.usage_path(), reason })?;
            tracing::info!(rows, "tenants' usage restored from the state directory");
        }
        let saved = AtomicU64::new(ledger.changes());
        Ok(UsageStore { ledger, store, saved, saving: std::sync::Mutex::new(()) })
    }

    /// Saves the usage if it changed since the last save. True when it wrote.
    pub fn save_if_changed(&self) -> Result<bool, StateStoreError> {
        let _saving = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        let changes = self.ledger.changes();
        if changes == self.saved.load(Ordering::Relaxed) {
            return Ok(false);
        }
        self.store.save_usage(&self.ledger.to_document())?;
        self.saved.store(changes, Ordering::Relaxed);
        Ok(true)
    }

    /// Saves what changed every [`SAVE_INTERVAL`] until `stop` (the final save is the caller's,
    /// once its requests are done).
    pub async fn run(self: Arc<Self>, stop: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(SAVE_INTERVAL);
        tick.tick().await;
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => self.save_logged().await,
            }
        }
    }

    /// [`UsageStore::save_if_changed`] off the async threads; a failure is logged (the counts
    /// stay in memory and the next save tries again).
    pub async fn save_logged(self: &Arc<Self>) {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.save_if_changed()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "saving the tenants' usage failed"),
            Err(e) => tracing::warn!(error = %e, "saving the tenants' usage failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger() -> Arc<UsageLedger> {
        Arc::new(UsageLedger::new(31))
    }

    #[test]
    fn usage_saved_in_a_directory_comes_back_in_a_new_ledger_and_adds_up() {
        let dir = tempfile::tempdir().unwrap();
        let first = ledger();
        let store = UsageStore::restore(first.clone(), StateStore::open(dir.path()).unwrap()).unwrap();
        assert!(!store.save_if_changed().unwrap(), "nothing to save yet");
        first.add(20_000, "acme", "m", |c| {
            c.requests[0] = 3;
            c.rejections[1] = 2;
            c.tokens.prompt = 40;
            c.tokens.completion = 12;
            c.tokens.cached = 16;
        });
        first.add(20_001, "beta", "m", |c| c.requests[3] = 1);
        assert!(store.save_if_changed().unwrap());
        assert!(!store.save_if_changed().unwrap(), "unchanged since");

        let second = ledger();
        let restored = UsageStore::restore(second.clone(), StateStore::open(dir.path()).unwrap()).unwrap();
        assert_eq!(second.to_document(), first.to_document());
        // New counts add to the restored ones.
        second.add(20_001, "beta", "m", |c| c.requests[3] += 1);
        assert!(restored.save_if_changed().unwrap());
        let third = ledger();
        UsageStore::restore(third.clone(), StateStore::open(dir.path()).unwrap()).unwrap();
        let beta = &third.to_document()["usage"][1];
        assert_eq!((beta["tenant"].as_str(), beta["requests"]["error"].as_u64()), (Some("beta"), Some(2)));
    }

    #[test]
    fn an_unreadable_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        store.save_usage(&serde_json::json!({"usage": [{"date": "yesterday"}]})).unwrap();
        let err = UsageStore::restore(ledger(), store.clone()).err().expect("refused");
        assert!(err.to_string().contains("usage.json") && err.to_string().contains("date"), "{err}");
    }
}
