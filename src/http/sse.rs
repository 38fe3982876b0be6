//! Server-Sent Events: `id: {epoch}:{seq}` + `data: {message}`, resumable by `Last-Event-ID`.

use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, Stream};

use super::channels::{parse_channel, parse_read_query};
use super::error::ApiError;
use super::{AppState, Caller};
use crate::hub::types::{Epoch, Seq};
use crate::hub::{Event, Start, Subscription};
use crate::metrics::{transport, Metrics};

pub const PING_EVERY: Duration = Duration::from_secs(15);

/// Parses `Last-Event-ID`: `{epoch}:{seq}` or a bare seq.
pub fn parse_last_event_id(raw: &str) -> Result<(Seq, Option<Epoch>), ApiError> {
    let bad = || {
        ApiError::BadRequest(format!(
            "Last-Event-ID {raw:?} is neither \"epoch:seq\" nor a seq"
        ))
    };
    let raw = raw.trim();
    match raw.rsplit_once(':') {
        Some((epoch, seq)) => {
            let epoch = Epoch::parse(epoch).map_err(|_| bad())?;
            Ok((seq.parse().map_err(|_| bad())?, Some(epoch)))
        }
        None => Ok((raw.parse().map_err(|_| bad())?, None)),
    }
}

pub fn reset_frame(epoch: &Epoch, first_seq: Seq) -> Bytes {
    Bytes::from(format!(
        "event: reset\ndata: {{\"epoch\":\"{epoch}\",\"first_seq\":{first_seq}}}\n\n"
    ))
}

pub async fn events(
    State(app): State<AppState>,
    Caller(who): Caller,
    Path(ch): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let channel = parse_channel(&ch)?;
    app.auth.can_read(&who, &channel)?;
    let q = parse_read_query(query.as_deref())?;
    let last_event_id = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::BadRequest("Last-Event-ID is not text".into()))
                .and_then(parse_last_event_id)
        })
        .transpose()?;
    let start = match (last_event_id, q.since) {
        (Some((seq, epoch)), _) => Start::Since(seq, epoch.or(q.epoch)),
        (None, Some(since)) => Start::Since(since, q.epoch),
        (None, None) => Start::Live,
    };
    let (subscribed, sub) = app.hub.subscribe(&channel, start).await?;
    let mut first = BytesMut::from(&b"retry: 2000\n\n"[..]);
    if subscribed.truncated {
        first.extend_from_slice(&reset_frame(&subscribed.epoch, subscribed.first_seq));
    }
    let stream = event_stream(
        sub,
        first.freeze(),
        app.hub.metrics().clone(),
        app.shutdown.clone(),
    );
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

struct SseState {
    sub: Subscription,
    first: Option<Bytes>,
    ping: tokio::time::Interval,
    metrics: std::sync::Arc<Metrics>,
    shutdown: tokio_util::sync::CancellationToken,
    _connection: ConnectionGauge,
}

/// Counts an open connection for as long as it lives.
pub struct ConnectionGauge {
    metrics: std::sync::Arc<Metrics>,
    label: crate::metrics::TransportLabel,
}

impl ConnectionGauge {
    pub fn new(metrics: std::sync::Arc<Metrics>, name: &'static str) -> Self {
        let label = transport(name);
        metrics.connections.get_or_create(&label).inc();
        Self { metrics, label }
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.metrics.connections.get_or_create(&self.label).dec();
    }
}

/// The body: pulled by hyper only as fast as the client reads, so a slow client just lags
/// (its cursor catches up from the store) and never buffers without bound.
fn event_stream(
    sub: Subscription,
    first: Bytes,
    metrics: std::sync::Arc<Metrics>,
    shutdown: tokio_util::sync::CancellationToken,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = SseState {
        sub,
        first: Some(first),
        ping,
        _connection: ConnectionGauge::new(metrics.clone(), "sse"),
        metrics,
        shutdown,
    };
    stream::unfold(state, |mut s| async move {
        if let Some(first) = s.first.take() {
            return Some((Ok(first), s));
        }
        let label = transport("sse");
        tokio::select! {
            biased;
            _ = s.shutdown.cancelled() => None,
            _ = s.ping.tick() => Some((Ok(Bytes::from_static(b": ping\n\n")), s)),
            event = s.sub.next() => match event {
                Err(error) => {
                    tracing::warn!(%error, "SSE stream ends: the store failed");
                    None
                }
                Ok(Event::Reset { epoch, first_seq }) => Some((Ok(reset_frame(&epoch, first_seq)), s)),
                Ok(Event::Messages(messages)) => {
                    let epoch = s.sub.epoch().clone();
                    let mut out = BytesMut::new();
                    for m in &messages {
                        out.extend_from_slice(&m.sse_frame(&epoch));
                    }
                    if let Some(last) = messages.last() {
                        s.metrics.delivered(&label, last.time_ms, messages.len() as u64);
                    }
                    s.ping.reset();
                    Some((Ok(out.freeze()), s))
                }
            },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_event_ids() {
        assert_eq!(parse_last_event_id("42").unwrap(), (42, None));
        let (seq, epoch) = parse_last_event_id("abcdefgh:7").unwrap();
        assert_eq!((seq, epoch.unwrap().as_str()), (7, "abcdefgh"));
        for bad in ["", "x", "-1", "abc:1", "abcdefgh:", "abcdefgh:x", ":5"] {
            assert!(parse_last_event_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reset_frames() {
        let e = Epoch::parse("abcdefgh").unwrap();
        assert_eq!(
            &reset_frame(&e, 3)[..],
            b"event: reset\ndata: {\"epoch\":\"abcdefgh\",\"first_seq\":3}\n\n"
        );
    }
}
