//! The channel HTTP API (§3): publish, idempotent and batch publish, reads, long-polls, listing,
//! deleting, stale epochs, and the basics of the SSE and WebSocket transports.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::support::{assert_contiguous, ServerOptions, TestServer, WAIT};

fn seqs(messages: &Value) -> Vec<u64> {
    messages
        .as_array()
        .expect("messages array")
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect()
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
    k.sort();
    k
}

fn assert_time(t: &Value) {
    let s = t
        .as_str()
        .unwrap_or_else(|| panic!("time is not a string: {t}"));
    assert_eq!(s.len(), 24, "RFC 3339 with milliseconds, UTC: {s}");
    assert!(s.ends_with('Z'), "UTC: {s}");
    assert_eq!(&s[19..20], ".", "milliseconds: {s}");
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{s} is not RFC 3339: {e}"));
}

/// Publishes `n` messages `{"n": i}` (i from 1) in one batch.
async fn publish_n(server: &TestServer, channel: &str, n: usize) {
    let batch: Vec<Value> = (1..=n).map(|i| json!({"data": {"n": i}})).collect();
    let (status, body) = server.publish(channel, Value::Array(batch)).await;
    assert_eq!(status, 201, "{body}");
}

async fn read(server: &TestServer, channel: &str, query: &str) -> Value {
    let (status, body) = server
        .get(&format!("/api/channels/{channel}/messages{query}"))
        .await;
    assert_eq!(status, 200, "read {channel}{query}: {body}");
    body
}

/// Reads an SSE response's raw text until it contains `needle`.
async fn sse_raw_until(resp: reqwest::Response, needle: &str) -> String {
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    tokio::time::timeout(WAIT, async {
        while !text.contains(needle) {
            let chunk = body.next().await.expect("stream open").expect("chunk");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("SSE never contained {needle:?}; got {text:?}"));
    text
}

#[tokio::test]
async fn publish_one_returns_201_with_the_result() {
    let server = TestServer::start().await;
    let (status, body) = server
        .publish("api:one", json!({"data": {"title": "hello"}}))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(keys(&body), ["channel", "duplicate", "id", "seq"]);
    assert_eq!(body["channel"], "api:one");
    assert_eq!(body["seq"], 1);
    assert_eq!(body["duplicate"], false);
    let id = body["id"].as_str().expect("generated id").to_owned();
    assert!(!id.is_empty() && id.len() <= 128, "{id}");

    let (status, second) = server
        .publish("api:one", json!({"data": null, "event": "ping"}))
        .await;
    assert_eq!(status, 201, "{second}");
    assert_eq!(second["seq"], 2);
    assert_ne!(second["id"], body["id"], "generated ids are unique");

    let page = read(&server, "api:one", "?since=0").await;
    assert_eq!(
        keys(&page),
        ["channel", "epoch", "last_seq", "messages", "truncated"]
    );
    assert_eq!(page["channel"], "api:one");
    assert_eq!(page["last_seq"], 2);
    assert_eq!(page["truncated"], false);
    let m = &page["messages"][0];
    assert_eq!(keys(m), ["channel", "data", "event", "id", "seq", "time"]);
    assert_eq!(m["channel"], "api:one");
    assert_eq!(m["seq"], 1);
    assert_eq!(m["id"], id.as_str());
    assert_eq!(m["event"], "message", "default event");
    assert_eq!(m["data"], json!({"title": "hello"}));
    assert_time(&m["time"]);
    let m2 = &page["messages"][1];
    assert_eq!(m2["event"], "ping");
    assert_eq!(m2["data"], Value::Null, "null is a value");
    assert!(m2.as_object().expect("object").contains_key("data"));
}

#[tokio::test]
async fn publish_with_an_id_is_idempotent() {
    let server = TestServer::start().await;
    let (status, first) = server
        .publish("api:idem", json!({"data": 1, "id": "job-42"}))
        .await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(
        first,
        json!({"channel": "api:idem", "seq": 1, "id": "job-42", "duplicate": false})
    );
    let (status, _) = server.publish("api:idem", json!({"data": 2})).await;
    assert_eq!(status, 201);

    let (status, again) = server
        .publish("api:idem", json!({"data": "different", "id": "job-42"}))
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        again,
        json!({"channel": "api:idem", "seq": 1, "id": "job-42", "duplicate": true})
    );

    // Nothing was stored by the duplicate; the original data stands.
    let page = read(&server, "api:idem", "?since=0").await;
    assert_eq!(page["last_seq"], 2);
    assert_eq!(seqs(&page["messages"]), [1, 2]);
    assert_eq!(page["messages"][0]["data"], 1);
    // The same id on another channel is a different key.
    let (status, other) = server
        .publish("api:idem2", json!({"data": 1, "id": "job-42"}))
        .await;
    assert_eq!(status, 201, "{other}");
    assert_eq!(other["duplicate"], false);
}

#[tokio::test]
async fn batch_publish_is_ordered_atomic_and_marks_duplicates() {
    let server = TestServer::start().await;
    let (status, body) = server
        .publish(
            "api:batch",
            json!([
                {"data": "a", "id": "k-a"},
                {"data": "b", "event": "second"},
                {"data": "c"}
            ]),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let results = body["messages"].as_array().expect("messages");
    assert_eq!(results.len(), 3);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["channel"], "api:batch");
        assert_eq!(r["seq"], i as u64 + 1);
        assert_eq!(r["duplicate"], false);
    }
    assert_eq!(results[0]["id"], "k-a");

    // A batch mixing a dedupe hit and a new message: 201, the hit marked with its original seq.
    let (status, body) = server
        .publish(
            "api:batch",
            json!([{"data": "x", "id": "k-a"}, {"data": "d", "id": "k-d"}]),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["messages"],
        json!([
            {"channel": "api:batch", "seq": 1, "id": "k-a", "duplicate": true},
            {"channel": "api:batch", "seq": 4, "id": "k-d", "duplicate": false}
        ])
    );

    // Every element a duplicate: 200.
    let (status, body) = server
        .publish(
            "api:batch",
            json!([{"data": 0, "id": "k-d"}, {"data": 0, "id": "k-a"}]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["messages"][0]["seq"], 4);
    assert_eq!(body["messages"][1]["seq"], 1);
    assert!(body["messages"]
        .as_array()
        .expect("list")
        .iter()
        .all(|r| r["duplicate"] == true));

    // One invalid element refuses the whole batch.
    let (status, body) = server
        .publish("api:batch", json!([{"data": "e"}, {"event": "no-data"}]))
        .await;
    assert_eq!(status, 400, "{body}");

    let page = read(&server, "api:batch", "?since=0").await;
    assert_eq!(page["last_seq"], 4);
    let data: Vec<&Value> = page["messages"]
        .as_array()
        .expect("list")
        .iter()
        .map(|m| &m["data"])
        .collect();
    assert_eq!(data, [&json!("a"), &json!("b"), &json!("c"), &json!("d")]);
    assert_eq!(page["messages"][1]["event"], "second");
}

#[tokio::test]
async fn read_with_since_and_limit() {
    let server = TestServer::start().await;
    publish_n(&server, "api:read", 150).await;

    let page = read(&server, "api:read", "").await;
    assert_contiguous(
        &seqs(&page["messages"]),
        1,
        100,
        "default since 0, limit 100",
    );
    assert_eq!(page["last_seq"], 150);
    assert_eq!(page["truncated"], false);

    let page = read(&server, "api:read", "?since=100").await;
    assert_contiguous(&seqs(&page["messages"]), 101, 150, "since=100");

    let page = read(&server, "api:read", "?since=5&limit=10").await;
    assert_contiguous(&seqs(&page["messages"]), 6, 15, "since=5&limit=10");
    assert_eq!(page["messages"][0]["data"]["n"], 6);

    for beyond in ["?since=150", "?since=151", "?since=100000"] {
        let page = read(&server, "api:read", beyond).await;
        assert_eq!(page["messages"], json!([]), "{beyond}");
        assert_eq!(page["last_seq"], 150, "{beyond}");
        assert_eq!(page["truncated"], false, "{beyond}");
    }
}

#[tokio::test]
async fn limit_above_the_maximum_is_clamped_to_1000() {
    // Retention above the default 1,000 messages, so nothing is pruned under the test.
    let server = TestServer::start_with(ServerOptions {
        config: Some("[[retention]]\npattern = \"api:clamp\"\nmax_messages = 5000\n".into()),
        ..Default::default()
    })
    .await;
    publish_n(&server, "api:clamp", 1005).await;
    for q in [
        "?since=0&limit=1000",
        "?since=0&limit=1001",
        "?since=0&limit=99999",
    ] {
        let page = read(&server, "api:clamp", q).await;
        assert_contiguous(&seqs(&page["messages"]), 1, 1000, q);
    }
    let page = read(&server, "api:clamp", "?since=1000&limit=99999").await;
    assert_contiguous(&seqs(&page["messages"]), 1001, 1005, "the rest");
}

#[tokio::test]
async fn an_unpublished_channel_reads_empty() {
    let server = TestServer::start().await;
    let page = read(&server, "api:nobody:here", "?since=0").await;
    assert_eq!(page["channel"], "api:nobody:here");
    assert_eq!(page["messages"], json!([]));
    assert_eq!(page["last_seq"], 0);
    assert_eq!(page["truncated"], false);
    let epoch = page["epoch"].as_str().expect("epoch");
    assert!(
        (8..=16).contains(&epoch.len()) && epoch.chars().all(|c| c.is_ascii_alphanumeric()),
        "{epoch}"
    );
    // The epoch of an unpublished channel is stable, and is the one its first publish keeps.
    let again = read(&server, "api:nobody:here", "").await;
    assert_eq!(again["epoch"], epoch);
    let (status, _) = server.publish("api:nobody:here", json!({"data": 1})).await;
    assert_eq!(status, 201);
    let after = read(
        &server,
        "api:nobody:here",
        &format!("?since=0&epoch={epoch}"),
    )
    .await;
    assert_eq!(after["epoch"], epoch);
    assert_eq!(after["truncated"], false);
    assert_eq!(seqs(&after["messages"]), [1]);

    let info = server.channel_info("api:other:nobody").await;
    assert_eq!(info["last_seq"], 0);
    assert_eq!(info["messages"], 0);
    assert_eq!(info["subscribers"], 0);
    assert_eq!(info["last_activity"], Value::Null);
}

#[tokio::test]
async fn long_poll_answers_as_soon_as_a_message_is_published() {
    let server = TestServer::start().await;
    publish_n(&server, "api:lp", 2).await;
    let http = server.http.clone();
    let url = server.url("/api/channels/api:lp/messages?since=2&wait=60");
    let poll = tokio::spawn(async move {
        let resp = http.get(url).send().await.expect("long-poll");
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.expect("JSON"))
    });
    // The poll is registered as a waiter on the channel before we publish.
    server.wait_subscribers("api:lp", 1).await;
    assert!(
        !poll.is_finished(),
        "the long-poll answered before anything was published"
    );
    let (status, _) = server.publish("api:lp", json!({"data": "now"})).await;
    assert_eq!(status, 201);
    let (status, page) = tokio::time::timeout(WAIT, poll)
        .await
        .expect("the long-poll answered when the message was published, not after its 60 s wait")
        .expect("task");
    assert_eq!(status, 200, "{page}");
    assert_eq!(seqs(&page["messages"]), [3]);
    assert_eq!(page["messages"][0]["data"], "now");
    assert_eq!(page["last_seq"], 3);
}

#[tokio::test]
async fn long_poll_answers_immediately_when_messages_exist() {
    let server = TestServer::start().await;
    publish_n(&server, "api:lp2", 3).await;
    let page = tokio::time::timeout(WAIT, read(&server, "api:lp2", "?since=1&wait=60"))
        .await
        .expect("no waiting when messages past since exist");
    assert_eq!(seqs(&page["messages"]), [2, 3]);
}

#[tokio::test]
async fn long_poll_answers_empty_after_its_wait() {
    let server = TestServer::start().await;
    publish_n(&server, "api:lp3", 1).await;
    let started = Instant::now();
    let page = read(&server, "api:lp3", "?since=1&wait=1").await;
    let waited = started.elapsed();
    assert_eq!(page["messages"], json!([]));
    assert_eq!(page["last_seq"], 1);
    assert!(
        waited >= Duration::from_millis(900),
        "answered after {waited:?}, before its 1 s wait"
    );
    // The waiter is gone once it answered.
    assert_eq!(server.channel_info("api:lp3").await["subscribers"], 0);
}

#[tokio::test]
async fn list_and_inspect_channels() {
    let server = TestServer::start().await;
    publish_n(&server, "api:list:a", 3).await;
    publish_n(&server, "api:list:b", 1).await;
    let _sse = server.sse("/api/channels/api:list:a/events", None).await;

    let (status, body) = server.get("/api/channels").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(keys(&body), ["channels"]);
    let list = body["channels"].as_array().expect("channels");
    let find = |name: &str| {
        list.iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed in {body}"))
            .clone()
    };
    let a = find("api:list:a");
    assert_eq!(
        keys(&a),
        [
            "epoch",
            "last_activity",
            "last_seq",
            "messages",
            "name",
            "subscribers"
        ]
    );
    assert_eq!(a["last_seq"], 3);
    assert_eq!(a["messages"], 3);
    assert_eq!(a["subscribers"], 1);
    assert_time(&a["last_activity"]);
    let b = find("api:list:b");
    assert_eq!(b["last_seq"], 1);
    assert_eq!(b["messages"], 1);
    assert_eq!(b["subscribers"], 0);
    assert_ne!(a["epoch"], b["epoch"]);

    let one = server.channel_info("api:list:a").await;
    assert_eq!(
        one, a,
        "GET /api/channels/{{ch}} shows the same object as the list"
    );
    let page = read(&server, "api:list:a", "").await;
    assert_eq!(page["epoch"], a["epoch"]);
}

#[tokio::test]
async fn delete_starts_a_new_epoch_and_forgets_dedupe_keys() {
    let server = TestServer::start().await;
    for i in 1..=3 {
        let (status, _) = server
            .publish("api:del", json!({"data": i, "id": format!("key-{i}")}))
            .await;
        assert_eq!(status, 201);
    }
    let old_epoch = server.channel_info("api:del").await["epoch"].clone();

    let (status, body) = server.delete("/api/channels/api:del").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "api:del");
    assert_eq!(body["last_seq"], 0);
    assert_eq!(body["messages"], 0);
    assert_ne!(body["epoch"], old_epoch, "a new epoch");
    let new_epoch = body["epoch"].clone();

    let page = read(&server, "api:del", "?since=0").await;
    assert_eq!(page["messages"], json!([]));
    assert_eq!(page["last_seq"], 0);
    assert_eq!(page["epoch"], new_epoch);

    // Seq restarts at 1 and the old dedupe keys are gone.
    let (status, body) = server
        .publish("api:del", json!({"data": "again", "id": "key-2"}))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["seq"], 1);
    assert_eq!(body["duplicate"], false);
    let page = read(&server, "api:del", "?since=0").await;
    assert_eq!(seqs(&page["messages"]), [1]);
    assert_eq!(page["messages"][0]["data"], "again");
    assert_eq!(page["epoch"], new_epoch);
}

#[tokio::test]
async fn a_stale_epoch_on_read_reports_truncation() {
    let server = TestServer::start().await;
    publish_n(&server, "api:epoch", 3).await;
    let old = server.channel_info("api:epoch").await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    let current = read(&server, "api:epoch", &format!("?since=2&epoch={old}")).await;
    assert_eq!(current["truncated"], false);
    assert_eq!(seqs(&current["messages"]), [3]);

    let (status, _) = server.delete("/api/channels/api:epoch").await;
    assert_eq!(status, 200);
    publish_n(&server, "api:epoch", 2).await;
    let stale = read(&server, "api:epoch", &format!("?since=3&epoch={old}")).await;
    assert_eq!(stale["truncated"], true, "{stale}");
    assert_ne!(stale["epoch"], old.as_str());
    assert_eq!(
        seqs(&stale["messages"]),
        [1, 2],
        "the new history from its start"
    );
    assert_eq!(stale["last_seq"], 2);
}

#[tokio::test]
async fn sse_frames_have_ids_no_event_line_and_retry() {
    let server = TestServer::start().await;
    publish_n(&server, "api:sse:raw", 2).await;
    let epoch = server.channel_info("api:sse:raw").await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    let resp = server
        .http
        .get(server.url("/api/channels/api:sse:raw/events?since=0"))
        .send()
        .await
        .expect("SSE");
    assert_eq!(resp.status().as_u16(), 200);
    let ctype = resp.headers()["content-type"]
        .to_str()
        .expect("text")
        .to_owned();
    assert!(ctype.starts_with("text/event-stream"), "{ctype}");
    let text = sse_raw_until(resp, &format!("id: {epoch}:2\n")).await;
    assert!(text.contains("retry: 2000\n"), "{text:?}");
    assert!(
        !text.contains("event:"),
        "messages carry no event: line: {text:?}"
    );
    let first = text
        .find(&format!("id: {epoch}:1\ndata: {{"))
        .expect("frame 1");
    let second = text
        .find(&format!("id: {epoch}:2\ndata: {{"))
        .expect("frame 2");
    assert!(first < second);
}

#[tokio::test]
async fn sse_streams_backlog_then_live() {
    let server = TestServer::start().await;
    publish_n(&server, "api:sse", 2).await;
    let epoch = server.channel_info("api:sse").await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    let mut all = server
        .sse("/api/channels/api:sse/events?since=0", None)
        .await;
    let mut live = server.sse("/api/channels/api:sse/events", None).await;
    for seq in 1..=2u64 {
        let e = all.next().await.expect("event");
        assert_eq!(e.event, None);
        assert_eq!(e.id.as_deref(), Some(format!("{epoch}:{seq}").as_str()));
        let m: Value = serde_json::from_str(&e.data).expect("JSON");
        assert_eq!(m["seq"], seq);
        assert_eq!(m["channel"], "api:sse");
        assert_eq!(m["data"]["n"], seq);
    }
    let (status, _) = server.publish("api:sse", json!({"data": "live"})).await;
    assert_eq!(status, 201);
    for (who, stream) in [("since=0", &mut all), ("live only", &mut live)] {
        let e = stream.next().await.expect("event");
        assert_eq!(
            e.id.as_deref(),
            Some(format!("{epoch}:3").as_str()),
            "{who}"
        );
        let m: Value = serde_json::from_str(&e.data).expect("JSON");
        assert_eq!(m["seq"], 3, "{who}: live-only starts with the new message");
        assert_eq!(m["data"], "live", "{who}");
    }
}

#[tokio::test]
async fn sse_resumes_from_last_event_id_or_since() {
    let server = TestServer::start().await;
    publish_n(&server, "api:resume", 5).await;
    let epoch = server.channel_info("api:resume").await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    let cases = [
        (
            "/api/channels/api:resume/events",
            Some(format!("{epoch}:3")),
            4,
            "epoch:seq form",
        ),
        (
            "/api/channels/api:resume/events",
            Some("2".to_owned()),
            3,
            "bare seq",
        ),
        (
            "/api/channels/api:resume/events?since=1",
            None,
            2,
            "?since=",
        ),
        (
            "/api/channels/api:resume/events?since=0",
            Some(format!("{epoch}:4")),
            5,
            "header wins over ?since",
        ),
        (
            "/api/channels/api:resume/events?since=4",
            Some("1".to_owned()),
            2,
            "bare header wins over ?since",
        ),
    ];
    for (path, last_id, first, what) in cases {
        let mut sse = server.sse(path, last_id.as_deref()).await;
        let m = sse.next_message().await;
        assert_eq!(m["seq"], first, "{what}");
        let mut got = vec![first];
        while got.last() != Some(&5) {
            got.push(sse.next_message().await["seq"].as_u64().expect("seq"));
        }
        assert_contiguous(&got, first, 5, what);
    }
}

#[tokio::test]
async fn sse_with_a_stale_epoch_sends_reset_first() {
    let server = TestServer::start().await;
    publish_n(&server, "api:sse:reset", 3).await;
    let old = server.channel_info("api:sse:reset").await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    let (status, _) = server.delete("/api/channels/api:sse:reset").await;
    assert_eq!(status, 200);
    publish_n(&server, "api:sse:reset", 1).await;
    let new = server.channel_info("api:sse:reset").await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    let mut sse = server
        .sse(
            "/api/channels/api:sse:reset/events",
            Some(&format!("{old}:3")),
        )
        .await;
    let reset = sse.next().await.expect("event");
    assert_eq!(reset.event.as_deref(), Some("reset"));
    let info: Value = serde_json::from_str(&reset.data).expect("JSON");
    assert_eq!(info, json!({"epoch": new, "first_seq": 1}));
    let e = sse.next().await.expect("event");
    assert_eq!(e.event, None);
    assert_eq!(e.id.as_deref(), Some(format!("{new}:1").as_str()));
}

#[tokio::test]
async fn websocket_subscribe_backlog_then_live() {
    let server = TestServer::start().await;
    publish_n(&server, "api:ws", 2).await;
    let epoch = server.channel_info("api:ws").await["epoch"].clone();
    let mut ws = server.ws().await;

    ws.send(json!({"op": "subscribe", "channel": "api:ws", "since": 0}))
        .await;
    let sub = ws.recv().await;
    assert_eq!(
        sub,
        json!({"op": "subscribed", "channel": "api:ws", "epoch": epoch, "last_seq": 2, "truncated": false})
    );
    for seq in 1..=2u64 {
        let m = ws.recv().await;
        assert_eq!(m["op"], "message");
        assert_eq!(
            keys(&m),
            ["channel", "data", "event", "id", "op", "seq", "time"]
        );
        assert_eq!(m["channel"], "api:ws");
        assert_eq!(m["seq"], seq);
        assert_eq!(m["data"]["n"], seq);
    }
    let (status, _) = server
        .publish("api:ws", json!({"data": "live", "event": "tick"}))
        .await;
    assert_eq!(status, 201);
    let m = ws.recv().await;
    assert_eq!(m["op"], "message");
    assert_eq!(m["seq"], 3);
    assert_eq!(m["event"], "tick");
    assert_eq!(m["data"], "live");
}

#[tokio::test]
async fn websocket_subscribe_without_since_is_live_only() {
    let server = TestServer::start().await;
    publish_n(&server, "api:ws:live", 4).await;
    let mut ws = server.ws().await;
    ws.send(json!({"op": "subscribe", "channel": "api:ws:live"}))
        .await;
    let sub = ws.recv().await;
    assert_eq!(sub["op"], "subscribed");
    assert_eq!(sub["last_seq"], 4);
    assert_eq!(sub["truncated"], false);
    let (status, _) = server.publish("api:ws:live", json!({"data": 5})).await;
    assert_eq!(status, 201);
    let m = ws.recv().await;
    assert_eq!(m["op"], "message");
    assert_eq!(m["seq"], 5, "no backlog before the live message");
}

#[tokio::test]
async fn websocket_unsubscribe_stops_delivery() {
    let server = TestServer::start().await;
    let mut ws = server.ws().await;
    ws.send(json!({"op": "subscribe", "channel": "api:ws:unsub"}))
        .await;
    assert_eq!(ws.recv().await["op"], "subscribed");
    assert_eq!(server.channel_info("api:ws:unsub").await["subscribers"], 1);
    ws.send(json!({"op": "unsubscribe", "channel": "api:ws:unsub"}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"op": "unsubscribed", "channel": "api:ws:unsub"})
    );
    assert_eq!(server.channel_info("api:ws:unsub").await["subscribers"], 0);
    let (status, _) = server.publish("api:ws:unsub", json!({"data": 1})).await;
    assert_eq!(status, 201);
    let before_pong = ws.frames_until_pong().await;
    assert!(
        before_pong.is_empty(),
        "nothing after unsubscribing: {before_pong:?}"
    );
}

#[tokio::test]
async fn websocket_publish_acks_with_ref_and_duplicate() {
    let server = TestServer::start().await;
    let mut ws = server.ws().await;
    ws.send(json!({"op": "publish", "channel": "api:ws:pub", "data": {"x": 1}, "ref": 7}))
        .await;
    let ack = ws.recv().await;
    assert_eq!(
        ack,
        json!({"op": "ack", "ref": 7, "seq": 1, "duplicate": false})
    );
    ws.send(json!({"op": "publish", "channel": "api:ws:pub", "data": 2, "event": "e2", "id": "k", "ref": "eight"}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"op": "ack", "ref": "eight", "seq": 2, "duplicate": false})
    );
    ws.send(json!({"op": "publish", "channel": "api:ws:pub", "data": 3, "id": "k", "ref": 9}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"op": "ack", "ref": 9, "seq": 2, "duplicate": true})
    );

    let page = read(&server, "api:ws:pub", "?since=0").await;
    assert_eq!(seqs(&page["messages"]), [1, 2]);
    assert_eq!(page["messages"][0]["data"], json!({"x": 1}));
    assert_eq!(page["messages"][1]["event"], "e2");
    assert_eq!(page["messages"][1]["id"], "k");
    assert_eq!(page["messages"][1]["data"], 2);
}

#[tokio::test]
async fn websocket_ping_pong() {
    let server = TestServer::start().await;
    let mut ws = server.ws().await;
    for _ in 0..3 {
        ws.send(json!({"op": "ping"})).await;
        assert_eq!(ws.recv().await, json!({"op": "pong"}));
    }
}

#[tokio::test]
async fn websocket_many_subscriptions_on_one_socket() {
    let server = TestServer::start().await;
    const N: u64 = 25;
    for i in 0..N {
        let (status, _) = server
            .publish(&format!("api:many:{i}"), json!({"data": i}))
            .await;
        assert_eq!(status, 201);
    }
    let mut ws = server.ws().await;
    for i in 0..N {
        ws.send(json!({"op": "subscribe", "channel": format!("api:many:{i}"), "since": 0}))
            .await;
    }
    let mut subscribed = std::collections::HashSet::new();
    let mut backlog = std::collections::HashSet::new();
    while subscribed.len() < N as usize || backlog.len() < N as usize {
        let v = ws.recv().await;
        let ch = v["channel"].as_str().expect("channel").to_owned();
        match v["op"].as_str() {
            Some("subscribed") => {
                assert!(!backlog.contains(&ch), "{ch}: backlog before subscribed");
                assert!(subscribed.insert(ch));
            }
            Some("message") => {
                assert!(subscribed.contains(&ch), "{ch}: message before subscribed");
                let i: u64 = ch.rsplit(':').next().expect("i").parse().expect("number");
                assert_eq!(v["data"], i);
                assert_eq!(v["seq"], 1);
                assert!(backlog.insert(ch));
            }
            other => panic!("unexpected frame {other:?}: {v}"),
        }
    }
    // Live messages on several of them reach the same socket.
    for i in [0, N / 2, N - 1] {
        let (status, _) = server
            .publish(&format!("api:many:{i}"), json!({"data": "live"}))
            .await;
        assert_eq!(status, 201);
        let m = ws.recv_op("message").await;
        assert_eq!(m["channel"], format!("api:many:{i}"));
        assert_eq!(m["seq"], 2);
    }
}

#[tokio::test]
async fn websocket_resume_with_a_stale_epoch_is_truncated() {
    let server = TestServer::start().await;
    publish_n(&server, "api:ws:stale", 3).await;
    let old = server.channel_info("api:ws:stale").await["epoch"].clone();
    let (status, _) = server.delete("/api/channels/api:ws:stale").await;
    assert_eq!(status, 200);
    publish_n(&server, "api:ws:stale", 2).await;
    let new = server.channel_info("api:ws:stale").await["epoch"].clone();
    assert_ne!(old, new);

    let mut ws = server.ws().await;
    ws.send(json!({"op": "subscribe", "channel": "api:ws:stale", "since": 3, "epoch": old}))
        .await;
    let sub = ws.recv().await;
    assert_eq!(
        sub,
        json!({"op": "subscribed", "channel": "api:ws:stale", "epoch": new, "last_seq": 2, "truncated": true})
    );
    assert_eq!(ws.recv().await["seq"], 1, "the new history from its start");
    assert_eq!(ws.recv().await["seq"], 2);

    // The current epoch resumes normally.
    let mut ws = server.ws().await;
    ws.send(json!({"op": "subscribe", "channel": "api:ws:stale", "since": 1, "epoch": new}))
        .await;
    let sub = ws.recv().await;
    assert_eq!(sub["truncated"], false);
    assert_eq!(ws.recv().await["seq"], 2);
}

#[tokio::test]
async fn sse_resume_with_a_stale_epoch_in_the_query_resets() {
    let server = TestServer::start().await;
    publish_n(&server, "api:sse:qe", 2).await;
    let old = server.channel_info("api:sse:qe").await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    let (status, _) = server.delete("/api/channels/api:sse:qe").await;
    assert_eq!(status, 200);
    publish_n(&server, "api:sse:qe", 1).await;
    let mut sse = server
        .sse(
            &format!("/api/channels/api:sse:qe/events?since=2&epoch={old}"),
            None,
        )
        .await;
    let reset = sse.next().await.expect("event");
    assert_eq!(reset.event.as_deref(), Some("reset"));
    assert_eq!(sse.next_message().await["seq"], 1);
}

#[tokio::test]
async fn deleting_a_channel_resets_live_subscribers() {
    let server = TestServer::start().await;
    publish_n(&server, "api:live:del", 2).await;
    let mut ws = server.ws().await;
    ws.send(json!({"op": "subscribe", "channel": "api:live:del", "since": 0}))
        .await;
    assert_eq!(ws.recv().await["op"], "subscribed");
    assert_eq!(ws.recv().await["seq"], 1);
    assert_eq!(ws.recv().await["seq"], 2);
    let mut sse = server
        .sse("/api/channels/api:live:del/events?since=2", None)
        .await;
    server.wait_subscribers("api:live:del", 2).await;

    let (status, body) = server.delete("/api/channels/api:live:del").await;
    assert_eq!(status, 200);
    let new = body["epoch"].clone();
    let (status, _) = server
        .publish("api:live:del", json!({"data": "fresh"}))
        .await;
    assert_eq!(status, 201);

    let sub = ws.recv().await;
    assert_eq!(sub["op"], "subscribed", "{sub}");
    assert_eq!(sub["truncated"], true);
    assert_eq!(sub["epoch"], new);
    let m = ws.recv().await;
    assert_eq!(m["op"], "message");
    assert_eq!(m["seq"], 1);
    assert_eq!(m["data"], "fresh");

    let reset = sse.next().await.expect("event");
    assert_eq!(reset.event.as_deref(), Some("reset"), "{reset:?}");
    let info: Value = serde_json::from_str(&reset.data).expect("JSON");
    assert_eq!(info, json!({"epoch": new, "first_seq": 1}));
    let e = sse.next().await.expect("event");
    assert_eq!(
        e.id.as_deref(),
        Some(format!("{}:1", new.as_str().expect("epoch")).as_str())
    );
}

/// Regression: a subscriber resuming past the channel's end (its history is gone) used to wait
/// silently for seqs it had "already seen"; it must be told and get the channel from the start.
#[tokio::test]
async fn subscribing_past_the_end_reports_truncation() {
    let server = TestServer::start().await;
    for n in 1..=3 {
        server.publish("api:past", json!({ "data": n })).await;
    }
    let mut ws = server.ws().await;
    ws.send(json!({"op": "subscribe", "channel": "api:past", "since": 50}))
        .await;
    let subscribed = ws.recv_op("subscribed").await;
    assert_eq!(subscribed["truncated"], true, "{subscribed}");
    let first = ws.recv_op("message").await;
    assert_eq!(first["seq"], 1);

    let mut sse = server
        .sse("/api/channels/api:past/events", Some("50"))
        .await;
    loop {
        let event = sse.next().await.expect("stream open");
        if event.event.as_deref() == Some("reset") {
            let info: serde_json::Value = serde_json::from_str(&event.data).unwrap();
            assert_eq!(info["first_seq"], 1);
            break;
        }
        assert!(
            event.event.is_some(),
            "a message arrived before the reset: {event:?}"
        );
    }
    let message = sse.next_message().await;
    assert_eq!(message["seq"], 1);
}

/// After a re-subscribe, everything following the new `subscribed` belongs to the new
/// subscription: contiguous from its `since`, no repeats. (The server drops queued frames of a
/// replaced subscription; the race that makes them matter is narrow, so this guards the
/// property rather than reproducing the race every time.)
#[tokio::test]
async fn resubscribing_never_mixes_in_frames_of_the_old_subscription() {
    let server = TestServer::start().await;
    let batch: Vec<Value> = (1..=900).map(|n| json!({ "data": n })).collect();
    let (status, _) = server.publish("api:resub", Value::Array(batch)).await;
    assert_eq!(status, 201);
    let mut ws = server.ws().await;
    // Two subscribes back to back.
    ws.send(json!({"op": "subscribe", "channel": "api:resub", "since": 0}))
        .await;
    ws.send(json!({"op": "subscribe", "channel": "api:resub", "since": 0}))
        .await;
    let mut subscribed = 0;
    let mut after_second = Vec::new();
    while after_second.len() < 900 {
        let frame = ws.recv().await;
        match frame["op"].as_str() {
            Some("subscribed") => subscribed += 1,
            Some("message") if subscribed == 2 => {
                after_second.push(frame["seq"].as_u64().expect("seq"));
            }
            Some("message") => {}
            other => panic!("unexpected frame {other:?}: {frame}"),
        }
    }
    assert_contiguous(&after_second, 1, 900, "second subscription");
}

/// §9: every transport's deliveries are counted under its own label.
#[tokio::test]
async fn metrics_count_deliveries_per_transport() {
    let server = TestServer::start().await;
    server.publish("api:metrics", json!({"data": 1})).await;
    server
        .get("/api/channels/api:metrics/messages?since=0")
        .await;
    server
        .get("/api/channels/api:metrics/messages?since=0&wait=1")
        .await;
    let mut sse = server
        .sse("/api/channels/api:metrics/events?since=0", None)
        .await;
    let message = loop {
        let e = sse.next().await.expect("stream open");
        if e.event.is_none() {
            break e;
        }
    };
    assert!(message.data.contains("\"seq\":1"));
    let text = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for transport in ["poll", "longpoll", "sse"] {
        let line = format!("tidings_messages_delivered_total{{transport=\"{transport}\"}} 1");
        assert!(text.contains(&line), "missing {line:?} in\n{text}");
    }
    assert!(
        text.contains("tidings_connections{transport=\"sse\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("tidings_store_commit_seconds_count"),
        "{text}"
    );
}
