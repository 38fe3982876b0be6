//! §2 "Durable before acknowledged": `kill -9` mid-stream never loses an acknowledged message
//! and never leaves a hole in seq — with `sync = "full"` (the default) and `sync = "normal"`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::guarantees::{join, publish_ok, read_all, seq_of};
use crate::support::{wait_for, ServerOptions, TestServer};

const PUBLISHERS: usize = 8;
const CHANNELS: [&str; 2] = ["dur:a", "dur:b"];
/// Acknowledgements to observe before the kill.
const KILL_AFTER: u64 = 600;
/// A publisher stops on its own after this many messages (the kill normally comes first).
const MAX_PER_PUBLISHER: usize = 5000;

/// One acknowledged message, as its publisher saw it.
#[derive(Debug, Clone)]
struct Ack {
    channel: &'static str,
    seq: u64,
    id: String,
    data: Value,
}

/// A `kill -9` armed in advance: a shell blocked on reading its stdin, so firing it is one
/// write to a pipe, not a fork and exec. The kill then lands within microseconds of the ack
/// that fired it, while the server is still busy with the publishes in flight.
struct Trigger(Mutex<Option<std::process::ChildStdin>>);

impl Trigger {
    fn arm(pid: i32) -> (Self, std::process::Child) {
        let mut killer = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("read _ && kill -9 {pid}"))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the killer");
        let stdin = killer.stdin.take().expect("killer stdin");
        (Self(Mutex::new(Some(stdin))), killer)
    }

    fn fire(&self) {
        if let Some(mut stdin) = self.0.lock().expect("trigger lock").take() {
            use std::io::Write;
            stdin.write_all(b"\n").expect("fire the killer");
        }
    }
}

/// Publishes `id = p{p}-{i}` messages (every third request a batch of 3) until the server goes
/// away; records each acknowledgement, and fires `trigger` once `KILL_AFTER` are recorded.
/// Returns how many messages it sent (acknowledged or not).
async fn publisher(
    http: reqwest::Client,
    base: String,
    p: usize,
    acks: Arc<Mutex<Vec<Ack>>>,
    count: Arc<AtomicU64>,
    trigger: Arc<Trigger>,
) -> usize {
    let channel = CHANNELS[p % CHANNELS.len()];
    let url = format!("{base}/api/channels/{channel}/messages");
    let mut i = 0usize;
    while i < MAX_PER_PUBLISHER {
        let size = if i % 3 == 2 { 3 } else { 1 };
        let items: Vec<(String, Value)> = (i..i + size)
            .map(|k| {
                let pad = "x".repeat(k % 200);
                (format!("p{p}-{k}"), json!({"p": p, "i": k, "pad": pad}))
            })
            .collect();
        i += size;
        let body = if size == 1 {
            json!({"id": items[0].0, "data": items[0].1})
        } else {
            Value::Array(
                items
                    .iter()
                    .map(|(id, data)| json!({"id": id, "data": data}))
                    .collect(),
            )
        };
        let Ok(resp) = http.post(&url).json(&body).send().await else {
            break; // killed: this one is not acknowledged
        };
        let status = resp.status().as_u16();
        let Ok(answer) = resp.json::<Value>().await else {
            break; // killed while answering: not acknowledged either
        };
        assert_eq!(status, 201, "publisher {p}: {answer}");
        let results: Vec<Value> = match answer.get("messages") {
            Some(list) => list.as_array().expect("batch results").clone(),
            None => vec![answer.clone()],
        };
        assert_eq!(results.len(), items.len(), "publisher {p}: {answer}");
        let mut acks = acks.lock().expect("acks lock");
        for (result, (id, data)) in results.iter().zip(items) {
            assert_eq!(result["id"], id.as_str(), "publisher {p}: {result}");
            assert_eq!(result["duplicate"], false, "publisher {p}: {result}");
            acks.push(Ack {
                channel,
                seq: seq_of(result),
                id,
                data,
            });
        }
        drop(acks);
        if count.fetch_add(size as u64, Ordering::SeqCst) + size as u64 >= KILL_AFTER {
            trigger.fire();
        }
    }
    i
}

async fn kill_mid_stream_then_verify(config: &str, label: &str) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let data_dir = tmp.path().join("data");
    let options = ServerOptions {
        config: Some(config.into()),
        data_dir: Some(data_dir.clone()),
        ..Default::default()
    };
    let mut server = TestServer::start_with(options.clone()).await;
    // A first message on each channel fixes its epoch, which must survive the crash.
    let mut epochs = HashMap::new();
    for ch in CHANNELS {
        publish_ok(&server, ch, json!({"id": "first", "data": "first"})).await;
        epochs.insert(ch, server.channel_info(ch).await["epoch"].clone());
    }

    let acks = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicU64::new(0));
    let (trigger, mut killer) = Trigger::arm(server.pid());
    let trigger = Arc::new(trigger);
    let tasks: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            tokio::spawn(publisher(
                server.http.clone(),
                server.base.clone(),
                p,
                acks.clone(),
                count.clone(),
                trigger.clone(),
            ))
        })
        .collect();
    wait_for(&format!("{KILL_AFTER} acknowledgements"), || async {
        (count.load(Ordering::SeqCst) >= KILL_AFTER).then_some(())
    })
    .await;
    let killed = tokio::task::spawn_blocking(move || killer.wait())
        .await
        .expect("killer task")
        .expect("killer exit");
    assert!(killed.success(), "kill -9 failed: {killed}");
    server.kill9().await; // reaps it (a second SIGKILL to a dead process is harmless)
    let mut sent = Vec::new();
    for t in tasks {
        sent.push(join(t).await);
    }
    let acks = acks.lock().expect("acks lock").clone();
    assert!(
        sent.iter().all(|s| *s < MAX_PER_PUBLISHER),
        "{label}: a publisher finished before the kill: {sent:?}"
    );
    eprintln!(
        "{label}: {} acknowledged of {} sent when killed",
        acks.len(),
        sent.iter().sum::<usize>()
    );

    let server = TestServer::start_with(options).await;
    for ch in CHANNELS {
        let (messages, last_page) = read_all(&server, ch).await;
        let last_seq = last_page["last_seq"].as_u64().expect("last_seq");
        assert_eq!(
            last_page["epoch"], epochs[ch],
            "{label}: {ch} got a new epoch after the crash"
        );
        let seqs: Vec<u64> = messages.iter().map(seq_of).collect();
        crate::support::assert_contiguous(
            &seqs,
            1,
            last_seq,
            &format!("{label}: {ch} after restart"),
        );
        let by_seq: HashMap<u64, &Value> = messages.iter().map(|m| (seq_of(m), m)).collect();
        let mine: Vec<&Ack> = acks.iter().filter(|a| a.channel == ch).collect();
        assert!(!mine.is_empty(), "{label}: nothing acknowledged on {ch}");
        for ack in &mine {
            let stored = by_seq.get(&ack.seq).unwrap_or_else(|| {
                panic!(
                    "{label}: acknowledged {ch} seq {} ({}) lost",
                    ack.seq, ack.id
                )
            });
            assert_eq!(
                stored["id"],
                ack.id.as_str(),
                "{label}: {ch} seq {}",
                ack.seq
            );
            assert_eq!(stored["data"], ack.data, "{label}: {ch} seq {}", ack.seq);
        }
        // Whatever else survived was really sent (an unacknowledged last publish may or may
        // not have been committed), and never twice.
        let mut ids = std::collections::HashSet::new();
        for m in &messages {
            let id = m["id"].as_str().expect("id").to_owned();
            assert!(ids.insert(id.clone()), "{label}: {ch} holds id {id} twice");
            if id == "first" {
                continue;
            }
            let (p, k) = id
                .strip_prefix('p')
                .and_then(|r| r.split_once('-'))
                .and_then(|(p, k)| Some((p.parse::<usize>().ok()?, k.parse::<usize>().ok()?)))
                .unwrap_or_else(|| panic!("{label}: unexpected id {id}"));
            assert!(
                k < sent[p],
                "{label}: {ch} holds {id}, which was never sent"
            );
            assert_eq!(m["data"]["i"], k, "{label}: {m}");
        }
        // Subscribers resuming after the restart get the recovered history from the store (the
        // hot window is empty now), then live messages: the next publish continues the
        // sequence, no seq reused or skipped.
        let since = last_seq.saturating_sub(300);
        let mut sse = server
            .sse(&format!("/api/channels/{ch}/events?since={since}"), None)
            .await;
        let mut ws = server.ws().await;
        ws.send(json!({"op": "subscribe", "channel": ch, "since": since}))
            .await;
        let subscribed = ws.recv().await;
        assert_eq!(subscribed["op"], "subscribed", "{label}: {subscribed}");
        assert_eq!(subscribed["last_seq"], last_seq, "{label}: {subscribed}");
        // The backlog arrives with nothing new published (nothing wakes the subscriber).
        for expected in since + 1..=last_seq {
            let via_sse = sse.next_message().await;
            let via_ws = ws.recv().await;
            assert_eq!(
                seq_of(&via_sse),
                expected,
                "{label}: SSE resume after restart"
            );
            assert_eq!(
                seq_of(&via_ws),
                expected,
                "{label}: WS resume after restart: {via_ws}"
            );
            let stored = by_seq[&expected];
            assert_eq!(via_sse["id"], stored["id"], "{label}: seq {expected}");
            assert_eq!(via_ws["id"], stored["id"], "{label}: seq {expected}");
        }
        let answer = publish_ok(&server, ch, json!({"data": "after restart"})).await;
        assert_eq!(answer["seq"], last_seq + 1, "{label}: {ch}: {answer}");
        assert_eq!(
            seq_of(&sse.next_message().await),
            last_seq + 1,
            "{label}: SSE live"
        );
        assert_eq!(seq_of(&ws.recv().await), last_seq + 1, "{label}: WS live");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loses_no_acknowledged_message_sync_full() {
    kill_mid_stream_then_verify(
        "[[retention]]\npattern = \"dur:*\"\nmax_messages = 1000000\n",
        "sync=full",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loses_no_acknowledged_message_sync_normal() {
    kill_mid_stream_then_verify(
        "[server]\nsync = \"normal\"\n\n[[retention]]\npattern = \"dur:*\"\nmax_messages = 1000000\n",
        "sync=normal",
    )
    .await;
}
