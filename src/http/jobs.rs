//! Jobs and runs over HTTP: list jobs, start and cancel runs, run history.

use std::collections::BTreeMap;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::{read_body, AppState, Caller};
use crate::jobs::run::Trigger;
use crate::jobs::supervisor::StartError;

impl From<StartError> for ApiError {
    fn from(e: StartError) -> Self {
        match e {
            StartError::UnknownJob(_) => ApiError::NotFound(e.to_string()),
            StartError::BadParams(m) => ApiError::BadRequest(m),
            StartError::Busy { .. } => ApiError::Conflict(e.to_string()),
            StartError::Store(e) => e.into(),
            StartError::Stopped => ApiError::Unavailable(e.to_string()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    #[serde(default)]
    params: BTreeMap<String, Value>,
    #[serde(default)]
    trigger: Option<Trigger>,
}

fn param_text(name: &str, value: Value) -> Result<String, ApiError> {
    match value {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err(ApiError::BadRequest(format!(
            "parameter {name:?} must be a string, number or boolean"
        ))),
    }
}

pub async fn list(State(app): State<AppState>, Caller(who): Caller) -> Result<Response, ApiError> {
    app.auth.require_any(&who)?;
    let jobs = app.jobs.states().await?;
    Ok(Json(json!({ "jobs": jobs })).into_response())
}

pub async fn start(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(name): Path<String>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    app.auth.require_admin(&who)?;
    if app.jobs.spec(&name).is_none() {
        return Err(ApiError::NotFound(format!("no job named {name:?}")));
    }
    let body = read_body(request.into_body()).await?;
    let body: StartBody = if body.iter().all(u8::is_ascii_whitespace) {
        StartBody {
            params: BTreeMap::new(),
            trigger: None,
        }
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("malformed run request: {e}")))?
    };
    let params = body
        .params
        .into_iter()
        .map(|(k, v)| param_text(&k, v).map(|v| (k, v)))
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    let trigger = match body.trigger {
        None => Trigger::Api,
        Some(Trigger::Schedule) => {
            return Err(ApiError::BadRequest(
                "trigger must be api, cli or ui".into(),
            ))
        }
        Some(t) => t,
    };
    match app.jobs.start_run(&name, params, trigger).await {
        Ok(run) => Ok((StatusCode::ACCEPTED, Json(run)).into_response()),
        Err(StartError::Busy { job, limit, run }) => {
            let body = json!({
                "error": {"code": "busy", "message": format!("job {job:?} is busy (concurrency {limit})")},
                "run": run,
            });
            Ok((StatusCode::CONFLICT, Json(body)).into_response())
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn runs_of_job(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    app.auth.require_any(&who)?;
    if app.jobs.spec(&name).is_none() {
        return Err(ApiError::NotFound(format!("no job named {name:?}")));
    }
    let mut limit = 50usize;
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if k == "limit" {
            let n: usize = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                ApiError::BadRequest(format!("limit={v:?} must be a whole number ≥ 1"))
            })?;
            limit = n.min(1000);
        }
    }
    let runs = app.jobs.runs_of(&name, limit).await?;
    Ok(Json(json!({ "runs": runs })).into_response())
}

pub async fn get_run(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    app.auth.require_any(&who)?;
    match app.jobs.run(&id).await? {
        Some(run) => Ok(Json(run).into_response()),
        None => Err(ApiError::NotFound(format!("no run {id:?}"))),
    }
}

pub async fn cancel_run(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    app.auth.require_admin(&who)?;
    match app.jobs.cancel(&id).await? {
        None => Err(ApiError::NotFound(format!("no run {id:?}"))),
        Some((run, false)) => Ok((StatusCode::OK, Json(run)).into_response()),
        Some((run, true)) => Ok((StatusCode::ACCEPTED, Json(run)).into_response()),
    }
}
