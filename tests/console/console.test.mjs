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
  await shot('11-device-tail');

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
  await shot('12-credentials-list');

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
  await shot('13-viewer-device');
});
