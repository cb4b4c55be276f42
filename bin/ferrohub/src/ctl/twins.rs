//! `ferrohub ctl twins`: read and patch device twins, their history, fleet queries and grouped
//! counts (`/tenants/{t}/devices/{d}/twins/…`, `/tenants/{t}/twins…`; see `docs/twins.md`).

use std::io::Read;

use anyhow::{Context, Result};
use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use super::Ctx;
use super::client::{Body, Failure};
use super::output::{Output, Table, emit_json, text, time};

#[derive(Subcommand, Debug)]
pub(super) enum TwinsCmd {
    /// Prints a device's twin (JSON): desired, reported, tags, delta, acknowledgements, versions.
    #[command(after_help = "Examples:\n  ferrohub ctl twins get boiler-17\n  \
        ferrohub ctl twins get boiler-17 --name modem | jq .delta")]
    Get {
        /// Device id.
        device: String,
        /// Twin name.
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Changes desired state with a JSON Merge Patch (`null` deletes a key) and prints the twin
    /// after the change. The device receives the new delta at once, or when it next connects.
    #[command(
        after_help = "Examples:\n  ferrohub ctl twins set-desired boiler-17 '{\"rate\": 30, \"mode\": null}'\n  \
        ferrohub ctl twins set-desired boiler-17 '{\"rate\": 30}' --if-match 12   # 409 if it moved on\n  \
        ferrohub ctl twins set-desired boiler-17 - < desired.json"
    )]
    SetDesired(PatchArgs),
    /// Changes the twin's tags (operator-only, never shown to the device) with a JSON Merge Patch
    /// and prints the twin after the change.
    #[command(
        after_help = "Example:\n  ferrohub ctl twins set-tags boiler-17 '{\"site\": \"plant-a\", \"legacy\": null}'"
    )]
    SetTags(PatchArgs),
    /// Lists a twin's accepted changes, oldest first: who, when, which section, the patch.
    #[command(after_help = "Examples:\n  ferrohub ctl twins history boiler-17\n  \
        ferrohub ctl twins history boiler-17 --after 40 --limit 20")]
    History {
        /// Device id.
        device: String,
        /// Twin name.
        #[arg(long, default_value = "default")]
        name: String,
        /// Changes with a version above this (the next page).
        #[arg(long, default_value_t = 0, value_name = "VERSION")]
        after: u64,
        /// Number of changes, 1 to 1000.
        #[arg(long, default_value_t = 100, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
    },
    /// Lists the tenant's twins matching a filter (see docs/twins.md for the language).
    #[command(
        after_help = "Examples:\n  ferrohub ctl twins query --where \"reported.firmware != desired.firmware\"\n  \
        ferrohub ctl twins query --where \"tags.site = 'plant-a' AND reported.health.battery < 20\" --all"
    )]
    Query {
        /// The filter, e.g. "reported.fw != desired.fw AND tags.site = 'plant-a'" (default: all).
        #[arg(long = "where", value_name = "FILTER")]
        filter: Option<String>,
        /// Page size, 1 to 1000 (default 100; 1000 with --all).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: Option<u32>,
        /// Fetch every page (follows the cursors).
        #[arg(long)]
        all: bool,
        /// Start at this page (the cursor printed after the previous one).
        #[arg(long, conflicts_with = "all", value_name = "CURSOR")]
        cursor: Option<String>,
    },
    /// Counts the tenant's twins grouped by a field's value, largest groups first.
    #[command(
        after_help = "Examples:\n  ferrohub ctl twins counts --by reported.health.firmware\n  \
        ferrohub ctl twins counts --by reported.mode --where \"tags.site = 'plant-a'\""
    )]
    Counts {
        /// The field to group by, e.g. reported.firmware, tags.site, name.
        #[arg(long, value_name = "FIELD")]
        by: String,
        /// Only twins matching this filter.
        #[arg(long = "where", value_name = "FILTER")]
        filter: Option<String>,
        /// Most groups shown (largest first).
        #[arg(long, default_value_t = 100, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
    },
}

/// `set-desired` and `set-tags`.
#[derive(clap::Args, Debug)]
pub(super) struct PatchArgs {
    /// Device id.
    device: String,
    /// A JSON Merge Patch (a JSON object; `null` deletes a key), or `-` for standard input.
    #[arg(value_name = "JSON-MERGE-PATCH")]
    patch: String,
    /// Twin name (a named twin is created by its first write).
    #[arg(long, default_value = "default")]
    name: String,
    /// Apply only if the twin is still at this version (its `version`, or ETag like "12");
    /// otherwise fail with 409 version_conflict.
    #[arg(long, value_name = "VERSION", value_parser = parse_version)]
    if_match: Option<u64>,
}

/// `12`, `"12"` or `W/"12"`.
fn parse_version(s: &str) -> Result<u64, String> {
    s.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .map_err(|_| format!("{s:?} is not a twin version (e.g. 12, from `twins get`)"))
}

/// The patch argument as a JSON object (`-`: read from standard input).
fn read_patch(arg: &str) -> Result<Value> {
    let raw = if arg == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the patch from standard input")?;
        s
    } else {
        arg.to_string()
    };
    let v: Value = serde_json::from_str(&raw).map_err(|e| {
        Failure::new(
            format!("the patch is not JSON: {e}"),
            Some(r#"write it like '{"rate": 30, "mode": null}' (null deletes a key)"#.into()),
        )
    })?;
    if !v.is_object() {
        return Err(Failure::new(
            "the patch must be a JSON object ({...})",
            Some(r#"write it like '{"rate": 30, "mode": null}' (null deletes a key)"#.into()),
        )
        .into());
    }
    Ok(v)
}

/// Compact JSON, cut to `max` characters.
fn compact(v: Option<&Value>, max: usize) -> String {
    let s = match v {
        None | Some(Value::Null) => return "-".into(),
        Some(v) => v.to_string(),
    };
    if s.chars().count() > max {
        let cut: String = s.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        s
    }
}

fn count_keys(v: Option<&Value>) -> usize {
    v.and_then(Value::as_object).map_or(0, serde_json::Map::len)
}

/// Prints a twin: always its JSON (in table mode with a one-line summary on stderr).
fn emit_twin(ctx: &Ctx, v: &Value, what: &str) -> Result<()> {
    if ctx.output == Output::Table {
        eprintln!(
            "{what}twin {} of device {} at version {} ({} delta key(s))",
            text(v, "name"),
            text(v, "deviceId"),
            text(v, "version"),
            count_keys(v.get("delta")),
        );
    }
    emit_json(v)
}

pub(super) fn history_table(entries: &Value) -> Table {
    let mut t = Table::new(&["VERSION", "TIME", "ACTOR", "SECTION", "PATCH"]);
    for e in entries.as_array().into_iter().flatten() {
        t.row(vec![
            text(e, "version"),
            time(e, "at"),
            text(e, "actor"),
            text(e, "section"),
            compact(e.get("patch"), 100),
        ]);
    }
    t
}

pub(super) fn query_table(items: &[Value]) -> Table {
    let mut t = Table::new(&[
        "DEVICE", "NAME", "VERSION", "DELTA", "PENDING", "UPDATED", "TAGS",
    ]);
    for x in items {
        let pending = x.get("acks").and_then(Value::as_object).map_or(0, |m| {
            m.values()
                .filter(|a| a.get("status").and_then(Value::as_str) == Some("pending"))
                .count()
        });
        t.row(vec![
            text(x, "deviceId"),
            text(x, "name"),
            text(x, "version"),
            count_keys(x.get("delta")).to_string(),
            pending.to_string(),
            time(x, "updatedAt"),
            compact(x.get("tags").filter(|t| count_keys(Some(t)) > 0), 60),
        ]);
    }
    t
}

pub(super) fn counts_table(groups: &Value) -> Table {
    let mut t = Table::new(&["VALUE", "COUNT"]);
    for g in groups.as_array().into_iter().flatten() {
        let value = match g.get("value") {
            None | Some(Value::Null) => "(none)".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        t.row(vec![value, text(g, "count")]);
    }
    t
}

/// Runs a `twins` command.
pub(super) async fn run(ctx: &Ctx, cmd: TwinsCmd) -> Result<i32> {
    let c = &ctx.client;
    let tenant = ctx.tenant.as_str();
    match cmd {
        TwinsCmd::Get { device, name } => {
            let v = c
                .get(
                    &["tenants", tenant, "devices", &device, "twins", &name],
                    &[],
                )
                .await?;
            emit_twin(ctx, &v, "")?;
        }
        TwinsCmd::SetDesired(a) => patch(ctx, a, "desired").await?,
        TwinsCmd::SetTags(a) => patch(ctx, a, "tags").await?,
        TwinsCmd::History {
            device,
            name,
            after,
            limit,
        } => {
            let q = vec![("after", after.to_string()), ("limit", limit.to_string())];
            let v = c
                .get(
                    &[
                        "tenants", tenant, "devices", &device, "twins", &name, "history",
                    ],
                    &q,
                )
                .await?;
            if ctx.output == Output::Json {
                emit_json(&v)?;
                return Ok(0);
            }
            history_table(&v).emit("no changes recorded")?;
            let entries = v.as_array().map_or(0, Vec::len);
            if let Some(last) = v
                .as_array()
                .filter(|_| entries >= limit as usize)
                .and_then(|a| a.last())
                .and_then(|e| e.get("version"))
                .and_then(Value::as_u64)
            {
                eprintln!("more changes may follow: add --after {last}");
            }
        }
        TwinsCmd::Query {
            filter,
            limit,
            all,
            cursor,
        } => query(ctx, filter, limit, all, cursor).await?,
        TwinsCmd::Counts { by, filter, limit } => {
            let mut q = vec![("by", by), ("limit", limit.to_string())];
            if let Some(f) = filter {
                q.push(("where", f));
            }
            let v = c.get(&["tenants", tenant, "twins", "counts"], &q).await?;
            if ctx.output == Output::Json {
                emit_json(&v)?;
            } else {
                counts_table(&v).emit("no twins match")?;
            }
        }
    }
    Ok(0)
}

async fn patch(ctx: &Ctx, a: PatchArgs, section: &str) -> Result<()> {
    let body = read_patch(&a.patch)?;
    let mut q = Vec::new();
    if let Some(v) = a.if_match {
        q.push(("version", v.to_string()));
    }
    let v = ctx
        .client
        .call(
            Method::PATCH,
            &[
                "tenants",
                &ctx.tenant,
                "devices",
                &a.device,
                "twins",
                &a.name,
                section,
            ],
            &q,
            Body::Json(body),
        )
        .await?;
    emit_twin(ctx, &v, &format!("changed {section}: "))
}

async fn query(
    ctx: &Ctx,
    filter: Option<String>,
    limit: Option<u32>,
    all: bool,
    cursor: Option<String>,
) -> Result<()> {
    let mut base: Vec<(&str, String)> = Vec::new();
    if let Some(f) = filter {
        base.push(("where", f));
    }
    let limit = limit.unwrap_or(if all { 1000 } else { 100 });
    base.push(("limit", limit.to_string()));
    let path = ["tenants", ctx.tenant.as_str(), "twins"];
    let (items, next) = ctx
        .client
        .get_pages(&path, &base, cursor, all, "next")
        .await?;
    if ctx.output == Output::Json {
        return emit_json(&json!({ "items": items, "next": next }));
    }
    query_table(&items).emit("no twins match")?;
    if let Some(n) = next {
        eprintln!("more twins: add --all, or --cursor {n} for the next page");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_patches() {
        assert_eq!(parse_version("12"), Ok(12));
        assert_eq!(parse_version("\"12\""), Ok(12));
        assert_eq!(parse_version("W/\"7\""), Ok(7));
        assert!(parse_version("latest").is_err());
        assert!(read_patch(r#"{"rate": 30, "mode": null}"#).is_ok());
        assert!(read_patch("[1]").is_err());
        assert!(read_patch("{rate: 1}").is_err());
    }

    #[test]
    fn tables() {
        let h = json!([{"version": 3, "at": 1000, "actor": "operator:admin", "section": "desired",
                        "patch": {"rate": 30}}]);
        let r = history_table(&h).render();
        assert!(r.starts_with("VERSION  TIME"), "{r}");
        assert!(r.contains(r#"{"rate":30}"#), "{r}");
        let items = vec![json!({"deviceId": "d1", "name": "default", "version": 4,
            "delta": {"a": 1, "b": 2}, "acks": {"a": {"status": "pending"}, "c": {"status": "applied"}},
            "tags": {}, "updatedAt": 1000})];
        let r = query_table(&items).render();
        let cells: Vec<&str> = r
            .lines()
            .nth(1)
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        assert_eq!(
            cells,
            vec!["d1", "default", "4", "2", "1", "1970-01-01T00:00:01Z", "-"]
        );
        let r = counts_table(&json!([{"value": "1.4.2", "count": 4}, {"value": null, "count": 1}]))
            .render();
        assert!(r.contains("1.4.2   4"), "{r}");
        assert!(r.contains("(none)  1"), "{r}");
    }
}
