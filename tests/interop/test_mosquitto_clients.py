"""Mosquitto's command-line clients (mosquitto_pub / mosquitto_sub) against the hub."""

import subprocess

import pytest

from conftest import require_program, wait_for


def run(args, timeout=15):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
@pytest.mark.parametrize("qos", ["0", "1", "2"])
def test_pub_sub(hub, version, qos):
    sub_bin = require_program("mosquitto_sub")
    pub_bin = require_program("mosquitto_pub")
    sub = subprocess.Popen([sub_bin, "-V", version, "-h", hub.host, "-p", str(hub.port), "-t", "cli/#",
                            "-q", qos, "-v", "-C", "3", "-W", "10"], stdout=subprocess.PIPE, text=True)
    # mosquitto_sub gives no signal once subscribed; the hub's metrics do.
    assert wait_for(lambda: hub.subscriptions() >= 1)
    for i in range(3):
        r = run([pub_bin, "-V", version, "-h", hub.host, "-p", str(hub.port), "-t", f"cli/{i}",
                 "-m", f"hello {i}", "-q", qos])
        assert r.returncode == 0, r.stderr
    out, _ = sub.communicate(timeout=15)
    lines = out.strip().splitlines()
    assert sub.returncode == 0
    assert lines == [f"cli/{i} hello {i}" for i in range(len(lines))] and len(lines) == 3


def test_retained_with_cli(hub):
    pub_bin = require_program("mosquitto_pub")
    sub_bin = require_program("mosquitto_sub")
    assert run([pub_bin, "-h", hub.host, "-p", str(hub.port), "-t", "cli/state", "-m", "on", "-r", "-q", "1"]).returncode == 0
    r = run([sub_bin, "-h", hub.host, "-p", str(hub.port), "-t", "cli/state", "-C", "1", "-W", "5", "-v"])
    assert r.returncode == 0 and r.stdout.strip() == "cli/state on"


def test_sys_with_cli(hub):
    sub_bin = require_program("mosquitto_sub")
    r = run([sub_bin, "-h", hub.host, "-p", str(hub.port), "-t", "$SYS/broker/version", "-C", "1", "-W", "5"])
    assert r.returncode == 0 and r.stdout.startswith("ferrohub")


def test_bad_credentials_refused(hub):
    # With anonymous access on, credentials for unknown users are still checked.
    pub_bin = require_program("mosquitto_pub")
    r = run([pub_bin, "-h", hub.host, "-p", str(hub.port), "-t", "x", "-m", "y", "-u", "nobody", "-P", "wrong"])
    assert r.returncode != 0
