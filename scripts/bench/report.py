#!/usr/bin/env python3
"""Summarise scripts/bench.sh results: medians per scenario and broker, as Markdown.

Usage: report.py RESULTS_DIR   (reads RESULTS_DIR/raw/*.jsonl, the harness's JSON lines, whose
`label` is "<scenario>:<broker>:<run>"; prints Markdown on stdout).
"""

import glob
import json
import os
import statistics
import sys

BROKERS = ["ferrohub", "mosquitto", "rumqttd"]
NAMES = {"ferrohub": "Ferrohub", "mosquitto": "Mosquitto", "rumqttd": "rumqttd"}
LADDERS = {
    "fanin-q0": "fan-in QoS 0, 8 publishers -> 1 wildcard subscriber",
    "fanin-q1": "fan-in QoS 1, 8 publishers -> 1 wildcard subscriber",
    "fanout": "fan-out QoS 0, 1 publisher -> 100 subscribers",
    "pairs": "1,000 QoS 1 publisher/subscriber pairs",
}
LATENCY = {
    "latency-fanin": "fan-in, 8 publishers, paced",
    "latency-pairs": "1,000 pairs, paced",
}


def load(results):
    """{(scenario, broker): {run: [lines]}}"""
    runs = {}
    for path in sorted(glob.glob(os.path.join(results, "raw", "*.jsonl"))):
        with open(path) as f:
            for raw in f:
                raw = raw.strip()
                if not raw:
                    continue
                try:
                    line = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                parts = str(line.get("label", "")).split(":")
                if len(parts) != 3:
                    continue
                scen, broker, run = parts
                runs.setdefault((scen, broker), {}).setdefault(run, []).append(line)
    return runs


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, unit=""):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if abs(v) >= 100:
        s = f"{v:,.0f}"
    elif abs(v) >= 10:
        s = f"{v:.1f}"
    else:
        s = f"{v:.2f}"
    return s + unit


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def ladder_run(lines):
    """Figures of one ladder run: at the maximum sustainable step."""
    summary = next((l for l in lines if l.get("summary") == "ladder"), None)
    if summary is None:
        return None
    best = summary.get("max_sustainable_rate")
    step = next(
        (l for l in lines if l.get("summary") is None and l.get("offered_rate") == best), None
    )
    return {
        "rate": best if best is not None else 0,
        "deliveries": summary.get("max_sustainable_throughput") or 0,
        "p99": step.get("latency_p99_ms") if step else None,
        "harness_cpu": step.get("harness_cpu_pct") if step else None,
        "broker_cpu": step.get("broker_cpu_pct") if step else None,
        "none": best is None,
        "top": best is not None and best == max(summary.get("rates") or [0]),
    }


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    results = sys.argv[1]
    runs = load(results)
    brokers = [b for b in BROKERS if any(k[1] == b for k in runs)]
    ratios = [o for o in ("mosquitto", "rumqttd") if "ferrohub" in brokers and o in brokers]
    env = os.path.join(results, "environment.txt")
    out = []
    if os.path.exists(env):
        with open(env) as f:
            out.append("```text\n" + f.read().strip() + "\n```\n")

    head = "| Scenario | Metric | " + " | ".join(NAMES[b] for b in brokers)
    head += "".join(f" | Ferrohub/{NAMES[o]}" for o in ratios) + " |"
    sep = "|---|---|" + "---:|" * (len(brokers) + len(ratios))
    out += [head, sep]
    cpu_rows = []
    notes = set()

    def row(scen, metric, values, unit=""):
        cells = [fmt(values.get(b), unit) for b in brokers]
        cells += [ratio(values.get("ferrohub"), values.get(o)) for o in ratios]
        out.append(f"| {scen} | {metric} | " + " | ".join(cells) + " |")

    def nruns(scen):
        return max((len(runs.get((scen, b), {})) for b in brokers), default=0)

    for scen, title in LADDERS.items():
        per = {}
        for b in brokers:
            figures = [ladder_run(lines) for lines in runs.get((scen, b), {}).values()]
            per[b] = [f for f in figures if f]
            if any(f["none"] for f in per[b]):
                notes.add("0 = not even the ladder's lowest rate was sustainable.")
            if any(f["top"] for f in per[b]):
                notes.add(f"{NAMES[b]} sustained the top of the {scen} ladder in some run: its "
                          "maximum is at least that (extend the LADDER_* variable).")
        if not any(per.values()):
            continue
        name = f"{title} ({nruns(scen)} runs)"
        if scen == "fanout":
            row(name, "max sustainable deliveries/s",
                {b: median([f["deliveries"] for f in per[b]]) for b in brokers})
            row("", "(publishes/s)", {b: median([f["rate"] for f in per[b]]) for b in brokers})
        else:
            row(name, "max sustainable msg/s",
                {b: median([f["rate"] for f in per[b]]) for b in brokers})
        row("", "p99 at that rate", {b: median([f["p99"] for f in per[b]]) for b in brokers}, " ms")
        cpu_rows.append((scen, {b: (median([f["harness_cpu"] for f in per[b]]),
                                    median([f["broker_cpu"] for f in per[b]])) for b in brokers}))

    for scen, title in LATENCY.items():
        per = {b: [l for ls in runs.get((scen, b), {}).values() for l in ls] for b in brokers}
        if not any(per.values()):
            continue
        sample = next(l for ls in per.values() for l in ls)
        name = f"{title} {sample.get('offered_rate', 0):,} msg/s QoS {sample.get('qos')} ({nruns(scen)} runs)"
        for key, label in [("latency_p50_ms", "p50"), ("latency_p99_ms", "p99"),
                           ("latency_max_ms", "max")]:
            row(name if label == "p50" else "", f"latency {label}",
                {b: median([l.get(key) for l in per[b]]) for b in brokers}, " ms")
        row("", "loss", {b: median([l.get("loss") for l in per[b]]) for b in brokers})
        cpu_rows.append((scen, {b: (median([l.get("harness_cpu_pct") for l in per[b]]),
                                    median([l.get("broker_cpu_pct") for l in per[b]]))
                                for b in brokers}))

    idle = {b: [l for ls in runs.get(("idle", b), {}).values() for l in ls] for b in brokers}
    counts = sorted({l.get("connections") for ls in idle.values() for l in ls if l.get("connections")})
    for c in counts:
        per = {b: [l for l in idle[b] if l.get("connections") == c] for b in brokers}
        name = f"idle, {c:,} connections ({nruns('idle')} runs)"
        row(name, "connections/s",
            {b: median([l.get("connect_rate") for l in per[b]]) for b in brokers})
        row("", "broker RSS per connection",
            {b: median([l.get("rss_per_connection_bytes") for l in per[b]]) for b in brokers}, " B")
        row("", "still open after hold",
            {b: median([l.get("still_open") for l in per[b]]) for b in brokers})
        oks = {b: (all(l.get("routing_ok") for l in per[b]) if per[b] else None) for b in brokers}
        cells = [fmt(oks.get(b)) for b in brokers] + ["" for _ in ratios]
        out.append("|  | still routes | " + " | ".join(cells) + " |")

    out.append("")
    out.append("Ratios are plain Ferrohub ÷ other: above 1 is better for rates, worse for "
               "latency and memory. Medians over runs; each run used a fresh broker process.")
    out.extend(sorted(notes))

    if cpu_rows:
        out.append("")
        out.append("Harness vs broker CPU (% of one core, at the reported step):")
        out.append("")
        out.append("| Scenario | " + " | ".join(f"{NAMES[b]}: harness / broker" for b in brokers) + " |")
        out.append("|---|" + "---:|" * len(brokers))
        for scen, vals in cpu_rows:
            cells = [f"{fmt(vals[b][0])} / {fmt(vals[b][1])}" for b in brokers]
            out.append(f"| {scen} | " + " | ".join(cells) + " |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
