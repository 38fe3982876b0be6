//! The WebSocket protocol: many subscriptions per connection, publish with ack, ping/pong.
//!
//! One task per connection owns the socket and every subscription of it: each subscription is
//! a stream (its cursor over the channel's live window, backlog from the store first) polled by
//! that task, so a message reaches the socket without another task or queue in between, and
//! whatever several subscriptions have ready is written with one flush. A client that does not
//! drain its socket for `SLOW_CONSUMER_AFTER` is closed with 4008 so it resumes from its last
//! seq; meanwhile its cursors simply stop moving, so it costs nothing else and delays nobody.
//! Publishers never wait for any of this.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::future::FutureExt;
use futures_util::stream::{AbortHandle, Abortable, BoxStream, SelectAll};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::mpsc;

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
/// Publishes a connection may have queued before it must wait for acks.
const PUBLISHES_IN_FLIGHT: usize = 256;
/// Acks waiting for the connection task to write them.
const ACK_QUEUE: usize = 64;
/// A write of subscription frames the client does not drain in this time closes it with 4008.
const SLOW_CONSUMER_AFTER: Duration = Duration::from_secs(5);
/// A write of direct replies the client does not drain in this time ends the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Frames gathered before one flush: tungstenite sends its buffer once it passes this size,
/// so a burst for many subscriptions leaves in a few large writes, not one per frame.
const WRITE_BUFFER: usize = 32 * 1024;
/// The read buffer each connection keeps: client frames are small (subscribe, publish of a
/// message), and an idle connection should cost little; a larger frame grows it as needed.
const READ_BUFFER: usize = 256;
/// Subscription items written before one flush and a look at the client's frames.
const WRITE_BUDGET: usize = 64;

pub const CLOSE_SERVER_RESTART: u16 = 1012;
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
pub const CLOSE_TOO_BIG: u16 = 1009;
/// How long a connection closed for an oversized frame stays open so the close frame arrives.
const TOO_BIG_LINGER: Duration = Duration::from_secs(2);

/// What a subscription stream yields for the socket.
enum Outbound {
    /// Its `subscribed` frame, a reset, or the error that ended it.
    Text(Utf8Bytes),
    Messages(Vec<SharedMessage>),
}

/// One item of subscription `id`; `last` when the subscription ended with it (an error).
struct SubItem {
    id: u64,
    out: Outbound,
    last: bool,
}

type SubStream = Abortable<BoxStream<'static, SubItem>>;

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
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
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
    /// Acks of this connection's publishes, written by the connection task; made with the
    /// publisher, so a connection that only reads holds no queue.
    acks: Option<mpsc::Receiver<Utf8Bytes>>,
    subscriptions: HashMap<ChannelName, (u64, AbortHandle)>,
    /// Every subscription's stream; an aborted one ends and is dropped at its next poll.
    streams: SelectAll<SubStream>,
    next_subscription: u64,
    publisher: Option<mpsc::Sender<(ChannelName, PublishItem, Option<Value>)>>,
    /// Direct answers to the frame just handled, written right after it.
    replies: Vec<Utf8Bytes>,
    /// The client's address, for the per-IP publish rate limit.
    ip: Option<std::net::IpAddr>,
}

/// The socket, read and written by its one task (no split halves, so no lock between them).
type WsSink = WebSocket;

async fn serve_connection(
    app: AppState,
    who: Principal,
    ip: Option<std::net::IpAddr>,
    socket: WebSocket,
) {
    let _gauge = ConnectionGauge::new(app.hub.metrics().clone(), "ws");
    let mut sink = socket;
    let mut conn = Connection {
        app: app.clone(),
        who,
        acks: None,
        subscriptions: HashMap::new(),
        streams: SelectAll::new(),
        next_subscription: 1,
        publisher: None,
        replies: Vec::new(),
        ip,
    };
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    let mut last_heard = tokio::time::Instant::now();
    let label = transport("ws");
    let shutdown = app.shutdown.clone().cancelled_owned();
    tokio::pin!(shutdown);
    let close = loop {
        // Unbiased: a busy channel must not starve the client's own frames, nor the reverse.
        tokio::select! {
            _ = &mut shutdown => break Some((CLOSE_SERVER_RESTART, "server restart")),
            Some(ack) = next_ack(&mut conn.acks) => {
                conn.replies.push(ack);
                while let Some(rx) = conn.acks.as_mut().filter(|_| conn.replies.len() < WRITE_BUDGET) {
                    match rx.try_recv() {
                        Ok(ack) => conn.replies.push(ack),
                        Err(_) => break,
                    }
                }
                if !Box::pin(write_replies(&mut sink, &mut conn.replies)).await {
                    break None;
                }
            }
            Some(item) = conn.streams.next(), if !conn.streams.is_empty() => {
                match conn.write_subscription_items(&mut sink, item, &label).await {
                    WriteOutcome::Ok => {}
                    WriteOutcome::Close(code, reason) => break Some((code, reason)),
                    WriteOutcome::Gone => break None,
                }
            }
            frame = sink.next() => {
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
                    Some(Ok(WsMessage::Text(text))) => Box::pin(conn.handle_text(&text)).await,
                    Some(Ok(WsMessage::Binary(_))) => conn.reply(error_frame(
                        "bad_request", "binary frames are not part of the protocol; send JSON text", None, None,
                    )),
                    Some(Ok(WsMessage::Close(_))) => break None,
                    Some(Ok(_)) => {} // ping/pong: tungstenite answers pings itself
                }
                if !conn.replies.is_empty() && !Box::pin(write_replies(&mut sink, &mut conn.replies)).await {
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
    for (_, (_, handle)) in conn.subscriptions.drain() {
        handle.abort();
    }
    drop(conn.streams);
    if let Some((code, reason)) = close {
        let frame = WsMessage::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }));
        // Boxed, like the rarer paths of the loop: an idle connection's task stays small.
        // A slow consumer's socket still holds the frames written before the close: give the
        // client as long as any write to read them, so the 4008 reaches it and it resumes.
        let linger = if code == CLOSE_SLOW_CONSUMER {
            WRITE_TIMEOUT
        } else {
            Duration::from_secs(2)
        };
        let _ = Box::pin(tokio::time::timeout(linger, async {
            let _ = sink.send(frame).await;
            let _ = sink.close().await;
        }))
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

/// Feeds one subscription item's frames into the sink (buffered, not yet flushed).
async fn feed_item(
    sink: &mut WsSink,
    out: Outbound,
    app: &AppState,
    label: &crate::metrics::TransportLabel,
) -> Result<(), axum::Error> {
    match out {
        Outbound::Text(text) => sink.feed(WsMessage::Text(text)).await,
        Outbound::Messages(messages) => {
            for m in &messages {
                match m.ws_frame() {
                    Some(text) => sink.feed(WsMessage::Text(text)).await?,
                    None => tracing::error!(seq = m.seq, "stored message is not UTF-8; skipped"),
                }
            }
            if let Some(last) = messages.last() {
                app.hub
                    .metrics()
                    .delivered(label, last.time_ms, messages.len() as u64);
            }
            Ok(())
        }
    }
}

/// The next ack of the connection's publisher; never, before it has one.
async fn next_ack(acks: &mut Option<mpsc::Receiver<Utf8Bytes>>) -> Option<Utf8Bytes> {
    match acks {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Writes direct replies (acks, answers to the client's frames); false when the client is gone
/// or stuck.
async fn write_replies(sink: &mut WsSink, replies: &mut Vec<Utf8Bytes>) -> bool {
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

    /// Forgets subscription `id` after its stream ended with an error frame.
    fn forget(&mut self, id: u64) {
        self.subscriptions.retain(|_, (sub, _)| *sub != id);
    }

    /// Writes `first` and whatever else the subscriptions have ready (up to `WRITE_BUDGET`
    /// items), then flushes once.
    async fn write_subscription_items(
        &mut self,
        sink: &mut WsSink,
        first: SubItem,
        label: &crate::metrics::TransportLabel,
    ) -> WriteOutcome {
        let app = self.app.clone();
        let write = async {
            let mut item = Some(first);
            let mut budget = WRITE_BUDGET;
            while let Some(SubItem { id, out, last }) = item.take() {
                if last {
                    self.forget(id);
                }
                feed_item(sink, out, &app, label).await?;
                budget -= 1;
                if budget > 0 {
                    item = self.streams.next().now_or_never().flatten();
                }
            }
            sink.flush().await
        };
        match tokio::time::timeout(SLOW_CONSUMER_AFTER, write).await {
            Ok(Ok(())) => WriteOutcome::Ok,
            Ok(Err(_)) => WriteOutcome::Gone,
            Err(_) => {
                app.hub.metrics().slow_consumers.inc();
                tracing::info!("closing a slow WebSocket consumer");
                WriteOutcome::Close(CLOSE_SLOW_CONSUMER, "slow consumer")
            }
        }
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
        if let Some((_, old)) = self.subscriptions.remove(&channel) {
            old.abort();
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
        let (handle, registration) = AbortHandle::new_pair();
        let stream = subscription_stream(self.app.clone(), id, channel.clone(), start);
        self.streams.push(Abortable::new(stream, registration));
        self.subscriptions.insert(channel, (id, handle));
        Ok(())
    }

    async fn unsubscribe(&mut self, frame: ClientFrame) -> Result<(), (ApiError, Option<String>)> {
        let channel = Self::channel_of(&frame)?;
        if let Some((_, handle)) = self.subscriptions.remove(&channel) {
            handle.abort();
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
            let (ack_tx, ack_rx) = mpsc::channel(ACK_QUEUE);
            self.acks = Some(ack_rx);
            tokio::spawn(run_publisher(self.app.clone(), rx, ack_tx));
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
    acks: mpsc::Sender<Utf8Bytes>,
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
        if acks.send(reply).await.is_err() {
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

/// Where a subscription stream is: not yet subscribed, following its cursor, or ended.
enum SubState {
    Starting(AppState, Start),
    Live(Box<Subscription>),
    Ended,
}

/// Subscription `id` as a stream: its `subscribed` frame, then batches of messages (and reset
/// frames) in seq order; an error frame ends it.
fn subscription_stream(
    app: AppState,
    id: u64,
    channel: ChannelName,
    start: Start,
) -> BoxStream<'static, SubItem> {
    let item = move |out, last| SubItem { id, out, last };
    futures_util::stream::unfold(
        (SubState::Starting(app, start), channel),
        move |(state, channel)| async move {
            match state {
                SubState::Starting(app, start) => match app.hub.subscribe(&channel, start).await {
                    Ok((subscribed, sub)) => {
                        let frame = subscribed_frame(
                            &channel,
                            &subscribed.epoch,
                            subscribed.last_seq,
                            subscribed.truncated,
                        );
                        let next = SubState::Live(Box::new(sub));
                        Some((item(Outbound::Text(frame), false), (next, channel)))
                    }
                    Err(e) => {
                        let frame =
                            api_error_frame(&ApiError::from(e), None, Some(channel.as_str()));
                        Some((
                            item(Outbound::Text(frame), true),
                            (SubState::Ended, channel),
                        ))
                    }
                },
                SubState::Live(mut sub) => match next_outbound(&mut sub, &channel).await {
                    Ok(out) => Some((item(out, false), (SubState::Live(sub), channel))),
                    Err(frame) => Some((
                        item(Outbound::Text(frame), true),
                        (SubState::Ended, channel),
                    )),
                },
                SubState::Ended => None,
            }
        },
    )
    .boxed()
}

async fn next_outbound(
    sub: &mut Subscription,
    channel: &ChannelName,
) -> Result<Outbound, Utf8Bytes> {
    match sub.next().await {
        Ok(Event::Messages(messages)) => Ok(Outbound::Messages(messages)),
        Ok(Event::Reset { epoch, first_seq }) => Ok(Outbound::Text(subscribed_frame(
            channel,
            &epoch,
            first_seq.saturating_sub(1),
            true,
        ))),
        Err(e) => Err(api_error_frame(
            &ApiError::from(e),
            None,
            Some(channel.as_str()),
        )),
    }
}
