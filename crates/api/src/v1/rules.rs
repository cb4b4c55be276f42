//! `/tenants/{tenant}/rules`: rules running in the hub — create, update (versioned), enable,
//! disable, delete, dry runs, per-rule stats and dead letters (`docs/rules.md`).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ferrohub_registry::RegistryError;
use ferrohub_registry::model::Role;
use ferrohub_rules_service::{
    ReplayMessage, ReplayRequest, RuleSpec, RulesError, RulesService, Sample, StoredRule,
};
use serde::Deserialize;
use serde_json::json;

use crate::ApiState;
use crate::error::{ApiError, CommonErrors};
use crate::extract::{ApiJson, ApiPath, Caller, if_match};

/// An error of a rules route: the API's usual ones, and a rule that does not compile (400 with
/// `line`, `column` and `hint` next to `code` and `message`).
#[derive(Debug)]
pub enum RulesApiError {
    /// Any other API error.
    Api(ApiError),
    /// From the rules service.
    Rules(RulesError),
}

impl From<ApiError> for RulesApiError {
    fn from(e: ApiError) -> Self {
        RulesApiError::Api(e)
    }
}

impl From<RegistryError> for RulesApiError {
    fn from(e: RegistryError) -> Self {
        RulesApiError::Api(e.into())
    }
}

impl From<RulesError> for RulesApiError {
    fn from(e: RulesError) -> Self {
        RulesApiError::Rules(e)
    }
}

impl IntoResponse for RulesApiError {
    fn into_response(self) -> Response {
        let e = match self {
            RulesApiError::Api(e) => return e.into_response(),
            RulesApiError::Rules(e) => e,
        };
        let api = match &e {
            RulesError::Compile(c) => {
                let body = json!({
                    "code": "invalid_rule", "message": e.to_string(),
                    "line": c.line, "column": c.column, "hint": c.hint,
                });
                return (StatusCode::BAD_REQUEST, Json(body)).into_response();
            }
            RulesError::NotFound(_) => ApiError::not_found(e.to_string()),
            RulesError::Exists(_) => ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string()),
            RulesError::VersionMismatch { .. } => {
                ApiError::new(StatusCode::CONFLICT, "changed_concurrently", e.to_string())
            }
            RulesError::Invalid(_) => ApiError::invalid(e.to_string()),
            RulesError::Storage(_) => ApiError::internal(&e),
        };
        api.into_response()
    }
}

type RulesResult<T> = Result<T, RulesApiError>;

fn rules_of(state: &ApiState) -> Result<Arc<RulesService>, ApiError> {
    state.rules.clone().ok_or_else(ApiError::unavailable)
}

fn with_etag(rule: StoredRule, status: StatusCode) -> Response {
    let etag = HeaderValue::from_str(&format!("\"{}\"", rule.version)).ok();
    let mut res = (status, Json(rule)).into_response();
    if let Some(etag) = etag {
        res.headers_mut().insert(header::ETAG, etag);
    }
    res
}

/// A new rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRule {
    /// Id (letters, digits, `_`, `-`, `.`; at most 128).
    pub id: String,
    /// Whether it runs at once (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The rule.
    #[serde(flatten)]
    pub spec: RuleSpec,
}

fn yes() -> bool {
    true
}

/// Lists the tenant's rules.
#[utoipa::path(get, path = "/tenants/{tenant}/rules", tag = "rules",
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 200, description = "The rules, by id", body = Vec<serde_json::Value>), CommonErrors))]
pub async fn list_rules(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
) -> RulesResult<Response> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    Ok(Json(rules_of(&state)?.list(&tenant).await?).into_response())
}

/// Creates a rule: `{"id", "sql", "description"?, "actions": [...], "error_action"?,
/// "enabled"?}`. A rule that does not compile answers 400 `invalid_rule` with `line`, `column`
/// and `hint`.
#[utoipa::path(post, path = "/tenants/{tenant}/rules", tag = "rules",
    params(("tenant" = String, Path, description = "Tenant id")),
    request_body(content = serde_json::Value, description = "The rule", content_type = "application/json"),
    responses((status = 201, description = "The stored rule (version 1)", body = serde_json::Value), CommonErrors))]
pub async fn create_rule(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
    ApiJson(new): ApiJson<NewRule>,
) -> RulesResult<Response> {
    c.actor.require(Role::Operator, Some(&tenant))?;
    let rule = rules_of(&state)?
        .create(&tenant, &new.id, new.spec, new.enabled)
        .await?;
    Ok(with_etag(rule, StatusCode::CREATED))
}

/// One rule; `ETag` is its version.
#[utoipa::path(get, path = "/tenants/{tenant}/rules/{rule}", tag = "rules",
    params(("tenant" = String, Path, description = "Tenant id"), ("rule" = String, Path, description = "Rule id")),
    responses((status = 200, description = "The rule", body = serde_json::Value), CommonErrors))]
pub async fn get_rule(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
) -> RulesResult<Response> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    let rule = rules_of(&state)?.get(&tenant, &id).await?;
    Ok(with_etag(rule, StatusCode::OK))
}

/// Replaces a rule's SQL and actions (a new version; window state starts afresh). With
/// `If-Match: "<version>"` a rule changed since answers 409 `changed_concurrently`.
#[utoipa::path(put, path = "/tenants/{tenant}/rules/{rule}", tag = "rules",
    params(("tenant" = String, Path, description = "Tenant id"), ("rule" = String, Path, description = "Rule id")),
    request_body(content = serde_json::Value, description = "`{sql, description?, actions, error_action?}`", content_type = "application/json"),
    responses((status = 200, description = "The new version", body = serde_json::Value), CommonErrors))]
pub async fn update_rule(
    c: Caller,
    State(state): State<ApiState>,
    headers: HeaderMap,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
    ApiJson(spec): ApiJson<RuleSpec>,
) -> RulesResult<Response> {
    c.actor.require(Role::Operator, Some(&tenant))?;
    let expected = if_match(&headers, "…/rules/{id}")?;
    let rule = rules_of(&state)?
        .update(&tenant, &id, spec, expected)
        .await?;
    Ok(with_etag(rule, StatusCode::OK))
}

/// Deletes a rule with its stats and dead letters.
#[utoipa::path(delete, path = "/tenants/{tenant}/rules/{rule}", tag = "rules",
    params(("tenant" = String, Path, description = "Tenant id"), ("rule" = String, Path, description = "Rule id")),
    responses((status = 204, description = "Deleted"), CommonErrors))]
pub async fn delete_rule(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
) -> RulesResult<Response> {
    c.actor.require(Role::Operator, Some(&tenant))?;
    rules_of(&state)?.delete(&tenant, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn set_enabled(
    c: Caller,
    state: ApiState,
    headers: HeaderMap,
    tenant: String,
    id: String,
    enabled: bool,
) -> RulesResult<Response> {
    c.actor.require(Role::Operator, Some(&tenant))?;
    let expected = if_match(&headers, "…/rules/{id}")?;
    let rule = rules_of(&state)?
        .set_enabled(&tenant, &id, enabled, expected)
        .await?;
    Ok(with_etag(rule, StatusCode::OK))
}

/// Starts a rule (a new version).
#[utoipa::path(post, path = "/tenants/{tenant}/rules/{rule}/enable", tag = "rules",
    params(("tenant" = String, Path, description = "Tenant id"), ("rule" = String, Path, description = "Rule id")),
    responses((status = 200, description = "The rule", body = serde_json::Value), CommonErrors))]
pub async fn enable_rule(
    c: Caller,
    State(state): State<ApiState>,
    headers: HeaderMap,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
) -> RulesResult<Response> {
    set_enabled(c, state, headers, tenant, id, true).await
}

/// Stops a rule (a new version); its window state is dropped.
#[utoipa::path(post, path = "/tenants/{tenant}/rules/{rule}/disable", tag = "rules",
    params(("tenant" = String, Path, description = "Tenant id"), ("rule" = String, Path, description = "Rule id")),
    responses((status = 200, description = "The rule", body = serde_json::Value), CommonErrors))]
pub async fn disable_rule(
    c: Caller,
    State(state): State<ApiState>,
    headers: HeaderMap,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
) -> RulesResult<Response> {
    set_enabled(c, state, headers, tenant, id, false).await
}

/// Evaluates a stored rule against a sample `{topic, payload, client_id?, timestamp?}`, without
/// state or side effects: `{topic_matches, output (null: no output), actions (what each would
/// do)}`.
#[utoipa::path(post, path = "/tenants/{tenant}/rules/{rule}/dry-run", tag = "rules",
    params(("tenant" = String, Path, description = "Tenant id"), ("rule" = String, Path, description = "Rule id")),
    request_body(content = serde_json::Value, description = "The sample message", content_type = "application/json"),
    responses((status = 200, description = "The result", body = serde_json::Value), CommonErrors))]
pub async fn dry_run_rule(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
    ApiJson(sample): ApiJson<Sample>,
) -> RulesResult<Response> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    let rules = rules_of(&state)?;
    let rule = rules.get(&tenant, &id).await?;
    Ok(Json(rules.dry_run(&tenant, &rule.spec, &sample)?).into_response())
}

/// An unsaved rule and a sample.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DryRunRequest {
    /// The SQL.
    pub sql: String,
    /// Actions to render (optional).
    #[serde(default)]
    pub actions: Vec<ferrohub_rules_service::ActionSpec>,
    /// The sample message.
    pub sample: Sample,
}

/// Evaluates an unsaved rule `{sql, actions?, sample}`; compile errors answer 400 with their
/// position.
#[utoipa::path(post, path = "/tenants/{tenant}/rules:dry-run", tag = "rules",
    params(("tenant" = String, Path, description = "Tenant id")),
    request_body(content = serde_json::Value, description = "`{sql, actions?, sample: {topic, payload, client_id?, timestamp?}}`", content_type = "application/json"),
    responses((status = 200, description = "The result", body = serde_json::Value), CommonErrors))]
pub async fn dry_run_sql(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath(tenant): ApiPath<String>,
    ApiJson(req): ApiJson<DryRunRequest>,
) -> RulesResult<Response> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    let spec = RuleSpec {
        sql: req.sql,
        description: String::new(),
        actions: req.actions,
        error_action: None,
    };
    Ok(Json(rules_of(&state)?.dry_run(&tenant, &spec, &req.sample)?).into_response())
}

/// Counters of a rule: matched, passed, failed, dropped (queue full), evaluation latency p50/p99,
/// per action successes, errors, retries, dead letters.
#[utoipa::path(get, path = "/tenants/{tenant}/rules/{rule}/stats", tag = "rules",
    params(("tenant" = String, Path, description = "Tenant id"), ("rule" = String, Path, description = "Rule id")),
    responses((status = 200, description = "The counters", body = serde_json::Value), CommonErrors))]
pub async fn rule_stats(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
) -> RulesResult<Response> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    Ok(Json(rules_of(&state)?.stats(&tenant, &id).await?).into_response())
}

/// Messages the rule's actions gave up on, oldest first (bounded; the oldest are evicted).
#[utoipa::path(get, path = "/tenants/{tenant}/rules/{rule}/dead-letters", tag = "rules",
    params(("tenant" = String, Path, description = "Tenant id"), ("rule" = String, Path, description = "Rule id")),
    responses((status = 200, description = "The dead letters", body = Vec<serde_json::Value>), CommonErrors))]
pub async fn rule_dead_letters(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
) -> RulesResult<Response> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    Ok(Json(rules_of(&state)?.dead_letters(&tenant, &id).await?).into_response())
}

/// Replays a stored rule (enabled or not) against the tenant's stored telemetry in
/// `[from, to)`: one message per device and timestamp, in time order, with fresh state. No
/// action runs; each output shows what its actions would have done.
#[utoipa::path(post, path = "/tenants/{tenant}/rules/{rule}/replay", tag = "rules",
    params(("tenant" = String, Path, description = "Tenant id"), ("rule" = String, Path, description = "Rule id")),
    request_body(content = serde_json::Value, description = "`{from, to, devices?, topic?, max_outputs?, max_messages?}` (Unix ms; `topic` default `devices/{device}/telemetry`)", content_type = "application/json"),
    responses((status = 200, description = "`{messages, matched, outputs_total, failed, outputs: [{timestamp_ms, device, output, actions}], truncated, errors}`", body = serde_json::Value), CommonErrors))]
pub async fn replay_rule(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, id)): ApiPath<(String, String)>,
    ApiJson(request): ApiJson<ReplayRequest>,
) -> RulesResult<Response> {
    c.actor.require(Role::Operator, Some(&tenant))?;
    let rules = rules_of(&state)?;
    let telemetry = super::telemetry::telemetry_of(&state)?;
    let rule = rules.get(&tenant, &id).await?;
    request.validate()?;
    let (tid, req) = (ferrohub_types::TenantId::new(&tenant), request.clone());
    let (messages, truncated) =
        super::telemetry::blocking(move || rebuild_messages(telemetry.engine(), &tid, &req))
            .await?;
    let report = rules
        .replay(&tenant, &rule.spec, &request, messages, truncated)
        .await?;
    Ok(Json(report).into_response())
}

/// Messages rebuilt from stored telemetry: one per (timestamp, device), metrics nested back,
/// in time order; at most `max_messages` (then `true`: truncated).
fn rebuild_messages(
    engine: &ferrohub_tsdb::Engine,
    tenant: &ferrohub_types::TenantId,
    req: &ReplayRequest,
) -> Result<(Vec<ReplayMessage>, bool), ferrohub_tsdb::TsdbError> {
    use std::collections::BTreeMap;
    let mut rows: BTreeMap<(i64, String), Vec<(String, serde_json::Value)>> = BTreeMap::new();
    let mut truncated = false;
    engine.scan(
        tenant,
        req.devices.as_deref(),
        None,
        req.from,
        req.to,
        |device, metric, ts, values| {
            for (i, t) in ts.iter().enumerate() {
                let key = (*t, device.to_string());
                if !rows.contains_key(&key) && rows.len() >= req.max_messages {
                    // Keep the earliest: a later series may still hold earlier points.
                    match rows.last_key_value() {
                        Some((last, _)) if *last > key => {
                            rows.pop_last();
                        }
                        _ => {
                            truncated = true;
                            continue;
                        }
                    }
                    truncated = true;
                }
                let v = match values.get(i) {
                    ferrohub_types::telemetry::Value::Bool(b) => json!(b),
                    ferrohub_types::telemetry::Value::Int(n) => json!(n),
                    ferrohub_types::telemetry::Value::Float(f) => json!(f),
                    ferrohub_types::telemetry::Value::Str(s) => json!(s),
                };
                rows.entry(key).or_default().push((metric.to_string(), v));
            }
            Ok(())
        },
    )?;
    let messages = rows
        .into_iter()
        .map(|((ts, device), pairs)| ReplayMessage {
            device,
            timestamp_ms: ts,
            payload: ferrohub_rules_service::replay::nest(pairs),
        })
        .collect();
    Ok((messages, truncated))
}
