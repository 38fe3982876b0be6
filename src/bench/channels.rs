//! `tidings bench channels`: N WebSocket subscribers, each on its own channel; publishers send
//! one stamped message to each channel in turn, M rounds (N×M publishes, one delivery each).
//! Every subscriber checks it got its M seqs once and in order; deliveries/s, publish→delivery
//! latency and loss. Where `fanout` measures one message copied to many, this measures many
//! channels each carrying a little.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde_json::json;
use tokio::sync::{oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use super::conn::{HttpConn, Target};
use super::idle::{ns_since, source_ip, ws_connect, ws_subscribe, Rx};
use super::procstat::MachineSample;
use super::stats::{human_ns, human_rate, Histogram};
use super::{BenchError, CommonArgs, Ctx, Report};

#[derive(Debug, clap::Args)]
pub struct ChannelsArgs {
    /// Channels, one WebSocket subscriber each.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub channels: usize,
    /// Rounds: each channel gets this many messages.
    #[arg(long, short = 'm', default_value_t = 10)]
    pub rounds: u64,
    /// Approximate size of each message's `data`, in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Closed-loop publisher connections (HTTP/1.1), each waiting for its ack before the next
    /// publish; together they walk the channels in turn.
    #[arg(long, default_value_t = 16)]
    pub publishers: usize,
    /// Spread subscribers over source addresses 127.0.0.2 … (see `idle --source-ips`).
    #[arg(long, default_value_t = 0)]
    pub source_ips: u8,
    /// Subscriber connections being opened at once.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Channel names start with this; each run adds a unique id.
    #[arg(long, default_value = "bench:")]
    pub channel_prefix: String,
    #[command(flatten)]
    pub common: CommonArgs,
}

struct SubOutcome {
    rx: Option<Rx>,
    ended_early: Option<String>,
}

#[derive(Default)]
struct PubTally {
    acked: u64,
    errors: u64,
    first_error: Option<String>,
    last_ack: Option<Instant>,
}

/// What the publishers share.
struct Publishers {
    target: Arc<Target>,
    names: Vec<String>,
    /// The next message index to publish.
    next: AtomicU64,
    total: u64,
    pad: String,
    epoch: Instant,
    deadline: Instant,
    ack_latency: Histogram,
}

/// One closed-loop publisher: takes the next message index (message `i` goes to channel
/// `i % channels`) until `total` are taken or the deadline passes.
async fn publisher(p: Arc<Publishers>) -> PubTally {
    let Publishers {
        target,
        names,
        next,
        total,
        pad,
        epoch,
        deadline,
        ack_latency,
    } = &*p;
    let (total, epoch, deadline) = (*total, *epoch, *deadline);
    let mut tally = PubTally::default();
    let mut conn: Option<HttpConn> = None;
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total || Instant::now() >= deadline {
            break;
        }
        let channel = &names[(i % names.len() as u64) as usize];
        let outcome = async {
            if !conn.as_ref().is_some_and(HttpConn::is_open) {
                conn = Some(HttpConn::connect(target).await.map_err(|e| e.to_string())?);
            }
            let c = conn.as_mut().ok_or("no connection")?;
            let sent = Instant::now();
            let mut body = String::with_capacity(pad.len() + 64);
            body.push_str("{\"data\":");
            let t = u64::try_from(sent.duration_since(epoch).as_nanos()).unwrap_or(u64::MAX);
            super::stamped_data(&mut body, t, pad);
            body.push('}');
            let path = format!("/api/channels/{channel}/messages");
            match c
                .call(target, hyper::Method::POST, &path, Bytes::from(body))
                .await
            {
                Ok((201, _)) => {
                    ack_latency.record(ns_since(sent));
                    Ok(())
                }
                Ok((status, answer)) => {
                    Err(format!("{status}: {}", String::from_utf8_lossy(&answer)))
                }
                Err(e) => Err(e.to_string()),
            }
        };
        match tokio::time::timeout_at(deadline.into(), outcome).await {
            Ok(Ok(())) => {
                tally.acked += 1;
                tally.last_ack = Some(Instant::now());
            }
            Ok(Err(e)) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(e);
            }
            Err(_) => break,
        }
    }
    tally
}

pub async fn run(ctx: &Ctx, args: ChannelsArgs) -> Result<Report, BenchError> {
    if args.channels == 0
        || args.rounds == 0
        || args.publishers == 0
        || args.connect_concurrency == 0
    {
        return Err(BenchError::Usage(
            "--channels, --rounds, --publishers and --connect-concurrency must be at least 1"
                .into(),
        ));
    }
    super::check_open_files(args.channels + args.publishers, ctx.server.as_ref())?;
    super::idle::check_source_ips(&ctx.target, args.source_ips)?;
    let pad = super::padding(args.size)?;
    let base = super::channel_name(&args.channel_prefix, &ctx.run_id, "ch")?;
    let names: Vec<String> = (0..args.channels).map(|i| format!("{base}{i}")).collect();
    let latency = Arc::new(Histogram::default());
    let cancel = CancellationToken::new();
    let connects = Arc::new(Semaphore::new(args.connect_concurrency));

    // Phase 1: every subscriber connects and subscribes to its channel.
    let (server0, me0) = ctx.sample();
    let connect_started = Instant::now();
    let mut readies = Vec::with_capacity(args.channels);
    let mut subscribers = Vec::with_capacity(args.channels);
    for (i, channel) in names.iter().enumerate() {
        let (ready, rx) = oneshot::channel::<Result<u64, String>>();
        readies.push(rx);
        let (target, channel, latency, cancel, connects) = (
            ctx.target.clone(),
            channel.clone(),
            latency.clone(),
            cancel.clone(),
            connects.clone(),
        );
        let (epoch, deadline, rounds) = (ctx.epoch, ctx.deadline, args.rounds);
        let source = source_ip(i, args.source_ips);
        subscribers.push(tokio::spawn(async move {
            let setup = async {
                let _permit = connects
                    .acquire()
                    .await
                    .map_err(|_| "connect limiter closed".to_owned())?;
                let started = Instant::now();
                let mut ws = ws_connect(&target, source).await?;
                let sub = ws_subscribe(&mut ws, &channel, None).await?;
                Ok::<_, String>((ws, sub.last_seq, ns_since(started)))
            };
            let setup = tokio::select! {
                _ = cancel.cancelled() => Err("cancelled before subscribed".to_owned()),
                r = tokio::time::timeout_at(deadline.into(), setup) => {
                    r.unwrap_or_else(|_| Err("timed out before subscribed".to_owned()))
                }
            };
            let (mut ws, last_seq, ns) = match setup {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return SubOutcome {
                        rx: None,
                        ended_early: None,
                    };
                }
            };
            let _ = ready.send(Ok(ns));
            let mut rx = Rx::new(last_seq, rounds);
            let ended_early = rx.receive_ws(&mut ws, epoch, Some(&latency), &cancel).await;
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(200), ws.close(None)).await;
            SubOutcome {
                rx: Some(rx),
                ended_early,
            }
        }));
    }
    let super::Connects {
        latency: connect_latency,
        failures: connect_failures,
        first_error: first_connect_error,
    } = super::collect_connects(readies).await;
    let connect_wall = connect_started.elapsed();
    let subscribed = connect_latency.count();
    let (server1, me1) = ctx.sample();
    let machine1 = MachineSample::now();

    // Phase 2: the publishers walk the channels, M rounds.
    let total = args.channels as u64 * args.rounds;
    let publishers = Arc::new(Publishers {
        target: ctx.target.clone(),
        names,
        next: AtomicU64::new(0),
        total,
        pad,
        epoch: ctx.epoch,
        deadline: ctx.deadline,
        ack_latency: Histogram::default(),
    });
    let publish_start = Instant::now();
    let mut tally = PubTally::default();
    if subscribed > 0 && !ctx.timed_out() {
        let tasks: Vec<_> = (0..args.publishers)
            .map(|_| tokio::spawn(publisher(publishers.clone())))
            .collect();
        for task in tasks {
            match task.await {
                Ok(t) => {
                    tally.acked += t.acked;
                    tally.errors += t.errors;
                    tally.last_ack = tally.last_ack.max(t.last_ack);
                    if tally.first_error.is_none() {
                        tally.first_error = t.first_error;
                    }
                }
                Err(e) => {
                    tally.errors += 1;
                    tally
                        .first_error
                        .get_or_insert(format!("publisher task failed: {e}"));
                }
            }
        }
    }
    let publish_done = Instant::now();

    // Phase 3: every delivery, or the deadline.
    let mut all = futures_util::future::join_all(subscribers);
    let outcomes = tokio::select! {
        o = &mut all => o,
        _ = tokio::time::sleep_until(ctx.deadline.into()) => {
            cancel.cancel();
            all.await
        }
    };
    cancel.cancel();
    let finished = Instant::now();
    let (server2, me2) = ctx.sample();
    let machine2 = MachineSample::now();

    let (mut received, mut duplicates, mut out_of_order, mut unexpected, mut unparsed) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut last_delivery: Option<Instant> = None;
    let mut ended_early: BTreeMap<String, u64> = BTreeMap::new();
    let mut task_failures = 0u64;
    for outcome in outcomes {
        let Ok(o) = outcome else {
            task_failures += 1;
            continue;
        };
        if let Some(rx) = &o.rx {
            received += rx.tracker.distinct;
            duplicates += rx.tracker.duplicates;
            out_of_order += rx.tracker.out_of_order;
            unexpected += rx.tracker.unexpected;
            unparsed += rx.unparsed;
            last_delivery = last_delivery.max(rx.last_delivery);
        }
        if let Some(reason) = o.ended_early {
            *ended_early.entry(reason).or_default() += 1;
        }
    }
    let expected = subscribed * args.rounds;
    let lost = expected.saturating_sub(received);
    let delivery_span = last_delivery.map(|l| l.saturating_duration_since(publish_start));
    let deliveries_per_s = delivery_span
        .filter(|d| !d.is_zero())
        .map(|d| received as f64 / d.as_secs_f64());
    let publish_span = tally
        .last_ack
        .map(|l| l.saturating_duration_since(publish_start));
    let timed_out = ctx.timed_out() && (lost > 0 || connect_failures > 0);
    let lat = latency.summary();
    let wall = finished - publish_start;
    let hub_usage = super::usage(server0, server1, server2);
    let loadgen_usage = super::usage(me0, me1, me2);
    let json = json!({
        "scenario": "channels",
        "server": ctx.target.url(""),
        "channel": format!("{base}N"),
        "params": {
            "channels": args.channels,
            "rounds": args.rounds,
            "size": args.size,
            "publishers": args.publishers,
            "source_ips": args.source_ips,
            "connect_concurrency": args.connect_concurrency,
            "timeout_s": args.common.timeout,
        },
        "connect": {
            "subscribed": subscribed,
            "failed": connect_failures,
            "first_error": first_connect_error,
            "wall_s": super::secs(connect_wall),
            "per_connection": connect_latency.summary().to_json(),
        },
        "publish": {
            "acked": tally.acked,
            "errors": tally.errors,
            "first_error": tally.first_error,
            "duration_s": publish_span.map(super::secs),
            "messages_per_s": publish_span
                .filter(|d| !d.is_zero())
                .map(|d| (tally.acked as f64 / d.as_secs_f64()).round()),
            "ack_latency": publishers.ack_latency.summary().to_json(),
        },
        "deliveries": {
            "expected": expected,
            "received": received,
            "lost": lost,
            "duplicates": duplicates,
            "out_of_order": out_of_order,
            "unexpected": unexpected,
            "unparsed": unparsed,
            "duration_s": delivery_span.map(super::secs),
            "per_s": deliveries_per_s.map(f64::round),
            "drain_after_publish_s": super::secs(finished.saturating_duration_since(publish_done)),
        },
        "latency": lat.to_json(),
        "ended_early": ended_early,
        "task_failures": task_failures,
        "timed_out": timed_out,
        "hub": hub_usage.as_ref().map(|u| u.to_json(received, "delivery", wall)),
        "loadgen": loadgen_usage.as_ref().map(|u| u.to_json(received, "delivery", wall)),
        "machine_busy": super::machine_busy(machine1.as_ref(), machine2.as_ref()),
    });
    let cpu = |u: Option<&super::procstat::Usage>, who: &str| {
        super::cpu_note(u, who, received, "delivery", wall)
    };
    let summary = format!(
        "channels n={} m={} size={} publishers={}: {}/{} delivered ({} lost, {} dup, {} out of order) at {} deliveries/s; \
         latency p50 {} p90 {} p99 {} max {}; connect {} subscribers in {:.2} s ({} failed){}{}",
        args.channels,
        args.rounds,
        args.size,
        args.publishers,
        received,
        expected,
        lost,
        duplicates,
        out_of_order,
        deliveries_per_s.map_or_else(|| "-".to_owned(), human_rate),
        human_ns(lat.p50),
        human_ns(lat.p90),
        human_ns(lat.p99),
        human_ns(lat.max),
        subscribed,
        connect_wall.as_secs_f64(),
        connect_failures,
        cpu(hub_usage.as_ref(), "hub"),
        cpu(loadgen_usage.as_ref(), "loadgen"),
    );
    let mut problems = Vec::new();
    if connect_failures > 0 {
        problems.push(format!(
            "{connect_failures} subscribers could not subscribe (first: {})",
            first_connect_error.as_deref().unwrap_or("?")
        ));
    }
    if tally.acked < total {
        problems.push(format!(
            "{} of {total} publishes acknowledged{}",
            tally.acked,
            tally
                .first_error
                .as_deref()
                .map(|e| format!(" (first error: {e})"))
                .unwrap_or_default()
        ));
    }
    if lost > 0 {
        problems.push(format!(
            "{lost} of {expected} deliveries missing{}",
            if timed_out { " at --timeout" } else { "" }
        ));
    }
    if duplicates > 0 || out_of_order > 0 {
        problems.push(format!(
            "{duplicates} duplicate and {out_of_order} out-of-order deliveries"
        ));
    }
    Ok(Report {
        json,
        summary,
        problem: (!problems.is_empty()).then(|| problems.join("; ")),
    })
}
