//! Stop strings matched across arbitrary chunk boundaries of streamed text.
//!
//! Contract:
//! - Text is released as soon as it cannot be part of a stop string: only the longest suffix of
//!   the unreleased text that is a proper prefix of some stop string is held back (so the held
//!   text is always shorter than the longest stop string).
//! - The first stop string to complete ends the stream: the earliest match wins (on a tie, the
//!   longest); the output is cut at its start, or after it with `include_stop_str_in_output`;
//!   everything after it is dropped, including later pushes.
//! - `finish` releases the held text when generation ends for another reason.
//! - Empty stop strings are ignored. Matching is on exact bytes (no normalisation).

/// The result of feeding one chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text that may be sent to the client now.
    pub emit: String,
    /// A stop string has matched; generation should end.
    pub stopped: bool,
    /// Index (in the list given to `new`) of the stop string that matched.
    pub matched: Option<usize>,
}

/// Finds stop strings in streamed text.
#[derive(Debug, Clone)]
pub struct StopStringMatcher {
    stops: Vec<String>,
    include_stop_str_in_output: bool,
    held: String,
    stopped: bool,
}

impl StopStringMatcher {
    pub fn new(stops: Vec<String>, include_stop_str_in_output: bool) -> Self {
        StopStringMatcher { stops, include_stop_str_in_output, held: String::new(), stopped: false }
    }

    /// Whether there is anything to match (callers may skip the matcher otherwise).
    pub fn is_empty(&self) -> bool {
        self.stops.iter().all(String::is_empty)
    }

    /// Whether a stop string has matched.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds the next chunk of generated text.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome { emit: String::new(), stopped: true, matched: None };
        }
        self.held.push_str(text);
        if let Some((start, idx)) = self.earliest_match() {
            let end = if self.include_stop_str_in_output { start + self.stops[idx].len() } else { start };
            self.held.truncate(end);
            self.stopped = true;
            return StopOutcome { emit: std::mem::take(&mut self.held), stopped: true, matched: Some(idx) };
        }
        let keep = self.partial_match_len();
        let emit = self.held.drain(..self.held.len() - keep).collect();
        StopOutcome { emit, stopped: false, matched: None }
    }

    /// Releases the held text at the end of generation (nothing after a stop).
    pub fn finish(&mut self) -> String {
        if self.stopped { String::new() } else { std::mem::take(&mut self.held) }
    }

    /// (byte offset, stop index) of the earliest complete match; ties go to the longer stop.
    fn earliest_match(&self) -> Option<(usize, usize)> {
        self.stops
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|pos| (pos, i)))
            .min_by_key(|&(pos, i)| (pos, std::cmp::Reverse(self.stops[i].len())))
    }

    /// Length of the longest suffix of `held` that is a proper prefix of a stop string. Such a
    /// suffix starts at a character boundary because a stop string's prefix is valid UTF-8.
    fn partial_match_len(&self) -> usize {
        self.stops
            .iter()
            .map(|stop| {
                let max = (stop.len().saturating_sub(1)).min(self.held.len());
                (1..=max).rev().find(|&k| stop.is_char_boundary(k) && self.held.ends_with(&stop[..k])).unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], include: bool, chunks: &[&str]) -> (Vec<String>, bool, String) {
        let mut m = StopStringMatcher::new(stops.iter().map(|s| s.to_string()).collect(), include);
        let mut emitted = Vec::new();
        let mut stopped = false;
        for c in chunks {
            let out = m.push(c);
            emitted.push(out.emit);
            stopped |= out.stopped;
        }
        let tail = m.finish();
        (emitted, stopped, tail)
    }

    #[test]
    fn stop_split_over_several_chunks_is_found_and_cut() {
        let (emitted, stopped, tail) = run(&["###END"], false, &["Hello #", "#", "#E", "N", "D and more"]);
        assert!(stopped);
        assert_eq!(emitted.concat(), "Hello ");
        assert_eq!(tail, "");
        // Nothing that could be the stop string was released early.
        assert_eq!(emitted[0], "Hello ");
        assert_eq!(emitted[1], "");
    }

    #[test]
    fn stop_is_kept_when_include_is_set() {
        let (emitted, stopped, _) = run(&["</s>"], true, &["ab</", "s>cd"]);
        assert!(stopped);
        assert_eq!(emitted.concat(), "ab</s>");
    }

    #[test]
    fn text_sharing_a_prefix_with_a_stop_is_released() {
        let (emitted, stopped, tail) = run(&["STOP"], false, &["ST", "OR", "E ST", "AMP"]);
        assert!(!stopped);
        assert_eq!(emitted, vec!["", "STOR", "E ", "STAMP"]);
        assert_eq!(tail, "");
    }

    #[test]
    fn held_prefix_is_released_by_finish() {
        let (emitted, stopped, tail) = run(&["\n\nUser:"], false, &["Answer.\n", "\nUs"]);
        assert!(!stopped);
        assert_eq!(emitted.concat(), "Answer.");
        assert_eq!(tail, "\n\nUs");
    }

    #[test]
    fn earliest_stop_wins_and_reports_its_index() {
        let mut m = StopStringMatcher::new(vec!["world".into(), "o w".into()], false);
        let out = m.push("hello world");
        assert_eq!(out, StopOutcome { emit: "hell".into(), stopped: true, matched: Some(1) });
        assert_eq!(m.push("more"), StopOutcome { emit: String::new(), stopped: true, matched: None });
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn multibyte_stop_prefixes_hold_back_whole_characters() {
        let (emitted, stopped, _) = run(&["é!"], false, &["caf", "é", "?é", "!x"]);
        assert!(stopped);
        assert_eq!(emitted, vec!["caf", "", "é?", ""]);
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        let (emitted, stopped, tail) = run(&[""], false, &["abc"]);
        assert!(!stopped);
        assert_eq!(emitted.concat() + &tail, "abc");
    }
}
