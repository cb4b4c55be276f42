"""Device twins and commands seen by third-party clients: paho-mqtt (3.1.1 and 5.0) and Mosquitto's
command-line clients, used the way docs/device-api.md shows them, against a hub without anonymous
access. The device is registered through the operator API with a password."""

import json
import os
import queue
import signal
import subprocess
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
import pytest

from conftest import Hub, paho_device, require_program, wait_for

DEVICE = "sensor-1"
SECRET = "s3cret-sensor-1"

# The default policy, plus client ids `sensor-1-…` for the device's second connection (the docs'
# mosquitto_sub next to mosquitto_pub, and the answering mosquitto_pub of the command loop).
TOOLS_POLICY = {"version": 1, "statements": [
    {"effect": "allow", "actions": ["connect"], "resources": ["${device.id}", "${device.id}-*"]},
    {"effect": "allow", "actions": ["publish", "subscribe", "receive"],
     "resources": ["devices/${device.id}/#", "$devices/${device.id}/#"]}]}

VERSIONS = {"v311": mqtt.MQTTv311, "v5": mqtt.MQTTv5}


@pytest.fixture
def hub():
    h = Hub(anonymous=False)
    status, body = h.api("PUT", "/tenants/default/policies/device-tools", TOOLS_POLICY)
    assert status in (200, 201), body
    status, body = h.api("POST", "/tenants/default/devices", {"id": DEVICE, "policy": "device-tools"})
    assert status == 201, body
    status, body = h.api("POST", f"/tenants/default/devices/{DEVICE}/credentials",
                         {"kind": "password", "secret": SECRET})
    assert status == 201, body
    yield h
    h.stop()


def topic(rest):
    return f"$devices/{DEVICE}/{rest}"


def device_client(hub, version, cid=DEVICE):
    return paho_device(hub, cid, DEVICE, SECRET, version)


def subscribe(c, topics):
    done = threading.Event()
    granted = []
    c.on_subscribe = lambda cl, ud, mid, codes, props=None: (granted.extend(codes), done.set())
    c.subscribe([(t, 1) for t in topics])
    assert done.wait(10)
    assert all(not code.is_failure for code in granted), granted


def receive(c, want):
    """The next message on topic `want` (others are dropped), as (message, parsed JSON)."""
    while True:
        m = c.inbox.get(timeout=10)
        if m.topic == want:
            return m, json.loads(m.payload)


def stop(c):
    c.disconnect()
    c.loop_stop()


TWIN_ANSWERS = [topic("twin/update/accepted"), topic("twin/update/rejected"), topic("twin/get/accepted"),
                topic("twin/get/rejected"), topic("twin/delta")]


@pytest.mark.parametrize("name", ["v311", "v5"])
def test_paho_twin_update_get_and_delta(hub, name):
    c = device_client(hub, VERSIONS[name])
    # The answers, not `twin/#`: a device must not hear its own update and get requests.
    subscribe(c, TWIN_ANSWERS)
    report = {"rate": 10, "health": {"battery": 87, "firmware": "1.4.2"}}
    c.publish(topic("twin/update"), json.dumps({"reported": report, "clientToken": "r1"}), qos=1).wait_for_publish(10)
    _, accepted = receive(c, topic("twin/update/accepted"))
    assert accepted["version"] == 1 and accepted["clientToken"] == "r1" and accepted["reported"] == report

    # Tags are the operators'; the device's view never has them.
    status, body = hub.api("PATCH", f"/tenants/default/devices/{DEVICE}/twins/default/tags", {"site": "berlin"})
    assert status == 200, body
    c.publish(topic("twin/get"), b"", qos=1).wait_for_publish(10)
    m, doc = receive(c, topic("twin/get/accepted"))
    assert doc["reported"] == report and "tags" not in doc and b"berlin" not in m.payload

    # An operator changes desired: the connected device gets the keys that differ.
    status, body = hub.api("PATCH", f"/tenants/default/devices/{DEVICE}/twins/default/desired",
                           {"rate": 30, "health": {"battery": 87}, "mode": "eco"})
    assert status == 200, body
    _, delta = receive(c, topic("twin/delta"))
    assert delta["delta"] == {"rate": 30, "mode": "eco"}
    assert delta["version"] == body["versions"]["desired"]

    # The device applies one key and rejects the other.
    c.publish(topic("twin/update"), json.dumps({"reported": {"rate": 30}, "rejected": {"mode": "unsupported"}}),
              qos=1).wait_for_publish(10)
    receive(c, topic("twin/update/accepted"))
    status, twin = hub.api("GET", f"/tenants/default/devices/{DEVICE}/twins/default")
    assert status == 200
    assert twin["delta"] == {"mode": "eco"}
    assert twin["acks"]["rate"]["status"] == "applied"
    assert twin["acks"]["mode"]["status"] == "rejected" and twin["acks"]["mode"]["reason"] == "unsupported"
    stop(c)


@pytest.mark.parametrize("name", ["v311", "v5"])
def test_paho_device_gets_the_delta_it_missed_when_it_subscribes(hub, name):
    status, body = hub.api("PATCH", f"/tenants/default/devices/{DEVICE}/twins/default/desired", {"interval": 60})
    assert status == 200, body
    c = device_client(hub, VERSIONS[name])
    subscribe(c, [topic("twin/delta")])
    _, delta = receive(c, topic("twin/delta"))
    assert delta["delta"] == {"interval": 60}
    stop(c)


def test_paho_v5_answers_a_direct_command_with_response_topic_and_correlation_data(hub):
    c = device_client(hub, mqtt.MQTTv5)
    requests = queue.Queue()

    def on_message(cl, ud, msg):
        requests.put(msg)
        answer = Properties(PacketTypes.PUBLISH)
        answer.CorrelationData = msg.properties.CorrelationData
        answer.UserProperty = ("status", "200")
        cl.publish(msg.properties.ResponseTopic, json.dumps({"rebooting": True, "got": json.loads(msg.payload)}),
                   qos=1, properties=answer)

    c.on_message = on_message
    subscribe(c, [topic("commands/req/#")])
    status, body = hub.api("POST", f"/tenants/default/devices/{DEVICE}/commands/reboot?timeout=5", {"delay": 3})
    assert status == 200, body
    assert body == {"status": 200, "payload": {"rebooting": True, "got": {"delay": 3}}}
    req = requests.get(timeout=1)
    rid = req.topic.rsplit("/", 1)[1]
    assert req.topic == topic(f"commands/req/reboot/{rid}")
    assert req.properties.ResponseTopic == topic(f"commands/res/{rid}")
    assert req.properties.CorrelationData == rid.encode()
    stop(c)


def test_paho_v311_answers_a_command_and_a_queued_command_is_delivered(hub):
    # Queued while the device is away.
    status, queued = hub.api("POST", f"/tenants/default/devices/{DEVICE}/commands/configure?mode=queued&ttl=60",
                             {"rate": 5})
    assert status == 202 and queued["state"] == "queued", queued
    c = device_client(hub, mqtt.MQTTv311)

    def on_message(cl, ud, msg):
        rid = msg.topic.rsplit("/", 1)[1]
        cl.publish(topic(f"commands/res/{rid}/200"), json.dumps({"applied": json.loads(msg.payload)}), qos=1)

    c.on_message = on_message
    subscribe(c, [topic("commands/req/#")])

    def state():
        return hub.api("GET", f"/tenants/default/devices/{DEVICE}/queued-commands/{queued['id']}")[1]

    assert wait_for(lambda: state()["state"] == "succeeded"), state()
    done = state()
    assert done["status"] == 200 and done["response"] == {"applied": {"rate": 5}} and done["attempts"] == 1
    stop(c)


class Lines:
    """Reads a process's output lines in a thread."""

    def __init__(self, proc):
        self.proc = proc
        self.q = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.q.put(line.rstrip("\n"))

    def next(self, timeout=10):
        return self.q.get(timeout=timeout)

    def next_on(self, want, timeout=10):
        """`mosquitto_sub -v` prints `topic payload`: the payload of the next line on `want`."""
        while True:
            t, _, payload = self.next(timeout).partition(" ")
            if t == want:
                return json.loads(payload)


def kill_group(proc):
    """Ends a process started with start_new_session=True and everything it started."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_mosquitto_clients_twin_as_documented(hub):
    require_program("mosquitto_sub")
    require_program("mosquitto_pub")
    h, p = hub.host, str(hub.port)
    # From docs/device-api.md ("With the Mosquitto clients"), against this hub's address.
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", h, "-p", p, "-u", DEVICE, "-P", SECRET, "-i", f"{DEVICE}-sub", "-v",
         "-t", f"$devices/{DEVICE}/twin/update/accepted", "-t", f"$devices/{DEVICE}/twin/update/rejected",
         "-t", f"$devices/{DEVICE}/twin/delta", "-t", f"$devices/{DEVICE}/twin/get/accepted"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = Lines(sub)
        # mosquitto_sub gives no signal once subscribed; the hub's metrics do.
        assert wait_for(lambda: hub.subscriptions() >= 4)
        pub = ["mosquitto_pub", "-h", h, "-p", p, "-u", DEVICE, "-P", SECRET, "-i", DEVICE, "-q", "1"]
        subprocess.run(pub + ["-t", f"$devices/{DEVICE}/twin/update", "-m",
                              '{"reported": {"rate": 10, "health": {"battery": 87, "firmware": "1.4.2"}}, '
                              '"clientToken": "r1"}'], check=True, timeout=10)
        accepted = lines.next_on(topic("twin/update/accepted"))
        assert accepted["version"] == 1 and accepted["clientToken"] == "r1"
        subprocess.run(pub + ["-t", f"$devices/{DEVICE}/twin/get", "-n"], check=True, timeout=10)
        doc = lines.next_on(topic("twin/get/accepted"))
        assert doc["reported"]["health"]["firmware"] == "1.4.2" and "tags" not in doc
        # An operator asks for another rate; the device refuses it.
        status, body = hub.api("PATCH", f"/tenants/default/devices/{DEVICE}/twins/default/desired", {"rate": 1})
        assert status == 200, body
        assert lines.next_on(topic("twin/delta"))["delta"] == {"rate": 1}
        subprocess.run(pub + ["-t", f"$devices/{DEVICE}/twin/update", "-m",
                              '{"rejected": {"rate": "the sensor supports 30 s at the fastest"}}'],
                       check=True, timeout=10)
        lines.next_on(topic("twin/update/accepted"))
        status, twin = hub.api("GET", f"/tenants/default/devices/{DEVICE}/twins/default")
        assert status == 200, twin
        ack = twin["acks"]["rate"]
        assert ack["status"] == "rejected" and ack["reason"] == "the sensor supports 30 s at the fastest", ack
    finally:
        kill_group(sub)


def test_mosquitto_clients_answer_commands_as_documented(hub):
    require_program("mosquitto_sub")
    require_program("mosquitto_pub")
    # From docs/device-api.md ("Commands"): a 3.1.1 device answering every command with 200.
    script = f"""
mosquitto_sub -h {hub.host} -p {hub.port} -u sensor-1 -P {SECRET} -i sensor-1 -q 1 -v -t '$devices/sensor-1/commands/req/#' |
while read -r topic payload; do
  rid=${{topic##*/}}
  mosquitto_pub -h {hub.host} -p {hub.port} -u sensor-1 -P {SECRET} -i sensor-1-ans -q 1 \\
    -t "\\$devices/sensor-1/commands/res/$rid/200" -m '{{"ok": true}}'
done
"""
    loop = subprocess.Popen(["bash", "-c", script], stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_for(lambda: hub.subscriptions() >= 1)
        for _ in range(2):
            status, body = hub.api("POST", f"/tenants/default/devices/{DEVICE}/commands/reboot?timeout=5",
                                   {"delay": 1})
            assert status == 200, body
            assert body == {"status": 200, "payload": {"ok": True}}
    finally:
        kill_group(loop)
