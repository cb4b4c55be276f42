#!/usr/bin/env bash
# Broker throughput with active rules (issue 8's target: with 10 rules within 20 % of none).
#
#   scripts/bench-rules.sh                  # 3 rounds of 0 and 10 rules (about 10 minutes)
#   scripts/bench-rules.sh --runs 1 --rules 0,10,100
#
# Every run starts a fresh release hub (`serve --allow-anonymous`, fsync never: the broker path is
# measured, not the disk), creates N rules in the default tenant through the API, all matching
# every message of the load (`SELECT * FROM 'bench/fanin/#' WHERE temperature > 1000`: the bench
# payload is not JSON, so every rule is offered the message, parses nothing and its WHERE is false;
# no action fires), then runs the broker benchmark's QoS 1 fan-in ladder (8 publishers → 1
# wildcard subscriber) and records its maximum sustainable rate (loss ≤ 0.5 %, p99 ≤ 100 ms).
# Rule counts alternate within each round. Prints one JSON line per run and a Markdown table of
# medians with the ratio to 0 rules; raw lines go to bench-results/rules-<timestamp>/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${FERROHUB_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ferrohub}
PORT=${PORT:-21897}
HTTP_PORT=${HTTP_PORT:-28097}
RUNS=3
RULES=0,10
LADDER=${LADDER:-150k,200k,250k,300k,350k,400k,450k,500k,600k}
TOKEN=bench-rules-admin-token-0123456789

while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) RUNS=$2; shift ;;
        --rules) RULES=$2; shift ;;
        -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-rules.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

if [[ -z ${FERROHUB_BIN:-} ]]; then
    (cd "$ROOT" && cargo build --release -p ferrohub)
fi
OUT=$ROOT/bench-results/rules-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
# shellcheck source=scripts/bench-hub.sh
source "$ROOT/scripts/bench-hub.sh"

create_rules() {
    local n=$1 k
    for ((k = 0; k < n; k++)); do
        curl -sf -o /dev/null -X POST "http://127.0.0.1:$HTTP_PORT/api/v1/tenants/default/rules" \
            -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
            -d "{\"id\":\"bench-$k\",\"sql\":\"SELECT * FROM 'bench/fanin/#' WHERE temperature > 1000\"}" \
            || { echo "creating rule bench-$k failed" >&2; exit 1; }
    done
}

for r in $(seq "$RUNS"); do
    for n in ${RULES//,/ }; do
        start_hub FERROHUB_ADMIN_TOKEN=$TOKEN FERROHUB_STORAGE__FSYNC=never
        create_rules "$n"
        "$BIN" bench fan-in --port "$PORT" --protocol v5 --publishers 8 --qos 1 --ladder "$LADDER" \
            --duration 5 --label "rules-$n" | tail -1 | tee -a "$OUT/rules-$n.jsonl"
        if [[ $n -gt 0 ]]; then
            # Proof the rules ran: how many messages the first one was offered.
            curl -sf "http://127.0.0.1:$HTTP_PORT/api/v1/tenants/default/rules/bench-0/stats" \
                -H "Authorization: Bearer $TOKEN" >"$OUT/stats-$n-$r.json" || true
            echo "rule bench-0: $(cat "$OUT/stats-$n-$r.json")"
        fi
        stop_hub
    done
done

python3 - "$OUT" <<'EOF'
import json, statistics, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = {}
for f in sorted(out.glob("rules-*.jsonl")):
    n = int(f.stem.split("-")[1])
    vals = [json.loads(l).get("max_sustainable_rate") or 0 for l in f.read_text().splitlines() if l.strip()]
    rows[n] = vals
base = statistics.median(rows.get(0, [0])) or None
print("\n| rules | runs | max sustainable QoS 1 fan-in, msgs/s (median) | runs | vs 0 rules |")
print("|---:|---:|---:|---|---:|")
for n in sorted(rows):
    med = statistics.median(rows[n])
    ratio = f"{med / base:.2f}×" if base else "–"
    print(f"| {n} | {len(rows[n])} | {med:,.0f} | {' / '.join(f'{v:,}' for v in rows[n])} | {ratio} |")
EOF
echo "raw results: $OUT"
