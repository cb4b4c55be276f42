//! `ferrohub ctl rules`: rules running in the hub (`/tenants/{t}/rules…`; see `docs/rules.md`).

use anyhow::Result;
use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use super::Ctx;
use super::client::{Body, Failure};
use super::output::{Output, Table, emit, emit_json, key_values, text};

#[derive(Subcommand, Debug)]
pub(super) enum RulesCmd {
    /// Lists the tenant's rules.
    List,
    /// Prints a rule (JSON): SQL, actions, version, enabled.
    Get {
        /// Rule id.
        id: String,
    },
    /// Creates a rule. A rule that does not compile fails with its line and column.
    #[command(after_help = "Examples:\n  \
        ferrohub ctl rules create hot --sql \"SELECT temp FROM 'devices/+/telemetry' WHERE temp > 30\" \\\n    \
        --action 'republish=alerts/${topic(2)}'\n  \
        ferrohub ctl rules create hook --sql \"SELECT * FROM 'jobs/#'\" \\\n    \
        --action '{\"type\": \"webhook\", \"url\": \"https://example.com/in\", \"max_attempts\": 5}' \\\n    \
        --error-action 'republish=rule-errors/${rule}'")]
    Create {
        /// Rule id (letters, digits, `_`, `-`, `.`).
        id: String,
        #[command(flatten)]
        spec: SpecArgs,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// Changes a rule's SQL and/or actions (a new version; what is not given is kept).
    Update {
        /// Rule id.
        id: String,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Starts a rule.
    Enable {
        /// Rule id.
        id: String,
    },
    /// Stops a rule.
    Disable {
        /// Rule id.
        id: String,
    },
    /// Deletes a rule with its stats and dead letters.
    Delete {
        /// Rule id.
        id: String,
    },
    /// Evaluates a stored rule (ID) or unsaved SQL (--sql) against a sample message.
    #[command(after_help = "Examples:\n  \
        ferrohub ctl rules dry-run hot --topic devices/d1/telemetry --payload '{\"temp\": 31}'\n  \
        ferrohub ctl rules dry-run --sql \"SELECT temp * 2 AS t FROM 'a/#'\" --topic a/b --payload '{\"temp\": 2}'")]
    DryRun {
        /// Rule id (or --sql).
        #[arg(required_unless_present = "sql", conflicts_with = "sql")]
        id: Option<String>,
        /// Unsaved SQL.
        #[arg(long)]
        sql: Option<String>,
        /// Topic of the sample message.
        #[arg(long)]
        topic: String,
        /// Payload of the sample message (JSON).
        #[arg(long, default_value = "{}")]
        payload: String,
        /// Client id of the sample message.
        #[arg(long)]
        client_id: Option<String>,
    },
    /// A rule's counters: matched, passed, failed, latency, per action successes, errors,
    /// retries, dead letters.
    Stats {
        /// Rule id.
        id: String,
    },
    /// Messages a rule's actions gave up on, oldest first.
    DeadLetters {
        /// Rule id.
        id: String,
    },
    /// Runs a stored rule (enabled or not) over stored telemetry, in time order with fresh
    /// state; no action runs. Prints the counts and the first outputs with what each action
    /// would have done.
    #[command(after_help = "Example:\n  \
        ferrohub ctl rules replay overheat --from 24h --device boiler-1 --device boiler-2")]
    Replay {
        /// Rule id.
        id: String,
        /// From: RFC 3339, a duration ago (15m, 1h, 7d) or Unix ms.
        #[arg(long, value_parser = replay_time, allow_hyphen_values = true)]
        from: i64,
        /// Until (exclusive; same forms) [default: now].
        #[arg(long, value_parser = replay_time, allow_hyphen_values = true)]
        to: Option<i64>,
        /// Only this device (repeatable).
        #[arg(long = "device")]
        devices: Vec<String>,
        /// Topic of the rebuilt messages (`{device}` is replaced) [default:
        /// devices/{device}/telemetry].
        #[arg(long)]
        topic: Option<String>,
        /// Outputs to print (1..=1000).
        #[arg(long, default_value_t = 20)]
        max_outputs: usize,
        /// Messages to evaluate at most (1..=1000000).
        #[arg(long, default_value_t = 100_000)]
        max_messages: usize,
    },
}

/// Unix ms from `now`, milliseconds, RFC 3339 or a duration ago.
fn replay_time(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if s == "now" {
        return super::parse_time("0s");
    }
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    super::parse_time(s.strip_prefix('-').unwrap_or(s))
}

/// The SQL and actions of `create` and `update`.
#[derive(clap::Args, Debug)]
pub(super) struct SpecArgs {
    /// The rule's SQL.
    #[arg(long)]
    sql: Option<String>,
    /// An action: JSON (`{"type": "webhook", "url": …}`), `republish=TOPIC` or `webhook=URL`;
    /// repeat for several. On update, replaces all actions.
    #[arg(long = "action", value_name = "ACTION")]
    actions: Vec<String>,
    /// The error action (same forms as --action).
    #[arg(long, value_name = "ACTION")]
    error_action: Option<String>,
    /// Description.
    #[arg(long)]
    description: Option<String>,
}

fn parse_action(s: &str) -> Result<Value> {
    let s = s.trim();
    if s.starts_with('{') {
        return serde_json::from_str(s).map_err(|e| {
            Failure::new(
                format!("the action is not JSON: {e}"),
                Some(r#"e.g. '{"type": "republish", "topic": "out/${topic(2)}"}'"#.into()),
            )
            .into()
        });
    }
    match s.split_once('=') {
        Some(("republish", topic)) => Ok(json!({"type": "republish", "topic": topic})),
        Some(("webhook", url)) => Ok(json!({"type": "webhook", "url": url})),
        _ => Err(Failure::new(
            format!("cannot read the action {s:?}"),
            Some("write republish=TOPIC, webhook=URL or the action as JSON".into()),
        )
        .into()),
    }
}

fn sample(topic: String, payload: &str, client_id: Option<String>) -> Result<Value> {
    let payload: Value = serde_json::from_str(payload).map_err(|e| {
        Failure::new(
            format!("--payload is not JSON: {e}"),
            Some(r#"e.g. --payload '{"temp": 31}'"#.into()),
        )
    })?;
    Ok(json!({"topic": topic, "payload": payload, "client_id": client_id}))
}

/// Runs a `rules` command.
pub(super) async fn run(ctx: &Ctx, cmd: RulesCmd) -> Result<i32> {
    let c = &ctx.client;
    let t = ctx.tenant.as_str();
    match cmd {
        RulesCmd::List => {
            let v = c.get(&["tenants", t, "rules"], &[]).await?;
            if ctx.output == Output::Json {
                return emit_json(&v).map(|()| 0);
            }
            let mut table = Table::new(&["ID", "VERSION", "ENABLED", "ACTIONS", "SQL"]);
            for r in v.as_array().into_iter().flatten() {
                table.row(vec![
                    text(r, "id"),
                    text(r, "version"),
                    text(r, "enabled"),
                    r.get("actions")
                        .and_then(Value::as_array)
                        .map_or(0, Vec::len)
                        .to_string(),
                    text(r, "sql").replace('\n', " "),
                ]);
            }
            table.emit("no rules")?;
        }
        RulesCmd::Get { id } => emit_json(&c.get(&["tenants", t, "rules", &id], &[]).await?)?,
        RulesCmd::Create { id, spec, disabled } => {
            let Some(sql) = spec.sql else {
                return Err(Failure::new("--sql is required to create a rule", None).into());
            };
            let actions = spec
                .actions
                .iter()
                .map(|a| parse_action(a))
                .collect::<Result<Vec<_>>>()?;
            let mut body = json!({"id": id, "sql": sql, "actions": actions, "enabled": !disabled,
                                  "description": spec.description.unwrap_or_default()});
            if let Some(ea) = spec.error_action {
                body["error_action"] = parse_action(&ea)?;
            }
            let v = c
                .call(
                    Method::POST,
                    &["tenants", t, "rules"],
                    &[],
                    Body::Json(body),
                )
                .await?;
            emit_json(&v)?;
        }
        RulesCmd::Update { id, spec } => {
            let cur = c.get(&["tenants", t, "rules", &id], &[]).await?;
            let mut body = json!({
                "sql": spec.sql.map(Value::String).unwrap_or_else(|| cur["sql"].clone()),
                "description": spec.description.map(Value::String)
                    .unwrap_or_else(|| cur.get("description").cloned().unwrap_or(json!(""))),
                "actions": if spec.actions.is_empty() { cur["actions"].clone() } else {
                    Value::Array(spec.actions.iter().map(|a| parse_action(a)).collect::<Result<_>>()?)
                },
            });
            match spec.error_action {
                Some(ea) => body["error_action"] = parse_action(&ea)?,
                None => {
                    if let Some(ea) = cur.get("error_action").filter(|v| !v.is_null()) {
                        body["error_action"] = ea.clone();
                    }
                }
            }
            let v = c
                .call(
                    Method::PUT,
                    &["tenants", t, "rules", &id],
                    &[],
                    Body::Json(body),
                )
                .await?;
            emit_json(&v)?;
        }
        RulesCmd::Enable { id } => {
            let v = c
                .call(
                    Method::POST,
                    &["tenants", t, "rules", &id, "enable"],
                    &[],
                    Body::Empty,
                )
                .await?;
            emit_json(&v)?;
        }
        RulesCmd::Disable { id } => {
            let v = c
                .call(
                    Method::POST,
                    &["tenants", t, "rules", &id, "disable"],
                    &[],
                    Body::Empty,
                )
                .await?;
            emit_json(&v)?;
        }
        RulesCmd::Delete { id } => {
            c.call(
                Method::DELETE,
                &["tenants", t, "rules", &id],
                &[],
                Body::Empty,
            )
            .await?;
            eprintln!("deleted rule {id}");
        }
        RulesCmd::DryRun {
            id,
            sql,
            topic,
            payload,
            client_id,
        } => {
            let sample = sample(topic, &payload, client_id)?;
            let v = match (id, sql) {
                (Some(id), _) => {
                    c.call(
                        Method::POST,
                        &["tenants", t, "rules", &id, "dry-run"],
                        &[],
                        Body::Json(sample),
                    )
                    .await?
                }
                (None, Some(sql)) => {
                    c.call(
                        Method::POST,
                        &["tenants", t, "rules:dry-run"],
                        &[],
                        Body::Json(json!({"sql": sql, "sample": sample})),
                    )
                    .await?
                }
                (None, None) => {
                    return Err(Failure::new("give a rule id or --sql", None).into());
                }
            };
            emit_json(&v)?;
        }
        RulesCmd::Replay {
            id,
            from,
            to,
            devices,
            topic,
            max_outputs,
            max_messages,
        } => {
            let mut body = json!({
                "from": from,
                "to": match to { Some(t) => t, None => replay_time("now").map_err(|e| Failure::new(e, None))? },
                "max_outputs": max_outputs,
                "max_messages": max_messages,
            });
            if !devices.is_empty() {
                body["devices"] = json!(devices);
            }
            if let Some(topic) = topic {
                body["topic"] = json!(topic);
            }
            let v = c
                .call(
                    Method::POST,
                    &["tenants", t, "rules", &id, "replay"],
                    &[],
                    Body::Json(body),
                )
                .await?;
            if ctx.output == Output::Json {
                return emit_json(&v).map(|()| 0);
            }
            let mut items = vec![
                ("messages", text(&v, "messages")),
                ("matched", text(&v, "matched")),
                ("outputs", text(&v, "outputs_total")),
                ("failed", text(&v, "failed")),
            ];
            if v["truncated"] == true {
                items.push((
                    "truncated",
                    format!("yes: more than {max_messages} messages in the range; narrow it or raise --max-messages"),
                ));
            }
            emit(&key_values(&items))?;
            let mut table = Table::new(&["TIME", "DEVICE", "OUTPUT"]);
            for o in v["outputs"].as_array().into_iter().flatten() {
                table.row(vec![
                    text(o, "timestamp_ms"),
                    text(o, "device"),
                    o["output"].to_string(),
                ]);
            }
            table.emit("no outputs")?;
            for e in v["errors"].as_array().into_iter().flatten() {
                eprintln!("error: {}", e.as_str().unwrap_or_default());
            }
        }
        RulesCmd::Stats { id } => {
            let v = c.get(&["tenants", t, "rules", &id, "stats"], &[]).await?;
            if ctx.output == Output::Json {
                return emit_json(&v).map(|()| 0);
            }
            let mut items = vec![
                ("matched", text(&v, "matched")),
                ("passed", text(&v, "passed")),
                ("failed", text(&v, "failed")),
                ("dropped (queue full)", text(&v, "dropped_queue_full")),
                ("latency p50 µs", text(&v, "latency_p50_us")),
                ("latency p99 µs", text(&v, "latency_p99_us")),
                ("error actions", text(&v, "error_actions")),
                ("dead letters held", text(&v, "dead_letters_held")),
            ];
            let actions: Vec<String> = v["actions"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
                .map(|(i, a)| {
                    format!(
                        "#{i} {}: {} ok, {} errors, {} retries, {} dead, {} queued",
                        text(a, "kind"),
                        text(a, "successes"),
                        text(a, "errors"),
                        text(a, "retries"),
                        text(a, "dead_letters"),
                        text(a, "queued")
                    )
                })
                .collect();
            for a in &actions {
                items.push(("action", a.clone()));
            }
            emit(&key_values(&items))?;
        }
        RulesCmd::DeadLetters { id } => {
            let v = c
                .get(&["tenants", t, "rules", &id, "dead-letters"], &[])
                .await?;
            emit_json(&v)?;
        }
    }
    Ok(0)
}
