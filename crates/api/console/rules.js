// The console's Rules pages: the list with live counters (#/rules), the editor for a new rule
// (#/rules?create) and a rule's page (#/rules/{id}: editor, try it, replay, stats, dead letters),
// over /api/v1/tenants/{t}/rules (docs/rules.md). app.js owns routing and cleanup and hands its
// helpers in `ctx`, so this module shares no state with the other pages.

import { ApiError, call, get, path, session } from './api.js';
import { confirmDialog } from './confirm.js';

const REFRESH_MS = 3000;
const VALIDATE_DEBOUNCE_MS = 400;
const DEFAULT_SAMPLE = { topic: 'devices/demo-01/telemetry', payload: { temperature: 31.5, humidity: 40 } };
const NEW_SQL = "SELECT temperature, topic(2) AS device\nFROM 'devices/+/telemetry'\nWHERE temperature > 30";

// A valid skeleton per action type (docs/rules.md, "Actions"); `error` is the error action's.
const TEMPLATES = {
  republish: { type: 'republish', topic: 'alerts/${topic(2)}', qos: 0 },
  webhook: { type: 'webhook', url: 'https://example.com/hooks/${topic(2)}', method: 'POST', headers: { 'x-device': '${topic(2)}' }, max_attempts: 3, timeout_ms: 5000 },
  store_telemetry: { type: 'store_telemetry', device: '${topic(2)}', metrics: { derived: 'temperature * 9 / 5 + 32' } },
  update_twin: { type: 'update_twin', device: '${topic(2)}', section: 'reported', patch: '{"last_rule_hit": ${timestamp()}}' },
  command: { type: 'command', device: '${topic(2)}', name: 'ping', payload: '{"reason": "rule"}', queued: true },
  alarm: { type: 'alarm', key: 'rule:${topic(2)}', severity: 'major', message: '${topic(2)} matched the rule' },
  error: { type: 'republish', topic: 'rule-errors/${rule}', qos: 0 },
};
const TYPES = ['republish', 'webhook', 'store_telemetry', 'update_twin', 'command', 'alarm'];
const COUNTERS = [['matched', 'Matched'], ['passed', 'Passed'], ['failed', 'Failed'], ['dropped_queue_full', 'Dropped']];

// The token's role, from `GET /api/v1/me` when the hub has it; null (unknown) otherwise, and then
// every button shows and the API's 403 is explained where it happens.
let roleOf = { token: null, role: null };
function role() {
  if (roleOf.token !== session.token) {
    roleOf = { token: session.token, role: call('GET', '/me').then(r => r.body?.role ?? r.body?.token?.role ?? null).catch(() => null) };
  }
  return roleOf.role;
}

function forbidden(e) {
  return e instanceof ApiError && e.status === 403;
}

function problem(ctx, e, what) {
  if (forbidden(e)) return ctx.h('p', { class: 'error', role: 'alert' }, `Your token's role may not ${what} (the operator role is needed).`);
  return ctx.errorBox(e);
}

function summary(a) {
  if (!a || typeof a !== 'object') return '?';
  const target = a.topic || a.url || a.name || a.key || a.device || a.section || '';
  return target ? `${a.type} → ${target}` : a.type;
}

// replaceChildren without the nulls of conditional children (it would show them as "null").
function fill(el, ...children) { el.replaceChildren(...children.filter(c => c !== null && c !== undefined && c !== false)); }
function truncate(s, n) { return s.length > n ? s.slice(0, n - 1) + '…' : s; }
function num(v) { return v === undefined || v === null ? '–' : Number(v).toLocaleString(); }
function pretty(v) { return JSON.stringify(v, null, 2); }

export function renderRules(ctx, parts, query) {
  if (parts[0]) renderRule(ctx, parts[0]);
  else if (query.has('create')) renderCreate(ctx);
  else renderList(ctx);
}

// ---- list --------------------------------------------------------------------------------------

function renderList(ctx) {
  const { h, tenant: t } = ctx;
  const base = path`/tenants/${t}/rules`;
  const tbody = h('tbody', {}, h('tr', {}, h('td', { colspan: 9, class: 'loading' }, 'Loading rules…')));
  const status = h('p', { class: 'notice', role: 'status', id: 'rules-status' });
  const create = h('a', { href: '#/rules?create', class: 'button', id: 'rules-create' }, 'Create rule');
  const head = COUNTERS.map(([, label]) => h('th', { scope: 'col', class: 'num' }, label));
  const table = h('table', { class: 'rules-table' }, h('caption', { class: 'visually-hidden' }, 'Rules'),
    h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Id'), h('th', { scope: 'col' }, 'Enabled'), h('th', { scope: 'col', class: 'num' }, 'Version'),
      h('th', { scope: 'col' }, 'SQL'), h('th', { scope: 'col' }, 'Actions'), ...head)),
    tbody);
  ctx.setView('Rules', h('div', { class: 'page-head' }, h('h1', {}, `Rules — ${t}`), create), h('div', { class: 'table-wrap' }, table), status);

  const ctrl = new AbortController();
  ctx.onCleanup(() => ctrl.abort());
  const signal = ctrl.signal;
  const rows = new Map();

  const toggle = (rule, button, cell) => async () => {
    button.disabled = true;
    const verb = rule.enabled ? 'disable' : 'enable';
    try {
      const { body } = await call('POST', path`/tenants/${t}/rules/${rule.id}/${verb}`, { headers: { 'If-Match': `"${rule.version}"` } });
      Object.assign(rule, body);
      button.setAttribute('aria-checked', String(rule.enabled));
      button.textContent = rule.enabled ? 'On' : 'Off';
      cell.textContent = String(rule.version);
      ctx.announce(`Rule ${rule.id} ${rule.enabled ? 'enabled' : 'disabled'}`);
      status.textContent = '';
    } catch (e) {
      if (e instanceof ApiError && e.status === 409) { status.replaceChildren(ctx.h('span', { class: 'error' }, `Rule ${rule.id} was changed by someone else; the list was reloaded.`)); load(); }
      else status.replaceChildren(problem(ctx, e, `${verb} rules`));
    }
    button.disabled = false;
  };

  const load = async () => {
    const [rules, r] = await Promise.all([get(base, { signal }), role()]);
    const canWrite = r !== 'viewer';
    create.hidden = !canWrite;
    rows.clear();
    if (!rules.length) {
      tbody.replaceChildren(h('tr', {}, h('td', { colspan: 9, class: 'empty' },
        h('p', {}, 'No rules yet. A rule selects messages with SQL and acts on them: republish, webhook, store telemetry, update a twin, send a command, raise an alarm.'),
        canWrite ? h('a', { href: '#/rules?create', class: 'button' }, 'Create your first rule') : h('p', { class: 'notice' }, 'Your token may not create rules.'))));
      return;
    }
    tbody.replaceChildren(...rules.map(rule => {
      const version = h('td', { class: 'num' }, String(rule.version));
      const sw = h('button', { type: 'button', role: 'switch', class: 'switch', 'aria-checked': String(rule.enabled), 'aria-label': `Rule ${rule.id} enabled`, disabled: !canWrite }, rule.enabled ? 'On' : 'Off');
      sw.addEventListener('click', toggle(rule, sw, version));
      const counters = Object.fromEntries(COUNTERS.map(([k]) => [k, h('td', { class: 'num', 'data-counter': k }, '–')]));
      rows.set(rule.id, counters);
      return h('tr', { 'data-rule': rule.id },
        h('td', {}, h('a', { href: '#/rules/' + encodeURIComponent(rule.id) }, rule.id)),
        h('td', {}, sw),
        version,
        h('td', { class: 'sql-cell mono', title: rule.sql }, truncate(rule.sql.replace(/\s+/g, ' '), 80)),
        h('td', { class: 'actions-cell' }, rule.actions.length ? rule.actions.map(a => h('span', { class: 'tag' }, truncate(summary(a), 40))) : h('span', { class: 'notice' }, 'none')),
        ...COUNTERS.map(([k]) => counters[k]));
    }));
    ctx.announce(`${rules.length} rules`);
    refresh();
  };

  // Counters of every listed rule; a rule deleted meanwhile shows dashes until the next load.
  const refresh = async () => {
    await Promise.all([...rows].map(async ([id, cells]) => {
      try {
        const s = await get(path`/tenants/${t}/rules/${id}/stats`, { signal });
        for (const [k] of COUNTERS) cells[k].textContent = num(s[k]);
      } catch (e) { if (e.name !== 'AbortError') for (const [k] of COUNTERS) cells[k].textContent = '–'; }
    }));
  };
  load().catch(e => { if (e.name !== 'AbortError') tbody.replaceChildren(h('tr', {}, h('td', { colspan: 9 }, ctx.errorBox(e)))); });
  const timer = setInterval(() => { refresh(); }, REFRESH_MS);
  ctx.onCleanup(() => clearInterval(timer));
}

// ---- the editor (create and edit) --------------------------------------------------------------

// The SQL textarea with a line-number gutter, a band on the offending line and the caret position.
function sqlEditor(ctx, { readOnly, onChange }) {
  const { h } = ctx;
  const gutter = h('div', { class: 'sql-gutter', 'aria-hidden': 'true' });
  const band = h('div', { class: 'sql-band', hidden: true, 'aria-hidden': 'true' });
  const area = h('textarea', { id: 'rule-sql', class: 'sql-text', spellcheck: 'false', wrap: 'off', autocapitalize: 'off', autocomplete: 'off', readonly: readOnly, 'aria-describedby': 'rule-caret rule-validation' });
  const caret = h('span', { id: 'rule-caret', class: 'notice caret', 'aria-live': 'off' }, 'Ln 1, Col 1');
  let bad = 0;
  const lineHeight = () => parseFloat(getComputedStyle(area).lineHeight) || 18;
  const paint = () => {
    const n = area.value.split('\n').length;
    if (gutter.childElementCount !== n || gutter.dataset.bad !== String(bad)) {
      gutter.replaceChildren(...Array.from({ length: n }, (_, i) => h('span', { class: i + 1 === bad ? 'bad' : null }, String(i + 1))));
      gutter.dataset.bad = String(bad);
    }
    gutter.scrollTop = area.scrollTop;
    band.hidden = !bad;
    if (bad) band.style.top = `${(bad - 1) * lineHeight() - area.scrollTop + parseFloat(getComputedStyle(area).paddingTop)}px`;
  };
  const where = () => {
    const before = area.value.slice(0, area.selectionStart).split('\n');
    caret.textContent = `Ln ${before.length}, Col ${before[before.length - 1].length + 1}`;
  };
  area.addEventListener('input', () => { paint(); where(); onChange(); });
  area.addEventListener('scroll', paint);
  for (const ev of ['keyup', 'click', 'select', 'focus']) area.addEventListener(ev, where);
  return {
    area, caret,
    el: h('div', { class: 'sql-editor' }, gutter, h('div', { class: 'sql-wrap' }, band, area)),
    get value() { return area.value; },
    set value(v) { area.value = v; paint(); where(); },
    mark(line) { bad = line || 0; paint(); },
    // Moves the caret to a 1-based line and column (the error's position).
    goTo(line, column) {
      const lines = area.value.split('\n');
      let at = 0;
      for (let i = 0; i < Math.min(line - 1, lines.length); i++) at += lines[i].length + 1;
      at += Math.max(0, column - 1);
      area.focus();
      area.setSelectionRange(at, at);
      where();
    },
  };
}

// One action: a JSON textarea with a template picker and a remove button.
function actionItem(ctx, { value, label, readOnly, onChange, onRemove, error }) {
  const { h } = ctx;
  const id = 'action-' + Math.random().toString(36).slice(2, 9);
  const text = h('textarea', { id, class: 'action-json', spellcheck: 'false', readonly: readOnly, 'aria-describedby': id + '-status' });
  text.value = value ? pretty(value) : '';
  const status = h('small', { id: id + '-status', class: 'notice action-status', 'aria-live': 'polite' });
  const picker = h('select', { id: id + '-template', 'aria-label': `Template for ${label}` },
    h('option', { value: '' }, 'Insert a template…'),
    ...(error ? ['error', ...TYPES] : TYPES).map(t => h('option', { value: t }, t === 'error' ? 'republish to rule-errors/${rule}' : t)));
  picker.addEventListener('change', () => {
    if (!picker.value) return;
    text.value = pretty(TEMPLATES[picker.value]);
    picker.value = '';
    check();
    onChange();
    text.focus();
  });
  const check = () => {
    if (!text.value.trim()) { status.textContent = error ? 'No error action.' : 'Empty: insert a template.'; status.className = 'notice action-status'; return error ? null : undefined; }
    try {
      const v = JSON.parse(text.value);
      if (!v || typeof v !== 'object' || Array.isArray(v) || !TYPES.includes(v.type)) throw new Error(`an object with "type": one of ${TYPES.join(', ')}`);
      status.textContent = summary(v);
      status.className = 'notice action-status';
      return v;
    } catch (e) {
      status.textContent = 'Not a valid action: ' + e.message;
      status.className = 'error action-status';
      return undefined;
    }
  };
  text.addEventListener('input', () => { check(); onChange(); });
  const remove = onRemove && !readOnly ? h('button', { type: 'button', class: 'secondary', onclick: onRemove, 'aria-label': `Remove ${label}` }, 'Remove') : null;
  const el = h('div', { class: 'action-item' },
    h('div', { class: 'action-head' }, h('label', { for: id }, label), readOnly ? null : picker, remove),
    text, status);
  check();
  return { el, check, text };
}

// The rule form. `rule` is the stored rule (edit) or null (create). Calls onSaved(stored).
function ruleForm(ctx, { rule, readOnly, sample, onSaved }) {
  const { h, tenant: t } = ctx;
  const idInput = h('input', { id: 'rule-id', required: true, pattern: '[A-Za-z0-9_.\\-]{1,128}', autocomplete: 'off', readonly: !!rule, value: rule ? rule.id : '' });
  const description = h('input', { id: 'rule-description', readonly: readOnly, value: rule ? rule.description : '', autocomplete: 'off' });
  const enabled = h('input', { id: 'rule-enabled', type: 'checkbox', checked: true });
  const validation = h('div', { id: 'rule-validation', class: 'validation', role: 'status', 'aria-live': 'polite' });
  const saveStatus = h('div', { id: 'rule-save-status', class: 'save-status', role: 'status', 'aria-live': 'polite' });
  let loaded = rule; // the version the edit started from
  let timer = null;
  let seq = 0;
  let inflight = null;

  const showError = err => {
    const text = err.message.replace(/^the rule does not compile: /, '')
      .replace(new RegExp(` at ${err.line}:${err.column}( — .*)?$`), '');
    validation.className = 'validation bad';
    fill(validation,
      h('button', { type: 'button', class: 'link', id: 'rule-error-position', onclick: () => sql.goTo(err.line, err.column) }, `Line ${err.line}, column ${err.column}`),
      ': ', h('span', { id: 'rule-error-message' }, text),
      err.hint ? h('div', { id: 'rule-error-hint', class: 'hint' }, 'Hint: ', err.hint) : null);
    sql.mark(err.line);
  };

  const validate = async () => {
    const mine = ++seq;
    inflight?.abort();
    inflight = new AbortController();
    if (!sql.value.trim()) { validation.className = 'validation'; validation.textContent = 'Write a SELECT … FROM \'topic/filter\' rule.'; sql.mark(0); return; }
    try {
      await call('POST', path`/tenants/${t}/rules:dry-run`, { body: { sql: sql.value, sample: sample() }, signal: inflight.signal });
      if (mine !== seq) return;
      validation.className = 'validation good';
      validation.textContent = '✓ The SQL compiles.';
      sql.mark(0);
    } catch (e) {
      if (e.name === 'AbortError' || mine !== seq) return;
      if (e instanceof ApiError && e.code === 'invalid_rule') {
        // The position, message and hint come with the error body (ApiError.detail).
        showError(e.detail || { line: 1, column: 1, message: e.message });
      } else if (e instanceof ApiError && e.status === 400) {
        // It compiles but the sample makes evaluation fail: not a compile error.
        validation.className = 'validation good';
        validation.textContent = '✓ The SQL compiles (' + e.message + ' with the sample).';
        sql.mark(0);
      } else {
        validation.className = 'validation';
        validation.replaceChildren(ctx.errorBox(e));
      }
    }
  };
  const changed = () => {
    saveStatus.textContent = readOnly ? '' : 'Unsaved changes.';
    saveStatus.className = 'save-status notice';
    clearTimeout(timer);
    timer = setTimeout(validate, VALIDATE_DEBOUNCE_MS);
  };
  ctx.onCleanup(() => { clearTimeout(timer); inflight?.abort(); });

  const sql = sqlEditor(ctx, { readOnly, onChange: changed });
  sql.value = rule ? rule.sql : NEW_SQL;

  const list = h('div', { class: 'action-list', id: 'rule-actions' });
  const items = [];
  const relabel = () => items.forEach((it, i) => {
    it.el.querySelector('label').textContent = `Action ${i + 1}`;
    it.el.querySelector('select')?.setAttribute('aria-label', `Template for Action ${i + 1}`);
    it.el.querySelector('.action-head button')?.setAttribute('aria-label', `Remove Action ${i + 1}`);
  });
  const addAction = (value, focus) => {
    const item = actionItem(ctx, {
      value, label: `Action ${items.length + 1}`, readOnly, onChange: changed,
      onRemove: () => { items.splice(items.indexOf(item), 1); item.el.remove(); relabel(); changed(); },
    });
    items.push(item);
    list.append(item.el);
    if (focus) item.text.focus();
  };
  for (const a of rule ? rule.actions : [TEMPLATES.republish]) addAction(a, false);
  const addType = h('select', { id: 'rule-add-type', 'aria-label': 'Type of the new action' }, ...TYPES.map(t2 => h('option', { value: t2 }, t2)));
  const add = h('button', { type: 'button', class: 'secondary', id: 'rule-add-action', onclick: () => { addAction(TEMPLATES[addType.value], true); changed(); } }, 'Add action');
  const errorAction = actionItem(ctx, { value: rule ? rule.error_action : null, label: 'Error action (optional)', readOnly, onChange: changed, error: true });

  const save = h('button', { type: 'submit', id: 'rule-save' }, rule ? 'Save' : 'Create rule');
  // The spec as JSON, or a reason it cannot be sent.
  const spec = () => {
    const actions = items.map(it => it.check());
    if (actions.some(a => a === undefined)) return 'An action is not valid JSON: fix it or remove it.';
    const err = errorAction.check();
    if (err === undefined) return 'The error action is not a valid action.';
    return { sql: sql.value, description: description.value.trim(), actions, error_action: err || null };
  };
  const form = h('form', {
    class: 'rule-form', novalidate: true,
    onsubmit: async e => {
      e.preventDefault();
      if (readOnly) return;
      const body = spec();
      if (typeof body === 'string') { saveStatus.className = 'save-status error'; saveStatus.textContent = body; return; }
      if (!rule && !idInput.checkValidity()) { saveStatus.className = 'save-status error'; saveStatus.textContent = 'The id is 1 to 128 letters, digits, "_", "-" or ".".'; idInput.focus(); return; }
      save.disabled = true;
      saveStatus.className = 'save-status notice';
      saveStatus.textContent = 'Saving…';
      try {
        const r = rule
          ? await call('PUT', path`/tenants/${t}/rules/${rule.id}`, { body, headers: { 'If-Match': `"${loaded.version}"` } })
          : await call('POST', path`/tenants/${t}/rules`, { body: { id: idInput.value.trim(), enabled: enabled.checked, ...body } });
        loaded = r.body;
        saveStatus.className = 'save-status ok';
        saveStatus.textContent = `Saved (version ${r.body.version}).`;
        ctx.announce(`Rule ${r.body.id} saved`);
        onSaved(r.body);
      } catch (err) {
        if (err instanceof ApiError && err.status === 409 && rule) {
          saveStatus.className = 'save-status error';
          saveStatus.replaceChildren(h('span', {}, 'This rule was changed by someone else since you loaded it. '),
            h('button', { type: 'button', class: 'secondary', id: 'rule-reload', onclick: () => onSaved(null) }, 'Reload the rule'),
            ' (your edit is discarded; apply it again).');
        } else if (err instanceof ApiError && err.code === 'invalid_rule') {
          saveStatus.className = 'save-status error';
          saveStatus.textContent = 'Not saved: ' + err.message;
          validate();
        } else {
          saveStatus.className = 'save-status';
          saveStatus.replaceChildren(problem(ctx, err, 'change rules'));
        }
      }
      save.disabled = false;
    },
  },
  h('div', { class: 'filters' },
    h('label', { for: 'rule-id' }, 'Id', idInput),
    h('label', { for: 'rule-description', class: 'grow' }, 'Description', description),
    rule ? null : h('label', { for: 'rule-enabled', class: 'check' }, enabled, 'Start it at once')),
  h('div', { class: 'sql-label' }, h('label', { for: 'rule-sql' }, 'SQL'), sql.caret),
  sql.el, validation,
  h('h3', {}, 'Actions'),
  h('p', { class: 'notice' }, 'Each action is a JSON object run for every output (templates: ${expression}). Pick a template to start from.'),
  list,
  readOnly ? null : h('div', { class: 'row' }, addType, add),
  errorAction.el,
  readOnly ? h('p', { class: 'notice' }, 'Read-only: your token may look at rules and dry-run them, not change them.') : h('div', { class: 'row' }, save, saveStatus));
  validate();
  // rebase: the rule moved to a new version without a spec change (enable/disable).
  return { form, spec, idInput, rebase: r => { loaded = r; } };
}

// ---- try it: dry run and replay ----------------------------------------------------------------

function dryRunPanel(ctx, { spec }) {
  const { h, tenant: t } = ctx;
  const topic = h('input', { id: 'sample-topic', value: DEFAULT_SAMPLE.topic, autocomplete: 'off' });
  const payload = h('textarea', { id: 'sample-payload', spellcheck: 'false', class: 'short' });
  payload.value = pretty(DEFAULT_SAMPLE.payload);
  const out = h('div', { id: 'dry-run-result', class: 'dry-run-result', 'aria-live': 'polite' }, h('p', { class: 'notice' }, 'Run the editor\'s rule (saved or not) against the sample.'));
  const sample = () => {
    let p = {};
    try { p = JSON.parse(payload.value || '{}'); } catch { /* the panel says so when run */ }
    return { topic: topic.value.trim() || DEFAULT_SAMPLE.topic, payload: p };
  };
  const run = h('button', { type: 'submit', id: 'dry-run' }, 'Dry run');
  const form = h('form', {
    onsubmit: async e => {
      e.preventDefault();
      let p;
      try { p = JSON.parse(payload.value || '{}'); } catch (err) { out.replaceChildren(h('p', { class: 'error' }, 'The payload is not valid JSON: ' + err.message)); return; }
      const s = spec();
      if (typeof s === 'string') { out.replaceChildren(h('p', { class: 'error' }, s)); return; }
      run.disabled = true;
      try {
        const { body } = await call('POST', path`/tenants/${t}/rules:dry-run`, { body: { sql: s.sql, actions: s.actions, sample: { topic: topic.value.trim(), payload: p } } });
        fill(out,
          h('p', { id: 'dry-run-topic', class: body.topic_matches ? 'ok' : 'error' }, body.topic_matches ? '✓ The topic matches the rule\'s FROM.' : '✗ The topic does not match the rule\'s FROM.'),
          h('h4', {}, 'Output'),
          h('pre', { class: 'json', id: 'dry-run-output', tabindex: 0 }, body.output === null ? 'null — no output (WHERE was false, or a windowed rule emits at window close)' : pretty(body.output)),
          h('h4', {}, 'What the actions would do'),
          h('pre', { class: 'json', id: 'dry-run-actions', tabindex: 0 }, body.actions.length ? pretty(body.actions) : 'nothing (no output or no actions)'));
        ctx.announce('Dry run done');
      } catch (err) {
        out.replaceChildren(ctx.errorBox(err));
      }
      run.disabled = false;
    },
  },
  h('label', { for: 'sample-topic' }, 'Sample topic', topic),
  h('label', { for: 'sample-payload' }, 'Sample payload (JSON)', payload),
  h('div', { class: 'row' }, run));
  return { el: h('div', {}, h('h3', {}, 'Dry run'), form, out), sample };
}

const PRESETS = [{ label: '1 h', ms: 36e5 }, { label: '24 h', ms: 864e5 }, { label: '7 d', ms: 6048e5 }];

function replayPanel(ctx, { id, canReplay, version }) {
  const { h, tenant: t } = ctx;
  let preset = PRESETS[0];
  const buttons = PRESETS.map(p => h('button', { type: 'button', 'aria-pressed': String(p === preset), onclick: () => { preset = p; buttons.forEach((b, i) => b.setAttribute('aria-pressed', String(PRESETS[i] === p))); } }, p.label));
  const devices = h('input', { id: 'replay-devices', placeholder: 'demo-01, demo-02', autocomplete: 'off', 'aria-describedby': 'replay-devices-help' });
  const max = h('input', { id: 'replay-max', type: 'number', min: 1, max: 1000, value: 100 });
  const out = h('div', { id: 'replay-result', class: 'replay-result', 'aria-live': 'polite' });
  const run = h('button', { type: 'submit', id: 'replay-run', disabled: !canReplay }, 'Replay');
  const form = h('form', {
    onsubmit: async e => {
      e.preventDefault();
      const to = Date.now();
      const body = { from: to - preset.ms, to, max_outputs: Math.min(1000, Math.max(1, Number(max.value) || 100)) };
      const list = devices.value.split(/[\s,]+/).filter(Boolean);
      if (list.length) body.devices = list;
      run.disabled = true;
      out.replaceChildren(h('p', { class: 'loading' }, `Replaying the last ${preset.label}…`));
      try {
        const { body: r } = await call('POST', path`/tenants/${t}/rules/${id}/replay`, { body });
        const stat = (label, v, key) => [h('dt', {}, label), h('dd', { 'data-replay': key }, v)];
        fill(out,
          h('dl', { class: 'kv replay-counts' },
            stat('Messages', num(r.messages), 'messages'), stat('Matched', num(r.matched), 'matched'),
            stat('Outputs', num(r.outputs_total), 'outputs_total'), stat('Failed', num(r.failed), 'failed'),
            stat('Truncated', r.truncated ? 'yes — narrow the range or the devices' : 'no', 'truncated')),
          r.errors.length ? h('ul', { class: 'error' }, r.errors.map(x => h('li', {}, x))) : null,
          r.outputs.length
            ? h('div', { class: 'table-wrap short' }, h('table', { id: 'replay-outputs' }, h('caption', { class: 'visually-hidden' }, 'Replay outputs'),
              h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Time'), h('th', { scope: 'col' }, 'Device'), h('th', { scope: 'col' }, 'Output'), h('th', { scope: 'col' }, 'Actions would'))),
              h('tbody', {}, r.outputs.map(o => h('tr', {},
                h('td', {}, ctx.when(o.timestamp_ms)), h('td', {}, o.device || '–'),
                h('td', { class: 'mono wrap' }, truncate(JSON.stringify(o.output), 200)),
                h('td', { class: 'mono wrap' }, o.actions.map(a => truncate(JSON.stringify(a), 160)).join('\n')))))))
            : h('p', { class: 'notice' }, 'No output in this range.'),
          r.outputs_total > r.outputs.length ? h('p', { class: 'notice' }, `Showing ${r.outputs.length} of ${r.outputs_total} outputs.`) : null);
        ctx.announce(`Replay: ${r.outputs_total} outputs`);
      } catch (err) {
        out.replaceChildren(problem(ctx, err, 'replay rules'));
      }
      run.disabled = !canReplay;
    },
  },
  h('div', { class: 'ranges', role: 'group', 'aria-label': 'Replay range' }, buttons),
  h('div', { class: 'filters' },
    h('label', { for: 'replay-devices', class: 'grow' }, 'Devices (optional)', devices),
    h('label', { for: 'replay-max' }, 'Outputs shown', max)),
  h('small', { id: 'replay-devices-help', class: 'notice' }, 'Comma-separated device ids; empty: every device.'),
  h('div', { class: 'row' }, run, canReplay ? null : h('span', { class: 'notice' }, 'Replay needs the operator role.')));
  return h('div', {}, h('h2', { id: 'replay-title' }, 'Replay over stored telemetry'),
    h('p', { class: 'notice', id: 'replay-version' }, `Runs the saved rule (version ${version}) with fresh state over the tenant's stored telemetry; no action runs.`),
    form, out);
}

// ---- create ------------------------------------------------------------------------------------

function renderCreate(ctx) {
  const { h } = ctx;
  const editorCard = h('section', { class: 'card', 'aria-labelledby': 'editor-title' }, h('h2', { id: 'editor-title' }, 'New rule'));
  const tryCard = h('section', { class: 'card', 'aria-labelledby': 'try-title' }, h('h2', { id: 'try-title' }, 'Try it'));
  ctx.setView('New rule', h('p', {}, h('a', { href: '#/rules' }, '← Rules')), h('h1', {}, `New rule — ${ctx.tenant}`), h('div', { class: 'rule-grid' }, editorCard, tryCard));
  let form;
  const dry = dryRunPanel(ctx, { spec: () => form.spec() });
  form = ruleForm(ctx, { rule: null, readOnly: false, sample: dry.sample, onSaved: r => { location.hash = '#/rules/' + encodeURIComponent(r.id); } });
  editorCard.append(form.form);
  tryCard.append(dry.el, h('p', { class: 'notice' }, 'Save the rule to replay it over stored telemetry.'));
  form.idInput.focus();
}

// ---- a rule's page -----------------------------------------------------------------------------

function renderRule(ctx, id) {
  const { h, tenant: t } = ctx;
  const base = path`/tenants/${t}/rules/${id}`;
  const head = h('div', { class: 'rule-head', id: 'rule-head' }, h('p', { class: 'loading' }, 'Loading the rule…'));
  const statsCard = h('section', { class: 'card', 'aria-labelledby': 'stats-title' }, h('h2', { id: 'stats-title' }, 'Stats'), h('p', { class: 'loading' }, 'Loading…'));
  const editorCard = h('section', { class: 'card', 'aria-labelledby': 'editor-title' }, h('h2', { id: 'editor-title' }, 'Rule'));
  const tryCard = h('section', { class: 'card', 'aria-labelledby': 'try-title' }, h('h2', { id: 'try-title' }, 'Try it'));
  const replayCard = h('section', { class: 'card', 'aria-labelledby': 'replay-title' }, h('h2', { id: 'replay-title' }, 'Replay over stored telemetry'), h('p', { class: 'loading' }, 'Loading…'));
  const deadCard = h('section', { class: 'card', 'aria-labelledby': 'dead-title' }, h('h2', { id: 'dead-title' }, 'Dead letters'), h('p', { class: 'loading' }, 'Loading…'));
  ctx.setView(`Rule ${id}`, h('p', {}, h('a', { href: '#/rules' }, '← Rules')), h('h1', {}, id), head, statsCard, h('div', { class: 'rule-grid' }, editorCard, tryCard), replayCard, deadCard);
  const ctrl = new AbortController();
  ctx.onCleanup(() => ctrl.abort());
  const signal = ctrl.signal;
  let rule = null;
  let canWrite = true;

  const showHead = () => {
    const status = h('p', { id: 'rule-head-status', role: 'status' });
    const toggle = h('button', { type: 'button', class: 'secondary', id: 'rule-toggle', hidden: !canWrite }, rule.enabled ? 'Disable' : 'Enable');
    toggle.addEventListener('click', async () => {
      toggle.disabled = true;
      try {
        const { body } = await call('POST', `${base}/${rule.enabled ? 'disable' : 'enable'}`, { headers: { 'If-Match': `"${rule.version}"` } });
        rule = body;
        ctx.announce(`Rule ${id} ${rule.enabled ? 'enabled' : 'disabled'}`);
        showHead();
        editor?.rebase(rule);
      } catch (e) {
        toggle.disabled = false;
        if (e instanceof ApiError && e.status === 409) status.replaceChildren(h('span', { class: 'error' }, 'The rule was changed by someone else. '), h('button', { type: 'button', class: 'secondary', onclick: load }, 'Reload'));
        else status.replaceChildren(problem(ctx, e, 'enable or disable rules'));
      }
    });
    const del = h('button', { type: 'button', class: 'secondary danger', id: 'rule-delete', hidden: !canWrite, onclick: () => confirmDelete(status) }, 'Delete');
    head.replaceChildren(
      h('dl', { class: 'kv' },
        h('dt', {}, 'State'), h('dd', { id: 'rule-state' }, h('span', { class: 'dot' + (rule.enabled ? ' on' : ''), 'aria-hidden': 'true' }), rule.enabled ? 'enabled' : 'disabled'),
        h('dt', {}, 'Version'), h('dd', { id: 'rule-version' }, String(rule.version)),
        h('dt', {}, 'Updated'), h('dd', {}, ctx.when(rule.updated_ms)),
        h('dt', {}, 'Description'), h('dd', {}, rule.description || '–')),
      h('div', { class: 'row' }, toggle, del), status);
  };

  // Confirmed in a modal dialog (confirm.js).
  const confirmDelete = status => confirmDialog(ctx, {
    title: `Delete rule ${id}?`,
    text: 'It stops at once; its stats and dead letters are deleted with it. This cannot be undone.',
    confirmId: 'rule-delete-confirm',
    opener: document.getElementById('rule-delete'),
    onConfirm: async () => {
      await call('DELETE', base);
      ctx.announce(`Rule ${id} deleted`);
      location.hash = '#/rules';
    },
    onError: e => status.replaceChildren(problem(ctx, e, 'delete rules')),
  });

  let editor = null;
  const showEditor = () => {
    let form;
    const dry = dryRunPanel(ctx, { spec: () => form.spec() });
    const onSaved = saved => {
      if (!saved) { load(); return; }
      rule = saved;
      showHead();
      const note = document.getElementById('replay-version');
      if (note) note.textContent = `Runs the saved rule (version ${rule.version}) with fresh state over the tenant's stored telemetry; no action runs.`;
    };
    form = ruleForm(ctx, { rule, readOnly: !canWrite, sample: dry.sample, onSaved });
    editor = form;
    editorCard.replaceChildren(h('h2', { id: 'editor-title' }, 'Rule'), form.form);
    tryCard.replaceChildren(h('h2', { id: 'try-title' }, 'Try it'), dry.el);
    replayCard.replaceChildren(replayPanel(ctx, { id, canReplay: canWrite, version: rule.version }));
  };

  let heldBefore = -1;
  const stats = async () => {
    const s = await get(base + '/stats', { signal });
    const cell = (label, key, v) => [h('div', { class: 'label', id: `rs-${key}-label` }, label), h('div', { class: 'value', id: `rs-${key}`, 'aria-labelledby': `rs-${key}-label` }, v)];
    statsCard.replaceChildren(h('h2', { id: 'stats-title' }, 'Stats'),
      h('div', { class: 'stats rule-stats', 'aria-live': 'off' },
        ...COUNTERS.map(([k, label]) => h('div', { class: 'stat' }, ...cell(label, k, num(s[k])))),
        h('div', { class: 'stat' }, ...cell('Latency p50 / p99', 'latency', `${num(s.latency_p50_us)} / ${num(s.latency_p99_us)} µs`))),
      h('div', { class: 'table-wrap short' }, h('table', { id: 'rule-action-stats' }, h('caption', { class: 'visually-hidden' }, 'Per action'),
        h('thead', {}, h('tr', {}, ...['Action', 'Successes', 'Errors', 'Retries', 'Dead letters', 'Queued'].map((x, i) => h('th', { scope: 'col', class: i ? 'num' : null }, x)))),
        h('tbody', {}, s.actions.length
          ? s.actions.map((a, i) => h('tr', {}, h('td', {}, `${i + 1}. ${a.kind}`), ...[a.successes, a.errors, a.retries, a.dead_letters, a.queued].map(v => h('td', { class: 'num' }, num(v)))))
          : h('tr', {}, h('td', { colspan: 6, class: 'notice' }, rule && !rule.enabled ? 'No action counters while the rule is disabled.' : 'No actions.'))))),
      h('p', { class: 'notice' }, `Error actions run: ${num(s.error_actions)} · dead letters held ${num(s.dead_letters_held)}, evicted ${num(s.dead_letters_evicted)} · refreshed every ${REFRESH_MS / 1000} s`));
    if (s.dead_letters_held !== heldBefore || s.dead_letters_evicted) { heldBefore = s.dead_letters_held; await deadLetters(); }
  };

  const deadLetters = async () => {
    const list = await get(base + '/dead-letters', { signal });
    if (!list.length) { deadCard.replaceChildren(h('h2', { id: 'dead-title' }, 'Dead letters'), h('p', { class: 'notice', id: 'dead-empty' }, 'None: every action delivered or is still trying.')); return; }
    deadCard.replaceChildren(h('h2', { id: 'dead-title' }, 'Dead letters'),
      h('div', { class: 'table-wrap short' }, h('table', { id: 'rule-dead-letters' }, h('caption', { class: 'visually-hidden' }, 'Dead letters, newest first'),
        h('thead', {}, h('tr', {}, ...['Time', 'Action', 'Attempts', 'Error', 'Target', 'Payload'].map(x => h('th', { scope: 'col' }, x)))),
        h('tbody', {}, [...list].reverse().map(d => h('tr', {},
          h('td', {}, ctx.when(d.at_ms)),
          h('td', {}, d.action === null || d.action === undefined ? 'error action' : `${d.action + 1}. ${rule?.actions[d.action]?.type || ''}`),
          h('td', { class: 'num' }, num(d.attempts)),
          h('td', { class: 'wrap' }, d.error),
          h('td', { class: 'mono wrap' }, d.target),
          h('td', { class: 'mono wrap' }, truncate(typeof d.payload === 'string' ? d.payload : JSON.stringify(d.payload), 200))))))));
  };

  async function load() {
    try {
      const [r, ro] = await Promise.all([get(base, { signal }), role()]);
      rule = r;
      canWrite = ro !== 'viewer';
      showHead();
      showEditor();
    } catch (e) {
      if (e.name === 'AbortError') return;
      head.replaceChildren(e instanceof ApiError && e.status === 404
        ? h('p', { class: 'error', role: 'alert' }, `There is no rule ${id} in tenant ${t}. `, h('a', { href: '#/rules' }, 'Back to the rules'))
        : ctx.errorBox(e));
      editorCard.hidden = tryCard.hidden = replayCard.hidden = statsCard.hidden = deadCard.hidden = true;
    }
  }
  load();
  const tick = () => stats().catch(e => { if (e.name !== 'AbortError' && !editorCard.hidden) statsCard.replaceChildren(h('h2', { id: 'stats-title' }, 'Stats'), ctx.errorBox(e)); });
  tick();
  const timer = setInterval(tick, REFRESH_MS);
  ctx.onCleanup(() => clearInterval(timer));
}
