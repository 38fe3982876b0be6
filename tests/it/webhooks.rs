//! Webhooks (SPEC §5) through the real binary and a real receiver on loopback: registration and
//! its bad input, signatures and rotation, ordering per channel, retries, `Retry-After`,
//! `410 Gone`, exhaustion, `disable_after`, history replay, the SSRF host policy, config
//! webhooks, the CLI, metrics — and the acceptance run: 1,000 messages delivered across a
//! receiver outage and two `kill -9`s of the hub.

use std::collections::{BTreeSet, HashMap};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::process::Command;

use crate::support::{assert_error_body, binary, wait_for, ServerOptions, TestServer, WAIT};
use crate::webhook_receiver::{Delivery, Receiver, Reply};

/// `[webhook_policy]` with the given retry schedule (private destinations allowed: the
/// receiver is on loopback) and extra lines.
fn policy(retry: &[&str], extra: &str) -> String {
    let list: Vec<String> = retry.iter().map(|d| format!("{d:?}")).collect();
    format!(
        "[webhook_policy]\nretry = [{}]\nallow_private = true\n{extra}\n",
        list.join(", ")
    )
}

async fn start_with_policy(config: String) -> TestServer {
    TestServer::start_with(ServerOptions {
        config: Some(config),
        ..Default::default()
    })
    .await
}

/// Registers a webhook and returns (id, secret).
async fn register(s: &TestServer, url: &str, channels: &[&str]) -> (String, String) {
    register_with(s, json!({"url": url, "channels": channels})).await
}

async fn register_with(s: &TestServer, body: Value) -> (String, String) {
    let (status, created) = s.post("/api/webhooks", body).await;
    assert_eq!(status, 201, "{created}");
    (
        created["id"].as_str().expect("id").to_owned(),
        created["secret"].as_str().expect("secret").to_owned(),
    )
}

async fn webhook(s: &TestServer, id: &str) -> Value {
    let (status, body) = s.get(&format!("/api/webhooks/{id}")).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn wait_state(s: &TestServer, id: &str, state: &str) -> Value {
    wait_for(&format!("webhook {id} to be {state}"), || async {
        let w = webhook(s, id).await;
        (w["state"] == state).then_some(w)
    })
    .await
}

async fn attempts(s: &TestServer, id: &str) -> Vec<Value> {
    let (status, body) = s
        .get(&format!("/api/webhooks/{id}/deliveries?limit=1000"))
        .await;
    assert_eq!(status, 200, "{body}");
    body["deliveries"].as_array().expect("deliveries").clone()
}

/// Waits until the attempts log holds at least `n` entries (outcomes are recorded in batches).
async fn wait_attempts(s: &TestServer, id: &str, n: usize) -> Vec<Value> {
    wait_for(&format!("{n} logged attempts of {id}"), || async {
        let log = attempts(s, id).await;
        (log.len() >= n).then_some(log)
    })
    .await
}

async fn publish_ok(s: &TestServer, channel: &str, data: Value) -> u64 {
    let (status, body) = s.publish(channel, json!({ "data": data })).await;
    assert_eq!(status, 201, "publish to {channel}: {body}");
    body["seq"].as_u64().expect("seq")
}

/// Seqs of the 2xx-answered deliveries to `path` on `channel`, in arrival order.
fn seqs_of(all: &[Delivery], path: &str, channel: &str) -> Vec<u64> {
    all.iter()
        .filter(|d| d.path == path && (200..300).contains(&d.status) && d.channel() == channel)
        .map(Delivery::seq)
        .collect()
}

/// Checks what a webhook must satisfy on every request: JSON body, Standard Webhooks headers,
/// a valid signature, and the id made of the message's channel, epoch and seq.
fn assert_well_formed(d: &Delivery, secret: &str, epochs: &HashMap<String, String>) {
    assert_eq!(d.header("content-type"), "application/json", "{d:?}");
    assert!(d.signed_by(secret), "bad signature: {d:?}");
    let body = d.json();
    let channel = body["channel"].as_str().expect("channel");
    let expected = format!(
        "{channel}:{}:{}",
        epochs.get(channel).map(String::as_str).unwrap_or("?"),
        body["seq"]
    );
    assert_eq!(d.header("webhook-id"), expected, "{body}");
    let ts: i64 = d.header("webhook-timestamp").parse().expect("unix seconds");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((now - ts).abs() < 600, "timestamp {ts} is not now ({now})");
}

async fn epochs_of(s: &TestServer, channels: &[&str]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for c in channels {
        let info = s.channel_info(c).await;
        let epoch = match &info["epoch"] {
            Value::String(e) => e.clone(),
            other => other.to_string(),
        };
        out.insert((*c).to_owned(), epoch);
    }
    out
}

// ---- Acceptance ------------------------------------------------------------------------------

const CHANNELS: [&str; 3] = ["acc:alpha", "acc:beta", "jobs:build:7"];
const NOISE: [&str; 2] = ["accounts", "jobs:deploy:1"];

/// Publishes `per_channel` messages on each matching channel (the channels concurrently, each
/// in order) and one noise message per ten; returns the seqs acknowledged per channel.
async fn publish_round(s: &TestServer, from: usize, per_channel: usize) -> Vec<(String, u64)> {
    let tasks = CHANNELS.iter().map(|c| {
        let http = s.http.clone();
        let base = s.base.clone();
        let c = (*c).to_owned();
        async move {
            let mut acked = Vec::new();
            for i in from..from + per_channel {
                let url = format!("{base}/api/channels/{c}/messages");
                let resp = http
                    .post(&url)
                    .json(&json!({"data": {"i": i, "channel": c}}))
                    .send()
                    .await
                    .expect("publish");
                assert_eq!(resp.status(), 201);
                let body: Value = resp.json().await.expect("json");
                acked.push((c.clone(), body["seq"].as_u64().expect("seq")));
                if i % 10 == 0 {
                    let noise = NOISE[i % 2];
                    let resp = http
                        .post(format!("{base}/api/channels/{noise}/messages"))
                        .json(&json!({"data": {"noise": i}}))
                        .send()
                        .await
                        .expect("publish noise");
                    assert_eq!(resp.status(), 201);
                }
            }
            acked
        }
    });
    futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

fn unique_delivered(all: &[Delivery]) -> usize {
    all.iter()
        .filter(|d| d.path == "/hook" && (200..300).contains(&d.status))
        .map(|d| d.header("webhook-id").to_owned())
        .collect::<BTreeSet<_>>()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_arrives_signed_and_in_order_across_an_outage_and_kill_9() {
    let mut rx = Receiver::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    // Long enough that the outage below never exhausts the schedule.
    let mut retry = vec!["100ms", "200ms", "300ms", "500ms"];
    retry.extend(std::iter::repeat_n("1s", 120));
    let opts = ServerOptions {
        config: Some(policy(&retry, "")),
        data_dir: Some(dir.path().join("data")),
        ..Default::default()
    };
    let mut hub = TestServer::start_with(opts.clone()).await;
    let (id, secret) = register(&hub, &rx.url("/hook"), &["acc:*", "jobs:build:*"]).await;
    let mut acked = Vec::new();

    // 1. The receiver is up: 300 messages flow.
    acked.extend(publish_round(&hub, 0, 100).await);
    rx.wait_until("deliveries to start", |all| {
        (unique_delivered(all) >= 100).then_some(())
    })
    .await;

    // 2. The receiver goes down; 300 more are published and fail to deliver.
    rx.down().await;
    acked.extend(publish_round(&hub, 100, 100).await);
    wait_state(&hub, &id, "failing").await;

    // 3. The hub is killed while deliveries are owed, and comes back; 200 more.
    hub.kill9().await;
    hub = TestServer::start_with(opts.clone()).await;
    acked.extend(publish_round(&hub, 200, 67).await);

    // 4. The receiver comes back; 199 more, and the hub is killed again mid-delivery.
    rx.up().await;
    acked.extend(publish_round(&hub, 267, 66).await);
    assert_eq!(acked.len(), 999);
    acked.extend(publish_round_one(&hub, "acc:alpha", 333).await);
    rx.wait_until("the stream to resume after the outage", |all| {
        (unique_delivered(all) >= 700).then_some(())
    })
    .await;
    hub.kill9().await;
    hub = TestServer::start_with(opts).await;

    // 5. Everything arrives.
    assert_eq!(acked.len(), 1000);
    let all = rx
        .wait_until("all 1,000 messages", |all| {
            (unique_delivered(all) >= 1000).then(|| all.to_vec())
        })
        .await;

    let epochs = epochs_of(&hub, &CHANNELS).await;
    let mut expected: HashMap<&str, BTreeSet<u64>> = HashMap::new();
    for (c, seq) in &acked {
        let c = CHANNELS.iter().find(|x| *x == c).expect("a test channel");
        expected.entry(c).or_default().insert(*seq);
    }
    for d in &all {
        assert_eq!(d.path, "/hook");
        assert_well_formed(d, &secret, &epochs);
        assert!(
            CHANNELS.contains(&d.channel().as_str()),
            "a channel that matches no pattern was delivered: {}",
            d.channel()
        );
        let data = &d.json()["data"];
        assert_eq!(data["channel"], d.channel(), "the body is the message");
    }
    for c in CHANNELS {
        let seqs = seqs_of(&all, "/hook", c);
        // At-least-once, in order: a redelivery may repeat, but never skips ahead.
        let mut highest = 0;
        for s in &seqs {
            assert!(
                *s <= highest + 1,
                "{c}: seq {s} arrived before {} (order {seqs:?})",
                highest + 1
            );
            highest = highest.max(*s);
        }
        let got: BTreeSet<u64> = seqs.iter().copied().collect();
        let want = &expected[c];
        assert_eq!(&got, want, "{c}: the delivered set is the acknowledged set");
        assert_eq!(
            want.iter().copied().collect::<Vec<_>>(),
            (1..=want.len() as u64).collect::<Vec<_>>()
        );
    }
    let settled = wait_for("nothing pending and the webhook active", || async {
        let w = webhook(&hub, &id).await;
        (w["pending"] == 0 && w["state"] == "active").then_some(w)
    })
    .await;
    assert_eq!(settled["failed"], 0, "{settled}");
}

async fn publish_round_one(s: &TestServer, channel: &str, i: usize) -> Vec<(String, u64)> {
    let seq = publish_ok(s, channel, json!({"i": i, "channel": channel})).await;
    vec![(channel.to_owned(), seq)]
}

// ---- Registry and bad input -------------------------------------------------------------------

#[tokio::test]
async fn registration_validates_input_and_shows_the_secret_once() {
    let rx = Receiver::start().await;
    let s = start_with_policy(policy(&["1s"], "")).await;
    let url = rx.url("/hook");
    let bad: Vec<(&str, Value)> = vec![
        ("no url", json!({"channels": ["a:*"]})),
        ("no channels", json!({"url": url})),
        ("empty channels", json!({"url": url, "channels": []})),
        ("an empty pattern", json!({"url": url, "channels": [""]})),
        (
            "a pattern with a space",
            json!({"url": url, "channels": ["a b"]}),
        ),
        ("a star inside", json!({"url": url, "channels": ["a*b"]})),
        (
            "channels not a list",
            json!({"url": url, "channels": "a:*"}),
        ),
        (
            "ftp",
            json!({"url": "ftp://127.0.0.1/x", "channels": ["a:*"]}),
        ),
        (
            "javascript",
            json!({"url": "javascript:alert(1)", "channels": ["a:*"]}),
        ),
        (
            "file",
            json!({"url": "file:///etc/passwd", "channels": ["a:*"]}),
        ),
        (
            "not a URL",
            json!({"url": "not a url", "channels": ["a:*"]}),
        ),
        ("no host", json!({"url": "http://", "channels": ["a:*"]})),
        ("url a number", json!({"url": 5, "channels": ["a:*"]})),
        (
            "unknown field",
            json!({"url": url, "channels": ["a:*"], "x": 1}),
        ),
        (
            "negative since",
            json!({"url": url, "channels": ["a:*"], "since": -1}),
        ),
        (
            "since a string",
            json!({"url": url, "channels": ["a:*"], "since": "0"}),
        ),
        ("a JSON array", json!([url])),
    ];
    for (what, body) in bad {
        let (status, answer) = s.post("/api/webhooks", body).await;
        assert_eq!(status, 400, "{what}: {answer}");
        assert_error_body(&answer, what);
    }
    for raw in ["", "{", "\u{0}", "nul"] {
        let (status, answer) = s.post_raw("/api/webhooks", raw.to_owned()).await;
        assert_eq!(status, 400, "{raw:?}: {answer}");
    }
    let (status, answer) = s
        .post(
            "/api/webhooks",
            json!({"url": url, "channels": ["a:*"], "description": "x".repeat(100_000)}),
        )
        .await;
    assert!(status == 400 || status == 413, "{status} {answer}");
    let (_, list) = s.get("/api/webhooks").await;
    assert_eq!(list, json!({"webhooks": []}), "bad input changed nothing");

    // A good one: 201, the secret once.
    let (status, created) = s
        .post(
            "/api/webhooks",
            json!({"url": url, "channels": ["acc:*", "jobs:build:*"], "description": "ledger"}),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("id");
    let secret = created["secret"].as_str().expect("secret");
    assert!(secret.starts_with("whsec_"), "{secret}");
    assert!(secret.len() > 30, "{secret}");
    assert_eq!(created["url"], url);
    assert_eq!(created["channels"], json!(["acc:*", "jobs:build:*"]));
    assert_eq!(created["state"], "active");
    assert_eq!(created["description"], "ledger");
    assert!(created["created"].as_str().expect("created").ends_with('Z'));
    let got = webhook(&s, id).await;
    assert!(
        got.get("secret").is_none(),
        "the secret is shown once: {got}"
    );
    assert_eq!(got["id"], id);
    let (_, list) = s.get("/api/webhooks").await;
    let listed = list["webhooks"].as_array().expect("list");
    assert_eq!(listed.len(), 1);
    assert!(listed[0].get("secret").is_none(), "{list}");
    assert!(
        !list.to_string().contains(secret),
        "the list leaks the secret"
    );

    // Unknown ids are 404 everywhere; bad replays and limits are 400.
    for (method, path) in [
        ("GET", "/api/webhooks/wh_nope"),
        ("DELETE", "/api/webhooks/wh_nope"),
        ("POST", "/api/webhooks/wh_nope/enable"),
        ("POST", "/api/webhooks/wh_nope/disable"),
        ("POST", "/api/webhooks/wh_nope/rotate"),
        ("GET", "/api/webhooks/wh_nope/deliveries"),
    ] {
        let req = match method {
            "GET" => s.http.get(s.url(path)),
            "DELETE" => s.http.delete(s.url(path)),
            _ => s.http.post(s.url(path)),
        };
        let (status, body) = s.send(req).await;
        assert_eq!(status, 404, "{method} {path}: {body}");
    }
    let replay = format!("/api/webhooks/{id}/replay");
    for body in [
        json!({"channel": "other:x", "since": 0}),
        json!({"channel": "acc:x", "since": -3}),
        json!({"channel": "bad name", "since": 0}),
        json!({"since": 0}),
        json!({"channel": "acc:x", "since": 0, "extra": true}),
    ] {
        let (status, answer) = s.post(&replay, body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
    }
    for q in ["0", "-1", "x", "1e3"] {
        let (status, answer) = s
            .get(&format!("/api/webhooks/{id}/deliveries?limit={q}"))
            .await;
        assert_eq!(status, 400, "limit={q}: {answer}");
    }

    // Delete: gone, and nothing more is delivered.
    let (status, _) = s.delete(&format!("/api/webhooks/{id}")).await;
    assert_eq!(status, 200);
    let (status, _) = s.get(&format!("/api/webhooks/{id}")).await;
    assert_eq!(status, 404);
    publish_ok(&s, "acc:after-delete", json!(1)).await;
    // A second webhook registered afterwards gets the next message; the deleted one did not.
    let (_, _) = register(&s, &rx.url("/second"), &["acc:*"]).await;
    publish_ok(&s, "acc:after-delete", json!(2)).await;
    rx.wait_ok("/second", 1).await;
    assert!(rx.deliveries().iter().all(|d| d.path != "/hook"), "deleted");
}

#[tokio::test]
async fn admin_only_when_api_keys_are_set() {
    let rx = Receiver::start().await;
    let s = start_with_policy(format!(
        "{}[auth]\napi_keys = [\"k1\"]\npublic = [\"pub:*\"]\n",
        policy(&["1s"], "")
    ))
    .await;
    let body = json!({"url": rx.url("/hook"), "channels": ["pub:*"]});
    let (status, answer) = s.post("/api/webhooks", body.clone()).await;
    assert_eq!(status, 401, "{answer}");
    let (status, _) = s.get("/api/webhooks").await;
    assert_eq!(status, 401);
    let (status, created) = s
        .send(
            s.http
                .post(s.url("/api/webhooks"))
                .bearer_auth("k1")
                .json(&body),
        )
        .await;
    assert_eq!(status, 201, "{created}");
}

// ---- Signing ---------------------------------------------------------------------------------

#[tokio::test]
async fn rotation_signs_with_both_secrets() {
    let rx = Receiver::start().await;
    let s = start_with_policy(policy(&["1s"], "")).await;
    let (id, old) = register(&s, &rx.url("/hook"), &["acc:*"]).await;
    publish_ok(&s, "acc:r", json!("before")).await;
    let first = rx.wait_ok("/hook", 1).await;
    let epochs = epochs_of(&s, &["acc:r"]).await;
    assert_well_formed(&first[0], &old, &epochs);
    assert_eq!(
        first[0].header("webhook-signature").split(' ').count(),
        1,
        "one secret, one signature"
    );

    let (status, rotated) = s
        .post(&format!("/api/webhooks/{id}/rotate"), json!({}))
        .await;
    assert_eq!(status, 200, "{rotated}");
    let new = rotated["secret"].as_str().expect("new secret").to_owned();
    assert!(new.starts_with("whsec_") && new != old);
    assert!(webhook(&s, &id).await.get("secret").is_none());
    publish_ok(&s, "acc:r", json!("after")).await;
    let both = rx.wait_ok("/hook", 2).await;
    let d = &both[1];
    assert_eq!(d.seq(), 2);
    let sigs: Vec<&str> = d.header("webhook-signature").split(' ').collect();
    assert_eq!(
        sigs.len(),
        2,
        "both signatures during the rotation: {sigs:?}"
    );
    assert!(d.signed_by(&old), "the old secret still signs");
    assert!(d.signed_by(&new), "the new secret signs");
    // A secret that is neither does not verify (the check can fail).
    let (_, other) = register(&s, &rx.url("/other"), &["nothing:*"]).await;
    assert!(!d.signed_by(&other));
}

// ---- Failure handling ------------------------------------------------------------------------

#[tokio::test]
async fn a_failing_channel_waits_while_other_channels_and_webhooks_flow() {
    let rx = Receiver::start().await;
    let s = start_with_policy(policy(
        &["50ms", "50ms", "50ms", "50ms", "50ms", "50ms"],
        "",
    ))
    .await;
    let (a, secret) = register(&s, &rx.url("/a"), &["acc:*"]).await;
    let (_b, _) = register(&s, &rx.url("/b"), &["acc:*"]).await;
    // acc:stuck fails on /a three times, then succeeds; everything else is fine.
    let failures = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let f = failures.clone();
    rx.script(move |d: &Delivery| {
        if d.path == "/a"
            && d.channel() == "acc:stuck"
            && f.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 3
        {
            Reply::Status(500)
        } else {
            Reply::Status(204)
        }
    });
    for i in 1..=3 {
        publish_ok(&s, "acc:stuck", json!(i)).await;
        publish_ok(&s, "acc:free", json!(i)).await;
    }
    let all = rx
        .wait_until("both webhooks and channels to finish", |all| {
            let done = seqs_of(all, "/a", "acc:stuck").len() == 3
                && seqs_of(all, "/a", "acc:free").len() == 3
                && seqs_of(all, "/b", "acc:stuck").len() == 3
                && seqs_of(all, "/b", "acc:free").len() == 3;
            done.then(|| all.to_vec())
        })
        .await;
    assert_eq!(seqs_of(&all, "/a", "acc:stuck"), vec![1, 2, 3]);
    // The failed attempts were all of seq 1: later messages waited behind it.
    let stuck: Vec<(u64, u16)> = all
        .iter()
        .filter(|d| d.path == "/a" && d.channel() == "acc:stuck")
        .map(|d| (d.seq(), d.status))
        .collect();
    assert_eq!(
        stuck,
        vec![(1, 500), (1, 500), (1, 500), (1, 204), (2, 204), (3, 204)]
    );
    // The same webhook-id and a valid signature on every retry.
    let retries: BTreeSet<&str> = all
        .iter()
        .filter(|d| d.path == "/a" && d.channel() == "acc:stuck" && d.seq() == 1)
        .map(|d| {
            assert!(d.signed_by(&secret));
            d.header("webhook-id")
        })
        .collect();
    assert_eq!(retries.len(), 1, "{retries:?}");
    // acc:free on /a was not held up by acc:stuck: it finished before acc:stuck's success.
    let pos = |pred: &dyn Fn(&Delivery) -> bool| all.iter().position(pred).expect("present");
    let free_done = pos(&|d| d.path == "/a" && d.channel() == "acc:free" && d.seq() == 3);
    let stuck_ok = pos(&|d| d.path == "/a" && d.channel() == "acc:stuck" && d.status == 204);
    assert!(
        free_done < stuck_ok,
        "another channel waited on a failing one"
    );

    // The attempts log, newest first, shows the failures with their next attempt.
    let log = wait_attempts(&s, &a, 9).await;
    let failed: Vec<&Value> = log.iter().filter(|e| e["status_code"] == 500).collect();
    assert_eq!(failed.len(), 3, "{log:?}");
    for e in &failed {
        assert_eq!(e["channel"], "acc:stuck");
        assert_eq!(e["seq"], 1);
        assert!(
            e["error"].as_str().is_some_and(|t| t.contains("500")),
            "{e}"
        );
        assert!(e["next_attempt"].as_str().is_some(), "{e}");
        assert!(e["latency_ms"].is_u64(), "{e}");
        assert!(e["time"].as_str().is_some(), "{e}");
    }
    let attempt_numbers: Vec<u64> = log
        .iter()
        .filter(|e| e["channel"] == "acc:stuck" && e["seq"] == 1)
        .map(|e| e["attempt"].as_u64().expect("attempt"))
        .collect();
    assert_eq!(attempt_numbers, vec![4, 3, 2, 1], "newest first");
    let w = wait_state(&s, &a, "active").await;
    assert_eq!(w["failed"], 0);
}

#[tokio::test]
async fn a_long_backlog_on_one_channel_never_holds_up_another() {
    const BACKLOG: u64 = 1_200;
    let rx = Receiver::start().await;
    let s = start_with_policy(policy(&["1h"], "")).await;
    let (id, _) = register(&s, &rx.url("/hook"), &["slow:*", "fast:*"]).await;
    rx.script(|d: &Delivery| {
        if d.channel() == "slow:a" {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    });
    // 1,200 messages stuck behind a failing first one (in batches of 400): more than a worker
    // ever held in memory before it stopped reading (1,000), far more than a channel may now.
    for batch in 0..3 {
        let messages: Vec<Value> = (0..400)
            .map(|i| json!({"data": {"n": batch * 400 + i}}))
            .collect();
        let (status, body) = s
            .post("/api/channels/slow:a/messages", Value::Array(messages))
            .await;
        assert_eq!(status, 201, "{body}");
    }
    wait_for("the backlog to be queued", || async {
        (webhook(&s, &id).await["pending"] == BACKLOG).then_some(())
    })
    .await;
    publish_ok(&s, "fast:a", json!("go")).await;
    let ok = rx.wait_ok("/hook", 1).await;
    assert_eq!(ok[0].channel(), "fast:a");
    assert_eq!(
        rx.deliveries()
            .iter()
            .filter(|d| d.channel() == "slow:a")
            .count(),
        1,
        "slow:a waits for its retry"
    );
    // The backlog drains in order once the channel recovers (enable retries at once). Wait
    // until the hub has recorded fast:a's success: disabling while its answer is on the way
    // would (rightly, at-least-once) send it again.
    wait_for("fast:a settled", || async {
        (webhook(&s, &id).await["pending"] == BACKLOG).then_some(())
    })
    .await;
    rx.script(|_: &Delivery| Reply::Status(200));
    s.post(&format!("/api/webhooks/{id}/disable"), json!({}))
        .await;
    s.post(&format!("/api/webhooks/{id}/enable"), json!({}))
        .await;
    // Draining one channel is one request at a time: allow a slow (debug, loaded) machine.
    let all = rx
        .wait_until_within(
            "the backlog to drain",
            WAIT * 4,
            &mut |all: &[Delivery]| {
                (seqs_of(all, "/hook", "slow:a").len() as u64 >= BACKLOG).then(|| all.to_vec())
            },
        )
        .await;
    assert_eq!(
        seqs_of(&all, "/hook", "slow:a"),
        (1..=BACKLOG).collect::<Vec<u64>>()
    );
}

#[tokio::test]
async fn an_exhausted_schedule_is_recorded_as_failed_and_the_next_message_proceeds() {
    let rx = Receiver::start().await;
    let s = start_with_policy(policy(&["50ms", "50ms"], "")).await;
    let (id, _) = register(&s, &rx.url("/hook"), &["acc:*"]).await;
    rx.script(|d: &Delivery| {
        if d.seq() == 1 {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    });
    publish_ok(&s, "acc:x", json!(1)).await;
    publish_ok(&s, "acc:x", json!(2)).await;
    let ok = rx.wait_ok("/hook", 1).await;
    assert_eq!(ok[0].seq(), 2);
    let tries = rx.deliveries().iter().filter(|d| d.seq() == 1).count();
    assert_eq!(tries, 3, "one attempt and two retries");
    let w = wait_for("the failure on the webhook", || async {
        let w = webhook(&s, &id).await;
        (w["failed"] == 1).then_some(w)
    })
    .await;
    assert!(
        w["last_error"].as_str().is_some_and(|e| e.contains("503")),
        "{w}"
    );
    let log = wait_attempts(&s, &id, 4).await;
    let last = log
        .iter()
        .find(|e| e["seq"] == 1 && e["attempt"] == 3)
        .expect("the last attempt");
    assert!(
        last["next_attempt"].is_null(),
        "no attempt after the last: {last}"
    );
    let metrics = metrics(&s).await;
    assert!(
        metric_value(
            &metrics,
            "tidings_webhook_deliveries_total{result=\"exhausted\"}"
        ) >= 1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let rx = Receiver::start().await;
    let s = start_with_policy(policy(&["50ms", "50ms"], "")).await;
    register(&s, &rx.url("/hook"), &["acc:*"]).await;
    let first = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    rx.script(move |_: &Delivery| {
        if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            Reply::With(429, vec![("retry-after", "2".into())])
        } else {
            Reply::Status(200)
        }
    });
    publish_ok(&s, "acc:x", json!(1)).await;
    rx.wait_ok("/hook", 1).await;
    let all = rx.deliveries();
    assert_eq!(all.len(), 2);
    let gap = all[1].at - all[0].at;
    assert!(
        gap >= Duration::from_millis(1900),
        "the retry came {gap:?} after a Retry-After of 2 s"
    );
}

#[tokio::test]
async fn gone_disables_and_enable_resumes_where_delivery_stopped() {
    let rx = Receiver::start().await;
    let s = start_with_policy(policy(&["50ms"], "")).await;
    let (id, _) = register(&s, &rx.url("/hook"), &["acc:*"]).await;
    rx.script(|_: &Delivery| Reply::Status(410));
    publish_ok(&s, "acc:x", json!(1)).await;
    let w = wait_state(&s, &id, "disabled").await;
    assert!(
        w["disabled_reason"]
            .as_str()
            .is_some_and(|r| r.contains("410")),
        "{w}"
    );
    // While disabled, messages are kept, not sent.
    publish_ok(&s, "acc:x", json!(2)).await;
    publish_ok(&s, "acc:x", json!(3)).await;
    rx.script(|_: &Delivery| Reply::Status(200));
    let (status, enabled) = s
        .post(&format!("/api/webhooks/{id}/enable"), json!({}))
        .await;
    assert_eq!(status, 200, "{enabled}");
    let ok = rx.wait_ok("/hook", 3).await;
    assert_eq!(
        ok.iter().map(Delivery::seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(
        rx.deliveries().iter().filter(|d| d.status == 410).count(),
        1,
        "nothing was sent while disabled"
    );
    wait_for("all settled and active", || async {
        let w = webhook(&s, &id).await;
        (w["pending"] == 0 && w["state"] == "active").then_some(())
    })
    .await;

    // Disable by hand: held; enable: resumes.
    let (status, d) = s
        .post(&format!("/api/webhooks/{id}/disable"), json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(d["state"], "disabled");
    publish_ok(&s, "acc:x", json!(4)).await;
    let pending = wait_for("the message to be queued", || async {
        let w = webhook(&s, &id).await;
        (w["pending"] == 1).then_some(w)
    })
    .await;
    assert_eq!(pending["state"], "disabled");
    assert_eq!(rx.deliveries().len(), 4);
    s.post(&format!("/api/webhooks/{id}/enable"), json!({}))
        .await;
    let ok = rx.wait_ok("/hook", 4).await;
    assert_eq!(ok[3].seq(), 4);
    // The receiver records a request before the hub reads its answer: wait for the count.
    let metrics = wait_for("four successes counted", || async {
        let m = metrics(&s).await;
        (metric_value(&m, "tidings_webhook_deliveries_total{result=\"success\"}") >= 4.0)
            .then_some(m)
    })
    .await;
    assert_eq!(
        metric_value(
            &metrics,
            "tidings_webhook_deliveries_total{result=\"gone\"}"
        ),
        1.0,
        "{metrics}"
    );
    assert!(
        metric_value(&metrics, "tidings_webhook_delivery_seconds_count") >= 5.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn failing_continuously_for_disable_after_disables() {
    let rx = Receiver::start().await;
    let s = start_with_policy(policy(&["100ms"; 50], "disable_after = \"500ms\"")).await;
    let (id, _) = register(&s, &rx.url("/hook"), &["acc:*"]).await;
    rx.script(|_: &Delivery| Reply::Status(500));
    publish_ok(&s, "acc:x", json!(1)).await;
    wait_state(&s, &id, "failing").await;
    let w = wait_state(&s, &id, "disabled").await;
    assert!(
        w["disabled_reason"]
            .as_str()
            .is_some_and(|r| r.contains("disable_after")),
        "{w}"
    );
    // Disabled means no more attempts.
    let tried = rx.deliveries().len();
    assert!(tried >= 2, "{tried}");
    publish_ok(&s, "acc:x", json!(2)).await;
    wait_for("the second message queued", || async {
        (webhook(&s, &id).await["pending"] == 2).then_some(())
    })
    .await;
    assert_eq!(
        rx.deliveries().len(),
        tried,
        "a disabled webhook is not called"
    );
}

// ---- History ---------------------------------------------------------------------------------

#[tokio::test]
async fn since_replays_history_first_and_replay_resends() {
    let rx = Receiver::start().await;
    let s = start_with_policy(policy(&["50ms"], "")).await;
    for i in 1..=5 {
        publish_ok(&s, "acc:h", json!(i)).await;
    }
    publish_ok(&s, "acc:other", json!("o")).await;
    // Without since: only what comes next.
    register(&s, &rx.url("/next"), &["acc:h"]).await;
    let (id, _) = register_with(
        &s,
        json!({"url": rx.url("/all"), "channels": ["acc:*"], "since": 0}),
    )
    .await;
    let (_, _) = register_with(
        &s,
        json!({"url": rx.url("/from3"), "channels": ["acc:h"], "since": 3}),
    )
    .await;
    publish_ok(&s, "acc:h", json!(6)).await;
    let all = rx.wait_ok("/all", 7).await;
    assert_eq!(seqs_of(&all, "/all", "acc:h"), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(seqs_of(&all, "/all", "acc:other"), vec![1]);
    let from3 = rx.wait_ok("/from3", 3).await;
    assert_eq!(seqs_of(&from3, "/from3", "acc:h"), vec![4, 5, 6]);
    let next = rx.wait_ok("/next", 1).await;
    assert_eq!(seqs_of(&next, "/next", "acc:h"), vec![6]);

    let (status, queued) = s
        .post(
            &format!("/api/webhooks/{id}/replay"),
            json!({"channel": "acc:h", "since": 2}),
        )
        .await;
    assert_eq!(status, 202, "{queued}");
    assert_eq!(queued["queued"], 4);
    let all = rx.wait_ok("/all", 11).await;
    assert_eq!(
        seqs_of(&all, "/all", "acc:h"),
        vec![1, 2, 3, 4, 5, 6, 3, 4, 5, 6]
    );
    assert_eq!(
        rx.deliveries().iter().filter(|d| d.path == "/next").count(),
        1
    );
}

// ---- Safety ----------------------------------------------------------------------------------

#[tokio::test]
async fn redirects_slow_receivers_and_huge_answers_are_failures_that_harm_nothing() {
    let rx = Receiver::start().await;
    let s = start_with_policy(policy(&["1h"], "timeout = \"300ms\"")).await;
    let target = rx.url("/target");
    let (redirect, _) = register(&s, &rx.url("/redirect"), &["r:*"]).await;
    let (slow, _) = register(&s, &rx.url("/slow"), &["s:*"]).await;
    let (big, _) = register(&s, &rx.url("/big"), &["b:*"]).await;
    let (fine, _) = register(&s, &rx.url("/fine"), &["r:*", "s:*", "b:*"]).await;
    rx.script(move |d: &Delivery| match d.path.as_str() {
        "/redirect" => Reply::With(307, vec![("location", target.clone())]),
        "/slow" => Reply::Slow(Duration::from_secs(30)),
        "/big" => Reply::Big(500, 20 << 20),
        _ => Reply::Status(200),
    });
    publish_ok(&s, "r:1", json!(1)).await;
    publish_ok(&s, "s:1", json!(1)).await;
    publish_ok(&s, "b:1", json!(1)).await;
    rx.wait_ok("/fine", 3).await;
    for (id, needle) in [(&redirect, "redirect"), (&slow, "timed out"), (&big, "500")] {
        let w = wait_state(&s, id, "failing").await;
        let log = wait_attempts(&s, id, 1).await;
        assert_eq!(log.len(), 1, "{log:?}");
        let error = log[0]["error"].as_str().expect("an error");
        assert!(error.contains(needle), "{id}: {error}");
        assert!(error.len() <= 1_000, "the answer is not stored whole");
        assert!(!log[0]["next_attempt"].is_null());
        assert_eq!(w["pending"], 1, "{w}");
    }
    let log = attempts(&s, &redirect).await;
    assert_eq!(log[0]["status_code"], 307);
    assert!(
        rx.deliveries().iter().all(|d| d.path != "/target"),
        "a redirect was followed"
    );
    let log = attempts(&s, &slow).await;
    assert!(log[0]["status_code"].is_null(), "{log:?}");
    assert!(log[0]["latency_ms"].as_u64().expect("latency") < 10_000);
    let fine_w = webhook(&s, &fine).await;
    assert_eq!(fine_w["state"], "active");
    // The hub still answers.
    publish_ok(&s, "r:1", json!(2)).await;
    rx.wait_ok("/fine", 4).await;
}

#[tokio::test]
async fn private_destinations_are_refused_unless_allowed() {
    let rx = Receiver::start().await;
    let port = rx.addr.port();
    let s = start_with_policy(
        "[webhook_policy]\nallow_private = false\nallow_hosts = [\"127.0.0.2\"]\n\
         deny_hosts = [\"*.blocked.test\"]\n"
            .to_owned(),
    )
    .await;
    for url in [
        format!("http://127.0.0.1:{port}/hook"),
        format!("http://localhost:{port}/hook"),
        format!("http://[::1]:{port}/hook"),
        "http://10.1.2.3/hook".to_owned(),
        "http://169.254.169.254/latest/meta-data".to_owned(),
        "http://192.168.0.1/".to_owned(),
        "http://0.0.0.0/".to_owned(),
        "http://[::ffff:127.0.0.1]/".to_owned(),
        "http://x.blocked.test/".to_owned(),
    ] {
        let (status, answer) = s
            .post("/api/webhooks", json!({"url": url, "channels": ["a:*"]}))
            .await;
        assert_eq!(status, 400, "{url}: {answer}");
        assert_error_body(&answer, &url);
    }
    let (_, list) = s.get("/api/webhooks").await;
    assert_eq!(list["webhooks"], json!([]));
    // An allowed host is accepted (127.0.0.2 is loopback too; nothing listens there).
    let (status, created) = s
        .post(
            "/api/webhooks",
            json!({"url": format!("http://127.0.0.2:{port}/hook"), "channels": ["a:*"]}),
        )
        .await;
    assert_eq!(status, 201, "{created}");
}

#[tokio::test]
async fn deny_hosts_wins_over_allow_private() {
    let rx = Receiver::start().await;
    let port = rx.addr.port();
    let s = start_with_policy(
        "[webhook_policy]\nallow_private = true\ndeny_hosts = [\"127.0.0.0/8\"]\n".to_owned(),
    )
    .await;
    let (status, answer) = s
        .post(
            "/api/webhooks",
            json!({"url": format!("http://127.0.0.1:{port}/hook"), "channels": ["a:*"]}),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = s
        .post(
            "/api/webhooks",
            json!({"url": format!("http://localhost:{port}/hook"), "channels": ["a:*"]}),
        )
        .await;
    assert_eq!(
        status, 400,
        "a name that resolves to a denied address: {answer}"
    );
}

// ---- Config, persistence, CLI -----------------------------------------------------------------

#[tokio::test]
async fn config_webhooks_are_delivered_protected_and_kept_across_restarts() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let config = format!(
        "{}[[webhooks]]\nurl = \"{}\"\nchannels = [\"orders:*\"]\nsecret = \"{secret}\"\n\
         description = \"from the file\"\n",
        policy(&["1h"], ""),
        rx.url("/cfg")
    );
    let opts = ServerOptions {
        config: Some(config),
        data_dir: Some(dir.path().join("data")),
        ..Default::default()
    };
    let mut s = TestServer::start_with(opts.clone()).await;
    let (_, list) = s.get("/api/webhooks").await;
    let hooks = list["webhooks"].as_array().expect("list").clone();
    assert_eq!(hooks.len(), 1, "{list}");
    let id = hooks[0]["id"].as_str().expect("id").to_owned();
    assert_eq!(hooks[0]["source"], "config");
    assert_eq!(hooks[0]["description"], "from the file");
    publish_ok(&s, "orders:1", json!({"total": 3})).await;
    let got = rx.wait_ok("/cfg", 1).await;
    assert!(
        got[0].signed_by(secret),
        "signed with the configured secret"
    );
    let (status, answer) = s.delete(&format!("/api/webhooks/{id}")).await;
    assert_eq!(status, 409, "{answer}");
    let (status, answer) = s
        .post(&format!("/api/webhooks/{id}/rotate"), json!({}))
        .await;
    assert_eq!(
        status, 409,
        "a configured secret cannot be rotated: {answer}"
    );

    // An API webhook persists too; while the receiver fails, a message stays pending.
    let (api_id, _) = register(&s, &rx.url("/api"), &["orders:*"]).await;
    rx.script(|d: &Delivery| {
        if d.path == "/api" {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    });
    publish_ok(&s, "orders:1", json!({"total": 4})).await;
    rx.wait_ok("/cfg", 2).await;
    wait_state(&s, &api_id, "failing").await;
    s.terminate().await;

    rx.script(|_: &Delivery| Reply::Status(200));
    let s = TestServer::start_with(opts).await;
    let (_, list) = s.get("/api/webhooks").await;
    let mut ids: Vec<String> = list["webhooks"]
        .as_array()
        .expect("list")
        .iter()
        .map(|w| w["id"].as_str().expect("id").to_owned())
        .collect();
    ids.sort();
    let mut want = vec![id.clone(), api_id.clone()];
    want.sort();
    assert_eq!(ids, want, "the same ids after a restart");
    // The pending delivery of the API webhook survived the restart; its retry is 1 h away,
    // and re-enabling (the receiver is fixed) tries it at once.
    let w = webhook(&s, &api_id).await;
    assert_eq!(w["pending"], 1, "{w}");
    s.post(&format!("/api/webhooks/{api_id}/disable"), json!({}))
        .await;
    s.post(&format!("/api/webhooks/{api_id}/enable"), json!({}))
        .await;
    let api = rx.wait_ok("/api", 1).await;
    assert_eq!(api[0].json()["data"]["total"], 4);
    assert_eq!(
        rx.deliveries().iter().filter(|d| d.path == "/cfg").count(),
        2
    );
}

fn tidings_cli(server: &TestServer) -> Command {
    let mut cmd = Command::new(binary());
    for (k, _) in std::env::vars() {
        if k.starts_with("TIDINGS") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "warn")
        .arg("--server")
        .arg(&server.base)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn cli(server: &TestServer, args: &[&str]) -> std::process::Output {
    let mut cmd = tidings_cli(server);
    cmd.args(args);
    tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("the CLI finished in time")
        .expect("run the CLI")
}

#[tokio::test]
async fn the_cli_adds_lists_and_removes_webhooks() {
    let rx = Receiver::start().await;
    let s = start_with_policy(policy(&["1s"], "")).await;
    let url = rx.url("/cli");
    let out = cli(
        &s,
        &[
            "webhooks",
            "add",
            &url,
            "--channel",
            "acc:*",
            "--channel",
            "jobs:build:*",
            "--description",
            "from the CLI",
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: Value = serde_json::from_str(stdout.trim()).expect("JSON");
    let id = created["id"].as_str().expect("id").to_owned();
    let secret = created["secret"].as_str().expect("secret").to_owned();
    assert_eq!(created["channels"], json!(["acc:*", "jobs:build:*"]));
    publish_ok(&s, "jobs:build:1", json!("x")).await;
    let got = rx.wait_ok("/cli", 1).await;
    assert!(got[0].signed_by(&secret));

    let out = cli(&s, &["webhooks", "list"]).await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&id) && text.contains(&url), "{text}");
    assert!(!text.contains(&secret), "list shows no secret");

    // Bad input: a clear error, a failing exit, nothing registered.
    let out = cli(&s, &["webhooks", "add", "ftp://x/", "--channel", "a:*"]).await;
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).trim().is_empty());
    let out = cli(&s, &["webhooks", "add", &url]).await;
    assert!(!out.status.success(), "--channel is required");
    let out = cli(&s, &["webhooks", "rm", "wh_nope"]).await;
    assert!(!out.status.success());
    let (_, list) = s.get("/api/webhooks").await;
    assert_eq!(list["webhooks"].as_array().expect("list").len(), 1);

    let out = cli(&s, &["webhooks", "rm", &id]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, list) = s.get("/api/webhooks").await;
    assert_eq!(list["webhooks"], json!([]));
}

// ---- Metrics ---------------------------------------------------------------------------------

async fn metrics(s: &TestServer) -> String {
    s.http
        .get(s.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|rest| rest.trim().split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
