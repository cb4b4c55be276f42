// The Ferrohub operator console: a hash-routed single page (#/overview, #/devices,
// #/devices/{id}) over the /api/v1 operator API. No framework: each view renders into <main>
// and registers what to stop (streams, timers) when the operator navigates away.

import { ApiError, call, get, path, session, setUnauthenticatedHandler, stream } from './api.js';
import { LineChart, fmtValue } from './chart.js';
import { renderRules } from './rules.js';
import { renderCredentials, renderTail } from './device-panels.js';
import { can, gate, setMe } from './role.js';
import { renderBroker, tenantBrokerSection } from './broker.js';
import { overviewAlarmsSection, renderAlarms } from './alarms.js';

const main = document.getElementById('main');
const top = document.getElementById('top');
const announcer = document.getElementById('announcer');
let tenants = [];
let cleanups = [];

// ---- small DOM helpers -------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  return el;
}

function announce(text) { announcer.textContent = text; }
function errorText(e) { return e instanceof ApiError ? `${e.message} (${e.code})` : String(e.message || e); }
function errorBox(e) { return h('p', { class: 'error', role: 'alert' }, errorText(e)); }
function json(v) { return JSON.stringify(v ?? {}, null, 2); }
function when(ms) { return ms ? new Date(ms).toLocaleString() : '–'; }
function onCleanup(f) { cleanups.push(f); }
function tenant() { return session.tenant; }

function setView(title, ...children) {
  for (const f of cleanups.splice(0)) { try { f(); } catch { /* already stopped */ } }
  document.title = `${title} · Ferrohub console`;
  main.replaceChildren(...children);
}

// ---- routing -----------------------------------------------------------------------------------

function parseHash() {
  const raw = location.hash.replace(/^#/, '') || '/overview';
  const [p, q = ''] = raw.split('?');
  return { parts: p.split('/').filter(Boolean).map(decodeURIComponent), query: new URLSearchParams(q) };
}

async function route() {
  if (!session.token) { renderSignIn(); return; }
  if (!tenants.length) {
    try { await loadTenants(session.token); } catch (e) { renderSignIn(e); return; }
  }
  top.hidden = false;
  const { parts, query } = parseHash();
  for (const a of document.querySelectorAll('[data-nav]')) {
    if (a.dataset.nav === (parts[0] || 'overview')) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  if (!tenant()) { setView('No tenant', h('h1', {}, 'No tenant'), h('p', { class: 'notice' }, 'This token sees no tenant. Create one with POST /api/v1/tenants or ferrohub ctl.')); return; }
  if (parts[0] === 'devices' && parts[1]) renderDevice(parts[1]);
  else if (parts[0] === 'devices') renderDevices(query);
  else if (parts[0] === 'rules') renderRules({ h, setView, onCleanup, announce, errorBox, when, tenant: tenant() }, parts.slice(1), query);
  else if (parts[0] === 'alarms') renderAlarms({ h, setView, onCleanup, errorBox, announce, when }, parts, query);
  else if (parts[0] === 'broker') renderBroker({ h, setView, onCleanup, errorBox, announce, when }, parts, query);
  else renderOverview();
  main.focus({ preventScroll: true });
}

window.addEventListener('hashchange', route);
// The skip link must not change the hash (the router owns it): it only moves focus.
document.querySelector('.skip').addEventListener('click', e => { e.preventDefault(); main.focus(); });
setUnauthenticatedHandler(() => signOut('Your session ended: the token is no longer valid. Sign in again.'));

// ---- sign-in, tenants, sign-out ----------------------------------------------------------------

// The token's role and scope (GET /me): actions it may not take are disabled, the role is shown.
async function loadMe(token) {
  const me = await get('/me', { token }).catch(() => null);
  setMe(me);
  document.getElementById('role-name').textContent = me ? `${me.role}${me.tenant ? ' · ' + me.tenant : ''}` : '';
}

async function loadTenants(token) {
  await loadMe(token);
  const list = await get('/tenants', { token });
  tenants = list.map(t => t.id);
  if (!tenants.includes(session.tenant)) session.tenant = tenants[0] || null;
  const select = document.getElementById('tenant-select');
  select.replaceChildren(...tenants.map(id => h('option', { value: id, selected: id === session.tenant }, id)));
  document.getElementById('tenant-picker').hidden = tenants.length < 2;
  document.getElementById('tenant-name').textContent = tenants.length === 1 ? `Tenant ${tenants[0]}` : '';
}

document.getElementById('tenant-select').addEventListener('change', e => {
  session.tenant = e.target.value;
  announce(`Tenant ${session.tenant}`);
  if (location.hash.startsWith('#/devices/')) location.hash = '#/devices'; else route();
});

document.getElementById('sign-out').addEventListener('click', () => signOut('You signed out.'));

function signOut(message) {
  session.clear();
  setMe(null);
  tenants = [];
  top.hidden = true;
  renderSignIn(null, message);
}

function renderSignIn(error, message) {
  top.hidden = true;
  const input = h('input', { id: 'token', name: 'token', type: 'password', autocomplete: 'current-password', required: true, 'aria-describedby': 'token-help' });
  const status = h('p', { id: 'signin-status', role: 'status', 'aria-live': 'polite' });
  const button = h('button', { type: 'submit' }, 'Sign in');
  if (error) status.append(errorBox(error));
  else if (message) status.append(h('span', { class: 'notice' }, message));
  const form = h('form', {
    onsubmit: async e => {
      e.preventDefault();
      const token = input.value.trim();
      if (!token) return;
      button.disabled = true;
      status.replaceChildren(h('span', { class: 'loading' }, 'Checking the token…'));
      try {
        await loadTenants(token);
        session.token = token;
        if (!location.hash || location.hash === '#/signin') location.hash = '#/overview';
        else route();
      } catch (err) {
        button.disabled = false;
        const bad = err instanceof ApiError && err.status === 401;
        status.replaceChildren(errorBox(bad ? new Error('That token is unknown, expired or revoked.') : err));
        input.focus();
      }
    },
  },
  h('label', { for: 'token' }, 'Operator API token'), input,
  h('small', { id: 'token-help', class: 'notice' }, 'The platform admin token is printed at the hub\'s first start (or set with FERROHUB_ADMIN_TOKEN). It is kept in this tab only.'),
  button, status);
  setView('Sign in', h('section', { class: 'card signin', 'aria-labelledby': 'signin-title' }, h('h1', { id: 'signin-title' }, 'Sign in to Ferrohub'), form));
  input.focus();
}

// ---- fleet overview ----------------------------------------------------------------------------

function stat(label, id) {
  return h('div', { class: 'stat' }, h('div', { class: 'label', id: id + '-label' }, label), h('div', { class: 'value', id, 'aria-labelledby': id + '-label' }, '–'));
}

function renderOverview() {
  const t = tenant();
  const state = h('p', { class: 'notice', role: 'status' }, 'Connecting…');
  // Hub-wide broker figures come only to platform-wide tokens; the section stays hidden otherwise.
  const hubStats = h('section', { 'aria-labelledby': 'hub-title', hidden: true },
    h('h2', { id: 'hub-title' }, 'Whole hub (all tenants)'),
    h('div', { class: 'stats' }, stat('Messages in / s', 'stat-in'), stat('Messages out / s', 'stat-out'), stat('MQTT connections', 'stat-connections')));
  const tenantBroker = tenantBrokerSection({ h });
  const alarms = overviewAlarmsSection({ h });
  setView('Overview',
    h('h1', {}, `Fleet overview — ${t}`),
    h('div', { class: 'stats', 'aria-live': 'polite' }, stat('Devices', 'stat-total'), stat('Online', 'stat-online'), stat('Offline', 'stat-offline')),
    alarms.el,
    hubStats,
    tenantBroker.el,
    state);
  const ctrl = new AbortController();
  onCleanup(() => ctrl.abort());
  stream(path`/tenants/${t}/overview/stream`, (name, data) => {
    if (name !== 'overview') return;
    const o = JSON.parse(data);
    document.getElementById('stat-total').textContent = o.devices.total.toLocaleString();
    document.getElementById('stat-online').textContent = o.devices.online.toLocaleString();
    document.getElementById('stat-offline').textContent = o.devices.offline.toLocaleString();
    if (o.hub) {
      hubStats.hidden = false;
      const rate = v => (v === undefined || v === null ? '–' : v.toLocaleString(undefined, { maximumFractionDigits: 1 }));
      document.getElementById('stat-in').textContent = rate(o.hub.messages_in_per_sec);
      document.getElementById('stat-out').textContent = rate(o.hub.messages_out_per_sec);
      document.getElementById('stat-connections').textContent = o.hub.connections.toLocaleString();
    }
    tenantBroker.update(o.broker);
    alarms.update(o.alarms);
    state.textContent = `Live · updated ${new Date(o.at).toLocaleTimeString()}`;
  }, {
    signal: ctrl.signal,
    onState: (s, e) => {
      if (s === 'error') state.replaceChildren(errorBox(e));
      else if (s === 'reconnecting') state.append(' Reconnecting…');
    },
  });
}

// ---- devices list ------------------------------------------------------------------------------

const PAGE_SIZE = 50;
const SORTABLE = { id: 'Id', name: 'Name', last_seen: 'Last seen', created_at: 'Created' };

function renderDevices(query) {
  const t = tenant();
  const q = Object.fromEntries(query);
  const cursors = (q.cursors || '').split(',').filter(Boolean); // pages before this one
  const apiQuery = new URLSearchParams({ limit: PAGE_SIZE, sort: q.sort || 'id', order: q.order || 'asc' });
  if (q.search) apiQuery.set('id_prefix', q.search);
  if (q.status) apiQuery.set('status', q.status);
  if (q.online) apiQuery.set('online', q.online);
  if (q.tag) apiQuery.set('tag', q.tag);
  if (q.group) apiQuery.set('group', q.group);
  if (q.cursor) apiQuery.set('cursor', q.cursor);

  const go = changes => {
    const next = { ...q, ...changes };
    if (!('cursor' in changes)) { delete next.cursor; delete next.cursors; }
    const params = new URLSearchParams(Object.entries(next).filter(([, v]) => v));
    location.hash = '#/devices?' + params;
  };
  const search = h('input', { id: 'search', type: 'search', value: q.search || '', placeholder: 'demo-0', autocomplete: 'off' });
  const tag = h('input', { id: 'tag-filter', value: q.tag || '', placeholder: 'site:berlin' });
  const group = h('input', { id: 'group-filter', value: q.group || '', placeholder: 'group name' });
  const status = h('select', { id: 'status-filter' }, h('option', { value: '' }, 'any'), h('option', { value: 'enabled', selected: q.status === 'enabled' }, 'enabled'), h('option', { value: 'disabled', selected: q.status === 'disabled' }, 'disabled'));
  const online = h('select', { id: 'online-filter' }, h('option', { value: '' }, 'any'), h('option', { value: 'true', selected: q.online === 'true' }, 'online'), h('option', { value: 'false', selected: q.online === 'false' }, 'offline'));
  const filters = h('form', {
    class: 'filters', role: 'search',
    onsubmit: e => { e.preventDefault(); go({ search: search.value.trim(), tag: tag.value.trim(), group: group.value.trim(), status: status.value, online: online.value }); },
  },
  h('label', { for: 'search' }, 'Id starts with', search),
  h('label', { for: 'tag-filter' }, 'Tag (key:value)', tag),
  h('label', { for: 'group-filter' }, 'Group', group),
  h('label', { for: 'status-filter' }, 'Status', status),
  h('label', { for: 'online-filter' }, 'Connection', online),
  h('button', { type: 'submit' }, 'Search'));

  const sortHeader = key => {
    const active = (q.sort || 'id') === key;
    const desc = active && q.order === 'desc';
    return h('th', { scope: 'col', 'aria-sort': active ? (desc ? 'descending' : 'ascending') : 'none' },
      h('button', { type: 'button', onclick: () => go({ sort: key, order: active && !desc ? 'desc' : 'asc' }) }, SORTABLE[key] + (active ? (desc ? ' ▼' : ' ▲') : '')));
  };
  const tbody = h('tbody', {}, h('tr', {}, h('td', { colspan: 6, class: 'loading' }, 'Loading devices…')));
  const table = h('table', {}, h('caption', { class: 'visually-hidden' }, 'Devices'),
    h('thead', {}, h('tr', {}, sortHeader('id'), sortHeader('name'), h('th', { scope: 'col' }, 'Connection'), h('th', { scope: 'col' }, 'Status'), h('th', { scope: 'col' }, 'Tags'), sortHeader('last_seen'))),
    tbody);
  const pager = h('nav', { class: 'pager', 'aria-label': 'Pages' });
  const create = renderCreateDevice(t);
  setView('Devices', h('h1', {}, `Devices — ${t}`), filters, h('div', { class: 'table-wrap' }, table), pager, create);

  const ctrl = new AbortController();
  onCleanup(() => ctrl.abort());
  get(path`/tenants/${t}/devices` + '?' + apiQuery, { signal: ctrl.signal }).then(page => {
    if (!page.items.length) {
      tbody.replaceChildren(h('tr', {}, h('td', { colspan: 6, class: 'notice' }, Object.keys(q).some(k => k !== 'sort' && k !== 'order') ? 'No device matches these filters.' : 'No devices yet: create one below, or import a fleet with ferrohub ctl devices import.')));
    } else {
      tbody.replaceChildren(...page.items.map(d => h('tr', {},
        h('td', {}, h('a', { href: '#/devices/' + encodeURIComponent(d.id) }, d.id)),
        h('td', {}, d.name),
        h('td', {}, h('span', { class: 'dot' + (d.connectivity.online ? ' on' : ''), 'aria-hidden': 'true' }), d.connectivity.online ? 'online' : 'offline'),
        h('td', {}, d.status),
        h('td', {}, Object.entries(d.tags).map(([k, v]) => h('span', { class: 'tag' }, `${k}=${v}`))),
        h('td', {}, when(d.connectivity.last_seen)))));
    }
    const prev = h('button', { type: 'button', class: 'secondary', disabled: !q.cursor, onclick: () => { const c = [...cursors]; const back = c.pop(); go({ cursor: back === '-' ? '' : back, cursors: c.join(',') }); } }, '← Previous');
    const next = h('button', { type: 'button', class: 'secondary', disabled: !page.next_cursor, onclick: () => go({ cursor: page.next_cursor, cursors: [...cursors, q.cursor || '-'].join(',') }) }, 'Next →');
    pager.replaceChildren(prev, h('span', { class: 'notice' }, `Page ${cursors.length + 1} · ${page.items.length} shown`), next);
    announce(`${page.items.length} devices shown`);
  }).catch(e => {
    if (e.name === 'AbortError') return;
    tbody.replaceChildren(h('tr', {}, h('td', { colspan: 6 }, errorBox(e))));
  });
}

function renderCreateDevice(t) {
  const id = h('input', { id: 'new-id', required: true, pattern: '[A-Za-z0-9._:\\-]{1,128}' });
  const name = h('input', { id: 'new-name' });
  const out = h('p', { role: 'status' });
  return h('details', { class: 'card' }, h('summary', {}, 'Create a device'),
    h('form', {
      class: 'filters',
      onsubmit: async e => {
        e.preventDefault();
        try {
          await call('POST', path`/tenants/${t}/devices`, { body: { id: id.value.trim(), name: name.value.trim() || id.value.trim() } });
          location.hash = '#/devices/' + encodeURIComponent(id.value.trim());
        } catch (err) { out.replaceChildren(errorBox(err)); }
      },
    }, h('label', { for: 'new-id' }, 'Id', id), h('label', { for: 'new-name' }, 'Name', name), gate(h('button', { type: 'submit', id: 'create-device' }, 'Create'), 'operator')),
    out);
}

// ---- device page -------------------------------------------------------------------------------

function renderDevice(id) {
  const t = tenant();
  const base = path`/tenants/${t}/devices/${id}`;
  const info = h('div', { class: 'card', id: 'device-info' }, h('p', { class: 'loading' }, 'Loading the device…'));
  const twin = h('section', { class: 'card', 'aria-labelledby': 'twin-title' }, h('h2', { id: 'twin-title' }, 'Twin'), h('p', { class: 'loading' }, 'Loading the twin…'));
  const command = renderCommand(base);
  const charts = h('section', { class: 'card', 'aria-labelledby': 'telemetry-title' }, h('h2', { id: 'telemetry-title' }, 'Telemetry'), h('p', { class: 'loading' }, 'Loading series…'));
  const creds = h('section', { class: 'card', id: 'device-credentials', 'aria-labelledby': 'credentials-title' });
  const tail = h('section', { class: 'card', id: 'device-tail', 'aria-labelledby': 'tail-title' });
  setView(id, h('p', {}, h('a', { href: '#/devices' }, '← Devices')), h('h1', {}, id), info, creds, tail, twin, command, charts);
  const ctrl = new AbortController();
  onCleanup(() => ctrl.abort());
  const signal = ctrl.signal;
  const credentials = renderCredentials(creds, base, signal);
  renderTail(tail, base + '/messages/stream', signal);

  const loadInfo = async () => {
    const [d, conn] = await Promise.all([get(base, { signal }), get(base + '/connectivity?limit=10', { signal }).catch(() => null)]);
    const c = d.connectivity;
    const actions = h('div', { class: 'row' },
      gate(h('button', { type: 'button', class: 'secondary', id: 'device-toggle', onclick: async () => {
        try { await call('PATCH', base, { body: { status: d.status === 'enabled' ? 'disabled' : 'enabled' } }); announce('Device status changed'); loadInfo(); } catch (e) { info.append(errorBox(e)); }
      } }, d.status === 'enabled' ? 'Disable' : 'Enable'), 'operator'),
      gate(h('button', { type: 'button', class: 'secondary', id: 'new-password', onclick: () => resetPassword(d) }, 'New password'), 'operator'),
      gate(h('button', { type: 'button', class: 'secondary', id: 'new-certificate', onclick: () => issueCertificate(d) }, 'New certificate'), 'operator'),
      gate(h('button', { type: 'button', class: 'secondary', id: 'device-delete', onclick: async () => {
        if (!confirm(`Delete device ${d.id}? Its credentials and twin go with it.`)) return;
        try { await call('DELETE', base); location.hash = '#/devices'; } catch (e) { info.append(errorBox(e)); }
      } }, 'Delete'), 'operator'));
    info.replaceChildren(
      h('h2', {}, 'Device'),
      h('dl', { class: 'kv' },
        h('dt', {}, 'Name'), h('dd', {}, d.name),
        h('dt', {}, 'Status'), h('dd', {}, d.status),
        h('dt', {}, 'Connection'), h('dd', { id: 'connection' }, h('span', { class: 'dot' + (c.online ? ' on' : ''), 'aria-hidden': 'true' }), c.online ? `online (${c.protocol || '?'}, ${c.remote_addr || '?'})` : 'offline'),
        h('dt', {}, 'Last seen'), h('dd', {}, when(c.last_seen)),
        h('dt', {}, 'Type'), h('dd', {}, d.type || '–'),
        h('dt', {}, 'Tags'), h('dd', {}, Object.entries(d.tags).map(([k, v]) => h('span', { class: 'tag' }, `${k}=${v}`)), Object.keys(d.tags).length ? null : '–'),
        h('dt', {}, 'Recent connectivity'), h('dd', {}, conn && conn.events && conn.events.length
          ? h('ul', {}, conn.events.slice(0, 5).map(ev => h('li', {}, `${when(ev.at)} ${ev.event}${ev.reason ? ' (' + ev.reason + ')' : ''}`)))
          : 'no events')),
      actions, h('div', { id: 'credential-out', role: 'status' }));
  };

  const resetPassword = async d => {
    const out = document.getElementById('credential-out');
    try {
      const { body } = await call('POST', base + '/credentials', { body: { kind: 'password' } });
      const host = location.hostname || 'localhost';
      const cmd = `mosquitto_pub -h ${host} -p 1883 -u ${t}/${d.id} -P '${body.secret}' -i ${d.id} -q 1 -t devices/${d.id}/telemetry -m '{"temp": 21.5}'`;
      out.replaceChildren(h('p', {}, 'New password (shown only now; the device\'s older passwords stay valid until revoked):'),
        h('pre', { class: 'json' }, cmd));
      credentials.reload();
    } catch (e) { out.replaceChildren(errorBox(e)); }
  };

  // A certificate from the tenant's built-in CA with a generated key: the bundle is offered as
  // files (the key is in this answer only) with the matching mosquitto_pub line.
  const issueCertificate = async d => {
    const out = document.getElementById('credential-out');
    try {
      const { body } = await call('POST', base + '/credentials', { body: { kind: 'certificate' } });
      const file = (name, text) => {
        const url = URL.createObjectURL(new Blob([text], { type: 'application/x-pem-file' }));
        onCleanup(() => URL.revokeObjectURL(url));
        return h('a', { href: url, download: name, class: 'download' }, name);
      };
      const host = location.hostname || 'localhost';
      const cmd = `mosquitto_pub -h ${host} -p 8883 --cafile ca.pem --cert ${d.id}.pem --key ${d.id}.key -i ${d.id} -q 1 -t devices/${d.id}/telemetry -m '{"temp": 21.5}'`;
      out.replaceChildren(h('p', {}, 'New certificate (download the key now: it is not kept). Files: ',
        file(`${d.id}.pem`, body.certificate_pem), ' · ', file(`${d.id}.key`, body.private_key_pem), ' · ', file('ca.pem', body.ca_pem)),
      h('pre', { class: 'json' }, cmd));
      credentials.reload();
    } catch (e) { out.replaceChildren(errorBox(e)); }
  };

  loadInfo().catch(e => { if (e.name !== 'AbortError') info.replaceChildren(errorBox(e)); });
  renderTwin(twin, base, t, id, signal);
  renderTelemetry(charts, base, signal);
}

// A JSON Merge Patch (RFC 7396) that turns `from` into `to`: removed keys become null.
function mergeDiff(from, to) {
  const patch = {};
  for (const k of Object.keys(from)) if (!(k in to)) patch[k] = null;
  for (const [k, v] of Object.entries(to)) {
    const old = from[k];
    if (v && typeof v === 'object' && !Array.isArray(v) && old && typeof old === 'object' && !Array.isArray(old)) {
      const inner = mergeDiff(old, v);
      if (Object.keys(inner).length) patch[k] = inner;
    } else if (JSON.stringify(old) !== JSON.stringify(v)) patch[k] = v;
  }
  return patch;
}

function renderTwin(section, base, t, id, signal) {
  // `edited`: the desired state and document version the editor started from. The patch is
  // computed against it and sent with If-Match on that version.
  let edited = null;
  let dirty = false;
  const desired = h('textarea', { id: 'desired-editor', spellcheck: 'false', 'aria-describedby': 'desired-help desired-status', oninput: () => { dirty = true; validate(); } });
  const status = h('p', { id: 'desired-status', role: 'status', 'aria-live': 'polite' });
  const reported = h('pre', { class: 'json', id: 'twin-reported', tabindex: 0, 'aria-label': 'Reported state' });
  const delta = h('pre', { class: 'json', id: 'twin-delta', tabindex: 0, 'aria-label': 'Delta', 'aria-live': 'polite' });
  const acks = h('ul', { id: 'twin-acks', class: 'acks', 'aria-label': 'What the device did with each desired key' });
  const version = h('span', { class: 'notice', id: 'twin-version' });
  const save = h('button', { type: 'submit', id: 'desired-save' }, 'Save desired');
  const validate = () => {
    try {
      const v = JSON.parse(desired.value || '{}');
      if (!v || typeof v !== 'object' || Array.isArray(v)) throw new Error('desired must be a JSON object');
      // A live reload of the twin keeps "Saved" or a conflict on screen; it clears only what
      // validation itself wrote.
      if (dirty) { status.textContent = 'Unsaved changes.'; status.className = 'notice'; }
      else if (status.className === 'error' || status.textContent === 'Unsaved changes.') { status.textContent = ''; status.className = 'notice'; }
      save.disabled = !can('operator');
      return v;
    } catch (e) {
      status.textContent = 'Not valid JSON: ' + e.message;
      status.className = 'error';
      save.disabled = true;
      return null;
    }
  };
  const show = (d, replaceEditor) => {
    version.textContent = `version ${d.version}`;
    reported.textContent = json(d.reported);
    delta.textContent = Object.keys(d.delta || {}).length ? json(d.delta) : '{} — in sync';
    acks.replaceChildren(...Object.entries(d.acks || {}).map(([key, a]) =>
      h('li', { 'data-key': key, 'data-status': a.status }, h('span', { class: 'mono' }, key), `: ${a.status}`, a.reason ? ` — ${a.reason}` : '')));
    if (!acks.children.length) acks.append(h('li', { class: 'notice' }, 'No desired key set yet.'));
    if (replaceEditor || !dirty) {
      edited = { desired: d.desired || {}, version: d.version };
      desired.value = json(d.desired);
      dirty = false;
      validate();
    }
  };
  const load = replaceEditor => get(base + '/twins/default', { signal }).then(d => { show(d, replaceEditor); return d; });
  const sameJson = (a, b) => JSON.stringify(a ?? {}) === JSON.stringify(b ?? {});
  const form = h('form', {
    onsubmit: async e => {
      e.preventDefault();
      const next = validate();
      if (!next || !edited) return;
      const patch = mergeDiff(edited.desired, next);
      if (!Object.keys(patch).length) { status.textContent = 'Nothing changed.'; return; }
      save.disabled = true;
      // The version counts reported changes too, which a busy device makes every few seconds:
      // a 409 is a conflict only if desired itself moved on; otherwise retry on the new version.
      for (let attempt = 0; attempt < 5; attempt++) {
        try {
          const { body } = await call('PATCH', base + '/twins/default/desired', { body: patch, headers: { 'If-Match': `"${edited.version}"` } });
          dirty = false;
          show(body, true);
          status.textContent = `Saved (version ${body.version}).`;
          status.className = 'ok';
          return;
        } catch (err) {
          if (err.status === 409) {
            try {
              const fresh = await get(base + '/twins/default', { signal });
              if (sameJson(fresh.desired, edited.desired)) { edited.version = fresh.version; continue; }
            } catch (again) { err = again; }
            if (err.status === 409) {
              save.disabled = false;
              status.replaceChildren(h('span', { class: 'error' }, 'The twin changed since you loaded it. '),
                h('button', { type: 'button', class: 'secondary', onclick: () => load(true) }, 'Load the current twin'),
                ' (your edit is discarded; apply it again).');
              return;
            }
          }
          save.disabled = false;
          status.replaceChildren(errorBox(err));
          return;
        }
      }
      save.disabled = false;
      status.replaceChildren(errorBox(new Error('The twin keeps changing; try saving again.')));
    },
  },
  h('label', { for: 'desired-editor' }, 'Desired (JSON)'), gate(desired, 'operator'),
  h('small', { id: 'desired-help', class: 'notice' }, 'Saved as a merge patch against the version shown; a key you remove is deleted.'),
  h('div', { class: 'row' }, gate(save, 'operator'), version), status);
  section.replaceChildren(h('h2', { id: 'twin-title' }, 'Twin'),
    h('div', { class: 'grid3' },
      h('div', {}, form),
      h('div', {}, h('h3', {}, 'Reported'), reported),
      h('div', {}, h('h3', {}, 'Delta'), delta, h('h3', {}, 'Desired keys'), acks)));
  load(true).catch(e => { if (e.name !== 'AbortError') section.append(errorBox(e)); });
  // Live: every accepted change of this device's twins reloads the document.
  stream(path`/tenants/${t}/twins/watch?device=${id}`, () => {
    load(false).catch(() => {});
  }, { signal });
}

function renderCommand(base) {
  const name = h('input', { id: 'command-name', value: 'ping', required: true, pattern: '[A-Za-z0-9_.\\-]+' });
  const payload = h('textarea', { id: 'command-payload', spellcheck: 'false', class: 'mono' }, '{}');
  payload.style.minHeight = '4rem';
  const result = h('pre', { class: 'json', id: 'command-result', 'aria-live': 'polite', tabindex: 0 }, 'No command sent yet.');
  const send = gate(h('button', { type: 'submit', id: 'command-invoke' }, 'Invoke'), 'operator');
  gate(payload, 'operator');
  return h('section', { class: 'card', 'aria-labelledby': 'command-title' }, h('h2', { id: 'command-title' }, 'Command'),
    h('div', { class: 'grid2' },
      h('form', {
        onsubmit: async e => {
          e.preventDefault();
          let body;
          try { body = payload.value.trim() ? JSON.parse(payload.value) : {}; } catch (err) { result.textContent = 'The payload is not valid JSON: ' + err.message; return; }
          send.disabled = true;
          result.textContent = `Sending ${name.value}…`;
          try {
            const r = await call('POST', base + '/commands/' + encodeURIComponent(name.value.trim()) + '?timeout=10', { body: JSON.stringify(body) });
            result.textContent = `status ${r.body.status}\n` + json(r.body.payload);
          } catch (err) { result.textContent = errorText(err); }
          send.disabled = !can('operator');
        },
      }, h('label', { for: 'command-name' }, 'Name', name), h('label', { for: 'command-payload' }, 'Payload (JSON)', payload), h('div', { class: 'row' }, send)),
      h('div', {}, h('h3', {}, 'Response'), result)));
}

const RANGES = [
  { label: '15 min', ms: 9e5, bucket: '5s' },
  { label: '1 h', ms: 36e5, bucket: '1m' },
  { label: '6 h', ms: 216e5, bucket: '5m' },
  { label: '24 h', ms: 864e5, bucket: '15m' },
  { label: '7 d', ms: 6048e5, bucket: '1h' },
  { label: '30 d', ms: 2592e6, bucket: '6h' },
];

function renderTelemetry(section, base, signal) {
  get(base + '/telemetry', { signal }).then(series => {
    const numeric = series.filter(s => typeof s.latest === 'number');
    if (!numeric.length) { section.replaceChildren(h('h2', { id: 'telemetry-title' }, 'Telemetry'), h('p', { class: 'notice' }, 'No numeric telemetry from this device yet.')); return; }
    section.replaceChildren(h('h2', { id: 'telemetry-title' }, 'Telemetry'), ...numeric.map(s => metricChart(base, s.metric, signal)));
  }).catch(e => { if (e.name !== 'AbortError') section.append(errorBox(e)); });
}

function metricChart(base, metric, signal) {
  let range = RANGES[0];
  let zoom = null;
  const box = h('div', { class: 'chart', 'data-metric': metric });
  const latest = h('span', { class: 'notice', 'data-latest': metric });
  const chart = new LineChart(box, { label: `${metric} over time`, onZoom: v => { zoom = v; load(); } });
  onCleanup(() => chart.destroy());
  const buttons = RANGES.map(r => h('button', { type: 'button', 'aria-pressed': String(r === range), onclick: () => { range = r; zoom = null; chart.view = null; buttons.forEach((b, i) => b.setAttribute('aria-pressed', String(RANGES[i] === r))); load(); } }, r.label));
  const load = async () => {
    const to = Date.now();
    const [from, end] = zoom ? zoom.map(Math.round) : [to - range.ms, to];
    // Zoomed in, a finer bucket keeps about the same number of points.
    const bucket = zoom ? Math.max(1000, Math.round((end - from) / 120)) : range.bucket;
    try {
      const agg = await get(`${base}/telemetry/${encodeURIComponent(metric)}/aggregate?bucket=${bucket}&from=${from}&to=${end}&fn=avg,min,max`, { signal });
      const points = agg.buckets.map(b => ({ t: b.start, v: b.avg, min: b.min, max: b.max }));
      chart.setData(points, zoom ? chart.range : [to - range.ms, to]);
      const last = points[points.length - 1];
      latest.textContent = last ? `latest ${fmtValue(last.v)} at ${new Date(last.t).toLocaleTimeString()}` : 'no points in range';
      box.dataset.points = String(points.length);
      box.dataset.updated = String(Date.now());
    } catch (e) { if (e.name !== 'AbortError') latest.textContent = errorText(e); }
  };
  load();
  const timer = setInterval(() => { if (!zoom && range.ms <= 216e5) load(); }, 5000);
  onCleanup(() => clearInterval(timer));
  return h('div', { class: 'metric' },
    h('div', { class: 'chart-head' }, h('h3', {}, metric), latest, h('div', { class: 'ranges', role: 'group', 'aria-label': `Time range of ${metric}` }, buttons)),
    box, h('small', { class: 'notice' }, 'Drag to zoom in; double-click or Escape to zoom out.'));
}

route();
