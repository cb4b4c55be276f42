// Starts the real hub binary (target/debug/ferrohub serve --demo) on free ports with a fresh data
// directory and a known admin token, and stops it again.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
export const ADMIN_TOKEN = 'fh_console_e2e_admin_token_0123456789';

export async function startHub() {
  const binary = process.env.FERROHUB_BIN || join(ROOT, 'target', 'debug', 'ferrohub');
  if (!existsSync(binary)) throw new Error(`${binary} not found: run \`cargo build -p ferrohub\` first`);
  const dataDir = mkdtempSync(join(tmpdir(), 'ferrohub-console-e2e-'));
  const env = {
    ...process.env,
    RUST_LOG: 'info',
    FERROHUB_ADMIN_TOKEN: ADMIN_TOKEN,
    FERROHUB_STORAGE__FSYNC: 'never',
    // Cheap argon2id: same algorithm, lower cost, so the demo fleet connects quickly.
    FERROHUB_REGISTRY__PASSWORD__MEMORY_KIB: '1024',
    FERROHUB_REGISTRY__PASSWORD__ITERATIONS: '1',
  };
  const proc = spawn(binary, ['serve', '--demo', '--log-format', 'json', '--data-dir', dataDir,
    '--mqtt-listen', '127.0.0.1:0', '--ws-listen', '127.0.0.1:0', '--http-listen', '127.0.0.1:0'],
  { env, stdio: ['ignore', 'ignore', 'pipe'] });
  const addrs = {};
  const log = [];
  await new Promise((ready, fail) => {
    const timer = setTimeout(() => fail(new Error('the hub did not start within 30 s:\n' + log.join('\n'))), 30000);
    proc.on('exit', code => { clearTimeout(timer); fail(new Error(`the hub exited (${code}):\n` + log.join('\n'))); });
    createInterface({ input: proc.stderr }).on('line', line => {
      if (log.length < 200) log.push(line);
      let fields;
      try { fields = JSON.parse(line).fields || {}; } catch { return; }
      if (fields.message === 'listening') addrs[fields.protocol] = fields.addr;
      if (fields.message === 'ferrohub is ready') { clearTimeout(timer); ready(); }
    });
  });
  return {
    url: `http://${addrs.http}`,
    mqtt: addrs.mqtt,
    async stop() {
      if (proc.exitCode === null) {
        const exited = new Promise(r => proc.once('exit', r));
        proc.kill('SIGTERM');
        await Promise.race([exited, new Promise(r => setTimeout(r, 10000))]);
        if (proc.exitCode === null) proc.kill('SIGKILL');
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}
