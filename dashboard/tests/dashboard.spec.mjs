#!/usr/bin/env node
// The dashboard's browser test: headless Debian Chromium driven by playwright-core (installed by
// scripts/browser-env.sh into .cache/browser) against a running Lumen cluster. tests/e2e_dashboard.rs
// starts the cluster and runs this script; it can also be run by hand:
//
//   node dashboard/tests/dashboard.spec.mjs --dashboard http://127.0.0.1:8265 --api http://127.0.0.1:8000 \
//        --model smol --workers w1,w2 [--expect-prompts yes|no] [--expect-autoscaling TEXT] \
//        [--admin-token TOKEN] [--out target/dashboard-screenshots] [--docs-images docs/images]
//
// (or LUMEN_DASHBOARD_URL, LUMEN_API_URL, LUMEN_MODEL, LUMEN_WORKERS, LUMEN_EXPECT_PROMPTS,
// LUMEN_EXPECT_AUTOSCALING, LUMEN_ADMIN_TOKEN, LUMEN_SCREENSHOT_DIR, LUMEN_DOCS_IMAGES).
// Checks, in order: the overview lists the workers; the serve view shows the deployment HEALTHY
// with a RUNNING replica; the charts gain non-zero running and generation points while a burst of
// streamed requests runs; the requests view lists those requests by id (with their prompts when
// the head logs them); the playground shows reasoning and errors apart (canned answers), streams
// a real reply incrementally and its stop button aborts one; with two tenants' keys put in place
// (then removed), the usage view asks for the admin token and then shows each tenant's real
// counts after its requests; every view fits a 420 px and a
// 1400 px window without horizontal scrolling; nothing is loaded from another origin.
// Screenshots of every view in both sizes go to --out.
// Exit code 0 when every check passes, 1 otherwise.

import { createRequire } from 'node:module';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const VIEWS = ['overview', 'serve', 'charts', 'requests', 'usage', 'playground'];
const SIZES = { wide: { width: 1400, height: 900 }, narrow: { width: 420, height: 900 } };

function options() {
  const args = process.argv.slice(2);
  const arg = (name, env, fallback) => {
    const at = args.indexOf(`--${name}`);
    if (at >= 0 && args[at + 1]) return args[at + 1];
    const inline = args.find((a) => a.startsWith(`--${name}=`));
    if (inline) return inline.slice(name.length + 3);
    return process.env[env] || fallback;
  };
  const o = {
    dashboard: arg('dashboard', 'LUMEN_DASHBOARD_URL', ''),
    api: arg('api', 'LUMEN_API_URL', ''),
    model: arg('model', 'LUMEN_MODEL', ''),
    workers: arg('workers', 'LUMEN_WORKERS', '').split(',').filter(Boolean),
    out: path.resolve(arg('out', 'LUMEN_SCREENSHOT_DIR', path.join(root, 'target/dashboard-screenshots'))),
    docsImages: arg('docs-images', 'LUMEN_DOCS_IMAGES', ''),
    chromium: arg('chromium', 'LUMEN_CHROMIUM', '/usr/bin/chromium'),
    // "yes": the head runs with --log-requests, so the prompt column must show the prompts;
    // "no": it must not exist; anything else: not checked.
    expectPrompts: arg('expect-prompts', 'LUMEN_EXPECT_PROMPTS', ''),
    // The autoscaling line the healthy deployment must show (not checked when empty).
    expectAutoscaling: arg('expect-autoscaling', 'LUMEN_EXPECT_AUTOSCALING', ''),
    // The head's --admin-token (the usage check needs one).
    adminToken: arg('admin-token', 'LUMEN_ADMIN_TOKEN', ''),
  };
  if (!o.dashboard || !o.api) {
    console.error('usage: dashboard.spec.mjs --dashboard URL --api URL [--model NAME] [--workers a,b] [--out DIR]');
    process.exit(2);
  }
  o.dashboard = o.dashboard.replace(/\/$/, '');
  o.api = o.api.replace(/\/$/, '');
  return o;
}

function loadPlaywright() {
  const env = process.env.LUMEN_BROWSER_ENV || path.join(root, '.cache/browser');
  try {
    return createRequire(path.join(env, 'package.json'))('playwright-core');
  } catch (e) {
    console.error(`playwright-core is not installed in ${env}: run scripts/browser-env.sh (${e.message})`);
    process.exit(1);
  }
}

/** Streams one chat completion from the API (with `key`, if any); resolves to {id, text, finish}. */
async function streamChat(api, model, prompt, maxTokens, key = '') {
  const response = await fetch(`${api}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', ...(key ? { Authorization: `Bearer ${key}` } : {}) },
    body: JSON.stringify({ model, messages: [{ role: 'user', content: prompt }], max_tokens: maxTokens, ignore_eos: true, stream: true }),
  });
  const body = await response.text();
  if (!response.ok) throw new Error(`chat answered ${response.status}: ${body}`);
  let id = null;
  let text = '';
  let finish = null;
  for (const line of body.split('\n')) {
    if (!line.startsWith('data: ') || line === 'data: [DONE]') continue;
    const chunk = JSON.parse(line.slice(6));
    if (chunk.error) throw new Error(`stream error: ${JSON.stringify(chunk.error)}`);
    id ??= chunk.id;
    text += chunk.choices?.[0]?.delta?.content ?? '';
    finish = chunk.choices?.[0]?.finish_reason ?? finish;
  }
  return { id, text, finish };
}

/** Keeps `concurrency` streamed requests running until stop() is called; collects their ids. */
function startLoad(o, concurrency, maxTokens) {
  const sent = [];
  const errors = [];
  let running = true;
  const lanes = Array.from({ length: concurrency }, async (_, lane) => {
    for (let i = 0; running; i++) {
      try {
        const r = await streamChat(o.api, o.model, `Count slowly from one to fifty, lane ${lane}, round ${i}.`, maxTokens);
        sent.push(r);
      } catch (e) {
        errors.push(String(e.message || e));
        await new Promise((r) => setTimeout(r, 500));
      }
    }
  });
  return {
    sent,
    errors,
    async stop() {
      running = false;
      await Promise.all(lanes);
    },
  };
}

/** Replaces the head's named API keys (PUT /api/lumen/keys with the admin token). */
async function putKeys(o, keys) {
  const response = await fetch(`${o.dashboard}/api/lumen/keys`, {
    method: 'PUT',
    headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${o.adminToken}` },
    body: JSON.stringify({ api_keys: keys }),
  });
  if (!response.ok) throw new Error(`PUT /api/lumen/keys answered ${response.status}: ${await response.text()}`);
}

/** One completion with `key` that generates exactly `maxTokens` tokens. */
async function complete(o, key, maxTokens) {
  const response = await fetch(`${o.api}/v1/completions`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${key}` },
    body: JSON.stringify({ model: o.model, prompt: 'The sea is', max_tokens: maxTokens, ignore_eos: true }),
  });
  if (!response.ok) throw new Error(`completion answered ${response.status}: ${await response.text()}`);
}

const testid = (id) => `[data-testid="${id}"]`;

async function show(page, o, view) {
  await page.goto(`${o.dashboard}/#${view}`);
  if (view !== 'playground') await page.locator(`#${view}[data-ready="true"]`).waitFor({ timeout: 20_000 });
}

/** The chart's published summary: {series: {points, nonzero, max, last}}. */
async function chartSummary(page, id) {
  return page.locator(testid(id)).evaluate((el) => JSON.parse(el.dataset.summary || '{}'));
}

const checks = {
  async overview(page, o) {
    await show(page, o, 'overview');
    if (!o.workers.length) {
      await page.locator(testid('worker-card')).first().waitFor({ timeout: 20_000 });
    }
    for (const id of o.workers) {
      const card = page.locator(`${testid('worker-card')}[data-worker-id="${id}"]`);
      await card.waitFor({ timeout: 20_000 });
      const status = await card.locator(testid('worker-status')).textContent();
      if (status !== 'ALIVE') throw new Error(`worker ${id} shows ${status}`);
    }
    // A running replica says what it runs on (its cuda:N on a GPU worker; the CPU kernels here).
    if (o.workers.length) {
      const device = page.locator(`${testid('worker-replica')}[data-state="RUNNING"] ${testid('replica-device')}`).first();
      await device.waitFor({ timeout: 20_000 });
      const text = await device.textContent();
      if (!/^(cpu|cuda:\d+) \(/.test(text)) throw new Error(`a replica's device reads "${text}"`);
    }
    const alive = await page.locator(testid('stat-workers-alive')).locator('.stat-value').textContent();
    if (o.workers.length && Number(alive) !== o.workers.length) throw new Error(`workers alive: ${alive}, expected ${o.workers.length}`);
    const connection = await page.locator(testid('connection')).getAttribute('data-state');
    if (connection !== 'up') throw new Error(`connection indicator: ${connection}`);
  },

  async serve(page, o) {
    await show(page, o, 'serve');
    const healthy = page.locator(`${testid('deployment')}[data-status="HEALTHY"]`);
    await healthy.first().waitFor({ timeout: 30_000 });
    await healthy.first().locator(`${testid('replica-row')}[data-state="RUNNING"]`).first().waitFor({ timeout: 30_000 });
    const counts = await healthy.first().locator(testid('deployment-replicas')).textContent();
    if (!/^[1-9]\d* \/ [1-9]/.test(counts)) throw new Error(`replica counts read "${counts}"`);
    if (o.model) {
      const model = await healthy.first().locator(testid('deployment-model')).textContent();
      if (model !== o.model) throw new Error(`the deployment's model reads "${model}", expected "${o.model}"`);
    }
    if (o.expectAutoscaling) {
      const auto = await healthy.first().locator(testid('deployment-autoscaling')).textContent();
      if (auto !== o.expectAutoscaling) throw new Error(`autoscaling reads "${auto}", expected "${o.expectAutoscaling}"`);
    }
  },

  async charts(page, o, state) {
    await show(page, o, 'charts');
    const before = { requests: await chartSummary(page, 'chart-requests'), tokens: await chartSummary(page, 'chart-tokens') };
    const pixelsBefore = await page.locator(`${testid('chart-tokens')} canvas`).evaluate((c) => c.toDataURL());
    const load = startLoad(o, 4, 48);
    try {
      await page.waitForFunction(
        ([b]) => {
          const read = (id) => JSON.parse(document.querySelector(`[data-testid="${id}"]`).dataset.summary || '{}');
          const running = read('chart-requests').running?.nonzero ?? 0;
          const generation = read('chart-tokens').generation?.nonzero ?? 0;
          return running > (b.requests.running?.nonzero ?? 0) && generation > (b.tokens.generation?.nonzero ?? 0);
        },
        [before],
        { timeout: 90_000, polling: 500 },
      );
    } finally {
      await load.stop();
    }
    if (!load.sent.length) throw new Error(`no request of the load finished: ${load.errors.join('; ')}`);
    if (load.errors.length) throw new Error(`load requests failed: ${load.errors.join('; ')}`);
    const pixelsAfter = await page.locator(`${testid('chart-tokens')} canvas`).evaluate((c) => c.toDataURL());
    if (pixelsAfter === pixelsBefore) throw new Error('the tokens chart did not redraw under load');
    const after = await chartSummary(page, 'chart-tokens');
    console.log(`  ${load.sent.length} requests sent; generation tok/s max ${after.generation?.max?.toFixed(1)}`);
    state.sent = load.sent;
  },

  async requests(page, o, state) {
    await show(page, o, 'requests');
    const ids = state.sent.map((r) => r.id).filter(Boolean);
    if (!ids.length) throw new Error('no request ids to look for');
    await page.waitForFunction(
      (wanted) => {
        const shown = new Set([...document.querySelectorAll('[data-testid="request-row"]')].map((r) => r.dataset.id));
        return wanted.every((id) => shown.has(id));
      },
      ids.slice(0, 5),
      { timeout: 20_000 },
    );
    const row = page.locator(`${testid('request-row')}[data-id="${ids[0]}"]`);
    const model = await row.locator(testid('request-model')).textContent();
    const completion = await row.locator(testid('request-completion-tokens')).textContent();
    if (!model.startsWith(o.model)) throw new Error(`request row model "${model}", expected ${o.model}`);
    if (completion !== '48') throw new Error(`request row completion tokens "${completion}", expected 48`);
    const prompts = await row.locator(testid('request-prompt')).count();
    if (o.expectPrompts === 'yes') {
      const prompt = await row.locator(testid('request-prompt')).textContent();
      if (!prompt.includes('Count slowly from one to fifty')) throw new Error(`the prompt column shows "${prompt}"`);
    } else if (o.expectPrompts === 'no' && prompts) {
      throw new Error('a prompt column is shown without --log-requests');
    }
  },

  // The playground's handling of reasoning and errors, with canned API answers (SmolLM2 has no
  // reasoning parser): reasoning_content goes to the "reasoning" block, content to the answer, an
  // error body or an error event shows its message.
  async 'playground-canned'(page, o) {
    await show(page, o, 'playground');
    await page.locator(`${testid('pg-model')} option`).first().waitFor({ state: 'attached', timeout: 20_000 });
    const sse = (chunks) => chunks.map((c) => `data: ${JSON.stringify(c)}\n\n`).join('') + 'data: [DONE]\n\n';
    const delta = (d, finish = null) => ({ id: 'chatcmpl-canned', object: 'chat.completion.chunk', choices: [{ index: 0, delta: d, finish_reason: finish }] });
    const answers = [
      { status: 200, contentType: 'text/event-stream', body: ': queued\n\n' + sse([delta({ role: 'assistant' }), delta({ reasoning_content: 'Two plus ' }), delta({ reasoning_content: 'two is four.' }), delta({ content: 'It is ' }), delta({ content: '4.' }, 'stop')]) },
      { status: 400, contentType: 'application/json', body: JSON.stringify({ error: { message: "'max_tokens' must be at least 1", type: 'invalid_request_error', param: 'max_tokens', code: null } }) },
      { status: 200, contentType: 'text/event-stream', body: sse([delta({ content: 'Half' }), { error: { message: 'the replica failed mid-stream', type: 'server_error', param: null, code: null } }]) },
    ];
    await page.route('**/v1/chat/completions', (route) => route.fulfill(answers.shift()));
    const send = async (text) => {
      const before = await page.locator(testid('pg-reply')).count();
      await page.locator(testid('pg-message')).fill(text);
      await page.locator(testid('pg-send')).click();
      const reply = page.locator(testid('pg-reply')).nth(before);
      await page.waitForFunction((n) => document.querySelectorAll('[data-testid="pg-reply"]')[n]?.dataset.state !== 'streaming', before, { timeout: 10_000 });
      return reply;
    };
    try {
      const reasoned = await send('What is 2 + 2?');
      if ((await reasoned.getAttribute('data-state')) !== 'done') throw new Error('the canned reply did not finish');
      if (!(await reasoned.locator(testid('pg-reasoning')).isVisible())) throw new Error('no reasoning block');
      const reasoning = await reasoned.locator(testid('pg-reasoning-text')).textContent();
      const content = await reasoned.locator(testid('pg-content')).textContent();
      if (reasoning !== 'Two plus two is four.' || content !== 'It is 4.') throw new Error(`reasoning "${reasoning}", content "${content}"`);
      const rejected = await send('again');
      const error = await rejected.locator(testid('pg-error')).textContent();
      if (!error.includes("'max_tokens' must be at least 1") || !error.startsWith('400')) throw new Error(`error shown: "${error}"`);
      const broken = await send('once more');
      const midStream = await broken.locator(testid('pg-error')).textContent();
      if (midStream !== 'the replica failed mid-stream') throw new Error(`mid-stream error shown: "${midStream}"`);
      if ((await broken.locator(testid('pg-content')).textContent()) !== 'Half') throw new Error('the text before the error is lost');
    } finally {
      await page.unroute('**/v1/chat/completions');
      await page.locator(testid('pg-clear')).click();
    }
  },

  async playground(page, o) {
    await show(page, o, 'playground');
    await page.locator(`${testid('pg-model')} option`).first().waitFor({ state: 'attached', timeout: 20_000 });
    if (o.model) await page.locator(testid('pg-model')).selectOption(o.model);
    await page.locator(testid('pg-temperature')).fill('0');
    await page.locator(testid('pg-max-tokens')).fill('40');
    await page.locator(testid('pg-message')).fill('Write two sentences about the sea.');
    // Record every length the reply's text takes while it streams.
    await page.evaluate(() => {
      window.__lengths = [];
      new MutationObserver(() => {
        const replies = document.querySelectorAll('[data-testid="pg-content"]');
        const last = replies[replies.length - 1];
        if (last) window.__lengths.push(last.textContent.length);
      }).observe(document.querySelector('[data-testid="pg-log"]'), { subtree: true, childList: true, characterData: true });
    });
    await page.locator(testid('pg-send')).click();
    const reply = page.locator(testid('pg-reply')).last();
    await page.waitForFunction(() => {
      const replies = document.querySelectorAll('[data-testid="pg-reply"]');
      return replies.length && replies[replies.length - 1].dataset.state !== 'streaming';
    }, null, { timeout: 60_000 });
    const state = await reply.getAttribute('data-state');
    const meta = await reply.locator(testid('pg-meta')).textContent();
    if (state !== 'done') throw new Error(`the reply ended "${state}": ${meta}`);
    const text = await reply.locator(testid('pg-content')).textContent();
    const lengths = [...new Set(await page.evaluate(() => window.__lengths))].filter((n) => n > 0);
    if (!text.trim()) throw new Error('the reply is empty');
    if (lengths.length < 3) throw new Error(`the reply did not stream incrementally (text lengths seen: ${lengths})`);
    console.log(`  reply of ${text.length} chars in ${lengths.length} steps; ${meta}`);

    // Stop: a long reply, aborted once it has started.
    await page.locator(testid('pg-max-tokens')).fill('600');
    await page.locator(testid('pg-message')).fill('Tell a very long story about a lighthouse keeper.');
    await page.locator(testid('pg-send')).click();
    await page.waitForFunction(() => {
      const replies = document.querySelectorAll('[data-testid="pg-content"]');
      return replies.length === 2 && replies[1].textContent.length > 0;
    }, null, { timeout: 60_000 });
    await page.locator(testid('pg-stop')).click();
    const second = page.locator(testid('pg-reply')).nth(1);
    await page.waitForFunction(() => document.querySelectorAll('[data-testid="pg-reply"]')[1]?.dataset.state !== 'streaming', null, { timeout: 10_000 });
    const stopped = await second.getAttribute('data-state');
    if (stopped !== 'stopped') throw new Error(`after stop the reply is "${stopped}"`);
    if (!(await page.locator(testid('pg-send')).isEnabled())) throw new Error('send stays disabled after stop');
  },

  // Two tenants with their own keys (removed at the end, so the API is open again): tenant
  // usage-a sends two completions of 5 tokens, usage-b one streamed chat of 3. The usage view
  // first asks for the admin token, then shows those counts.
  async usage(page, o) {
    if (!o.adminToken) throw new Error('the usage check needs --admin-token');
    const keys = [{ tenant: 'usage-a', key: 'sk-dashboard-usage-a' }, { tenant: 'usage-b', key: 'sk-dashboard-usage-b' }];
    await putKeys(o, keys);
    try {
      await complete(o, keys[0].key, 5);
      await complete(o, keys[0].key, 5);
      const streamed = await streamChat(o.api, o.model, 'Say hello.', 3, keys[1].key);
      if (streamed.finish !== 'length') throw new Error(`the streamed chat finished "${streamed.finish}"`);
      await page.evaluate(() => localStorage.removeItem('lumen.adminToken'));
      await show(page, o, 'usage');
      await page.locator(testid('usage-auth')).waitFor({ timeout: 10_000 });
      await page.locator(testid('usage-token')).fill(o.adminToken);
      await page.locator(testid('usage-token')).press('Tab');
      const wanted = { 'usage-a': { 'usage-success': 2, 'usage-completion-tokens': 10 }, 'usage-b': { 'usage-success': 1, 'usage-completion-tokens': 3 } };
      // Each tenant's cells summed over its rows for the model (one row a day).
      const shown = () => page.evaluate(([model, wanted]) => {
        const out = {};
        for (const [tenant, cells] of Object.entries(wanted)) {
          const rows = [...document.querySelectorAll(`[data-testid="usage-row"][data-tenant="${tenant}"]`)].filter((r) => r.dataset.model === model);
          out[tenant] = Object.fromEntries(Object.keys(cells).map((id) => [id, rows.reduce((n, r) => n + Number(r.querySelector(`[data-testid="${id}"]`).textContent.replace(/,/g, '')), 0)]));
        }
        return out;
      }, [o.model, wanted]);
      try {
        for (let i = 0; ; i++) {
          if (JSON.stringify(await shown()) === JSON.stringify(wanted)) break;
          if (i >= 120) throw new Error(`the usage view shows ${JSON.stringify(await shown())}, expected ${JSON.stringify(wanted)}`);
          await page.waitForTimeout(250);
        }
      } catch (e) {
        throw new Error(`${e.message}; table: ${await page.locator(testid('view-usage')).innerText().catch(() => '?')}`);
      }
      const total = await page.locator(`${testid('usage-total-row')}[data-tenant="usage-a"] ${testid('usage-total-completion-tokens')}`).textContent();
      if (total !== '10') throw new Error(`usage-a's total completion tokens read "${total}"`);
      console.log(`  usage: ${JSON.stringify(await shown())}`);
    } finally {
      await putKeys(o, []);
    }
  },
};

async function screenshots(page, o) {
  for (const [size, viewport] of Object.entries(SIZES)) {
    await page.setViewportSize(viewport);
    for (const view of VIEWS) {
      await show(page, o, view);
      await page.evaluate(() => window.scrollTo(0, 0));
      await page.waitForTimeout(400);
      const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      if (overflow > 1) throw new Error(`#${view} scrolls sideways by ${overflow}px at ${viewport.width}px`);
      await page.screenshot({ path: path.join(o.out, `${view}-${size}.png`), fullPage: true });
    }
  }
  if (o.docsImages) {
    mkdirSync(o.docsImages, { recursive: true });
    await page.setViewportSize({ width: 1280, height: 800 });
    for (const view of VIEWS) {
      await show(page, o, view);
      // The cluster is minutes old at most: the shortest window shows its history best.
      if (view === 'charts') await page.locator(testid('chart-window')).selectOption('120');
      await page.evaluate(() => window.scrollTo(0, 0));
      await page.waitForTimeout(600);
      await page.screenshot({ path: path.join(o.docsImages, `dashboard-${view}.png`) });
    }
  }
}

async function main() {
  const o = options();
  const { chromium } = loadPlaywright();
  mkdirSync(o.out, { recursive: true });
  const browser = await chromium.launch({
    executablePath: o.chromium,
    args: ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking'],
  });
  const page = await browser.newPage({ viewport: SIZES.wide });
  page.setDefaultTimeout(30_000);
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  const consoleSeen = new Set();
  page.on('console', (m) => {
    if (m.type() !== 'error' || consoleSeen.has(m.text())) return;
    consoleSeen.add(m.text());
    console.log(`  [browser console, shown once] ${m.text()}`);
  });
  // No request may leave the cluster's origins (no CDN, no fonts).
  const origins = new Set([new URL(o.dashboard).origin, new URL(o.api).origin]);
  const foreign = [];
  page.on('request', (r) => {
    const url = new URL(r.url());
    if (url.protocol.startsWith('http') && !origins.has(url.origin)) foreign.push(r.url());
  });

  const state = { sent: [] };
  let failed = 0;
  const steps = [...Object.entries(checks), ['screenshots', (p) => screenshots(p, o)]];
  for (const [name, check] of steps) {
    const started = Date.now();
    try {
      await check(page, o, state);
      console.log(`ok - ${name} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
    } catch (e) {
      failed += 1;
      console.log(`not ok - ${name}: ${e.message || e}`);
      await page.screenshot({ path: path.join(o.out, `failed-${name}.png`), fullPage: true }).catch(() => {});
    }
  }
  if (pageErrors.length) {
    failed += 1;
    console.log(`not ok - the page threw: ${pageErrors.join('; ')}`);
  }
  if (foreign.length) {
    failed += 1;
    console.log(`not ok - requests to other origins: ${foreign.join(', ')}`);
  }
  await browser.close();
  console.log(failed ? `${failed} check(s) failed; screenshots in ${o.out}` : `all checks passed; screenshots in ${o.out}`);
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
