//! Publish, read, long-poll, list, inspect and delete channels over plain HTTP.

use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::error::ApiError;
use super::{peer, read_body, AppState, Caller};
use crate::engine::Published;
use crate::hub::types::{
    push_json_str, ChannelName, Data, DataError, Epoch, EventName, MessageId, NewMessage, Seq,
    SharedMessage,
};
use crate::hub::ReadResult;

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;
pub const MAX_WAIT_SECS: f64 = 60.0;

pub fn parse_channel(raw: &str) -> Result<ChannelName, ApiError> {
    ChannelName::parse(raw).map_err(|e| ApiError::BadRequest(e.0))
}

/// Lets `"data": null` through as a value while a missing `data` stays `None`.
pub fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// One message as a publisher sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishItem {
    #[serde(default, deserialize_with = "present")]
    pub data: Option<Box<RawValue>>,
    #[serde(default)]
    pub event: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
}

impl PublishItem {
    /// Validates the fields; `data` is compacted and size-checked.
    pub fn into_new_message(self) -> Result<NewMessage, ApiError> {
        let raw = self
            .data
            .ok_or_else(|| ApiError::BadRequest("`data` is required (null is a value)".into()))?;
        let data = Data::from_valid_json(raw.get()).map_err(|e| match e {
            DataError::TooLarge(_) => ApiError::TooLarge(e.to_string()),
            DataError::Invalid(_) => ApiError::BadRequest(e.to_string()),
        })?;
        let event = match self.event {
            Some(e) => EventName::parse(&e).map_err(|e| ApiError::BadRequest(e.0))?,
            None => EventName::default(),
        };
        let id = self
            .id
            .map(|i| MessageId::parse(&i).map_err(|e| ApiError::BadRequest(e.0)))
            .transpose()?;
        Ok(NewMessage { id, event, data })
    }
}

fn parse_publish_body(body: &[u8]) -> Result<(Vec<NewMessage>, bool), ApiError> {
    let bad = |e: serde_json::Error| ApiError::BadRequest(format!("malformed JSON: {e}"));
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        Some(b'[') => {
            let items: Vec<PublishItem> = serde_json::from_slice(body).map_err(bad)?;
            if items.is_empty() {
                return Err(ApiError::BadRequest(
                    "a batch needs at least one message".into(),
                ));
            }
            let batch = items
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    item.into_new_message().map_err(|e| match e {
                        ApiError::TooLarge(m) => ApiError::TooLarge(format!("message {i}: {m}")),
                        ApiError::BadRequest(m) => {
                            ApiError::BadRequest(format!("message {i}: {m}"))
                        }
                        other => other,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((batch, true))
        }
        Some(b'{') => {
            let item: PublishItem = serde_json::from_slice(body).map_err(bad)?;
            Ok((vec![item.into_new_message()?], false))
        }
        _ => Err(ApiError::BadRequest(
            "body must be a JSON object {\"data\":…} or an array of them".into(),
        )),
    }
}

fn result_json(channel: &ChannelName, p: &Published) -> serde_json::Value {
    json!({"channel": channel, "seq": p.seq, "id": p.id, "duplicate": p.duplicate})
}

pub async fn publish(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(ch): Path<String>,
    request: Request<axum::body::Body>,
) -> Result<Response, ApiError> {
    let channel = parse_channel(&ch)?;
    app.auth.can_publish(&who, &channel)?;
    let ip = peer(request.extensions()).map(|a| a.ip());
    let body = read_body(request.into_body()).await?;
    let (batch, is_batch) = parse_publish_body(&body)?;
    if let Some(ip) = ip {
        if !app
            .rate
            .allow(ip, u32::try_from(batch.len()).unwrap_or(u32::MAX))
        {
            return Err(ApiError::RateLimited(
                "publish rate limit for this address exceeded; retry in a second".into(),
            ));
        }
    }
    let results = app.hub.publish(&channel, batch).await?;
    let all_duplicates = results.iter().all(|r| r.duplicate);
    let status = if all_duplicates {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let body = if is_batch {
        let list: Vec<_> = results.iter().map(|r| result_json(&channel, r)).collect();
        json!({ "messages": list })
    } else {
        match results.first() {
            Some(r) => result_json(&channel, r),
            None => return Err(ApiError::Internal("publish returned no result".into())),
        }
    };
    Ok((status, Json(body)).into_response())
}

/// Query parameters of reads, SSE and long-polls, validated with clear messages.
#[derive(Debug, Default)]
pub struct ReadQuery {
    pub since: Option<Seq>,
    pub limit: usize,
    pub wait: Option<Duration>,
    pub epoch: Option<Epoch>,
}

pub fn parse_read_query(query: Option<&str>) -> Result<ReadQuery, ApiError> {
    let mut q = ReadQuery {
        limit: DEFAULT_LIMIT,
        ..Default::default()
    };
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*key {
            "since" => {
                let n: Seq = value.trim().parse().map_err(|_| {
                    ApiError::BadRequest(format!("since={value:?} must be a whole number ≥ 0"))
                })?;
                q.since = Some(n);
            }
            "limit" => {
                let n: u64 = value.trim().parse().map_err(|_| {
                    ApiError::BadRequest(format!("limit={value:?} must be a whole number ≥ 1"))
                })?;
                if n == 0 {
                    return Err(ApiError::BadRequest("limit must be at least 1".into()));
                }
                q.limit = n.min(MAX_LIMIT as u64) as usize;
            }
            "wait" => {
                let secs: f64 = value
                    .trim()
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "wait={value:?} must be a number of seconds ≥ 0"
                        ))
                    })?;
                q.wait = Some(Duration::from_secs_f64(secs.min(MAX_WAIT_SECS)));
            }
            "epoch" => {
                q.epoch = Some(Epoch::parse(&value).map_err(|e| ApiError::BadRequest(e.0))?);
            }
            _ => {}
        }
    }
    Ok(q)
}

/// `{"channel","epoch","messages":[…],"last_seq","truncated"}`, splicing the stored JSON.
pub fn read_response_body(channel: &ChannelName, r: &ReadResult) -> Bytes {
    let size: usize = r.messages.iter().map(|m| m.json.len() + 1).sum();
    let mut out = Vec::with_capacity(size + 128);
    out.extend_from_slice(b"{\"channel\":");
    push_json_str(&mut out, channel.as_str());
    out.extend_from_slice(b",\"epoch\":");
    push_json_str(&mut out, r.epoch.as_str());
    out.extend_from_slice(b",\"messages\":[");
    push_messages(&mut out, &r.messages);
    out.extend_from_slice(b"],\"last_seq\":");
    out.extend_from_slice(r.last_seq.to_string().as_bytes());
    out.extend_from_slice(b",\"truncated\":");
    out.extend_from_slice(if r.truncated { b"true" } else { b"false" });
    out.push(b'}');
    Bytes::from(out)
}

fn push_messages(out: &mut Vec<u8>, messages: &[SharedMessage]) {
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&m.json);
    }
}

pub fn json_response(status: StatusCode, body: Bytes) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

pub async fn read(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(ch): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let channel = parse_channel(&ch)?;
    app.auth.can_read(&who, &channel)?;
    let q = parse_read_query(query.as_deref())?;
    let since = q.since.unwrap_or(0);
    let (result, transport) = match q.wait {
        Some(wait) => {
            let _open = super::sse::ConnectionGauge::new(app.hub.metrics().clone(), "longpoll");
            let result = app
                .hub
                .read_wait(
                    &channel,
                    since,
                    q.limit,
                    q.epoch.as_ref(),
                    wait,
                    &app.shutdown,
                )
                .await?;
            (result, "longpoll")
        }
        None => (
            app.hub
                .read(&channel, since, q.limit, q.epoch.as_ref())
                .await?,
            "poll",
        ),
    };
    if let Some(last) = result.messages.last() {
        app.hub.metrics().delivered(
            &crate::metrics::transport(transport),
            last.time_ms,
            result.messages.len() as u64,
        );
    }
    Ok(json_response(
        StatusCode::OK,
        read_response_body(&channel, &result),
    ))
}

fn channel_json(info: &crate::hub::ChannelInfo) -> serde_json::Value {
    json!({
        "name": info.meta.name,
        "epoch": info.meta.epoch,
        "last_seq": info.meta.last_seq,
        "messages": info.meta.messages,
        "subscribers": info.subscribers,
        "last_activity": info.meta.last_activity_ms.map(crate::clock::rfc3339_ms),
    })
}

pub async fn list(State(app): State<AppState>, Caller(who): Caller) -> Result<Response, ApiError> {
    app.auth.require_any(&who)?;
    let channels = app.hub.channels().await?;
    let visible: Vec<_> = channels
        .iter()
        .filter(|c| app.auth.can_read(&who, &c.meta.name).is_ok())
        .map(channel_json)
        .collect();
    Ok(Json(json!({ "channels": visible })).into_response())
}

pub async fn info(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(ch): Path<String>,
) -> Result<Response, ApiError> {
    let channel = parse_channel(&ch)?;
    app.auth.can_read(&who, &channel)?;
    let info = app.hub.channel(&channel).await?;
    Ok(Json(channel_json(&info)).into_response())
}

pub async fn delete(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(ch): Path<String>,
) -> Result<Response, ApiError> {
    let channel = parse_channel(&ch)?;
    app.auth.require_admin(&who)?;
    app.hub.delete_channel(&channel).await?;
    let info = app.hub.channel(&channel).await?;
    Ok(Json(channel_json(&info)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_validation() {
        let ok = parse_read_query(Some("since=5&limit=5000&wait=9999")).unwrap();
        assert_eq!(ok.since, Some(5));
        assert_eq!(ok.limit, MAX_LIMIT);
        assert_eq!(ok.wait, Some(Duration::from_secs(60)));
        for bad in [
            "since=-1",
            "since=abc",
            "limit=0",
            "limit=-3",
            "wait=-1",
            "wait=x",
            "epoch=bad!",
        ] {
            assert!(
                matches!(parse_read_query(Some(bad)), Err(ApiError::BadRequest(_))),
                "{bad}"
            );
        }
        assert_eq!(parse_read_query(None).unwrap().limit, DEFAULT_LIMIT);
    }

    #[test]
    fn publish_bodies() {
        let (one, batch) = parse_publish_body(br#"{"data":null}"#).unwrap();
        assert_eq!((one.len(), batch), (1, false));
        assert_eq!(one[0].data.as_str(), "null");
        let (many, batch) =
            parse_publish_body(br#"[{"data":1,"id":"a"},{"data":{"x" : 2},"event":"e"}]"#).unwrap();
        assert_eq!((many.len(), batch), (2, true));
        assert_eq!(many[1].data.as_str(), "{\"x\":2}");
        for bad in [
            &b"{}"[..],
            b"[]",
            b"not json",
            b"{\"data\":1,\"extra\":2}",
            b"{\"data\":1,\"event\":\"bad event\"}",
            b"{\"data\":1,\"id\":\"\"}",
            b"42",
            b"",
        ] {
            assert!(
                matches!(parse_publish_body(bad), Err(ApiError::BadRequest(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let big = format!("{{\"data\":\"{}\"}}", "x".repeat(70_000));
        assert!(matches!(
            parse_publish_body(big.as_bytes()),
            Err(ApiError::TooLarge(_))
        ));
    }
}
