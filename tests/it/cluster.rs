//! The Redis engine (SPEC §6) with two Tidings nodes on one real `redis-server`: live delivery
//! across nodes, resuming on another node, the backlog→live hand-off under load across nodes,
//! seqs without holes with publishers on both nodes, dedupe across nodes, Redis down (503,
//! health) and back, a restart with AOF losing nothing acknowledged, and a data loss giving
//! channels a new epoch.

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::guarantees::{join, publish_ok, read_all, seed, seq_of};
use crate::redis_support::RedisServer;
use crate::support::{assert_contiguous, wait_for, ServerOptions, TestServer, WAIT};

const RETENTION: &str = "[[retention]]\npattern = \"*\"\nmax_messages = 1000000\n";

async fn node(redis: &RedisServer) -> TestServer {
    TestServer::start_with(ServerOptions {
        config: Some(RETENTION.to_owned()),
        args: vec!["--engine".into(), redis.url()],
        ..Default::default()
    })
    .await
}

/// Reads SSE messages until `last` arrives; returns their seqs.
async fn sse_until(sse: &mut crate::support::SseClient, last: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    tokio::time::timeout(WAIT, async {
        while seqs.last().copied().unwrap_or(0) < last {
            let m = sse.next_message().await;
            seqs.push(seq_of(&m));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out at {:?} waiting for {last}", seqs.last()));
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_one_node_gets_what_another_node_publishes_in_order() {
    let redis = RedisServer::start();
    let a = node(&redis).await;
    let b = node(&redis).await;
    let mut ws = a.ws().await;
    ws.send(json!({"op": "subscribe", "channel": "x:1"})).await;
    ws.recv_op("subscribed").await;
    let mut sse = a.sse("/api/channels/x:2/events", None).await;
    a.wait_subscribers("x:2", 1).await;
    for i in 1..=200u64 {
        let answer = publish_ok(&b, "x:1", json!({"data": i})).await;
        assert_eq!(seq_of(&answer), i);
    }
    publish_ok(&b, "x:2", json!({"data": "sse"})).await;
    let mut got = Vec::new();
    while got.len() < 200 {
        let m = ws.recv_op("message").await;
        assert_eq!(m["channel"], "x:1");
        assert_eq!(
            m["data"],
            json!(got.len() as u64 + 1),
            "the message itself: {m}"
        );
        got.push(seq_of(&m));
    }
    assert_contiguous(&got, 1, 200, "ws on node A");
    assert_eq!(sse_until(&mut sse, 1).await, vec![1]);
    // Both nodes see one history.
    let (on_a, _) = read_all(&a, "x:1").await;
    let (on_b, _) = read_all(&b, "x:1").await;
    assert_eq!(on_a, on_b);
    assert_eq!(on_a.len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_node_with_exactly_the_rest() {
    let redis = RedisServer::start();
    let a = node(&redis).await;
    let b = node(&redis).await;
    let mut sse = a.sse("/api/channels/r:1/events?since=0", None).await;
    for i in 1..=30 {
        publish_ok(&a, "r:1", json!({"data": i})).await;
    }
    let first = sse_until(&mut sse, 30).await;
    assert_contiguous(&first, 1, 30, "first node");
    let epoch = a.channel_info("r:1").await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    drop(sse);
    // Published while the client was away, on the other node.
    for i in 31..=50 {
        publish_ok(&b, "r:1", json!({"data": i})).await;
    }
    let mut again = b
        .sse("/api/channels/r:1/events", Some(&format!("{epoch}:20")))
        .await;
    publish_ok(&a, "r:1", json!({"data": 51})).await;
    let rest = sse_until(&mut again, 51).await;
    assert_contiguous(&rest, 21, 51, "resumed on node B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_joining_on_one_node_while_another_publishes_get_contiguous_runs() {
    let redis = RedisServer::start();
    let a = Arc::new(node(&redis).await);
    let b = Arc::new(node(&redis).await);
    let seed = seed("cluster handoff");
    let total: u64 = 3000;
    let (progress_tx, progress) = tokio::sync::watch::channel(0u64);
    let publisher = {
        let b = b.clone();
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut acked = 0u64;
            while acked < total {
                let size = rng.gen_range(1..=8u64).min(total - acked);
                let batch: Vec<Value> = (1..=size)
                    .map(|k| json!({"data": {"n": acked + k}}))
                    .collect();
                let (status, answer) = b
                    .post("/api/channels/hand:x/messages", Value::Array(batch))
                    .await;
                assert_eq!(status, 201, "{answer}");
                acked += size;
                let _ = progress_tx.send(acked);
            }
        })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 1);
    let mut subscribers = Vec::new();
    for k in 0..12u64 {
        let join_at = total * k / 14;
        let mut p = progress.clone();
        tokio::time::timeout(WAIT, p.wait_for(|n| *n >= join_at))
            .await
            .expect("progress")
            .expect("publisher alive");
        let since = rng.gen_range(0..=join_at);
        let a = a.clone();
        subscribers.push(tokio::spawn(async move {
            if k % 2 == 0 {
                let mut ws = a.ws().await;
                ws.send(json!({"op": "subscribe", "channel": "hand:x", "since": since}))
                    .await;
                ws.recv_op("subscribed").await;
                let mut seqs = Vec::new();
                while seqs.last().copied().unwrap_or(since) < total {
                    seqs.push(seq_of(&ws.recv_op("message").await));
                }
                assert_contiguous(&seqs, since + 1, total, &format!("ws {k} since {since}"));
            } else {
                let mut sse = a
                    .sse(&format!("/api/channels/hand:x/events?since={since}"), None)
                    .await;
                let seqs = if since >= total {
                    Vec::new()
                } else {
                    sse_until(&mut sse, total).await
                };
                assert_contiguous(&seqs, since + 1, total, &format!("sse {k} since {since}"));
            }
        }));
    }
    join(publisher).await;
    for s in subscribers {
        join(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_on_both_nodes_get_seqs_without_holes_and_dedupe_holds_across_nodes() {
    let redis = RedisServer::start();
    let a = Arc::new(node(&redis).await);
    let b = Arc::new(node(&redis).await);
    let mut tasks = Vec::new();
    for p in 0..4 {
        let server = if p % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..150 {
                let answer = publish_ok(&server, "both:1", json!({"data": [p, i]})).await;
                seqs.push(seq_of(&answer));
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(join(t).await);
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=600).collect::<Vec<u64>>(),
        "every ack a distinct seq"
    );
    let (history, _) = read_all(&b, "both:1").await;
    let seqs: Vec<u64> = history.iter().map(seq_of).collect();
    assert_contiguous(&seqs, 1, 600, "history");

    let first = publish_ok(&a, "dedupe:1", json!({"id": "order-7", "data": 1})).await;
    let (status, again) = b
        .publish("dedupe:1", json!({"id": "order-7", "data": 2}))
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["seq"], first["seq"]);
    let (history, _) = read_all(&a, "dedupe:1").await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["data"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_answers_503_and_a_restart_with_aof_loses_nothing_acknowledged() {
    let mut redis = RedisServer::start_aof();
    let a = Arc::new(node(&redis).await);
    let b = node(&redis).await;
    let mut sse = b.sse("/api/channels/aof:1/events?since=0", None).await;
    // A publisher that keeps going through the restart, counting what was acknowledged.
    let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
    let publisher = {
        let a = a.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut refused = 0u32;
            let mut i = 0u64;
            loop {
                if *stop.borrow_and_update() && acked.len() > 300 {
                    break;
                }
                i += 1;
                let (status, answer) = a
                    .publish("aof:1", json!({"id": format!("m{i}"), "data": i}))
                    .await;
                match status {
                    201 => acked.push(seq_of(&answer)),
                    503 => refused += 1,
                    other => panic!("publish answered {other}: {answer}"),
                }
                if i > 100_000 {
                    panic!("the publisher did not finish");
                }
            }
            (acked, refused)
        })
    };
    wait_for("100 acknowledged messages", || async {
        (a.last_seq("aof:1").await >= 100).then_some(())
    })
    .await;
    redis.stop();
    // While Redis is down: the health check says so, publishes are refused.
    wait_for("health to report the store down", || async {
        let (status, _) = a.get("/healthz").await;
        (status == 503).then_some(())
    })
    .await;
    let (status, answer) = b.publish("aof:2", json!({"data": 1})).await;
    assert_eq!(status, 503, "{answer}");
    let up = crate::guarantees::metric(&a, "tidings_store_up", None).await;
    assert_eq!(up, 0.0, "the store-up gauge says Redis is down");
    redis.restart();
    wait_for("health back", || async {
        let (status, _) = a.get("/healthz").await;
        (status == 200).then_some(())
    })
    .await;
    wait_for("the gauge back at 1", || async {
        (crate::guarantees::metric(&a, "tidings_store_up", None).await == 1.0).then_some(())
    })
    .await;
    let _ = stop_tx.send(true);
    let (acked, refused) = join(publisher).await;
    eprintln!("acked {}, refused {refused}", acked.len());
    let (history, _) = read_all(&b, "aof:1").await;
    let stored: std::collections::BTreeSet<u64> = history.iter().map(seq_of).collect();
    for seq in &acked {
        assert!(stored.contains(seq), "acknowledged seq {seq} was lost");
    }
    let seqs: Vec<u64> = stored.iter().copied().collect();
    let last = *seqs.last().expect("history");
    assert_contiguous(&seqs, 1, last, "history after the restart");
    // The subscriber on the other node stayed (or came back) and got everything in order.
    let got = sse_until(&mut sse, last).await;
    let mut dedup: Vec<u64> = Vec::new();
    for s in got {
        if dedup.last().is_none_or(|l| s > *l) {
            dedup.push(s);
        }
    }
    assert_contiguous(&dedup, 1, last, "sse across the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_data_gives_channels_a_new_epoch() {
    let mut redis = RedisServer::start();
    let a = node(&redis).await;
    for i in 1..=5 {
        publish_ok(&a, "lost:1", json!({"data": i})).await;
    }
    let old = a.channel_info("lost:1").await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    // No persistence: a restart empties Redis.
    redis.restart();
    wait_for("the node to reconnect", || async {
        let (status, _) = a.get("/healthz").await;
        (status == 200).then_some(())
    })
    .await;
    let answer = publish_ok(&a, "lost:1", json!({"data": "after"})).await;
    assert_eq!(seq_of(&answer), 1, "history restarted");
    let new = a.channel_info("lost:1").await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    assert_ne!(new, old, "a new epoch");
    // A client resuming from the old history is told to reset.
    let mut sse = a
        .sse("/api/channels/lost:1/events", Some(&format!("{old}:5")))
        .await;
    let event = sse.next().await.expect("an event");
    assert_eq!(event.event.as_deref(), Some("reset"), "{event:?}");
}
