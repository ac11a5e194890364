//! What `lumen bench serve` sends and when: random prompts that share no prefix with each other,
//! and the gaps between request arrivals.
//!
//! Everything is a pure function of the seed, so two runs (or two engines) with the same seed get
//! the same prompts in the same order.

use std::collections::HashSet;
use std::ops::Range;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// The load both `lumen bench offline` and `lumen bench serve` generate: how many requests, and
/// how long their prompts and outputs are.
#[derive(Clone, Debug, clap::Args)]
pub struct LoadArgs {
    /// Prompt tokens per request (random token ids, different for every request).
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Output tokens per request (`max_tokens`, generated with `ignore_eos`).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Requests in the run.
    #[arg(long, default_value_t = 16)]
    pub num_prompts: usize,
    /// Seed of the random prompts (and, for `serve`, of the arrival times).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The prompts (vLLM's `--dataset-name`): random (token ids of `--input-len`), edit (a text
    /// to repeat with one word replaced: the answer copies the prompt), or chat (open questions);
    /// edit and chat go through the chat template (offline) or the chat API (serve), and their
    /// length is the dataset's.
    #[arg(long, value_enum, default_value = "random")]
    pub dataset_name: super::datasets::Dataset,
    /// Fraction of the requests (0 to 1, spread evenly) decoded under the benchmark's JSON schema
    /// (structured outputs); the report then adds the mask time per token.
    #[arg(long, default_value_t = 0.0)]
    pub structured_fraction: f64,
}

/// `n` prompts of exactly `len` token ids drawn uniformly from `range` (HIGH exclusive).
///
/// No two prompts start with the same token while the range holds at least `n` ids, so a prefix
/// cache on the server can reuse nothing between them.
pub fn token_prompts(n: usize, len: usize, range: Range<u32>, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let distinct_starts = (range.end - range.start) as usize >= n;
    let mut starts = HashSet::new();
    (0..n)
        .map(|_| {
            let mut prompt: Vec<u32> = (0..len).map(|_| rng.random_range(range.clone())).collect();
            // Redraw a first token already used; terminates because unused ids remain.
            while distinct_starts && len > 0 && !starts.insert(prompt[0]) {
                prompt[0] = rng.random_range(range.clone());
            }
            prompt
        })
        .collect()
}

/// Short common English words, each a single token (with its leading space) in Llama-family and
/// SmolLM vocabularies, so `len` of them make roughly `len` prompt tokens.
const WORDS: &[&str] = &[
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "name",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "back",
    "parent",
    "face",
    "others",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
    "education",
    "green",
    "small",
    "large",
    "early",
    "young",
    "important",
    "public",
    "bad",
    "same",
    "able",
    "open",
    "walk",
    "read",
    "learn",
    "grow",
    "river",
    "stone",
];

/// `n` chat messages of `len` random words each: about `len` tokens of text (approximate: the
/// exact count depends on the tokenizer, and the server's chat template adds its own tokens).
pub fn word_prompts(n: usize, len: usize, seed: u64) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let words: Vec<&str> = (0..len).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect();
            words.join(" ")
        })
        .collect()
}

/// Gaps between request arrivals: a Poisson process of `rate` requests per second (exponential
/// gaps with mean `1 / rate`), or no gaps at all for an infinite rate.
pub struct Arrivals {
    rng: StdRng,
    rate: f64,
}

impl Arrivals {
    pub fn new(rate: f64, seed: u64) -> Arrivals {
        Arrivals { rng: StdRng::seed_from_u64(seed ^ 0xA5A5_5A5A_0F0F_F0F0), rate }
    }

    /// The wait before the next arrival.
    pub fn next_gap(&mut self) -> Duration {
        if !self.rate.is_finite() {
            return Duration::ZERO;
        }
        let u: f64 = self.rng.random();
        Duration::from_secs_f64(-(1.0 - u).ln() / self.rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_prompts_have_exact_length_range_and_distinct_first_tokens() {
        let prompts = token_prompts(200, 64, 100..300, 7);
        assert_eq!(prompts.len(), 200);
        assert!(prompts.iter().all(|p| p.len() == 64 && p.iter().all(|t| (100..300).contains(t))));
        let firsts: HashSet<u32> = prompts.iter().map(|p| p[0]).collect();
        assert_eq!(firsts.len(), 200);
    }

    #[test]
    fn same_seed_gives_same_prompts_and_other_seed_others() {
        assert_eq!(token_prompts(3, 8, 100..32000, 1), token_prompts(3, 8, 100..32000, 1));
        assert_ne!(token_prompts(3, 8, 100..32000, 1), token_prompts(3, 8, 100..32000, 2));
        assert_eq!(word_prompts(2, 5, 1), word_prompts(2, 5, 1));
    }

    #[test]
    fn word_prompts_have_the_requested_word_count() {
        let prompts = word_prompts(4, 50, 3);
        assert!(prompts.iter().all(|p| p.split(' ').count() == 50));
        assert_ne!(prompts[0], prompts[1]);
    }

    #[test]
    fn poisson_gaps_average_the_inverse_rate() {
        let mut arrivals = Arrivals::new(20.0, 5);
        let n = 20_000;
        let mean = (0..n).map(|_| arrivals.next_gap().as_secs_f64()).sum::<f64>() / n as f64;
        assert!((mean - 0.05).abs() < 0.003, "mean gap {mean}");
    }

    #[test]
    fn infinite_rate_sends_without_gaps() {
        let mut arrivals = Arrivals::new(f64::INFINITY, 5);
        assert!((0..10).all(|_| arrivals.next_gap() == Duration::ZERO));
    }
}
