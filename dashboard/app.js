// The dashboard's entry point: hash routing between the views (#overview, #serve, #charts,
// #requests, #usage, #playground) and the connection indicator. Each view module exports
// create(section) -> {show(), hide()}; a view polls the head only while it is shown.

import { onConnection } from './api.js';
import * as overview from './views/overview.js';
import * as serve from './views/serve.js';
import * as charts from './views/charts.js';
import * as requests from './views/requests.js';
import * as usage from './views/usage.js';
import * as playground from './views/playground.js';

const modules = { overview, serve, charts, requests, usage, playground };
const views = {};
let current = null;

function route() {
  const name = location.hash.replace(/^#\/?/, '').split(/[/?]/)[0];
  const next = name in modules ? name : 'overview';
  if (next === current) return;
  if (current) {
    views[current].hide();
    document.getElementById(current).hidden = true;
  }
  const section = document.getElementById(next);
  views[next] ??= modules[next].create(section);
  section.hidden = false;
  views[next].show();
  current = next;
  for (const link of document.querySelectorAll('.tabs a')) {
    link.toggleAttribute('aria-current', link.getAttribute('href') === `#${next}`);
  }
  document.title = `Lumen · ${next}`;
}

onConnection((state, detail) => {
  const el = document.querySelector('[data-testid=connection]');
  el.dataset.state = state;
  el.textContent = state === 'up' ? 'head up' : 'head unreachable';
  el.title = detail || 'the head answers';
});

window.addEventListener('hashchange', route);
route();
