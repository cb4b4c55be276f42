"""Interop suite: drives a real `ferrohub serve` process with third-party MQTT clients
(Eclipse paho-mqtt for Python, and Mosquitto's command-line clients).

Run by `.ci/run` after it installs the clients; a missing client is a failure, never a skip.
The hub binary is taken from $FERROHUB_BIN (default: target/debug/ferrohub, built first).
"""

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def require_program(name):
    path = shutil.which(name)
    assert path, f"{name} is not installed: the interop suite needs it (see .ci/run)"
    return path


ADMIN_TOKEN = "fh_interop_admin_token_0123456789"


class Hub:
    def __init__(self, extra_env=None, anonymous=True, data_dir=None):
        """`data_dir`: start on an existing data directory (the caller's: `stop` keeps it)."""
        binary = os.environ.get("FERROHUB_BIN", os.path.join(ROOT, "target", "debug", "ferrohub"))
        assert os.path.exists(binary), f"{binary} not found: run `cargo build -p ferrohub` first"
        self.own_data_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="ferrohub-interop-")
        env = dict(os.environ, RUST_LOG="info", FERROHUB_STORAGE__FSYNC="never", FERROHUB_MQTT__SYS_INTERVAL_SECS="1",
                   FERROHUB_ADMIN_TOKEN=ADMIN_TOKEN,
                   # Cheap argon2id: same algorithm, lower cost, so the suite stays fast.
                   FERROHUB_REGISTRY__PASSWORD__MEMORY_KIB="1024", FERROHUB_REGISTRY__PASSWORD__ITERATIONS="1")
        env.update(extra_env or {})
        args = [binary, "serve", "--log-format", "json", "--data-dir", self.data_dir,
                "--mqtt-listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"]
        if anonymous:
            args.append("--allow-anonymous")
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
        self.addrs = {}
        ready = threading.Event()

        def read_logs():
            for line in self.proc.stderr:
                try:
                    fields = json.loads(line).get("fields", {})
                except ValueError:
                    continue
                if fields.get("message") == "listening":
                    self.addrs[fields["protocol"]] = fields["addr"]
                if fields.get("message") == "ferrohub is ready":
                    ready.set()

        threading.Thread(target=read_logs, daemon=True).start()
        if not ready.wait(20):
            self.stop()
            raise AssertionError("hub did not start")
        host, port = self.addrs["mqtt"].rsplit(":", 1)
        self.host, self.port = host, int(port)
        ws_host, ws_port = self.addrs["ws"].rsplit(":", 1)
        self.ws_port = int(ws_port)

    def api(self, method, path, body=None):
        """Calls the operator API with the admin token; returns (status, parsed JSON or None)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{self.addrs['http']}/api/v1{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                text = r.read().decode()
                return r.status, (json.loads(text) if text else None)
        except urllib.error.HTTPError as e:
            text = e.read().decode()
            return e.code, (json.loads(text) if text else None)

    def metric(self, name):
        body = urllib.request.urlopen(f"http://{self.addrs['http']}/metrics", timeout=5).read().decode()
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"metric {name} not exported")

    def subscriptions(self):
        return self.metric("ferrohub_mqtt_subscriptions")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self.own_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def crash(self):
        """SIGKILL: no shutdown work at all (the data directory stays)."""
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def hub():
    h = Hub()
    yield h
    h.stop()


def wait_for(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def paho_device(hub, client_id, username, password, version):
    """A paho-mqtt client connected to the hub (clean start) with its network loop running.

    Received messages go to `client.inbox`, publish acknowledgements `(mid, reason, properties)`
    to `client.acks`; fails the test if the hub refuses the connection within 10 s.
    """
    import queue

    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version)
    c.inbox = queue.Queue()
    c.acks = queue.Queue()
    connack = queue.Queue()
    c.on_connect = lambda cl, ud, flags, rc, props=None: connack.put(rc)
    c.on_message = lambda cl, ud, msg: c.inbox.put(msg)
    c.on_publish = lambda cl, ud, mid, rc, props: c.acks.put((mid, rc, props))
    c.username_pw_set(username, password)
    if version == mqtt.MQTTv5:
        c.connect(hub.host, hub.port, keepalive=30, clean_start=True, properties=Properties(PacketTypes.CONNECT))
    else:
        c.connect(hub.host, hub.port, keepalive=30)
    c.loop_start()
    rc = connack.get(timeout=10)
    assert rc == 0, f"connect refused: {rc}"
    return c
