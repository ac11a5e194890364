// Small DOM and formatting helpers shared by the views. No DOM access at import time, so the
// formatting functions can be unit-tested under Node.

/**
 * Creates an element: h('div', {class: 'card', dataset: {testid: 'x'}}, child, 'text', [more]).
 * Attributes named on* take functions (event listeners); null/false children are skipped.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
    else if (key === 'class') el.className = value;
    else if (key in el && typeof value !== 'string') el[key] = value;
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

/** Replaces an element's children. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
}

/** A status pill: its colour follows the status word (data-status carries it for tests). */
export function pill(status, testid) {
  const word = String(status ?? 'UNKNOWN');
  return h('span', { class: `pill pill-${tone(word)}`, dataset: { status: word, ...(testid ? { testid } : {}) } }, word);
}

/** good / warn / bad / idle for a Ray or Lumen status word. */
export function tone(status) {
  const s = String(status).toUpperCase();
  if (['RUNNING', 'HEALTHY', 'ALIVE', 'UP', 'STOP', 'OK', '200'].includes(s)) return 'good';
  if (['UNHEALTHY', 'FAILED', 'DEAD', 'DEPLOY_FAILED', 'DOWN', 'ERROR'].includes(s)) return 'bad';
  if (['STARTING', 'UPDATING', 'DEPLOYING', 'UPSCALING', 'DOWNSCALING', 'STOPPING', 'DRAINING', 'DELETING', 'LENGTH', 'ABORT'].includes(s))
    return 'warn';
  return 'idle';
}

/** 1536 -> "1.5 KiB". */
export function bytes(n) {
  if (!Number.isFinite(n) || n < 0) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n >= 100 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
}

/** A number with at most `digits` decimals, "–" for null/NaN. */
export function num(n, digits = 1) {
  if (n === null || n === undefined || !Number.isFinite(Number(n))) return '–';
  const v = Number(n);
  if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString('en-US');
  return String(Number(v.toFixed(digits)));
}

/** Milliseconds: "41 ms", "1.24 s". */
export function ms(n) {
  if (n === null || n === undefined || !Number.isFinite(Number(n))) return '–';
  const v = Number(n);
  if (v === 0) return '0 ms';
  if (v >= 1000) return `${(v / 1000).toFixed(v >= 10000 ? 1 : 2)} s`;
  return `${v >= 100 ? Math.round(v) : v.toFixed(1)} ms`;
}

/** 0..1 -> "42%", null -> "–". */
export function pct(fraction) {
  if (fraction === null || fraction === undefined || !Number.isFinite(Number(fraction))) return '–';
  return `${Math.round(Number(fraction) * 1000) / 10}%`;
}

/** Milliseconds ago -> "0.3 s ago", "4 min ago". */
export function ago(msAgo) {
  if (!Number.isFinite(msAgo)) return '–';
  if (msAgo < 10_000) return `${(msAgo / 1000).toFixed(1)} s ago`;
  if (msAgo < 120_000) return `${Math.round(msAgo / 1000)} s ago`;
  if (msAgo < 7_200_000) return `${Math.round(msAgo / 60_000)} min ago`;
  return `${Math.round(msAgo / 3_600_000)} h ago`;
}

/** Unix ms -> local "HH:MM:SS". */
export function clock(unixMs) {
  const d = new Date(unixMs);
  return [d.getHours(), d.getMinutes(), d.getSeconds()].map((x) => String(x).padStart(2, '0')).join(':');
}

/** A long id cut to 22 characters (callers keep the whole id in the title). */
export function shortId(id) {
  const s = String(id ?? '');
  return s.length > 24 ? `${s.slice(0, 22)}…` : s;
}

/** A labelled value for the key-value grids of cards. */
export function field(label, value, testid) {
  return h('div', { class: 'field' }, h('span', { class: 'label' }, label),
    h('span', { class: 'value', dataset: testid ? { testid } : {} }, value));
}

/** A notice box (info or error) shown in place of data that is not there. */
export function notice(text, kind = 'info', testid = 'notice') {
  return h('div', { class: `notice notice-${kind}`, dataset: { testid } }, text);
}
