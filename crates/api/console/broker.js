// The console's Broker page (#/broker/…): the tenant's MQTT sessions (detail, kick, discard),
// subscriptions, retained messages (viewer, delete) and the hub's $SYS figures; and the
// overview's per-tenant broker section. app.js routes here and lends its DOM helpers (`ui`).

import { call, get, path, session } from './api.js';

const PAGE_SIZE = 50;
const SYS_REFRESH_MS = 3000;
const TABS = [['sessions', 'Sessions'], ['subscriptions', 'Subscriptions'], ['retained', 'Retained'], ['sys', '$SYS']];

const num = v => (v === undefined || v === null ? '–' : Number(v).toLocaleString(undefined, { maximumFractionDigits: 1 }));
const enc = encodeURIComponent;

// #/broker[/tab[/item]]?…: parts are already decoded by app.js.
export function renderBroker(ui, parts, query) {
  const tab = parts[1] || 'sessions';
  if (tab === 'sessions' && parts[2]) return renderSession(ui, parts[2]);
  if (tab === 'retained' && parts[2]) return renderRetainedMessage(ui, parts[2]);
  if (tab === 'subscriptions') return renderSubscriptions(ui, query);
  if (tab === 'retained') return renderRetained(ui, query);
  if (tab === 'sys') return renderSys(ui);
  return renderSessions(ui, query);
}

function tabs(ui, current) {
  const { h } = ui;
  return h('nav', { class: 'tabs', 'aria-label': 'Broker sections' },
    TABS.map(([id, label]) => h('a', { href: '#/broker/' + id, 'aria-current': id === current ? 'page' : null }, label)));
}

function page(ui, title, current, ...children) {
  const { h, setView } = ui;
  setView(title, h('h1', {}, `Broker — ${session.tenant}`), tabs(ui, current), ...children);
}

// A searchable, paged table. The cursor trail lives in the URL (`after`, and `back`: the earlier
// cursors as JSON), so pages can be bookmarked and Previous works.
function pagedTable(ui, { tab, query, columns, search, load, row, empty, caption }) {
  const { h, announce, errorBox } = ui;
  const q = Object.fromEntries(query);
  const back = (() => { try { return JSON.parse(q.back || '[]'); } catch { return []; } })();
  const go = changes => {
    const next = { ...q, ...changes };
    location.hash = `#/broker/${tab}?` + new URLSearchParams(Object.entries(next).filter(([, v]) => v));
  };
  const input = h('input', { id: search.id, type: 'search', value: q.q ?? search.default ?? '', placeholder: search.placeholder, autocomplete: 'off' });
  const form = h('form', {
    class: 'filters', role: 'search',
    onsubmit: e => { e.preventDefault(); go({ q: input.value.trim(), after: '', back: '' }); },
  }, h('label', { for: search.id }, search.label, input), h('button', { type: 'submit' }, 'Search'));
  const tbody = h('tbody', {}, h('tr', {}, h('td', { colspan: columns.length, class: 'loading' }, 'Loading…')));
  const table = h('table', {}, h('caption', { class: 'visually-hidden' }, caption),
    h('thead', {}, h('tr', {}, columns.map(c => h('th', { scope: 'col' }, c)))), tbody);
  const pager = h('nav', { class: 'pager', 'aria-label': 'Pages' });
  // Started once the view is in place: setView stops what the previous view registered.
  const start = () => {
    const ctrl = new AbortController();
    ui.onCleanup(() => ctrl.abort());
    load(q.q ?? search.default ?? '', q.after, ctrl.signal).then(p => {
      tbody.replaceChildren(...(p.items.length ? p.items.map(row)
        : [h('tr', {}, h('td', { colspan: columns.length, class: 'notice' }, q.q ? empty.filtered : empty.none))]));
      const prev = h('button', { type: 'button', class: 'secondary', disabled: !q.after, onclick: () => { const b = [...back]; const a = b.pop() || ''; go({ after: a, back: b.length ? JSON.stringify(b) : '' }); } }, '← Previous');
      const next = h('button', { type: 'button', class: 'secondary', disabled: !p.next, onclick: () => go({ after: p.next, back: JSON.stringify([...back, q.after || '']) }) }, 'Next →');
      pager.replaceChildren(prev, h('span', { class: 'notice' }, `Page ${back.length + 1} · ${p.items.length} shown`), next);
      announce(`${p.items.length} ${caption.toLowerCase()} shown`);
    }).catch(e => {
      if (e.name === 'AbortError') return;
      tbody.replaceChildren(h('tr', {}, h('td', { colspan: columns.length }, errorBox(e))));
    });
  };
  return { parts: [form, h('div', { class: 'table-wrap' }, table), pager], start };
}

function listQuery(params, after) {
  const q = new URLSearchParams({ limit: PAGE_SIZE });
  for (const [k, v] of Object.entries(params)) if (v) q.set(k, v);
  if (after) q.set('after', after);
  return '?' + q;
}

function deviceLink(ui, id) {
  return id ? ui.h('a', { href: '#/devices/' + enc(id) }, id) : '–';
}

function stateCell(ui, connected) {
  const { h } = ui;
  return h('td', {}, h('span', { class: 'dot' + (connected ? ' on' : ''), 'aria-hidden': 'true' }), connected ? 'connected' : 'offline');
}

// ---- sessions ----------------------------------------------------------------------------------

function renderSessions(ui, query) {
  const { h, when } = ui;
  const t = session.tenant;
  const table = pagedTable(ui, {
    tab: 'sessions', query, caption: 'Sessions',
    search: { id: 'session-search', label: 'Client id starts with', placeholder: 'demo-0' },
    columns: ['Client id', 'Device', 'State', 'Protocol', 'Remote address', 'Since', 'Subs', 'Queued', 'In flight', 'Msgs in', 'Msgs out'],
    empty: { none: 'No MQTT sessions in this tenant: no client is connected and no persistent session is kept.', filtered: 'No session has a client id starting with that.' },
    load: (prefix, after, signal) => get(path`/tenants/${t}/broker/sessions` + listQuery({ prefix }, after), { signal }),
    row: s => h('tr', {},
      h('td', {}, h('a', { href: '#/broker/sessions/' + enc(s.client_id) }, s.client_id)),
      h('td', {}, deviceLink(ui, s.device_id)),
      stateCell(ui, s.connected),
      h('td', {}, s.protocol ? `MQTT ${s.protocol} / ${s.transport}` : '–'),
      h('td', { class: 'mono' }, s.remote_address || '–'),
      h('td', {}, when(s.connected ? s.connected_at : s.disconnected_at)),
      h('td', {}, num(s.subscriptions)), h('td', {}, num(s.queued)), h('td', {}, num(s.inflight)),
      h('td', {}, num(s.messages_in)), h('td', {}, num(s.messages_out))),
  });
  page(ui, 'Broker sessions', 'sessions', ...table.parts);
  table.start();
}

function subscriptionOptions(s) {
  const o = [];
  if (s.no_local) o.push('no local');
  if (s.retain_as_published) o.push('retain as published');
  if (s.retain_handling) o.push(`retain handling ${s.retain_handling}`);
  if (s.subscription_id !== undefined) o.push(`id ${s.subscription_id}`);
  return o.join(', ') || '–';
}

function renderSession(ui, clientId) {
  const { h, when, errorBox, announce } = ui;
  const t = session.tenant;
  const facts = h('div', { class: 'card', 'aria-live': 'polite' }, h('p', { class: 'loading' }, 'Loading the session…'));
  const subs = h('tbody', {});
  const out = h('p', { id: 'session-action', role: 'status' });
  const kick = h('button', { type: 'button', id: 'session-kick', disabled: true }, 'Kick');
  const discard = h('button', { type: 'button', id: 'session-discard', class: 'secondary', disabled: true }, 'Discard session');
  page(ui, `Session ${clientId}`, 'sessions',
    h('p', {}, h('a', { href: '#/broker/sessions' }, '← All sessions')),
    h('h2', {}, `Session ${clientId}`),
    facts,
    h('div', { class: 'row' }, kick, discard),
    out,
    h('section', { class: 'card', 'aria-labelledby': 'subs-title' },
      h('h2', { id: 'subs-title' }, 'Subscriptions'),
      h('div', { class: 'table-wrap short' }, h('table', {}, h('caption', { class: 'visually-hidden' }, 'Subscriptions of the session'),
        h('thead', {}, h('tr', {}, ['Filter', 'QoS', 'Share group', 'Options'].map(c => h('th', { scope: 'col' }, c)))), subs))));
  const url = path`/tenants/${t}/broker/sessions/${clientId}`;
  const load = () => get(url).then(s => {
    const dl = h('dl', { class: 'kv' });
    const kv = (k, v) => dl.append(h('dt', {}, k), h('dd', {}, v));
    kv('State', h('span', {}, h('span', { class: 'dot' + (s.connected ? ' on' : ''), 'aria-hidden': 'true' }), s.connected ? 'connected' : 'offline'));
    kv('Device', deviceLink(ui, s.device_id));
    kv('Protocol', s.protocol ? `MQTT ${s.protocol} over ${s.transport}` : 'not connected since the hub started');
    kv('Remote address', s.remote_address || '–');
    kv(s.connected ? 'Connected since' : 'Disconnected at', when(s.connected ? s.connected_at : s.disconnected_at));
    kv('Keep-alive', s.keep_alive_secs === undefined ? '–' : s.keep_alive_secs ? `${s.keep_alive_secs} s` : 'none');
    kv('Clean start', s.clean_start === undefined ? '–' : s.clean_start ? 'yes' : 'no');
    kv('Session expiry', s.session_expiry_secs ? `${s.session_expiry_secs.toLocaleString()} s` : 'ends with the connection');
    kv('Queued / in flight', `${num(s.queued)} / ${num(s.inflight)}`);
    kv('Messages in / out', `${num(s.messages_in)} / ${num(s.messages_out)}`);
    facts.replaceChildren(dl);
    subs.replaceChildren(...(s.subscription_list.length ? s.subscription_list.map(x => h('tr', {},
      h('td', { class: 'mono' }, x.filter), h('td', {}, x.qos), h('td', {}, x.share_group || '–'), h('td', {}, subscriptionOptions(x))))
      : [h('tr', {}, h('td', { colspan: 4, class: 'notice' }, 'No subscriptions.'))]));
    kick.disabled = !s.connected;
    discard.disabled = false;
  }).catch(e => {
    facts.replaceChildren(errorBox(e));
    subs.replaceChildren();
    kick.disabled = discard.disabled = true;
  });
  const act = async (what, discardIt) => {
    const question = discardIt
      ? `Discard the session of ${clientId}? It is disconnected, and its subscriptions and queued messages are deleted.`
      : `Kick ${clientId}? It is disconnected; its session is kept and it may reconnect.`;
    if (!confirm(question)) return;
    kick.disabled = discard.disabled = true;
    out.replaceChildren(h('span', { class: 'loading' }, `${what}…`));
    try {
      await call('DELETE', url + (discardIt ? '?discard=true' : ''));
      out.replaceChildren(h('span', { class: 'ok' }, discardIt ? 'Session discarded.' : 'Client kicked.'));
      announce(discardIt ? 'Session discarded' : 'Client kicked');
      if (discardIt) { facts.replaceChildren(h('p', { class: 'notice' }, 'This session no longer exists.')); subs.replaceChildren(); return; }
    } catch (e) {
      out.replaceChildren(errorBox(e));
    }
    load();
  };
  kick.addEventListener('click', () => act('Kicking', false));
  discard.addEventListener('click', () => act('Discarding', true));
  load();
}

// ---- subscriptions -----------------------------------------------------------------------------

function renderSubscriptions(ui, query) {
  const { h } = ui;
  const t = session.tenant;
  const table = pagedTable(ui, {
    tab: 'subscriptions', query, caption: 'Subscriptions',
    search: { id: 'subscription-search', label: 'Filter starts with', placeholder: 'devices/' },
    columns: ['Filter', 'Client id', 'QoS', 'Share group', 'Options'],
    empty: { none: 'No subscriptions in this tenant.', filtered: 'No subscription filter starts with that.' },
    load: (prefix, after, signal) => get(path`/tenants/${t}/broker/subscriptions` + listQuery({ filter_prefix: prefix }, after), { signal }),
    row: s => h('tr', {},
      h('td', { class: 'mono' }, s.filter),
      h('td', {}, h('a', { href: '#/broker/sessions/' + enc(s.client_id) }, s.client_id)),
      h('td', {}, s.qos), h('td', {}, s.share_group || '–'), h('td', {}, subscriptionOptions(s))),
  });
  page(ui, 'Broker subscriptions', 'subscriptions', ...table.parts);
  table.start();
}

// ---- retained messages -------------------------------------------------------------------------

function renderRetained(ui, query) {
  const { h, when } = ui;
  const t = session.tenant;
  const table = pagedTable(ui, {
    tab: 'retained', query, caption: 'Retained messages',
    search: { id: 'retained-filter', label: 'Topic filter', placeholder: '#  ($SYS/# for $SYS)', default: '#' },
    columns: ['Topic', 'Size', 'QoS', 'Content type', 'Stored', 'Payload'],
    empty: { none: 'No retained messages match.', filtered: 'No retained message matches that topic filter.' },
    load: (filter, after, signal) => get(path`/tenants/${t}/broker/retained` + listQuery({ filter: filter || '#' }, after), { signal }),
    row: m => h('tr', {},
      h('td', {}, h('a', { href: '#/broker/retained/' + enc(m.topic), class: 'mono' }, m.topic)),
      h('td', {}, `${num(m.payload_size)} B`), h('td', {}, m.qos), h('td', {}, m.content_type || '–'),
      h('td', {}, when(m.stored_at)),
      h('td', { class: 'mono preview', title: m.payload_encoding === 'base64' ? 'base64' : null },
        (m.payload_encoding === 'base64' ? '[base64] ' : '') + m.payload + (m.truncated ? '…' : ''))),
  });
  page(ui, 'Retained messages', 'retained', ...table.parts);
  table.start();
}

function renderRetainedMessage(ui, topic) {
  const { h, when, errorBox, announce } = ui;
  const t = session.tenant;
  const body = h('div', { class: 'card', 'aria-live': 'polite' }, h('p', { class: 'loading' }, 'Loading the message…'));
  const out = h('p', { id: 'retained-action', role: 'status' });
  const del = h('button', { type: 'button', id: 'retained-delete', disabled: true }, 'Delete');
  page(ui, `Retained ${topic}`, 'retained',
    h('p', {}, h('a', { href: '#/broker/retained' }, '← All retained messages')),
    h('h2', { class: 'mono' }, topic), body, h('div', { class: 'row' }, del), out);
  const url = path`/tenants/${t}/broker/retained/${topic}`;
  get(url).then(m => {
    const dl = h('dl', { class: 'kv' });
    const kv = (k, v) => dl.append(h('dt', {}, k), h('dd', {}, v));
    kv('Size', `${num(m.payload_size)} bytes`);
    kv('QoS', m.qos);
    kv('Stored', when(m.stored_at));
    if (m.content_type) kv('Content type', m.content_type);
    if (m.payload_format_utf8) kv('Payload format', 'UTF-8 (declared)');
    if (m.response_topic) kv('Response topic', m.response_topic);
    if (m.expires_at) kv('Expires', when(m.expires_at));
    for (const [k, v] of m.user_properties) kv(`Property ${k}`, v);
    let text = m.payload;
    if (m.payload_encoding === 'utf8') { try { text = JSON.stringify(JSON.parse(m.payload), null, 2); } catch { /* not JSON: as is */ } }
    body.replaceChildren(dl,
      h('h3', {}, m.payload_encoding === 'base64' ? 'Payload (binary, base64)' : 'Payload'),
      h('pre', { class: 'json', id: 'retained-payload', tabindex: 0 }, text));
    del.disabled = false;
  }).catch(e => body.replaceChildren(errorBox(e)));
  del.addEventListener('click', async () => {
    if (!confirm(`Delete the retained message of ${topic}? New subscribers will no longer receive it.`)) return;
    del.disabled = true;
    try {
      await call('DELETE', url);
      out.replaceChildren(h('span', { class: 'ok' }, 'Deleted.'));
      announce('Retained message deleted');
      body.replaceChildren(h('p', { class: 'notice' }, 'No message is retained on this topic any more.'));
    } catch (e) {
      out.replaceChildren(errorBox(e));
      del.disabled = false;
    }
  });
}

// ---- $SYS --------------------------------------------------------------------------------------

const SYS_FIELDS = [
  ['version', 'Version', v => v], ['uptime_secs', 'Uptime', v => duration(v)],
  ['clients_connected', 'Clients connected'], ['clients_total', 'Sessions'], ['clients_persistent', 'Persistent sessions'],
  ['clients_maximum', 'Connection limit'], ['connections_total', 'Connections accepted'], ['connections_refused', 'Connections refused'],
  ['messages_received', 'Messages received'], ['messages_sent', 'Messages sent'], ['messages_dropped', 'Messages dropped'],
  ['messages_inflight', 'In flight'], ['messages_queued', 'Queued'], ['retained_count', 'Retained messages'],
  ['subscription_count', 'Subscriptions'], ['bytes_received', 'Bytes received', v => bytes(v)], ['bytes_sent', 'Bytes sent', v => bytes(v)],
];

function duration(s) {
  const d = Math.floor(s / 86400), hh = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return d ? `${d} d ${hh} h` : hh ? `${hh} h ${m} min` : `${m} min ${s % 60} s`;
}

function bytes(v) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v.toLocaleString(undefined, { maximumFractionDigits: 1 })} ${units[i]}`;
}

function renderSys(ui) {
  const { h, errorBox } = ui;
  const state = h('p', { class: 'notice', role: 'status' }, 'Loading…');
  const cells = {};
  const grid = h('div', { class: 'stats', 'aria-live': 'polite' }, SYS_FIELDS.map(([id, label]) => {
    cells[id] = h('div', { class: 'value', id: 'sys-' + id, 'aria-labelledby': `sys-${id}-label` }, '–');
    return h('div', { class: 'stat' }, h('div', { class: 'label', id: `sys-${id}-label` }, label), cells[id]);
  }));
  page(ui, 'Broker $SYS', 'sys', h('p', { class: 'notice' }, 'The whole hub (every tenant), as published on $SYS/broker/… in the default tenant. Refreshed every 3 s.'), grid, state);
  const ctrl = new AbortController();
  let timer;
  ui.onCleanup(() => { ctrl.abort(); clearTimeout(timer); });
  const refresh = async () => {
    try {
      const f = await get('/broker/sys', { signal: ctrl.signal });
      for (const [id, , fmt] of SYS_FIELDS) cells[id].textContent = (fmt || num)(f[id]);
      state.textContent = `Updated ${new Date().toLocaleTimeString()}`;
    } catch (e) {
      if (e.name === 'AbortError') return;
      state.replaceChildren(errorBox(e));
      if (e.status === 403) return; // a tenant token never gets them: no point asking again
    }
    timer = setTimeout(refresh, SYS_REFRESH_MS);
  };
  refresh();
}

// ---- the overview's broker section --------------------------------------------------------------

// The tenant's broker figures on the overview: rates, connections by protocol, top talkers. Hidden
// until the overview stream carries them; `update(o.broker)` on every event.
export function tenantBrokerSection(ui) {
  const { h } = ui;
  const stat = (label, id) => h('div', { class: 'stat' }, h('div', { class: 'label', id: id + '-label' }, label), h('div', { class: 'value', id, 'aria-labelledby': id + '-label' }, '–'));
  const conns = h('tbody', {});
  const talkers = h('ol', { id: 'top-talkers', class: 'talkers' });
  const el = h('section', { 'aria-labelledby': 'tenant-broker-title', hidden: true },
    h('h2', { id: 'tenant-broker-title' }, 'MQTT in this tenant'),
    h('div', { class: 'stats' }, stat('Messages in / s', 'stat-tenant-in'), stat('Messages out / s', 'stat-tenant-out'), stat('Connected clients', 'stat-tenant-connected')),
    h('div', { class: 'grid2' },
      h('div', { class: 'card' }, h('h3', {}, 'Connections by protocol'),
        h('table', {}, h('caption', { class: 'visually-hidden' }, 'Connections by protocol and transport'),
          h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Protocol'), h('th', { scope: 'col' }, 'Transport'), h('th', { scope: 'col' }, 'Clients'))), conns)),
      h('div', { class: 'card' }, h('h3', {}, 'Top talkers (messages in)'), talkers)));
  const update = b => {
    if (!b) return;
    el.hidden = false;
    el.querySelector('#stat-tenant-in').textContent = num(b.messages_in_per_sec);
    el.querySelector('#stat-tenant-out').textContent = num(b.messages_out_per_sec);
    el.querySelector('#stat-tenant-connected').textContent = num(b.connected);
    conns.replaceChildren(...(b.connections.length ? b.connections.map(c => h('tr', {}, h('td', {}, `MQTT ${c.protocol}`), h('td', {}, c.transport), h('td', {}, num(c.count))))
      : [h('tr', {}, h('td', { colspan: 3, class: 'notice' }, 'No client is connected.'))]));
    talkers.replaceChildren(...(b.top_talkers.length ? b.top_talkers.map(x => h('li', {},
      x.device_id ? h('a', { href: '#/devices/' + enc(x.device_id) }, x.client_id) : h('a', { href: '#/broker/sessions/' + enc(x.client_id) }, x.client_id),
      ` — ${num(x.messages_in_per_sec)}/s`))
      : [h('li', { class: 'notice' }, 'Nobody published in the last interval.')]));
  };
  return { el, update };
}
