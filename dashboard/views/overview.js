// Overview: the cluster's health and one card per worker, from GET /api/cluster (workers, their
// resources, last heartbeat, replicas with their live load from the workers' heartbeats, and
// speculative decoding's acceptance for a replica that has verified drafts).

import { Poller, getJson } from '../api.js';
import { ago, bytes, field, h, notice, num, pct, pill, replace, shortId } from '../util.js';

export function create(section) {
  const health = h('div', { class: 'stats', dataset: { testid: 'cluster-health' } });
  const workers = h('div', { class: 'grid cards', dataset: { testid: 'workers' } });
  const status = h('div');
  replace(section, h('h1', {}, 'Cluster'), status, health, h('h2', {}, 'Workers'), workers);

  const poller = new Poller(async () => {
    const answer = await getJson('api/cluster');
    if (!answer.ok) {
      replace(status, notice(`Could not read the cluster: ${answer.error}`, 'error', 'overview-error'));
      if (answer.status === 0) replace(health, stat('head', 'down', 'stat-head', 'bad'));
      return;
    }
    replace(status);
    const list = answer.data.workers || [];
    renderHealth(health, list);
    replace(workers, list.length ? list.map(workerCard) : notice('No worker has registered yet.', 'info', 'no-workers'));
    section.dataset.ready = 'true';
  }, 2000);
  return { show: () => poller.start(), hide: () => poller.stop() };
}

/** The cluster's totals over its live workers' replicas. */
export function totals(workers) {
  const t = { alive: 0, dead: 0, replicas: 0, running_replicas: 0, running: 0, waiting: 0, gen: 0, prompt: 0, kvUsed: 0, kvTotal: 0 };
  for (const w of workers) {
    if (w.alive) t.alive += 1;
    else t.dead += 1;
    for (const r of w.replicas || []) {
      t.replicas += 1;
      if (r.state === 'RUNNING') t.running_replicas += 1;
      if (!w.alive) continue;
      t.running += r.running || 0;
      t.waiting += r.waiting || 0;
      t.gen += r.generation_tokens_per_s || 0;
      t.prompt += r.prompt_tokens_per_s || 0;
      t.kvUsed += r.kv_blocks_used || 0;
      t.kvTotal += r.kv_blocks_total || 0;
    }
  }
  return t;
}

/** A replica's live load in one line; speculative decoding's acceptance once it verified a draft. */
export function replicaLoad(r) {
  const load = `${r.running ?? 0} running · ${r.waiting ?? 0} waiting · KV ${pct(r.kv_cache_usage)} · ${num(r.generation_tokens_per_s)} tok/s`;
  const s = r.spec_decode;
  if (!s || !s.drafts) return load;
  return `${load} · spec accept ${pct(s.acceptance_rate)} · ${num(s.mean_accepted_tokens, 2)} tok/draft`;
}

function stat(label, value, testid, tone = '') {
  return h('div', { class: `stat ${tone}`, dataset: { testid } }, h('span', { class: 'stat-value' }, value), h('span', { class: 'stat-label' }, label));
}

function renderHealth(el, workers) {
  const t = totals(workers);
  replace(
    el,
    stat('head', 'up', 'stat-head', 'good'),
    stat('workers alive', String(t.alive), 'stat-workers-alive', t.alive ? 'good' : 'bad'),
    stat('workers dead', String(t.dead), 'stat-workers-dead', t.dead ? 'bad' : ''),
    stat('replicas running', `${t.running_replicas} / ${t.replicas}`, 'stat-replicas'),
    stat('requests running', String(t.running), 'stat-running'),
    stat('requests waiting', String(t.waiting), 'stat-waiting', t.waiting ? 'warn' : ''),
    stat('generation tok/s', num(t.gen, 1), 'stat-gen'),
    stat('prompt tok/s', num(t.prompt, 1), 'stat-prompt'),
    stat('KV cache use', t.kvTotal ? pct(t.kvUsed / t.kvTotal) : '–', 'stat-kv'),
  );
}

function workerCard(w) {
  const r = w.resources || {};
  const device = r.device_kind === 'cpu' ? 'CPU' : `${r.device_count ?? 0} × ${String(r.device_kind || '?').toUpperCase()}`;
  return h(
    'article',
    { class: 'card', dataset: { testid: 'worker-card', workerId: w.id, alive: String(Boolean(w.alive)) } },
    h('header', { class: 'card-head' }, h('h3', { title: w.id }, w.id), pill(w.state || (w.alive ? 'ALIVE' : 'DEAD'), 'worker-status')),
    h(
      'div',
      { class: 'fields' },
      field('device', device, 'worker-device'),
      r.device_kind === 'cpu' ? null : field('memory per device', bytes(r.device_memory_bytes), 'worker-device-memory'),
      field('CPUs', String(r.cpus ?? '–')),
      field('host memory', bytes(r.host_memory_bytes)),
      field('address', w.address || '–'),
      field('last heartbeat', ago(w.last_heartbeat_ms_ago), 'worker-heartbeat'),
      field('running / waiting', `${w.running ?? 0} / ${w.waiting ?? 0}`),
      field('version', w.lumen_version || '–'),
    ),
    replicaList(w.replicas || []),
  );
}

function replicaList(replicas) {
  if (!replicas.length) return h('p', { class: 'muted' }, 'No replicas on this worker.');
  return h(
    'ul',
    { class: 'replicas' },
    replicas.map((r) =>
      h(
        'li',
        { dataset: { testid: 'worker-replica', replicaId: r.replica_id, state: r.state } },
        pill(r.state),
        h('span', { class: 'mono', title: r.replica_id }, shortId(r.replica_id)),
        h('span', { class: 'muted' }, r.deployment),
        r.description ? h('span', { class: 'muted mono', dataset: { testid: 'replica-device' }, title: r.description }, r.description) : null,
        h('span', { class: 'replica-load' }, replicaLoad(r)),
        r.message ? h('div', { class: 'message' }, r.message) : null,
      ),
    ),
  );
}
