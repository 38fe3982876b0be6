//! Jobs through the real binary (§3 jobs API, run and job objects, `[[jobs]]`; §4 a command
//! run): the run object, live output lines in order, the one `exit` message after the record is
//! final, state changes on `jobs:{name}`, the child's environment and parameters, the run token,
//! and concurrency limits. Failures, retries and restarts are in `jobs_failure`, schedules in
//! `jobs_schedule`, floods, the CLI and the defaults in `jobs_isolation`.
//!
//! Jobs that must stay running wait for a file the test creates (a flag), so nothing here
//! sleeps to synchronise. Every job carries a unique marker (as an argument and in its `env`,
//! which all its descendants inherit) so the tests can prove no process is left behind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::support::{assert_error_body, binary, wait_for, ServerOptions, TestServer, WsClient};

// ---- Helpers shared by the jobs_* modules ---------------------------------------------------

/// A folder for flag and state files, removed at the end of the test.
pub(crate) struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub(crate) fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub(crate) fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    pub(crate) fn root(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Creates the (empty) file `name`: the signal a waiting job is waiting for.
    pub(crate) fn touch(&self, name: &str) {
        std::fs::write(self.path(name), b"").expect("create flag file");
    }
}

/// A marker unique to one test, for finding its processes in `/proc`.
pub(crate) fn marker() -> String {
    format!("tidings-it-job-{}", ulid::Ulid::new())
}

/// Shell that loops until the file `$1` exists.
pub(crate) const WAIT_FOR_1: &str = r#"while [ ! -e "$1" ]; do sleep 0.05; done"#;

/// A `[[jobs]]` table. The command is written as a TOML array (JSON strings are valid TOML basic
/// strings); the marker goes into the job's `env`; `extra` holds more `key = value` lines.
pub(crate) fn job_toml(name: &str, command: &[&str], marker: &str, extra: &str) -> String {
    let command = serde_json::to_string(command).expect("encode command");
    format!(
        "[[jobs]]\nname = \"{name}\"\ncommand = {command}\nenv = {{ TIDINGS_IT_MARKER = \"{marker}\" }}\n{extra}\n\n"
    )
}

pub(crate) async fn start_server(config: String) -> TestServer {
    TestServer::start_with(ServerOptions {
        config: Some(config),
        ..Default::default()
    })
    .await
}

/// Starts a run and asserts `202` with a run object; returns it.
pub(crate) async fn start_run(server: &TestServer, job: &str, body: Value) -> Value {
    let (status, run) = server.post(&format!("/api/jobs/{job}/runs"), body).await;
    assert_eq!(status, 202, "start {job}: {run}");
    assert_run_object(&run, job);
    run
}

pub(crate) fn id_of(run: &Value) -> String {
    run["id"].as_str().expect("run id").to_owned()
}

pub(crate) fn is_final(status: &str) -> bool {
    !matches!(status, "queued" | "running")
}

/// Asserts the §3 run object's fields and their types.
pub(crate) fn assert_run_object(run: &Value, job: &str) {
    let fields = [
        "id",
        "job",
        "status",
        "trigger",
        "attempt",
        "params",
        "channel",
        "created",
        "started",
        "finished",
        "exit_code",
        "signal",
        "error",
    ];
    let object = run
        .as_object()
        .unwrap_or_else(|| panic!("not a run: {run}"));
    for field in fields {
        assert!(object.contains_key(field), "run has no {field:?}: {run}");
    }
    let id = run["id"].as_str().expect("id is a string");
    assert!(!id.is_empty());
    assert_eq!(run["job"], job, "{run}");
    assert_eq!(run["channel"], format!("jobs:{job}:{id}"), "{run}");
    let status = run["status"].as_str().expect("status");
    assert!(
        [
            "queued",
            "running",
            "succeeded",
            "failed",
            "timed_out",
            "cancelled",
            "interrupted"
        ]
        .contains(&status),
        "{run}"
    );
    assert!(
        ["schedule", "api", "cli", "ui"].contains(&run["trigger"].as_str().expect("trigger")),
        "{run}"
    );
    assert!(run["attempt"].as_u64().expect("attempt") >= 1, "{run}");
    assert!(run["params"].is_object(), "{run}");
    assert_rfc3339(&run["created"], "created");
    for time in ["started", "finished"] {
        if !run[time].is_null() {
            assert_rfc3339(&run[time], time);
        }
    }
    if is_final(status) {
        assert!(
            !run["finished"].is_null(),
            "a final run has finished: {run}"
        );
    } else {
        assert!(run["finished"].is_null(), "{run}");
        assert!(
            run["exit_code"].is_null() && run["signal"].is_null(),
            "{run}"
        );
    }
}

fn assert_rfc3339(value: &Value, what: &str) {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value}"));
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{what} {text:?} is not RFC 3339: {e}"));
}

pub(crate) async fn get_run(server: &TestServer, id: &str) -> Value {
    let (status, run) = server.get(&format!("/api/runs/{id}")).await;
    assert_eq!(status, 200, "GET run {id}: {run}");
    run
}

/// Polls the run until it is final; returns it.
pub(crate) async fn wait_final(server: &TestServer, id: &str) -> Value {
    wait_for(&format!("run {id} to finish"), || async {
        let run = get_run(server, id).await;
        is_final(run["status"].as_str()?).then_some(run)
    })
    .await
}

/// A job's runs, newest first.
pub(crate) async fn runs_of(server: &TestServer, job: &str) -> Vec<Value> {
    let (status, body) = server.get(&format!("/api/jobs/{job}/runs")).await;
    assert_eq!(status, 200, "runs of {job}: {body}");
    body["runs"].as_array().expect("runs list").clone()
}

/// One job of `GET /api/jobs`.
pub(crate) async fn job_state(server: &TestServer, job: &str) -> Value {
    let (status, body) = server.get("/api/jobs").await;
    assert_eq!(status, 200, "{body}");
    body["jobs"]
        .as_array()
        .expect("jobs list")
        .iter()
        .find(|j| j["name"] == job)
        .unwrap_or_else(|| panic!("no job {job} in {body}"))
        .clone()
}

/// Every message of `channel`, read in pages of at most 1,000 with `since`; asserts the seqs
/// are 1, 2, 3 … and nothing was truncated.
pub(crate) async fn read_channel(
    server: &TestServer,
    channel: &str,
    key: Option<&str>,
) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    loop {
        let since = all.len();
        let mut req = server.http.get(server.url(&format!(
            "/api/channels/{channel}/messages?since={since}&limit=1000"
        )));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        let (status, page) = server.send(req).await;
        assert_eq!(status, 200, "read {channel} since {since}: {page}");
        assert_eq!(page["truncated"], false, "{channel} since {since}");
        let messages = page["messages"].as_array().expect("messages");
        if messages.is_empty() {
            assert_eq!(page["last_seq"], since as u64, "{channel}: stopped early");
            return all;
        }
        for m in messages {
            assert_eq!(
                m["seq"].as_u64(),
                Some(all.len() as u64 + 1),
                "{channel}: gap or duplicate"
            );
            all.push(m.clone());
        }
    }
}

/// The `(stream, line)` of each `line` message.
pub(crate) fn lines_of(messages: &[Value]) -> Vec<(String, String)> {
    messages
        .iter()
        .filter(|m| m["event"] == "line")
        .map(|m| {
            (
                m["data"]["stream"].as_str().expect("stream").to_owned(),
                m["data"]["line"].as_str().expect("line").to_owned(),
            )
        })
        .collect()
}

/// Asserts the run's channel ends with exactly one `exit` message that matches the final run.
pub(crate) fn assert_one_exit(messages: &[Value], run: &Value) {
    let exits: Vec<&Value> = messages.iter().filter(|m| m["event"] == "exit").collect();
    assert_eq!(exits.len(), 1, "exactly one exit message: {exits:?}");
    let last = messages.last().expect("messages");
    assert_eq!(last["event"], "exit", "exit is the last message");
    assert_eq!(
        last["data"],
        json!({"status": run["status"], "exit_code": run["exit_code"], "signal": run["signal"]}),
        "exit message vs run {run}"
    );
}

/// Waits until the run's channel has a line with this text.
pub(crate) async fn wait_line(server: &TestServer, channel: &str, text: &str) {
    wait_for(&format!("line {text:?} on {channel}"), || async {
        let (_, page) = server
            .get(&format!(
                "/api/channels/{channel}/messages?since=0&limit=1000"
            ))
            .await;
        page["messages"]
            .as_array()?
            .iter()
            .any(|m| m["event"] == "line" && m["data"]["line"] == text)
            .then_some(())
    })
    .await
}

/// Live processes (not zombies) whose command line or environment holds `marker`.
pub(crate) fn processes_with(marker: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let dir = entry.path();
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        // The state follows the parenthesised command name.
        let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
        if matches!(state, Some(Some('Z' | 'X'))) {
            continue;
        }
        let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
        let environ = std::fs::read(dir.join("environ")).unwrap_or_default();
        let has = |bytes: &[u8]| bytes.windows(marker.len()).any(|w| w == marker.as_bytes());
        if has(&cmdline) || has(&environ) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

/// Asserts that no process of the test's jobs is left (polling briefly: a killed process takes
/// a moment to disappear).
pub(crate) async fn assert_no_process(marker: &str, context: &str) {
    let deadline = tokio::time::Instant::now() + crate::support::WAIT;
    loop {
        let left = processes_with(marker);
        if left.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{context}: processes left behind: {left:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Subscribes a new WebSocket to `channel` from `since` (None: live only).
pub(crate) async fn subscribe(server: &TestServer, channel: &str, since: Option<u64>) -> WsClient {
    let mut ws = server.ws().await;
    let mut op = json!({"op": "subscribe", "channel": channel});
    if let Some(since) = since {
        op["since"] = since.into();
    }
    ws.send(op).await;
    let subscribed = ws.recv().await;
    assert_eq!(subscribed["op"], "subscribed", "{subscribed}");
    ws
}

// ---- Tests -----------------------------------------------------------------------------------

/// §3/§4: the run object, lines live and in printed order on `jobs:{name}:{run}`, one `exit`
/// after the record is final, the `run` events on `jobs:{name}`, `GET /api/jobs` and the run
/// history.
#[tokio::test]
async fn a_run_streams_its_lines_live_then_one_exit_after_the_record_is_final() {
    let scratch = Scratch::new();
    let marker = marker();
    let script = format!(
        r#"echo first; {WAIT_FOR_1}; echo second >&2; while [ ! -e "$2" ]; do sleep 0.05; done; echo third"#
    );
    let flag1 = scratch.path("flag1");
    let flag2 = scratch.path("flag2");
    let config = job_toml(
        "live",
        &["sh", "-c", &script, &marker, &flag1, &flag2],
        &marker,
        "",
    );
    let server = start_server(config).await;

    let before = job_state(&server, "live").await;
    assert_eq!(before["kind"], "command", "{before}");
    assert!(before["schedule"].is_null(), "{before}");
    assert_eq!(before["concurrency"], 1, "{before}");
    assert_eq!(before["params"], json!([]), "{before}");
    assert_eq!(before["running"], json!([]), "{before}");
    assert!(before["last_run"].is_null(), "{before}");

    let mut states = subscribe(&server, "jobs:live", Some(0)).await;
    let run = start_run(&server, "live", json!({})).await;
    let id = id_of(&run);
    assert!(["queued", "running"].contains(&run["status"].as_str().unwrap()));
    assert_eq!(run["trigger"], "api");
    assert_eq!(run["attempt"], 1);
    assert_eq!(run["params"], json!({}));
    let channel = run["channel"].as_str().unwrap().to_owned();

    // Line 1 reaches a subscriber while the job is still waiting to print line 2.
    let mut ws = subscribe(&server, &channel, Some(0)).await;
    let first = ws.recv_op("message").await;
    assert_eq!(first["event"], "line", "{first}");
    assert_eq!(first["data"], json!({"stream": "stdout", "line": "first"}));
    assert_eq!(first["seq"], 1);

    let during = job_state(&server, "live").await;
    assert_eq!(during["running"], json!([id]), "{during}");
    let running = get_run(&server, &id).await;
    assert_eq!(running["status"], "running", "{running}");
    assert!(!running["started"].is_null(), "{running}");
    assert_run_object(&running, "live");

    scratch.touch("flag1");
    let second = ws.recv_op("message").await;
    assert_eq!(
        second["data"],
        json!({"stream": "stderr", "line": "second"})
    );
    scratch.touch("flag2");
    let third = ws.recv_op("message").await;
    assert_eq!(third["data"], json!({"stream": "stdout", "line": "third"}));

    let exit = ws.recv_op("message").await;
    assert_eq!(exit["event"], "exit", "{exit}");
    assert_eq!(
        exit["data"],
        json!({"status": "succeeded", "exit_code": 0, "signal": null})
    );
    // A client that sees `exit` finds the run final, and the job free.
    let done = get_run(&server, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["exit_code"], 0);
    assert!(
        done["signal"].is_null() && done["error"].is_null(),
        "{done}"
    );
    assert_run_object(&done, "live");
    let after = job_state(&server, "live").await;
    assert_eq!(after["running"], json!([]), "{after}");
    assert_eq!(after["last_run"]["id"], id.as_str(), "{after}");
    assert_eq!(after["last_run"]["status"], "succeeded", "{after}");
    // Nothing after the one exit.
    assert_eq!(ws.frames_until_pong().await, Vec::<Value>::new());

    let messages = read_channel(&server, &channel, None).await;
    assert_eq!(
        lines_of(&messages),
        [
            ("stdout".to_owned(), "first".to_owned()),
            ("stderr".to_owned(), "second".to_owned()),
            ("stdout".to_owned(), "third".to_owned()),
        ]
    );
    assert_one_exit(&messages, &done);
    for m in &messages {
        assert_eq!(m["channel"], channel.as_str());
    }

    // State changes on jobs:live: queued, running, then the final record.
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("succeeded") {
        let m = states.recv_op("message").await;
        assert_eq!(m["event"], "run", "{m}");
        assert_eq!(m["data"]["id"], id.as_str(), "{m}");
        assert_run_object(&m["data"], "live");
        seen.push(m["data"]["status"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen, ["queued", "running", "succeeded"]);
    assert_eq!(states.frames_until_pong().await, Vec::<Value>::new());

    // History, newest first (the flags exist now, so the second run goes straight through).
    let second_run = start_run(&server, "live", json!({})).await;
    let id2 = id_of(&second_run);
    assert_ne!(id, id2);
    wait_final(&server, &id2).await;
    let runs = runs_of(&server, "live").await;
    let ids: Vec<&str> = runs.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [id2.as_str(), id.as_str()]);
    for r in &runs {
        assert_run_object(r, "live");
    }
    assert_eq!(
        job_state(&server, "live").await["last_run"]["id"],
        id2.as_str()
    );
    assert_no_process(&marker, "after the runs").await;
}

/// §4: the child's environment is exactly the allowed one; parameters are declared, passed as
/// `TIDINGS_PARAM_*` verbatim and never reach a shell; bad ones are refused with nothing started.
#[tokio::test]
async fn the_child_sees_exactly_the_allowed_environment_and_params_verbatim() {
    let scratch = Scratch::new();
    let marker = marker();
    let home = scratch.path("home");
    std::fs::create_dir_all(&home).expect("home");
    let config = job_toml(
        "env",
        &["env"],
        &marker,
        "params = [\"branch\", \"account\"]",
    )
    .replace(
        "env = { TIDINGS_IT_MARKER",
        "env = { TARGET = \"release\", TIDINGS_IT_MARKER",
    );
    let server = TestServer::start_with(ServerOptions {
        config: Some(config),
        env: vec![
            ("SECRET_FROM_HUB".into(), "x".into()),
            ("HOME".into(), home.clone()),
            ("LANG".into(), "fr_FR.ISO-8859-1".into()),
            ("PATH".into(), "/opt/nowhere:/usr/bin:/bin".into()),
            ("TIDINGS_TOKEN".into(), "from-the-hub".into()),
        ],
        ..Default::default()
    })
    .await;

    let pwned = scratch.path("pwned");
    let nasty = format!("$(touch {pwned}); touch {pwned}; `touch {pwned}` | & > {pwned} \"'\\");
    let run = start_run(
        &server,
        "env",
        json!({"params": {"branch": nasty, "account": 42}}),
    )
    .await;
    assert_eq!(run["params"], json!({"branch": nasty, "account": "42"}));
    let id = id_of(&run);
    let done = wait_final(&server, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");

    let messages = read_channel(&server, &format!("jobs:env:{id}"), None).await;
    assert_one_exit(&messages, &done);
    let env: BTreeMap<String, String> = lines_of(&messages)
        .into_iter()
        .map(|(stream, line)| {
            assert_eq!(stream, "stdout");
            let (k, v) = line.split_once('=').expect("NAME=value");
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let names: BTreeSet<&str> = env.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = [
        "PATH",
        "HOME",
        "LANG",
        "TARGET",
        "TIDINGS_IT_MARKER",
        "TIDINGS_URL",
        "TIDINGS_RUN_ID",
        "TIDINGS_CHANNEL",
        "TIDINGS_TOKEN",
        "TIDINGS_PARAM_BRANCH",
        "TIDINGS_PARAM_ACCOUNT",
    ]
    .into_iter()
    .collect();
    assert_eq!(names, expected, "the child's environment: {env:?}");
    assert_eq!(env["PATH"], "/usr/local/bin:/usr/bin:/bin");
    assert_eq!(env["HOME"], home);
    assert_eq!(env["LANG"], "C.UTF-8");
    assert_eq!(env["TARGET"], "release");
    assert_eq!(env["TIDINGS_URL"], server.base);
    assert_eq!(env["TIDINGS_RUN_ID"], id);
    assert_eq!(env["TIDINGS_CHANNEL"], format!("jobs:env:{id}"));
    assert_eq!(env["TIDINGS_TOKEN"].split('.').count(), 3, "a JWT");
    assert_ne!(env["TIDINGS_TOKEN"], "from-the-hub");
    assert_eq!(env["TIDINGS_PARAM_BRANCH"], nasty, "verbatim");
    assert_eq!(env["TIDINGS_PARAM_ACCOUNT"], "42");
    assert!(
        !std::path::Path::new(&pwned).exists(),
        "a parameter reached a shell"
    );

    // Bad parameters: 400, and nothing is started.
    wait_for("the final run event on jobs:env", || async {
        (server.last_seq("jobs:env").await == 3).then_some(())
    })
    .await;
    let bad = [
        json!({"params": {"undeclared": "x"}}),
        json!({"params": {"branch": "x", "BRANCH": "y"}}),
        json!({"params": {"branch": "a".repeat(1025)}}),
        json!({"params": {"branch": "line\nbreak"}}),
        json!({"params": {"branch": "nul\u{0}byte"}}),
        json!({"params": {"branch": "esc\u{1b}[31m"}}),
        json!({"params": {"branch": {"nested": true}}}),
        json!({"params": {"branch": null}}),
        json!({"params": "branch=x"}),
        json!({"bogus": 1}),
    ];
    for body in bad {
        let (status, err) = server.post("/api/jobs/env/runs", body.clone()).await;
        assert_eq!(status, 400, "{body}: {err}");
        assert_error_body(&err, &body.to_string());
    }
    let (status, err) = server.post_raw("/api/jobs/env/runs", "{\"params\": ").await;
    assert_eq!(status, 400, "malformed JSON: {err}");
    assert_eq!(runs_of(&server, "env").await.len(), 1, "nothing started");
    assert_eq!(
        server.last_seq("jobs:env").await,
        3,
        "no run events for refused starts"
    );

    // The longest allowed value goes through.
    let longest = "é".repeat(512);
    let run = start_run(&server, "env", json!({"params": {"account": longest}})).await;
    let done = wait_final(&server, &id_of(&run)).await;
    assert_eq!(done["status"], "succeeded");
    let messages = read_channel(&server, &format!("jobs:env:{}", id_of(&run)), None).await;
    assert!(lines_of(&messages)
        .iter()
        .any(|(_, l)| *l == format!("TIDINGS_PARAM_ACCOUNT={longest}")));
    assert!(!lines_of(&messages)
        .iter()
        .any(|(_, l)| l.starts_with("TIDINGS_PARAM_BRANCH=")));
    assert!(!std::path::Path::new(&pwned).exists());
    assert_no_process(&marker, "after the env runs").await;
}

/// §3 `dir`: relative to the config file's folder; `command[0]` with a `/` is taken from there.
#[tokio::test]
async fn a_job_runs_in_its_dir_relative_to_the_config_file() {
    let marker = marker();
    let config = [
        job_toml("where", &["pwd"], &marker, "dir = \"work\""),
        job_toml("local", &["./hello.sh", "arg"], &marker, "dir = \"work\""),
    ]
    .concat();
    let server = start_server(config).await;
    // The config file sits beside the data dir.
    let work = server
        .data_dir
        .parent()
        .expect("config folder")
        .join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    let script = work.join("hello.sh");
    std::fs::write(&script, "#!/bin/sh\necho \"hello $1 from $(pwd)\"\n").expect("script");
    let mut perms = std::fs::metadata(&script).expect("meta").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&script, perms).expect("chmod");
    let work = work
        .canonicalize()
        .expect("canonical")
        .to_string_lossy()
        .into_owned();

    let run = start_run(&server, "where", json!({})).await;
    let done = wait_final(&server, &id_of(&run)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let messages = read_channel(&server, run["channel"].as_str().unwrap(), None).await;
    assert_eq!(lines_of(&messages), [("stdout".to_owned(), work.clone())]);

    // An empty body is a run without parameters.
    let (status, run) = server.post_raw("/api/jobs/local/runs", "").await;
    assert_eq!(status, 202, "{run}");
    let done = wait_final(&server, &id_of(&run)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let messages = read_channel(&server, run["channel"].as_str().unwrap(), None).await;
    assert_eq!(
        lines_of(&messages),
        [("stdout".to_owned(), format!("hello arg from {work}"))]
    );
    assert_no_process(&marker, "after the dir runs").await;
}

/// §3 Auth: a run's `TIDINGS_TOKEN` publishes to its own channel and the job's `publish`
/// patterns, nothing else, and cannot start runs.
#[tokio::test]
async fn the_run_token_publishes_to_its_channel_and_publish_patterns_only() {
    let marker = marker();
    let curl = ["/usr/local/bin/curl", "/usr/bin/curl", "/bin/curl"]
        .iter()
        .any(|p| std::path::Path::new(p).exists());
    let mut script = String::from("bin=$1\n");
    if curl {
        script.push_str(
            r#"pub() { curl -s -o /dev/null -w '%{http_code}' -X POST -H "authorization: Bearer $TIDINGS_TOKEN" -H 'content-type: application/json' --data '{"data":"from-job"}' "$TIDINGS_URL/api/channels/$1/messages"; }
echo "own $(pub "$TIDINGS_CHANNEL")"
echo "accounts $(pub accounts:42)"
echo "other $(pub other:chan)"
echo "start $(curl -s -o /dev/null -w '%{http_code}' -X POST -H "authorization: Bearer $TIDINGS_TOKEN" "$TIDINGS_URL/api/jobs/pub/runs")"
"#,
        );
    }
    script.push_str(
        r#"cli() { "$bin" publish --server "$TIDINGS_URL" --key "$TIDINGS_TOKEN" "$1" '{"via":"cli"}' >/dev/null 2>&1; echo "cli-$2 $?"; }
cli "$TIDINGS_CHANNEL" own
cli accounts:7 accounts
cli other:chan other
"#,
    );
    let config = format!(
        "[auth]\napi_keys = [\"k\"]\n\n{}",
        job_toml(
            "pub",
            &["sh", "-c", &script, &marker, binary()],
            &marker,
            "publish = [\"accounts:*\"]"
        )
    );
    let server = start_server(config).await;

    // Starting a run needs the key.
    let (status, body) = server.post("/api/jobs/pub/runs", json!({})).await;
    assert_eq!(status, 401, "{body}");
    let (status, run) = server
        .send(
            server
                .http
                .post(server.url("/api/jobs/pub/runs"))
                .bearer_auth("k")
                .json(&json!({})),
        )
        .await;
    assert_eq!(status, 202, "{run}");
    let id = id_of(&run);
    let channel = run["channel"].as_str().unwrap().to_owned();
    let done = wait_for("the run to finish", || async {
        let (_, r) = server
            .send(
                server
                    .http
                    .get(server.url(&format!("/api/runs/{id}")))
                    .bearer_auth("k"),
            )
            .await;
        is_final(r["status"].as_str()?).then_some(r)
    })
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");

    let messages = read_channel(&server, &channel, Some("k")).await;
    assert_one_exit(&messages, &done);
    let results: BTreeMap<String, String> = lines_of(&messages)
        .into_iter()
        .filter_map(|(_, l)| l.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())))
        .collect();
    if curl {
        assert_eq!(results["own"], "201", "{results:?}");
        assert_eq!(results["accounts"], "201", "{results:?}");
        assert_eq!(results["other"], "403", "{results:?}");
        assert_eq!(results["start"], "403", "a run token is not an admin key");
    }
    assert_eq!(results["cli-own"], "0", "{results:?}");
    assert_eq!(results["cli-accounts"], "0", "{results:?}");
    assert_ne!(results["cli-other"], "0", "{results:?}");

    // What the token published is there, and nothing reached other:chan.
    let published: Vec<&Value> = messages
        .iter()
        .filter(|m| m["event"] == "message")
        .collect();
    assert_eq!(published.len(), if curl { 2 } else { 1 }, "{published:?}");
    let accounts = read_channel(&server, "accounts:42", Some("k")).await;
    assert_eq!(accounts.len(), usize::from(curl));
    if curl {
        assert_eq!(accounts[0]["data"], "from-job");
    }
    let accounts7 = read_channel(&server, "accounts:7", Some("k")).await;
    assert_eq!(accounts7.len(), 1);
    assert_eq!(accounts7[0]["data"], json!({"via": "cli"}));
    assert!(read_channel(&server, "other:chan", Some("k"))
        .await
        .is_empty());
    assert_no_process(&marker, "after the token run").await;
}

/// §3/§4: a busy single-flight job answers 409 `busy` with the running run; `concurrency_key`
/// limits per parameter value; a client that sees `exit` may start the next run at once.
#[tokio::test]
async fn busy_jobs_answer_409_with_the_running_run_and_keys_limit_per_value() {
    let scratch = Scratch::new();
    let marker = marker();
    let flag = scratch.path("flag");
    let wait_script = format!("echo started; {WAIT_FOR_1}");
    let config = [
        job_toml(
            "single",
            &["sh", "-c", &wait_script, &marker, &flag],
            &marker,
            "",
        ),
        job_toml(
            "keyed",
            &["sh", "-c", &wait_script, &marker, &flag],
            &marker,
            "params = [\"account\", \"note\"]\nconcurrency_key = \"account\"\nconcurrency = 1",
        ),
        job_toml("quick", &["echo", "hi", &marker], &marker, ""),
    ]
    .concat();
    let server = start_server(config).await;

    let first = start_run(&server, "single", json!({})).await;
    let (status, body) = server.post("/api/jobs/single/runs", json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(assert_error_body(&body, "busy"), "busy");
    assert_eq!(body["run"]["id"], first["id"], "{body}");
    assert_eq!(body["run"]["status"], "running", "{body}");
    assert_run_object(&body["run"], "single");

    let k1 = start_run(&server, "keyed", json!({"params": {"account": "1"}})).await;
    let (status, body) = server
        .post(
            "/api/jobs/keyed/runs",
            json!({"params": {"account": "1", "note": "again"}}),
        )
        .await;
    assert_eq!(status, 409, "same account: {body}");
    assert_eq!(assert_error_body(&body, "busy"), "busy");
    assert_eq!(body["run"]["id"], k1["id"], "{body}");
    let k2 = start_run(&server, "keyed", json!({"params": {"account": "2"}})).await;
    assert_eq!(k2["params"], json!({"account": "2"}));
    let (status, body) = server
        .post("/api/jobs/keyed/runs", json!({"params": {"account": 2}}))
        .await;
    assert_eq!(status, 409, "account 2 (as a number) is busy too: {body}");
    assert_eq!(body["run"]["id"], k2["id"], "{body}");
    let mut running = job_state(&server, "keyed").await["running"]
        .as_array()
        .unwrap()
        .clone();
    running.sort_by_key(|v| v.as_str().unwrap().to_owned());
    let mut expected = vec![k1["id"].clone(), k2["id"].clone()];
    expected.sort_by_key(|v| v.as_str().unwrap().to_owned());
    assert_eq!(running, expected);
    assert_eq!(
        runs_of(&server, "single").await.len(),
        1,
        "a 409 starts nothing"
    );
    assert_eq!(
        runs_of(&server, "keyed").await.len(),
        2,
        "a 409 starts nothing"
    );

    scratch.touch("flag");
    for run in [&first, &k1, &k2] {
        let done = wait_final(&server, &id_of(run)).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    let again = start_run(&server, "keyed", json!({"params": {"account": "1"}})).await;
    assert_eq!(
        wait_final(&server, &id_of(&again)).await["status"],
        "succeeded"
    );

    // Seeing `exit` is enough to start the next run of a single-flight job.
    for i in 0..8 {
        let (status, run) = server.post("/api/jobs/quick/runs", json!({})).await;
        assert_eq!(status, 202, "run {i} right after the previous exit: {run}");
        let mut ws = subscribe(&server, run["channel"].as_str().unwrap(), Some(0)).await;
        loop {
            let m = ws.recv_op("message").await;
            if m["event"] == "exit" {
                assert_eq!(m["data"]["status"], "succeeded", "{m}");
                break;
            }
        }
    }
    assert_no_process(&marker, "after the concurrency runs").await;
}

/// `GET /api/jobs/{name}/runs` is newest first even for runs started within one millisecond:
/// the order the hub created them in is the order of their `queued` events on `jobs:{name}`.
#[tokio::test]
async fn run_history_is_newest_first_for_runs_started_at_once() {
    let marker = marker();
    let config = job_toml("many", &["true", &marker], &marker, "concurrency = 1000");
    let server = start_server(config).await;
    let starts = (0..60).map(|_| start_run(&server, "many", json!({})));
    let started = futures_util::future::join_all(starts).await;
    let created: Vec<String> = read_channel(&server, "jobs:many", None)
        .await
        .iter()
        .filter(|m| m["event"] == "run" && m["data"]["status"] == "queued")
        .map(|m| m["data"]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(created.len(), started.len());
    let (status, body) = server.get("/api/jobs/many/runs?limit=100").await;
    assert_eq!(status, 200, "{body}");
    let listed: Vec<String> = body["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    assert_eq!(listed, newest_first, "newest first");
    let (_, body) = server.get("/api/jobs/many/runs?limit=5").await;
    assert_eq!(body["runs"].as_array().unwrap().len(), 5, "limit");
    for run in &started {
        wait_final(&server, &id_of(run)).await;
    }
    assert_no_process(&marker, "after the history runs").await;
}
