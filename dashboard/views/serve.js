// Serve: Ray Serve's status document, GET /api/serve/applications/ — applications with status
// and message, deployments with status, message, target vs running replicas, the autoscaling
// config and the model served (its served name, else its source) from the applied serve config
// (deployed_app_config), and each replica's state, worker and message.

import { Poller, getJson } from '../api.js';
import { clock, field, h, notice, pill, replace } from '../util.js';

export function create(section) {
  const body = h('div', { dataset: { testid: 'applications' } });
  replace(section, h('h1', {}, 'Serve applications'), body);
  const poller = new Poller(async () => {
    const answer = await getJson('api/serve/applications/');
    if (!answer.ok) {
      replace(body, notice(`Could not read the applications: ${answer.error}`, 'error', 'serve-error'));
      return;
    }
    const apps = Object.values(answer.data.applications || {});
    replace(body, apps.length ? apps.map(application) : notice('Nothing is deployed. Deploy with `lumen deploy config.yaml` or PUT /api/serve/applications/.', 'info', 'no-applications'));
    section.dataset.ready = 'true';
  }, 2000);
  return { show: () => poller.start(), hide: () => poller.stop() };
}

function application(app) {
  const configs = app.deployed_app_config?.deployments || [];
  return h(
    'article',
    { class: 'card app', dataset: { testid: 'application', name: app.name, status: app.status } },
    h('header', { class: 'card-head' }, h('h2', {}, app.name), pill(app.status, 'application-status')),
    app.message ? h('div', { class: 'message' }, app.message) : null,
    h(
      'div',
      { class: 'fields' },
      field('route prefix', app.route_prefix ?? '–'),
      field('last deployed', app.last_deployed_time_s ? clock(app.last_deployed_time_s * 1000) : '–'),
      field('deployments', String(Object.keys(app.deployments || {}).length)),
    ),
    Object.values(app.deployments || {}).map((d) => deployment(d, configs.find((c) => c.name === d.name))),
  );
}

/** The model a deployment serves, as clients name it: its served name, else its source. */
function modelName(config) {
  const model = config?.model;
  return model?.served_model_name || model?.source || model?.model || '';
}

/** The running count and the per-state summary of a deployment. */
export function replicaCounts(d) {
  const states = d.replica_states || {};
  const running = states.RUNNING ?? (d.replicas || []).filter((r) => r.state === 'RUNNING').length;
  const summary = Object.entries(states).filter(([, n]) => n > 0).map(([s, n]) => `${n} ${s}`).join(', ');
  return { running, summary: summary || 'no replicas' };
}

function deployment(d, config) {
  const { running, summary } = replicaCounts(d);
  const auto = config?.autoscaling_config;
  return h(
    'section',
    { class: 'deployment', dataset: { testid: 'deployment', name: d.name, status: d.status } },
    h('header', { class: 'card-head' }, h('h3', {}, d.name), pill(d.status, 'deployment-status')),
    d.message ? h('div', { class: 'message', dataset: { testid: 'deployment-message' } }, d.message) : null,
    h(
      'div',
      { class: 'fields' },
      field('replicas running / target', `${running} / ${d.target_num_replicas}`, 'deployment-replicas'),
      field('replica states', summary),
      auto
        ? field(
            'autoscaling',
            `min ${auto.min_replicas ?? '–'} · max ${auto.max_replicas ?? '–'} · target ongoing ${auto.target_ongoing_requests ?? '–'}`,
            'deployment-autoscaling',
          )
        : field('autoscaling', 'off (fixed replicas)'),
      modelName(config) ? field('model', modelName(config), 'deployment-model') : null,
    ),
    replicaTable(d.replicas || []),
  );
}

function replicaTable(replicas) {
  if (!replicas.length) return h('p', { class: 'muted' }, 'No replicas.');
  return h(
    'div',
    { class: 'table-wrap' },
    h(
      'table',
      {},
      h('thead', {}, h('tr', {}, ['replica', 'state', 'worker', 'address', 'started', 'message'].map((c) => h('th', {}, c)))),
      h(
        'tbody',
        {},
        replicas.map((r) =>
          h(
            'tr',
            { dataset: { testid: 'replica-row', replicaId: r.replica_id, state: r.state } },
            h('td', { class: 'mono' }, r.replica_id),
            h('td', {}, pill(r.state)),
            h('td', { class: 'mono' }, r.node_id),
            h('td', { class: 'mono' }, r.node_ip || '–'),
            h('td', {}, r.start_time_s ? clock(r.start_time_s * 1000) : '–'),
            h('td', { class: 'message-cell' }, r.message || ''),
          ),
        ),
      ),
    ),
  );
}
