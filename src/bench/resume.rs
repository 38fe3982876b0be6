//! `tidings bench resume`: the reconnect storm. History first — `--older` + `--backlog`
//! messages published (in atomic batches) to each of C channels — then N clients connect at
//! once, client `i` to channel `i % C`, asking for everything after `last_seq − backlog` (SSE
//! `?since=` or a WebSocket `subscribe` with `since`). Each must receive exactly those
//! `backlog` messages, in order. Reports the time until every client had its backlog, the
//! per-client time (connect to last message), and loss/duplicates/order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::conn::{HttpConn, Target};
use super::fanout::Transport;
use super::idle::{ns_since, source_ip, ws_connect, ws_subscribe, Rx};
use super::procstat::MachineSample;
use super::stats::{human_ns, Histogram};
use super::{BenchError, CommonArgs, Ctx, Report};
use crate::cli::SseParser;

/// Messages per publish request while writing the history (the hub's 1 MiB body limit).
const BATCH: u64 = 100;

#[derive(Debug, clap::Args)]
pub struct ResumeArgs {
    /// Clients connecting at once.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub clients: usize,
    /// Channels with history; client `i` resumes on channel `i % channels`.
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Messages each client asks for (and must get): the newest this many of its channel.
    #[arg(long, default_value_t = 100)]
    pub backlog: u64,
    /// Messages published before those, which no client asks for (so `since` is not 0).
    #[arg(long, default_value_t = 100)]
    pub older: u64,
    /// Approximate size of each message's `data`, in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// How clients resume.
    #[arg(long, value_enum, default_value_t = Transport::Sse)]
    pub transport: Transport,
    /// Clients connecting at the same moment (default: all of them).
    #[arg(long)]
    pub connect_concurrency: Option<usize>,
    /// Spread clients over source addresses 127.0.0.2 … (see `idle --source-ips`).
    #[arg(long, default_value_t = 0)]
    pub source_ips: u8,
    /// Channel names start with this; each run adds a unique id.
    #[arg(long, default_value = "bench:")]
    pub channel_prefix: String,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Publishes `count` messages to `channel` in batches; returns the last seq.
async fn write_history(
    target: &Target,
    channel: &str,
    count: u64,
    pad: &str,
    epoch: Instant,
    deadline: Instant,
) -> Result<u64, BenchError> {
    let mut conn = HttpConn::connect(target).await?;
    let path = format!("/api/channels/{channel}/messages");
    let mut last_seq = 0u64;
    let mut left = count;
    while left > 0 {
        let n = left.min(BATCH);
        let mut body = String::from("[");
        for k in 0..n {
            if k > 0 {
                body.push(',');
            }
            body.push_str("{\"data\":");
            super::stamped_data(&mut body, ns_since(epoch), pad);
            body.push('}');
        }
        body.push(']');
        let call = conn.call(target, hyper::Method::POST, &path, Bytes::from(body));
        let (status, answer) = tokio::time::timeout_at(deadline.into(), call)
            .await
            .map_err(|_| BenchError::Incomplete("--timeout while writing the history".into()))??;
        if status != 201 {
            return Err(BenchError::Io(format!(
                "publishing the history to {channel} answered {status}: {}",
                String::from_utf8_lossy(&answer)
            )));
        }
        let parsed: Value = serde_json::from_slice(&answer)
            .map_err(|e| BenchError::Io(format!("unparsable publish answer: {e}")))?;
        last_seq = parsed["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["seq"].as_u64())
            .ok_or_else(|| BenchError::Io(format!("publish answer without seqs: {parsed}")))?;
        left -= n;
    }
    Ok(last_seq)
}

struct Client {
    target: Arc<Target>,
    epoch: Instant,
    deadline: Instant,
    backlog: u64,
    connects: Semaphore,
    cancel: CancellationToken,
    /// Connect (start of the attempt) to the last backlog message, per client.
    per_client: Histogram,
    /// Connect to `subscribed` (WS) or the response headers (SSE).
    connect: Histogram,
}

struct Outcome {
    rx: Option<Rx>,
    /// When the client had every message it asked for.
    done: Option<Instant>,
    truncated: bool,
    error: Option<String>,
}

impl Client {
    async fn run(
        self: Arc<Self>,
        transport: Transport,
        channel: String,
        since: u64,
        source: Option<std::net::IpAddr>,
    ) -> Outcome {
        let Ok(_permit) = self.connects.acquire().await else {
            return Outcome {
                rx: None,
                done: None,
                truncated: false,
                error: Some("connect limiter closed".into()),
            };
        };
        let started = Instant::now();
        let mut rx = Rx::new(since, self.backlog);
        let mut truncated = false;
        let work = async {
            match transport {
                Transport::Ws => {
                    let mut ws = ws_connect(&self.target, source).await?;
                    let sub = ws_subscribe(&mut ws, &channel, Some(since)).await?;
                    self.connect.record(ns_since(started));
                    truncated = sub.truncated;
                    let ended = rx.receive_ws(&mut ws, self.epoch, None, &self.cancel).await;
                    let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
                    ended.map_or(Ok(()), Err)
                }
                Transport::Sse => self.sse(&channel, since, &mut rx, started).await,
            }
        };
        let result = tokio::select! {
            _ = self.cancel.cancelled() => Err("timed out".to_owned()),
            r = tokio::time::timeout_at(self.deadline.into(), work) => {
                r.unwrap_or_else(|_| Err("timed out".to_owned()))
            }
        };
        let done = rx.tracker.complete().then(Instant::now);
        if done.is_some() {
            self.per_client.record(ns_since(started));
        }
        Outcome {
            rx: Some(rx),
            done,
            truncated,
            error: result.err(),
        }
    }

    async fn sse(
        &self,
        channel: &str,
        since: u64,
        rx: &mut Rx,
        started: Instant,
    ) -> Result<(), String> {
        let path = format!("/api/channels/{channel}/events?since={since}");
        let mut conn = HttpConn::connect(&self.target)
            .await
            .map_err(|e| e.to_string())?;
        let resp = conn
            .send(&self.target, hyper::Method::GET, &path, Bytes::new())
            .await
            .map_err(|e| e.to_string())?;
        if resp.status() != hyper::StatusCode::OK {
            return Err(format!("GET {path} answered {}", resp.status()));
        }
        self.connect.record(ns_since(started));
        let mut body = resp.into_body();
        let mut parser = SseParser::default();
        while !rx.tracker.complete() {
            let chunk = match body.frame().await {
                None => return Err("stream ended".into()),
                Some(Err(e)) => return Err(format!("stream error: {e}")),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
            };
            for event in parser.feed(&chunk) {
                match event.event.as_deref() {
                    None | Some("message") => {
                        if let Some(reason) = rx.frame(&event.data, self.epoch, None) {
                            return Err(reason);
                        }
                    }
                    Some("reset") => return Err(format!("reset by the hub: {}", event.data)),
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }
}

pub async fn run(ctx: &Ctx, args: ResumeArgs) -> Result<Report, BenchError> {
    let concurrency = args.connect_concurrency.unwrap_or(args.clients);
    if args.clients == 0 || args.channels == 0 || args.backlog == 0 || concurrency == 0 {
        return Err(BenchError::Usage(
            "--clients, --channels, --backlog and --connect-concurrency must be at least 1".into(),
        ));
    }
    if args.source_ips > 0 && args.transport == Transport::Sse {
        return Err(BenchError::Usage(
            "--source-ips works with --transport ws only".into(),
        ));
    }
    super::check_open_files(args.clients, ctx.server.as_ref())?;
    super::idle::check_source_ips(&ctx.target, args.source_ips)?;
    let pad = super::padding(args.size)?;
    let base = super::channel_name(&args.channel_prefix, &ctx.run_id, "resume")?;
    let names: Vec<String> = (0..args.channels).map(|i| format!("{base}{i}")).collect();

    // Phase 1: the history.
    let (server0, me0) = ctx.sample();
    let history_started = Instant::now();
    let per_channel = args.older + args.backlog;
    let mut since = Vec::with_capacity(args.channels);
    for name in &names {
        let last = write_history(
            &ctx.target,
            name,
            per_channel,
            &pad,
            ctx.epoch,
            ctx.deadline,
        )
        .await?;
        since.push(last.saturating_sub(args.backlog));
    }
    let history_wall = history_started.elapsed();

    // Phase 2: every client at once.
    let client = Arc::new(Client {
        target: ctx.target.clone(),
        epoch: ctx.epoch,
        deadline: ctx.deadline,
        backlog: args.backlog,
        connects: Semaphore::new(concurrency),
        cancel: CancellationToken::new(),
        per_client: Histogram::default(),
        connect: Histogram::default(),
    });
    let (server1, me1) = ctx.sample();
    let machine0 = MachineSample::now();
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.clients)
        .map(|i| {
            let c = i % args.channels;
            tokio::spawn(client.clone().run(
                args.transport,
                names[c].clone(),
                since[c],
                source_ip(i, args.source_ips),
            ))
        })
        .collect();
    let outcomes = futures_util::future::join_all(tasks).await;
    client.cancel.cancel();
    let finished = Instant::now();
    let (server2, me2) = ctx.sample();
    let machine2 = MachineSample::now();

    let (mut received, mut duplicates, mut out_of_order, mut unexpected, mut unparsed) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut complete, mut truncated) = (0u64, 0u64);
    let mut last_done: Option<Instant> = None;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for outcome in outcomes {
        let o = match outcome {
            Ok(o) => o,
            Err(e) => {
                *errors
                    .entry(format!("client task failed: {e}"))
                    .or_default() += 1;
                continue;
            }
        };
        if let Some(rx) = &o.rx {
            received += rx.tracker.distinct;
            duplicates += rx.tracker.duplicates;
            out_of_order += rx.tracker.out_of_order;
            unexpected += rx.tracker.unexpected;
            unparsed += rx.unparsed;
        }
        if o.done.is_some() {
            complete += 1;
        }
        truncated += u64::from(o.truncated);
        last_done = last_done.max(o.done);
        if let Some(e) = o.error {
            *errors.entry(e).or_default() += 1;
        }
    }
    let expected = args.clients as u64 * args.backlog;
    let lost = expected.saturating_sub(received);
    let all_done = (complete == args.clients as u64)
        .then_some(last_done)
        .flatten()
        .map(|t| t.saturating_duration_since(started));
    let wall = finished - started;
    let per_client = client.per_client.summary();
    let connect = client.connect.summary();
    let messages_per_s = (received as f64 / wall.as_secs_f64().max(1e-9)).round();
    let hub_usage = super::usage(server0, server1, server2);
    let loadgen_usage = super::usage(me0, me1, me2);
    let json = json!({
        "scenario": "resume",
        "transport": args.transport_name(),
        "server": ctx.target.url(""),
        "channel": format!("{base}N"),
        "params": {
            "clients": args.clients,
            "channels": args.channels,
            "backlog": args.backlog,
            "older": args.older,
            "size": args.size,
            "connect_concurrency": concurrency,
            "source_ips": args.source_ips,
            "timeout_s": args.common.timeout,
        },
        "history": {
            "messages_per_channel": per_channel,
            "since": since,
            "wall_s": super::secs(history_wall),
        },
        "clients": {
            "complete": complete,
            "incomplete": args.clients as u64 - complete,
            "truncated": truncated,
            "errors": errors,
        },
        "all_done_s": all_done.map(super::secs),
        "wall_s": super::secs(wall),
        "connect": connect.to_json(),
        "per_client": per_client.to_json(),
        "deliveries": {
            "expected": expected,
            "received": received,
            "lost": lost,
            "duplicates": duplicates,
            "out_of_order": out_of_order,
            "unexpected": unexpected,
            "unparsed": unparsed,
            "per_s": messages_per_s,
        },
        "timed_out": ctx.timed_out(),
        "hub": hub_usage.as_ref().map(|u| u.to_json(received, "delivery", wall)),
        "loadgen": loadgen_usage.as_ref().map(|u| u.to_json(received, "delivery", wall)),
        "machine_busy": super::machine_busy(machine0.as_ref(), machine2.as_ref()),
    });
    let summary = format!(
        "resume {} n={} channels={} backlog={}: {}/{} clients complete, all done in {}; per client p50 {} p99 {} max {} \
         (connect p99 {}); {}/{} messages ({} lost, {} dup, {} out of order){}",
        args.transport_name(),
        args.clients,
        args.channels,
        args.backlog,
        complete,
        args.clients,
        all_done.map_or_else(|| "-".to_owned(), |d| format!("{:.3} s", d.as_secs_f64())),
        human_ns(per_client.p50),
        human_ns(per_client.p99),
        human_ns(per_client.max),
        human_ns(connect.p99),
        received,
        expected,
        lost,
        duplicates,
        out_of_order,
        super::cpu_note(hub_usage.as_ref(), "hub", received, "delivery", wall),
    );
    let mut problems = Vec::new();
    if complete < args.clients as u64 {
        problems.push(format!(
            "{} of {} clients did not get their whole backlog (first reason: {})",
            args.clients as u64 - complete,
            args.clients,
            errors.keys().next().map_or("?", String::as_str)
        ));
    }
    if duplicates > 0 || out_of_order > 0 || unexpected > 0 {
        problems.push(format!(
            "{duplicates} duplicate, {out_of_order} out-of-order and {unexpected} unexpected deliveries"
        ));
    }
    if truncated > 0 {
        problems.push(format!(
            "{truncated} clients were told their history was truncated"
        ));
    }
    Ok(Report {
        json,
        summary,
        problem: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}

impl ResumeArgs {
    fn transport_name(&self) -> &'static str {
        match self.transport {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
        }
    }
}
