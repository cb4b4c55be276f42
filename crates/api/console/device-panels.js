// Device page panels: the live tail of the device's MQTT messages and its credentials.

import { call, get, stream } from './api.js';
import { gate, can } from './role.js';

const KEEP = 200;

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

function errorText(e) { return e && e.code ? `${e.message} (${e.code})` : String((e && e.message) || e); }
function when(ms) { return ms ? new Date(ms).toLocaleString() : '–'; }
function size(n) { return n < 1024 ? `${n} B` : `${(n / 1024).toFixed(1)} KiB`; }

// "Recent messages": what the device publishes (↑ in) and what is delivered to it (↓ out), live,
// newest first, the last 200 kept. Pausing keeps receiving (and counting) without redrawing.
export function renderTail(section, url, signal) {
  let items = [];         // newest last; at most KEEP
  let pending = [];       // arrived since the last draw
  let paused = false;
  let received = 0, skipped = 0, newWhilePaused = 0;
  let drawQueued = false;
  const list = h('ol', { class: 'tail', id: 'tail-list', 'aria-label': 'Recent messages, newest first', tabindex: 0 });
  const state = h('span', { class: 'notice', id: 'tail-state', role: 'status' }, 'Connecting…');
  const counts = h('span', { class: 'notice mono', id: 'tail-counts' }, '0 received · 0 skipped');
  const pause = h('button', { type: 'button', class: 'secondary', id: 'tail-pause', 'aria-pressed': 'false', onclick: () => {
    paused = !paused;
    pause.setAttribute('aria-pressed', String(paused));
    pause.textContent = paused ? 'Resume' : 'Pause';
    if (!paused) { newWhilePaused = 0; draw(); }
    showCounts();
  } }, 'Pause');
  const clear = h('button', { type: 'button', class: 'secondary', id: 'tail-clear', onclick: () => {
    items = []; pending = []; newWhilePaused = 0;
    list.replaceChildren(empty());
    showCounts();
  } }, 'Clear');
  const empty = () => h('li', { class: 'notice tail-empty' }, 'No message yet: what the device publishes and what it is sent shows here.');
  list.append(empty());

  const showCounts = () => {
    counts.textContent = `${received.toLocaleString()} received · ${skipped.toLocaleString()} skipped` + (paused ? ` · paused, ${newWhilePaused} new` : '');
  };
  const row = m => {
    const shown = m.payload.length > 400 ? m.payload.slice(0, 400) + '…' : m.payload;
    return h('li', { 'data-direction': m.direction, 'data-topic': m.topic },
      h('span', { class: 'tail-dir', title: m.direction === 'in' ? 'published by the device' : 'delivered to the device' }, m.direction === 'in' ? '↑ in' : '↓ out'),
      h('time', { datetime: new Date(m.at).toISOString() }, new Date(m.at).toLocaleTimeString()),
      h('span', { class: 'mono tail-topic' }, m.topic),
      h('span', { class: 'notice' }, `QoS ${m.qos}${m.retain ? ' · retained' : ''} · ${size(m.size)}${m.truncated ? ' (cut)' : ''}`),
      h('code', { class: 'tail-payload' + (m.base64 ? ' binary' : '') }, m.base64 ? `base64 ${shown}` : shown));
  };
  // Drawn once per frame: a flood costs one redraw per frame, not one per message.
  const draw = () => {
    drawQueued = false;
    if (paused || !pending.length) return;
    const fresh = pending.splice(0);
    if (!items.length) list.replaceChildren();
    items.push(...fresh);
    const frag = document.createDocumentFragment();
    for (const m of fresh.slice(-KEEP).reverse()) frag.append(row(m));
    list.prepend(frag);
    if (items.length > KEEP) items = items.slice(-KEEP);
    while (list.children.length > KEEP) list.lastElementChild.remove();
  };
  section.replaceChildren(
    h('div', { class: 'chart-head' }, h('h2', { id: 'tail-title' }, 'Recent messages'), state,
      h('div', { class: 'row' }, pause, clear, counts)),
    list);
  stream(url, (name, data) => {
    if (name === 'ready') { state.textContent = 'Live'; return; }
    if (name !== 'message') return;
    const m = JSON.parse(data);
    received += 1;
    skipped += m.skipped || 0;
    pending.push(m);
    if (pending.length > KEEP) pending.splice(0, pending.length - KEEP);
    if (paused) newWhilePaused += 1;
    showCounts();
    if (!drawQueued && !paused) { drawQueued = true; requestAnimationFrame(draw); }
  }, {
    signal,
    onState: (s, e) => {
      if (s === 'error') state.textContent = e && e.status === 429 ? 'Too many live tails are open in this hub; retrying…' : errorText(e);
      else if (s === 'reconnecting') state.textContent = 'Reconnecting…';
    },
  });
}

// The device's credentials with a Revoke button on the active ones. Returns reload().
export function renderCredentials(section, base, signal, onChange = () => {}) {
  const body = h('tbody', {}, h('tr', {}, h('td', { colspan: 8, class: 'loading' }, 'Loading credentials…')));
  const status = h('p', { role: 'status', id: 'credentials-status' });
  section.replaceChildren(h('h2', { id: 'credentials-title' }, 'Credentials'),
    h('div', { class: 'table-wrap short' }, h('table', { id: 'credentials' },
      h('caption', { class: 'visually-hidden' }, 'Credentials of the device'),
      h('thead', {}, h('tr', {}, ...['Kind', 'Id', 'Label', 'Created', 'Expires', 'Fingerprint', 'Status', ''].map(c => h('th', { scope: 'col' }, c)))),
      body)),
    status);
  const revoke = async c => {
    if (!confirm(`Revoke the ${c.kind} credential ${c.id}? The device's connections using it are closed.`)) return;
    try {
      await call('DELETE', `${base}/credentials/${encodeURIComponent(c.id)}`);
      status.textContent = `Revoked ${c.id}.`;
      status.className = 'ok';
      onChange();
      await reload();
    } catch (e) { status.textContent = errorText(e); status.className = 'error'; }
  };
  const reload = async () => {
    try {
      const list = await get(base + '/credentials', { signal });
      const now = Date.now();
      if (!list.length) {
        body.replaceChildren(h('tr', {}, h('td', { colspan: 8, class: 'notice' }, 'No credential yet: add a password or a certificate above.')));
        return;
      }
      list.sort((a, b) => b.created_at - a.created_at);
      body.replaceChildren(...list.map(c => {
        const state = c.revoked_at ? 'revoked' : (c.expires_at && c.expires_at <= now ? 'expired' : 'active');
        const button = state === 'active'
          ? gate(h('button', { type: 'button', class: 'secondary', 'data-revoke': c.id, onclick: () => revoke(c) }, 'Revoke'), 'operator')
          : '';
        return h('tr', { 'data-credential': c.id, 'data-state': state },
          h('td', {}, c.kind), h('td', { class: 'mono' }, c.id), h('td', {}, c.label || '–'),
          h('td', {}, when(c.created_at)), h('td', {}, when(c.expires_at)),
          h('td', { class: 'mono', title: c.fingerprint || '' }, c.fingerprint ? c.fingerprint.slice(0, 16) + '…' : '–'),
          h('td', {}, state + (c.revoked_at ? ` ${when(c.revoked_at)}` : '')), h('td', {}, button));
      }));
    } catch (e) {
      if (e.name !== 'AbortError') body.replaceChildren(h('tr', {}, h('td', { colspan: 8, class: 'error' }, errorText(e))));
    }
  };
  reload();
  return { reload, canEdit: can('operator') };
}
