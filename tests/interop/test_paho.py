"""Eclipse paho-mqtt (Python) against the hub, MQTT 3.1.1 and 5.0."""

import queue
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
import pytest

from conftest import wait_for

VERSIONS = {"v311": mqtt.MQTTv311, "v5": mqtt.MQTTv5}


def client(hub, cid, version, clean=True, transport="tcp", expiry=None, will=None):
    extra = {} if version == mqtt.MQTTv5 else {"clean_session": clean}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=version, transport=transport, **extra)
    c.inbox = queue.Queue()
    c.connack = queue.Queue()
    c.on_message = lambda cl, ud, msg: c.inbox.put(msg)
    c.on_connect = lambda cl, ud, flags, rc, props=None: c.connack.put((flags, rc))
    if will:
        c.will_set(*will)
    port = hub.port
    if transport == "websockets":
        c.ws_set_options(path="/mqtt")
        port = hub.ws_port
    if version == mqtt.MQTTv5:
        props = Properties(PacketTypes.CONNECT)
        if expiry is not None:
            props.SessionExpiryInterval = expiry
        c.connect(hub.host, port, keepalive=30, clean_start=clean, properties=props)
    else:
        c.connect(hub.host, port, keepalive=30)
    c.loop_start()
    flags, rc = c.connack.get(timeout=10)
    assert rc == 0, f"connect refused: {rc}"
    c.session_present = flags.session_present
    return c


def subscribe(c, topic, qos):
    done = threading.Event()
    c.on_subscribe = lambda *a: done.set()
    c.subscribe(topic, qos)
    assert done.wait(10)


def stop(c):
    c.disconnect()
    c.loop_stop()


@pytest.mark.parametrize("name", ["v311", "v5"])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_subscribe(hub, name, qos):
    v = VERSIONS[name]
    sub = client(hub, f"sub-{name}-{qos}", v)
    subscribe(sub, "interop/+/data", qos)
    pub = client(hub, f"pub-{name}-{qos}", v)
    for i in range(20):
        pub.publish(f"interop/{i}/data", f"m{i}", qos=qos).wait_for_publish(10)
    got = [sub.inbox.get(timeout=10) for _ in range(20)]
    assert [m.payload.decode() for m in got] == [f"m{i}" for i in range(20)]
    assert all(m.qos == qos for m in got)
    stop(pub)
    stop(sub)


@pytest.mark.parametrize("name", ["v311", "v5"])
def test_retained_and_delete(hub, name):
    v = VERSIONS[name]
    pub = client(hub, "retainer", v)
    pub.publish("interop/retained", "state", qos=1, retain=True).wait_for_publish(10)
    sub = client(hub, "late", v)
    subscribe(sub, "interop/#", 1)
    m = sub.inbox.get(timeout=10)
    assert m.retain and m.payload == b"state"
    pub.publish("interop/retained", b"", qos=1, retain=True).wait_for_publish(10)
    stop(sub)
    sub2 = client(hub, "later", v)
    subscribe(sub2, "interop/#", 1)
    with pytest.raises(queue.Empty):
        sub2.inbox.get(timeout=1)
    stop(sub2)
    stop(pub)


@pytest.mark.parametrize("name", ["v311", "v5"])
def test_will_on_abnormal_disconnect(hub, name):
    v = VERSIONS[name]
    watcher = client(hub, "watcher", v)
    subscribe(watcher, "interop/will", 1)
    dying = client(hub, "dying", v, will=("interop/will", "gone", 1, False))
    dying.loop_stop()
    dying.socket().close()  # no DISCONNECT: the will must be published
    m = watcher.inbox.get(timeout=10)
    assert m.payload == b"gone"
    stop(watcher)


def test_persistent_session_v311(hub):
    sub = client(hub, "persist311", mqtt.MQTTv311, clean=False)
    subscribe(sub, "interop/offline", 1)
    stop(sub)
    pub = client(hub, "pub-off", mqtt.MQTTv311)
    for i in range(5):
        pub.publish("interop/offline", f"o{i}", qos=1).wait_for_publish(10)
    stop(pub)
    sub = client(hub, "persist311", mqtt.MQTTv311, clean=False)
    assert sub.session_present
    got = [sub.inbox.get(timeout=10).payload.decode() for _ in range(5)]
    assert got == [f"o{i}" for i in range(5)]
    stop(sub)


def test_v5_properties_pass_through(hub):
    sub = client(hub, "props-sub", mqtt.MQTTv5)
    subscribe(sub, "interop/req", 1)
    pub = client(hub, "props-pub", mqtt.MQTTv5)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "interop/resp"
    props.CorrelationData = b"\x01\x02"
    props.ContentType = "application/json"
    props.UserProperty = [("site", "berlin"), ("line", "3")]
    pub.publish("interop/req", b"{}", qos=1, properties=props).wait_for_publish(10)
    m = sub.inbox.get(timeout=10)
    assert m.properties.ResponseTopic == "interop/resp"
    assert m.properties.CorrelationData == b"\x01\x02"
    assert m.properties.ContentType == "application/json"
    assert ("site", "berlin") in m.properties.UserProperty and ("line", "3") in m.properties.UserProperty
    stop(pub)
    stop(sub)


def test_v5_session_expiry_queueing(hub):
    sub = client(hub, "v5-persist", mqtt.MQTTv5, clean=True, expiry=300)
    subscribe(sub, "interop/v5off", 2)
    stop(sub)
    pub = client(hub, "v5-pub", mqtt.MQTTv5)
    pub.publish("interop/v5off", "q2", qos=2).wait_for_publish(10)
    stop(pub)
    sub = client(hub, "v5-persist", mqtt.MQTTv5, clean=False, expiry=300)
    assert sub.session_present
    m = sub.inbox.get(timeout=10)
    assert m.payload == b"q2" and m.qos == 2
    stop(sub)


def test_websocket_transport(hub):
    sub = client(hub, "ws-sub", mqtt.MQTTv311, transport="websockets")
    subscribe(sub, "interop/ws", 1)
    pub = client(hub, "tcp-pub", mqtt.MQTTv311)
    pub.publish("interop/ws", "over websocket", qos=1).wait_for_publish(10)
    assert sub.inbox.get(timeout=10).payload == b"over websocket"
    stop(pub)
    stop(sub)


def test_sys_topics_not_matched_by_hash(hub):
    everything = client(hub, "hash", mqtt.MQTTv311)
    subscribe(everything, "#", 0)
    sys = client(hub, "sys", mqtt.MQTTv311)
    subscribe(sys, "$SYS/broker/uptime", 0)
    assert sys.inbox.get(timeout=5).topic == "$SYS/broker/uptime"
    assert wait_for(lambda: True)
    while not everything.inbox.empty():
        assert not everything.inbox.get().topic.startswith("$")
    stop(everything)
    stop(sys)
