//! Bad input (§7): every case gets its status and a JSON error, and changes nothing. Also
//! WebSocket protocol errors, frame and subscription limits, and clients that stall.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::support::{assert_error_body, ServerOptions, TestServer, WAIT};

const CH: &str = "bad:target";

/// A server with one message on `CH`, so "nothing changed" can be checked.
async fn seeded() -> TestServer {
    let server = TestServer::start().await;
    let (status, body) = server
        .publish(CH, json!({"data": "seed", "id": "seed"}))
        .await;
    assert_eq!(status, 201, "{body}");
    server
}

/// Asserts `CH` still holds exactly the seed and no other channel appeared.
async fn assert_unchanged(server: &TestServer, context: &str) {
    let (status, page) = server
        .get(&format!("/api/channels/{CH}/messages?since=0"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["last_seq"], 1, "{context}: last_seq moved");
    assert_eq!(
        page["messages"].as_array().map(Vec::len),
        Some(1),
        "{context}"
    );
    let (status, list) = server.get("/api/channels").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list["channels"]
        .as_array()
        .expect("channels")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, [CH], "{context}: a channel appeared");
}

fn expect_error(status: u16, body: &Value, expected: u16, context: &str) -> String {
    assert_eq!(status, expected, "{context}: {body}");
    assert_error_body(body, context)
}

#[tokio::test]
async fn malformed_or_incomplete_publish_bodies_are_400() {
    let server = seeded().await;
    let path = format!("/api/channels/{CH}/messages");
    let raw_cases: &[(&str, &str)] = &[
        ("{\"data\":", "truncated JSON"),
        ("not json", "not JSON"),
        ("", "empty body"),
        ("{}", "missing data"),
        ("{\"event\":\"x\"}", "missing data with event"),
        ("[]", "empty batch"),
        (
            "[{\"data\":1},{\"id\":\"x\"}]",
            "batch element without data",
        ),
        ("42", "a number"),
        ("{\"data\":1} trailing", "trailing garbage"),
        ("{\"data\":1,\"event\":5}", "event not a string"),
        ("{\"data\":1,\"id\":7}", "id not a string"),
    ];
    for (body, what) in raw_cases {
        let (status, resp) = server.post_raw(&path, body.to_string()).await;
        expect_error(status, &resp, 400, what);
    }
    assert_unchanged(&server, "malformed bodies").await;
}

#[tokio::test]
async fn bad_channel_names_are_400() {
    let server = seeded().await;
    let long = "a".repeat(256);
    let names = [
        "a::b",
        "a%20b",
        long.as_str(),
        "%C3%A9",
        "a:",
        ":a",
        "a*",
        "a%2Fb",
    ];
    for name in names {
        let (status, body) = server.publish(name, json!({"data": 1})).await;
        expect_error(status, &body, 400, &format!("publish to {name}"));
        let (status, body) = server.get(&format!("/api/channels/{name}/messages")).await;
        expect_error(status, &body, 400, &format!("read {name}"));
        let (status, body) = server.get(&format!("/api/channels/{name}")).await;
        expect_error(status, &body, 400, &format!("info {name}"));
        let (status, body) = server.delete(&format!("/api/channels/{name}")).await;
        expect_error(status, &body, 400, &format!("delete {name}"));
        let (status, body) = server.get(&format!("/api/channels/{name}/events")).await;
        expect_error(status, &body, 400, &format!("events {name}"));
    }
    // 255 bytes is still a name.
    let (status, _) = server
        .get(&format!("/api/channels/{}/messages", "a".repeat(255)))
        .await;
    assert_eq!(status, 200);
    assert_unchanged(&server, "bad channel names").await;
}

#[tokio::test]
async fn bad_events_and_ids_are_400() {
    let server = seeded().await;
    let cases = [
        (
            json!({"data": 1, "event": "bad event"}),
            "event with a space",
        ),
        (json!({"data": 1, "event": ""}), "empty event"),
        (
            json!({"data": 1, "event": "e".repeat(65)}),
            "event of 65 chars",
        ),
        (json!({"data": 1, "event": "é"}), "non-ASCII event"),
        (json!({"data": 1, "id": ""}), "empty id"),
        (json!({"data": 1, "id": "x".repeat(129)}), "id of 129 chars"),
        (json!({"data": 1, "id": "tab\there"}), "id with a tab"),
        (json!({"data": 1, "id": "nl\n"}), "id with a newline"),
        (json!({"data": 1, "id": "é"}), "non-ASCII id"),
        (json!({"data": 1, "extra": true}), "unknown field"),
        (
            json!([{"data": 1}, {"data": 2, "id": ""}]),
            "bad id in a batch",
        ),
    ];
    for (body, what) in cases {
        let (status, resp) = server.publish(CH, body).await;
        expect_error(status, &resp, 400, what);
    }
    // The limits themselves are accepted (on another channel, to keep CH unchanged).
    let (status, body) = server
        .publish(
            "bad:ok",
            json!({"data": 1, "event": "e".repeat(64), "id": "x".repeat(128)}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, _) = server.delete("/api/channels/bad:ok").await;
    assert_eq!(status, 200);
    let (status, page) = server
        .get(&format!("/api/channels/{CH}/messages?since=0"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["last_seq"], 1);
}

#[tokio::test]
async fn oversize_data_and_bodies_are_413() {
    let server = seeded().await;
    let big = "x".repeat(64 * 1024);
    let (status, body) = server.publish(CH, json!({"data": big})).await;
    let code = expect_error(status, &body, 413, "data over 64 KiB");
    assert_eq!(code, "too_large");
    // Exactly at the limit (the string's quotes count): accepted, on another channel.
    let fits = "x".repeat(64 * 1024 - 2);
    let (status, body) = server.publish("bad:fits", json!({"data": fits})).await;
    assert_eq!(status, 201, "{body}");
    let (status, _) = server.delete("/api/channels/bad:fits").await;
    assert_eq!(status, 200);

    // A batch in which one element is too large refuses the batch.
    let (status, body) = server
        .publish(CH, json!([{"data": 1}, {"data": "y".repeat(70_000)}]))
        .await;
    expect_error(status, &body, 413, "batch with a large element");

    // A body over 1 MiB, every element within its own limit.
    let element = "z".repeat(60_000);
    let batch: Vec<Value> = (0..20).map(|_| json!({"data": element})).collect();
    let text = Value::Array(batch).to_string();
    assert!(text.len() > 1024 * 1024);
    let (status, body) = server
        .post_raw(&format!("/api/channels/{CH}/messages"), text)
        .await;
    expect_error(status, &body, 413, "body over 1 MiB");

    let (status, page) = server
        .get(&format!("/api/channels/{CH}/messages?since=0"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["last_seq"], 1, "nothing stored");
}

#[tokio::test]
async fn bad_query_parameters_are_400() {
    let server = seeded().await;
    for q in [
        "since=-1",
        "since=abc",
        "since=1.5",
        "limit=0",
        "limit=-3",
        "limit=x",
        "wait=-1",
        "wait=soon",
        "epoch=no!",
    ] {
        let (status, body) = server
            .get(&format!("/api/channels/{CH}/messages?{q}"))
            .await;
        expect_error(status, &body, 400, &format!("read ?{q}"));
    }
    for q in ["since=-1", "since=abc"] {
        let (status, body) = server.get(&format!("/api/channels/{CH}/events?{q}")).await;
        expect_error(status, &body, 400, &format!("events ?{q}"));
    }
    assert_unchanged(&server, "bad queries").await;
}

#[tokio::test]
async fn limit_and_wait_above_their_maximum_are_clamped() {
    let server = seeded().await;
    let batch: Vec<Value> = (0..1005).map(|i| json!({"data": i})).collect();
    let (status, _) = server.publish("bad:many", Value::Array(batch)).await;
    assert_eq!(status, 201);
    let (status, page) = server
        .get("/api/channels/bad:many/messages?since=0&limit=99999")
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(1000));
    assert_eq!(page["last_seq"], 1005);

    // wait=9999 is not an error; with a message already there it answers at once.
    let (status, page) = tokio::time::timeout(
        WAIT,
        server.get(&format!("/api/channels/{CH}/messages?since=0&wait=9999")),
    )
    .await
    .expect("answers promptly");
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["messages"][0]["data"], "seed");
}

#[tokio::test]
async fn a_garbage_last_event_id_is_400() {
    let server = seeded().await;
    for id in ["garbage", "-1", "abc:1", "abcdefgh:x", "1.5"] {
        let (status, body) = server
            .send(
                server
                    .http
                    .get(server.url(&format!("/api/channels/{CH}/events")))
                    .header("last-event-id", id),
            )
            .await;
        expect_error(status, &body, 400, &format!("Last-Event-ID {id}"));
    }
}

#[tokio::test]
async fn unknown_routes_are_404_json() {
    let server = seeded().await;
    for path in [
        "/nope",
        "/api/nope",
        "/api/channels/a/b/c",
        "/api/channels/a/messages/extra",
    ] {
        let (status, body) = server.get(path).await;
        let code = expect_error(status, &body, 404, path);
        assert_eq!(code, "not_found", "{path}");
    }
    let (status, body) = server.post("/api/unknown", json!({"data": 1})).await;
    expect_error(status, &body, 404, "POST to an unknown route");
    // A known path with a method it does not have still answers a JSON error.
    let resp = server
        .http
        .put(server.url(&format!("/api/channels/{CH}/messages")))
        .body("{}")
        .send()
        .await
        .expect("PUT");
    let status = resp.status().as_u16();
    assert!(status == 404 || status == 405, "PUT: {status}");
    if status == 405 {
        let allow = resp
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(
            allow.contains("GET") && allow.contains("POST"),
            "Allow: {allow:?}"
        );
    }
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_error_body(&body, "PUT on a known path");
    assert_unchanged(&server, "unknown routes").await;
}

#[tokio::test]
async fn websocket_protocol_errors_keep_the_connection() {
    let server = seeded().await;
    let mut ws = server.ws().await;
    let cases: Vec<(WsMessage, &str)> = vec![
        (WsMessage::Text("this is not json".into()), "non-JSON text"),
        (WsMessage::Text("[1,2]".into()), "a JSON array"),
        (
            WsMessage::Text(json!({"channel": CH}).to_string().into()),
            "no op",
        ),
        (
            WsMessage::Text(json!({"op": "explode"}).to_string().into()),
            "unknown op",
        ),
        (
            WsMessage::Text(json!({"op": "subscribe"}).to_string().into()),
            "subscribe without channel",
        ),
        (
            WsMessage::Text(json!({"op": "unsubscribe"}).to_string().into()),
            "unsubscribe without channel",
        ),
        (
            WsMessage::Text(
                json!({"op": "subscribe", "channel": "a::b"})
                    .to_string()
                    .into(),
            ),
            "bad channel",
        ),
        (
            WsMessage::Text(
                json!({"op": "subscribe", "channel": CH, "since": -1})
                    .to_string()
                    .into(),
            ),
            "since=-1",
        ),
        (
            WsMessage::Text(
                json!({"op": "subscribe", "channel": CH, "since": "x"})
                    .to_string()
                    .into(),
            ),
            "since=x",
        ),
        (
            WsMessage::Text(
                json!({"op": "publish", "channel": CH, "ref": 1})
                    .to_string()
                    .into(),
            ),
            "publish without data",
        ),
        (
            WsMessage::Text(json!({"op": "publish", "data": 1}).to_string().into()),
            "publish without channel",
        ),
        (
            WsMessage::Text(
                json!({"op": "publish", "channel": CH, "data": 1, "event": "bad event"})
                    .to_string()
                    .into(),
            ),
            "publish with a bad event",
        ),
        (
            WsMessage::Text(
                json!({"op": "publish", "channel": CH, "data": 1, "id": ""})
                    .to_string()
                    .into(),
            ),
            "publish with an empty id",
        ),
        (WsMessage::Binary(vec![1u8, 2, 3].into()), "binary frame"),
    ];
    for (frame, what) in cases {
        ws.send_raw(frame).await;
        let v = ws.recv().await;
        assert_eq!(v["op"], "error", "{what}: {v}");
        assert!(
            v["code"].as_str().is_some_and(|c| !c.is_empty()),
            "{what}: {v}"
        );
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
        // Still usable.
        ws.send(json!({"op": "ping"})).await;
        assert_eq!(
            ws.recv().await,
            json!({"op": "pong"}),
            "{what}: connection still usable"
        );
    }
    // The error for a publish names its ref.
    ws.send(json!({"op": "publish", "channel": CH, "ref": 5}))
        .await;
    let v = ws.recv().await;
    assert_eq!(v["op"], "error");
    assert_eq!(v["ref"], 5);
    // And the connection still does real work.
    ws.send(json!({"op": "subscribe", "channel": CH, "since": 0}))
        .await;
    assert_eq!(ws.recv().await["op"], "subscribed");
    assert_eq!(ws.recv().await["data"], "seed");
    assert_unchanged(&server, "WebSocket errors").await;
}

#[tokio::test]
async fn websocket_publish_over_64_kib_is_too_large() {
    let server = seeded().await;
    let mut ws = server.ws().await;
    ws.send(json!({"op": "publish", "channel": CH, "data": "x".repeat(70_000), "ref": 3}))
        .await;
    let v = ws.recv().await;
    assert_eq!(v["op"], "error", "{v}");
    assert_eq!(v["code"], "too_large");
    assert_eq!(v["ref"], 3);
    ws.send(json!({"op": "ping"})).await;
    assert_eq!(ws.recv().await, json!({"op": "pong"}));
    assert_unchanged(&server, "too large over WS").await;
}

#[tokio::test]
async fn a_websocket_frame_over_1_mib_closes_with_1009() {
    let server = seeded().await;
    let ws = server.ws().await;
    let huge = json!({"op": "publish", "channel": CH, "data": "x".repeat(1024 * 1024 + 10)});
    // Read while the frame is being written, as a browser would: the server may refuse it
    // before the client has finished sending (and the send may then fail).
    let (mut write, mut read) = ws.stream.split();
    let sending = tokio::spawn(async move {
        let _ = write.send(WsMessage::Text(huge.to_string().into())).await;
        write
    });
    let code = tokio::time::timeout(WAIT, async {
        while let Some(frame) = read.next().await {
            match frame {
                Ok(WsMessage::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(e) => panic!("the connection failed before a close frame: {e}"),
            }
        }
        None
    })
    .await
    .expect("a close frame in time");
    assert_eq!(code, Some(1009));
    drop(sending);
    assert_unchanged(&server, "huge frame").await;
}

async fn fill_subscriptions(ws: &mut crate::support::WsClient, prefix: &str, n: usize) {
    for i in 0..n {
        ws.send(json!({"op": "subscribe", "channel": format!("{prefix}:{i}")}))
            .await;
    }
    for _ in 0..n {
        let v = ws.recv().await;
        assert_eq!(v["op"], "subscribed", "{v}");
    }
}

#[tokio::test]
async fn too_many_subscriptions_is_an_error_and_the_connection_stays() {
    let server = TestServer::start_with(ServerOptions {
        config: Some("[server]\nmax_subscriptions_per_connection = 5\n".into()),
        ..Default::default()
    })
    .await;
    let mut ws = server.ws().await;
    fill_subscriptions(&mut ws, "lim", 5).await;
    ws.send(json!({"op": "subscribe", "channel": "lim:extra", "ref": 1}))
        .await;
    let v = ws.recv().await;
    assert_eq!(v["op"], "error", "{v}");
    assert_eq!(v["code"], "too_many_subscriptions");
    assert_eq!(v["channel"], "lim:extra");
    assert_eq!(server.channel_info("lim:extra").await["subscribers"], 0);

    // Re-subscribing to a held channel is not a new subscription.
    ws.send(json!({"op": "subscribe", "channel": "lim:0", "since": 0}))
        .await;
    assert_eq!(ws.recv().await["op"], "subscribed");
    // The existing subscriptions still deliver.
    let (status, _) = server.publish("lim:3", json!({"data": "still here"})).await;
    assert_eq!(status, 201);
    let m = ws.recv().await;
    assert_eq!(m["op"], "message");
    assert_eq!(m["channel"], "lim:3");
    // Freeing a slot makes room again.
    ws.send(json!({"op": "unsubscribe", "channel": "lim:4"}))
        .await;
    assert_eq!(ws.recv().await["op"], "unsubscribed");
    ws.send(json!({"op": "subscribe", "channel": "lim:extra"}))
        .await;
    let v = ws.recv().await;
    assert_eq!(v["op"], "subscribed", "{v}");
    assert_eq!(v["channel"], "lim:extra");
}

#[tokio::test]
async fn the_default_limit_is_1000_subscriptions() {
    let server = TestServer::start().await;
    let mut ws = server.ws().await;
    fill_subscriptions(&mut ws, "def", 1000).await;
    ws.send(json!({"op": "subscribe", "channel": "def:1000"}))
        .await;
    let v = ws.recv().await;
    assert_eq!(v["op"], "error", "{v}");
    assert_eq!(v["code"], "too_many_subscriptions");
    ws.send(json!({"op": "ping"})).await;
    assert_eq!(ws.recv().await, json!({"op": "pong"}));
}

/// Sends a request by hand and reads the status line of the answer.
async fn raw_status(server: &TestServer, request: &str) -> u16 {
    let mut tcp = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 64];
    let n = tcp.read(&mut buf).await.expect("read");
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_stalled_request_body_does_not_stall_the_server() {
    let server = seeded().await;
    let mut stalled = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /api/channels/{CH}/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"data\":1"
    );
    assert_eq!(head.len() - head.find("\r\n\r\n").expect("end") - 4, 9);
    stalled.write_all(head.as_bytes()).await.expect("write");
    stalled.write_all(b",").await.expect("write");
    // While that one hangs, other requests (HTTP, a raw one, a publish) are served.
    tokio::time::timeout(WAIT, async {
        let (status, _) = server.get("/healthz").await;
        assert_eq!(status, 200);
        let (status, body) = server.publish("bad:other", json!({"data": 1})).await;
        assert_eq!(status, 201, "{body}");
        let status = raw_status(
            &server,
            "GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status, 200);
    })
    .await
    .expect("the server kept serving while a body stalled");
    drop(stalled);
    let (status, page) = server
        .get(&format!("/api/channels/{CH}/messages?since=0"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["last_seq"], 1, "the unfinished publish stored nothing");
}

#[tokio::test]
async fn silent_tcp_clients_do_not_block_others() {
    let server = seeded().await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(
            tokio::net::TcpStream::connect(server.addr)
                .await
                .expect("connect"),
        );
    }
    // And one that sent half a request line.
    let mut half = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    half.write_all(b"GET /heal").await.expect("write");
    tokio::time::timeout(WAIT, async {
        for _ in 0..5 {
            let (status, _) = server.get(&format!("/api/channels/{CH}/messages")).await;
            assert_eq!(status, 200);
        }
        let mut ws = server.ws().await;
        ws.send(json!({"op": "ping"})).await;
        assert_eq!(ws.recv().await, json!({"op": "pong"}));
    })
    .await
    .expect("served while silent clients were connected");
    drop(silent);
}

#[tokio::test]
async fn publishes_over_the_rate_limit_are_429_and_store_nothing() {
    let server = TestServer::start_with(ServerOptions {
        config: Some("[limits]\npublish_per_second_per_ip = 3\n".into()),
        ..Default::default()
    })
    .await;
    // A batch larger than a second's allowance is refused whole.
    let batch: Vec<Value> = (0..4).map(|i| json!({"data": i})).collect();
    let (status, body) = server.publish("rl:x", Value::Array(batch)).await;
    let code = expect_error(status, &body, 429, "batch over the limit");
    assert_eq!(code, "rate_limited");
    assert_eq!(server.last_seq("rl:x").await, 0);

    // Ten quick publishes span at most a couple of one-second windows: some are refused.
    let (mut created, mut limited) = (0u64, 0u64);
    for i in 0..10 {
        let (status, body) = server.publish("rl:x", json!({"data": i})).await;
        match status {
            201 => created += 1,
            429 => {
                assert_error_body(&body, "rate limited publish");
                limited += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(limited >= 1, "no publish was rate limited");
    assert_eq!(
        server.last_seq("rl:x").await,
        created,
        "refused publishes stored nothing"
    );
    // Reads are not limited.
    for _ in 0..10 {
        let (status, _) = server.get("/api/channels/rl:x/messages").await;
        assert_eq!(status, 200);
    }
}
