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
#   scripts/bench.sh --scenarios auth --runs 3    # connect-password,connect-mtls,policy-q0,policy-q1
#   scripts/bench.sh --scenarios registry         # registry queries at 1,000,000 devices
#
# Scenarios: fanin-q0, fanin-q1 (8 publishers -> 1 wildcard subscriber, offered-rate ladders),
# fanout (1 -> 100 subscribers, ladder), pairs (1,000 QoS 1 pairs, ladder), latency-fanin and
# latency-pairs (paced 10,000 msg/s, QoS 1), idle (15,000 and the most this machine allows).
# A ladder's result is its maximum sustainable rate: the highest offered rate sent in full with
# loss <= 0.5 % and p99 <= 100 ms.
#
# Authentication and access (not in the default set; `--scenarios auth` selects them): a fleet of
# AUTH_DEVICES devices is registered once per invocation (`ferrohub bench provision`: registry
# database, one random password and one hub-issued P-256 certificate per device, a monitor
# device allowed to read devices/+/telemetry) and each Ferrohub run starts on a copy of it
# (storage.persistence on, fsync never). connect-password: every device connects with its own
# password, AUTH_CONCURRENCY at a time, twice (pass 1 cold: argon2id per device; pass 2 warm),
# against Ferrohub and Mosquitto with a password file from `mosquitto_passwd -U` of the same
# passwords. connect-generated: the same with a second fleet whose passwords the registry generated
# (256 random bits, stored as SHA-256: no argon2id). connect-mtls: TLS 1.3 client certificates (Mosquitto:
# require_certificate, use_identity_as_username, cafile = the hub's device CA). policy-q0 and
# policy-q1: fan-in ladders (LADDER_POLICY_*), 8 devices publishing on devices/{id}/telemetry ->
# the monitor on devices/+/telemetry, once anonymous with the same client ids and topics
# (--allow-anonymous: no policy is checked) and once authenticated under the default device
# policy (the monitor under a policy allowing devices/+/telemetry).
# registry: `ferrohub bench registry` (REGISTRY_DEVICES devices, REGISTRY_QUERIES per query);
# the first run loads the database, later runs reuse it.
#
# Needs: cargo, python3; installs mosquitto (apt-get, as root) and rumqttd (cargo install) when
# missing. Environment overrides: CARGO_TARGET_DIR, FERROHUB_BIN, HARNESS_BIN, FERROHUB_PORT,
# MOSQUITTO_PORT, RUMQTTD_V4_PORT, RUMQTTD_V5_PORT, FERROHUB_TLS_PORT, MOSQUITTO_TLS_PORT, IDLE_MAX,
# AUTH_DEVICES, AUTH_CONCURRENCY, REGISTRY_DEVICES, REGISTRY_QUERIES, and the LADDER_* variables.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE="$ROOT/scripts/bench"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
FERROHUB_BIN=${FERROHUB_BIN:-$TARGET_DIR/release/ferrohub}

FERROHUB_PORT=${FERROHUB_PORT:-21883}
MOSQUITTO_PORT=${MOSQUITTO_PORT:-21884}
RUMQTTD_V4_PORT=${RUMQTTD_V4_PORT:-21885}
RUMQTTD_V5_PORT=${RUMQTTD_V5_PORT:-21886}
FERROHUB_TLS_PORT=${FERROHUB_TLS_PORT:-21887}
MOSQUITTO_TLS_PORT=${MOSQUITTO_TLS_PORT:-21888}

AUTH_DEVICES=${AUTH_DEVICES:-5000}
AUTH_CONCURRENCY=${AUTH_CONCURRENCY:-32}
REGISTRY_DEVICES=${REGISTRY_DEVICES:-1000000}
REGISTRY_QUERIES=${REGISTRY_QUERIES:-100}

# Offered-rate ladders (messages/s published; fan-out deliveries are 100x).
LADDER_FANIN_Q0=${LADDER_FANIN_Q0:-25k,50k,75k,100k,125k,150k,175k,200k,250k,300k,350k,400k,500k}
LADDER_FANIN_Q1=${LADDER_FANIN_Q1:-10k,20k,40k,60k,80k,100k,120k,150k,200k,250k,300k}
LADDER_FANOUT=${LADDER_FANOUT:-250,500,1000,1250,1500,1750,2000,2500,3000,4000,5000}
LADDER_PAIRS=${LADDER_PAIRS:-5k,10k,20k,30k,40k,50k,60k,80k,100k}
# Finer ladders for the policy comparison (steps of about 10 % near the top).
LADDER_POLICY_Q0=${LADDER_POLICY_Q0:-100k,200k,300k,350k,400k,450k,500k,550k,600k,650k,700k,800k}
LADDER_POLICY_Q1=${LADDER_POLICY_Q1:-50k,100k,120k,140k,160k,180k,200k,220k,240k,260k,280k,300k}
LATENCY_RATE=${LATENCY_RATE:-10000}
LATENCY_QOS=${LATENCY_QOS:-1}

MQTT_SCENARIOS=fanin-q0,fanin-q1,fanout,pairs,latency-fanin,latency-pairs,idle
AUTH_SCENARIOS=connect-password,connect-generated,connect-mtls,policy-q0,policy-q1
ALL_SCENARIOS=$MQTT_SCENARIOS,$AUTH_SCENARIOS,registry
ALL_BROKERS=ferrohub,mosquitto,rumqttd
SCENARIOS=$MQTT_SCENARIOS
QUIET_LOAD=
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
                       (default: $MQTT_SCENARIOS; "auth" = $AUTH_SCENARIOS; "all")
  --brokers LIST       comma-separated subset of: $ALL_BROKERS
  --protocol v3|v5     MQTT 3.1.1 (default) or 5.0
  --out DIR            results directory (default bench-results/<timestamp>)
  --no-build           use the binaries already built
  --quiet-load L       before starting, wait (up to 40 min) for a 1-minute load average below L,
                       and before every run for the other processes to use < 15 % of the CPU
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
        --quiet-load) QUIET_LOAD=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

die() { echo "bench.sh: $*" >&2; exit 1; }
log() { echo "[bench $(date +%H:%M:%S)] $*" >&2; }
has() { [[ ",$1," == *",$2,"* ]]; }

SCENARIOS=${SCENARIOS//auth/$AUTH_SCENARIOS}
[[ $SCENARIOS == all ]] && SCENARIOS=$ALL_SCENARIOS
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
elif "$FERROHUB_BIN" bench --help 2>/dev/null | grep -q provision; then
    HARNESS=("$FERROHUB_BIN" bench)
else
    HARNESS=("$TARGET_DIR/release/examples/bench" bench)
fi
"${HARNESS[@]}" --help >/dev/null 2>&1 || die "no harness: build ferrohub or the ferrohub-sim example"
has "$BROKERS" ferrohub && { [[ -x $FERROHUB_BIN ]] || die "$FERROHUB_BIN not built"; }
log "harness: ${HARNESS[*]}"

# --- quiet machine -----------------------------------------------------------------------------

load1() { cut -d' ' -f1 /proc/loadavg; }
# Busy share (%) of all CPUs over 3 s, from /proc/stat.
cpu_busy() {
    local a b
    a=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat)
    sleep 3
    b=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat)
    echo "$a $b" | awk '{busy = $3 - $1; idle = $4 - $2; total = busy + idle
        printf "%.0f", (total > 0 ? 100 * busy / total : 0)}'
}
wait_quiet_start() {
    [[ -n $QUIET_LOAD ]] || return 0
    local i
    for i in $(seq 1 80); do
        if awk -v l="$(load1)" -v m="$QUIET_LOAD" 'BEGIN{exit !(l < m)}'; then
            log "load average $(load1) < $QUIET_LOAD: starting"
            echo "start: loadavg $(cat /proc/loadavg)" >>"$OUT/load.txt"
            return 0
        fi
        log "load average $(load1) >= $QUIET_LOAD: waiting"
        sleep 30
    done
    die "the machine did not become quiet in 40 minutes (load $(load1))"
}
# Between runs our own brokers are stopped: whatever is busy now belongs to someone else.
wait_quiet_run() {
    [[ -n $QUIET_LOAD ]] || return 0
    local i busy
    for i in $(seq 1 80); do
        busy=$(cpu_busy)
        if (( busy < 15 )); then
            echo "$1: cpu busy ${busy}% loadavg $(cat /proc/loadavg)" >>"$OUT/load.txt"
            return 0
        fi
        log "others use ${busy}% of the CPU: waiting"
        sleep 30
    done
    die "the machine did not become quiet in 40 minutes"
}

# --- the benchmark fleet (auth scenarios) ------------------------------------------------------

FLEET_DIR=""
REGISTRY_DIR=""
needs_fleet() { local s; for s in "$@"; do has "$SCENARIOS" "$s" && return 0; done; return 1; }
# The fleet a scenario uses: devices with chosen passwords (argon2id) and certificates, or, for
# connect-generated, devices with registry-generated passwords.
fleet_of() { if [[ $1 == connect-generated ]]; then echo "$OUT/fleet-generated"; else echo "$OUT/fleet"; fi; }
provision_fleet() { # dir, extra provision arguments
    local dir=$1
    shift
    if [[ -f $dir/fleet.jsonl ]]; then
        log "reusing the fleet in $dir"
    else
        log "provisioning $AUTH_DEVICES devices in $dir $*"
        "${HARNESS[@]}" provision --data-dir "$dir" --devices "$AUTH_DEVICES" --progress "$@" \
            >"$dir.provision.json" 2>>"$OUT/logs/harness.log" \
            || die "provisioning failed (see $OUT/logs/harness.log)"
    fi
    if has "$BROKERS" mosquitto; then
        # The same passwords for Mosquitto: plain "user:password" lines, hashed in place.
        python3 "$HERE/fleet.py" passwd "$dir/fleet.jsonl" >"$dir/mosquitto.passwd"
        mosquitto_passwd -U "$dir/mosquitto.passwd"
        # Started as root, Mosquitto drops to its own user, which must be able to read the file.
        if id mosquitto >/dev/null 2>&1; then
            chown mosquitto "$dir/mosquitto.passwd" && chmod 0600 "$dir/mosquitto.passwd"
        else
            chmod 0644 "$dir/mosquitto.passwd"
        fi
    fi
}
if needs_fleet connect-password connect-mtls policy-q0 policy-q1; then
    provision_fleet "$OUT/fleet" --monitor
fi
if needs_fleet connect-generated; then
    provision_fleet "$OUT/fleet-generated" --credentials password --generated-passwords
fi

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
    if [[ -n ${REGISTRY_DIR:-} ]]; then rm -rf "$REGISTRY_DIR"; fi
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_of() {
    case "$1" in
        ferrohub|ferrohub-*) echo "$FERROHUB_PORT" ;;
        mosquitto|mosquitto-*) echo "$MOSQUITTO_PORT" ;;
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
    local dir tls
    for dir in "$OUT/fleet" "$OUT/fleet-generated"; do
        [[ -f $dir/fleet.jsonl ]] || continue
        tls="$dir/bench-tls"
        cat >"$dir/mosquitto-auth.conf" <<EOF
# Mosquitto for the auth scenarios: password file on TCP, client certificates on TLS 1.3.
per_listener_settings true
persistence false
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning

listener $MOSQUITTO_PORT 127.0.0.1
allow_anonymous false
password_file $dir/mosquitto.passwd
max_connections -1

listener $MOSQUITTO_TLS_PORT 127.0.0.1
allow_anonymous false
max_connections -1
cafile $tls/device-ca.pem
certfile $tls/server.pem
keyfile $tls/server.key
require_certificate true
use_identity_as_username true
tls_version tlsv1.3
EOF
    done
}

stop_broker() {
    local b=$1
    [[ -n ${PID[$b]:-} ]] || return 0
    kill "${PID[$b]}" 2>/dev/null || true
    wait "${PID[$b]}" 2>/dev/null || true
    unset "PID[$b]"
    if [[ $b == ferrohub* && -n ${FERROHUB_DATA:-} ]]; then rm -rf "$FERROHUB_DATA"; FERROHUB_DATA=""; fi
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
        mosquitto-auth)
            "$MOSQUITTO" -c "$FLEET_DIR/mosquitto-auth.conf" >>"$OUT/logs/mosquitto.log" 2>&1 &
            ;;
        ferrohub-auth|ferrohub-anon)
            # A fresh copy of the provisioned registry; the broker keeps clean sessions in memory
            # either way (nothing to persist), the registry needs its database.
            FERROHUB_DATA=$(mktemp -d /tmp/ferrohub-bench.XXXXXX)
            cp "$FLEET_DIR"/registry.db* "$FERROHUB_DATA/"
            local anon=()
            [[ $b == ferrohub-anon ]] && anon=(--allow-anonymous)
            FERROHUB_STORAGE__PERSISTENCE=true FERROHUB_STORAGE__FSYNC=never \
                FERROHUB_TLS__CERT_FILE="$FLEET_DIR/bench-tls/server.pem" \
                FERROHUB_TLS__KEY_FILE="$FLEET_DIR/bench-tls/server.key" \
                FERROHUB_TLS__REQUIRE_CLIENT_CERT=true RUST_LOG=${RUST_LOG:-warn} \
                "$FERROHUB_BIN" serve "${anon[@]}" --mqtt-listen "127.0.0.1:$FERROHUB_PORT" \
                --mqtts-listen "127.0.0.1:$FERROHUB_TLS_PORT" --ws-listen '' --http-listen '' \
                --data-dir "$FERROHUB_DATA" >>"$OUT/logs/ferrohub.log" 2>&1 &
            ;;
    esac
    PID[$b]=$!
    wait_port "$(port_of "$b")" "${PID[$b]}" "$b"
    case "$b" in
        ferrohub-auth) wait_port "$FERROHUB_TLS_PORT" "${PID[$b]}" "$b" ;;
        mosquitto-auth) wait_port "$MOSQUITTO_TLS_PORT" "${PID[$b]}" "$b" ;;
    esac
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
        connect-password|connect-generated) echo "connect --fleet $FLEET_DIR/fleet.jsonl --auth password --passes 2 --connect-concurrency $AUTH_CONCURRENCY --connect-timeout 60" ;;
        connect-mtls) echo "connect --fleet $FLEET_DIR/fleet.jsonl --auth certificate --ca-file $FLEET_DIR/bench-tls/server-ca.pem --passes 2 --connect-concurrency $AUTH_CONCURRENCY --connect-timeout 60" ;;
        policy-q0) echo "fan-in --publishers 8 --qos 0 --ladder $LADDER_POLICY_Q0 --fleet $FLEET_DIR/fleet.jsonl" ;;
        policy-q1) echo "fan-in --publishers 8 --qos 1 --ladder $LADDER_POLICY_Q1 --fleet $FLEET_DIR/fleet.jsonl" ;;
    esac
}

# The brokers a scenario runs on, as "label:process" pairs: labels name the columns of the
# report, processes the configuration started.
brokers_of() {
    local b out=()
    case "$1" in
        connect-*)
            for b in ferrohub mosquitto; do has "$BROKERS" "$b" && out+=("$b:$b-auth"); done ;;
        policy-*)
            has "$BROKERS" ferrohub && out+=("ferrohub-anon:ferrohub-anon" "ferrohub:ferrohub-auth") ;;
        *) for b in ${BROKERS//,/ }; do out+=("$b:$b"); done ;;
    esac
    echo "${out[*]}"
}

run_registry() { # run
    local raw="$OUT/raw/registry.none.$1.jsonl"
    [[ -n $REGISTRY_DIR ]] || REGISTRY_DIR=$(mktemp -d /tmp/ferrohub-registry-bench.XXXXXX)
    wait_quiet_run "registry run $1"
    log "registry run $1: $REGISTRY_DEVICES devices, $REGISTRY_QUERIES queries each"
    "${HARNESS[@]}" registry --devices "$REGISTRY_DEVICES" --queries "$REGISTRY_QUERIES" \
        --data-dir "$REGISTRY_DIR" --label "registry:none:$1" >>"$raw" 2>>"$OUT/logs/harness.log" \
        || log "  registry benchmark failed (see $OUT/logs/harness.log)"
}

run_one() { # scenario label:process run
    local scen=$1 b=${2%%:*} proc=${2#*:} run=$3 args window raw line port extra
    raw="$OUT/raw/$scen.$b.$run.jsonl"
    FLEET_DIR=$(fleet_of "$scen")
    while read -r line; do
        [[ -n $line ]] || continue
        wait_quiet_run "$scen $b run $run"
        # A fresh broker for every invocation: no backlog or allocator state carries over, and
        # the idle scenario's RSS-per-connection starts from a clean process.
        start_broker "$proc"
        # shellcheck disable=SC2206
        args=($line)
        if [[ ${args[0]} == idle ]]; then window=(--duration "$HOLD"); else window=("${WINDOW[@]}"); fi
        port=$(port_of "$proc")
        if [[ $scen == connect-mtls ]]; then
            case "$proc" in
                ferrohub-*) port=$FERROHUB_TLS_PORT ;;
                mosquitto-*) port=$MOSQUITTO_TLS_PORT ;;
            esac
        fi
        extra=()
        [[ $b == ferrohub-anon ]] && extra=(--fleet-anonymous)
        log "$scen run $run: $b ($proc): ${args[*]} ${extra[*]}"
        if ! "${HARNESS[@]}" "${args[@]}" "${extra[@]}" "${window[@]}" --host 127.0.0.1 \
            --port "$port" --protocol "$PROTOCOL" --broker-pid "${PID[$proc]}" \
            --label "$scen:$b:$run" >>"$raw" 2>>"$OUT/logs/harness.log"; then
            log "  harness failed for $scen on $b (see $OUT/logs/harness.log)"
        fi
        stop_broker "$proc"
    done < <(scenario_args "$scen")
}

write_configs
wait_quiet_start
{
    echo "# scripts/bench.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "command: scripts/bench.sh --runs $RUNS --scenarios $SCENARIOS --brokers $BROKERS --protocol $PROTOCOL$([[ $QUICK == 1 ]] && echo ' --quick')"
    echo "git: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "cpu: $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
    echo "kernel: $(uname -r)"
    [[ -n $MOSQUITTO ]] && echo "mosquitto: $("$MOSQUITTO" -h 2>&1 | head -1)"
    [[ -n $RUMQTTD ]] && echo "rumqttd: $("$RUMQTTD" --version 2>&1 | head -1)"
    echo "harness: ${HARNESS[*]}"
    echo "loadavg at start: $(cat /proc/loadavg)"
} >"$OUT/environment.txt"

for scen in ${SCENARIOS//,/ }; do
    for run in $(seq 1 "$RUNS"); do
        if [[ $scen == registry ]]; then run_registry "$run"; continue; fi
        # Alternate the brokers within each run, so that slow drifts of the machine hit all alike.
        for b in $(brokers_of "$scen"); do
            run_one "$scen" "$b" "$run"
        done
    done
done

python3 "$HERE/report.py" "$OUT" | tee "$OUT/summary.md"
log "raw JSON lines: $OUT/raw/, summary: $OUT/summary.md"
