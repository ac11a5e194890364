//! The streamed response of an OpenAI-compatible server, reduced to what the benchmark times.
//!
//! [`SseDecoder`] turns received bytes into the `data` of complete server-sent events (an event
//! completes at its blank line; `event:`/`id:`/`retry:` fields and `:` comments are ignored).
//! [`StreamTally`] consumes those payloads together with the instant their last byte arrived:
//! a chunk whose choices carry text (`text` for completions, `delta.content` or
//! `delta.reasoning_content` for chat) is a token arrival; `usage` (the final chunk under
//! `stream_options.include_usage`) gives the token counts; `[DONE]` or a `finish_reason` marks a
//! stream that ended properly. A chunk holding several tokens is one arrival and one
//! inter-token gap, as `vllm bench serve` counts them.

use std::time::{Duration, Instant};

use serde::Deserialize;

use super::report::RequestRecord;

/// Splits a byte stream into the data payloads of server-sent events.
#[derive(Debug, Default)]
pub struct SseDecoder {
    /// Bytes after the last line break seen.
    partial: Vec<u8>,
    /// `data` lines of the event being read, joined by `\n`.
    data: Option<String>,
}

impl SseDecoder {
    /// Feeds received bytes; returns the data of every event they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        self.partial.extend_from_slice(bytes);
        let buf = std::mem::take(&mut self.partial);
        let mut start = 0;
        while let Some(pos) = buf[start..].iter().position(|&b| b == b'\n') {
            let line = &buf[start..start + pos];
            self.line(line.strip_suffix(b"\r").unwrap_or(line), &mut events);
            start += pos + 1;
        }
        self.partial = buf[start..].to_vec();
        events
    }

    /// The event left open when the stream ended (a server that omits the final blank line).
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.partial);
        let mut events = Vec::new();
        self.line(rest.strip_suffix(b"\r").unwrap_or(&rest), &mut events);
        self.data.take().or_else(|| events.pop())
    }

    fn line(&mut self, line: &[u8], events: &mut Vec<String>) {
        if line.is_empty() {
            events.extend(self.data.take());
        } else if let Some(value) = line.strip_prefix(b"data:") {
            let value = String::from_utf8_lossy(value.strip_prefix(b" ").unwrap_or(value));
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(&value);
                }
                None => self.data = Some(value.into_owned()),
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<Usage>,
    error: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    text: Option<String>,
    delta: Option<Delta>,
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Delta {
    content: Option<String>,
    reasoning_content: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
struct Usage {
    prompt_tokens: Option<usize>,
    completion_tokens: Option<usize>,
}

impl Choice {
    fn has_text(&self) -> bool {
        let nonempty = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.is_empty());
        nonempty(&self.text)
            || self.delta.as_ref().is_some_and(|d| nonempty(&d.content) || nonempty(&d.reasoning_content))
    }
}

/// Token arrivals and counts of one streamed response.
#[derive(Debug)]
pub struct StreamTally {
    sent: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    itl: Vec<Duration>,
    text_chunks: usize,
    usage: Option<Usage>,
    finish_reason: Option<String>,
    done: bool,
}

impl StreamTally {
    /// A tally for a request sent at `sent`.
    pub fn new(sent: Instant) -> StreamTally {
        StreamTally {
            sent,
            first: None,
            last: None,
            itl: Vec::new(),
            text_chunks: 0,
            usage: None,
            finish_reason: None,
            done: false,
        }
    }

    /// Whether `[DONE]` has arrived.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Accounts for one event's data that arrived at `at`; an error object in the stream or a
    /// payload that is not a chunk fails the request.
    pub fn on_data(&mut self, data: &str, at: Instant) -> Result<(), String> {
        if data.trim() == "[DONE]" {
            self.done = true;
            return Ok(());
        }
        let chunk: Chunk =
            serde_json::from_str(data).map_err(|e| format!("unparseable chunk ({e}): {}", clip(data, 300)))?;
        if let Some(error) = chunk.error {
            return Err(format!("error in stream: {}", clip(&error.to_string(), 500)));
        }
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        if let Some(reason) = chunk.choices.iter().find_map(|c| c.finish_reason.clone()) {
            self.finish_reason = Some(reason);
        }
        if chunk.choices.iter().any(Choice::has_text) {
            match self.last {
                None => self.first = Some(at),
                Some(prev) => self.itl.push(at - prev),
            }
            self.last = Some(at);
            self.text_chunks += 1;
        }
        Ok(())
    }

    /// The record of a stream that ended at `ended`. Token counts come from `usage`, else the
    /// output count is the number of text chunks and the prompt count is `prompt_tokens`.
    pub fn finish(self, ended: Instant, prompt_tokens: usize) -> Result<RequestRecord, String> {
        if !self.done && self.finish_reason.is_none() {
            return Err(format!(
                "stream ended without [DONE] or a finish_reason after {} text chunks",
                self.text_chunks
            ));
        }
        let output_tokens = self.usage.and_then(|u| u.completion_tokens).unwrap_or(self.text_chunks);
        if output_tokens == 0 {
            return Err(format!("no output (finish_reason {:?})", self.finish_reason));
        }
        let e2e = ended - self.sent;
        Ok(RequestRecord {
            prompt_tokens: self.usage.and_then(|u| u.prompt_tokens).unwrap_or(prompt_tokens),
            output_tokens,
            // Tokens counted by usage but never shown as text: the first arrived at the end.
            ttft: self.first.map_or(e2e, |t| t - self.sent),
            itl: self.itl,
            e2e,
            ..Default::default()
        })
    }
}

/// At most `max` characters of `s`, marked when cut.
pub fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_reassembles_events_split_across_reads() {
        let mut d = SseDecoder::default();
        assert!(d.push(b"data: {\"a\"").is_empty());
        assert!(d.push(b":1}\r\n").is_empty());
        assert_eq!(d.push(b"\r\ndata: [DONE]\n\n"), vec!["{\"a\":1}".to_string(), "[DONE]".to_string()]);
    }

    #[test]
    fn decoder_joins_multiline_data_and_skips_comments_and_other_fields() {
        let mut d = SseDecoder::default();
        let events = d.push(b": keep-alive\n\nevent: message\nid: 3\ndata:x\ndata: y\n\n");
        assert_eq!(events, vec!["x\ny".to_string()]);
    }

    #[test]
    fn decoder_yields_an_unterminated_last_event_at_end_of_stream() {
        let mut d = SseDecoder::default();
        assert!(d.push(b"data: [DONE]").is_empty());
        assert_eq!(d.finish().as_deref(), Some("[DONE]"));
    }

    fn text(t: &str) -> String {
        format!(r#"{{"choices":[{{"index":0,"text":"{t}","finish_reason":null}}]}}"#)
    }

    #[test]
    fn tally_times_text_chunks_and_prefers_usage_counts() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut tally = StreamTally::new(t0);
        tally.on_data(&text(""), ms(5)).unwrap();
        tally.on_data(&text("a"), ms(100)).unwrap();
        tally.on_data(&text("b"), ms(130)).unwrap();
        tally.on_data(&text("c"), ms(170)).unwrap();
        let last =
            r#"{"choices":[{"text":"","finish_reason":"length"}],"usage":{"prompt_tokens":9,"completion_tokens":4}}"#;
        tally.on_data(last, ms(171)).unwrap();
        tally.on_data("[DONE]", ms(172)).unwrap();
        let r = tally.finish(ms(175), 1).unwrap();
        assert_eq!((r.prompt_tokens, r.output_tokens), (9, 4));
        assert_eq!(r.ttft, Duration::from_millis(100));
        assert_eq!(r.itl, vec![Duration::from_millis(30), Duration::from_millis(40)]);
        assert_eq!(r.e2e, Duration::from_millis(175));
    }

    #[test]
    fn tally_counts_chat_deltas_and_falls_back_to_chunk_count() {
        let t0 = Instant::now();
        let mut tally = StreamTally::new(t0);
        for c in ["{\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}", r#"{"choices":[{"delta":{"content":"hi"}}]}"#]
        {
            tally.on_data(c, t0).unwrap();
        }
        tally.on_data(r#"{"choices":[{"delta":{"reasoning_content":"hm"}}]}"#, t0).unwrap();
        tally.on_data("[DONE]", t0).unwrap();
        let r = tally.finish(t0, 12).unwrap();
        assert_eq!((r.prompt_tokens, r.output_tokens), (12, 2));
    }

    #[test]
    fn tally_fails_on_error_objects_truncated_streams_and_empty_output() {
        let t0 = Instant::now();
        let mut tally = StreamTally::new(t0);
        let err = tally.on_data(r#"{"error":{"code":500,"message":"slot crashed"}}"#, t0).unwrap_err();
        assert!(err.contains("slot crashed"), "{err}");

        let mut tally = StreamTally::new(t0);
        tally.on_data(&text("a"), t0).unwrap();
        assert!(tally.finish(t0, 1).unwrap_err().contains("without [DONE]"));

        let mut tally = StreamTally::new(t0);
        tally.on_data("[DONE]", t0).unwrap();
        assert!(tally.finish(t0, 1).unwrap_err().contains("no output"));
    }
}
