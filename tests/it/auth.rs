//! Auth (§3): API keys, HS256 client tokens, public patterns, the WebSocket upgrade, open
//! endpoints, and the refusal to expose an open hub on a non-loopback address.

use std::process::Stdio;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::{assert_error_body, binary, ServerOptions, TestServer, WsClient, WAIT};

const KEY: &str = "k1";
const SECRET: &str = "s3cret";
const CONFIG: &str =
    "[auth]\napi_keys = [\"k1\"]\ntoken_secret = \"s3cret\"\npublic = [\"pub:*\"]\n";

async fn secured() -> TestServer {
    TestServer::start_with(ServerOptions {
        config: Some(CONFIG.into()),
        ..Default::default()
    })
    .await
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn token_with(secret: &str, exp: i64, subscribe: &[&str], publish: &[&str]) -> String {
    let claims = json!({"sub": "user-1", "exp": exp, "subscribe": subscribe, "publish": publish});
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode token")
}

/// The client token of these tests: may read `acc:1` and publish to `chat:*`.
fn client_token() -> String {
    token_with(SECRET, now() + 600, &["acc:1"], &["chat:*"])
}

fn expired_token() -> String {
    token_with(SECRET, now() - 120, &["acc:1"], &["chat:*"])
}

fn forged_token() -> String {
    token_with("not-the-secret", now() + 600, &["acc:1"], &["chat:*"])
}

/// Request helpers with an optional bearer credential.
struct As<'a> {
    server: &'a TestServer,
    bearer: Option<String>,
}

impl As<'_> {
    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.server.http.request(method, self.server.url(path));
        match &self.bearer {
            Some(b) => req.bearer_auth(b),
            None => req,
        }
    }

    async fn publish(&self, channel: &str, body: Value) -> (u16, Value) {
        let path = format!("/api/channels/{channel}/messages");
        self.server
            .send(self.req(reqwest::Method::POST, &path).json(&body))
            .await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.server.send(self.req(reqwest::Method::GET, path)).await
    }

    async fn delete(&self, path: &str) -> (u16, Value) {
        self.server
            .send(self.req(reqwest::Method::DELETE, path))
            .await
    }

    /// The status of opening an SSE stream (the body is dropped).
    async fn sse_status(&self, path: &str) -> u16 {
        let resp = self
            .req(reqwest::Method::GET, path)
            .send()
            .await
            .expect("SSE GET");
        resp.status().as_u16()
    }
}

fn anon(server: &TestServer) -> As<'_> {
    As {
        server,
        bearer: None,
    }
}

fn bearer<'a>(server: &'a TestServer, credential: &str) -> As<'a> {
    As {
        server,
        bearer: Some(credential.to_owned()),
    }
}

async fn last_seq_with_key(server: &TestServer, channel: &str) -> u64 {
    let (status, body) = bearer(server, KEY)
        .get(&format!("/api/channels/{channel}"))
        .await;
    assert_eq!(status, 200, "{body}");
    body["last_seq"].as_u64().expect("last_seq")
}

fn expect(status: u16, body: &Value, expected: u16, context: &str) {
    assert_eq!(status, expected, "{context}: {body}");
    if expected >= 400 {
        assert_error_body(body, context);
    }
}

#[tokio::test]
async fn publishing_needs_a_key_or_a_token() {
    let server = secured().await;
    for ch in ["pub:x", "priv:x", "chat:lobby"] {
        let (status, body) = anon(&server).publish(ch, json!({"data": 1})).await;
        expect(status, &body, 401, &format!("anonymous publish to {ch}"));
        let (status, body) = bearer(&server, "wrong-key")
            .publish(ch, json!({"data": 1}))
            .await;
        expect(status, &body, 403, &format!("wrong key on {ch}"));
        assert_eq!(
            last_seq_with_key(&server, ch).await,
            0,
            "{ch}: refused publishes stored nothing"
        );
    }
    let (status, body) = bearer(&server, KEY)
        .publish("priv:x", json!({"data": 1}))
        .await;
    expect(status, &body, 201, "publish with the key");
    assert_eq!(body["seq"], 1);
    // The scheme may be written in lower case.
    let (status, body) = server
        .send(
            server
                .http
                .post(server.url("/api/channels/priv:x/messages"))
                .header("authorization", format!("bearer {KEY}"))
                .json(&json!({"data": 2})),
        )
        .await;
    expect(status, &body, 201, "lower-case bearer");
    assert_eq!(last_seq_with_key(&server, "priv:x").await, 2);
}

#[tokio::test]
async fn public_channels_are_readable_without_credentials() {
    let server = secured().await;
    for ch in ["pub:x", "priv:x"] {
        let (status, _) = bearer(&server, KEY).publish(ch, json!({"data": ch})).await;
        assert_eq!(status, 201);
    }
    let a = anon(&server);
    let (status, page) = a.get("/api/channels/pub:x/messages?since=0").await;
    expect(status, &page, 200, "anonymous read of pub:x");
    assert_eq!(page["messages"][0]["data"], "pub:x");
    let (status, info) = a.get("/api/channels/pub:x").await;
    expect(status, &info, 200, "anonymous info of pub:x");
    assert_eq!(info["last_seq"], 1);
    assert_eq!(
        a.sse_status("/api/channels/pub:x/events?since=0").await,
        200
    );

    for path in [
        "/api/channels/priv:x/messages?since=0",
        "/api/channels/priv:x/messages?since=1&wait=30",
        "/api/channels/priv:x",
        "/api/channels",
    ] {
        let (status, body) = a.get(path).await;
        expect(status, &body, 401, &format!("anonymous GET {path}"));
        assert!(
            !body.to_string().contains("\"data\":\"priv:x\""),
            "{path} leaked data"
        );
    }
    assert_eq!(
        a.sse_status("/api/channels/priv:x/events?since=0").await,
        401
    );

    let (status, list) = bearer(&server, KEY).get("/api/channels").await;
    expect(status, &list, 200, "list with the key");
    let mut names: Vec<&str> = list["channels"]
        .as_array()
        .expect("channels")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["priv:x", "pub:x"]);
}

#[tokio::test]
async fn client_tokens_grant_their_patterns_only() {
    let server = secured().await;
    let k = bearer(&server, KEY);
    for ch in ["acc:1", "acc:2", "pub:x"] {
        let (status, _) = k.publish(ch, json!({"data": ch})).await;
        assert_eq!(status, 201);
    }
    let token = client_token();
    let t = bearer(&server, &token);
    let (status, page) = t.get("/api/channels/acc:1/messages?since=0").await;
    expect(status, &page, 200, "token reads acc:1");
    assert_eq!(page["messages"][0]["data"], "acc:1");
    let (status, body) = t.get("/api/channels/acc:2/messages?since=0").await;
    expect(status, &body, 403, "token reads acc:2");
    let (status, _) = t.get("/api/channels/pub:x/messages?since=0").await;
    assert_eq!(status, 200, "public channels stay readable with a token");

    let (status, body) = t.publish("chat:lobby", json!({"data": "hi"})).await;
    expect(status, &body, 201, "token publishes to chat:lobby");
    for ch in ["acc:1", "chat", "pub:x"] {
        let (status, body) = t.publish(ch, json!({"data": "no"})).await;
        expect(status, &body, 403, &format!("token publishes to {ch}"));
    }
    assert_eq!(last_seq_with_key(&server, "acc:1").await, 1);
    assert_eq!(last_seq_with_key(&server, "chat:lobby").await, 1);

    // A token lists only what it may read.
    let (status, list) = t.get("/api/channels").await;
    expect(status, &list, 200, "list with a token");
    let mut names: Vec<&str> = list["channels"]
        .as_array()
        .expect("channels")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["acc:1", "pub:x"]);
}

#[tokio::test]
async fn tokens_work_as_query_parameters_on_sse_and_long_poll() {
    let server = secured().await;
    let (status, _) = bearer(&server, KEY)
        .publish("acc:1", json!({"data": 1}))
        .await;
    assert_eq!(status, 201);
    let token = client_token();
    let a = anon(&server);

    let (status, page) = a
        .get(&format!(
            "/api/channels/acc:1/messages?since=0&wait=30&token={token}"
        ))
        .await;
    expect(status, &page, 200, "long-poll with ?token=");
    assert_eq!(page["messages"][0]["data"], 1);

    let mut sse = server
        .sse(
            &format!("/api/channels/acc:1/events?since=0&token={token}"),
            None,
        )
        .await;
    assert_eq!(sse.next_message().await["seq"], 1);
    let (status, _) = bearer(&server, KEY)
        .publish("acc:1", json!({"data": 2}))
        .await;
    assert_eq!(status, 201);
    assert_eq!(sse.next_message().await["seq"], 2);

    for (what, bad) in [
        ("expired", expired_token()),
        ("forged", forged_token()),
        ("garbage", "not-a-token".to_owned()),
    ] {
        let (status, body) = a
            .get(&format!(
                "/api/channels/acc:1/messages?since=0&wait=30&token={bad}"
            ))
            .await;
        expect(
            status,
            &body,
            403,
            &format!("long-poll with a {what} ?token="),
        );
        assert_eq!(
            a.sse_status(&format!("/api/channels/acc:1/events?since=0&token={bad}"))
                .await,
            403,
            "SSE with a {what} ?token="
        );
    }
    // A good token for another channel.
    assert_eq!(
        a.sse_status(&format!("/api/channels/acc:2/events?token={token}"))
            .await,
        403
    );
    let (status, body) = a
        .get(&format!(
            "/api/channels/acc:2/messages?wait=1&token={token}"
        ))
        .await;
    expect(status, &body, 403, "long-poll acc:2 with a token for acc:1");
}

#[tokio::test]
async fn expired_forged_and_foreign_tokens_are_403() {
    let server = secured().await;
    let (status, _) = bearer(&server, KEY)
        .publish("acc:1", json!({"data": 1}))
        .await;
    assert_eq!(status, 201);
    for (what, bad) in [("expired", expired_token()), ("forged", forged_token())] {
        let t = bearer(&server, &bad);
        let (status, body) = t.get("/api/channels/acc:1/messages?since=0").await;
        expect(status, &body, 403, &format!("{what} token reads"));
        let (status, body) = t.publish("chat:lobby", json!({"data": 1})).await;
        expect(status, &body, 403, &format!("{what} token publishes"));
        assert_eq!(
            t.sse_status("/api/channels/acc:1/events").await,
            403,
            "{what} SSE"
        );
    }
    let foreign = token_with(SECRET, now() + 600, &["acc:9"], &["other:*"]);
    let t = bearer(&server, &foreign);
    let (status, body) = t.get("/api/channels/acc:1/messages").await;
    expect(status, &body, 403, "token for another channel reads");
    let (status, body) = t.publish("chat:lobby", json!({"data": 1})).await;
    expect(status, &body, 403, "token for another channel publishes");
    assert_eq!(last_seq_with_key(&server, "chat:lobby").await, 0);
}

#[tokio::test]
async fn deleting_a_channel_needs_a_key() {
    let server = secured().await;
    let (status, _) = bearer(&server, KEY)
        .publish("acc:1", json!({"data": 1}))
        .await;
    assert_eq!(status, 201);
    let all_rights = token_with(SECRET, now() + 600, &["*"], &["*"]);
    let (status, body) = bearer(&server, &all_rights)
        .delete("/api/channels/acc:1")
        .await;
    expect(status, &body, 403, "DELETE with a token");
    let (status, body) = anon(&server).delete("/api/channels/acc:1").await;
    expect(status, &body, 401, "anonymous DELETE");
    let (status, body) = anon(&server).delete("/api/channels/pub:x").await;
    expect(status, &body, 401, "anonymous DELETE of a public channel");
    assert_eq!(last_seq_with_key(&server, "acc:1").await, 1, "still there");
    let (status, body) = bearer(&server, KEY).delete("/api/channels/acc:1").await;
    expect(status, &body, 200, "DELETE with the key");
    assert_eq!(body["last_seq"], 0);
}

async fn ws_upgrade_status(url: &str) -> u16 {
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("WebSocket connect failed without an HTTP answer: {e}"),
    }
}

#[tokio::test]
async fn a_bad_token_is_401_on_the_websocket_upgrade() {
    let server = secured().await;
    let base = server.ws_url();
    assert_eq!(ws_upgrade_status(&format!("{base}?token=bad")).await, 401);
    assert_eq!(
        ws_upgrade_status(&format!("{base}?token={}", expired_token())).await,
        401
    );
    assert_eq!(
        ws_upgrade_status(&format!("{base}?token={}", forged_token())).await,
        401
    );
    assert_eq!(
        ws_upgrade_status(&format!("{base}?token={}", client_token())).await,
        101
    );
    assert_eq!(ws_upgrade_status(&format!("{base}?token={KEY}")).await, 101);
    assert_eq!(
        ws_upgrade_status(&base).await,
        101,
        "no token: allowed, public channels only"
    );
}

#[tokio::test]
async fn an_anonymous_websocket_may_subscribe_to_public_channels_only() {
    let server = secured().await;
    let (status, _) = bearer(&server, KEY)
        .publish("pub:x", json!({"data": "p"}))
        .await;
    assert_eq!(status, 201);
    let mut ws = server.ws().await;
    ws.send(json!({"op": "subscribe", "channel": "priv:x", "since": 0}))
        .await;
    let v = ws.recv().await;
    assert_eq!(v["op"], "error", "{v}");
    assert_eq!(v["code"], "forbidden");
    assert_eq!(v["channel"], "priv:x");
    ws.send(json!({"op": "publish", "channel": "pub:x", "data": 1, "ref": 4}))
        .await;
    let v = ws.recv().await;
    assert_eq!(v["op"], "error", "{v}");
    assert_eq!(v["code"], "forbidden");
    assert_eq!(v["ref"], 4);
    ws.send(json!({"op": "subscribe", "channel": "pub:x", "since": 0}))
        .await;
    assert_eq!(ws.recv().await["op"], "subscribed");
    let m = ws.recv().await;
    assert_eq!(m["op"], "message");
    assert_eq!(m["data"], "p");
    assert_eq!(
        last_seq_with_key(&server, "pub:x").await,
        1,
        "the refused publish stored nothing"
    );
}

#[tokio::test]
async fn a_websocket_token_grants_its_patterns() {
    let server = secured().await;
    let mut ws = WsClient::connect(&format!("{}?token={}", server.ws_url(), client_token())).await;
    ws.send(json!({"op": "subscribe", "channel": "acc:1"}))
        .await;
    assert_eq!(ws.recv().await["op"], "subscribed");
    ws.send(json!({"op": "subscribe", "channel": "acc:2"}))
        .await;
    let v = ws.recv().await;
    assert_eq!(
        (v["op"].as_str(), v["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{v}"
    );
    ws.send(json!({"op": "publish", "channel": "chat:lobby", "data": "hi", "ref": 1}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"op": "ack", "ref": 1, "seq": 1, "duplicate": false})
    );
    ws.send(json!({"op": "publish", "channel": "acc:1", "data": "no", "ref": 2}))
        .await;
    let v = ws.recv().await;
    assert_eq!(
        (v["op"].as_str(), v["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{v}"
    );
    assert_eq!(v["ref"], 2);
    assert_eq!(last_seq_with_key(&server, "acc:1").await, 0);

    // The API key in the Authorization header of the upgrade: every right.
    let mut req = server.ws_url().into_client_request().expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {KEY}").parse().expect("header"),
    );
    let (stream, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("connect with key");
    let mut admin = WsClient { stream };
    admin
        .send(json!({"op": "subscribe", "channel": "priv:y"}))
        .await;
    assert_eq!(admin.recv().await["op"], "subscribed");
    admin
        .send(json!({"op": "publish", "channel": "priv:y", "data": 1, "ref": 1}))
        .await;
    let ack = admin.recv_op("ack").await;
    assert_eq!(ack["seq"], 1);
}

#[tokio::test]
async fn health_and_metrics_are_open() {
    let server = secured().await;
    let resp = server
        .http
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.text().await.expect("text").trim(), "ok");
    let resp = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.expect("text");
    assert!(text.contains("tidings_messages_published_total"), "{text}");
}

fn command_without_tidings_env() -> std::process::Command {
    let mut cmd = std::process::Command::new(binary());
    for (k, _) in std::env::vars() {
        if k.starts_with("TIDINGS") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "warn");
    cmd
}

#[tokio::test]
async fn a_non_loopback_listen_without_keys_is_refused() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let output = command_without_tidings_env()
        .args(["serve", "--listen", "0.0.0.0:0", "--data"])
        .arg(tmp.path().join("data"))
        .stdin(Stdio::null())
        .output()
        .expect("run tidings");
    assert!(!output.status.success(), "it started: {output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("api_keys"), "{stderr}");
    assert!(stderr.contains("--insecure"), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("listening"), "{stdout}");

    // --check refuses it too.
    let output = command_without_tidings_env()
        .args(["serve", "--check", "--listen", "[::]:0"])
        .output()
        .expect("run tidings");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--insecure"));
}

/// Spawns `serve` with `args` and returns its first stdout line (then kills it).
async fn first_stdout_line(args: &[&std::ffi::OsStr]) -> String {
    let mut cmd = tokio::process::Command::from(command_without_tidings_env());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("a line in time")
        .expect("read")
        .expect("a listening line before exit");
    child.kill().await.expect("kill");
    line
}

#[tokio::test]
async fn a_non_loopback_listen_starts_with_insecure_or_keys() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    let line = first_stdout_line(&[
        "serve".as_ref(),
        "--insecure".as_ref(),
        "--listen".as_ref(),
        "0.0.0.0:0".as_ref(),
        "--data".as_ref(),
        data.as_os_str(),
    ])
    .await;
    assert!(
        line.starts_with("tidings listening on http://0.0.0.0:"),
        "{line}"
    );

    // With API keys a non-loopback address needs no --insecure.
    let config = tmp.path().join("keys.toml");
    std::fs::write(&config, "[auth]\napi_keys = [\"k1\"]\n").expect("write config");
    let line = first_stdout_line(&[
        "serve".as_ref(),
        "--listen".as_ref(),
        "0.0.0.0:0".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
    ])
    .await;
    assert!(
        line.starts_with("tidings listening on http://0.0.0.0:"),
        "{line}"
    );
}
