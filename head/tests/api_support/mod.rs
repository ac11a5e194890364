//! Test support for the OpenAI API: a scripted fake [`Backend`] whose streams report being
//! dropped, and a server on 127.0.0.1 (ephemeral port) in front of it.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lumen_head::api::{ApiConfig, ApiState, router};
use lumen_head::backend::{Backend, BackendError, EventStream, ModelCard, Runner};
use lumen_proto::v1 as pb;
use pb::generate_event::Event;

/// One step of a scripted backend stream.
#[derive(Clone, Debug)]
pub enum Item {
    Event(Event),
    Fail(BackendError),
    Sleep(Duration),
    /// Never yields again (until dropped).
    Hang,
}

type Script = dyn Fn(&pb::GenerateRequest) -> Result<Vec<Item>, BackendError> + Send + Sync;

pub struct FakeBackend {
    pub models: Vec<ModelCard>,
    pub ready: AtomicBool,
    script: Mutex<Arc<Script>>,
    /// Every generate call: (model, request).
    pub requests: Mutex<Vec<(String, pb::GenerateRequest)>>,
    pub tokenize_requests: Mutex<Vec<pb::TokenizeRequest>>,
    pub streams_opened: AtomicUsize,
    pub streams_dropped: Arc<AtomicUsize>,
}

pub fn card(id: &str) -> ModelCard {
    ModelCard {
        id: id.into(),
        max_model_len: 2048,
        created: 1_700_000_000,
        owned_by: "lumen".into(),
        runner: Runner::Generate,
    }
}

pub fn started(prompt_tokens: u32) -> Item {
    Item::Event(Event::Started(pb::Started { prompt_tokens, ..Default::default() }))
}

pub fn delta(index: u32, text: &str) -> Item {
    Item::Event(Event::Delta(pb::Delta { index, text: text.into(), token_ids: vec![7], ..Default::default() }))
}

pub fn last(index: u32, text: &str, reason: pb::FinishReason) -> Item {
    Item::Event(Event::Delta(pb::Delta {
        index,
        text: text.into(),
        token_ids: vec![8],
        finish_reason: reason as i32,
        ..Default::default()
    }))
}

pub fn finished(prompt_tokens: u32, completion_tokens: u32) -> Item {
    Item::Event(Event::Finished(pb::Finished {
        usage: Some(pb::Usage { prompt_tokens, completion_tokens, cached_tokens: 0 }),
        timings: None,
    }))
}

/// Every choice says "Hello" then " world" (finish `stop`); prompt 5 tokens, 2 per choice.
pub fn hello_world(request: &pb::GenerateRequest) -> Result<Vec<Item>, BackendError> {
    let n = request.n.max(1);
    let mut items = vec![started(5)];
    for i in 0..n {
        items.push(delta(i, "Hello"));
    }
    for i in 0..n {
        items.push(last(i, " world", pb::FinishReason::Stop));
    }
    items.push(finished(5, 2 * n));
    Ok(items)
}

/// A pooling model's answer: the vector `[prompt tokens, 1, -0.5]`, where a text prompt has one
/// token per byte; other requests get [`hello_world`].
pub fn embedded_or_hello(request: &pb::GenerateRequest) -> Result<Vec<Item>, BackendError> {
    if request.pooling.is_none() {
        return hello_world(request);
    }
    let tokens = match &request.prompt {
        Some(pb::generate_request::Prompt::Text(t)) => t.text.len() as u32,
        Some(pb::generate_request::Prompt::Tokens(t)) => t.token_ids.len() as u32,
        _ => 0,
    };
    let values = vec![tokens as f32, 1.0, -0.5];
    Ok(vec![started(tokens), Item::Event(Event::Embedding(pb::Embedding { values })), finished(tokens, 0)])
}

impl FakeBackend {
    pub fn new(models: &[&str]) -> Arc<Self> {
        Self::with_cards(models.iter().map(|m| card(m)).collect())
    }

    /// A fake serving `models`; it answers with [`embedded_or_hello`].
    pub fn with_cards(models: Vec<ModelCard>) -> Arc<Self> {
        Arc::new(FakeBackend {
            models,
            ready: AtomicBool::new(true),
            script: Mutex::new(Arc::new(embedded_or_hello)),
            requests: Mutex::default(),
            tokenize_requests: Mutex::default(),
            streams_opened: AtomicUsize::new(0),
            streams_dropped: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Replaces what `generate` answers.
    pub fn script(&self, f: impl Fn(&pb::GenerateRequest) -> Result<Vec<Item>, BackendError> + Send + Sync + 'static) {
        *self.script.lock().unwrap() = Arc::new(f);
    }

    pub fn requests(&self) -> Vec<(String, pb::GenerateRequest)> {
        self.requests.lock().unwrap().clone()
    }

    pub fn dropped(&self) -> usize {
        self.streams_dropped.load(Ordering::SeqCst)
    }

    /// Waits (up to 5 s) until `count` streams were dropped.
    pub async fn wait_dropped(&self, count: usize) -> bool {
        for _ in 0..500 {
            if self.dropped() >= count {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }
}

/// Counts its own drop.
struct DropFlag(Arc<AtomicUsize>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl Backend for FakeBackend {
    fn models(&self) -> Vec<ModelCard> {
        self.models.clone()
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    async fn generate(&self, model: &str, request: pb::GenerateRequest) -> Result<EventStream, BackendError> {
        self.requests.lock().unwrap().push((model.to_string(), request.clone()));
        if !self.models.iter().any(|m| m.id == model) {
            return Err(BackendError::ModelNotFound(model.into()));
        }
        let script = self.script.lock().unwrap().clone();
        let items: VecDeque<Item> = script(&request)?.into();
        self.streams_opened.fetch_add(1, Ordering::SeqCst);
        let flag = DropFlag(self.streams_dropped.clone());
        let stream = futures::stream::unfold((items, flag), |(mut items, flag)| async move {
            loop {
                match items.pop_front()? {
                    Item::Event(e) => return Some((Ok(pb::GenerateEvent { event: Some(e) }), (items, flag))),
                    Item::Fail(e) => return Some((Err(e), (items, flag))),
                    Item::Sleep(d) => tokio::time::sleep(d).await,
                    Item::Hang => futures::future::pending::<()>().await,
                }
            }
        });
        Ok(stream.boxed())
    }

    async fn tokenize(&self, model: &str, request: pb::TokenizeRequest) -> Result<pb::TokenizeReply, BackendError> {
        if !self.models.iter().any(|m| m.id == model) {
            return Err(BackendError::ModelNotFound(model.into()));
        }
        self.tokenize_requests.lock().unwrap().push(request.clone());
        Ok(pb::TokenizeReply {
            token_ids: vec![1, 2, 3],
            count: 3,
            max_model_len: 2048,
            token_strs: if request.return_token_strs { vec!["a".into(), "b".into(), "c".into()] } else { vec![] },
        })
    }

    async fn detokenize(
        &self,
        _model: &str,
        request: pb::DetokenizeRequest,
    ) -> Result<pb::DetokenizeReply, BackendError> {
        Ok(pb::DetokenizeReply { text: format!("text of {:?}", request.token_ids) })
    }
}

/// A running API server.
pub struct Server {
    pub url: String,
    pub state: ApiState,
    pub client: reqwest::Client,
}

impl Server {
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// POSTs `body` (JSON) to `path`.
    pub async fn post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.client.post(self.at(path)).json(&body).send().await.expect("request")
    }

    /// POSTs and returns (status, JSON body).
    pub async fn post_json(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let response = self.post(path, body).await;
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")))
    }
}

/// Serves the API for `backend` with `config` on an ephemeral port.
pub async fn serve(backend: Arc<FakeBackend>, config: ApiConfig) -> Server {
    let state = ApiState::new(backend, config, prometheus::Registry::new()).expect("metrics register");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let app = router(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    Server { url, state, client: reqwest::Client::new() }
}

/// An API server and its control server over one [`ApiState`] that holds named keys.
pub struct KeyedHead {
    pub api: Server,
    /// The control server's URL (its admin token is the one given to [`serve_keyed`]).
    pub control: String,
    pub backend: Arc<FakeBackend>,
    pub http: reqwest::Client,
}

impl KeyedHead {
    /// POSTs `body` (JSON) to the API's `path` with `key` as the bearer token.
    pub async fn post(&self, key: &str, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.http.post(self.api.at(path)).bearer_auth(key).json(&body).send().await.expect("request")
    }
}

/// Serves the API for `backend` with `config` and the named keys of `document` (an
/// `api_keys` section), and the control API with the admin token `admin`, on ephemeral ports.
pub async fn serve_keyed(
    backend: Arc<FakeBackend>,
    config: ApiConfig,
    document: serde_json::Value,
    admin: &str,
) -> KeyedHead {
    use lumen_head::cluster::{Cluster, ClusterSettings};
    use lumen_head::control::{Applications, ControlState};
    let registry = prometheus::Registry::new();
    let state = ApiState::new(backend.clone(), config, registry.clone()).expect("api");
    state.keys().replace(lumen_head::api::edge::keys::parse(&document).expect("keys")).expect("replace");
    let applications = Applications::new(Cluster::new(ClusterSettings::default()), state.clone(), None);
    let control_router =
        lumen_head::control::router(ControlState { applications, registry, admin_token: Some(admin.into()) });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let control = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, control_router).await.expect("serve") });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let app = router(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    let http = reqwest::Client::new();
    KeyedHead { api: Server { url, state, client: http.clone() }, control, backend, http }
}

/// Serves the default fake (one model, `m`) with the default configuration.
pub async fn serve_default() -> (Arc<FakeBackend>, Server) {
    let backend = FakeBackend::new(&["m"]);
    let server = serve(backend.clone(), ApiConfig::default()).await;
    (backend, server)
}

/// Serves a fake with a generation model `m` and a pooling model `e` (default configuration).
pub async fn serve_with_pooling() -> (Arc<FakeBackend>, Server) {
    let backend = FakeBackend::with_cards(vec![card("m"), ModelCard { runner: Runner::Pooling, ..card("e") }]);
    let server = serve(backend.clone(), ApiConfig::default()).await;
    (backend, server)
}

/// An SSE body split into its frames' payloads: `data:` JSON values, plus markers.
#[derive(Debug, Default)]
pub struct Sse {
    pub chunks: Vec<serde_json::Value>,
    pub done: bool,
    pub keep_alives: usize,
    pub raw: String,
}

pub fn parse_sse(raw: &str) -> Sse {
    let mut sse = Sse { raw: raw.to_string(), ..Default::default() };
    for frame in raw.split("\n\n").filter(|f| !f.is_empty()) {
        if frame.starts_with(':') {
            sse.keep_alives += 1;
        } else if frame == "data: [DONE]" {
            assert!(!sse.done, "[DONE] twice");
            sse.done = true;
        } else {
            assert!(!sse.done, "data after [DONE]: {frame}");
            let json = frame.strip_prefix("data: ").unwrap_or_else(|| panic!("not a data frame: {frame:?}"));
            sse.chunks.push(serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}")));
        }
    }
    sse
}

/// POSTs a streaming request and reads the whole SSE body.
pub async fn stream(server: &Server, path: &str, body: serde_json::Value) -> (u16, Sse) {
    let response = server.post(path, body).await;
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, parse_sse(&text))
}

/// The concatenated `field` of every chunk's choice `index` (`delta.content`, `text`, ...).
pub fn joined(chunks: &[serde_json::Value], index: u64, pointer: &str) -> String {
    chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().cloned().unwrap_or_default())
        .filter(|choice| choice["index"] == index)
        .filter_map(|choice| choice.pointer(pointer).and_then(|v| v.as_str()).map(String::from))
        .collect()
}
