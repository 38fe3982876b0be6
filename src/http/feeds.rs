//! Feeds over HTTP: list with poll state, add at run time, remove.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::{read_body, AppState, Caller};
use crate::feeds::poller::FeedsError;
use crate::jobs::spec::{feed_spec, FeedSource};

impl From<FeedsError> for ApiError {
    fn from(e: FeedsError) -> Self {
        match e {
            FeedsError::Unknown(_) => ApiError::NotFound(e.to_string()),
            FeedsError::Taken(_) | FeedsError::FromConfig(_) => ApiError::Conflict(e.to_string()),
            FeedsError::Store(e) => e.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddFeed {
    name: String,
    url: String,
    every: Option<String>,
    channel: Option<String>,
}

pub async fn list(State(app): State<AppState>, Caller(who): Caller) -> Result<Response, ApiError> {
    app.auth.require_any(&who)?;
    Ok(Json(json!({ "feeds": app.feeds.list() })).into_response())
}

pub async fn add(
    State(app): State<AppState>,
    Caller(who): Caller,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    app.auth.require_admin(&who)?;
    let body = read_body(request.into_body()).await?;
    let add: AddFeed = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("malformed feed: {e}")))?;
    let spec = feed_spec(
        "",
        &add.name,
        &add.url,
        add.every.as_deref(),
        add.channel.as_deref(),
        FeedSource::Api,
    )
    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let feed = app.feeds.add(spec).await?;
    Ok((StatusCode::CREATED, Json(feed)).into_response())
}

pub async fn remove(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    app.auth.require_admin(&who)?;
    let feed = app.feeds.remove(&name).await?;
    Ok(Json(feed).into_response())
}
