//! Per-key limits at the head: requests per minute, tokens per minute, concurrent requests and a
//! token budget per UTC day, each per tenant ([`crate::api::edge::keys`] names the tenants).
//!
//! Model: the two per-minute limits are token buckets refilled continuously — a limit of `L` per
//! minute holds at most `L` and gains `L / 60` per second — so "per minute" is a rolling window
//! with no cliff at the minute's edge. A request takes one unit of the requests bucket and, from
//! the tokens bucket and the day's budget, its *reservation*: the prompt's estimated tokens plus
//! `max_tokens` for each choice ([`cost`]). When the request ends, however it ends (finished,
//! failed, client gone), its [`Lease`] is dropped and settles: the tokens it really used (as the
//! replica counted them, else as counted from its stream so far) replace the reservation, so a
//! request that used less gives the difference back and one that used more (the prompt estimate
//! was low) takes the rest. Dropping the lease also frees its concurrency slot.
//!
//! Invariants: a refusal changes nothing (every limit is checked before any is taken); every
//! admitted request holds exactly one concurrency slot until its lease drops; the day's budget
//! counts settled usage plus the reservations in flight, so admitted requests never exceed it by
//! more than the prompt estimates' error. The day rolls over at UTC midnight. Counters are per
//! tenant name, never per key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lumen_proto::v1 as pb;
use pb::generate_event::Event;
use serde::Serialize;

use super::usage::{TenantMetrics, Tokens};

use crate::clock::DAY_S;

/// The limits of one key; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent_requests: Option<u64>,
    pub tokens_per_day: Option<u64>,
}

/// A bucket of `capacity` units refilled at `capacity / 60` per second.
#[derive(Clone, Debug)]
struct Bucket {
    capacity: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn full(capacity: u64, now: Instant) -> Self {
        Bucket { capacity: capacity as f64, level: capacity as f64, at: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * self.capacity / 60.0).min(self.capacity);
        self.at = self.at.max(now);
    }

    /// How long until `amount` units are in the bucket.
    fn wait_for(&self, amount: f64) -> Duration {
        Duration::from_secs_f64(((amount - self.level) * 60.0 / self.capacity).max(0.0))
    }

    fn until_full(&self) -> Duration {
        self.wait_for(self.capacity)
    }

    fn remaining(&self) -> u64 {
        self.level.max(0.0) as u64
    }

    fn used(&self) -> u64 {
        (self.capacity - self.level.max(0.0)).round() as u64
    }
}

/// What OpenAI's `x-ratelimit-*` headers report; a field is `None` when its limit is not set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RateHeaders {
    pub requests: Option<Window>,
    pub tokens: Option<Window>,
}

/// One per-minute limit's state: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    pub limit: u64,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

impl RateHeaders {
    /// The header names and values, as OpenAI sends them.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = Vec::with_capacity(6);
        if let Some(w) = self.requests {
            pairs.push(("x-ratelimit-limit-requests", w.limit.to_string()));
            pairs.push(("x-ratelimit-remaining-requests", w.remaining.to_string()));
            pairs.push(("x-ratelimit-reset-requests", format_reset(w.reset)));
        }
        if let Some(w) = self.tokens {
            pairs.push(("x-ratelimit-limit-tokens", w.limit.to_string()));
            pairs.push(("x-ratelimit-remaining-tokens", w.remaining.to_string()));
            pairs.push(("x-ratelimit-reset-tokens", format_reset(w.reset)));
        }
        pairs
    }
}

/// A duration as OpenAI's reset headers write it (Go's style, to the millisecond): `120ms`,
/// `1s`, `1.5s`, `6m0s`, `1h2m3s`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m, s_ms) = (ms / 3_600_000, (ms / 60_000) % 60, ms % 60_000);
    let seconds = match s_ms % 1000 {
        0 => format!("{}s", s_ms / 1000),
        frac => format!("{}.{}s", s_ms / 1000, format!("{frac:03}").trim_end_matches('0')),
    };
    match (h, m) {
        (0, 0) => seconds,
        (0, m) => format!("{m}m{seconds}"),
        (h, m) => format!("{h}h{m}m{seconds}"),
    }
}

/// Which limit refused a request (also the `reason` label of the rejection counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Requests,
    Tokens,
    Concurrency,
    Quota,
    /// The key may not use the requested model (a 404, counted with the rejections).
    Model,
}

impl Reason {
    pub const ALL: [Reason; 5] = [Reason::Requests, Reason::Tokens, Reason::Concurrency, Reason::Quota, Reason::Model];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Requests => "requests",
            Reason::Tokens => "tokens",
            Reason::Concurrency => "concurrency",
            Reason::Quota => "quota",
            Reason::Model => "model",
        }
    }
}

/// A refusal: a 429 with OpenAI's body and headers ([`crate::api::edge::errors::ApiError::Limited`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Limited {
    pub reason: Reason,
    pub message: String,
    pub headers: RateHeaders,
    /// The `Retry-After` seconds (at least 1).
    pub retry_after_s: u64,
}

/// One tenant's counters, shared by its requests.
#[derive(Debug)]
struct Meter {
    limits: Limits,
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    in_flight: u64,
    /// The UTC day (days since the epoch) that `day_used` counts.
    day: u64,
    day_used: u64,
}

impl Meter {
    fn new(limits: Limits, now: Instant, day: u64) -> Self {
        Meter {
            limits,
            requests: limits.requests_per_minute.map(|l| Bucket::full(l, now)),
            tokens: limits.tokens_per_minute.map(|l| Bucket::full(l, now)),
            in_flight: 0,
            day,
            day_used: 0,
        }
    }

    /// New limits for a tenant that keeps its name: what was used stays used.
    fn reconfigure(&mut self, limits: Limits, now: Instant) {
        fn resize(bucket: &mut Option<Bucket>, limit: Option<u64>, now: Instant) {
            *bucket = match (bucket.take(), limit) {
                (Some(mut b), Some(l)) => {
                    b.refill(now);
                    let used = b.capacity - b.level;
                    Some(Bucket { capacity: l as f64, level: (l as f64 - used).min(l as f64), at: now })
                }
                (None, Some(l)) => Some(Bucket::full(l, now)),
                (_, None) => None,
            };
        }
        resize(&mut self.requests, limits.requests_per_minute, now);
        resize(&mut self.tokens, limits.tokens_per_minute, now);
        self.limits = limits;
    }

    fn advance(&mut self, now: Instant, day: u64) {
        self.requests.iter_mut().for_each(|b| b.refill(now));
        self.tokens.iter_mut().for_each(|b| b.refill(now));
        if day != self.day {
            (self.day, self.day_used) = (day, 0);
        }
    }

    fn headers(&self) -> RateHeaders {
        let window = |b: &Bucket| Window { limit: b.capacity as u64, remaining: b.remaining(), reset: b.until_full() };
        RateHeaders { requests: self.requests.as_ref().map(window), tokens: self.tokens.as_ref().map(window) }
    }

    /// Takes one request and `cost` tokens, or says which limit refuses (changing nothing).
    fn take(&mut self, tenant: &str, cost: u64, unix_s: u64) -> Result<(), Limited> {
        let refuse = |reason, message: String, wait: Duration| Limited {
            reason,
            message,
            headers: self.headers(),
            retry_after_s: wait.as_secs_f64().ceil().max(1.0) as u64,
        };
        if let Some(budget) = self.limits.tokens_per_day
            && self.day_used.saturating_add(cost) > budget
        {
            let midnight = Duration::from_secs(DAY_S - unix_s % DAY_S);
            let message = format!(
                "You exceeded your current quota: tenant {tenant} has a budget of {budget} tokens per day, \
                 {} are used or reserved and this request needs {cost}. The budget resets at 00:00 UTC.",
                self.day_used
            );
            return Err(refuse(Reason::Quota, message, midnight));
        }
        if let Some(limit) = self.limits.max_concurrent_requests
            && self.in_flight >= limit
        {
            let message = format!(
                "Rate limit reached for tenant {tenant} on concurrent requests: Limit {limit}, Used {}, Requested 1. \
                 Please try again once a request has finished.",
                self.in_flight
            );
            return Err(refuse(Reason::Concurrency, message, Duration::from_secs(1)));
        }
        if let Some(b) = &self.requests
            && b.level < 1.0
        {
            let wait = b.wait_for(1.0);
            let message = per_minute_message(tenant, "requests per min (RPM)", b, 1, wait);
            return Err(refuse(Reason::Requests, message, wait));
        }
        if let Some(b) = &self.tokens {
            if cost as f64 > b.capacity {
                let message = format!(
                    "Request too large for tenant {tenant} on tokens per min (TPM): Limit {}, Requested {cost}. \
                     The input or output tokens must be reduced (set a smaller max_tokens).",
                    b.capacity as u64
                );
                return Err(refuse(Reason::Tokens, message, b.until_full()));
            }
            if (cost as f64) > b.level {
                let wait = b.wait_for(cost as f64);
                let message = per_minute_message(tenant, "tokens per min (TPM)", b, cost, wait);
                return Err(refuse(Reason::Tokens, message, wait));
            }
        }
        self.requests.iter_mut().for_each(|b| b.level -= 1.0);
        self.tokens.iter_mut().for_each(|b| b.level -= cost as f64);
        self.in_flight += 1;
        self.day_used = self.day_used.saturating_add(cost);
        Ok(())
    }

    /// A request reserved `reserved` tokens on `day` and used `used`.
    fn settle(&mut self, reserved: u64, used: u64, day: u64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(b) = &mut self.tokens {
            // Over-use may leave the bucket below zero: a debt the refill pays off.
            b.level = (b.level + reserved as f64 - used as f64).clamp(-b.capacity, b.capacity);
        }
        self.day_used = if day == self.day {
            self.day_used.saturating_sub(reserved).saturating_add(used)
        } else {
            // Admitted yesterday: its usage counts on the day it ended.
            self.day_used.saturating_add(used)
        };
    }
}

fn per_minute_message(tenant: &str, what: &str, b: &Bucket, requested: u64, wait: Duration) -> String {
    format!(
        "Rate limit reached for tenant {tenant} on {what}: Limit {}, Used {}, Requested {requested}. \
         Please try again in {}.",
        b.capacity as u64,
        b.used(),
        format_reset(wait)
    )
}

/// Every tenant's meter.
pub struct Limiter {
    meters: Mutex<HashMap<String, Arc<Mutex<Meter>>>>,
    metrics: TenantMetrics,
}

impl Limiter {
    pub fn new(metrics: TenantMetrics) -> Self {
        Limiter { meters: Mutex::new(HashMap::new()), metrics }
    }

    pub fn metrics(&self) -> &TenantMetrics {
        &self.metrics
    }

    /// Admits one request of `tenant` for `model` that reserves `cost` tokens, now.
    pub fn admit(&self, tenant: &Arc<str>, model: &str, limits: Limits, cost: u64) -> Result<Lease, Limited> {
        self.admit_at(tenant, model, limits, cost, Instant::now(), crate::clock::unix_s())
    }

    fn admit_at(
        &self,
        tenant: &Arc<str>,
        model: &str,
        limits: Limits,
        cost: u64,
        now: Instant,
        unix_s: u64,
    ) -> Result<Lease, Limited> {
        let day = unix_s / DAY_S;
        let meter = self.meter(tenant, limits, now, day);
        let mut m = lock(&meter);
        m.advance(now, day);
        if m.limits != limits {
            m.reconfigure(limits, now);
        }
        if let Err(refused) = m.take(tenant, cost, unix_s) {
            self.metrics.rejected(tenant, model, refused.reason);
            return Err(refused);
        }
        let headers = m.headers();
        drop(m);
        Ok(Lease(Some(Box::new(Held {
            meter,
            tenant: tenant.clone(),
            model: Arc::from(model),
            reserved: cost,
            day,
            prompts: Vec::new(),
            metrics: self.metrics.clone(),
            headers,
        }))))
    }

    /// Forgets the meters of tenants not in `keep` (a replaced key table); requests in flight
    /// settle into the meter they hold.
    pub fn retain(&self, keep: &[&str]) {
        lock(&self.meters).retain(|tenant, _| keep.contains(&tenant.as_str()));
    }

    fn meter(&self, tenant: &str, limits: Limits, now: Instant, day: u64) -> Arc<Mutex<Meter>> {
        lock(&self.meters)
            .entry(tenant.to_string())
            .or_insert_with(|| Arc::new(Mutex::new(Meter::new(limits, now, day))))
            .clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update leaves a meter consistent: a panic elsewhere must not stop the API.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The tokens a request reserves: per prompt, its estimated tokens plus `max_tokens` for each of
/// its `n` choices (when `max_tokens` is unset, the rest of the context: `max_model_len` minus the
/// prompt; nothing if that is unknown). Token-id prompts count exactly; text and chat prompts,
/// which only the replica tokenizes, count one token per 4 bytes (rounded up), as a rough
/// English estimate; the settlement corrects it.
pub fn cost(requests: &[pb::GenerateRequest], max_model_len: u32) -> u64 {
    requests
        .iter()
        .map(|r| {
            let prompt = match &r.prompt {
                Some(pb::generate_request::Prompt::Tokens(t)) => t.token_ids.len() as u64,
                Some(pb::generate_request::Prompt::Text(t)) => (t.text.len() as u64).div_ceil(4),
                Some(pb::generate_request::Prompt::Chat(c)) => (c.messages_json.len() as u64).div_ceil(4),
                None => 0,
            };
            let max_tokens = r.stop.as_ref().map_or(0, |s| s.max_tokens as u64);
            let per_choice = match (r.pooling.is_some(), max_tokens) {
                (true, _) => 0,
                (false, 0) => u64::from(max_model_len).saturating_sub(prompt),
                (false, m) => m,
            };
            prompt.saturating_add(per_choice.saturating_mul(u64::from(r.n.max(1))))
        })
        .fold(0, u64::saturating_add)
}

/// One admitted request's hold on its tenant's limits; settles when dropped (see the module
/// docs). A request without a key holds an empty lease.
#[derive(Default)]
pub struct Lease(Option<Box<Held>>);

struct Held {
    meter: Arc<Mutex<Meter>>,
    tenant: Arc<str>,
    model: Arc<str>,
    reserved: u64,
    day: u64,
    /// Per prompt: what its stream counted so far.
    prompts: Vec<PromptUse>,
    metrics: TenantMetrics,
    /// The `x-ratelimit-*` values right after admission.
    headers: RateHeaders,
}

#[derive(Clone, Copy, Debug, Default)]
struct PromptUse {
    prompt: u64,
    completion: u64,
    cached: u64,
    finished: bool,
}

impl Lease {
    /// The `x-ratelimit-*` values right after this request was admitted.
    pub fn headers(&self) -> RateHeaders {
        self.0.as_ref().map(|held| held.headers.clone()).unwrap_or_default()
    }

    /// Counts what one event of prompt `prompt`'s stream says about its usage: `started`'s
    /// prompt tokens, each delta's tokens, and `finished`'s usage, which is exact and final.
    pub fn observe(&mut self, prompt: usize, event: &Event) {
        let Some(held) = &mut self.0 else { return };
        if held.prompts.len() <= prompt {
            held.prompts.resize(prompt + 1, PromptUse::default());
        }
        let Some(u) = held.prompts.get_mut(prompt).filter(|u| !u.finished) else { return };
        match event {
            Event::Started(s) => u.prompt = u64::from(s.prompt_tokens),
            Event::Delta(d) => u.completion += d.token_ids.len() as u64,
            Event::Finished(f) => {
                let usage = f.usage.unwrap_or_default();
                *u = PromptUse {
                    prompt: u64::from(usage.prompt_tokens),
                    completion: u64::from(usage.completion_tokens),
                    cached: u64::from(usage.cached_tokens.min(usage.prompt_tokens)),
                    finished: true,
                };
            }
            _ => {}
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(held) = self.0.take() else { return };
        let used = held.prompts.iter().fold(Tokens::default(), |t, u| Tokens {
            prompt: t.prompt + u.prompt,
            completion: t.completion + u.completion,
            cached: t.cached + u.cached,
        });
        lock(&held.meter).settle(held.reserved, used.prompt + used.completion, held.day);
        held.metrics.used(&held.tenant, &held.model, used);
    }
}

#[cfg(test)]
#[path = "limits_tests.rs"]
mod tests;
