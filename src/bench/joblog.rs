//! `tidings bench joblog`: one job printing N lines flat out, watched live by W WebSocket
//! viewers. The measure of the job output path: child pipe → line splitting → batched store
//! commits → fan-out to every viewer of the run's channel.
//!
//! A job's command comes from the hub's configuration, so the hub must be started with a job
//! that prints `$TIDINGS_PARAM_LINES` lines ([`CONFIG_SNIPPET`]). The bench connects the viewers,
//! starts a run with `POST /api/jobs/{job}/runs` (`{"params":{"lines":N}}`), subscribes every
//! viewer to the run's channel from seq 0 (the run's channel is only known once it started, and
//! `since` makes the lines printed before the subscribe arrive as backlog, so none is missed),
//! and counts each viewer's `line` messages by seq until the run's `exit` message.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

use super::conn::HttpConn;
use super::fanout::{Seen, SeqTracker};
use super::procstat::MachineSample;
use super::stats::human_rate;
use super::{BenchError, CommonArgs, Ctx, Report};

/// The job the bench expects, for the hub's `--config` file.
pub const CONFIG_SNIPPET: &str = r#"[[jobs]]
name = "bench-joblog"
command = ["sh", "-c", "exec seq 1 \"$TIDINGS_PARAM_LINES\""]
params = ["lines"]
timeout = "10m""#;

#[derive(Debug, clap::Args)]
pub struct JoblogArgs {
    /// The job to run: it must declare `params = ["lines"]` and print that many lines (see
    /// `CONFIG_SNIPPET` in src/bench/joblog.rs, also shown when the job is missing).
    #[arg(long, default_value = "bench-joblog")]
    pub job: String,
    /// Lines the job prints (passed as the run parameter `lines`).
    #[arg(long, short = 'n', default_value_t = 500_000)]
    pub lines: u64,
    /// WebSocket viewers of the run's log channel.
    #[arg(long, short = 'w', default_value_t = 10)]
    pub viewers: usize,
    #[command(flatten)]
    pub common: CommonArgs,
}

type Ws = WebSocketStream<TcpStream>;

/// The fields of a server frame the viewers look at; `data` stays unparsed except for `exit`.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow, default)]
    op: Option<&'a str>,
    seq: Option<u64>,
    #[serde(borrow, default)]
    event: Option<&'a str>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    truncated: Option<bool>,
    code: Option<String>,
    message: Option<String>,
}

/// How one viewer's run went.
struct Viewer {
    tracker: SeqTracker,
    subscribed_at: Option<Instant>,
    first_line: Option<Instant>,
    last_line: Option<Instant>,
    /// The `exit` message's data, once seen.
    exit: Option<Value>,
    truncated: bool,
    /// Mid-stream `subscribed` frames: the hub skipped ahead (history pruned while the viewer
    /// lagged); the lines skipped count as missing.
    resets: u64,
    unparsed: u64,
    ended_early: Option<String>,
}

impl Viewer {
    fn new(lines: u64) -> Self {
        Self {
            tracker: SeqTracker::new(0, lines),
            subscribed_at: None,
            first_line: None,
            last_line: None,
            exit: None,
            truncated: false,
            resets: 0,
            unparsed: 0,
            ended_early: None,
        }
    }

    /// Accounts one text frame; returns true when this viewer is done (exit or error).
    fn frame(&mut self, text: &str) -> bool {
        let Ok(frame) = serde_json::from_str::<Frame<'_>>(text) else {
            self.unparsed += 1;
            return false;
        };
        match frame.op {
            Some("message") => self.message(&frame),
            Some("subscribed") if self.subscribed_at.is_none() => {
                self.subscribed_at = Some(Instant::now());
                self.truncated = frame.truncated.unwrap_or(false);
                false
            }
            Some("subscribed") => {
                self.resets += 1;
                false
            }
            Some("error") => {
                self.ended_early = Some(format!(
                    "error frame {}: {}",
                    frame.code.unwrap_or_default(),
                    frame.message.unwrap_or_default()
                ));
                true
            }
            _ => false,
        }
    }

    fn message(&mut self, frame: &Frame<'_>) -> bool {
        match (frame.event, frame.seq) {
            (Some("line"), Some(seq)) => {
                let now = Instant::now();
                if self.tracker.record(seq) == Seen::New {
                    self.first_line.get_or_insert(now);
                    self.last_line = Some(now);
                }
                false
            }
            (Some("exit"), _) => {
                self.exit = Some(
                    frame
                        .data
                        .and_then(|d| serde_json::from_str(d.get()).ok())
                        .unwrap_or(Value::Null),
                );
                true
            }
            _ => {
                self.unparsed += 1;
                false
            }
        }
    }
}

pub async fn run(ctx: &Ctx, args: JoblogArgs) -> Result<Report, BenchError> {
    if args.lines == 0 || args.viewers == 0 {
        return Err(BenchError::Usage(
            "--lines and --viewers must be at least 1".into(),
        ));
    }
    super::check_open_files(args.viewers, ctx.server.as_ref())?;
    let mut http = HttpConn::connect(&ctx.target).await?;
    check_job(ctx, &mut http, &args.job).await?;

    let (server0, me0) = ctx.sample();
    let mut sockets = Vec::with_capacity(args.viewers);
    for _ in 0..args.viewers {
        let ws = tokio::time::timeout_at(ctx.deadline.into(), ctx.target.websocket())
            .await
            .map_err(|_| BenchError::Connect("timed out opening the viewers".into()))??;
        sockets.push(ws);
    }
    let (server1, me1) = ctx.sample();
    let machine1 = MachineSample::now();

    let triggered = Instant::now();
    let run = start_run(ctx, &mut http, &args).await?;
    let channel = run["channel"]
        .as_str()
        .ok_or_else(|| BenchError::Io(format!("the run object has no channel: {run}")))?
        .to_owned();
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|ws| tokio::spawn(view(ws, channel.clone(), args.lines, ctx.deadline)))
        .collect();
    let mut viewers = Vec::with_capacity(tasks.len());
    for task in tasks {
        viewers.push(task.await.unwrap_or_else(|e| {
            let mut v = Viewer::new(args.lines);
            v.ended_early = Some(format!("viewer task failed: {e}"));
            v
        }));
    }
    let finished = Instant::now();
    let (server2, me2) = ctx.sample();
    let machine2 = MachineSample::now();

    let outcome = Outcome::of(&viewers, &args, triggered, finished);
    let server_usage = super::usage(server0, server1, server2);
    let loadgen_usage = super::usage(me0, me1, me2);
    let wall = finished.saturating_duration_since(triggered);
    let mut hub_json = server_usage
        .as_ref()
        .map(|u| u.to_json(outcome.delivered, "delivery", wall));
    if let (Some(h), Some(u)) = (hub_json.as_mut(), server_usage.as_ref()) {
        h["cpu_us_per_line"] =
            json!(((u.cpu_s() * 1e6 / args.lines as f64) * 1000.0).round() / 1000.0);
    }
    let json = json!({
        "scenario": "joblog",
        "server": ctx.target.url(""),
        "params": {
            "job": args.job,
            "lines": args.lines,
            "viewers": args.viewers,
            "timeout_s": args.common.timeout,
        },
        "run": run["id"],
        "channel": channel,
        "exit": viewers.iter().find_map(|v| v.exit.clone()),
        "delivered": outcome.delivered,
        "complete_viewers": outcome.complete,
        "missing": outcome.missing,
        "duplicates": outcome.duplicates,
        "out_of_order": outcome.out_of_order,
        "unexpected": outcome.unexpected,
        "unparsed": outcome.unparsed,
        "truncated_viewers": viewers.iter().filter(|v| v.truncated).count(),
        "resets": viewers.iter().map(|v| v.resets).sum::<u64>(),
        "first_error": outcome.first_error,
        "duration_s": super::secs(outcome.window),
        "from_trigger_s": super::secs(outcome.from_trigger),
        "lines_per_s": outcome.lines_per_s().round(),
        "lines_per_s_from_trigger": (args.lines as f64 / outcome.from_trigger.as_secs_f64().max(1e-9)).round(),
        "deliveries_per_s": (outcome.delivered as f64 / wall.as_secs_f64().max(1e-9)).round(),
        "timed_out": ctx.timed_out() && outcome.complete < args.viewers,
        "hub": hub_json,
        "loadgen": loadgen_usage.as_ref().map(|u| u.to_json(outcome.delivered, "delivery", wall)),
        "machine_busy": super::machine_busy(machine1.as_ref(), machine2.as_ref()),
    });
    let cpu = super::cpu_note(server_usage.as_ref(), "hub", args.lines, "line", wall);
    let summary = format!(
        "joblog job={} lines={} viewers={}: {} lines/s (first line → last line at every viewer, {:.2} s; {:.2} s from the run request); {}/{} viewers complete, {} missing, {} dup, {} out of order{cpu}",
        args.job,
        args.lines,
        args.viewers,
        human_rate(outcome.lines_per_s()),
        outcome.window.as_secs_f64(),
        outcome.from_trigger.as_secs_f64(),
        outcome.complete,
        args.viewers,
        outcome.missing,
        outcome.duplicates,
        outcome.out_of_order,
    );
    Ok(Report {
        json,
        summary,
        problem: outcome.problem(args.viewers),
    })
}

/// Totals over the viewers.
struct Outcome {
    lines: u64,
    delivered: u64,
    complete: usize,
    missing: u64,
    duplicates: u64,
    out_of_order: u64,
    unexpected: u64,
    unparsed: u64,
    first_error: Option<String>,
    /// First line at any viewer → last line at the slowest viewer.
    window: Duration,
    /// The run request → last line at the slowest viewer.
    from_trigger: Duration,
}

impl Outcome {
    fn of(viewers: &[Viewer], args: &JoblogArgs, triggered: Instant, finished: Instant) -> Self {
        let first = viewers.iter().filter_map(|v| v.first_line).min();
        let last = viewers.iter().filter_map(|v| v.last_line).max();
        let all_done = viewers.iter().all(|v| v.tracker.complete());
        // An incomplete run is measured to when the bench gave up.
        let end = if all_done {
            last.unwrap_or(finished)
        } else {
            finished
        };
        Self {
            lines: args.lines,
            delivered: viewers.iter().map(|v| v.tracker.distinct).sum(),
            complete: viewers.iter().filter(|v| v.tracker.complete()).count(),
            missing: viewers
                .iter()
                .map(|v| args.lines - v.tracker.distinct)
                .sum(),
            duplicates: viewers.iter().map(|v| v.tracker.duplicates).sum(),
            out_of_order: viewers.iter().map(|v| v.tracker.out_of_order).sum(),
            unexpected: viewers.iter().map(|v| v.tracker.unexpected).sum(),
            unparsed: viewers.iter().map(|v| v.unparsed).sum(),
            first_error: viewers.iter().find_map(|v| v.ended_early.clone()),
            window: end.saturating_duration_since(first.unwrap_or(triggered)),
            from_trigger: end.saturating_duration_since(triggered),
        }
    }

    fn lines_per_s(&self) -> f64 {
        self.lines as f64 / self.window.as_secs_f64().max(1e-9)
    }

    fn problem(&self, viewers: usize) -> Option<String> {
        if self.complete == viewers && self.duplicates == 0 && self.out_of_order == 0 {
            return None;
        }
        Some(format!(
            "{}/{viewers} viewers got every line ({} missing, {} duplicates, {} out of order){}",
            self.complete,
            self.missing,
            self.duplicates,
            self.out_of_order,
            self.first_error
                .as_deref()
                .map(|e| format!("; first error: {e}"))
                .unwrap_or_default()
        ))
    }
}

/// Refuses a hub without the job, or with one that takes no `lines` parameter, explaining
/// the configuration it needs.
async fn check_job(ctx: &Ctx, http: &mut HttpConn, job: &str) -> Result<(), BenchError> {
    let (status, body) = http
        .call(&ctx.target, hyper::Method::GET, "/api/jobs", Bytes::new())
        .await?;
    if status != 200 {
        return Err(BenchError::Io(format!(
            "GET /api/jobs answered {status}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    let list: Value = serde_json::from_slice(&body)
        .map_err(|e| BenchError::Io(format!("GET /api/jobs: not JSON: {e}")))?;
    let found = list["jobs"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["name"] == job));
    let Some(found) = found else {
        return Err(missing_job(job, "has no job of that name"));
    };
    let takes_lines = found["params"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p == "lines"));
    if !takes_lines {
        return Err(missing_job(
            job,
            "has that job, but it takes no `lines` parameter",
        ));
    }
    Ok(())
}

fn missing_job(job: &str, why: &str) -> BenchError {
    BenchError::Usage(format!(
        "the hub {why} (--job {job:?}). Start the hub with a config file (`tidings serve --config FILE`) \
         holding a job that prints $TIDINGS_PARAM_LINES lines, e.g.:\n\n{}\n\n(with another name, pass --job NAME)",
        CONFIG_SNIPPET.replace("bench-joblog", job)
    ))
}

/// `POST /api/jobs/{job}/runs` with the line count; the run object.
async fn start_run(ctx: &Ctx, http: &mut HttpConn, args: &JoblogArgs) -> Result<Value, BenchError> {
    let path = format!("/api/jobs/{}/runs", args.job);
    let body = json!({"params": {"lines": args.lines}}).to_string();
    let (status, answer) = http
        .call(&ctx.target, hyper::Method::POST, &path, Bytes::from(body))
        .await?;
    let text = String::from_utf8_lossy(&answer);
    match status {
        202 => serde_json::from_slice(&answer)
            .map_err(|e| BenchError::Io(format!("POST {path}: not JSON ({e}): {text}"))),
        409 => Err(BenchError::Usage(format!(
            "job {:?} is already running (single-flight); wait for it or cancel it: {text}",
            args.job
        ))),
        _ => Err(BenchError::Io(format!(
            "POST {path} answered {status}: {text}"
        ))),
    }
}

/// One viewer: subscribes from seq 0 and reads until the run's `exit` or the deadline.
async fn view(mut ws: Ws, channel: String, lines: u64, deadline: Instant) -> Viewer {
    let mut viewer = Viewer::new(lines);
    let subscribe = json!({"op": "subscribe", "channel": channel, "since": 0}).to_string();
    if let Err(e) = ws.send(WsMessage::text(subscribe)).await {
        viewer.ended_early = Some(format!("sending subscribe: {e}"));
        return viewer;
    }
    let read = async {
        while let Some(frame) = ws.next().await {
            match frame {
                Ok(WsMessage::Text(text)) => {
                    if viewer.frame(text.as_str()) {
                        return;
                    }
                }
                Ok(WsMessage::Close(frame)) => {
                    viewer.ended_early = Some(match frame {
                        Some(f) => format!("closed by the hub: {} {}", u16::from(f.code), f.reason),
                        None => "closed by the hub".into(),
                    });
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    viewer.ended_early = Some(format!("connection error: {e}"));
                    return;
                }
            }
        }
        viewer.ended_early = Some("connection closed".into());
    };
    if tokio::time::timeout_at(deadline.into(), read)
        .await
        .is_err()
    {
        viewer
            .ended_early
            .get_or_insert_with(|| "timed out before the run's exit".into());
    }
    let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
    viewer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewer_counts_lines_until_exit() {
        let mut v = Viewer::new(2);
        assert!(!v.frame(
            r#"{"op":"subscribed","channel":"jobs:j:1","epoch":"e","last_seq":0,"truncated":false}"#
        ));
        assert!(!v.frame(
            r#"{"op":"message","seq":1,"event":"line","data":{"stream":"stdout","line":"1"}}"#
        ));
        assert!(!v.frame(
            r#"{"op":"message","seq":1,"event":"line","data":{"stream":"stdout","line":"1"}}"#
        ));
        assert!(!v.frame(
            r#"{"op":"message","seq":2,"event":"line","data":{"stream":"stdout","line":"2"}}"#
        ));
        assert!(v.frame(r#"{"op":"message","seq":3,"event":"exit","data":{"status":"succeeded","exit_code":0,"signal":null}}"#));
        assert!(v.tracker.complete());
        assert_eq!(v.tracker.duplicates, 1);
        assert_eq!(
            v.exit.as_ref().map(|e| e["status"].clone()),
            Some(json!("succeeded"))
        );
    }

    #[test]
    fn the_snippet_is_a_valid_job() {
        let config = crate::config::Config::from_toml(CONFIG_SNIPPET, &Default::default());
        let config = config.map_err(|e| e.to_string());
        assert!(config.is_ok(), "{config:?}");
    }
}
