//! The reasoning gate: with a reasoning model (a `reasoning_parser` on the head, vLLM's
//! default `enable_in_reasoning: false`), a constraint governs the answer, not the thinking
//! before it. A gated sequence samples freely until its output has written the reasoning's end
//! marker (`</think>`); the matcher then starts on the next token.
//!
//! Invariants:
//! - The marker is matched in the output's text, token by token (a marker split over several
//!   tokens opens the gate as well as one written as a single added token); the rest of the
//!   token that completes the marker is not constrained (the matcher starts after the token).
//! - A prompt that already ends the reasoning (the end marker after the last start marker, as a
//!   template that turns thinking off writes it) has no gate: [`reasoning_ended`].
//! - Only the last `marker.len() - 1` bytes of text are kept, so the gate's memory is bounded
//!   whatever the length of the thinking.

/// Whether `prompt` has already closed the reasoning: `end` appears after the last `start`
/// (with no `start` at all, any `end` counts).
pub fn reasoning_ended(prompt: &str, start: &str, end: &str) -> bool {
    let Some(last_end) = prompt.rfind(end) else { return false };
    match (!start.is_empty()).then(|| prompt.rfind(start)).flatten() {
        Some(last_start) => last_end > last_start,
        None => true,
    }
}

/// A sequence's wait for the end of its reasoning.
#[derive(Clone, Debug)]
pub struct ReasoningGate {
    marker: String,
    /// The output's last bytes (fewer than the marker's), where a marker may have begun.
    tail: String,
}

impl ReasoningGate {
    /// A gate that opens once the output has written `marker` (non-empty).
    pub fn new(marker: impl Into<String>) -> ReasoningGate {
        ReasoningGate { marker: marker.into(), tail: String::new() }
    }

    /// Adds a token's text; true once the marker is complete.
    pub fn push(&mut self, text: &str) -> bool {
        self.tail.push_str(text);
        if self.tail.contains(&self.marker) {
            return true;
        }
        let keep = self.marker.len().saturating_sub(1);
        if self.tail.len() > keep {
            let mut cut = self.tail.len() - keep;
            while !self.tail.is_char_boundary(cut) {
                cut += 1;
            }
            self.tail.drain(..cut);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_opens_on_the_marker_written_whole_or_in_pieces() {
        for pieces in [vec!["Hmm, 2+2.", "</think>"], vec!["x </", "th", "ink", ">\n\n"], vec!["ok</think>{"]] {
            let mut gate = ReasoningGate::new("</think>");
            let opened: Vec<bool> = pieces.iter().map(|p| gate.push(p)).collect();
            assert_eq!(opened.iter().position(|&o| o), Some(pieces.len() - 1), "{pieces:?}");
        }
        let mut gate = ReasoningGate::new("</think>");
        assert!(!["<think>", "</thin", "k", " >", "</ think>"].iter().any(|p| gate.push(p)));
    }

    #[test]
    fn the_gate_keeps_a_bounded_tail_across_multibyte_text() {
        let mut gate = ReasoningGate::new("</think>");
        for _ in 0..10_000 {
            assert!(!gate.push("思考é"));
        }
        assert!(gate.tail.len() < "</think>".len() + "思考é".len());
        assert!(!gate.push("思</th"));
        assert!(gate.push("ink>"));
        assert!(!ReasoningGate::new("</think>").push("think>"));
    }

    #[test]
    fn a_prompt_ends_the_reasoning_when_the_end_follows_the_last_start() {
        let (s, e) = ("<think>", "</think>");
        assert!(!reasoning_ended("<｜Assistant｜><think>\n", s, e));
        assert!(reasoning_ended("<｜Assistant｜><think>\n\n</think>\n\n", s, e));
        assert!(!reasoning_ended("<think>a</think> answer. User: again<think>\n", s, e));
        assert!(!reasoning_ended("no markers", s, e));
        assert!(reasoning_ended("</think> only", s, e));
        assert!(reasoning_ended("</think>", "", e));
    }
}
