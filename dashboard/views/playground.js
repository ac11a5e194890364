// Playground: a chat with a deployed model through the OpenAI API the control server also mounts
// (GET /v1/models, POST /v1/chat/completions with stream: true, on this origin). The reply
// streams in (fetch + ReadableStream, parsed by sse.js); `delta.reasoning_content` (a reasoning
// parser is configured) goes to a collapsible "reasoning" block apart from `delta.content`;
// errors, in the response body or as an error event mid-stream, are shown as OpenAI states them.
// Stop aborts the fetch, which makes the head cancel the request on the worker. The optional API
// key is kept in localStorage and sent as a Bearer token.

import { apiKey, authHeaders, errorText, getJson, setApiKey } from '../api.js';
import { readEvents } from '../sse.js';
import { h, ms, notice, num, replace } from '../util.js';

export function create(section) {
  const ui = build();
  replace(section, ui.root);
  const chat = new Chat(ui);
  let loaded = false;
  return {
    show: () => {
      if (!loaded) chat.loadModels();
      loaded = true;
    },
    hide: () => {},
  };
}

function build() {
  const model = h('select', { id: 'pg-model', dataset: { testid: 'pg-model' } });
  const reload = h('button', { type: 'button', class: 'secondary', dataset: { testid: 'pg-reload' } }, 'reload');
  const key = h('input', { id: 'pg-key', type: 'password', autocomplete: 'off', placeholder: 'only if the head has --api-key', value: apiKey(), dataset: { testid: 'pg-key' } });
  const system = h('textarea', { id: 'pg-system', rows: 3, placeholder: 'You are a helpful assistant.', dataset: { testid: 'pg-system' } });
  const temperature = h('input', { id: 'pg-temperature', type: 'number', min: '0', max: '2', step: '0.1', value: '0.7', dataset: { testid: 'pg-temperature' } });
  const maxTokens = h('input', { id: 'pg-max-tokens', type: 'number', min: '1', step: '1', value: '256', dataset: { testid: 'pg-max-tokens' } });
  const message = h('textarea', { id: 'pg-message', rows: 3, placeholder: 'Message (Ctrl+Enter sends)', dataset: { testid: 'pg-message' } });
  const send = h('button', { type: 'submit', dataset: { testid: 'pg-send' } }, 'Send');
  const stop = h('button', { type: 'button', class: 'danger', disabled: true, dataset: { testid: 'pg-stop' } }, 'Stop');
  const clear = h('button', { type: 'button', class: 'secondary', dataset: { testid: 'pg-clear' } }, 'Clear');
  const status = h('div');
  const log = h('div', { class: 'chat-log', dataset: { testid: 'pg-log' }, 'aria-live': 'polite' });
  const label = (input, text) => h('label', { for: input.id }, text);
  const form = h('form', { class: 'composer' }, message, h('div', { class: 'buttons' }, send, stop, clear));
  const root = h(
    'div',
    { class: 'playground' },
    h(
      'aside',
      { class: 'card settings' },
      h('h1', {}, 'Playground'),
      label(model, 'model'),
      h('div', { class: 'row' }, model, reload),
      label(system, 'system prompt'),
      system,
      h('div', { class: 'row' }, h('div', {}, label(temperature, 'temperature'), temperature), h('div', {}, label(maxTokens, 'max tokens'), maxTokens)),
      label(key, 'API key (stored in this browser)'),
      key,
    ),
    h('div', { class: 'card conversation' }, status, log, form),
  );
  return { root, model, reload, key, system, temperature, maxTokens, message, send, stop, clear, status, log, form };
}

class Chat {
  constructor(ui) {
    this.ui = ui;
    this.history = [];
    this.controller = null;
    ui.reload.addEventListener('click', () => this.loadModels());
    ui.key.addEventListener('change', () => {
      setApiKey(ui.key.value.trim());
      this.loadModels();
    });
    ui.form.addEventListener('submit', (e) => {
      e.preventDefault();
      this.send();
    });
    ui.message.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        this.send();
      }
    });
    ui.stop.addEventListener('click', () => this.controller?.abort());
    ui.clear.addEventListener('click', () => {
      this.controller?.abort();
      this.history = [];
      replace(ui.log);
    });
  }

  async loadModels() {
    const answer = await getJson('v1/models', { headers: authHeaders() });
    const { model, status } = this.ui;
    if (!answer.ok) {
      const why = answer.missing
        ? 'This head does not serve the OpenAI API on this port: use port 8000.'
        : answer.status === 401
          ? `The API needs a key: ${answer.error}`
          : `Could not list the models: ${answer.error}`;
      replace(status, notice(why, 'error', 'pg-models-error'));
      return;
    }
    const ids = (answer.data.data || []).map((m) => m.id);
    const chosen = model.value;
    replace(model, ids.map((id) => h('option', { value: id }, id)));
    if (ids.includes(chosen)) model.value = chosen;
    replace(status, ids.length ? null : notice('No model is deployed yet.', 'info', 'pg-no-models'));
    model.dataset.loaded = String(ids.length);
  }

  async send() {
    const { ui } = this;
    const text = ui.message.value.trim();
    if (!text || this.controller || !ui.model.value) return;
    ui.message.value = '';
    this.history.push({ role: 'user', content: text });
    ui.log.append(h('div', { class: 'msg user', dataset: { testid: 'pg-user-message' } }, text));
    const reply = new Reply();
    ui.log.append(reply.el);
    const messages = [...(ui.system.value.trim() ? [{ role: 'system', content: ui.system.value.trim() }] : []), ...this.history];
    const body = {
      model: ui.model.value,
      messages,
      stream: true,
      stream_options: { include_usage: true },
      temperature: Number(ui.temperature.value),
      max_tokens: Math.max(1, Math.round(Number(ui.maxTokens.value) || 256)),
    };
    this.controller = new AbortController();
    ui.stop.disabled = false;
    ui.send.disabled = true;
    try {
      await this.stream(body, reply);
    } catch (e) {
      if (e.name === 'AbortError') reply.end('stopped', 'stopped');
      else reply.fail(`the request failed: ${e.message || e}`);
    } finally {
      if (reply.content) this.history.push({ role: 'assistant', content: reply.content });
      else this.history.pop();
      this.controller = null;
      ui.stop.disabled = true;
      ui.send.disabled = false;
    }
  }

  async stream(body, reply) {
    const started = performance.now();
    const response = await fetch('v1/chat/completions', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream', ...authHeaders() },
      body: JSON.stringify(body),
      signal: this.controller.signal,
    });
    if (!response.ok) {
      reply.fail(`${response.status}: ${await errorText(response)}`);
      return;
    }
    let finish = null;
    let usage = null;
    await readEvents(response, (data) => {
      if (data === '[DONE]') return;
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch {
        return;
      }
      if (chunk.error) {
        reply.fail(chunk.error.message || JSON.stringify(chunk.error));
        return;
      }
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (!choice) return;
      if (choice.delta?.reasoning_content) reply.addReasoning(choice.delta.reasoning_content, performance.now() - started);
      if (choice.delta?.content) reply.addContent(choice.delta.content, performance.now() - started);
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    if (reply.state === 'error') return;
    const elapsed = performance.now() - started;
    const tokens = usage?.completion_tokens;
    const rate = tokens && reply.ttft !== null && elapsed > reply.ttft ? (tokens - 1) / ((elapsed - reply.ttft) / 1000) : null;
    const meta = [`finish: ${finish ?? '–'}`, `TTFT ${ms(reply.ttft)}`, tokens !== undefined ? `${tokens} tokens` : null, rate ? `${num(rate, 1)} tok/s` : null, `total ${ms(elapsed)}`];
    reply.end('done', meta.filter(Boolean).join(' · '));
  }
}

/** One assistant message: reasoning (collapsible, shown only when some arrives), content, a meta line. */
class Reply {
  constructor() {
    this.content = '';
    this.reasoning = '';
    this.ttft = null;
    this.state = 'streaming';
    this.reasoningText = h('div', { class: 'reasoning-text', dataset: { testid: 'pg-reasoning-text' } });
    this.reasoningBlock = h('details', { class: 'reasoning', hidden: true, open: true, dataset: { testid: 'pg-reasoning' } },
      h('summary', {}, 'reasoning'), this.reasoningText);
    this.contentEl = h('div', { class: 'content', dataset: { testid: 'pg-content' } });
    this.meta = h('div', { class: 'meta', dataset: { testid: 'pg-meta' } }, 'waiting for the first token…');
    this.el = h('div', { class: 'msg assistant', dataset: { testid: 'pg-reply', state: 'streaming' } }, this.reasoningBlock, this.contentEl, this.meta);
  }

  first(at) {
    if (this.ttft === null) {
      this.ttft = at;
      this.meta.textContent = 'streaming…';
    }
  }

  addReasoning(text, at) {
    this.first(at);
    this.reasoning += text;
    this.reasoningBlock.hidden = false;
    this.reasoningText.textContent = this.reasoning;
  }

  addContent(text, at) {
    this.first(at);
    if (this.reasoning && this.reasoningBlock.open && !this.content) this.reasoningBlock.open = false;
    this.content += text;
    this.contentEl.textContent = this.content;
    const log = this.el.parentElement;
    if (log) log.scrollTop = log.scrollHeight;
  }

  fail(message) {
    this.state = 'error';
    this.el.dataset.state = 'error';
    this.meta.replaceChildren(h('span', { class: 'error-text', dataset: { testid: 'pg-error' } }, message));
  }

  end(state, meta) {
    if (this.state === 'error') return;
    this.state = state;
    this.el.dataset.state = state;
    this.meta.textContent = meta;
  }
}
