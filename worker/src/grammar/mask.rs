//! Per-sequence matcher state and next-token masks, computed off the engine thread.
//!
//! Protocol (the engine thread drives it; see the module docs of `grammar` for the invariants):
//! 1. [`SeqGrammar::new`] starts a sequence's matcher; [`SeqGrammar::request_mask`] hands the
//!    mask computation to the [`MaskWorkers`] and returns at once.
//! 2. The engine runs the step's forward pass; a worker computes the mask meanwhile.
//! 3. Sampling waits for the mask ([`SeqGrammar::with_mask`], or a [`TokenMask`] handle the model
//!    reads when it applies the mask on its device).
//! 4. A sampled token on which the choice goes on is handed to [`SeqGrammar::feed`] with the
//!    workers: one feeds it to the matcher and computes the next mask, both while the next
//!    forward pass runs, and 3. follows. Whether that token completed the grammar (or failed
//!    it) is learnt at the next `feed`, which then takes nothing: the choice ended with the
//!    token before ([`Feed::AlreadyComplete`]); a stopped matcher's mask allows only
//!    end-of-sequence. A token on which the choice ends anyway (a stop token, the length limit)
//!    is fed at once (`feed` without workers), which says whether it completed the grammar.
//!
//! A cell is locked by a worker for the whole computation and by the engine only between steps,
//! so the two never contend except when the engine needs a mask that is late: then it waits for
//! a computation under way, or computes the mask itself when no worker has taken it yet (on a
//! machine whose cores the forward pass keeps busy, a helper thread may not get a core in time;
//! the engine never waits for one to be scheduled).

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use llguidance::Matcher;

use super::CompiledGrammar;
use super::deadline::Deadline;
use super::gate::ReasoningGate;
use crate::TokenId;

/// `u32` words of a mask over `vocab` ids.
pub fn mask_words(vocab: usize) -> usize {
    vocab.div_ceil(32)
}

/// Sets every logit whose bit in `words` is clear to `-inf` (ids beyond `words` included).
pub fn apply_mask(row: &mut [f32], words: &[u32]) {
    for (w, chunk) in row.chunks_mut(32).enumerate() {
        let bits = words.get(w).copied().unwrap_or(0);
        if bits == u32::MAX {
            continue;
        }
        for (b, x) in chunk.iter_mut().enumerate() {
            if bits & (1 << b) == 0 {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// Whether `words` allows `token`.
pub fn allows(words: &[u32], token: TokenId) -> bool {
    words.get(token as usize / 32).is_some_and(|w| w & (1 << (token % 32)) != 0)
}

/// The lowest id below `len` that `words` allows and `suppress` does not hold; failing that, the
/// lowest allowed id: the sampler's choice when every allowed logit is `-inf`.
pub fn first_allowed(words: &[u32], len: usize, suppress: &[TokenId]) -> Option<TokenId> {
    let allowed = || (0..len as TokenId).filter(|&t| allows(words, t));
    allowed().find(|t| !suppress.contains(t)).or_else(|| allowed().next())
}

/// What handing a sampled token to [`SeqGrammar::feed`] led to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Feed {
    /// Taken, the grammar goes on (fed at once), or a worker feeds the token and computes the
    /// next mask (queued; what it leads to is learnt at the next `feed`).
    Taken,
    /// Fed at once, the token completed the grammar.
    Complete,
    /// The token before completed the grammar: this one was not taken, the choice ended before it.
    AlreadyComplete,
    /// This token (fed at once) or the one before was not allowed, or the matcher hit one of its
    /// limits with it or with the mask after it.
    Failed(String),
}

struct MaskState {
    matcher: Matcher,
    words: Vec<u32>,
    /// A sampled token the matcher takes before the pending mask is computed ([`SeqGrammar::feed`]).
    fed: Option<TokenId>,
    /// A worker still has to compute the mask of the current state (after `fed`).
    pending: bool,
    error: Option<String>,
    /// How long the last mask took to compute, not yet reported.
    compute_time: Option<Duration>,
}

struct MaskCell {
    state: Mutex<MaskState>,
    vocab: usize,
    /// Past this, a mask computation or an advance is cancelled (see `deadline`).
    step_timeout: Duration,
}

impl MaskCell {
    fn lock(&self) -> MutexGuard<'_, MaskState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state once no computation is pending: waits for a worker that holds the cell, or
    /// computes the mask here when none has taken it.
    fn settled(&self) -> MutexGuard<'_, MaskState> {
        let mut state = self.lock();
        self.compute_locked(&mut state);
        state
    }

    /// A matcher error as the client reads it (`matcher` is the one that failed).
    fn describe(&self, matcher: &Matcher, error: impl std::fmt::Display) -> String {
        if matcher.is_cancelled() {
            format!("the grammar took longer than {} ms for one token", self.step_timeout.as_millis())
        } else {
            error.to_string()
        }
    }

    /// A worker's job (a no-op when the engine got there first).
    fn compute(&self) {
        let mut state = self.lock();
        self.compute_locked(&mut state);
    }

    fn compute_locked(&self, state: &mut MaskState) {
        if !state.pending {
            return;
        }
        state.pending = false;
        if let Some(token) = state.fed.take()
            && let Err(e) = self.consume(state, token)
        {
            state.words.fill(0);
            state.error = Some(e);
            return;
        }
        let started = Instant::now();
        let deadline = Deadline::arm(state.matcher.cancellation_handle(), self.step_timeout);
        // A matcher the fed token stopped allows only end-of-sequence (the engine ends the
        // choice before sampling matters).
        let computed = state.matcher.compute_mask_or_eos();
        drop(deadline);
        match computed {
            Ok(vob) => {
                let words = &mut state.words;
                words.fill(0);
                for (dst, src) in words.iter_mut().zip(vob.as_slice()) {
                    *dst = *src;
                }
                // Bits past the vocabulary (the trie's spare capacity) stay clear.
                if !self.vocab.is_multiple_of(32)
                    && let Some(last) = words.last_mut()
                {
                    *last &= (1u32 << (self.vocab % 32)) - 1;
                }
            }
            Err(e) => {
                state.words.fill(0);
                state.error = Some(self.describe(&state.matcher, e));
            }
        }
        state.compute_time = Some(started.elapsed());
    }

    /// Feeds `token` to the matcher under the step deadline: the error as the client reads it.
    fn consume(&self, state: &mut MaskState, token: TokenId) -> Result<(), String> {
        let deadline = Deadline::arm(state.matcher.cancellation_handle(), self.step_timeout);
        let consumed = state.matcher.consume_token(token);
        drop(deadline);
        consumed.map(|_| ()).map_err(|e| self.describe(&state.matcher, e))
    }
}

/// A handle on a row's mask for whoever applies it: waits for a mask still being computed.
#[derive(Clone)]
pub struct TokenMask(MaskSource);

#[derive(Clone)]
enum MaskSource {
    Fixed(Arc<Vec<u32>>),
    Cell(Arc<MaskCell>),
}

impl TokenMask {
    /// A mask known now (tests, references).
    pub fn from_words(words: Vec<u32>) -> TokenMask {
        TokenMask(MaskSource::Fixed(Arc::new(words)))
    }

    /// Runs `f` on the mask's words, waiting for them first.
    pub fn with_words<R>(&self, f: impl FnOnce(&[u32]) -> R) -> R {
        match &self.0 {
            MaskSource::Fixed(words) => f(words),
            MaskSource::Cell(cell) => f(&cell.settled().words),
        }
    }
}

impl PartialEq for TokenMask {
    fn eq(&self, other: &Self) -> bool {
        self.with_words(|a| other.with_words(|b| a == b))
    }
}

impl std::fmt::Debug for TokenMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            MaskSource::Fixed(words) => write!(f, "TokenMask({} words)", words.len()),
            MaskSource::Cell(cell) => write!(f, "TokenMask(sequence, vocab {})", cell.vocab),
        }
    }
}

/// One sequence's matcher and next-token mask, and the reasoning gate before them.
pub struct SeqGrammar {
    cell: Arc<MaskCell>,
    /// While set, the sequence is still reasoning: no mask, the matcher untouched ([`super::gate`]).
    gate: Option<ReasoningGate>,
}

impl SeqGrammar {
    /// A sequence at the grammar's start (behind `gate` if given); its first mask still has to
    /// be requested once it is active.
    pub fn new(compiled: &CompiledGrammar, gate: Option<ReasoningGate>) -> SeqGrammar {
        let vocab = compiled.vocab_size();
        let words = vec![0; mask_words(vocab)];
        SeqGrammar::with_state(compiled.matcher(), words, vocab, compiled.step_timeout(), gate)
    }

    fn with_state(
        matcher: Matcher,
        words: Vec<u32>,
        vocab: usize,
        step_timeout: Duration,
        gate: Option<ReasoningGate>,
    ) -> SeqGrammar {
        let state = MaskState { matcher, words, fed: None, pending: false, error: None, compute_time: None };
        SeqGrammar { cell: Arc::new(MaskCell { state: Mutex::new(state), vocab, step_timeout }), gate }
    }

    /// Whether the constraint governs the next token (false while the gate is closed).
    pub fn is_active(&self) -> bool {
        self.gate.is_none()
    }

    /// Feeds a gated sequence's token text to its gate: true when the gate opened with it (the
    /// matcher starts at the next token; its mask is still to be requested). Always false for
    /// an active sequence.
    pub fn pass_gate(&mut self, text: &str) -> bool {
        let opened = self.gate.as_mut().is_some_and(|g| g.push(text));
        if opened {
            self.gate = None;
        }
        opened
    }

    /// Starts computing the mask of the current state on `workers`.
    pub fn request_mask(&self, workers: &mut MaskWorkers) {
        self.cell.lock().pending = true;
        workers.submit(Arc::clone(&self.cell));
    }

    /// A handle on the mask being computed, for the device.
    pub fn token_mask(&self) -> TokenMask {
        TokenMask(MaskSource::Cell(Arc::clone(&self.cell)))
    }

    /// Runs `f` on the current mask (waiting for it), or on the matcher's error. Also returns the
    /// mask's compute time the first time it is read.
    pub fn with_mask<R>(&self, f: impl FnOnce(Result<&[u32], &str>) -> R) -> (R, Option<Duration>) {
        let mut state = self.cell.settled();
        let time = state.compute_time.take();
        let result = match &state.error {
            Some(e) => f(Err(e)),
            None => f(Ok(&state.words)),
        };
        (result, time)
    }

    /// Hands an accepted token to the matcher: with `workers`, they feed it and compute the next
    /// mask while the engine goes on (the choice goes on with it); without, it is fed now (the
    /// choice ends with it, and whether it completed the grammar decides how). Learns first what
    /// the token before led to.
    pub fn feed(&self, token: TokenId, workers: Option<&mut MaskWorkers>) -> Feed {
        let mut state = self.cell.settled();
        if let Some(e) = &state.error {
            return Feed::Failed(e.clone());
        }
        if state.matcher.is_stopped() {
            return Feed::AlreadyComplete;
        }
        let Some(workers) = workers else {
            return match self.cell.consume(&mut state, token) {
                Err(e) => Feed::Failed(e),
                Ok(()) if state.matcher.is_stopped() => Feed::Complete,
                Ok(()) => Feed::Taken,
            };
        };
        state.fed = Some(token);
        state.pending = true;
        drop(state);
        workers.submit(Arc::clone(&self.cell));
        Feed::Taken
    }

    /// An independent copy at the same state and with the same mask (the other choices of an
    /// `n > 1` request).
    pub fn fork(&self) -> SeqGrammar {
        let state = self.cell.settled();
        let (vocab, timeout) = (self.cell.vocab, self.cell.step_timeout);
        let fork =
            SeqGrammar::with_state(state.matcher.clone(), state.words.clone(), vocab, timeout, self.gate.clone());
        fork.cell.lock().error.clone_from(&state.error);
        fork
    }
}

impl std::fmt::Debug for SeqGrammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqGrammar").field("vocab", &self.cell.vocab).field("gated", &self.gate.is_some()).finish()
    }
}

/// Threads that compute masks (started on first use); with none, masks are computed inline.
pub struct MaskWorkers {
    threads: usize,
    tx: Option<Sender<Arc<MaskCell>>>,
    handles: Vec<JoinHandle<()>>,
}

impl MaskWorkers {
    /// `threads` helper threads (0: compute on the caller's thread).
    pub fn new(threads: usize) -> MaskWorkers {
        MaskWorkers { threads, tx: None, handles: Vec::new() }
    }

    /// A quarter of the machine's cores, at least 1 and at most 4: llguidance computes a mask in
    /// tens to hundreds of microseconds, so a few threads keep up with a large batch.
    pub fn default_threads() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get() / 4).clamp(1, 4)
    }

    fn submit(&mut self, cell: Arc<MaskCell>) {
        if self.threads == 0 {
            cell.compute();
            return;
        }
        if self.tx.is_none() {
            self.start();
        }
        let unsent = match &self.tx {
            Some(tx) => tx.send(cell).err().map(|e| e.0),
            None => Some(cell),
        };
        // No thread could be started: compute here rather than never.
        if let Some(cell) = unsent {
            cell.compute();
        }
    }

    fn start(&mut self) {
        let (tx, rx) = crossbeam_channel::unbounded::<Arc<MaskCell>>();
        for i in 0..self.threads {
            let rx: Receiver<Arc<MaskCell>> = rx.clone();
            let spawned = std::thread::Builder::new().name(format!("lumen-mask-{i}")).spawn(move || {
                for cell in rx {
                    // A sequence that ended meanwhile holds no other reference: skip its mask.
                    if Arc::strong_count(&cell) > 1 {
                        cell.compute();
                    }
                }
            });
            match spawned {
                Ok(handle) => self.handles.push(handle),
                Err(e) => tracing::warn!(error = %e, "cannot start a mask thread"),
            }
        }
        if !self.handles.is_empty() {
            self.tx = Some(tx);
        } else {
            self.threads = 0;
        }
    }
}

impl Drop for MaskWorkers {
    fn drop(&mut self) {
        self.tx = None;
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

impl std::fmt::Debug for MaskWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskWorkers").field("threads", &self.threads).finish()
    }
}
