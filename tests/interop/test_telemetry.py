"""Telemetry seen from outside: devices publishing with paho-mqtt (3.1.1 and 5.0), an InfluxDB v2
line-protocol writer (urllib, gzip bodies, `Authorization: Token`), reads through the operator API
(raw points and aggregates), and exports to an S3-compatible store (moto) read back over S3's own
HTTP API (requests signed here with SigV4) and, for Parquet, with pyarrow.

The S3 test needs a running S3 endpoint named by $FERROHUB_TEST_S3_ENDPOINT (.ci/run starts
moto_server; by hand: `/tmp/ferrohub-moto/bin/moto_server -H 127.0.0.1 -p 5077 &` and
`FERROHUB_TEST_S3_ENDPOINT=http://127.0.0.1:5077`), and a Python with pyarrow named by
$FERROHUB_TEST_PYARROW_PYTHON (.ci/run installs pyarrow in the moto venv) unless pytest's own
Python has it. Without them the test fails, never skips.

Device timestamps are chosen a few hours in the past (inside the hub's skew window), aligned to an
hour, so that bucket boundaries are known."""

import csv
import datetime
import gzip
import hashlib
import hmac
import io
import json
import os
import queue
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree as ET

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
import pytest

from conftest import ADMIN_TOKEN, Hub, paho_device, wait_for

TENANT = "default"
VERSIONS = {"v311": mqtt.MQTTv311, "v5": mqtt.MQTTv5}
DEVICES = {"v311": ("meter-3", "secret-meter-3"), "v5": ("meter-5", "secret-meter-5")}
HOUR_MS = 3_600_000


def register_devices(h):
    for device, secret in DEVICES.values():
        status, body = h.api("POST", f"/tenants/{TENANT}/devices", {"id": device})
        assert status == 201, body
        status, body = h.api("POST", f"/tenants/{TENANT}/devices/{device}/credentials",
                             {"kind": "password", "secret": secret})
        assert status == 201, body


@pytest.fixture
def hub():
    h = Hub(anonymous=False)
    try:
        register_devices(h)
        yield h
    finally:
        h.stop()


# ---- helpers ------------------------------------------------------------------------------


def hour_base():
    """Start of the hour two to three hours ago, in ms: inside the default backfill window, and
    far enough from now that every bucket used below is complete."""
    return (int(time.time() * 1000) // HOUR_MS - 3) * HOUR_MS


def rfc3339(ms):
    """What the API shows as `time`: RFC 3339, UTC, milliseconds."""
    t = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def q(s):
    return urllib.parse.quote(s, safe="")


def http(hub, method, path, body=None, headers=None, timeout=10):
    """A plain HTTP request to the hub: (status, headers, body bytes)."""
    req = urllib.request.Request(f"http://{hub.addrs['http']}{path}", data=body, method=method,
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def raw(hub, device, metric, frm, to, **params):
    query = urllib.parse.urlencode({"from": frm, "to": to, **params})
    status, body = hub.api("GET", f"/tenants/{TENANT}/devices/{q(device)}/telemetry/{q(metric)}?{query}")
    assert status == 200, body
    return body


def points(hub, device, metric, frm, to):
    """[(ts, time, value)] of one series in [frm, to), checking each `time` matches its `ts`."""
    page = raw(hub, device, metric, frm, to)
    assert page["next_cursor"] is None, page
    out = []
    for p in page["points"]:
        assert p["time"] == rfc3339(p["ts"]), p
        out.append((p["ts"], p["value"]))
    return out


def typed(pts):
    """Points with the JSON type of their values, so 40 and 40.0 differ."""
    return [(ts, type(v).__name__, v) for ts, v in pts]


def aggregate(hub, device, metric, frm, to, bucket, fn=None):
    params = {"from": frm, "to": to, "bucket": bucket}
    if fn:
        params["fn"] = fn
    query = urllib.parse.urlencode(params)
    status, body = hub.api("GET",
                           f"/tenants/{TENANT}/devices/{q(device)}/telemetry/{q(metric)}/aggregate?{query}")
    assert status == 200, body
    return body


def device_client(hub, name):
    device, secret = DEVICES[name]
    return paho_device(hub, device, device, secret, VERSIONS[name])


def publish(c, topic, payload, content_type=None):
    """Publishes at QoS 1 and waits for the PUBACK: (reason code, reason string or None)."""
    if not isinstance(payload, (bytes, str)):
        payload = json.dumps(payload)
    props = None
    if content_type is not None:
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = content_type
    info = c.publish(topic, payload, qos=1, properties=props)
    info.wait_for_publish(10)
    assert info.is_published(), f"no PUBACK for {topic} within 10 s"
    mid, rc, props = c.acks.get(timeout=10)
    assert mid == info.mid
    reason = getattr(props, "ReasonString", None) if props is not None else None
    return rc.value, reason


def stop(c):
    c.disconnect()
    c.loop_stop()


# ---- MQTT ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["v311", "v5"])
def test_paho_telemetry_is_read_back_exactly(hub, name):
    device, _ = DEVICES[name]
    base = hour_base()
    frm, to = base, base + HOUR_MS
    c = device_client(hub, name)
    ok = (0, 16)  # success, or "no matching subscribers" (nobody subscribes to telemetry here)

    # A nested object with its own timestamp: every kind of value, an array, a null (skipped).
    rc, _ = publish(c, f"devices/{device}/telemetry", {
        "ts": base + 1000,
        "env": {"temp": 21.5, "hum": 40, "air": {"co2": 412}},
        "ok": True, "state": "idle", "accel": [1, -2, 0.125], "gone": None},
        content_type="application/json" if name == "v5" else None)
    assert rc in ok
    # A batch on a sub-topic (the suffix prefixes the metric), each sample with its own time:
    # ms, RFC 3339, integer seconds, float seconds (keeps ms).
    rc, _ = publish(c, f"devices/{device}/telemetry/motor", [
        {"ts": base + 2000, "rpm": 1500},
        {"ts": rfc3339(base + 61_000), "rpm": 1510.5},
        {"ts": (base + 62_000) // 1000, "rpm": 1490},
        {"ts": (base + 62_500) / 1000, "rpm": 1520}])
    assert rc in ok
    # A bare value takes the suffix as its metric, and the receive time.
    before = int(time.time() * 1000)
    rc, _ = publish(c, f"devices/{device}/telemetry/voltage", b"229.7")
    assert rc in ok
    after = int(time.time() * 1000)

    # Acknowledged means stored: read at once, no waiting.
    t1 = base + 1000
    assert typed(points(hub, device, "env.temp", frm, to)) == [(t1, "float", 21.5)]
    assert typed(points(hub, device, "env.hum", frm, to)) == [(t1, "int", 40)]
    assert typed(points(hub, device, "env.air.co2", frm, to)) == [(t1, "int", 412)]
    assert typed(points(hub, device, "ok", frm, to)) == [(t1, "bool", True)]
    assert typed(points(hub, device, "state", frm, to)) == [(t1, "str", "idle")]
    assert [points(hub, device, f"accel.{i}", frm, to) for i in range(3)] == \
        [[(t1, 1)], [(t1, -2)], [(t1, 0.125)]]
    for absent in ("gone", "ts"):
        assert points(hub, device, absent, frm, to) == []
    rpm = points(hub, device, "motor.rpm", frm, to)
    assert rpm == [(base + 2000, 1500), (base + 61_000, 1510.5), (base + 62_000, 1490), (base + 62_500, 1520)]
    # Integers and floats are one kind: a series of integers becomes floats once a float arrives.
    assert {type(v) for _, v in rpm} == {float}
    voltage = points(hub, device, "voltage", before - 1000, after + 1000)
    assert len(voltage) == 1 and voltage[0][1] == 229.7 and before <= voltage[0][0] <= after, voltage

    # Descending order and paging with a cursor.
    page = raw(hub, device, "motor.rpm", frm, to, order="desc", limit=3)
    assert [p["ts"] for p in page["points"]] == [base + 62_500, base + 62_000, base + 61_000]
    assert page["next_cursor"]
    page = raw(hub, device, "motor.rpm", frm, to, order="desc", limit=3, cursor=page["next_cursor"])
    assert [(p["ts"], p["value"]) for p in page["points"]] == [(base + 2000, 1500)]
    assert page["next_cursor"] is None

    # The device's series, with their latest points.
    status, series = hub.api("GET", f"/tenants/{TENANT}/devices/{device}/telemetry")
    assert status == 200, series
    by_metric = {s["metric"]: s for s in series}
    assert sorted(by_metric) == sorted(["env.temp", "env.hum", "env.air.co2", "ok", "state", "accel.0",
                                        "accel.1", "accel.2", "motor.rpm", "voltage"])
    assert by_metric["motor.rpm"]["latest_ts"] == base + 62_500 and by_metric["motor.rpm"]["latest"] == 1520
    assert by_metric["motor.rpm"]["latest_time"] == rfc3339(base + 62_500)
    assert (by_metric["ok"]["kind"], by_metric["state"]["kind"], by_metric["env.temp"]["kind"]) == \
        ("bool", "string", "numeric")

    # Aggregates: 1-minute buckets (epoch-aligned), every function.
    agg = aggregate(hub, device, "motor.rpm", frm, to, "1m")
    assert (agg["bucket_ms"], agg["from"], agg["to"]) == (60_000, frm, to)
    assert agg["buckets"] == [
        {"start": base, "time": rfc3339(base), "avg": 1500.0, "min": 1500.0, "max": 1500.0,
         "sum": 1500.0, "count": 1, "first": 1500.0, "last": 1500.0},
        {"start": base + 60_000, "time": rfc3339(base + 60_000), "avg": 4520.5 / 3, "min": 1490.0,
         "max": 1520.0, "sum": 4520.5, "count": 3, "first": 1510.5, "last": 1520.0}]
    # An hour bucket (served from rollups where sealed), some functions only.
    agg = aggregate(hub, device, "motor.rpm", frm, to, "1h", fn="count,sum,last")
    assert agg["buckets"] == [{"start": base, "time": rfc3339(base), "sum": 6020.5, "count": 4, "last": 1520.0}]
    # Booleans aggregate as 0/1; strings cannot be aggregated.
    agg = aggregate(hub, device, "ok", frm, to, "1h", fn="count,sum")
    assert agg["buckets"] == [{"start": base, "time": rfc3339(base), "sum": 1.0, "count": 1}]
    status, body = hub.api("GET", f"/tenants/{TENANT}/devices/{device}/telemetry/state/aggregate?"
                                  + urllib.parse.urlencode({"from": frm, "to": to, "bucket": "1h"}))
    assert status == 400 and body["code"] == "invalid", body

    # A resend of the same sample (same series and time) replaces it: no duplicate.
    rc, _ = publish(c, f"devices/{device}/telemetry/motor", {"ts": base + 2000, "rpm": 1505})
    assert rc in ok
    assert typed(points(hub, device, "motor.rpm", frm, base + 60_000)) == [(base + 2000, "float", 1505.0)]
    stop(c)


def test_paho_v5_payload_with_one_bad_sample_is_refused_whole(hub):
    """0x99 for "ok" is covered in test_identity.py; here a payload that is mostly good: nothing
    of it is stored, and the PUBACK carries a reason string."""
    device, _ = DEVICES["v5"]
    base = hour_base()
    c = device_client(hub, "v5")
    invalid_before = hub.metric("ferrohub_telemetry_invalid_total")
    too_deep = {"x": 1}
    for _ in range(9):
        too_deep = {"n": too_deep}
    for payload in [{"ts": base + 5000, "temp": 20.5, "deep": too_deep},
                    {"ts": base + 5000, "temp": 20.5, "bad\u0001name": 1},
                    b"{\"temp\": 20.5,",  # truncated JSON
                    b"{\"temp\": 1e999}"]:  # not a finite number
        rc, reason = publish(c, f"devices/{device}/telemetry", payload, content_type="application/json")
        assert rc == 0x99, (payload, rc)
        assert reason, f"0x99 without a reason string for {payload!r}"
    assert points(hub, device, "temp", base, base + HOUR_MS) == []
    assert wait_for(lambda: hub.metric("ferrohub_telemetry_invalid_total") == invalid_before + 4, 5)
    # The connection is still usable, and a good payload on it is stored.
    assert publish(c, f"devices/{device}/telemetry", {"ts": base + 5000, "temp": 20.5})[0] in (0, 16)
    assert points(hub, device, "temp", base, base + HOUR_MS) == [(base + 5000, 20.5)]
    stop(c)


def test_paho_v311_payload_that_is_not_telemetry_is_acknowledged_and_not_stored(hub):
    device, _ = DEVICES["v311"]
    base = hour_base()
    c = device_client(hub, "v311")
    invalid_before = hub.metric("ferrohub_telemetry_invalid_total")
    # 3.1.1 has no negative acknowledgement: PUBACK, nothing stored, counted.
    assert publish(c, f"devices/{device}/telemetry", b"{\"ts\": %d, \"temp\": 19.5, \"b\": [}" % (base + 7000))[0] == 0
    assert wait_for(lambda: hub.metric("ferrohub_telemetry_invalid_total") == invalid_before + 1, 5)
    assert points(hub, device, "temp", base, base + HOUR_MS) == []
    assert c.is_connected()
    assert publish(c, f"devices/{device}/telemetry", {"ts": base + 7000, "temp": 19.5})[0] == 0
    assert points(hub, device, "temp", base, base + HOUR_MS) == [(base + 7000, 19.5)]
    stop(c)


def test_acknowledged_telemetry_survives_a_crash_and_sealing(tmp_path):
    """PUBACK means durable in the WAL: a SIGKILL right after it loses nothing; after the restart
    the head is sealed into a part (flush every second) and reads, rollups included, agree."""
    data_dir = str(tmp_path / "data")
    os.mkdir(data_dir)
    device, _ = DEVICES["v5"]
    base = hour_base()
    frm, to = base, base + HOUR_MS
    samples = [{"ts": base + i * 20_000, "power": 100 + i, "load": i / 4} for i in range(12)]
    h = Hub(anonymous=False, data_dir=data_dir)
    try:
        register_devices(h)
        c = device_client(h, "v5")
        for i in range(0, len(samples), 4):
            assert publish(c, f"devices/{device}/telemetry", samples[i:i + 4])[0] in (0, 16)
        h.crash()
        c.loop_stop()
    finally:
        h.stop()
    h = Hub(anonymous=False, data_dir=data_dir, extra_env={"FERROHUB_TELEMETRY__FLUSH_INTERVAL_SECS": "1"})
    try:
        want_power = [(s["ts"], 100 + i) for i, s in enumerate(samples)]
        want_load = [(s["ts"], i / 4) for i, s in enumerate(samples)]
        assert points(h, device, "power", frm, to) == want_power
        assert points(h, device, "load", frm, to) == want_load
        assert wait_for(lambda: h.metric("ferrohub_tsdb_parts") >= 1 and h.metric("ferrohub_tsdb_head_points") == 0,
                        15), "the head was not sealed into a part within 15 s"
        assert typed(points(h, device, "power", frm, to)) == [(ts, "int", v) for ts, v in want_power]
        assert points(h, device, "load", frm, to) == want_load
        agg = aggregate(h, device, "power", frm, to, "1h")
        assert agg["buckets"] == [{"start": base, "time": rfc3339(base), "avg": 105.5, "min": 100.0,
                                   "max": 111.0, "sum": 1266.0, "count": 12, "first": 100.0, "last": 111.0}]
        agg = aggregate(h, device, "load", frm, to, "1m", fn="count,sum")
        assert agg["buckets"] == [
            {"start": base + m * 60_000, "time": rfc3339(base + m * 60_000), "count": 3,
             "sum": sum(i / 4 for i in range(3 * m, 3 * m + 3))} for m in range(4)]
    finally:
        h.stop()


# ---- InfluxDB line protocol -----------------------------------------------------------------


def operator_token(hub, tenant=TENANT):
    status, body = hub.api("POST", "/tokens", {"name": "telegraf", "role": "operator", "tenant": tenant})
    assert status == 201, body
    return body["secret"]


def influx_write(hub, token, body, precision=None, compress=True, org=None):
    params = {"bucket": "telegraf"}
    if precision:
        params["precision"] = precision
    if org:
        params["org"] = org
    headers = {"Authorization": f"Token {token}", "Content-Type": "text/plain; charset=utf-8"}
    data = body.encode()
    if compress:
        data = gzip.compress(data)
        headers["Content-Encoding"] = "gzip"
    return http(hub, "POST", "/api/v2/write?" + urllib.parse.urlencode(params), data, headers)


def test_influx_line_protocol_gzip_write_and_read_back(hub):
    token = operator_token(hub)
    base = hour_base()
    base_s = base // 1000
    # precision=s; escaped measurement (space, comma), tag key and values (space, comma, equals),
    # string field with escaped quote and backslash; float, integer, unsigned, boolean, string.
    lines_s = "\n".join([
        "# a comment, then a blank line",
        "",
        r'weather\ station\,v2,host=web-1,loc\=ation=roof\,north temp=21.5,count=42i,big=7u,ok=T,'
        r'note="say \"hi\" \\ bye" ' + str(base_s + 10),
        r'weather\ station\,v2,host=web-1,loc\=ation=roof\,north temp=-3e-2,ok=false ' + str(base_s + 70),
    ]) + "\n"
    status, headers, body = influx_write(hub, token, lines_s, precision="s")
    assert status == 204, body
    assert body == b""
    # precision=ms, CRLF line ends; `device` wins over `host` (which stays a tag).
    lines_ms = "\r\n".join([
        f"cpu,host=web-1,cpu=cpu0 usage_user=3.5,usage_idle=96.5 {base + 20_500}",
        f"cpu,host=web-1,cpu=cpu0 usage_user=4.25 {base + 21_250}",
        f"cpu,device=edge-7,host=web\\ 1 usage_user=1i {base + 22_000}",
    ])
    status, _, body = influx_write(hub, token, lines_ms, precision="ms")
    assert status == 204, body

    # A device id that is not one (a space): that point is dropped, the others are written (422).
    status, _, body = influx_write(
        hub, token, f"cpu,host=web\\ 1 v=1 {base + 23_000}\ncpu,host=web-2 spare=2 {base + 23_000}",
        precision="ms")
    assert status == 422, body
    assert b"web 1" in body and b"not valid" in body, body
    assert points(hub, "web-2", "cpu.spare", base, base + HOUR_MS) == [(base + 23_000, 2.0)]

    frm, to = base, base + HOUR_MS
    dev = "web-1"
    suffix = r"{loc\=ation=roof\,north}"
    m = "weather station,v2."
    assert typed(points(hub, dev, m + "temp" + suffix, frm, to)) == \
        [(base + 10_000, "float", 21.5), (base + 70_000, "float", -0.03)]
    assert typed(points(hub, dev, m + "count" + suffix, frm, to)) == [(base + 10_000, "int", 42)]
    assert typed(points(hub, dev, m + "big" + suffix, frm, to)) == [(base + 10_000, "int", 7)]
    assert typed(points(hub, dev, m + "ok" + suffix, frm, to)) == \
        [(base + 10_000, "bool", True), (base + 70_000, "bool", False)]
    assert typed(points(hub, dev, m + "note" + suffix, frm, to)) == [(base + 10_000, "str", 'say "hi" \\ bye')]
    assert points(hub, dev, "cpu.usage_user{cpu=cpu0}", frm, to) == [(base + 20_500, 3.5), (base + 21_250, 4.25)]
    assert points(hub, dev, "cpu.usage_idle{cpu=cpu0}", frm, to) == [(base + 20_500, 96.5)]
    assert typed(points(hub, "edge-7", "cpu.usage_user{host=web 1}", frm, to)) == [(base + 22_000, "int", 1)]

    status, series = hub.api("GET", f"/tenants/{TENANT}/devices/{q(dev)}/telemetry")
    assert status == 200, series
    assert sorted(s["metric"] for s in series) == sorted(
        [m + f + suffix for f in ("temp", "count", "big", "ok", "note")]
        + ["cpu.usage_user{cpu=cpu0}", "cpu.usage_idle{cpu=cpu0}"])

    agg = aggregate(hub, dev, "cpu.usage_user{cpu=cpu0}", frm, to, "1m")
    assert agg["buckets"] == [{"start": base, "time": rfc3339(base), "avg": 3.875, "min": 3.5, "max": 4.25,
                               "sum": 7.75, "count": 2, "first": 3.5, "last": 4.25}]
    agg = aggregate(hub, dev, m + "temp" + suffix, frm, to, "30s", fn="min,max,count")
    assert agg["buckets"] == [
        {"start": base, "time": rfc3339(base), "min": 21.5, "max": 21.5, "count": 1},
        {"start": base + 60_000, "time": rfc3339(base + 60_000), "min": -0.03, "max": -0.03, "count": 1}]

    # Uncompressed bodies and `Bearer` work too; a platform token names the tenant with `org`.
    status, _, body = http(hub, "POST", "/api/v2/write?precision=ms&org=default",
                           f"plain,device=edge-7 v=2.5 {base + 30_000}".encode(),
                           {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 204, body
    assert points(hub, "edge-7", "plain.v", frm, to) == [(base + 30_000, 2.5)]


def test_influx_errors_have_influxdbs_shape_and_write_nothing(hub):
    token = operator_token(hub)
    base = hour_base()

    def error(status_want, code, *args, **kwargs):
        status, headers, body = influx_write(hub, *args, **kwargs)
        assert status == status_want, (status, body)
        assert headers.get("Content-Type", "").startswith("application/json"), headers
        doc = json.loads(body)
        assert set(doc) == {"code", "message"} and doc["code"] == code, doc
        return doc["message"]

    # A bad line rejects the whole request, naming the line; the good line before it is not stored.
    bad = "cpu,host=web1 usage="
    message = error(400, "invalid", token, f"good,host=web1 v=1 {base + 1000}\n{bad} {base + 2000}\n",
                    precision="ms")
    assert message.startswith(f"unable to parse '{bad} {base + 2000}': "), message
    for line in ["cpu,host=web1", "cpu,host=web1 v=1 notatime", 'cpu,host=web1 s="unterminated',
                 "cpu,host=web1 v=1i2"]:
        message = error(400, "invalid", token, line + "\n", precision="ms")
        assert message.startswith("unable to parse '"), message
    assert points(hub, "web1", "good.v", base, base + HOUR_MS) == []
    # A point without a device tag, a bad precision, a body that is not gzip.
    error(400, "invalid", token, f"good v=1 {base}", precision="ms")
    error(400, "invalid", token, f"good,host=web1 v=1 {base}", precision="minutes")
    status, headers, body = http(hub, "POST", "/api/v2/write?precision=ms", b"not gzip at all",
                                 {"Authorization": f"Token {token}", "Content-Encoding": "gzip"})
    assert status == 400 and json.loads(body)["code"] == "invalid", body
    status, headers, body = http(hub, "POST", "/api/v2/write", b"x,host=a v=1",
                                 {"Authorization": f"Token {token}", "Content-Encoding": "br"})
    assert status == 415 and json.loads(body)["code"] == "unsupported media type", body
    # No token, an unknown token, a viewer's token.
    status, _, body = http(hub, "POST", "/api/v2/write", b"x,host=a v=1")
    assert status == 401 and json.loads(body)["code"] == "unauthorized", body
    error(401, "unauthorized", "fh_not_a_real_token_at_all", "x,host=a v=1")
    status, viewer = hub.api("POST", "/tokens", {"name": "dash", "role": "viewer", "tenant": TENANT})
    assert status == 201, viewer
    error(403, "forbidden", viewer["secret"], "x,host=a v=1")
    # A tenant token naming another org: as if that tenant did not exist.
    error(404, "not found", token, "x,host=a v=1", org="someone-else")
    # A value of another kind than its series' first: the rest is stored (422, partial write).
    status, _, body = influx_write(hub, token, f"k,host=web1 v=1 {base + 1000}", precision="ms")
    assert status == 204, body
    error(422, "unprocessable entity", token,
          f'k,host=web1 v="text" {base + 2000}\nk,host=web1 w=5i {base + 2000}', precision="ms")
    assert points(hub, "web1", "k.v", base, base + HOUR_MS) == [(base + 1000, 1.0)]
    assert points(hub, "web1", "k.w", base, base + HOUR_MS) == [(base + 2000, 5)]


# ---- export to S3 ---------------------------------------------------------------------------


def s3_endpoint():
    url = os.environ.get("FERROHUB_TEST_S3_ENDPOINT")
    if not url:
        pytest.fail("FERROHUB_TEST_S3_ENDPOINT is not set: start moto_server (.ci/run installs it: "
                    "/tmp/ferrohub-moto/bin/moto_server -H 127.0.0.1 -p 5077 &) and set "
                    "FERROHUB_TEST_S3_ENDPOINT=http://127.0.0.1:5077")
    return url.rstrip("/")


class S3:
    """A minimal S3 client over urllib with AWS Signature Version 4 (path-style addressing)."""

    def __init__(self, endpoint, bucket):
        self.endpoint, self.bucket = endpoint, bucket
        self.key_id = os.environ.get("AWS_ACCESS_KEY_ID") or "test"
        self.secret = os.environ.get("AWS_SECRET_ACCESS_KEY") or "test"
        self.region = os.environ.get("AWS_REGION") or "us-east-1"

    def request(self, method, key="", query=None, body=b""):
        parsed = urllib.parse.urlsplit(self.endpoint)
        path = "/" + self.bucket + ("/" + key if key else "")
        path = urllib.parse.quote(path, safe="/-_.~")
        query = sorted((query or {}).items())
        qs = "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                      for k, v in query)
        now = datetime.datetime.now(datetime.timezone.utc)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        payload_hash = hashlib.sha256(body).hexdigest()
        headers = {"host": parsed.netloc, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
        signed = ";".join(sorted(headers))
        canonical = "\n".join([method, path, qs] + [f"{k}:{headers[k]}" for k in sorted(headers)]
                              + ["", signed, payload_hash])
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        key_bytes = ("AWS4" + self.secret).encode()
        for part in (day, self.region, "s3", "aws4_request"):
            key_bytes = hmac.new(key_bytes, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key_bytes, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.key_id}/{scope}, "
                                    f"SignedHeaders={signed}, Signature={signature}")
        url = f"{self.endpoint}{path}" + (f"?{qs}" if qs else "")
        req = urllib.request.Request(url, data=body if method in ("PUT", "POST") else None, method=method,
                                     headers={k: v for k, v in headers.items() if k != "host"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def create_bucket(self):
        status, body = self.request("PUT")
        # 409 BucketAlreadyOwnedByYou: an earlier run made it.
        assert status in (200, 409), (status, body)

    def list(self, prefix):
        status, body = self.request("GET", query={"list-type": "2", "prefix": prefix})
        assert status == 200, (status, body)
        ns = {"s3": "http://s3.amazonaws.com/doc/2006-03-01/"}
        root = ET.fromstring(body)
        return {c.find("s3:Key", ns).text: int(c.find("s3:Size", ns).text)
                for c in root.findall("s3:Contents", ns)}

    def get(self, key):
        status, body = self.request("GET", key)
        assert status == 200, (key, status, body[:300])
        return body

    def delete(self, key):
        status, body = self.request("DELETE", key)
        assert status in (200, 204), (key, status, body)


@pytest.fixture
def s3():
    endpoint = s3_endpoint()
    try:
        urllib.request.urlopen(endpoint + "/", timeout=5).read()
    except urllib.error.HTTPError:
        pass  # it answers: good enough
    except OSError as e:
        pytest.fail(f"the S3 endpoint {endpoint} (FERROHUB_TEST_S3_ENDPOINT) does not answer ({e}): "
                    "start moto_server (see .ci/run)")
    store = S3(endpoint, os.environ.get("FERROHUB_TEST_S3_BUCKET") or "ferrohub-test")
    store.create_bucket()
    store.prefix = f"interop-{uuid.uuid4().hex[:12]}"
    yield store
    for key in store.list(store.prefix + "/"):
        store.delete(key)


@pytest.fixture
def s3_hub(s3):
    h = Hub(anonymous=False, extra_env={
        "AWS_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": s3.key_id,
        "AWS_SECRET_ACCESS_KEY": s3.secret, "AWS_REGION": s3.region})
    try:
        register_devices(h)
        yield h
    finally:
        h.stop()


def pyarrow_python():
    """A Python that can import pyarrow: $FERROHUB_TEST_PYARROW_PYTHON, else pytest's own."""
    python = os.environ.get("FERROHUB_TEST_PYARROW_PYTHON") or sys.executable
    probe = subprocess.run([python, "-c", "import pyarrow.parquet"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.fail(f"{python} cannot import pyarrow: install it (.ci/run puts it in the moto venv) and set "
                    "FERROHUB_TEST_PYARROW_PYTHON=/tmp/ferrohub-moto/bin/python")
    return python


READ_PARQUET = r"""
import io, json, sys
import pyarrow.parquet as pq
f = pq.ParquetFile(io.BytesIO(sys.stdin.buffer.read()))
t = f.read()
schema = {field.name: str(field.type) for field in t.schema}
rows = t.to_pylist()
for r in rows:
    r["ts"] = int(r["ts"].timestamp() * 1000)
print(json.dumps({"schema": schema, "rows": rows,
                  "compression": f.metadata.row_group(0).column(0).compression if f.metadata.num_row_groups else None}))
"""


def read_parquet(python, data):
    out = subprocess.run([python, "-c", READ_PARQUET], input=data, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    return json.loads(out.stdout)


def wait_job(hub, job_id, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, job = hub.api("GET", f"/tenants/{TENANT}/telemetry/exports/{job_id}")
        assert status == 200, job
        if job["state"] != "running":
            return job
        time.sleep(0.1)
    raise AssertionError(f"export {job_id} still running after {timeout} s: {job}")


def start_export(hub, request):
    status, job = hub.api("POST", f"/tenants/{TENANT}/telemetry/exports", request)
    assert status == 202, job
    assert job["state"] in ("running", "succeeded"), job
    return wait_job(hub, job["id"])


def test_export_csv_and_parquet_to_s3(s3_hub, s3):
    hub = s3_hub
    python = pyarrow_python()
    base = hour_base()
    frm, to = base, base + HOUR_MS
    # Data from a device over MQTT 5 and from a line-protocol writer.
    c = device_client(hub, "v5")
    meter = DEVICES["v5"][0]
    assert publish(c, f"devices/{meter}/telemetry", {
        "ts": base + 1000, "temp": 21.5, "hum": 40, "ok": True, "door": 'closed, "really"'})[0] in (0, 16)
    assert publish(c, f"devices/{meter}/telemetry", [{"ts": base + 2500, "temp": 22.0},
                                                     {"ts": base + HOUR_MS + 1, "temp": 99.0}])[0] in (0, 16)
    stop(c)
    status, _, body = influx_write(hub, operator_token(hub), f"env,device=a-edge temp=-3.25 {base + 1500}",
                                   precision="ms")
    assert status == 204, body

    job = start_export(hub, {"destination": f"s3://{s3.bucket}/{s3.prefix}/csv", "format": "csv",
                             "from": frm, "to": to, "name": "all"})
    key = f"{s3.prefix}/csv/all.csv"
    assert job["state"] == "succeeded", job
    assert job["files"] == [f"s3://{s3.bucket}/{key}"], job
    assert (job["rows"], job["series_done"], job["series_total"]) == (6, 5, 5), job
    assert job["destination"] == f"s3://{s3.bucket}/{s3.prefix}/csv" and job["format"] == "csv", job
    assert job["finished_at"] >= job["started_at"] and "error" not in job, job
    assert s3.list(f"{s3.prefix}/csv/") == {key: job["bytes"]}
    t = rfc3339
    expected = (
        "tenant,device,metric,ts,value,type\n"
        f"default,a-edge,env.temp,{t(base + 1500)},-3.25,float\n"
        f'default,{meter},door,{t(base + 1000)},"closed, ""really""",string\n'
        f"default,{meter},hum,{t(base + 1000)},40,int\n"
        f"default,{meter},ok,{t(base + 1000)},true,bool\n"
        f"default,{meter},temp,{t(base + 1000)},21.5,float\n"
        f"default,{meter},temp,{t(base + 2500)},22.0,float\n")
    data = s3.get(key).decode()
    assert data == expected
    assert list(csv.reader(io.StringIO(data)))[2][4] == 'closed, "really"'

    # Parquet, only some devices and metrics.
    job = start_export(hub, {"destination": f"s3://{s3.bucket}/{s3.prefix}/pq", "format": "parquet",
                             "from": frm, "to": to, "devices": [meter], "metrics": ["temp", "hum", "ok"]})
    assert job["state"] == "succeeded", job
    key = f"{s3.prefix}/pq/telemetry-{job['id']}.parquet"
    assert job["files"] == [f"s3://{s3.bucket}/{key}"], job
    assert (job["rows"], job["series_done"], job["series_total"]) == (4, 3, 3), job
    data = s3.get(key)
    assert len(data) == job["bytes"] and s3.list(f"{s3.prefix}/pq/") == {key: len(data)}
    assert data[:4] == b"PAR1" and data[-4:] == b"PAR1"
    table = read_parquet(python, data)
    assert table["schema"] == {"tenant": "string", "device": "string", "metric": "string",
                               "ts": "timestamp[ms, tz=UTC]", "value_float": "double", "value_int": "int64",
                               "value_bool": "bool", "value_str": "string"}, table["schema"]
    assert table["compression"] == "SNAPPY", table["compression"]
    row = {"tenant": TENANT, "device": meter, "value_float": None, "value_int": None, "value_bool": None,
           "value_str": None}
    assert table["rows"] == [
        dict(row, metric="hum", ts=base + 1000, value_int=40),
        dict(row, metric="ok", ts=base + 1000, value_bool=True),
        dict(row, metric="temp", ts=base + 1000, value_float=21.5),
        dict(row, metric="temp", ts=base + 2500, value_float=22.0)]

    status, jobs = hub.api("GET", f"/tenants/{TENANT}/telemetry/exports")
    assert status == 200 and [j["id"] for j in jobs] == [job["id"], job["id"] - 1], jobs

    # A bucket that does not exist: the job fails, saying so, and nothing is left behind.
    job = start_export(hub, {"destination": f"s3://no-such-bucket-{s3.prefix}/x", "format": "csv",
                             "from": frm, "to": to})
    assert job["state"] == "failed" and job["error"], job
    assert job["files"] == [], job
