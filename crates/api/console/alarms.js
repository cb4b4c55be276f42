// The console's Alarms pages over /api/v1/tenants/{t}/alarms and …/alarm-channels (docs/alarms.md):
// the list with live updates and filters (#/alarms), an alarm's page with acknowledge, clear and
// its history (#/alarms/{id}), and the notification channels (#/alarms/channels[/{id}], admins
// only: their URLs and headers often hold secrets). The overview's "Active alarms" card lives here
// too. app.js routes here and lends its DOM helpers (`ui`).

import { ApiError, call, get, path, session, stream } from './api.js';
import { can, gate, needsText } from './role.js';
import { confirmDialog } from './confirm.js';

const PAGE_SIZE = 50;
const SEVERITIES = ['critical', 'major', 'minor', 'warning', 'info'];
const EVENTS = ['raised', 'updated', 'acknowledged', 'cleared'];
const STATES = [['open', 'Open (active or acknowledged)'], ['active', 'Active'], ['acknowledged', 'Acknowledged'], ['cleared', 'Cleared'], ['all', 'Any state']];
const COUNTS_EVERY_MS = 1000;
const NEW_CHANNEL = {
  kind: { webhook: { url: 'https://example.com/hooks/alarms', method: 'POST', headers: {}, body: null, timeout_ms: 5000, max_attempts: 5, backoff_ms: 500 } },
  min_severity: 'warning', events: [...EVENTS], rate_limit_s: 60, enabled: true, description: '',
};

const num = v => (v === undefined || v === null ? '–' : Number(v).toLocaleString());
const truncate = (s, n) => (s.length > n ? s.slice(0, n - 1) + '…' : s);

function problem(ui, e, what, role = 'operator') {
  if (e instanceof ApiError && e.status === 403) return ui.h('p', { class: 'error', role: 'alert' }, `Your token may not ${what}: ${needsText(role)}`);
  return ui.errorBox(e);
}

function severityBadge(h, s) {
  return h('span', { class: `sev sev-${s}` }, s);
}

function stateBadge(h, s) {
  return h('span', { class: `state state-${s}` }, s);
}

function tabs(ui, current) {
  const { h } = ui;
  return h('nav', { class: 'tabs', 'aria-label': 'Alarm sections' },
    [['list', 'Alarms', '#/alarms'], ['channels', 'Notification channels', '#/alarms/channels']]
      .map(([id, label, href]) => h('a', { href, 'aria-current': id === current ? 'page' : null }, label)));
}

// #/alarms, #/alarms/{id}, #/alarms/channels[/{id}][?create]: parts are decoded by app.js.
export function renderAlarms(ui, parts, query) {
  if (parts[1] === 'channels' && parts[2]) return renderChannel(ui, parts[2]);
  if (parts[1] === 'channels') return query.has('create') ? renderChannel(ui, null) : renderChannels(ui);
  if (parts[1]) return renderAlarm(ui, parts[1]);
  return renderList(ui, query);
}

// ---- counts (the list's head and the overview card) --------------------------------------------

function countsStats(h, idPrefix) {
  const cell = (label, key) => h('div', { class: 'stat' },
    h('div', { class: 'label', id: `${idPrefix}-${key}-label` }, label),
    h('div', { class: 'value', id: `${idPrefix}-${key}`, 'aria-labelledby': `${idPrefix}-${key}-label` }, '–'));
  const el = h('div', { class: 'stats', 'aria-live': 'polite' },
    cell('Open alarms', 'total'), cell('Not acknowledged', 'unacknowledged'), cell('Critical', 'critical'), cell('Major', 'major'), cell('Minor · warning · info', 'lesser'));
  const update = c => {
    if (!c) return;
    for (const k of ['total', 'unacknowledged', 'critical', 'major']) el.querySelector(`#${idPrefix}-${k}`).textContent = num(c[k]);
    el.querySelector(`#${idPrefix}-critical`).classList.toggle('bad', c.critical > 0);
    el.querySelector(`#${idPrefix}-lesser`).textContent = `${num(c.minor)} · ${num(c.warning)} · ${num(c.info)}`;
  };
  return { el, update };
}

// The overview's "Active alarms" section, fed by the overview stream's `alarms` counts.
export function overviewAlarmsSection(ui) {
  const { h } = ui;
  const stats = countsStats(h, 'ov-alarms');
  const el = h('section', { 'aria-labelledby': 'ov-alarms-title', hidden: true },
    h('div', { class: 'page-head' }, h('h2', { id: 'ov-alarms-title' }, 'Active alarms'), h('a', { href: '#/alarms' }, 'See the alarms →')),
    stats.el);
  return {
    el,
    update(c) {
      if (!c) return;
      el.hidden = false;
      stats.update(c);
    },
  };
}

// ---- list ----------------------------------------------------------------------------------------

function matches(filter, a) {
  const state = filter.state || 'open';
  if (state === 'open' && a.state === 'cleared') return false;
  if (state !== 'open' && state !== 'all' && a.state !== state) return false;
  if (filter.severity && a.severity !== filter.severity) return false;
  if (filter.device && a.device !== filter.device) return false;
  if (filter.key && a.key !== filter.key) return false;
  return true;
}

function renderList(ui, query) {
  const { h, when, announce } = ui;
  const t = session.tenant;
  const q = Object.fromEntries(query);
  const back = (() => { try { return JSON.parse(q.back || '[]'); } catch { return []; } })();
  const go = changes => {
    const next = { ...q, ...changes };
    if (!('cursor' in changes)) { delete next.cursor; delete next.back; }
    location.hash = '#/alarms?' + new URLSearchParams(Object.entries(next).filter(([, v]) => v));
  };
  const stateSel = h('select', { id: 'alarm-state' }, STATES.map(([v, label]) => h('option', { value: v, selected: (q.state || 'open') === v }, label)));
  const sevSel = h('select', { id: 'alarm-severity' }, h('option', { value: '' }, 'any'), SEVERITIES.map(s => h('option', { value: s, selected: q.severity === s }, s)));
  const device = h('input', { id: 'alarm-device', value: q.device || '', placeholder: 'device id', autocomplete: 'off' });
  const key = h('input', { id: 'alarm-key', value: q.key || '', placeholder: 'dedup key', autocomplete: 'off' });
  const filters = h('form', {
    class: 'filters', role: 'search',
    onsubmit: e => { e.preventDefault(); go({ state: stateSel.value === 'open' ? '' : stateSel.value, severity: sevSel.value, device: device.value.trim(), key: key.value.trim() }); },
  },
  h('label', { for: 'alarm-state' }, 'State', stateSel),
  h('label', { for: 'alarm-severity' }, 'Severity', sevSel),
  h('label', { for: 'alarm-device' }, 'Device', device),
  h('label', { for: 'alarm-key' }, 'Key', key),
  h('button', { type: 'submit' }, 'Filter'));

  const counts = countsStats(h, 'alarm-count');
  const columns = ['Severity', 'State', 'Key', 'Device', 'Message', 'Count', 'Raised', 'Last raised', ''];
  const tbody = h('tbody', {}, h('tr', {}, h('td', { colspan: columns.length, class: 'loading' }, 'Loading alarms…')));
  const table = h('table', { class: 'alarms-table' }, h('caption', { class: 'visually-hidden' }, 'Alarms'),
    h('thead', {}, h('tr', {}, columns.map(c => h('th', { scope: 'col' }, c)))), tbody);
  const pager = h('nav', { class: 'pager', 'aria-label': 'Pages' });
  const shown = h('span', { id: 'alarms-shown' });
  const status = h('p', { class: 'notice', role: 'status', id: 'alarms-live' }, 'Connecting…');
  const actionStatus = h('div', { id: 'alarms-action-status', class: 'save-status' });
  ui.setView('Alarms', h('h1', {}, `Alarms — ${t}`), tabs(ui, 'list'), counts.el, filters, actionStatus,
    h('div', { class: 'table-wrap' }, table), pager, status);

  const ctrl = new AbortController();
  ui.onCleanup(() => ctrl.abort());
  const signal = ctrl.signal;
  const rows = new Map(); // alarm id → <tr>

  const step = (a, verb) => async e => {
    const button = e.currentTarget;
    button.disabled = true;
    try {
      const { body } = await call('POST', path`/tenants/${t}/alarms/${a.id}/${verb}`);
      replaceRow(body);
      announce(`Alarm ${body.key} ${body.state}`);
      actionStatus.replaceChildren();
    } catch (err) {
      button.disabled = false;
      if (err instanceof ApiError && err.status === 409) { actionStatus.replaceChildren(h('p', { class: 'error', role: 'alert' }, err.message)); reloadRow(a.id); }
      else actionStatus.replaceChildren(problem(ui, err, `${verb === 'clear' ? 'clear' : 'acknowledge'} alarms`));
    }
  };

  const row = a => {
    const actions = [];
    if (a.state === 'active') actions.push(gate(h('button', { type: 'button', class: 'secondary', 'aria-label': `Acknowledge ${a.key}`, onclick: step(a, 'acknowledge') }, 'Acknowledge'), 'operator'));
    if (a.state !== 'cleared') actions.push(gate(h('button', { type: 'button', class: 'secondary', 'aria-label': `Clear ${a.key}`, onclick: step(a, 'clear') }, 'Clear'), 'operator'));
    const tr = h('tr', { 'data-alarm': a.id, 'data-state': a.state },
      h('td', {}, severityBadge(h, a.severity)),
      h('td', {}, stateBadge(h, a.state)),
      h('td', {}, h('a', { href: '#/alarms/' + encodeURIComponent(a.id) }, truncate(a.key, 48))),
      h('td', {}, a.device ? h('a', { href: '#/devices/' + encodeURIComponent(a.device) }, a.device) : '–'),
      h('td', { class: 'wrap alarm-message', title: a.message }, truncate(a.message || '', 120)),
      h('td', { class: 'num' }, num(a.count)),
      h('td', {}, when(a.created_ms)),
      h('td', {}, when(a.last_raised_ms)),
      h('td', {}, h('div', { class: 'row-actions' }, actions)));
    rows.set(a.id, tr);
    return tr;
  };
  const replaceRow = a => {
    const old = rows.get(a.id);
    if (!old) return false;
    if (!matches(q, a)) { old.remove(); rows.delete(a.id); shown.textContent = `${rows.size} shown`; return true; }
    old.replaceWith(row(a));
    return true;
  };
  const reloadRow = id => get(path`/tenants/${t}/alarms/${id}`, { signal }).then(replaceRow).catch(() => {});

  let countsTimer = null;
  const refreshCounts = () => {
    if (countsTimer) return;
    countsTimer = setTimeout(() => {
      countsTimer = null;
      get(path`/tenants/${t}/alarms/counts`, { signal }).then(counts.update).catch(() => {});
    }, COUNTS_EVERY_MS);
  };
  ui.onCleanup(() => clearTimeout(countsTimer));

  const apiQuery = new URLSearchParams({ limit: PAGE_SIZE });
  if ((q.state || 'open') !== 'all') apiQuery.set('state', q.state || 'open');
  for (const k of ['severity', 'device', 'key', 'cursor']) if (q[k]) apiQuery.set(k, q[k]);
  const emptyRow = () => h('tr', { class: 'empty-row' }, h('td', { colspan: columns.length, class: 'empty' },
    Object.keys(q).some(k => ['state', 'severity', 'device', 'key'].includes(k))
      ? 'No alarm matches these filters.'
      : 'No open alarms. Rules raise them (an `alarm` action) and so does POST /api/v1/tenants/{tenant}/alarms; cleared ones show under "Any state".'));
  const load = () => Promise.all([
    get(path`/tenants/${t}/alarms` + '?' + apiQuery, { signal }),
    get(path`/tenants/${t}/alarms/counts`, { signal }),
  ]).then(([page, c]) => {
    counts.update(c);
    rows.clear();
    tbody.replaceChildren(...(page.items.length ? page.items.map(row) : [emptyRow()]));
    const prev = h('button', { type: 'button', class: 'secondary', disabled: !q.cursor, onclick: () => { const b = [...back]; const c2 = b.pop() || ''; go({ cursor: c2, back: b.length ? JSON.stringify(b) : '' }); } }, '← Newer');
    const next = h('button', { type: 'button', class: 'secondary', disabled: !page.next_cursor, onclick: () => go({ cursor: page.next_cursor, back: JSON.stringify([...back, q.cursor || '']) }) }, 'Older →');
    pager.replaceChildren(prev, h('span', { class: 'notice' }, `Page ${back.length + 1} · `, shown), next);
    shown.textContent = `${rows.size} shown`;
    announce(`${page.items.length} alarms shown`);
  }).catch(e => {
    if (e.name !== 'AbortError') tbody.replaceChildren(h('tr', {}, h('td', { colspan: columns.length }, problem(ui, e, 'see alarms', 'viewer'))));
  });
  load();

  // Live: a change to a listed alarm updates its row; a new one that matches the filters shows at
  // the top of the first page; a reader that fell behind reloads.
  stream(path`/tenants/${t}/alarms/stream`, (name, data) => {
    if (name === 'lagged') { load(); return; }
    let ev;
    try { ev = JSON.parse(data); } catch { return; }
    const a = ev.alarm;
    if (!a) return;
    refreshCounts();
    if (replaceRow(a)) return;
    if (!q.cursor && matches(q, a)) {
      tbody.querySelector('.empty-row')?.remove();
      const tr = row(a);
      tr.classList.add('fresh');
      tbody.prepend(tr);
      shown.textContent = `${rows.size} shown`;
      announce(`New ${a.severity} alarm ${a.key}`);
    }
  }, {
    signal,
    onState: (s, e) => {
      if (s === 'live') status.textContent = 'Live: new alarms and changes show as they happen.';
      else if (s === 'error') status.replaceChildren(ui.errorBox(e));
      else if (s === 'reconnecting') { status.textContent = 'Reconnecting…'; load(); }
    },
  });
}

// ---- one alarm -----------------------------------------------------------------------------------

function renderAlarm(ui, id) {
  const { h, when, announce } = ui;
  const t = session.tenant;
  const base = path`/tenants/${t}/alarms/${id}`;
  const head = h('div', { class: 'alarm-head' }, h('p', { class: 'loading' }, 'Loading the alarm…'));
  const facts = h('dl', { class: 'kv' });
  const details = h('pre', { class: 'json', id: 'alarm-details' });
  const note = h('input', { id: 'alarm-note', maxlength: 4096, placeholder: 'e.g. technician sent', autocomplete: 'off' });
  const ack = gate(h('button', { type: 'button', id: 'alarm-ack' }, 'Acknowledge'), 'operator');
  const clear = gate(h('button', { type: 'button', id: 'alarm-clear', class: 'secondary' }, 'Clear'), 'operator');
  const stepStatus = h('div', { class: 'save-status', id: 'alarm-step-status', role: 'status' });
  const historyBody = h('tbody', {}, h('tr', {}, h('td', { colspan: 6, class: 'loading' }, 'Loading the history…')));
  ui.setView('Alarm',
    h('p', {}, h('a', { href: '#/alarms' }, '← Alarms')),
    head,
    h('div', { class: 'grid2' },
      h('section', { class: 'card', 'aria-labelledby': 'alarm-facts-title' }, h('h2', { id: 'alarm-facts-title' }, 'Alarm'), facts),
      h('section', { class: 'card', 'aria-labelledby': 'alarm-act-title' },
        h('h2', { id: 'alarm-act-title' }, 'Respond'),
        h('label', { for: 'alarm-note' }, 'Note (kept in the history)', note),
        h('div', { class: 'row' }, ack, clear),
        stepStatus,
        h('h3', {}, 'Details'), details)),
    h('section', { class: 'card', 'aria-labelledby': 'alarm-history-title' },
      h('h2', { id: 'alarm-history-title' }, 'History'),
      h('div', { class: 'table-wrap short' }, h('table', {}, h('caption', { class: 'visually-hidden' }, 'History'),
        h('thead', {}, h('tr', {}, ['When', 'Event', 'By', 'Note', 'Severity', 'State'].map(c => h('th', { scope: 'col' }, c)))),
        historyBody))));

  const ctrl = new AbortController();
  ui.onCleanup(() => ctrl.abort());
  const signal = ctrl.signal;

  const show = a => {
    head.replaceChildren(h('h1', {}, severityBadge(h, a.severity), ' ', a.key), h('p', { class: 'alarm-message' }, a.message || h('span', { class: 'notice' }, 'No message.')));
    const by = (who, at) => (at ? `${when(at)}${who ? ' by ' + who : ''}` : '–');
    const rows = [
      ['State', stateBadge(h, a.state)],
      ['Device', a.device ? h('a', { href: '#/devices/' + encodeURIComponent(a.device) }, a.device) : '–'],
      ['Source', a.source.startsWith('rule:') ? h('a', { href: '#/rules/' + encodeURIComponent(a.source.slice(5)) }, a.source) : a.source],
      ['Raised', `${num(a.count)} time${a.count === 1 ? '' : 's'}`],
      ['First raised', when(a.created_ms)],
      ['Last raised', when(a.last_raised_ms)],
      ['Acknowledged', by(a.acknowledged_by, a.acknowledged_ms)],
      ['Cleared', by(a.cleared_by, a.cleared_ms)],
      ['Id', h('span', { class: 'mono' }, a.id)],
    ];
    facts.replaceChildren(...rows.flatMap(([k, v]) => [h('dt', {}, k), h('dd', { 'data-field': k.toLowerCase().replace(' ', '-') }, v)]));
    details.textContent = JSON.stringify(a.details ?? null, null, 2);
    if (can('operator')) {
      ack.disabled = a.state !== 'active';
      clear.disabled = a.state === 'cleared';
    }
    document.title = `Alarm ${a.key} · Ferrohub console`;
  };
  const loadHistory = () => get(base + '/history', { signal }).then(events => {
    historyBody.replaceChildren(...[...events].reverse().map(ev => h('tr', {},
      h('td', {}, when(ev.at_ms)), h('td', {}, ev.kind), h('td', {}, ev.by), h('td', { class: 'wrap' }, ev.note || ''),
      h('td', {}, severityBadge(h, ev.alarm.severity)), h('td', {}, stateBadge(h, ev.alarm.state)))));
  }).catch(e => { if (e.name !== 'AbortError') historyBody.replaceChildren(h('tr', {}, h('td', { colspan: 6 }, ui.errorBox(e)))); });
  const load = () => get(base, { signal }).then(show).catch(e => {
    if (e.name === 'AbortError') return;
    const gone = e instanceof ApiError && e.status === 404;
    head.replaceChildren(h('h1', {}, 'Alarm'), gone ? h('p', { class: 'notice' }, 'No such alarm: it was never raised here, or it was cleared long enough ago for retention to delete it.') : ui.errorBox(e));
  });

  const doStep = verb => async () => {
    const button = verb === 'clear' ? clear : ack;
    button.disabled = true;
    try {
      const text = note.value.trim();
      const { body } = await call('POST', `${base}/${verb}`, { body: text ? { note: text } : undefined });
      note.value = '';
      show(body);
      loadHistory();
      stepStatus.replaceChildren(h('span', { class: 'ok' }, verb === 'clear' ? 'Cleared.' : 'Acknowledged.'));
      announce(`Alarm ${body.key} ${body.state}`);
    } catch (e) {
      if (e instanceof ApiError && e.status === 409) { stepStatus.replaceChildren(h('p', { class: 'error', role: 'alert' }, e.message)); load(); loadHistory(); }
      else { button.disabled = false; stepStatus.replaceChildren(problem(ui, e, `${verb} alarms`)); }
    }
  };
  ack.addEventListener('click', doStep('acknowledge'));
  clear.addEventListener('click', doStep('clear'));
  load();
  loadHistory();

  // Raised again, acknowledged or cleared elsewhere: shown at once.
  stream(path`/tenants/${t}/alarms/stream`, (name, data) => {
    if (name === 'lagged') { load(); loadHistory(); return; }
    let ev;
    try { ev = JSON.parse(data); } catch { return; }
    if (ev.alarm?.id !== id) return;
    show(ev.alarm);
    loadHistory();
  }, { signal });
}

// ---- notification channels ---------------------------------------------------------------------

function adminOnly(ui, current) {
  const { h } = ui;
  ui.setView('Notification channels', h('h1', {}, `Notification channels — ${session.tenant}`), tabs(ui, current),
    h('p', { class: 'notice', role: 'status' }, `Channels hold webhook URLs and headers, which often carry secrets, so only admins see them. ${needsText('admin')}`));
}

function renderChannels(ui) {
  const { h } = ui;
  const t = session.tenant;
  if (!can('admin')) return adminOnly(ui, 'channels');
  const columns = ['Id', 'Webhook', 'Min severity', 'Events', 'Rate limit', 'Enabled', 'Sent', 'Failed', 'Suppressed', 'Dropped'];
  const tbody = h('tbody', {}, h('tr', {}, h('td', { colspan: columns.length, class: 'loading' }, 'Loading channels…')));
  ui.setView('Notification channels',
    h('div', { class: 'page-head' }, h('h1', {}, `Notification channels — ${t}`), h('a', { href: '#/alarms/channels?create', class: 'button', id: 'channel-create' }, 'New channel')),
    tabs(ui, 'channels'),
    h('div', { class: 'table-wrap' }, h('table', {}, h('caption', { class: 'visually-hidden' }, 'Notification channels'),
      h('thead', {}, h('tr', {}, columns.map(c => h('th', { scope: 'col' }, c)))), tbody)));
  const ctrl = new AbortController();
  ui.onCleanup(() => ctrl.abort());
  const signal = ctrl.signal;
  get(path`/tenants/${t}/alarm-channels`, { signal }).then(async list => {
    if (!list.length) {
      tbody.replaceChildren(h('tr', {}, h('td', { colspan: columns.length, class: 'empty' },
        h('p', {}, 'No channels yet. A channel calls a webhook when alarms are raised, change or clear, with a body you template.'),
        h('a', { href: '#/alarms/channels?create', class: 'button' }, 'Create the first channel'))));
      return;
    }
    const stats = await Promise.all(list.map(c => get(path`/tenants/${t}/alarm-channels/${c.id}/deliveries`, { signal }).catch(() => ({}))));
    tbody.replaceChildren(...list.map((c, i) => {
      const w = c.kind.webhook || {};
      return h('tr', { 'data-channel': c.id },
        h('td', {}, h('a', { href: '#/alarms/channels/' + encodeURIComponent(c.id) }, c.id)),
        h('td', { class: 'mono', title: w.url }, `${w.method || 'POST'} ${truncate(w.url || '', 50)}`),
        h('td', {}, severityBadge(h, c.min_severity)),
        h('td', { class: 'wrap' }, c.events.join(', ')),
        h('td', {}, c.rate_limit_s ? `${c.rate_limit_s} s` : 'none'),
        h('td', {}, c.enabled ? 'yes' : 'no'),
        ...['sent', 'failed', 'suppressed', 'dropped'].map(k => h('td', { class: 'num', 'data-counter': k }, num(stats[i][k]))));
    }));
  }).catch(e => { if (e.name !== 'AbortError') tbody.replaceChildren(h('tr', {}, h('td', { colspan: columns.length }, problem(ui, e, 'see channels', 'admin')))); });
}

// The channel form: every field of docs/alarms.md's channel, templates in textareas.
function channelForm(ui, channel, creating) {
  const { h } = ui;
  const spec = channel || NEW_CHANNEL;
  const w = spec.kind.webhook;
  const field = (label, id, input, help) => h('label', { for: id, class: 'grow' }, label, input, help ? h('small', { class: 'notice' }, help) : null);
  const inputs = {
    id: h('input', { id: 'channel-id', required: true, pattern: '[A-Za-z0-9_.\\-]{1,128}', placeholder: 'ops-webhook', autocomplete: 'off' }),
    description: h('input', { id: 'channel-description', value: spec.description || '' }),
    url: h('input', { id: 'channel-url', required: true, value: w.url, class: 'mono' }),
    method: h('select', { id: 'channel-method' }, ['POST', 'PUT', 'PATCH', 'GET'].map(m => h('option', { value: m, selected: w.method === m }, m))),
    headers: h('textarea', { id: 'channel-headers', class: 'short' }),
    body: h('textarea', { id: 'channel-body', class: 'short', placeholder: 'Empty: {"alarm": …, "event": …} as JSON' }),
    min_severity: h('select', { id: 'channel-min-severity' }, SEVERITIES.map(s => h('option', { value: s, selected: spec.min_severity === s }, s))),
    rate_limit_s: h('input', { id: 'channel-rate', type: 'number', min: 0, value: spec.rate_limit_s }),
    timeout_ms: h('input', { id: 'channel-timeout', type: 'number', min: 1, max: 60000, value: w.timeout_ms }),
    max_attempts: h('input', { id: 'channel-attempts', type: 'number', min: 1, max: 10, value: w.max_attempts }),
    backoff_ms: h('input', { id: 'channel-backoff', type: 'number', min: 0, value: w.backoff_ms }),
    enabled: h('input', { id: 'channel-enabled', type: 'checkbox', checked: spec.enabled }),
  };
  inputs.headers.value = JSON.stringify(w.headers || {}, null, 2);
  inputs.body.value = w.body || '';
  const events = EVENTS.map(ev => h('label', { class: 'check' }, h('input', { type: 'checkbox', name: 'events', value: ev, checked: spec.events.includes(ev) }), ev));
  const el = h('div', { class: 'rule-form' },
    creating ? h('div', { class: 'filters' }, field('Id (letters, digits, _ - .)', 'channel-id', inputs.id)) : null,
    h('div', { class: 'filters' }, field('Webhook URL (a template)', 'channel-url', inputs.url), field('Method', 'channel-method', inputs.method)),
    h('div', { class: 'filters' }, field('Description', 'channel-description', inputs.description)),
    h('div', { class: 'filters' },
      field('Minimum severity', 'channel-min-severity', inputs.min_severity),
      field('Rate limit per alarm (s, 0: none)', 'channel-rate', inputs.rate_limit_s),
      h('label', { class: 'check' }, inputs.enabled, 'Enabled')),
    h('fieldset', { class: 'events' }, h('legend', {}, 'Notify on'), events),
    h('div', { class: 'filters' },
      field('Headers (JSON object of name → template)', 'channel-headers', inputs.headers),
      field('Body template (minijinja over alarm, event, tenant, channel)', 'channel-body', inputs.body, 'e.g. {"text": "{{ alarm.severity }}: {{ alarm.key }} {{ event.kind }}"}')),
    h('div', { class: 'filters' },
      field('Timeout per attempt (ms)', 'channel-timeout', inputs.timeout_ms),
      field('Attempts', 'channel-attempts', inputs.max_attempts),
      field('First back-off (ms)', 'channel-backoff', inputs.backoff_ms)));
  return {
    el,
    id: () => inputs.id.value.trim(),
    // The request body, or throws an Error that says which field to fix.
    spec() {
      let headers;
      try { headers = JSON.parse(inputs.headers.value || '{}'); } catch (e) { throw new Error(`Headers: not JSON (${e.message}). Give an object such as {"x-token": "…"}.`); }
      if (!headers || typeof headers !== 'object' || Array.isArray(headers)) throw new Error('Headers: give a JSON object of header name → value template.');
      const int = (name, input) => {
        const v = Number(input.value);
        if (!Number.isInteger(v) || v < 0) throw new Error(`${name}: give a whole number.`);
        return v;
      };
      return {
        kind: { webhook: {
          url: inputs.url.value.trim(), method: inputs.method.value, headers, body: inputs.body.value.trim() ? inputs.body.value : null,
          timeout_ms: int('Timeout', inputs.timeout_ms), max_attempts: int('Attempts', inputs.max_attempts), backoff_ms: int('Back-off', inputs.backoff_ms),
        } },
        min_severity: inputs.min_severity.value,
        events: events.map(l => l.querySelector('input')).filter(i => i.checked).map(i => i.value),
        rate_limit_s: int('Rate limit', inputs.rate_limit_s),
        enabled: inputs.enabled.checked,
        description: inputs.description.value,
      };
    },
  };
}

function renderChannel(ui, id) {
  const { h, when, announce } = ui;
  const t = session.tenant;
  if (!can('admin')) return adminOnly(ui, 'channels');
  const creating = id === null;
  const status = h('div', { class: 'save-status', id: 'channel-status', role: 'status' });
  const formCard = h('section', { class: 'card', 'aria-labelledby': 'channel-form-title' }, h('h2', { id: 'channel-form-title' }, creating ? 'New channel' : 'Settings'), h('p', { class: 'loading' }, 'Loading…'));
  const testOut = h('div', { id: 'channel-test-result', class: 'dry-run-result', role: 'status' });
  const deliveries = h('tbody', {});
  const counters = h('p', { class: 'notice', id: 'channel-counters' });
  ui.setView(creating ? 'New channel' : `Channel ${id}`,
    h('p', {}, h('a', { href: '#/alarms/channels' }, '← Notification channels')),
    h('h1', {}, creating ? 'New notification channel' : `Channel ${id}`),
    formCard,
    ...(creating ? [] : [h('section', { class: 'card', 'aria-labelledby': 'channel-deliveries-title' },
      h('h2', { id: 'channel-deliveries-title' }, 'Deliveries (since the hub started)'), counters, testOut,
      h('div', { class: 'table-wrap short' }, h('table', {}, h('caption', { class: 'visually-hidden' }, 'Deliveries'),
        h('thead', {}, h('tr', {}, ['When', 'Alarm', 'Event', 'Status', 'Attempts', 'HTTP', 'Error'].map(c => h('th', { scope: 'col' }, c)))),
        deliveries)))]));
  const ctrl = new AbortController();
  ui.onCleanup(() => ctrl.abort());
  const signal = ctrl.signal;
  const base = creating ? null : path`/tenants/${t}/alarm-channels/${id}`;

  const loadDeliveries = () => get(base + '/deliveries', { signal }).then(d => {
    counters.textContent = `Sent ${num(d.sent)} · failed ${num(d.failed)} · suppressed by the rate limit ${num(d.suppressed)} · dropped (queue full) ${num(d.dropped)}`;
    deliveries.replaceChildren(...(d.deliveries.length ? d.deliveries.map(x => h('tr', { 'data-status': x.status },
      h('td', {}, when(x.at_ms)), h('td', { class: 'mono' }, x.test ? 'test' : h('a', { href: '#/alarms/' + encodeURIComponent(x.alarm_id) }, truncate(x.alarm_id, 12))),
      h('td', {}, x.event), h('td', {}, x.status), h('td', { class: 'num' }, num(x.attempts)), h('td', {}, x.http_status ?? '–'), h('td', { class: 'wrap' }, x.error || '')))
      : [h('tr', {}, h('td', { colspan: 7, class: 'notice' }, 'Nothing delivered yet. "Send a test" sends a sample now.'))]));
  }).catch(e => { if (e.name !== 'AbortError') counters.replaceChildren(ui.errorBox(e)); });

  const showForm = channel => {
    const form = channelForm(ui, channel, creating);
    const save = h('button', { type: 'submit', id: 'channel-save' }, creating ? 'Create channel' : 'Save');
    const buttons = [save];
    if (!creating) {
      buttons.push(h('button', { type: 'button', class: 'secondary', id: 'channel-test', onclick: async e => {
        const b = e.currentTarget;
        b.disabled = true;
        testOut.replaceChildren(h('span', { class: 'loading' }, 'Sending a sample notification…'));
        try {
          const out = await call('POST', base + '/test').then(r => r.body);
          const ok = out.status === 'sent';
          testOut.replaceChildren(h('p', { class: ok ? 'ok' : 'error' },
            ok ? `Test sent: HTTP ${out.http_status ?? '?'}.` : `Test failed after ${out.attempts} attempt(s): ${out.error || 'HTTP ' + out.http_status}.`));
          loadDeliveries();
        } catch (err) { testOut.replaceChildren(ui.errorBox(err)); }
        b.disabled = false;
      } }, 'Send a test'));
      buttons.push(h('button', { type: 'button', class: 'secondary danger', id: 'channel-delete', onclick: () => confirmDelete() }, 'Delete'));
    }
    const el = h('form', {
      onsubmit: async e => {
        e.preventDefault();
        let body;
        try { body = form.spec(); } catch (err) { status.replaceChildren(h('p', { class: 'error', role: 'alert' }, err.message)); return; }
        const target = creating ? path`/tenants/${t}/alarm-channels/${form.id()}` : base;
        if (creating && !form.id()) { status.replaceChildren(h('p', { class: 'error', role: 'alert' }, 'Give the channel an id.')); return; }
        save.disabled = true;
        try {
          const r = await call('PUT', target, { body });
          announce(`Channel ${r.body.id} saved`);
          if (creating) { location.hash = '#/alarms/channels/' + encodeURIComponent(r.body.id); return; }
          status.replaceChildren(h('span', { class: 'ok' }, `Saved ${new Date(r.body.updated_ms).toLocaleTimeString()}.`));
        } catch (err) {
          const d = err instanceof ApiError ? err.detail : null;
          const where = d && d.field && !err.message.startsWith(d.field) ? ` (${d.field}${d.line ? ', line ' + d.line : ''})` : '';
          status.replaceChildren(h('p', { class: 'error', role: 'alert' }, `${err.message}${where}`));
        }
        save.disabled = false;
      },
    }, form.el, h('div', { class: 'row' }, ...buttons), status);
    formCard.replaceChildren(h('h2', { id: 'channel-form-title' }, creating ? 'New channel' : 'Settings'), el);
  };

  const confirmDelete = () => confirmDialog(ui, {
    title: `Delete channel ${id}?`,
    text: 'It stops notifying at once; its delivery log goes with it.',
    confirmId: 'channel-delete-confirm',
    opener: document.getElementById('channel-delete'),
    onConfirm: async () => {
      await call('DELETE', base);
      announce(`Channel ${id} deleted`);
      location.hash = '#/alarms/channels';
    },
    onError: e => status.replaceChildren(problem(ui, e, 'delete channels', 'admin')),
  });

  if (creating) { showForm(null); return; }
  get(base, { signal }).then(c => { showForm(c); loadDeliveries(); }).catch(e => {
    if (e.name === 'AbortError') return;
    formCard.replaceChildren(e instanceof ApiError && e.status === 404 ? h('p', { class: 'notice' }, `No channel ${id} in this tenant.`) : problem(ui, e, 'see channels', 'admin'));
  });
}
