//! §2 "Ordered, gap-free, no duplicates per subscription": subscribers join while a publisher
//! runs flat out, each from a random `since` (or live only), and each must receive one
//! contiguous run up to the final seq — the backlog→live hand-off happens under load.
//!
//! Join moments follow the publisher's acknowledged progress (a `watch`), not the clock. The
//! publisher holds its last `TAIL` messages until every subscriber is connected, so even a
//! subscriber whose connection was slow joins while publishes are still in flight.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::guarantees::{join, seed, sse_id};
use crate::support::{assert_contiguous, ServerOptions, TestServer, WAIT};

const RETENTION: &str = "[[retention]]\npattern = \"hand:*\"\nmax_messages = 1000000\n";
/// The most messages one publish request carries in the single-channel test.
const MAX_BATCH: u64 = 8;
/// Messages held back until every subscriber is connected.
const TAIL: u64 = 300;

/// What the publisher publishes: `per_channel` messages to each channel, in batches of
/// 1..=`max_batch` (drawn from `seed`), channels in turn.
struct Load {
    channels: Vec<String>,
    per_channel: u64,
    max_batch: u64,
    seed: u64,
}

/// Publishes `load` as fast as the server acknowledges. `progress` carries the fewest messages
/// any channel has acknowledged; the last `TAIL` wait until `connected` reaches `subscribers`.
/// Message `n` of a channel carries `{"n": n}` and must get seq `n`.
async fn publish_all(
    server: Arc<TestServer>,
    load: Load,
    progress: watch::Sender<u64>,
    mut connected: watch::Receiver<usize>,
    subscribers: usize,
) {
    let Load {
        channels,
        per_channel,
        max_batch,
        seed,
    } = load;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut acked = vec![0u64; channels.len()];
    let mut requests = 0u64;
    while acked.iter().any(|a| *a < per_channel) {
        for (i, channel) in channels.iter().enumerate() {
            if acked[i] >= per_channel {
                continue;
            }
            if acked[i] + max_batch >= per_channel - TAIL.min(per_channel) {
                tokio::time::timeout(WAIT, connected.wait_for(|n| *n >= subscribers))
                    .await
                    .expect("every subscriber connected in time")
                    .expect("connection counter alive");
            }
            let size = rng.gen_range(1..=max_batch).min(per_channel - acked[i]);
            let batch: Vec<Value> = (1..=size)
                .map(|k| json!({"data": {"n": acked[i] + k}}))
                .collect();
            let (status, answer) = server
                .post(
                    &format!("/api/channels/{channel}/messages"),
                    Value::Array(batch),
                )
                .await;
            requests += 1;
            assert_eq!(status, 201, "batch publish to {channel}: {answer}");
            let seqs: Vec<u64> = answer["messages"]
                .as_array()
                .expect("batch answer")
                .iter()
                .map(|r| r["seq"].as_u64().expect("seq"))
                .collect();
            let expected: Vec<u64> = (acked[i] + 1..=acked[i] + size).collect();
            assert_eq!(seqs, expected, "seqs acknowledged on {channel}");
            acked[i] += size;
        }
        let least = acked.iter().copied().min().unwrap_or(0);
        progress.send_replace(least);
    }
    eprintln!(
        "publisher: {} messages on {} channel(s) in {requests} requests",
        per_channel * channels.len() as u64,
        channels.len()
    );
}

#[derive(Debug, Clone, Copy)]
enum Transport {
    Sse,
    Ws,
}

#[derive(Debug, Clone, Copy)]
enum Start {
    /// No `since`: live only.
    Live,
    /// `since` = this fraction of the acknowledged progress at join time.
    Fraction(f64),
}

/// One subscriber of the single-channel test: where it joined and what it received.
struct Received {
    label: String,
    first: u64,
    seqs: Vec<u64>,
}

fn check_message(label: &str, channel: &str, v: &Value) -> u64 {
    let seq = v["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("{label}: no seq in {v}"));
    assert_eq!(v["channel"], channel, "{label}: {v}");
    assert_eq!(
        v["data"]["n"], seq,
        "{label}: message {seq} carries another message's data: {v}"
    );
    seq
}

/// One subscriber of the single-channel test: joins once `threshold` messages are
/// acknowledged, from `from`, and reads up to seq `total` of `epoch`. `variant` picks how it
/// asks for its start: SSE `?since=N`, `Last-Event-ID: {epoch}:N` or `Last-Event-ID: N`; WS
/// with or without the (current) `epoch`.
struct Plan {
    label: String,
    transport: Transport,
    threshold: u64,
    from: Start,
    total: u64,
    epoch: String,
    variant: usize,
}

async fn subscriber(
    server: Arc<TestServer>,
    plan: Plan,
    mut progress: watch::Receiver<u64>,
    connected: watch::Sender<usize>,
) -> Received {
    const CH: &str = "hand:one";
    let Plan {
        label,
        transport,
        threshold,
        from,
        total,
        epoch,
        variant,
    } = plan;
    let joined_at = *tokio::time::timeout(WAIT, progress.wait_for(|p| *p >= threshold))
        .await
        .expect("publisher progress in time")
        .expect("publisher alive");
    let since = match from {
        Start::Live => None,
        Start::Fraction(f) => Some((joined_at as f64 * f) as u64),
    };
    let label = format!("{label} (joined at {joined_at}, since {since:?})");
    let mut seqs = Vec::new();
    let first = match transport {
        Transport::Sse => {
            let events = format!("/api/channels/{CH}/events");
            let mut sse = match (since, variant % 3) {
                (None, _) => server.sse(&events, None).await,
                (Some(n), 0) => server.sse(&format!("{events}?since={n}"), None).await,
                (Some(n), 1) => server.sse(&events, Some(&format!("{epoch}:{n}"))).await,
                (Some(n), _) => server.sse(&events, Some(&n.to_string())).await,
            };
            let connected_at = *progress.borrow();
            connected.send_modify(|n| *n += 1);
            while seqs.last().is_none_or(|s| *s < total) {
                let e = sse
                    .next()
                    .await
                    .unwrap_or_else(|| panic!("{label}: stream ended"));
                assert_eq!(e.event, None, "{label}: unexpected event {e:?}");
                let v: Value = serde_json::from_str(&e.data).expect("message JSON");
                let seq = check_message(&label, CH, &v);
                let (id_epoch, id_seq) = sse_id(&e);
                assert_eq!(
                    (id_epoch.as_str(), id_seq),
                    (epoch.as_str(), seq),
                    "{label}: SSE id"
                );
                seqs.push(seq);
            }
            match since {
                Some(n) => n + 1,
                None => {
                    // Live only: it starts right after what was committed when it subscribed,
                    // which is at least what was acknowledged before it asked and at most one
                    // in-flight batch past what was acknowledged once it was answered.
                    let first = seqs[0];
                    assert!(
                        first > joined_at && first <= connected_at + MAX_BATCH + 1,
                        "{label}: live stream started at {first}, outside {joined_at}+1..={connected_at}+{}",
                        MAX_BATCH + 1
                    );
                    first
                }
            }
        }
        Transport::Ws => {
            let mut ws = server.ws().await;
            let mut sub = json!({"op": "subscribe", "channel": CH});
            if let Some(n) = since {
                sub["since"] = json!(n);
                if variant % 2 == 1 {
                    sub["epoch"] = json!(epoch);
                }
            }
            ws.send(sub).await;
            let subscribed = ws.recv().await;
            connected.send_modify(|n| *n += 1);
            assert_eq!(subscribed["op"], "subscribed", "{label}: {subscribed}");
            assert_eq!(subscribed["channel"], CH, "{label}: {subscribed}");
            assert_eq!(subscribed["epoch"], epoch.as_str(), "{label}: {subscribed}");
            assert_eq!(subscribed["truncated"], false, "{label}: {subscribed}");
            let last_seq = subscribed["last_seq"].as_u64().expect("last_seq");
            assert!(
                last_seq >= joined_at,
                "{label}: last_seq {last_seq} < acknowledged {joined_at}"
            );
            while seqs.last().is_none_or(|s| *s < total) {
                let v = ws.recv().await;
                assert_eq!(v["op"], "message", "{label}: unexpected frame {v}");
                seqs.push(check_message(&label, CH, &v));
            }
            since.unwrap_or(last_seq) + 1
        }
    };
    Received { label, first, seqs }
}

/// 20 SSE and 20 WebSocket subscribers join one busy channel at staggered moments, a quarter
/// of them live only, the rest from a random `since` in 0..=acknowledged (SSE by `?since`,
/// `Last-Event-ID: epoch:N` or a bare `Last-Event-ID: N`; WS with or without `epoch`); each gets
/// exactly `since+1 ..= 4000` (live ones: from where they started), in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscribers_joining_during_publishing_get_contiguous_runs() {
    const TOTAL: u64 = 4000;
    const PER_TRANSPORT: usize = 20;
    let seed = seed("handoff_single_channel");
    let server = Arc::new(
        TestServer::start_with(ServerOptions {
            config: Some(RETENTION.into()),
            ..Default::default()
        })
        .await,
    );
    let epoch = server.channel_info("hand:one").await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    let mut rng = StdRng::seed_from_u64(seed);
    let (progress_tx, progress_rx) = watch::channel(0u64);
    let (connected_tx, connected_rx) = watch::channel(0usize);

    // Join points spread over the first 85% of the run, transports shuffled among them.
    let n = 2 * PER_TRANSPORT;
    let mut transports: Vec<Transport> = (0..n)
        .map(|i| {
            if i % 2 == 0 {
                Transport::Sse
            } else {
                Transport::Ws
            }
        })
        .collect();
    transports.shuffle(&mut rng);
    let mut subscribers = Vec::new();
    for (i, transport) in transports.into_iter().enumerate() {
        let threshold = (TOTAL - TAIL) * 85 / 100 * i as u64 / n as u64;
        let from = if rng.gen_bool(0.25) {
            Start::Live
        } else {
            Start::Fraction(rng.gen_range(0.0..=1.0))
        };
        let plan = Plan {
            label: format!("{transport:?} subscriber {i}"),
            transport,
            threshold,
            from,
            total: TOTAL,
            epoch: epoch.clone(),
            variant: rng.gen_range(0..6),
        };
        subscribers.push(tokio::spawn(subscriber(
            server.clone(),
            plan,
            progress_rx.clone(),
            connected_tx.clone(),
        )));
    }
    let load = Load {
        channels: vec!["hand:one".into()],
        per_channel: TOTAL,
        max_batch: MAX_BATCH,
        seed: seed ^ 1,
    };
    let publisher = tokio::spawn(publish_all(
        server.clone(),
        load,
        progress_tx,
        connected_rx,
        n,
    ));
    join(publisher).await;
    let mut live = 0;
    for s in subscribers {
        let r = join(s).await;
        assert!(r.first <= TOTAL, "{}: nothing left to receive", r.label);
        assert_contiguous(&r.seqs, r.first, TOTAL, &r.label);
        if r.label.contains("since None") {
            live += 1;
        }
    }
    eprintln!("handoff: {n} subscribers ({live} live-only) each got a contiguous run to {TOTAL}");
    assert_eq!(server.last_seq("hand:one").await, TOTAL);
}

/// Several subscriptions on one WebSocket connection: each of 5 connections subscribes to 4
/// busy channels one after another while they are published to, each from a random `since` or
/// live; per channel, the frames of that connection form one contiguous run to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_subscriptions_on_one_websocket_each_get_contiguous_runs() {
    // More than the 1,024-message hot window, so late joiners from a low `since` must read the
    // gap from the store while the window moves on.
    const PER_CHANNEL: u64 = 2500;
    const CONNECTIONS: usize = 5;
    let seed = seed("handoff_multi_subscription");
    let server = Arc::new(
        TestServer::start_with(ServerOptions {
            config: Some(RETENTION.into()),
            ..Default::default()
        })
        .await,
    );
    let channels: Vec<String> = (0..4).map(|i| format!("hand:multi{i}")).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let (progress_tx, progress_rx) = watch::channel(0u64);
    let (connected_tx, connected_rx) = watch::channel(0usize);
    let total_subscriptions = CONNECTIONS * channels.len();

    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        // Each connection subscribes to every channel, in a random order, at rising progress.
        let mut order = channels.clone();
        order.shuffle(&mut rng);
        let plan: Vec<(u64, String, Start)> = order
            .into_iter()
            .enumerate()
            .map(|(k, ch)| {
                let threshold = (PER_CHANNEL - TAIL) * 85 / 100 * (c * 4 + k) as u64
                    / total_subscriptions as u64;
                let from = if rng.gen_bool(0.25) {
                    Start::Live
                } else {
                    Start::Fraction(rng.gen_range(0.0..=1.0))
                };
                (threshold, ch, from)
            })
            .collect();
        let server = server.clone();
        let mut progress = progress_rx.clone();
        let connected = connected_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut ws = server.ws().await;
            let mut plan = std::collections::VecDeque::from(plan);
            let mut runs = Runs::default();
            while !done(&runs, 4, PER_CHANNEL) {
                if let Some((threshold, ch, from)) = plan.front().cloned() {
                    let now = *progress.borrow();
                    if now >= threshold {
                        plan.pop_front();
                        let mut sub = json!({"op": "subscribe", "channel": ch});
                        let since = match from {
                            Start::Live => None,
                            Start::Fraction(f) => Some((now as f64 * f) as u64),
                        };
                        if let Some(n) = since {
                            sub["since"] = json!(n);
                        }
                        runs.insert(ch.clone(), (None, Vec::new(), since));
                        ws.send(sub).await;
                        continue;
                    }
                    tokio::select! {
                        v = ws.recv() => handle_frame(c, &mut runs, v, &connected),
                        // The publisher cannot finish before every subscription is made.
                        changed = progress.changed() => changed.expect("publisher alive"),
                    }
                } else {
                    let v = ws.recv().await;
                    handle_frame(c, &mut runs, v, &connected);
                }
            }
            runs
        }));
    }
    let load = Load {
        channels: channels.clone(),
        per_channel: PER_CHANNEL,
        max_batch: 16,
        seed: seed ^ 1,
    };
    let publisher = tokio::spawn(publish_all(
        server.clone(),
        load,
        progress_tx,
        connected_rx,
        total_subscriptions,
    ));
    join(publisher).await;
    for (c, t) in tasks.into_iter().enumerate() {
        let runs = join(t).await;
        for (ch, (first, seqs, since)) in runs {
            let first = first.expect("subscribed");
            assert_contiguous(
                &seqs,
                first,
                PER_CHANNEL,
                &format!("connection {c}, channel {ch} (since {since:?})"),
            );
        }
    }
    for ch in &channels {
        assert_eq!(server.last_seq(ch).await, PER_CHANNEL);
    }
}

/// Per channel of one connection: the first seq expected (known once `subscribed` arrives),
/// the seqs received, and the `since` asked for.
type Runs = std::collections::HashMap<String, (Option<u64>, Vec<u64>, Option<u64>)>;

/// Every channel subscribed and received up to `total`.
fn done(runs: &Runs, channels: usize, total: u64) -> bool {
    runs.len() == channels
        && runs
            .values()
            .all(|(first, seqs, _)| match (first, seqs.last()) {
                (Some(_), Some(last)) => *last >= total,
                (Some(first), None) => *first > total,
                (None, _) => false,
            })
}

fn handle_frame(c: usize, runs: &mut Runs, v: Value, connected: &watch::Sender<usize>) {
    let ch = v["channel"].as_str().unwrap_or_default().to_owned();
    let label = format!("connection {c}, channel {ch}");
    let Some((first, seqs, since)) = runs.get_mut(&ch) else {
        panic!("{label}: frame for a channel not subscribed: {v}");
    };
    match v["op"].as_str() {
        Some("subscribed") => {
            assert!(first.is_none(), "{label}: subscribed twice: {v}");
            assert_eq!(v["truncated"], false, "{label}: {v}");
            let last_seq = v["last_seq"].as_u64().expect("last_seq");
            *first = Some(since.unwrap_or(last_seq) + 1);
            connected.send_modify(|n| *n += 1);
        }
        Some("message") => {
            assert!(first.is_some(), "{label}: message before subscribed: {v}");
            seqs.push(check_message(&label, &ch, &v));
        }
        _ => panic!("{label}: unexpected frame {v}"),
    }
}
