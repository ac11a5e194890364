//! The head's request metrics, Ray-Serve-like: `lumen_serve_num_router_requests_total{route,model,
//! code}` and `lumen_serve_request_latency_ms{route,model}`, recorded by one middleware around
//! every route. Handlers tell it the model through a [`ModelLabel`] response extension; a
//! streaming response is measured until its body ends (or the client goes away).

use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};

use crate::api::ApiState;

/// The model a response was for, as a metrics label.
#[derive(Clone, Debug)]
pub struct ModelLabel(pub String);

/// The metrics the API records.
#[derive(Clone)]
pub struct ApiMetrics {
    requests: IntCounterVec,
    latency_ms: HistogramVec,
    /// Streams aborted because their client took no output for `stream_send_timeout`.
    pub stream_send_timeouts: IntCounter,
}

impl ApiMetrics {
    /// Creates the metrics and registers them into `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new("lumen_serve_num_router_requests_total", "Requests handled by the HTTP API."),
            &["route", "model", "code"],
        )?;
        let buckets = vec![
            5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 120000.0,
            300000.0,
        ];
        let latency_ms = HistogramVec::new(
            HistogramOpts::new("lumen_serve_request_latency_ms", "Request latency, to the end of the response, in ms.")
                .buckets(buckets),
            &["route", "model"],
        )?;
        let stream_send_timeouts = IntCounter::new(
            "lumen_serve_stream_send_timeouts_total",
            "Streams aborted because the client took no output within --stream-send-timeout-s.",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency_ms.clone()))?;
        registry.register(Box::new(stream_send_timeouts.clone()))?;
        Ok(ApiMetrics { requests, latency_ms, stream_send_timeouts })
    }
}

/// Records one request when its response ends.
struct Record {
    metrics: ApiMetrics,
    route: String,
    model: String,
    code: String,
    start: Instant,
}

impl Drop for Record {
    fn drop(&mut self) {
        self.metrics.requests.with_label_values(&[&self.route, &self.model, &self.code]).inc();
        let ms = self.start.elapsed().as_secs_f64() * 1000.0;
        self.metrics.latency_ms.with_label_values(&[&self.route, &self.model]).observe(ms);
    }
}

/// Middleware counting every request by route, model and status code.
pub async fn track(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let start = Instant::now();
    let route =
        request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    let record = Record {
        metrics: state.metrics.clone(),
        route,
        model: response.extensions().get::<ModelLabel>().map(|m| m.0.clone()).unwrap_or_default(),
        code: response.status().as_u16().to_string(),
        start,
    };
    if !super::trace::is_event_stream(&response) {
        return response;
    }
    // The record rides along with the body and is taken when the body is dropped.
    let (parts, body) = response.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _keep = &record;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

/// `result` as a response labelled with `model` for the metrics.
pub fn labelled(model: &str, result: Result<Response, super::errors::ApiError>) -> Response {
    use axum::response::IntoResponse;
    let mut response = result.unwrap_or_else(IntoResponse::into_response);
    response.extensions_mut().insert(ModelLabel(model.to_string()));
    response
}
