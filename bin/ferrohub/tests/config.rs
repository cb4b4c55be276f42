//! The configuration layers (defaults < file < env < flags) and the documentation of every key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn ferrohub() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferrohub"));
    // Keep the developer's environment out of the test.
    for (k, _) in std::env::vars() {
        if k.starts_with("FERROHUB_") {
            c.env_remove(k);
        }
    }
    c
}

fn effective(cmd: &mut Command) -> toml::Table {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().parse().unwrap()
}

#[test]
fn file_then_env_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hub.toml");
    std::fs::write(
        &file,
        "data_dir = \"/from/file\"\n[mqtt]\nmax_queued_messages = 7\nmax_inflight = 9\n[listeners]\nmqtt = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    let cfg = effective(ferrohub().arg("config").arg("--config").arg(&file));
    assert_eq!(cfg["data_dir"].as_str(), Some("/from/file"));
    assert_eq!(cfg["mqtt"]["max_queued_messages"].as_integer(), Some(7));

    let cfg = effective(
        ferrohub()
            .arg("config")
            .arg("--config")
            .arg(&file)
            .env("FERROHUB_MQTT__MAX_QUEUED_MESSAGES", "8")
            .env("FERROHUB_LISTENERS__MQTT", "127.0.0.1:2"),
    );
    assert_eq!(
        cfg["mqtt"]["max_queued_messages"].as_integer(),
        Some(8),
        "env beats file"
    );
    assert_eq!(
        cfg["mqtt"]["max_inflight"].as_integer(),
        Some(9),
        "file beats defaults"
    );
    assert_eq!(cfg["listeners"]["mqtt"].as_str(), Some("127.0.0.1:2"));

    let cfg = effective(
        ferrohub()
            .args([
                "config",
                "--mqtt-listen",
                "127.0.0.1:3",
                "--data-dir",
                "/from/flag",
                "--allow-anonymous",
            ])
            .arg("--config")
            .arg(&file)
            .env("FERROHUB_LISTENERS__MQTT", "127.0.0.1:2"),
    );
    assert_eq!(
        cfg["listeners"]["mqtt"].as_str(),
        Some("127.0.0.1:3"),
        "flags beat env"
    );
    assert_eq!(cfg["data_dir"].as_str(), Some("/from/flag"));
    assert_eq!(cfg["allow_anonymous"].as_bool(), Some(true));
}

#[test]
fn unrelated_ferrohub_variables_are_not_configuration() {
    let cfg = effective(
        ferrohub()
            .arg("config")
            .env("FERROHUB_BIN", "/usr/bin/ferrohub")
            .env("FERROHUB_ADMIN_TOKEN", "x")
            .env("FERROHUB_DATA_DIR", "/from/env"),
    );
    assert_eq!(cfg["data_dir"].as_str(), Some("/from/env"));
    // A misspelt key inside a known section is still refused.
    let out = ferrohub()
        .arg("config")
        .env("FERROHUB_MQTT__MAX_PAKET_SIZE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_paket_size"));
}

#[test]
fn unknown_keys_and_missing_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hub.toml");
    std::fs::write(&file, "[mqtt]\nmax_queued_mesages = 7\n").unwrap();
    let out = ferrohub()
        .arg("config")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max_queued_mesages"),
        "error names the bad key: {err}"
    );

    let out = ferrohub()
        .args(["config", "--config", "/nonexistent/ferrohub.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[test]
fn every_key_is_documented() {
    let docs = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/configuration.md"
    ))
    .unwrap();
    let cfg = effective(ferrohub().arg("config"));
    let mut keys = vec!["cert_file", "key_file", "client_ca_file"]; // unset by default, so not printed
    let mut owned = Vec::new();
    for (k, v) in &cfg {
        match v {
            toml::Value::Table(t) => owned.extend(t.keys().cloned()),
            _ => owned.push(k.clone()),
        }
    }
    keys.extend(owned.iter().map(String::as_str));
    for key in keys {
        assert!(
            docs.contains(&format!("| `{key}` |")),
            "docs/configuration.md does not document `{key}`"
        );
    }
}

#[test]
fn help_explains_the_layers() {
    let out = ferrohub().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--data-dir",
        "--mqtt-listen",
        "--ws-listen",
        "--http-listen",
        "--allow-anonymous",
    ] {
        assert!(help.contains(flag), "serve --help lists {flag}");
    }
    let out = ferrohub().arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("FERROHUB_"));
}
