//! `ferrohub ctl commands`: commands to devices, direct (wait for the answer) or queued (stored,
//! delivered when the device is online), and the device's queued commands
//! (`/tenants/{t}/devices/{d}/commands/{name}`, `…/queued-commands`; see `docs/twins.md`).
//!
//! (Not to be confused with `commands.rs`, which runs ctl's own command tree.)

use anyhow::Result;
use clap::Subcommand;
use reqwest::Method;
use serde_json::Value;

use super::Ctx;
use super::client::{Body, Failure};
use super::output::{Output, Table, emit, emit_json, key_values, text, time};

/// Seconds a direct command waits for the device when `--timeout` is not given (the API's
/// default).
pub(super) const DEFAULT_DIRECT_WAIT: u64 = 30;

use ferrohub_twins::commands::CommandState;

/// Parses `--state` (the states the API knows).
fn parse_state(s: &str) -> Result<CommandState, String> {
    CommandState::parse(s).ok_or_else(|| {
        format!(
            "unknown state {s:?}: use queued, sent, delivered, succeeded, failed, expired or cancelled"
        )
    })
}

#[derive(Subcommand, Debug)]
pub(super) enum CommandsCmd {
    /// Sends a command to a device. Direct (the default): waits for the device's answer (the
    /// global --timeout, default 30 s here, at most 300) and prints its status and payload; fails
    /// at once when the device is offline or not listening, and when it does not answer in time.
    /// With --queued: stores the command and prints it; the hub delivers it when the device is
    /// online (follow it with `commands get`).
    #[command(
        after_help = "Examples:\n  ferrohub ctl commands send boiler-17 reboot --payload '{\"delay\": 5}' --timeout 10\n  \
        ferrohub ctl commands send boiler-17 set-schedule --payload '{\"on\": \"06:00\"}' --queued --ttl 86400\n\n\
        Exit status: 1 when the hub refused or the command failed (offline, not listening, no answer\n\
        in time) or the device answered with a status other than 2xx."
    )]
    Send {
        /// Device id.
        device: String,
        /// Command name (letters, digits, '-', '_', '.').
        name: String,
        /// The payload, JSON, passed to the device unchanged (default: empty).
        #[arg(long, value_name = "JSON")]
        payload: Option<String>,
        /// Store the command and deliver it when the device is online, instead of waiting.
        #[arg(long)]
        queued: bool,
        /// Queued: seconds the command may wait for the device (default: the hub's
        /// commands.default_ttl_secs).
        #[arg(long, value_name = "SECS", requires = "queued")]
        ttl: Option<u64>,
    },
    /// Lists a device's queued commands, newest first.
    #[command(after_help = "Examples:\n  ferrohub ctl commands list boiler-17\n  \
        ferrohub ctl commands list boiler-17 --state failed")]
    List {
        /// Device id.
        device: String,
        /// Only commands in this state: queued, sent, delivered, succeeded, failed, expired or
        /// cancelled.
        #[arg(long, value_parser = parse_state)]
        state: Option<CommandState>,
        /// Number of commands, 1 to 1000.
        #[arg(long, default_value_t = 100, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
    },
    /// Shows a queued command: its state, attempts and, once answered, the device's answer.
    #[command(after_help = "Example:\n  ferrohub ctl commands get boiler-17 8f2c...")]
    Get {
        /// Device id.
        device: String,
        /// Command id (from `commands send --queued` or `commands list`).
        id: String,
    },
    /// Cancels a queued command that has not finished.
    #[command(after_help = "Example:\n  ferrohub ctl commands cancel boiler-17 8f2c...")]
    Cancel {
        /// Device id.
        device: String,
        /// Command id.
        id: String,
    },
}

/// Seconds a direct `commands send` waits for the device, when the command is one: the HTTP
/// client must wait longer than that.
pub(super) fn direct_wait(cmd: &CommandsCmd, timeout: Option<u64>) -> Option<u64> {
    match cmd {
        CommandsCmd::Send { queued: false, .. } => Some(timeout.unwrap_or(DEFAULT_DIRECT_WAIT)),
        _ => None,
    }
}

fn compact(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

fn show_command(v: &Value) -> String {
    let attempts = format!("{}/{}", text(v, "attempts"), text(v, "maxAttempts"));
    key_values(&[
        ("id", text(v, "id")),
        ("device", text(v, "deviceId")),
        ("name", text(v, "name")),
        ("state", text(v, "state")),
        ("attempts", attempts),
        ("status", text(v, "status")),
        ("response", compact(v.get("response"))),
        ("error", text(v, "error")),
        ("payload", compact(v.get("payload"))),
        ("actor", text(v, "actor")),
        ("created", time(v, "createdAt")),
        ("updated", time(v, "updatedAt")),
        ("expires", time(v, "expiresAt")),
    ])
}

fn commands_table(v: &Value) -> Table {
    let mut t = Table::new(&[
        "ID", "NAME", "STATE", "ATTEMPTS", "STATUS", "CREATED", "EXPIRES",
    ]);
    for c in v.as_array().into_iter().flatten() {
        t.row(vec![
            text(c, "id"),
            text(c, "name"),
            text(c, "state"),
            format!("{}/{}", text(c, "attempts"), text(c, "maxAttempts")),
            text(c, "status"),
            time(c, "createdAt"),
            time(c, "expiresAt"),
        ]);
    }
    t
}

/// Runs a `commands` command.
pub(super) async fn run(ctx: &Ctx, cmd: CommandsCmd) -> Result<i32> {
    let timeout = ctx.timeout;
    let c = &ctx.client;
    let tenant = ctx.tenant.as_str();
    match cmd {
        CommandsCmd::Send {
            device,
            name,
            payload,
            queued,
            ttl,
        } => {
            let body = match payload {
                None => Body::Empty,
                Some(p) => {
                    serde_json::from_str::<Value>(&p).map_err(|e| {
                        Failure::new(
                            format!("--payload is not JSON: {e}"),
                            Some(r#"write --payload '{"delay": 5}' (or '"text"')"#.into()),
                        )
                    })?;
                    Body::Raw("application/json", p.into_bytes())
                }
            };
            let mut q = Vec::new();
            if queued {
                q.push(("mode", "queued".to_string()));
                if let Some(t) = ttl {
                    q.push(("ttl", t.to_string()));
                }
            } else {
                q.push(("mode", "direct".to_string()));
                q.push((
                    "timeout",
                    timeout.unwrap_or(DEFAULT_DIRECT_WAIT).to_string(),
                ));
            }
            let v = c
                .call(
                    Method::POST,
                    &["tenants", tenant, "devices", &device, "commands", &name],
                    &q,
                    body,
                )
                .await?;
            if queued {
                match ctx.output {
                    Output::Json => emit_json(&v)?,
                    Output::Table => {
                        eprintln!(
                            "queued command {name} for device {device}; follow it with: \
                             ferrohub ctl commands get {device} {}",
                            text(&v, "id")
                        );
                        emit(&show_command(&v))?;
                    }
                }
                return Ok(0);
            }
            let status = v.get("status").and_then(Value::as_u64).unwrap_or(0);
            match ctx.output {
                Output::Json => emit_json(&v)?,
                Output::Table => emit(&key_values(&[
                    ("status", text(&v, "status")),
                    ("payload", compact(v.get("payload"))),
                ]))?,
            }
            if (200..300).contains(&status) {
                Ok(0)
            } else {
                eprintln!("error: device {device} answered command {name} with status {status}");
                Ok(1)
            }
        }
        CommandsCmd::List {
            device,
            state,
            limit,
        } => {
            let mut q = vec![("limit", limit.to_string())];
            if let Some(s) = state {
                q.push(("state", s.as_str().to_string()));
            }
            let v = c
                .get(
                    &["tenants", tenant, "devices", &device, "queued-commands"],
                    &q,
                )
                .await?;
            match ctx.output {
                Output::Json => emit_json(&v)?,
                Output::Table => commands_table(&v).emit("no queued commands")?,
            }
            Ok(0)
        }
        CommandsCmd::Get { device, id } => {
            let v = c
                .get(
                    &[
                        "tenants",
                        tenant,
                        "devices",
                        &device,
                        "queued-commands",
                        &id,
                    ],
                    &[],
                )
                .await?;
            match ctx.output {
                Output::Json => emit_json(&v)?,
                Output::Table => emit(&show_command(&v))?,
            }
            Ok(0)
        }
        CommandsCmd::Cancel { device, id } => {
            let v = c
                .call(
                    Method::DELETE,
                    &[
                        "tenants",
                        tenant,
                        "devices",
                        &device,
                        "queued-commands",
                        &id,
                    ],
                    &[],
                    Body::Empty,
                )
                .await?;
            match ctx.output {
                Output::Json => emit_json(&v)?,
                Output::Table => emit(&format!(
                    "cancelled command {id} ({}) of device {device}: {}\n",
                    text(&v, "name"),
                    text(&v, "state")
                ))?,
            }
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn views() {
        let v = json!([{"id": "c1", "deviceId": "d", "name": "reboot", "state": "queued",
            "attempts": 0, "maxAttempts": 5, "createdAt": 1000, "expiresAt": 2000, "actor": "operator:x",
            "payload": {"delay": 5}}]);
        let r = commands_table(&v).render();
        let cells: Vec<&str> = r
            .lines()
            .nth(1)
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        assert_eq!(
            cells,
            vec![
                "c1",
                "reboot",
                "queued",
                "0/5",
                "-",
                "1970-01-01T00:00:01Z",
                "1970-01-01T00:00:02Z"
            ]
        );
        let s = show_command(&v[0]);
        assert!(s.contains(r#"{"delay":5}"#), "{s}");
        assert!(s.contains("0/5"), "{s}");
    }
}
