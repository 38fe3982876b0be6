//! The client commands: `publish` and `tail`, talking to a running hub over HTTP.

use std::io::{Read, Write};
use std::time::Duration;

use futures_util::StreamExt;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {url}: {source}")]
    Connect { url: String, source: reqwest::Error },
    #[error("the hub answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("{0}")]
    Input(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Where the hub is and how to authenticate.
#[derive(Debug, Clone)]
pub struct Client {
    pub server: String,
    pub key: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub fn new(server: &str, key: Option<String>) -> Self {
        Self {
            server: server.trim_end_matches('/').to_owned(),
            key,
            http: reqwest::Client::new(),
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.server));
        match &self.key {
            Some(k) => req.bearer_auth(k),
            None => req,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let resp = req.send().await.map_err(|source| ClientError::Connect {
            url: self.server.clone(),
            source,
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        Err(ClientError::Status { status, body })
    }
}

/// Reads the message data: the argument, or standard input for `-` or no argument. Text that is
/// not JSON is published as a JSON string, so `tidings publish ch hello` just works.
pub fn message_data(arg: Option<&str>) -> Result<serde_json::Value, ClientError> {
    let text = match arg {
        Some("-") | None => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            s
        }
        Some(s) => s.to_owned(),
    };
    let trimmed = text.trim_end_matches(['\n', '\r']);
    Ok(serde_json::from_str(trimmed)
        .unwrap_or_else(|_| serde_json::Value::String(trimmed.to_owned())))
}

pub async fn publish(
    client: &Client,
    channel: &str,
    data: serde_json::Value,
    event: Option<String>,
    id: Option<String>,
) -> Result<serde_json::Value, ClientError> {
    let mut body = serde_json::json!({ "data": data });
    if let Some(e) = event {
        body["event"] = e.into();
    }
    if let Some(i) = id {
        body["id"] = i.into();
    }
    let path = format!("/api/channels/{}/messages", encode_path(channel));
    call(client, reqwest::Method::POST, &path, Some(body)).await
}

fn encode_path(segment: &str) -> String {
    // Channel names only hold [A-Za-z0-9_.@:-]; anything else is rejected by the hub anyway.
    segment
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"_.@:-".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Prints every message of `channel` as one JSON line, resuming after disconnects.
pub async fn tail(
    client: &Client,
    channel: &str,
    since: Option<u64>,
    out: &mut (dyn Write + Send),
) -> Result<(), ClientError> {
    follow_channel(client, channel, since, |event| {
        match event.event.as_deref() {
            None | Some("message") => {
                writeln!(out, "{}", event.data)?;
                out.flush()?;
            }
            Some("reset") => eprintln!("tidings: history was reset or truncated: {}", event.data),
            Some(_) => {}
        }
        Ok(true)
    })
    .await
}

/// Streams `channel` over SSE, resuming with `Last-Event-ID` after disconnects, handing each
/// event to `handle` until it returns `false`.
pub async fn follow_channel(
    client: &Client,
    channel: &str,
    since: Option<u64>,
    mut handle: impl FnMut(&SseEvent) -> Result<bool, ClientError>,
) -> Result<(), ClientError> {
    let mut last_event_id: Option<String> = since.map(|n| n.to_string());
    let mut backoff = Duration::from_millis(250);
    let mut connected_once = false;
    loop {
        let path = format!("/api/channels/{}/events", encode_path(channel));
        let mut req = client.request(reqwest::Method::GET, &path);
        if let Some(id) = &last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = match client.send(req).await {
            Ok(r) => r,
            Err(ClientError::Connect { .. }) if connected_once => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
            Err(e) => return Err(e),
        };
        connected_once = true;
        backoff = Duration::from_millis(250);
        let mut parser = SseParser::default();
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            for event in parser.feed(&chunk) {
                if let Some(id) = &event.id {
                    last_event_id = Some(id.clone());
                }
                if !handle(&event)? {
                    return Ok(());
                }
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Starts a run of `job` (trigger `cli`); returns the run object.
pub async fn start_run(
    client: &Client,
    job: &str,
    params: &[(String, String)],
) -> Result<serde_json::Value, ClientError> {
    let params: serde_json::Map<String, serde_json::Value> = params
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let body = serde_json::json!({"params": params, "trigger": "cli"});
    let path = format!("/api/jobs/{}/runs", encode_path(job));
    call(client, reqwest::Method::POST, &path, Some(body)).await
}

/// Prints a run's output as it is printed (stdout lines to `out`, stderr lines to `err`)
/// and returns the process exit code to mirror: the run's own, 128 + signal number when a
/// signal ended it, 1 for any other failure.
pub async fn follow_run(
    client: &Client,
    channel: &str,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> Result<i32, ClientError> {
    let mut code = 1;
    follow_channel(client, channel, Some(0), |event| {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&event.data) else {
            return Ok(true);
        };
        match message["event"].as_str() {
            Some("line") => {
                let line = message["data"]["line"].as_str().unwrap_or_default();
                if message["data"]["stream"] == "stderr" {
                    writeln!(err, "{line}")?;
                } else {
                    writeln!(out, "{line}")?;
                    out.flush()?;
                }
                Ok(true)
            }
            Some("exit") => {
                let data = &message["data"];
                code = match (data["exit_code"].as_i64(), data["signal"].as_str()) {
                    (Some(c), _) => i32::try_from(c).unwrap_or(1),
                    (None, Some(signal)) => 128 + signal_number(signal).unwrap_or(0),
                    (None, None) => 1,
                };
                if data["status"] != "succeeded" {
                    writeln!(err, "tidings: run {}", data)?;
                }
                Ok(false)
            }
            _ => Ok(true),
        }
    })
    .await?;
    Ok(code)
}

fn signal_number(name: &str) -> Option<i32> {
    Some(match name {
        "SIGHUP" => 1,
        "SIGINT" => 2,
        "SIGQUIT" => 3,
        "SIGABRT" => 6,
        "SIGKILL" => 9,
        "SIGSEGV" => 11,
        "SIGPIPE" => 13,
        "SIGALRM" => 14,
        "SIGTERM" => 15,
        _ => return None,
    })
}

/// `GET`/`POST`/`DELETE` on a JSON endpoint, returning the body.
pub async fn call(
    client: &Client,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, ClientError> {
    let mut req = client.request(method, path);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = client.send(req).await?;
    resp.json().await.map_err(|source| ClientError::Connect {
        url: client.server.clone(),
        source,
    })
}

pub fn encode_segment(segment: &str) -> String {
    encode_path(segment)
}

/// One parsed Server-Sent Event.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// An incremental `text/event-stream` parser (used by `tail` and the tests).
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: Vec<u8>,
    current: SseEvent,
    has_data: bool,
}

impl SseParser {
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buffer.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(pos) = self.buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]);
            let line = line.strip_suffix('\r').unwrap_or(&line);
            if line.is_empty() {
                if self.has_data {
                    events.push(std::mem::take(&mut self.current));
                } else {
                    self.current = SseEvent::default();
                }
                self.has_data = false;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => self.current.id = Some(value.to_owned()),
                "event" => self.current.event = Some(value.to_owned()),
                "data" => {
                    if self.has_data {
                        self.current.data.push('\n');
                    }
                    self.current.data.push_str(value);
                    self.has_data = true;
                }
                _ => {}
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_split_events() {
        let mut p = SseParser::default();
        assert!(p.feed(b"retry: 2000\n\n: ping\n\nid: e:1\nda").is_empty());
        let events = p.feed(b"ta: {\"a\":1}\n\nevent: reset\ndata: x\n\n");
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].id.as_deref(), Some("e:1"));
        assert_eq!(events[0].data, "{\"a\":1}");
        assert_eq!(events[1].event.as_deref(), Some("reset"));
    }

    #[test]
    fn path_encoding() {
        assert_eq!(encode_path("jobs:build:1"), "jobs:build:1");
        assert_eq!(encode_path("a b/c"), "a%20b%2Fc");
    }
}
