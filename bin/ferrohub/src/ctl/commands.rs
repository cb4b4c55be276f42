//! The commands: each is one or a few API calls, printed as a table or as the API's JSON.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use reqwest::Method;
use serde_json::{Map, Value, json};

use super::client::{Body, Failure};
use super::output::{Output, Table, ago, emit, emit_json, key_values, list, pairs, text, time};
use super::{
    AuditArgs, AuditResult, CredentialsCmd, CtlCommand, Ctx, DeviceFilter, DevicesCmd, DevicesList,
    GroupsCmd, PoliciesCmd, Status, TenantsCmd, TokensCmd,
};

/// Runs a command; returns the exit status.
pub(crate) async fn dispatch(ctx: &Ctx, command: CtlCommand) -> Result<i32> {
    match command {
        CtlCommand::Tenants(c) => tenants(ctx, c).await?,
        CtlCommand::Devices(DevicesCmd::Import {
            file,
            format,
            chunk_size,
        }) => {
            let size = usize::try_from(chunk_size).unwrap_or(5000);
            return super::import::run(ctx, &file, format, size).await;
        }
        CtlCommand::Devices(c) => devices(ctx, c).await?,
        CtlCommand::Credentials(c) => credentials(ctx, c).await?,
        CtlCommand::Groups(c) => groups(ctx, c).await?,
        CtlCommand::Policies(c) => policies(ctx, c).await?,
        CtlCommand::Tokens(c) => tokens(ctx, c).await?,
        CtlCommand::Audit(a) => audit(ctx, a).await?,
        CtlCommand::Twins(c) => return super::twins::run(ctx, c).await,
        CtlCommand::Commands(c) => return super::device_commands::run(ctx, c).await,
        CtlCommand::Telemetry(c) => return super::telemetry::run(ctx, *c).await,
        CtlCommand::Rules(c) => return super::rules::run(ctx, c).await,
        CtlCommand::Alarms(c) => return super::alarms::run(ctx, c).await,
    }
    Ok(0)
}

/// In JSON mode prints `v`; otherwise prints `line` (a confirmation) and a newline.
fn done(ctx: &Ctx, v: &Value, line: impl FnOnce() -> String) -> Result<()> {
    match ctx.output {
        Output::Json => emit_json(v),
        Output::Table => emit(&format!("{}\n", line())),
    }
}

fn items(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

// ---- tenants -------------------------------------------------------------------------------

async fn tenants(ctx: &Ctx, cmd: TenantsCmd) -> Result<()> {
    let c = &ctx.client;
    match cmd {
        TenantsCmd::List => {
            let v = c.get(&["tenants"], &[]).await?;
            if ctx.output == Output::Json {
                return emit_json(&v);
            }
            let mut t = Table::new(&["ID", "NAME", "MAX CONNECTIONS", "CREATED"]);
            for x in items(&v) {
                let max = x
                    .pointer("/settings/quotas/max_connections")
                    .and_then(Value::as_u64)
                    .map_or_else(
                        || "-".into(),
                        |n| {
                            if n == 0 {
                                "unlimited".into()
                            } else {
                                n.to_string()
                            }
                        },
                    );
                t.row(vec![
                    text(x, "id"),
                    text(x, "name"),
                    max,
                    time(x, "created_at"),
                ]);
            }
            t.emit("no tenants")
        }
        TenantsCmd::Create { id, name } => {
            let mut body = json!({ "id": id });
            if let Some(n) = name {
                body["name"] = n.into();
            }
            let v = c
                .call(Method::POST, &["tenants"], &[], Body::Json(body))
                .await?;
            done(ctx, &v, || {
                format!("created tenant {} ({})", text(&v, "id"), text(&v, "name"))
            })
        }
        TenantsCmd::Show { id } => {
            let v = c.get(&["tenants", &id], &[]).await?;
            if ctx.output == Output::Json {
                return emit_json(&v);
            }
            let q = v
                .pointer("/settings/quotas")
                .cloned()
                .unwrap_or(Value::Null);
            let limit = |k: &str| match q.get(k).and_then(Value::as_u64) {
                Some(0) => "unlimited".to_string(),
                Some(n) => n.to_string(),
                None => "-".into(),
            };
            let settings = v.get("settings").cloned().unwrap_or(Value::Null);
            emit(&key_values(&[
                ("id", text(&v, "id")),
                ("name", text(&v, "name")),
                ("created", time(&v, "created_at")),
                ("max connections", limit("max_connections")),
                ("tenant messages/s", limit("tenant_messages_per_sec")),
                ("tenant bytes/s", limit("tenant_bytes_per_sec")),
                ("device messages/s", limit("device_messages_per_sec")),
                ("device bytes/s", limit("device_bytes_per_sec")),
                ("certificate identity", text(&settings, "cert_identity")),
                (
                    "telemetry on decommission",
                    text(&settings, "telemetry_on_decommission"),
                ),
            ]))
        }
        TenantsCmd::Delete { id } => {
            c.call(Method::DELETE, &["tenants", &id], &[], Body::Empty)
                .await?;
            done(ctx, &json!({ "deleted": id }), || {
                format!("deleted tenant {id} with its devices, credentials and tokens")
            })
        }
    }
}

// ---- devices -------------------------------------------------------------------------------

fn device_row(d: &Value) -> Vec<String> {
    let online = match d.pointer("/connectivity/online").and_then(Value::as_bool) {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    };
    vec![
        text(d, "id"),
        text(d, "name"),
        text(d, "type"),
        text(d, "status"),
        online.into(),
        ago(d.pointer("/connectivity/last_seen")),
        pairs(d.get("tags")),
    ]
}

fn filter_query(q: &mut Vec<(&'static str, String)>, f: &DeviceFilter) {
    for (k, v) in &f.tags {
        q.push(("tag", format!("{k}:{v}")));
    }
    if let Some(t) = &f.device_type {
        q.push(("type", t.clone()));
    }
    if let Some(s) = f.status {
        q.push(("status", s.as_str().into()));
    }
    if let Some(p) = &f.name_prefix {
        q.push(("name_prefix", p.clone()));
    }
    if let Some(o) = f.online() {
        q.push(("online", o.to_string()));
    }
}

async fn list_devices(ctx: &Ctx, a: DevicesList) -> Result<()> {
    let mut q: Vec<(&'static str, String)> = Vec::new();
    filter_query(&mut q, &a.filter);
    if let Some(g) = &a.group {
        q.push(("group", g.clone()));
    }
    q.push(("sort", a.sort.as_str().into()));
    q.push(("order", if a.desc { "desc" } else { "asc" }.into()));
    let limit = a.limit.unwrap_or(if a.all { 1000 } else { 100 });
    q.push(("limit", limit.to_string()));
    let path = ["tenants", ctx.tenant.as_str(), "devices"];
    let (all, next) = ctx
        .client
        .get_pages(&path, &q, a.cursor.clone(), a.all, "next_cursor")
        .await?;
    if ctx.output == Output::Json {
        return emit_json(&json!({ "items": all, "next_cursor": next }));
    }
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "TYPE",
        "STATUS",
        "ONLINE",
        "LAST SEEN",
        "TAGS",
    ]);
    for d in &all {
        t.row(device_row(d));
    }
    t.emit("no devices match")?;
    if let Some(n) = next {
        eprintln!("more devices: add --all, or --cursor {n} for the next page");
    }
    Ok(())
}

fn show_device(d: &Value) -> String {
    let conn = d.get("connectivity").cloned().unwrap_or(Value::Null);
    let online = match conn.get("online").and_then(Value::as_bool) {
        Some(true) => "yes".to_string(),
        Some(false) => "no".to_string(),
        None => "-".to_string(),
    };
    let last_seen = if conn.get("last_seen").is_some_and(Value::is_i64) {
        format!(
            "{} ({})",
            time(&conn, "last_seen"),
            ago(conn.get("last_seen"))
        )
    } else {
        "never".into()
    };
    let attributes = match d.get("attributes") {
        Some(Value::Object(m)) if !m.is_empty() => Value::Object(m.clone()).to_string(),
        _ => "-".into(),
    };
    key_values(&[
        ("id", text(d, "id")),
        ("tenant", text(d, "tenant")),
        ("name", text(d, "name")),
        ("type", text(d, "type")),
        ("status", text(d, "status")),
        ("online", online),
        ("last seen", last_seen),
        ("remote address", text(&conn, "remote_addr")),
        ("protocol", text(&conn, "protocol")),
        ("policy", text(d, "policy")),
        ("groups", list(d.get("groups"))),
        ("tags", pairs(d.get("tags"))),
        ("attributes", attributes),
        ("created", time(d, "created_at")),
        ("updated", time(d, "updated_at")),
    ])
}

/// `devices connectivity`: the current state as key/value lines, then the events as a table.
fn show_connectivity(v: &Value) -> (String, Table) {
    let cur = v.get("current").cloned().unwrap_or(Value::Null);
    let online = match cur.get("online").and_then(Value::as_bool) {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    };
    let at = |key: &str| {
        if cur.get(key).is_some_and(Value::is_i64) {
            format!("{} ({})", time(&cur, key), ago(cur.get(key)))
        } else {
            "never".into()
        }
    };
    let summary = key_values(&[
        ("online", online.into()),
        ("last connected", at("last_connected_at")),
        ("last disconnected", at("last_disconnected_at")),
        ("disconnect reason", text(&cur, "disconnect_reason")),
        ("last seen", at("last_seen")),
        ("remote address", text(&cur, "remote_addr")),
        ("protocol", text(&cur, "protocol")),
    ]);
    let mut t = Table::new(&[
        "SEQ",
        "TIME",
        "EVENT",
        "REASON",
        "CLIENT ID",
        "REMOTE ADDRESS",
        "PROTOCOL",
    ]);
    for e in v
        .get("events")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        t.row(vec![
            text(e, "seq"),
            time(e, "at"),
            text(e, "event"),
            text(e, "reason"),
            text(e, "client_id"),
            text(e, "remote_addr"),
            text(e, "protocol"),
        ]);
    }
    (summary, t)
}

async fn patch_device(ctx: &Ctx, id: &str, patch: Value) -> Result<Value> {
    ctx.client
        .call(
            Method::PATCH,
            &["tenants", &ctx.tenant, "devices", id],
            &[],
            Body::Json(patch),
        )
        .await
}

async fn devices(ctx: &Ctx, cmd: DevicesCmd) -> Result<()> {
    let c = &ctx.client;
    let t = ctx.tenant.as_str();
    match cmd {
        DevicesCmd::List(a) => list_devices(ctx, a).await,
        DevicesCmd::Show { id } => {
            let v = c.get(&["tenants", t, "devices", &id], &[]).await?;
            match ctx.output {
                Output::Json => emit_json(&v),
                Output::Table => emit(&show_device(&v)),
            }
        }
        DevicesCmd::Connectivity { id, limit, before } => {
            let mut q = vec![("limit", limit.to_string())];
            if let Some(b) = before {
                q.push(("before", b.to_string()));
            }
            let v = c
                .get(&["tenants", t, "devices", &id, "connectivity"], &q)
                .await?;
            if ctx.output == Output::Json {
                return emit_json(&v);
            }
            let (summary, table) = show_connectivity(&v);
            emit(&summary)?;
            if table.len() > 0 {
                emit("\n")?;
            }
            table.emit("no connects or disconnects recorded")?;
            if let Some(n) = v.get("next").and_then(Value::as_i64) {
                eprintln!("older events: add --before {n}");
            }
            Ok(())
        }
        DevicesCmd::Create {
            id,
            name,
            device_type,
            tags,
            groups,
            policy,
            attributes,
            disabled,
        } => {
            let mut spec = Map::new();
            spec.insert("id".into(), id.into());
            if let Some(n) = name {
                spec.insert("name".into(), n.into());
            }
            if let Some(ty) = device_type {
                spec.insert("type".into(), ty.into());
            }
            if !tags.is_empty() {
                let tags: BTreeMap<String, String> = tags.into_iter().collect();
                spec.insert("tags".into(), json!(tags));
            }
            if !groups.is_empty() {
                spec.insert("groups".into(), json!(groups));
            }
            if let Some(p) = policy {
                spec.insert("policy".into(), p.into());
            }
            if let Some(a) = attributes {
                let a: Value = serde_json::from_str(&a).map_err(|e| {
                    Failure::new(
                        format!("--attributes is not JSON: {e}"),
                        Some(r#"write --attributes '{"serial": "X17"}'"#.into()),
                    )
                })?;
                if !a.is_object() {
                    return Err(
                        Failure::new("--attributes must be a JSON object ({...})", None).into(),
                    );
                }
                spec.insert("attributes".into(), a);
            }
            if disabled {
                spec.insert("status".into(), "disabled".into());
            }
            let v = c
                .call(
                    Method::POST,
                    &["tenants", t, "devices"],
                    &[],
                    Body::Json(Value::Object(spec)),
                )
                .await?;
            done(ctx, &v, || {
                format!(
                    "created device {} in tenant {t} ({})",
                    text(&v, "id"),
                    text(&v, "status")
                )
            })
        }
        DevicesCmd::Enable { id } => {
            let v = patch_device(ctx, &id, json!({ "status": Status::Enabled.as_str() })).await?;
            done(ctx, &v, || format!("enabled device {id}"))
        }
        DevicesCmd::Disable { id } => {
            let v = patch_device(ctx, &id, json!({ "status": Status::Disabled.as_str() })).await?;
            done(ctx, &v, || {
                format!("disabled device {id}: it is refused on connect and was disconnected")
            })
        }
        DevicesCmd::Delete { id } => {
            let v = c
                .call(
                    Method::DELETE,
                    &["tenants", t, "devices", &id],
                    &[],
                    Body::Empty,
                )
                .await?;
            done(ctx, &v, || {
                format!(
                    "decommissioned device {id}; its telemetry: {}",
                    text(&v, "telemetry")
                )
            })
        }
        DevicesCmd::Tag { id, set, remove } => {
            if set.is_empty() && remove.is_empty() {
                return Err(Failure::new(
                    "nothing to change",
                    Some("give tags to set (KEY=VALUE ...) and/or --remove KEY".into()),
                )
                .into());
            }
            let mut tags = Map::new();
            for (k, v) in set {
                tags.insert(k, v.into());
            }
            for k in remove {
                if tags.contains_key(&k) {
                    return Err(
                        Failure::new(format!("tag {k} is both set and removed"), None).into(),
                    );
                }
                tags.insert(k, Value::Null);
            }
            let v = patch_device(ctx, &id, json!({ "tags": tags })).await?;
            done(ctx, &v, || {
                format!("device {id} tags: {}", pairs(v.get("tags")))
            })
        }
        DevicesCmd::Import { .. } => Ok(()), // dispatched before
    }
}

// ---- credentials ---------------------------------------------------------------------------

/// Writes `contents` to `path`; `private` files are readable by the owner only (0600).
fn write_file(path: &Path, contents: &str, private: bool, force: bool) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    if private {
        // An existing file (--force) keeps its mode on open: narrow it.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {} to mode 0600", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = private;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// The first `n` characters and an ellipsis (long fingerprints in tables; JSON has them whole).
fn short(s: &str, n: usize) -> String {
    if s.chars().count() > n {
        format!("{}…", s.chars().take(n).collect::<String>())
    } else {
        s.to_string()
    }
}

fn credential_state(c: &Value) -> &'static str {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    if c.get("revoked_at").is_some_and(|r| !r.is_null()) {
        "revoked"
    } else if c
        .get("expires_at")
        .and_then(Value::as_i64)
        .is_some_and(|e| e <= now)
    {
        "expired"
    } else {
        "active"
    }
}

async fn credentials(ctx: &Ctx, cmd: CredentialsCmd) -> Result<()> {
    let c = &ctx.client;
    let t = ctx.tenant.as_str();
    match cmd {
        CredentialsCmd::List { device } => {
            let v = c
                .get(&["tenants", t, "devices", &device, "credentials"], &[])
                .await?;
            if ctx.output == Output::Json {
                return emit_json(&v);
            }
            let mut table = Table::new(&[
                "ID",
                "KIND",
                "STATE",
                "FINGERPRINT",
                "CREATED",
                "EXPIRES",
                "LABEL",
            ]);
            for x in items(&v) {
                table.row(vec![
                    text(x, "id"),
                    text(x, "kind"),
                    credential_state(x).into(),
                    short(&text(x, "fingerprint"), 16),
                    time(x, "created_at"),
                    time(x, "expires_at"),
                    text(x, "label"),
                ]);
            }
            table.emit(&format!("device {device} has no credentials"))
        }
        CredentialsCmd::AddPassword {
            device,
            secret,
            rotate_overlap,
        } => {
            let mut body = json!({ "kind": "password" });
            if let Some(s) = secret {
                body["secret"] = s.into();
            }
            if let Some(o) = rotate_overlap {
                body["rotate_overlap_secs"] = o.into();
            }
            let v = c
                .call(
                    Method::POST,
                    &["tenants", t, "devices", &device, "credentials"],
                    &[],
                    Body::Json(body),
                )
                .await?;
            if ctx.output == Output::Json {
                return emit_json(&v);
            }
            let secret = v
                .get("secret")
                .and_then(Value::as_str)
                .context("the hub's answer has no secret")?;
            eprintln!(
                "added password credential {} to device {device}; it is shown only this once.\n\
                 The device connects with user name {t}/{device} and this password:",
                v.pointer("/credential/id")
                    .and_then(Value::as_str)
                    .unwrap_or("-")
            );
            emit(&format!("{secret}\n"))
        }
        CredentialsCmd::IssueCert {
            device,
            csr,
            out_dir,
            rotate_overlap,
            force,
        } => {
            let mut body = json!({ "kind": "certificate" });
            if let Some(path) = &csr {
                let pem = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the CSR {}", path.display()))?;
                body["csr_pem"] = pem.into();
            }
            if let Some(o) = rotate_overlap {
                body["rotate_overlap_secs"] = o.into();
            }
            let crt = out_dir.join(format!("{device}.crt"));
            let key = out_dir.join(format!("{device}.key"));
            let ca = out_dir.join("ca.crt");
            let mut targets = vec![&crt, &ca];
            if csr.is_none() {
                targets.push(&key);
            }
            // Refuse before the hub issues anything.
            if !out_dir.is_dir() {
                return Err(Failure::new(
                    format!("--out-dir {} is not a directory", out_dir.display()),
                    Some("create it first".into()),
                )
                .into());
            }
            if !force && let Some(existing) = targets.iter().find(|p| p.exists()) {
                return Err(Failure::new(
                    format!("{} exists already", existing.display()),
                    Some("pass --force to overwrite it, or choose another --out-dir".into()),
                )
                .into());
            }
            let v = c
                .call(
                    Method::POST,
                    &["tenants", t, "devices", &device, "credentials"],
                    &[],
                    Body::Json(body),
                )
                .await?;
            let field = |k: &str| -> Result<String> {
                v.get(k)
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .with_context(|| format!("the hub's answer has no {k}"))
            };
            write_file(&crt, &field("certificate_pem")?, false, force)?;
            write_file(&ca, &field("ca_pem")?, false, force)?;
            let mut files = json!({ "certificate": crt, "ca": ca });
            if let Some(k) = v.get("private_key_pem").and_then(Value::as_str) {
                write_file(&key, k, true, force)?;
                files["private_key"] = json!(key);
            }
            let credential = v.get("credential").cloned().unwrap_or(Value::Null);
            match ctx.output {
                Output::Json => emit_json(&json!({ "credential": credential, "files": files })),
                Output::Table => {
                    let mut out = format!(
                        "issued certificate credential {} for device {device} (fingerprint {}, expires {})\n",
                        text(&credential, "id"),
                        text(&credential, "fingerprint"),
                        time(&credential, "expires_at"),
                    );
                    out.push_str(&format!("  certificate  {}\n", crt.display()));
                    if files.get("private_key").is_some() {
                        out.push_str(&format!(
                            "  private key  {} (mode 0600; not stored by the hub)\n",
                            key.display()
                        ));
                    }
                    out.push_str(&format!("  CA           {}\n", ca.display()));
                    emit(&out)
                }
            }
        }
        CredentialsCmd::Revoke { device, credential } => {
            c.call(
                Method::DELETE,
                &["tenants", t, "devices", &device, "credentials", &credential],
                &[],
                Body::Empty,
            )
            .await?;
            done(
                ctx,
                &json!({ "revoked": credential, "device": device }),
                || {
                    format!(
                        "revoked credential {credential} of device {device}; its connections were closed"
                    )
                },
            )
        }
        CredentialsCmd::CaCert => {
            let pem = c
                .get_text(&["tenants", t, "cas", "builtin", "certificate"])
                .await?;
            match ctx.output {
                Output::Json => emit_json(&json!({ "tenant": t, "certificate_pem": pem })),
                Output::Table => emit(&pem),
            }
        }
        CredentialsCmd::Token { device, ttl } => {
            let v = c
                .call(
                    Method::POST,
                    &["tenants", t, "devices", &device, "token"],
                    &[],
                    Body::Json(json!({ "ttl_secs": ttl })),
                )
                .await?;
            if ctx.output == Output::Json {
                return emit_json(&v);
            }
            let token = v
                .get("token")
                .and_then(Value::as_str)
                .context("the hub's answer has no token")?;
            eprintln!("device JWT for {t}/{device} (its MQTT password; not stored, it expires):");
            emit(&format!("{token}\n"))
        }
    }
}

// ---- groups, policies, tokens, audit -------------------------------------------------------

fn group_query(v: &Value) -> String {
    let Some(q) = v.get("query").filter(|q| !q.is_null()) else {
        return "-".into();
    };
    let mut parts = Vec::new();
    if let Some(tags) = q.get("tags").and_then(Value::as_object) {
        for (k, v) in tags {
            parts.push(format!("{k}={}", v.as_str().unwrap_or_default()));
        }
    }
    for k in ["type", "status", "name_prefix", "online"] {
        if let Some(x) = q.get(k).filter(|x| !x.is_null()) {
            parts.push(format!(
                "{k}={}",
                x.as_str().map_or_else(|| x.to_string(), str::to_string)
            ));
        }
    }
    if parts.is_empty() {
        "(all devices)".into()
    } else {
        parts.join(",")
    }
}

async fn groups(ctx: &Ctx, cmd: GroupsCmd) -> Result<()> {
    let c = &ctx.client;
    let t = ctx.tenant.as_str();
    match cmd {
        GroupsCmd::List => {
            let v = c.get(&["tenants", t, "groups"], &[]).await?;
            if ctx.output == Output::Json {
                return emit_json(&v);
            }
            let mut table = Table::new(&["NAME", "KIND", "QUERY", "DESCRIPTION"]);
            for g in items(&v) {
                let dynamic = g.get("query").is_some_and(|q| !q.is_null());
                table.row(vec![
                    text(g, "name"),
                    if dynamic { "dynamic" } else { "static" }.into(),
                    group_query(g),
                    text(g, "description"),
                ]);
            }
            table.emit(&format!("tenant {t} has no groups"))
        }
        GroupsCmd::Show { name } => {
            let v = c.get(&["tenants", t, "groups", &name], &[]).await?;
            if ctx.output == Output::Json {
                return emit_json(&v);
            }
            let dynamic = v.get("query").is_some_and(|q| !q.is_null());
            emit(&key_values(&[
                ("name", text(&v, "name")),
                ("kind", if dynamic { "dynamic" } else { "static" }.into()),
                ("query", group_query(&v)),
                ("description", text(&v, "description")),
                (
                    "devices",
                    format!("ferrohub ctl devices list --tenant {t} --group {name}"),
                ),
            ]))
        }
        GroupsCmd::Create {
            name,
            description,
            query,
            device_type,
            status,
            name_prefix,
            online,
            offline,
        } => {
            let filter = DeviceFilter {
                tags: query,
                device_type,
                status,
                name_prefix,
                online,
                offline,
            };
            let mut body = Map::new();
            if let Some(d) = description {
                body.insert("description".into(), d.into());
            }
            let dynamic = !filter.tags.is_empty()
                || filter.device_type.is_some()
                || filter.status.is_some()
                || filter.name_prefix.is_some()
                || filter.online().is_some();
            if dynamic {
                let mut q = Map::new();
                if !filter.tags.is_empty() {
                    let tags: BTreeMap<&str, &str> = filter
                        .tags
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    q.insert("tags".into(), json!(tags));
                }
                if let Some(ty) = &filter.device_type {
                    q.insert("type".into(), ty.clone().into());
                }
                if let Some(s) = filter.status {
                    q.insert("status".into(), s.as_str().into());
                }
                if let Some(p) = &filter.name_prefix {
                    q.insert("name_prefix".into(), p.clone().into());
                }
                if let Some(o) = filter.online() {
                    q.insert("online".into(), o.into());
                }
                body.insert("query".into(), Value::Object(q));
            }
            let v = c
                .call(
                    Method::PUT,
                    &["tenants", t, "groups", &name],
                    &[],
                    Body::Json(Value::Object(body)),
                )
                .await?;
            done(ctx, &v, || {
                if dynamic {
                    format!(
                        "stored dynamic group {name}: devices matching {}",
                        group_query(&v)
                    )
                } else {
                    format!(
                        "stored static group {name}: add devices with `ferrohub ctl groups add {name} DEVICE`"
                    )
                }
            })
        }
        GroupsCmd::Add { name, device } => {
            c.call(
                Method::PUT,
                &["tenants", t, "groups", &name, "members", &device],
                &[],
                Body::Empty,
            )
            .await?;
            done(ctx, &json!({ "group": name, "added": device }), || {
                format!("device {device} is a member of group {name}")
            })
        }
        GroupsCmd::Remove { name, device } => {
            c.call(
                Method::DELETE,
                &["tenants", t, "groups", &name, "members", &device],
                &[],
                Body::Empty,
            )
            .await?;
            done(ctx, &json!({ "group": name, "removed": device }), || {
                format!("device {device} is no longer a member of group {name}")
            })
        }
        GroupsCmd::Delete { name } => {
            c.call(
                Method::DELETE,
                &["tenants", t, "groups", &name],
                &[],
                Body::Empty,
            )
            .await?;
            done(ctx, &json!({ "deleted": name }), || {
                format!("deleted group {name} (its devices stay)")
            })
        }
    }
}

async fn policies(ctx: &Ctx, cmd: PoliciesCmd) -> Result<()> {
    let c = &ctx.client;
    let t = ctx.tenant.as_str();
    match cmd {
        PoliciesCmd::List => {
            let v = c.get(&["tenants", t, "policies"], &[]).await?;
            if ctx.output == Output::Json {
                return emit_json(&v);
            }
            let mut table = Table::new(&["NAME", "STATEMENTS", "UPDATED"]);
            for p in items(&v) {
                let n = p
                    .pointer("/document/statements")
                    .and_then(Value::as_array)
                    .map_or_else(|| "-".into(), |s| s.len().to_string());
                table.row(vec![text(p, "name"), n, time(p, "updated_at")]);
            }
            table.emit(&format!(
                "tenant {t} has no named policies (devices use the default policy)"
            ))
        }
        PoliciesCmd::Show { name } => {
            let v = c.get(&["tenants", t, "policies", &name], &[]).await?;
            match ctx.output {
                Output::Json => emit_json(&v),
                // The document is what an operator edits and puts back.
                Output::Table => emit_json(v.get("document").unwrap_or(&Value::Null)),
            }
        }
        PoliciesCmd::Put { name, file } => {
            let doc = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .context("reading the policy from standard input")?;
                s
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading the policy {}", file.display()))?
            };
            let v = c
                .call(
                    Method::PUT,
                    &["tenants", t, "policies", &name],
                    &[],
                    Body::Raw("application/json", doc.into_bytes()),
                )
                .await?;
            done(ctx, &v, || {
                format!("stored policy {name}; devices under it use it from now on")
            })
        }
        PoliciesCmd::Delete { name } => {
            c.call(
                Method::DELETE,
                &["tenants", t, "policies", &name],
                &[],
                Body::Empty,
            )
            .await?;
            done(ctx, &json!({ "deleted": name }), || {
                format!("deleted policy {name}; devices that named it use the default policy")
            })
        }
    }
}

async fn tokens(ctx: &Ctx, cmd: TokensCmd) -> Result<()> {
    let c = &ctx.client;
    match cmd {
        TokensCmd::List => {
            let v = c.get(&["tokens"], &[]).await?;
            if ctx.output == Output::Json {
                return emit_json(&v);
            }
            let mut table = Table::new(&[
                "ID", "NAME", "ROLE", "TENANT", "STATE", "CREATED", "EXPIRES",
            ]);
            for x in items(&v) {
                let tenant = x
                    .get("tenant")
                    .and_then(Value::as_str)
                    .map_or_else(|| "(platform)".to_string(), str::to_string);
                table.row(vec![
                    text(x, "id"),
                    text(x, "name"),
                    text(x, "role"),
                    tenant,
                    credential_state(x).into(),
                    time(x, "created_at"),
                    time(x, "expires_at"),
                ]);
            }
            table.emit("no tokens")
        }
        TokensCmd::Create {
            name,
            role,
            platform,
            ttl,
        } => {
            let mut body = json!({ "name": name, "role": role.as_str() });
            if !platform {
                body["tenant"] = ctx.tenant.clone().into();
            }
            if let Some(s) = ttl {
                body["ttl_secs"] = s.into();
            }
            let v = c
                .call(Method::POST, &["tokens"], &[], Body::Json(body))
                .await?;
            if ctx.output == Output::Json {
                return emit_json(&v);
            }
            let secret = v
                .get("secret")
                .and_then(Value::as_str)
                .context("the hub's answer has no secret")?;
            let scope = if platform {
                "platform-wide".to_string()
            } else {
                format!("tenant {}", ctx.tenant)
            };
            eprintln!(
                "created API token {} ({}, {scope}); its secret is shown only this once:",
                v.pointer("/token/id")
                    .and_then(Value::as_str)
                    .unwrap_or("-"),
                role.as_str()
            );
            emit(&format!("{secret}\n"))
        }
        TokensCmd::Revoke { id } => {
            c.call(Method::DELETE, &["tokens", &id], &[], Body::Empty)
                .await?;
            done(ctx, &json!({ "revoked": id }), || {
                format!("revoked API token {id}; it stopped working")
            })
        }
    }
}

async fn audit(ctx: &Ctx, a: AuditArgs) -> Result<()> {
    let mut q: Vec<(&str, String)> = Vec::new();
    if !a.all_tenants {
        q.push(("tenant", ctx.tenant.clone()));
    }
    if let Some(x) = a.action {
        q.push(("action", x));
    }
    if let Some(x) = a.actor {
        q.push(("actor", x));
    }
    if let Some(x) = a.target {
        q.push(("target", x));
    }
    if let Some(r) = a.result {
        let r = match r {
            AuditResult::Success => "success",
            AuditResult::Failure => "failure",
        };
        q.push(("result", r.into()));
    }
    if let Some(s) = a.since {
        q.push(("since", s.to_string()));
    }
    if let Some(u) = a.until {
        q.push(("until", u.to_string()));
    }
    if let Some(b) = a.before_seq {
        q.push(("before_seq", b.to_string()));
    }
    q.push(("limit", a.limit.to_string()));
    let v = ctx.client.get(&["audit"], &q).await?;
    if ctx.output == Output::Json {
        return emit_json(&v);
    }
    let mut table = Table::new(&[
        "SEQ", "TIME", "ACTOR", "TENANT", "ACTION", "TARGET", "RESULT", "SOURCE",
    ]);
    for e in v
        .get("items")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        table.row(vec![
            text(e, "seq"),
            time(e, "at"),
            text(e, "actor"),
            text(e, "tenant"),
            text(e, "action"),
            text(e, "target"),
            text(e, "result"),
            text(e, "source"),
        ]);
    }
    table.emit("no audit events match")?;
    if let Some(n) = v.get("next_before_seq").and_then(Value::as_i64) {
        eprintln!("older events: add --before-seq {n}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connectivity_view() {
        let v = json!({
            "current": {"online": false, "last_seen": 2000, "remote_addr": "10.0.0.5:50100",
                        "protocol": "mqtts", "last_connected_at": 1000,
                        "last_disconnected_at": 2000, "disconnect_reason": "keep_alive_timeout"},
            "events": [
                {"seq": 12, "at": 2000, "event": "disconnected", "reason": "keep_alive_timeout",
                 "client_id": "boiler-17", "remote_addr": "10.0.0.5:50100", "protocol": "mqtts"},
                {"seq": 11, "at": 1000, "event": "connected", "reason": null,
                 "client_id": "boiler-17", "remote_addr": "10.0.0.5:50100", "protocol": "mqtts"}
            ],
            "next": null
        });
        let (summary, table) = show_connectivity(&v);
        assert!(summary.contains("online:"), "{summary}");
        assert!(summary.contains("keep_alive_timeout"), "{summary}");
        assert!(summary.contains("1970-01-01T00:00:01Z"), "{summary}");
        let rendered = table.render();
        let lines: Vec<&str> = rendered.lines().collect();
        assert_eq!(lines.len(), 3, "{rendered}");
        assert!(lines[0].starts_with("SEQ"), "{rendered}");
        assert!(
            lines[1].contains("disconnected") && lines[1].contains("keep_alive_timeout"),
            "{rendered}"
        );
        let cells: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            cells,
            vec![
                "11",
                "1970-01-01T00:00:01Z",
                "connected",
                "-",
                "boiler-17",
                "10.0.0.5:50100",
                "mqtts"
            ],
            "{rendered}"
        );
        let (summary, table) =
            show_connectivity(&json!({"current": {"online": false}, "events": []}));
        assert!(summary.contains("never"), "{summary}");
        assert_eq!(table.len(), 0);
    }
}
