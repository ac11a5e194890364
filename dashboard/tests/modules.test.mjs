// Unit tests of the dashboard's pure logic under Node's test runner (no browser):
//   node --test dashboard/tests/modules.test.mjs
// Run by tests/e2e_dashboard.rs before the browser test.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { errorMessage } from '../api.js';
import { niceTicks, segments, summarize, timeStep } from '../chart.js';
import { feed, initialState } from '../sse.js';
import { bytes, ms, num, pct, tone } from '../util.js';
import { fromCluster, picker } from '../views/charts.js';
import { replicaLoad, totals } from '../views/overview.js';
import { migrationNote, outcome } from '../views/requests.js';
import { replicaCounts } from '../views/serve.js';
import { tenantTotals, usageQuery } from '../views/usage.js';

function parseAll(chunks) {
  let state = initialState();
  const events = [];
  for (const chunk of chunks) {
    const r = feed(state, chunk);
    state = r.state;
    events.push(...r.events);
  }
  return events;
}

test('sse events split across chunks at any byte come out whole', () => {
  const stream = ': keep-alive\n\ndata: {"a":1}\n\ndata: {"b":2}\r\n\r\ndata: [DONE]\n\n';
  const whole = parseAll([stream]);
  assert.deepEqual(whole, ['{"a":1}', '{"b":2}', '[DONE]']);
  for (let cut = 1; cut < stream.length; cut++) {
    assert.deepEqual(parseAll([stream.slice(0, cut), stream.slice(cut)]), whole, `cut at ${cut}`);
  }
});

test('sse multi-line data joins with newlines and comments are ignored', () => {
  assert.deepEqual(parseAll(['data: one\ndata:two\n: comment\nevent: x\n\n']), ['one\ntwo']);
  assert.deepEqual(parseAll(['data: a\r', '\ndata: b\r\n\r\n']), ['a\nb']);
});

test('nice ticks cover the range with round steps', () => {
  assert.deepEqual(niceTicks(0, 1, 4), [0, 0.2, 0.4, 0.6, 0.8, 1]);
  assert.deepEqual(niceTicks(0, 73, 4), [0, 20, 40, 60, 80]);
  assert.deepEqual(niceTicks(0, 100, 4), [0, 20, 40, 60, 80, 100]);
  const ticks = niceTicks(0, 0.0037, 4);
  assert.ok(ticks[ticks.length - 1] >= 0.0037 && ticks.length <= 6, String(ticks));
  assert.deepEqual(niceTicks(0, 0, 4), [0, 0.2, 0.4, 0.6, 0.8, 1]);
});

test('null values split a series into separate runs', () => {
  assert.deepEqual(segments([1, 2, 3, 4, 5], [1, null, 3, 4, undefined]), [[[1, 1]], [[3, 3], [4, 4]]]);
  assert.deepEqual(segments([1, 2], [null, null]), []);
});

test('the chart summary counts present and non-zero points', () => {
  const s = summarize([{ name: 'running', values: [0, null, 2, 1] }, { name: 'waiting', values: [null] }]);
  assert.deepEqual(s.running, { points: 3, nonzero: 2, max: 2, last: 1 });
  assert.deepEqual(s.waiting, { points: 0, nonzero: 0, max: null, last: null });
});

test('time labels are a few per chart', () => {
  assert.equal(timeStep(120_000), 30_000);
  assert.equal(timeStep(600_000), 120_000);
});

test('formatting handles missing values and units', () => {
  assert.equal(bytes(1536), '1.5 KiB');
  assert.equal(bytes(25_276_063_744), '23.5 GiB');
  assert.equal(ms(41.52), '41.5 ms');
  assert.equal(ms(1240), '1.24 s');
  assert.equal(ms(null), '–');
  assert.equal(pct(0.4213), '42.1%');
  assert.equal(pct(null), '–');
  assert.equal(num(12345.6), '12,346');
  assert.equal(tone('HEALTHY'), 'good');
  assert.equal(tone('UNHEALTHY'), 'bad');
  assert.equal(tone('UPDATING'), 'warn');
  assert.equal(tone('DRAINING'), 'warn');
});

test('error bodies yield their message', () => {
  assert.equal(errorMessage('{"error":{"message":"model not found","type":"not_found_error"}}'), 'model not found');
  assert.equal(errorMessage('{"error":"applications[0].name: empty"}'), 'applications[0].name: empty');
  assert.equal(errorMessage('plain failure\n'), 'plain failure');
});

const cluster = {
  workers: [
    { id: 'w1', alive: true, replicas: [
      { replica_id: 'r1', deployment: 'llm', state: 'RUNNING', running: 2, waiting: 1, kv_blocks_used: 10, kv_blocks_total: 100, prompt_tokens_per_s: 5, generation_tokens_per_s: 20 },
    ] },
    { id: 'w2', alive: true, replicas: [
      { replica_id: 'r2', deployment: 'llm', state: 'RUNNING', running: 1, waiting: 0, kv_blocks_used: 30, kv_blocks_total: 100, prompt_tokens_per_s: 0, generation_tokens_per_s: 10 },
    ] },
    { id: 'w3', alive: false, replicas: [
      { replica_id: 'r3', deployment: 'llm', state: 'UNHEALTHY', running: 9, waiting: 9, kv_blocks_used: 0, kv_blocks_total: 0 },
    ] },
  ],
};

test('overview totals sum the live workers only', () => {
  const t = totals(cluster.workers);
  assert.equal(t.alive, 2);
  assert.equal(t.dead, 1);
  assert.equal(t.running, 3);
  assert.equal(t.waiting, 1);
  assert.equal(t.gen, 30);
  assert.equal(t.kvUsed / t.kvTotal, 0.2);
  assert.equal(t.running_replicas, 2);
  assert.equal(t.replicas, 3);
});

test('a replica shows speculative acceptance only once it verified a draft', () => {
  const r = { running: 2, waiting: 1, kv_cache_usage: 0.25, generation_tokens_per_s: 12.5 };
  assert.equal(replicaLoad(r), '2 running · 1 waiting · KV 25% · 12.5 tok/s');
  assert.equal(replicaLoad({ ...r, spec_decode: null }), replicaLoad(r));
  const spec = { drafts: 4, draft_tokens: 12, accepted_tokens: 9, acceptance_rate: 0.75, mean_accepted_tokens: 2.25 };
  assert.equal(replicaLoad({ ...r, spec_decode: spec }), '2 running · 1 waiting · KV 25% · 12.5 tok/s · spec accept 75% · 2.25 tok/draft');
});

test('the fallback sampler builds timeseries-shaped samples from the cluster view', () => {
  const s = fromCluster(cluster, 1000);
  assert.equal(s.total.running, 3);
  assert.equal(s.total.kv_cache_usage, 0.2);
  assert.equal(s.total.ttft_ms, null);
  assert.equal(s.deployments.llm.generation_tokens_per_s, 30);
  assert.equal(s.replicas.r2.worker_id, 'w2');
  assert.equal(s.replicas.r2.kv_cache_usage, 0.3);
  assert.equal(s.replicas.r3, undefined);
  assert.equal(picker('total')(s).running, 3);
  assert.equal(picker('deployment:llm')(s).running, 3);
  assert.equal(picker('replica:r1')(s).waiting, 1);
  assert.equal(picker('replica:gone')(s), null);
});

test('a request ends in its error, its finish reason or its status', () => {
  assert.equal(outcome({ status: 200, finish_reason: 'stop', error: null }), 'stop');
  assert.equal(outcome({ status: 429, finish_reason: null, error: 'too many requests' }), 'too many requests');
  assert.equal(outcome({ status: 500, finish_reason: null, error: null }), 'HTTP 500');
});

test('a request that moved to another replica says how often', () => {
  assert.equal(migrationNote({ migrations: 2 }), 'moved 2×');
  assert.equal(migrationNote({ migrations: 0 }), null);
  assert.equal(migrationNote({}), null);
});

test('deployment replica counts come from replica_states', () => {
  assert.deepEqual(replicaCounts({ replica_states: { RUNNING: 2, STARTING: 1 }, replicas: [] }), { running: 2, summary: '2 RUNNING, 1 STARTING' });
  assert.deepEqual(replicaCounts({ replicas: [{ state: 'RUNNING' }] }), { running: 1, summary: 'no replicas' });
});

test('usage asks for the last N UTC days, month and year edges included', () => {
  const now = new Date(Date.UTC(2026, 2, 1, 23, 30));
  assert.equal(usageQuery(1, now), 'start=2026-03-01');
  assert.equal(usageQuery(7, now), 'start=2026-02-23');
  assert.equal(usageQuery(31, new Date(Date.UTC(2026, 0, 5))), 'start=2025-12-06');
  assert.equal(usageQuery(0, now), 'start=2026-03-01', 'at least today');
});

test('usage totals sum each tenant over its days and models', () => {
  const row = (tenant, model, date, success, error, cancelled, quota, prompt, completion, cached) => ({
    tenant, model, date,
    requests: { success, invalid: 0, rate_limited: quota, error, cancelled, total: success + error + cancelled + quota },
    rejections: { requests: 0, tokens: 0, concurrency: 0, quota, model: 0 },
    prompt_tokens: prompt, completion_tokens: completion, cached_tokens: cached,
  });
  const totals = tenantTotals([
    row('b', 'm', '2026-03-01', 1, 0, 0, 0, 5, 2, 0),
    row('a', 'm', '2026-03-01', 2, 1, 0, 1, 10, 4, 3),
    row('a', 'n', '2026-03-02', 1, 0, 1, 0, 5, 2, 0),
  ]);
  assert.deepEqual(totals.map((t) => t.tenant), ['a', 'b']);
  assert.deepEqual(totals[0], { tenant: 'a', requests: 6, success: 3, failed: 2, rejections: 1, prompt: 15, completion: 6, cached: 3 });
  assert.deepEqual(tenantTotals([]), []);
});
