//! Registration and heartbeats against a fake `Head` server on 127.0.0.1:0 that records what
//! the worker sends, including a head that goes away and comes back on the same port.

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use lumen_proto::PROTOCOL_VERSION;
use lumen_proto::v1 as pb;
use lumen_proto::v1::head_server::{Head, HeadServer};
use lumen_worker::service::{RegistrationConfig, WorkerNode, detect_resources, spawn_registration};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

const ADVERTISED: &str = "http://127.0.0.1:50999";

/// A head that answers `Register` with `protocol_version` and a 100 ms heartbeat interval, and
/// forwards everything it receives to the test.
#[derive(Clone)]
struct FakeHead {
    protocol_version: u32,
    registers: mpsc::UnboundedSender<pb::RegisterRequest>,
    heartbeats: mpsc::UnboundedSender<pb::WorkerHeartbeat>,
    stop: CancellationToken,
}

#[tonic::async_trait]
impl Head for FakeHead {
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterReply>, Status> {
        let _ = self.registers.send(request.into_inner());
        Ok(Response::new(pb::RegisterReply { protocol_version: self.protocol_version, heartbeat_interval_ms: 100 }))
    }

    type HeartbeatStream = Pin<Box<dyn Stream<Item = Result<pb::HeartbeatAck, Status>> + Send>>;

    async fn heartbeat(
        &self,
        request: Request<Streaming<pb::WorkerHeartbeat>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let (sink, stop) = (self.heartbeats.clone(), self.stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("the head is shutting down"))).await;
                        return;
                    }
                    message = inbound.message() => match message {
                        Ok(Some(hb)) => {
                            let _ = sink.send(hb);
                            if tx.send(Ok(pb::HeartbeatAck { unix_ms: 0 })).await.is_err() {
                                return;
                            }
                        }
                        _ => return,
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct RunningHead {
    addr: SocketAddr,
    registers: mpsc::UnboundedReceiver<pb::RegisterRequest>,
    heartbeats: mpsc::UnboundedReceiver<pb::WorkerHeartbeat>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl RunningHead {
    async fn start(listener: TcpListener, protocol_version: u32) -> RunningHead {
        let addr = listener.local_addr().unwrap();
        let (reg_tx, registers) = mpsc::unbounded_channel();
        let (hb_tx, heartbeats) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let head = FakeHead { protocol_version, registers: reg_tx, heartbeats: hb_tx, stop: stop.clone() };
        let shutdown = stop.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            Server::builder()
                .add_service(HeadServer::new(head))
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
                .await
                .unwrap();
        });
        RunningHead { addr, registers, heartbeats, stop, task }
    }

    async fn bind(protocol_version: u32) -> RunningHead {
        RunningHead::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), protocol_version).await
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn next_register(&mut self) -> pb::RegisterRequest {
        tokio::time::timeout(Duration::from_secs(15), self.registers.recv())
            .await
            .expect("a registration in time")
            .unwrap()
    }

    async fn next_heartbeat(&mut self) -> pb::WorkerHeartbeat {
        tokio::time::timeout(Duration::from_secs(15), self.heartbeats.recv())
            .await
            .expect("a heartbeat in time")
            .unwrap()
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("the head stops").unwrap();
    }
}

async fn node_with_replica(replica_id: &str) -> WorkerNode {
    let node = WorkerNode::new("worker-a", detect_resources());
    node.start_replica(replica_id, common::options()).await.expect("replica starts");
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_with_version_address_resources_then_heartbeats_replica_stats() {
    let mut head = RunningHead::bind(PROTOCOL_VERSION).await;
    let node = node_with_replica("r1").await;
    let shutdown = CancellationToken::new();
    let task = spawn_registration(node.clone(), RegistrationConfig::new(head.url(), ADVERTISED), shutdown.clone());

    let reg = head.next_register().await;
    assert_eq!(reg.protocol_version, PROTOCOL_VERSION);
    assert_eq!(reg.worker_id, "worker-a");
    assert_eq!(reg.address, ADVERTISED);
    assert!(!reg.lumen_version.is_empty());
    let resources = reg.resources.expect("resources");
    assert_eq!(resources.device_kind, "cpu");
    assert!(resources.cpu_cores >= 1);
    assert!(resources.host_memory_bytes > 0);
    assert_eq!(resources.device_memory_bytes, resources.host_memory_bytes);
    assert_eq!(reg.replicas.len(), 1);
    assert_eq!(reg.replicas[0].replica_id, "r1");
    assert_eq!(reg.replicas[0].state, pb::ReplicaState::Running as i32);
    assert_eq!(reg.replicas[0].max_model_len, 1024);

    for _ in 0..3 {
        let hb = head.next_heartbeat().await;
        assert_eq!(hb.worker_id, "worker-a");
        assert!(hb.unix_ms > 0);
        assert_eq!(hb.replicas.len(), 1);
        let stats = &hb.replicas[0];
        assert_eq!(stats.replica_id, "r1");
        assert!(stats.kv_blocks_total > 0);
        assert_eq!(stats.state, pb::ReplicaState::Running as i32);
    }

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("registration ends on shutdown").unwrap();
    head.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_registers_with_current_replicas_after_the_head_restarts_on_the_same_port() {
    let mut head = RunningHead::bind(PROTOCOL_VERSION).await;
    let addr = head.addr;
    let node = WorkerNode::new("worker-a", detect_resources());
    let shutdown = CancellationToken::new();
    let task = spawn_registration(node.clone(), RegistrationConfig::new(head.url(), ADVERTISED), shutdown.clone());

    assert!(head.next_register().await.replicas.is_empty());
    head.next_heartbeat().await;
    node.start_replica("r-late", common::options()).await.expect("replica starts");
    head.stop().await;

    let mut head =
        RunningHead::start(TcpListener::bind(addr).await.expect("the port is free again"), PROTOCOL_VERSION).await;
    let reg = head.next_register().await;
    assert_eq!(reg.worker_id, "worker-a");
    let ids: Vec<&str> = reg.replicas.iter().map(|r| r.replica_id.as_str()).collect();
    assert_eq!(ids, ["r-late"], "re-registration lists the replicas the worker still hosts");
    let hb = head.next_heartbeat().await;
    assert_eq!(hb.replicas.len(), 1);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("registration ends on shutdown").unwrap();
    head.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_with_another_protocol_version_gets_no_heartbeats_and_is_retried() {
    let mut head = RunningHead::bind(PROTOCOL_VERSION + 1).await;
    let node = WorkerNode::new("worker-b", detect_resources());
    let shutdown = CancellationToken::new();
    let config = RegistrationConfig {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(100),
        ..RegistrationConfig::new(head.url(), ADVERTISED)
    };
    let task = spawn_registration(node, config, shutdown.clone());
    for _ in 0..3 {
        head.next_register().await;
    }
    assert!(head.heartbeats.try_recv().is_err(), "no heartbeats to a head that speaks another protocol");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("registration ends on shutdown").unwrap();
    head.stop().await;
}
