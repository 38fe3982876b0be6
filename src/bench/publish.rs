//! `tidings bench publish`: C publishers, one HTTP/1.1 keep-alive connection each, publishing
//! N messages in total; each waits for its acknowledgement (201) before the next request.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde_json::json;

use super::conn::HttpConn;
use super::procstat::MachineSample;
use super::stats::{human_ns, human_rate, Histogram};
use super::{BenchError, CommonArgs, Ctx, Report};

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// Concurrent publishers, one HTTP/1.1 keep-alive connection each.
    #[arg(long, short = 'c', default_value_t = 1)]
    pub concurrency: usize,
    /// Messages to publish in total.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    pub messages: u64,
    /// Approximate size of each message's `data`, in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Messages per request (a JSON array, committed atomically); 1 sends single objects.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Channel names start with this; each run adds a unique id.
    #[arg(long, default_value = "bench:")]
    pub channel_prefix: String,
    /// Spread the publishers over this many channels (default: one channel per publisher).
    #[arg(long)]
    pub channels: Option<usize>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// What one publisher did.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) acked: u64,
    requests: u64,
    errors: BTreeMap<String, u64>,
    pub(super) first_error: Option<String>,
}

impl Tally {
    fn error(&mut self, kind: String, detail: String) {
        *self.errors.entry(kind).or_default() += 1;
        self.first_error.get_or_insert(detail);
    }
}

pub async fn run(ctx: &Ctx, args: PublishArgs) -> Result<Report, BenchError> {
    if args.concurrency == 0 || args.messages == 0 || args.batch == 0 {
        return Err(BenchError::Usage(
            "--concurrency, --messages and --batch must be at least 1".into(),
        ));
    }
    // The hub takes request bodies up to 1 MiB.
    if args.batch.saturating_mul(args.size + 64) > 1024 * 1024 {
        return Err(BenchError::Usage(format!(
            "--batch {} × --size {} is over the hub's 1 MiB request limit",
            args.batch, args.size
        )));
    }
    super::check_open_files(args.concurrency, ctx.server.as_ref())?;
    let pad: Arc<str> = super::padding(args.size)?.into();
    let channels = args
        .channels
        .unwrap_or(args.concurrency)
        .clamp(1, args.concurrency);
    let paths: Vec<Arc<str>> = (0..channels)
        .map(|i| {
            let name = super::channel_name(&args.channel_prefix, &ctx.run_id, &format!("p{i}"))?;
            Ok(format!("/api/channels/{name}/messages").into())
        })
        .collect::<Result<_, BenchError>>()?;

    // Connect every publisher first, so the measured phase is publishing only.
    let (server0, me0) = ctx.sample();
    let mut conns = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        let conn = tokio::time::timeout_at(ctx.deadline.into(), HttpConn::connect(&ctx.target))
            .await
            .map_err(|_| {
                BenchError::Connect("timed out opening the publisher connections".into())
            })??;
        conns.push(conn);
    }
    let (server1, me1) = ctx.sample();
    let machine1 = MachineSample::now();

    let latency = Arc::new(Histogram::default());
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.concurrency);
    for (i, conn) in conns.into_iter().enumerate() {
        let share = args.messages / args.concurrency as u64
            + u64::from((i as u64) < args.messages % args.concurrency as u64);
        let job = Publisher {
            target: ctx.target.clone(),
            path: paths[i % channels].clone(),
            pad: pad.clone(),
            batch: args.batch as u64,
            latency: latency.clone(),
            epoch: ctx.epoch,
            deadline: ctx.deadline,
        };
        tasks.push(tokio::spawn(job.run(conn, share)));
    }
    let mut total = Tally::default();
    for task in tasks {
        match task.await {
            Ok(t) => {
                total.acked += t.acked;
                total.requests += t.requests;
                for (k, n) in t.errors {
                    *total.errors.entry(k).or_default() += n;
                }
                if total.first_error.is_none() {
                    total.first_error = t.first_error;
                }
            }
            Err(e) => total.error("task".into(), format!("publisher task failed: {e}")),
        }
    }
    let elapsed = started.elapsed();
    let (server2, me2) = ctx.sample();
    let machine2 = MachineSample::now();

    let rate = total.acked as f64 / elapsed.as_secs_f64().max(1e-9);
    let lat = latency.summary();
    let errors: u64 = total.errors.values().sum();
    let timed_out = ctx.timed_out() && total.acked < args.messages;
    let server_usage = super::usage(server0, server1, server2);
    let loadgen_usage = super::usage(me0, me1, me2);
    let json = json!({
        "scenario": "publish",
        "server": ctx.target.url(""),
        "params": {
            "concurrency": args.concurrency,
            "messages": args.messages,
            "size": args.size,
            "batch": args.batch,
            "channels": channels,
            "timeout_s": args.common.timeout,
        },
        "acked": total.acked,
        "requests": total.requests,
        "errors": errors,
        "error_kinds": total.errors,
        "first_error": total.first_error,
        "duration_s": super::secs(elapsed),
        "messages_per_s": rate.round(),
        "requests_per_s": (total.requests as f64 / elapsed.as_secs_f64().max(1e-9)).round(),
        "latency": lat.to_json(),
        "timed_out": timed_out,
        "hub": server_usage.as_ref().map(|u| u.to_json(total.acked, "message", elapsed)),
        "loadgen": loadgen_usage.as_ref().map(|u| u.to_json(total.acked, "message", elapsed)),
        "machine_busy": super::machine_busy(machine1.as_ref(), machine2.as_ref()),
    });
    let cpu = format!(
        "{}{}",
        super::cpu_note(server_usage.as_ref(), "hub", total.acked, "msg", elapsed),
        super::cpu_note(
            loadgen_usage.as_ref(),
            "loadgen",
            total.acked,
            "msg",
            elapsed
        )
    );
    let summary = format!(
        "publish c={} batch={} size={}: {}/{} acked in {:.2} s = {} msg/s; request latency p50 {} p90 {} p99 {} max {}; {} errors{cpu}",
        args.concurrency,
        args.batch,
        args.size,
        total.acked,
        args.messages,
        elapsed.as_secs_f64(),
        human_rate(rate),
        human_ns(lat.p50),
        human_ns(lat.p90),
        human_ns(lat.p99),
        human_ns(lat.max),
        errors,
    );
    let problem = if total.acked < args.messages {
        Some(format!(
            "{} of {} messages acknowledged{}{}",
            total.acked,
            args.messages,
            if timed_out { " before --timeout" } else { "" },
            total
                .first_error
                .as_deref()
                .map(|e| format!("; first error: {e}"))
                .unwrap_or_default()
        ))
    } else {
        None
    };
    Ok(Report {
        json,
        summary,
        problem,
    })
}

/// One closed-loop publisher (also drives the webhooks scenario).
pub(super) struct Publisher {
    pub(super) target: Arc<super::conn::Target>,
    pub(super) path: Arc<str>,
    pub(super) pad: Arc<str>,
    pub(super) batch: u64,
    pub(super) latency: Arc<Histogram>,
    pub(super) epoch: Instant,
    pub(super) deadline: Instant,
}

impl Publisher {
    /// Publishes `share` messages, one request at a time. A failed request's messages are
    /// counted as errors and not retried, so the loop runs at most `share` requests.
    pub(super) async fn run(self, mut conn: HttpConn, share: u64) -> Tally {
        let mut tally = Tally::default();
        let mut body = String::with_capacity((self.pad.len() + 64) * self.batch as usize);
        let mut left = share;
        while left > 0 {
            if Instant::now() >= self.deadline {
                break;
            }
            let n = left.min(self.batch);
            left -= n;
            if !conn.is_open() {
                match HttpConn::connect(&self.target).await {
                    Ok(c) => conn = c,
                    Err(e) => {
                        tally.error("connect".into(), e.to_string());
                        continue;
                    }
                }
            }
            let sent = Instant::now();
            body.clear();
            self.fill(&mut body, n, sent);
            let call = conn.call(
                &self.target,
                hyper::Method::POST,
                &self.path,
                Bytes::copy_from_slice(body.as_bytes()),
            );
            let outcome = tokio::time::timeout_at(self.deadline.into(), call).await;
            tally.requests += 1;
            match outcome {
                Ok(Ok((201, _))) => {
                    let ns = u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    self.latency.record(ns);
                    tally.acked += n;
                }
                Ok(Ok((status, answer))) => tally.error(
                    format!("http_{status}"),
                    format!("{status}: {}", String::from_utf8_lossy(&answer)),
                ),
                Ok(Err(e)) => tally.error("io".into(), e.to_string()),
                Err(_) => {
                    tally.error(
                        "timeout".into(),
                        "no acknowledgement before --timeout".into(),
                    );
                    break;
                }
            }
        }
        tally
    }

    fn fill(&self, body: &mut String, n: u64, sent: Instant) {
        let t = u64::try_from(sent.duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        if self.batch > 1 {
            body.push('[');
        }
        for i in 0..n {
            if i > 0 {
                body.push(',');
            }
            body.push_str("{\"data\":");
            super::stamped_data(body, t, &self.pad);
            body.push('}');
        }
        if self.batch > 1 {
            body.push(']');
        }
    }
}
