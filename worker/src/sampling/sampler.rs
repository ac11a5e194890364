//! `SequenceSampler`: one per sequence, called once per generated token on one row of logits.
//!
//! Order of work in `sample`, as vLLM does it:
//! 0. a structured-output mask (`sample_masked`): disallowed ids become `-inf`, before anything
//!    else, so log-probabilities are those of the masked distribution (vLLM applies the grammar
//!    bitmask to the logits before its sampler computes `raw_logprobs`);
//! 1. log-probabilities of the *raw* row (only when `params.logprobs` is set);
//! 2. repetition penalty (prompt and output tokens), frequency and presence penalties (output
//!    tokens), `logit_bias`, then the step's suppressed ids set to `-inf`; all sparse, touching
//!    only the ids concerned;
//! 3. greedy (`temperature < 1e-5` or `top_k == 1`): argmax, lowest id among ties; otherwise
//!    temperature, top-k, top-p, min-p and one draw from the seeded RNG.
//!
//! Cost per step: greedy without logprobs is one vectorised pass over the row plus the sparse
//! edits. Top-k sampling scans the row once for the k best (skipping chunks that cannot enter)
//! and exponentiates only those; otherwise sampling is a max pass, an exp pass and a draw, with
//! top-p located by a threshold gather or a radix histogram (see `truncate`), never a full sort,
//! and applied by one masking pass. Kernels
//! use AVX2 when the CPU has it, with identical results. Nothing is allocated per step except
//! `top_logprobs` when requested (the raw row copy and candidate buffer are reused).
//!
//! Reproducibility: the RNG is ChaCha12 keyed by `params.seed` (expanded to 256 bits) on stream
//! `seed_stream`, so equal seed, stream, history and logits always give equal tokens; different
//! streams of one key are independent. The row is modified in place (it holds weights afterwards).
//!
//! Non-finite logits: NaN counts as `-inf`, `+inf` as `f32::MAX`. When nothing can be chosen (all
//! `-inf` after processing, or an empty row) the token is the lowest id not in `suppress` (0 when
//! every id is suppressed or the row is empty), so a token is always returned and never panics.
//! Under a mask the fallback is the lowest allowed id (not suppressed if possible): the grammar
//! always wins.

use std::collections::HashMap;

use rand_chacha::ChaCha12Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

use super::SamplingParams;
use super::reduce::{DEVICE_TOP_K_MAX, Reduced, Reduction, RowPlan, TokenEdit};
use super::row::{
    argmax, cumulative_pick, exp_in_place, exp_nonpos, log_sum_exp, mask_ranked_below, max_value, sanitize, top_k_into,
};
use super::truncate::{nucleus_cut, pick, top_p_min_p_set};
use crate::TokenId;
use crate::grammar::{apply_mask, first_allowed};
use crate::splitmix::SplitMix64;

/// Temperatures below this sample greedily (vLLM's `_SAMPLING_EPS`): dividing by them would
/// overflow and the distribution is an argmax anyway.
const GREEDY_TEMPERATURE: f32 = 1e-5;

/// The outcome of one sampling step.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    /// The chosen token, always `< logits.len()` (or 0 for an empty row).
    pub token: TokenId,
    /// The chosen token's log-probability under the raw logits; 0.0 when `params.logprobs` is
    /// `None` (it is not computed).
    pub logprob: f32,
    /// The `params.logprobs` most likely tokens of the raw logits with their log-probabilities,
    /// most likely first (ties: lower id first); empty when `params.logprobs` is `None`.
    pub top_logprobs: Vec<(TokenId, f32)>,
}

/// Which tokens a sequence has seen, kept only when a penalty needs it.
#[derive(Clone, Debug)]
struct History {
    /// Token -> occurrences in the output; prompt-only tokens are present with 0 (only when the
    /// repetition penalty is on, the one penalty that looks at the prompt).
    counts: HashMap<TokenId, u32>,
}

/// Per-sequence sampling state: RNG, penalty history and reusable scratch buffers.
#[derive(Clone, Debug)]
pub struct SequenceSampler {
    /// The 256-bit ChaCha key; forks share it and differ by stream.
    key: [u8; 32],
    rng: ChaCha12Rng,
    vocab_size: usize,
    /// `None` when every penalty is neutral: nothing is recorded and nothing is applied.
    history: Option<History>,
    /// Candidate (id, weight) pairs of top-k/top-p.
    kept: Vec<(u32, f32)>,
    /// Copy of the raw row, kept only for sequences that ask for logprobs.
    raw: Vec<f32>,
}

impl SequenceSampler {
    /// A sampler for one sequence. `seed_stream` separates the choices of an `n > 1` request;
    /// `prompt` feeds the repetition penalty; ids `>= vocab_size` are ignored. `params` must be
    /// the same ones later passed to `sample`: whether penalties are tracked is decided here.
    pub fn new(params: &SamplingParams, seed_stream: u64, prompt: &[TokenId], vocab_size: usize) -> Self {
        let key = match params.seed {
            Some(seed) => expand_seed(seed),
            None => rand::random(),
        };
        let repetition = params.repetition_penalty != 1.0;
        let penalised = repetition || params.frequency_penalty != 0.0 || params.presence_penalty != 0.0;
        let history = penalised.then(|| {
            let mut counts = HashMap::new();
            if repetition {
                for &t in prompt.iter().filter(|&&t| (t as usize) < vocab_size) {
                    counts.entry(t).or_insert(0);
                }
            }
            History { counts }
        });
        SequenceSampler {
            key,
            rng: stream_rng(&key, seed_stream),
            vocab_size,
            history,
            kept: Vec::new(),
            raw: Vec::new(),
        }
    }

    /// A sampler with this one's history and key but a fresh RNG on stream `seed_stream`.
    pub fn fork(&self, seed_stream: u64) -> Self {
        SequenceSampler {
            key: self.key,
            rng: stream_rng(&self.key, seed_stream),
            vocab_size: self.vocab_size,
            history: self.history.clone(),
            kept: Vec::new(),
            raw: Vec::new(),
        }
    }

    /// Continues a sequence whose `output` was sampled elsewhere (a resumed request): records it
    /// for the penalties and advances the RNG past the draws it took, one per token unless
    /// `params` is greedy (greedy sampling draws nothing; `sample` and `sample_reduced` draw
    /// exactly once otherwise). The next token is then the one an uninterrupted sampler with
    /// this history would choose.
    pub fn resume(&mut self, params: &SamplingParams, output: &[TokenId]) {
        for &token in output {
            self.record(token);
            if !is_greedy(params) {
                self.uniform();
            }
        }
    }

    /// Records a token accepted into the output, for the penalties of later steps.
    pub fn record(&mut self, token: TokenId) {
        if let Some(history) = &mut self.history
            && (token as usize) < self.vocab_size
        {
            *history.counts.entry(token).or_insert(0) += 1;
        }
    }

    /// Chooses the next token from `logits` (modified in place), never choosing an id in
    /// `suppress` unless every id of the row is in it. See the module docs for the order of
    /// processing.
    pub fn sample(&mut self, logits: &mut [f32], params: &SamplingParams, suppress: &[TokenId]) -> Sampled {
        self.sample_masked(logits, params, suppress, None)
    }

    /// [`Self::sample`] under a structured-output `mask` (see `grammar`: bit `i` allows id `i`):
    /// only allowed ids can be chosen, in every sampling mode.
    pub fn sample_masked(
        &mut self,
        logits: &mut [f32],
        params: &SamplingParams,
        suppress: &[TokenId],
        mask: Option<&[u32]>,
    ) -> Sampled {
        if let Some(mask) = mask {
            apply_mask(logits, mask);
        }
        if params.logprobs.is_some() {
            self.raw.clear();
            self.raw.extend_from_slice(logits);
        }
        self.process(logits, params, suppress);
        let chosen = if is_greedy(params) { argmax(logits) } else { self.draw(logits, params) };
        let token = match chosen {
            Some(i) => i as TokenId,
            None => fallback_token(logits.len(), suppress, mask),
        };
        let (logprob, top_logprobs) = match params.logprobs {
            Some(k) => raw_logprobs(&self.raw, token, k),
            None => (0.0, Vec::new()),
        };
        Sampled { token, logprob, top_logprobs }
    }

    /// Step 2 of the module docs: penalties, bias and suppression, touching only the ids
    /// concerned. Ids outside the row are ignored.
    fn process(&self, logits: &mut [f32], params: &SamplingParams, suppress: &[TokenId]) {
        if let Some(history) = &self.history {
            let rep = params.repetition_penalty;
            for (&token, &count) in &history.counts {
                let Some(x) = logits.get_mut(token as usize) else {
                    continue;
                };
                if rep != 1.0 {
                    *x = if *x > 0.0 { *x / rep } else { *x * rep };
                }
                if count > 0 {
                    *x -= params.frequency_penalty * count as f32 + params.presence_penalty;
                }
            }
        }
        for &(token, bias) in &params.logit_bias {
            if let Some(x) = logits.get_mut(token as usize) {
                *x += bias;
            }
        }
        for &token in suppress {
            if let Some(x) = logits.get_mut(token as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
    }

    /// Step 3 for random sampling. `None` when every processed logit is `-inf` or NaN.
    ///
    /// With top-k, only the k best logits are ever exponentiated (found by a chunk-skipping scan).
    /// Otherwise one exp pass turns the row into weights in place, top-p and min-p zero what they
    /// cut in one more pass, and a cumulative walk draws.
    fn draw(&mut self, logits: &mut [f32], params: &SamplingParams) -> Option<usize> {
        let u = self.uniform();
        if let Some(k) = params.top_k.filter(|&k| k > 0 && k < logits.len()) {
            top_k_into(logits, k, &mut self.kept);
            return self.draw_kept(u, params);
        }
        let max = max_value(logits);
        if max == f32::NEG_INFINITY {
            return None;
        }
        // Without top-p, min-p is a plain weight floor applied by the exp pass.
        let floor = if params.top_p < 1.0 { 0.0 } else { params.min_p };
        let mut total = exp_in_place(logits, max, params.temperature, floor);
        if params.top_p < 1.0 {
            let cut = nucleus_cut(logits, total, params.top_p, &mut self.kept);
            total = mask_ranked_below(logits, cut, params.min_p);
        }
        cumulative_pick(logits, u * total)
    }

    /// The top-k draw from the ranked candidates in `self.kept`: weights relative to the best,
    /// top-p and min-p within them, then `u`'s pick.
    fn draw_kept(&mut self, u: f64, params: &SamplingParams) -> Option<usize> {
        let max = self.kept.first().map_or(f32::NEG_INFINITY, |&(_, x)| x);
        if max == f32::NEG_INFINITY {
            return None;
        }
        let inv_t = 1.0 / params.temperature;
        for (_, x) in self.kept.iter_mut() {
            *x = exp_nonpos((*x - max) * inv_t);
        }
        top_p_min_p_set(&mut self.kept, params.top_p, params.min_p);
        pick(&self.kept, u).map(|id| id as usize)
    }

    /// Whether its rows depend on the tokens before them (a penalty keeps a history): a draft's
    /// rows then each need their own plan, made after the tokens before them.
    pub fn keeps_history(&self) -> bool {
        self.history.is_some()
    }

    /// How a device can reduce this sequence's next row exactly (see `reduce`): the argmax for
    /// greedy rows, the `top_k` best for top-k sampling up to [`DEVICE_TOP_K_MAX`], after this
    /// step's penalties, bias and `suppress` as per-token edits; `Full` for anything else
    /// (logprobs, sampling over the whole vocabulary, repeated `logit_bias` ids).
    pub fn plan_row(&self, params: &SamplingParams, suppress: &[TokenId]) -> RowPlan {
        let reduction = match params.top_k {
            _ if params.logprobs.is_some() => return RowPlan::full(),
            _ if is_greedy(params) => Reduction::Argmax,
            Some(k) if k > 0 && k <= DEVICE_TOP_K_MAX && k < self.vocab_size => Reduction::TopK(k),
            _ => return RowPlan::full(),
        };
        let mut edits: HashMap<TokenId, TokenEdit> = HashMap::new();
        let in_vocab = |t: TokenId| (t as usize) < self.vocab_size;
        if let Some(history) = &self.history {
            let rep = params.repetition_penalty;
            for (&token, &count) in history.counts.iter().filter(|(t, _)| in_vocab(**t)) {
                let edit = edits.entry(token).or_insert_with(|| TokenEdit::new(token));
                edit.repetition = (rep != 1.0).then_some(rep);
                edit.subtract =
                    (count > 0).then_some(params.frequency_penalty * count as f32 + params.presence_penalty);
            }
        }
        for &(token, bias) in params.logit_bias.iter().filter(|(t, _)| in_vocab(*t)) {
            let edit = edits.entry(token).or_insert_with(|| TokenEdit::new(token));
            if edit.bias.is_some() {
                // Two additions in a row round differently from one: leave it to the host.
                return RowPlan::full();
            }
            edit.bias = Some(bias);
        }
        for &token in suppress.iter().filter(|&&t| in_vocab(t)) {
            edits.entry(token).or_insert_with(|| TokenEdit::new(token)).suppress = true;
        }
        RowPlan { reduction, edits: edits.into_values().collect(), mask: None }
    }

    /// Chooses the next token from a row the device reduced as `plan_row` planned, exactly as
    /// `sample` would from the full row (the same RNG draw). `suppress` must be the one given to
    /// `plan_row`, `mask` the one the device applied (it only picks the fallback here). Never
    /// reports logprobs (rows that want them are planned `Full`).
    pub fn sample_reduced(
        &mut self,
        reduced: Reduced<'_>,
        params: &SamplingParams,
        suppress: &[TokenId],
        mask: Option<&[u32]>,
    ) -> Sampled {
        let chosen = match reduced {
            Reduced::Token(token) => token.map(|t| t as usize),
            Reduced::TopK(candidates) => {
                let u = self.uniform();
                self.kept.clear();
                self.kept.extend_from_slice(candidates);
                self.draw_kept(u, params)
            }
        };
        let token = match chosen {
            Some(i) => i as TokenId,
            None => fallback_token(self.vocab_size, suppress, mask),
        };
        Sampled { token, logprob: 0.0, top_logprobs: Vec::new() }
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

fn is_greedy(params: &SamplingParams) -> bool {
    params.is_greedy() || params.temperature < GREEDY_TEMPERATURE
}

/// The deterministic choice when no token has finite logit: the lowest id of the row that is not
/// suppressed, or 0; under a mask, the lowest allowed id ([`first_allowed`]).
fn fallback_token(len: usize, suppress: &[TokenId], mask: Option<&[u32]>) -> TokenId {
    if let Some(token) = mask.and_then(|m| first_allowed(m, len, suppress)) {
        return token;
    }
    (0..len).map(|i| i as TokenId).find(|t| !suppress.contains(t)).unwrap_or(0)
}

/// Log-softmax of the raw row at `token`, and its `k` best entries.
/// A token's log-probability under a row of raw logits (no penalties, no temperature), its rank
/// (1 + the ids strictly more likely) and the `k` most likely ids with theirs: what vLLM's
/// `prompt_logprobs` report for each prompt token.
pub fn ranked_logprob(raw: &[f32], token: TokenId, k: usize) -> (f32, u32, Vec<(TokenId, f32)>) {
    let (logprob, top) = raw_logprobs(raw, token, k);
    let x = raw.get(token as usize).map_or(f32::NEG_INFINITY, |&x| sanitize(x));
    let above = raw.iter().filter(|&&y| sanitize(y) > x).count();
    (logprob, above as u32 + 1, top)
}

fn raw_logprobs(raw: &[f32], token: TokenId, k: usize) -> (f32, Vec<(TokenId, f32)>) {
    let lse = log_sum_exp(raw);
    let logprob = |x: f32| {
        if lse == f64::NEG_INFINITY { f32::NEG_INFINITY } else { (f64::from(sanitize(x)) - lse) as f32 }
    };
    let chosen = raw.get(token as usize).map_or(f32::NEG_INFINITY, |&x| logprob(x));
    let mut top = Vec::new();
    top_k_into(raw, k, &mut top);
    for (_, x) in top.iter_mut() {
        *x = logprob(*x);
    }
    (chosen, top)
}

/// Spreads a 64-bit seed over a 256-bit key with SplitMix64, so nearby seeds give unrelated keys.
fn expand_seed(seed: u64) -> [u8; 32] {
    let mut mix = SplitMix64(seed);
    let mut key = [0u8; 32];
    for word in key.chunks_exact_mut(8) {
        word.copy_from_slice(&mix.next_u64().to_le_bytes());
    }
    key
}

fn stream_rng(key: &[u8; 32], stream: u64) -> ChaCha12Rng {
    let mut rng = ChaCha12Rng::from_seed(*key);
    rng.set_stream(stream);
    rng
}

#[cfg(test)]
#[path = "sampler_tests.rs"]
mod tests;
