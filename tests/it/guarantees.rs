//! The §2 guarantees (messages and guarantees), proven against the real binary.
//!
//! Helpers shared by the `guarantees_*` modules live here, plus the retention-by-age test. The
//! other guarantees are in `guarantees_handoff` (backlog→live hand-off under load),
//! `guarantees_durability` (`kill -9`), `guarantees_truncation` (retention by count, stale epochs,
//! DELETE under live subscribers, a lagging reader whose backlog is pruned) and `guarantees_slow`
//! (stalled WebSocket and SSE consumers, memory bounds).
//!
//! Randomised tests print their seed; `TEST_SEED=… cargo test --test it guarantees` replays one.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio_tungstenite::MaybeTlsStream;

use crate::support::{ServerOptions, SseEvent, SseParser, TestServer, WsClient, WAIT};

/// A seed for the randomised tests: `TEST_SEED` when set (to replay a failure), else the clock.
/// Every test prints the seed it used.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        });
    eprintln!("{test}: TEST_SEED={seed}");
    seed
}

/// Re-raises a spawned task's panic with its own message, so a failing subscriber names itself.
pub async fn join<T>(handle: tokio::task::JoinHandle<T>) -> T {
    match handle.await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("task failed: {e}"),
    }
}

/// The sum of every sample of metric `name` whose labels contain `label` (e.g. `transport="sse"`).
pub async fn metric(server: &TestServer, name: &str, label: Option<&str>) -> f64 {
    let text = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric_name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            (metric_name == name && label.is_none_or(|want| labels.contains(want)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// The resident set size of process `pid`, in KiB, from `/proc/PID/status`.
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc status")
}

/// Publishes one message and asserts it was stored (`201`); returns the answer.
pub async fn publish_ok(server: &TestServer, channel: &str, body: Value) -> Value {
    let (status, answer) = server.publish(channel, body).await;
    assert_eq!(status, 201, "publish to {channel}: {answer}");
    answer
}

/// `GET /api/channels/{ch}/messages?{query}`, asserting `200`.
pub async fn read(server: &TestServer, channel: &str, query: &str) -> Value {
    let (status, page) = server
        .get(&format!("/api/channels/{channel}/messages?{query}"))
        .await;
    assert_eq!(status, 200, "read {channel}?{query}: {page}");
    page
}

/// The whole retained history of `channel`, paging with the largest `limit`.
pub async fn read_all(server: &TestServer, channel: &str) -> (Vec<Value>, Value) {
    let mut since = 0u64;
    let mut all = Vec::new();
    loop {
        let page = read(server, channel, &format!("since={since}&limit=1000")).await;
        let messages = page["messages"].as_array().expect("messages").clone();
        let Some(last) = messages.last() else {
            return (all, page);
        };
        since = last["seq"].as_u64().expect("seq");
        all.extend(messages);
    }
}

pub fn seq_of(v: &Value) -> u64 {
    v["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {v}"))
}

/// A TCP connection to `addr` whose receive buffer is pinned small (no autotuning), so a
/// client that stops reading pushes back on the server after a few KiB rather than after the
/// tens of MiB a loopback socket may buffer by default.
pub async fn small_buffer_tcp(addr: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
    socket.connect(addr).await.expect("connect")
}

/// A WebSocket client on a small-receive-buffer socket (see [`small_buffer_tcp`]).
pub async fn ws_small_buffer(server: &TestServer) -> WsClient {
    let tcp = small_buffer_tcp(server.addr).await;
    let (stream, _) = tokio_tungstenite::client_async(server.ws_url(), MaybeTlsStream::Plain(tcp))
        .await
        .expect("WS handshake");
    WsClient { stream }
}

/// An SSE reader on a small-receive-buffer socket, over a bare hyper connection, which reads
/// from the socket only when the body is polled, so not polling it really stops reading.
pub struct SlowSse {
    body: hyper::body::Incoming,
    parser: SseParser,
    pending: VecDeque<SseEvent>,
}

impl SlowSse {
    pub async fn open(server: &TestServer, path: &str) -> Self {
        let tcp = small_buffer_tcp(server.addr).await;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("HTTP handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let request = hyper::Request::get(path)
            .header("host", server.addr.to_string())
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = tokio::time::timeout(WAIT, sender.send_request(request))
            .await
            .expect("SSE headers in time")
            .expect("SSE request");
        assert_eq!(response.status().as_u16(), 200, "SSE status");
        Self {
            body: response.into_body(),
            parser: SseParser::default(),
            pending: VecDeque::new(),
        }
    }

    /// The next event; `None` when the stream ended; panics after `WAIT`.
    pub async fn next(&mut self) -> Option<SseEvent> {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(e) = self.pending.pop_front() {
                    return Some(e);
                }
                match self.body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            self.pending.extend(self.parser.feed(&data));
                        }
                    }
                    _ => return None,
                }
            }
        })
        .await
        .expect("SSE event in time")
    }
}

/// Splits an SSE `id:` of the form `{epoch}:{seq}`.
pub fn sse_id(event: &SseEvent) -> (String, u64) {
    let id = event
        .id
        .as_deref()
        .unwrap_or_else(|| panic!("SSE message without an id: {event:?}"));
    let (epoch, seq) = id
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("SSE id {id:?} is not epoch:seq"));
    (
        epoch.to_owned(),
        seq.parse().expect("numeric seq in SSE id"),
    )
}

// ---- Retention by age -----------------------------------------------------------------------

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Parses the `time` of a message (RFC 3339 UTC, milliseconds) into Unix milliseconds.
fn time_ms(message: &Value) -> i64 {
    let text = message["time"].as_str().expect("time");
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("time {text:?} is not RFC 3339: {e}"));
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// `max_age = "2s"`: a message is returned while it is younger than 2 s, and never after. Each
/// read that still returns it is checked against the client clock taken *before* the request,
/// so "it was returned although older than max_age" fails without any timing tolerance.
#[tokio::test]
async fn retention_by_age_hides_old_messages_from_reads_and_subscriptions() {
    let server = TestServer::start_with(ServerOptions {
        config: Some("[[retention]]\npattern = \"age:*\"\nmax_age = \"2s\"\n".into()),
        ..Default::default()
    })
    .await;
    let ch = "age:x";
    publish_ok(&server, ch, json!({"data": "old", "id": "old-1"})).await;
    let first = read(&server, ch, "since=0").await;
    assert_eq!(
        first["messages"][0]["data"], "old",
        "fresh message readable: {first}"
    );
    let published_ms = time_ms(&first["messages"][0]);
    let max_age_ms = 2000;

    // Poll until the message is gone; every answer that still holds it must be legitimate.
    let started = Instant::now();
    let mut reads = 0;
    loop {
        let asked_at = now_ms();
        let page = read(&server, ch, "since=0").await;
        reads += 1;
        let messages = page["messages"].as_array().expect("messages");
        if messages.is_empty() {
            assert_eq!(page["last_seq"], 1, "{page}");
            assert_eq!(
                page["truncated"], true,
                "expired history is reported: {page}"
            );
            break;
        }
        assert_eq!(messages.len(), 1, "{page}");
        assert!(
            asked_at - published_ms <= max_age_ms,
            "a message {} ms old was returned; max_age is {max_age_ms} ms: {page}",
            asked_at - published_ms
        );
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the message is still returned {} s after publishing",
            started.elapsed().as_secs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reads > 1, "the message was expired before the first poll");
    // The hot window (this channel is live in memory) must not serve it either.
    let page = read(&server, ch, "since=0&limit=1000").await;
    assert_eq!(page["messages"], json!([]), "{page}");

    // Subscriptions from 0 are told the history is gone, then get new messages live.
    let mut sse = server
        .sse(&format!("/api/channels/{ch}/events?since=0"), None)
        .await;
    let reset = sse.next().await.expect("SSE open");
    assert_eq!(reset.event.as_deref(), Some("reset"), "{reset:?}");
    let info: Value = serde_json::from_str(&reset.data).expect("reset JSON");
    assert_eq!(info["first_seq"], 2, "{info}");
    let mut ws = server.ws().await;
    ws.send(json!({"op": "subscribe", "channel": ch, "since": 0}))
        .await;
    let subscribed = ws.recv_op("subscribed").await;
    assert_eq!(subscribed["truncated"], true, "{subscribed}");
    assert_eq!(subscribed["last_seq"], 1, "{subscribed}");

    let asked_at = now_ms();
    publish_ok(&server, ch, json!({"data": "new"})).await;
    let msg = sse.next_message().await;
    assert_eq!(
        (msg["seq"].as_u64(), &msg["data"]),
        (Some(2), &json!("new")),
        "{msg}"
    );
    let msg = ws.recv().await;
    assert_eq!(
        (msg["op"].as_str(), msg["seq"].as_u64()),
        (Some("message"), Some(2)),
        "{msg}"
    );
    let page = read(&server, ch, "since=0").await;
    assert_eq!(page["truncated"], true, "seq 1 expired: {page}");
    let seqs: Vec<u64> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(seq_of)
        .collect();
    // Seq 2 is normally still fresh here; if this machine was slow enough for it to expire too,
    // it must be absent, never seq 1.
    assert!(
        seqs == vec![2] || (seqs.is_empty() && now_ms() - asked_at > max_age_ms),
        "only the fresh message: {page}"
    );
}
