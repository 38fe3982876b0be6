//! `tidings bench latency`: S subscribers on one channel and one publisher paced at R msg/s
//! for D seconds — the fan-out scenario at a fixed rate, reported for its latency percentiles
//! (publish→delivery on the run's clock), loss/duplicates/order and hub CPU per delivery.
//!
//! It runs `fanout` itself (same subscribers, same paced publisher, same checks) with
//! `--messages R×D --rate R`, and re-labels the report; the JSON keeps fanout's fields.

use clap::Parser;
use serde_json::{json, Value};

use super::fanout::{self, FanoutArgs, Transport};
use super::peer::Peer;
use super::stats::human_ns;
use super::{BenchError, CommonArgs, Ctx, Report};

#[derive(Debug, clap::Args)]
pub struct LatencyArgs {
    /// Subscribers, one connection each, all on one channel.
    #[arg(long, short = 's', default_value_t = 1000)]
    pub subscribers: usize,
    /// Messages per second the publisher sends, on schedule.
    #[arg(long, short = 'r', default_value_t = 100.0)]
    pub rate: f64,
    /// Seconds to publish for.
    #[arg(long, short = 'd', default_value_t = 10.0)]
    pub duration: f64,
    /// Approximate size of each message's `data`, in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// How subscribers connect.
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub transport: Transport,
    /// Subscriber connections being opened at once.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// The channel name starts with this; each run adds a unique id.
    #[arg(long, default_value = "bench:")]
    pub channel_prefix: String,
    /// Drive this peer server instead of a Tidings hub (see `fanout --peer`).
    #[arg(long, value_enum)]
    pub peer: Option<Peer>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Parses fanout's arguments the way the command line would, so fanout options added later
/// keep their defaults here.
#[derive(Parser)]
struct AsFanout {
    #[command(flatten)]
    args: FanoutArgs,
}

fn fanout_args(args: &LatencyArgs) -> Result<(FanoutArgs, u64), BenchError> {
    if !(args.rate.is_finite() && args.rate > 0.0) {
        return Err(BenchError::Usage(format!(
            "--rate {} must be a positive number",
            args.rate
        )));
    }
    if !(args.duration.is_finite() && args.duration > 0.0) {
        return Err(BenchError::Usage(format!(
            "--duration {} must be a positive number of seconds",
            args.duration
        )));
    }
    let messages = (args.rate * args.duration).round().max(1.0) as u64;
    let transport = match args.transport {
        Transport::Ws => "ws",
        Transport::Sse => "sse",
    };
    let mut argv = vec![
        "latency".to_owned(),
        format!("--subscribers={}", args.subscribers),
        format!("--messages={messages}"),
        format!("--rate={}", args.rate),
        format!("--size={}", args.size),
        format!("--transport={transport}"),
        format!("--connect-concurrency={}", args.connect_concurrency),
        format!("--channel-prefix={}", args.channel_prefix),
        format!("--timeout={}", args.common.timeout),
    ];
    if let Some(peer) = args.peer {
        argv.push(format!("--peer={}", peer.name()));
    }
    let parsed = AsFanout::try_parse_from(argv)
        .map_err(|e| BenchError::Usage(format!("latency: {}", e.render())))?;
    Ok((parsed.args, messages))
}

pub async fn run(ctx: &Ctx, args: LatencyArgs) -> Result<Report, BenchError> {
    let (fanout_args, messages) = fanout_args(&args)?;
    let report = fanout::run(ctx, fanout_args).await?;
    let mut j = report.json;
    j["scenario"] = json!("latency");
    j["params"]["duration_s"] = json!(args.duration);
    let us = |v: &Value| v.as_f64().map_or(0, |us| (us * 1000.0) as u64);
    let lat = &j["latency"];
    let d = &j["deliveries"];
    let hub_cpu = j["hub"]["cpu_us_per_delivery"]
        .as_f64()
        .map(|v| format!("; hub {v:.2} µs CPU/delivery"))
        .unwrap_or_default();
    let lag = j["publish"]["schedule_lag"]["p99_us"]
        .as_f64()
        .map(|v| {
            format!(
                "; publish schedule lag p99 {}",
                human_ns((v * 1000.0) as u64)
            )
        })
        .unwrap_or_default();
    // A paced publisher that fell behind (slow acks on a busy machine) did not offer the rate
    // asked for: say so, since the latency then includes its queueing.
    let achieved = j["publish"]["messages_per_s"].as_f64();
    let behind = achieved
        .filter(|a| *a < args.rate * 0.95)
        .map(|a| format!("; WARNING: the publisher achieved only {a:.0} msg/s"))
        .unwrap_or_default();
    let summary = format!(
        "latency {}{} s={} rate={}/s for {} s ({} messages): publish→delivery p50 {} p90 {} p99 {} p99.9 {} max {}; \
         {}/{} delivered ({} lost, {} dup, {} out of order){}{}{}",
        j["transport"].as_str().unwrap_or("?"),
        args.peer.map(|p| format!(" peer={}", p.name())).unwrap_or_default(),
        args.subscribers,
        args.rate,
        args.duration,
        messages,
        human_ns(us(&lat["p50_us"])),
        human_ns(us(&lat["p90_us"])),
        human_ns(us(&lat["p99_us"])),
        human_ns(us(&lat["p99_9_us"])),
        human_ns(us(&lat["max_us"])),
        d["received"],
        d["expected"],
        d["lost"],
        d["duplicates"],
        d["out_of_order"],
        hub_cpu,
        lag,
        behind,
    );
    j["achieved_rate_per_s"] = json!(achieved);
    Ok(Report {
        json: j,
        summary,
        problem: report.problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_rate_and_duration_onto_fanout() {
        let args = LatencyArgs {
            subscribers: 7,
            rate: 50.0,
            duration: 3.0,
            size: 64,
            transport: Transport::Sse,
            connect_concurrency: 8,
            channel_prefix: "b:".into(),
            peer: Some(Peer::Redis),
            common: CommonArgs {
                timeout: 9,
                server_pid: None,
            },
        };
        let (f, messages) = fanout_args(&args).expect("valid");
        assert_eq!(messages, 150);
        assert_eq!((f.subscribers, f.messages, f.rate), (7, 150, Some(50.0)));
        assert_eq!(
            (f.transport, f.size, f.common.timeout, f.peer),
            (Transport::Sse, 64, 9, Some(Peer::Redis))
        );
        assert!(fanout_args(&LatencyArgs { rate: 0.0, ..args }).is_err());
    }
}
