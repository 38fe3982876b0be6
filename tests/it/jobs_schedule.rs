//! Schedules (§4): `every` runs at start-up and then every interval, a busy single-flight job
//! skips (and counts) ticks instead of queueing them, cron with a seconds field fires, and a
//! malformed schedule stops `tidings serve` with the key named.

use std::process::Stdio;

use serde_json::Value;

use crate::jobs::{
    assert_no_process, assert_run_object, job_state, job_toml, marker, runs_of, start_server,
    wait_final, Scratch, WAIT_FOR_1,
};
use crate::support::{binary, wait_for, WAIT};

#[tokio::test]
async fn every_and_cron_schedules_fire_and_busy_ticks_are_skipped_not_queued() {
    let scratch = Scratch::new();
    let marker = marker();
    let flag = scratch.path("flag");
    let config = [
        job_toml(
            "ticker",
            &["echo", "tick", &marker],
            &marker,
            "every = \"1s\"",
        ),
        job_toml(
            "hourly",
            &["echo", "hour", &marker],
            &marker,
            "every = \"1h\"",
        ),
        job_toml(
            "slowpoke",
            &["sh", "-c", WAIT_FOR_1, &marker, &flag],
            &marker,
            "every = \"1s\"",
        ),
        job_toml(
            "cronny",
            &["echo", "cron", &marker],
            &marker,
            "cron = \"*/1 * * * * *\"",
        ),
    ]
    .concat();
    let mut server = start_server(config).await;

    // `every` fires at start-up: the next "1h" tick is far beyond this test.
    let hourly = wait_for("the start-up run of the 1h job", || async {
        runs_of(&server, "hourly").await.into_iter().next()
    })
    .await;
    assert_eq!(hourly["trigger"], "schedule", "{hourly}");
    assert_run_object(&hourly, "hourly");
    assert_eq!(
        job_state(&server, "hourly").await["schedule"],
        "every 1h",
        "schedule as listed"
    );

    // The busy single-flight job: ticks are skipped and counted; never two runs, none queued.
    let skipped = wait_for("two skipped ticks", || async {
        let state = job_state(&server, "slowpoke").await;
        let running = state["running"].as_array().expect("running").len();
        assert!(running <= 1, "two runs at once: {state}");
        let skipped = state["skipped_ticks"].as_u64().expect("skipped_ticks");
        (skipped >= 2).then_some(skipped)
    })
    .await;
    let runs = runs_of(&server, "slowpoke").await;
    assert_eq!(runs.len(), 1, "skipped ticks are not queued: {runs:?}");
    assert_eq!(runs[0]["status"], "running", "{runs:?}");
    assert_eq!(runs[0]["trigger"], "schedule");
    scratch.touch("flag");
    let done = wait_final(&server, runs[0]["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let later = job_state(&server, "slowpoke").await;
    assert!(later["skipped_ticks"].as_u64().unwrap() >= skipped);
    let all = runs_of(&server, "slowpoke").await;
    assert!(
        all.iter().all(|r| r["status"] != "queued"),
        "no queued runs: {all:?}"
    );

    // `every = "1s"` keeps going; cron with seconds fires.
    let ticks = wait_for("two runs of the 1s job", || async {
        let runs = runs_of(&server, "ticker").await;
        (runs.len() >= 2).then_some(runs)
    })
    .await;
    assert!(ticks.iter().all(|r| r["trigger"] == "schedule"));
    assert_ne!(ticks[0]["id"], ticks[1]["id"]);
    let cron: Value = wait_for("a cron run", || async {
        runs_of(&server, "cronny").await.into_iter().next()
    })
    .await;
    assert_eq!(cron["trigger"], "schedule", "{cron}");
    let state = job_state(&server, "cronny").await;
    assert!(
        state["schedule"]
            .as_str()
            .is_some_and(|s| s.contains("*/1 * * * * *")),
        "{state}"
    );
    let text = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        text.lines()
            .any(|l| l.starts_with("tidings_job_runs_total") && l.contains("job=\"ticker\"")),
        "{text}"
    );
    let status = server.terminate().await;
    assert!(status.success(), "{status:?}");
    assert_no_process(&marker, "after the scheduler test").await;
}

#[tokio::test]
async fn a_malformed_schedule_stops_serve_with_the_key_named() {
    let scratch = Scratch::new();
    let ok = "[[jobs]]\nname = \"fine\"\ncommand = [\"true\"]\nevery = \"10s\"\n\n";
    let cases = [
        (
            "[[jobs]]\nname = \"a\"\ncommand = [\"true\"]\ncron = \"61 * * * * *\"\n".to_owned(),
            "jobs[0].cron",
        ),
        (
            format!("{ok}[[jobs]]\nname = \"b\"\ncommand = [\"true\"]\ncron = \"* * *\"\n"),
            "jobs[1].cron",
        ),
        (
            "[[jobs]]\nname = \"c\"\ncommand = [\"true\"]\nevery = \"soon\"\n".to_owned(),
            "jobs[0].every",
        ),
        (
            "[[jobs]]\nname = \"d\"\ncommand = [\"true\"]\ntimeout = \"1 fortnight\"\n".to_owned(),
            "jobs[0].timeout",
        ),
        (
            "[[jobs]]\nname = \"e\"\ncommand = [\"true\"]\ncron = \"* * * * *\"\ntimezone = \"Mars/Olympus\"\n"
                .to_owned(),
            "jobs[0].timezone",
        ),
    ];
    for (i, (toml, key)) in cases.iter().enumerate() {
        let path = scratch.path(&format!("bad{i}.toml"));
        std::fs::write(&path, toml).expect("write config");
        let mut cmd = tokio::process::Command::new(binary());
        for (k, _) in std::env::vars() {
            if k.starts_with("TIDINGS") {
                cmd.env_remove(k);
            }
        }
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            &path,
            "--data",
        ])
        .arg(scratch.root().join(format!("data{i}")))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
        let out = tokio::time::timeout(WAIT, cmd.output())
            .await
            .expect("serve exits in time")
            .expect("run tidings");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key}: started anyway: {stdout}");
        assert!(
            !stdout.contains("listening"),
            "{key}: listened anyway: {stdout}"
        );
        assert!(stderr.contains(key), "{key} not named: {stderr}");
        // `--check` refuses it the same way.
        let mut check = tokio::process::Command::new(binary());
        check
            .args(["serve", "--check", "--config", &path])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(WAIT, check.output())
            .await
            .expect("check exits in time")
            .expect("run tidings");
        assert!(!out.status.success(), "{key}: --check accepted it");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(key),
            "{key}: --check did not name it"
        );
    }
}

/// §4: missed ticks are not replayed, but `catch_up = true` runs once at start-up when a tick
/// fell while the hub was down. The last tick is seeded a year back, so a yearly cron's
/// Jan 1 tick was certainly missed; exactly one catch-up run follows, not one per missed tick.
#[tokio::test]
async fn catch_up_runs_once_at_start_up_after_a_missed_tick() {
    let config = "[[jobs]]\nname = \"yearly\"\ncommand = [\"true\"]\ncron = \"0 0 1 1 *\"\ncatch_up = true\n"
        .to_owned();
    let mut server = start_server(config.clone()).await;
    assert!(
        runs_of(&server, "yearly").await.is_empty(),
        "no tick is due yet"
    );
    let dir = server.data_dir.clone();
    assert!(server.terminate().await.success());
    let year_ago = tidings::clock::now_ms() - 366 * 24 * 3600 * 1000;
    let state = rusqlite::Connection::open(dir.join("state.db")).expect("state.db");
    state
        .execute(
            "INSERT OR REPLACE INTO docs (kind, key, json) VALUES ('job_tick', 'yearly', ?1)",
            [year_ago.to_string()],
        )
        .expect("seed the last tick");
    drop(state);
    let restarted = crate::support::TestServer::start_with(crate::support::ServerOptions {
        config: Some(config),
        data_dir: Some(dir),
        ..Default::default()
    })
    .await;
    let run = wait_for("the catch-up run", || async {
        runs_of(&restarted, "yearly").await.into_iter().next()
    })
    .await;
    assert_eq!(run["trigger"], "schedule", "{run}");
    let done = wait_final(&restarted, run["id"].as_str().expect("id")).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        runs_of(&restarted, "yearly").await.len(),
        1,
        "one catch-up, not a replay"
    );
}
