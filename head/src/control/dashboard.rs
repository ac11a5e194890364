//! The web dashboard's files (the repository's `dashboard/` folder), served by the control server.
//!
//! Contract:
//! - `GET /` answers `index.html`; `GET /dashboard/<path>` and `GET /assets/<path>` answer the
//!   file at `<path>` inside the folder (ES modules import each other by relative paths, so the
//!   folder's layout is the URL layout). Anything else under those prefixes is 404
//!   (`{"error": ...}`, as every error of the port).
//! - Every file ships inside the binary (`include_bytes!`, listed in [`EMBEDDED`]): the page needs
//!   no network beyond the head itself, and the Content-Security-Policy sent with it says so.
//! - Caching: file names carry no content hash, so browsers must revalidate (`no-cache`) and an
//!   `ETag` (a hash of the bytes) makes the revalidation a 304. Development files are `no-store`.
//! - `LUMEN_DASHBOARD_DIR=<dir>` (read once, when the router is built) serves the files from that
//!   folder instead, so the UI can be edited without rebuilding. Paths are checked component by
//!   component: no `..`, no absolute paths, no hidden files.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::Path as UrlPath;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// The environment variable naming a folder to serve instead of the embedded files.
pub const DIR_ENV: &str = "LUMEN_DASHBOARD_DIR";

/// The policy sent with every file: nothing may be loaded from, or sent to, another origin.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                   object-src 'none'; base-uri 'self'; frame-ancestors 'self'";

macro_rules! embedded {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!("../../../dashboard/", $path)) as &[u8])),*]
    };
}

/// Every file the page uses, by its path inside `dashboard/`. A unit test checks that this list
/// matches the folder (tests/ excepted), so a new file cannot be forgotten.
pub static EMBEDDED: &[(&str, &[u8])] = embedded![
    "index.html",
    "style.css",
    "favicon.svg",
    "app.js",
    "api.js",
    "util.js",
    "chart.js",
    "sse.js",
    "views/overview.js",
    "views/serve.js",
    "views/charts.js",
    "views/requests.js",
    "views/usage.js",
    "views/playground.js",
];

/// Where the files come from.
#[derive(Clone, Debug)]
pub enum Source {
    Embedded,
    /// A folder on disk (development).
    Dir(PathBuf),
}

impl Source {
    /// `Dir` when [`DIR_ENV`] names a folder, else `Embedded`.
    pub fn from_env() -> Source {
        match std::env::var_os(DIR_ENV) {
            Some(dir) if !dir.is_empty() => {
                tracing::info!(dir = %Path::new(&dir).display(), "serving the dashboard from disk ({DIR_ENV})");
                Source::Dir(PathBuf::from(dir))
            }
            _ => Source::Embedded,
        }
    }
}

/// The dashboard's routes, to merge into the control router.
pub fn router<S: Clone + Send + Sync + 'static>(source: Source) -> Router<S> {
    let source = Arc::new(source);
    let index = {
        let source = source.clone();
        move |headers: HeaderMap| {
            let source = source.clone();
            async move { serve(&source, "index.html", &headers).await }
        }
    };
    let file = move |UrlPath(path): UrlPath<String>, headers: HeaderMap| {
        let source = source.clone();
        async move { serve(&source, &path, &headers).await }
    };
    Router::new()
        .route("/", get(index))
        .route("/dashboard/{*path}", get(file.clone()))
        .route("/assets/{*path}", get(file))
}

async fn serve(source: &Source, path: &str, request: &HeaderMap) -> Response {
    let Some(content_type) = content_type(path) else {
        return not_found();
    };
    match source {
        Source::Embedded => match EMBEDDED.iter().find(|(p, _)| *p == path) {
            Some((_, bytes)) => respond(bytes.to_vec(), content_type, request, true),
            None => not_found(),
        },
        Source::Dir(dir) => {
            let Some(relative) = safe_relative(path) else {
                return not_found();
            };
            match tokio::fs::read(dir.join(relative)).await {
                Ok(bytes) => respond(bytes, content_type, request, false),
                Err(_) => not_found(),
            }
        }
    }
}

fn respond(bytes: Vec<u8>, content_type: &'static str, request: &HeaderMap, embedded: bool) -> Response {
    let etag = format!("\"{:016x}\"", fnv1a(&bytes));
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(if embedded { "no-cache" } else { "no-store" }));
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, value);
    }
    let matches = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim() == etag || tag.trim() == "*"));
    if matches && embedded {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    (StatusCode::OK, headers, bytes).into_response()
}

fn not_found() -> Response {
    super::error::ControlError::new(StatusCode::NOT_FOUND, "no such dashboard file").into_response()
}

/// The content type of a file the dashboard may serve, by extension; `None` for any other file.
pub fn content_type(path: &str) -> Option<&'static str> {
    let extension = path.rsplit_once('.').map(|(_, e)| e)?;
    Some(match extension {
        "html" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "txt" => "text/plain; charset=utf-8",
        _ => return None,
    })
}

/// `path` as a relative path of plain components (no `..`, root, prefix or hidden names).
fn safe_relative(path: &str) -> Option<PathBuf> {
    if path.is_empty() || path.contains('\\') || path.contains('\0') {
        return None;
    }
    let mut out = PathBuf::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(name) if !name.to_string_lossy().starts_with('.') => out.push(name),
            _ => return None,
        }
    }
    Some(out)
}

/// 64-bit FNV-1a: a stable, dependency-free content hash for the `ETag`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    async fn start(source: Source) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app: Router = router(source);
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    fn files_under(dir: &Path, prefix: &str, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).expect("read dashboard dir") {
            let entry = entry.expect("entry");
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = format!("{prefix}{name}");
            if entry.file_type().expect("type").is_dir() {
                if name != "tests" {
                    files_under(&entry.path(), &format!("{path}/"), out);
                }
            } else if content_type(&name).is_some() && name != "README.md" {
                out.insert(path);
            }
        }
    }

    #[test]
    fn every_servable_file_of_the_folder_is_embedded() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboard");
        let mut on_disk = BTreeSet::new();
        files_under(&dir, "", &mut on_disk);
        let embedded: BTreeSet<String> = EMBEDDED.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(on_disk, embedded, "dashboard/ and EMBEDDED differ: list new files in EMBEDDED");
    }

    #[tokio::test]
    async fn serves_the_index_and_assets_with_types_and_revalidation() {
        let base = start(Source::Embedded).await;
        let http = reqwest::Client::new();
        let index = http.get(format!("{base}/")).send().await.expect("index");
        assert_eq!(index.status(), 200);
        assert_eq!(index.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(index.headers()[header::CACHE_CONTROL], "no-cache");
        assert!(index.headers()[header::CONTENT_SECURITY_POLICY].to_str().expect("csp").contains("default-src 'self'"));
        assert!(index.text().await.expect("body").contains("dashboard/app.js"));

        for prefix in ["dashboard", "assets"] {
            let js = http.get(format!("{base}/{prefix}/views/charts.js")).send().await.expect("js");
            assert_eq!(js.status(), 200);
            assert_eq!(js.headers()[header::CONTENT_TYPE], "text/javascript; charset=utf-8");
        }
        let css = http.get(format!("{base}/dashboard/style.css")).send().await.expect("css");
        assert_eq!(css.headers()[header::CONTENT_TYPE], "text/css; charset=utf-8");
        let etag = css.headers()[header::ETAG].clone();
        let again = http
            .get(format!("{base}/dashboard/style.css"))
            .header(header::IF_NONE_MATCH, etag)
            .send()
            .await
            .expect("css");
        assert_eq!(again.status(), 304);
    }

    #[tokio::test]
    async fn unknown_files_and_escapes_are_not_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("ui")).expect("mkdir");
        std::fs::write(dir.path().join("ui/index.html"), "<p>dev</p>").expect("write");
        std::fs::write(dir.path().join("secret.txt"), "secret").expect("write");
        for source in [Source::Embedded, Source::Dir(dir.path().join("ui"))] {
            let base = start(source).await;
            for path in ["/dashboard/missing.js", "/dashboard/../secret.txt", "/dashboard/%2e%2e/secret.txt", "/x.js"] {
                let r = reqwest::get(format!("{base}{path}")).await.expect("get");
                assert_eq!(r.status(), 404, "{path}");
            }
        }
    }

    #[tokio::test]
    async fn a_folder_override_serves_files_from_disk_uncached() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("index.html"), "<p>dev build</p>").expect("write");
        let base = start(Source::Dir(dir.path().to_path_buf())).await;
        let r = reqwest::get(format!("{base}/")).await.expect("get");
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(r.text().await.expect("body"), "<p>dev build</p>");
    }

    #[test]
    fn only_plain_relative_paths_are_accepted_from_disk() {
        assert_eq!(safe_relative("views/a.js"), Some(PathBuf::from("views/a.js")));
        for bad in ["", "../a.js", "/etc/passwd", "a/../../b.js", ".hidden.js", "a\\b.js", "./a.js"] {
            assert_eq!(safe_relative(bad), None, "{bad}");
        }
    }
}
