//! The pages and the client library, as a person (and a user's own page) would use them.

use std::path::Path;

use fantoccini::key::Key;
use fantoccini::Locator;
use serde_json::{json, Value};

use crate::browser_test;
use crate::harness::Browser;
use crate::support::{ServerOptions, TestServer};

/// Jobs and a (deliberately unreachable, loopback) feed for the pages to show.
fn config(gate: &Path) -> String {
    format!(
        r#"
[[jobs]]
name = "gated"
command = ["sh", "-c", '''
printf '\033[31mred\033[0m plain\n'
echo '<b>not bold</b>'
for i in 1 2 3; do echo "early $i"; done
while [ ! -e "$GATE/1" ]; do sleep 0.05; done
for i in 1 2 3; do echo "middle $i"; done
while [ ! -e "$GATE/2" ]; do sleep 0.05; done
for i in 1 2 3; do echo "late $i"; done
echo oops >&2
exit 3
''']
env = {{ GATE = "{gate}" }}
timeout = "2m"

[[jobs]]
name = "chatty"
command = ["sh", "-c", '''
i=1; while [ $i -le 150 ]; do echo "first $i"; i=$((i+1)); done
while [ ! -e "$GATE/chatty" ]; do sleep 0.05; done
i=1; while [ $i -le 150 ]; do echo "second $i"; i=$((i+1)); done
''']
env = {{ GATE = "{gate}" }}
timeout = "2m"

[[jobs]]
name = "hello"
command = ["sh", "-c", 'echo "hello $TIDINGS_PARAM_WHO"']
params = ["who"]

[[jobs]]
name = "sleepy"
command = ["sh", "-c", 'echo sleeping; exec sleep 60']
kill_grace = "1s"

[[jobs]]
name = "build"
cron = "0 0 3 * * *"
command = ["sh", "-c", '''
printf '\033[1;34m==>\033[0m \033[1mCompiling\033[0m tidings v0.1.0\n'
printf '\033[33mwarning\033[0m: unused variable: `x`\n'
printf '   \033[90m-->\033[0m src/main.rs:4:9\n'
printf '\033[1;32m    Finished\033[0m release profile [optimized] in 42.1s\n'
printf '\033[31merror\033[0m: 1 test failed (see above)\n' >&2
printf '\033[1;32mok\033[0m 41 passed; \033[31m1 failed\033[0m\n'
''']

[[feeds]]
name = "offline-example"
url = "http://127.0.0.1:9/feed.xml"
every = "1h"

[[webhooks]]
url = "http://127.0.0.1:9/hook"
channels = ["fresh:*"]
description = "an unreachable receiver, for the dashboard"

[webhook_policy]
retry = ["1h"]
"#,
        gate = gate.display()
    )
}

struct Setup {
    server: TestServer,
    gate: tempfile::TempDir,
    config: String,
}

async fn start() -> Setup {
    start_with("").await
}

/// A hub with the test jobs and `extra` TOML after them.
async fn start_with(extra: &str) -> Setup {
    let gate = tempfile::tempdir().expect("gate dir");
    let config = format!("{}\n{extra}", config(gate.path()));
    let server = TestServer::start_with(ServerOptions {
        config: Some(config.clone()),
        ..Default::default()
    })
    .await;
    Setup {
        server,
        gate,
        config,
    }
}

/// Seqs of the message rows on a channel page, top (newest) first.
const ROW_SEQS: &str =
    "return [...document.querySelectorAll('#messages tbody tr')].map(r => Number(r.dataset.seq))";
/// Titles of the entry cards on a channel page, top (newest) first.
const CARD_TITLES: &str =
    "return [...document.querySelectorAll('#entries .card .card-title')].map(t => t.textContent)";
/// The output lines of a run page, in order.
const LOG_LINES: &str =
    "return [...document.querySelectorAll('#log .line:not(.other)')].map(l => l.textContent)";

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|s| s.as_str().unwrap_or_default().to_owned())
        .collect()
}

fn seqs(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|s| s.as_u64().unwrap_or(0))
        .collect()
}

async fn publish(server: &TestServer, channel: &str, body: Value) -> u64 {
    let (status, reply) = server.publish(channel, body).await;
    assert_eq!(status, 201, "publish to {channel}: {reply}");
    reply["seq"].as_u64().unwrap()
}

async fn assert_no_console_errors(b: &mut Browser, allowed: &[&str]) {
    let errors = b.console_errors(allowed).await;
    assert!(errors.is_empty(), "console errors: {errors:#?}");
}

fn entry(title: &str, link: &str, author: &str) -> Value {
    json!({
        "event": "entry",
        "data": {
            "id": link, "title": title, "link": link, "author": author,
            "published": "2026-01-02T03:04:05Z", "updated": null,
            "summary": "A short summary of the entry.", "categories": ["rust", "web"], "feed": "x"
        }
    })
}

#[test]
fn dashboard_loads_without_console_errors_and_updates_live() {
    browser_test(|| async {
        let s = start().await;
        publish(&s.server, "chat:lobby", json!({"data": {"text": "hi"}})).await;
        let mut b = Browser::start().await;
        b.goto(&s.server.url("/")).await;
        b.wait(
            "the badge to say live",
            "return document.getElementById('conn').dataset.state === 'live'",
        )
        .await;
        let transport = b.js("return window.tidings.transport").await;
        assert_eq!(transport, "ws", "the default transport is the WebSocket");
        b.wait(
            "the jobs",
            "return document.querySelectorAll('#jobs tr[data-job]').length === 5",
        )
        .await;
        b.wait(
            "the channel",
            "return !!document.querySelector('#channels tr[data-channel=\"chat:lobby\"]')",
        )
        .await;
        b.wait("the feed with its error", "return document.querySelector('#feeds tr[data-feed=\"offline-example\"] .error-text')?.textContent").await;
        b.wait(
            "the config webhook, active before anything matched",
            "const w = document.querySelector('#webhooks'); \
             return !!w && w.textContent.includes('http://127.0.0.1:9/hook') \
             && w.textContent.includes('active')",
        )
        .await;
        let declared = b
            .js("return !!document.getElementById('param-hello-who')")
            .await;
        assert_eq!(declared, true, "a declared param gets an input");

        // A run started elsewhere shows up through the jobs:{name} channel.
        let (status, run) = s
            .server
            .post("/api/jobs/hello/runs", json!({"params": {"who": "api"}}))
            .await;
        assert_eq!(status, 202, "{run}");
        let id = run["id"].as_str().unwrap().to_owned();
        b.wait(
            "the new run in the jobs table",
            &format!(
                "const r = document.querySelector('#jobs tr[data-job=\"hello\"]'); \
                 return r && r.querySelector('a[href=\"/runs/{id}\"]') && r.textContent.includes('succeeded')"
            ),
        )
        .await;
        // A new channel appears on the next refresh, without a reload.
        b.js("window.__marker = 1; return null").await;
        publish(&s.server, "fresh:channel", json!({"data": 1})).await;
        b.wait(
            "the new channel",
            "return !!document.querySelector('#channels tr[data-channel=\"fresh:channel\"]')",
        )
        .await;
        assert_eq!(b.js("return window.__marker").await, 1, "no reload");
        // The webhook of the config file is listed; the message above made it fail.
        b.wait(
            "the failing webhook on the dashboard",
            "const w = document.querySelector('#webhooks'); \
             return !!w && w.textContent.includes('http://127.0.0.1:9/hook') \
             && w.textContent.includes('failing')",
        )
        .await;

        assert_no_console_errors(&mut b, &[]).await;
        // …and the console is really being read: an error logged now is seen.
        b.js("console.error('console-probe'); return null").await;
        let errors = b.console_errors(&[]).await;
        assert!(
            errors.len() == 1 && errors[0].contains("console-probe"),
            "{errors:?}"
        );
        b.close().await;
    });
}

#[test]
fn feed_entries_slide_in_on_top_and_titles_stay_text() {
    browser_test(|| async {
        let s = start().await;
        let server = &s.server;
        publish(
            server,
            "feeds:x",
            entry("First entry", "https://example.org/1", "ann"),
        )
        .await;
        let xss = r#"<img src=x onerror="window.__xss=1">"#;
        publish(
            server,
            "feeds:x",
            entry(xss, "javascript:window.__xss=2", "<b>mallory</b>"),
        )
        .await;
        let mut b = Browser::start().await;
        b.goto(&server.url("/channels/feeds:x")).await;
        b.wait("two cards", &format!("{CARD_TITLES}.length === 2"))
            .await;
        let titles = strings(&b.js(CARD_TITLES).await);
        assert_eq!(
            titles,
            vec![xss.to_owned(), "First entry".to_owned()],
            "newest first, as text"
        );
        let hostile = b
            .js("const c = document.querySelector('#entries .card'); \
                 return {imgs: document.querySelectorAll('#entries img, #entries b').length, \
                         link: c.querySelector('a') ? c.querySelector('a').getAttribute('href') : null, \
                         author: c.querySelector('.author').textContent, xss: typeof window.__xss}")
            .await;
        assert_eq!(
            hostile["imgs"], 0,
            "markup in an entry must not become elements"
        );
        assert_eq!(
            hostile["link"],
            Value::Null,
            "a javascript: link is not a link"
        );
        assert_eq!(hostile["author"], "<b>mallory</b>");
        assert_eq!(hostile["xss"], "undefined");

        b.wait(
            "the subscription to be live",
            "return window.tidings.state === 'live'",
        )
        .await;
        b.js("window.__marker = 1; return null").await;
        publish(
            server,
            "feeds:x",
            entry("Third, live", "https://example.org/3", "bob"),
        )
        .await;
        b.wait(
            "the live entry on top",
            "const c = document.querySelector('#entries .card'); \
             return c && c.querySelector('.card-title').textContent === 'Third, live' && c.classList.contains('new')",
        )
        .await;
        let titles = strings(&b.js(CARD_TITLES).await);
        assert_eq!(titles.len(), 3, "{titles:?}");
        let top = b
            .js("const a = document.querySelector('#entries .card a'); \
                 return {href: a.href, rel: a.rel, author: document.querySelector('#entries .card .author').textContent}")
            .await;
        assert_eq!(top["href"], "https://example.org/3");
        assert_eq!(top["author"], "bob");
        assert_eq!(b.js("return window.__marker").await, 1, "no reload");
        assert_eq!(b.js("return typeof window.__xss").await, "undefined");
        assert_no_console_errors(&mut b, &[]).await;
        b.close().await;
    });
}

#[test]
fn run_page_shows_lines_live_and_the_whole_log_after_a_reload() {
    browser_test(|| async {
        let s = start().await;
        let (status, run) = s.server.post("/api/jobs/gated/runs", json!({})).await;
        assert_eq!(status, 202, "{run}");
        let id = run["id"].as_str().unwrap().to_owned();
        let mut b = Browser::start().await;
        b.goto(&s.server.url(&format!("/runs/{id}"))).await;
        let early = [
            "red plain",
            "<b>not bold</b>",
            "early 1",
            "early 2",
            "early 3",
        ];
        b.wait(
            "the early lines",
            &format!("{LOG_LINES}.length === {}", early.len()),
        )
        .await;
        assert_eq!(strings(&b.js(LOG_LINES).await), early);
        let red = b
            .js("return document.querySelector('#log .line .ansi-fg-31')?.textContent")
            .await;
        assert_eq!(red, "red", "ANSI red is a span with a class");
        assert_eq!(
            b.js("return document.querySelectorAll('#log b').length")
                .await,
            0,
            "log text is text"
        );
        assert_eq!(
            b.js("return document.querySelector('#status').textContent")
                .await,
            "running"
        );

        // Lines printed now arrive live.
        std::fs::write(s.gate.path().join("1"), "").unwrap();
        b.wait(
            "the middle lines, live",
            &format!("{LOG_LINES}.includes('middle 3')"),
        )
        .await;

        // A reload mid-run shows every earlier line once, then continues.
        b.refresh().await;
        let mut expected: Vec<&str> = early.to_vec();
        expected.extend(["middle 1", "middle 2", "middle 3"]);
        b.wait(
            "the log so far after the reload",
            &format!("{LOG_LINES}.length >= {}", expected.len()),
        )
        .await;
        assert_eq!(
            strings(&b.js(LOG_LINES).await),
            expected,
            "each earlier line exactly once"
        );
        b.wait("live again", "return window.tidings.state === 'live'")
            .await;
        std::fs::write(s.gate.path().join("2"), "").unwrap();
        b.wait(
            "the exit",
            "return document.querySelector('#status').textContent === 'failed'",
        )
        .await;
        expected.extend(["late 1", "late 2", "late 3"]);
        b.wait(
            "every line",
            &format!("{LOG_LINES}.length === {}", expected.len() + 1),
        )
        .await;
        // stdout and stderr are two pipes: "oops" may come before the last stdout lines.
        let mut lines = strings(&b.js(LOG_LINES).await);
        let oops = lines
            .iter()
            .position(|l| l == "oops")
            .expect("the stderr line");
        lines.remove(oops);
        assert_eq!(lines, expected);
        let stderr = b
            .js("return document.querySelector('#log .line.stderr')?.textContent")
            .await;
        assert_eq!(stderr, "oops", "stderr lines are marked");
        b.wait(
            "the exit code",
            "return document.getElementById('exit-code').textContent === '3'",
        )
        .await;
        assert_eq!(
            b.js("return document.getElementById('cancel').disabled")
                .await,
            true
        );
        assert_no_console_errors(&mut b, &[]).await;
        b.close().await;
    });
}

#[test]
fn run_button_starts_a_run_and_opens_its_log_and_cancel_stops_one() {
    browser_test(|| async {
        let s = start().await;
        let mut b = Browser::start().await;
        b.goto(&s.server.url("/")).await;
        b.wait(
            "the hello job's form",
            "return !!document.getElementById('param-hello-who')",
        )
        .await;
        // Keyboard only: type the parameter, press Enter.
        let input = b.client.find(Locator::Id("param-hello-who")).await.unwrap();
        input.send_keys("browser").await.unwrap();
        input.send_keys(&Key::Enter).await.unwrap();
        b.wait(
            "the run page",
            "return location.pathname.startsWith('/runs/')",
        )
        .await;
        b.wait(
            "the run's output",
            &format!("{LOG_LINES}.includes('hello browser')"),
        )
        .await;
        b.wait(
            "success",
            "return document.querySelector('#status').textContent === 'succeeded'",
        )
        .await;
        let path = b.js("return location.pathname").await;
        let id = path
            .as_str()
            .unwrap()
            .trim_start_matches("/runs/")
            .to_owned();
        let (status, run) = s.server.get(&format!("/api/runs/{id}")).await;
        assert_eq!(status, 200);
        assert_eq!(run["trigger"], "ui");
        assert_eq!(run["params"], json!({"who": "browser"}));

        // A click on Run, then Cancel on the run page.
        b.goto(&s.server.url("/")).await;
        b.wait(
            "the sleepy job",
            "return !!document.querySelector('form[data-job=\"sleepy\"] button')",
        )
        .await;
        b.client
            .find(Locator::Css("form[data-job=\"sleepy\"] button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        b.wait(
            "the run page",
            "return location.pathname.startsWith('/runs/')",
        )
        .await;
        b.wait(
            "the run running",
            &format!(
                "{LOG_LINES}.includes('sleeping') && !document.getElementById('cancel').disabled"
            ),
        )
        .await;
        b.client
            .find(Locator::Id("cancel"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        b.wait(
            "cancelled",
            "return document.querySelector('#status').textContent === 'cancelled'",
        )
        .await;
        assert_no_console_errors(&mut b, &[]).await;
        b.close().await;
    });
}

/// Delivery over one forced transport, publish from the page, and resume across a server
/// restart (same data directory, same port) with no gap and no duplicate.
async fn transport_delivers_and_resumes(transport: &str) {
    let s = start().await;
    let mut server = s.server;
    let channel = "tp:x";
    let mut b = Browser::start().await;
    b.goto(&server.url(&format!("/channels/{channel}?transport={transport}")))
        .await;
    b.wait(
        &format!("live over {transport}"),
        &format!("return window.tidings && window.tidings.state === 'live' && window.tidings.transport === '{transport}'"),
    )
    .await;
    for n in 1..=3 {
        publish(&server, channel, json!({"data": {"n": n}})).await;
    }
    b.wait("three rows", &format!("{ROW_SEQS}.length === 3"))
        .await;

    // The page publishes too (over the WebSocket when it is open, else HTTP), idempotently.
    let ack = b
        .js_async(&format!(
            "window.tidings.publish('{channel}', {{n: 4}}, {{id: 'page-4'}}).then(done, e => done({{error: String(e)}}))"
        ))
        .await;
    assert_eq!(ack["seq"], 4, "{ack}");
    assert_eq!(ack["duplicate"], false, "{ack}");
    let again = b
        .js_async(&format!(
            "window.tidings.publish('{channel}', {{n: 4}}, {{id: 'page-4'}}).then(done, e => done({{error: String(e)}}))"
        ))
        .await;
    assert_eq!(again["seq"], 4, "{again}");
    assert_eq!(again["duplicate"], true, "{again}");
    b.wait("four rows", &format!("{ROW_SEQS}.length === 4"))
        .await;

    b.js("window.__marker = 1; window.__states = []; \
          window.tidings.on('state', s => window.__states.push(s)); return null")
        .await;
    let status = server.terminate().await;
    assert!(status.success(), "clean shutdown: {status:?}");
    let restarted = TestServer::start_with(ServerOptions {
        config: Some(s.config.clone()),
        data_dir: Some(server.data_dir.clone()),
        listen: Some(server.addr.to_string()),
        ..Default::default()
    })
    .await;
    for n in 5..=6 {
        publish(&restarted, channel, json!({"data": {"n": n}})).await;
    }
    b.wait(
        "the messages published while away",
        &format!("{ROW_SEQS}.length >= 6"),
    )
    .await;
    b.wait(
        "a reconnect",
        &format!("return window.__states.includes('offline') && window.tidings.state === 'live' && window.tidings.transport === '{transport}'"),
    )
    .await;
    publish(&restarted, channel, json!({"data": {"n": 7}})).await;
    b.wait(
        "the live message after the reconnect",
        &format!("{ROW_SEQS}.length >= 7"),
    )
    .await;
    assert_eq!(
        seqs(&b.js(ROW_SEQS).await),
        vec![7, 6, 5, 4, 3, 2, 1],
        "no gap, no duplicate"
    );
    assert_eq!(b.js("return window.__marker").await, 1, "no reload");

    // The channel's history is deleted: a new epoch, seqs restart, the page is told (reset).
    let (status, _) = restarted.delete(&format!("/api/channels/{channel}")).await;
    assert_eq!(status, 200);
    publish(&restarted, channel, json!({"data": {"n": "new"}})).await;
    b.wait(
        "the new history only",
        &format!(
            "return JSON.stringify({}) === '[1]'",
            ROW_SEQS.trim_start_matches("return ")
        ),
    )
    .await;
    let told = b
        .js("return document.getElementById('notice').textContent")
        .await;
    assert!(told.as_str().unwrap_or("").contains("replaced"), "{told}");
    publish(&restarted, channel, json!({"data": {"n": "new 2"}})).await;
    b.wait(
        "the next message of the new history",
        &format!(
            "return JSON.stringify({}) === '[2,1]'",
            ROW_SEQS.trim_start_matches("return ")
        ),
    )
    .await;

    assert_no_console_errors(
        &mut b,
        &[
            // While the hub is down, the browser reports the refused connections.
            "net::ERR_CONNECTION_REFUSED",
            "WebSocket connection to",
        ],
    )
    .await;
    b.close().await;
    drop(server);
}

#[test]
fn websocket_transport_delivers_and_resumes() {
    browser_test(|| transport_delivers_and_resumes("ws"));
}

#[test]
fn sse_transport_delivers_and_resumes() {
    browser_test(|| transport_delivers_and_resumes("sse"));
}

#[test]
fn longpoll_transport_delivers_and_resumes() {
    browser_test(|| transport_delivers_and_resumes("longpoll"));
}

/// Every page, desktop and 360 px wide, into target/screenshots/ — and nothing wider than the
/// screen at 360 px.
#[test]
fn screenshots_of_every_page() {
    browser_test(|| async {
        // A real feed, polled by the hub from a local server: the live feed mirror end to end.
        let feed_url = serve_feed().await;
        let s = start_with(&format!(
            "[[feeds]]\nname = \"questions\"\nurl = \"{feed_url}\"\nevery = \"1h\"\n"
        ))
        .await;
        let server = &s.server;
        publish(
            server,
            "chat:lobby",
            json!({"data": {"text": "hello"}, "event": "chat"}),
        )
        .await;
        publish(
            server,
            "chat:lobby",
            json!({"data": {"text": "hi there", "user": "bo"}, "event": "chat"}),
        )
        .await;
        publish(server, "chat:lobby", json!({"data": [1, 2, 3]})).await;
        let (_, hello) = server
            .post("/api/jobs/hello/runs", json!({"params": {"who": "world"}}))
            .await;
        let (_, build) = server.post("/api/jobs/build/runs", json!({})).await;
        let build_id = build["id"].as_str().unwrap().to_owned();
        let _ = hello;

        let mut b = Browser::start().await;
        let pages: [(&str, String, &str); 4] = [
            (
                "dashboard",
                "/".into(),
                "return document.querySelectorAll('#jobs tr[data-job]').length === 5 && \
                 !!document.querySelector('#feeds .error-text') && \
                 document.querySelector('#feeds tr[data-feed=\"questions\"]')?.textContent.includes('ok') && \
                 !!document.querySelector('#channels tr[data-channel]') && \
                 document.getElementById('conn').dataset.state === 'live'",
            ),
            (
                "channel-feed",
                "/channels/feeds:questions".into(),
                "return document.querySelectorAll('#entries .card').length === 4 && document.getElementById('conn').dataset.state === 'live'",
            ),
            (
                "channel-messages",
                "/channels/chat:lobby".into(),
                "return document.querySelectorAll('#messages tbody tr').length === 3 && document.getElementById('conn').dataset.state === 'live'",
            ),
            (
                "run",
                format!("/runs/{build_id}"),
                "return document.querySelector('#status').textContent === 'succeeded' && document.getElementById('conn').dataset.state === 'live'",
            ),
        ];
        for (width, height, label) in [(1280u32, 1100u32, "desktop"), (360, 780, "360px")] {
            b.resize(width, height).await;
            for (name, path, ready) in &pages {
                b.goto(&server.url(path)).await;
                b.wait(&format!("{name} ready"), ready).await;
                // Let entry animations finish (a DOM condition, not a sleep).
                b.wait(
                    "animations done",
                    "return document.getAnimations().every(a => a.playState !== 'running')",
                )
                .await;
                let overflow = b
                    .js("return document.documentElement.scrollWidth - document.documentElement.clientWidth")
                    .await;
                if label == "360px" {
                    assert!(
                        overflow.as_i64().unwrap_or(1) <= 0,
                        "{name} is wider than 360 px by {overflow}"
                    );
                }
                let saved = b.screenshot(&format!("{name}-{label}")).await;
                assert!(saved.metadata().map(|m| m.len() > 1000).unwrap_or(false));
            }
        }
        assert_no_console_errors(&mut b, &[]).await;
        b.close().await;
    });
}

#[test]
fn refused_actions_ask_for_an_api_key_and_retry_with_it() {
    browser_test(|| async {
        let s = start_with("[auth]\napi_keys = [\"secret-key-1\"]\npublic = [\"jobs:*\"]\n").await;
        let mut b = Browser::start().await;
        b.goto(&s.server.url("/")).await;
        b.wait(
            "the key prompt",
            "return !!document.querySelector('dialog[open] #key-input')",
        )
        .await;
        let input = b.client.find(Locator::Id("key-input")).await.unwrap();
        input.send_keys("secret-key-1").await.unwrap();
        input.send_keys(&Key::Enter).await.unwrap();
        b.wait(
            "the jobs, read with the key",
            "return document.querySelectorAll('#jobs tr[data-job]').length === 5",
        )
        .await;
        assert_eq!(
            b.js("return localStorage.getItem('tidings.key')").await,
            "secret-key-1"
        );
        b.wait(
            "live with the key",
            "return window.tidings.state === 'live' && window.tidings.token === 'secret-key-1'",
        )
        .await;
        // An admin action with the stored key.
        b.client
            .find(Locator::Css("form[data-job=\"hello\"] button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        b.wait(
            "the run page",
            "return location.pathname.startsWith('/runs/')",
        )
        .await;
        b.wait(
            "the run, followed with the key",
            "return document.querySelector('#status').textContent === 'succeeded' && \
             document.querySelectorAll('#log .line:not(.other)').length === 1",
        )
        .await;
        // A wrong stored key is refused (403): asked again.
        b.js("localStorage.setItem('tidings.key', 'wrong'); return null")
            .await;
        b.goto(&s.server.url("/")).await;
        b.wait(
            "the key prompt again",
            "return !!document.querySelector('dialog[open] #key-input')",
        )
        .await;
        let input = b.client.find(Locator::Id("key-input")).await.unwrap();
        input.send_keys("secret-key-1").await.unwrap();
        input.send_keys(&Key::Enter).await.unwrap();
        b.wait(
            "the jobs again",
            "return document.querySelectorAll('#jobs tr[data-job]').length === 5 && !document.querySelector('dialog[open]')",
        )
        .await;
        b.wait(
            "back on the WebSocket with the right key",
            "return window.tidings.state === 'live' && window.tidings.transport === 'ws' && window.tidings.token === 'secret-key-1'",
        )
        .await;
        assert_no_console_errors(
            &mut b,
            &[
                // The refusals that made the page ask.
                "the server responded with a status of 401",
                "the server responded with a status of 403",
                // The WebSocket upgrade with the wrong key (a 401 the page cannot read).
                "/ws?token=wrong' failed",
            ],
        )
        .await;
        b.close().await;
    });
}

#[test]
fn run_log_follows_the_tail_and_pauses_when_scrolled_up() {
    browser_test(|| async {
        let s = start().await;
        let (status, run) = s.server.post("/api/jobs/chatty/runs", json!({})).await;
        assert_eq!(status, 202, "{run}");
        let id = run["id"].as_str().unwrap().to_owned();
        let mut b = Browser::start().await;
        b.goto(&s.server.url(&format!("/runs/{id}"))).await;
        const AT_END: &str =
            "const l = document.getElementById('log'); return l.scrollTop + l.clientHeight >= l.scrollHeight - 30";
        b.wait("150 lines", &format!("{LOG_LINES}.length === 150"))
            .await;
        b.wait("the end of the log in view", AT_END).await;
        // The reader scrolls up: following pauses.
        b.js("document.getElementById('log').scrollTop = 0; return null")
            .await;
        b.wait(
            "the paused marker",
            "return !document.getElementById('follow').hidden",
        )
        .await;
        std::fs::write(s.gate.path().join("chatty"), "").unwrap();
        b.wait("300 lines", &format!("{LOG_LINES}.length === 300"))
            .await;
        b.wait(
            "the run to end",
            "return document.querySelector('#status').textContent === 'succeeded'",
        )
        .await;
        assert_eq!(
            b.js("return document.getElementById('log').scrollTop")
                .await,
            0,
            "new lines must not move a reader who scrolled up"
        );
        // Back to following.
        b.client
            .find(Locator::Id("follow"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        b.wait("the end of the log in view again", AT_END).await;
        assert_eq!(
            b.js("return document.getElementById('follow').hidden")
                .await,
            true
        );
        assert_no_console_errors(&mut b, &[]).await;
        b.close().await;
    });
}

/// An RSS feed of four questions, served on loopback for the hub to poll.
const RSS: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<rss version="2.0" xmlns:dc="http://purl.org/dc/elements/1.1/">
<channel>
<title>Newest questions</title>
<link>https://example.org/questions</link>
<description>Newest questions</description>
<item><title>What is the difference between Arc&lt;Mutex&lt;T&gt;&gt; and RwLock?</title>
  <link>https://example.org/q/4</link><guid>q4</guid><dc:creator>li</dc:creator>
  <pubDate>Fri, 02 Jan 2026 03:04:05 GMT</pubDate><category>rust</category><category>concurrency</category>
  <description>I have a cache shared between tasks and wonder which lock to use.</description></item>
<item><title>Idiomatic way to retry a request with exponential backoff</title>
  <link>https://example.org/q/3</link><guid>q3</guid><dc:creator>mo</dc:creator>
  <pubDate>Fri, 02 Jan 2026 03:03:05 GMT</pubDate><category>http</category>
  <description>Retries with jitter, without a crate if possible.</description></item>
<item><title>Why does my SSE stream stop after 30 seconds behind nginx?</title>
  <link>https://example.org/q/2</link><guid>q2</guid><dc:creator>ana</dc:creator>
  <pubDate>Fri, 02 Jan 2026 03:02:05 GMT</pubDate><category>nginx</category><category>server-sent-events</category>
  <description>The stream works locally but is cut behind the proxy.</description></item>
<item><title>How do I share a tokio runtime between threads?</title>
  <link>https://example.org/q/1</link><guid>q1</guid><dc:creator>ferris</dc:creator>
  <pubDate>Fri, 02 Jan 2026 03:01:05 GMT</pubDate><category>rust</category><category>tokio</category>
  <description>Several threads need to spawn tasks on one runtime.</description></item>
</channel>
</rss>"#;

/// Serves `RSS` on an ephemeral loopback port for as long as the test's runtime lives.
async fn serve_feed() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the feed server");
    let addr = listener.local_addr().expect("feed server address");
    let app = axum::Router::new().route(
        "/rss",
        axum::routing::get(|| async { ([("content-type", "application/rss+xml")], RSS) }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/rss")
}
