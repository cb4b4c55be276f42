//! The `/api/v1` operator API: routes, and the OpenAPI document generated from the same
//! declarations (every route is registered with `utoipa_axum::routes!`, which takes the method
//! and path from the handler's `#[utoipa::path]`, so the router and the document cannot diverge).

pub mod alarms;
pub mod broker;
pub mod catalog;
pub mod commands;
pub mod credentials;
pub mod devices;
pub mod import;
pub mod overview;
pub mod pki;
pub mod rules;
pub mod tail;
pub mod telemetry;
pub mod tenants;
pub mod tokens;
pub mod twins;

use std::sync::OnceLock;

use axum::extract::DefaultBodyLimit;
use axum::http::header;
use axum::response::IntoResponse;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use crate::ApiState;
use ferrohub_registry::model::{AuditResult, DeviceStatus, Role, SortKey};

use crate::error::ErrorBody;

/// Where the API lives.
pub const PREFIX: &str = "/api/v1";

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token: `Authorization: Bearer <secret>`. The bootstrap admin token \
                         is printed at the hub's first start (or set with FERROHUB_ADMIN_TOKEN); \
                         more are created with POST /api/v1/tokens.",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Ferrohub operator API",
        description = "Manage tenants, devices, credentials, groups, policies, certificate \
                       authorities, API tokens, the audit log, device twins and commands, and telemetry \
                       (including the InfluxDB v2 write API at /api/v2/write). Every error is \
                       `{\"code\": \"...\", \"message\": \"...\"}`; see docs/http-api.md."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(ErrorBody, SortKey, DeviceStatus, AuditResult, Role, tail::TailEvent)),
    tags(
        (name = "tenants", description = "Isolated namespaces"),
        (name = "devices", description = "The device registry"),
        (name = "credentials", description = "Device passwords, certificates, JWT keys and tokens"),
        (name = "groups", description = "Static and dynamic device groups"),
        (name = "device-types", description = "Defaults for devices of a kind"),
        (name = "policies", description = "Authorization policies"),
        (name = "pki", description = "Certificate authorities, provisioning templates, revocation, token keys"),
        (name = "tokens", description = "Operator API tokens"),
        (name = "audit", description = "The audit log"),
        (name = "twins", description = "Device twins: desired and reported state, delta, history, fleet queries"),
        (name = "commands", description = "Commands to devices: direct (synchronous) and queued (durable)"),
        (name = "telemetry", description = "Telemetry: writes (device payloads, InfluxDB line protocol), raw points, aggregates, fleet snapshots and aggregates, retention and ingest settings"),
        (name = "overview", description = "Fleet overview figures of the console, once or streamed"),
        (name = "rules", description = "Rules running in the hub: SQL, actions (republish, webhook), versions, dry runs, stats, dead letters"),
        (name = "alarms", description = "Alarms: raise, acknowledge, clear, query, history, counts, event stream; notification channels (webhooks with templates and rate limits) and their deliveries"),
        (name = "broker", description = "The MQTT broker: sessions (kick, discard), subscriptions, retained messages, per-tenant figures and top talkers, $SYS figures"),
        (name = "meta", description = "This document"),
    )
)]
struct ApiDoc;

/// The OpenAPI 3.1 document of the API (unauthenticated).
#[utoipa::path(get, path = "/openapi.json", tag = "meta", security(()),
    responses((status = 200, description = "This OpenAPI 3.1 document", body = serde_json::Value)))]
pub async fn openapi_json() -> impl IntoResponse {
    static JSON: OnceLock<String> = OnceLock::new();
    let body = JSON.get_or_init(|| {
        openapi()
            .to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    });
    ([(header::CONTENT_TYPE, "application/json")], body.as_str())
}

fn routes() -> OpenApiRouter<ApiState> {
    use catalog::*;
    use credentials::*;
    use devices::*;
    use pki::*;
    use tenants::*;
    use tokens::*;

    OpenApiRouter::new()
        .routes(routes!(openapi_json))
        .routes(routes!(list_tenants, create_tenant))
        .routes(routes!(get_tenant, update_tenant, delete_tenant))
        .routes(routes!(list_devices, create_device))
        .routes(routes!(get_device, update_device, delete_device))
        .routes(routes!(get_connectivity))
        .routes(routes!(tail::device_message_stream))
        .routes(
            routes!(import::import_devices).layer(DefaultBodyLimit::max(import::IMPORT_BODY_LIMIT)),
        )
        .routes(routes!(list_credentials, create_credential))
        .routes(routes!(revoke_credential))
        .routes(routes!(device_token))
        .routes(routes!(list_groups))
        .routes(routes!(get_group, put_group, delete_group))
        .routes(routes!(add_member, remove_member))
        .routes(routes!(list_device_types))
        .routes(routes!(
            get_device_type,
            put_device_type,
            delete_device_type
        ))
        .routes(routes!(list_policies))
        .routes(routes!(get_policy, put_policy, delete_policy))
        .routes(routes!(list_cas))
        .routes(routes!(builtin_ca_certificate))
        .routes(routes!(put_ca, delete_ca))
        .routes(routes!(list_templates))
        .routes(routes!(get_template, put_template))
        .routes(routes!(revoke_certificate))
        .routes(routes!(put_token_key))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .routes(routes!(me))
        .routes(routes!(query_audit))
        .routes(routes!(twins::list_twins))
        .routes(routes!(twins::get_twin))
        .routes(routes!(twins::patch_desired))
        .routes(routes!(twins::patch_tags))
        .routes(routes!(twins::twin_history))
        .routes(routes!(twins::query_twins))
        .routes(routes!(twins::count_twins))
        .routes(routes!(twins::watch_twins))
        .routes(routes!(overview::get_overview))
        .routes(routes!(overview::overview_stream))
        .routes(routes!(commands::invoke_command))
        .routes(routes!(commands::list_queued))
        .routes(routes!(commands::get_queued, commands::cancel_queued))
        .routes(
            routes!(telemetry::write_device, telemetry::list_device_series)
                .layer(DefaultBodyLimit::max(telemetry::WRITE_BODY_LIMIT)),
        )
        .routes(routes!(telemetry::raw_points))
        .routes(routes!(telemetry::aggregate_points))
        .routes(routes!(telemetry::fleet_latest))
        .routes(routes!(telemetry::fleet_aggregate))
        .routes(routes!(telemetry::get_settings, telemetry::put_settings))
        .routes(routes!(telemetry::apply_retention))
        .routes(routes!(telemetry::start_export, telemetry::list_exports))
        .routes(routes!(telemetry::get_export))
        .routes(routes!(rules::list_rules, rules::create_rule))
        .routes(routes!(
            rules::get_rule,
            rules::update_rule,
            rules::delete_rule
        ))
        .routes(routes!(rules::enable_rule))
        .routes(routes!(rules::disable_rule))
        .routes(routes!(rules::dry_run_rule))
        .routes(routes!(rules::dry_run_sql))
        .routes(routes!(rules::rule_stats))
        .routes(routes!(rules::rule_dead_letters))
        .routes(routes!(rules::replay_rule))
        .routes(routes!(alarms::list_alarms, alarms::raise_alarm))
        .routes(routes!(alarms::alarm_counts))
        .routes(routes!(alarms::alarm_stream))
        .routes(routes!(alarms::get_alarm))
        .routes(routes!(alarms::acknowledge_alarm))
        .routes(routes!(alarms::clear_alarm))
        .routes(routes!(alarms::alarm_history))
        .routes(routes!(alarms::list_channels))
        .routes(routes!(
            alarms::get_channel,
            alarms::put_channel,
            alarms::delete_channel
        ))
        .routes(routes!(alarms::test_channel))
        .routes(routes!(alarms::channel_deliveries))
        .routes(routes!(broker::list_sessions))
        .routes(routes!(broker::get_session, broker::end_session))
        .routes(routes!(broker::list_subscriptions))
        .routes(routes!(broker::list_retained))
        .routes(routes!(broker::get_retained, broker::delete_retained))
        .routes(routes!(broker::broker_stats))
        .routes(routes!(broker::broker_sys))
}

/// The API's routes under [`PREFIX`] and the InfluxDB v2 write route, and their OpenAPI document.
pub fn build() -> (axum::Router<ApiState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest(PREFIX, routes())
        .routes(
            routes!(crate::influx::write_v2)
                .layer(DefaultBodyLimit::max(crate::influx::BODY_LIMIT)),
        )
        .split_for_parts()
}

/// The OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    build().1
}

/// Query parameters as a handler receives them, from literal pairs (for the modules' tests).
#[cfg(test)]
pub(crate) fn test_pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
    q.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
