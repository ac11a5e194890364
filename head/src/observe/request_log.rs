//! The recent-request log: a bounded ring of [`RequestRecord`]s, one per OpenAI request the API
//! handled (newest evicts oldest), plus counters of finished requests per deployment and replica
//! that the history sampler turns into requests per second.
//!
//! Contract: a record is pushed exactly once, when its request ends (response sent, stream ended,
//! or client gone); `prompt` is `Some` only when the log was created with `log_prompts`, and then
//! holds at most [`PROMPT_CHARS`] characters.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::Serialize;

/// Records kept when no capacity is configured.
pub const DEFAULT_CAPACITY: usize = 1000;
/// The most prompt characters a record keeps (with `--log-requests`).
pub const PROMPT_CHARS: usize = 2000;

/// Which OpenAI route served a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    Chat,
    Completions,
    /// `/v1/responses` (the Responses API).
    Responses,
    /// `/v1/embeddings`.
    Embeddings,
}

/// One finished request, as `GET /api/requests` lists it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RequestRecord {
    pub id: String,
    /// When the request ended, Unix milliseconds.
    pub unix_ms: u64,
    pub route: Route,
    /// The served model name (or the name the client asked for, if it was refused).
    pub model: Option<String>,
    pub deployment: Option<String>,
    pub replica_id: Option<String>,
    pub stream: bool,
    /// The HTTP status; for a stream that failed after its 200 was sent, the failure's status.
    pub status: u16,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub ttft_ms: Option<f64>,
    pub duration_ms: f64,
    pub itl_ms: Option<f64>,
    pub finish_reason: Option<String>,
    pub error: Option<String>,
    pub prompt: Option<String>,
    /// Times the request moved to another replica after its own failed (`api::generate::migration`).
    pub migrations: u32,
}

/// Finished-request counts since the head started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FinishedCounts {
    pub total: u64,
    pub by_deployment: HashMap<String, u64>,
    pub by_replica: HashMap<String, u64>,
}

struct Inner {
    records: VecDeque<RequestRecord>,
    counts: FinishedCounts,
}

/// The log; shared by the API (writer) and the control server and sampler (readers).
pub struct RequestLog {
    capacity: usize,
    log_prompts: bool,
    inner: Mutex<Inner>,
}

impl RequestLog {
    /// A log of at most `capacity` records (at least one) that keeps prompt text only if
    /// `log_prompts`.
    pub fn new(capacity: usize, log_prompts: bool) -> Self {
        let capacity = capacity.max(1);
        RequestLog {
            capacity,
            log_prompts,
            inner: Mutex::new(Inner {
                records: VecDeque::with_capacity(capacity.min(4096)),
                counts: FinishedCounts::default(),
            }),
        }
    }

    /// Whether records keep (and the API logs) prompt text.
    pub fn log_prompts(&self) -> bool {
        self.log_prompts
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a finished request, dropping the oldest record when full. A prompt is dropped here
    /// unless prompts are logged, so no caller can store one by mistake.
    pub fn push(&self, mut record: RequestRecord) {
        if !self.log_prompts {
            record.prompt = None;
        }
        let mut inner = self.inner();
        inner.counts.total += 1;
        if let Some(d) = &record.deployment {
            *inner.counts.by_deployment.entry(d.clone()).or_default() += 1;
        }
        if let Some(r) = &record.replica_id {
            *inner.counts.by_replica.entry(r.clone()).or_default() += 1;
        }
        if inner.records.len() == self.capacity {
            inner.records.pop_front();
        }
        inner.records.push_back(record);
    }

    /// The newest `limit` records, newest first.
    pub fn recent(&self, limit: usize) -> Vec<RequestRecord> {
        self.inner().records.iter().rev().take(limit).cloned().collect()
    }

    /// Records that ended at or after `since_unix_ms`, oldest first.
    pub fn since(&self, since_unix_ms: u64) -> Vec<RequestRecord> {
        // Concurrent requests may push slightly out of time order: filter, do not bisect.
        self.inner().records.iter().filter(|r| r.unix_ms >= since_unix_ms).cloned().collect()
    }

    /// Finished-request counters.
    pub fn counts(&self) -> FinishedCounts {
        self.inner().counts.clone()
    }

    /// Forgets the counters of replicas `keep` rejects (replicas that are gone), so the counters
    /// stay as small as the cluster.
    pub fn retain_replica_counts(&self, keep: impl Fn(&str) -> bool) {
        self.inner().counts.by_replica.retain(|id, _| keep(id));
    }
}

/// `text` cut to at most [`PROMPT_CHARS`] characters (on a character boundary).
pub fn truncate_prompt(text: &str) -> String {
    match text.char_indices().nth(PROMPT_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, unix_ms: u64) -> RequestRecord {
        RequestRecord {
            id: id.into(),
            unix_ms,
            route: Route::Chat,
            model: Some("m".into()),
            deployment: Some("d".into()),
            replica_id: Some("r1".into()),
            stream: false,
            status: 200,
            prompt_tokens: 1,
            completion_tokens: 2,
            ttft_ms: None,
            duration_ms: 1.0,
            itl_ms: None,
            finish_reason: Some("stop".into()),
            error: None,
            prompt: Some("secret".into()),
            migrations: 0,
        }
    }

    #[test]
    fn keeps_the_newest_records_up_to_capacity_newest_first() {
        let log = RequestLog::new(3, false);
        for i in 0..5 {
            log.push(record(&format!("r{i}"), i));
        }
        let ids: Vec<String> = log.recent(10).into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["r4", "r3", "r2"]);
        assert_eq!(log.recent(1)[0].id, "r4");
        assert_eq!(log.counts().total, 5, "counters count evicted records too");
        assert_eq!(log.counts().by_deployment["d"], 5);
    }

    #[test]
    fn prompts_are_dropped_unless_logging_is_on() {
        let off = RequestLog::new(4, false);
        off.push(record("a", 1));
        assert_eq!(off.recent(1)[0].prompt, None);
        let on = RequestLog::new(4, true);
        on.push(record("a", 1));
        assert_eq!(on.recent(1)[0].prompt.as_deref(), Some("secret"));
    }

    #[test]
    fn since_returns_records_ending_at_or_after_the_time() {
        let log = RequestLog::new(10, false);
        for t in [10, 20, 30] {
            log.push(record(&t.to_string(), t));
        }
        let ids: Vec<String> = log.since(20).into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["20", "30"]);
        assert!(log.since(31).is_empty());
    }

    #[test]
    fn long_prompts_are_truncated_on_a_character_boundary() {
        let long = "é".repeat(PROMPT_CHARS + 10);
        let cut = truncate_prompt(&long);
        assert_eq!(cut.chars().count(), PROMPT_CHARS + 1, "the kept characters and an ellipsis");
        assert_eq!(truncate_prompt("short"), "short");
    }

    #[test]
    fn replica_counts_of_gone_replicas_are_forgotten() {
        let log = RequestLog::new(10, false);
        log.push(record("a", 1));
        log.retain_replica_counts(|id| id != "r1");
        assert!(log.counts().by_replica.is_empty());
        assert_eq!(log.counts().total, 1);
    }
}
