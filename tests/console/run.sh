#!/usr/bin/env bash
# Runs the console's end-to-end tests: installs playwright-core (no browser download: Debian's
# /usr/bin/chromium is used) and runs them against target/debug/ferrohub. Fails if Chromium is
# missing. Screenshots: target/console-artifacts/.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x "${CHROMIUM:-/usr/bin/chromium}" ]; then
  echo "chromium not found at ${CHROMIUM:-/usr/bin/chromium}: apt-get install -y chromium" >&2
  exit 1
fi
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
if [ -f package-lock.json ]; then npm ci --no-audit --no-fund; else npm install --no-audit --no-fund; fi
npm test
