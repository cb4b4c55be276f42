#!/usr/bin/env bash
# End-to-end telemetry ingest of a running Ferrohub, measured with `ferrohub bench telemetry`:
# MQTT publishers → decode → write-ahead log (fsync) → PUBACK; acknowledged messages × metrics is
# the stored rate, cross-checked against the hub's own ferrohub_tsdb_points_written_total.
#
#   scripts/bench-telemetry.sh                        # 3 runs of each scenario (about 3 minutes)
#   scripts/bench-telemetry.sh --runs 1 --scenarios batch10
#   scripts/bench-telemetry.sh --mosquitto            # each run also against Mosquitto (Debian's)
#
# Every run starts a fresh hub (release build, --allow-anonymous: the harness publishes for many
# devices over few connections; storage.fsync = always, the default) on a new data directory.
# Scenarios (QoS 1 JSON `{"ts": …, "m0": 21.37, …}` on devices/{id}/telemetry):
#   batch10     1,000 devices over 8 connections, 10 metrics a message, 64 in flight each
#   single      1,000 devices over 8 connections, 1 metric a message (the smallest payload)
#   fleet       10,000 devices over 100 connections, 10 metrics a message, 16 in flight each
# With --mosquitto, every scenario of every run is repeated right after against Mosquitto
# (allow_anonymous, no persistence) on the same load: a broker that acknowledges without storing
# anything, so the ratio is what durable storage of every point costs. Rows are labelled
# `<scenario>-mosquitto`.
# Prints one JSON line per run and a Markdown table of medians. Raw lines go to
# bench-results/telemetry-<timestamp>/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${FERROHUB_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ferrohub}
PORT=${PORT:-21894}
HTTP_PORT=${HTTP_PORT:-28094}
DURATION=${DURATION:-15}
RUNS=3
SCENARIOS=batch10,single,fleet
MOSQUITTO=

while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) RUNS=$2; shift ;;
        --scenarios) SCENARIOS=$2; shift ;;
        --mosquitto) MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto) ;;
        -h|--help) sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-telemetry.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

if [[ -z ${FERROHUB_BIN:-} ]]; then
    (cd "$ROOT" && cargo build --release -p ferrohub)
fi
OUT=$ROOT/bench-results/telemetry-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
# shellcheck source=scripts/bench-hub.sh
source "$ROOT/scripts/bench-hub.sh"

run() {
    local name=$1; shift
    start_hub
    "$BIN" bench telemetry "$@" --port $PORT --http-port $HTTP_PORT --broker-pid "$HUB_PID" \
        --duration "$DURATION" --label "$name" | tee -a "$OUT/$name.jsonl"
    stop_hub
    if [[ -n $MOSQUITTO ]]; then
        [[ -x $MOSQUITTO ]] || { echo "mosquitto is missing (apt-get install -y mosquitto)" >&2; exit 1; }
        printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 0\nmax_queued_messages 100000\n' \
            $((PORT + 1)) >"$OUT/mosquitto.conf"
        "$MOSQUITTO" -c "$OUT/mosquitto.conf" >"$OUT/mosquitto.log" 2>&1 &
        HUB_PID=$!
        wait_port $((PORT + 1)) || { echo "mosquitto did not start; see $OUT/mosquitto.log" >&2; exit 1; }
        "$BIN" bench telemetry "$@" --port $((PORT + 1)) --broker-pid "$HUB_PID" \
            --duration "$DURATION" --label "$name-mosquitto" | tee -a "$OUT/$name-mosquitto.jsonl"
        stop_hub
    fi
}

for r in $(seq "$RUNS"); do
    for s in ${SCENARIOS//,/ }; do
        case $s in
            batch10) run $s --devices 1000 --connections 8 --inflight 64 --metrics-per-message 10 ;;
            single) run $s --devices 1000 --connections 8 --inflight 64 --metrics-per-message 1 ;;
            fleet) run $s --devices 10000 --connections 100 --inflight 16 --metrics-per-message 10 ;;
            *) echo "unknown scenario $s" >&2; exit 2 ;;
        esac
    done
done

python3 - "$OUT" <<'EOF'
import json, statistics, sys, pathlib
out = pathlib.Path(sys.argv[1])
print("\n| scenario | runs | messages/s | points/s | hub-counted points/s | PUBACK p50 ms | p99 ms | hub CPU cores | hub RSS MiB |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for f in sorted(out.glob("*.jsonl")):
    rows = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "points_per_s" in r]
    if not rows:
        continue
    med = lambda k: statistics.median(r.get(k) or 0 for r in rows)
    print(f"| {f.stem} | {len(rows)} | {med('messages_per_s'):,.0f} | {med('points_per_s'):,.0f} "
          f"| {med('hub_points_per_s'):,.0f} | {med('p50_ms'):.2f} | {med('p99_ms'):.2f} "
          f"| {med('broker_cpu_cores'):.2f} | {med('broker_rss_mib'):.0f} |")
EOF
echo "raw results: $OUT"
