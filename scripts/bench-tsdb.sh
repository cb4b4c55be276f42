#!/usr/bin/env bash
# The telemetry engine's benchmark, side by side with SQLite and PostgreSQL (`ferrohub bench tsdb`).
#
#   scripts/bench-tsdb.sh                          # 3 runs with the default sizes
#   scripts/bench-tsdb.sh --runs 1 -- --series 100 --compare-fleet-devices 500
#                                                  # flags after -- go to `ferrohub bench tsdb`
#   scripts/bench-tsdb.sh --compare sqlite         # no PostgreSQL (nothing is installed or started)
#
# Builds the release binary (cargo is a no-op when it is up to date; FERROHUB_BIN skips it),
# installs Debian's postgresql when its binaries are missing, starts a throwaway cluster in a
# temporary directory (as the postgres user when run as root; unix socket only, port PG_PORT)
# and stops and removes it at exit. Every run generates the data, loads the engine in-process,
# then SQLite and PostgreSQL, and times the same queries (see crates/sim/src/bench/tsdbbench.rs).
# Prints a Markdown table of medians; raw JSON lines and logs go to bench-results/tsdb-<timestamp>/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${FERROHUB_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ferrohub}
PG_PORT=${PG_PORT:-54329}
RUNS=3
COMPARE=sqlite,postgres
EXTRA=()

while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) RUNS=$2; shift ;;
        --compare) COMPARE=$2; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-tsdb.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

if [[ -z ${FERROHUB_BIN:-} ]]; then
    (cd "$ROOT" && cargo build --release -p ferrohub)
fi
OUT=$ROOT/bench-results/tsdb-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"

{
    # FERROHUB_GIT_REV names the commit when the tree is an export (`git archive`) without .git.
    if [[ -n ${FERROHUB_GIT_REV:-} ]]; then
        echo "git: $FERROHUB_GIT_REV"
    else
        echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet -- crates/tsdb crates/sim 2>/dev/null || echo ' (+ uncommitted changes in crates/tsdb or crates/sim)')"
    fi
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "kernel: $(uname -r); cpus: $(nproc); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "memory: $(free -g | awk '/Mem:/ {print $2 " GiB"}'); disk: $(df -h /tmp | awk 'NR==2 {print $1 ", " $4 " free"}')"
} | tee "$OUT/machine.txt"

PG_URL=
PG_DIR=
as_pg() {
    if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}
stop_pg() {
    if [[ -n $PG_DIR && -d $PG_DIR/data ]]; then
        as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    [[ -n $PG_DIR ]] && rm -rf "$PG_DIR"
    PG_DIR=
}
trap stop_pg EXIT

if [[ ,$COMPARE, == *,postgres,* ]]; then
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
    if [[ -z $PG_BIN || ! -x $PG_BIN/initdb ]]; then
        echo "installing Debian's postgresql" >&2
        SUDO=; [[ $(id -u) -eq 0 ]] || SUDO=sudo
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
        PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
    fi
    PG_DIR=$(mktemp -d /tmp/ferrohub-bench-pg.XXXXXX)
    [[ $(id -u) -eq 0 ]] && chown postgres: "$PG_DIR"
    as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 --no-sync >"$PG_DIR/initdb.log"
    # What a competent operator sets for a bulk-loading box with 24 GiB (and shares with others):
    # memory and checkpoint spacing. Durability settings stay at their defaults (fsync on,
    # synchronous_commit on, full_page_writes on, wal_level replica).
    PG_OPTS="-p $PG_PORT -k $PG_DIR -c listen_addresses='' -c shared_buffers=1GB \
-c work_mem=64MB -c maintenance_work_mem=512MB -c effective_cache_size=8GB \
-c max_wal_size=8GB -c checkpoint_timeout=30min"
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -o "$PG_OPTS" start >/dev/null
    PG_URL="host=$PG_DIR port=$PG_PORT user=postgres dbname=postgres"
    echo "postgres: $("$PG_BIN/postgres" --version) at $PG_URL ($PG_OPTS)" | tee -a "$OUT/machine.txt"
fi

for r in $(seq "$RUNS"); do
    if [[ -n $PG_URL ]]; then
        "$PG_BIN/psql" -q -d "$PG_URL" -c CHECKPOINT >/dev/null
    fi
    echo "== run $r/$RUNS, load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt" >&2
    args=(bench tsdb --compare "$COMPARE" --label "run$r")
    [[ -n $PG_URL ]] && args+=(--pg-url "$PG_URL")
    "$BIN" "${args[@]}" "${EXTRA[@]}" 2> >(tee "$OUT/run$r.log" >&2) | tee -a "$OUT/tsdb.jsonl"
done
[[ -n $PG_DIR ]] && cp "$PG_DIR/server.log" "$OUT/postgres.log" 2>/dev/null || true

python3 - "$OUT" <<'EOF'
import json, statistics, sys, pathlib
out = pathlib.Path(sys.argv[1])
runs = [json.loads(l) for l in (out / "tsdb.jsonl").read_text().splitlines() if l.startswith("{")]
if not runs:
    sys.exit("no result lines")

def get(r, path):
    for k in path.split("."):
        if isinstance(r, list):
            r = r[int(k)] if int(k) < len(r) else None
        elif isinstance(r, dict):
            r = r.get(k)
        else:
            return None
    return r

def med(path):
    vals = [v for v in (get(r, path) for r in runs) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.median(vals) if vals else None

def spread(path, fmt):
    vals = [get(r, path) for r in runs]
    return " / ".join(fmt(v) if isinstance(v, (int, float)) else "–" for v in vals)

def i(v): return "–" if v is None else f"{v:,.0f}"
def f1(v): return "–" if v is None else f"{v:,.1f}"
def f2(v): return "–" if v is None else f"{v:,.2f}"
def f3(v): return "–" if v is None else f"{v:,.3f}"

c = runs[0]["config"]
print(f"\n### `ferrohub bench tsdb`, {len(runs)} run{'s' if len(runs) > 1 else ''} (medians)\n")
print(f"Main dataset: {c['points']:,} points = {c['series']} series × {c['points_per_series']:,} "
      f"(1 Hz) in {c['tenants']} tenants (5 profiles × regular/jittered timestamps), batches of "
      f"{c['batch']:,} points, {c['threads']} threads, fsync {'on' if c['fsync'] else 'off'}. "
      f"Fleet: {c['fleet_devices']:,} devices × {c['fleet_days']} days at {c['fleet_interval_s']} s "
      f"= {c['fleet_points']:,} points; side by side on {c['compare_fleet_devices']:,} devices "
      f"({c['compare_fleet_points']:,} points; {c['compare_fleet_reason']}).\n")
rows = [
    ("ingest, points/s (main dataset)", "{e}.ingest.points_per_s", i),
    ("CPU of this process during ingest, cores", "{e}.ingest.cpu_cores", f2),
    ("write call / transaction / COPY p99, ms", "{e}.ingest.call_p99_ms", f1),
    ("bytes per point (main dataset, all tenants)", "{e}.bytes_per_point", f2),
    (f"raw day of one series ({runs[0]['engine']['raw_day']['rows']:,} points), median ms", "{e}.raw_day.median_ms", f2),
    ("raw day of one series, p99 of 50, ms", "{e}.raw_day.p99_ms", f2),
    ("1 h buckets (avg) of that day, median ms", "{e}.agg_day.median_ms", f2),
    ("comparison fleet: ingest, points/s", "fleet.compare.{e}.ingest.points_per_s", i),
    ("comparison fleet: bytes per point", "fleet.compare.{e}.bytes_per_point", f2),
    ("comparison fleet: 1 h avg over all devices, median ms", "fleet.compare.{e}.query.median_ms", f1),
    ("comparison fleet: 1 h avg per device, median ms", "fleet.compare.{e}.per_device.median_ms", f1),
]
engines = ["engine", "sqlite", "postgres"]
print("| metric | Ferrohub engine | SQLite | PostgreSQL | engine/SQLite | engine/PostgreSQL |")
print("|---|---:|---:|---:|---:|---:|")
for name, path, fmt in rows:
    vals = [med(path.format(e=e)) for e in engines]
    ratio = lambda o: "–" if (vals[0] is None or o in (None, 0)) else f"{vals[0] / o:.2f}×"
    print(f"| {name} | {fmt(vals[0])} | {fmt(vals[1])} | {fmt(vals[2])} | {ratio(vals[1])} | {ratio(vals[2])} |")

print("\nEngine only (medians):\n")
print("| tenant | profile | timestamps | B/point | ts | values | 1-min rollups | 1-h rollups | index |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|")
for k, t in enumerate(runs[0]["engine"]["tenants"]):
    p = f"engine.tenants.{k}."
    print(f"| {t['tenant']} | {t['profile']} | {t['timestamps']} | {f3(med(p + 'bytes_per_point'))} | "
          f"{f3(med(p + 'ts_bpp'))} | {f3(med(p + 'values_bpp'))} | {f3(med(p + 'minute_rollup_bpp'))} | "
          f"{f3(med(p + 'hourly_rollup_bpp'))} | {f3(med(p + 'index_bpp'))} |")
for k, what in [("regular", "regular timestamps"), ("jittered", "jittered timestamps"),
                ("regular_vib_0_01", "regular, vibration at 0.01"),
                ("jittered_vib_0_01", "jittered, vibration at 0.01")]:
    p = f"engine.mix.{k}."
    print(f"| **mix of 4** | temp + vib + counter + status | {what} | **{f3(med(p + 'bytes_per_point'))}** | "
          f"{f3(med(p + 'ts_bpp'))} | {f3(med(p + 'values_bpp'))} | {f3(med(p + 'minute_rollup_bpp'))} | "
          f"{f3(med(p + 'hourly_rollup_bpp'))} | {f3(med(p + 'index_bpp'))} |")

fd = c["fleet_devices"]
print(f"""
| engine phase | median | runs |
|---|---:|---|
| main ingest, points/s | {i(med('engine.ingest.points_per_s'))} | {spread('engine.ingest.points_per_s', i)} |
| main ingest: points per WAL group commit | {i(med('engine.points_per_wal_commit'))} | {spread('engine.points_per_wal_commit', i)} |
| main ingest: head flushes during it / flusher busy, s | {i(med('engine.during_ingest.flushes'))} / {f1(med('engine.during_ingest.flush_s'))} | {spread('engine.during_ingest.flush_s', f1)} |
| flush after ingest, s | {f2(med('engine.seal.flush_s'))} | {spread('engine.seal.flush_s', f2)} |
| compact(true), s | {f2(med('engine.seal.compact_s'))} | {spread('engine.seal.compact_s', f2)} |
| whole fleet ({fd:,} devices) ingest, points/s (points built in the loop) | {i(med('fleet.engine_full.ingest.points_per_s'))} | {spread('fleet.engine_full.ingest.points_per_s', i)} |
| whole fleet: of which building points, s | {f1(med('fleet.engine_full.ingest.build_s'))} | {spread('fleet.engine_full.ingest.build_s', f1)} |
| whole fleet: head flushes during ingest / flusher busy, s | {i(med('fleet.engine_full.during_ingest.flushes'))} / {f1(med('fleet.engine_full.during_ingest.flush_s'))} | {spread('fleet.engine_full.during_ingest.flush_s', f1)} |
| whole fleet: flush / compact, s | {f1(med('fleet.engine_full.seal.flush_s'))} / {f1(med('fleet.engine_full.seal.compact_s'))} | |
| whole fleet: bytes per point | {f3(med('fleet.engine_full.parts.bytes_per_point'))} | {spread('fleet.engine_full.parts.bytes_per_point', f3)} |
| whole fleet: 1 h avg over all devices, {c['fleet_days']} days to now, ms | {f1(med('fleet.engine_full.query.median_ms'))} | {spread('fleet.engine_full.query.median_ms', f1)} |
| whole fleet: the same, hour-aligned window, ms | {f1(med('fleet.engine_full.query_hour_aligned.median_ms'))} | {spread('fleet.engine_full.query_hour_aligned.median_ms', f1)} |
| whole fleet: 1 h avg per device (in queries of 1,000 devices), ms | {f1(med('fleet.engine_full.per_device.median_ms'))} | {spread('fleet.engine_full.per_device.median_ms', f1)} |
| RSS growth over the main ingest + seal, MiB | {f1(med('engine.rss_mib.main_growth'))} | {spread('engine.rss_mib.main_growth', f1)} |
| RSS growth over the whole-fleet ingest + seal, MiB | {f1(med('fleet.engine_full.rss_mib_growth'))} | {spread('fleet.engine_full.rss_mib_growth', f1)} |
| VmHWM of the process (includes the generated data), MiB | {f1(med('engine.rss_mib.vm_hwm'))} | {spread('engine.rss_mib.vm_hwm', f1)} |
| load average at start | {f2(med('load_average_at_start'))} | {spread('load_average_at_start', f2)} |
| total run time, s | {f1(med('total_s'))} | {spread('total_s', f1)} |
""")
bad = [f for r in runs for f in r["checks"]["failures"]]
print("checks: " + ("every query result matched the generated data in every run" if not bad else "FAILED: " + "; ".join(bad)))
EOF
echo "raw results: $OUT"
