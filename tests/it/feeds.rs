//! The feed poller through the real binary (§3 feeds API and CLI, §4 "A feed poll", §7): feeds
//! served by a local feed server (`feed_server`) on loopback, polled every second.

use std::collections::{BTreeSet, HashSet};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::feed_server::{
    compressed_entries, minutes_after_origin, questions, Entry, FeedServer, LATIN1_TITLES,
};
use crate::support::{assert_error_body, binary, wait_for, ServerOptions, TestServer, WAIT};

// ---- Helpers --------------------------------------------------------------------------------

/// `[[feeds]]` tables polled every second, after `extra` (e.g. a `[limits]` section).
fn config(extra: &str, feeds: &[(&str, String)]) -> String {
    let mut toml = format!("{extra}\n");
    for (name, url) in feeds {
        toml.push_str(&format!(
            "[[feeds]]\nname = \"{name}\"\nurl = \"{url}\"\nevery = \"1s\"\n\n"
        ));
    }
    toml
}

async fn start(toml: String) -> TestServer {
    TestServer::start_with(ServerOptions {
        config: Some(toml),
        ..Default::default()
    })
    .await
}

async fn feed_list(server: &TestServer) -> Vec<Value> {
    let (status, body) = server.get("/api/feeds").await;
    assert_eq!(status, 200, "GET /api/feeds: {body}");
    body["feeds"]
        .as_array()
        .unwrap_or_else(|| panic!("no feeds list in {body}"))
        .clone()
}

async fn feed(server: &TestServer, name: &str) -> Value {
    feed_list(server)
        .await
        .into_iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("feed {name} is not listed"))
}

/// Waits until feed `name` satisfies `check`; returns its object.
async fn wait_feed(
    server: &TestServer,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    let found = tokio::time::timeout(WAIT, async {
        loop {
            let f = feed(server, name).await;
            if check(&f) {
                return f;
            }
            last = f;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("timed out waiting for feed {name} to be {what}; last: {last}"))
}

/// Every message of `channel`, oldest first.
async fn messages(server: &TestServer, channel: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut since = 0;
    loop {
        let (status, body) = server
            .get(&format!(
                "/api/channels/{channel}/messages?since={since}&limit=1000"
            ))
            .await;
        assert_eq!(status, 200, "read {channel}: {body}");
        let page = body["messages"].as_array().expect("messages").clone();
        if page.is_empty() {
            return all;
        }
        since = page.last().unwrap()["seq"].as_u64().expect("seq");
        all.extend(page);
    }
}

/// Waits until `channel` holds at least `n` messages; returns them all.
async fn wait_messages(server: &TestServer, channel: &str, n: u64) -> Vec<Value> {
    wait_for(&format!("{n} message(s) on {channel}"), || async {
        (server.last_seq(channel).await >= n).then_some(())
    })
    .await;
    messages(server, channel).await
}

fn titles(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .map(|m| {
            m["data"]["title"]
                .as_str()
                .unwrap_or("<no title>")
                .to_owned()
        })
        .collect()
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Unix milliseconds of an RFC 3339 time, asserting it is UTC.
fn utc_ms(value: &Value, what: &str) -> i64 {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: expected an RFC 3339 string, got {value}"));
    assert!(
        text.ends_with('Z') || text.ends_with("+00:00"),
        "{what}: {text} is not UTC"
    );
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{what}: {text} is not RFC 3339: {e}"));
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Asserts a message is a well-formed `entry` of feed `feed` and returns its `data`.
fn entry_data<'a>(msg: &'a Value, channel: &str, feed: &str) -> &'a Value {
    assert_eq!(msg["channel"], channel, "{msg}");
    assert_eq!(msg["event"], "entry", "{msg}");
    let id = msg["id"].as_str().expect("message id");
    assert!(
        id.len() == 64
            && id
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
        "message id {id} is not lowercase hex SHA-256"
    );
    let data = &msg["data"];
    let keys: BTreeSet<&str> = data
        .as_object()
        .unwrap_or_else(|| panic!("data is not an object: {msg}"))
        .keys()
        .map(String::as_str)
        .collect();
    let expected: BTreeSet<&str> = [
        "id",
        "title",
        "link",
        "author",
        "published",
        "updated",
        "summary",
        "categories",
        "feed",
    ]
    .into_iter()
    .collect();
    assert_eq!(keys, expected, "data keys of {msg}");
    assert_eq!(data["feed"], feed, "{msg}");
    assert!(data["categories"].is_array(), "categories: {msg}");
    assert!(
        data["categories"]
            .as_array()
            .unwrap()
            .iter()
            .all(Value::is_string),
        "categories are strings: {msg}"
    );
    for field in ["published", "updated"] {
        if !data[field].is_null() {
            utc_ms(&data[field], field);
        }
    }
    data
}

/// Asserts the data of an entry the feed server wrote from `e`.
fn assert_entry(data: &Value, e: &Entry, link: &str) {
    assert_eq!(data["id"], e.id.as_str(), "id of {data}");
    assert_eq!(data["title"], e.title.as_str(), "title of {data}");
    assert_eq!(data["link"], link, "link of {data}");
    assert_eq!(data["author"], e.author.as_str(), "author of {data}");
    assert_eq!(data["summary"], e.summary.as_str(), "summary of {data}");
    assert_eq!(
        data["categories"],
        json!(e.categories),
        "categories of {data}"
    );
    let expect = |s: &str| {
        let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .expect("test time");
        (t.unix_timestamp_nanos() / 1_000_000) as i64
    };
    assert_eq!(
        utc_ms(&data["published"], "published"),
        expect(&e.published),
        "published of {data}"
    );
    assert_eq!(
        utc_ms(&data["updated"], "updated"),
        expect(&e.updated),
        "updated of {data}"
    );
}

/// A port nothing listens on (bound, then released).
async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// The `tidings` binary as a client, with no `TIDINGS*` variables inherited.
async fn cli(args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(binary());
    for (k, _) in std::env::vars() {
        if k.starts_with("TIDINGS") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("the command finished in time")
        .expect("run tidings")
}

fn cli_json(out: &Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{what}: stdout is not JSON ({e}): {text:?}"))
}

// ---- 1. First poll --------------------------------------------------------------------------

#[tokio::test]
async fn first_poll_publishes_the_entries_present_oldest_first() {
    let feeds = FeedServer::start().await;
    let at = |s: &str| s.to_owned();
    let entry = |n: u32, published: &str, updated: &str, link: &str, title: &str| Entry {
        id: format!("https://qa.example/q/10{n}"),
        title: title.to_owned(),
        author: format!("asker {n}"),
        link: link.to_owned(),
        published: at(published),
        updated: at(updated),
        summary: format!("<p>Question body {n} &amp; <code>code</code></p>"),
        categories: vec!["rust".into(), format!("tag-{n}")],
    };
    let e1 = entry(
        1,
        "2024-03-01T10:00:00Z",
        "2024-03-01T10:00:00Z",
        "https://qa.example/questions/101/first",
        "How do I read a feed?",
    );
    // 10:10Z, written with an offset: as text it sorts after 10:20Z.
    let e2 = entry(
        2,
        "2024-03-01T11:10:00+01:00",
        "2024-03-01T11:15:00+01:00",
        "https://qa.example/questions/102/second",
        "Why is \"a < b\" false & what does <b> do?",
    );
    let e3 = entry(
        3,
        "2024-03-01T10:20:00Z",
        "2024-03-01T10:21:00Z",
        "https://qa.example/questions/103/third",
        "Ünïcödé in titles — does it survive?",
    );
    // A relative link: published absolute, against the feed's URL.
    let e4 = entry(
        4,
        "2024-03-01T12:30:00+02:00",
        "2024-03-01T10:45:00Z",
        "/questions/104/relative",
        "A question with a relative link",
    );
    // Not in time order in the document: oldest first means by time.
    feeds.set_entries("qa", vec![e3.clone(), e4.clone(), e1.clone(), e2.clone()]);
    let server = start(config("", &[("qa", feeds.url("/atom/qa"))])).await;

    let msgs = wait_messages(&server, "feeds:qa", 4).await;
    assert_eq!(msgs.len(), 4, "exactly the entries present: {msgs:?}");
    let expected = [
        (&e1, e1.link.clone()),
        (&e2, e2.link.clone()),
        (&e3, e3.link.clone()),
        (&e4, feeds.url("/questions/104/relative")),
    ];
    for (i, (msg, (e, link))) in msgs.iter().zip(expected.iter()).enumerate() {
        assert_eq!(msg["seq"], i as u64 + 1, "{msg}");
        let data = entry_data(msg, "feeds:qa", "qa");
        assert_entry(data, e, link);
    }
    // Times normalised to UTC.
    assert_eq!(
        utc_ms(&msgs[1]["data"]["published"], "published"),
        utc_ms(&json!("2024-03-01T10:10:00Z"), "expected")
    );
    let ids: HashSet<&str> = msgs.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 4, "distinct message ids");

    let f = wait_feed(&server, "qa", "ok", |f| f["status"] == "ok").await;
    assert_eq!(f["entries_seen"], 4, "{f}");
    // The poller announces itself and accepts compressed bodies and feed types.
    let first = &feeds.requests("/atom/qa")[0];
    let ua = first.header("user-agent").unwrap_or_default();
    assert!(ua.contains("Tidings"), "user-agent {ua:?}");
    let accept = first.header("accept").unwrap_or_default();
    assert!(accept.contains("application/atom+xml"), "accept {accept:?}");
    let encodings = first.header("accept-encoding").unwrap_or_default();
    for enc in ["gzip", "deflate", "br"] {
        assert!(encodings.contains(enc), "accept-encoding {encodings:?}");
    }
}

/// SPEC §4: the message `id` is the SHA-256 (hex) of the entry's guid/id, else of its link.
#[tokio::test]
async fn entry_message_id_is_the_sha256_of_the_entry_id_else_its_link() {
    let feeds = FeedServer::start().await;
    let with_id = Entry::question(1);
    let mut without_id = Entry::question(2);
    without_id.id = String::new();
    feeds.set_entries("ids", vec![without_id.clone(), with_id.clone()]);
    let server = start(config("", &[("ids", feeds.url("/atom/ids"))])).await;
    let msgs = wait_messages(&server, "feeds:ids", 2).await;
    assert_eq!(msgs[0]["data"]["id"], with_id.id.as_str());
    assert_eq!(msgs[1]["data"]["id"], Value::Null, "an entry without id");
    assert_eq!(
        msgs[0]["id"],
        sha256_hex(&with_id.id),
        "message id of the entry with id {:?}",
        with_id.id
    );
    assert_eq!(
        msgs[1]["id"],
        sha256_hex(&without_id.link),
        "message id of the entry with only a link {:?}",
        without_id.link
    );
}

// ---- 2. Sliding window and conditional GET ---------------------------------------------------

#[tokio::test]
async fn sliding_window_publishes_each_entry_once_and_polls_conditionally() {
    let feeds = FeedServer::start().await;
    feeds.set_entries("slide", questions(1..=3));
    // A second feed that only sends Last-Modified: the poller must use If-Modified-Since.
    feeds.set_entries("lm", questions(1..=2));
    feeds.set_validators("lm", false, true);
    let server = start(config(
        "",
        &[
            ("slide", feeds.url("/atom/slide")),
            ("lm", feeds.url("/atom/lm")),
        ],
    ))
    .await;

    let msgs = wait_messages(&server, "feeds:slide", 3).await;
    assert_eq!(
        titles(&msgs),
        titles_of(&[1, 2, 3]),
        "first poll, oldest first"
    );

    // q1 drops off; q4 and q5 are new.
    let mut window = questions(2..=5);
    feeds.set_entries("slide", window.clone());
    let msgs = wait_messages(&server, "feeds:slide", 5).await;
    assert_eq!(titles(&msgs), titles_of(&[1, 2, 3, 4, 5]));

    // q1 comes back, q3 is edited (same id, new title), q6 is new.
    window.insert(0, Entry::question(6));
    window.push(Entry::question(1));
    for e in window.iter_mut().filter(|e| e.id.ends_with("/q/3")) {
        e.title = "Question 3 (edited): why does my poller miss entries?".into();
        e.updated = minutes_after_origin(100);
    }
    feeds.set_entries("slide", window.clone());
    let v3 = feeds.version("slide");
    wait_messages(&server, "feeds:slide", 6).await;
    // Once the poll that fetched this version is fully handled, nothing else was published.
    let (served, _next) = feeds.wait_version_handled("/atom/slide", v3).await;
    assert_eq!(served.status, 200);
    let msgs = messages(&server, "feeds:slide").await;
    assert_eq!(
        titles(&msgs),
        titles_of(&[1, 2, 3, 4, 5, 6]),
        "a returning or edited entry is not published again"
    );
    let data_ids: Vec<&str> = msgs
        .iter()
        .map(|m| m["data"]["id"].as_str().unwrap())
        .collect();
    let distinct: HashSet<&&str> = data_ids.iter().collect();
    assert_eq!(distinct.len(), 6, "each entry once: {data_ids:?}");
    let f = feed(&server, "slide").await;
    assert_eq!(f["entries_seen"], 6, "{f}");

    // No change: the next poll is conditional and answered 304.
    let etag = feeds.etag("slide");
    let last_modified = feeds.last_modified("slide");
    let not_modified = wait_for("a 304 on /atom/slide", || async {
        feeds
            .requests("/atom/slide")
            .into_iter()
            .find(|r| r.version == Some(v3) && r.status == 304)
    })
    .await;
    assert_eq!(not_modified.header("if-none-match"), Some(etag.as_str()));
    assert_eq!(
        not_modified.header("if-modified-since"),
        Some(last_modified.as_str())
    );
    let f = wait_feed(&server, "slide", "answered 304", |f| {
        f["http_status"] == 304
    })
    .await;
    assert_eq!(f["status"], "ok", "{f}");
    assert_eq!(f["error"], Value::Null, "{f}");
    assert_eq!(f["entries_seen"], 6, "{f}");
    assert_eq!(server.last_seq("feeds:slide").await, 6);

    // Last-Modified alone.
    let lm = wait_for("a 304 on /atom/lm", || async {
        feeds
            .requests("/atom/lm")
            .into_iter()
            .find(|r| r.status == 304)
    })
    .await;
    assert_eq!(
        lm.header("if-modified-since"),
        Some(feeds.last_modified("lm").as_str())
    );
    assert_eq!(lm.header("if-none-match"), None, "no ETag was ever sent");
    assert_eq!(server.last_seq("feeds:lm").await, 2);
}

fn titles_of(ns: &[u32]) -> Vec<String> {
    ns.iter().map(|&n| Entry::question(n).title).collect()
}

// ---- 3. Restart ----------------------------------------------------------------------------

#[tokio::test]
async fn restart_remembers_published_entries_and_poll_state() {
    let feeds = FeedServer::start().await;
    feeds.set_entries("so", questions(1..=3));
    let old_etag = feeds.etag("so");
    let dir = tempfile::tempdir().unwrap();
    let opts = ServerOptions {
        config: Some(config("", &[("so", feeds.url("/atom/so"))])),
        data_dir: Some(dir.path().join("data")),
        ..Default::default()
    };
    let mut server = TestServer::start_with(opts.clone()).await;
    wait_messages(&server, "feeds:so", 3).await;
    wait_feed(&server, "so", "ok with 3 entries", |f| {
        f["status"] == "ok" && f["entries_seen"] == 3
    })
    .await;
    assert!(server.terminate().await.success(), "clean exit on SIGTERM");
    let before = feeds.requests("/atom/so").len();

    // While it was down: q4 appeared; q1..q3 are all still there. The body changes, so the
    // next poll gets a 200 with every entry in it.
    feeds.set_entries("so", questions(1..=4));
    let server = TestServer::start_with(opts).await;
    let f = feed(&server, "so").await;
    assert!(
        f["entries_seen"].as_u64().unwrap() >= 3,
        "entries_seen survives the restart: {f}"
    );
    let msgs = wait_messages(&server, "feeds:so", 4).await;
    let (served, _) = feeds
        .wait_version_handled("/atom/so", feeds.version("so"))
        .await;
    assert_eq!(served.status, 200);
    let first_after = &feeds.requests("/atom/so")[before];
    assert_eq!(
        first_after.header("if-none-match"),
        Some(old_etag.as_str()),
        "the validators survive the restart"
    );
    let msgs_now = messages(&server, "feeds:so").await;
    assert_eq!(
        titles(&msgs_now),
        titles_of(&[1, 2, 3, 4]),
        "only the new entry after the restart"
    );
    assert_eq!(msgs_now.len(), msgs.len());
    let f = feed(&server, "so").await;
    assert_eq!(f["entries_seen"], 4, "{f}");

    // The feed's own memory, without the channel's: drop the channel's history and dedupe
    // keys, then only a new entry may appear.
    let (status, body) = server.delete("/api/channels/feeds:so").await;
    assert_eq!(status, 200, "{body}");
    feeds.set_entries("so", questions(1..=5));
    let v = feeds.version("so");
    wait_messages(&server, "feeds:so", 1).await;
    feeds.wait_version_handled("/atom/so", v).await;
    let msgs = messages(&server, "feeds:so").await;
    assert_eq!(
        titles(&msgs),
        titles_of(&[5]),
        "entries remembered by the feed are not published again"
    );
    assert_eq!(feed(&server, "so").await["entries_seen"], 5);
}

/// An entry is remembered while it is in the feed, even when the feed answers 304 for longer
/// than `dedupe_window` (nothing was re-parsed, but the entries are still there).
#[tokio::test]
async fn an_unchanged_feed_remembers_its_entries_beyond_the_dedupe_window() {
    let feeds = FeedServer::start().await;
    feeds.set_entries("quiet", questions(1..=2));
    let server = start(config(
        "[limits]\ndedupe_window = \"2s\"\n",
        &[("quiet", feeds.url("/atom/quiet"))],
    ))
    .await;
    wait_messages(&server, "feeds:quiet", 2).await;
    // Unchanged for more than the window: only 304s.
    wait_for("four 304s", || async {
        let hits = feeds.requests("/atom/quiet");
        let not_modified: Vec<_> = hits.iter().filter(|r| r.status == 304).collect();
        (not_modified.len() >= 4
            && not_modified.last().unwrap().at - hits[0].at > Duration::from_secs(3))
        .then_some(())
    })
    .await;
    feeds.set_entries("quiet", questions(1..=3));
    let v = feeds.version("quiet");
    wait_messages(&server, "feeds:quiet", 3).await;
    feeds.wait_version_handled("/atom/quiet", v).await;
    assert_eq!(
        titles(&messages(&server, "feeds:quiet").await),
        titles_of(&[1, 2, 3]),
        "entries still in the feed are not published again"
    );
}

// ---- 4. The feed object ----------------------------------------------------------------------

#[tokio::test]
async fn feed_objects_report_good_and_bad_polls() {
    let feeds = FeedServer::start().await;
    feeds.set_entries("state", questions(1..=2));
    let url = feeds.url("/atom/state");
    let server = start(config(
        "",
        &[
            ("state", url.clone()),
            ("ttl", feeds.url("/ttl")),
            ("maxage", feeds.url("/max-age")),
        ],
    ))
    .await;

    let f = wait_feed(&server, "state", "ok", |f| f["status"] == "ok").await;
    let fields: BTreeSet<&str> = f.as_object().unwrap().keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = [
        "name",
        "url",
        "every",
        "channel",
        "source",
        "status",
        "last_poll",
        "next_poll",
        "http_status",
        "error",
        "entries_seen",
        "consecutive_errors",
    ]
    .into_iter()
    .collect();
    assert_eq!(fields, expected, "{f}");
    assert_eq!(f["name"], "state");
    assert_eq!(f["url"], url.as_str());
    assert_eq!(f["every"], "1s");
    assert_eq!(f["channel"], "feeds:state");
    assert_eq!(f["source"], "config");
    assert_eq!(f["http_status"], 200);
    assert_eq!(f["error"], Value::Null);
    assert_eq!(f["entries_seen"], 2);
    assert_eq!(f["consecutive_errors"], 0);
    let last = utc_ms(&f["last_poll"], "last_poll");
    let next = utc_ms(&f["next_poll"], "next_poll");
    assert!(last <= now_ms() + 5, "last_poll in the past: {f}");
    assert!(
        next >= last + 1000 && next <= last + 1000 + 10_000,
        "next_poll about `every` after last_poll: {f}"
    );

    // A failing poll.
    feeds.set_failure("state", Some(500));
    let f = wait_feed(&server, "state", "failing", |f| f["status"] == "error").await;
    assert_eq!(f["http_status"], 500, "{f}");
    let error = f["error"].as_str().expect("an error message");
    assert!(error.contains("500"), "error names the status: {error}");
    assert_eq!(f["consecutive_errors"], 1, "{f}");
    assert_eq!(f["entries_seen"], 2, "{f}");
    let failed_at = utc_ms(&f["last_poll"], "last_poll");
    assert!(failed_at > last, "last_poll moved on: {f}");
    let next = utc_ms(&f["next_poll"], "next_poll");
    assert!(
        next - failed_at >= 2000,
        "the first error backs off to twice `every`: {f}"
    );

    // Recovery resets the error state; nothing changed, so the answer is a 304.
    feeds.set_failure("state", None);
    let f = wait_feed(&server, "state", "recovered", |f| f["status"] == "ok").await;
    assert_eq!(f["consecutive_errors"], 0, "{f}");
    assert_eq!(f["error"], Value::Null, "{f}");
    assert_eq!(f["http_status"], 304, "{f}");
    assert_eq!(f["entries_seen"], 2, "{f}");

    // The feed's <ttl> (minutes) and Cache-Control max-age stretch the interval.
    for (name, at_least) in [("ttl", 60_000), ("maxage", 120_000)] {
        let f = wait_feed(&server, name, "ok", |f| f["status"] == "ok").await;
        let gap = utc_ms(&f["next_poll"], "next_poll") - utc_ms(&f["last_poll"], "last_poll");
        assert!(
            (at_least..at_least + 10_000).contains(&gap),
            "{name}: next poll {gap} ms after the last, expected about {at_least}: {f}"
        );
    }

    let metrics = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for result in ["ok", "error"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("tidings_feed_polls_total")
                    && l.contains("feed=\"state\"")
                    && l.contains(&format!("result=\"{result}\""))),
            "tidings_feed_polls_total for result {result} in:\n{metrics}"
        );
    }
}

// ---- 5. Broken feeds ---------------------------------------------------------------------------

#[tokio::test]
async fn broken_feeds_are_recorded_as_errors_and_never_stall_the_others() {
    let feeds = FeedServer::start().await;
    feeds.set_entries("good", questions(1..=2));
    let refused = format!("http://127.0.0.1:{}/feed", closed_port().await);
    let broken: Vec<(&str, String)> = vec![
        ("garbage", feeds.url("/garbage")),
        ("html", feeds.url("/html")),
        ("empty", feeds.url("/empty")),
        ("huge", feeds.url("/huge")),
        ("huge-declared", feeds.url("/huge-declared")),
        ("gzip-bomb", feeds.url("/gzip-bomb")),
        ("slow", feeds.url("/slow")),
        ("loop", feeds.url("/loop/a")),
        ("chain6", feeds.url("/chain/6")),
        ("s500", feeds.url("/status/500")),
        ("s429", feeds.url("/status/429")),
        ("s404", feeds.url("/status/404")),
        ("retrydate", feeds.url("/retry-date")),
        ("refused", refused),
    ];
    let fine: Vec<(&str, String)> = vec![
        ("good", feeds.url("/atom/good")),
        ("chain3", feeds.url("/chain/3")),
        ("chain5", feeds.url("/chain/5")),
    ];
    let all: Vec<(&str, String)> = broken.iter().chain(fine.iter()).cloned().collect();
    let mut server = start(config("[limits]\nfeed_timeout = \"2s\"\n", &all)).await;

    // The good feed keeps publishing while the others fail.
    wait_messages(&server, "feeds:good", 2).await;
    feeds.set_entries("good", questions(1..=3));
    wait_messages(&server, "feeds:good", 3).await;

    // Every broken feed: an error, never a crash; each retries with a growing delay.
    for (name, _) in &broken {
        let f = wait_feed(&server, name, "failing twice", |f| {
            f["status"] == "error" && f["consecutive_errors"].as_u64().unwrap_or(0) >= 2
        })
        .await;
        let error = f["error"].as_str().unwrap_or_default();
        assert!(!error.is_empty(), "{name}: an error message: {f}");
        assert_eq!(f["entries_seen"], 0, "{name}: {f}");
        let k = f["consecutive_errors"].as_u64().unwrap();
        let gap = utc_ms(&f["next_poll"], "next_poll") - utc_ms(&f["last_poll"], "last_poll");
        let backoff = 1000 * (1i64 << k.min(12));
        assert!(
            gap >= backoff,
            "{name}: after {k} errors the next poll waits at least {backoff} ms: {f}"
        );
        match *name {
            "huge" | "huge-declared" | "gzip-bomb" => {
                assert!(error.contains("10 MiB"), "{name}: size limit in {error:?}")
            }
            "slow" => assert!(error.contains("2s"), "{name}: the timeout in {error:?}"),
            "loop" | "chain6" => {
                assert!(error.contains("redirect"), "{name}: redirects in {error:?}")
            }
            "s500" => assert_eq!(f["http_status"], 500, "{f}"),
            "s404" => assert_eq!(f["http_status"], 404, "{f}"),
            "retrydate" => {
                assert_eq!(f["http_status"], 503, "{f}");
                assert!(gap >= 4000, "Retry-After as a date: {f}");
            }
            "s429" => {
                assert_eq!(f["http_status"], 429, "{f}");
                assert!(
                    gap >= 3000,
                    "Retry-After: 3 puts the next poll 3 s later: {f}"
                );
            }
            "garbage" | "html" | "empty" => assert_eq!(f["http_status"], 200, "{f}"),
            "refused" => assert_eq!(f["http_status"], Value::Null, "{f}"),
            _ => {}
        }
    }
    // The backoff as the feed server saw it: each retry waits longer than the one before.
    let hits = feeds.wait_requests("/status/500", 3).await;
    let gaps: Vec<Duration> = hits.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(
        gaps[0] >= Duration::from_millis(1950) && gaps[1] >= Duration::from_millis(3950),
        "backoff 2 s then 4 s: {gaps:?}"
    );
    let hits = feeds.wait_requests("/status/429", 2).await;
    assert!(
        hits[1].at - hits[0].at >= Duration::from_millis(2950),
        "Retry-After: 3 honoured: {:?}",
        hits[1].at - hits[0].at
    );

    // At most 5 redirects are followed.
    for name in ["chain3", "chain5"] {
        let f = wait_feed(&server, name, "ok", |f| f["status"] == "ok").await;
        assert_eq!(f["entries_seen"], 3, "{name}: {f}");
        let msgs = wait_messages(&server, &format!("feeds:{name}"), 3).await;
        assert_eq!(
            titles(&msgs),
            ["chain question 1", "chain question 2", "chain question 3"]
        );
    }
    // The slow feed never held the good one up: the good feed was polled while a slow fetch
    // was still in progress (each lasts the 2 s feed_timeout).
    let slow = feeds.requests("/slow");
    let good = feeds.requests("/atom/good");
    let overlapped = slow.iter().any(|s| {
        good.iter()
            .any(|g| g.at > s.at && g.at < s.at + Duration::from_millis(1500))
    });
    assert!(overlapped, "the good feed was polled during a slow fetch");
    feeds.set_entries("good", questions(1..=4));
    let msgs = wait_messages(&server, "feeds:good", 4).await;
    assert_eq!(titles(&msgs), titles_of(&[1, 2, 3, 4]));

    let resp = server
        .http
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "healthz");
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server is still running"
    );
    // Shutting down does not wait for an endless fetch.
    let t = Instant::now();
    assert!(server.terminate().await.success(), "clean exit");
    println!("shutdown with broken feeds polling took {:?}", t.elapsed());
}

// ---- 6. The feeds API ------------------------------------------------------------------------

#[tokio::test]
async fn api_adds_validates_removes_and_persists_feeds() {
    let feeds = FeedServer::start().await;
    feeds.set_entries("cfg", questions(1..=1));
    feeds.set_entries("added", questions(1..=2));
    feeds.set_entries("other", questions(1..=1));
    let dir = tempfile::tempdir().unwrap();
    let opts = ServerOptions {
        config: Some(config("", &[("cfg", feeds.url("/atom/cfg"))])),
        data_dir: Some(dir.path().join("data")),
        ..Default::default()
    };
    let mut server = TestServer::start_with(opts.clone()).await;
    let added_url = feeds.url("/atom/added");

    let (status, f) = server
        .post(
            "/api/feeds",
            json!({"name": "added", "url": added_url, "every": "1s"}),
        )
        .await;
    assert_eq!(status, 201, "{f}");
    assert_eq!(f["name"], "added");
    assert_eq!(f["url"], added_url.as_str());
    assert_eq!(f["every"], "1s");
    assert_eq!(f["channel"], "feeds:added");
    assert_eq!(f["source"], "api");
    assert_eq!(f["status"], "pending");
    assert_eq!(f["last_poll"], Value::Null);
    assert_eq!(f["http_status"], Value::Null);
    assert_eq!(f["error"], Value::Null);
    assert_eq!(f["entries_seen"], 0);
    assert_eq!(f["consecutive_errors"], 0);
    let msgs = wait_messages(&server, "feeds:added", 2).await;
    assert_eq!(titles(&msgs), titles_of(&[1, 2]));
    for m in &msgs {
        entry_data(m, "feeds:added", "added");
    }

    // A channel of its own, and the default interval.
    let (status, f) = server
        .post(
            "/api/feeds",
            json!({"name": "other", "url": feeds.url("/atom/other"), "channel": "mirror:other"}),
        )
        .await;
    assert_eq!(status, 201, "{f}");
    assert_eq!(f["channel"], "mirror:other");
    assert_eq!(f["every"], "30s");
    let msgs = wait_messages(&server, "mirror:other", 1).await;
    entry_data(&msgs[0], "mirror:other", "other");

    // Names taken.
    for name in ["added", "cfg"] {
        let (status, body) = server
            .post("/api/feeds", json!({"name": name, "url": added_url}))
            .await;
        assert_eq!(status, 409, "{name}: {body}");
        assert_error_body(&body, "name taken");
    }

    // Bad input: 400 and nothing added.
    let bad = [
        json!({"name": "b1", "url": "not a url"}),
        json!({"name": "b2", "url": "ftp://127.0.0.1/feed"}),
        json!({"name": "b3", "url": ""}),
        json!({"name": "b4", "url": added_url, "every": "500ms"}),
        json!({"name": "b5", "url": added_url, "every": "0s"}),
        json!({"name": "b6", "url": added_url, "every": "soon"}),
        json!({"name": "b7", "url": added_url, "every": 5}),
        json!({"name": "bad name", "url": added_url}),
        json!({"name": "", "url": added_url}),
        json!({"name": "a:b", "url": added_url}),
        json!({"name": "x".repeat(65), "url": added_url}),
        json!({"name": "b8", "url": added_url, "channel": "bad channel"}),
        json!({"name": "b9", "url": added_url, "channel": "a::b"}),
        json!({"name": "b10", "url": added_url, "channel": ""}),
        json!({"name": "b11"}),
        json!({"url": added_url}),
        json!({"name": "b12", "url": added_url, "unknown": 1}),
        json!(["b13", added_url]),
        json!(null),
    ];
    for body in bad {
        let (status, answer) = server.post("/api/feeds", body.clone()).await;
        assert_eq!(status, 400, "{body} → {answer}");
        assert_error_body(&answer, &body.to_string());
    }
    for raw in ["{", "", "{\"name\":\"b14\",\"url\":"] {
        let (status, answer) = server.post_raw("/api/feeds", raw).await;
        assert_eq!(status, 400, "{raw:?} → {answer}");
        assert_error_body(&answer, raw);
    }
    let names: BTreeSet<String> = feed_list(&server)
        .await
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        ["added", "cfg", "other"].map(String::from).into(),
        "nothing added by bad input"
    );

    // Removal.
    let (status, body) = server.delete("/api/feeds/cfg").await;
    assert_eq!(status, 409, "a config feed: {body}");
    assert_error_body(&body, "delete config feed");
    let (status, body) = server.delete("/api/feeds/nope").await;
    assert_eq!(status, 404, "{body}");
    assert_error_body(&body, "delete unknown feed");
    let (status, body) = server.delete("/api/feeds/added").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "added");
    let (status, _) = server.delete("/api/feeds/added").await;
    assert_eq!(status, 404, "deleted twice");
    assert!(feed_list(&server)
        .await
        .iter()
        .all(|f| f["name"] != "added"));
    // Polling stops: a poll in flight at the DELETE has landed by the next poll of cfg, and
    // nothing more arrives while cfg is polled twice again.
    let cfg_hits = feeds.requests("/atom/cfg").len();
    feeds.wait_requests("/atom/cfg", cfg_hits + 1).await;
    let added_hits = feeds.requests("/atom/added").len();
    feeds.wait_requests("/atom/cfg", cfg_hits + 3).await;
    assert_eq!(
        feeds.requests("/atom/added").len(),
        added_hits,
        "a removed feed is not polled"
    );
    // History kept.
    assert_eq!(
        titles(&messages(&server, "feeds:added").await),
        titles_of(&[1, 2])
    );

    // Added again under the same name: fresh state, but it remembers its entries.
    let (status, f) = server
        .post(
            "/api/feeds",
            json!({"name": "added", "url": added_url, "every": "1s"}),
        )
        .await;
    assert_eq!(status, 201, "{f}");
    let f = wait_feed(&server, "added", "polled again", |f| f["status"] == "ok").await;
    assert_eq!(f["entries_seen"], 0, "{f}");
    assert_eq!(
        server.last_seq("feeds:added").await,
        2,
        "nothing republished"
    );

    // Feeds added through the API survive a restart, and keep polling.
    assert!(server.terminate().await.success());
    let before = feeds.requests("/atom/added").len();
    feeds.set_entries("added", questions(1..=3));
    let server = TestServer::start_with(opts).await;
    let list = feed_list(&server).await;
    let names: BTreeSet<&str> = list.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["added", "cfg", "other"].into());
    let added = list.iter().find(|f| f["name"] == "added").unwrap();
    assert_eq!(added["source"], "api");
    assert_eq!(added["url"], added_url.as_str());
    assert_eq!(added["every"], "1s");
    let other = list.iter().find(|f| f["name"] == "other").unwrap();
    assert_eq!(other["channel"], "mirror:other");
    feeds.wait_requests("/atom/added", before + 1).await;
    let msgs = wait_messages(&server, "feeds:added", 3).await;
    assert_eq!(titles(&msgs), titles_of(&[1, 2, 3]));
}

/// Two adds of one name at the same moment: one wins, and no poller is left running that
/// nobody can remove.
#[tokio::test]
async fn concurrent_adds_of_one_name_make_one_feed() {
    let feeds = FeedServer::start().await;
    feeds.set_entries("cfg", questions(1..=1));
    feeds.set_entries("race", questions(1..=1));
    let server = start(config("", &[("cfg", feeds.url("/atom/cfg"))])).await;
    let url = feeds.url("/atom/race");
    let attempts = (0..12).map(|_| {
        server.post(
            "/api/feeds",
            json!({"name": "race", "url": url, "every": "1s"}),
        )
    });
    let results = futures_util::future::join_all(attempts).await;
    let created = results.iter().filter(|(s, _)| *s == 201).count();
    let taken = results.iter().filter(|(s, _)| *s == 409).count();
    assert_eq!(
        (created, taken),
        (1, 11),
        "one 201, the rest 409: {results:?}"
    );
    wait_messages(&server, "feeds:race", 1).await;
    let (status, body) = server.delete("/api/feeds/race").await;
    assert_eq!(status, 200, "{body}");
    let cfg_hits = feeds.requests("/atom/cfg").len();
    feeds.wait_requests("/atom/cfg", cfg_hits + 1).await;
    let race_hits = feeds.requests("/atom/race").len();
    feeds.wait_requests("/atom/cfg", cfg_hits + 3).await;
    assert_eq!(
        feeds.requests("/atom/race").len(),
        race_hits,
        "no poller of `race` is left running"
    );
    assert_eq!(server.last_seq("feeds:race").await, 1);
}

// ---- 7. CLI --------------------------------------------------------------------------------------

#[tokio::test]
async fn cli_adds_lists_and_removes_feeds() {
    let feeds = FeedServer::start().await;
    feeds.set_entries("cfg", questions(1..=1));
    feeds.set_entries("viacli", questions(1..=2));
    let server = start(config("", &[("cfg", feeds.url("/atom/cfg"))])).await;
    let url = feeds.url("/atom/viacli");

    let out = cli(&[
        "feeds",
        "add",
        "viacli",
        &url,
        "--every",
        "1s",
        "--server",
        &server.base,
    ])
    .await;
    let f = cli_json(&out, "feeds add");
    assert_eq!(f["name"], "viacli", "{f}");
    assert_eq!(f["source"], "api", "{f}");
    assert_eq!(f["every"], "1s", "{f}");
    let msgs = wait_messages(&server, "feeds:viacli", 2).await;
    assert_eq!(titles(&msgs), titles_of(&[1, 2]));

    // --channel, with --server before the subcommand.
    let out = cli(&[
        "--server",
        &server.base,
        "feeds",
        "add",
        "viacli2",
        &url,
        "--channel",
        "cli:mirror",
    ])
    .await;
    let f = cli_json(&out, "feeds add --channel");
    assert_eq!(f["channel"], "cli:mirror", "{f}");
    wait_messages(&server, "cli:mirror", 2).await;

    wait_feed(&server, "viacli", "ok", |f| f["status"] == "ok").await;
    let out = cli(&["feeds", "list", "--server", &server.base]).await;
    let list = cli_json(&out, "feeds list");
    let listed = list["feeds"].as_array().expect("feeds list");
    let names: BTreeSet<&str> = listed.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["cfg", "viacli", "viacli2"].into());
    let viacli = listed.iter().find(|f| f["name"] == "viacli").unwrap();
    assert_eq!(viacli["status"], "ok");
    assert_eq!(viacli["entries_seen"], 2);

    // Failures: a non-zero exit and a message, nothing changed.
    let out = cli(&[
        "feeds",
        "add",
        "bad",
        &url,
        "--every",
        "10ms",
        "--server",
        &server.base,
    ])
    .await;
    assert!(!out.status.success(), "every below 1s is refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("every"), "the reason: {stderr}");
    let out = cli(&["feeds", "rm", "cfg", "--server", &server.base]).await;
    assert!(!out.status.success(), "a config feed cannot be removed");
    let out = cli(&["feeds", "rm", "nope", "--server", &server.base]).await;
    assert!(!out.status.success(), "an unknown feed");

    let out = cli(&["feeds", "rm", "viacli", "--server", &server.base]).await;
    let f = cli_json(&out, "feeds rm");
    assert_eq!(f["name"], "viacli", "{f}");
    let out = cli(&["feeds", "list", "--server", &server.base]).await;
    let list = cli_json(&out, "feeds list");
    let names: BTreeSet<&str> = list["feeds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cfg", "viacli2"].into());
    assert_eq!(server.last_seq("feeds:viacli").await, 2, "history kept");
}

// ---- 8. Encodings, formats, compression ----------------------------------------------------

#[tokio::test]
async fn latin1_rss_json_feed_and_compressed_bodies_give_correct_entries() {
    let feeds = FeedServer::start().await;
    let server = start(config(
        "",
        &[
            ("latin1decl", feeds.url("/latin1/decl")),
            ("latin1header", feeds.url("/latin1/header")),
            ("json", feeds.url("/json")),
            ("gzip", feeds.url("/gzip")),
            ("deflate", feeds.url("/deflate")),
            ("br", feeds.url("/br")),
            ("badutf8", feeds.url("/bad-utf8")),
            ("moved", feeds.url("/moved")),
        ],
    ))
    .await;

    let oldest_first: Vec<String> = LATIN1_TITLES.iter().rev().map(|t| t.to_string()).collect();
    for name in ["latin1decl", "latin1header"] {
        let channel = format!("feeds:{name}");
        let msgs = wait_messages(&server, &channel, 3).await;
        assert_eq!(titles(&msgs), oldest_first, "{name}");
        for m in &msgs {
            let d = entry_data(m, &channel, name);
            assert!(!m.to_string().contains('\u{fffd}'), "{name}: {m}");
            assert_eq!(d["summary"], "Ä Ö Ü ä ö ü ß é", "{name}: {m}");
            assert_eq!(d["categories"], json!(["Größe"]), "{name}: {m}");
            // RSS `<author>` is "email (Name)": the name.
            assert_eq!(d["author"], "Jürgen Müller", "{name}: {m}");
        }
        assert_eq!(msgs[0]["data"]["id"], "latin1-1");
        assert_eq!(msgs[0]["data"]["link"], "https://news.example/1");
        assert_eq!(
            utc_ms(&msgs[0]["data"]["published"], "published"),
            utc_ms(&json!("2024-03-01T11:00:00Z"), "expected")
        );
    }

    let msgs = wait_messages(&server, "feeds:json", 2).await;
    let first = entry_data(&msgs[0], "feeds:json", "json");
    assert_eq!(first["id"], "json-1");
    assert_eq!(first["title"], "First JSON question");
    assert_eq!(first["link"], "https://json.example/q/1");
    assert_eq!(first["author"], "Yann");
    assert_eq!(first["summary"], "one");
    assert_eq!(first["categories"], json!([]));
    let second = entry_data(&msgs[1], "feeds:json", "json");
    assert_eq!(second["id"], "json-2");
    assert_eq!(second["title"], "Second JSON question");
    assert_eq!(second["link"], "https://json.example/q/2");
    assert_eq!(second["author"], "Zoë");
    assert_eq!(second["summary"], "two");
    assert_eq!(second["categories"], json!(["json", "feeds"]));
    assert_eq!(
        utc_ms(&second["published"], "published"),
        utc_ms(&json!("2024-03-02T10:00:00Z"), "expected")
    );
    assert_eq!(
        utc_ms(&second["updated"], "updated"),
        utc_ms(&json!("2024-03-02T11:30:00Z"), "expected")
    );

    for kind in ["gzip", "deflate", "br"] {
        let channel = format!("feeds:{kind}");
        let msgs = wait_messages(&server, &channel, 3).await;
        let mut expected = compressed_entries(kind);
        expected.reverse();
        for (m, e) in msgs.iter().zip(&expected) {
            let d = entry_data(m, &channel, kind);
            assert_entry(d, e, &e.link);
        }
        // Polled every second: on a loaded machine one poll may time out, the next succeeds.
        wait_feed(&server, kind, "ok", |f| f["status"] == "ok").await;
    }

    // After a redirect, a relative link is resolved against the URL the feed came from.
    let msgs = wait_messages(&server, "feeds:moved", 1).await;
    assert_eq!(msgs[0]["data"]["link"], feeds.url("/new/place/q/1"));

    // Declared UTF-8 but written in Latin-1: read anyway, the characters intact (SPEC §7 asks
    // only that a broken feed never crashes; the parser recovers mislabelled feeds as feed
    // readers do).
    let msgs = wait_messages(&server, "feeds:badutf8", 1).await;
    assert_eq!(msgs[0]["data"]["title"], "Café société");
}

/// An entry whose `data` would pass the 64 KiB message limit (a long post's full text as the
/// summary) is still published, its summary shortened, instead of being silently lost.
#[tokio::test]
async fn an_entry_too_large_for_one_message_is_published_with_a_shorter_summary() {
    let feeds = FeedServer::start().await;
    let mut big = Entry::question(2);
    big.summary = format!(
        "<p>{}</p>",
        "Long answer with \"quotes\" and ünïcödé. ".repeat(3000)
    );
    assert!(big.summary.len() > 100 * 1024);
    feeds.set_entries(
        "big",
        vec![Entry::question(3), big.clone(), Entry::question(1)],
    );
    let server = start(config("", &[("big", feeds.url("/atom/big"))])).await;
    let f = wait_feed(&server, "big", "polled", |f| f["status"] != "pending").await;
    assert_eq!(f["status"], "ok", "{f}");
    let msgs = wait_messages(&server, "feeds:big", 3).await;
    assert_eq!(titles(&msgs), titles_of(&[1, 2, 3]));
    let data = entry_data(&msgs[1], "feeds:big", "big");
    assert_eq!(data["id"], big.id.as_str());
    assert!(
        data.to_string().len() <= 64 * 1024,
        "within the message limit"
    );
    let summary = data["summary"].as_str().expect("a (shortened) summary");
    assert!(
        summary.len() > 32 * 1024,
        "as much of the summary as fits: {} bytes",
        summary.len()
    );
    let kept = summary.trim_end_matches('…');
    assert!(big.summary.starts_with(kept), "a prefix of the summary");
    assert_eq!(
        wait_feed(&server, "big", "counted", |f| f["entries_seen"] == 3).await["entries_seen"],
        3
    );
}

// ---- Throughput (measured, not asserted) ---------------------------------------------------

#[tokio::test]
async fn measure_entries_parsed_and_stored_per_second() {
    const N: u32 = 500;
    let feeds = FeedServer::start().await;
    feeds.set_entries("bulk", questions(1..=N));
    let server = start(config("", &[("bulk", feeds.url("/atom/bulk"))])).await;
    let first = feeds.wait_requests("/atom/bulk", 1).await[0].at;
    tokio::time::timeout(WAIT, async {
        while server.last_seq("feeds:bulk").await < u64::from(N) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("all entries stored in time");
    let elapsed = first.elapsed();
    let msgs = messages(&server, "feeds:bulk").await;
    assert_eq!(msgs.len(), N as usize);
    assert_eq!(msgs[0]["data"]["title"], Entry::question(1).title);
    assert_eq!(
        msgs[N as usize - 1]["data"]["title"],
        Entry::question(N).title
    );
    println!(
        "feed throughput: {N} entries fetched, parsed and stored in {elapsed:?} = {:.0} entries/s",
        f64::from(N) / elapsed.as_secs_f64()
    );
}
