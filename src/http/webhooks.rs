//! Webhooks over HTTP (SPEC §5): register, list, inspect, delete, enable/disable, rotate the
//! secret, replay history, and the attempts log. All of it is an admin operation.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::{read_body, AppState, Caller};
use crate::hub::types::ChannelName;
use crate::webhooks::{NewWebhook, WebhooksError};

/// The most attempts one `deliveries` answer holds.
const MAX_DELIVERIES: usize = 1_000;

impl From<WebhooksError> for ApiError {
    fn from(e: WebhooksError) -> Self {
        match e {
            WebhooksError::Unknown(_) => ApiError::NotFound(e.to_string()),
            WebhooksError::Invalid(_) => ApiError::BadRequest(e.to_string()),
            WebhooksError::Conflict(_) => ApiError::Conflict(e.to_string()),
            WebhooksError::Stopped => ApiError::Unavailable(e.to_string()),
            WebhooksError::Store(e) => e.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Register {
    url: String,
    channels: Vec<String>,
    description: Option<String>,
    since: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Replay {
    channel: String,
    #[serde(default)]
    since: u64,
}

#[derive(Debug, Deserialize)]
pub struct DeliveriesQuery {
    limit: Option<String>,
}

async fn json_body<T: DeserializeOwned>(
    request: axum::extract::Request,
    what: &str,
) -> Result<T, ApiError> {
    let body = read_body(request.into_body()).await?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("malformed {what}: {e}")))
}

pub async fn list(State(app): State<AppState>, Caller(who): Caller) -> Result<Response, ApiError> {
    app.auth.require_admin(&who)?;
    Ok(Json(json!({ "webhooks": app.webhooks.list().await? })).into_response())
}

pub async fn create(
    State(app): State<AppState>,
    Caller(who): Caller,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    app.auth.require_admin(&who)?;
    let r: Register = json_body(request, "webhook").await?;
    let created = app
        .webhooks
        .create(NewWebhook {
            url: r.url,
            channels: r.channels,
            description: r.description,
            since: r.since,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

pub async fn get_one(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    app.auth.require_admin(&who)?;
    Ok(Json(app.webhooks.get(&id).await?).into_response())
}

pub async fn remove(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    app.auth.require_admin(&who)?;
    Ok(Json(app.webhooks.delete(&id).await?).into_response())
}

pub async fn enable(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    app.auth.require_admin(&who)?;
    Ok(Json(app.webhooks.set_enabled(&id, true).await?).into_response())
}

pub async fn disable(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    app.auth.require_admin(&who)?;
    Ok(Json(app.webhooks.set_enabled(&id, false).await?).into_response())
}

pub async fn rotate(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    app.auth.require_admin(&who)?;
    Ok(Json(app.webhooks.rotate(&id).await?).into_response())
}

pub async fn replay(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    app.auth.require_admin(&who)?;
    let r: Replay = json_body(request, "replay").await?;
    let channel = ChannelName::parse(&r.channel).map_err(|e| ApiError::BadRequest(e.0))?;
    let queued = app.webhooks.replay(&id, channel, r.since).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "queued": queued }))).into_response())
}

pub async fn deliveries(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
    Query(q): Query<DeliveriesQuery>,
) -> Result<Response, ApiError> {
    app.auth.require_admin(&who)?;
    let limit = match q.limit.as_deref() {
        None => 100,
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| {
                ApiError::BadRequest(format!("limit {raw:?} is not a positive integer"))
            })?
            .min(MAX_DELIVERIES),
    };
    let list = app.webhooks.deliveries(&id, limit).await?;
    Ok(Json(json!({ "deliveries": list })).into_response())
}
