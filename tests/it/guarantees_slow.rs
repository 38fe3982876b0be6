//! §2 "Slow subscribers never lose messages silently and never slow others": a subscriber that
//! stops reading while ~23 MB are published costs the server a bounded amount of memory, does
//! not stop a normal subscriber from receiving everything, and afterwards either catches up in
//! order or is closed with 4008 and resumes from its last seq with no gap.
//!
//! The stalled clients use a socket with a small, fixed receive buffer: loopback sockets may
//! otherwise buffer tens of MiB in the kernel, and the server would never feel the stall.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::guarantees::{join, metric, rss_kib, sse_id, ws_small_buffer, SlowSse};
use crate::support::{assert_contiguous, ServerOptions, TestServer};

const COUNT: u64 = 20_000;
const BATCH: u64 = 100;
/// Bytes of padding per message: with the envelope, a message is about 1.1 KiB.
const PAD: usize = 1000;
/// How much the server's RSS may grow while the slow consumer is stalled. The server needs a
/// few tens of MiB for this load (SQLite page caches, the 1,024-message hot window, per-socket
/// buffers, allocator arenas); the bound only has to tell "bounded" from "grows with the
/// backlog", and leaves room for a loaded machine. See the report printed by the test.
const MAX_RSS_GROWTH_KIB: u64 = 200 * 1024;
const CONFIG: &str = "[[retention]]\npattern = \"slow:*\"\nmax_messages = 1000000\n";

/// Publishes `COUNT` ~1 KiB messages in batches, `data.n` = expected seq.
async fn publish(server: Arc<TestServer>, channel: &'static str) {
    let pad = "x".repeat(PAD);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut n = 0;
    while n < COUNT {
        assert!(
            Instant::now() < deadline,
            "publishing {COUNT} messages took over 2 minutes"
        );
        let batch: Vec<Value> = (n + 1..=n + BATCH)
            .map(|k| json!({"data": {"n": k, "pad": pad}}))
            .collect();
        let (status, answer) = server
            .post(
                &format!("/api/channels/{channel}/messages"),
                Value::Array(batch),
            )
            .await;
        assert_eq!(status, 201, "publish: {answer}");
        assert_eq!(
            answer["messages"][0]["seq"],
            n + 1,
            "batch starts at {}",
            n + 1
        );
        n += BATCH;
    }
}

/// Samples the server's RSS every 50 ms until `stop`; returns the peak, in KiB.
fn sample_rss(pid: i32, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut peak = 0;
        let deadline = Instant::now() + Duration::from_secs(180);
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            peak = peak.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        peak.max(rss_kib(pid))
    })
}

fn check(v: &Value, expected: u64, who: &str) {
    assert_eq!(
        v["op"],
        "message",
        "{who}: {}",
        v.to_string().chars().take(200).collect::<String>()
    );
    assert_eq!(
        v["seq"], expected,
        "{who}: gap or duplicate at seq {expected}"
    );
    assert_eq!(
        v["data"]["n"], expected,
        "{who}: message {expected} carries another's data"
    );
}

/// Waits until `check` is true, polling every 100 ms, for at most `limit`; false on timeout.
async fn poll_until<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_websocket_consumer_is_bounded_and_resumes_without_gap() {
    const CH: &str = "slow:ws";
    let server = Arc::new(
        TestServer::start_with(ServerOptions {
            config: Some(CONFIG.into()),
            ..Default::default()
        })
        .await,
    );
    let pid = server.pid();

    let mut slow = ws_small_buffer(&server).await;
    slow.send(json!({"op": "subscribe", "channel": CH, "since": 0}))
        .await;
    let subscribed = slow.recv().await;
    assert_eq!(subscribed["op"], "subscribed", "{subscribed}");
    // From here on the slow client reads nothing until publishing is over.

    let mut normal = server.ws().await;
    normal
        .send(json!({"op": "subscribe", "channel": CH, "since": 0}))
        .await;
    assert_eq!(normal.recv().await["op"], "subscribed");
    server.wait_subscribers(CH, 2).await;
    let normal_task = tokio::spawn(async move {
        for expected in 1..=COUNT {
            check(&normal.recv().await, expected, "normal WS subscriber");
        }
    });

    let rss_before = rss_kib(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(pid, stop.clone());
    let started = Instant::now();
    let publisher = tokio::spawn(publish(server.clone(), CH));

    // Others are not slowed: everything is published and the normal subscriber gets all of it
    // while the slow client reads nothing at all.
    join(publisher).await;
    join(normal_task).await;
    let stalled_for = started.elapsed();
    // The server reports the slow consumer within its 5 s limit (and will close it with 4008
    // once the frames queued before the close are read); a server that instead catches it up
    // from history never reports it, and the client resumes after this wait either way.
    let reported = poll_until(Duration::from_secs(10), || async {
        metric(&server, "tidings_slow_consumers_total", None).await >= 1.0
    })
    .await;
    let delivered_ws = metric(
        &server,
        "tidings_messages_delivered_total",
        Some("transport=\"ws\""),
    )
    .await;
    eprintln!(
        "slow WS: publishing and the normal subscriber done after {stalled_for:?}; resumed after {:?}; slow reported: {reported}; delivered ws {delivered_ws}",
        started.elapsed(),
    );
    // The server gives up a stuck write after 30 s (no close frame can get through then).
    let stall_note = format!("the slow client read nothing for {:?}", started.elapsed());

    let mut next = 1u64;
    let mut closed_4008 = false;
    while next <= COUNT {
        match slow.recv_frame().await {
            Some(WsMessage::Text(t)) => {
                let v: Value = serde_json::from_str(&t).expect("JSON frame");
                check(&v, next, "slow WS subscriber");
                next += 1;
            }
            Some(WsMessage::Close(frame)) => {
                let frame = frame.expect("a close frame with a code");
                assert_eq!(u16::from(frame.code), 4008, "close code: {frame:?}");
                assert_eq!(frame.reason.as_str(), "slow consumer", "{frame:?}");
                closed_4008 = true;
                break;
            }
            other => panic!(
                "slow WS subscriber: connection ended without 4008 at seq {next} ({stall_note}): {other:?}"
            ),
        }
    }
    let seen_before_close = next - 1;
    if closed_4008 {
        // Resume from the last seq seen: the rest, no gap, no repeat.
        let mut again = server.ws().await;
        again
            .send(json!({"op": "subscribe", "channel": CH, "since": seen_before_close}))
            .await;
        let subscribed = again.recv().await;
        assert_eq!(subscribed["op"], "subscribed", "{subscribed}");
        assert_eq!(subscribed["truncated"], false, "{subscribed}");
        while next <= COUNT {
            check(
                &again.recv().await,
                next,
                "slow WS subscriber after reconnecting",
            );
            next += 1;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let rss_peak = join(sampler).await;
    eprintln!(
        "slow WS: {COUNT} messages; normal got all; slow got {seen_before_close} before {} and {} after; RSS {rss_before} KiB before, peak {rss_peak} KiB (+{} KiB)",
        if closed_4008 { "4008" } else { "catching up" },
        COUNT - seen_before_close,
        rss_peak.saturating_sub(rss_before)
    );
    assert_eq!(next, COUNT + 1);
    assert!(
        rss_peak.saturating_sub(rss_before) < MAX_RSS_GROWTH_KIB,
        "server RSS grew from {rss_before} KiB to {rss_peak} KiB with a stalled consumer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_sse_reader_is_bounded_and_catches_up_in_order() {
    const CH: &str = "slow:sse";
    let server = Arc::new(
        TestServer::start_with(ServerOptions {
            config: Some(CONFIG.into()),
            ..Default::default()
        })
        .await,
    );
    let pid = server.pid();
    let epoch = server.channel_info(CH).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();

    let mut slow = SlowSse::open(&server, &format!("/api/channels/{CH}/events?since=0")).await;
    let mut normal = server
        .sse(&format!("/api/channels/{CH}/events?since=0"), None)
        .await;
    server.wait_subscribers(CH, 2).await;
    let normal_task = {
        let epoch = epoch.clone();
        tokio::spawn(async move {
            for expected in 1..=COUNT {
                let e = normal.next().await.expect("normal SSE open");
                assert_eq!(
                    sse_id(&e),
                    (epoch.clone(), expected),
                    "normal SSE reader: {e:?}"
                );
            }
        })
    };

    let rss_before = rss_kib(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(pid, stop.clone());
    join(tokio::spawn(publish(server.clone(), CH))).await;
    join(normal_task).await;

    // While stalled, the server handed the slow stream only what its socket could take: the
    // SSE body is pulled as the client reads, so nothing queues up for it in the server.
    let delivered = metric(
        &server,
        "tidings_messages_delivered_total",
        Some("transport=\"sse\""),
    )
    .await;
    let to_slow = delivered as u64 - COUNT;
    eprintln!("slow SSE: while stalled the server had handed it {to_slow} of {COUNT} messages");
    assert!(
        to_slow < COUNT / 2,
        "the stalled SSE stream was handed {to_slow} of {COUNT} messages: it is buffered, not pulled"
    );

    // Resume: every seq once, in order, no reset (nothing was pruned).
    let mut seqs = Vec::with_capacity(COUNT as usize);
    while seqs.len() < COUNT as usize {
        let e = slow.next().await.expect("slow SSE open");
        assert_eq!(e.event, None, "slow SSE reader: unexpected {e:?}");
        let (e_epoch, seq) = sse_id(&e);
        assert_eq!(e_epoch, epoch);
        let v: Value = serde_json::from_str(&e.data).expect("message JSON");
        assert_eq!(
            v["data"]["n"], seq,
            "slow SSE reader: message {seq} carries another's data"
        );
        seqs.push(seq);
    }
    stop.store(true, Ordering::SeqCst);
    let rss_peak = join(sampler).await;
    eprintln!(
        "slow SSE: RSS {rss_before} KiB before, peak {rss_peak} KiB (+{} KiB)",
        rss_peak.saturating_sub(rss_before)
    );
    assert_contiguous(&seqs, 1, COUNT, "slow SSE reader");
    assert!(
        rss_peak.saturating_sub(rss_before) < MAX_RSS_GROWTH_KIB,
        "server RSS grew from {rss_before} KiB to {rss_peak} KiB with a stalled SSE reader"
    );
}
