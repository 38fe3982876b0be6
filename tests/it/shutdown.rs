//! Graceful shutdown (§7): on SIGTERM WebSockets close with 1012, SSE streams end, the process
//! exits 0, and every acknowledged message is there after a restart on the same data dir.

use serde_json::json;

use crate::support::{assert_contiguous, ServerOptions, TestServer, WAIT};

#[tokio::test]
async fn sigterm_closes_streams_exits_0_and_keeps_every_acknowledged_message() {
    let mut server = TestServer::start().await;
    let ch = "shutdown:log";

    // Acknowledged over HTTP: single and batch.
    let mut acknowledged = 0u64;
    for i in 0..5 {
        let (status, body) = server.publish(ch, json!({"data": {"i": i}})).await;
        assert_eq!(status, 201, "{body}");
        acknowledged += 1;
        assert_eq!(body["seq"], acknowledged);
    }
    let batch: Vec<_> = (5..15).map(|i| json!({"data": {"i": i}})).collect();
    let (status, body) = server.publish(ch, serde_json::Value::Array(batch)).await;
    assert_eq!(status, 201, "{body}");
    acknowledged += 10;

    // A WebSocket that subscribes and also publishes (acknowledged by `ack`).
    let mut ws = server.ws().await;
    ws.send(json!({"op": "subscribe", "channel": ch, "since": 0}))
        .await;
    assert_eq!(ws.recv().await["op"], "subscribed");
    for i in 15..20 {
        ws.send(json!({"op": "publish", "channel": ch, "data": {"i": i}, "ref": i}))
            .await;
    }
    let mut acks = 0;
    let mut seen = Vec::new();
    while acks < 5 || seen.len() < 20 {
        let v = ws.recv().await;
        match v["op"].as_str() {
            Some("ack") => {
                assert_eq!(v["duplicate"], false);
                acks += 1;
            }
            Some("message") => seen.push(v["seq"].as_u64().expect("seq")),
            other => panic!("unexpected {other:?}: {v}"),
        }
    }
    acknowledged += 5;
    assert_contiguous(&seen, 1, acknowledged, "WebSocket before shutdown");

    // An SSE stream that is caught up.
    let mut sse = server
        .sse(
            &format!("/api/channels/{ch}/events?since={}", acknowledged - 1),
            None,
        )
        .await;
    assert_eq!(sse.next_message().await["seq"], acknowledged);

    server.signal(15);

    assert_eq!(
        ws.recv_close_code().await,
        Some(1012),
        "WebSocket close code on SIGTERM"
    );
    assert_eq!(sse.next_within(WAIT).await, Ok(None), "the SSE stream ends");
    let status = tokio::time::timeout(WAIT, server.child.wait())
        .await
        .expect("exits in time")
        .expect("wait");
    assert!(status.success(), "exit status {status:?}");

    let restarted = TestServer::start_with(ServerOptions {
        data_dir: Some(server.data_dir.clone()),
        ..Default::default()
    })
    .await;
    let (status, page) = restarted
        .get(&format!("/api/channels/{ch}/messages?since=0&limit=1000"))
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["last_seq"], acknowledged);
    let messages = page["messages"].as_array().expect("messages");
    let seqs: Vec<u64> = messages
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect();
    assert_contiguous(&seqs, 1, acknowledged, "after restart");
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(m["data"]["i"], i as u64, "message {}", i + 1);
    }
    // The history keeps its epoch across a clean restart: a resuming client is not reset.
    let (status, again) = restarted
        .get(&format!(
            "/api/channels/{ch}/messages?since={acknowledged}&epoch={}",
            page["epoch"].as_str().expect("epoch")
        ))
        .await;
    assert_eq!(status, 200);
    assert_eq!(again["truncated"], false);
    // And it takes new publishes after the last seq.
    let (status, body) = restarted.publish(ch, json!({"data": "after"})).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["seq"], acknowledged + 1);
}

#[tokio::test]
async fn sigterm_with_an_idle_server_exits_0() {
    let mut server = TestServer::start().await;
    let status = server.terminate().await;
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn sigterm_ends_a_pending_long_poll() {
    let mut server = TestServer::start().await;
    let http = server.http.clone();
    let url = server.url("/api/channels/shutdown:lp/messages?since=0&wait=60");
    let poll = tokio::spawn(async move {
        let resp = http.get(url).send().await.expect("long-poll");
        resp.status().as_u16()
    });
    server.wait_subscribers("shutdown:lp", 1).await;
    let status = server.terminate().await;
    assert!(status.success(), "exit status {status:?}");
    let answered = tokio::time::timeout(WAIT, poll)
        .await
        .expect("the long-poll ended with the server")
        .expect("task");
    assert_eq!(
        answered, 200,
        "the long-poll answers (empty) rather than being cut"
    );
}
