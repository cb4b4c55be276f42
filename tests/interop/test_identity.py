"""Registry-backed authentication and authorization seen by third-party clients: paho-mqtt
(3.1.1 and 5.0) and Mosquitto's command-line clients, against a hub without anonymous access."""

import queue
import subprocess
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
import pytest

from conftest import Hub, require_program


@pytest.fixture
def hub():
    h = Hub(anonymous=False)
    for device, secret in [("dev-a", "secret-a-123"), ("dev-b", "secret-b-123")]:
        status, body = h.api("POST", "/tenants/default/devices", {"id": device})
        assert status == 201, body
        status, body = h.api("POST", f"/tenants/default/devices/{device}/credentials",
                             {"kind": "password", "secret": secret})
        assert status == 201, body
    yield h
    h.stop()


def connect(hub, cid, user, password, version):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=version)
    c.connack = queue.Queue()
    c.inbox = queue.Queue()
    c.on_connect = lambda cl, ud, flags, rc, props=None: c.connack.put(rc)
    c.on_message = lambda cl, ud, msg: c.inbox.put(msg)
    c.username_pw_set(user, password)
    if version == mqtt.MQTTv5:
        c.connect(hub.host, hub.port, keepalive=30, clean_start=True, properties=Properties(PacketTypes.CONNECT))
    else:
        c.connect(hub.host, hub.port, keepalive=30)
    c.loop_start()
    rc = c.connack.get(timeout=10)
    return c, rc


@pytest.mark.parametrize("version", [mqtt.MQTTv311, mqtt.MQTTv5])
def test_wrong_and_unknown_credentials_get_the_same_refusal(hub, version):
    answers = []
    for user, password in [("dev-a", "wrong-password"), ("no-such-device", "secret-a-123")]:
        c, rc = connect(hub, user, user, password, version)
        c.loop_stop()
        answers.append(rc.value if hasattr(rc, "value") else int(rc))
    # 0x86 "bad user name or password" (paho reports the 3.1.1 return code 4 as the same reason).
    assert answers == [134, 134]


def test_a_device_is_confined_to_its_own_topics(hub):
    a, rc = connect(hub, "dev-a", "dev-a", "secret-a-123", mqtt.MQTTv5)
    assert rc == 0
    b, rc = connect(hub, "dev-b", "dev-b", "secret-b-123", mqtt.MQTTv5)
    assert rc == 0
    granted = queue.Queue()
    b.on_subscribe = lambda cl, ud, mid, codes, props: granted.put([c.value for c in codes])
    b.subscribe([("devices/dev-b/#", 1), ("devices/dev-a/#", 1), ("#", 1)])
    assert granted.get(timeout=10) == [1, 135, 135]  # granted QoS 1, 0x87, 0x87
    acks = queue.Queue()
    a.on_publish = lambda cl, ud, mid, rc, props: acks.put(rc.value)
    a.publish("devices/dev-b/cmd", b"intrusion", qos=1).wait_for_publish(10)
    assert acks.get(timeout=10) == 135  # PUBACK 0x87 Not authorized
    a.publish("devices/dev-a/telemetry", b'{"temp": 21.5}', qos=1).wait_for_publish(10)
    assert acks.get(timeout=10) in (0, 16)  # success, or "no matching subscribers"
    # Its own telemetry topic is stored as telemetry: a payload that is not telemetry is refused
    # with 0x99 Payload format invalid (and nothing stored).
    a.publish("devices/dev-a/telemetry", b"ok", qos=1).wait_for_publish(10)
    assert acks.get(timeout=10) == 0x99
    with pytest.raises(queue.Empty):
        b.inbox.get(timeout=0.5)
    for c in (a, b):
        c.disconnect()
        c.loop_stop()


def test_a_client_id_other_than_the_device_id_is_refused(hub):
    c, rc = connect(hub, "dev-b", "dev-a", "secret-a-123", mqtt.MQTTv5)
    c.loop_stop()
    assert rc.value == 135


def test_mosquitto_clients_with_device_credentials_and_a_custom_policy(hub):
    require_program("mosquitto_pub")
    require_program("mosquitto_sub")
    # dev-b becomes a commander: it may also publish commands to any device.
    policy = {"version": 1, "statements": [
        {"effect": "allow", "actions": ["connect"], "resources": ["${device.id}"]},
        {"effect": "allow", "actions": ["publish"], "resources": ["devices/+/cmd"]}]}
    status, body = hub.api("PUT", "/tenants/default/policies/commander", policy)
    assert status in (200, 201), body
    status, body = hub.api("PATCH", "/tenants/default/devices/dev-b", {"policy": "commander"})
    assert status == 200, body
    port = str(hub.port)
    sub = subprocess.Popen(["mosquitto_sub", "-h", hub.host, "-p", port, "-i", "dev-a", "-u", "dev-a",
                            "-P", "secret-a-123", "-t", "devices/dev-a/#", "-C", "1", "-W", "15", "-v"],
                           stdout=subprocess.PIPE, text=True)
    threading.Event().wait(1.0)  # let the subscription land
    pub = ["mosquitto_pub", "-h", hub.host, "-p", port, "-i", "dev-b", "-u", "dev-b", "-P", "secret-b-123",
           "-q", "1"]
    # Not covered by the commander policy: acknowledged (3.1.1) but never delivered.
    subprocess.run(pub + ["-t", "devices/dev-a/secret", "-m", "leak"], check=True, timeout=10)
    subprocess.run(pub + ["-t", "devices/dev-a/cmd", "-m", "go"], check=True, timeout=10)
    out, _ = sub.communicate(timeout=20)
    assert out.strip() == "devices/dev-a/cmd go"
