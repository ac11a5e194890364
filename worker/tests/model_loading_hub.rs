//! Hub id resolution against Hugging Face cache layouts built in temp dirs (no network here):
//! refs -> commit -> snapshot, revisions, incomplete snapshots, and the offline errors. Each
//! test passes its own cache root, never environment variables (tests run in parallel threads).

use std::path::{Path, PathBuf};

use lumen_worker::model::hub::{CacheStatus, check_cache, resolve_hub_model};
use lumen_worker::model::location::resolve_model_with;
use lumen_worker::model::{HubFileSet, HubModelId, HubSettings, LoadFormat, ModelLocation};

const REPO: &str = "acme/tiny-llama";
const MAIN: &str = "0123456789abcdef0123456789abcdef01234567";
const V1: &str = "89abcdef0123456789abcdef0123456789abcdef";

/// Writes `files` into snapshot `commit` of REPO (as blobs + symlinks, like real clients) and
/// points `refs/<ref_name>` at it.
fn snapshot(cache: &Path, ref_name: Option<&str>, commit: &str, files: &[(&str, &str)]) -> PathBuf {
    let repo = cache.join("models--acme--tiny-llama");
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    for (i, (name, body)) in files.iter().enumerate() {
        let blob = repo.join("blobs").join(format!("{commit}-{i}"));
        std::fs::write(&blob, body).unwrap();
        std::os::unix::fs::symlink(&blob, snap.join(name)).unwrap();
    }
    if let Some(r) = ref_name {
        let ref_path = repo.join("refs").join(r);
        std::fs::create_dir_all(ref_path.parent().unwrap()).unwrap();
        std::fs::write(ref_path, commit).unwrap();
    }
    snap
}

const INDEX: &str =
    r#"{"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#;

fn base_files() -> Vec<(&'static str, &'static str)> {
    vec![("config.json", "{}"), ("tokenizer.json", "{}"), ("tokenizer_config.json", "{}")]
}

fn offline(cache: &Path) -> HubSettings {
    HubSettings { cache_dir: cache.to_path_buf(), offline: true, token: None, endpoint: None }
}

fn id(s: &str) -> HubModelId {
    HubModelId::parse(s).unwrap()
}

#[test]
fn complete_single_file_snapshot_resolves_through_refs_main() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = base_files();
    files.push(("model.safetensors", "weights"));
    let snap = snapshot(tmp.path(), Some("main"), MAIN, &files);
    let got = resolve_hub_model(&id(REPO), HubFileSet::Full, &offline(tmp.path())).unwrap();
    assert_eq!(got, snap);
}

#[test]
fn sharded_snapshot_with_a_missing_shard_is_incomplete_and_offline_says_which() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = base_files();
    files.push(("model.safetensors.index.json", INDEX));
    files.push(("model-00001-of-00002.safetensors", "shard 1"));
    let snap = snapshot(tmp.path(), Some("main"), MAIN, &files);

    let status = check_cache(tmp.path(), &id(REPO), HubFileSet::Full).unwrap();
    assert_eq!(
        status,
        CacheStatus { snapshot: Some(snap.clone()), missing: vec!["model-00002-of-00002.safetensors".into()] }
    );

    let err = resolve_hub_model(&id(REPO), HubFileSet::Full, &offline(tmp.path())).unwrap_err().to_string();
    assert!(
        err.contains(REPO) && err.contains("model-00002-of-00002.safetensors") && err.contains("HF_HUB_OFFLINE=1"),
        "{err}"
    );

    // Once the shard is there, the same snapshot is complete.
    std::fs::write(snap.join("model-00002-of-00002.safetensors"), "shard 2").unwrap();
    assert_eq!(resolve_hub_model(&id(REPO), HubFileSet::Full, &offline(tmp.path())).unwrap(), snap);
}

#[test]
fn dangling_symlink_counts_as_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = base_files();
    files.push(("model.safetensors", "weights"));
    snapshot(tmp.path(), Some("main"), MAIN, &files);
    let blob = tmp.path().join("models--acme--tiny-llama/blobs").join(format!("{MAIN}-3"));
    std::fs::remove_file(blob).unwrap();
    let status = check_cache(tmp.path(), &id(REPO), HubFileSet::Full).unwrap();
    assert_eq!(status.missing.len(), 1);
    assert!(status.missing[0].starts_with("model.safetensors"), "{:?}", status.missing);
}

#[test]
fn revision_ref_selects_its_own_snapshot_and_commits_need_no_ref() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = base_files();
    files.push(("model.safetensors", "weights"));
    let main = snapshot(tmp.path(), Some("main"), MAIN, &files);
    let v1 = snapshot(tmp.path(), Some("v1.0"), V1, &files);
    let settings = offline(tmp.path());
    assert_eq!(resolve_hub_model(&id(REPO), HubFileSet::Full, &settings).unwrap(), main);
    assert_eq!(resolve_hub_model(&id("acme/tiny-llama@v1.0"), HubFileSet::Full, &settings).unwrap(), v1);
    assert_eq!(resolve_hub_model(&id(&format!("{REPO}@{V1}")), HubFileSet::Full, &settings).unwrap(), v1);
    // A ref the cache has never seen is not silently replaced by main.
    let err = resolve_hub_model(&id("acme/tiny-llama@v2.0"), HubFileSet::Full, &settings).unwrap_err().to_string();
    assert!(err.contains("acme/tiny-llama@v2.0") && err.contains("not in the local cache"), "{err}");
}

#[test]
fn uncached_repo_offline_lists_what_it_needs() {
    let tmp = tempfile::tempdir().unwrap();
    let err = resolve_hub_model(&id(REPO), HubFileSet::Full, &offline(tmp.path())).unwrap_err().to_string();
    for want in [REPO, "not in the local cache", "config.json", "tokenizer.json", "model.safetensors", "HF_HUB_OFFLINE"]
    {
        assert!(err.contains(want), "missing `{want}` in: {err}");
    }
}

#[test]
fn corrupt_cached_index_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = base_files();
    files.push(("model.safetensors.index.json", "<html>rate limited</html>"));
    snapshot(tmp.path(), Some("main"), MAIN, &files);
    let err = check_cache(tmp.path(), &id(REPO), HubFileSet::Full).unwrap_err().to_string();
    assert!(err.contains("model.safetensors.index.json"), "{err}");
}

#[test]
fn dummy_format_needs_only_config_json_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let snap = snapshot(tmp.path(), Some("main"), MAIN, &[("config.json", "{}")]);
    let settings = offline(tmp.path());
    assert_eq!(resolve_model_with(REPO, LoadFormat::Dummy, &settings).unwrap(), ModelLocation::HfDir(snap));
    let err = resolve_model_with(REPO, LoadFormat::Auto, &settings).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json") && err.contains("incomplete"), "{err}");
}

#[test]
fn download_failure_names_repo_and_file() {
    // An endpoint nobody listens on: the error must still say which repo and file failed.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let tmp = tempfile::tempdir().unwrap();
    let settings = HubSettings {
        cache_dir: tmp.path().to_path_buf(),
        offline: false,
        token: None,
        endpoint: Some(format!("http://127.0.0.1:{port}")),
    };
    let err = resolve_hub_model(&id(REPO), HubFileSet::Full, &settings).unwrap_err().to_string();
    assert!(err.contains(REPO) && err.contains("config.json"), "{err}");
}
