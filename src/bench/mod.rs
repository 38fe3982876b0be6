//! `tidings bench`: a built-in load generator for a hub already running on this machine.
//!
//! Each scenario is a module with an argument struct (a clap `Args`) and an async `run` that
//! returns a [`Report`]: one JSON object (printed to stdout) and one human-readable summary line
//! (printed to stderr). Every run is bounded by `--timeout`; a run that could not finish its
//! work still reports what it measured, then exits non-zero. To add a scenario: a new file with
//! `Args` + `run`, a variant in [`Scenario`], and a line in [`run`].
//!
//! Only loopback hubs are loaded: the numbers mean something only when the load generator and
//! the hub share one clock and no network sits between them.

pub mod channels;
pub mod conn;
pub mod fanout;
pub mod feeds;
pub mod idle;
pub mod joblog;
pub mod latency;
pub mod peer;
pub mod procstat;
pub mod publish;
pub mod resume;
pub mod stats;
pub mod webhooks;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::distributions::Alphanumeric;
use rand::Rng;
use serde_json::Value;

use crate::hub::types::ChannelName;
use conn::{HttpConn, Target};
use procstat::{MachineSample, Proc, Sample, Usage};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("I/O: {0}")]
    Io(String),
    #[error("{0}")]
    Proc(String),
    #[error("the hub is not ready: {0}")]
    NotReady(String),
    /// The run finished but did not do all its work (missing deliveries, failed publishes).
    #[error("incomplete run: {0}")]
    Incomplete(String),
}

/// The scenarios: `tidings bench SCENARIO [options]`.
#[derive(Debug, clap::Subcommand)]
pub enum Scenario {
    /// Concurrent HTTP publishers, each waiting for its acknowledgement (201) before the next
    /// publish: acknowledged messages/s and publish latency.
    Publish(publish::PublishArgs),
    /// Many subscribers on one channel and one publisher: deliveries/s, loss, order and
    /// publish-to-delivery latency.
    Fanout(fanout::FanoutArgs),
    /// A webhook to a receiver this process runs on loopback: deliveries/s, order, signatures
    /// and publish-to-receipt latency.
    Webhooks(webhooks::WebhooksArgs),
    /// N idle WebSocket connections, each subscribed: the hub's RSS per connection, connect
    /// times, and whether every sampled connection still answers a ping at the end.
    Idle(idle::IdleArgs),
    /// S subscribers on one channel and a publisher paced at R msg/s for D seconds:
    /// publish→delivery latency percentiles, loss/dup/order and hub CPU per delivery.
    Latency(latency::LatencyArgs),
    /// N subscribers each on its own channel; the publisher sends one message to each channel
    /// in turn, M rounds: deliveries/s, latency and loss.
    Channels(channels::ChannelsArgs),
    /// History first, then N clients connect at once asking for the last B messages of their
    /// channel (SSE or WebSocket `since`): time until every client has its backlog, loss/dup.
    Resume(resume::ResumeArgs),
    /// One job printing N lines flat out (a job of the hub's config), watched by W WebSocket
    /// viewers: lines/s until every viewer has every line, loss/dup/order, hub CPU per line.
    Joblog(joblog::JoblogArgs),
    /// In this process, no hub needed: feed documents from a folder parsed, then parsed,
    /// deduped and stored into a temporary embedded store: entries/s of each.
    Feeds(feeds::FeedsArgs),
}

/// Options every scenario takes.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Stop after this many seconds, report what was measured, and fail if work is missing.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// The hub's process id: report its CPU time (per message or delivery) and memory.
    #[arg(long)]
    pub server_pid: Option<u32>,
}

/// What a scenario hands back.
pub struct Report {
    pub json: Value,
    pub summary: String,
    /// Why the run counts as failed, if it does.
    pub problem: Option<String>,
}

/// Shared by the scenarios of one run.
pub struct Ctx {
    pub target: Arc<Target>,
    /// The clock every timestamp of the run is measured on.
    pub epoch: Instant,
    pub deadline: Instant,
    /// Makes channel names unique to this run.
    pub run_id: String,
    pub server: Option<Proc>,
    pub me: Proc,
}

impl Ctx {
    /// Nanoseconds since the run started (the timestamps publishers embed in `data`).
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn timed_out(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// Samples the hub (if a pid was given) and the load generator.
    pub fn sample(&self) -> (Option<Sample>, Option<Sample>) {
        (
            procstat::try_sample(self.server.as_ref()),
            procstat::try_sample(Some(&self.me)),
        )
    }
}

/// How busy each CPU of the machine was between two samples (`null` without `/proc/stat`).
pub fn machine_busy(from: Option<&MachineSample>, to: Option<&MachineSample>) -> Value {
    match (from, to) {
        (Some(a), Some(b)) => a.busy_since(b),
        _ => Value::Null,
    }
}

/// Runs one scenario against `server`, prints its report, and fails if the run was incomplete.
pub async fn run(server: &str, key: Option<String>, scenario: Scenario) -> Result<(), BenchError> {
    let common = match &scenario {
        Scenario::Publish(a) => a.common.clone(),
        Scenario::Fanout(a) => a.common.clone(),
        Scenario::Webhooks(a) => a.common.clone(),
        Scenario::Idle(a) => a.common.clone(),
        Scenario::Latency(a) => a.common.clone(),
        Scenario::Channels(a) => a.common.clone(),
        Scenario::Resume(a) => a.common.clone(),
        Scenario::Joblog(a) => a.common.clone(),
        Scenario::Feeds(a) => a.common.clone(),
    };
    if common.timeout == 0 {
        return Err(BenchError::Usage(
            "--timeout must be at least 1 second".into(),
        ));
    }
    // The feeds scenario runs in this process: no hub to reach or check.
    if let Scenario::Feeds(args) = scenario {
        return finish(feeds::run(args).await?);
    }
    let target = Arc::new(Target::resolve(server, key).await?);
    let server_proc = common.server_pid.map(Proc::pid);
    if let Some(p) = &server_proc {
        p.sample()
            .map_err(|e| BenchError::Usage(format!("--server-pid: {e}")))?;
    }
    let epoch = Instant::now();
    let ctx = Ctx {
        target,
        epoch,
        deadline: epoch + Duration::from_secs(common.timeout),
        run_id: rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(8)
            .map(char::from)
            .collect(),
        server: server_proc,
        me: Proc::me(),
    };
    let peer = match &scenario {
        Scenario::Fanout(a) => a.peer,
        Scenario::Latency(a) => a.peer,
        Scenario::Idle(a) => a.peer,
        _ => None,
    };
    match peer {
        Some(peer::Peer::Redis) => check_redis(&ctx).await?,
        _ => check_health(&ctx).await?,
    }
    let report = match scenario {
        Scenario::Publish(args) => publish::run(&ctx, args).await?,
        Scenario::Fanout(args) => fanout::run(&ctx, args).await?,
        Scenario::Webhooks(args) => webhooks::run(&ctx, args).await?,
        Scenario::Idle(args) => idle::run(&ctx, args).await?,
        Scenario::Latency(args) => latency::run(&ctx, args).await?,
        Scenario::Channels(args) => channels::run(&ctx, args).await?,
        Scenario::Resume(args) => resume::run(&ctx, args).await?,
        Scenario::Joblog(args) => joblog::run(&ctx, args).await?,
        Scenario::Feeds(args) => feeds::run(args).await?,
    };
    finish(report)
}

/// Prints a report and fails if the run was incomplete.
fn finish(report: Report) -> Result<(), BenchError> {
    println!("{}", report.json);
    eprintln!("{}", report.summary);
    match report.problem {
        None => Ok(()),
        Some(problem) => Err(BenchError::Incomplete(problem)),
    }
}

async fn check_health(ctx: &Ctx) -> Result<(), BenchError> {
    let not_ready = |e: String| {
        BenchError::NotReady(format!(
            "{} ({e}); start one with `tidings serve` and pass --server",
            ctx.target.url("/healthz")
        ))
    };
    let probe = async {
        let mut conn = HttpConn::connect(&ctx.target).await?;
        conn.call(
            &ctx.target,
            hyper::Method::GET,
            "/healthz",
            bytes::Bytes::new(),
        )
        .await
    };
    match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Ok(Ok((200, _))) => Ok(()),
        Ok(Ok((status, body))) => Err(not_ready(format!(
            "answered {status}: {}",
            String::from_utf8_lossy(&body)
        ))),
        Ok(Err(e)) => Err(not_ready(e.to_string())),
        Err(_) => Err(not_ready("no answer in 5 s".into())),
    }
}

/// Redis has no `/healthz`: a `PING` on a fresh connection must answer `PONG`.
async fn check_redis(ctx: &Ctx) -> Result<(), BenchError> {
    let probe = async {
        let tcp = ctx.target.tcp().await.map_err(|e| e.to_string())?;
        peer::RedisConn::new(tcp).call(&[b"PING"]).await
    };
    let not_ready = |e: String| {
        BenchError::NotReady(format!(
            "redis at {} ({e}); start it with `scripts/peers.sh start redis`",
            ctx.target.addr
        ))
    };
    match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Ok(Ok(reply)) if reply.as_str() == Some("PONG") => Ok(()),
        Ok(Ok(reply)) => Err(not_ready(format!("PING answered {reply:?}"))),
        Ok(Err(e)) => Err(not_ready(e)),
        Err(_) => Err(not_ready("no answer in 5 s".into())),
    }
}

/// `{prefix}{run_id}-{name}`, validated as a channel name.
pub fn channel_name(prefix: &str, run_id: &str, name: &str) -> Result<String, BenchError> {
    let full = format!("{prefix}{run_id}-{name}");
    ChannelName::parse(&full).map_err(|e| {
        BenchError::Usage(format!(
            "--channel-prefix gives a bad channel name {full:?}: {}",
            e.0
        ))
    })?;
    Ok(full)
}

/// The padding that makes `{"t":<ns>,"pad":"…"}` about `size` bytes long.
pub fn padding(size: usize) -> Result<String, BenchError> {
    // The largest data the hub takes is 64 KiB; leave room for the timestamp.
    if size > 60 * 1024 {
        return Err(BenchError::Usage(format!(
            "--size {size} is over 61440 bytes; the hub refuses data over 64 KiB"
        )));
    }
    // `{"t":` + up to 20 digits + `,"pad":"` + `"}` is about 30 bytes with a typical stamp.
    Ok("x".repeat(size.saturating_sub(30)))
}

/// The `data` object a scenario publishes: the send time and padding.
pub fn stamped_data(out: &mut String, t_ns: u64, pad: &str) {
    use std::fmt::Write;
    let _ = write!(out, "{{\"t\":{t_ns},\"pad\":\"{pad}\"}}");
}

/// Refuses `sockets` connections when this process (or the hub) could not hold them.
pub fn check_open_files(sockets: usize, server: Option<&Proc>) -> Result<(), BenchError> {
    // Headroom for the runtime, stdio, listeners and log files (the scenarios add their own
    // publisher connections to `sockets`). Small enough that 19,000 subscribers plus their
    // publishers fit under a 20,000 open-files limit, the "20k" point of scripts/bench.sh.
    const HEADROOM: u64 = 256;
    let mine = Proc::me().open_files_limit().unwrap_or(1024);
    let hub = server.and_then(Proc::open_files_limit);
    let limit = hub.map_or(mine, |h| h.min(mine));
    let wanted = sockets as u64 + HEADROOM;
    if wanted > limit {
        let max = limit.saturating_sub(HEADROOM);
        return Err(BenchError::Usage(format!(
            "{sockets} connections are too many here: a process may hold at most {limit} open files \
             (this one: {mine}{}), and each connection is one on both sides, plus {HEADROOM} kept \
             for everything else. Use at most {max}, raise `ulimit -n` for both processes, or run \
             several bench processes against several channels.",
            hub.map(|h| format!(", the hub: {h}")).unwrap_or_default()
        )));
    }
    Ok(())
}

/// Combines optional start/ready/end samples into a [`Usage`].
pub fn usage(
    before: Option<Sample>,
    ready: Option<Sample>,
    after: Option<Sample>,
) -> Option<Usage> {
    Some(Usage {
        before: before?,
        ready: ready?,
        after: after?,
    })
}

/// `; hub 9.9 µs CPU/delivery (0.97 cores)` for the summary line, or nothing.
pub fn cpu_note(u: Option<&Usage>, who: &str, per: u64, per_name: &str, wall: Duration) -> String {
    match u {
        Some(u) if per > 0 => format!(
            "; {who} {:.2} µs CPU/{per_name} ({:.2} cores)",
            u.cpu_s() * 1e6 / per as f64,
            u.cpu_s() / wall.as_secs_f64().max(1e-9)
        ),
        _ => String::new(),
    }
}

/// How the subscribers' connects went.
pub struct Connects {
    /// Connect-to-subscribed time of each that made it.
    pub latency: stats::Histogram,
    pub failures: u64,
    pub first_error: Option<String>,
}

/// Waits for every subscriber's ready signal (its connect time in ns, or why it failed).
pub async fn collect_connects(
    readies: Vec<tokio::sync::oneshot::Receiver<Result<u64, String>>>,
) -> Connects {
    let mut out = Connects {
        latency: stats::Histogram::default(),
        failures: 0,
        first_error: None,
    };
    for rx in readies {
        match rx.await {
            Ok(Ok(ns)) => out.latency.record(ns),
            Ok(Err(e)) => {
                out.failures += 1;
                out.first_error.get_or_insert(e);
            }
            Err(_) => {
                out.failures += 1;
                out.first_error
                    .get_or_insert_with(|| "subscriber task ended".into());
            }
        }
    }
    out
}

/// Seconds, rounded to the millisecond.
pub fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}
