//! Jobs that fail (§4 Failure): timeouts, signals, cancel, SIGTERM-proof and forking jobs,
//! retries, and runs caught by a `kill -9` or a SIGTERM of the hub. After each, no process of
//! the job is left.

use serde_json::{json, Value};

use crate::jobs::{
    assert_no_process, assert_one_exit, get_run, id_of, job_state, job_toml, marker, read_channel,
    runs_of, start_run, start_server, wait_final, wait_line, Scratch, WAIT_FOR_1,
};
use crate::support::{assert_error_body, wait_for, ServerOptions, TestServer};

async fn final_with_exit(server: &TestServer, run: &Value) -> Value {
    let done = wait_final(server, &id_of(run)).await;
    let channel = done["channel"].as_str().unwrap().to_owned();
    let messages = wait_for("the exit message", || async {
        let messages = read_channel(server, &channel, None).await;
        messages
            .iter()
            .any(|m| m["event"] == "exit")
            .then_some(messages)
    })
    .await;
    assert_one_exit(&messages, &done);
    done
}

#[tokio::test]
async fn timeouts_signals_exit_codes_and_missing_commands_are_recorded() {
    let marker = marker();
    let config = [
        job_toml(
            "slow",
            &["sh", "-c", "echo ready; sleep 1000", &marker],
            &marker,
            "timeout = \"1s\"",
        ),
        job_toml(
            "segv",
            &["sh", "-c", "ulimit -c 0; kill -SEGV $$", &marker],
            &marker,
            "",
        ),
        job_toml(
            "three",
            &["sh", "-c", "echo bye; exit 3", &marker],
            &marker,
            "",
        ),
        job_toml(
            "missing",
            &["tidings-it-no-such-command", &marker],
            &marker,
            "",
        ),
    ]
    .concat();
    let server = start_server(config).await;
    let slow = start_run(&server, "slow", json!({})).await;
    let segv = start_run(&server, "segv", json!({})).await;
    let three = start_run(&server, "three", json!({})).await;
    let missing = start_run(&server, "missing", json!({})).await;

    let done = final_with_exit(&server, &slow).await;
    assert_eq!(done["status"], "timed_out", "{done}");
    assert_eq!(done["signal"], "SIGTERM", "{done}");
    assert!(done["exit_code"].is_null(), "{done}");

    let done = final_with_exit(&server, &segv).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["signal"], "SIGSEGV", "{done}");
    assert!(done["exit_code"].is_null(), "{done}");

    let done = final_with_exit(&server, &three).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["exit_code"], 3, "{done}");
    assert!(done["signal"].is_null(), "{done}");

    let done = final_with_exit(&server, &missing).await;
    assert_eq!(done["status"], "failed", "{done}");
    let error = done["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("tidings-it-no-such-command") && error.contains("not found"),
        "{done}"
    );
    assert!(done["exit_code"].is_null() && done["signal"].is_null());

    assert_no_process(&marker, "after timeouts and crashes").await;
    let (status, _) = server.get("/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn cancel_ends_the_whole_group_even_when_it_ignores_sigterm_or_forks() {
    let marker = marker();
    let config = [
        job_toml(
            "polite",
            &["sh", "-c", "echo ready; sleep 1000", &marker],
            &marker,
            "",
        ),
        job_toml(
            "stubborn",
            &[
                "sh",
                "-c",
                "trap '' TERM; echo ready; sleep 1000; echo never",
                &marker,
            ],
            &marker,
            "kill_grace = \"500ms\"",
        ),
        job_toml(
            "forker",
            &[
                "sh",
                "-c",
                "sleep 1000 & sleep 1000 & echo ready; wait",
                &marker,
            ],
            &marker,
            "",
        ),
    ]
    .concat();
    let server = start_server(config).await;
    let cases = [
        ("polite", "SIGTERM"),
        ("stubborn", "SIGKILL"),
        ("forker", "SIGTERM"),
    ];
    let mut runs = Vec::new();
    for (job, _) in cases {
        let run = start_run(&server, job, json!({})).await;
        wait_line(&server, run["channel"].as_str().unwrap(), "ready").await;
        runs.push(run);
    }
    for run in &runs {
        let (status, body) = server.delete(&format!("/api/runs/{}", id_of(run))).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["id"], run["id"], "{body}");
    }
    for ((job, signal), run) in cases.iter().zip(&runs) {
        let done = final_with_exit(&server, run).await;
        assert_eq!(done["status"], "cancelled", "{job}: {done}");
        assert_eq!(done["signal"], *signal, "{job}: {done}");
        assert!(done["exit_code"].is_null(), "{job}: {done}");
        let messages = read_channel(&server, done["channel"].as_str().unwrap(), None).await;
        assert!(
            !messages.iter().any(|m| m["data"]["line"] == "never"),
            "{job}"
        );
        // A finished run is returned unchanged, with 200.
        for _ in 0..2 {
            let (status, body) = server.delete(&format!("/api/runs/{}", id_of(run))).await;
            assert_eq!(status, 200, "{job}: {body}");
            assert_eq!(body, done, "{job}: unchanged");
        }
        assert_eq!(get_run(&server, &id_of(run)).await, done);
    }
    assert_no_process(&marker, "after cancelling").await;

    for id in ["01ARZ3NDEKTSV4RRFFQ69G5FAV", "no-such-run"] {
        let (status, body) = server.delete(&format!("/api/runs/{id}")).await;
        assert_eq!(status, 404, "{body}");
        assert_error_body(&body, "DELETE unknown run");
        let (status, body) = server.get(&format!("/api/runs/{id}")).await;
        assert_eq!(status, 404, "{body}");
        assert_error_body(&body, "GET unknown run");
    }
}

/// A run waiting for a global slot (`limits.max_concurrent_runs`) is `queued`; cancelling it
/// finalises it at once and it never starts.
#[tokio::test]
async fn a_queued_run_can_be_cancelled_and_never_starts() {
    let scratch = Scratch::new();
    let marker = marker();
    let flag = scratch.path("flag");
    let config = format!(
        "[limits]\nmax_concurrent_runs = 1\n\n{}{}",
        job_toml(
            "hold",
            &["sh", "-c", WAIT_FOR_1, &marker, &flag],
            &marker,
            ""
        ),
        job_toml("next", &["echo", "started", &marker], &marker, ""),
    );
    let server = start_server(config).await;
    let hold = start_run(&server, "hold", json!({})).await;
    let next = start_run(&server, "next", json!({})).await;
    assert_eq!(next["status"], "queued", "{next}");
    assert!(next["started"].is_null());
    let (status, body) = server.delete(&format!("/api/runs/{}", id_of(&next))).await;
    assert_eq!(status, 202, "{body}");
    let done = final_with_exit(&server, &next).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(done["started"].is_null(), "{done}");
    scratch.touch("flag");
    assert_eq!(final_with_exit(&server, &hold).await["status"], "succeeded");
    let messages = read_channel(&server, next["channel"].as_str().unwrap(), None).await;
    assert_eq!(messages.len(), 1, "only the exit: {messages:?}");
    assert_eq!(get_run(&server, &id_of(&next)).await["status"], "cancelled");
    assert_no_process(&marker, "after the queued run").await;
}

/// §3 `retries`: a failed run is retried as a new run with attempt 2 (after ~5 s of backoff).
#[tokio::test]
async fn a_failed_run_is_retried_as_attempt_2() {
    let scratch = Scratch::new();
    let marker = marker();
    let state = scratch.path("state");
    let script = r#"if [ -e "$1" ]; then echo second; exit 0; fi; : > "$1"; echo first; exit 1"#;
    let config = job_toml(
        "flaky",
        &["sh", "-c", script, &marker, &state],
        &marker,
        "retries = 1\nparams = [\"who\"]",
    );
    let server = start_server(config).await;
    let first = start_run(&server, "flaky", json!({"params": {"who": "x"}})).await;
    let done = final_with_exit(&server, &first).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["exit_code"], 1);

    let retry = wait_for("the retry (attempt 2)", || async {
        runs_of(&server, "flaky")
            .await
            .into_iter()
            .find(|r| r["id"] != first["id"])
    })
    .await;
    assert_eq!(retry["attempt"], 2, "{retry}");
    assert_eq!(retry["params"], json!({"who": "x"}), "{retry}");
    assert_eq!(retry["trigger"], "api", "{retry}");
    assert_ne!(retry["channel"], first["channel"]);
    let done = final_with_exit(&server, &retry).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let lines: Vec<Value> = read_channel(&server, done["channel"].as_str().unwrap(), None)
        .await
        .into_iter()
        .filter(|m| m["event"] == "line")
        .map(|m| m["data"]["line"].clone())
        .collect();
    assert_eq!(lines, [json!("second")]);
    let runs = runs_of(&server, "flaky").await;
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(runs[0]["id"], retry["id"], "newest first");
    assert_eq!(get_run(&server, &id_of(&first)).await["status"], "failed");
    assert_no_process(&marker, "after the retry").await;
}

/// §4: a run caught by `kill -9` is `interrupted` at the next start (with its `exit`
/// message) and retried as attempt 2 when `retries` allows.
#[tokio::test]
async fn a_run_caught_by_kill_9_is_interrupted_at_restart_and_retried() {
    let scratch = Scratch::new();
    let marker = marker();
    let flag = scratch.path("flag");
    let script = format!("echo started; {WAIT_FOR_1}; echo done");
    let config = [
        job_toml(
            "victim",
            &["sh", "-c", &script, &marker, &flag],
            &marker,
            "retries = 1\nparams = [\"n\"]",
        ),
        job_toml("once", &["sh", "-c", &script, &marker, &flag], &marker, ""),
    ]
    .concat();
    let mut server = start_server(config.clone()).await;
    let run = start_run(&server, "victim", json!({"params": {"n": "7"}})).await;
    let id = id_of(&run);
    let channel = run["channel"].as_str().unwrap().to_owned();
    let once = start_run(&server, "once", json!({})).await;
    wait_line(&server, &channel, "started").await;
    wait_line(&server, once["channel"].as_str().unwrap(), "started").await;
    server.kill9().await;
    // The killed hub could not stop its runs: their processes are orphans now.
    assert!(
        processes_of_run(&id) > 0,
        "the orphan of the killed hub is running"
    );

    let restarted = TestServer::start_with(ServerOptions {
        config: Some(config),
        data_dir: Some(server.data_dir.clone()),
        ..Default::default()
    })
    .await;
    // Recovery kills what the interrupted runs left behind (found by TIDINGS_RUN_ID).
    for run in [&id, &id_of(&once)] {
        wait_for("the orphans of an interrupted run to be killed", || async {
            (processes_of_run(run) == 0).then_some(())
        })
        .await;
    }
    scratch.touch("flag");
    let interrupted = get_run(&restarted, &id).await;
    assert_eq!(interrupted["status"], "interrupted", "{interrupted}");
    assert!(!interrupted["finished"].is_null(), "{interrupted}");
    assert!(interrupted["error"].is_string(), "{interrupted}");
    let messages = read_channel(&restarted, &channel, None).await;
    assert_eq!(messages[0]["data"]["line"], "started");
    assert_one_exit(&messages, &interrupted);
    // Without retries: interrupted, and so listed.
    let once_run = get_run(&restarted, &id_of(&once)).await;
    assert_eq!(once_run["status"], "interrupted", "{once_run}");
    let state = job_state(&restarted, "once").await;
    assert_eq!(state["running"], json!([]), "{state}");
    assert_eq!(
        state["last_run"], once_run,
        "GET /api/jobs shows the interrupted run"
    );
    assert_eq!(runs_of(&restarted, "once").await.len(), 1, "no retry");

    let retry = wait_for("the retry of the interrupted run", || async {
        runs_of(&restarted, "victim")
            .await
            .into_iter()
            .find(|r| r["id"] != id.as_str())
    })
    .await;
    assert_eq!(retry["attempt"], 2, "{retry}");
    assert_eq!(retry["params"], json!({"n": "7"}), "{retry}");
    let done = final_with_exit(&restarted, &retry).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_no_process(&marker, "after the retry").await;
}

/// §4/§7: on SIGTERM the hub cancels running runs (recorded `cancelled`), leaves no process
/// and exits 0.
#[tokio::test]
async fn sigterm_cancels_running_runs_and_exits_0() {
    let scratch = Scratch::new();
    let marker = marker();
    let flag = scratch.path("never");
    let script = format!("echo started; {WAIT_FOR_1}");
    // One global slot, so a second run waits `queued` when the hub stops.
    let config = format!(
        "[limits]\nmax_concurrent_runs = 1\n\n{}{}",
        job_toml(
            "busy",
            &["sh", "-c", &script, &marker, &flag],
            &marker,
            "retries = 3",
        ),
        job_toml("after", &["echo", "never", &marker], &marker, ""),
    );
    let mut server = start_server(config.clone()).await;
    let run = start_run(&server, "busy", json!({})).await;
    let id = id_of(&run);
    let channel = run["channel"].as_str().unwrap().to_owned();
    wait_line(&server, &channel, "started").await;
    let queued = start_run(&server, "after", json!({})).await;
    assert_eq!(queued["status"], "queued", "{queued}");
    let status = server.terminate().await;
    assert!(status.success(), "exit status {status:?}");
    assert_no_process(&marker, "after SIGTERM").await;

    let restarted = TestServer::start_with(ServerOptions {
        config: Some(config),
        data_dir: Some(server.data_dir.clone()),
        ..Default::default()
    })
    .await;
    let done = get_run(&restarted, &id).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(done["signal"], "SIGTERM", "{done}");
    let messages = read_channel(&restarted, &channel, None).await;
    assert_one_exit(&messages, &done);
    let runs = runs_of(&restarted, "busy").await;
    assert_eq!(runs.len(), 1, "a cancelled run is not retried: {runs:?}");
    // The queued run is cancelled too, never started, and its followers got an `exit`.
    let never = get_run(&restarted, &id_of(&queued)).await;
    assert_eq!(never["status"], "cancelled", "{never}");
    assert!(never["started"].is_null(), "{never}");
    let messages = read_channel(&restarted, queued["channel"].as_str().unwrap(), None).await;
    assert_eq!(messages.len(), 1, "only the exit: {messages:?}");
    assert_one_exit(&messages, &never);
    assert_no_process(&marker, "after the restart").await;
}

/// Live (non-zombie) processes whose environment carries `TIDINGS_RUN_ID={run}`.
fn processes_of_run(run: &str) -> usize {
    let needle = format!("TIDINGS_RUN_ID={run}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter(|e| {
            let zombie = std::fs::read_to_string(e.path().join("stat"))
                .ok()
                .and_then(|stat| {
                    stat.rsplit_once(") ")
                        .map(|(_, rest)| rest.starts_with('Z'))
                })
                .unwrap_or(true);
            !zombie
        })
        .filter(|e| {
            std::fs::read(e.path().join("environ"))
                .map(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
                .unwrap_or(false)
        })
        .count()
}
