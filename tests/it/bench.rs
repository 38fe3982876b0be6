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
