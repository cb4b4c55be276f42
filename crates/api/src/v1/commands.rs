//! `/tenants/{tenant}/devices/{device}/commands/{name}` and `…/queued-commands`: commands to
//! devices, direct (wait for the answer) or queued (durable, delivered when the device is online).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ferrohub_registry::model::Role;
use ferrohub_twins::commands::{CommandState, Commands, QueuedCommand, payload_value};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::ApiState;
use crate::error::{ApiError, ApiResult, CommonErrors};
use crate::extract::{ApiPath, ApiQuery, Body, Caller};

fn commands_of(state: &ApiState) -> Result<Arc<Commands>, ApiError> {
    state.commands.clone().ok_or_else(ApiError::unavailable)
}

/// How to send a command.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct InvokeParams {
    /// `direct` (default: wait for the device's answer) or `queued` (store it; deliver when the
    /// device is online).
    pub mode: Option<String>,
    /// Direct: seconds to wait for the answer, 1 to 300 (default 30).
    pub timeout: Option<u64>,
    /// Queued: seconds the command may wait for the device (default `commands.default_ttl_secs`).
    pub ttl: Option<u64>,
}

/// The device's answer to a direct command.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DirectResponse {
    /// The device's status (2xx: success).
    pub status: u16,
    /// Its payload (JSON when it is JSON, else text; `null` when empty).
    pub payload: Value,
}

/// Sends a command to a device. The request body is the command's payload, passed to the device
/// unchanged (JSON recommended). Direct mode answers with the device's status and payload, 409
/// `device_offline` at once when the device is not connected, 409 `device_not_listening` when
/// it is connected but not subscribed to its command topic, 504 `command_timeout` when it does
/// not answer in time. Queued mode answers 202 with the stored command once it is durable; follow
/// it at `…/queued-commands/{id}`.
#[utoipa::path(post, path = "/tenants/{tenant}/devices/{device}/commands/{name}", tag = "commands",
    request_body(content = Value, description = "The command payload", content_type = "application/json"),
    params(("tenant" = String, Path, description = "Tenant id"), ("device" = String, Path, description = "Device id"),
        ("name" = String, Path, description = "Command name (letters, digits, '-', '_', '.')"), InvokeParams),
    responses(
        (status = 200, description = "Direct: the device's answer", body = DirectResponse),
        (status = 202, description = "Queued: the stored command", body = QueuedCommand),
        (status = 504, description = "Direct: no answer in time", body = crate::error::ErrorBody),
        CommonErrors))]
pub async fn invoke_command(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, device, name)): ApiPath<(String, String, String)>,
    ApiQuery(p): ApiQuery<InvokeParams>,
    Body(payload): Body,
) -> ApiResult<Response> {
    c.actor.require(Role::Operator, Some(&tenant))?;
    c.registry.device(&c.actor, &tenant, &device).await?;
    let commands = commands_of(&state)?;
    match p.mode.as_deref().unwrap_or("direct") {
        "direct" => {
            if p.ttl.is_some() {
                return Err(ApiError::invalid(
                    "ttl applies to queued commands (mode=queued)",
                ));
            }
            let timeout = Duration::from_secs(p.timeout.unwrap_or(30));
            let r = commands
                .direct(&tenant, &device, &name, payload, timeout)
                .await?;
            Ok(Json(DirectResponse {
                status: r.status,
                payload: payload_value(&r.payload),
            })
            .into_response())
        }
        "queued" => {
            if p.timeout.is_some() {
                return Err(ApiError::invalid(
                    "timeout applies to direct commands; queued commands take ttl",
                ));
            }
            let cmd = commands
                .enqueue(
                    &tenant,
                    &device,
                    &name,
                    payload,
                    p.ttl.map(Duration::from_secs),
                    &format!("operator:{}", c.actor.name),
                )
                .await?;
            Ok((StatusCode::ACCEPTED, Json(cmd)).into_response())
        }
        other => Err(ApiError::invalid(format!(
            "mode={other:?}: use direct or queued"
        ))),
    }
}

/// A listing of queued commands.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only commands in this state.
    pub state: Option<CommandState>,
    /// Most commands, newest first (default 100, at most 1000).
    pub limit: Option<usize>,
}

/// The device's queued commands, newest first.
#[utoipa::path(get, path = "/tenants/{tenant}/devices/{device}/queued-commands", tag = "commands",
    params(("tenant" = String, Path, description = "Tenant id"), ("device" = String, Path, description = "Device id"), ListParams),
    responses((status = 200, description = "Commands", body = Vec<QueuedCommand>), CommonErrors))]
pub async fn list_queued(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, device)): ApiPath<(String, String)>,
    ApiQuery(p): ApiQuery<ListParams>,
) -> ApiResult<Json<Vec<QueuedCommand>>> {
    c.registry.device(&c.actor, &tenant, &device).await?;
    Ok(Json(
        commands_of(&state)?
            .list(&tenant, &device, p.state, p.limit.unwrap_or(100))
            .await?,
    ))
}

/// One queued command: its state, attempts and, once answered, the device's status and payload.
#[utoipa::path(get, path = "/tenants/{tenant}/devices/{device}/queued-commands/{id}", tag = "commands",
    params(("tenant" = String, Path, description = "Tenant id"), ("device" = String, Path, description = "Device id"),
        ("id" = String, Path, description = "Command id")),
    responses((status = 200, description = "The command", body = QueuedCommand), CommonErrors))]
pub async fn get_queued(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, device, id)): ApiPath<(String, String, String)>,
) -> ApiResult<Json<QueuedCommand>> {
    c.registry.device(&c.actor, &tenant, &device).await?;
    Ok(Json(commands_of(&state)?.get(&tenant, &device, &id).await?))
}

/// Cancels a queued command that has not finished (a device that already received it is not
/// told; its later answer is ignored).
#[utoipa::path(delete, path = "/tenants/{tenant}/devices/{device}/queued-commands/{id}", tag = "commands",
    params(("tenant" = String, Path, description = "Tenant id"), ("device" = String, Path, description = "Device id"),
        ("id" = String, Path, description = "Command id")),
    responses((status = 200, description = "The cancelled command", body = QueuedCommand), CommonErrors))]
pub async fn cancel_queued(
    c: Caller,
    State(state): State<ApiState>,
    ApiPath((tenant, device, id)): ApiPath<(String, String, String)>,
) -> ApiResult<Json<QueuedCommand>> {
    c.actor.require(Role::Operator, Some(&tenant))?;
    c.registry.device(&c.actor, &tenant, &device).await?;
    Ok(Json(
        commands_of(&state)?.cancel(&tenant, &device, &id).await?,
    ))
}
