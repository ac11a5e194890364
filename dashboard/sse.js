// Server-sent events over fetch (EventSource cannot POST): a pure incremental parser and a reader
// for a fetch Response body. Only the parts the OpenAI stream uses: `data:` lines (several join
// with "\n"), comments (":" lines, the head's keep-alives) ignored, events split by a blank line
// in any of the three line-ending styles.

/**
 * Feeds text into the parser state; returns the complete events' data strings and the new state.
 * state: {buffer: string, data: string[]}.
 */
export function feed(state, text) {
  let buffer = state.buffer + text;
  let data = state.data.slice();
  const events = [];
  for (;;) {
    const match = /\r\n|\r|\n/.exec(buffer);
    if (!match) break;
    // A lone "\r" at the very end may be the first half of "\r\n": wait for more.
    if (match[0] === '\r' && match.index === buffer.length - 1) break;
    const line = buffer.slice(0, match.index);
    buffer = buffer.slice(match.index + match[0].length);
    if (line === '') {
      if (data.length) events.push(data.join('\n'));
      data = [];
    } else if (line.startsWith('data:')) {
      data.push(line.slice(5).replace(/^ /, ''));
    }
    // Other fields (event:, id:, retry:) and comments are not used by the OpenAI stream.
  }
  return { events, state: { buffer, data } };
}

export function initialState() {
  return { buffer: '', data: [] };
}

/**
 * Reads an SSE response body, calling onData(string) for each event's data (including
 * "[DONE]"), until the body ends or `signal` aborts (then it throws the AbortError).
 */
export async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let state = initialState();
  for (;;) {
    const { value, done } = await reader.read();
    const text = done ? decoder.decode() + '\n\n' : decoder.decode(value, { stream: true });
    const parsed = feed(state, text);
    state = parsed.state;
    for (const data of parsed.events) onData(data);
    if (done) return;
  }
}
