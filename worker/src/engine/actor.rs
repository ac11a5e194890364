//! The engine's mailbox: a ractor actor in front of the engine thread, and the handle callers
//! use. The actor validates requests against the engine's limits (so bad input fails fast, before
//! it reaches the thread), applies backpressure (a full command queue answers `QueueFull`), and
//! hands each caller a [`RequestStream`] that aborts its request when dropped unfinished.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, TrySendError};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;

use super::core::EngineCore;
use super::request::{EngineEvent, EngineLimits, EngineRequest};
use super::runner::{self, Command};
use super::stats::EngineStats;
use crate::grammar::GrammarCompiler;
use crate::tokenizer::Tokenizer;
use crate::{Result, WorkerError};

/// Commands queued for the engine thread before `generate` answers "queue full".
pub const COMMAND_QUEUE_CAPACITY: usize = 4096;

/// Messages the engine actor handles.
pub enum EngineMessage {
    /// Boxed: a request is large next to the other messages.
    Generate(Box<EngineRequest>, RpcReplyPort<Result<RequestStream>>),
    Abort(String),
    Stats(RpcReplyPort<EngineStats>),
}

struct EngineActor;

struct ActorState {
    commands: Sender<Command>,
    stats: Arc<Mutex<EngineStats>>,
    limits: EngineLimits,
    thread: Option<JoinHandle<()>>,
}

struct ActorArgs {
    core: EngineCore,
    name: String,
}

impl Actor for EngineActor {
    type Msg = EngineMessage;
    type State = ActorState;
    type Arguments = ActorArgs;

    async fn pre_start(&self, _me: ActorRef<Self::Msg>, args: ActorArgs) -> Result<ActorState, ActorProcessingErr> {
        let (tx, rx) = crossbeam_channel::bounded(COMMAND_QUEUE_CAPACITY);
        let stats = Arc::new(Mutex::new(args.core.stats()));
        let limits = args.core.limits().clone();
        let thread = runner::spawn(args.core, rx, Arc::clone(&stats), &args.name)?;
        Ok(ActorState { commands: tx, stats, limits, thread: Some(thread) })
    }

    async fn handle(
        &self,
        me: ActorRef<Self::Msg>,
        msg: EngineMessage,
        state: &mut ActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            EngineMessage::Generate(req, reply) => {
                let answer = submit(&me, state, req);
                let _ = reply.send(answer);
            }
            EngineMessage::Abort(id) => {
                // Best effort: if the queue is full the request is aborted when its stream's
                // receiver is found closed at the next step.
                let _ = state.commands.try_send(Command::Abort(id));
            }
            EngineMessage::Stats(reply) => {
                let snapshot = state.stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let _ = reply.send(snapshot);
            }
        }
        Ok(())
    }

    async fn post_stop(&self, _me: ActorRef<Self::Msg>, state: &mut ActorState) -> Result<(), ActorProcessingErr> {
        let _ = state.commands.send(Command::Shutdown);
        if let Some(thread) = state.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        Ok(())
    }
}

fn submit(me: &ActorRef<EngineMessage>, state: &ActorState, req: Box<EngineRequest>) -> Result<RequestStream> {
    state.limits.validate(&req)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let id = req.id.clone();
    match state.commands.try_send(Command::Add(req, tx)) {
        Ok(()) => Ok(RequestStream { id, rx, engine: Some(me.clone()), done: false }),
        Err(TrySendError::Full(_)) => Err(WorkerError::QueueFull { capacity: COMMAND_QUEUE_CAPACITY }),
        Err(TrySendError::Disconnected(_)) => Err(WorkerError::EngineStopped),
    }
}

/// The output of one request. Dropping it before the request finished aborts the request.
pub struct RequestStream {
    id: String,
    rx: mpsc::UnboundedReceiver<EngineEvent>,
    engine: Option<ActorRef<EngineMessage>>,
    done: bool,
}

impl RequestStream {
    /// A stream reading `rx`, which aborts request `id` at `engine` when dropped unfinished.
    pub(super) fn new(id: String, rx: mpsc::UnboundedReceiver<EngineEvent>, engine: ActorRef<EngineMessage>) -> Self {
        RequestStream { id, rx, engine: Some(engine), done: false }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The next event; `None` after the final `Finished`/`Failed` event.
    pub async fn recv(&mut self) -> Option<EngineEvent> {
        if self.done {
            return None;
        }
        let event = self.rx.recv().await;
        match &event {
            Some(EngineEvent::Finished { .. } | EngineEvent::Failed(_)) | None => self.done = true,
            Some(EngineEvent::Delta(_) | EngineEvent::PromptLogprobs(_) | EngineEvent::Embedding(_)) => {}
        }
        match event {
            Some(e) => Some(e),
            None => Some(EngineEvent::Failed("the engine stopped".into())),
        }
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.done
            && let Some(engine) = self.engine.take()
        {
            let _ = engine.cast(EngineMessage::Abort(self.id.clone()));
        }
    }
}

/// A cheap, cloneable handle to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    actor: ActorRef<EngineMessage>,
    tokenizer: Tokenizer,
    limits: EngineLimits,
    description: Arc<str>,
    grammars: Arc<GrammarCompiler>,
}

impl EngineHandle {
    /// Starts the engine thread and its actor.
    pub async fn start(core: EngineCore, name: &str) -> Result<(EngineHandle, tokio::task::JoinHandle<()>)> {
        let tokenizer = core.tokenizer().clone();
        let limits = core.limits().clone();
        let description: Arc<str> = core.model().describe().into();
        let grammars = Arc::clone(core.grammars());
        let (actor, join) = Actor::spawn(None, EngineActor, ActorArgs { core, name: name.to_string() })
            .await
            .map_err(|e| WorkerError::Engine(format!("cannot start the engine actor: {e}")))?;
        Ok((EngineHandle { actor, tokenizer, limits, description, grammars }, join))
    }

    /// A handle on another actor answering [`EngineMessage`]s (the simulated engine).
    pub(super) fn from_parts(
        actor: ActorRef<EngineMessage>,
        tokenizer: Tokenizer,
        limits: EngineLimits,
        description: Arc<str>,
        grammars: Arc<GrammarCompiler>,
    ) -> EngineHandle {
        EngineHandle { actor, tokenizer, limits, description, grammars }
    }

    /// Queues a request and returns its output stream.
    pub async fn generate(&self, req: EngineRequest) -> Result<RequestStream> {
        ractor::call!(self.actor, EngineMessage::Generate, Box::new(req)).map_err(|_| WorkerError::EngineStopped)?
    }

    /// Aborts a request by id (no-op if it already finished).
    pub fn abort(&self, id: &str) {
        let _ = self.actor.cast(EngineMessage::Abort(id.to_string()));
    }

    /// The latest statistics.
    pub async fn stats(&self) -> Result<EngineStats> {
        ractor::call!(self.actor, EngineMessage::Stats).map_err(|_| WorkerError::EngineStopped)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn limits(&self) -> &EngineLimits {
        &self.limits
    }

    /// The replica's structured-output compiler (blocking: call it off the async runtime).
    pub fn grammars(&self) -> &Arc<GrammarCompiler> {
        &self.grammars
    }

    /// Device, kernels and weights, for logs.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Stops the actor and the engine thread (aborting what is running).
    pub fn stop(&self) {
        self.actor.stop(None);
    }
}
