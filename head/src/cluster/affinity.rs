//! Prefix affinity: a request whose prompt starts like an earlier one goes to the replica that
//! served that start, whose KV prefix cache probably still holds it, unless that replica is
//! clearly busier than the others.
//!
//! Keys. A prompt's *material* is its head as bytes, roughly as the replica will see it:
//! - chat: the template kwargs, then per message its role, 0x1F, its content (a string as is,
//!   structured content as JSON), 0x1E. The *history* is everything before a final user message
//!   (the new turn): the system prompt and earlier turns, which the replica cached while serving
//!   the previous turn;
//! - text: the text; token ids: each id as 4 little-endian bytes.
//!
//! Only the first [`MAX_PREFIX_BYTES`] count. A prompt's keys are hashes of its material cut at
//! each of [`CUTS`] it reaches and, for chat, at the end of the history (when at least
//! [`MIN_PREFIX_BYTES`]). Several cuts instead of one K, because one K cannot serve both cases
//! that matter: conversations sharing a system prompt shorter than K would never match (their
//! K bytes run into the users' own text), and the turns of one conversation longer than K would
//! all match every other conversation with the same first K bytes. The cuts grow geometrically
//! (like the levels of a coarse radix tree), so the longest remembered cut is a good estimate of
//! the longest cached prefix. Prompts under 512 bytes (about 128 tokens, 8 KV blocks) have no
//! key: too little prefill to save to be worth skewing the load for.
//!
//! Policy. Per deployment, a bounded LRU map remembers key -> replica. A request looks up its
//! keys longest first and takes the first remembered replica that can take it (routable, not
//! tried, under `max_ongoing_requests`) if [`prefer`] accepts its load; otherwise power of two
//! choices decides. Either way the chosen replica is remembered under all the request's keys.
//! The map is only a hint: a replica that has gone is simply not found among the candidates.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use lumen_proto::v1 as pb;
use pb::generate_request::Prompt;

/// Material shorter than this gets no key.
pub const MIN_PREFIX_BYTES: usize = 512;
/// Material beyond this does not count.
pub const MAX_PREFIX_BYTES: usize = 8192;
/// Where the material is cut for keys.
pub const CUTS: [usize; 5] = [512, 1024, 2048, 4096, 8192];
/// Keys remembered per deployment (a request has up to six; a prefix that keeps being hit stays).
pub const KEYS_PER_DEPLOYMENT: usize = 8192;
/// The affine replica may carry this many more requests than the least loaded candidate...
pub const LOAD_SLACK: u64 = 4;
/// ...plus this fraction (1/N) of the least loaded candidate's load.
pub const LOAD_SLACK_FRACTION: u64 = 4;

/// A prompt's prefix keys, longest cut first; empty when the prompt is too short.
pub type PrefixKeys = Vec<u64>;

/// The keys of `request`'s prompt (see the module docs).
pub fn prefix_keys(request: &pb::GenerateRequest) -> PrefixKeys {
    match &request.prompt {
        Some(Prompt::Chat(chat)) => match chat_material(chat) {
            Some((material, history)) => keys_of(b'c', &material, Some(history)),
            None => PrefixKeys::new(),
        },
        Some(Prompt::Text(text)) => {
            let bytes = text.text.as_bytes();
            let kind = if text.add_special_tokens { b'T' } else { b't' };
            keys_of(kind, &bytes[..bytes.len().min(MAX_PREFIX_BYTES)], None)
        }
        Some(Prompt::Tokens(tokens)) => {
            let material: Vec<u8> =
                tokens.token_ids.iter().take(MAX_PREFIX_BYTES / 4).flat_map(|id| id.to_le_bytes()).collect();
            keys_of(b'i', &material, None)
        }
        None => PrefixKeys::new(),
    }
}

/// A chat's material (at most [`MAX_PREFIX_BYTES`]) and the length of its history; `None` when
/// the messages are not a JSON array (the worker will refuse the request anyway).
fn chat_material(chat: &pb::ChatPrompt) -> Option<(Vec<u8>, usize)> {
    let messages: Vec<serde_json::Value> = serde_json::from_str(&chat.messages_json).ok()?;
    let mut material = chat.template_kwargs_json.as_bytes().to_vec();
    material.push(0x1E);
    let mut history = material.len();
    for (i, message) in messages.iter().enumerate() {
        if material.len() >= MAX_PREFIX_BYTES {
            break;
        }
        let role = message.get("role").and_then(|r| r.as_str()).unwrap_or_default();
        let is_new_turn = i + 1 == messages.len() && role == "user";
        material.extend_from_slice(role.as_bytes());
        material.push(0x1F);
        match message.get("content") {
            Some(serde_json::Value::String(text)) => material.extend_from_slice(text.as_bytes()),
            None | Some(serde_json::Value::Null) => {}
            Some(structured) => material.extend_from_slice(structured.to_string().as_bytes()),
        }
        material.push(0x1E);
        if !is_new_turn {
            history = material.len();
        }
    }
    material.truncate(MAX_PREFIX_BYTES);
    Some((material, history))
}

/// Hashes of `material` cut at each of [`CUTS`] it reaches and at `boundary`, longest first.
fn keys_of(kind: u8, material: &[u8], boundary: Option<usize>) -> PrefixKeys {
    let mut cuts: Vec<usize> = CUTS.iter().copied().filter(|&cut| cut <= material.len()).collect();
    if let Some(boundary) = boundary
        && (MIN_PREFIX_BYTES..=material.len()).contains(&boundary)
        && !cuts.contains(&boundary)
    {
        cuts.push(boundary);
    }
    cuts.sort_unstable_by(|a, b| b.cmp(a));
    cuts.into_iter()
        .map(|cut| {
            // SipHash with fixed keys: the same material gives the same key for the head's life.
            let mut hasher = DefaultHasher::new();
            kind.hash(&mut hasher);
            material[..cut].hash(&mut hasher);
            hasher.finish()
        })
        .collect()
}

/// The affine candidate's index if it is not much busier than the least loaded candidate:
/// `load <= min + LOAD_SLACK + min / LOAD_SLACK_FRACTION`. `loads` are the candidates' loads.
pub fn prefer(affine: Option<usize>, loads: &[u64]) -> Option<usize> {
    let affine = affine?;
    let load = *loads.get(affine)?;
    let min = loads.iter().copied().min()?;
    (load <= min.saturating_add(LOAD_SLACK).saturating_add(min / LOAD_SLACK_FRACTION)).then_some(affine)
}

/// Per deployment, which replica last took each prefix key.
#[derive(Debug, Default)]
pub struct PrefixAffinity {
    deployments: HashMap<String, Lru>,
}

impl PrefixAffinity {
    /// For the longest of `keys` whose remembered replica `candidate` finds, what it found.
    pub fn lookup<T>(&self, deployment: &str, keys: &[u64], candidate: impl Fn(&str) -> Option<T>) -> Option<T> {
        let lru = self.deployments.get(deployment)?;
        keys.iter().find_map(|key| lru.get(*key).and_then(&candidate))
    }

    /// Remembers `replica_id` as the holder of every key in `keys`.
    pub fn remember(&mut self, deployment: &str, keys: &[u64], replica_id: &str) {
        if keys.is_empty() {
            return;
        }
        if !self.deployments.contains_key(deployment) {
            self.deployments.insert(deployment.to_owned(), Lru::default());
        }
        if let Some(lru) = self.deployments.get_mut(deployment) {
            for &key in keys {
                lru.put(key, replica_id);
            }
        }
    }

    /// Forgets the deployments `keep` rejects (those that were removed).
    pub fn retain_deployments(&mut self, keep: impl Fn(&str) -> bool) {
        self.deployments.retain(|name, _| keep(name));
    }

    pub fn deployment_count(&self) -> usize {
        self.deployments.len()
    }
}

/// A map bounded to [`KEYS_PER_DEPLOYMENT`] keys that evicts the least recently put.
#[derive(Debug, Default)]
struct Lru {
    /// key -> (replica id, when last put).
    entries: HashMap<u64, (String, u64)>,
    /// when last put -> key, oldest first.
    by_age: BTreeMap<u64, u64>,
    clock: u64,
}

impl Lru {
    fn get(&self, key: u64) -> Option<&str> {
        self.entries.get(&key).map(|(replica, _)| replica.as_str())
    }

    fn put(&mut self, key: u64, replica_id: &str) {
        self.clock += 1;
        match self.entries.get_mut(&key) {
            Some((replica, put_at)) => {
                self.by_age.remove(put_at);
                *put_at = self.clock;
                if replica != replica_id {
                    replica_id.clone_into(replica);
                }
            }
            None => {
                self.entries.insert(key, (replica_id.to_owned(), self.clock));
            }
        }
        self.by_age.insert(self.clock, key);
        while self.entries.len() > KEYS_PER_DEPLOYMENT {
            let Some((_, oldest)) = self.by_age.pop_first() else { break };
            self.entries.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(messages: serde_json::Value) -> pb::GenerateRequest {
        pb::GenerateRequest {
            prompt: Some(Prompt::Chat(pb::ChatPrompt {
                messages_json: messages.to_string(),
                add_generation_prompt: true,
                template_kwargs_json: String::new(),
            })),
            ..Default::default()
        }
    }

    fn text(text: &str) -> pb::GenerateRequest {
        pb::GenerateRequest {
            prompt: Some(Prompt::Text(pb::TextPrompt { text: text.into(), add_special_tokens: true })),
            ..Default::default()
        }
    }

    fn shared(a: &PrefixKeys, b: &PrefixKeys) -> bool {
        a.iter().any(|k| b.contains(k))
    }

    /// A system prompt of `len` bytes.
    fn system(len: usize) -> String {
        "You are a careful assistant. ".repeat(len / 29 + 1)[..len].to_owned()
    }

    #[test]
    fn conversations_with_the_same_system_prompt_share_a_key_whatever_the_question() {
        // 700 bytes: shorter than the 1024 cut, so only the history cut can match.
        let sys = system(700);
        let a = prefix_keys(&chat(serde_json::json!([
            {"role": "system", "content": sys}, {"role": "user", "content": "What is Rust? ".repeat(60)}])));
        let b = prefix_keys(&chat(serde_json::json!([
            {"role": "system", "content": sys}, {"role": "user", "content": "Tell me a joke"}])));
        // Looked up longest first, `b`'s best key is its whole history: the system prompt.
        assert!(a.contains(&b[0]), "{a:?} {b:?}");
        // A system prompt that differs only at its end shares the 512-byte cut, not the history.
        let other = prefix_keys(&chat(serde_json::json!([
            {"role": "system", "content": system(699) + "!"}, {"role": "user", "content": "Tell me a joke"}])));
        assert!(!b.contains(&other[0]) && b.contains(&other[1]), "{b:?} {other:?}");
    }

    #[test]
    fn the_next_turn_of_a_long_conversation_matches_the_previous_one() {
        let history = serde_json::json!([
            {"role": "system", "content": system(600)},
            {"role": "user", "content": "x".repeat(3000)},
            {"role": "assistant", "content": "y".repeat(1500)},
        ]);
        let mut turn2 = history.as_array().unwrap().clone();
        turn2.push(serde_json::json!({"role": "user", "content": "and then?"}));
        let mut turn3 = turn2.clone();
        turn3.push(serde_json::json!({"role": "assistant", "content": "then this"}));
        turn3.push(serde_json::json!({"role": "user", "content": "and after that?"}));
        let (k2, k3) = (prefix_keys(&chat(turn2.into())), prefix_keys(&chat(turn3.into())));
        // Both reach the 4096 cut inside the shared history.
        assert!(shared(&k2, &k3));
        assert_eq!(k2.len(), 5, "cuts 512..4096 plus the history boundary");
    }

    #[test]
    fn short_prompts_have_no_key_and_cuts_stop_at_the_maximum() {
        assert!(prefix_keys(&text(&"a".repeat(MIN_PREFIX_BYTES - 1))).is_empty());
        assert_eq!(prefix_keys(&text(&"a".repeat(MIN_PREFIX_BYTES))).len(), 1);
        assert_eq!(prefix_keys(&text(&"a".repeat(100_000))).len(), CUTS.len());
        let short_chat = chat(serde_json::json!([{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"}]));
        assert!(prefix_keys(&short_chat).is_empty());
        assert!(prefix_keys(&chat(serde_json::json!({"not": "an array"}))).is_empty());
        assert!(prefix_keys(&pb::GenerateRequest::default()).is_empty());
    }

    #[test]
    fn text_and_token_prompts_match_on_their_head_and_differ_by_kind() {
        let head = "Context: ".repeat(120);
        let a = prefix_keys(&text(&format!("{head} question one")));
        let b = prefix_keys(&text(&format!("{head} question two, longer")));
        assert_eq!(a.last(), b.last(), "the 512-byte cut is shared");
        let no_bos = pb::GenerateRequest {
            prompt: Some(Prompt::Text(pb::TextPrompt { text: head.clone(), add_special_tokens: false })),
            ..Default::default()
        };
        assert!(!shared(&a, &prefix_keys(&no_bos)), "special tokens change what is cached");
        let tokens = |ids: Vec<u32>| pb::GenerateRequest {
            prompt: Some(Prompt::Tokens(pb::TokenPrompt { token_ids: ids })),
            ..Default::default()
        };
        let ids: Vec<u32> = (0..200).collect();
        let mut longer = ids.clone();
        longer.extend([7, 7, 7]);
        assert_eq!(prefix_keys(&tokens(ids.clone())), prefix_keys(&tokens(longer)), "128 ids = the 512-byte cut");
        assert!(prefix_keys(&tokens(ids[..127].to_vec())).is_empty());
    }

    #[test]
    fn prefer_takes_the_affine_replica_within_the_slack_only() {
        assert_eq!(prefer(Some(1), &[0, 4, 0]), Some(1));
        assert_eq!(prefer(Some(1), &[0, 5, 0]), None);
        // The slack grows with the load: 20 + 4 + 20/4 = 29.
        assert_eq!(prefer(Some(0), &[29, 20]), Some(0));
        assert_eq!(prefer(Some(0), &[30, 20]), None);
        assert_eq!(prefer(None, &[0, 0]), None);
        assert_eq!(prefer(Some(5), &[0, 0]), None, "an index out of range is no preference");
    }

    #[test]
    fn lookup_takes_the_longest_key_whose_replica_is_a_candidate() {
        let mut affinity = PrefixAffinity::default();
        affinity.remember("llm", &[1, 2], "short-holder");
        affinity.remember("llm", &[3], "long-holder");
        let candidates = ["short-holder", "long-holder"];
        let find = |id: &str| candidates.iter().position(|c| *c == id);
        assert_eq!(affinity.lookup("llm", &[3, 2, 1], find), Some(1));
        // The long key's holder is gone: the next key down decides.
        assert_eq!(affinity.lookup("llm", &[3, 2, 1], |id| (id == "short-holder").then_some(0)), Some(0));
        assert_eq!(affinity.lookup("other", &[3, 2, 1], find), None, "maps are per deployment");
        affinity.retain_deployments(|name| name != "llm");
        assert_eq!(affinity.deployment_count(), 0);
    }

    #[test]
    fn lru_evicts_the_least_recently_put_key() {
        let mut lru = Lru::default();
        for key in 0..KEYS_PER_DEPLOYMENT as u64 {
            lru.put(key, "a");
        }
        lru.put(0, "b"); // refreshed: key 1 is now the oldest
        lru.put(u64::MAX, "c");
        assert_eq!(lru.entries.len(), KEYS_PER_DEPLOYMENT);
        assert_eq!((lru.get(0), lru.get(1), lru.get(u64::MAX)), (Some("b"), None, Some("c")));
        assert_eq!(lru.by_age.len(), KEYS_PER_DEPLOYMENT);
    }
}
