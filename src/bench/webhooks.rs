//! `tidings bench webhooks`: deliveries per second from the hub to a receiver that this process
//! runs on loopback. The bench registers a webhook for its own channels, publishes N messages
//! over C channels (batched, so publishing is not the limit), and the receiver checks every
//! delivery — signature, per-channel order, duplicates — and times publish → receipt. The
//! webhook is deleted at the end.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::conn::HttpConn;
use super::procstat::MachineSample;
use super::publish::Publisher;
use super::stats::{human_ns, human_rate, Histogram};
use super::{BenchError, CommonArgs, Ctx, Report};

#[derive(Debug, clap::Args)]
pub struct WebhooksArgs {
    /// Messages to publish in total.
    #[arg(long, short = 'n', default_value_t = 20_000)]
    pub messages: u64,
    /// Channels the messages are spread over (deliveries of different channels run in
    /// parallel; one channel is strictly one request at a time).
    #[arg(long, default_value_t = 16)]
    pub channels: usize,
    /// Approximate size of each message's `data`, in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Messages per publish request.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Check every delivery's signature (costs the load generator a little CPU).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub verify: bool,
    /// Channel names start with this; each run adds a unique id.
    #[arg(long, default_value = "bench:")]
    pub channel_prefix: String,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// What the receiver saw of one channel.
#[derive(Default)]
struct ChannelTally {
    highest: u64,
    unique: u64,
    duplicates: u64,
    out_of_order: u64,
}

struct Receiver {
    /// Set once the webhook is registered (before anything is published).
    key: std::sync::OnceLock<Vec<u8>>,
    verify: bool,
    epoch: Instant,
    expected: u64,
    channels: Mutex<HashMap<String, ChannelTally>>,
    unique: std::sync::atomic::AtomicU64,
    bad_signatures: std::sync::atomic::AtomicU64,
    malformed: std::sync::atomic::AtomicU64,
    latency: Histogram,
    first_ns: std::sync::atomic::AtomicU64,
    last_ns: std::sync::atomic::AtomicU64,
    done: Notify,
}

#[derive(Deserialize)]
struct Delivered {
    channel: String,
    seq: u64,
    data: Stamp,
}

#[derive(Deserialize)]
struct Stamp {
    t: u64,
}

impl Receiver {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn signed(&self, headers: &hyper::HeaderMap, body: &[u8]) -> bool {
        let get = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        };
        let Some(key) = self.key.get() else {
            return false;
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
            return false;
        };
        mac.update(get("webhook-id").as_bytes());
        mac.update(b".");
        mac.update(get("webhook-timestamp").as_bytes());
        mac.update(b".");
        mac.update(body);
        let expected = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        get("webhook-signature").split(' ').any(|s| s == expected)
    }

    fn take(&self, headers: &hyper::HeaderMap, body: &[u8]) {
        use std::sync::atomic::Ordering::Relaxed;
        let at = self.now_ns();
        if self.verify && !self.signed(headers, body) {
            self.bad_signatures.fetch_add(1, Relaxed);
        }
        let Ok(d) = serde_json::from_slice::<Delivered>(body) else {
            self.malformed.fetch_add(1, Relaxed);
            return;
        };
        let fresh = {
            let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
            let tally = channels.entry(d.channel).or_default();
            if d.seq <= tally.highest {
                tally.duplicates += 1;
                false
            } else {
                if d.seq != tally.highest + 1 {
                    tally.out_of_order += 1;
                }
                tally.highest = d.seq;
                tally.unique += 1;
                true
            }
        };
        if !fresh {
            return;
        }
        self.latency.record(at.saturating_sub(d.data.t));
        let _ = self
            .first_ns
            .compare_exchange(u64::MAX, at, Relaxed, Relaxed);
        self.last_ns.fetch_max(at, Relaxed);
        if self.unique.fetch_add(1, Relaxed) + 1 >= self.expected {
            self.done.notify_one();
        }
    }
}

/// Serves the receiver on 127.0.0.1 until `stop` fires; answers 204 to everything.
async fn serve(receiver: Arc<Receiver>, stop: CancellationToken) -> Result<SocketAddr, BenchError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| BenchError::Io(format!("binding the receiver: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| BenchError::Io(e.to_string()))?;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                a = listener.accept() => a,
            };
            let Ok((stream, _)) = accepted else { continue };
            let receiver = receiver.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let receiver = receiver.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            if let Ok(body) = body.collect().await {
                                receiver.take(&parts.headers, &body.to_bytes());
                            }
                            let mut answer = hyper::Response::new(Full::new(Bytes::new()));
                            *answer.status_mut() = hyper::StatusCode::NO_CONTENT;
                            Ok::<_, Infallible>(answer)
                        }
                    },
                );
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = conn => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    });
    Ok(addr)
}

/// Registers the webhook; returns (id, signing key).
async fn register(ctx: &Ctx, url: &str, pattern: &str) -> Result<(String, Vec<u8>), BenchError> {
    let mut conn = HttpConn::connect(&ctx.target).await?;
    let body = json!({"url": url, "channels": [pattern], "description": "tidings bench webhooks"});
    let (status, answer) = conn
        .call(
            &ctx.target,
            hyper::Method::POST,
            "/api/webhooks",
            Bytes::from(body.to_string()),
        )
        .await?;
    if status != 201 {
        return Err(BenchError::NotReady(format!(
            "registering the webhook answered {status}: {}",
            String::from_utf8_lossy(&answer)
        )));
    }
    let created: Value =
        serde_json::from_slice(&answer).map_err(|e| BenchError::Io(e.to_string()))?;
    let id = created["id"].as_str().unwrap_or_default().to_owned();
    let key = created["secret"]
        .as_str()
        .and_then(|s| s.strip_prefix("whsec_"))
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .ok_or_else(|| BenchError::Io("the webhook answer has no usable secret".into()))?;
    Ok((id, key))
}

async fn unregister(ctx: &Ctx, id: &str) {
    if let Ok(mut conn) = HttpConn::connect(&ctx.target).await {
        let _ = conn
            .call(
                &ctx.target,
                hyper::Method::DELETE,
                &format!("/api/webhooks/{id}"),
                Bytes::new(),
            )
            .await;
    }
}

pub async fn run(ctx: &Ctx, args: WebhooksArgs) -> Result<Report, BenchError> {
    if args.messages == 0 || args.channels == 0 || args.batch == 0 {
        return Err(BenchError::Usage(
            "--messages, --channels and --batch must be at least 1".into(),
        ));
    }
    if args.batch.saturating_mul(args.size + 64) > 1024 * 1024 {
        return Err(BenchError::Usage(format!(
            "--batch {} × --size {} is over the hub's 1 MiB request limit",
            args.batch, args.size
        )));
    }
    let pad: Arc<str> = super::padding(args.size)?.into();
    let prefix = super::channel_name(&args.channel_prefix, &ctx.run_id, "wh")?;
    let paths: Vec<Arc<str>> = (0..args.channels)
        .map(|i| format!("/api/channels/{prefix}{i}/messages").into())
        .collect();

    let stop = CancellationToken::new();
    let receiver = Arc::new(Receiver {
        key: std::sync::OnceLock::new(),
        verify: args.verify,
        epoch: ctx.epoch,
        expected: args.messages,
        channels: Mutex::new(HashMap::new()),
        unique: 0.into(),
        bad_signatures: 0.into(),
        malformed: 0.into(),
        latency: Histogram::default(),
        first_ns: u64::MAX.into(),
        last_ns: 0.into(),
        done: Notify::new(),
    });
    let addr = serve(receiver.clone(), stop.clone()).await?;
    let (id, key) = match register(ctx, &format!("http://{addr}/hook"), &format!("{prefix}*")).await
    {
        Ok(r) => r,
        Err(e) => {
            stop.cancel();
            return Err(e);
        }
    };
    let _ = receiver.key.set(key);

    let (server0, me0) = ctx.sample();
    let machine1 = MachineSample::now();
    let publish_latency = Arc::new(Histogram::default());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        let share = args.messages / args.channels as u64
            + u64::from((i as u64) < args.messages % args.channels as u64);
        let conn = HttpConn::connect(&ctx.target).await?;
        let job = Publisher {
            target: ctx.target.clone(),
            path: path.clone(),
            pad: pad.clone(),
            batch: args.batch as u64,
            latency: publish_latency.clone(),
            epoch: ctx.epoch,
            deadline: ctx.deadline,
        };
        tasks.push(tokio::spawn(job.run(conn, share)));
    }
    let mut acked = 0;
    let mut publish_error = None;
    for task in tasks {
        match task.await {
            Ok(t) => {
                acked += t.acked;
                if publish_error.is_none() {
                    publish_error = t.first_error;
                }
            }
            Err(e) => publish_error = Some(e.to_string()),
        }
    }
    let published_in = started.elapsed();
    let all_in = tokio::time::timeout_at(ctx.deadline.into(), async {
        while receiver.unique.load(std::sync::atomic::Ordering::Relaxed) < acked {
            let notified = receiver.done.notified();
            if receiver.unique.load(std::sync::atomic::Ordering::Relaxed) >= acked {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
    })
    .await
    .is_ok();
    let elapsed = started.elapsed();
    let (server2, me2) = ctx.sample();
    let machine2 = MachineSample::now();
    stop.cancel();
    unregister(ctx, &id).await;

    use std::sync::atomic::Ordering::Relaxed;
    let unique = receiver.unique.load(Relaxed);
    let (duplicates, out_of_order) = {
        let channels = receiver.channels.lock().unwrap_or_else(|e| e.into_inner());
        channels
            .values()
            .fold((0, 0), |(d, o), t| (d + t.duplicates, o + t.out_of_order))
    };
    let bad_signatures = receiver.bad_signatures.load(Relaxed);
    let first = receiver.first_ns.load(Relaxed);
    let last = receiver.last_ns.load(Relaxed);
    let delivery_window = Duration::from_nanos(last.saturating_sub(first.min(last)));
    let start_ns = u64::try_from(started.duration_since(ctx.epoch).as_nanos()).unwrap_or(0);
    let end_to_end = Duration::from_nanos(last.saturating_sub(start_ns));
    let rate = unique as f64 / end_to_end.as_secs_f64().max(1e-9);
    let lat = receiver.latency.summary();
    // CPU is measured from before publishing: it includes the hub's publish work (batched).
    let server_usage = super::usage(server0, server0, server2);
    let loadgen_usage = super::usage(me0, me0, me2);
    let json = json!({
        "scenario": "webhooks",
        "server": ctx.target.url(""),
        "params": {
            "messages": args.messages,
            "channels": args.channels,
            "size": args.size,
            "batch": args.batch,
            "verify": args.verify,
            "timeout_s": args.common.timeout,
        },
        "acked": acked,
        "delivered": unique,
        "duplicates": duplicates,
        "out_of_order": out_of_order,
        "bad_signatures": bad_signatures,
        "malformed": receiver.malformed.load(Relaxed),
        "publish_s": super::secs(published_in),
        "delivery_window_s": super::secs(delivery_window),
        "duration_s": super::secs(end_to_end),
        "deliveries_per_s": rate.round(),
        "latency": lat.to_json(),
        "hub": server_usage.as_ref().map(|u| u.to_json(unique, "delivery", elapsed)),
        "loadgen": loadgen_usage.as_ref().map(|u| u.to_json(unique, "delivery", elapsed)),
        "machine_busy": super::machine_busy(machine1.as_ref(), machine2.as_ref()),
    });
    let cpu = super::cpu_note(server_usage.as_ref(), "hub", unique, "delivery", elapsed);
    let summary = format!(
        "webhooks channels={} size={}: {}/{} delivered in {:.2} s = {} deliveries/s (published in {:.2} s); publish→receipt p50 {} p99 {} max {}; {} duplicates, {} out of order, {} bad signatures{cpu}",
        args.channels,
        args.size,
        unique,
        acked,
        end_to_end.as_secs_f64(),
        human_rate(rate),
        published_in.as_secs_f64(),
        human_ns(lat.p50),
        human_ns(lat.p99),
        human_ns(lat.max),
        duplicates,
        out_of_order,
        bad_signatures,
    );
    let problem = if acked < args.messages {
        Some(format!(
            "{acked} of {} messages acknowledged{}",
            args.messages,
            publish_error
                .map(|e| format!("; first error: {e}"))
                .unwrap_or_default()
        ))
    } else if !all_in || unique < acked {
        Some(format!(
            "{unique} of {acked} messages delivered before --timeout"
        ))
    } else if out_of_order > 0 || bad_signatures > 0 {
        Some(format!(
            "{out_of_order} deliveries out of order, {bad_signatures} bad signatures"
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
