//! `ferrohub ctl` against a real hub process: tenants, scoped tokens, a chunked CSV import with
//! rejected rows, filtered listings, device status, passwords (checked over MQTT), certificates
//! written to disk, device tokens, groups, the audit log, twins and commands to devices, and the
//! error hints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const ADMIN: &str = "fh_ctl-test-admin-token-0123456789";
/// Every ctl invocation must finish within this.
const CTL_TIMEOUT: Duration = Duration::from_secs(60);

/// A hub process with its addresses; killed on drop (also when a test panics).
struct Hub {
    child: Child,
    http: SocketAddr,
    mqtt: SocketAddr,
    _data: tempfile::TempDir,
}

impl Hub {
    fn start() -> Hub {
        let data = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferrohub"))
            .arg("serve")
            .arg("--data-dir")
            .arg(data.path())
            .args(["--mqtt-listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0"])
            .args(["--mqtts-listen", "", "--http-listen", "127.0.0.1:0"])
            .args(["--log-format", "json"])
            .env("FERROHUB_ADMIN_TOKEN", ADMIN)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferrohub serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut http, mut mqtt) = (None, None);
            let mut sent = false;
            // Keep reading (and discarding) so the hub never blocks on a full pipe.
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if sent {
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let f = &v["fields"];
                if f["message"] == "listening" {
                    let addr: Option<SocketAddr> = f["addr"].as_str().and_then(|a| a.parse().ok());
                    match f["protocol"].as_str() {
                        Some("http") => http = addr,
                        Some("mqtt") => mqtt = addr,
                        _ => {}
                    }
                }
                if f["message"] == "ferrohub is ready" {
                    let _ = tx.send((http, mqtt));
                    sent = true;
                }
            }
        });
        let mut hub = Hub {
            child,
            http: "127.0.0.1:1".parse().unwrap(),
            mqtt: "127.0.0.1:1".parse().unwrap(),
            _data: data,
        };
        let (http, mqtt) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the hub did not report that it is ready");
        hub.http = http.expect("no http listening line");
        hub.mqtt = mqtt.expect("no mqtt listening line");
        hub
    }

    fn url(&self) -> String {
        format!("http://{}", self.http)
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a ctl process did.
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
    fn ok(self) -> Out {
        assert_eq!(
            self.code, 0,
            "ctl failed:\n{}\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Runs `ferrohub ctl ARGS` with the environment `env` (FERROHUB_* of the test's own environment
/// removed), feeding `stdin`; killed after [`CTL_TIMEOUT`].
fn run_ctl(env: &[(&str, &str)], args: &[&str], stdin: Option<&[u8]>) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrohub"));
    cmd.arg("ctl").args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("FERROHUB_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn ferrohub ctl");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + CTL_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ferrohub ctl {args:?} did not finish within {CTL_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Out {
        code: status.code().unwrap_or(-1),
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

/// `ferrohub ctl --url HUB --token TOKEN --tenant TENANT ARGS`.
fn ctl(hub: &Hub, token: &str, tenant: &str, args: &[&str]) -> Out {
    let url = hub.url();
    let mut all = vec!["--url", url.as_str(), "--token", token, "--tenant", tenant];
    all.extend_from_slice(args);
    run_ctl(&[], &all, None)
}

/// A 2,000-row CSV: row i is device `dev-iiii` on site plant-a (even i) or plant-b (odd i);
/// three rows are bad: 17 (invalid id), 1234 (repeats row 100's id, in another chunk) and 1999
/// (invalid status). Row 800's name is quoted and spans two lines.
fn fleet_csv() -> (String, BTreeSet<String>) {
    let mut csv = String::from("id,name,type,tags,status,policy,groups\r\n");
    let mut plant_a = BTreeSet::new();
    for i in 1..=2000 {
        let site = if i % 2 == 0 { "plant-a" } else { "plant-b" };
        let line = match i {
            17 => format!("bad id!,Device {i},,site={site},enabled,,"),
            1234 => format!("dev-0100,Device {i},,site={site},enabled,,"),
            1999 => format!("dev-{i:04},Device {i},,site={site},sideways,,"),
            800 => format!("dev-{i:04},\"Device 800, hall\nB\",,site={site};floor=2,enabled,,"),
            _ => format!("dev-{i:04},Device {i},,site={site};idx={i},enabled,,"),
        };
        if site == "plant-a" && i != 1234 {
            plant_a.insert(format!("dev-{i:04}"));
        }
        csv.push_str(&line);
        csv.push_str("\r\n");
    }
    (csv, plant_a)
}

/// Connects over MQTT as `user` with `password`; true when the hub accepts.
fn mqtt_accepts(addr: SocketAddr, user: &str, password: &str) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // The default policy lets a device connect with its own id as client id.
        let client_id = user.rsplit('/').next().unwrap_or(user);
        let mut o = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        o.set_credentials(user, password);
        o.set_keep_alive(Duration::from_secs(10));
        let (_client, mut ev) = rumqttc::AsyncClient::new(o, 10);
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match ev.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
                        return ack.code == rumqttc::ConnectReturnCode::Success;
                    }
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        })
        .await;
        r.unwrap_or(false)
    })
}

#[test]
fn operator_workflow_against_a_real_hub() {
    let hub = Hub::start();
    let work = tempfile::tempdir().unwrap();

    // Tenant and a tenant-scoped operator token (its secret alone on stdout).
    let out = ctl(
        &hub,
        ADMIN,
        "default",
        &["tenants", "create", "acme", "--name", "ACME Corp"],
    )
    .ok();
    assert!(out.stdout.contains("created tenant acme"), "{}", out.stdout);
    let out = ctl(
        &hub,
        ADMIN,
        "acme",
        &[
            "tokens", "create", "ops", "--role", "operator", "--ttl", "3600",
        ],
    )
    .ok();
    let op = out.stdout.trim().to_string();
    assert!(
        op.starts_with("fh_") && !op.contains(char::is_whitespace),
        "{op:?}"
    );
    assert!(out.stderr.contains("tenant acme"), "{}", out.stderr);
    let tokens = ctl(&hub, ADMIN, "acme", &["tokens", "list", "-o", "json"])
        .ok()
        .json();
    let ops = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ops")
        .expect("the new token is listed");
    assert_eq!(ops["role"], "operator");
    assert_eq!(ops["tenant"], "acme");
    // The scoped token sees its tenant only.
    let tenants = ctl(&hub, &op, "acme", &["tenants", "list", "--output", "json"])
        .ok()
        .json();
    let ids: Vec<&str> = tenants
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["id"].as_str())
        .collect();
    assert_eq!(ids, ["acme"]);

    // Import 2,000 rows in chunks of 700 with three bad rows: exit 1, rows named as in the file.
    let (csv, plant_a) = fleet_csv();
    let file = work.path().join("fleet.csv");
    std::fs::write(&file, &csv).unwrap();
    let out = ctl(
        &hub,
        &op,
        "acme",
        &[
            "devices",
            "import",
            file.to_str().unwrap(),
            "--chunk-size",
            "700",
        ],
    );
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("imported 1997 of 2000 devices into tenant acme; rejected 3"),
        "{}",
        out.stdout
    );
    let rows: Vec<(&str, &str)> = out
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("ROW"))
        .skip(1)
        .map(|l| {
            let mut cells = l.split("  ").filter(|c| !c.is_empty()).map(str::trim);
            (cells.next().unwrap(), cells.next().unwrap())
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("17", "bad id!"),
            ("1234", "dev-0100"),
            ("1999", "dev-1999")
        ],
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("sideways"), "{}", out.stdout);

    // The quoted two-line name survived the chunking.
    let d = ctl(
        &hub,
        &op,
        "acme",
        &["devices", "show", "dev-0800", "-o", "json"],
    )
    .ok()
    .json();
    assert_eq!(d["name"], "Device 800, hall\nB");
    assert_eq!(d["tags"]["floor"], "2");

    // JSON from standard input: the report in JSON, rows numbered from 1.
    let out = run_ctl(
        &[
            ("FERROHUB_URL", &hub.url()),
            ("FERROHUB_TOKEN", &op),
            ("FERROHUB_TENANT", "acme"),
        ],
        &["devices", "import", "-", "--format", "json", "-o", "json"],
        Some(br#"[{"id": "json-1", "tags": {"site": "plant-c"}}, {"id": "bad id"}]"#),
    );
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    let report = out.json();
    assert_eq!(report["total"], 2);
    assert_eq!(report["imported"], 1);
    assert_eq!(report["rejected"][0]["row"], 2);
    assert_eq!(report["rejected"][0]["id"], "bad id");

    // Listing by tag, every page, as JSON (token and tenant from the environment this time).
    let env = [
        ("FERROHUB_URL", hub.url()),
        ("FERROHUB_TOKEN", op.clone()),
        ("FERROHUB_TENANT", "acme".into()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let page = run_ctl(
        &env,
        &[
            "devices",
            "list",
            "--tag",
            "site=plant-a",
            "--all",
            "--limit",
            "300",
            "--output",
            "json",
        ],
        None,
    )
    .ok()
    .json();
    let listed: BTreeSet<String> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, plant_a);
    assert!(page["next_cursor"].is_null());
    let page = run_ctl(
        &env,
        &[
            "devices",
            "list",
            "--tag",
            "site=plant-a",
            "--tag",
            "floor=2",
            "-o",
            "json",
        ],
        None,
    )
    .ok()
    .json();
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["items"][0]["id"], "dev-0800");
    // One page as a table, with a hint for the next.
    let out = run_ctl(
        &env,
        &[
            "devices", "list", "--limit", "5", "--sort", "name", "--desc",
        ],
        None,
    )
    .ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{}", out.stdout);
    for col in [
        "ID",
        "NAME",
        "TYPE",
        "STATUS",
        "ONLINE",
        "LAST SEEN",
        "TAGS",
    ] {
        assert!(lines[0].contains(col), "{}", lines[0]);
    }
    assert!(out.stderr.contains("--cursor"), "{}", out.stderr);

    // Disable a device.
    let out = ctl(&hub, &op, "acme", &["devices", "disable", "dev-0002"]).ok();
    assert!(
        out.stdout.contains("disabled device dev-0002"),
        "{}",
        out.stdout
    );
    let d = ctl(
        &hub,
        &op,
        "acme",
        &["devices", "show", "dev-0002", "-o", "json"],
    )
    .ok()
    .json();
    assert_eq!(d["status"], "disabled");
    let page = ctl(
        &hub,
        &op,
        "acme",
        &["devices", "list", "--status", "disabled", "-o", "json"],
    )
    .ok()
    .json();
    let disabled: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(disabled, ["dev-0002"]);
    // Tags.
    let d = ctl(
        &hub,
        &op,
        "acme",
        &[
            "devices", "tag", "dev-0004", "zone=b", "--remove", "idx", "-o", "json",
        ],
    )
    .ok()
    .json();
    assert_eq!(d["tags"]["zone"], "b");
    assert!(d["tags"].get("idx").is_none());

    // A password: printed once, alone on stdout, and it works over MQTT.
    let out = ctl(
        &hub,
        &op,
        "acme",
        &["credentials", "add-password", "dev-0004"],
    )
    .ok();
    let secret = out.stdout.trim();
    assert!(
        !secret.is_empty() && out.stdout.lines().count() == 1,
        "{}",
        out.stdout
    );
    assert!(out.stderr.contains("acme/dev-0004"), "{}", out.stderr);
    assert!(
        mqtt_accepts(hub.mqtt, "acme/dev-0004", secret),
        "the printed password was refused"
    );
    assert!(!mqtt_accepts(hub.mqtt, "acme/dev-0004", "not-the-password"));

    // A certificate written to disk; the key is private.
    let certs = work.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let out = ctl(
        &hub,
        &op,
        "acme",
        &[
            "credentials",
            "issue-cert",
            "dev-0006",
            "--out-dir",
            certs.to_str().unwrap(),
        ],
    )
    .ok();
    assert!(
        out.stdout.contains("issued certificate credential"),
        "{}",
        out.stdout
    );
    let crt = std::fs::read_to_string(certs.join("dev-0006.crt")).unwrap();
    let key = std::fs::read_to_string(certs.join("dev-0006.key")).unwrap();
    let ca = std::fs::read_to_string(certs.join("ca.crt")).unwrap();
    assert!(crt.starts_with("-----BEGIN CERTIFICATE-----"), "{crt}");
    assert!(key.contains("PRIVATE KEY-----"));
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(certs.join("dev-0006.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // The CA the tenant's certificates chain to is the one `ca-cert` prints.
    let out = ctl(&hub, &op, "acme", &["credentials", "ca-cert"]).ok();
    assert_eq!(out.stdout.trim(), ca.trim());
    // Not overwritten without --force, and nothing is issued then.
    let out = ctl(
        &hub,
        &op,
        "acme",
        &[
            "credentials",
            "issue-cert",
            "dev-0006",
            "--out-dir",
            certs.to_str().unwrap(),
        ],
    );
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("exists already") && out.stderr.contains("--force"),
        "{}",
        out.stderr
    );
    let creds = ctl(
        &hub,
        &op,
        "acme",
        &["credentials", "list", "dev-0006", "-o", "json"],
    )
    .ok()
    .json();
    let creds = creds.as_array().unwrap();
    assert_eq!(creds.len(), 1);
    assert_eq!(creds[0]["kind"], "certificate");
    let out = ctl(&hub, &op, "acme", &["credentials", "list", "dev-0006"]).ok();
    assert!(
        out.stdout.contains("certificate") && out.stdout.contains("active"),
        "{}",
        out.stdout
    );
    // Revoke it.
    let cred_id = creds[0]["id"].as_str().unwrap();
    ctl(
        &hub,
        &op,
        "acme",
        &["credentials", "revoke", "dev-0006", cred_id],
    )
    .ok();
    let out = ctl(&hub, &op, "acme", &["credentials", "list", "dev-0006"]).ok();
    assert!(out.stdout.contains("revoked"), "{}", out.stdout);

    // A device JWT.
    let out = ctl(
        &hub,
        &op,
        "acme",
        &["credentials", "token", "dev-0004", "--ttl", "600"],
    )
    .ok();
    assert_eq!(out.stdout.trim().split('.').count(), 3, "{}", out.stdout);

    // Groups: static membership, and a dynamic group.
    ctl(
        &hub,
        &op,
        "acme",
        &["groups", "create", "wave-1", "--description", "first wave"],
    )
    .ok();
    ctl(&hub, &op, "acme", &["groups", "add", "wave-1", "dev-0004"]).ok();
    ctl(
        &hub,
        &op,
        "acme",
        &["groups", "create", "floor-2", "--query", "floor=2"],
    )
    .ok();
    let page = ctl(
        &hub,
        &op,
        "acme",
        &["devices", "list", "--group", "wave-1", "-o", "json"],
    )
    .ok()
    .json();
    assert_eq!(page["items"][0]["id"], "dev-0004");
    let page = ctl(
        &hub,
        &op,
        "acme",
        &["devices", "list", "--group", "floor-2", "-o", "json"],
    )
    .ok()
    .json();
    assert_eq!(page["items"][0]["id"], "dev-0800");
    let out = ctl(&hub, &op, "acme", &["groups", "list"]).ok();
    assert!(
        out.stdout.contains("wave-1") && out.stdout.contains("dynamic"),
        "{}",
        out.stdout
    );

    // Policies need an admin: the operator gets the API's message and the 403 hint.
    let policy = work.path().join("p.json");
    std::fs::write(
        &policy,
        r#"{"version": 1, "statements": [{"effect": "allow", "actions": ["connect"], "resources": ["${device.id}"]}]}"#,
    )
    .unwrap();
    let out = ctl(
        &hub,
        &op,
        "acme",
        &["policies", "put", "sensors", policy.to_str().unwrap()],
    );
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("HTTP 403") && out.stderr.contains("hint: "),
        "{}",
        out.stderr
    );
    ctl(
        &hub,
        ADMIN,
        "acme",
        &["policies", "put", "sensors", policy.to_str().unwrap()],
    )
    .ok();
    let out = ctl(&hub, &op, "acme", &["policies", "list"]).ok();
    assert!(out.stdout.contains("sensors"), "{}", out.stdout);

    // Decommission.
    let out = ctl(&hub, &op, "acme", &["devices", "delete", "dev-0010"]).ok();
    assert!(
        out.stdout.contains("decommissioned device dev-0010"),
        "{}",
        out.stdout
    );
    let out = ctl(&hub, &op, "acme", &["devices", "show", "dev-0010"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("HTTP 404"), "{}", out.stderr);

    // The audit log shows what was done.
    let audit = ctl(
        &hub,
        ADMIN,
        "acme",
        &["audit", "--since", "1h", "--limit", "1000", "-o", "json"],
    )
    .ok()
    .json();
    let actions: BTreeSet<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    for a in [
        "tenant.create",
        "token.create",
        "device.import",
        "device.disable",
        "credential.create",
        "credential.revoke",
        "credential.issue_token",
        "device.decommission",
    ] {
        assert!(actions.contains(a), "{a} missing from {actions:?}");
    }
    let out = ctl(&hub, &op, "acme", &["audit", "--action", "device.dis"]).ok();
    assert!(
        out.stdout.contains("device.disable") && out.stdout.contains("dev-0002"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("device.import"), "{}", out.stdout);

    // A wrong token: non-zero, the API's message and the 401 hint.
    let out = ctl(
        &hub,
        "fh_not-a-real-token-000000",
        "acme",
        &["devices", "list"],
    );
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("HTTP 401"), "{}", out.stderr);
    assert!(
        out.stderr.contains("check --token / FERROHUB_TOKEN"),
        "{}",
        out.stderr
    );
    // A tenant outside the token's scope looks missing.
    let out = ctl(&hub, &op, "default", &["devices", "list"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("FERROHUB_TENANT"), "{}", out.stderr);
    // A revoked token stops working.
    let tok_id = ops["id"].as_str().unwrap();
    ctl(&hub, ADMIN, "acme", &["tokens", "revoke", tok_id]).ok();
    let out = ctl(&hub, &op, "acme", &["devices", "list"]);
    assert!(
        out.code != 0 && out.stderr.contains("check --token"),
        "{}",
        out.stderr
    );
}

#[test]
fn unreachable_hub_missing_token_and_bad_input() {
    // Nothing listens on a port that was just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let out = run_ctl(
        &[],
        &["--url", &url, "--token", "fh_x", "devices", "list"],
        None,
    );
    assert_ne!(out.code, 0);
    assert!(
        out.stderr
            .contains(&format!("is the hub running at {url}?")),
        "{}",
        out.stderr
    );

    let out = run_ctl(&[("FERROHUB_URL", &url)], &["tenants", "list"], None);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("no API token") && out.stderr.contains("FERROHUB_TOKEN"),
        "{}",
        out.stderr
    );

    let out = run_ctl(
        &[],
        &["--url", "localhost", "--token", "t", "tenants", "list"],
        None,
    );
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("http://"), "{}", out.stderr);

    // Input errors are reported, never panics.
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("devices.txt");
    std::fs::write(&odd, "id\nx\n").unwrap();
    let out = run_ctl(
        &[],
        &[
            "--token",
            "t",
            "--url",
            &url,
            "devices",
            "import",
            odd.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("--format"), "{}", out.stderr);
    let out = run_ctl(
        &[],
        &[
            "--token", "t", "--url", &url, "devices", "import", "-", "--format", "json",
        ],
        Some(b"{not json"),
    );
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("not a JSON array"), "{}", out.stderr);
    let missing = dir.path().join("missing.csv");
    let out = run_ctl(
        &[],
        &[
            "--token",
            "t",
            "--url",
            &url,
            "devices",
            "import",
            missing.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(out.code, 1);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    let out = run_ctl(
        &[],
        &[
            "--token",
            "t",
            "--url",
            &url,
            "audit",
            "--since",
            "last tuesday",
        ],
        None,
    );
    assert_eq!(out.code, 2, "usage errors exit 2: {}", out.stderr);
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate").unwrap();
    let out = run_ctl(
        &[],
        &[
            "--ca-file",
            ca.to_str().unwrap(),
            "--token",
            "t",
            "tenants",
            "list",
        ],
        None,
    );
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("holds no certificate"),
        "{}",
        out.stderr
    );
}

/// The ctl's environment variables are not configuration keys of `ferrohub serve`: the config
/// loader ignores them (a config key named `url`, `token`, `tenant` or `ca_file` would collide).
#[test]
fn ctl_environment_is_not_hub_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let config = |with_ctl_env: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrohub"));
        cmd.arg("config").current_dir(dir.path());
        for (k, _) in std::env::vars() {
            if k.starts_with("FERROHUB_") {
                cmd.env_remove(k);
            }
        }
        if with_ctl_env {
            cmd.env("FERROHUB_URL", "http://10.0.0.1:8080")
                .env("FERROHUB_TOKEN", "fh_secret")
                .env("FERROHUB_TENANT", "acme")
                .env("FERROHUB_CA_FILE", "/nonexistent/ca.pem");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let plain = config(false);
    assert_eq!(config(true), plain);
    assert!(!plain.contains("fh_secret") && !plain.contains("acme"));
}

/// A one-request-at-a-time HTTPS server with a self-signed certificate for `localhost` that
/// answers every request with `[]`; returns its port and the certificate (PEM).
fn https_stub() -> (u16, String) {
    use std::sync::Arc;
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key)
    .unwrap();
    let config = Arc::new(config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(8) {
            let Ok(stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                continue;
            };
            let mut tls = rustls::StreamOwned::new(conn, stream);
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = tls.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
                  Connection: close\r\n\r\n[]",
            );
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    (port, cert.pem())
}

#[test]
fn https_hub_with_a_private_certificate_needs_ca_file() {
    let (port, ca_pem) = https_stub();
    let url = format!("https://localhost:{port}");
    let out = run_ctl(
        &[("FERROHUB_URL", &url), ("FERROHUB_TOKEN", "t")],
        &["tenants", "list"],
        None,
    );
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("--ca-file"), "{}", out.stderr);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("hub-ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let out = run_ctl(
        &[
            ("FERROHUB_URL", &url),
            ("FERROHUB_TOKEN", "t"),
            ("FERROHUB_CA_FILE", ca.to_str().unwrap()),
        ],
        &["tenants", "list", "-o", "json"],
        None,
    )
    .ok();
    assert_eq!(out.json(), serde_json::json!([]));
}

/// Twins and commands through ctl: set desired, read it back, a stale `--if-match` (409), tags,
/// history, a fleet query and grouped counts; a direct command to an offline device (refused), a
/// queued one listed, shown and cancelled.
#[test]
fn twins_and_commands() {
    let hub = Hub::start();
    let t = "default";
    for (id, site) in [
        ("boiler-1", "plant-a"),
        ("boiler-2", "plant-a"),
        ("pump-1", "plant-b"),
    ] {
        ctl(&hub, ADMIN, t, &["devices", "create", id]).ok();
        let patch = format!(r#"{{"site": "{site}"}}"#);
        ctl(
            &hub,
            ADMIN,
            t,
            &["twins", "set-tags", id, &patch, "-o", "json"],
        )
        .ok();
    }

    // Set desired, then read it back (JSON) through the environment variables.
    let out = ctl(
        &hub,
        ADMIN,
        t,
        &[
            "twins",
            "set-desired",
            "boiler-1",
            r#"{"rate": 30, "mode": "eco"}"#,
        ],
    )
    .ok();
    let after = out.json();
    assert_eq!(after["desired"]["rate"], 30, "{}", out.stdout);
    assert!(out.stderr.contains("version"), "{}", out.stderr);
    let url = hub.url();
    let env = [
        ("FERROHUB_URL", url.as_str()),
        ("FERROHUB_TOKEN", ADMIN),
        ("FERROHUB_TENANT", t),
    ];
    let twin = run_ctl(&env, &["twins", "get", "boiler-1", "-o", "json"], None)
        .ok()
        .json();
    assert_eq!(twin["deviceId"], "boiler-1");
    assert_eq!(twin["name"], "default");
    assert_eq!(
        twin["desired"],
        serde_json::json!({"rate": 30, "mode": "eco"})
    );
    assert_eq!(twin["delta"]["mode"], "eco");
    assert_eq!(twin["tags"]["site"], "plant-a");
    let version = twin["version"].as_u64().unwrap();

    // Conditional: at the current version it applies; the now stale version is refused.
    let v = version.to_string();
    let twin = ctl(
        &hub,
        ADMIN,
        t,
        &[
            "twins",
            "set-desired",
            "boiler-1",
            r#"{"mode": null}"#,
            "--if-match",
            &v,
        ],
    )
    .ok()
    .json();
    assert_eq!(twin["version"].as_u64(), Some(version + 1));
    assert_eq!(twin["desired"], serde_json::json!({"rate": 30}));
    let out = ctl(
        &hub,
        ADMIN,
        t,
        &[
            "twins",
            "set-desired",
            "boiler-1",
            r#"{"rate": 5}"#,
            "--if-match",
            &v,
        ],
    );
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(
        out.stderr.contains("version_conflict") && out.stderr.contains("version conflict"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("hint:"), "{}", out.stderr);
    // A bad patch is refused before anything is sent.
    let out = ctl(
        &hub,
        ADMIN,
        t,
        &["twins", "set-desired", "boiler-1", "{rate: 1}"],
    );
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("not JSON"), "{}", out.stderr);

    // History: tags, two desired changes, oldest first.
    let out = ctl(&hub, ADMIN, t, &["twins", "history", "boiler-1"]).ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("VERSION  TIME"), "{}", out.stdout);
    assert!(lines[0].ends_with("SECTION  PATCH"), "{}", out.stdout);
    assert_eq!(lines.len(), 4, "{}", out.stdout);
    assert!(lines[1].contains("tags") && lines[1].contains(r#"{"site":"plant-a"}"#));
    assert!(lines[3].contains("desired") && lines[3].contains(r#"{"mode":null}"#));
    let h = ctl(
        &hub,
        ADMIN,
        t,
        &["twins", "history", "boiler-1", "--after", &v, "-o", "json"],
    )
    .ok()
    .json();
    assert_eq!(h.as_array().unwrap().len(), 1, "{h}");

    // Fleet query (one page of 1, then --all) and grouped counts.
    let out = ctl(
        &hub,
        ADMIN,
        t,
        &[
            "twins",
            "query",
            "--where",
            "tags.site = 'plant-a'",
            "--limit",
            "1",
        ],
    )
    .ok();
    assert!(out.stdout.starts_with("DEVICE"), "{}", out.stdout);
    assert_eq!(out.stdout.lines().count(), 2, "{}", out.stdout);
    assert!(out.stderr.contains("--cursor"), "{}", out.stderr);
    let all = ctl(
        &hub,
        ADMIN,
        t,
        &[
            "twins",
            "query",
            "--where",
            "tags.site = 'plant-a'",
            "--limit",
            "1",
            "--all",
            "-o",
            "json",
        ],
    )
    .ok()
    .json();
    let devices: Vec<&str> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x["deviceId"].as_str())
        .collect();
    assert_eq!(devices, ["boiler-1", "boiler-2"]);
    assert!(all["next"].is_null());
    let out = ctl(&hub, ADMIN, t, &["twins", "counts", "--by", "tags.site"]).ok();
    let rows: Vec<Vec<&str>> = out
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        vec![
            vec!["VALUE", "COUNT"],
            vec!["plant-a", "2"],
            vec!["plant-b", "1"]
        ],
        "{}",
        out.stdout
    );
    let counts = ctl(
        &hub,
        ADMIN,
        t,
        &[
            "twins",
            "counts",
            "--by",
            "desired.rate",
            "--where",
            "tags.site = 'plant-a'",
            "-o",
            "json",
        ],
    )
    .ok()
    .json();
    let mut groups: Vec<String> = counts
        .as_array()
        .unwrap()
        .iter()
        .map(|g| format!("{}:{}", g["value"], g["count"]))
        .collect();
    groups.sort();
    assert_eq!(groups, ["30:1", "null:1"], "{counts}");

    // A direct command to an offline device: refused at once with the API's message.
    let out = ctl(
        &hub,
        ADMIN,
        t,
        &[
            "commands",
            "send",
            "pump-1",
            "reboot",
            "--payload",
            r#"{"delay": 5}"#,
            "--timeout",
            "5",
        ],
    );
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("offline") && out.stderr.contains("device_offline"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("--queued"), "{}", out.stderr);

    // Queued: stored, listed as queued, shown, cancelled.
    let cmd = ctl(
        &hub,
        ADMIN,
        t,
        &[
            "commands",
            "send",
            "pump-1",
            "set-schedule",
            "--payload",
            r#"{"on": "06:00"}"#,
            "--queued",
            "--ttl",
            "3600",
            "-o",
            "json",
        ],
    )
    .ok()
    .json();
    assert_eq!(cmd["state"], "queued", "{cmd}");
    let id = cmd["id"].as_str().unwrap().to_string();
    let out = ctl(&hub, ADMIN, t, &["commands", "list", "pump-1"]).ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("ID"), "{}", out.stdout);
    assert_eq!(lines.len(), 2, "{}", out.stdout);
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        cells[..4],
        [id.as_str(), "set-schedule", "queued", "0/5"],
        "{}",
        out.stdout
    );
    let out = ctl(
        &hub,
        ADMIN,
        t,
        &["commands", "list", "pump-1", "--state", "failed"],
    )
    .ok();
    assert!(out.stdout.is_empty() && out.stderr.contains("no queued commands"));
    let out = ctl(&hub, ADMIN, t, &["commands", "get", "pump-1", &id]).ok();
    assert!(
        out.stdout.contains("queued") && out.stdout.contains(r#"{"on":"06:00"}"#),
        "{}",
        out.stdout
    );
    let out = ctl(&hub, ADMIN, t, &["commands", "cancel", "pump-1", &id]).ok();
    assert!(out.stdout.contains("cancelled"), "{}", out.stdout);
    let got = ctl(
        &hub,
        ADMIN,
        t,
        &["commands", "get", "pump-1", &id, "-o", "json"],
    )
    .ok()
    .json();
    assert_eq!(got["state"], "cancelled");
    // --ttl belongs to --queued.
    let out = ctl(
        &hub,
        ADMIN,
        t,
        &["commands", "send", "pump-1", "x", "--ttl", "5"],
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
}

#[test]
fn telemetry() {
    const HOUR: i64 = 3_600_000;
    let hub = Hub::start();
    let t = "default";
    let run = |args: &[&str]| ctl(&hub, ADMIN, t, args);
    run(&["groups", "create", "wave"]).ok();
    for (id, site) in [("s1", "a"), ("s2", "a"), ("s3", "b")] {
        let tag = format!("site={site}");
        run(&["devices", "create", id, "--tag", &tag]).ok();
    }
    run(&["groups", "add", "wave", "s3"]).ok();

    // Writes: a JSON argument, a file, standard input. 12 points each, every 10 minutes from an
    // hour boundary 3 hours ago (s2 a second later, so that timestamps differ across devices).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let t0 = (now / HOUR - 3) * HOUR;
    let batch = |dev: i64| -> String {
        let items: Vec<String> = (0..12)
            .map(|i| {
                format!(
                    r#"{{"ts": {}, "temp": {}, "mode": "m{i}"}}"#,
                    t0 + i * 600_000 + dev * 1000,
                    dev * 100 + i
                )
            })
            .collect();
        format!("[{}]", items.join(","))
    };
    let out = run(&["telemetry", "write", "s1", &batch(0)]).ok();
    assert_eq!(out.stdout, "stored 24 point(s) for device s1\n");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s2.json");
    std::fs::write(&file, batch(1)).unwrap();
    let out = run(&[
        "telemetry",
        "write",
        "s2",
        "--file",
        file.to_str().unwrap(),
        "-o",
        "json",
    ])
    .ok();
    assert_eq!(out.json()["points"], 24);
    let url = hub.url();
    let args = [
        "--url",
        &url,
        "--token",
        ADMIN,
        "--tenant",
        t,
        "telemetry",
        "write",
        "s3",
        "-",
    ];
    run_ctl(&[], &args, Some(batch(2).as_bytes())).ok();
    // A value of another kind is refused (exit 1), the rest stored.
    let out = run(&["telemetry", "write", "s1", r#"{"temp": "hot", "hum": 40}"#]);
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("stored 1 point(s)"), "{}", out.stdout);
    assert!(out.stderr.contains("refused"), "{}", out.stderr);
    let out = run(&["telemetry", "write", "ghost", r#"{"temp": 1}"#]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("not found"), "{}", out.stderr);

    // Series.
    let out = run(&["telemetry", "series", "s1"]).ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("METRIC  KIND"), "{}", out.stdout);
    assert_eq!(lines.len(), 4, "{}", out.stdout); // hum, mode, temp
    assert!(
        lines[3].starts_with("temp    numeric  11"),
        "{}",
        out.stdout
    );

    // Raw points: one page with a hint, every page, newest first.
    let from = t0.to_string();
    let out = run(&[
        "telemetry",
        "get",
        "s1",
        "temp",
        "--from",
        &from,
        "--limit",
        "5",
    ])
    .ok();
    assert_eq!(out.stdout.lines().count(), 6, "{}", out.stdout);
    assert!(
        out.stdout.lines().nth(1).unwrap().ends_with("  0"),
        "{}",
        out.stdout
    );
    assert!(out.stderr.contains("--cursor"), "{}", out.stderr);
    let all = run(&[
        "telemetry",
        "get",
        "s1",
        "temp",
        "--from",
        &from,
        "--limit",
        "5",
        "--all",
        "-o",
        "json",
    ])
    .ok()
    .json();
    let points = all["points"].as_array().unwrap();
    assert_eq!(points.len(), 12, "{all}");
    assert!(all["next_cursor"].is_null());
    assert_eq!(points[11]["value"], 11);
    let desc = run(&[
        "telemetry",
        "get",
        "s1",
        "temp",
        // The form the docs use: a duration ago with a leading minus.
        "--from",
        "-1d",
        "--desc",
        "--limit",
        "1",
        "-o",
        "json",
    ])
    .ok()
    .json();
    assert_eq!(desc["points"][0]["value"], 11);

    // Aggregates of one device: the table shows the requested functions.
    let out = run(&[
        "telemetry",
        "agg",
        "s1",
        "temp",
        "--bucket",
        "1h",
        "--fn",
        "avg,max",
        "--from",
        &from,
    ])
    .ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["TIME", "AVG", "MAX"]
    );
    assert_eq!(lines.len(), 3, "{}", out.stdout);
    assert!(lines[1].ends_with("2.5  5.0"), "{}", out.stdout);
    let agg = run(&[
        "telemetry",
        "agg",
        "s1",
        "temp",
        "--bucket",
        "30m",
        "--from",
        &from,
        "-o",
        "json",
    ])
    .ok()
    .json();
    assert_eq!(agg["bucket_ms"], 1_800_000);
    assert_eq!(agg["buckets"][0]["count"], 3);
    assert_eq!(agg["buckets"][0]["sum"], 3.0);

    // Fleet snapshots by selection.
    let out = run(&["telemetry", "latest", "temp"]).ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", out.stdout);
    assert!(lines[0].starts_with("DEVICE  TIME"), "{}", out.stdout);
    assert!(
        lines[2].starts_with("s2") && lines[2].ends_with("111"),
        "{}",
        out.stdout
    );
    let ids = |v: Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["device"].as_str().unwrap().to_string())
            .collect()
    };
    let site_a = run(&[
        "telemetry",
        "latest",
        "temp",
        "--tag",
        "site=a",
        "-o",
        "json",
    ])
    .ok();
    assert_eq!(ids(site_a.json()), ["s1", "s2"]);
    let wave = run(&[
        "telemetry",
        "latest",
        "temp",
        "--group",
        "wave",
        "-o",
        "json",
    ])
    .ok();
    assert_eq!(ids(wave.json()), ["s3"]);
    let listed = run(&[
        "telemetry",
        "latest",
        "temp",
        "--devices",
        "s3,s1",
        "--limit",
        "1",
        "--all",
        "-o",
        "json",
    ])
    .ok();
    assert_eq!(ids(listed.json()), ["s1", "s3"]);

    // Fleet aggregates grouped by a registry tag.
    let fleet = run(&[
        "telemetry",
        "fleet-agg",
        "temp",
        "--bucket",
        "1h",
        "--by",
        "tag:site",
        "--fn",
        "count,max",
        "--from",
        &from,
        "-o",
        "json",
    ])
    .ok()
    .json();
    let groups = fleet["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{fleet}");
    assert_eq!(groups[0]["group"], "a");
    assert_eq!(groups[0]["series"], 2);
    assert_eq!(groups[0]["buckets"][0]["count"], 12);
    assert_eq!(groups[0]["buckets"][0]["max"], 105.0);
    assert_eq!(groups[1]["group"], "b");
    let out = run(&[
        "telemetry",
        "fleet-agg",
        "temp",
        "--bucket",
        "2h",
        "--by",
        "device",
        "--fn",
        "count",
        "--from",
        &from,
        "--to",
        "now",
    ])
    .ok();
    assert!(
        out.stdout.starts_with("GROUP  SERIES  TIME"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.lines().any(|l| l.starts_with("s3")),
        "{}",
        out.stdout
    );

    // Settings: show, change, forever, back to the defaults.
    let out = run(&["telemetry", "settings"]).ok();
    assert!(
        out.stdout.contains("30 days (hub default)"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("devices/+/telemetry/# (hub default)"),
        "{}",
        out.stdout
    );
    let v = run(&[
        "telemetry",
        "settings",
        "--retention-days",
        "90",
        "--format",
        "json",
        "--topics",
        "plant/+/data/#,devices/+/telemetry/#",
        "-o",
        "json",
    ])
    .ok()
    .json();
    assert_eq!(v["retention_days"], 90);
    assert_eq!(v["format"], "json");
    assert_eq!(v["topics"].as_array().unwrap().len(), 2);
    let out = run(&["telemetry", "settings", "--retention-forever"]).ok();
    assert!(out.stdout.contains("forever\n"), "{}", out.stdout);
    assert!(out.stdout.contains("json\n"), "{}", out.stdout);
    let v = run(&[
        "telemetry",
        "settings",
        "--retention-default",
        "--topics-default",
        "--format-default",
        "-o",
        "json",
    ])
    .ok()
    .json();
    assert!(v["retention_days"].is_null() && v["topics"].is_null() && v["format"].is_null());
    assert_eq!(v["effective"]["retention_days"], 30);
    let out = run(&[
        "telemetry",
        "settings",
        "--retention-days",
        "5",
        "--retention-forever",
    ]);
    assert_eq!(out.code, 2, "{}", out.stderr);

    // A viewer reads but cannot write.
    let viewer = run(&["tokens", "create", "reader", "--role", "viewer"])
        .ok()
        .stdout
        .trim()
        .to_string();
    ctl(&hub, &viewer, t, &["telemetry", "series", "s1"]).ok();
    let out = ctl(
        &hub,
        &viewer,
        t,
        &["telemetry", "write", "s1", r#"{"temp": 1}"#],
    );
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("HTTP 403"), "{}", out.stderr);
    let out = ctl(
        &hub,
        &viewer,
        t,
        &["telemetry", "settings", "--retention-days", "3"],
    );
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("HTTP 403"), "{}", out.stderr);
}

#[test]
fn telemetry_export() {
    const HOUR: i64 = 3_600_000;
    let hub = Hub::start();
    let t = "default";
    let run = |args: &[&str]| ctl(&hub, ADMIN, t, args);
    for id in ["e1", "e2"] {
        run(&["devices", "create", id]).ok();
    }
    // e1: integers and strings every minute from an hour boundary 2 hours ago; e2: floats.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let t0 = (now / HOUR - 2) * HOUR;
    let e1: Vec<String> = (0..10)
        .map(|i| {
            format!(
                r#"{{"ts": {}, "temp": {i}, "mode": "m,{i}"}}"#,
                t0 + i * 60_000
            )
        })
        .collect();
    run(&["telemetry", "write", "e1", &format!("[{}]", e1.join(","))]).ok();
    let e2: Vec<String> = (0..5)
        .map(|i| format!(r#"{{"ts": {}, "temp": {i}.5}}"#, t0 + i * 60_000 + 1))
        .collect();
    run(&["telemetry", "write", "e2", &format!("[{}]", e2.join(","))]).ok();
    let rfc = |ms: i64| {
        humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + Duration::from_millis(ms.try_into().unwrap()),
        )
        .to_string()
    };
    // What the CSV must hold: tenant, device, metric, ts, value, type.
    let mut temp_rows: BTreeSet<Vec<String>> = BTreeSet::new();
    for i in 0..10 {
        let row = [
            t,
            "e1",
            "temp",
            &rfc(t0 + i * 60_000),
            &i.to_string(),
            "int",
        ];
        temp_rows.insert(row.iter().map(|s| s.to_string()).collect());
    }
    for i in 0..5 {
        let ts = rfc(t0 + i * 60_000 + 1);
        let row = [t, "e2", "temp", &ts, &format!("{i}.5"), "float"];
        temp_rows.insert(row.iter().map(|s| s.to_string()).collect());
    }
    let read_csv = |path: &str| -> (Vec<String>, Vec<Vec<String>>) {
        assert!(
            std::path::Path::new(path).starts_with(hub._data.path().join("telemetry/exports")),
            "{path}"
        );
        let mut r = csv::Reader::from_path(path).unwrap();
        let header = r.headers().unwrap().iter().map(str::to_string).collect();
        let rows = r
            .records()
            .map(|rec| rec.unwrap().iter().map(str::to_string).collect())
            .collect();
        (header, rows)
    };
    let (from, to) = (t0.to_string(), (t0 + HOUR).to_string());

    // Devices and metrics selected, JSON: the finished job; the CSV holds exactly those points.
    let job = run(&[
        "telemetry",
        "export",
        "--destination",
        "run1",
        "--format",
        "csv",
        "--from",
        &from,
        "--to",
        &to,
        "--devices",
        "e1,e2",
        "--metrics",
        "temp",
        "-o",
        "json",
    ])
    .ok()
    .json();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["rows"], 15, "{job}");
    assert_eq!(job["series_done"], 2, "{job}");
    assert_eq!(job["series_total"], 2, "{job}");
    assert_eq!(job["format"], "csv");
    let files = job["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{job}");
    let path = files[0].as_str().unwrap();
    assert!(
        path.ends_with(&format!("run1/telemetry-{}.csv", job["id"])),
        "{path}"
    );
    assert_eq!(
        job["bytes"].as_u64().unwrap(),
        std::fs::metadata(path).unwrap().len()
    );
    let (header, rows) = read_csv(path);
    assert_eq!(
        header,
        ["tenant", "device", "metric", "ts", "value", "type"]
    );
    assert_eq!(rows.len(), 15);
    assert_eq!(
        rows[0],
        [t, "e1", "temp", &rfc(t0), "0", "int"].map(String::from)
    );
    assert_eq!(rows.into_iter().collect::<BTreeSet<_>>(), temp_rows);

    // Everything, as a table: the job's fields and its file; no progress bar on a pipe.
    // (Times as RFC 3339, passed through to the hub.)
    let out = run(&[
        "telemetry",
        "export",
        "-d",
        "run2",
        "--format",
        "csv",
        "--from",
        &rfc(t0),
        "--to",
        &rfc(t0 + HOUR),
        "--name",
        "all",
    ])
    .ok();
    assert!(
        out.stdout.contains("state:        succeeded\n"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("rows:         25\n"), "{}", out.stdout);
    assert!(
        out.stdout.contains("series:       3 of 3\n"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("bytes:"), "{}", out.stdout);
    assert!(out.stderr.is_empty(), "{}", out.stderr);
    let file = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("file:"))
        .unwrap()
        .trim();
    assert!(file.ends_with("run2/all.csv"), "{file}");
    let (_, rows) = read_csv(file);
    assert_eq!(rows.len(), 25);
    let modes: Vec<&Vec<String>> = rows.iter().filter(|r| r[2] == "mode").collect();
    assert_eq!(modes.len(), 10);
    assert_eq!(modes[3][4], "m,3");
    assert_eq!(modes[3][5], "string");
    let temps: BTreeSet<Vec<String>> = rows.into_iter().filter(|r| r[2] == "temp").collect();
    assert_eq!(temps, temp_rows);

    // --no-wait prints the job as started; export-status --wait follows it to its end. (From
    // a duration ago, to the hub's now.)
    let started = run(&[
        "telemetry",
        "export",
        "-d",
        "run3",
        "--from",
        "3h",
        "--devices",
        "e2",
        "--no-wait",
        "-o",
        "json",
    ])
    .ok()
    .json();
    let id = started["id"].as_u64().unwrap().to_string();
    assert_eq!(started["format"], "parquet");
    let done = run(&["telemetry", "export-status", &id, "--wait", "-o", "json"])
        .ok()
        .json();
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["rows"], 5);
    assert!(
        done["files"][0].as_str().unwrap().ends_with(".parquet"),
        "{done}"
    );
    let out = run(&["telemetry", "export-status", &id]).ok();
    assert!(out.stdout.contains("rows:         5\n"), "{}", out.stdout);

    // A job that fails (its folder cannot be created: a file is in the way) is printed, and the
    // command exits 1 with the job's error; a request the hub refuses never starts a job.
    let exports = hub._data.path().join("telemetry/exports");
    std::fs::create_dir_all(&exports).unwrap();
    std::fs::write(exports.join("blocked"), b"").unwrap();
    let out = run(&["telemetry", "export", "-d", "blocked/sub", "--from", &from]);
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("state:        failed\n"),
        "{}",
        out.stdout
    );
    assert!(out.stderr.contains("failed: creating"), "{}", out.stderr);
    let failed_id = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("id:"))
        .unwrap()
        .trim()
        .to_string();
    let out = run(&["telemetry", "export-status", &failed_id, "-o", "json"]);
    assert_eq!(out.code, 1);
    assert_eq!(out.json()["state"], "failed");
    let out = run(&["telemetry", "export", "-d", "../etc", "--from", &from]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("HTTP 400"), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    let out = run(&[
        "telemetry",
        "export",
        "-d",
        "x",
        "--from",
        &to,
        "--to",
        &from,
    ]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("HTTP 400"), "{}", out.stderr);
    let out = run(&["telemetry", "export-status", "999"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("not found"), "{}", out.stderr);
    let out = run(&["telemetry", "export", "--from", &from]);
    assert_eq!(out.code, 2, "{}", out.stderr);

    // The list, newest first.
    let list = run(&["telemetry", "exports", "-o", "json"]).ok().json();
    let states: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["failed", "succeeded", "succeeded", "succeeded"]);
    let out = run(&["telemetry", "exports"]).ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{}", out.stdout);
    assert!(lines[0].starts_with("ID  STATE"), "{}", out.stdout);
    assert!(lines[1].contains("failed"), "{}", out.stdout);
    // A viewer follows exports but cannot start one.
    let viewer = run(&["tokens", "create", "reader", "--role", "viewer"])
        .ok()
        .stdout
        .trim()
        .to_string();
    ctl(&hub, &viewer, t, &["telemetry", "export-status", &id]).ok();
    let out = ctl(
        &hub,
        &viewer,
        t,
        &["telemetry", "export", "-d", "v", "--from", &from],
    );
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("HTTP 403"), "{}", out.stderr);
}

#[test]
fn rules() {
    let hub = Hub::start();
    let run = |args: &[&str]| ctl(&hub, ADMIN, "default", args);
    // A compile error names line and column, and fails.
    let bad = run(&["rules", "create", "bad", "--sql", "SELECT avgg(x) FROM 'a'"]);
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("1:8"), "{}", bad.stderr);
    let created = run(&[
        "rules",
        "create",
        "hot",
        "--sql",
        "SELECT temp FROM 'devices/+/telemetry' WHERE temp > 30",
        "--action",
        "republish=alerts/${topic(2)}",
    ])
    .ok()
    .json();
    assert_eq!(
        (created["version"].as_u64(), created["enabled"].as_bool()),
        (Some(1), Some(true))
    );
    let list = run(&["rules", "list"]).ok();
    assert!(list.stdout.contains("hot"), "{}", list.stdout);
    let dry = run(&[
        "rules",
        "dry-run",
        "hot",
        "--topic",
        "devices/d1/telemetry",
        "--payload",
        r#"{"temp": 31}"#,
    ])
    .ok()
    .json();
    assert_eq!(dry["output"]["temp"], 31);
    assert_eq!(dry["actions"][0]["topic"], "alerts/d1");
    let dry = run(&[
        "rules",
        "dry-run",
        "--sql",
        "SELECT x * 2 AS y FROM 'a'",
        "--topic",
        "a",
        "--payload",
        r#"{"x": 2}"#,
    ])
    .ok()
    .json();
    assert_eq!(dry["output"]["y"], 4);
    let disabled = run(&["rules", "disable", "hot"]).ok().json();
    assert_eq!(
        (disabled["version"].as_u64(), disabled["enabled"].as_bool()),
        (Some(2), Some(false))
    );
    let updated = run(&[
        "rules",
        "update",
        "hot",
        "--sql",
        "SELECT temp FROM 'devices/#'",
    ])
    .ok()
    .json();
    assert_eq!(updated["version"], 3);
    assert_eq!(
        updated["actions"][0]["topic"], "alerts/${topic(2)}",
        "actions kept"
    );
    let stats = run(&["rules", "stats", "hot"]).ok();
    assert!(stats.stdout.contains("matched"), "{}", stats.stdout);
    assert_eq!(
        run(&["rules", "dead-letters", "hot"]).ok().json(),
        serde_json::json!([])
    );
    run(&["rules", "delete", "hot"]).ok();
    assert_ne!(run(&["rules", "get", "hot"]).code, 0);
}

#[test]
fn alarms() {
    let hub = Hub::start();
    let run = |args: &[&str]| ctl(&hub, ADMIN, "default", args);
    let raised = run(&[
        "alarms",
        "raise",
        "overheat:b17",
        "--severity",
        "major",
        "--device",
        "b17",
        "--message",
        "too hot",
        "--details",
        r#"{"temp": 97.5}"#,
    ])
    .ok();
    assert!(raised.stdout.contains("overheat:b17"), "{}", raised.stdout);
    let again = run(&[
        "alarms",
        "raise",
        "overheat:b17",
        "--severity",
        "critical",
        "-o",
        "json",
    ])
    .ok()
    .json();
    assert_eq!(
        (again["count"].as_u64(), again["severity"].as_str()),
        (Some(2), Some("critical"))
    );
    let id = again["id"].as_str().unwrap().to_string();
    let list = run(&["alarms", "list", "--state", "open"]).ok();
    assert!(list.stdout.contains(&id), "{}", list.stdout);
    let counts = run(&["alarms", "counts"]).ok();
    assert!(counts.stdout.contains("critical"), "{}", counts.stdout);
    run(&["alarms", "ack", &id, "--note", "on it"]).ok();
    run(&["alarms", "clear", &id]).ok();
    let twice = run(&["alarms", "clear", &id]);
    assert_eq!(twice.code, 1);
    assert!(twice.stderr.contains("already cleared"), "{}", twice.stderr);
    let history = run(&["alarms", "history", &id, "-o", "json"]).ok().json();
    let kinds: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["raised", "updated", "acknowledged", "cleared"]);
    // A channel with a bad template names its line; a good one saves.
    let bad = run(&[
        "alarms",
        "channels",
        "put",
        "ops",
        "--webhook-url",
        "http://127.0.0.1:9/x",
        "--body",
        "{\n{{ alarm.key ",
    ]);
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("line 2"), "{}", bad.stderr);
    run(&[
        "alarms",
        "channels",
        "put",
        "ops",
        "--webhook-url",
        "http://127.0.0.1:9/x",
        "--events",
        "raised,cleared",
        "--rate-limit",
        "60",
    ])
    .ok();
    let list = run(&["alarms", "channels", "list"]).ok();
    assert!(list.stdout.contains("raised,cleared"), "{}", list.stdout);
    // Nothing listens on port 9: the test send fails and says so.
    let test = run(&["alarms", "channels", "test", "ops"]);
    assert_eq!(test.code, 1);
    assert_eq!(test.json()["status"], "failed");
    run(&["alarms", "channels", "deliveries", "ops"]).ok();
    run(&["alarms", "channels", "delete", "ops"]).ok();
}
