// The head's HTTP APIs, all on the page's own origin (the control server, :8265): relative URLs,
// so the page also works behind a path-prefixing proxy. Every call resolves (never throws) to
//   {ok: true, status, data} | {ok: false, status, missing, error}
// where `missing` means the head does not serve that endpoint (404: an older head), and status 0
// means the head could not be reached. Each answer also updates the connection indicator.

const listeners = new Set();
let lastState = null;

/** Calls fn(state, detail) whenever the head's reachability changes ('up' | 'down'). */
export function onConnection(fn) {
  listeners.add(fn);
  if (lastState) fn(lastState.state, lastState.detail);
}

function connection(state, detail) {
  if (lastState && lastState.state === state && lastState.detail === detail) return;
  lastState = { state, detail };
  for (const fn of listeners) fn(state, detail);
}

/** GET a JSON document. */
export async function getJson(path, { timeoutMs = 5000, headers = {} } = {}) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  try {
    const response = await fetch(path, { headers: { Accept: 'application/json', ...headers }, signal: controller.signal });
    connection('up', '');
    if (!response.ok) {
      return { ok: false, status: response.status, missing: response.status === 404, error: await errorText(response) };
    }
    return { ok: true, status: response.status, data: await response.json() };
  } catch (e) {
    connection('down', e.name === 'AbortError' ? 'timed out' : String(e.message || e));
    return { ok: false, status: 0, missing: false, error: `the head did not answer (${e.name === 'AbortError' ? 'timeout' : e.message})` };
  } finally {
    clearTimeout(timer);
  }
}

/** The message of an error response: OpenAI's {error: {message}}, Lumen's {error: "..."}, or text. */
export async function errorText(response) {
  const text = await response.text().catch(() => '');
  return errorMessage(text) || `HTTP ${response.status}`;
}

/** The message inside an error body (JSON or plain text). */
export function errorMessage(text) {
  try {
    const body = JSON.parse(text);
    if (body && typeof body.error === 'object' && body.error) return String(body.error.message ?? JSON.stringify(body.error));
    if (body && body.error) return String(body.error);
    if (body && body.message) return String(body.message);
  } catch {
    // not JSON: the text itself
  }
  return text.trim().slice(0, 500);
}

/**
 * Runs `tick` now and then every `intervalMs` while started; a tick never overlaps the previous
 * one (a slow head is not piled up on).
 */
export class Poller {
  constructor(tick, intervalMs = 2000) {
    this.tick = tick;
    this.intervalMs = intervalMs;
    this.timer = null;
    this.running = false;
    // A restart while a tick is in flight must not leave two loops behind.
    this.generation = 0;
  }

  start() {
    if (this.running) return;
    this.running = true;
    this.generation += 1;
    this.loop(this.generation);
  }

  stop() {
    this.running = false;
    clearTimeout(this.timer);
  }

  /** Runs a tick now (e.g. after a setting changed) without disturbing the schedule. */
  refresh() {
    if (this.running) {
      clearTimeout(this.timer);
      this.generation += 1;
      this.loop(this.generation);
    }
  }

  async loop(generation) {
    if (!this.running || generation !== this.generation) return;
    try {
      await this.tick();
    } catch (e) {
      console.error('dashboard refresh failed', e);
    }
    if (this.running && generation === this.generation) {
      this.timer = setTimeout(() => this.loop(generation), this.intervalMs);
    }
  }
}

const KEY_STORAGE = 'lumen.apiKey';
const ADMIN_STORAGE = 'lumen.adminToken';

function stored(name) {
  try {
    return localStorage.getItem(name) || '';
  } catch {
    return '';
  }
}

function store(name, value) {
  try {
    if (value) localStorage.setItem(name, value);
    else localStorage.removeItem(name);
  } catch {
    // storage disabled: the value lives for this page only
  }
}

const bearer = (token) => (token ? { Authorization: `Bearer ${token}` } : {});

/** The API key the playground sends as a Bearer token ('' when none). */
export function apiKey() {
  return stored(KEY_STORAGE);
}

export function setApiKey(key) {
  store(KEY_STORAGE, key);
}

/** Authorization header for /v1 calls. */
export function authHeaders() {
  return bearer(apiKey());
}

/** The head's admin token (--admin-token) the usage view sends ('' when none). */
export function adminToken() {
  return stored(ADMIN_STORAGE);
}

export function setAdminToken(token) {
  store(ADMIN_STORAGE, token);
}

/** Authorization header for the control API's routes that need the admin token. */
export function adminHeaders() {
  return bearer(adminToken());
}
