//! The head's gRPC `Head` service: worker registration and heartbeat streams.
//!
//! Contract (see `lumen.proto`): `Register` refuses a protocol version mismatch with
//! `FAILED_PRECONDITION` (naming both versions) and a wrong join token with `UNAUTHENTICATED`,
//! then records the worker and adopts the replicas it reports, and answers with the heartbeat
//! interval. A heartbeat naming an unregistered worker is answered `NOT_FOUND` (the worker must
//! register again, e.g. after a head restart). Each heartbeat is acknowledged, after it was
//! applied (so a worker that said `draining` knows, from the ack, that no new request will be
//! routed to it). When the stream of a draining worker ends, the worker is marked dead at once
//! and its replicas forgotten (it drained them before leaving). With a
//! [`ServerTls`] the service speaks TLS only.

use std::future::Future;
use std::time::Instant;

use lumen_proto::PROTOCOL_VERSION;
use lumen_proto::tls::ServerTls;
use lumen_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{Cluster, ClusterError, replica_client};
use crate::clock::unix_ms;

/// Serves the `Head` service on `listener` in plain text until `shutdown` completes.
pub async fn serve_head(
    listener: tokio::net::TcpListener,
    cluster: Cluster,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ClusterError> {
    serve_head_tls(listener, cluster, None, shutdown).await
}

/// Serves the `Head` service on `listener` until `shutdown` completes; over TLS with `tls`
/// (workers then dial `https://`).
pub async fn serve_head_tls(
    listener: tokio::net::TcpListener,
    cluster: Cluster,
    tls: Option<&ServerTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ClusterError> {
    let router =
        tonic::transport::Server::builder().add_service(pb::head_server::HeadServer::new(HeadService { cluster }));
    lumen_proto::tls::serve_grpc(router, listener, tls, shutdown).await?;
    Ok(())
}

struct HeadService {
    cluster: Cluster,
}

impl HeadService {
    fn check_admission(&self, req: &pb::RegisterRequest) -> Result<(), Status> {
        if req.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version mismatch: worker `{}` speaks version {}, this head speaks version {}; \
                 run the same Lumen release on both",
                req.worker_id, req.protocol_version, PROTOCOL_VERSION
            )));
        }
        if let Some(token) = &self.cluster.settings().join_token
            && !crate::secret::constant_time_eq(token.as_bytes(), req.join_token.as_bytes())
        {
            return Err(Status::unauthenticated(format!(
                "worker `{}` presented a missing or wrong join token",
                req.worker_id
            )));
        }
        if req.worker_id.is_empty() {
            return Err(Status::invalid_argument("worker_id is empty"));
        }
        if let Err(e) = replica_client::endpoint(&req.address) {
            return Err(Status::invalid_argument(format!("address `{}` is not a valid URI: {e}", req.address)));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::head_server::Head for HeadService {
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterReply>, Status> {
        let req = request.into_inner();
        self.check_admission(&req)?;
        let known = self.cluster.state().register_worker(&req, Instant::now());
        tracing::info!(
            worker = %req.worker_id,
            address = %req.address,
            replicas = req.replicas.len(),
            rejoined = known,
            "worker registered"
        );
        self.cluster.wake_controller();
        let interval = self.cluster.settings().heartbeat_interval().as_millis();
        Ok(Response::new(pb::RegisterReply {
            protocol_version: PROTOCOL_VERSION,
            heartbeat_interval_ms: u32::try_from(interval).unwrap_or(u32::MAX),
        }))
    }

    type HeartbeatStream = ReceiverStream<Result<pb::HeartbeatAck, Status>>;

    async fn heartbeat(
        &self,
        request: Request<Streaming<pb::WorkerHeartbeat>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let cluster = self.cluster.clone();
        tokio::spawn(async move {
            // Ends when the worker closes its side, the connection breaks, or the head stops
            // listening for acks; liveness then runs out on its own deadline, unless the worker
            // was draining: then it has left.
            let mut worker_id = None;
            while let Ok(Some(hb)) = inbound.message().await {
                worker_id.get_or_insert_with(|| hb.worker_id.clone());
                let started = Instant::now();
                let applied = cluster.state().record_heartbeat(&hb, started);
                cluster.inner.loops.heartbeat_applied(started);
                let reply = match applied {
                    Ok(act) => {
                        if act {
                            cluster.wake_controller();
                        }
                        Ok(pb::HeartbeatAck { unix_ms: unix_ms() })
                    }
                    Err(_) => Err(Status::not_found(format!(
                        "worker `{}` is not registered with this head; register again",
                        hb.worker_id
                    ))),
                };
                let refused = reply.is_err();
                if tx.send(reply).await.is_err() || refused {
                    break;
                }
            }
            if let Some(worker_id) = worker_id
                && cluster.state().finish_drain(&worker_id)
            {
                tracing::info!(worker = %worker_id, "draining worker left");
                cluster.wake_controller();
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
