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
    table_at = len(out)
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

    if len(out) == table_at:
        del out[table_at - 2:]  # no MQTT scenario in these results: no empty table
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
    out.extend(auth_report(runs))
    print("\n".join(out))


CONNECT = {
    "connect-password": "connect with a password (each device its own)",
    "connect-generated": "connect with a registry-generated password (SHA-256, no argon2id)",
    "connect-mtls": "connect with a TLS 1.3 client certificate",
}
POLICY = {
    "policy-q0": "fan-in QoS 0, 8 devices -> monitor",
    "policy-q1": "fan-in QoS 1, 8 devices -> monitor",
}
POLICY_REFERENCE_RATE = 100000


def auth_report(runs):
    """Tables of the auth scenarios (connect rates, policy cost) and of the registry benchmark."""
    out = []
    rows = []
    for scen, title in CONNECT.items():
        per = {b: [l for ls in runs.get((scen, b), {}).values() for l in ls]
               for b in ("ferrohub", "mosquitto")}
        if not any(per.values()):
            continue
        n = max(len(runs.get((scen, b), {})) for b in per)
        sample = next(l for ls in per.values() for l in ls)
        for cache in ("cold", "warm"):
            sel = {b: [l for l in per[b] if l.get("cache") == cache] for b in per}
            rate = {b: median([l.get("connect_rate") for l in sel[b]]) for b in sel}
            p99 = {b: median([l.get("latency_p99_ms") for l in sel[b]]) for b in sel}
            cpu = {b: median([l.get("broker_cpu_ms_per_connect") for l in sel[b]]) for b in sel}
            fails = {b: sum(l.get("failed") or 0 for l in sel[b]) for b in sel}
            name = (f"{title}, {sample.get('devices'):,} devices, {sample.get('concurrency')} "
                    f"at a time ({n} runs)") if cache == "cold" else ""
            rows.append(f"| {name} | pass {1 if cache == 'cold' else 2} ({cache}) | "
                        f"{fmt(rate['ferrohub'])} | {fmt(rate['mosquitto'])} | "
                        f"{ratio(rate['ferrohub'], rate['mosquitto'])} | "
                        f"{fmt(p99['ferrohub'], ' ms')} / {fmt(p99['mosquitto'], ' ms')} | "
                        f"{fmt(cpu['ferrohub'], ' ms')} / {fmt(cpu['mosquitto'], ' ms')} | "
                        f"{fails['ferrohub']} / {fails['mosquitto']} |")
    if rows:
        out += ["", "Authenticated connects (CONNECT -> CONNACK -> DISCONNECT per device, medians):", "",
                "| Scenario | Pass | Ferrohub conn/s | Mosquitto conn/s | Ferrohub/Mosquitto "
                "| p99 connect (F / M) | broker CPU per connect (F / M) | failures (F / M) |",
                "|---|---|---:|---:|---:|---:|---:|---:|"] + rows

    rows = []
    for scen, title in POLICY.items():
        per = {b: [ladder_run(ls) for ls in runs.get((scen, b), {}).values()]
               for b in ("ferrohub-anon", "ferrohub")}
        per = {b: [f for f in v if f] for b, v in per.items()}
        if not any(per.values()):
            continue
        at_ref = {b: median([l.get("broker_cpu_pct")
                             for ls in runs.get((scen, b), {}).values() for l in ls
                             if l.get("summary") is None
                             and l.get("offered_rate") == POLICY_REFERENCE_RATE])
                  for b in per}
        n = max(len(runs.get((scen, b), {})) for b in per)
        vals = [
            ("max sustainable msg/s", {b: median([f["rate"] for f in per[b]]) for b in per}, ""),
            ("p99 at that rate", {b: median([f["p99"] for f in per[b]]) for b in per}, " ms"),
            ("broker CPU at that rate (% of a core)",
             {b: median([f["broker_cpu"] for f in per[b]]) for b in per}, ""),
            (f"broker CPU at {POLICY_REFERENCE_RATE:,} msg/s (% of a core)", at_ref, ""),
        ]
        for i, (label, v, unit) in enumerate(vals):
            rows.append(f"| {title + f' ({n} runs)' if i == 0 else ''} | {label} | "
                        f"{fmt(v['ferrohub-anon'], unit)} | {fmt(v['ferrohub'], unit)} | "
                        f"{ratio(v['ferrohub'], v['ferrohub-anon'])} |")
    if rows:
        out += ["", "Default policy on vs authorization off (Ferrohub, medians):", "",
                "| Scenario | Metric | anonymous (no policy) | devices, default policy | policy/anonymous |",
                "|---|---|---:|---:|---:|"] + rows

    reg = [l for ls in runs.get(("registry", "none"), {}).values() for l in ls]
    queries = [l for l in reg if l.get("phase") == "query"]
    if queries:
        load = next((l for l in reg if l.get("phase") == "load" and l.get("load_s")), None)
        n = len(runs.get(("registry", "none"), {}))
        out += ["", f"Registry at {queries[0].get('devices'):,} devices ({n} runs; per run median and "
                "p99 over its repetitions, then the median over runs):", ""]
        if load:
            out.append(f"Load: {load.get('devices'):,} devices in {load.get('load_s'):.0f} s "
                       f"({load.get('devices_per_s'):,.0f}/s), last-seen times in "
                       f"{load.get('connectivity_s'):.0f} s, database {load.get('db_bytes', 0) / 1e6:,.0f} MB.")
            out.append("")
        out += ["| Query | rows | median | p99 | runs × repetitions |", "|---|---:|---:|---:|---:|"]
        names = []
        for l in queries:
            if l["query"] not in names:
                names.append(l["query"])
        for q in names:
            sel = [l for l in queries if l["query"] == q]
            out.append(f"| {sel[0].get('description')} | {sel[0].get('rows')} | "
                       f"{fmt(median([l.get('median_ms') for l in sel]), ' ms')} | "
                       f"{fmt(median([l.get('p99_ms') for l in sel]), ' ms')} | "
                       f"{len(sel)} × {sel[0].get('runs')} |")
    return out


if __name__ == "__main__":
    main()
