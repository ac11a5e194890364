use serde_json::json;

use super::*;
use crate::api::edge::usage::TenantMetrics;

fn keys(flags: &[&str], document: Value) -> Keys {
    let flags: Vec<String> = flags.iter().map(|k| k.to_string()).collect();
    let limiter = Limiter::new(TenantMetrics::register(&prometheus::Registry::new(), 31).unwrap());
    let keys = Keys::with_flag_keys(&flags, limiter);
    keys.replace(parse(&document).unwrap()).unwrap();
    keys
}

#[test]
fn keys_are_found_by_hash_plain_or_prehashed() {
    let hashed = hex(&sha256(b"sk-beta"));
    let table = keys(
        &["flag-key"],
        json!({"api_keys": [
            {"tenant": "alpha", "key": "sk-alpha", "models": ["m"], "requests_per_minute": 5},
            {"tenant": "beta", "key_sha256": hashed},
        ]}),
    );
    assert_eq!(&*table.lookup("sk-alpha").unwrap().tenant, "alpha");
    assert_eq!(&*table.lookup("sk-beta").unwrap().tenant, "beta");
    assert_eq!(&*table.lookup("flag-key").unwrap().tenant, DEFAULT_TENANT);
    for wrong in ["", "sk-alph", "sk-alpha ", "SK-ALPHA", &hashed] {
        assert!(table.lookup(wrong).is_none(), "{wrong:?}");
    }
    assert_eq!(table.lookup("sk-alpha").unwrap().limits.requests_per_minute, Some(5));
}

#[test]
fn the_listing_shows_fingerprints_never_keys() {
    let table = keys(&["flag-key"], json!([{"tenant": "alpha", "key": "sk-alpha-secret"}]));
    let listed = serde_json::to_string(&table.list()).unwrap();
    assert!(!listed.contains("sk-alpha-secret") && !listed.contains("flag-key"), "{listed}");
    assert!(!listed.contains(&hex(&sha256(b"sk-alpha-secret"))), "not even the whole hash: {listed}");
    assert!(listed.contains(&format!("sha256:{}", &hex(&sha256(b"sk-alpha-secret"))[..8])), "{listed}");
    assert!(!format!("{:?}", table.lookup("sk-alpha-secret")).contains("sk-alpha-secret"));
}

#[test]
fn broken_documents_name_the_field_and_change_nothing() {
    let cases = [
        (json!({"keys": []}), "api_keys"),
        (json!({"api_keys": {}}), "api_keys"),
        (json!([{"tenant": "a"}]), "api_keys[0].key"),
        (json!([{"tenant": "a", "key": "k", "key_sha256": "00"}]), "api_keys[0].key"),
        (json!([{"tenant": "a", "key_sha256": "xyz"}]), "api_keys[0].key_sha256"),
        (json!([{"tenant": "a", "key": " k"}]), "api_keys[0].key"),
        (json!([{"tenant": "a b", "key": "k"}]), "api_keys[0].tenant"),
        (json!([{"tenant": "", "key": "k"}]), "api_keys[0].tenant"),
        (json!([{"tenant": "a", "key": "k", "requests_per_minute": 0}]), "api_keys[0].requests_per_minute"),
        (json!([{"tenant": "a", "key": "k", "tokens_per_day": -1}]), "api_keys[0].tokens_per_day"),
        (json!([{"tenant": "a", "key": "k", "models": []}]), "api_keys[0].models"),
        (json!([{"tenant": "a", "key": "k", "priority": 1u64 << 40}]), "api_keys[0].priority"),
        (json!([{"tenant": "a", "key": "k", "weight": 0}]), "api_keys[0].weight"),
        (json!([{"tenant": "a", "key": "k", "weight": 10_001}]), "api_keys[0].weight"),
        (json!([{"tenant": "a", "key": "k", "weight": 1.5}]), "api_keys[0].weight"),
        (json!([{"tenant": "a", "key": "k", "rpm": 1}]), "api_keys[0].rpm"),
        (json!([{"tenant": "a", "key": "k"}, {"tenant": "a", "key": "j"}]), "api_keys[1].tenant"),
        (json!([{"tenant": "a", "key": "k"}, {"tenant": "b", "key": "k"}]), "api_keys[1].key"),
    ];
    for (document, field) in cases {
        let error = parse(&document).err().unwrap_or_else(|| panic!("accepted {document}"));
        assert_eq!(error.field, field, "{document}: {error}");
    }
    let table = keys(&["flag-key"], json!([{"tenant": "a", "key": "k"}]));
    let clash = parse(&json!([{"tenant": "default", "key": "other"}])).unwrap();
    assert!(table.replace(clash).is_err());
    let reused = parse(&json!([{"tenant": "b", "key": "flag-key"}])).unwrap();
    assert!(table.replace(reused).is_err());
    assert!(table.lookup("k").is_some(), "a refused table changes nothing");
}

#[test]
fn replacing_the_table_swaps_every_named_key() {
    let table = keys(&[], json!([{"tenant": "a", "key": "old"}]));
    assert!(!table.is_open());
    table.replace(parse(&json!([{"tenant": "a", "key": "new"}])).unwrap()).unwrap();
    assert!(table.lookup("old").is_none());
    assert!(table.lookup("new").is_some());
    table.replace(Vec::new()).unwrap();
    assert!(table.is_open(), "no keys: an open API, as without --api-key");
}

#[test]
fn a_keys_priority_is_the_default_and_the_best_a_request_gets() {
    let table = keys(&[], json!([{"tenant": "a", "key": "k", "priority": 5}, {"tenant": "b", "key": "j"}]));
    let limited = Caller::new(table.lookup("k").unwrap());
    assert_eq!(limited.priority(None), Some(5));
    assert_eq!(limited.priority(Some(1)), Some(5), "may not ask for better");
    assert_eq!(limited.priority(Some(9)), Some(9), "may ask for worse");
    let free = Caller::new(table.lookup("j").unwrap());
    assert_eq!(free.priority(Some(-3)), Some(-3));
    assert_eq!(free.priority(None), None);
    assert_eq!(Caller::default().priority(Some(2)), Some(2));
}

#[test]
fn a_key_may_be_limited_to_models() {
    let table = keys(&[], json!([{"tenant": "a", "key": "k", "models": ["m1"]}, {"tenant": "b", "key": "j"}]));
    let a = Caller::new(table.lookup("k").unwrap());
    assert!(a.may_use("m1") && !a.may_use("m2"));
    assert!(Caller::new(table.lookup("j").unwrap()).may_use("m2"));
}

#[test]
fn a_keys_weight_defaults_to_one_and_is_listed() {
    let table = keys(&["flag-key"], json!([{"tenant": "a", "key": "k", "weight": 10}, {"tenant": "b", "key": "j"}]));
    assert_eq!(table.lookup("k").unwrap().weight, 10);
    assert_eq!(table.lookup("j").unwrap().weight, 1);
    assert_eq!(table.lookup("flag-key").unwrap().weight, 1);
    let weights: Vec<u32> = table.list().iter().map(|k| k.weight).collect();
    assert_eq!(weights, vec![1, 10, 1]);
}

#[test]
fn the_named_keys_document_reads_back_to_the_same_table_without_any_key() {
    let table = keys(
        &["flag-key"],
        json!({"api_keys": [
            {"tenant": "alpha", "key": "sk-alpha-secret", "models": ["m"], "requests_per_minute": 5,
             "tokens_per_minute": 900, "max_concurrent_requests": 2, "tokens_per_day": 10000, "priority": 3, "weight": 7},
            {"tenant": "beta", "key": "sk-beta-secret"},
        ]}),
    );
    let document = table.named_document();
    let text = document.to_string();
    assert!(!text.contains("sk-alpha-secret") && !text.contains("flag-key"), "{text}");
    let again = keys(&["flag-key"], document);
    let listing = |k: &Keys| serde_json::to_value(k.list()).unwrap();
    assert_eq!(listing(&again), listing(&table));
    assert_eq!(&*again.lookup("sk-alpha-secret").unwrap().tenant, "alpha");
    assert_eq!(&*again.lookup("sk-beta-secret").unwrap().tenant, "beta");
    assert_eq!(again.named_document(), table.named_document());
}
