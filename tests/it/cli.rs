//! The command line (§3 CLI, Configuration): `publish`, `tail`, credentials, help, `serve --check`,
//! environment overrides and JSON logs.

use std::process::{Output, Stdio};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::support::{binary, ServerOptions, TestServer, WAIT};

/// The binary with no `TIDINGS*` variables inherited from the test's environment.
fn tidings() -> Command {
    let mut cmd = Command::new(binary());
    for (k, _) in std::env::vars() {
        if k.starts_with("TIDINGS") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "warn").kill_on_drop(true);
    cmd
}

async fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null());
    tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("the command finished in time")
        .expect("run tidings")
}

async fn run_args(args: &[&str]) -> Output {
    let mut cmd = tidings();
    cmd.args(args);
    run(cmd).await
}

fn stdout_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {text:?}"))
}

struct Tail {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Tail {
    fn spawn(mut cmd: Command) -> Self {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn tail");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Self { child, lines }
    }

    async fn next_json(&mut self) -> Value {
        let line = tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .expect("a line in time")
            .expect("read")
            .expect("tail exited");
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not one JSON message ({e}): {line:?}"))
    }

    async fn stop(mut self) {
        self.child.kill().await.expect("kill tail");
    }
}

#[tokio::test]
async fn publish_prints_the_result() {
    let server = TestServer::start().await;
    let out = run_args(&["publish", "cli:pub", "{\"a\":1}", "--server", &server.base]).await;
    let result = stdout_json(&out);
    assert_eq!(result["channel"], "cli:pub");
    assert_eq!(result["seq"], 1);
    assert_eq!(result["duplicate"], false);
    assert!(result["id"].as_str().is_some_and(|s| !s.is_empty()));

    // Flags before the subcommand; text that is not JSON becomes a string.
    let out = run_args(&[
        "--server",
        &server.base,
        "publish",
        "cli:pub",
        "hello world",
    ])
    .await;
    assert_eq!(stdout_json(&out)["seq"], 2);

    // Data from standard input with "-".
    let mut cmd = tidings();
    cmd.args(["publish", "cli:pub", "-", "--server", &server.base])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(b"{\"from\":\"stdin\"}\n")
        .await
        .expect("write");
    drop(stdin);
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("in time")
        .expect("output");
    assert_eq!(stdout_json(&out)["seq"], 3);

    // TIDINGS_URL instead of --server.
    let mut cmd = tidings();
    cmd.args(["publish", "cli:pub", "4"])
        .env("TIDINGS_URL", &server.base);
    assert_eq!(stdout_json(&run(cmd).await)["seq"], 4);

    let (status, page) = server.get("/api/channels/cli:pub/messages?since=0").await;
    assert_eq!(status, 200);
    let data: Vec<&Value> = page["messages"]
        .as_array()
        .expect("list")
        .iter()
        .map(|m| &m["data"])
        .collect();
    assert_eq!(
        data,
        [
            &json!({"a": 1}),
            &json!("hello world"),
            &json!({"from": "stdin"}),
            &json!(4)
        ]
    );
}

#[tokio::test]
async fn publish_with_event_and_id_is_idempotent() {
    let server = TestServer::start().await;
    let args = [
        "publish",
        "cli:idem",
        "{\"n\":1}",
        "--event",
        "build.done",
        "--id",
        "run-7",
        "--server",
        &server.base,
    ];
    let first = stdout_json(&run_args(&args).await);
    assert_eq!(
        first,
        json!({"channel": "cli:idem", "seq": 1, "id": "run-7", "duplicate": false})
    );
    let second = stdout_json(&run_args(&args).await);
    assert_eq!(
        second,
        json!({"channel": "cli:idem", "seq": 1, "id": "run-7", "duplicate": true})
    );
    let (_, page) = server.get("/api/channels/cli:idem/messages?since=0").await;
    assert_eq!(page["last_seq"], 1);
    assert_eq!(page["messages"][0]["event"], "build.done");
    assert_eq!(page["messages"][0]["id"], "run-7");

    // A refused publish exits non-zero and says why.
    let out = run_args(&[
        "publish",
        "cli:idem",
        "1",
        "--event",
        "bad event",
        "--server",
        &server.base,
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("400"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn tail_prints_history_then_live_messages() {
    let server = TestServer::start().await;
    for i in 1..=2 {
        let (status, _) = server.publish("cli:tail", json!({"data": {"i": i}})).await;
        assert_eq!(status, 201);
    }
    let mut cmd = tidings();
    cmd.args(["tail", "cli:tail", "--since", "0", "--server", &server.base]);
    let mut tail = Tail::spawn(cmd);
    for i in 1..=2u64 {
        let m = tail.next_json().await;
        assert_eq!(m["channel"], "cli:tail");
        assert_eq!(m["seq"], i);
        assert_eq!(m["data"]["i"], i);
    }
    let (status, _) = server
        .publish("cli:tail", json!({"data": {"i": 3}, "event": "late"}))
        .await;
    assert_eq!(status, 201);
    let m = tail.next_json().await;
    assert_eq!(m["seq"], 3);
    assert_eq!(m["event"], "late");
    tail.stop().await;
}

#[tokio::test]
async fn tail_without_since_prints_new_messages_only() {
    let server = TestServer::start().await;
    let (status, _) = server.publish("cli:live", json!({"data": "old"})).await;
    assert_eq!(status, 201);
    let mut cmd = tidings();
    cmd.args(["--server", &server.base, "tail", "cli:live"]);
    let mut tail = Tail::spawn(cmd);
    server.wait_subscribers("cli:live", 1).await;
    let (status, _) = server.publish("cli:live", json!({"data": "new"})).await;
    assert_eq!(status, 201);
    let m = tail.next_json().await;
    assert_eq!(m["seq"], 2);
    assert_eq!(m["data"], "new");
    tail.stop().await;
}

#[tokio::test]
async fn client_commands_send_the_key() {
    let server = TestServer::start_with(ServerOptions {
        config: Some("[auth]\napi_keys = [\"k1\"]\n".into()),
        ..Default::default()
    })
    .await;
    let out = run_args(&["publish", "cli:secret", "1", "--server", &server.base]).await;
    assert!(!out.status.success(), "published without a key");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_args(&[
        "publish",
        "cli:secret",
        "1",
        "--server",
        &server.base,
        "--key",
        "nope",
    ])
    .await;
    assert!(!out.status.success(), "published with a wrong key");
    assert!(String::from_utf8_lossy(&out.stderr).contains("403"));

    let out = run_args(&[
        "publish",
        "cli:secret",
        "1",
        "--server",
        &server.base,
        "--key",
        "k1",
    ])
    .await;
    assert_eq!(stdout_json(&out)["seq"], 1);
    let out = run_args(&[
        "--key",
        "k1",
        "--server",
        &server.base,
        "publish",
        "cli:secret",
        "2",
    ])
    .await;
    assert_eq!(stdout_json(&out)["seq"], 2);
    let mut cmd = tidings();
    cmd.args(["publish", "cli:secret", "3", "--server", &server.base])
        .env("TIDINGS_KEY", "k1");
    assert_eq!(stdout_json(&run(cmd).await)["seq"], 3);

    // tail needs it too.
    let out = run_args(&[
        "tail",
        "cli:secret",
        "--since",
        "0",
        "--server",
        &server.base,
    ])
    .await;
    assert!(!out.status.success(), "tailed without a key");
    let mut cmd = tidings();
    cmd.args([
        "tail",
        "cli:secret",
        "--since",
        "1",
        "--server",
        &server.base,
    ])
    .env("TIDINGS_KEY", "k1");
    let mut tail = Tail::spawn(cmd);
    assert_eq!(tail.next_json().await["seq"], 2);
    assert_eq!(tail.next_json().await["seq"], 3);
    tail.stop().await;
}

#[tokio::test]
async fn help_documents_the_commands() {
    let out = run_args(&["--help"]).await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["serve", "publish", "tail", "--server", "--key"] {
        assert!(text.contains(word), "tidings --help lacks {word}: {text}");
    }
    let out = run_args(&["serve", "--help"]).await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--config",
        "--listen",
        "--data",
        "--engine",
        "--insecure",
        "--check",
        "--log-format",
    ] {
        assert!(
            text.contains(word),
            "tidings serve --help lacks {word}: {text}"
        );
    }
    let out = run_args(&["publish", "--help"]).await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["--event", "--id", "CHANNEL"] {
        assert!(
            text.contains(word),
            "tidings publish --help lacks {word}: {text}"
        );
    }
    let out = run_args(&["tail", "--help"]).await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--since"));
    // An unknown subcommand is an error.
    let out = run_args(&["frobnicate"]).await;
    assert!(!out.status.success());
}

#[tokio::test]
async fn serve_check_names_the_bad_key() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let cases = [
        (
            "[limits]\ndedupe_window = \"soon\"\n",
            "limits.dedupe_window",
        ),
        (
            "[server]\nmax_subscriptions_per_connection = 0\n",
            "server.max_subscriptions_per_connection",
        ),
        ("[server]\nlisten = 5\n", "server.listen"),
        ("[typo]\nx = 1\n", "typo"),
        ("[server\n", "configuration"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = tmp.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).expect("write");
        let out = run_args(&[
            "serve",
            "--check",
            "--config",
            path.to_str().expect("utf-8"),
        ])
        .await;
        assert!(!out.status.success(), "{text:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(key),
            "{text:?}: stderr does not name {key}: {stderr}"
        );
    }
    // A missing file is an error too; a valid one passes.
    let missing = tmp.path().join("missing.toml");
    let out = run_args(&[
        "serve",
        "--check",
        "--config",
        missing.to_str().expect("utf-8"),
    ])
    .await;
    assert!(!out.status.success());
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/tidings.example.toml");
    let out = run_args(&["serve", "--check", "--config", example]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A malformed config is refused by a real start too, before it listens.
    let path = tmp.path().join("bad0.toml");
    let out = run_args(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--config",
        path.to_str().expect("utf-8"),
    ])
    .await;
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.dedupe_window"));
}

#[tokio::test]
async fn environment_overrides_the_file_and_flags_override_the_environment() {
    let server = TestServer::start_with(ServerOptions {
        config: Some("[server]\nmax_subscriptions_per_connection = 5\n".into()),
        env: vec![
            (
                "TIDINGS__SERVER__MAX_SUBSCRIPTIONS_PER_CONNECTION".into(),
                "2".into(),
            ),
            // The harness passes --listen 127.0.0.1:0, which must win over this.
            ("TIDINGS__SERVER__LISTEN".into(), "127.0.0.1:1".into()),
        ],
        ..Default::default()
    })
    .await;
    assert_ne!(
        server.addr.port(),
        1,
        "the --listen flag wins over the environment"
    );
    let mut ws = server.ws().await;
    for i in 0..2 {
        ws.send(json!({"op": "subscribe", "channel": format!("env:{i}")}))
            .await;
        assert_eq!(ws.recv().await["op"], "subscribed");
    }
    ws.send(json!({"op": "subscribe", "channel": "env:2"}))
        .await;
    let v = ws.recv().await;
    assert_eq!(
        v["op"], "error",
        "the environment's limit of 2 applies, not the file's 5: {v}"
    );
    assert_eq!(v["code"], "too_many_subscriptions");
}

#[tokio::test]
async fn a_bad_environment_value_is_refused_naming_the_key() {
    let mut cmd = tidings();
    cmd.args(["serve", "--check"])
        .env("TIDINGS__LIMITS__DEDUPE_WINDOW", "whenever");
    let out = run(cmd).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.dedupe_window"));
}

/// Starts `serve` with `format` logs at info level and returns its first stderr lines (up to
/// and including the one that says it is listening).
async fn startup_log_lines(format: Option<&str>) -> Vec<String> {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut cmd = tidings();
    if let Some(f) = format {
        cmd.args(["--log-format", f]);
    }
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(tmp.path().join("data"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.expect("read") {
            let done = line.contains("listening");
            seen.push(line);
            if done {
                return;
            }
        }
        panic!("tidings exited before logging that it listens: {seen:?}");
    })
    .await
    .expect("a startup log line in time");
    child.kill().await.expect("kill");
    seen
}

#[tokio::test]
async fn log_format_json_makes_log_lines_json() {
    let lines = startup_log_lines(Some("json")).await;
    assert!(!lines.is_empty());
    for line in &lines {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
        assert!(v["timestamp"].is_string(), "{line}");
    }
    let human = startup_log_lines(None).await;
    assert!(
        human
            .iter()
            .all(|l| serde_json::from_str::<Value>(l).is_err()),
        "human logs are not JSON: {human:?}"
    );
}

#[tokio::test]
async fn publish_to_an_unreachable_hub_fails_clearly() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let out = run_args(&["publish", "cli:x", "1", "--server", &url]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&url), "the error names the hub: {stderr}");
}
