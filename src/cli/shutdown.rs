//! Process shutdown: SIGTERM or Ctrl-C cancels one token that every server watches; servers stop
//! accepting, finish what is in flight within the drain timeout, and the process exits 0.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or Ctrl-C.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = ctrl_c => tracing::info!("Ctrl-C: draining"),
                _ = term.recv() => tracing::info!("SIGTERM: draining"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        token.cancel();
    });
}

/// Awaits `tasks` after shutdown began, giving up after `timeout` (in-flight work is then
/// abandoned, as a drain timeout promises).
pub async fn drain(tasks: Vec<tokio::task::JoinHandle<()>>, timeout: Duration) {
    let all = futures::future::join_all(tasks);
    if tokio::time::timeout(timeout, all).await.is_err() {
        tracing::warn!(timeout_s = timeout.as_secs(), "drain timeout reached; exiting with requests in flight");
    }
}
