//! The engine thread: one OS thread per device that owns the [`EngineCore`] (model, cache,
//! scheduler) and loops `intake -> step -> publish stats`. It never runs on the async runtime;
//! commands arrive over a bounded channel and outputs leave over each request's own channel.
//! The published [`EngineStats`] carry their time (`taken_at`): a snapshot that stops being
//! replaced while the engine has work is how a stuck engine is seen from outside.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, TryRecvError};
use tokio::sync::mpsc::UnboundedSender;

use super::core::EngineCore;
use super::request::{EngineEvent, EngineRequest};
use super::stats::EngineStats;

/// What the engine thread is told to do.
pub enum Command {
    /// Boxed: a request is large next to the other commands.
    Add(Box<EngineRequest>, UnboundedSender<EngineEvent>),
    Abort(String),
    /// Abort everything and exit.
    Shutdown,
}

/// Starts the engine thread. It exits on `Shutdown` or when every sender is dropped.
pub fn spawn(
    mut core: EngineCore,
    commands: Receiver<Command>,
    stats: Arc<Mutex<EngineStats>>,
    name: &str,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(format!("lumen-engine-{name}")).spawn(move || {
        loop {
            // Block while idle; otherwise take whatever arrived since the last step.
            let was_idle = !core.has_work();
            if was_idle {
                match commands.recv() {
                    Ok(cmd) => {
                        if !apply(&mut core, cmd) {
                            break;
                        }
                        core.mark_progress();
                    }
                    Err(_) => break,
                }
            }
            let mut running = true;
            loop {
                match commands.try_recv() {
                    Ok(cmd) => {
                        if !apply(&mut core, cmd) {
                            running = false;
                            break;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        running = false;
                        break;
                    }
                }
            }
            if !running {
                break;
            }
            if was_idle {
                // The last snapshot said idle; publish the new work before stepping, so an engine
                // that hangs in its first step shows a growing stall instead of looking idle.
                publish(&core, &stats);
            }
            match catch_unwind(AssertUnwindSafe(|| core.step())) {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "engine step failed; failing its requests");
                    core.fail_all(&format!("engine error: {e}"));
                }
                Err(_) => {
                    tracing::error!("engine step panicked; failing its requests");
                    core.fail_all("engine error: internal panic");
                }
            }
            publish(&core, &stats);
        }
        core.abort_all();
        publish(&core, &stats);
        tracing::info!("engine thread stopped");
    })
}

/// Applies a command; false means shut down.
fn apply(core: &mut EngineCore, cmd: Command) -> bool {
    match cmd {
        Command::Add(req, tx) => core.add_request(*req, tx),
        Command::Abort(id) => core.abort(&id),
        Command::Shutdown => return false,
    }
    true
}

fn publish(core: &EngineCore, stats: &Mutex<EngineStats>) {
    let snapshot = EngineStats { taken_at: Some(Instant::now()), ..core.stats() };
    *stats.lock().unwrap_or_else(|p| p.into_inner()) = snapshot;
}
