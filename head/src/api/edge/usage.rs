//! Per-tenant usage: the `lumen_tenant_*` counters on `/metrics` and, beside them, the same
//! counts per UTC day, tenant and model, which `GET /api/lumen/usage` answers
//! ([`crate::control::usage_api`]).
//!
//! Every count goes through [`TenantMetrics`], fed in three places: a request's outcome when its
//! response ends ([`super::auth`]), a refusal by a key's limits ([`super::limits::Limiter`] and
//! the model check of `ApiState::enter`), and the tokens a request used when its lease settles
//! ([`super::limits::Lease`]). So the endpoint and the metrics cannot disagree: a tenant's rows
//! summed over the days kept are its counters' increase over those days.
//!
//! Outcomes (the `outcome` label): `success`; `invalid` (a 4xx other than 429); `rate_limited`
//! (429: a key's limit or a full queue); `error` (a 5xx, or a stream that failed after its 200);
//! `cancelled` (the client went away before the answer ended). Rejections count the refusals of
//! a key's limits by reason (`requests`, `tokens`, `concurrency`, `quota`, `model`); each is also
//! a request of outcome `rate_limited` (`invalid` for `model`, a 404). Only requests with a key
//! count (an open API has no tenant).
//!
//! Days and memory: a count goes to the UTC day on which it is recorded (a request's outcome and
//! tokens: when it ends). The [`UsageLedger`] keeps `retention_days` days
//! (`--usage-retention-days`), counting back from the newest day it has seen: when a day begins,
//! the oldest goes. A day holds one entry per (tenant, model) used that day; tenants are the
//! configured keys' and models the deployed ones (a request refused before its model is known
//! counts under the model `""`), so what it holds is bounded by the configuration, never by what
//! clients send. It lives in memory; with `--state-dir` it is saved there (as the rows
//! `GET /api/lumen/usage` answers, [`UsageLedger::to_document`]) and restored at start
//! ([`crate::control::usage_store`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus::{IntCounterVec, Opts, Registry};
use serde_json::{Map, Value, json};

use super::limits::Reason;
use crate::clock::{date_of_day, day_of_date, utc_day};

/// Days of usage kept by default.
pub const DEFAULT_RETENTION_DAYS: u32 = 31;

/// How a request ended, for its tenant (the `outcome` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Invalid,
    RateLimited,
    Error,
    Cancelled,
}

impl Outcome {
    pub const ALL: [Outcome; 5] =
        [Outcome::Success, Outcome::Invalid, Outcome::RateLimited, Outcome::Error, Outcome::Cancelled];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Invalid => "invalid",
            Outcome::RateLimited => "rate_limited",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
        }
    }

    /// The outcome of a complete answer sent with `status`.
    pub fn of_status(status: u16) -> Outcome {
        match status {
            429 => Outcome::RateLimited,
            400..=499 => Outcome::Invalid,
            500.. => Outcome::Error,
            _ => Outcome::Success,
        }
    }
}

/// The tokens one request used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    /// Prompt tokens read from the replicas' prefix caches (part of `prompt`).
    pub cached: u64,
}

/// One (day, tenant, model)'s counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// By [`Outcome`], in [`Outcome::ALL`]'s order.
    pub requests: [u64; Outcome::ALL.len()],
    /// By [`Reason`], in [`Reason::ALL`]'s order.
    pub rejections: [u64; Reason::ALL.len()],
    pub tokens: Tokens,
}

/// One row of the usage: a day, a tenant, a model and their counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRow {
    /// Days since 1970-01-01 (UTC).
    pub day: u64,
    pub tenant: String,
    pub model: String,
    pub counts: Counts,
}

impl UsageRow {
    /// The row as `GET /api/lumen/usage` writes it (every outcome and reason, zeros included).
    pub fn to_json(&self) -> Value {
        let c = &self.counts;
        let named = |labels: &mut dyn Iterator<Item = &'static str>, values: &[u64]| -> Map<String, Value> {
            labels.zip(values).map(|(label, n)| (label.to_string(), Value::from(*n))).collect()
        };
        let mut requests = named(&mut Outcome::ALL.iter().map(|o| o.label()), &c.requests);
        requests.insert("total".into(), c.requests.iter().sum::<u64>().into());
        json!({
            "date": date_of_day(self.day),
            "tenant": self.tenant,
            "model": self.model,
            "requests": requests,
            "rejections": named(&mut Reason::ALL.iter().map(|r| r.label()), &c.rejections),
            "prompt_tokens": c.tokens.prompt,
            "completion_tokens": c.tokens.completion,
            "cached_tokens": c.tokens.cached,
            "total_tokens": c.tokens.prompt + c.tokens.completion,
        })
    }

    /// Reads a row [`UsageRow::to_json`] wrote (`total` and `total_tokens` are recomputed, not
    /// read).
    pub fn from_json(row: &Value) -> Result<UsageRow, String> {
        let text = |key: &str| row[key].as_str().map(str::to_string).ok_or_else(|| format!("`{key}`: a string"));
        let number = |v: &Value, key: &str| v.as_u64().ok_or_else(|| format!("`{key}`: a count"));
        let date = text("date")?;
        let day = day_of_date(&date).ok_or_else(|| format!("`date`: {date:?} is not a YYYY-MM-DD date"))?;
        let mut counts = Counts::default();
        for (i, outcome) in Outcome::ALL.iter().enumerate() {
            counts.requests[i] = number(&row["requests"][outcome.label()], outcome.label())?;
        }
        for (i, reason) in Reason::ALL.iter().enumerate() {
            counts.rejections[i] = number(&row["rejections"][reason.label()], reason.label())?;
        }
        counts.tokens = Tokens {
            prompt: number(&row["prompt_tokens"], "prompt_tokens")?,
            completion: number(&row["completion_tokens"], "completion_tokens")?,
            cached: number(&row["cached_tokens"], "cached_tokens")?,
        };
        Ok(UsageRow { day, tenant: text("tenant")?, model: text("model")?, counts })
    }
}

/// Which rows to read: days from `first_day` to `last_day` (inclusive, either open), one tenant,
/// one model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageFilter {
    pub first_day: Option<u64>,
    pub last_day: Option<u64>,
    pub tenant: Option<String>,
    pub model: Option<String>,
}

/// One day's counts by (tenant, model).
type Day = BTreeMap<(String, String), Counts>;

/// Counts per day, then per (tenant, model); see the module docs for what it keeps.
pub struct UsageLedger {
    retention_days: u32,
    days: Mutex<BTreeMap<u64, Day>>,
    /// Counts of changes, so a saver can tell whether anything changed since it last saved.
    changes: std::sync::atomic::AtomicU64,
}

impl UsageLedger {
    /// A ledger of the last `retention_days` days (at least one).
    pub fn new(retention_days: u32) -> Self {
        UsageLedger { retention_days: retention_days.max(1), days: Mutex::default(), changes: Default::default() }
    }

    pub fn retention_days(&self) -> u32 {
        self.retention_days
    }

    /// Adds to the counts of `tenant` and `model` on `day`. A day older than those kept is
    /// ignored; a new day drops the days that fall out of the retention.
    pub fn add(&self, day: u64, tenant: &str, model: &str, add: impl FnOnce(&mut Counts)) {
        let mut days = self.lock();
        let newest = days.last_key_value().map_or(day, |(&newest, _)| newest.max(day));
        let oldest_kept = newest.saturating_sub(u64::from(self.retention_days) - 1);
        if day < oldest_kept {
            return;
        }
        add(days.entry(day).or_default().entry((tenant.to_string(), model.to_string())).or_default());
        self.changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        while days.first_key_value().is_some_and(|(&first, _)| first < oldest_kept) {
            days.pop_first();
        }
    }

    /// The rows `filter` selects, by day, then tenant, then model.
    pub fn rows(&self, filter: &UsageFilter) -> Vec<UsageRow> {
        let days = self.lock();
        let range = filter.first_day.unwrap_or(0)..=filter.last_day.unwrap_or(u64::MAX);
        if range.is_empty() {
            return Vec::new();
        }
        let wanted = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        days.range(range)
            .flat_map(|(&day, entries)| {
                entries
                    .iter()
                    .filter(|((tenant, model), _)| wanted(&filter.tenant, tenant) && wanted(&filter.model, model))
                    .map(move |((tenant, model), counts)| UsageRow {
                        day,
                        tenant: tenant.clone(),
                        model: model.clone(),
                        counts: *counts,
                    })
            })
            .collect()
    }

    /// How many changes the ledger has seen (a saver compares it with the last one it saved).
    pub fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every row kept, as `{"usage": [rows as GET /api/lumen/usage writes them]}`.
    pub fn to_document(&self) -> Value {
        let rows: Vec<Value> = self.rows(&UsageFilter::default()).iter().map(UsageRow::to_json).collect();
        json!({ "usage": rows })
    }

    /// Adds the rows of a [`UsageLedger::to_document`] document (a restarted head's saved
    /// usage) to the counts; days beyond the retention are dropped as usual. Checked whole
    /// first: an unreadable row adds nothing. Returns the rows added.
    pub fn restore(&self, document: &Value) -> Result<usize, String> {
        let Some(rows) = document["usage"].as_array() else { return Err("no `usage` list".into()) };
        let rows = rows
            .iter()
            .enumerate()
            .map(|(i, row)| UsageRow::from_json(row).map_err(|e| format!("usage[{i}]: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        for row in &rows {
            self.add(row.day, &row.tenant, &row.model, |c| {
                c.requests.iter_mut().zip(row.counts.requests).for_each(|(a, b)| *a += b);
                c.rejections.iter_mut().zip(row.counts.rejections).for_each(|(a, b)| *a += b);
                c.tokens.prompt += row.counts.tokens.prompt;
                c.tokens.completion += row.counts.tokens.completion;
                c.tokens.cached += row.counts.tokens.cached;
            });
        }
        Ok(rows.len())
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Day>> {
        // Every update leaves the ledger consistent: a panic elsewhere must not stop the API.
        self.days.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The per-tenant counters on `/metrics`, labelled by tenant name (never by key), and the
/// [`UsageLedger`] beside them.
#[derive(Clone)]
pub struct TenantMetrics {
    requests: IntCounterVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    cached_tokens: IntCounterVec,
    rejections: IntCounterVec,
    ledger: Arc<UsageLedger>,
}

impl TenantMetrics {
    /// Registers the counters into `registry`, with a ledger of `retention_days` days.
    pub fn register(registry: &Registry, retention_days: u32) -> Result<Self, prometheus::Error> {
        let vec = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let counter = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(counter.clone()))?;
            Ok(counter)
        };
        Ok(TenantMetrics {
            requests: vec(
                "lumen_tenant_requests_total",
                "Requests of each tenant by outcome (success, invalid, rate_limited, error, cancelled).",
                &["tenant", "outcome"],
            )?,
            prompt_tokens: vec("lumen_tenant_prompt_tokens_total", "Prompt tokens used by each tenant.", &["tenant"])?,
            generation_tokens: vec(
                "lumen_tenant_generation_tokens_total",
                "Completion tokens generated for each tenant.",
                &["tenant"],
            )?,
            cached_tokens: vec(
                "lumen_tenant_cached_tokens_total",
                "Prompt tokens of each tenant read from the replicas' prefix caches.",
                &["tenant"],
            )?,
            rejections: vec(
                "lumen_tenant_rejections_total",
                "Requests refused by a key's limits, by reason (requests, tokens, concurrency, quota, model).",
                &["tenant", "reason"],
            )?,
            ledger: Arc::new(UsageLedger::new(retention_days)),
        })
    }

    /// The counts by day, tenant and model.
    pub fn ledger(&self) -> &Arc<UsageLedger> {
        &self.ledger
    }

    /// A request of `tenant` for `model` ended with `outcome`.
    pub fn finished(&self, tenant: &str, model: &str, outcome: Outcome) {
        self.requests.with_label_values(&[tenant, outcome.label()]).inc();
        self.ledger.add(utc_day(), tenant, model, |c| c.requests[outcome as usize] += 1);
    }

    /// A key's limit refused a request of `tenant` for `model`.
    pub fn rejected(&self, tenant: &str, model: &str, reason: Reason) {
        self.rejections.with_label_values(&[tenant, reason.label()]).inc();
        self.ledger.add(utc_day(), tenant, model, |c| c.rejections[reason as usize] += 1);
    }

    /// A request of `tenant` for `model` used `tokens`.
    pub fn used(&self, tenant: &str, model: &str, tokens: Tokens) {
        self.prompt_tokens.with_label_values(&[tenant]).inc_by(tokens.prompt);
        self.generation_tokens.with_label_values(&[tenant]).inc_by(tokens.completion);
        self.cached_tokens.with_label_values(&[tenant]).inc_by(tokens.cached);
        self.ledger.add(utc_day(), tenant, model, |c| {
            c.tokens.prompt += tokens.prompt;
            c.tokens.completion += tokens.completion;
            c.tokens.cached += tokens.cached;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 20_000;

    fn one_request(ledger: &UsageLedger, day: u64, tenant: &str, model: &str) {
        ledger.add(day, tenant, model, |c| c.requests[Outcome::Success as usize] += 1);
    }

    #[test]
    fn counts_are_kept_per_day_tenant_and_model() {
        let ledger = UsageLedger::new(31);
        one_request(&ledger, DAY, "b", "m");
        one_request(&ledger, DAY, "a", "m");
        one_request(&ledger, DAY, "a", "m");
        one_request(&ledger, DAY + 1, "a", "m");
        ledger.add(DAY, "a", "m2", |c| c.tokens.prompt += 7);
        let rows = ledger.rows(&UsageFilter::default());
        let keys: Vec<(u64, &str, &str, u64)> =
            rows.iter().map(|r| (r.day, &*r.tenant, &*r.model, r.counts.requests[0])).collect();
        assert_eq!(keys, [(DAY, "a", "m", 2), (DAY, "a", "m2", 0), (DAY, "b", "m", 1), (DAY + 1, "a", "m", 1)]);
        assert_eq!(rows[1].counts.tokens.prompt, 7);
    }

    #[test]
    fn filters_select_days_tenants_and_models() {
        let ledger = UsageLedger::new(31);
        for day in DAY..DAY + 5 {
            one_request(&ledger, day, "a", "m");
            one_request(&ledger, day, "b", "n");
        }
        let days = |f: UsageFilter| ledger.rows(&f).iter().map(|r| r.day - DAY).collect::<Vec<_>>();
        let range = UsageFilter { first_day: Some(DAY + 1), last_day: Some(DAY + 2), ..Default::default() };
        assert_eq!(days(range), [1, 1, 2, 2]);
        let tenant = UsageFilter { tenant: Some("b".into()), first_day: Some(DAY + 3), ..Default::default() };
        assert_eq!(days(tenant), [3, 4]);
        let model = UsageFilter { model: Some("m".into()), last_day: Some(DAY), ..Default::default() };
        assert_eq!(days(model), [0]);
        let inverted = UsageFilter { first_day: Some(DAY + 2), last_day: Some(DAY + 1), ..Default::default() };
        assert_eq!(days(inverted), Vec::<u64>::new());
    }

    #[test]
    fn only_the_last_retention_days_are_kept() {
        let ledger = UsageLedger::new(3);
        for day in DAY..DAY + 5 {
            one_request(&ledger, day, "a", "m");
        }
        let kept: Vec<u64> = ledger.rows(&UsageFilter::default()).iter().map(|r| r.day - DAY).collect();
        assert_eq!(kept, [2, 3, 4]);
        one_request(&ledger, DAY + 1, "a", "m");
        assert_eq!(ledger.rows(&UsageFilter::default()).len(), 3, "a day out of the window is not counted");
        one_request(&ledger, DAY + 2, "a", "m");
        assert_eq!(ledger.rows(&UsageFilter::default())[0].counts.requests[0], 2, "the oldest kept day still counts");
    }

    #[test]
    fn a_row_names_every_outcome_and_reason() {
        let mut counts = Counts::default();
        counts.requests[Outcome::Cancelled as usize] = 2;
        counts.requests[Outcome::Success as usize] = 1;
        counts.rejections[Reason::Quota as usize] = 1;
        counts.tokens = Tokens { prompt: 10, completion: 4, cached: 8 };
        let row = UsageRow { day: 20_513, tenant: "acme".into(), model: "m".into(), counts };
        assert_eq!(
            row.to_json(),
            json!({
                "date": "2026-03-01", "tenant": "acme", "model": "m",
                "requests": {"success": 1, "invalid": 0, "rate_limited": 0, "error": 0, "cancelled": 2, "total": 3},
                "rejections": {"requests": 0, "tokens": 0, "concurrency": 0, "quota": 1, "model": 0},
                "prompt_tokens": 10, "completion_tokens": 4, "cached_tokens": 8, "total_tokens": 14,
            })
        );
    }

    #[test]
    fn outcomes_follow_the_status() {
        let cases =
            [(200, Outcome::Success), (404, Outcome::Invalid), (429, Outcome::RateLimited), (503, Outcome::Error)];
        for (status, outcome) in cases {
            assert_eq!(Outcome::of_status(status), outcome, "{status}");
        }
    }
}
