#!/usr/bin/env bash
# Twins and commands of a running Ferrohub, measured with `ferrohub bench twins|commands`.
#
#   scripts/bench-twins.sh                 # 3 runs of each scenario (about 10 minutes)
#   scripts/bench-twins.sh --runs 1 --scenarios twins-latency,commands
#   scripts/bench-twins.sh --scenarios fill   # a million twins: the hub's RSS and disk
#
# Every run starts a fresh hub (release build, --allow-anonymous: the harness acts for many
# devices over few connections; storage.fsync = always, the default) on a new data directory.
# Scenarios:
#   twins-latency     1,000 devices over 100 connections, one update in flight per connection:
#                     accepted updates/s and the accept latency (publish -> update/accepted)
#   twins-throughput  the same with 8 in flight per connection: the most the hub accepts
#   twins-paced       10,000 updates/s offered (TWINS_RATE): the latency at a fixed rate
#   commands          10,000 devices connected (answering at once), 8 operators sending direct
#                     commands over HTTP: round-trip latency as the operator sees it
#   fill              FILL_DEVICES (1,000,000) twins written over one connection, then the hub's
#                     RSS and twins.db size
# Prints one JSON line per run and a Markdown table of medians. Raw lines go to
# bench-results/twins-<timestamp>/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${FERROHUB_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ferrohub}
PORT=${PORT:-21893}
HTTP_PORT=${HTTP_PORT:-28093}
TWINS_RATE=${TWINS_RATE:-10000}
FILL_DEVICES=${FILL_DEVICES:-1000000}
RUNS=3
SCENARIOS=twins-latency,twins-throughput,twins-paced,commands
TOKEN=fh_bench_twins_admin_token_0123456789

while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) RUNS=$2; shift ;;
        --scenarios) SCENARIOS=$2; shift ;;
        -h|--help) sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-twins.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

[[ -x $BIN ]] || (cd "$ROOT" && cargo build --release -p ferrohub)
OUT=$ROOT/bench-results/twins-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
# shellcheck source=scripts/bench-hub.sh
source "$ROOT/scripts/bench-hub.sh"

run() {
    local name=$1; shift
    start_hub FERROHUB_ADMIN_TOKEN=$TOKEN
    "$BIN" bench "$@" --port $PORT --broker-pid "$HUB_PID" --label "$name" | tee -a "$OUT/$name.jsonl"
    if [[ $name == fill ]]; then
        echo "{\"scenario\":\"fill-disk\",\"twins_db_mib\":$(du -sm "$OUT/data/twins.db" | cut -f1)}" |
            tee -a "$OUT/$name.jsonl"
    fi
    stop_hub
}

for r in $(seq "$RUNS"); do
    for s in ${SCENARIOS//,/ }; do
        case $s in
            twins-latency) run $s twins --devices 1000 --connections 100 --inflight 1 --duration 10 ;;
            twins-throughput) run $s twins --devices 1000 --connections 100 --inflight 8 --duration 10 ;;
            twins-paced) run $s twins --devices 1000 --connections 100 --inflight 8 --rate "$TWINS_RATE" --duration 10 ;;
            commands) run $s commands --devices 10000 --http-port $HTTP_PORT --token $TOKEN \
                --http-concurrency 8 --duration 10 --connect-concurrency 64 ;;
            fill) run $s twins --devices "$FILL_DEVICES" --connections 1 --inflight 256 --warmup 0 \
                --duration $(( FILL_DEVICES / 8000 + 30 )) ;;
            *) echo "unknown scenario $s" >&2; exit 2 ;;
        esac
    done
done

python3 - "$OUT" <<'EOF'
import json, statistics, sys, pathlib
out = pathlib.Path(sys.argv[1])
print("\n| scenario | runs | rate/s (median) | p50 ms | p99 ms | hub CPU cores | hub RSS MiB |")
print("|---|---|---|---|---|---|---|")
for f in sorted(out.glob("*.jsonl")):
    rows = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "p99_ms" in r]
    if not rows:
        continue
    med = lambda k: statistics.median(r.get(k) or 0 for r in rows)
    rate = "accepted_per_s" if "accepted_per_s" in rows[0] else "commands_per_s"
    print(f"| {f.stem} | {len(rows)} | {med(rate):,.0f} | {med('p50_ms'):.2f} | {med('p99_ms'):.2f} "
          f"| {med('broker_cpu_cores'):.2f} | {med('broker_rss_mib'):.0f} |")
EOF
echo "raw results: $OUT"
