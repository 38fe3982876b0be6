//! The one place that sees every part: builds the engine, the hub and the router, runs the
//! background loops, and owns shutdown.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, EngineChoice};
use crate::engine::redis::{RedisEngine, RedisOptions};
use crate::engine::redis_state::RedisState;
use crate::engine::sqlite::{SqliteEngine, SqliteOptions};
use crate::engine::sqlite_state::SqliteState;
use crate::engine::state::StateStore;
use crate::engine::{Engine, EngineError};
use crate::feeds::poller::{Feeds, FeedsContext};
use crate::http::auth::Auth;
use crate::http::ratelimit::RateLimiter;
use crate::http::{AppInner, AppState};
use crate::hub::live::Live;
use crate::hub::Hub;
use crate::jobs::supervisor::{Jobs, JobsContext};
use crate::metrics::Metrics;
use crate::webhooks::{Webhooks, WebhooksContext};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("refusing to listen on {0} without [auth] api_keys: anyone could publish and read. Set auth.api_keys, or pass --insecure to accept that")]
    InsecureListen(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Every Redis key Tidings writes starts with this.
const REDIS_PREFIX: &str = "tidings:";

/// How often retention is enforced (the spec allows 10 s).
const PRUNE_EVERY: Duration = Duration::from_secs(5);

/// Is `listen` a loopback address (127.0.0.0/8, ::1, localhost)?
pub fn is_loopback(listen: &str) -> bool {
    let host = match listen.rsplit_once(':') {
        Some((h, _)) => h,
        None => listen,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Refuses a configuration that would expose an open hub.
pub fn check_exposure(config: &Config) -> Result<(), StartError> {
    if !is_loopback(&config.listen) && config.auth.api_keys.is_empty() && !config.insecure {
        return Err(StartError::InsecureListen(config.listen.clone()));
    }
    Ok(())
}

/// Connections the kernel may hold for us before we accept them. A hub restart (or a network
/// blip) makes every client reconnect at once; with the usual 1,024 the overflow waits for a
/// SYN retransmit (1 s, then 3 s), which is most of a 10,000-client resume. The kernel caps it
/// at `net.core.somaxconn` (4,096 on current kernels).
const LISTEN_BACKLOG: u32 = 8192;

pub async fn bind(config: &Config) -> Result<TcpListener, StartError> {
    let error = |source| StartError::Bind {
        addr: config.listen.clone(),
        source,
    };
    let mut last = std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        "the address resolves to nothing",
    );
    for addr in tokio::net::lookup_host(&config.listen)
        .await
        .map_err(error)?
    {
        match listen_on(addr) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = e,
        }
    }
    Err(error(last))
}

fn listen_on(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted hub can bind while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Runs Tidings on `listener` until `shutdown` fires; returns once everything is flushed.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    check_exposure(&config)?;
    let metrics = Arc::new(Metrics::default());
    let retention = Arc::new(config.retention.clone());
    let live = Arc::new(Live::new(retention.clone()));
    let engine: Arc<dyn Engine> = match &config.engine {
        EngineChoice::Embedded => Arc::new(SqliteEngine::open(
            &SqliteOptions {
                dir: config.data.clone(),
                sync: config.sync,
                dedupe_window_ms: i64::try_from(config.dedupe_window.as_millis())
                    .unwrap_or(i64::MAX),
            },
            live.clone(),
            metrics.clone(),
        )?),
        EngineChoice::Redis(url) => {
            RedisEngine::connect(
                &RedisOptions {
                    url: url.clone(),
                    prefix: REDIS_PREFIX.to_owned(),
                    dedupe_window_ms: i64::try_from(config.dedupe_window.as_millis())
                        .unwrap_or(i64::MAX),
                },
                live.clone(),
                metrics.clone(),
            )
            .await?
        }
    };
    let hub = Arc::new(Hub::new(engine.clone(), live, retention, metrics.clone()));
    let state: Arc<dyn StateStore> = match &config.engine {
        EngineChoice::Embedded => Arc::new(SqliteState::open(&config.data)?),
        EngineChoice::Redis(url) => Arc::new(RedisState::connect(url, REDIS_PREFIX).await?),
    };
    let run_token_key = state.secret("run_tokens").await?;
    let node = crate::cluster::NodeId::generate();
    let local = listener.local_addr().ok();
    let jobs_shutdown = CancellationToken::new();
    let (jobs, job_tasks) = Jobs::start(
        JobsContext {
            hub: hub.clone(),
            state: state.clone(),
            self_url: self_url(local),
            token_key: run_token_key.clone(),
            runs_total: metrics.job_runs.clone(),
            skipped_ticks_total: metrics.job_skipped_ticks.clone(),
            max_concurrent_runs: config.max_concurrent_runs,
            node: node.clone(),
        },
        config.jobs.clone(),
        jobs_shutdown.clone(),
    )
    .await?;
    let feeds = Feeds::start(
        FeedsContext {
            hub: hub.clone(),
            state: state.clone(),
            dedupe_window: config.dedupe_window,
            polls_total: metrics.feed_polls.clone(),
            fetch_timeout: config.feed_timeout,
            node: node.clone(),
        },
        config.feeds.clone(),
        shutdown.clone(),
    )
    .await?;
    let (tap, feed) = crate::hub::tap::commit_tap(4096);
    hub.live().set_tap(tap);
    let webhooks = Webhooks::start(
        WebhooksContext {
            hub: hub.clone(),
            state: state.clone(),
            metrics: metrics.clone(),
            feed,
            node,
        },
        config.webhook_policy.clone(),
        config.webhooks.clone(),
        shutdown.clone(),
    )
    .await?;
    let tasks = TaskTracker::new();
    let state = AppState(Arc::new(AppInner {
        hub: hub.clone(),
        auth: Auth::new(config.auth.clone(), vec![run_token_key]),
        rate: RateLimiter::new(config.publish_per_second_per_ip),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
        max_subscriptions: config.max_subscriptions_per_connection,
        cors_origins: config.cors_origins.clone(),
        jobs,
        feeds: feeds.clone(),
        webhooks: webhooks.clone(),
    }));
    tasks.spawn(maintain(
        hub.clone(),
        config.dedupe_window,
        shutdown.clone(),
    ));
    if let Some(addr) = local {
        tracing::info!(%addr, "Tidings is listening");
    }
    crate::http::serve(
        listener,
        crate::http::router(state),
        shutdown.clone(),
        config.shutdown_grace,
    )
    .await;
    // Runs are cancelled now (SIGTERM, then SIGKILL after their grace) and record themselves
    // as cancelled; the store stays open until they have.
    jobs_shutdown.cancel();
    let longest_grace = config
        .jobs
        .iter()
        .map(|j| j.kill_grace)
        .max()
        .unwrap_or_default();
    let deadline = config
        .shutdown_grace
        .max(longest_grace + Duration::from_secs(5));
    tasks.close();
    let feed_tasks = feeds.tasks();
    feed_tasks.close();
    let webhook_tasks = webhooks.tasks();
    webhook_tasks.close();
    let everyone = async {
        tasks.wait().await;
        job_tasks.wait().await;
        feed_tasks.wait().await;
        webhook_tasks.wait().await;
    };
    if tokio::time::timeout(deadline, everyone).await.is_err() {
        tracing::warn!(
            connections = tasks.len(),
            jobs = job_tasks.len(),
            feeds = feed_tasks.len(),
            "still busy after the grace period; closing anyway"
        );
    }
    engine.close().await;
    tracing::info!("Tidings stopped; the store is flushed");
    Ok(())
}

/// The URL runs use to reach this hub (`TIDINGS_URL`): loopback when listening on all addresses.
fn self_url(local: Option<SocketAddr>) -> String {
    match local {
        Some(addr) if addr.ip().is_unspecified() => {
            let ip: IpAddr = if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            format!("http://{}", SocketAddr::new(ip, addr.port()))
        }
        Some(addr) => format!("http://{addr}"),
        None => "http://127.0.0.1:8080".into(),
    }
}

/// Retention and memory upkeep, until shutdown.
async fn maintain(hub: Arc<Hub>, dedupe_window: Duration, shutdown: CancellationToken) {
    let window_ms = i64::try_from(dedupe_window.as_millis()).unwrap_or(i64::MAX);
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match hub.engine().prune(hub.retention(), window_ms).await {
            Ok(0) => {}
            Ok(removed) => tracing::debug!(removed, "retention pruned messages"),
            Err(error) => tracing::warn!(%error, "retention pass failed; will retry"),
        }
        hub.live().evict_idle(5 * 60 * 1000);
    }
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn loopback_addresses() {
        for ok in [
            "127.0.0.1:8080",
            "127.1.2.3:1",
            "[::1]:80",
            "localhost:8080",
        ] {
            assert!(is_loopback(ok), "{ok}");
        }
        for bad in ["0.0.0.0:8080", "10.0.0.1:80", "[::]:80", "example.org:80"] {
            assert!(!is_loopback(bad), "{bad}");
        }
    }
}
