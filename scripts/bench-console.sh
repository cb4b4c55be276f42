#!/usr/bin/env bash
# The console's page loads with a large fleet (issue 7: "every page loads under one second").
#
#   scripts/bench-console.sh                       # 1,000,000 devices, batches of 50,000
#   scripts/bench-console.sh --devices 200000 --batch 20000 --runs 5
#   scripts/bench-console.sh --keep DIR            # reuse (or keep) the hub's data directory
#   scripts/bench-console.sh --alarms 100000       # alarms raised for the Alarms page (default 100,000)
#
# Starts a release hub (fsync never: the API's reads are measured, not the disk), creates the
# tenant `bench` and imports N devices through POST /api/v1/tenants/bench/devices/import (CSV
# batches: ids dev-0000000…, a name, tags site=s00…s99 (1 % each) and model=m00…m19 (5 %)), then
# times with curl every call the console makes for its pages: the devices list (first page of
# the default sort, each sort key, a tag filter, an id prefix search, filters matching no device
# (online: none is connected; disabled), deep cursor pages), the
# overview, a device page (device, connectivity, credentials, twin, series list) and the Alarms
# pages (ALARMS alarms raised through the API over the devices, severities in turn; a quarter then
# acknowledged and a quarter cleared: the open list, filtered by severity, device, key and state,
# the counts, one alarm and its history). Each call
# is made once cold, then RUNS times; prints a Markdown table of the cold time and the median.
# The overview is spaced 1.1 s apart: the hub reuses a device count for one second.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${FERROHUB_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ferrohub}
PORT=${PORT:-21898}
HTTP_PORT=${HTTP_PORT:-28098}
DEVICES=1000000
BATCH=50000
RUNS=5
ALARMS=100000
KEEP=
TOKEN=bench-console-admin-token-0123456789

while [[ $# -gt 0 ]]; do
    case "$1" in
        --devices) DEVICES=$2; shift ;;
        --batch) BATCH=$2; shift ;;
        --runs) RUNS=$2; shift ;;
        --keep) KEEP=$2; shift ;;
        --alarms) ALARMS=$2; shift ;;
        -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-console.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

if [[ -z ${FERROHUB_BIN:-} ]]; then
    (cd "$ROOT" && cargo build --release -p ferrohub)
fi
OUT=$ROOT/bench-results/console-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
API=http://127.0.0.1:$HTTP_PORT/api/v1
AUTH=(-H "Authorization: Bearer $TOKEN")

DATA=${KEEP:-$OUT/data}
HUB_PID=
stop_hub() {
    [[ -n $HUB_PID ]] && kill "$HUB_PID" 2>/dev/null && wait "$HUB_PID" 2>/dev/null || true
    HUB_PID=
}
trap stop_hub EXIT
FERROHUB_ADMIN_TOKEN=$TOKEN FERROHUB_STORAGE__FSYNC=never "$BIN" serve --data-dir "$DATA" \
    --mqtt-listen 127.0.0.1:$PORT --http-listen 127.0.0.1:$HTTP_PORT --ws-listen "" \
    >"$OUT/hub.log" 2>&1 &
HUB_PID=$!
for _ in $(seq 300); do
    curl -sf -o /dev/null "http://127.0.0.1:$HTTP_PORT/readyz" && break
    sleep 0.1
done
curl -sf -o /dev/null "http://127.0.0.1:$HTTP_PORT/readyz" || { echo "the hub did not start; see $OUT/hub.log" >&2; exit 1; }

curl -s -o /dev/null "${AUTH[@]}" -X POST "$API/tenants" -H 'Content-Type: application/json' -d '{"id":"bench"}'
have=$(curl -sf "${AUTH[@]}" "$API/tenants/bench/overview" | sed -n 's/.*"total":\([0-9]*\).*/\1/p')
echo "bench tenant has ${have:-0} devices; importing up to $DEVICES" >&2

# Imports devices [from, to) in batches; prints the rate.
start=$(date +%s.%N)
for ((from = ${have:-0}; from < DEVICES; from += BATCH)); do
    to=$((from + BATCH < DEVICES ? from + BATCH : DEVICES))
    awk -v from="$from" -v to="$to" 'BEGIN {
        print "id,name,tags"
        for (i = from; i < to; i++)
            printf "dev-%07d,Machine %d,site=s%02d;model=m%02d\n", i, (i * 7919) % 1000003, i % 100, i % 20
    }' >"$OUT/batch.csv"
    t0=$(date +%s.%N)
    report=$(curl -sf "${AUTH[@]}" -X POST "$API/tenants/bench/devices/import" \
        -H 'Content-Type: text/csv' --data-binary "@$OUT/batch.csv") \
        || { echo "import of rows $from..$to failed" >&2; exit 1; }
    t1=$(date +%s.%N)
    echo "imported $to ($(echo "$report" | sed -n 's/.*"imported":\([0-9]*\).*/\1/p') of $((to - from)) in $(echo "$t1 - $t0" | bc) s)" >&2
done
end=$(date +%s.%N)
echo "import: $(echo "$end - $start" | bc) s" | tee "$OUT/import.txt" >&2

cursor() { printf '%s' "$1" | base64 -w0 | tr '+/' '-_' | tr -d '='; }
mid=$(printf 'dev-%07d' $((DEVICES / 2)))
deep=$(printf 'dev-%07d' $((DEVICES * 9 / 10)))
D=$(printf 'dev-%07d' $((DEVICES / 3)))
# A device page: give the device a twin and a credential first, so the calls return content.
curl -s -o /dev/null "${AUTH[@]}" -X PATCH "$API/tenants/bench/devices/$D/twins/default/desired" \
    -H 'Content-Type: application/json' -d '{"interval_ms": 2000}'
curl -s -o /dev/null "${AUTH[@]}" -X POST "$API/tenants/bench/devices/$D/credentials" \
    -H 'Content-Type: application/json' -d '{"kind": "password"}'

# Alarms: raised over one keep-alive connection (a process per call would measure curl), then a
# quarter acknowledged and a quarter cleared.
if [[ $(curl -sf "${AUTH[@]}" "$API/tenants/bench/alarms?limit=1") == '{"items":[]}' ]]; then
    python3 - "$HTTP_PORT" "$TOKEN" "$ALARMS" "$DEVICES" <<'PY' >&2
import http.client, json, sys, time
port, token, n, devices = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
conn = http.client.HTTPConnection("127.0.0.1", port)
headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}
def post(path, body=None):
    conn.request("POST", "/api/v1/tenants/bench" + path, body=json.dumps(body) if body is not None else None, headers=headers)
    r = conn.getresponse()
    data = r.read()
    if r.status >= 300:
        sys.exit(f"{path}: {r.status} {data[:200]!r}")
    return json.loads(data)
severities = ["critical", "major", "minor", "warning", "info"]
t0 = time.time()
ids = []
for i in range(n):
    a = post("/alarms", {"key": f"overheat:{i:07d}", "severity": severities[i % 5],
                         "device": f"dev-{(i * 7919) % devices:07d}", "message": f"temperature {60 + i % 40} C",
                         "details": {"temperature": 60 + i % 40}})
    ids.append(a["id"])
print(f"raised {n} alarms in {time.time() - t0:.1f} s", flush=True)
t0 = time.time()
for i, id in enumerate(ids):
    if i % 4 == 1:
        post(f"/alarms/{id}/acknowledge", {"note": "on it"})
    elif i % 4 == 2:
        post(f"/alarms/{id}/clear")
print(f"acknowledged and cleared {n // 2} in {time.time() - t0:.1f} s", flush=True)
PY
fi
A=$(curl -sf "${AUTH[@]}" "$API/tenants/bench/alarms?limit=1&key=overheat:$(printf '%07d' $((ALARMS / 2)))" \
    | sed -n 's/.*"id":"\([0-9A-Z]*\)".*/\1/p')
AD=$(printf 'dev-%07d' $(((ALARMS / 2 * 7919) % DEVICES)))

CALLS=(
    "console shell /|@/"
    "console app.js (gzip)|@/console/app.js"
    "devices, first page (sort id, 50)|/tenants/bench/devices?limit=50&sort=id&order=asc"
    "devices, sort name|/tenants/bench/devices?limit=50&sort=name&order=asc"
    "devices, sort last_seen desc|/tenants/bench/devices?limit=50&sort=last_seen&order=desc"
    "devices, sort created_at|/tenants/bench/devices?limit=50&sort=created_at&order=asc"
    "devices, sort id desc|/tenants/bench/devices?limit=50&sort=id&order=desc"
    "devices, tag site:s42 (1 %)|/tenants/bench/devices?limit=50&sort=id&order=asc&tag=site:s42"
    "devices, id prefix dev-05|/tenants/bench/devices?limit=50&sort=id&order=asc&id_prefix=dev-05"
    "devices, id prefix (one match)|/tenants/bench/devices?limit=50&sort=id&order=asc&id_prefix=$mid"
    "devices, status enabled|/tenants/bench/devices?limit=50&sort=id&order=asc&status=enabled"
    "devices, offline|/tenants/bench/devices?limit=50&sort=id&order=asc&online=false"
    "devices, online (none are)|/tenants/bench/devices?limit=50&sort=id&order=asc&online=true"
    "devices, online, sort name|/tenants/bench/devices?limit=50&sort=name&order=asc&online=true"
    "devices, disabled (none are)|/tenants/bench/devices?limit=50&sort=id&order=asc&status=disabled"
    "devices, disabled, sort last_seen desc|/tenants/bench/devices?limit=50&sort=last_seen&order=desc&status=disabled"
    "devices, tag + disabled|/tenants/bench/devices?limit=50&sort=id&order=asc&tag=site:s42&status=disabled"
    "devices, two tags matching none|/tenants/bench/devices?limit=50&sort=id&order=asc&tag=site:s42&tag=model:m03"
    "devices, cursor at 90 % (sort id)|/tenants/bench/devices?limit=50&sort=id&order=asc&cursor=$(cursor "[\"\",\"$deep\"]")"
    "devices, tag + cursor at 90 %|/tenants/bench/devices?limit=50&sort=id&order=asc&tag=site:s42&cursor=$(cursor "[\"\",\"$deep\"]")"
    "devices, cursor mid (sort name)|/tenants/bench/devices?limit=50&sort=name&order=asc&cursor=$(cursor "[\"Machine 5\",\"$mid\"]")"
    "overview|/tenants/bench/overview"
    "device|/tenants/bench/devices/$D"
    "device connectivity|/tenants/bench/devices/$D/connectivity?limit=10"
    "device credentials|/tenants/bench/devices/$D/credentials"
    "device twin|/tenants/bench/devices/$D/twins/default"
    "device series list|/tenants/bench/devices/$D/telemetry"
    "alarms, open, first page (50)|/tenants/bench/alarms?limit=50&state=open"
    "alarms, any state|/tenants/bench/alarms?limit=50"
    "alarms, open critical|/tenants/bench/alarms?limit=50&state=open&severity=critical"
    "alarms, cleared|/tenants/bench/alarms?limit=50&state=cleared"
    "alarms, one device|/tenants/bench/alarms?limit=50&state=open&device=$AD"
    "alarms, one key|/tenants/bench/alarms?limit=50&key=overheat:$(printf '%07d' $((ALARMS / 2)))"
    "alarm counts|/tenants/bench/alarms/counts"
    "alarm|/tenants/bench/alarms/$A"
    "alarm history|/tenants/bench/alarms/$A/history"
)

# Prints "status seconds bytes"; a URL starting with @ is outside the API.
time_call() {
    local url=$API$1
    [[ $1 == @* ]] && url=http://127.0.0.1:$HTTP_PORT${1#@}
    curl -s --compressed -o /dev/null -w '%{http_code} %{time_total} %{size_download}\n' "${AUTH[@]}" "$url"
}

echo "| call | status | bytes | cold | median of $RUNS |"
echo "|---|---:|---:|---:|---:|"
for entry in "${CALLS[@]}"; do
    label=${entry%%|*}
    url=${entry#*|}
    [[ $label == overview ]] && sleep 1.1
    read -r code cold bytes < <(time_call "$url")
    times=()
    for _ in $(seq "$RUNS"); do
        [[ $label == overview ]] && sleep 1.1
        read -r _ t _ < <(time_call "$url")
        times+=("$t")
    done
    median=$(printf '%s\n' "${times[@]}" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
    printf '| %s | %s | %s | %.1f ms | %.1f ms |\n' "$label" "$code" "$bytes" "$(echo "$cold * 1000" | bc)" "$(echo "$median * 1000" | bc)"
done | tee "$OUT/table.md"
echo "raw: $OUT" >&2
