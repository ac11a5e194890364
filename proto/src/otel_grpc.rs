//! OTLP over gRPC (vLLM's default protocol, a collector's port 4317) for the SDK's batch span
//! processor.
//!
//! The batch processor exports on its own thread, outside any async runtime, while the OTLP
//! gRPC client (tonic) needs a Tokio runtime for its connection. [`GrpcSpanExporter`] owns one:
//! a one-thread runtime made for the exporter, on which the client is built and every export
//! runs; the processor's thread only waits for the result.
//!
//! Invariants: the runtime lives exactly as long as the exporter (the processor drops it on
//! shutdown, after the last export) and is shut down without blocking, wherever it is dropped; an export never runs on the caller's runtime, so the
//! servers' runtimes never carry exporter work.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

/// The OTLP/gRPC span exporter with its own runtime.
#[derive(Debug)]
pub struct GrpcSpanExporter {
    /// Always `Some` until dropped (then shut down without blocking: a drop may happen on an
    /// async thread, where dropping a runtime panics).
    runtime: Option<tokio::runtime::Runtime>,
    inner: Arc<opentelemetry_otlp::SpanExporter>,
}

impl GrpcSpanExporter {
    /// An exporter sending to `endpoint` (e.g. `http://collector:4317`); connects lazily.
    pub fn new(endpoint: &str) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-grpc")
            .enable_all()
            .build()
            .map_err(|e| format!("starting the exporter's runtime: {e}"))?;
        let built = {
            let _in_runtime = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build()
        };
        match built {
            Ok(inner) => Ok(GrpcSpanExporter { runtime: Some(runtime), inner: Arc::new(inner) }),
            Err(e) => {
                // Called from async code (the CLI's runtime): dropping a runtime there panics.
                runtime.shutdown_background();
                Err(e.to_string())
            }
        }
    }
}

impl SpanExporter for GrpcSpanExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let inner = self.inner.clone();
        let Some(runtime) = &self.runtime else {
            return Err(OTelSdkError::InternalFailure("the OTLP/gRPC exporter is shut down".into()));
        };
        match runtime.spawn(async move { inner.export(batch).await }).await {
            Ok(result) => result,
            Err(e) => Err(OTelSdkError::InternalFailure(format!("the OTLP/gRPC export task failed: {e}"))),
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

impl Drop for GrpcSpanExporter {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::GrpcSpanExporter;

    #[tokio::test]
    async fn a_malformed_endpoint_is_an_error_even_on_a_runtime_thread() {
        // The CLI starts tracing from its async main: the exporter's own runtime, made before
        // the endpoint is refused, must not be dropped there (that panics).
        let error = GrpcSpanExporter::new("http://bad host:4317").expect_err("a malformed URI");
        assert!(!error.is_empty());
        // Connects lazily; dropped here, on a runtime thread, without a panic.
        assert!(GrpcSpanExporter::new("http://127.0.0.1:4317").is_ok());
    }
}
