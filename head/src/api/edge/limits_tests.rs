use prometheus::Registry;

use super::*;
use crate::api::edge::usage::UsageFilter;

const T0: u64 = 1_700_000_000; // some UTC time, not near midnight (1_700_006_400 is)

fn limiter() -> Limiter {
    Limiter::new(TenantMetrics::register(&Registry::new(), 31).expect("metrics"))
}

fn tenant() -> Arc<str> {
    Arc::from("acme")
}

fn finished(prompt_tokens: u32, completion_tokens: u32) -> Event {
    Event::Finished(pb::Finished {
        usage: Some(pb::Usage { prompt_tokens, completion_tokens, cached_tokens: 0 }),
        ..Default::default()
    })
}

#[test]
fn requests_per_minute_refill_continuously() {
    let (l, t, now) = (limiter(), tenant(), Instant::now());
    let limits = Limits { requests_per_minute: Some(2), ..Limits::default() };
    let a = l.admit_at(&t, "m", limits, 0, now, T0).unwrap();
    assert_eq!(a.headers().requests.unwrap().remaining, 1);
    let _b = l.admit_at(&t, "m", limits, 0, now, T0).unwrap();
    let refused = l.admit_at(&t, "m", limits, 0, now, T0).err().expect("third request in the same instant");
    assert_eq!(refused.reason, Reason::Requests);
    assert!(refused.message.contains("Limit 2, Used 2, Requested 1"), "{}", refused.message);
    assert!(refused.message.contains("try again in 30s"), "{}", refused.message);
    assert_eq!(refused.retry_after_s, 30);
    let window = refused.headers.requests.unwrap();
    assert_eq!((window.limit, window.remaining, window.reset), (2, 0, Duration::from_secs(60)));
    // Ending a request does not give a request back; time does: 2/min = one every 30 s.
    drop(a);
    assert!(l.admit_at(&t, "m", limits, 0, now + Duration::from_secs(29), T0).is_err());
    assert!(l.admit_at(&t, "m", limits, 0, now + Duration::from_secs(30), T0).is_ok());
}

#[test]
fn tokens_are_reserved_then_settled_on_real_usage() {
    let (l, t, now) = (limiter(), tenant(), Instant::now());
    let limits = Limits { tokens_per_minute: Some(1000), ..Limits::default() };
    let mut big = l.admit_at(&t, "m", limits, 900, now, T0).unwrap();
    assert_eq!(big.headers().tokens.unwrap().remaining, 100);
    let refused = l.admit_at(&t, "m", limits, 200, now, T0).err().expect("900 reserved of 1000");
    assert_eq!(refused.reason, Reason::Tokens);
    assert!(refused.message.contains("Limit 1000, Used 900, Requested 200"), "{}", refused.message);
    big.observe(0, &finished(10, 40));
    drop(big);
    // 850 of the 900 came back.
    let small = l.admit_at(&t, "m", limits, 950, now, T0).unwrap();
    assert_eq!(small.headers().tokens.unwrap().remaining, 0);
}

#[test]
fn a_dropped_stream_settles_on_what_it_counted() {
    let (l, t, now) = (limiter(), tenant(), Instant::now());
    let limits = Limits { tokens_per_minute: Some(100), ..Limits::default() };
    let mut lease = l.admit_at(&t, "m", limits, 100, now, T0).unwrap();
    lease.observe(0, &Event::Started(pb::Started { prompt_tokens: 5, ..Default::default() }));
    lease.observe(0, &Event::Delta(pb::Delta { token_ids: vec![1, 2, 3], ..Default::default() }));
    drop(lease);
    let next = l.admit_at(&t, "m", limits, 0, now, T0).unwrap();
    assert_eq!(next.headers().tokens.unwrap().remaining, 92);
}

#[test]
fn a_request_larger_than_the_token_limit_is_refused_as_too_large() {
    let (l, t, now) = (limiter(), tenant(), Instant::now());
    let limits = Limits { tokens_per_minute: Some(100), ..Limits::default() };
    let refused = l.admit_at(&t, "m", limits, 101, now, T0).err().unwrap();
    assert_eq!(refused.reason, Reason::Tokens);
    assert!(refused.message.starts_with("Request too large"), "{}", refused.message);
}

#[test]
fn concurrency_slots_are_freed_when_leases_drop() {
    let (l, t, now) = (limiter(), tenant(), Instant::now());
    let limits = Limits { max_concurrent_requests: Some(1), ..Limits::default() };
    let first = l.admit_at(&t, "m", limits, 0, now, T0).unwrap();
    assert_eq!(l.admit_at(&t, "m", limits, 0, now, T0).err().unwrap().reason, Reason::Concurrency);
    drop(first);
    assert!(l.admit_at(&t, "m", limits, 0, now, T0).is_ok());
}

#[test]
fn the_daily_budget_is_a_quota_that_resets_at_utc_midnight() {
    let (l, t, now) = (limiter(), tenant(), Instant::now());
    let limits = Limits { tokens_per_day: Some(100), ..Limits::default() };
    let mut lease = l.admit_at(&t, "m", limits, 100, now, T0).unwrap();
    lease.observe(0, &finished(20, 50));
    drop(lease);
    assert!(l.admit_at(&t, "m", limits, 30, now, T0).is_ok(), "70 used, 30 left");
    let refused = l.admit_at(&t, "m", limits, 31, now, T0).err().unwrap();
    assert_eq!(refused.reason, Reason::Quota);
    let midnight = (T0 / DAY_S + 1) * DAY_S;
    assert_eq!(refused.retry_after_s, midnight - T0);
    assert!(l.admit_at(&t, "m", limits, 100, now, midnight).is_ok(), "a new day");
}

#[test]
fn a_refusal_takes_nothing() {
    let (l, t, now) = (limiter(), tenant(), Instant::now());
    let limits = Limits { requests_per_minute: Some(5), tokens_per_minute: Some(10), ..Limits::default() };
    for _ in 0..3 {
        assert!(l.admit_at(&t, "m", limits, 11, now, T0).is_err());
    }
    let lease = l.admit_at(&t, "m", limits, 10, now, T0).unwrap();
    assert_eq!(lease.headers().requests.unwrap().remaining, 4);
}

#[test]
fn new_limits_keep_what_was_used() {
    let (l, t, now) = (limiter(), tenant(), Instant::now());
    let before = Limits { requests_per_minute: Some(10), ..Limits::default() };
    for _ in 0..4 {
        l.admit_at(&t, "m", before, 0, now, T0).unwrap();
    }
    let after = Limits { requests_per_minute: Some(5), ..Limits::default() };
    assert_eq!(l.admit_at(&t, "m", after, 0, now, T0).unwrap().headers().requests.unwrap().remaining, 0);
}

#[test]
fn settled_tokens_are_counted_per_tenant() {
    let l = limiter();
    let mut lease = l.admit_at(&tenant(), "m", Limits::default(), 0, Instant::now(), T0).unwrap();
    lease.observe(0, &finished(3, 4));
    let mut cached = finished(2, 1);
    if let Event::Finished(f) = &mut cached {
        f.usage.as_mut().unwrap().cached_tokens = 2;
    }
    lease.observe(1, &cached);
    drop(lease);
    let rows = l.metrics().ledger().rows(&UsageFilter::default());
    assert_eq!(rows.len(), 1);
    assert_eq!((&*rows[0].tenant, &*rows[0].model), ("acme", "m"));
    assert_eq!(rows[0].counts.tokens, Tokens { prompt: 5, completion: 5, cached: 2 });
}

#[test]
fn reset_durations_are_written_as_openai_writes_them() {
    let cases = [
        (Duration::from_millis(120), "120ms"),
        (Duration::ZERO, "0ms"),
        (Duration::from_secs(1), "1s"),
        (Duration::from_millis(1500), "1.5s"),
        (Duration::from_millis(6_020), "6.02s"),
        (Duration::from_secs(360), "6m0s"),
        (Duration::from_secs(3723), "1h2m3s"),
    ];
    for (d, text) in cases {
        assert_eq!(format_reset(d), text, "{d:?}");
    }
}

#[test]
fn the_reservation_is_the_prompt_plus_max_tokens_per_choice() {
    use pb::generate_request::Prompt;
    let request = |prompt: Prompt, max_tokens: u32, n: u32| pb::GenerateRequest {
        prompt: Some(prompt),
        stop: Some(pb::StopParams { max_tokens, ..Default::default() }),
        n,
        ..Default::default()
    };
    let tokens = || Prompt::Tokens(pb::TokenPrompt { token_ids: vec![1; 10] });
    let text = Prompt::Text(pb::TextPrompt { text: "x".repeat(9), add_special_tokens: true });
    assert_eq!(cost(&[request(tokens(), 5, 2)], 2048), 20);
    assert_eq!(cost(&[request(text, 5, 1)], 2048), 3 + 5);
    assert_eq!(cost(&[request(tokens(), 0, 1)], 100), 100, "no max_tokens: the rest of the context");
    let mut embed = request(tokens(), 0, 1);
    embed.pooling = Some(Default::default());
    assert_eq!(cost(&[embed.clone(), embed], 2048), 20, "pooling generates nothing");
}
