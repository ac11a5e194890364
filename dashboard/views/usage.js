// Usage: what each tenant of the API keys used, per model and UTC day, from GET /api/lumen/usage
// (polled every 5 s while shown): requests by outcome, refusals by the keys' limits, prompt,
// completion and cached tokens; above, each tenant's totals over the range. The endpoint needs
// the head's admin token when it has one (--admin-token): entered here, it is kept in
// localStorage and sent as a Bearer token; a 401 asks for it.

import { Poller, adminHeaders, adminToken, getJson, setAdminToken } from '../api.js';
import { h, notice, num, replace } from '../util.js';

const RANGES = [[1, 'today (UTC)'], [7, 'last 7 days'], [31, 'last 31 days']];
const OUTCOMES = [['success', 'success'], ['invalid', 'invalid'], ['rate_limited', 'rate limited'], ['error', 'error'], ['cancelled', 'cancelled']];

export function create(section) {
  const range = h('select', { dataset: { testid: 'usage-range' }, 'aria-label': 'days' },
    RANGES.map(([days, label]) => h('option', { value: String(days), selected: days === 7 }, label)));
  const filter = h('input', { type: 'search', placeholder: 'filter: tenant, model…', dataset: { testid: 'usage-filter' }, 'aria-label': 'filter' });
  const token = h('input', { type: 'password', autocomplete: 'off', placeholder: 'admin token', value: adminToken(), dataset: { testid: 'usage-token' }, 'aria-label': 'admin token' });
  const info = h('span', { class: 'muted', dataset: { testid: 'usage-info' } });
  const body = h('div');
  replace(section, h('div', { class: 'toolbar' }, h('h1', {}, 'Usage'), range, filter, token, info), body);
  let last = null;

  const render = () => {
    if (!last) return;
    const needle = filter.value.trim().toLowerCase();
    const rows = (last.usage || []).filter((r) => !needle || `${r.tenant} ${r.model}`.toLowerCase().includes(needle));
    info.textContent = `${rows.length} rows · kept ${last.retention_days ?? '–'} days`;
    replace(body, rows.length
      ? [totalsTable(tenantTotals(rows)), usageTable(byNewestDay(rows))]
      : notice('No usage in this range yet: only requests with an API key count.', 'info', 'no-usage'));
  };

  const poller = new Poller(async () => {
    const answer = await getJson(`api/lumen/usage?${usageQuery(Number(range.value), new Date())}`, { headers: adminHeaders() });
    section.dataset.ready = 'true';
    if (answer.ok) {
      last = answer.data;
      render();
      return;
    }
    last = null;
    info.textContent = '';
    if (answer.status === 401) {
      replace(body, notice("The usage needs the head's admin token (--admin-token): enter it above; it is kept in this browser.", 'info', 'usage-auth'));
    } else if (answer.missing) {
      replace(body, notice('This head does not count usage (no /api/lumen/usage).', 'info', 'usage-error'));
    } else {
      replace(body, notice(`Could not read the usage: ${answer.error}`, 'error', 'usage-error'));
    }
  }, 5000);
  range.addEventListener('change', () => poller.refresh());
  filter.addEventListener('input', render);
  token.addEventListener('change', () => {
    setAdminToken(token.value.trim());
    poller.refresh();
  });
  return { show: () => poller.start(), hide: () => poller.stop() };
}

/** The query for the last `days` UTC days up to `now`: "start=YYYY-MM-DD". */
export function usageQuery(days, now) {
  const start = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate() - (Math.max(1, days) - 1)));
  return `start=${start.toISOString().slice(0, 10)}`;
}

/** Each tenant's sums over `rows`, by tenant name. */
export function tenantTotals(rows) {
  const totals = new Map();
  for (const r of rows) {
    const t = totals.get(r.tenant) ?? { tenant: r.tenant, requests: 0, success: 0, failed: 0, rejections: 0, prompt: 0, completion: 0, cached: 0 };
    t.requests += r.requests?.total ?? 0;
    t.success += r.requests?.success ?? 0;
    t.failed += (r.requests?.error ?? 0) + (r.requests?.cancelled ?? 0);
    t.rejections += rejected(r);
    t.prompt += r.prompt_tokens ?? 0;
    t.completion += r.completion_tokens ?? 0;
    t.cached += r.cached_tokens ?? 0;
    totals.set(r.tenant, t);
  }
  return [...totals.values()].sort((a, b) => a.tenant.localeCompare(b.tenant));
}

/** Refusals by a key's limits in a row, all reasons. */
function rejected(r) {
  return Object.values(r.rejections ?? {}).reduce((sum, n) => sum + n, 0);
}

function byNewestDay(rows) {
  return [...rows].sort((a, b) => b.date.localeCompare(a.date) || a.tenant.localeCompare(b.tenant) || a.model.localeCompare(b.model));
}

function table(testid, columns, rows) {
  return h('div', { class: 'table-wrap usage-block' },
    h('table', { class: 'usage', dataset: { testid } },
      h('thead', {}, h('tr', {}, columns.map((c) => h('th', {}, c)))),
      h('tbody', {}, rows)));
}

const cell = (value, testid, title) => h('td', { class: 'num', title: title ?? null, dataset: testid ? { testid } : {} }, num(value, 0));

function totalsTable(totals) {
  const columns = ['tenant', 'requests', 'success', 'error / cancelled', 'refused', 'prompt tok', 'completion tok', 'cached tok'];
  return table('usage-totals', columns, totals.map((t) => h('tr', { dataset: { testid: 'usage-total-row', tenant: t.tenant } },
    h('td', {}, t.tenant),
    cell(t.requests, 'usage-total-requests'),
    cell(t.success, 'usage-total-success'),
    cell(t.failed),
    cell(t.rejections),
    cell(t.prompt, 'usage-total-prompt-tokens'),
    cell(t.completion, 'usage-total-completion-tokens'),
    cell(t.cached))));
}

function usageTable(rows) {
  const columns = ['date (UTC)', 'tenant', 'model', 'requests', ...OUTCOMES.map(([, label]) => label), 'refused', 'prompt tok', 'completion tok', 'cached tok'];
  return table('usage-table', columns, rows.map((r) => {
    const reasons = Object.entries(r.rejections ?? {}).filter(([, n]) => n > 0).map(([reason, n]) => `${reason} ${n}`).join(' · ');
    return h('tr', { dataset: { testid: 'usage-row', date: r.date, tenant: r.tenant, model: r.model } },
      h('td', {}, r.date),
      h('td', {}, r.tenant),
      h('td', { title: r.model ? r.model : 'refused before a model was chosen' }, r.model || '–'),
      cell(r.requests?.total, 'usage-requests'),
      OUTCOMES.map(([name]) => cell(r.requests?.[name], `usage-${name.replace('_', '-')}`)),
      cell(rejected(r), 'usage-refused', reasons || null),
      cell(r.prompt_tokens, 'usage-prompt-tokens'),
      cell(r.completion_tokens, 'usage-completion-tokens'),
      cell(r.cached_tokens, 'usage-cached-tokens'));
  }));
}
