// End-to-end tests of the operator console: the real hub in demo mode (50 simulated devices that
// report twins and answer commands), driven in Debian's headless Chromium by playwright-core.
// Screenshots go to target/console-artifacts/.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { ADMIN_TOKEN, ROOT, startHub } from './hub.mjs';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const ARTIFACTS = join(ROOT, 'target', 'console-artifacts');
const DEVICE = 'demo-07';

let hub, browser, page;

async function shot(name) {
  await page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });
}

async function api(method, path, body) {
  const res = await fetch(`${hub.url}/api/v1${path}`, {
    method, headers: { Authorization: `Bearer ${ADMIN_TOKEN}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: res.status, body: await res.json().catch(() => null) };
}

// Waits until `f` returns a truthy value (polling), or fails with `what`.
async function eventually(what, f, ms = 30000) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) {
    try { last = await f(); if (last) return last; } catch (e) { last = e; }
    await new Promise(r => setTimeout(r, 250));
  }
  throw new Error(`${what} did not happen within ${ms} ms (last: ${last})`);
}

before(async () => {
  // A missing browser is a failure, not a skip: the suite exists to run in it.
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)`);
  mkdirSync(ARTIFACTS, { recursive: true });
  hub = await startHub();
  // The demo device must be connected and have reported before the tests look at it.
  await eventually(`${DEVICE} reporting its twin`, async () => {
    const r = await api('GET', `/tenants/demo/devices/${DEVICE}/twins/default`);
    return r.status === 200 && r.body.reported && r.body.reported.interval_ms !== undefined;
  });
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
  page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on('pageerror', e => console.error('page error:', e));
});

after(async () => {
  await browser?.close();
  await hub?.stop();
});

test('the shell is served with a strict CSP and a bad token is refused', async () => {
  const res = await page.goto(hub.url + '/');
  assert.match(res.headers()['content-security-policy'], /default-src 'self'/);
  await page.getByLabel('Operator API token').fill('fh_not_a_token_at_all_000000');
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByText('That token is unknown, expired or revoked.').waitFor();
  await shot('01-sign-in-refused');
});

test('sign in and see the fleet overview live', async () => {
  await page.getByLabel('Operator API token').fill(ADMIN_TOKEN);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByRole('heading', { name: /Fleet overview/ }).waitFor();
  // Several tenants (default, demo): the platform admin picks one.
  await page.locator('#tenant-select').selectOption('demo');
  await page.getByRole('heading', { name: 'Fleet overview — demo' }).waitFor();
  await eventually('50 devices in the overview', async () => (await page.locator('#stat-total').textContent()) === '50');
  await page.getByText(/Live · updated/).waitFor();
  // The platform admin sees the whole hub's message rates (the demo fleet publishes every 2 s).
  await eventually('a message rate', async () => Number((await page.locator('#stat-in').textContent()).replace(/[^0-9.]/g, '')) > 0);
  await shot('02-overview');
});

test('find a device by searching', async () => {
  await page.getByRole('link', { name: 'Devices' }).click();
  await page.getByRole('heading', { name: 'Devices — demo' }).waitFor();
  await page.getByLabel('Id starts with').fill('demo-0');
  await page.getByRole('button', { name: 'Search' }).click();
  await eventually('ten matches', async () => (await page.locator('tbody tr').count()) === 10);
  await shot('03-devices-search');
  await page.getByRole('link', { name: DEVICE, exact: true }).click();
  await page.getByRole('heading', { name: DEVICE, exact: true }).waitFor();
});

test('edit desired state and see the device apply it: the key applied, the delta cleared', async () => {
  const editor = page.getByLabel('Desired (JSON)');
  await eventually('the twin loaded', async () => (await editor.inputValue()).startsWith('{'));
  const current = JSON.parse(await editor.inputValue());
  await editor.fill('{ not json');
  await page.getByText(/Not valid JSON/).waitFor();
  assert.equal(await page.locator('#desired-save').isDisabled(), true);
  // 3.7 s: the demo device applies it and reports it back, so the delta clears.
  await editor.fill(JSON.stringify({ ...current, interval_ms: 3700 }, null, 2));
  // A 409 first is possible: the console retries when only reported moved on.
  const patched = page.waitForResponse(r => r.request().method() === 'PATCH' && r.url().endsWith('/desired') && r.status() === 200);
  await page.locator('#desired-save').click();
  // The device applies it within milliseconds, often before the save's answer: what it was
  // asked is checked in the answer, the delta it had in the twin's history, and the page shows
  // the key applied and the delta cleared.
  const saved = await (await patched).json();
  assert.equal(saved.desired.interval_ms, 3700);
  const history = (await api('GET', `/tenants/demo/devices/${DEVICE}/twins/default/history?limit=100`)).body;
  const items = history.items || history;
  const asked = items.findIndex(e => e.section === 'desired' && e.patch.interval_ms === 3700);
  assert.ok(asked >= 0, 'the desired change is in the history');
  await page.getByText(/Saved \(version \d+\)/).waitFor();
  await shot('04-desired-saved');
  await eventually('the delta clearing', async () => (await page.locator('#twin-delta').textContent()).includes('in sync'));
  await eventually('reported interval_ms 3700', async () => (await page.locator('#twin-reported').textContent()).includes('"interval_ms": 3700'));
  await page.locator('#twin-acks [data-key="interval_ms"][data-status="applied"]').waitFor();
  await shot('05-delta-cleared');
});

test('a version conflict is explained, and a refused key stays in the delta', async () => {
  const editor = page.getByLabel('Desired (JSON)');
  const mine = JSON.parse(await editor.inputValue());
  await editor.fill(JSON.stringify({ ...mine, interval_ms: 4100 }, null, 2));
  // Someone else changes desired meanwhile (a key the device refuses, so it stays in the delta).
  const other = await api('PATCH', `/tenants/demo/devices/${DEVICE}/twins/default/desired`, { color: 'blue' });
  assert.equal(other.status, 200);
  await page.locator('#desired-save').click();
  await page.getByText('The twin changed since you loaded it.').waitFor();
  // The device refuses `color`: it stays in the delta, and the page says why.
  await eventually('color in the delta', async () => (await page.locator('#twin-delta').textContent()).includes('"color": "blue"'));
  await page.locator('#twin-acks [data-key="color"][data-status="rejected"]').waitFor();
  await shot('06-conflict');
  await page.getByRole('button', { name: 'Load the current twin' }).click();
  await eventually('the current twin in the editor', async () => (await editor.inputValue()).includes('"color": "blue"'));
});

test('a chart shows telemetry and updates live', async () => {
  const chart = page.locator('.chart').first();
  await chart.waitFor();
  await eventually('points in the chart', async () => Number(await chart.getAttribute('data-points')) > 0);
  // 5-second buckets over the last 15 minutes, devices sampling every 2 s: a new point within
  // seconds, fetched by the chart's own refresh (no reload).
  const first = Number(await chart.getAttribute('data-points'));
  await eventually('a new point in the chart', async () => Number(await chart.getAttribute('data-points')) > first, 20000);
  await chart.scrollIntoViewIfNeeded();
  const box = await chart.boundingBox();
  await page.mouse.move(box.x + box.width - 40, box.y + box.height / 2);
  await eventually('a hover value', async () => page.locator('.chart .tip').first().isVisible());
  await shot('07-chart');
});

test('invoke ping on the demo device and see its response', async () => {
  await page.getByLabel('Name', { exact: true }).fill('ping');
  await page.getByLabel('Payload (JSON)').fill('{"hello": "console"}');
  await page.getByRole('button', { name: 'Invoke' }).click();
  await eventually('the response', async () => {
    const text = await page.locator('#command-result').textContent();
    return text.includes('status 200') && text.includes('"hello": "console"');
  });
  await shot('08-command');
});

test('credentials: a new password as a mosquitto_pub line, a certificate bundle to download', async () => {
  await page.getByRole('button', { name: 'New password' }).click();
  await eventually('the mosquitto_pub line', async () => {
    const text = await page.locator('#credential-out').textContent();
    return text.includes(`mosquitto_pub -h`) && text.includes(`-u demo/${DEVICE} -P '`);
  });
  await page.getByRole('button', { name: 'New certificate' }).click();
  const link = page.getByRole('link', { name: `${DEVICE}.pem` });
  await link.waitFor();
  const download = page.waitForEvent('download');
  await link.click();
  const file = await (await download).path();
  const { readFileSync } = await import('node:fs');
  assert.match(readFileSync(file, 'utf8'), /BEGIN CERTIFICATE/);
  await page.getByRole('link', { name: `${DEVICE}.key` }).waitFor();
  await page.getByRole('link', { name: 'ca.pem' }).waitFor();
  await shot('09-credentials');
});

test('keyboard only on a tablet-sized screen: skip link, search, open a device', async () => {
  await page.setViewportSize({ width: 820, height: 1180 });
  await page.goto(hub.url + '/#/devices');
  await page.getByRole('heading', { name: 'Devices — demo' }).waitFor();
  // The skip link leads to the content; a page change also moves focus there.
  await page.locator('.skip').focus();
  await page.keyboard.press('Enter');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'main');
  await page.keyboard.press('Tab');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'search');
  await page.keyboard.type('demo-1');
  await page.keyboard.press('Enter');
  await eventually('ten matches', async () => (await page.locator('tbody tr').count()) === 10
    && (await page.locator('tbody tr a').first().textContent()) === 'demo-10');
  await page.locator('tbody tr a').first().focus();
  await page.keyboard.press('Enter');
  await page.getByRole('heading', { name: 'demo-10', exact: true }).waitFor();
  // Nothing wider than the screen.
  assert.ok(await page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth));
  await shot('10-tablet-device');
});

// ---- Rules page ---------------------------------------------------------------------------------

const RULE = 'hot-e2e';
const TYPO_SQL = "SELECT temperature, topic(2) AS device\nFROM 'devices/+/telemetry'\nWHERE isNumbr(temperature)";
const GOOD_SQL = "SELECT temperature, topic(2) AS device\nFROM 'devices/+/telemetry'\nWHERE isNumber(temperature)";

// Signed in on the demo tenant, whether or not the earlier tests ran (a name filter may skip them).
async function signedInOnDemo(hash) {
  await page.goto(hub.url + '/' + hash);
  await page.waitForFunction(() => document.querySelector('#token') || document.querySelector('#main h1'));
  if (await page.locator('#token').count()) {
    await page.getByLabel('Operator API token').fill(ADMIN_TOKEN);
    await page.getByRole('button', { name: 'Sign in' }).click();
    // Signed in once the header shows (the sign-in form's own h1 is there before), so the
    // tenant picker below holds this session's tenants, not the previous one's.
    await page.locator('#sign-out').waitFor();
  }
  if ((await page.locator('#tenant-select').inputValue()) !== 'demo') await page.locator('#tenant-select').selectOption('demo');
}

const counter = async sel => Number((await page.locator(sel).textContent()).replace(/[^0-9]/g, '') || 0);

test('rules: create one with a typo (line:column shown), fix it, save it, see it count demo telemetry', async () => {
  await page.setViewportSize({ width: 1280, height: 900 });
  await signedInOnDemo('#/rules');
  await page.getByRole('heading', { name: 'Rules — demo' }).waitFor();
  await page.getByRole('link', { name: 'Create your first rule' }).waitFor();
  await shot('11-rules-empty');
  await page.getByRole('link', { name: 'Create your first rule' }).click();
  await page.getByRole('heading', { name: 'New rule — demo' }).waitFor();
  await page.getByLabel('Id', { exact: true }).fill(RULE);
  await page.getByLabel('Description').fill('Environment sensors, republished');
  const sql = page.getByLabel('SQL', { exact: true });
  await sql.fill(TYPO_SQL);
  // The compile error, debounced, from POST …/rules:dry-run: position, message, hint, the line marked.
  await page.locator('#rule-error-position', { hasText: 'Line 3, column 7' }).waitFor();
  assert.match(await page.locator('#rule-error-message').textContent(), /unknown function .isnumbr./i);
  assert.match(await page.locator('#rule-error-hint').textContent(), /isnumber/i);
  assert.equal(await page.locator('.sql-gutter span.bad').textContent(), '3');
  assert.ok(await page.locator('.sql-band').isVisible());
  // The position is a button that puts the caret there.
  await page.locator('#rule-error-position').click();
  assert.equal(await page.locator('#rule-caret').textContent(), 'Ln 3, Col 7');
  await shot('12-rule-typo');
  await sql.fill(GOOD_SQL);
  await page.getByText('✓ The SQL compiles').waitFor();
  assert.equal(await page.locator('.sql-gutter span.bad').count(), 0);
  // An action from a template: republish (already there) plus an alarm skeleton, then removed.
  await page.locator('#rule-add-type').selectOption('alarm');
  await page.getByRole('button', { name: 'Add action' }).click();
  assert.match(await page.getByLabel('Action 2', { exact: true }).inputValue(), /"type": "alarm"/);
  await page.getByRole('button', { name: 'Remove Action 2' }).click();
  assert.equal(await page.locator('.action-item textarea.action-json').count(), 2); // action 1 and the error action
  await page.getByRole('button', { name: 'Create rule' }).click();
  await page.getByRole('heading', { name: RULE, exact: true }).waitFor();
  const stored = await api('GET', `/tenants/demo/rules/${RULE}`);
  assert.equal(stored.status, 200);
  assert.equal(stored.body.sql, GOOD_SQL);
  assert.deepEqual(stored.body.actions, [{ type: 'republish', topic: 'alerts/${topic(2)}', qos: 0 }]);
  // The demo fleet publishes every 2 s: the page's counters grow without a reload.
  await eventually('matched > 0', async () => (await counter('#rs-matched')) > 0);
  const first = await counter('#rs-matched');
  await eventually('matched growing', async () => (await counter('#rs-matched')) > first, 15000);
  await eventually('passed > 0', async () => (await counter('#rs-passed')) > 0);
  await eventually('republish successes', async () => Number(await page.locator('#rule-action-stats tbody td.num').first().textContent().then(t => t.replace(/[^0-9]/g, ''))) > 0);
  await shot('13-rule-stats');
});

test('rules: dry-run a sample and replay the last hour', async () => {
  await page.getByLabel('Sample topic').fill('devices/demo-03/telemetry');
  await page.getByLabel('Sample payload (JSON)').fill('{"temperature": 42.5}');
  await page.getByRole('button', { name: 'Dry run' }).click();
  await page.locator('#dry-run-topic', { hasText: 'The topic matches' }).waitFor();
  assert.deepEqual(JSON.parse(await page.locator('#dry-run-output').textContent()), { temperature: 42.5, device: 'demo-03' });
  assert.match(await page.locator('#dry-run-actions').textContent(), /alerts\/demo-03/);
  // A topic outside FROM: no output.
  await page.getByLabel('Sample topic').fill('other/demo-03');
  await page.getByRole('button', { name: 'Dry run' }).click();
  await page.locator('#dry-run-topic', { hasText: 'does not match' }).waitFor();
  await shot('14-rule-dry-run');
  // Replay (1 h, the default preset) over what the demo fleet stored since the hub started.
  assert.equal(await page.getByRole('button', { name: '1 h' }).getAttribute('aria-pressed'), 'true');
  // Two devices whose profile reports a temperature (the rule's WHERE wants one).
  const hot = [];
  for (let i = 0; i < 50 && hot.length < 2; i++) {
    const id = `demo-${String(i).padStart(2, '0')}`;
    const series = (await api('GET', `/tenants/demo/devices/${id}/telemetry`)).body || [];
    if (series.some(s => s.metric === 'temperature')) hot.push(id);
  }
  assert.equal(hot.length, 2);
  await page.getByLabel('Devices (optional)').fill(hot.join(', '));
  await page.getByRole('button', { name: 'Replay' }).click();
  await page.locator('#replay-outputs').waitFor();
  assert.ok(Number((await page.locator('[data-replay="outputs_total"]').textContent()).replace(/[^0-9]/g, '')) > 0);
  assert.ok(Number((await page.locator('[data-replay="messages"]').textContent()).replace(/[^0-9]/g, '')) > 0);
  assert.equal(await page.locator('[data-replay="truncated"]').textContent(), 'no');
  const devices = await page.locator('#replay-outputs tbody td:nth-child(2)').allTextContents();
  assert.ok(devices.length > 0 && devices.every(d => hot.includes(d)), devices.join());
  assert.match(await page.locator('#replay-outputs tbody').textContent(), new RegExp(`alerts/(${hot.join('|')})`));
  await shot('15-rule-replay');
});

test('rules: a concurrent change is explained on save', async () => {
  await page.getByLabel('Description').fill('My edit');
  const other = await api('PUT', `/tenants/demo/rules/${RULE}`, { sql: GOOD_SQL, description: 'Someone else', actions: [{ type: 'republish', topic: 'alerts/${topic(2)}' }] });
  assert.equal(other.status, 200);
  await page.getByRole('button', { name: 'Save', exact: true }).click();
  await page.getByText('This rule was changed by someone else since you loaded it.').waitFor();
  await shot('16-rule-conflict');
  await page.getByRole('button', { name: 'Reload the rule' }).click();
  await eventually('the other description loaded', async () => (await page.getByLabel('Description').inputValue()) === 'Someone else');
  // Saving again works on the fresh version.
  await page.getByLabel('Description').fill('Environment sensors, republished');
  await page.getByRole('button', { name: 'Save', exact: true }).click();
  await page.getByText(/Saved \(version \d+\)/).waitFor();
  assert.equal((await api('GET', `/tenants/demo/rules/${RULE}`)).body.description, 'Environment sensors, republished');
});

test('rules: the list counts live; disable the rule there; delete it (Escape cancels)', async () => {
  await page.getByRole('link', { name: 'Rules', exact: true }).click();
  await page.getByRole('heading', { name: 'Rules — demo' }).waitFor();
  const row = page.locator(`tr[data-rule="${RULE}"]`);
  await row.waitFor();
  assert.match(await row.locator('.actions-cell').textContent(), /republish → alerts/);
  const matched = row.locator('[data-counter="matched"]');
  await eventually('a count in the list', async () => Number((await matched.textContent()).replace(/[^0-9]/g, '')) > 0);
  const before = Number((await matched.textContent()).replace(/[^0-9]/g, ''));
  await eventually('the list refreshing', async () => Number((await matched.textContent()).replace(/[^0-9]/g, '')) > before, 15000);
  const sw = row.getByRole('switch', { name: `Rule ${RULE} enabled` });
  assert.equal(await sw.getAttribute('aria-checked'), 'true');
  await sw.click();
  await eventually('switched off', async () => (await sw.getAttribute('aria-checked')) === 'false');
  assert.equal((await api('GET', `/tenants/demo/rules/${RULE}`)).body.enabled, false);
  await shot('17-rules-list-disabled');
  // Disabled: the counter stops.
  await new Promise(r => setTimeout(r, 4000));
  const stopped = (await api('GET', `/tenants/demo/rules/${RULE}/stats`)).body.matched;
  await new Promise(r => setTimeout(r, 4000));
  assert.equal((await api('GET', `/tenants/demo/rules/${RULE}/stats`)).body.matched, stopped);

  // At tablet width the rule's page fits the screen.
  await page.setViewportSize({ width: 768, height: 1024 });
  await row.getByRole('link', { name: RULE }).click();
  await page.getByRole('heading', { name: RULE, exact: true }).waitFor();
  await page.locator('#rule-state', { hasText: 'disabled' }).waitFor();
  await page.locator('#rs-matched').waitFor();
  assert.ok(await page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth));
  await shot('18-rule-tablet');
  await page.setViewportSize({ width: 1280, height: 900 });

  await page.locator('#rule-delete').click();
  const dialog = page.getByRole('dialog', { name: `Delete rule ${RULE}?` });
  await dialog.waitFor();
  await shot('19-rule-delete-confirm');
  await page.keyboard.press('Escape');
  await dialog.waitFor({ state: 'detached' });
  assert.equal(await page.evaluate(() => document.activeElement.id), 'rule-delete');
  assert.equal((await api('GET', `/tenants/demo/rules/${RULE}`)).status, 200);
  await page.locator('#rule-delete').click();
  await page.locator('#rule-delete-confirm').click();
  await page.getByRole('link', { name: 'Create your first rule' }).waitFor();
  assert.equal((await api('GET', `/tenants/demo/rules/${RULE}`)).status, 404);
});

test('rules: a viewer sees a rule read-only and may dry-run it; a change is refused with a clear message', async () => {
  const rule = await api('POST', '/tenants/demo/rules', { id: 'viewer-e2e', sql: GOOD_SQL, actions: [{ type: 'republish', topic: 'alerts/${topic(2)}' }], enabled: false });
  assert.equal(rule.status, 201);
  const token = await api('POST', '/tokens', { name: 'console-e2e-viewer', role: 'viewer', tenant: 'demo' });
  assert.equal(token.status, 201);
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const viewer = await context.newPage();
  viewer.on('pageerror', e => console.error('page error:', e));
  try {
    await viewer.goto(hub.url + '/#/rules/viewer-e2e');
    await viewer.getByLabel('Operator API token').fill(token.body.secret);
    await viewer.getByRole('button', { name: 'Sign in' }).click();
    await viewer.getByRole('heading', { name: 'viewer-e2e', exact: true }).waitFor();
    await viewer.locator('#rule-state', { hasText: 'disabled' }).waitFor();
    // A dry run is a read: allowed.
    await viewer.getByRole('button', { name: 'Dry run' }).click();
    await viewer.locator('#dry-run-topic', { hasText: 'The topic matches' }).waitFor();
    // With GET /api/v1/me the page knows the role and hides changes; without it the API's 403
    // is explained where the change was tried.
    const toggle = viewer.locator('#rule-toggle');
    if (await toggle.isVisible()) {
      await toggle.click();
      await viewer.getByText("Your token's role may not enable or disable rules (the operator role is needed).").waitFor();
    } else {
      assert.equal(await viewer.locator('#rule-save').count(), 0);
      assert.equal(await viewer.locator('#rule-delete').isVisible(), false);
      assert.equal(await viewer.getByLabel('SQL', { exact: true }).getAttribute('readonly'), '');
    }
    await viewer.screenshot({ path: join(ARTIFACTS, '20-rule-viewer.png'), fullPage: true });
    assert.equal((await api('GET', '/tenants/demo/rules/viewer-e2e')).body.enabled, false);
  } finally {
    await context.close();
    await api('DELETE', '/tenants/demo/rules/viewer-e2e');
  }
});

test('rules: every action template is a valid skeleton (dry run, then saved disabled)', async () => {
  await page.setViewportSize({ width: 1280, height: 900 });
  await signedInOnDemo('#/rules?create');
  await page.getByRole('heading', { name: 'New rule — demo' }).waitFor();
  await page.getByLabel('Id', { exact: true }).fill('templates-e2e');
  await page.getByLabel('Start it at once').uncheck();
  for (const type of ['webhook', 'store_telemetry', 'update_twin', 'command', 'alarm']) {
    await page.locator('#rule-add-type').selectOption(type);
    await page.getByRole('button', { name: 'Add action' }).click();
  }
  // The first action's picker replaces its JSON; the error action gets its own template.
  await page.getByLabel('Template for Action 1').selectOption('republish');
  await page.getByLabel('Template for Error action (optional)').selectOption('error');
  await page.getByText('✓ The SQL compiles').waitFor();
  await page.getByLabel('Sample payload (JSON)').fill('{"temperature": 35}');
  await page.getByRole('button', { name: 'Dry run' }).click();
  await page.locator('#dry-run-actions', { hasText: 'alarm' }).waitFor();
  const rendered = JSON.parse(await page.locator('#dry-run-actions').textContent());
  assert.deepEqual(rendered.map(a => a.type), ['republish', 'webhook', 'store_telemetry', 'update_twin', 'command', 'alarm']);
  assert.ok(rendered.every(a => !a.error), JSON.stringify(rendered));
  await shot('21-rule-templates');
  await page.getByRole('button', { name: 'Create rule' }).click();
  await page.getByRole('heading', { name: 'templates-e2e', exact: true }).waitFor();
  const stored = (await api('GET', '/tenants/demo/rules/templates-e2e')).body;
  assert.equal(stored.enabled, false);
  assert.equal(stored.actions.length, 6);
  assert.equal(stored.error_action.topic, 'rule-errors/${rule}');
  assert.equal((await api('DELETE', '/tenants/demo/rules/templates-e2e')).status, 204);
});


test('a device page tails live messages, revokes a credential, and a viewer cannot edit', async () => {
  await page.setViewportSize({ width: 1280, height: 900 });
  // A spare password to revoke (the demo device keeps connecting with its own).
  const spare = await api('POST', `/tenants/demo/devices/${DEVICE}/credentials`, { kind: 'password' });
  assert.equal(spare.status, 201);
  const spareId = spare.body.credential.id;
  await page.goto(hub.url + `/#/devices/${DEVICE}`);
  await page.getByRole('heading', { name: DEVICE, exact: true }).waitFor();
  assert.match(await page.locator('#role-name').textContent(), /admin/);
  // Live: the demo device publishes telemetry every 2 s ("in")...
  await page.locator('#tail-state').getByText('Live').waitFor();
  await eventually('a published message in the tail', async () => (await page.locator('#tail-list li[data-direction="in"]').count()) > 0);
  // ...and a command sent to it is a delivery ("out").
  await page.getByLabel('Name', { exact: true }).fill('ping');
  await page.getByLabel('Payload (JSON)').fill('{"tail": true}');
  await page.getByRole('button', { name: 'Invoke' }).click();
  await eventually('a delivery in the tail', async () => (await page.locator('#tail-list li[data-direction="out"]').count()) > 0);
  assert.match(await page.locator('#tail-list li[data-direction="out"]').first().textContent(), /commands/);
  // Newest first, and paused means no redraw while messages keep being counted.
  await page.locator('#tail-pause').click();
  const frozen = await page.locator('#tail-list li').count();
  await eventually('a message counted while paused', async () => /paused, [1-9]\d* new/.test(await page.locator('#tail-counts').textContent()));
  assert.equal(await page.locator('#tail-list li').count(), frozen);
  await page.locator('#tail-pause').click();
  await shot('22-device-tail');

  // The spare password is listed and revoked (after confirming).
  const row = page.locator(`#credentials tr[data-credential="${spareId}"]`);
  await eventually('the spare password listed', async () => (await row.getAttribute('data-state')) === 'active');
  page.once('dialog', d => d.accept());
  await row.locator('[data-revoke]').click();
  await eventually('the password revoked', async () => (await row.getAttribute('data-state')) === 'revoked');
  const listed = (await api('GET', `/tenants/demo/devices/${DEVICE}/credentials`)).body;
  assert.ok(listed.find(c => c.id === spareId).revoked_at, 'revoked in the registry');
  // A new password appears in the list at once.
  const before = await page.locator('#credentials tbody tr').count();
  await page.getByRole('button', { name: 'New password' }).click();
  await eventually('the new password listed', async () => (await page.locator('#credentials tbody tr').count()) === before + 1);
  await shot('23-credentials-list');

  // A viewer: sees the device and its tail, and every change is disabled with the role it needs.
  const viewer = await api('POST', '/tokens', { name: 'console viewer', role: 'viewer', tenant: 'demo' });
  assert.equal(viewer.status, 201);
  await page.locator('#sign-out').click();
  await page.getByLabel('Operator API token').fill(viewer.body.secret);
  await page.getByRole('button', { name: 'Sign in' }).click();
  // Signed in where it was: the device page.
  await page.getByRole('heading', { name: DEVICE, exact: true }).waitFor();
  assert.match(await page.locator('#role-name').textContent(), /viewer · demo/);
  await page.locator('#device-delete').waitFor();
  for (const sel of ['#device-toggle', '#device-delete', '#new-password', '#new-certificate', '#desired-save', '#command-invoke']) {
    assert.equal(await page.locator(sel).isDisabled(), true, `${sel} is disabled for a viewer`);
    assert.match(await page.locator(sel).getAttribute('title'), /Needs the operator role/, `${sel} says why`);
  }
  assert.equal(await page.locator('#desired-editor').evaluate(e => e.readOnly), true);
  await eventually('revoke buttons listed', async () => (await page.locator('#credentials [data-revoke]').count()) > 0);
  for (const b of await page.locator('#credentials [data-revoke]').all()) assert.equal(await b.isDisabled(), true);
  await eventually('the viewer sees the tail', async () => (await page.locator('#tail-list li[data-direction]').count()) > 0);
  await page.locator('[data-nav="devices"]').click();
  await page.getByRole('heading', { name: 'Devices — demo' }).waitFor();
  assert.equal(await page.locator('#create-device').isDisabled(), true);
  await shot('24-viewer-device');
  // Signed out again: the tests after this one sign in as the admin.
  await page.locator('#sign-out').click();
  await page.getByLabel('Operator API token').waitFor();
});


// A minimal MQTT 3.1.1 client over TCP (CONNECT with a user name and password and a persistent
// session, QoS 0 PUBLISH):
// the suite has no MQTT library, and a retained message and a session of our own are all it needs.
async function rawMqtt(addr, clientId, username, password) {
  const net = await import('node:net');
  const [host, port] = [addr.slice(0, addr.lastIndexOf(':')), Number(addr.slice(addr.lastIndexOf(':') + 1))];
  const str = s => { const b = Buffer.from(s, 'utf8'); return Buffer.concat([Buffer.from([b.length >> 8, b.length & 0xff]), b]); };
  const packet = (first, body) => {
    const len = [];
    let n = body.length;
    do { let d = n % 128; n = Math.floor(n / 128); if (n > 0) d |= 0x80; len.push(d); } while (n > 0);
    return Buffer.concat([Buffer.from([first, ...len]), body]);
  };
  const socket = net.connect({ host, port });
  const closed = new Promise(r => socket.once('close', r));
  const connack = new Promise((ok, fail) => {
    socket.once('data', d => (d[0] === 0x20 && d[3] === 0 ? ok() : fail(new Error('CONNACK refused: ' + d.toString('hex')))));
    socket.once('error', fail);
  });
  await new Promise(r => socket.once('connect', r));
  socket.write(packet(0x10, Buffer.concat([str('MQTT'), Buffer.from([4, 0xc0, 0, 60]), str(clientId), str(username), str(password)])));
  await connack;
  return {
    closed,
    publishRetained(topic, payload) { socket.write(packet(0x31, Buffer.concat([str(topic), Buffer.from(payload)]))); },
    end() { socket.destroy(); },
  };
}

test('broker page: a demo device\'s session and subscriptions, a retained message, kick, $SYS, top talkers', async () => {
  await page.setViewportSize({ width: 1280, height: 900 });
  // A client of our own: it retains a message and is the session we kick.
  const tool = 'console-tool';
  assert.equal((await api('POST', '/tenants/demo/devices', { id: tool })).status, 201);
  const secret = 'console-tool-secret-0123456789';
  assert.equal((await api('POST', `/tenants/demo/devices/${tool}/credentials`, { kind: 'password', secret })).status, 201);
  const client = await rawMqtt(hub.mqtt, tool, `demo/${tool}`, secret);
  client.publishRetained(`devices/${tool}/status`, JSON.stringify({ state: 'ready', firmware: '1.2.3' }));
  await eventually('the retained message stored', async () =>
    (await api('GET', `/tenants/demo/broker/retained/${encodeURIComponent(`devices/${tool}/status`)}`)).status === 200);

  // Sessions: find the demo device, open it, see its subscriptions.
  await signedInOnDemo('#/overview');
  await page.getByRole('link', { name: 'Broker' }).click();
  await page.getByRole('heading', { name: 'Broker — demo' }).waitFor();
  await page.getByLabel('Client id starts with').fill(DEVICE);
  await page.getByRole('button', { name: 'Search' }).click();
  await page.getByRole('link', { name: DEVICE, exact: true }).first().waitFor();
  await shot('25-broker-sessions');
  await page.locator('tbody a', { hasText: DEVICE }).first().click();
  await page.getByRole('heading', { name: `Session ${DEVICE}` }).waitFor();
  await eventually('the device\'s subscriptions', async () => (await page.locator('table').textContent()).includes(`$devices/${DEVICE}/commands/req/#`));
  assert.match(await page.locator('.card dl').textContent(), /MQTT 5\.0 over tcp/);
  await shot('26-broker-session');

  // Retained: search by topic filter, open the message, see its payload.
  await page.getByRole('link', { name: 'Retained' }).click();
  await page.getByLabel('Topic filter').fill('devices/#');
  await page.getByRole('button', { name: 'Search' }).click();
  await page.getByRole('link', { name: `devices/${tool}/status` }).click();
  await eventually('the payload', async () => (await page.locator('#retained-payload').textContent()).includes('"firmware": "1.2.3"'));
  await shot('27-broker-retained');

  // Kick our client (confirmed): its connection ends, the session stays (offline).
  await page.goto(hub.url + `/#/broker/sessions/${tool}`);
  await page.getByRole('heading', { name: `Session ${tool}` }).waitFor();
  await eventually('Kick enabled', async () => !(await page.locator('#session-kick').isDisabled()));
  page.once('dialog', d => d.accept());
  await page.locator('#session-kick').click();
  await page.getByText('Client kicked.').waitFor();
  await Promise.race([client.closed, new Promise((_, fail) => setTimeout(() => fail(new Error('the kicked client is still connected')), 10000))]);
  await eventually('shown offline', async () => (await page.locator('.card dl').textContent()).includes('offline'));
  await shot('28-broker-kicked');

  // $SYS: the whole hub's figures, refreshed.
  await page.getByRole('link', { name: '$SYS' }).click();
  await eventually('the version', async () => (await page.locator('#sys-version').textContent()).startsWith('ferrohub'));
  await eventually('clients connected', async () => Number((await page.locator('#sys-clients_connected').textContent()).replace(/[^0-9]/g, '')) > 0);
  await shot('29-broker-sys');

  // The overview names the tenant's top talkers (the demo fleet publishes every few seconds).
  await page.getByRole('link', { name: 'Overview' }).click();
  await eventually('top talkers', async () => (await page.locator('#top-talkers a').count()) > 0);
  await eventually('connections by protocol', async () => (await page.locator('section').filter({ hasText: 'Connections by protocol' }).textContent()).includes('MQTT 5.0'));
  await shot('30-overview-broker');
  client.end();
});

// ---- alarms (alarms.js) ------------------------------------------------------------------------

test('alarms: the overview counts them, the list shows a new one live, acknowledge there, clear with a note on its page', async () => {
  await page.setViewportSize({ width: 1280, height: 900 });
  await signedInOnDemo('#/overview');
  await page.getByRole('heading', { name: 'Fleet overview — demo' }).waitFor();
  const raise = body => api('POST', '/tenants/demo/alarms', body);
  assert.equal((await raise({ key: 'e2e:disk', severity: 'minor', device: DEVICE, message: 'disk 91 % full' })).status, 201);
  // The overview's card follows the overview stream.
  await eventually('the overview counting the alarm', async () => (await page.locator('#ov-alarms-total').textContent()) === '1');
  await shot('31-overview-alarms');

  await page.getByRole('link', { name: 'Alarms', exact: true }).click();
  await page.getByRole('heading', { name: 'Alarms — demo' }).waitFor();
  await page.locator('tr[data-state="active"]', { hasText: 'e2e:disk' }).waitFor();
  await page.getByText('Live: new alarms and changes show as they happen.').waitFor();
  // Raised while the list is open: it appears at the top without a reload; raised again, its
  // count goes up in place.
  assert.equal((await raise({ key: 'e2e:overheat', severity: 'critical', device: DEVICE, message: 'bearing 92 °C', details: { temperature: 92 } })).status, 201);
  const overheat = page.locator('tbody tr', { hasText: 'e2e:overheat' });
  await overheat.waitFor();
  assert.match(await page.locator('tbody tr').first().textContent(), /e2e:overheat/);
  assert.equal((await raise({ key: 'e2e:overheat', severity: 'critical', device: DEVICE, message: 'bearing 95 °C', details: { temperature: 95 } })).status, 200);
  await eventually('the count raised in place', async () => (await overheat.locator('td.num').textContent()) === '2');
  await eventually('the counts', async () => (await page.locator('#alarm-count-critical').textContent()) === '1'
    && (await page.locator('#alarm-count-unacknowledged').textContent()) === '2');
  await shot('32-alarms-live');

  // Filter by severity (in the URL, so it can be bookmarked).
  await page.getByLabel('Severity').selectOption('critical');
  await page.getByRole('button', { name: 'Filter' }).click();
  await eventually('only the critical one', async () => (await page.locator('tbody tr').count()) === 1
    && (await page.locator('tbody').textContent()).includes('e2e:overheat'));
  assert.match(page.url(), /severity=critical/);

  // Acknowledge in the list: the row changes state, the API agrees.
  await page.getByRole('button', { name: 'Acknowledge e2e:overheat' }).click();
  await page.locator('tr[data-state="acknowledged"]', { hasText: 'e2e:overheat' }).waitFor();
  const listed = (await api('GET', '/tenants/demo/alarms?key=e2e:overheat')).body.items[0];
  assert.equal(listed.state, 'acknowledged');
  assert.ok(listed.acknowledged_by, 'who acknowledged it is recorded');

  // Its page: facts, details, history; clear it with a note.
  await page.getByRole('link', { name: 'e2e:overheat' }).click();
  await page.getByRole('heading', { name: /e2e:overheat/ }).waitFor();
  await eventually('the details', async () => (await page.locator('#alarm-details').textContent()).includes('"temperature": 95'));
  assert.equal(await page.locator('#alarm-ack').isDisabled(), true, 'already acknowledged');
  await eventually('three history rows', async () => (await page.locator('section', { hasText: 'History' }).locator('tbody tr').count()) === 3);
  await page.getByLabel('Note (kept in the history)').fill('bearing replaced');
  await page.locator('#alarm-clear').click();
  await page.getByText('Cleared.').waitFor();
  await eventually('the clear in the history', async () => (await page.locator('section', { hasText: 'History' }).locator('tbody tr').first().textContent()).includes('bearing replaced'));
  assert.match(await page.locator('[data-field="state"]').textContent(), /cleared/);
  assert.equal(await page.locator('#alarm-clear').isDisabled(), true);
  await shot('33-alarm-cleared');

  // Cleared elsewhere while its page is open: shown at once. A second clear is explained.
  await page.goto(hub.url + '/#/alarms?state=all&key=e2e:disk');
  await page.getByRole('link', { name: 'e2e:disk' }).click();
  await page.getByRole('heading', { name: /e2e:disk/ }).waitFor();
  await eventually('Clear enabled', async () => !(await page.locator('#alarm-clear').isDisabled()));
  const disk = (await api('GET', '/tenants/demo/alarms?key=e2e:disk')).body.items[0];
  assert.equal((await api('POST', `/tenants/demo/alarms/${disk.id}/clear`, { note: 'cleaned up' })).status, 200);
  await eventually('the clear shown live', async () => (await page.locator('[data-field="state"]').textContent()).includes('cleared'));
  await eventually('the overview back to none', async () => (await api('GET', '/tenants/demo/alarms/counts')).body.total === 0);
});

test('alarms: a viewer may look but not acknowledge, and does not see the channels', async () => {
  const raised = await api('POST', '/tenants/demo/alarms', { key: 'e2e:viewer', severity: 'warning', message: 'look only' });
  assert.equal(raised.status, 201);
  const token = await api('POST', '/tokens', { name: 'console-e2e-alarm-viewer', role: 'viewer', tenant: 'demo' });
  assert.equal(token.status, 201);
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const viewer = await context.newPage();
  viewer.on('pageerror', e => console.error('page error:', e));
  try {
    await viewer.goto(hub.url + '/#/alarms');
    await viewer.getByLabel('Operator API token').fill(token.body.secret);
    await viewer.getByRole('button', { name: 'Sign in' }).click();
    await viewer.getByRole('heading', { name: 'Alarms — demo' }).waitFor();
    const ack = viewer.getByRole('button', { name: 'Acknowledge e2e:viewer' });
    await ack.waitFor();
    assert.equal(await ack.isDisabled(), true);
    assert.match(await ack.getAttribute('title'), /Needs the operator role/);
    await viewer.getByRole('link', { name: 'Notification channels' }).click();
    await viewer.getByText(/only admins see them/).waitFor();
    await viewer.screenshot({ path: join(ARTIFACTS, '34-alarms-viewer.png'), fullPage: true });
    assert.equal((await api('GET', `/tenants/demo/alarms/${raised.body.id}`)).body.state, 'active');
  } finally {
    await context.close();
    await api('POST', `/tenants/demo/alarms/${raised.body.id}/clear`);
  }
});

test('alarm channels: a template error points at its field, a test reaches a local webhook, a raised alarm notifies, delete', async () => {
  const { createServer } = await import('node:http');
  const received = [];
  const server = createServer((req, res) => {
    let body = '';
    req.on('data', c => { body += c; });
    req.on('end', () => { received.push({ url: req.url, headers: req.headers, body }); res.writeHead(204); res.end(); });
  });
  await new Promise(r => server.listen(0, '127.0.0.1', r));
  const hookUrl = `http://127.0.0.1:${server.address().port}/hook`;
  try {
    await page.setViewportSize({ width: 1280, height: 900 });
    await signedInOnDemo('#/alarms/channels');
    await page.getByRole('heading', { name: 'Notification channels — demo' }).waitFor();
    await page.getByText(/No channels yet/).waitFor();
    await page.locator('#channel-create').click();
    await page.getByRole('heading', { name: 'New notification channel' }).waitFor();
    await page.getByLabel('Id (letters, digits, _ - .)').fill('ops-e2e');
    await page.getByLabel('Webhook URL (a template)').fill(hookUrl + '/{{ alarm.severity }}');
    await page.getByLabel('Minimum severity').selectOption('major');
    await page.getByLabel('Rate limit per alarm (s, 0: none)').fill('0');
    await page.getByLabel('Headers (JSON object of name → template)').fill('{"x-alarm-key": "{{ alarm.key }}"}');
    // A template that does not parse: refused, the message names the field.
    await page.getByLabel('Body template (minijinja over alarm, event, tenant, channel)').fill('{"text": "{{ alarm.key "}');
    await page.locator('#channel-save').click();
    await eventually('the template error', async () => /body/.test(await page.locator('#channel-status').textContent()));
    await shot('35-channel-template-error');
    await page.getByLabel('Body template (minijinja over alarm, event, tenant, channel)').fill('{"text": "{{ alarm.severity }}: {{ alarm.key }} {{ event.kind }}"}');
    await page.locator('#channel-save').click();
    await page.getByRole('heading', { name: 'Channel ops-e2e' }).waitFor();

    // A test goes out now and is logged.
    await page.locator('#channel-test').click();
    await page.getByText(/Test sent: HTTP 204/).waitFor();
    await eventually('the test delivery logged', async () => (await page.locator('tr[data-status="sent"]').count()) === 1);
    assert.equal(received.length, 1);
    assert.equal(received[0].url, '/hook/critical');

    // A major alarm notifies through the template; a minor one is below the channel's minimum.
    assert.equal((await api('POST', '/tenants/demo/alarms', { key: 'e2e:pump', severity: 'minor' })).status, 201);
    assert.equal((await api('POST', '/tenants/demo/alarms', { key: 'e2e:valve', severity: 'major', device: DEVICE })).status, 201);
    await eventually('the webhook called for the major alarm', async () => received.length === 2);
    assert.equal(received[1].url, '/hook/major');
    assert.equal(received[1].headers['x-alarm-key'], 'e2e:valve');
    assert.equal(JSON.parse(received[1].body).text, 'major: e2e:valve raised');
    await page.reload();
    await eventually('two deliveries listed', async () => (await page.locator('tr[data-status="sent"]').count()) === 2);
    assert.match(await page.locator('#channel-counters').textContent(), /Sent 2/);
    await shot('36-channel-deliveries');

    // The list shows it; Escape cancels a delete, Delete removes it.
    await page.getByRole('link', { name: '← Notification channels' }).click();
    await page.locator('tr[data-channel="ops-e2e"] [data-counter="sent"]', { hasText: '2' }).waitFor();
    await page.getByRole('link', { name: 'ops-e2e' }).click();
    await page.locator('#channel-delete').click();
    await page.keyboard.press('Escape');
    assert.equal((await api('GET', '/tenants/demo/alarm-channels/ops-e2e')).status, 200);
    await page.locator('#channel-delete').click();
    await page.locator('#channel-delete-confirm').click();
    await page.getByText(/No channels yet/).waitFor();
    assert.equal((await api('GET', '/tenants/demo/alarm-channels/ops-e2e')).status, 404);
  } finally {
    server.close();
    for (const key of ['e2e:pump', 'e2e:valve']) {
      const a = (await api('GET', `/tenants/demo/alarms?key=${key}&state=open`)).body?.items?.[0];
      if (a) await api('POST', `/tenants/demo/alarms/${a.id}/clear`);
    }
  }
});
