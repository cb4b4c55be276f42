//! Per-tenant named documents: groups (and their static members), device types and policies.

use axum::Json;
use axum::http::StatusCode;
use ferrohub_registry::RegistryError;
use ferrohub_registry::model::{DeviceType, Group, NamedPolicy};
use ferrohub_registry::policy::PolicyDocument;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ApiResult, CommonErrors};
use crate::extract::{ApiPath, Body, Caller, parse_json};

/// Parses a JSON object whose `name` comes from the URL: the body may omit it, or repeat it.
pub fn named_body<T: DeserializeOwned>(body: &[u8], name: &str) -> ApiResult<T> {
    let mut v: serde_json::Value = parse_json(body)?;
    let Some(obj) = v.as_object_mut() else {
        return Err(ApiError::invalid("the JSON body must be an object"));
    };
    match obj.get("name") {
        None => {
            obj.insert("name".into(), name.into());
        }
        Some(serde_json::Value::String(n)) if n == name => {}
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "the body names {other} but the URL names {name:?}: leave \"name\" out of the body"
            )));
        }
    }
    serde_json::from_value(v)
        .map_err(|e| ApiError::invalid(format!("the JSON body is not valid: {e}")))
}

/// Finds `name` in a listing or answers 404.
pub fn find<T>(items: Vec<T>, what: &str, name: &str, key: impl Fn(&T) -> &str) -> ApiResult<T> {
    items
        .into_iter()
        .find(|i| key(i) == name)
        .ok_or_else(|| RegistryError::NotFound(format!("{what} {name}")).into())
}

// ---- groups --------------------------------------------------------------------------------

/// The tenant's groups: static (explicit members) and dynamic (a device query).
#[utoipa::path(get, path = "/tenants/{tenant}/groups", tag = "groups",
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 200, description = "The groups", body = Vec<Group>), CommonErrors))]
pub async fn list_groups(
    c: Caller,
    ApiPath(tenant): ApiPath<String>,
) -> ApiResult<Json<Vec<Group>>> {
    Ok(Json(c.registry.groups(&c.actor, &tenant).await?))
}

/// A group. Its devices are listed by `GET /tenants/{tenant}/devices?group={group}`.
#[utoipa::path(get, path = "/tenants/{tenant}/groups/{group}", tag = "groups",
    params(("tenant" = String, Path, description = "Tenant id"), ("group" = String, Path, description = "Group name")),
    responses((status = 200, description = "The group", body = Group), CommonErrors))]
pub async fn get_group(
    c: Caller,
    ApiPath((tenant, group)): ApiPath<(String, String)>,
) -> ApiResult<Json<Group>> {
    let groups = c.registry.groups(&c.actor, &tenant).await?;
    Ok(Json(find(groups, "group", &group, |g| &g.name)?))
}

/// Creates or replaces a group (operator). Without `query` it is static: devices join it with
/// `PUT .../members/{device}`. With `query` it is dynamic: its members are the devices that
/// match, at any moment. `name` may be left out of the body.
#[utoipa::path(put, path = "/tenants/{tenant}/groups/{group}", tag = "groups", request_body = Group,
    params(("tenant" = String, Path, description = "Tenant id"), ("group" = String, Path, description = "Group name")),
    responses((status = 200, description = "The group as stored", body = Group), CommonErrors))]
pub async fn put_group(
    c: Caller,
    ApiPath((tenant, group)): ApiPath<(String, String)>,
    Body(body): Body,
) -> ApiResult<Json<Group>> {
    let g: Group = named_body(&body, &group)?;
    Ok(Json(c.registry.put_group(&c.actor, &tenant, g).await?))
}

/// Deletes a group (operator); its devices stay.
#[utoipa::path(delete, path = "/tenants/{tenant}/groups/{group}", tag = "groups",
    params(("tenant" = String, Path, description = "Tenant id"), ("group" = String, Path, description = "Group name")),
    responses((status = 204, description = "The group was deleted"), CommonErrors))]
pub async fn delete_group(
    c: Caller,
    ApiPath((tenant, group)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    c.registry.delete_group(&c.actor, &tenant, &group).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Adds a device to a static group (operator; idempotent).
#[utoipa::path(put, path = "/tenants/{tenant}/groups/{group}/members/{device}", tag = "groups",
    params(
        ("tenant" = String, Path, description = "Tenant id"),
        ("group" = String, Path, description = "Group name"),
        ("device" = String, Path, description = "Device id"),
    ),
    responses((status = 204, description = "The device is a member"), CommonErrors))]
pub async fn add_member(
    c: Caller,
    ApiPath((tenant, group, device)): ApiPath<(String, String, String)>,
) -> ApiResult<StatusCode> {
    c.registry
        .add_to_group(&c.actor, &tenant, &group, &device)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes a device from a static group (operator).
#[utoipa::path(delete, path = "/tenants/{tenant}/groups/{group}/members/{device}", tag = "groups",
    params(
        ("tenant" = String, Path, description = "Tenant id"),
        ("group" = String, Path, description = "Group name"),
        ("device" = String, Path, description = "Device id"),
    ),
    responses((status = 204, description = "The device is no longer a member"), CommonErrors))]
pub async fn remove_member(
    c: Caller,
    ApiPath((tenant, group, device)): ApiPath<(String, String, String)>,
) -> ApiResult<StatusCode> {
    c.registry
        .remove_from_group(&c.actor, &tenant, &group, &device)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- device types --------------------------------------------------------------------------

/// The tenant's device types.
#[utoipa::path(get, path = "/tenants/{tenant}/device-types", tag = "device-types",
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 200, description = "The device types", body = Vec<DeviceType>), CommonErrors))]
pub async fn list_device_types(
    c: Caller,
    ApiPath(tenant): ApiPath<String>,
) -> ApiResult<Json<Vec<DeviceType>>> {
    Ok(Json(c.registry.device_types(&c.actor, &tenant).await?))
}

/// A device type.
#[utoipa::path(get, path = "/tenants/{tenant}/device-types/{name}", tag = "device-types",
    params(("tenant" = String, Path, description = "Tenant id"), ("name" = String, Path, description = "Type name")),
    responses((status = 200, description = "The device type", body = DeviceType), CommonErrors))]
pub async fn get_device_type(
    c: Caller,
    ApiPath((tenant, name)): ApiPath<(String, String)>,
) -> ApiResult<Json<DeviceType>> {
    let types = c.registry.device_types(&c.actor, &tenant).await?;
    Ok(Json(find(types, "device type", &name, |t| &t.name)?))
}

/// Creates or replaces a device type (operator): the tags, attributes and policy new devices of
/// the type start with. `name` may be left out of the body.
#[utoipa::path(put, path = "/tenants/{tenant}/device-types/{name}", tag = "device-types", request_body = DeviceType,
    params(("tenant" = String, Path, description = "Tenant id"), ("name" = String, Path, description = "Type name")),
    responses((status = 200, description = "The device type as stored", body = DeviceType), CommonErrors))]
pub async fn put_device_type(
    c: Caller,
    ApiPath((tenant, name)): ApiPath<(String, String)>,
    Body(body): Body,
) -> ApiResult<Json<DeviceType>> {
    let ty: DeviceType = named_body(&body, &name)?;
    Ok(Json(
        c.registry.put_device_type(&c.actor, &tenant, ty).await?,
    ))
}

/// Deletes a device type (operator); its devices keep their tags and attributes.
#[utoipa::path(delete, path = "/tenants/{tenant}/device-types/{name}", tag = "device-types",
    params(("tenant" = String, Path, description = "Tenant id"), ("name" = String, Path, description = "Type name")),
    responses((status = 204, description = "The device type was deleted"), CommonErrors))]
pub async fn delete_device_type(
    c: Caller,
    ApiPath((tenant, name)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    c.registry
        .delete_device_type(&c.actor, &tenant, &name)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- policies ------------------------------------------------------------------------------

/// The tenant's named authorization policies.
#[utoipa::path(get, path = "/tenants/{tenant}/policies", tag = "policies",
    params(("tenant" = String, Path, description = "Tenant id")),
    responses((status = 200, description = "The policies", body = Vec<NamedPolicy>), CommonErrors))]
pub async fn list_policies(
    c: Caller,
    ApiPath(tenant): ApiPath<String>,
) -> ApiResult<Json<Vec<NamedPolicy>>> {
    Ok(Json(c.registry.policies(&c.actor, &tenant).await?))
}

/// A named policy.
#[utoipa::path(get, path = "/tenants/{tenant}/policies/{name}", tag = "policies",
    params(("tenant" = String, Path, description = "Tenant id"), ("name" = String, Path, description = "Policy name")),
    responses((status = 200, description = "The policy", body = NamedPolicy), CommonErrors))]
pub async fn get_policy(
    c: Caller,
    ApiPath((tenant, name)): ApiPath<(String, String)>,
) -> ApiResult<Json<NamedPolicy>> {
    let policies = c.registry.policies(&c.actor, &tenant).await?;
    Ok(Json(find(policies, "policy", &name, |p| &p.name)?))
}

/// Creates or replaces a named policy (admin). The body is the policy document:
/// `{"version": 1, "statements": [{"effect": "allow"|"deny", "actions": [...], "resources": [...]}]}`.
/// Connected devices under the policy get the new one at once. A document that does not
/// validate is refused with 400 and the reason.
#[utoipa::path(put, path = "/tenants/{tenant}/policies/{name}", tag = "policies",
    request_body(content = serde_json::Value, description = "The policy document",
        example = json!({"version": 1, "statements": [
            {"effect": "allow", "actions": ["connect"], "resources": ["${device.id}"]},
            {"effect": "allow", "actions": ["publish", "subscribe", "receive"], "resources": ["devices/${device.id}/#"]}
        ]})),
    params(("tenant" = String, Path, description = "Tenant id"), ("name" = String, Path, description = "Policy name")),
    responses((status = 200, description = "The policy as stored", body = NamedPolicy), CommonErrors))]
pub async fn put_policy(
    c: Caller,
    ApiPath((tenant, name)): ApiPath<(String, String)>,
    Body(body): Body,
) -> ApiResult<Json<NamedPolicy>> {
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::invalid("the policy document is not UTF-8 text"))?;
    let doc = PolicyDocument::from_json(text).map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(Json(
        c.registry.put_policy(&c.actor, &tenant, &name, doc).await?,
    ))
}

/// Deletes a named policy (admin); devices that named it fall back to the default policy.
#[utoipa::path(delete, path = "/tenants/{tenant}/policies/{name}", tag = "policies",
    params(("tenant" = String, Path, description = "Tenant id"), ("name" = String, Path, description = "Policy name")),
    responses((status = 204, description = "The policy was deleted"), CommonErrors))]
pub async fn delete_policy(
    c: Caller,
    ApiPath((tenant, name)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    c.registry.delete_policy(&c.actor, &tenant, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
