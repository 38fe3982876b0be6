//! `tidings bench fanout`: S subscribers (WebSocket or SSE) on one channel, then publishers
//! send M messages stamped with their send time; every subscriber checks it got each seq once,
//! in order, and records publish→delivery latency on the run's shared clock.
//!
//! With `--peer nchan|socketio|redis` the same run drives a peer server instead (see
//! `super::peer`): WebSocket subscribers and HTTP publishes (Redis: RESP subscribers and
//! `PUBLISH` over TCP), and the publisher's own message number `n` in place of the hub's seq.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

use super::conn::{HttpConn, Target};
use super::idle::Frame;
use super::peer::{self, Peer, PeerData, RedisConn, RedisPush, SioPacket};
use super::procstat::MachineSample;
use super::stats::{human_ns, human_rate, Histogram};
use super::{BenchError, CommonArgs, Ctx, Report};
use crate::cli::SseParser;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Ws,
    Sse,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct FanoutArgs {
    /// Subscribers, one connection each, all on one channel.
    #[arg(long, short = 's', default_value_t = 100)]
    pub subscribers: usize,
    /// Messages to publish.
    #[arg(long, short = 'm', default_value_t = 1000)]
    pub messages: u64,
    /// Approximate size of each message's `data`, in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Publish at this many messages/s (default: as fast as acknowledgements come back).
    #[arg(long)]
    pub rate: Option<f64>,
    /// How subscribers connect.
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub transport: Transport,
    /// Publisher connections (HTTP/1.1), each with one publish in flight. Without --rate: that
    /// many closed-loop publishers, each waiting for its ack before the next (default 1). With
    /// --rate: publishes leave on schedule whatever the acks, on up to this many connections
    /// (default 16); the report's `schedule_lag` shows whether that kept up.
    #[arg(long)]
    pub publishers: Option<usize>,
    /// Subscriber connections being opened at once.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// The channel name starts with this; each run adds a unique id.
    #[arg(long, default_value = "bench:")]
    pub channel_prefix: String,
    /// Publish through this hub instead of `--server` (another node of a Redis cluster), so
    /// the deliveries measured crossed from one node to the other.
    #[arg(long)]
    pub publish_server: Option<String>,
    /// Drive this peer server (started by `scripts/peers.sh`) instead of a Tidings hub, with
    /// the same load and measurements: WebSocket subscribers, HTTP publishes (Redis: RESP
    /// `SUBSCRIBE` and `PUBLISH` over TCP).
    #[arg(long, value_enum)]
    pub peer: Option<Peer>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Publish connections a paced run may use at once, unless --publishers says otherwise.
const PACED_CONNECTIONS: usize = 16;

/// Per-subscriber accounting of the seqs `base+1 ..= base+expected`.
#[derive(Debug, Clone)]
pub struct SeqTracker {
    base: u64,
    expected: u64,
    seen: Vec<u64>,
    max_seen: u64,
    pub distinct: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Seqs outside the expected range (someone else published to the channel).
    pub unexpected: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    New,
    Duplicate,
    Unexpected,
}

impl SeqTracker {
    pub fn new(base: u64, expected: u64) -> Self {
        Self {
            base,
            expected,
            seen: vec![0; expected.div_ceil(64) as usize],
            max_seen: base,
            distinct: 0,
            duplicates: 0,
            out_of_order: 0,
            unexpected: 0,
        }
    }

    pub fn record(&mut self, seq: u64) -> Seen {
        if seq <= self.base || seq - self.base > self.expected {
            self.unexpected += 1;
            return Seen::Unexpected;
        }
        let i = seq - self.base - 1;
        let (word, bit) = ((i / 64) as usize, 1u64 << (i % 64));
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
            return Seen::Duplicate;
        }
        self.seen[word] |= bit;
        self.distinct += 1;
        if seq < self.max_seen {
            self.out_of_order += 1;
        } else {
            self.max_seen = seq;
        }
        Seen::New
    }

    pub fn complete(&self) -> bool {
        self.distinct == self.expected
    }
}

/// Publishes carry the message number `n` (1-based) alongside the time stamp only for peers.
const FIRST_N: u64 = 1;

/// What every subscriber shares.
struct Shared {
    target: Arc<Target>,
    channel: String,
    expected: u64,
    epoch: Instant,
    deadline: Instant,
    latency: Histogram,
    cancel: CancellationToken,
    connects: Arc<Semaphore>,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// How one subscriber's run ended.
struct SubOutcome {
    tracker: Option<SeqTracker>,
    last_delivery: Option<Instant>,
    unparsed: u64,
    /// Why it stopped before receiving everything (close code, error), if it did.
    ended_early: Option<String>,
}

impl SubOutcome {
    fn failed() -> Self {
        Self {
            tracker: None,
            last_delivery: None,
            unparsed: 0,
            ended_early: None,
        }
    }
}

/// Connect time (ns) once subscribed, or why it could not subscribe.
type Ready = oneshot::Sender<Result<u64, String>>;

/// Runs a subscriber's setup (connect and subscribe) under the connect limiter and within the
/// run's deadline, timing it from when it may start, and tells the run how it went: the
/// connection and its connect time, or why it failed (then `None`).
async fn settle_setup<C>(
    shared: &Shared,
    ready: Ready,
    setup: impl std::future::Future<Output = Result<C, String>>,
) -> Option<C> {
    let timed = async {
        let _permit = shared
            .connects
            .acquire()
            .await
            .map_err(|_| "connect limiter closed".to_owned())?;
        let started = Instant::now();
        let conn = setup.await?;
        Ok((
            conn,
            u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
        ))
    };
    let setup = tokio::select! {
        _ = shared.cancel.cancelled() => Err("cancelled before subscribed".to_owned()),
        r = tokio::time::timeout_at(shared.deadline.into(), timed) => {
            r.unwrap_or_else(|_| Err("timed out before subscribed".to_owned()))
        }
    };
    match setup {
        Ok((conn, connect_ns)) => {
            let _ = ready.send(Ok(connect_ns));
            Some(conn)
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            None
        }
    }
}

/// Receive-side bookkeeping shared by both transports.
struct Receiver {
    tracker: SeqTracker,
    last_delivery: Option<Instant>,
    unparsed: u64,
}

impl Receiver {
    fn new(base: u64, expected: u64) -> Self {
        Self {
            tracker: SeqTracker::new(base, expected),
            last_delivery: None,
            unparsed: 0,
        }
    }

    /// Accounts one message frame; returns an early-end reason for error frames.
    fn frame(&mut self, shared: &Shared, text: &str) -> Option<String> {
        let Ok(frame) = serde_json::from_str::<Frame<'_>>(text) else {
            self.unparsed += 1;
            return None;
        };
        match frame.op {
            None | Some("message") => {
                let Some(seq) = frame.seq else {
                    self.unparsed += 1;
                    return None;
                };
                self.delivered(shared, seq, frame.data.and_then(|d| d.t));
                None
            }
            Some("error") => Some(format!(
                "error frame {}: {}",
                frame.code.unwrap_or_default(),
                frame.message.unwrap_or_default()
            )),
            // A mid-stream `subscribed` means the hub reset this subscription.
            Some("subscribed") => Some("subscription reset by the hub".into()),
            Some(_) => None,
        }
    }

    /// Accounts one delivery of `seq`, sent at `t` (ns on the run's clock).
    fn delivered(&mut self, shared: &Shared, seq: u64, t: Option<u64>) {
        let received = shared.now_ns();
        if self.tracker.record(seq) == Seen::New {
            if let Some(t) = t {
                shared.latency.record(received.saturating_sub(t));
            }
            self.last_delivery = Some(Instant::now());
        }
    }

    /// Accounts one body published to a peer (`{"n":…,"t":…,"pad":…}`).
    fn peer_data(&mut self, shared: &Shared, text: &str) {
        match serde_json::from_str::<PeerData>(text) {
            Ok(PeerData { n: Some(n), t }) => self.delivered(shared, n, t),
            _ => self.unparsed += 1,
        }
    }

    fn finish(self, ended_early: Option<String>) -> SubOutcome {
        SubOutcome {
            tracker: Some(self.tracker),
            last_delivery: self.last_delivery,
            unparsed: self.unparsed,
            ended_early,
        }
    }
}

async fn ws_subscriber(shared: Arc<Shared>, ready: Ready) -> SubOutcome {
    let setup = async {
        let mut ws = shared.target.websocket().await.map_err(|e| e.to_string())?;
        let subscribed = super::idle::ws_subscribe(&mut ws, &shared.channel, None).await?;
        Ok((ws, subscribed.last_seq))
    };
    let Some((mut ws, base)) = settle_setup(&shared, ready, setup).await else {
        return SubOutcome::failed();
    };
    let mut rx = Receiver::new(base, shared.expected);
    let ended_early = loop {
        if rx.tracker.complete() {
            break None;
        }
        let frame = tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => break Some("timed out".to_owned()),
            frame = ws.next() => frame,
        };
        match frame {
            None => break Some("connection closed".into()),
            Some(Err(e)) => break Some(format!("connection error: {e}")),
            Some(Ok(WsMessage::Text(text))) => {
                if let Some(reason) = rx.frame(&shared, text.as_str()) {
                    break Some(reason);
                }
            }
            Some(Ok(WsMessage::Close(frame))) => {
                break Some(match frame {
                    Some(f) => format!("closed by the hub: {} {}", u16::from(f.code), f.reason),
                    None => "closed by the hub".into(),
                })
            }
            Some(Ok(_)) => {}
        }
    };
    // Best effort: say goodbye without holding up the run.
    let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
    rx.finish(ended_early)
}

/// A WebSocket subscriber of a peer: Nchan sends each published body as one frame; Socket.IO
/// needs its handshake (`0{…}` open, `40` connect, `40{…}` connected) and pongs, and wraps
/// each body as `42["message",BODY]`.
async fn peer_subscriber(shared: Arc<Shared>, ready: Ready, peer: Peer) -> SubOutcome {
    let path = peer.subscribe_path(&shared.channel);
    let setup = async {
        let mut ws = shared
            .target
            .websocket_at(&path)
            .await
            .map_err(|e| e.to_string())?;
        if peer == Peer::Socketio {
            sio_connect(&mut ws).await?;
        }
        // Nchan subscribes during the handshake: an open socket is a subscription.
        Ok(ws)
    };
    let Some(mut ws) = settle_setup(&shared, ready, setup).await else {
        return SubOutcome::failed();
    };
    let mut rx = Receiver::new(FIRST_N - 1, shared.expected);
    let ended_early = loop {
        if rx.tracker.complete() {
            break None;
        }
        let frame = tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => break Some("timed out".to_owned()),
            frame = ws.next() => frame,
        };
        let text = match frame {
            None => break Some("connection closed".into()),
            Some(Err(e)) => break Some(format!("connection error: {e}")),
            Some(Ok(WsMessage::Text(text))) => text,
            Some(Ok(WsMessage::Binary(data))) if peer == Peer::Nchan => {
                match std::str::from_utf8(&data) {
                    Ok(text) => rx.peer_data(&shared, text),
                    Err(_) => rx.unparsed += 1,
                }
                continue;
            }
            Some(Ok(WsMessage::Close(frame))) => {
                break Some(match frame {
                    Some(f) => format!("closed by the server: {} {}", u16::from(f.code), f.reason),
                    None => "closed by the server".into(),
                })
            }
            Some(Ok(_)) => continue,
        };
        match peer {
            Peer::Nchan | Peer::Redis => rx.peer_data(&shared, text.as_str()),
            Peer::Socketio => match peer::parse_sio(text.as_str()) {
                SioPacket::Message(data) => rx.peer_data(&shared, data),
                SioPacket::Ping => {
                    if let Err(e) = ws.send(WsMessage::text(peer::SIO_PONG)).await {
                        break Some(format!("sending pong: {e}"));
                    }
                }
                SioPacket::Close | SioPacket::Disconnected => {
                    break Some("disconnected by the server".into())
                }
                SioPacket::ConnectError(why) => break Some(format!("connect error {why}")),
                SioPacket::Open | SioPacket::Connected | SioPacket::Other => {}
            },
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
    rx.finish(ended_early)
}

/// A Redis subscriber: one TCP connection, `SUBSCRIBE channel`, then `message` pushes whose
/// payload is the published body.
async fn redis_subscriber(shared: Arc<Shared>, ready: Ready) -> SubOutcome {
    let setup = async {
        let tcp = shared.target.tcp().await.map_err(|e| e.to_string())?;
        let mut conn = RedisConn::new(tcp);
        conn.subscribe(&shared.channel).await?;
        Ok(conn)
    };
    let Some(mut conn) = settle_setup(&shared, ready, setup).await else {
        return SubOutcome::failed();
    };
    let mut rx = Receiver::new(FIRST_N - 1, shared.expected);
    let ended_early = loop {
        if rx.tracker.complete() {
            break None;
        }
        let reply = tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => break Some("timed out".to_owned()),
            reply = conn.next_reply() => reply,
        };
        match reply {
            Err(e) => break Some(e),
            Ok(reply) => match peer::redis_push(&reply) {
                RedisPush::Message(body) => match std::str::from_utf8(body) {
                    Ok(text) => rx.peer_data(&shared, text),
                    Err(_) => rx.unparsed += 1,
                },
                RedisPush::Error(e) => break Some(format!("error reply: {e}")),
                RedisPush::Subscribed | RedisPush::Pong | RedisPush::Other => {}
            },
        }
    };
    rx.finish(ended_early)
}

/// The Socket.IO handshake on an open WebSocket: the server's open packet, our namespace
/// connect, its confirmation. The room is joined (from the `channel` query) by then.
pub(super) async fn sio_connect(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
) -> Result<(), String> {
    let mut opened = false;
    while let Some(frame) = ws.next().await {
        let frame = frame.map_err(|e| format!("before connected: {e}"))?;
        let WsMessage::Text(text) = frame else {
            continue;
        };
        match peer::parse_sio(text.as_str()) {
            SioPacket::Open if !opened => {
                opened = true;
                ws.send(WsMessage::text(peer::SIO_CONNECT))
                    .await
                    .map_err(|e| format!("sending connect: {e}"))?;
            }
            SioPacket::Connected if opened => return Ok(()),
            SioPacket::Ping => ws
                .send(WsMessage::text(peer::SIO_PONG))
                .await
                .map_err(|e| format!("sending pong: {e}"))?,
            SioPacket::ConnectError(why) => return Err(format!("connect refused: {why}")),
            SioPacket::Close | SioPacket::Disconnected => {
                return Err("disconnected before connected".into())
            }
            _ => {}
        }
    }
    Err("connection closed before connected".to_owned())
}

async fn sse_subscriber(shared: Arc<Shared>, ready: Ready) -> SubOutcome {
    let path = format!("/api/channels/{}/events", shared.channel);
    let setup = async {
        let mut conn = HttpConn::connect(&shared.target)
            .await
            .map_err(|e| e.to_string())?;
        let resp = conn
            .send(&shared.target, hyper::Method::GET, &path, Bytes::new())
            .await
            .map_err(|e| e.to_string())?;
        if resp.status() != hyper::StatusCode::OK {
            return Err(format!("GET {path} answered {}", resp.status()));
        }
        // The hub registers the subscription before it answers, so headers mean subscribed.
        Ok((conn, resp.into_body()))
    };
    let Some((_conn, mut body)) = settle_setup(&shared, ready, setup).await else {
        return SubOutcome::failed();
    };
    // A live-only SSE stream does not say where it starts; the channel is new to this run, so
    // its first seq is 1.
    let mut rx = Receiver::new(0, shared.expected);
    let mut parser = SseParser::default();
    let ended_early = 'read: loop {
        if rx.tracker.complete() {
            break None;
        }
        let frame = tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => break Some("timed out".to_owned()),
            frame = body.frame() => frame,
        };
        let chunk = match frame {
            None => break Some("stream ended".into()),
            Some(Err(e)) => break Some(format!("stream error: {e}")),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
        };
        for event in parser.feed(&chunk) {
            match event.event.as_deref() {
                None | Some("message") => {
                    if let Some(reason) = rx.frame(&shared, &event.data) {
                        break 'read Some(reason);
                    }
                }
                Some("reset") => break 'read Some(format!("reset by the hub: {}", event.data)),
                Some(_) => {}
            }
        }
    };
    rx.finish(ended_early)
}

/// What the publishers did.
#[derive(Default)]
struct PubTally {
    acked: u64,
    errors: u64,
    first_error: Option<String>,
    last_ack: Option<Instant>,
}

impl PubTally {
    fn add(&mut self, outcome: Published) {
        match outcome {
            Published::Acked(at) => {
                self.acked += 1;
                self.last_ack = self.last_ack.max(Some(at));
            }
            Published::Failed(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
            Published::OutOfTime => {}
        }
    }

    fn merge(&mut self, other: PubTally) {
        self.acked += other.acked;
        self.errors += other.errors;
        self.last_ack = self.last_ack.max(other.last_ack);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// The outcome of one publish.
enum Published {
    Acked(Instant),
    Failed(String),
    /// `--timeout` came first.
    OutOfTime,
}

/// A publisher's connection: HTTP/1.1 to a hub or an HTTP peer, RESP to Redis.
enum PubConn {
    Http(HttpConn),
    Redis(RedisConn),
}

impl PubConn {
    fn is_open(&self) -> bool {
        match self {
            PubConn::Http(c) => c.is_open(),
            PubConn::Redis(c) => c.is_open(),
        }
    }
}

struct Publisher {
    target: Arc<Target>,
    path: String,
    /// The channel (Redis publishes name it; the others have it in `path`).
    channel: String,
    /// Publishing to a peer: the body is the numbered data itself (see `super::peer`).
    peer: Option<Peer>,
    pad: String,
    epoch: Instant,
    deadline: Instant,
    ack_latency: Histogram,
    /// How late each paced publish left against its schedule.
    schedule_lag: Histogram,
}

impl Publisher {
    /// Publishes stamped message number `n` on `conn` (reconnecting it if the hub closed it)
    /// and waits for its acknowledgement. A hub ignores `n` (it numbers messages itself).
    async fn publish_one(&self, conn: &mut Option<PubConn>, n: u64) -> Published {
        if !conn.as_ref().is_some_and(PubConn::is_open) {
            let connect = async {
                if self.peer == Some(Peer::Redis) {
                    Ok(PubConn::Redis(RedisConn::new(self.target.tcp().await?)))
                } else {
                    HttpConn::connect(&self.target).await.map(PubConn::Http)
                }
            };
            match tokio::time::timeout_at(self.deadline.into(), connect).await {
                Ok(Ok(c)) => *conn = Some(c),
                Ok(Err(e)) => return Published::Failed(e.to_string()),
                Err(_) => return Published::OutOfTime,
            }
        }
        let Some(c) = conn.as_mut() else {
            return Published::Failed("no connection".into());
        };
        let sent = Instant::now();
        let mut body = String::with_capacity(self.pad.len() + 64);
        let t = u64::try_from(sent.duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        if self.peer.is_some() {
            peer::body(&mut body, n, t, &self.pad);
        } else {
            body.push_str("{\"data\":");
            super::stamped_data(&mut body, t, &self.pad);
            body.push('}');
        }
        let accepted = |status: u16| self.peer.map_or(status == 201, |p| p.accepted(status));
        let outcome = match c {
            PubConn::Http(c) => {
                let call = c.call(
                    &self.target,
                    hyper::Method::POST,
                    &self.path,
                    Bytes::from(body),
                );
                match tokio::time::timeout_at(self.deadline.into(), call).await {
                    Ok(Ok((status, _))) if accepted(status) => Ok(()),
                    Ok(Ok((status, answer))) => {
                        Err(format!("{status}: {}", String::from_utf8_lossy(&answer)))
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => return Published::OutOfTime,
                }
            }
            // The reply to PUBLISH is the number of subscribers it reached.
            PubConn::Redis(c) => {
                let command: [&[u8]; 3] = [b"PUBLISH", self.channel.as_bytes(), body.as_bytes()];
                let call = c.call(&command);
                match tokio::time::timeout_at(self.deadline.into(), call).await {
                    Ok(Ok(peer::Resp::Int(_))) => Ok(()),
                    Ok(Ok(other)) => Err(format!("PUBLISH answered {other:?}")),
                    Ok(Err(e)) => Err(e),
                    Err(_) => return Published::OutOfTime,
                }
            }
        };
        match outcome {
            Ok(()) => {
                let now = Instant::now();
                let ns = u64::try_from(now.duration_since(sent).as_nanos()).unwrap_or(u64::MAX);
                self.ack_latency.record(ns);
                Published::Acked(now)
            }
            Err(e) => Published::Failed(e),
        }
    }

    /// Closed loop, as fast as acks come back: messages `first, first + step, …` below
    /// `total`, one at a time on one connection. Failed publishes are counted, not retried.
    async fn run_closed(self: Arc<Self>, first: u64, step: u64, total: u64) -> PubTally {
        let mut tally = PubTally::default();
        let mut conn = None;
        let mut i = first;
        while i < total && Instant::now() < self.deadline {
            let n = i + FIRST_N;
            i += step;
            match self.publish_one(&mut conn, n).await {
                Published::OutOfTime => break,
                outcome => tally.add(outcome),
            }
        }
        tally
    }

    /// Open loop: message `i` leaves at `start + i / rate` whether or not earlier ones were
    /// acknowledged, on up to `max_conns` connections (each carries one publish at a time).
    /// When every connection is busy the publish leaves late; `schedule_lag` shows by how much.
    async fn run_paced(
        self: Arc<Self>,
        start: Instant,
        rate: f64,
        total: u64,
        max_conns: usize,
    ) -> PubTally {
        let mut tally = PubTally::default();
        let (idle_tx, mut idle_rx) = mpsc::channel::<Option<PubConn>>(max_conns);
        let mut opened = 0usize;
        let mut inflight = JoinSet::new();
        for i in 0..total {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            if due >= self.deadline {
                break;
            }
            tokio::time::sleep_until(due.into()).await;
            let mut conn = match idle_rx.try_recv() {
                Ok(c) => c,
                Err(_) if opened < max_conns => {
                    opened += 1;
                    None // publish_one connects it
                }
                Err(_) => match tokio::time::timeout_at(self.deadline.into(), idle_rx.recv()).await
                {
                    Ok(Some(c)) => c,
                    Ok(None) | Err(_) => break,
                },
            };
            let lag = Instant::now().saturating_duration_since(due);
            self.schedule_lag
                .record(u64::try_from(lag.as_nanos()).unwrap_or(u64::MAX));
            let me = self.clone();
            let idle = idle_tx.clone();
            inflight.spawn(async move {
                let outcome = me.publish_one(&mut conn, i + FIRST_N).await;
                let _ = idle.send(conn).await;
                outcome
            });
            while let Some(done) = inflight.try_join_next() {
                tally.add(
                    done.unwrap_or_else(|e| Published::Failed(format!("publish task failed: {e}"))),
                );
            }
        }
        // Each publish is bounded by the deadline, so this ends by then.
        while let Some(done) = inflight.join_next().await {
            tally.add(
                done.unwrap_or_else(|e| Published::Failed(format!("publish task failed: {e}"))),
            );
        }
        tally
    }
}

pub async fn run(ctx: &Ctx, args: FanoutArgs) -> Result<Report, BenchError> {
    let default_publishers = if args.rate.is_some() {
        PACED_CONNECTIONS
    } else {
        1
    };
    let publishers = args.publishers.unwrap_or(default_publishers);
    if args.subscribers == 0
        || args.messages == 0
        || publishers == 0
        || args.connect_concurrency == 0
    {
        return Err(BenchError::Usage(
            "--subscribers, --messages, --publishers and --connect-concurrency must be at least 1"
                .into(),
        ));
    }
    if args.peer.is_some() && args.transport != Transport::Ws {
        return Err(BenchError::Usage(
            "--peer runs its own subscribers (WebSocket, or RESP for redis): no --transport sse"
                .into(),
        ));
    }
    if let Some(r) = args.rate {
        if !(r.is_finite() && r > 0.0) {
            return Err(BenchError::Usage(format!(
                "--rate {r} must be a positive number"
            )));
        }
    }
    // Each subscriber keeps a bitmap of the seqs it got: M/8 bytes each.
    let bitmap_bytes = (args.messages / 8).saturating_mul(args.subscribers as u64);
    if bitmap_bytes > 2 << 30 {
        return Err(BenchError::Usage(format!(
            "--subscribers × --messages is too large ({bitmap_bytes} bytes of bookkeeping); lower one"
        )));
    }
    super::check_open_files(args.subscribers + publishers, ctx.server.as_ref())?;
    let pad = super::padding(args.size)?;
    let channel = super::channel_name(&args.channel_prefix, &ctx.run_id, "fanout")?;
    let shared = Arc::new(Shared {
        target: ctx.target.clone(),
        channel: channel.clone(),
        expected: args.messages,
        epoch: ctx.epoch,
        deadline: ctx.deadline,
        latency: Histogram::default(),
        cancel: CancellationToken::new(),
        connects: Arc::new(Semaphore::new(args.connect_concurrency)),
    });

    // Phase 1: every subscriber connects and subscribes.
    let (server0, me0) = ctx.sample();
    let connect_started = Instant::now();
    let mut readies = Vec::with_capacity(args.subscribers);
    let mut subscribers = Vec::with_capacity(args.subscribers);
    for _ in 0..args.subscribers {
        let (tx, rx) = oneshot::channel();
        readies.push(rx);
        subscribers.push(match (args.peer, args.transport) {
            (Some(Peer::Redis), _) => tokio::spawn(redis_subscriber(shared.clone(), tx)),
            (Some(p), _) => tokio::spawn(peer_subscriber(shared.clone(), tx, p)),
            (None, Transport::Ws) => tokio::spawn(ws_subscriber(shared.clone(), tx)),
            (None, Transport::Sse) => tokio::spawn(sse_subscriber(shared.clone(), tx)),
        });
    }
    let super::Connects {
        latency: connect_latency,
        failures: connect_failures,
        first_error: first_connect_error,
    } = super::collect_connects(readies).await;
    let connect_wall = connect_started.elapsed();
    let subscribed = connect_latency.count();
    let (server1, me1) = ctx.sample();
    let machine1 = MachineSample::now();

    // Phase 2: publish (unless nobody could subscribe), while subscribers receive.
    let publish_target = match &args.publish_server {
        Some(url) => Arc::new(super::conn::Target::resolve(url, ctx.target.key.clone()).await?),
        None => ctx.target.clone(),
    };
    let publisher = Arc::new(Publisher {
        target: publish_target,
        path: match args.peer {
            Some(p) => p.publish_path(&channel),
            None => format!("/api/channels/{channel}/messages"),
        },
        channel: channel.clone(),
        peer: args.peer,
        pad,
        epoch: ctx.epoch,
        deadline: ctx.deadline,
        ack_latency: Histogram::default(),
        schedule_lag: Histogram::default(),
    });
    let publish_start = Instant::now();
    let mut pub_tally = PubTally::default();
    if subscribed > 0 && !ctx.timed_out() {
        let tasks: Vec<_> = match args.rate {
            Some(rate) => vec![tokio::spawn(publisher.clone().run_paced(
                publish_start,
                rate,
                args.messages,
                publishers,
            ))],
            None => (0..publishers as u64)
                .map(|k| {
                    tokio::spawn(
                        publisher
                            .clone()
                            .run_closed(k, publishers as u64, args.messages),
                    )
                })
                .collect(),
        };
        for task in tasks {
            match task.await {
                Ok(t) => pub_tally.merge(t),
                Err(e) => pub_tally.add(Published::Failed(format!("publisher task failed: {e}"))),
            }
        }
    }
    let publish_done = Instant::now();

    // Phase 3: wait for every delivery, or the deadline. Unacknowledged publishes are not
    // waited for: a subscriber stops at the deadline at the latest.
    let mut all = futures_util::future::join_all(subscribers);
    let outcomes = tokio::select! {
        o = &mut all => o,
        _ = tokio::time::sleep_until(ctx.deadline.into()) => {
            shared.cancel.cancel();
            all.await
        }
    };
    shared.cancel.cancel();
    let finished = Instant::now();
    let (server2, me2) = ctx.sample();
    let machine2 = MachineSample::now();

    // Totals.
    let mut received = 0u64;
    let mut duplicates = 0u64;
    let mut out_of_order = 0u64;
    let mut unexpected = 0u64;
    let mut unparsed = 0u64;
    let mut last_delivery: Option<Instant> = None;
    let mut ended_early: BTreeMap<String, u64> = BTreeMap::new();
    let mut task_failures = 0u64;
    for outcome in outcomes {
        let Ok(o) = outcome else {
            task_failures += 1;
            continue;
        };
        if let Some(t) = &o.tracker {
            received += t.distinct;
            duplicates += t.duplicates;
            out_of_order += t.out_of_order;
            unexpected += t.unexpected;
        }
        unparsed += o.unparsed;
        last_delivery = last_delivery.max(o.last_delivery);
        if let Some(reason) = o.ended_early {
            *ended_early.entry(reason).or_default() += 1;
        }
    }
    let expected = subscribed * args.messages;
    let lost = expected.saturating_sub(received);
    let delivery_span = last_delivery.map(|l| l.saturating_duration_since(publish_start));
    let deliveries_per_s = delivery_span
        .filter(|d| !d.is_zero())
        .map(|d| received as f64 / d.as_secs_f64());
    let publish_span = pub_tally
        .last_ack
        .map(|l| l.saturating_duration_since(publish_start));
    let timed_out = ctx.timed_out() && (lost > 0 || connect_failures > 0);
    // A peer's order is the publisher's numbering: with publishes in flight at once, they may
    // reach the peer in another order, so out-of-order deliveries are reported, not a failure.
    let order_checked = args.peer.is_none() || (publishers == 1 && args.rate.is_none());
    let lat = shared.latency.summary();
    let wall = finished - publish_start;
    let server_usage = super::usage(server0, server1, server2);
    let loadgen_usage = super::usage(me0, me1, me2);
    // Redis subscribers speak RESP over TCP, whatever --transport says.
    let transport_name = match args.peer {
        Some(Peer::Redis) => "resp",
        _ => args.transport.name(),
    };
    let json = json!({
        "scenario": "fanout",
        "transport": transport_name,
        "peer": args.peer.map(Peer::name),
        "server": ctx.target.url(""),
        "channel": channel,
        "params": {
            "subscribers": args.subscribers,
            "publish_server": args.publish_server,
            "messages": args.messages,
            "size": args.size,
            "rate": args.rate,
            "publishers": publishers,
            "connect_concurrency": args.connect_concurrency,
            "timeout_s": args.common.timeout,
        },
        "connect": {
            "subscribed": subscribed,
            "failed": connect_failures,
            "first_error": first_connect_error,
            "wall_s": super::secs(connect_wall),
            "per_connection": connect_latency.summary().to_json(),
        },
        "publish": {
            "acked": pub_tally.acked,
            "errors": pub_tally.errors,
            "first_error": pub_tally.first_error,
            "duration_s": publish_span.map(super::secs),
            "messages_per_s": publish_span
                .filter(|d| !d.is_zero())
                .map(|d| (pub_tally.acked as f64 / d.as_secs_f64()).round()),
            "ack_latency": publisher.ack_latency.summary().to_json(),
            "schedule_lag": args.rate.map(|_| publisher.schedule_lag.summary().to_json()),
        },
        "deliveries": {
            "expected": expected,
            "received": received,
            "lost": lost,
            "duplicates": duplicates,
            "out_of_order": out_of_order,
            "order_checked": order_checked,
            "unexpected": unexpected,
            "unparsed": unparsed,
            "duration_s": delivery_span.map(super::secs),
            "per_s": deliveries_per_s.map(f64::round),
            "drain_after_publish_s": super::secs(finished.saturating_duration_since(publish_done)),
        },
        "latency": lat.to_json(),
        "ended_early": ended_early,
        "task_failures": task_failures,
        "timed_out": timed_out,
        "hub": server_usage.as_ref().map(|u| u.to_json(received, "delivery", wall)),
        "loadgen": loadgen_usage.as_ref().map(|u| u.to_json(received, "delivery", wall)),
        "machine_busy": super::machine_busy(machine1.as_ref(), machine2.as_ref()),
    });
    let cpu = |u: Option<&super::procstat::Usage>, who: &str| {
        super::cpu_note(u, who, received, "delivery", wall)
    };
    let summary = format!(
        "fanout {}{} s={} m={} size={} rate={}: {}/{} delivered ({} lost, {} dup, {} out of order) at {} deliveries/s; \
         latency p50 {} p90 {} p99 {} p99.9 {} max {}; connect {} subscribers in {:.2} s ({} failed){}{}",
        transport_name,
        args.peer.map(|p| format!(" peer={}", p.name())).unwrap_or_default(),
        args.subscribers,
        args.messages,
        args.size,
        args.rate.map_or_else(|| "max".to_owned(), |r| format!("{r}/s")),
        received,
        expected,
        lost,
        duplicates,
        out_of_order,
        deliveries_per_s.map_or_else(|| "-".to_owned(), human_rate),
        human_ns(lat.p50),
        human_ns(lat.p90),
        human_ns(lat.p99),
        human_ns(lat.p999),
        human_ns(lat.max),
        subscribed,
        connect_wall.as_secs_f64(),
        connect_failures,
        cpu(server_usage.as_ref(), args.peer.map_or("hub", Peer::name)),
        cpu(loadgen_usage.as_ref(), "loadgen"),
    );
    let mut problems = Vec::new();
    if connect_failures > 0 {
        problems.push(format!(
            "{connect_failures} subscribers could not subscribe (first: {})",
            first_connect_error.as_deref().unwrap_or("?")
        ));
    }
    if pub_tally.acked < args.messages {
        problems.push(format!(
            "{} of {} publishes acknowledged{}",
            pub_tally.acked,
            args.messages,
            pub_tally
                .first_error
                .as_deref()
                .map(|e| format!(" (first error: {e})"))
                .unwrap_or_default()
        ));
    }
    if lost > 0 {
        problems.push(format!(
            "{lost} of {expected} deliveries missing{}",
            if timed_out { " at --timeout" } else { "" }
        ));
    }
    if duplicates > 0 || (out_of_order > 0 && order_checked) {
        problems.push(format!(
            "{duplicates} duplicate and {out_of_order} out-of-order deliveries"
        ));
    }
    Ok(Report {
        json,
        summary,
        problem: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_loss_duplicates_and_order() {
        let mut t = SeqTracker::new(10, 100);
        assert_eq!(t.record(11), Seen::New);
        assert_eq!(t.record(13), Seen::New);
        assert_eq!(t.record(12), Seen::New); // late
        assert_eq!(t.record(12), Seen::Duplicate);
        assert_eq!(t.record(10), Seen::Unexpected);
        assert_eq!(t.record(111), Seen::Unexpected);
        assert_eq!(t.record(110), Seen::New);
        assert_eq!(
            (t.distinct, t.duplicates, t.out_of_order, t.unexpected),
            (4, 1, 1, 2)
        );
        assert!(!t.complete());
        for s in 11..=110 {
            t.record(s);
        }
        assert!(t.complete());
        assert_eq!(t.distinct, 100);
    }

    #[test]
    fn parses_frames_of_both_transports() {
        let ws = r#"{"op":"message","channel":"c","seq":3,"id":"x","event":"message","time":"t","data":{"t":42,"pad":"xx"}}"#;
        let f: Frame<'_> = serde_json::from_str(ws).expect("ws frame");
        assert_eq!(
            (f.op, f.seq, f.data.and_then(|d| d.t)),
            (Some("message"), Some(3), Some(42))
        );
        let sse = r#"{"channel":"c","seq":4,"id":"x","event":"message","time":"t","data":{"t":7,"pad":""}}"#;
        let f: Frame<'_> = serde_json::from_str(sse).expect("sse message");
        assert_eq!((f.op, f.seq), (None, Some(4)));
        let sub = r#"{"op":"subscribed","channel":"c","epoch":"abcdefgh","last_seq":9,"truncated":false}"#;
        let f: Frame<'_> = serde_json::from_str(sub).expect("subscribed frame");
        assert_eq!((f.op, f.last_seq), (Some("subscribed"), Some(9)));
    }
}
