//! §2 "Truncation is explicit": a subscriber whose `since + 1` was pruned, or whose epoch is
//! stale, is told (`truncated: true`; SSE `event: reset`; WS `subscribed` with `truncated: true`)
//! and gets the oldest retained message onwards. Also retention by count within 10 s.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::guarantees::{publish_ok, read, seq_of, sse_id};
use crate::support::{assert_contiguous, ServerOptions, SseClient, TestServer, WsClient};

fn seqs(page: &Value) -> Vec<u64> {
    page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(seq_of)
        .collect()
}

/// The next SSE event must be `event: reset` with `{"epoch","first_seq"}`.
async fn expect_reset(sse: &mut SseClient, epoch: &str, first_seq: u64, who: &str) {
    let e = sse
        .next()
        .await
        .unwrap_or_else(|| panic!("{who}: stream ended"));
    assert_eq!(
        e.event.as_deref(),
        Some("reset"),
        "{who}: expected a reset first, got {e:?}"
    );
    let data: Value = serde_json::from_str(&e.data).expect("reset data JSON");
    assert_eq!(
        data,
        json!({"epoch": epoch, "first_seq": first_seq}),
        "{who}"
    );
}

/// The next SSE events must be the messages `from..=to` of `epoch`, in order, with their ids.
async fn expect_sse_messages(sse: &mut SseClient, epoch: &str, from: u64, to: u64, who: &str) {
    let mut got = Vec::new();
    for _ in from..=to {
        let e = sse
            .next()
            .await
            .unwrap_or_else(|| panic!("{who}: stream ended"));
        assert_eq!(e.event, None, "{who}: {e:?}");
        let v: Value = serde_json::from_str(&e.data).expect("message JSON");
        assert_eq!(
            sse_id(&e),
            (epoch.to_owned(), seq_of(&v)),
            "{who}: id and message disagree"
        );
        got.push(seq_of(&v));
    }
    assert_contiguous(&got, from, to, who);
}

/// The next WS frames must be the messages `from..=to` of `channel`, in order.
async fn expect_ws_messages(ws: &mut WsClient, channel: &str, from: u64, to: u64, who: &str) {
    let mut got = Vec::new();
    for _ in from..=to {
        let v = ws.recv().await;
        assert_eq!(v["op"], "message", "{who}: {v}");
        assert_eq!(v["channel"], channel, "{who}: {v}");
        got.push(seq_of(&v));
    }
    assert_contiguous(&got, from, to, who);
}

async fn ws_subscribe(server: &TestServer, sub: Value) -> (WsClient, Value) {
    let mut ws = server.ws().await;
    ws.send(sub).await;
    let subscribed = ws.recv().await;
    assert_eq!(subscribed["op"], "subscribed", "{subscribed}");
    (ws, subscribed)
}

/// `max_messages = 5`: after 20 publishes the pruner keeps 16..=20 within 10 s; a read, an SSE
/// stream and a WS subscription from 0 (or from any pruned seq) are told, and start at 16.
#[tokio::test]
async fn count_retention_prunes_and_truncation_is_reported_everywhere() {
    let server = TestServer::start_with(ServerOptions {
        config: Some("[[retention]]\npattern = \"t:*\"\nmax_messages = 5\n".into()),
        ..Default::default()
    })
    .await;
    let ch = "t:x";
    for n in 1..=20 {
        let answer = publish_ok(&server, ch, json!({"data": {"n": n}})).await;
        assert_eq!(answer["seq"], n);
    }
    let published = Instant::now();
    loop {
        let info = server.channel_info(ch).await;
        if info["messages"].as_u64().expect("messages") <= 5 {
            assert_eq!(info["messages"], 5, "{info}");
            assert_eq!(info["last_seq"], 20, "{info}");
            break;
        }
        // The spec allows 10 s; the margin absorbs a loaded test machine.
        assert!(
            published.elapsed() < Duration::from_secs(15),
            "retention not enforced after {:?}: {info}",
            published.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let epoch = server.channel_info(ch).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();

    // Reads.
    for since in [0, 1, 10, 14] {
        let page = read(&server, ch, &format!("since={since}")).await;
        assert_eq!(page["truncated"], true, "since={since}: {page}");
        assert_eq!(
            seqs(&page),
            vec![16, 17, 18, 19, 20],
            "since={since}: {page}"
        );
        assert_eq!(page["messages"][0]["data"]["n"], 16, "{page}");
        assert_eq!(page["last_seq"], 20, "{page}");
    }
    for (since, expected) in [
        (15, vec![16, 17, 18, 19, 20]),
        (18, vec![19, 20]),
        (20, vec![]),
    ] {
        let page = read(&server, ch, &format!("since={since}")).await;
        assert_eq!(
            page["truncated"], false,
            "since={since}: nothing missed: {page}"
        );
        assert_eq!(seqs(&page), expected, "since={since}: {page}");
    }

    // SSE: reset first, then the retained messages; then live.
    let mut sse = server
        .sse(&format!("/api/channels/{ch}/events?since=0"), None)
        .await;
    expect_reset(&mut sse, &epoch, 16, "SSE since=0").await;
    expect_sse_messages(&mut sse, &epoch, 16, 20, "SSE since=0").await;
    let mut resumed = server
        .sse(
            &format!("/api/channels/{ch}/events"),
            Some(&format!("{epoch}:3")),
        )
        .await;
    expect_reset(&mut resumed, &epoch, 16, "SSE Last-Event-ID :3").await;
    expect_sse_messages(&mut resumed, &epoch, 16, 20, "SSE Last-Event-ID :3").await;
    let mut fine = server
        .sse(&format!("/api/channels/{ch}/events?since=15"), None)
        .await;
    expect_sse_messages(&mut fine, &epoch, 16, 20, "SSE since=15 (no reset)").await;

    // WebSocket: subscribed with truncated:true, then the retained messages.
    let (mut ws, subscribed) = ws_subscribe(
        &server,
        json!({"op": "subscribe", "channel": ch, "since": 0}),
    )
    .await;
    assert_eq!(subscribed["truncated"], true, "{subscribed}");
    assert_eq!(subscribed["epoch"], epoch.as_str(), "{subscribed}");
    assert_eq!(subscribed["last_seq"], 20, "{subscribed}");
    expect_ws_messages(&mut ws, ch, 16, 20, "WS since=0").await;
    let (mut ws_fine, subscribed) = ws_subscribe(
        &server,
        json!({"op": "subscribe", "channel": ch, "since": 15}),
    )
    .await;
    assert_eq!(subscribed["truncated"], false, "{subscribed}");

    // Everyone continues live after the hand-off.
    publish_ok(&server, ch, json!({"data": {"n": 21}})).await;
    expect_sse_messages(&mut sse, &epoch, 21, 21, "SSE since=0, live").await;
    expect_sse_messages(&mut fine, &epoch, 21, 21, "SSE since=15, live").await;
    expect_ws_messages(&mut ws, ch, 21, 21, "WS since=0, live").await;
    expect_ws_messages(&mut ws_fine, ch, 16, 21, "WS since=15").await;
}

/// After `DELETE /api/channels/{ch}` and new publishes, resuming with the old epoch — a read
/// with `&epoch=`, SSE `Last-Event-ID: OLD:3`, WS `epoch: OLD` — is told and gets the new history
/// from seq 1. (Seq 3 exists in the new history too, so an epoch-blind resume would wrongly
/// continue at 4.) Resuming with the current epoch is not told anything.
#[tokio::test]
async fn stale_epoch_resumes_are_reset_to_the_new_history() {
    let server = TestServer::start().await;
    let ch = "stale:x";
    for n in 1..=5 {
        publish_ok(&server, ch, json!({"data": {"old": n}})).await;
    }
    let old = server.channel_info(ch).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    let (status, info) = server.delete(&format!("/api/channels/{ch}")).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["last_seq"], 0, "{info}");
    let new = info["epoch"].as_str().expect("epoch").to_owned();
    assert_ne!(new, old, "DELETE must start a new epoch");
    for n in 1..=5 {
        let answer = publish_ok(&server, ch, json!({"data": {"new": n}})).await;
        assert_eq!(answer["seq"], n, "seq restarts at 1: {answer}");
    }

    // Read.
    let page = read(&server, ch, &format!("since=3&epoch={old}")).await;
    assert_eq!(page["truncated"], true, "{page}");
    assert_eq!(page["epoch"], new.as_str(), "{page}");
    assert_eq!(seqs(&page), vec![1, 2, 3, 4, 5], "{page}");
    assert_eq!(page["messages"][0]["data"], json!({"new": 1}), "{page}");
    let page = read(&server, ch, &format!("since=3&epoch={new}")).await;
    assert_eq!(page["truncated"], false, "{page}");
    assert_eq!(seqs(&page), vec![4, 5], "{page}");

    // SSE, Last-Event-ID with the old epoch (it wins over ?since).
    let mut sse = server
        .sse(
            &format!("/api/channels/{ch}/events?since=4"),
            Some(&format!("{old}:3")),
        )
        .await;
    expect_reset(&mut sse, &new, 1, "SSE Last-Event-ID OLD:3").await;
    expect_sse_messages(&mut sse, &new, 1, 5, "SSE Last-Event-ID OLD:3").await;
    let mut current = server
        .sse(
            &format!("/api/channels/{ch}/events"),
            Some(&format!("{new}:3")),
        )
        .await;
    expect_sse_messages(&mut current, &new, 4, 5, "SSE Last-Event-ID NEW:3").await;
    let mut by_query = server
        .sse(
            &format!("/api/channels/{ch}/events?since=3&epoch={old}"),
            None,
        )
        .await;
    expect_reset(&mut by_query, &new, 1, "SSE ?since=3&epoch=OLD").await;
    expect_sse_messages(&mut by_query, &new, 1, 5, "SSE ?since=3&epoch=OLD").await;

    // WebSocket.
    let (mut ws, subscribed) = ws_subscribe(
        &server,
        json!({"op": "subscribe", "channel": ch, "since": 3, "epoch": old}),
    )
    .await;
    assert_eq!(subscribed["truncated"], true, "{subscribed}");
    assert_eq!(subscribed["epoch"], new.as_str(), "{subscribed}");
    expect_ws_messages(&mut ws, ch, 1, 5, "WS epoch OLD since 3").await;
    let (mut ws_current, subscribed) = ws_subscribe(
        &server,
        json!({"op": "subscribe", "channel": ch, "since": 3, "epoch": new}),
    )
    .await;
    assert_eq!(subscribed["truncated"], false, "{subscribed}");
    expect_ws_messages(&mut ws_current, ch, 4, 5, "WS epoch NEW since 3").await;

    // Live from here on, in the new epoch, for everyone.
    publish_ok(&server, ch, json!({"data": {"new": 6}})).await;
    expect_sse_messages(&mut sse, &new, 6, 6, "SSE OLD:3, live").await;
    expect_sse_messages(&mut current, &new, 6, 6, "SSE NEW:3, live").await;
    expect_ws_messages(&mut ws, ch, 6, 6, "WS OLD, live").await;
    expect_ws_messages(&mut ws_current, ch, 6, 6, "WS NEW, live").await;
}

/// A subscriber connected while its channel is DELETEd is told at once (SSE `event: reset`,
/// WS `subscribed` with `truncated: true`, both naming the new epoch and seq 1), then receives
/// the new history live — and the WS connection's other subscriptions are untouched.
#[tokio::test]
async fn live_subscribers_are_told_when_their_channel_is_deleted() {
    let server = TestServer::start().await;
    let ch = "del:x";
    let other = "del:other";
    for n in 1..=3 {
        publish_ok(&server, ch, json!({"data": {"old": n}})).await;
    }
    let old = server.channel_info(ch).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();

    let mut sse = server
        .sse(&format!("/api/channels/{ch}/events?since=0"), None)
        .await;
    expect_sse_messages(&mut sse, &old, 1, 3, "SSE before DELETE").await;
    let mut sse_live = server
        .sse(&format!("/api/channels/{ch}/events"), None)
        .await;
    let (mut ws, subscribed) = ws_subscribe(
        &server,
        json!({"op": "subscribe", "channel": ch, "since": 0}),
    )
    .await;
    assert_eq!(subscribed["truncated"], false, "{subscribed}");
    expect_ws_messages(&mut ws, ch, 1, 3, "WS before DELETE").await;
    ws.send(json!({"op": "subscribe", "channel": other})).await;
    let subscribed = ws.recv().await;
    assert_eq!(
        (subscribed["op"].as_str(), subscribed["channel"].as_str()),
        (Some("subscribed"), Some(other))
    );
    server.wait_subscribers(ch, 3).await;

    let (status, info) = server.delete(&format!("/api/channels/{ch}")).await;
    assert_eq!(status, 200, "{info}");
    let new = info["epoch"].as_str().expect("epoch").to_owned();
    assert_ne!(new, old);

    expect_reset(&mut sse, &new, 1, "SSE since=0 across DELETE").await;
    expect_reset(&mut sse_live, &new, 1, "SSE live across DELETE").await;
    let reset = ws.recv().await;
    assert_eq!(reset["op"], "subscribed", "{reset}");
    assert_eq!(reset["channel"], ch, "{reset}");
    assert_eq!(reset["truncated"], true, "{reset}");
    assert_eq!(reset["epoch"], new.as_str(), "{reset}");
    assert_eq!(reset["last_seq"], 0, "{reset}");

    for n in 1..=4 {
        let answer = publish_ok(&server, ch, json!({"data": {"new": n}})).await;
        assert_eq!(answer["seq"], n, "{answer}");
    }
    publish_ok(&server, other, json!({"data": "still here"})).await;
    expect_sse_messages(&mut sse, &new, 1, 4, "SSE since=0 after DELETE").await;
    expect_sse_messages(&mut sse_live, &new, 1, 4, "SSE live after DELETE").await;
    expect_ws_messages(&mut ws, ch, 1, 4, "WS after DELETE").await;
    let v = ws.recv().await;
    assert_eq!(
        (v["channel"].as_str(), v["seq"].as_u64()),
        (Some(other), Some(1)),
        "{v}"
    );
}

/// A subscriber that lags while the history it still needs is pruned is told, mid-stream: the
/// SSE reader below stops reading (a small socket buffer, so the server feels it) with
/// `max_messages = 5`; 300 messages of 30 KiB later and a pruning pass, it resumes and must get
/// what was already on its way, then `event: reset` naming the oldest retained seq, then the
/// retained messages — never a silent jump.
#[tokio::test]
async fn lagging_sse_reader_is_told_when_its_backlog_is_pruned() {
    const TOTAL: u64 = 300;
    let server = TestServer::start_with(ServerOptions {
        config: Some("[[retention]]\npattern = \"lag:*\"\nmax_messages = 5\n".into()),
        ..Default::default()
    })
    .await;
    let ch = "lag:x";
    let epoch = server.channel_info(ch).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    let mut slow =
        crate::guarantees::SlowSse::open(&server, &format!("/api/channels/{ch}/events?since=0"))
            .await;
    server.wait_subscribers(ch, 1).await;
    let pad = "x".repeat(30 * 1024);
    for first in (1..=TOTAL).step_by(20) {
        let batch: Vec<Value> = (first..first + 20)
            .map(|n| json!({"data": {"n": n, "pad": pad}}))
            .collect();
        let (status, answer) = server
            .post(&format!("/api/channels/{ch}/messages"), Value::Array(batch))
            .await;
        assert_eq!(status, 201, "{answer}");
    }
    crate::support::wait_for("pruning down to 5 messages", || async {
        let info = server.channel_info(ch).await;
        (info["messages"].as_u64()? <= 5).then_some(())
    })
    .await;

    let mut before = Vec::new();
    let reset_at = loop {
        let e = slow.next().await.expect("stream open");
        if e.event.as_deref() == Some("reset") {
            let data: Value = serde_json::from_str(&e.data).expect("reset JSON");
            assert_eq!(data["epoch"], epoch.as_str(), "{data}");
            break data["first_seq"].as_u64().expect("first_seq");
        }
        assert_eq!(e.event, None, "{e:?}");
        let (_, seq) = sse_id(&e);
        let expected = before.last().map_or(1, |s| s + 1);
        assert_eq!(
            seq,
            expected,
            "lagging SSE: seq {seq} follows {} with no reset: messages lost silently",
            expected - 1
        );
        assert!(
            seq < TOTAL,
            "got to the end without a reset: the reader never lagged"
        );
        before.push(seq);
    };
    let last_before = before.last().copied().unwrap_or(0);
    assert_eq!(reset_at, TOTAL - 4, "the oldest retained seq");
    assert!(reset_at > last_before + 1, "a reset without a gap");
    let mut after = Vec::new();
    while after.last().copied().unwrap_or(0) < TOTAL {
        let e = slow.next().await.expect("stream open");
        assert_eq!(e.event, None, "{e:?}");
        let v: Value = serde_json::from_str(&e.data).expect("message JSON");
        assert_eq!(v["data"]["n"], seq_of(&v));
        after.push(seq_of(&v));
    }
    assert_contiguous(&after, reset_at, TOTAL, "lagging SSE after the reset");
    eprintln!("lagging SSE: got 1..={last_before}, then reset to {reset_at}, then ..={TOTAL}");
}
