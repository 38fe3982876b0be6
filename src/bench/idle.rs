//! `tidings bench idle`: N WebSocket connections, each subscribed (to its own channel, or all to
//! one), then nothing: the hub's resident memory per idle connection, how long each connection
//! took to subscribe, and whether they all stayed open (a sample answers an `op: ping` at the
//! end; any connection the hub closed meanwhile is counted).
//!
//! With `--peer nchan|socketio|redis` the connections are a peer's subscribers instead (see
//! `super::peer`), and the sampled ones check liveness with the peer's own ping: a WebSocket
//! ping frame (Nchan, Socket.IO) or a RESP `PING` (Redis).
//!
//! Also home of the small WebSocket helpers the `channels` and `resume` scenarios share:
//! connecting from a chosen loopback source address, subscribing, and accounting frames.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::conn::Target;
use super::fanout::{Seen, SeqTracker};
use super::peer::{self, Peer, RedisConn, RedisPush, SioPacket};
use super::procstat::MachineSample;
use super::stats::{human_ns, Histogram};
use super::{BenchError, CommonArgs, Ctx, Report};

#[derive(Debug, clap::Args)]
pub struct IdleArgs {
    /// WebSocket connections to open and hold, one subscription each.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub connections: usize,
    /// Subscribe every connection to one channel (default: each to its own channel).
    #[arg(long)]
    pub one_channel: bool,
    /// Spread the client side over source addresses 127.0.0.2 … 127.0.0.(N+1), so more
    /// connections fit than one source address has ephemeral ports (0: the default address).
    #[arg(long, default_value_t = 0)]
    pub source_ips: u8,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Seconds to hold every connection idle before reading the hub's memory.
    #[arg(long, default_value_t = 2)]
    pub hold: u64,
    /// Connections (spread evenly) that send `{"op":"ping"}` at the end and must get a pong.
    #[arg(long, default_value_t = 100)]
    pub ping_sample: usize,
    /// Channel names start with this; each run adds a unique id.
    #[arg(long, default_value = "bench:")]
    pub channel_prefix: String,
    /// Hold a peer server's subscribers instead of a Tidings hub's (see `fanout --peer`).
    #[arg(long, value_enum)]
    pub peer: Option<Peer>,
    #[command(flatten)]
    pub common: CommonArgs,
}

pub(super) type Ws = WebSocketStream<TcpStream>;

/// The fields of a WebSocket frame or SSE message the scenarios look at.
#[derive(Deserialize)]
pub(super) struct Frame<'a> {
    #[serde(borrow, default)]
    pub op: Option<&'a str>,
    pub seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub truncated: Option<bool>,
    pub data: Option<Stamp>,
    pub code: Option<String>,
    pub message: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct Stamp {
    pub t: Option<u64>,
}

/// `127.0.0.{2 + i % n}` for `--source-ips n`, or `None` for the default source address.
pub(super) fn source_ip(i: usize, n: u8) -> Option<IpAddr> {
    (n > 0).then(|| {
        let last = 2 + (i % usize::from(n)) as u8;
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    })
}

/// Refuses `--source-ips` the target cannot use (IPv4 loopback only, at most 253 addresses).
pub(super) fn check_source_ips(target: &Target, n: u8) -> Result<(), BenchError> {
    if n > 0 && !target.addr.is_ipv4() {
        return Err(BenchError::Usage(
            "--source-ips needs an IPv4 --server (127.0.0.1)".into(),
        ));
    }
    if n > 253 {
        return Err(BenchError::Usage(
            "--source-ips is at most 253 (127.0.0.2 … 127.0.0.254)".into(),
        ));
    }
    Ok(())
}

/// Opens a WebSocket to `/ws`, from `source` if given (bound before connecting).
pub(super) async fn ws_connect(target: &Target, source: Option<IpAddr>) -> Result<Ws, String> {
    ws_connect_at(target, source, "/ws").await
}

/// Opens a TCP connection to the target, from `source` if given (bound before connecting).
pub(super) async fn tcp_connect(
    target: &Target,
    source: Option<IpAddr>,
) -> Result<TcpStream, String> {
    let Some(ip) = source else {
        return target.tcp().await.map_err(|e| e.to_string());
    };
    let socket = if ip.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("cannot create a socket: {e}"))?;
    socket
        .bind(SocketAddr::new(ip, 0))
        .map_err(|e| format!("cannot bind {ip}: {e}"))?;
    let tcp = socket
        .connect(target.addr)
        .await
        .map_err(|e| format!("{} from {ip}: {e}", target.addr))?;
    tcp.set_nodelay(true)
        .map_err(|e| format!("cannot set TCP_NODELAY: {e}"))?;
    Ok(tcp)
}

/// Opens a WebSocket to `path`, from `source` if given.
pub(super) async fn ws_connect_at(
    target: &Target,
    source: Option<IpAddr>,
    path: &str,
) -> Result<Ws, String> {
    if source.is_none() {
        return target.websocket_at(path).await.map_err(|e| e.to_string());
    }
    let tcp = tcp_connect(target, source).await?;
    let mut req = format!("ws://{}{path}", target.authority)
        .into_client_request()
        .map_err(|e| format!("bad WebSocket URL: {e}"))?;
    if let Some(key) = &target.key {
        let value = format!("Bearer {key}")
            .parse()
            .map_err(|_| "--key is not a valid header value".to_owned())?;
        req.headers_mut()
            .insert(hyper::header::AUTHORIZATION, value);
    }
    // Small buffers, as in `Target::websocket`: thousands of sockets.
    let config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, tcp, Some(config))
        .await
        .map_err(|e| format!("WebSocket handshake: {e}"))?;
    Ok(ws)
}

/// What the hub answered to a subscribe.
pub(super) struct Subscribed {
    pub last_seq: u64,
    pub truncated: bool,
}

/// Subscribes `ws` to `channel` (from `since`, or live only) and waits for `subscribed`.
pub(super) async fn ws_subscribe(
    ws: &mut Ws,
    channel: &str,
    since: Option<u64>,
) -> Result<Subscribed, String> {
    let mut op = json!({"op": "subscribe", "channel": channel});
    if let Some(since) = since {
        op["since"] = json!(since);
    }
    ws.send(WsMessage::text(op.to_string()))
        .await
        .map_err(|e| format!("sending subscribe: {e}"))?;
    while let Some(frame) = ws.next().await {
        let frame = frame.map_err(|e| format!("before subscribed: {e}"))?;
        let WsMessage::Text(text) = frame else {
            continue;
        };
        let parsed: Frame<'_> = serde_json::from_str(text.as_str())
            .map_err(|e| format!("unparsable frame before subscribed: {e}"))?;
        match parsed.op {
            Some("subscribed") => {
                return Ok(Subscribed {
                    last_seq: parsed.last_seq.unwrap_or(0),
                    truncated: parsed.truncated.unwrap_or(false),
                })
            }
            Some("error") => {
                return Err(format!(
                    "subscribe refused: {} {}",
                    parsed.code.unwrap_or_default(),
                    parsed.message.unwrap_or_default()
                ))
            }
            _ => {}
        }
    }
    Err("connection closed before subscribed".to_owned())
}

/// One subscription's accounting of the seqs it expects.
pub(super) struct Rx {
    pub tracker: SeqTracker,
    pub unparsed: u64,
    pub last_delivery: Option<Instant>,
}

impl Rx {
    pub fn new(base: u64, expected: u64) -> Self {
        Self {
            tracker: SeqTracker::new(base, expected),
            unparsed: 0,
            last_delivery: None,
        }
    }

    /// Accounts one message (WS frame or SSE data); records publish→delivery latency into
    /// `latency` when given. Returns why the subscription ended, for error and reset frames.
    pub fn frame(
        &mut self,
        text: &str,
        epoch: Instant,
        latency: Option<&Histogram>,
    ) -> Option<String> {
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
                let now = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
                if self.tracker.record(seq) == Seen::New {
                    if let (Some(h), Some(t)) = (latency, frame.data.and_then(|d| d.t)) {
                        h.record(now.saturating_sub(t));
                    }
                    self.last_delivery = Some(Instant::now());
                }
                None
            }
            Some("error") => Some(format!(
                "error frame {}: {}",
                frame.code.unwrap_or_default(),
                frame.message.unwrap_or_default()
            )),
            Some("subscribed") => Some("subscription reset by the hub".into()),
            Some(_) => None,
        }
    }

    /// Reads `ws` until every expected seq arrived (`None`) or it ends early (the reason).
    pub async fn receive_ws(
        &mut self,
        ws: &mut Ws,
        epoch: Instant,
        latency: Option<&Histogram>,
        cancel: &CancellationToken,
    ) -> Option<String> {
        loop {
            if self.tracker.complete() {
                return None;
            }
            let frame = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Some("timed out".to_owned()),
                frame = ws.next() => frame,
            };
            match frame {
                None => return Some("connection closed".into()),
                Some(Err(e)) => return Some(format!("connection error: {e}")),
                Some(Ok(WsMessage::Text(text))) => {
                    if let Some(reason) = self.frame(text.as_str(), epoch, latency) {
                        return Some(reason);
                    }
                }
                Some(Ok(WsMessage::Close(frame))) => return Some(close_reason(frame)),
                Some(Ok(_)) => {}
            }
        }
    }
}

fn close_reason(frame: Option<tokio_tungstenite::tungstenite::protocol::CloseFrame>) -> String {
    match frame {
        Some(f) => format!("closed by the hub: {} {}", u16::from(f.code), f.reason),
        None => "closed by the hub".into(),
    }
}

/// Nanoseconds since `t`.
pub(super) fn ns_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// One idle subscriber: a WebSocket (to the hub, or to an HTTP peer) or a Redis connection.
enum IdleConn {
    Ws(Box<Ws>, Option<Peer>),
    Redis(RedisConn),
}

impl IdleConn {
    /// Connects and subscribes to `channel`.
    async fn open(
        target: &Target,
        peer: Option<Peer>,
        source: Option<IpAddr>,
        channel: &str,
    ) -> Result<Self, String> {
        match peer {
            None => {
                let mut ws = ws_connect(target, source).await?;
                ws_subscribe(&mut ws, channel, None).await?;
                Ok(IdleConn::Ws(Box::new(ws), None))
            }
            Some(Peer::Redis) => {
                let mut conn = RedisConn::new(tcp_connect(target, source).await?);
                conn.subscribe(channel).await?;
                Ok(IdleConn::Redis(conn))
            }
            Some(p) => {
                let mut ws = ws_connect_at(target, source, &p.subscribe_path(channel)).await?;
                if p == Peer::Socketio {
                    super::fanout::sio_connect(&mut ws).await?;
                }
                // Nchan subscribes during the handshake.
                Ok(IdleConn::Ws(Box::new(ws), Some(p)))
            }
        }
    }

    /// Sends the liveness ping: `op: ping` to the hub, a WebSocket ping frame to a peer,
    /// `PING` to Redis.
    async fn ping(&mut self) -> Result<(), String> {
        match self {
            IdleConn::Ws(ws, None) => ws
                .send(WsMessage::text(r#"{"op":"ping"}"#))
                .await
                .map_err(|e| format!("sending ping: {e}")),
            IdleConn::Ws(ws, Some(_)) => ws
                .send(WsMessage::Ping(bytes::Bytes::from_static(b"bench")))
                .await
                .map_err(|e| format!("sending ping: {e}")),
            IdleConn::Redis(c) => c.send_ping().await,
        }
    }

    /// Waits for the next frame or push: `Ok(true)` for the answer to [`Self::ping`],
    /// `Ok(false)` for anything else, or why the connection ended. Answers Engine.IO pings.
    async fn next_event(&mut self) -> Result<bool, String> {
        match self {
            IdleConn::Redis(c) => match peer::redis_push(&c.next_reply().await?) {
                RedisPush::Pong => Ok(true),
                RedisPush::Error(e) => Err(format!("error reply: {e}")),
                _ => Ok(false),
            },
            IdleConn::Ws(ws, peer) => match ws.next().await {
                None => Err("connection closed".to_owned()),
                Some(Err(e)) => Err(format!("connection error: {e}")),
                Some(Ok(WsMessage::Close(f))) => Err(close_reason(f)),
                Some(Ok(WsMessage::Pong(_))) => Ok(peer.is_some()),
                Some(Ok(WsMessage::Text(text))) => match peer {
                    None => Ok(serde_json::from_str::<Frame<'_>>(text.as_str())
                        .is_ok_and(|f| f.op == Some("pong"))),
                    Some(Peer::Socketio) => match peer::parse_sio(text.as_str()) {
                        SioPacket::Ping => ws
                            .send(WsMessage::text(peer::SIO_PONG))
                            .await
                            .map(|()| false)
                            .map_err(|e| format!("sending pong: {e}")),
                        SioPacket::Close | SioPacket::Disconnected => {
                            Err("disconnected by the server".to_owned())
                        }
                        _ => Ok(false),
                    },
                    Some(_) => Ok(false),
                },
                Some(Ok(_)) => Ok(false),
            },
        }
    }

    async fn close(self) {
        if let IdleConn::Ws(mut ws, _) = self {
            let _ = tokio::time::timeout(
                Duration::from_millis(200),
                WebSocketStream::close(&mut *ws, None),
            )
            .await;
        }
    }
}

/// What every idle connection shares.
struct Shared {
    peer: Option<Peer>,
    target: Arc<Target>,
    deadline: Instant,
    connects: Semaphore,
    /// Fired once every connection is up and the memory is read: sampled ones ping.
    ping_now: CancellationToken,
    /// Fired at the end: everyone closes.
    done: CancellationToken,
    pongs: mpsc::UnboundedSender<Result<u64, String>>,
}

/// One connection: connect, subscribe, report ready, stay idle (answering the hub's pings),
/// ping once if sampled, and hold on until `done`. Returns why it closed early, if it did.
async fn idle_conn(
    shared: Arc<Shared>,
    channel: String,
    source: Option<IpAddr>,
    sampled: bool,
    ready: oneshot::Sender<Result<u64, String>>,
) -> Option<String> {
    let setup = async {
        let _permit = shared
            .connects
            .acquire()
            .await
            .map_err(|_| "connect limiter closed".to_owned())?;
        let started = Instant::now();
        let conn = IdleConn::open(&shared.target, shared.peer, source, &channel).await?;
        Ok::<_, String>((conn, ns_since(started)))
    };
    let setup = tokio::select! {
        _ = shared.done.cancelled() => Err("cancelled before subscribed".to_owned()),
        r = tokio::time::timeout_at(shared.deadline.into(), setup) => {
            r.unwrap_or_else(|_| Err("timed out before subscribed".to_owned()))
        }
    };
    let mut conn = match setup {
        Ok((conn, ns)) => {
            let _ = ready.send(Ok(ns));
            conn
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return None;
        }
    };
    // Idle until asked to ping (or the end), still reading so the hub's pings get answers.
    let mut pinged = !sampled;
    let mut ping_sent: Option<Instant> = None;
    let closed = loop {
        let ping_due = !pinged && ping_sent.is_none();
        let event = tokio::select! {
            biased;
            _ = shared.done.cancelled() => break None,
            _ = shared.ping_now.cancelled(), if ping_due => {
                let sent = Instant::now();
                if let Err(e) = conn.ping().await {
                    let _ = shared.pongs.send(Err(e.clone()));
                    pinged = true;
                    break Some(e);
                }
                ping_sent = Some(sent);
                continue;
            }
            event = conn.next_event() => event,
        };
        match event {
            Err(reason) => break Some(reason),
            Ok(true) => {
                if let (false, Some(sent)) = (pinged, ping_sent) {
                    pinged = true;
                    let _ = shared.pongs.send(Ok(ns_since(sent)));
                }
            }
            Ok(false) => {}
        }
    };
    if !pinged {
        let _ = shared.pongs.send(Err(closed
            .clone()
            .unwrap_or_else(|| "no pong before the end".into())));
    }
    conn.close().await;
    closed
}

pub async fn run(ctx: &Ctx, args: IdleArgs) -> Result<Report, BenchError> {
    let Some(server) = ctx.server.as_ref() else {
        return Err(BenchError::Usage(
            "idle measures the hub's memory: pass --server-pid".into(),
        ));
    };
    if args.connections == 0 || args.connect_concurrency == 0 {
        return Err(BenchError::Usage(
            "--connections and --connect-concurrency must be at least 1".into(),
        ));
    }
    if args.hold >= args.common.timeout {
        return Err(BenchError::Usage(format!(
            "--hold {} must be shorter than --timeout {} (the pings come after it)",
            args.hold, args.common.timeout
        )));
    }
    super::check_open_files(args.connections, Some(server))?;
    check_source_ips(&ctx.target, args.source_ips)?;
    let base_channel = super::channel_name(&args.channel_prefix, &ctx.run_id, "idle")?;
    let ping_sample = args.ping_sample.min(args.connections);
    let (pong_tx, mut pong_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        peer: args.peer,
        target: ctx.target.clone(),
        deadline: ctx.deadline,
        connects: Semaphore::new(args.connect_concurrency),
        ping_now: CancellationToken::new(),
        done: CancellationToken::new(),
        pongs: pong_tx,
    });

    let (server0, me0) = ctx.sample();
    let machine0 = MachineSample::now();
    let connect_started = Instant::now();
    let mut readies = Vec::with_capacity(args.connections);
    let mut tasks = Vec::with_capacity(args.connections);
    let mut sampled_total = 0usize;
    let mut sampled_flags = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let channel = if args.one_channel {
            base_channel.clone()
        } else {
            format!("{base_channel}{i}")
        };
        // Evenly spread: connection i is sampled when it crosses a multiple of n/sample.
        let sampled = ping_sample > 0
            && (i * ping_sample) / args.connections != ((i + 1) * ping_sample) / args.connections;
        sampled_total += usize::from(sampled);
        sampled_flags.push(sampled);
        let (tx, rx) = oneshot::channel();
        readies.push(rx);
        tasks.push(tokio::spawn(idle_conn(
            shared.clone(),
            channel,
            source_ip(i, args.source_ips),
            sampled,
            tx,
        )));
    }
    let connect_latency = Histogram::default();
    let mut connect_failures = 0u64;
    let mut first_connect_error: Option<String> = None;
    // Sampled connections that subscribed: the ones that will answer the ping.
    let mut sampled_up = 0usize;
    for (rx, sampled) in readies.into_iter().zip(&sampled_flags) {
        match rx.await {
            Ok(Ok(ns)) => {
                connect_latency.record(ns);
                sampled_up += usize::from(*sampled);
            }
            Ok(Err(e)) => {
                connect_failures += 1;
                first_connect_error.get_or_insert(e);
            }
            Err(_) => {
                connect_failures += 1;
                first_connect_error.get_or_insert_with(|| "connection task ended".into());
            }
        }
    }
    let connect_wall = connect_started.elapsed();
    let connected = connect_latency.count();
    let (server1, me1) = ctx.sample();

    // Hold, then read the hub's memory with every connection idle.
    let hold_started = Instant::now();
    let hold_until = (hold_started + Duration::from_secs(args.hold)).min(ctx.deadline);
    tokio::time::sleep_until(hold_until.into()).await;
    let (server2, me2) = ctx.sample();
    let hold_wall = hold_started.elapsed();
    let machine2 = MachineSample::now();

    // The sampled connections ping; each answers once (pong, error or close).
    shared.ping_now.cancel();
    let ping_rtt = Histogram::default();
    let mut ping_failures = 0u64;
    let mut first_ping_error: Option<String> = None;
    let mut answered = 0usize;
    while answered < sampled_up {
        match tokio::time::timeout_at(ctx.deadline.into(), pong_rx.recv()).await {
            Ok(Some(Ok(ns))) => ping_rtt.record(ns),
            Ok(Some(Err(e))) => {
                ping_failures += 1;
                first_ping_error.get_or_insert(e);
            }
            Ok(None) | Err(_) => break,
        }
        answered += 1;
    }
    let pongs = ping_rtt.count();
    shared.done.cancel();
    let mut closed_early: BTreeMap<String, u64> = BTreeMap::new();
    let mut task_failures = 0u64;
    for task in tasks {
        match task.await {
            Ok(Some(reason)) => *closed_early.entry(reason).or_default() += 1,
            Ok(None) => {}
            Err(_) => task_failures += 1,
        }
    }
    let closed_total: u64 = closed_early.values().sum();
    let wall = connect_started.elapsed();

    let rss = |s: &Option<super::procstat::Sample>| s.map(|s| s.rss_kib);
    let rss_growth = match (server0, server2) {
        (Some(a), Some(b)) => Some(b.rss_kib as i64 - a.rss_kib as i64),
        _ => None,
    };
    let kib_per_conn = rss_growth
        .filter(|_| connected > 0)
        .map(|g| (g as f64 / connected as f64 * 100.0).round() / 100.0);
    let connect = connect_latency.summary();
    let rtt = ping_rtt.summary();
    let hub_usage = super::usage(server0, server1, server2);
    let loadgen_usage = super::usage(me0, me1, me2);
    let timed_out = ctx.timed_out();
    let json = json!({
        "scenario": "idle",
        "peer": args.peer.map(Peer::name),
        "server": ctx.target.url(""),
        "channel": if args.one_channel { json!(base_channel) } else { json!(format!("{base_channel}N")) },
        "params": {
            "connections": args.connections,
            "one_channel": args.one_channel,
            "source_ips": args.source_ips,
            "connect_concurrency": args.connect_concurrency,
            "hold_s": args.hold,
            "ping_sample": sampled_total,
            "timeout_s": args.common.timeout,
        },
        "connect": {
            "connected": connected,
            "failed": connect_failures,
            "first_error": first_connect_error,
            "wall_s": super::secs(connect_wall),
            "per_connection": connect.to_json(),
        },
        "hub_rss_kib_before": rss(&server0),
        "hub_rss_kib_connected": rss(&server1),
        "hub_rss_kib_after_hold": rss(&server2),
        "hub_rss_kib_growth": rss_growth,
        "hub_rss_kib_per_connection": kib_per_conn,
        // Hub CPU while the connections were opened and subscribed, per connection.
        "hub_cpu_us_per_connect": match (server0, server1) {
            (Some(a), Some(b)) if connected > 0 => {
                json!(((b.cpu_s - a.cpu_s).max(0.0) * 1e6 / connected as f64).round())
            }
            _ => Value::Null,
        },
        "ping": {
            "sampled": sampled_total,
            "pongs": pongs,
            "failed": ping_failures,
            "first_error": first_ping_error,
            "rtt": rtt.to_json(),
        },
        "closed_early": closed_early,
        "closed_early_total": closed_total,
        "task_failures": task_failures,
        "timed_out": timed_out,
        "wall_s": super::secs(wall),
        "hold_s_measured": super::secs(hold_wall),
        // `cpu_s` and `cpu_busy` are of the hold (all connections idle); `cpu_s_setup` is
        // the connecting.
        "hub": hub_usage.as_ref().map(|u| u.to_json(0, "connection", hold_wall)),
        "loadgen": loadgen_usage.as_ref().map(|u| u.to_json(0, "connection", hold_wall)),
        "machine_busy": super::machine_busy(machine0.as_ref(), machine2.as_ref()),
    });
    let summary = format!(
        "idle{} n={} {}{}: {} connected ({} failed) in {:.2} s, connect p50 {} p99 {}; hub RSS {} → {} KiB = {} KiB/connection; \
         {}/{} sampled pongs, {} closed early",
        args.peer.map(|p| format!(" peer={}", p.name())).unwrap_or_default(),
        args.connections,
        if args.one_channel { "one channel" } else { "own channels" },
        if args.source_ips > 0 { format!(", {} source IPs", args.source_ips) } else { String::new() },
        connected,
        connect_failures,
        connect_wall.as_secs_f64(),
        human_ns(connect.p50),
        human_ns(connect.p99),
        rss(&server0).map_or_else(|| "-".into(), |v| v.to_string()),
        rss(&server2).map_or_else(|| "-".into(), |v| v.to_string()),
        kib_per_conn.map_or_else(|| "-".into(), |v| format!("{v:.1}")),
        pongs,
        sampled_total,
        closed_total,
    );
    let mut problems = Vec::new();
    if connect_failures > 0 {
        problems.push(format!(
            "{connect_failures} connections could not subscribe (first: {})",
            first_connect_error.as_deref().unwrap_or("?")
        ));
    }
    if (pongs as usize) < sampled_up {
        problems.push(format!(
            "{pongs} of {sampled_up} sampled connections answered the ping{}",
            first_ping_error
                .as_deref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        ));
    }
    if closed_total > 0 {
        problems.push(format!("{closed_total} connections closed while idle"));
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
    fn source_ips_cycle_from_127_0_0_2() {
        assert_eq!(source_ip(5, 0), None);
        assert_eq!(
            source_ip(0, 3),
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
        );
        assert_eq!(
            source_ip(4, 3),
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)))
        );
        assert_eq!(
            source_ip(252, 253),
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 254)))
        );
    }
}
