//! `ferrohub ctl alarms`: alarms and their notification channels (`/tenants/{t}/alarms…` and
//! `/tenants/{t}/alarm-channels…`; see `docs/alarms.md`).

use anyhow::Result;
use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use super::Ctx;
use super::client::{Body, Failure};
use super::output::{Output, Table, ago, emit, emit_json, key_values, text, time};

#[derive(Subcommand, Debug)]
pub(super) enum AlarmsCmd {
    /// Lists alarms, newest first.
    #[command(after_help = "Examples:\n  \
        ferrohub ctl alarms list --state open --severity critical\n  \
        ferrohub ctl alarms list --device boiler-17 --since -24h --all")]
    List {
        /// `active`, `acknowledged`, `cleared` or `open` (active or acknowledged).
        #[arg(long)]
        state: Option<String>,
        /// `critical`, `major`, `minor`, `warning` or `info`.
        #[arg(long)]
        severity: Option<String>,
        /// Device id.
        #[arg(long)]
        device: Option<String>,
        /// Dedup key.
        #[arg(long)]
        key: Option<String>,
        /// Created at or after: RFC 3339, ms since the epoch, or a time ago (`-1h`).
        #[arg(long, allow_hyphen_values = true)]
        since: Option<String>,
        /// Created before (same forms as --since).
        #[arg(long, allow_hyphen_values = true)]
        until: Option<String>,
        /// Page size (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Start at this cursor (printed after a page).
        #[arg(long)]
        cursor: Option<String>,
        /// Follow the cursor to the last page.
        #[arg(long)]
        all: bool,
    },
    /// Prints an alarm (JSON).
    Get {
        /// Alarm id.
        id: String,
    },
    /// Raises an alarm; one with the key of an open alarm folds into it (count + 1).
    #[command(after_help = "Example:\n  \
        ferrohub ctl alarms raise overheat:boiler-17 --severity critical --device boiler-17 \\\n    \
        --message 'boiler above 95 °C' --details '{\"temp\": 97.5}'")]
    Raise {
        /// Dedup key, e.g. `overheat:boiler-17`.
        key: String,
        /// `critical`, `major`, `minor`, `warning` or `info`.
        #[arg(long)]
        severity: String,
        /// The device concerned.
        #[arg(long)]
        device: Option<String>,
        /// What happened.
        #[arg(long, default_value = "")]
        message: String,
        /// Free details (a JSON document).
        #[arg(long)]
        details: Option<String>,
    },
    /// Acknowledges an active alarm.
    Ack {
        /// Alarm id.
        id: String,
        /// A note for the history.
        #[arg(long)]
        note: Option<String>,
    },
    /// Clears an alarm.
    Clear {
        /// Alarm id.
        id: String,
        /// A note for the history.
        #[arg(long)]
        note: Option<String>,
    },
    /// An alarm's history, oldest first.
    History {
        /// Alarm id.
        id: String,
    },
    /// Open alarms by severity.
    Counts,
    /// Notification channels.
    #[command(subcommand)]
    Channels(ChannelsCmd),
}

#[derive(Subcommand, Debug)]
pub(super) enum ChannelsCmd {
    /// Lists the channels (admin).
    List,
    /// Prints a channel (JSON, admin).
    Get {
        /// Channel id.
        id: String,
    },
    /// Creates or replaces a webhook channel (admin). A template that does not parse fails
    /// with its line.
    #[command(after_help = "Example:\n  \
        ferrohub ctl alarms channels put ops --webhook-url https://hooks.example.com/T000/B000 \\\n    \
        --body '{\"text\": {{ (alarm.severity | upper ~ \": \" ~ alarm.message) | tojson }}}' \\\n    \
        --min-severity major --rate-limit 300")]
    Put {
        /// Channel id (letters, digits, `_`, `-`, `.`).
        id: String,
        /// The webhook's URL (a template). Not `--url`: that is the hub's address.
        #[arg(long, value_name = "URL")]
        webhook_url: String,
        /// HTTP method.
        #[arg(long, default_value = "POST")]
        method: String,
        /// A header `NAME=VALUE` (the value is a template); repeat for several.
        #[arg(long = "header", value_name = "NAME=VALUE")]
        headers: Vec<String>,
        /// Body template (default: the alarm and the event as JSON).
        #[arg(long)]
        body: Option<String>,
        /// Only alarms at least this severe.
        #[arg(long, default_value = "info")]
        min_severity: String,
        /// Events to notify, comma-separated (raised,updated,acknowledged,cleared).
        #[arg(long, value_delimiter = ',')]
        events: Vec<String>,
        /// At most one raised/updated notification per alarm in this many seconds (0: no limit).
        #[arg(long, default_value_t = 0)]
        rate_limit: u64,
        /// Attempts before a delivery is recorded as failed (1 to 10).
        #[arg(long, default_value_t = 5)]
        max_attempts: u32,
        /// Per-attempt timeout in ms.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Save it disabled.
        #[arg(long)]
        disabled: bool,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Deletes a channel (admin).
    Delete {
        /// Channel id.
        id: String,
    },
    /// Sends a sample notification through a channel now and prints the outcome (admin).
    Test {
        /// Channel id.
        id: String,
    },
    /// A channel's counters and last deliveries, newest first.
    Deliveries {
        /// Channel id.
        id: String,
    },
}

fn note_body(note: Option<String>) -> Body {
    match note {
        Some(n) => Body::Json(json!({"note": n})),
        None => Body::Empty,
    }
}

fn alarm_line(a: &Value) -> String {
    format!(
        "{} {} {} ({}, count {})",
        text(a, "id"),
        text(a, "state"),
        text(a, "key"),
        text(a, "severity"),
        text(a, "count")
    )
}

/// Runs an `alarms` command.
pub(super) async fn run(ctx: &Ctx, cmd: AlarmsCmd) -> Result<i32> {
    let c = &ctx.client;
    let t = ctx.tenant.as_str();
    match cmd {
        AlarmsCmd::List {
            state,
            severity,
            device,
            key,
            since,
            until,
            limit,
            cursor,
            all,
        } => {
            let mut q = vec![("limit", limit.to_string())];
            for (name, v) in [
                ("state", state),
                ("severity", severity),
                ("device", device),
                ("key", key),
                ("since", since),
                ("until", until),
            ] {
                if let Some(v) = v {
                    q.push((name, v));
                }
            }
            let (items, next) = c
                .get_pages(&["tenants", t, "alarms"], &q, cursor, all, "next_cursor")
                .await?;
            if ctx.output == Output::Json {
                return emit_json(&json!({"items": items, "next_cursor": next})).map(|()| 0);
            }
            let mut table = Table::new(&[
                "ID", "SEVERITY", "STATE", "KEY", "DEVICE", "COUNT", "RAISED", "MESSAGE",
            ]);
            for a in &items {
                table.row(vec![
                    text(a, "id"),
                    text(a, "severity"),
                    text(a, "state"),
                    text(a, "key"),
                    text(a, "device"),
                    text(a, "count"),
                    ago(a.get("last_raised_ms")),
                    text(a, "message"),
                ]);
            }
            table.emit("no alarms")?;
            if let Some(n) = next {
                eprintln!("more: --cursor {n}");
            }
        }
        AlarmsCmd::Get { id } => emit_json(&c.get(&["tenants", t, "alarms", &id], &[]).await?)?,
        AlarmsCmd::Raise {
            key,
            severity,
            device,
            message,
            details,
        } => {
            let details: Value = match details {
                Some(d) => serde_json::from_str(&d).map_err(|e| {
                    Failure::new(
                        format!("--details is not JSON: {e}"),
                        Some(r#"e.g. --details '{"temp": 97.5}'"#.into()),
                    )
                })?,
                None => Value::Null,
            };
            let v = c
                .call(
                    Method::POST,
                    &["tenants", t, "alarms"],
                    &[],
                    Body::Json(json!({"key": key, "severity": severity, "device": device,
                                      "message": message, "details": details})),
                )
                .await?;
            match ctx.output {
                Output::Json => emit_json(&v)?,
                _ => emit(&format!("{}\n", alarm_line(&v)))?,
            }
        }
        AlarmsCmd::Ack { id, note } => {
            let v = c
                .call(
                    Method::POST,
                    &["tenants", t, "alarms", &id, "acknowledge"],
                    &[],
                    note_body(note),
                )
                .await?;
            match ctx.output {
                Output::Json => emit_json(&v)?,
                _ => emit(&format!("{}\n", alarm_line(&v)))?,
            }
        }
        AlarmsCmd::Clear { id, note } => {
            let v = c
                .call(
                    Method::POST,
                    &["tenants", t, "alarms", &id, "clear"],
                    &[],
                    note_body(note),
                )
                .await?;
            match ctx.output {
                Output::Json => emit_json(&v)?,
                _ => emit(&format!("{}\n", alarm_line(&v)))?,
            }
        }
        AlarmsCmd::History { id } => {
            let v = c
                .get(&["tenants", t, "alarms", &id, "history"], &[])
                .await?;
            if ctx.output == Output::Json {
                return emit_json(&v).map(|()| 0);
            }
            let mut table = Table::new(&["SEQ", "AT", "EVENT", "BY", "SEVERITY", "COUNT", "NOTE"]);
            for e in v.as_array().into_iter().flatten() {
                table.row(vec![
                    text(e, "seq"),
                    time(e, "at_ms"),
                    text(e, "kind"),
                    text(e, "by"),
                    text(&e["alarm"], "severity"),
                    text(&e["alarm"], "count"),
                    text(e, "note"),
                ]);
            }
            table.emit("no history")?;
        }
        AlarmsCmd::Counts => {
            let v = c.get(&["tenants", t, "alarms", "counts"], &[]).await?;
            if ctx.output == Output::Json {
                return emit_json(&v).map(|()| 0);
            }
            let items: Vec<(&str, String)> = [
                "critical",
                "major",
                "minor",
                "warning",
                "info",
                "total",
                "unacknowledged",
            ]
            .into_iter()
            .map(|k| (k, text(&v, k)))
            .collect();
            emit(&key_values(&items))?;
        }
        AlarmsCmd::Channels(cmd) => return channels(ctx, cmd).await,
    }
    Ok(0)
}

async fn channels(ctx: &Ctx, cmd: ChannelsCmd) -> Result<i32> {
    let c = &ctx.client;
    let t = ctx.tenant.as_str();
    match cmd {
        ChannelsCmd::List => {
            let v = c.get(&["tenants", t, "alarm-channels"], &[]).await?;
            if ctx.output == Output::Json {
                return emit_json(&v).map(|()| 0);
            }
            let mut table = Table::new(&[
                "ID",
                "ENABLED",
                "MIN SEVERITY",
                "EVENTS",
                "RATE LIMIT S",
                "URL",
            ]);
            for ch in v.as_array().into_iter().flatten() {
                table.row(vec![
                    text(ch, "id"),
                    text(ch, "enabled"),
                    text(ch, "min_severity"),
                    ch.get("events")
                        .and_then(Value::as_array)
                        .map(|e| {
                            e.iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default(),
                    text(ch, "rate_limit_s"),
                    text(&ch["kind"]["webhook"], "url"),
                ]);
            }
            table.emit("no alarm channels")?;
        }
        ChannelsCmd::Get { id } => {
            emit_json(&c.get(&["tenants", t, "alarm-channels", &id], &[]).await?)?
        }
        ChannelsCmd::Put {
            id,
            webhook_url,
            method,
            headers,
            body,
            min_severity,
            events,
            rate_limit,
            max_attempts,
            timeout_ms,
            disabled,
            description,
        } => {
            let mut h = serde_json::Map::new();
            for header in &headers {
                let Some((k, v)) = header.split_once('=') else {
                    return Err(Failure::new(
                        format!("--header {header:?} is not NAME=VALUE"),
                        Some("e.g. --header 'Authorization=Bearer xyz'".into()),
                    )
                    .into());
                };
                h.insert(k.trim().to_string(), Value::String(v.to_string()));
            }
            let mut spec = json!({
                "kind": {"webhook": {"url": webhook_url, "method": method, "headers": h, "body": body,
                                     "max_attempts": max_attempts, "timeout_ms": timeout_ms}},
                "min_severity": min_severity,
                "rate_limit_s": rate_limit,
                "enabled": !disabled,
                "description": description,
            });
            if !events.is_empty() {
                spec["events"] = json!(events);
            }
            let v = c
                .call(
                    Method::PUT,
                    &["tenants", t, "alarm-channels", &id],
                    &[],
                    Body::Json(spec),
                )
                .await?;
            emit_json(&v)?;
        }
        ChannelsCmd::Delete { id } => {
            c.call(
                Method::DELETE,
                &["tenants", t, "alarm-channels", &id],
                &[],
                Body::Empty,
            )
            .await?;
            eprintln!("deleted alarm channel {id}");
        }
        ChannelsCmd::Test { id } => {
            let v = c
                .call(
                    Method::POST,
                    &["tenants", t, "alarm-channels", &id, "test"],
                    &[],
                    Body::Empty,
                )
                .await?;
            emit_json(&v)?;
            if v["status"] != "sent" {
                return Ok(1);
            }
        }
        ChannelsCmd::Deliveries { id } => {
            let v = c
                .get(&["tenants", t, "alarm-channels", &id, "deliveries"], &[])
                .await?;
            if ctx.output == Output::Json {
                return emit_json(&v).map(|()| 0);
            }
            eprintln!(
                "sent {}, failed {}, suppressed {}, dropped {}",
                text(&v, "sent"),
                text(&v, "failed"),
                text(&v, "suppressed"),
                text(&v, "dropped")
            );
            let mut table = Table::new(&[
                "AT", "ALARM", "EVENT", "STATUS", "ATTEMPTS", "HTTP", "ERROR",
            ]);
            for d in v["deliveries"].as_array().into_iter().flatten() {
                table.row(vec![
                    time(d, "at_ms"),
                    text(d, "alarm_id"),
                    text(d, "event"),
                    text(d, "status"),
                    text(d, "attempts"),
                    text(d, "http_status"),
                    text(d, "error"),
                ]);
            }
            table.emit("no deliveries")?;
        }
    }
    Ok(0)
}
