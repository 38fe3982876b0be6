//! `tidings bench` scenarios, small, against a real hub: they finish, exit 0, and report what
//! they measured (counts, not times — timed assertions do not belong in tests).

use std::process::Stdio;

use serde_json::Value;
use tokio::process::Command;

use crate::support::{binary, ServerOptions, TestServer, WAIT};

async fn bench(server: &TestServer, args: &[&str]) -> Value {
    let mut cmd = Command::new(binary());
    cmd.env("RUST_LOG", "warn")
        .env_remove("TIDINGS_URL")
        .env_remove("TIDINGS_KEY")
        .arg("--server")
        .arg(&server.base)
        .arg("bench")
        .args(args)
        .arg("--server-pid")
        .arg(server.pid().to_string())
        .arg("--timeout")
        .arg("30")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(WAIT * 2, cmd.output())
        .await
        .expect("bench finished in time")
        .expect("run bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

async fn hub() -> TestServer {
    // An empty config: no demo job or feed publishing during the run.
    TestServer::start_with(ServerOptions {
        config: Some("# bench\n".into()),
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn webhooks_scenario_delivers_everything_in_order_and_cleans_up() {
    let s = hub().await;
    let report = bench(
        &s,
        &[
            "webhooks",
            "--messages",
            "300",
            "--channels",
            "3",
            "--batch",
            "50",
        ],
    )
    .await;
    assert_eq!(report["scenario"], "webhooks");
    assert_eq!(report["acked"], 300);
    assert_eq!(report["delivered"], 300);
    assert_eq!(report["out_of_order"], 0);
    assert_eq!(report["bad_signatures"], 0);
    assert_eq!(report["latency"]["count"], 300);
    assert!(report["hub"]["cpu_us_per_delivery"].is_number(), "{report}");
    let (_, list) = s.get("/api/webhooks").await;
    assert_eq!(
        list["webhooks"],
        serde_json::json!([]),
        "the bench's webhook is removed"
    );
}

#[tokio::test]
async fn publish_and_fanout_scenarios_report_their_counts() {
    let s = hub().await;
    let report = bench(&s, &["publish", "--concurrency", "4", "--messages", "400"]).await;
    assert_eq!(report["acked"], 400);
    assert_eq!(report["errors"], 0);
    let report = bench(
        &s,
        &[
            "fanout",
            "--subscribers",
            "20",
            "--messages",
            "100",
            "--rate",
            "500",
        ],
    )
    .await;
    assert_eq!(report["deliveries"]["received"], 2000, "{report}");
    assert_eq!(report["deliveries"]["lost"], 0);
}

#[tokio::test]
async fn idle_scenario_holds_connections_and_answers_pings() {
    let s = hub().await;
    let report = bench(
        &s,
        &[
            "idle",
            "--connections",
            "40",
            "--source-ips",
            "2",
            "--ping-sample",
            "10",
            "--hold",
            "0",
        ],
    )
    .await;
    assert_eq!(report["scenario"], "idle");
    assert_eq!(report["connect"]["connected"], 40, "{report}");
    assert_eq!(report["connect"]["failed"], 0);
    assert_eq!(report["ping"]["sampled"], 10);
    assert_eq!(report["ping"]["pongs"], 10);
    assert_eq!(report["closed_early_total"], 0);
    assert!(report["hub_rss_kib_per_connection"].is_number(), "{report}");
    let report = bench(
        &s,
        &[
            "idle",
            "--connections",
            "20",
            "--one-channel",
            "--hold",
            "0",
        ],
    )
    .await;
    assert_eq!(report["connect"]["connected"], 20, "{report}");
    assert_eq!(report["ping"]["pongs"], 20);
}

#[tokio::test]
async fn latency_scenario_reports_percentiles_and_no_loss() {
    let s = hub().await;
    let report = bench(
        &s,
        &[
            "latency",
            "--subscribers",
            "10",
            "--rate",
            "50",
            "--duration",
            "1",
        ],
    )
    .await;
    assert_eq!(report["scenario"], "latency");
    assert_eq!(report["params"]["messages"], 50);
    assert_eq!(report["deliveries"]["received"], 500, "{report}");
    assert_eq!(report["deliveries"]["lost"], 0);
    assert_eq!(report["deliveries"]["duplicates"], 0);
    assert_eq!(report["deliveries"]["out_of_order"], 0);
    assert_eq!(report["latency"]["count"], 500);
    assert!(report["latency"]["p99_9_us"].is_number(), "{report}");
    assert!(report["hub"]["cpu_us_per_delivery"].is_number(), "{report}");
}

#[tokio::test]
async fn channels_scenario_delivers_every_round_to_every_channel() {
    let s = hub().await;
    let report = bench(
        &s,
        &[
            "channels",
            "--channels",
            "30",
            "--rounds",
            "4",
            "--publishers",
            "3",
        ],
    )
    .await;
    assert_eq!(report["scenario"], "channels");
    assert_eq!(report["publish"]["acked"], 120, "{report}");
    assert_eq!(report["deliveries"]["received"], 120);
    assert_eq!(report["deliveries"]["lost"], 0);
    assert_eq!(report["deliveries"]["out_of_order"], 0);
    assert_eq!(report["latency"]["count"], 120);
}

#[tokio::test]
async fn resume_scenario_gives_each_client_exactly_its_backlog() {
    let s = hub().await;
    for transport in ["sse", "ws"] {
        let report = bench(
            &s,
            &[
                "resume",
                "--transport",
                transport,
                "--clients",
                "25",
                "--channels",
                "2",
                "--backlog",
                "30",
                "--older",
                "150",
            ],
        )
        .await;
        assert_eq!(report["scenario"], "resume");
        assert_eq!(report["clients"]["complete"], 25, "{transport}: {report}");
        assert_eq!(report["history"]["since"], serde_json::json!([150, 150]));
        assert_eq!(report["deliveries"]["received"], 25 * 30);
        assert_eq!(report["deliveries"]["duplicates"], 0);
        assert_eq!(report["deliveries"]["out_of_order"], 0);
        assert_eq!(report["deliveries"]["unexpected"], 0);
        assert_eq!(report["per_client"]["count"], 25);
    }
}

#[tokio::test]
async fn joblog_scenario_gives_every_viewer_every_line_of_the_run() {
    let s = TestServer::start_with(ServerOptions {
        config: Some(tidings::bench::joblog::CONFIG_SNIPPET.into()),
        ..Default::default()
    })
    .await;
    let report = bench(&s, &["joblog", "--lines", "3000", "--viewers", "3"]).await;
    assert_eq!(report["scenario"], "joblog");
    assert_eq!(report["delivered"], 9000, "{report}");
    assert_eq!(report["complete_viewers"], 3);
    assert_eq!(report["missing"], 0);
    assert_eq!(report["duplicates"], 0);
    assert_eq!(report["out_of_order"], 0);
    assert_eq!(report["exit"]["status"], "succeeded");
    assert!(report["hub"]["cpu_us_per_line"].is_number(), "{report}");
}

#[tokio::test]
async fn joblog_scenario_explains_the_job_it_needs() {
    let s = hub().await;
    let out = Command::new(binary())
        .env_remove("TIDINGS_URL")
        .env_remove("TIDINGS_KEY")
        .args(["--server", &s.base, "bench", "joblog", "--lines", "10"])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run bench");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("[[jobs]]") && stderr.contains("TIDINGS_PARAM_LINES"),
        "{stderr}"
    );
}

#[tokio::test]
async fn feeds_scenario_parses_and_stores_a_corpus_without_a_hub() {
    let dir = tempfile::tempdir().expect("temp dir");
    let rss = |n: usize| {
        let items: String = (0..n)
            .map(|i| format!("<item><guid>g{i}</guid><title>T{i}</title></item>"))
            .collect();
        format!(
            r#"<?xml version="1.0"?><rss version="2.0"><channel><title>t</title>{items}</channel></rss>"#
        )
    };
    std::fs::create_dir(dir.path().join("docs")).expect("mkdir");
    std::fs::write(dir.path().join("docs/a.xml"), rss(3)).expect("write");
    std::fs::write(dir.path().join("docs/b.xml"), rss(2)).expect("write");
    std::fs::write(dir.path().join("docs/broken.xml"), "not a feed").expect("write");
    let manifest = ["a", "b", "broken"]
        .iter()
        .map(|n| {
            serde_json::json!({"path": format!("docs/{n}.xml"), "headers": {"Content-Type": "application/rss+xml"}})
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.path().join("manifest.jsonl"), manifest).expect("write");
    // No hub listens at --server: this scenario must not need one.
    let out = tokio::time::timeout(
        WAIT * 2,
        Command::new(binary())
            .env("RUST_LOG", "warn")
            .env_remove("TIDINGS_URL")
            .args([
                "--server",
                "http://127.0.0.1:9",
                "bench",
                "feeds",
                "--rounds",
                "2",
            ])
            .arg("--corpus")
            .arg(dir.path())
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("bench finished in time")
    .expect("run bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim()).expect("JSON");
    assert_eq!(report["scenario"], "feeds");
    assert_eq!(report["documents"], 3);
    assert_eq!(report["entries_per_round"], 5);
    assert_eq!(report["parse"]["entries"], 10);
    assert_eq!(
        report["parse"]["errors"], 2,
        "the broken document, each round"
    );
    assert_eq!(report["parse_dedupe_store"]["entries"], 10);
    assert_eq!(
        report["parse_dedupe_store"]["stored"], 5,
        "the second round finds every entry already seen"
    );
    assert_eq!(report["parse_dedupe_store"]["errors"], 0);
}
