//! Test helpers: start the real binary, and small HTTP / SSE / WebSocket clients that wait on
//! events with a timeout (never a fixed sleep).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message as WsMessage;

pub use tidings::cli::{SseEvent, SseParser};

/// A generous safety net for anything a test waits on; tests pass long before it.
pub const WAIT: Duration = Duration::from_secs(20);

#[derive(Default, Clone)]
pub struct ServerOptions {
    /// TOML written to a file and passed as `--config`.
    pub config: Option<String>,
    /// Reuse a data directory (for restarts); a fresh temp dir otherwise.
    pub data_dir: Option<PathBuf>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Extra arguments after `serve`.
    pub args: Vec<String>,
    /// Listen address; default `127.0.0.1:0`.
    pub listen: Option<String>,
}

pub struct TestServer {
    pub child: Child,
    pub addr: SocketAddr,
    pub base: String,
    pub data_dir: PathBuf,
    /// Holds the temp dir alive when the test did not give one.
    _tmp: Option<tempfile::TempDir>,
    /// The Redis this node runs on when the suite runs against the Redis engine.
    _redis: Option<crate::redis_support::RedisServer>,
    pub http: reqwest::Client,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_tidings")
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(ServerOptions::default()).await
    }

    pub async fn start_with(opts: ServerOptions) -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let (data_dir, keep) = match &opts.data_dir {
            Some(d) => (d.clone(), None),
            None => (tmp.path().join("data"), Some(tmp)),
        };
        // `TIDINGS_TEST_ENGINE=redis`: the same tests against a node on its own redis-server
        // (tests that pass `--engine` or reuse a data directory choose for themselves).
        let on_redis = std::env::var("TIDINGS_TEST_ENGINE").is_ok_and(|e| e == "redis")
            && opts.data_dir.is_none()
            && !opts.args.iter().any(|a| a == "--engine");
        let redis = on_redis.then(crate::redis_support::RedisServer::start);
        let mut cmd = Command::new(binary());
        cmd.arg("serve")
            .arg("--listen")
            .arg(opts.listen.clone().unwrap_or_else(|| "127.0.0.1:0".into()))
            .arg("--data")
            .arg(&data_dir);
        if let Some(r) = &redis {
            cmd.arg("--engine").arg(r.url());
        }
        if let Some(config) = &opts.config {
            let path = data_dir.with_extension("toml");
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).expect("config dir");
            }
            std::fs::write(&path, config).expect("write config");
            cmd.arg("--config").arg(&path);
        }
        cmd.args(&opts.args)
            .envs(opts.env.iter().cloned())
            .env(
                "RUST_LOG",
                std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn tidings");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                if let Some(rest) = line.strip_prefix("tidings listening on http://") {
                    return rest.parse::<SocketAddr>().expect("address");
                }
            }
            panic!("tidings exited before listening");
        })
        .await
        .expect("tidings did not start in time");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        TestServer {
            child,
            addr,
            base: format!("http://{addr}"),
            data_dir,
            _tmp: keep,
            _redis: redis,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("running") as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY-free: libc::kill is a plain syscall wrapper; the crate forbids unsafe, so go
        // through the `kill` command instead.
        let name = match sig {
            9 => "KILL",
            15 => "TERM",
            _ => "INT",
        };
        std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
    }

    pub async fn kill9(&mut self) {
        self.signal(9);
        let _ = tokio::time::timeout(WAIT, self.child.wait()).await;
    }

    /// SIGTERM, then the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(15);
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("exit in time")
            .expect("wait")
    }

    pub async fn publish(&self, channel: &str, body: Value) -> (u16, Value) {
        self.post(&format!("/api/channels/{channel}/messages"), body)
            .await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let resp = self
            .http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("POST");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let resp = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("POST");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self.http.get(self.url(path)).send().await.expect("GET");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .delete(self.url(path))
            .send()
            .await
            .expect("DELETE");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Opens an SSE stream on `path` (with optional `Last-Event-ID`).
    pub async fn sse(&self, path: &str, last_event_id: Option<&str>) -> SseClient {
        let mut req = self.http.get(self.url(path));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.expect("SSE GET");
        assert_eq!(resp.status().as_u16(), 200, "SSE status");
        SseClient {
            body: Box::pin(resp.bytes_stream()),
            parser: SseParser::default(),
            pending: Default::default(),
        }
    }

    pub async fn ws(&self) -> WsClient {
        WsClient::connect(&self.ws_url()).await
    }

    pub fn data_path(&self) -> &Path {
        &self.data_dir
    }
}

type ByteStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

pub struct SseClient {
    body: ByteStream,
    parser: SseParser,
    pending: std::collections::VecDeque<SseEvent>,
}

impl SseClient {
    /// The next event, or `None` if the stream ended; panics after `WAIT`.
    pub async fn next(&mut self) -> Option<SseEvent> {
        self.next_within(WAIT).await.expect("SSE event in time")
    }

    /// `Err(())` on timeout, `Ok(None)` when the stream ended.
    pub async fn next_within(&mut self, limit: Duration) -> Result<Option<SseEvent>, ()> {
        tokio::time::timeout(limit, async {
            loop {
                if let Some(e) = self.pending.pop_front() {
                    return Some(e);
                }
                match self.body.next().await {
                    Some(Ok(chunk)) => self.pending.extend(self.parser.feed(&chunk)),
                    _ => return None,
                }
            }
        })
        .await
        .map_err(|_| ())
    }

    /// The next message event's JSON, skipping nothing (a `reset` is returned as is).
    pub async fn next_message(&mut self) -> Value {
        let e = self.next().await.expect("stream open");
        serde_json::from_str(&e.data).expect("JSON data")
    }
}

pub struct WsClient {
    pub stream: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl WsClient {
    pub async fn connect(url: &str) -> Self {
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WS connect");
        Self { stream }
    }

    pub async fn send(&mut self, v: Value) {
        self.stream
            .send(WsMessage::Text(v.to_string().into()))
            .await
            .expect("WS send");
    }

    pub async fn send_raw(&mut self, m: WsMessage) {
        self.stream.send(m).await.expect("WS send");
    }

    /// The next JSON text frame; panics on timeout or close.
    pub async fn recv(&mut self) -> Value {
        match self.recv_frame().await {
            Some(WsMessage::Text(t)) => serde_json::from_str(&t).expect("JSON frame"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next data frame (text or close), skipping pings/pongs; `None` when closed.
    pub async fn recv_frame(&mut self) -> Option<WsMessage> {
        tokio::time::timeout(WAIT, async {
            loop {
                match self.stream.next().await {
                    Some(Ok(WsMessage::Ping(_))) | Some(Ok(WsMessage::Pong(_))) => continue,
                    Some(Ok(m)) => return Some(m),
                    _ => return None,
                }
            }
        })
        .await
        .expect("WS frame in time")
    }

    /// Receives frames until one with `"op": op` arrives; returns it.
    pub async fn recv_op(&mut self, op: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["op"] == op {
                return v;
            }
        }
    }
}

/// Asserts that `seqs` is exactly `from..=to`, with a message naming the first problem.
pub fn assert_contiguous(seqs: &[u64], from: u64, to: u64, who: &str) {
    let mut expected = from;
    for &s in seqs {
        assert_eq!(
            s, expected,
            "{who}: expected seq {expected}, got {s} (gap or duplicate)"
        );
        expected += 1;
    }
    assert_eq!(
        expected,
        to + 1,
        "{who}: stopped at {}, expected to reach {to}",
        expected - 1
    );
}

// ---- Helpers for the API, auth, CLI and shutdown tests -------------------------------------

/// Polls `check` every 20 ms until it returns `Some`, panicking after `WAIT` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Asserts the spec's error shape `{"error":{"code","message"}}` and returns the code.
pub fn assert_error_body(body: &Value, context: &str) -> String {
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("{context}: no error.code in {body}"));
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{context}: no error.message in {body}"));
    assert!(!code.is_empty(), "{context}: empty error code");
    assert!(!message.is_empty(), "{context}: empty error message");
    code.to_owned()
}

impl TestServer {
    /// Sends a prepared request; the status and the JSON body (`Null` when not JSON).
    pub async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// `GET /api/channels/{ch}` as the open (no-auth) server sees it.
    pub async fn channel_info(&self, channel: &str) -> Value {
        let (status, body) = self.get(&format!("/api/channels/{channel}")).await;
        assert_eq!(status, 200, "channel info of {channel}: {body}");
        body
    }

    /// The channel's `last_seq` (open servers only).
    pub async fn last_seq(&self, channel: &str) -> u64 {
        self.channel_info(channel).await["last_seq"]
            .as_u64()
            .expect("last_seq")
    }

    /// Waits until `channel` has at least `n` live subscribers (open servers only).
    pub async fn wait_subscribers(&self, channel: &str, n: u64) {
        wait_for(&format!("{n} subscriber(s) on {channel}"), || async {
            let count = self.channel_info(channel).await["subscribers"].as_u64()?;
            (count >= n).then_some(())
        })
        .await
    }
}

impl WsClient {
    /// Sends `{"op":"ping"}` and collects every frame up to the `pong` (excluded).
    pub async fn frames_until_pong(&mut self) -> Vec<Value> {
        self.send(serde_json::json!({"op": "ping"})).await;
        let mut seen = Vec::new();
        loop {
            let v = self.recv().await;
            if v["op"] == "pong" {
                return seen;
            }
            seen.push(v);
        }
    }

    /// The close frame's code, skipping any text frames before it; `None` if the stream ended
    /// without a close frame.
    pub async fn recv_close_code(&mut self) -> Option<u16> {
        loop {
            match self.recv_frame().await {
                Some(WsMessage::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Some(_) => continue,
                None => return None,
            }
        }
    }
}
