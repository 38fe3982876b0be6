//! The WebSocket protocol: many subscriptions per connection, publish with ack, ping/pong.
//!
//! One task per connection owns the socket. Each subscription is a small task that walks its
//! cursor and hands batches to the connection's bounded outbound queue. A subscription whose
//! batches cannot be queued for `SLOW_CONSUMER_AFTER` marks the connection slow: it is closed
//! with 4008 so the client resumes from its last seq. Publishers never wait for any of this.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::auth::Principal;
use super::channels::{parse_channel, present, PublishItem};
use super::error::ApiError;
use super::sse::ConnectionGauge;
use super::{AppState, Caller};
use crate::hub::types::{ChannelName, Epoch, Seq, SharedMessage};
use crate::hub::{Event, Start, Subscription};
use crate::metrics::transport;

pub const MAX_FRAME_BYTES: usize = 1024 * 1024;
pub const PING_EVERY: Duration = Duration::from_secs(25);
pub const DEAD_AFTER: Duration = Duration::from_secs(60);
/// Outbound queue length, in batches (of at most `hub::MAX_BATCH` messages and, past the first,
/// `hub::MAX_BATCH_BYTES` bytes), so a stalled client costs at most ~8 MiB of queue.
const OUTBOUND_QUEUE: usize = 16;
/// Publishes a connection may have queued before it must wait for acks.
const PUBLISHES_IN_FLIGHT: usize = 256;
const SLOW_CONSUMER_AFTER: Duration = Duration::from_secs(5);
/// A write the client does not drain in this time ends the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

pub const CLOSE_SERVER_RESTART: u16 = 1012;
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
pub const CLOSE_TOO_BIG: u16 = 1009;
/// How long a connection closed for an oversized frame stays open so the close frame arrives.
const TOO_BIG_LINGER: Duration = Duration::from_secs(2);

enum Outbound {
    Text(Utf8Bytes),
    /// A frame of subscription `.0` (its `subscribed` or an error); dropped if that
    /// subscription was replaced or ended while the frame waited in the queue.
    SubText(u64, Utf8Bytes),
    /// Messages of subscription `.0`; dropped likewise, so a re-subscribe never sees stale
    /// frames of the subscription it replaced (which would repeat seqs).
    Messages(u64, Vec<SharedMessage>),
    Close(u16, &'static str),
}

pub async fn upgrade(
    State(app): State<AppState>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    RawQuery(_query): RawQuery,
    ws: WebSocketUpgrade,
) -> Response {
    // A bad token is a 401 on the upgrade (the spec's WebSocket rule), not a 403.
    let who = match caller {
        Ok(Caller(who)) => who,
        Err(e) => return ApiError::Unauthorized(e.to_string()).into_response(),
    };
    let origin = headers.get("origin").and_then(|o| o.to_str().ok());
    if !super::origin_allowed(&app.cors_origins, origin) {
        return ApiError::Forbidden("origin not allowed".into()).into_response();
    }
    ws.max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(4 * MAX_FRAME_BYTES)
        .on_upgrade(move |socket| {
            let tasks = app.tasks.clone();
            let ip = peer.map(|axum::Extension(axum::extract::ConnectInfo(addr))| addr.ip());
            tasks.track_future(serve_connection(app, who, ip, socket))
        })
}

/// A client frame; every field optional so each op can say precisely what is missing.
#[derive(Debug, Deserialize)]
struct ClientFrame {
    op: Option<String>,
    channel: Option<String>,
    since: Option<Value>,
    epoch: Option<String>,
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
    event: Option<String>,
    id: Option<String>,
    #[serde(rename = "ref")]
    reference: Option<Value>,
}

fn error_frame(
    code: &str,
    message: &str,
    reference: Option<&Value>,
    channel: Option<&str>,
) -> Utf8Bytes {
    let mut v = json!({"op": "error", "code": code, "message": message});
    if let Some(r) = reference {
        v["ref"] = r.clone();
    }
    if let Some(c) = channel {
        v["channel"] = Value::String(c.to_owned());
    }
    Utf8Bytes::from(v.to_string())
}

fn api_error_frame(e: &ApiError, reference: Option<&Value>, channel: Option<&str>) -> Utf8Bytes {
    error_frame(e.code(), &e.to_string(), reference, channel)
}

struct Connection {
    app: AppState,
    who: Principal,
    out: mpsc::Sender<Outbound>,
    subscriptions: HashMap<ChannelName, (u64, JoinHandle<()>)>,
    /// Ids of the subscriptions whose queued frames may still be written.
    active: HashSet<u64>,
    next_subscription: u64,
    publisher: Option<mpsc::Sender<(ChannelName, PublishItem, Option<Value>)>>,
    /// Direct answers to the frame just handled; the connection loop writes them itself, so
    /// handling a frame never waits on the outbound queue the same loop drains.
    replies: Vec<Utf8Bytes>,
    /// The client's address, for the per-IP publish rate limit.
    ip: Option<std::net::IpAddr>,
}

async fn serve_connection(
    app: AppState,
    who: Principal,
    ip: Option<std::net::IpAddr>,
    socket: WebSocket,
) {
    let _gauge = ConnectionGauge::new(app.hub.metrics().clone(), "ws");
    let (mut sink, mut stream) = socket.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Outbound>(OUTBOUND_QUEUE);
    let mut conn = Connection {
        app: app.clone(),
        who,
        out: out_tx,
        subscriptions: HashMap::new(),
        active: HashSet::new(),
        next_subscription: 1,
        publisher: None,
        replies: Vec::new(),
        ip,
    };
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    let mut last_heard = tokio::time::Instant::now();
    let label = transport("ws");
    let close = loop {
        tokio::select! {
            biased;
            _ = app.shutdown.cancelled() => break Some((CLOSE_SERVER_RESTART, "server restart")),
            item = out_rx.recv() => {
                let Some(item) = item else { break None };
                match write_outbound(&mut sink, item, &mut out_rx, &app, &label, &conn.active).await {
                    WriteOutcome::Ok => {}
                    WriteOutcome::Close(code, reason) => break Some((code, reason)),
                    WriteOutcome::Gone => break None,
                }
            }
            frame = stream.next() => {
                last_heard = tokio::time::Instant::now();
                match frame {
                    None => break None,
                    Some(Err(error)) => {
                        let too_big = matches!(
                            &error.into_inner().downcast_ref::<tungstenite_error::Error>(),
                            Some(tungstenite_error::Error::Capacity(_))
                        );
                        break too_big.then_some((CLOSE_TOO_BIG, "frame over 1 MiB"));
                    }
                    Some(Ok(WsMessage::Text(text))) => conn.handle_text(&text).await,
                    Some(Ok(WsMessage::Binary(_))) => conn.reply(error_frame(
                        "bad_request", "binary frames are not part of the protocol; send JSON text", None, None,
                    )),
                    Some(Ok(WsMessage::Close(_))) => break None,
                    Some(Ok(_)) => {} // ping/pong: tungstenite answers pings itself
                }
                if !conn.replies.is_empty() && !write_replies(&mut sink, &mut conn.replies).await {
                    break None;
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > DEAD_AFTER {
                    break None;
                }
                if sink.send(WsMessage::Ping(bytes::Bytes::new())).await.is_err() {
                    break None;
                }
            }
        }
    };
    for (_, (_, task)) in conn.subscriptions.drain() {
        task.abort();
    }
    if let Some((code, reason)) = close {
        let frame = WsMessage::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }));
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = sink.send(frame).await;
            let _ = sink.close().await;
        })
        .await;
        if code == CLOSE_TOO_BIG {
            // The rest of the oversized frame is still unread; closing the socket now makes the
            // kernel answer with a reset, which can destroy the close frame before the client
            // reads it. Keep the socket open a moment so the client learns why (1009).
            tokio::select! {
                _ = tokio::time::sleep(TOO_BIG_LINGER) => {}
                _ = app.shutdown.cancelled() => {}
            }
        }
    }
}

/// tungstenite's error type, reached through axum's boxed error.
mod tungstenite_error {
    pub use tungstenite::Error;
}

enum WriteOutcome {
    Ok,
    Close(u16, &'static str),
    Gone,
}

/// Writes one queued item and whatever else is already queued, then flushes once.
async fn write_outbound(
    sink: &mut futures_util::stream::SplitSink<WebSocket, WsMessage>,
    first: Outbound,
    rx: &mut mpsc::Receiver<Outbound>,
    app: &AppState,
    label: &crate::metrics::TransportLabel,
    active: &HashSet<u64>,
) -> WriteOutcome {
    let write = async {
        let mut item = Some(first);
        let mut budget = 64;
        while let Some(current) = item.take() {
            match current {
                Outbound::Close(code, reason) => return Ok(Some((code, reason))),
                Outbound::Text(text) => sink.feed(WsMessage::Text(text)).await?,
                Outbound::SubText(sub, text) => {
                    if active.contains(&sub) {
                        sink.feed(WsMessage::Text(text)).await?
                    }
                }
                Outbound::Messages(sub, _) if !active.contains(&sub) => {}
                Outbound::Messages(_, messages) => {
                    for m in &messages {
                        match Utf8Bytes::try_from(m.ws_frame()) {
                            Ok(text) => sink.feed(WsMessage::Text(text)).await?,
                            Err(_) => {
                                tracing::error!(seq = m.seq, "stored message is not UTF-8; skipped")
                            }
                        }
                    }
                    if let Some(last) = messages.last() {
                        app.hub
                            .metrics()
                            .delivered(label, last.time_ms, messages.len() as u64);
                    }
                }
            }
            budget -= 1;
            if budget > 0 {
                item = rx.try_recv().ok();
            }
        }
        sink.flush().await?;
        Ok::<_, axum::Error>(None)
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(None)) => WriteOutcome::Ok,
        Ok(Ok(Some((code, reason)))) => WriteOutcome::Close(code, reason),
        Ok(Err(_)) => WriteOutcome::Gone,
        Err(_) => {
            app.hub.metrics().slow_consumers.inc();
            WriteOutcome::Gone
        }
    }
}

/// Writes the direct replies of one client frame; false when the client is gone or stuck.
async fn write_replies(
    sink: &mut futures_util::stream::SplitSink<WebSocket, WsMessage>,
    replies: &mut Vec<Utf8Bytes>,
) -> bool {
    let write = async {
        for text in replies.drain(..) {
            sink.feed(WsMessage::Text(text)).await?;
        }
        sink.flush().await
    };
    matches!(tokio::time::timeout(WRITE_TIMEOUT, write).await, Ok(Ok(())))
}

impl Connection {
    fn reply(&mut self, text: Utf8Bytes) {
        self.replies.push(text);
    }

    /// Drops subscriptions whose task ended (store failure); their last frames still go out.
    fn forget_finished(&mut self) {
        self.subscriptions
            .retain(|_, (_, task)| !task.is_finished());
    }

    async fn handle_text(&mut self, text: &str) {
        let frame: ClientFrame = match serde_json::from_str(text) {
            Ok(f) => f,
            Err(e) => {
                let msg = format!("frame is not a JSON object of the protocol: {e}");
                return self.reply(error_frame("bad_request", &msg, None, None));
            }
        };
        let reference = frame.reference.clone();
        let result = match frame.op.as_deref() {
            Some("subscribe") => self.subscribe(frame).await,
            Some("unsubscribe") => self.unsubscribe(frame).await,
            Some("publish") => self.publish(frame).await,
            Some("ping") => {
                self.reply(Utf8Bytes::from_static("{\"op\":\"pong\"}"));
                Ok(())
            }
            Some(other) => Err((
                ApiError::BadRequest(format!(
                    "unknown op {other:?}; expected subscribe, unsubscribe, publish or ping"
                )),
                None,
            )),
            None => Err((ApiError::BadRequest("frame has no \"op\"".into()), None)),
        };
        if let Err((e, channel)) = result {
            let code = match &e {
                ApiError::Unauthorized(_) | ApiError::Forbidden(_) => "forbidden",
                other => other.code(),
            };
            self.reply(error_frame(
                code,
                &e.to_string(),
                reference.as_ref(),
                channel.as_deref(),
            ));
        }
    }

    fn channel_of(frame: &ClientFrame) -> Result<ChannelName, (ApiError, Option<String>)> {
        let raw = frame
            .channel
            .as_deref()
            .ok_or_else(|| (ApiError::BadRequest("\"channel\" is required".into()), None))?;
        parse_channel(raw).map_err(|e| (e, Some(raw.to_owned())))
    }

    async fn subscribe(&mut self, frame: ClientFrame) -> Result<(), (ApiError, Option<String>)> {
        let channel = Self::channel_of(&frame)?;
        let named = || Some(channel.to_string());
        self.app
            .auth
            .can_read(&self.who, &channel)
            .map_err(|e| (e, named()))?;
        let since = match &frame.since {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                (
                    ApiError::BadRequest(format!("since={v} must be a whole number ≥ 0")),
                    named(),
                )
            })?),
        };
        let epoch = frame
            .epoch
            .as_deref()
            .map(Epoch::parse)
            .transpose()
            .map_err(|e| (ApiError::BadRequest(e.0), named()))?;
        self.forget_finished();
        if let Some((old_id, old)) = self.subscriptions.remove(&channel) {
            old.abort();
            self.active.remove(&old_id);
        } else if self.subscriptions.len() >= self.app.max_subscriptions {
            let msg = format!(
                "this connection already holds {} subscriptions, the limit",
                self.subscriptions.len()
            );
            self.reply(error_frame(
                "too_many_subscriptions",
                &msg,
                frame.reference.as_ref(),
                Some(channel.as_str()),
            ));
            return Ok(());
        }
        let start = match since {
            Some(n) => Start::Since(n, epoch),
            None => Start::Live,
        };
        let id = self.next_subscription;
        self.next_subscription += 1;
        let task = tokio::spawn(run_subscription(
            self.app.clone(),
            id,
            channel.clone(),
            start,
            self.out.clone(),
        ));
        self.active.insert(id);
        self.subscriptions.insert(channel, (id, task));
        Ok(())
    }

    async fn unsubscribe(&mut self, frame: ClientFrame) -> Result<(), (ApiError, Option<String>)> {
        let channel = Self::channel_of(&frame)?;
        if let Some((id, task)) = self.subscriptions.remove(&channel) {
            task.abort();
            self.active.remove(&id);
        }
        let reply = json!({"op": "unsubscribed", "channel": channel}).to_string();
        self.reply(Utf8Bytes::from(reply));
        Ok(())
    }

    async fn publish(&mut self, frame: ClientFrame) -> Result<(), (ApiError, Option<String>)> {
        let channel = Self::channel_of(&frame)?;
        let named = || Some(channel.to_string());
        self.app
            .auth
            .can_publish(&self.who, &channel)
            .map_err(|e| (e, named()))?;
        if let Some(ip) = self.ip {
            if !self.app.rate.allow(ip, 1) {
                return Err((
                    ApiError::RateLimited(
                        "publish rate limit for this address exceeded; retry in a second".into(),
                    ),
                    named(),
                ));
            }
        }
        let item = PublishItem {
            data: frame.data,
            event: frame.event,
            id: frame.id,
        };
        let publisher = self.publisher.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(PUBLISHES_IN_FLIGHT);
            tokio::spawn(run_publisher(self.app.clone(), rx, self.out.clone()));
            tx
        });
        // Publishes of one connection are applied one after another, in the order sent.
        let name = channel.to_string();
        match publisher.try_send((channel, item, frame.reference)) {
            Ok(()) => Ok(()),
            Err(_) => Err((
                ApiError::RateLimited(format!(
                    "more than {PUBLISHES_IN_FLIGHT} publishes in flight on this connection; wait for acks"
                )),
                Some(name),
            )),
        }
    }
}

async fn run_publisher(
    app: AppState,
    mut rx: mpsc::Receiver<(ChannelName, PublishItem, Option<Value>)>,
    out: mpsc::Sender<Outbound>,
) {
    while let Some((channel, item, reference)) = rx.recv().await {
        let result = async {
            let message = item.into_new_message()?;
            Ok::<_, ApiError>(app.hub.publish(&channel, vec![message]).await?)
        }
        .await;
        let reply = match result.as_deref() {
            Ok([published, ..]) => {
                let mut v =
                    json!({"op": "ack", "seq": published.seq, "duplicate": published.duplicate});
                if let Some(r) = &reference {
                    v["ref"] = r.clone();
                }
                Utf8Bytes::from(v.to_string())
            }
            Ok([]) => error_frame(
                "internal",
                "publish returned no result",
                reference.as_ref(),
                Some(channel.as_str()),
            ),
            Err(e) => api_error_frame(e, reference.as_ref(), Some(channel.as_str())),
        };
        if out.send(Outbound::Text(reply)).await.is_err() {
            return;
        }
    }
}

fn subscribed_frame(
    channel: &ChannelName,
    epoch: &Epoch,
    last_seq: Seq,
    truncated: bool,
) -> Utf8Bytes {
    Utf8Bytes::from(
        json!({"op": "subscribed", "channel": channel, "epoch": epoch, "last_seq": last_seq, "truncated": truncated})
            .to_string(),
    )
}

async fn run_subscription(
    app: AppState,
    id: u64,
    channel: ChannelName,
    start: Start,
    out: mpsc::Sender<Outbound>,
) {
    let (subscribed, mut sub) = match app.hub.subscribe(&channel, start).await {
        Ok(s) => s,
        Err(e) => {
            let frame = api_error_frame(&ApiError::from(e), None, Some(channel.as_str()));
            let _ = out.send(Outbound::SubText(id, frame)).await;
            return;
        }
    };
    let frame = subscribed_frame(
        &channel,
        &subscribed.epoch,
        subscribed.last_seq,
        subscribed.truncated,
    );
    if out.send(Outbound::SubText(id, frame)).await.is_err() {
        return;
    }
    loop {
        let item = match next_outbound(id, &mut sub, &channel).await {
            Ok(item) => item,
            Err(frame) => {
                let _ = out.send(Outbound::SubText(id, frame)).await;
                return;
            }
        };
        // Room in the queue is the common case: no timer for it.
        let item = match out.try_send(item) {
            Ok(()) => continue,
            Err(mpsc::error::TrySendError::Closed(_)) => return,
            Err(mpsc::error::TrySendError::Full(item)) => item,
        };
        match tokio::time::timeout(SLOW_CONSUMER_AFTER, out.send(item)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return, // the connection is gone
            Err(_) => {
                app.hub.metrics().slow_consumers.inc();
                tracing::info!(%channel, cursor = sub.cursor(), "closing a slow WebSocket consumer");
                // The queue is full, so wait for room for the close itself; the connection
                // loop drains it in order.
                let _ = out
                    .send(Outbound::Close(CLOSE_SLOW_CONSUMER, "slow consumer"))
                    .await;
                return;
            }
        }
    }
}

async fn next_outbound(
    id: u64,
    sub: &mut Subscription,
    channel: &ChannelName,
) -> Result<Outbound, Utf8Bytes> {
    match sub.next().await {
        Ok(Event::Messages(messages)) => Ok(Outbound::Messages(id, messages)),
        Ok(Event::Reset { epoch, first_seq }) => Ok(Outbound::SubText(
            id,
            subscribed_frame(channel, &epoch, first_seq.saturating_sub(1), true),
        )),
        Err(e) => Err(api_error_frame(
            &ApiError::from(e),
            None,
            Some(channel.as_str()),
        )),
    }
}
