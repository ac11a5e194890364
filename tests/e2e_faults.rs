//! Faults end to end, with real `lumen` processes serving SmolLM2 (issue 8):
//! - a client that stops reading its stream neither stalls other requests nor holds its request
//!   on the worker past `--stream-send-timeout-s`;
//! - a network cut between head and worker (a loopback TCP proxy on both paths, cut then
//!   restored) makes the head mark the worker dead and answer 503, and heals by itself;
//! - a silent partition (the proxies stop moving bytes but close nothing, as when packets are
//!   dropped) ends the stream in flight with an error event within seconds, and heals by itself;
//! - SIGTERM on a separate `lumen head` stops admissions, finishes the stream in flight, exits 0.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lumen_proto::v1 as pb;
use serde_json::{Value, json};
use support::{Lumen, head_args, head_flags, model_path, until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the worker's own gRPC `Stats` says: (requests running or waiting, requests aborted).
async fn worker_load(worker_grpc: &str) -> (u32, u64) {
    let Ok(mut client) = pb::worker_client::WorkerClient::connect(worker_grpc.to_string()).await else {
        return (u32::MAX, 0);
    };
    let Ok(stats) = client.stats(pb::StatsRequest {}).await else { return (u32::MAX, 0) };
    let replicas = stats.into_inner().replicas;
    (replicas.iter().map(|r| r.running + r.waiting).sum(), replicas.iter().map(|r| r.requests_finished_abort).sum())
}

/// The value of an unlabelled counter on a `/metrics` page (0 when absent).
async fn counter(http: &reqwest::Client, metrics_url: &str, name: &str) -> f64 {
    let Ok(response) = http.get(metrics_url).send().await else { return 0.0 };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A short non-streaming completion; its status, and its completion tokens when 200.
async fn short_completion(http: &reqwest::Client, api: &str) -> Result<(u16, u64), reqwest::Error> {
    let body = json!({"model": "smol", "prompt": "The capital of France is", "max_tokens": 8, "ignore_eos": true});
    let response = http.post(format!("{api}/v1/completions")).json(&body).send().await?;
    let status = response.status().as_u16();
    let value: Value = response.json().await.unwrap_or_default();
    Ok((status, value["usage"]["completion_tokens"].as_u64().unwrap_or(0)))
}

/// Opens a connection that takes little from the head before it pushes back (a 4 KB receive
/// buffer, and a 536-byte MSS, which keeps the head's send buffer near 100 KB instead of the
/// megabytes loopback's 64 KB MSS gives it), sends `body` as a streaming chat request, and
/// returns the connection without reading anything from it.
async fn stalled_client(api: SocketAddr, body: &Value) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.set_tcp_mss(536).expect("TCP_MAXSEG");
    socket.connect(&api.into()).expect("connect");
    socket.set_nonblocking(true).expect("non-blocking");
    let mut stream = TcpStream::from_std(socket.into()).expect("tokio stream");
    let body = body.to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {api}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("send the request");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_aborted_and_stalls_no_one_else() {
    let mut args =
        vec!["serve".to_string(), "--model".into(), model_path(), "--served-model-name".into(), "smol".into()];
    args.extend(head_flags());
    args.extend(
        ["--threads", "2", "--max-model-len", "1024", "--kv-cache-memory", "128MiB", "--stream-send-timeout-s", "3"]
            .map(String::from),
    );
    let lumen = Lumen::start(&args);
    let http = reqwest::Client::new();
    lumen.wait_healthy(&http).await;
    let (api, worker, metrics) = (lumen.url("api"), lumen.url("worker"), format!("{}/metrics", lumen.url("api")));

    // 4 choices with 20 alternatives per token: about 6 KB of SSE per step, enough to fill the
    // connection's buffers within a few dozen steps, far from done when it is aborted.
    let body = json!({"model": "smol", "messages": [{"role": "user", "content": "Tell me a long story"}],
                      "max_tokens": 900, "ignore_eos": true, "n": 4, "logprobs": true, "top_logprobs": 20,
                      "temperature": 1.0, "stream": true});
    let mut stalled = stalled_client(lumen.addr("api"), &body).await;
    until("the stalled request runs on the worker", Duration::from_secs(30), || async {
        worker_load(&worker).await.0 >= 1
    })
    .await;

    // Other clients are served promptly meanwhile.
    let started = Instant::now();
    let others = futures::future::join_all((0..3).map(|_| short_completion(&http, &api))).await;
    for other in others {
        assert_eq!(other.expect("another client's request"), (200, 8));
    }
    assert!(started.elapsed() < Duration::from_secs(30), "other requests took {:?}", started.elapsed());

    // The head gives up on the stalled stream and the worker frees its request.
    until("the head aborts the stalled stream", Duration::from_secs(120), || async {
        counter(&http, &metrics, "lumen_serve_stream_send_timeouts_total").await >= 1.0
    })
    .await;
    until("the worker frees the stalled request", Duration::from_secs(10), || async {
        worker_load(&worker).await.0 == 0
    })
    .await;
    assert!(worker_load(&worker).await.1 >= 1, "the stalled request was aborted, not run to its end");
    let (status, tokens) = short_completion(&http, &api).await.expect("a request after the abort");
    assert_eq!((status, tokens), (200, 8));

    // When the stalled client reads at last, its stream is cut: no `[DONE]`, the connection closes.
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the head kept the stalled connection open");
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200"), "{}", &text[..text.len().min(200)]);
    assert!(!text.contains("data: [DONE]"), "an aborted stream must not look complete");
}

/// What a [`Proxy`] does with its traffic.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Link {
    /// Bytes flow both ways.
    Up,
    /// Every connection is dropped; new ones are closed at once (both sides see a reset).
    Cut,
    /// A partition that drops packets: connections stay open, but no byte moves either way
    /// (nor does a new connection get through) until the link is up again; what was sent then
    /// arrives, as TCP retransmission delivers it after a partition heals.
    Silent,
}

/// A loopback TCP proxy to `target` whose link a test can cut, silence and restore.
struct Proxy {
    addr: SocketAddr,
    link: watch::Sender<Link>,
    task: JoinHandle<()>,
}

/// Copies `from` to `to` while the link is up; stops reading while it is silent, and ends when
/// it is cut or either side closes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut link: watch::Receiver<Link>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if link.wait_for(|l| *l != Link::Silent).await.map_or(true, |l| *l == Link::Cut) {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = link.changed() => continue,
        };
        if link.wait_for(|l| *l != Link::Silent).await.map_or(true, |l| *l == Link::Cut) {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (link, watching) = watch::channel(Link::Up);
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else { continue };
                let mut link = watching.clone();
                tokio::spawn(async move {
                    // A silent link holds the connection without dialing on.
                    if link.wait_for(|l| *l != Link::Silent).await.map_or(true, |l| *l == Link::Cut) {
                        return;
                    }
                    let Ok(outbound) = TcpStream::connect(target).await else { return };
                    let ((in_read, in_write), (out_read, out_write)) = (inbound.into_split(), outbound.into_split());
                    tokio::join!(pump(in_read, out_write, link.clone()), pump(out_read, in_write, link));
                });
            }
        });
        Proxy { addr, link, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set(&self, link: Link) {
        self.link.send_replace(link);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A head and a worker `w1` whose every connection goes through a proxy: the worker's
/// registration and heartbeats to the head, and the head's calls to the worker (its advertised
/// address).
struct ProxiedCluster {
    head: Lumen,
    to_head: Proxy,
    to_worker: Proxy,
    _worker: Lumen,
    _dir: tempfile::TempDir,
}

impl ProxiedCluster {
    async fn start() -> ProxiedCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let head = Lumen::start(&head_args(serve_config(dir.path())));
        let to_head = Proxy::start(head.addr("grpc")).await;
        let worker_port = free_port();
        let to_worker = Proxy::start(SocketAddr::from(([127, 0, 0, 1], worker_port))).await;
        let worker_args = [
            "worker",
            "--head",
            &to_head.url(),
            "--host",
            "127.0.0.1",
            "--port",
            &worker_port.to_string(),
            "--advertise-address",
            &to_worker.url(),
            "--metrics-port",
            "0",
            "--worker-id",
            "w1",
        ]
        .map(String::from);
        let worker = Lumen::start(&worker_args);
        head.wait_healthy(&reqwest::Client::new()).await;
        ProxiedCluster { head, to_head, to_worker, _worker: worker, _dir: dir }
    }

    fn set_links(&self, link: Link) {
        self.to_head.set(link);
        self.to_worker.set(link);
    }

    /// Waits until the head sees the worker dead; a request is then refused with 503.
    async fn expect_worker_dead(&self, http: &reqwest::Client) {
        until("the head marks the cut-off worker dead", Duration::from_secs(15), || async {
            !worker_alive(http, &self.head, "w1").await
        })
        .await;
        let api = self.head.url("api");
        let (status, _) = short_completion(http, &api).await.expect("during the partition");
        assert_eq!(status, 503, "no live replica while the worker is cut off");
        assert_eq!(http.get(format!("{api}/health")).send().await.expect("health").status(), 503);
    }

    /// Restores the links and waits until the worker is back and requests succeed.
    async fn heal(&self, http: &reqwest::Client) {
        self.set_links(Link::Up);
        until("the worker is back by itself", Duration::from_secs(60), || async {
            worker_alive(http, &self.head, "w1").await
        })
        .await;
        until("requests succeed again", Duration::from_secs(60), || async {
            matches!(short_completion(http, &self.head.url("api")).await, Ok((200, 8)))
        })
        .await;
    }
}

fn serve_config(dir: &Path) -> String {
    let config = dir.join("serve.yaml");
    std::fs::write(
        &config,
        format!(
            "applications:\n  - name: chat\n    deployments:\n      - name: llm\n        model:\n          source: {}\n          \
             served_model_name: smol\n          threads: 2\n          max_model_len: 1024\n          kv_cache_memory: 64MiB\n",
            model_path()
        ),
    )
    .expect("write the serve config");
    config.display().to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Whether the head sees worker `id` alive.
async fn worker_alive(http: &reqwest::Client, head: &Lumen, id: &str) -> bool {
    let Ok(response) = http.get(format!("{}/api/cluster", head.url("dashboard"))).send().await else { return false };
    let view: Value = response.json().await.unwrap_or_default();
    view["workers"].as_array().is_some_and(|ws| ws.iter().any(|w| w["id"] == id && w["alive"] == true))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_cut_between_head_and_worker_heals_without_an_operator() {
    let cluster = ProxiedCluster::start().await;
    let http = reqwest::Client::new();
    assert_eq!(short_completion(&http, &cluster.head.url("api")).await.expect("before the cut"), (200, 8));

    cluster.set_links(Link::Cut);
    let cut_at = Instant::now();
    cluster.expect_worker_dead(&http).await;
    // Stay cut well past the heartbeat timeout (3 x 300 ms) before healing.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(cut_at.elapsed())).await;
    cluster.heal(&http).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_partition_ends_the_stream_in_flight_with_an_error_and_heals_without_an_operator() {
    let cluster = ProxiedCluster::start().await;
    let http = reqwest::Client::new();
    let body =
        json!({"model": "smol", "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": true, "stream": true});
    let response =
        http.post(format!("{}/v1/completions", cluster.head.url("api"))).json(&body).send().await.expect("stream");
    let mut stream = response.bytes_stream();
    let first = stream.next().await.expect("first chunk").expect("chunk");
    assert!(String::from_utf8_lossy(&first).contains("data: "));

    // Packets stop: no connection closes, so only the missed heartbeats tell the head.
    cluster.set_links(Link::Silent);
    // The stream in flight ends with an error event once the worker is marked dead and the
    // stream stayed silent for the grace (5 s), not when HTTP/2 keepalive would notice (~40 s).
    let rest = tokio::time::timeout(Duration::from_secs(25), async {
        let mut rest = String::new();
        while let Some(chunk) = stream.next().await {
            rest.push_str(&String::from_utf8_lossy(&chunk.expect("the body ends cleanly")));
        }
        rest
    })
    .await
    .expect("the stream in flight ends while the partition lasts");
    assert!(rest.contains("\"error\"") && rest.contains("missed its heartbeats"), "an error event names why: {rest}");
    assert!(!rest.contains("\"finish_reason\":\"length\""), "the request did not complete: {rest}");
    assert!(rest.trim_end().ends_with("data: [DONE]"), "the body still ends properly: {rest}");
    cluster.expect_worker_dead(&http).await;

    // Healed, the worker's delayed heartbeats arrive and it serves again, with no operator.
    cluster.heal(&http).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_a_head_stops_admissions_and_finishes_the_stream_in_flight() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut head = Lumen::start(&head_args(serve_config(dir.path())));
    let _worker = Lumen::start(&support::worker_flags(&head.url("grpc"), "w1"));
    let http = reqwest::Client::new();
    head.wait_healthy(&http).await;
    let api = head.url("api");

    let body =
        json!({"model": "smol", "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": true, "stream": true});
    let response = http.post(format!("{api}/v1/completions")).json(&body).send().await.expect("stream");
    let mut stream = response.bytes_stream();
    let first = stream.next().await.expect("first chunk").expect("chunk");
    assert!(String::from_utf8_lossy(&first).contains("data: "));
    let reading = tokio::spawn(async move {
        let mut rest = String::new();
        while let Some(chunk) = stream.next().await {
            rest.push_str(&String::from_utf8_lossy(&chunk.expect("the stream ends cleanly")));
        }
        rest
    });

    head.terminate();
    // New requests are refused (on fresh connections) while the stream is still in flight.
    let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client");
    until("the head stops admitting", Duration::from_secs(10), || async {
        match short_completion(&fresh, &api).await {
            Err(_) => true,
            Ok((status, _)) => status == 503,
        }
    })
    .await;
    assert!(!reading.is_finished(), "the stream should still be in flight when admissions stop");

    let rest = tokio::time::timeout(Duration::from_secs(60), reading).await.expect("the stream ends").expect("reader");
    assert!(rest.contains("\"finish_reason\":\"length\""), "the in-flight request completes: {rest}");
    assert!(rest.trim_end().ends_with("data: [DONE]"));
    assert_eq!(head.wait_exit(Duration::from_secs(20)), Some(0));
}
