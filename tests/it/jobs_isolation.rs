//! Isolation and edges of jobs (§4, §7): a flooding job neither loses lines nor stalls the
//! hub, a 10 MB line arrives in 16 KiB pieces, unknown jobs and runs are 404; the CLI's
//! `tidings run … --follow`; and the no-config defaults (run inside their own network namespace
//! so the default feed can never reach the internet).

use std::process::{Output, Stdio};

use serde_json::{json, Value};

use crate::jobs::{
    assert_no_process, assert_one_exit, get_run, id_of, job_toml, lines_of, marker, read_channel,
    runs_of, start_run, start_server, subscribe, wait_final, Scratch,
};
use crate::support::{assert_error_body, binary, wait_for, ServerOptions, TestServer, WAIT};

const MAX_LINE_BYTES: usize = 16 * 1024;

/// Padding for the flood's lines.
const PAD: &str = "flood-flood-flood-flood-flood-flood-flood-flood-flood-flood-flood";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_job_loses_nothing_and_does_not_stall_the_hub() {
    let scratch = Scratch::new();
    let marker = marker();
    let flag = scratch.path("flag");
    // Prints "1 {PAD}", "2 {PAD}", … in blocks of 1,000 until the flag appears: the flood
    // provably lasts until the test has checked the hub. (The padding keeps the number of lines
    // buffered between the pipe and the store, and so the test's reading, small.)
    let script = format!(
        r#"i=0; while [ ! -e "$1" ]; do seq -f "%.0f {PAD}" $((i*1000+1)) $((i*1000+1000)); i=$((i+1)); done"#
    );
    let config = format!(
        "[[retention]]\npattern = \"jobs:*\"\nmax_messages = 10000000\nmax_age = \"30d\"\n\n{}",
        job_toml("flood", &["sh", "-c", &script, &marker, &flag], &marker, "")
    );
    let server = start_server(config).await;
    let run = start_run(&server, "flood", json!({})).await;
    let channel = run["channel"].as_str().unwrap().to_owned();
    let flooding = wait_for("the flood to be under way", || async {
        let seq = server.last_seq(&channel).await;
        (seq >= 30_000).then_some(seq)
    })
    .await;

    // During the flood: health, and a publish/subscribe round-trip on another channel.
    let health = server
        .http
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status().as_u16(), 200);
    let mut ws = subscribe(&server, "iso:other", None).await;
    let (status, ack) = server
        .publish("iso:other", json!({"data": {"ping": 1}}))
        .await;
    assert_eq!(status, 201, "{ack}");
    let got = ws.recv_op("message").await;
    assert_eq!(got["channel"], "iso:other");
    assert_eq!(got["seq"], ack["seq"]);
    assert_eq!(got["data"], json!({"ping": 1}));
    ws.send(json!({"op": "publish", "channel": "iso:other", "data": 2, "ref": 1}))
        .await;
    let mut acked = false;
    let mut echoed = false;
    while !(acked && echoed) {
        let frame = ws.recv().await;
        match frame["op"].as_str() {
            Some("ack") => acked = true,
            Some("message") => {
                assert_eq!(frame["data"], 2);
                echoed = true;
            }
            _ => panic!("unexpected {frame}"),
        }
    }
    assert_eq!(get_run(&server, &id_of(&run)).await["status"], "running");
    wait_for("the flood to go on", || async {
        (server.last_seq(&channel).await > flooding + 1000).then_some(())
    })
    .await;

    scratch.touch("flag");
    let done = wait_final(&server, &id_of(&run)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let messages = wait_for("the exit message", || async {
        let messages = read_channel(&server, &channel, None).await;
        (messages.last()?["event"] == "exit").then_some(messages)
    })
    .await;
    assert_one_exit(&messages, &done);
    let lines = lines_of(&messages);
    assert!(lines.len() >= 30_000, "{}", lines.len());
    assert_eq!(lines.len() % 1000, 0, "whole blocks of 1,000");
    for (i, (stream, line)) in lines.iter().enumerate() {
        assert_eq!(stream, "stdout");
        assert_eq!(
            *line,
            format!("{} {PAD}", i + 1),
            "line {} out of order or lost",
            i + 1
        );
    }
    assert_no_process(&marker, "after the flood").await;
}

#[tokio::test]
async fn a_10_mb_line_arrives_whole_in_16_kib_pieces_and_unknowns_are_404() {
    let marker = marker();
    let config = job_toml(
        "bigline",
        &[
            "sh",
            "-c",
            "head -c 10000000 /dev/zero | tr '\\0' a; echo; printf 'bad\\377utf8\\n'; printf tail",
            &marker,
        ],
        &marker,
        "",
    );
    let server = start_server(config).await;
    let run = start_run(&server, "bigline", json!({})).await;
    let done = wait_final(&server, &id_of(&run)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let messages = wait_for("the exit message", || async {
        let messages = read_channel(&server, run["channel"].as_str().unwrap(), None).await;
        (messages.last()?["event"] == "exit").then_some(messages)
    })
    .await;
    assert_one_exit(&messages, &done);
    let lines = lines_of(&messages);
    let (last, rest) = lines.split_last().expect("lines");
    assert_eq!(
        last.1, "tail",
        "a last line without a newline is still sent"
    );
    let (bad, pieces) = rest.split_last().expect("lines");
    assert_eq!(bad.1, "bad\u{FFFD}utf8", "invalid UTF-8 is replaced");
    assert_eq!(pieces.len(), 10_000_000usize.div_ceil(MAX_LINE_BYTES));
    let total: usize = pieces.iter().map(|(_, l)| l.len()).sum();
    assert_eq!(total, 10_000_000, "no byte lost");
    for (i, (stream, piece)) in pieces.iter().enumerate() {
        assert_eq!(stream, "stdout");
        assert!(piece.bytes().all(|b| b == b'a'), "piece {i} intact");
        if i + 1 < pieces.len() {
            assert_eq!(piece.len(), MAX_LINE_BYTES, "piece {i}");
        }
    }

    for (status, body, what) in [
        {
            let (s, b) = server.post("/api/jobs/nope/runs", json!({})).await;
            (s, b, "start an unknown job")
        },
        {
            let (s, b) = server.get("/api/jobs/nope/runs").await;
            (s, b, "runs of an unknown job")
        },
        {
            let (s, b) = server.get("/api/runs/01ARZ3NDEKTSV4RRFFQ69G5FAV").await;
            (s, b, "an unknown run")
        },
    ] {
        assert_eq!(status, 404, "{what}: {body}");
        assert_error_body(&body, what);
    }
    assert_no_process(&marker, "after the big line").await;
}

/// The binary with no `TIDINGS*` variables inherited from the test's environment.
fn tidings() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(binary());
    for (k, _) in std::env::vars() {
        if k.starts_with("TIDINGS") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn output(mut cmd: tokio::process::Command) -> Output {
    tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("the command finished in time")
        .expect("run tidings")
}

#[tokio::test]
async fn cli_run_follow_prints_the_lines_and_exits_with_the_runs_code() {
    let marker = marker();
    let config = [
        job_toml(
            "greet",
            &[
                "sh",
                "-c",
                r#"echo "hello $TIDINGS_PARAM_WHO"; echo oops >&2; echo "bye $TIDINGS_PARAM_N"; exit 3"#,
                &marker,
            ],
            &marker,
            "params = [\"who\", \"n\"]",
        ),
        job_toml("fine", &["echo", "all good"], &marker, ""),
    ]
    .concat();
    let server = start_server(config).await;

    let mut cmd = tidings();
    cmd.args([
        "run",
        "greet",
        "--param",
        "who=wide world",
        "--param",
        "n=a=b",
        "--follow",
        "--server",
        &server.base,
    ]);
    let out = output(cmd).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stdout}\n{stderr}");
    let printed: Vec<&str> = stdout.lines().collect();
    assert_eq!(printed, ["hello wide world", "bye a=b"], "{stderr}");
    assert!(stderr.lines().any(|l| l == "oops"), "{stderr}");
    let runs = runs_of(&server, "greet").await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["trigger"], "cli");
    assert_eq!(runs[0]["params"], json!({"who": "wide world", "n": "a=b"}));
    assert_eq!(runs[0]["exit_code"], 3);

    let mut cmd = tidings();
    cmd.args(["--server", &server.base, "run", "fine", "--follow"]);
    let out = output(cmd).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "all good\n");

    // Without --follow: the run object, at once.
    let mut cmd = tidings();
    cmd.args(["run", "fine", "--server", &server.base]);
    let out = output(cmd).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run: Value = serde_json::from_slice(&out.stdout).expect("the run object as JSON on stdout");
    assert_eq!(run["job"], "fine");
    assert_eq!(run["trigger"], "cli");
    wait_final(&server, &id_of(&run)).await;

    // Refusals exit non-zero with the reason.
    for (args, reason) in [
        (
            vec!["run", "greet", "--param", "nope=1", "--follow"],
            "nope",
        ),
        (vec!["run", "no-such-job", "--follow"], "no-such-job"),
    ] {
        let mut cmd = tidings();
        cmd.args(&args).args(["--server", &server.base]);
        let out = output(cmd).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
    assert_eq!(runs_of(&server, "greet").await.len(), 1, "nothing started");
    assert_no_process(&marker, "after the CLI runs").await;
}

fn present(program: &str) -> bool {
    [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ]
    .iter()
    .any(|dir| std::path::Path::new(dir).join(program).exists())
}

/// Checks the defaults in the API answers.
fn assert_defaults(jobs: &Value, feeds: &Value) {
    let jobs = jobs["jobs"].as_array().expect("jobs list");
    let demo = jobs
        .iter()
        .find(|j| j["name"] == "demo")
        .unwrap_or_else(|| panic!("no demo job: {jobs:?}"));
    assert_eq!(demo["kind"], "command", "{demo}");
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let feeds = feeds["feeds"].as_array().expect("feeds list");
    assert_eq!(feeds.len(), 1, "{feeds:?}");
    let feed = &feeds[0];
    assert_eq!(feed["name"], "stackoverflow", "{feed}");
    assert_eq!(feed["channel"], "feeds:stackoverflow", "{feed}");
    assert_eq!(feed["source"], "config", "{feed}");
    assert!(
        feed["url"]
            .as_str()
            .is_some_and(|u| u.starts_with("https://")),
        "{feed}"
    );
    assert_eq!(
        feed["status"], "error",
        "the poll cannot reach anything: {feed}"
    );
    assert!(feed["error"].is_string(), "{feed}");
    assert!(feed["consecutive_errors"].as_u64() >= Some(1), "{feed}");
}

/// §3: with no config file, `serve` has the `demo` job and the Q&A feed. The feed would poll
/// the internet, so the server runs in its own network namespace with only loopback.
#[tokio::test]
async fn with_no_config_serve_has_the_demo_job_and_the_feed_without_touching_the_network() {
    let scratch = Scratch::new();
    let isolated = present("unshare")
        && present("ip")
        && present("curl")
        && std::process::Command::new("unshare")
            .args(["-n", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !isolated {
        // Fallback: every outgoing HTTP request of the poller goes to a closed loopback proxy.
        eprintln!("unshare -n is not available; the default feed is sent to a dead proxy");
        let proxy = "http://127.0.0.1:9".to_owned();
        let server = TestServer::start_with(ServerOptions {
            env: [
                "HTTPS_PROXY",
                "https_proxy",
                "HTTP_PROXY",
                "http_proxy",
                "ALL_PROXY",
            ]
            .iter()
            .map(|k| (k.to_string(), proxy.clone()))
            .collect(),
            ..Default::default()
        })
        .await;
        let (_, jobs) = server.get("/api/jobs").await;
        let feeds = wait_for("the feed's first poll", || async {
            let (_, feeds) = server.get("/api/feeds").await;
            (feeds["feeds"][0]["status"] == "error").then_some(feeds)
        })
        .await;
        assert_defaults(&jobs, &feeds);
        return;
    }

    let script = r#"
bin=$1; dir=$2; base=http://127.0.0.1:18080
ip link set lo up || { echo "NO-LO"; exit 90; }
cd "$dir" || exit 91
env -u TIDINGS__SERVER__LISTEN -u TIDINGS__SERVER__DATA RUST_LOG=warn "$bin" serve --listen 127.0.0.1:18080 >"$dir/out.log" 2>"$dir/err.log" &
pid=$!
up=
for i in $(seq 1 400); do
  if curl -sf "$base/healthz" >/dev/null 2>&1; then up=1; break; fi
  sleep 0.05
done
[ -n "$up" ] || { echo "NOT-UP"; cat "$dir/err.log"; kill -9 $pid; exit 92; }
echo "JOBS $(curl -s "$base/api/jobs")"
feeds=
for i in $(seq 1 400); do
  feeds=$(curl -s "$base/api/feeds")
  case "$feeds" in *'"status":"error"'*) break ;; esac
  sleep 0.05
done
echo "FEEDS $feeds"
echo "HEALTH $(curl -s -o /dev/null -w '%{http_code}' "$base/healthz")"
kill -TERM $pid
wait $pid
echo "EXIT $?"
"#;
    let dir = scratch.root();
    let mut cmd = tokio::process::Command::new("unshare");
    cmd.args(["-n", "sh", "-c", script, "sh", binary()])
        .arg(&dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, _) in std::env::vars() {
        if k.starts_with("TIDINGS") {
            cmd.env_remove(k);
        }
    }
    let out = tokio::time::timeout(WAIT * 2, cmd.output())
        .await
        .expect("the isolated server finished in time")
        .expect("run unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let field = |prefix: &str| -> String {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {stdout}\n{stderr}"))
            .to_owned()
    };
    let jobs: Value = serde_json::from_str(&field("JOBS ")).expect("jobs JSON");
    let feeds: Value = serde_json::from_str(&field("FEEDS ")).expect("feeds JSON");
    assert_defaults(&jobs, &feeds);
    assert_eq!(field("HEALTH "), "200", "the hub survived the failed poll");
    assert_eq!(field("EXIT "), "0", "a clean shutdown");
    assert!(
        dir.join("tidings-data").is_dir(),
        "the default data dir ./tidings-data was used"
    );
    let log = std::fs::read_to_string(dir.join("out.log")).unwrap_or_default();
    assert!(log.contains("listening on http://127.0.0.1:18080"), "{log}");
}
