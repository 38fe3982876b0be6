//! A local webhook receiver for the webhook tests (loopback only). It records every request it
//! is sent (path, headers, body, the status it answered) and answers as the test tells it: 2xx,
//! an error status with headers, a slow answer, a redirect or a huge body. It can be stopped —
//! its port then refuses connections, open keep-alive connections included — and started
//! again on the same port, to play a receiver that is down for a while.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::support::WAIT;

/// A request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub path: String,
    /// Header names lowercase.
    pub headers: HashMap<String, String>,
    pub body: Bytes,
    pub at: Instant,
    /// The status answered (0 when the answer never completed: slow answers).
    pub status: u16,
}

impl Delivery {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the delivery body is JSON")
    }

    /// The channel part of `webhook-id: {channel}:{epoch}:{seq}`.
    pub fn channel(&self) -> String {
        self.json()["channel"]
            .as_str()
            .expect("channel in body")
            .to_owned()
    }

    pub fn seq(&self) -> u64 {
        self.json()["seq"].as_u64().expect("seq in body")
    }

    /// Whether the signature header carries a valid `v1` signature made with `secret`.
    pub fn signed_by(&self, secret: &str) -> bool {
        let expected = sign(
            secret,
            self.header("webhook-id"),
            self.header("webhook-timestamp"),
            &self.body,
        );
        self.header("webhook-signature")
            .split(' ')
            .any(|s| s == expected)
    }
}

/// `v1,{base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")}` as Standard Webhooks defines it.
pub fn sign(secret: &str, id: &str, timestamp: &str, body: &[u8]) -> String {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").expect("whsec_ prefix"))
        .expect("base64 secret");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// How to answer one request.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    /// A status with extra headers (`Retry-After`, `Location` …).
    With(u16, Vec<(&'static str, String)>),
    /// Wait this long before answering 200.
    Slow(Duration),
    /// A status with a body of this many bytes.
    Big(u16, usize),
}

type Script = Arc<dyn Fn(&Delivery) -> Reply + Send + Sync>;

struct Shared {
    deliveries: Mutex<Vec<Delivery>>,
    script: Mutex<Script>,
    changed: Notify,
}

pub struct Receiver {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<CancellationToken>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Receiver {
    /// Starts on a free loopback port, answering 200 to everything.
    pub async fn start() -> Receiver {
        let shared = Arc::new(Shared {
            deliveries: Mutex::new(Vec::new()),
            script: Mutex::new(Arc::new(|_: &Delivery| Reply::Status(200))),
            changed: Notify::new(),
        });
        let mut r = Receiver {
            addr: "127.0.0.1:0".parse().expect("address"),
            shared,
            stop: None,
            task: None,
        };
        r.up().await;
        r
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Replaces how requests are answered from now on.
    pub fn script(&self, f: impl Fn(&Delivery) -> Reply + Send + Sync + 'static) {
        *self.shared.script.lock().expect("script lock") = Arc::new(f);
    }

    /// Takes the port down: the listener and every open connection are closed.
    pub async fn down(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.cancel();
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(WAIT, task).await;
        }
    }

    /// (Re)opens the same port (SO_REUSEADDR, so a recent close does not block it).
    pub async fn up(&mut self) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket.bind(self.addr).expect("bind the receiver");
        let listener = socket.listen(256).expect("listen");
        self.addr = listener.local_addr().expect("receiver address");
        let stop = CancellationToken::new();
        self.stop = Some(stop.clone());
        let shared = self.shared.clone();
        self.task = Some(tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let shared = shared.clone();
                        connections.spawn(async move {
                            let service = hyper::service::service_fn(move |req| {
                                let shared = shared.clone();
                                async move { Ok::<_, Infallible>(answer(&shared, req).await) }
                            });
                            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
            connections.abort_all();
            while connections.join_next().await.is_some() {}
        }));
    }

    /// Everything received so far, in arrival order.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.shared
            .deliveries
            .lock()
            .expect("deliveries lock")
            .clone()
    }

    /// Waits until `check` holds over everything received, and returns its answer.
    pub async fn wait_until<T>(
        &self,
        what: &str,
        mut check: impl FnMut(&[Delivery]) -> Option<T>,
    ) -> T {
        self.wait_until_within(what, WAIT, &mut check).await
    }

    pub async fn wait_until_within<T>(
        &self,
        what: &str,
        limit: Duration,
        check: &mut impl FnMut(&[Delivery]) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.shared.changed.notified();
            {
                let all = self.shared.deliveries.lock().expect("deliveries lock");
                if let Some(v) = check(&all) {
                    return v;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let all = self.deliveries();
                let tail: Vec<String> = all
                    .iter()
                    .rev()
                    .take(5)
                    .map(|d| format!("{} {} {}", d.path, d.status, d.header("webhook-id")))
                    .collect();
                panic!(
                    "timed out waiting for {what}; {} requests received, the last: {tail:?}",
                    all.len()
                );
            }
        }
    }

    /// Waits until at least `n` requests to `path` were answered with a 2xx.
    pub async fn wait_ok(&self, path: &str, n: usize) -> Vec<Delivery> {
        self.wait_until(&format!("{n} successful deliveries to {path}"), |all| {
            let ok: Vec<Delivery> = all
                .iter()
                .filter(|d| d.path == path && (200..300).contains(&d.status))
                .cloned()
                .collect();
            (ok.len() >= n).then_some(ok)
        })
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.cancel();
        }
    }
}

async fn answer(shared: &Shared, req: Request<hyper::body::Incoming>) -> Response {
    let path = req.uri().path().to_owned();
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let mut delivery = Delivery {
        path,
        headers,
        body,
        at: Instant::now(),
        status: 0,
    };
    let script = shared.script.lock().expect("script lock").clone();
    let reply = script(&delivery);
    let (status, extra, body) = match reply {
        Reply::Status(s) => (s, Vec::new(), Body::empty()),
        Reply::With(s, h) => (s, h, Body::empty()),
        Reply::Slow(d) => {
            // Recorded before the wait, with status 0: the hub gives up long before.
            record(shared, delivery.clone());
            tokio::time::sleep(d).await;
            return Response::new(Body::empty());
        }
        Reply::Big(s, n) => (s, Vec::new(), Body::from(vec![b'x'; n])),
    };
    delivery.status = status;
    record(shared, delivery);
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(status).expect("a valid status");
    for (name, value) in extra {
        response
            .headers_mut()
            .insert(name, value.parse().expect("header value"));
    }
    response
}

fn record(shared: &Shared, delivery: Delivery) {
    shared
        .deliveries
        .lock()
        .expect("deliveries lock")
        .push(delivery);
    shared.changed.notify_waiters();
}
