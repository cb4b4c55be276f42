#!/usr/bin/env bash
# The simulator as a load generator: how many devices and messages per second one `ferrohub sim`
# process drives, and what it costs in CPU, against Ferrohub and Mosquitto (Debian's) on this
# machine. Release build; every run starts a fresh broker.
#
#   scripts/bench-sim.sh                       # 3 runs of each scenario (about 15 minutes)
#   scripts/bench-sim.sh --runs 1 --scenarios light
#   scripts/bench-sim.sh --mosquitto           # each scenario also against Mosquitto
#
# Scenarios (19,000 devices: the most one process may hold here, with a margin; MQTT 5, one sample
# a message, JSON, `--topic bench/{device}` so the broker routes without storing; 60 s runs):
#   light    1 message/s per device (19,000 msgs/s offered), QoS 1: the simulator's CPU at ≤ 20k/s
#   heavy    every 150 ms (126,667 msgs/s offered), QoS 0
#   heavyq1  every 300 ms (63,333 msgs/s offered), QoS 1 (each message waits for its PUBACK)
#   procs    2 processes × 9,500 devices every 200 ms (95,000 msgs/s offered), QoS 0, one summary
# (Offered loads that saturate both cores leave part of the fleet unconnected: devices already
# connected publish, and handshakes wait for CPU; no steady window then.)
# Devices connect at 2,000/s; rates and the simulator's CPU are the summary's steady window (from
# the first second every device was connected to the stop: `steady_msgs_per_s`, `steady_cpu_s`),
# the broker's CPU is from /proc over the whole run (ramp-up included).
# Prints one JSON line per run and a Markdown table of medians; raw lines go to
# bench-results/sim-<timestamp>/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${FERROHUB_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ferrohub}
PORT=${PORT:-21895}
HTTP_PORT=${HTTP_PORT:-28095}
DURATION=${DURATION:-60}
RUNS=3
SCENARIOS=light,heavy,heavyq1,procs
MOSQUITTO=

while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) RUNS=$2; shift ;;
        --scenarios) SCENARIOS=$2; shift ;;
        --mosquitto) MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto) ;;
        -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-sim.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

if [[ -z ${FERROHUB_BIN:-} ]]; then
    (cd "$ROOT" && cargo build --release -p ferrohub)
fi
OUT=$ROOT/bench-results/sim-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
# shellcheck source=scripts/bench-hub.sh
source "$ROOT/scripts/bench-hub.sh"
ulimit -n "$(ulimit -Hn)"

# CPU seconds (user + system) of a process so far.
cpu_of() {
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print ($12 + $13) / hz }' "/proc/$1/stat"
}

# sim_run NAME BROKER_PID BROKER_PORT SIM-FLAGS...: one run, one JSON line.
sim_run() {
    local name=$1 pid=$2 port=$3; shift 3
    local c0 t0 c1 t1
    c0=$(cpu_of "$pid"); t0=$(date +%s.%N)
    "$BIN" sim run --port "$port" --connect-rate 2000 --connect-concurrency 256 --batch 1 \
        --topic 'bench/{device}' --duration "${DURATION}s" --no-progress --json "$@" \
        >"$OUT/$name.last.json" 2>>"$OUT/$name.err" || true
    c1=$(cpu_of "$pid"); t1=$(date +%s.%N)
    python3 - "$OUT/$name.last.json" "$name" "$c0" "$c1" "$t0" "$t1" <<'EOF' | tee -a "$OUT/$name.jsonl"
import json, sys
path, name, c0, c1, t0, t1 = sys.argv[1:]
try:
    s = json.loads(open(path).read())
except Exception as e:
    print(json.dumps({"label": name, "error": f"no summary: {e}"}))
    sys.exit(0)
wall = float(t1) - float(t0)
print(json.dumps({
    "label": name,
    "devices": s["devices"], "connected": s["connected"], "processes": s.get("processes", 1),
    "qos": s["qos"], "steady_msgs_per_s": round(s.get("steady_msgs_per_s", 0)),
    "msgs_per_s": round(s["msgs_per_s"]), "errors": s["errors"],
    "p50_ms": s["latency_p50_ms"], "p99_ms": s["latency_p99_ms"],
    "sim_cpu_cores": round(s.get("steady_cpu_s", 0) / max(s.get("steady_s", 0), 1e-9), 3),
    "sim_cpu_us_per_msg": round(1e6 * s.get("steady_cpu_s", 0) / max(s.get("steady_msgs", 0), 1), 2),
    "broker_cpu_cores": round((float(c1) - float(c0)) / wall, 3),
}))
EOF
}

# The heavy scenarios measure publishing alone (devices still report their twin in `light`).
PURE="--no-twin --no-commands"

scenario() {
    local s=$1 pid=$2 port=$3 label=$4
    case $s in
        light) sim_run "$label" "$pid" "$port" -n 19000 --interval 1s --qos 1 ;;
        heavy) sim_run "$label" "$pid" "$port" -n 19000 --interval 150ms --qos 0 $PURE ;;
        heavyq1) sim_run "$label" "$pid" "$port" -n 19000 --interval 300ms --qos 1 $PURE ;;
        procs) sim_run "$label" "$pid" "$port" -n 19000 --processes 2 --interval 200ms --qos 0 $PURE ;;
        *) echo "unknown scenario $s" >&2; exit 2 ;;
    esac
}

for r in $(seq "$RUNS"); do
    for s in ${SCENARIOS//,/ }; do
        start_hub
        scenario "$s" "$HUB_PID" "$PORT" "$s"
        stop_hub
        if [[ -n $MOSQUITTO ]]; then
            [[ -x $MOSQUITTO ]] || { echo "mosquitto is missing (apt-get install -y mosquitto)" >&2; exit 1; }
            printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 0\nmax_queued_messages 100000\n' \
                $((PORT + 1)) >"$OUT/mosquitto.conf"
            "$MOSQUITTO" -c "$OUT/mosquitto.conf" >"$OUT/mosquitto.log" 2>&1 &
            HUB_PID=$!
            wait_port $((PORT + 1)) || { echo "mosquitto did not start; see $OUT/mosquitto.log" >&2; exit 1; }
            scenario "$s" "$HUB_PID" $((PORT + 1)) "$s-mosquitto"
            stop_hub
        fi
    done
done

python3 - "$OUT" <<'EOF'
import json, statistics, sys, pathlib
out = pathlib.Path(sys.argv[1])
print("\n| scenario | runs | connected | steady msgs/s | errors | p50 ms | p99 ms | sim CPU cores | sim µs/msg | broker CPU cores |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for f in sorted(out.glob("*.jsonl")):
    rows = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "steady_msgs_per_s" in r]
    if not rows:
        continue
    med = lambda k: statistics.median(r.get(k) or 0 for r in rows)
    print(f"| {f.stem} | {len(rows)} | {med('connected'):,.0f} | {med('steady_msgs_per_s'):,.0f} "
          f"| {med('errors'):,.0f} | {med('p50_ms'):.2f} | {med('p99_ms'):.2f} "
          f"| {med('sim_cpu_cores'):.2f} | {med('sim_cpu_us_per_msg'):.1f} | {med('broker_cpu_cores'):.2f} |")
EOF
echo "raw results: $OUT"
