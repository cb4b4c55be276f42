#!/usr/bin/env bash
# Ferrohub's MQTT broker against Mosquitto and rumqttd, measured on this machine in the same run.
#
# Starts each broker with its own benchmark configuration on its own port (one broker at a time, a
# fresh process for every run), drives it with the `ferrohub bench` harness (raw MQTT on tokio),
# alternating brokers run by run, and prints a Markdown table of medians with Ferrohub/Mosquitto
# and Ferrohub/rumqttd ratios. Raw JSON lines go to bench-results/<timestamp>/raw/.
#
#   scripts/bench.sh                      # everything, 3 runs per broker (about 1.5-2 hours)
#   scripts/bench.sh --quick              # short windows, one run (about 15 minutes)
#   scripts/bench.sh --scenarios fanin-q0,idle --brokers ferrohub,mosquitto
#
# Scenarios: fanin-q0, fanin-q1 (8 publishers -> 1 wildcard subscriber, offered-rate ladders),
# fanout (1 -> 100 subscribers, ladder), pairs (1,000 QoS 1 pairs, ladder), latency-fanin and
# latency-pairs (paced 10,000 msg/s, QoS 1), idle (15,000 and the most this machine allows).
# A ladder's result is its maximum sustainable rate: the highest offered rate sent in full with
# loss <= 0.5 % and p99 <= 100 ms.
#
# Needs: cargo, python3; installs mosquitto (apt-get, as root) and rumqttd (cargo install) when
# missing. Environment overrides: CARGO_TARGET_DIR, FERROHUB_BIN, HARNESS_BIN, FERROHUB_PORT,
# MOSQUITTO_PORT, RUMQTTD_V4_PORT, RUMQTTD_V5_PORT, IDLE_MAX, and the LADDER_* variables below.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE="$ROOT/scripts/bench"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
FERROHUB_BIN=${FERROHUB_BIN:-$TARGET_DIR/release/ferrohub}

FERROHUB_PORT=${FERROHUB_PORT:-21883}
MOSQUITTO_PORT=${MOSQUITTO_PORT:-21884}
RUMQTTD_V4_PORT=${RUMQTTD_V4_PORT:-21885}
RUMQTTD_V5_PORT=${RUMQTTD_V5_PORT:-21886}

# Offered-rate ladders (messages/s published; fan-out deliveries are 100x).
LADDER_FANIN_Q0=${LADDER_FANIN_Q0:-25k,50k,75k,100k,125k,150k,175k,200k,250k,300k,350k,400k,500k}
LADDER_FANIN_Q1=${LADDER_FANIN_Q1:-10k,20k,40k,60k,80k,100k,120k,150k,200k,250k,300k}
LADDER_FANOUT=${LADDER_FANOUT:-250,500,1000,1250,1500,1750,2000,2500,3000,4000,5000}
LADDER_PAIRS=${LADDER_PAIRS:-5k,10k,20k,30k,40k,50k,60k,80k,100k}
LATENCY_RATE=${LATENCY_RATE:-10000}
LATENCY_QOS=${LATENCY_QOS:-1}

ALL_SCENARIOS=fanin-q0,fanin-q1,fanout,pairs,latency-fanin,latency-pairs,idle
ALL_BROKERS=ferrohub,mosquitto,rumqttd
SCENARIOS=$ALL_SCENARIOS
BROKERS=$ALL_BROKERS
RUNS=3
QUICK=0
BUILD=1
PROTOCOL=v3
OUT=""

usage() {
    sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    cat <<EOF

Options:
  --quick              3 s windows, 1 run per broker (a smoke test, not a result)
  --runs N             runs per broker and scenario (default 3; medians are reported)
  --scenarios LIST     comma-separated subset of: $ALL_SCENARIOS
  --brokers LIST       comma-separated subset of: $ALL_BROKERS
  --protocol v3|v5     MQTT 3.1.1 (default) or 5.0
  --out DIR            results directory (default bench-results/<timestamp>)
  --no-build           use the binaries already built
  -h, --help           this text
EOF
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1; RUNS=1 ;;
        --runs) RUNS=$2; shift ;;
        --scenarios) SCENARIOS=$2; shift ;;
        --brokers) BROKERS=$2; shift ;;
        --protocol) PROTOCOL=$2; shift ;;
        --out) OUT=$2; shift ;;
        --no-build) BUILD=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

die() { echo "bench.sh: $*" >&2; exit 1; }
log() { echo "[bench $(date +%H:%M:%S)] $*" >&2; }
has() { [[ ",$1," == *",$2,"* ]]; }

for s in ${SCENARIOS//,/ }; do has "$ALL_SCENARIOS" "$s" || die "unknown scenario $s"; done
for b in ${BROKERS//,/ }; do has "$ALL_BROKERS" "$b" || die "unknown broker $b"; done
[[ $PROTOCOL == v3 || $PROTOCOL == v5 ]] || die "--protocol must be v3 or v5"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive integer"
command -v python3 >/dev/null || die "python3 is needed for the report"

if [[ $QUICK == 1 ]]; then
    WINDOW=(--duration 3 --warmup 1 --drain 2)
    HOLD=3
else
    WINDOW=(--duration 10 --warmup 2 --drain 2)
    HOLD=10
fi

# Sockets: every connection needs a descriptor in the harness and one in the broker.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FD_LIMIT=$(ulimit -n)
IDLE_MAX=${IDLE_MAX:-$(( FD_LIMIT > 2000 ? FD_LIMIT - 1000 : 1000 ))}
IDLE_COUNTS=(15000 "$IDLE_MAX")
(( IDLE_MAX <= 15000 )) && IDLE_COUNTS=("$IDLE_MAX")

OUT=${OUT:-$ROOT/bench-results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT/raw" "$OUT/logs"
log "results in $OUT (fd limit $FD_LIMIT, idle max $IDLE_MAX)"

# --- tools -------------------------------------------------------------------------------------

MOSQUITTO=""
RUMQTTD=""
if has "$BROKERS" mosquitto; then
    MOSQUITTO=$(command -v mosquitto || true)
    [[ -z $MOSQUITTO && -x /usr/sbin/mosquitto ]] && MOSQUITTO=/usr/sbin/mosquitto
    if [[ -z $MOSQUITTO ]]; then
        [[ $(id -u) == 0 ]] || die "mosquitto is missing (apt-get install -y mosquitto, as root)"
        log "installing mosquitto"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
        MOSQUITTO=/usr/sbin/mosquitto
    fi
    # The Debian package enables a system service on port 1883; ours runs on its own port.
fi
if has "$BROKERS" rumqttd; then
    RUMQTTD=$(command -v rumqttd || true)
    [[ -z $RUMQTTD && -x $HOME/.cargo/bin/rumqttd ]] && RUMQTTD=$HOME/.cargo/bin/rumqttd
    if [[ -z $RUMQTTD ]]; then
        log "installing rumqttd (cargo install rumqttd)"
        cargo install rumqttd
        RUMQTTD=$HOME/.cargo/bin/rumqttd
    fi
fi

if [[ $BUILD == 1 ]]; then
    log "building (release) in $TARGET_DIR"
    (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -p ferrohub -p ferrohub-sim --example bench)
fi
# The harness: `ferrohub bench`, or the stand-alone example when this ferrohub lacks the command.
if [[ -n ${HARNESS_BIN:-} ]]; then
    HARNESS=("$HARNESS_BIN" bench)
elif "$FERROHUB_BIN" bench --help >/dev/null 2>&1; then
    HARNESS=("$FERROHUB_BIN" bench)
else
    HARNESS=("$TARGET_DIR/release/examples/bench" bench)
fi
"${HARNESS[@]}" --help >/dev/null 2>&1 || die "no harness: build ferrohub or the ferrohub-sim example"
has "$BROKERS" ferrohub && { [[ -x $FERROHUB_BIN ]] || die "$FERROHUB_BIN not built"; }
log "harness: ${HARNESS[*]}"

# --- brokers -----------------------------------------------------------------------------------

declare -A PID=()
cleanup() {
    local b
    for b in "${!PID[@]}"; do
        kill "${PID[$b]}" 2>/dev/null || true
    done
    for b in "${!PID[@]}"; do
        wait "${PID[$b]}" 2>/dev/null || true
    done
    if [[ -n ${FERROHUB_DATA:-} ]]; then rm -rf "$FERROHUB_DATA"; fi
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_of() {
    case "$1" in
        ferrohub) echo "$FERROHUB_PORT" ;;
        mosquitto) echo "$MOSQUITTO_PORT" ;;
        rumqttd) if [[ $PROTOCOL == v5 ]]; then echo "$RUMQTTD_V5_PORT"; else echo "$RUMQTTD_V4_PORT"; fi ;;
    esac
}

wait_port() { # port pid name
    local i
    for i in $(seq 1 100); do
        kill -0 "$2" 2>/dev/null || die "$3 exited at start (see $OUT/logs/$3.log)"
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "$3 does not listen on port $1"
}

write_configs() {
    cat >"$OUT/mosquitto.conf" <<EOF
# Mosquitto for scripts/bench.sh: anonymous, in memory, no connection cap, queues sized for load.
listener $MOSQUITTO_PORT 127.0.0.1
allow_anonymous true
persistence false
max_connections -1
# Deep windows and unbounded queues: loss must come from overload, not from a small default.
max_inflight_messages 1000
max_queued_messages 0
max_queued_bytes 0
max_packet_size 1048576
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
EOF
    sed -e "s/127.0.0.1:21885/127.0.0.1:$RUMQTTD_V4_PORT/" -e "s/127.0.0.1:21886/127.0.0.1:$RUMQTTD_V5_PORT/" \
        "$HERE/rumqttd.toml" >"$OUT/rumqttd.toml"
}

stop_broker() {
    local b=$1
    [[ -n ${PID[$b]:-} ]] || return 0
    kill "${PID[$b]}" 2>/dev/null || true
    wait "${PID[$b]}" 2>/dev/null || true
    unset "PID[$b]"
    if [[ $b == ferrohub && -n ${FERROHUB_DATA:-} ]]; then rm -rf "$FERROHUB_DATA"; FERROHUB_DATA=""; fi
}

start_broker() {
    local b=$1
    stop_broker "$b"
    case "$b" in
        mosquitto)
            "$MOSQUITTO" -c "$OUT/mosquitto.conf" >>"$OUT/logs/mosquitto.log" 2>&1 &
            ;;
        rumqttd)
            "$RUMQTTD" -q -c "$OUT/rumqttd.toml" >>"$OUT/logs/rumqttd.log" 2>&1 &
            ;;
        ferrohub)
            FERROHUB_DATA=$(mktemp -d /tmp/ferrohub-bench.XXXXXX)
            FERROHUB_STORAGE__PERSISTENCE=false RUST_LOG=${RUST_LOG:-warn} "$FERROHUB_BIN" serve \
                --allow-anonymous --mqtt-listen "127.0.0.1:$FERROHUB_PORT" --ws-listen '' \
                --http-listen '' --data-dir "$FERROHUB_DATA" >>"$OUT/logs/ferrohub.log" 2>&1 &
            ;;
    esac
    PID[$b]=$!
    wait_port "$(port_of "$b")" "${PID[$b]}" "$b"
}

# --- runs --------------------------------------------------------------------------------------

scenario_args() { # scenario -> harness arguments (one invocation per line for idle)
    case "$1" in
        fanin-q0) echo "fan-in --publishers 8 --qos 0 --ladder $LADDER_FANIN_Q0" ;;
        fanin-q1) echo "fan-in --publishers 8 --qos 1 --ladder $LADDER_FANIN_Q1" ;;
        fanout) echo "fan-out --subscribers 100 --qos 0 --ladder $LADDER_FANOUT" ;;
        pairs) echo "pairs --pairs 1000 --qos 1 --ladder $LADDER_PAIRS" ;;
        latency-fanin) echo "fan-in --publishers 8 --qos $LATENCY_QOS --rate $LATENCY_RATE" ;;
        latency-pairs) echo "pairs --pairs 1000 --qos $LATENCY_QOS --rate $LATENCY_RATE" ;;
        idle) for c in "${IDLE_COUNTS[@]}"; do echo "idle --connections $c"; done ;;
    esac
}

run_one() { # scenario broker run
    local scen=$1 b=$2 run=$3 args window raw line
    raw="$OUT/raw/$scen.$b.$run.jsonl"
    while read -r line; do
        [[ -n $line ]] || continue
        # A fresh broker for every invocation: no backlog or allocator state carries over, and
        # the idle scenario's RSS-per-connection starts from a clean process.
        start_broker "$b"
        # shellcheck disable=SC2206
        args=($line)
        if [[ ${args[0]} == idle ]]; then window=(--duration "$HOLD"); else window=("${WINDOW[@]}"); fi
        log "$scen run $run: $b: ${args[*]}"
        if ! "${HARNESS[@]}" "${args[@]}" "${window[@]}" --host 127.0.0.1 --port "$(port_of "$b")" \
            --protocol "$PROTOCOL" --broker-pid "${PID[$b]}" --label "$scen:$b:$run" \
            >>"$raw" 2>>"$OUT/logs/harness.log"; then
            log "  harness failed for $scen on $b (see $OUT/logs/harness.log)"
        fi
        stop_broker "$b"
    done < <(scenario_args "$scen")
}

write_configs
{
    echo "# scripts/bench.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "command: scripts/bench.sh --runs $RUNS --scenarios $SCENARIOS --brokers $BROKERS --protocol $PROTOCOL$([[ $QUICK == 1 ]] && echo ' --quick')"
    echo "git: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "cpu: $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
    echo "kernel: $(uname -r)"
    [[ -n $MOSQUITTO ]] && echo "mosquitto: $("$MOSQUITTO" -h 2>&1 | head -1)"
    [[ -n $RUMQTTD ]] && echo "rumqttd: $("$RUMQTTD" --version 2>&1 | head -1)"
    echo "harness: ${HARNESS[*]}"
} >"$OUT/environment.txt"

for scen in ${SCENARIOS//,/ }; do
    for run in $(seq 1 "$RUNS"); do
        # Alternate the brokers within each run, so that slow drifts of the machine hit all alike.
        for b in ${BROKERS//,/ }; do
            run_one "$scen" "$b" "$run"
        done
    done
done

python3 "$HERE/report.py" "$OUT" | tee "$OUT/summary.md"
log "raw JSON lines: $OUT/raw/, summary: $OUT/summary.md"
