// Charts: the last minutes of load and latency from GET /api/timeseries?seconds=N (the head's
// sampler: one sample every 2 s, for the whole cluster, per deployment and per replica), polled
// every 2 s. The scope select picks total / one deployment / one replica.
//
// A head without /api/timeseries (404) still gets live charts: the page then samples
// GET /api/cluster itself every 2 s while the view is open (load and KV use only; no latency).

import { Poller, getJson } from '../api.js';
import { LineChart } from '../chart.js';
import { h, ms, notice, num, replace } from '../util.js';

const WINDOWS = [
  ['2 min', 120],
  ['5 min', 300],
  ['10 min', 600],
];

/** The charts: testid, title, y format, fixed max, and the series taken from one sample's M. */
const CHARTS = [
  ['chart-requests', 'Requests running / waiting', (v) => num(v, 1), null, [
    ['running', (m) => m.running],
    ['waiting', (m) => m.waiting],
  ]],
  ['chart-tokens', 'Tokens per second', (v) => num(v, 1), null, [
    ['generation', (m) => m.generation_tokens_per_s],
    ['prompt', (m) => m.prompt_tokens_per_s],
  ]],
  ['chart-rate', 'Requests finished per second', (v) => num(v, 2), null, [['finished', (m) => m.requests_per_s]]],
  ['chart-ttft', 'Time to first token', ms, null, percentiles((m) => m.ttft_ms)],
  ['chart-itl', 'Inter-token latency', ms, null, percentiles((m) => m.itl_ms)],
  ['chart-cache', 'KV cache use and prefix hit rate (%)', (v) => `${num(v, 1)}%`, 100, [
    ['KV cache use', (m) => scale(m.kv_cache_usage, 100)],
    ['prefix hit rate', (m) => scale(m.prefix_cache_hit_rate, 100)],
  ]],
];

function percentiles(pick) {
  return ['p50', 'p90', 'p99'].map((p) => [p, (m) => pick(m)?.[p] ?? null]);
}

function scale(v, factor) {
  return v === null || v === undefined ? null : v * factor;
}

export function create(section) {
  const scope = h('select', { dataset: { testid: 'chart-scope' }, 'aria-label': 'scope' }, h('option', { value: 'total' }, 'total'));
  const windowSelect = h('select', { dataset: { testid: 'chart-window' }, 'aria-label': 'window' },
    WINDOWS.map(([label, s]) => h('option', { value: String(s), selected: s === 300 }, label)));
  const info = h('span', { class: 'muted', dataset: { testid: 'chart-info' } });
  const status = h('div');
  const charts = CHARTS.map(([testid, title, format, yMax, series]) => ({ chart: new LineChart({ title, format, yMax, testid }), series }));
  replace(
    section,
    h('div', { class: 'toolbar' }, h('h1', {}, 'Charts'), h('label', {}, 'scope ', scope), h('label', {}, 'window ', windowSelect), info),
    status,
    h('div', { class: 'grid charts' }, charts.map((c) => c.chart.el)),
  );
  const local = new LocalSampler();
  let fallback = false;

  const poller = new Poller(async () => {
    const seconds = Number(windowSelect.value);
    let doc;
    if (!fallback) {
      const answer = await getJson(`api/timeseries?seconds=${seconds}`);
      if (answer.ok) {
        doc = answer.data;
        replace(status);
      } else if (answer.missing) {
        fallback = true;
      } else {
        replace(status, notice(`Could not read the history: ${answer.error}`, 'error', 'charts-error'));
        return;
      }
    }
    if (fallback) {
      doc = await local.sample(seconds);
      replace(status, notice('This head has no /api/timeseries: the charts show load sampled by this page since it opened (no latency).', 'info', 'charts-fallback'));
    }
    const samples = doc?.samples || [];
    updateScopes(scope, samples);
    const pick = picker(scope.value);
    const times = samples.map((s) => s.unix_ms);
    const to = times.length ? times[times.length - 1] : Date.now();
    for (const { chart, series } of charts) {
      chart.set(times, series.map(([name, get]) => ({ name, values: samples.map((s) => value(get, pick(s))) })), to - seconds * 1000, to);
    }
    section.dataset.samples = String(samples.length);
    info.textContent = samples.length ? `${samples.length} samples, every ${doc.interval_s ?? 2} s` : 'no samples yet';
    section.dataset.ready = 'true';
  }, 2000);
  scope.addEventListener('change', () => poller.refresh());
  windowSelect.addEventListener('change', () => poller.refresh());
  return { show: () => poller.start(), hide: () => poller.stop() };
}

function value(get, m) {
  if (!m) return null;
  const v = get(m);
  return v === undefined || v === null || !Number.isFinite(Number(v)) ? null : Number(v);
}

/** sample -> the M of the chosen scope ('total', 'deployment:NAME', 'replica:ID'). */
export function picker(scope) {
  if (scope.startsWith('deployment:')) {
    const name = scope.slice('deployment:'.length);
    return (s) => s.deployments?.[name] ?? null;
  }
  if (scope.startsWith('replica:')) {
    const id = scope.slice('replica:'.length);
    return (s) => s.replicas?.[id] ?? null;
  }
  return (s) => s.total ?? null;
}

/** Adds the deployments and replicas seen in the samples to the scope select, keeping the choice. */
function updateScopes(select, samples) {
  const deployments = new Set();
  const replicas = new Map();
  for (const s of samples) {
    for (const d of Object.keys(s.deployments || {})) deployments.add(d);
    for (const [id, m] of Object.entries(s.replicas || {})) replicas.set(id, m);
  }
  const wanted = [
    ['total', 'total'],
    ...[...deployments].sort().map((d) => [`deployment:${d}`, `deployment ${d}`]),
    ...[...replicas.entries()].sort().map(([id, m]) => [`replica:${id}`, `replica ${id}${m.worker_id ? ` on ${m.worker_id}` : ''}`]),
  ];
  const have = [...select.options].map((o) => o.value).join('\n');
  if (have === wanted.map(([v]) => v).join('\n')) return;
  const chosen = select.value;
  select.replaceChildren(...wanted.map(([v, label]) => h('option', { value: v }, label)));
  select.value = wanted.some(([v]) => v === chosen) ? chosen : 'total';
}

/** Builds timeseries-shaped samples from /api/cluster polls, for heads without the sampler. */
class LocalSampler {
  constructor() {
    this.samples = [];
  }

  async sample(seconds) {
    const answer = await getJson('api/cluster');
    if (answer.ok) this.samples.push(fromCluster(answer.data, Date.now()));
    const since = Date.now() - 600_000;
    this.samples = this.samples.filter((s) => s.unix_ms >= since);
    const from = Date.now() - seconds * 1000;
    return { interval_s: 2, samples: this.samples.filter((s) => s.unix_ms >= from) };
  }
}

/** One sample (total, per deployment, per replica) from the cluster view's live load. */
export function fromCluster(cluster, unixMs) {
  const blank = () => ({ running: 0, waiting: 0, prompt_tokens_per_s: 0, generation_tokens_per_s: 0, kvUsed: 0, kvTotal: 0 });
  const add = (m, r) => {
    m.running += r.running || 0;
    m.waiting += r.waiting || 0;
    m.prompt_tokens_per_s += r.prompt_tokens_per_s || 0;
    m.generation_tokens_per_s += r.generation_tokens_per_s || 0;
    m.kvUsed += r.kv_blocks_used || 0;
    m.kvTotal += r.kv_blocks_total || 0;
  };
  const finish = (m) => {
    const { kvUsed, kvTotal, ...rest } = m;
    return { ...rest, requests_per_s: null, kv_cache_usage: kvTotal ? kvUsed / kvTotal : 0, prefix_cache_hit_rate: null, ttft_ms: null, itl_ms: null };
  };
  const total = blank();
  const deployments = {};
  const replicas = {};
  for (const w of cluster.workers || []) {
    if (!w.alive) continue;
    for (const r of w.replicas || []) {
      const one = blank();
      add(one, r);
      add(total, r);
      add((deployments[r.deployment] ??= blank()), r);
      replicas[r.replica_id] = { ...finish(one), deployment: r.deployment, worker_id: w.id };
    }
  }
  return {
    unix_ms: unixMs,
    total: finish(total),
    deployments: Object.fromEntries(Object.entries(deployments).map(([k, m]) => [k, finish(m)])),
    replicas,
  };
}
