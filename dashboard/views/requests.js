// Requests: the head's log of recent OpenAI requests, GET /api/requests?limit=N (newest first),
// polled every 2 s. The prompt column exists only when the head runs with --log-requests
// (log_requests: true); otherwise the head never stores prompt text.

import { Poller, getJson } from '../api.js';
import { clock, h, ms, notice, replace, shortId, tone } from '../util.js';

const LIMITS = [50, 100, 500, 1000];

export function create(section) {
  const limit = h('select', { dataset: { testid: 'requests-limit' }, 'aria-label': 'rows' },
    LIMITS.map((n) => h('option', { value: String(n), selected: n === 100 }, `last ${n}`)));
  const filter = h('input', { type: 'search', placeholder: 'filter: model, replica, error…', dataset: { testid: 'requests-filter' }, 'aria-label': 'filter' });
  const info = h('span', { class: 'muted', dataset: { testid: 'requests-info' } });
  const body = h('div');
  replace(section, h('div', { class: 'toolbar' }, h('h1', {}, 'Recent requests'), limit, filter, info), body);
  let last = null;

  const render = () => {
    if (!last) return;
    const needle = filter.value.trim().toLowerCase();
    const rows = (last.requests || []).filter((r) => !needle || JSON.stringify(r).toLowerCase().includes(needle));
    info.textContent = `${rows.length} shown${last.log_requests ? '' : ' · prompts are not logged (--log-requests is off)'}`;
    replace(body, rows.length ? table(rows, Boolean(last.log_requests)) : notice('No requests yet.', 'info', 'no-requests'));
  };

  const poller = new Poller(async () => {
    const answer = await getJson(`api/requests?limit=${limit.value}`);
    if (!answer.ok) {
      last = null;
      const text = answer.missing ? 'This head does not keep a request log (no /api/requests).' : `Could not read the requests: ${answer.error}`;
      replace(body, notice(text, answer.missing ? 'info' : 'error', 'requests-error'));
      section.dataset.ready = 'true';
      return;
    }
    last = answer.data;
    render();
    section.dataset.ready = 'true';
  }, 2000);
  limit.addEventListener('change', () => poller.refresh());
  filter.addEventListener('input', render);
  return { show: () => poller.start(), hide: () => poller.stop() };
}

/** "stop", "length", the error, or "–": how a request ended. */
export function outcome(r) {
  if (r.error) return r.error;
  return r.finish_reason ?? (r.status >= 400 ? `HTTP ${r.status}` : '–');
}

/** "moved 2×" for a request that moved to another replica after its own failed, else null. */
export function migrationNote(r) {
  return r.migrations > 0 ? `moved ${r.migrations}×` : null;
}

function table(rows, withPrompt) {
  const columns = ['time', 'model', 'replica', 'status', 'prompt tok', 'completion tok', 'TTFT', 'ITL', 'duration', 'finish / error'];
  if (withPrompt) columns.push('prompt');
  return h(
    'div',
    { class: 'table-wrap' },
    h(
      'table',
      { class: 'requests', dataset: { testid: 'requests-table' } },
      h('thead', {}, h('tr', {}, columns.map((c) => h('th', {}, c)))),
      h('tbody', {}, rows.map((r) => row(r, withPrompt))),
    ),
  );
}

function row(r, withPrompt) {
  const failed = Boolean(r.error) || r.status >= 400;
  return h(
    'tr',
    { class: failed ? 'failed' : '', dataset: { testid: 'request-row', id: r.id ?? '', status: String(r.status ?? '') } },
    h('td', { title: new Date(r.unix_ms).toISOString() }, clock(r.unix_ms)),
    h('td', { dataset: { testid: 'request-model' } }, r.model ?? '–', h('div', { class: 'muted small' }, `${r.route ?? ''}${r.stream ? ' · stream' : ''}`)),
    h('td', { class: 'mono', title: r.replica_id ?? '' }, r.replica_id ? shortId(r.replica_id) : '–',
      r.deployment ? h('div', { class: 'muted small' }, r.deployment) : null,
      migrationNote(r) ? h('div', { class: 'muted small', title: 'its replica failed mid-request; it continued here', dataset: { testid: 'request-migrations' } }, migrationNote(r)) : null),
    h('td', {}, h('span', { class: `pill pill-${failed ? 'bad' : tone(String(r.status))}` }, String(r.status ?? '–'))),
    h('td', { class: 'num' }, String(r.prompt_tokens ?? '–')),
    h('td', { class: 'num', dataset: { testid: 'request-completion-tokens' } }, String(r.completion_tokens ?? '–')),
    h('td', { class: 'num' }, ms(r.ttft_ms)),
    h('td', { class: 'num' }, ms(r.itl_ms)),
    h('td', { class: 'num' }, ms(r.duration_ms)),
    h('td', { class: failed ? 'error-cell error-text' : 'error-cell' }, outcome(r)),
    withPrompt ? h('td', { class: 'prompt-cell', title: r.prompt ?? '', dataset: { testid: 'request-prompt' } }, r.prompt ?? '') : null,
  );
}
