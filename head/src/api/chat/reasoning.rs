//! Reasoning parsers: split a reasoning model's output into `reasoning_content` and `content`, as
//! vLLM's `--reasoning-parser` does.
//!
//! `deepseek_r1`: everything before `</think>` is reasoning, the rest is content. An optional
//! leading `<think>` is dropped (R1's chat template already opens the think block in the prompt,
//! so the model usually starts inside it). If `</think>` never comes, everything is reasoning.
//! The parser is incremental: tags may arrive split across deltas at any byte, so text that could
//! be the start of a tag is held back until the next delta (or the end) decides it.

use serde::{Deserialize, Serialize};

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

/// The reasoning parsers a model can be configured with (vLLM's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasoningParserKind {
    DeepseekR1,
}

impl std::str::FromStr for ReasoningParserKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "deepseek_r1" => Ok(ReasoningParserKind::DeepseekR1),
            other => Err(format!("unknown reasoning parser `{other}` (known: deepseek_r1)")),
        }
    }
}

impl ReasoningParserKind {
    /// The name users type.
    pub fn name(self) -> &'static str {
        match self {
            ReasoningParserKind::DeepseekR1 => "deepseek_r1",
        }
    }

    /// The markers that open and close the reasoning: a structured-output constraint waits for
    /// the closing one (vLLM's default, `enable_in_reasoning: false`).
    pub fn markers(self) -> (&'static str, &'static str) {
        match self {
            ReasoningParserKind::DeepseekR1 => (THINK_OPEN, THINK_CLOSE),
        }
    }
}

/// Text of one delta, split.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Nothing decided yet: the output may open with `<think>`.
    Start,
    Reasoning,
    Content,
}

/// Incremental splitter for one choice.
#[derive(Clone, Debug)]
pub struct ReasoningSplitter {
    phase: Phase,
    /// Text that may be the beginning of a tag, held until the next delta decides.
    held: String,
}

impl ReasoningSplitter {
    pub fn new(kind: ReasoningParserKind) -> Self {
        match kind {
            ReasoningParserKind::DeepseekR1 => ReasoningSplitter { phase: Phase::Start, held: String::new() },
        }
    }

    /// Splits the next piece of output.
    pub fn push(&mut self, text: &str) -> Split {
        let mut buf = std::mem::take(&mut self.held);
        buf.push_str(text);
        let mut out = Split::default();
        loop {
            match self.phase {
                Phase::Start => {
                    if let Some(rest) = buf.strip_prefix(THINK_OPEN) {
                        buf = rest.to_string();
                        self.phase = Phase::Reasoning;
                    } else if THINK_OPEN.starts_with(buf.as_str()) {
                        self.held = buf;
                        return out;
                    } else {
                        self.phase = Phase::Reasoning;
                    }
                }
                Phase::Reasoning => {
                    if let Some(pos) = buf.find(THINK_CLOSE) {
                        out.reasoning.push_str(&buf[..pos]);
                        buf = buf[pos + THINK_CLOSE.len()..].to_string();
                        self.phase = Phase::Content;
                    } else {
                        let keep = partial_tag_suffix(&buf, THINK_CLOSE);
                        let cut = buf.len() - keep;
                        out.reasoning.push_str(&buf[..cut]);
                        self.held = buf[cut..].to_string();
                        return out;
                    }
                }
                Phase::Content => {
                    out.content.push_str(&buf);
                    return out;
                }
            }
        }
    }

    /// The end of the output: held-back text was not a tag after all.
    pub fn finish(&mut self) -> Split {
        let held = std::mem::take(&mut self.held);
        match self.phase {
            Phase::Content => Split { reasoning: String::new(), content: held },
            Phase::Start | Phase::Reasoning => {
                self.phase = Phase::Reasoning;
                Split { reasoning: held, content: String::new() }
            }
        }
    }

    /// Splits a whole output at once.
    pub fn split_all(kind: ReasoningParserKind, text: &str) -> Split {
        let mut parser = ReasoningSplitter::new(kind);
        let mut split = parser.push(text);
        let tail = parser.finish();
        split.reasoning.push_str(&tail.reasoning);
        split.content.push_str(&tail.content);
        split
    }
}

/// Length of the longest proper suffix of `text` that is a prefix of `tag` (a tag in the making).
pub(crate) fn partial_tag_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&k| text.is_char_boundary(text.len() - k) && tag.starts_with(&text[text.len() - k..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const R1: ReasoningParserKind = ReasoningParserKind::DeepseekR1;

    fn split_in_pieces(text: &str, cuts: &[usize]) -> Split {
        let mut parser = ReasoningSplitter::new(R1);
        let mut total = Split::default();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&text.len())) {
            let piece = parser.push(&text[start..cut]);
            total.reasoning.push_str(&piece.reasoning);
            total.content.push_str(&piece.content);
            start = cut;
        }
        let tail = parser.finish();
        total.reasoning.push_str(&tail.reasoning);
        total.content.push_str(&tail.content);
        total
    }

    #[test]
    fn text_before_think_close_is_reasoning() {
        let s = ReasoningSplitter::split_all(R1, "Let me think.</think>The answer is 4.");
        assert_eq!(s, Split { reasoning: "Let me think.".into(), content: "The answer is 4.".into() });
    }

    #[test]
    fn leading_think_open_is_dropped() {
        let s = ReasoningSplitter::split_all(R1, "<think>\nhmm\n</think>\n\nfour");
        assert_eq!(s, Split { reasoning: "\nhmm\n".into(), content: "\n\nfour".into() });
    }

    #[test]
    fn without_think_close_everything_is_reasoning() {
        let s = ReasoningSplitter::split_all(R1, "still thinking </thi");
        assert_eq!(s, Split { reasoning: "still thinking </thi".into(), content: String::new() });
    }

    #[test]
    fn tags_split_at_every_byte_position_give_the_same_split() {
        let text = "<think>a ü </think>b é</think>";
        let want = Split { reasoning: "a ü ".into(), content: "b é</think>".into() };
        let bounds: Vec<usize> = (1..text.len()).filter(|&i| text.is_char_boundary(i)).collect();
        for &i in &bounds {
            assert_eq!(split_in_pieces(text, &[i]), want, "cut at {i}");
            for &j in bounds.iter().filter(|&&j| j > i) {
                assert_eq!(split_in_pieces(text, &[i, j]), want, "cuts at {i}, {j}");
            }
        }
    }

    #[test]
    fn one_byte_at_a_time_gives_the_same_split() {
        let text = "<think>x</think>y";
        let cuts: Vec<usize> = (1..text.len()).collect();
        assert_eq!(split_in_pieces(text, &cuts), Split { reasoning: "x".into(), content: "y".into() });
    }

    #[test]
    fn a_partial_tag_is_held_back_until_decided() {
        let mut p = ReasoningSplitter::new(R1);
        assert_eq!(p.push("abc</th"), Split { reasoning: "abc".into(), content: String::new() });
        assert_eq!(p.push("ing"), Split { reasoning: "</thing".into(), content: String::new() });
        assert_eq!(p.push("</think>ok"), Split { reasoning: String::new(), content: "ok".into() });
    }

    #[test]
    fn output_that_only_looks_like_an_open_tag_is_reasoning() {
        assert_eq!(ReasoningSplitter::split_all(R1, "<thin").reasoning, "<thin");
        assert_eq!(ReasoningSplitter::split_all(R1, "<think>").reasoning, "");
        assert_eq!(ReasoningSplitter::split_all(R1, "<").reasoning, "<");
    }

    #[test]
    fn parser_names_parse() {
        assert_eq!("deepseek_r1".parse::<ReasoningParserKind>(), Ok(R1));
        assert!("qwen3".parse::<ReasoningParserKind>().is_err());
    }
}
