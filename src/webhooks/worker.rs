//! One task per enabled webhook: delivers its queue, each channel in seq order and channels
//! independently (a failing channel waits on its retry schedule while the others go on), and
//! records every attempt. Outcomes reach the store in small batches: a crash before a batch
//! is written means a re-send, never a loss (at-least-once).

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::sign::{signature_header, Secret};
use super::spec::WebhookPolicy;
use super::WebhookRecord;
use crate::clock::{now_ms, rfc3339_ms};
use crate::cluster::{self, NodeId};
use crate::engine::state::{self as state_store, PendingDelivery, Settle, StateStore};
use crate::metrics::Metrics;

/// Channels of one webhook with a request in flight at once.
const MAX_IN_FLIGHT: usize = 16;
/// Queue entries read from the store at once.
const LOAD_PAGE: usize = 2_000;
/// Entries of one channel held in memory; the rest of its backlog stays in the store, so a
/// channel that is stuck on its retries never keeps the others from being read.
const CHANNEL_CAP: usize = 64;
/// Entries held in memory in all (a bound on memory when every channel is stuck).
const TOTAL_CAP: usize = 20_000;
/// How long outcomes may wait before they are written (they are written sooner when many).
const SETTLE_DELAY: Duration = Duration::from_millis(25);
const SETTLE_BATCH: usize = 256;
/// Attempt records kept per webhook.
pub const KEEP_LOG: usize = 1_000;
/// The most of a receiver's answer that is read (and the most of it quoted in an error).
const MAX_ANSWER: usize = 64 * 1024;
const MAX_QUOTE: usize = 200;
/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The secrets that sign: the current one, and the one it replaced until that expires.
#[derive(Debug, Clone)]
pub struct Signing {
    pub current: Secret,
    pub previous: Option<(Secret, i64)>,
}

impl Signing {
    fn header(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut secrets = vec![&self.current];
        if let Some((old, until_ms)) = &self.previous {
            if now_ms() < *until_ms {
                secrets.push(old);
            }
        }
        signature_header(&secrets, id, timestamp, body)
    }
}

/// What a worker tells the registry.
#[derive(Debug)]
pub enum WorkerEvent {
    /// An attempt failed; `since` is when the current run of failures began.
    Failing {
        id: String,
        since_ms: i64,
        error: String,
    },
    /// An attempt succeeded after failures.
    Healthy { id: String },
    /// A delivery used up its retries.
    GaveUp { id: String },
    /// The receiver answered 410, or failures lasted `disable_after`.
    Disable { id: String, reason: String },
}

/// What the registry tells a worker.
#[derive(Debug)]
pub enum WorkerMsg {
    /// New entries are in the store queue.
    Poke,
    Signing(Signing),
}

/// One attempt, as `GET /api/webhooks/{id}/deliveries` shows it.
#[derive(Debug, Serialize)]
pub struct AttemptRecord {
    pub channel: String,
    pub seq: u64,
    pub attempt: u32,
    pub time: String,
    pub status_code: Option<u16>,
    pub latency_ms: Option<u64>,
    pub error: Option<String>,
    pub next_attempt: Option<String>,
}

pub struct WorkerContext {
    pub id: String,
    pub url: url::Url,
    pub signing: Signing,
    pub policy: Arc<WebhookPolicy>,
    pub client: reqwest::Client,
    pub state: Arc<dyn StateStore>,
    pub metrics: Arc<Metrics>,
    pub events: mpsc::UnboundedSender<WorkerEvent>,
    /// When the current run of failures began (persisted in the webhook's record).
    pub failing_since_ms: Option<i64>,
    /// Try what is pending at once rather than at its scheduled retry (set when re-enabled).
    pub retry_now: bool,
    /// This node: it delivers only while it holds the lease `webhook:{id}`.
    pub node: NodeId,
}

impl WorkerContext {
    /// A loaded entry, made due now when the webhook was just re-enabled.
    fn due(&self, mut p: PendingDelivery) -> PendingDelivery {
        if self.retry_now {
            p.next_attempt_ms = p.next_attempt_ms.min(now_ms());
        }
        p
    }
}

enum Outcome {
    Success,
    Failure {
        error: String,
        retry_after: Option<Duration>,
        gone: bool,
    },
}

struct AttemptDone {
    channel: String,
    status: Option<u16>,
    latency: Duration,
    outcome: Outcome,
}

/// One channel's share of the queue held in memory.
#[derive(Default)]
struct ChannelQueue {
    items: VecDeque<PendingDelivery>,
    /// Entries of this channel above this key (up to the worker's `loaded_key`) were left in
    /// the store when the channel was full; they are read back as it drains.
    spilled_after: Option<i64>,
}

struct Worker {
    ctx: WorkerContext,
    queues: BTreeMap<String, ChannelQueue>,
    /// Entries in `queues`.
    queued: usize,
    /// Channels to read back from the store (drained below half of `CHANNEL_CAP`).
    refill: BTreeSet<String>,
    /// The channel whose attempt started last: the next round starts after it.
    started_last: Option<String>,
    in_flight: HashSet<String>,
    loaded_key: i64,
    more_in_store: bool,
    settles: Vec<Settle>,
    log: Vec<String>,
    settle_by: Option<tokio::time::Instant>,
    /// Whether other nodes share the store (and may hold the lease).
    shared: bool,
    /// While this node holds the webhook's lease: when it lapses unless renewed.
    held_until: Option<tokio::time::Instant>,
}

/// Runs until `cancel` fires or the webhook disables itself. Delivers only while this node holds
/// the lease `webhook:{id}` (a one-node store grants it at once and for good): the lease is
/// renewed every `cluster::RENEW_EVERY`, and a worker whose node does not hold it tries as often
/// to take it. The lease is not released when the worker stops (the webhook was disabled or
/// deleted: other nodes learn that from the store before it lapses); the registry releases it
/// at shutdown.
pub async fn run(
    ctx: WorkerContext,
    mut inbox: mpsc::UnboundedReceiver<WorkerMsg>,
    cancel: CancellationToken,
) {
    let shared = ctx.state.is_shared();
    let mut w = Worker {
        ctx,
        queues: BTreeMap::new(),
        queued: 0,
        refill: BTreeSet::new(),
        started_last: None,
        in_flight: HashSet::new(),
        loaded_key: 0,
        more_in_store: true,
        settles: Vec::new(),
        log: Vec::new(),
        settle_by: None,
        shared,
        held_until: None,
    };
    let lease = cluster::webhook_lease(&w.ctx.id);
    let mut attempts: JoinSet<AttemptDone> = JoinSet::new();
    let mut load_retry: Option<tokio::time::Instant> = None;
    // When to take or renew the lease next; None once a one-node store granted it.
    let mut lease_check = Some(tokio::time::Instant::now());
    loop {
        if lease_check.is_some_and(|t| t <= tokio::time::Instant::now()) {
            w.keep_lease(&lease, &mut attempts).await;
            lease_check = shared.then(|| tokio::time::Instant::now() + cluster::RENEW_EVERY);
        }
        let mut next_due = None;
        if w.held_until.is_some() {
            if load_retry.is_none() && (w.wants_page() || !w.refill.is_empty()) {
                if let Err(error) = w.load().await {
                    tracing::warn!(webhook = %w.ctx.id, %error, "cannot read the webhook queue; retrying");
                    load_retry = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                }
            }
            next_due = w.start_due(&mut attempts);
        }
        let wake_at = [next_due, w.settle_by, load_retry, lease_check]
            .into_iter()
            .flatten()
            .min();
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(done) = attempts.join_next(), if !attempts.is_empty() => {
                if let Ok(done) = done {
                    if w.finish(done) {
                        break;
                    }
                }
            }
            msg = inbox.recv() => match msg {
                Some(WorkerMsg::Poke) => w.more_in_store = true,
                Some(WorkerMsg::Signing(s)) => w.ctx.signing = s,
                None => break,
            },
            _ = sleep_until_opt(wake_at) => {
                if load_retry.is_some_and(|t| t <= tokio::time::Instant::now()) {
                    load_retry = None;
                }
            }
        }
        if w.settles.len() + w.log.len() >= SETTLE_BATCH
            || w.settle_by
                .is_some_and(|t| t <= tokio::time::Instant::now())
        {
            w.flush().await;
        }
    }
    attempts.abort_all();
    w.flush().await;
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Worker {
    /// Takes or renews the webhook's lease. Taking it starts delivery from the queue as stored
    /// (another node may have delivered part of it); losing it (or failing to renew it until it
    /// may lapse) stops delivery at once, abandoning attempts in flight: the new holder sends
    /// them again (at least once).
    async fn keep_lease(&mut self, lease: &str, attempts: &mut JoinSet<AttemptDone>) {
        let asked = tokio::time::Instant::now();
        let result = self
            .ctx
            .state
            .lease(
                lease,
                self.ctx.node.as_str(),
                cluster::ms(cluster::LEASE_TTL),
            )
            .await;
        match result {
            Ok(true) if self.held_until.is_none() => {
                if self.take_over().await {
                    self.held_until = Some(asked + cluster::LEASE_TTL);
                } else if let Err(error) =
                    self.ctx.state.release(lease, self.ctx.node.as_str()).await
                {
                    tracing::warn!(webhook = %self.ctx.id, %error, "could not release the webhook's lease; it lapses");
                }
            }
            Ok(true) => {
                self.held_until = Some(asked + cluster::LEASE_TTL);
                // Other nodes queue too, and their commits may not reach this node's registry.
                self.more_in_store = true;
            }
            Ok(false) => {
                if self.held_until.is_some() {
                    tracing::warn!(webhook = %self.ctx.id, "another node holds the webhook's lease; this node stops delivering it");
                    self.stand_down(attempts);
                }
            }
            Err(error) => {
                tracing::warn!(webhook = %self.ctx.id, %error, "could not take or renew the webhook's lease; will retry");
                // Stop before the lease may lapse: another node may deliver after that.
                if self
                    .held_until
                    .is_some_and(|until| until <= asked + cluster::RENEW_EVERY)
                {
                    self.stand_down(attempts);
                }
            }
        }
    }

    /// This node has just taken the lease. On a shared store the webhook may have been
    /// disabled or deleted through another node: then it does not deliver (false).
    async fn take_over(&mut self) -> bool {
        if self.shared {
            let record = state_store::get_typed::<WebhookRecord>(
                self.ctx.state.as_ref(),
                super::registry::DOC_KIND,
                &self.ctx.id,
            )
            .await;
            match record {
                Ok(Some(record)) if record.disabled_reason.is_none() => {
                    self.ctx.failing_since_ms = record.failing_since_ms;
                }
                Ok(_) => return false,
                Err(error) => {
                    tracing::warn!(webhook = %self.ctx.id, %error, "cannot read the webhook; will retry");
                    return false;
                }
            }
            tracing::info!(webhook = %self.ctx.id, node = %self.ctx.node, "this node delivers the webhook");
        }
        self.forget_queue();
        true
    }

    /// Stops delivering: what is in memory and in flight is dropped (outcomes already known
    /// are still written).
    fn stand_down(&mut self, attempts: &mut JoinSet<AttemptDone>) {
        self.held_until = None;
        // Dropping the set aborts its attempts; none of their outcomes can arrive later.
        *attempts = JoinSet::new();
        self.forget_queue();
    }

    /// Empties the in-memory queue, so it is read again from the store.
    fn forget_queue(&mut self) {
        self.queues.clear();
        self.queued = 0;
        self.refill.clear();
        self.started_last = None;
        self.in_flight.clear();
        self.loaded_key = 0;
        self.more_in_store = true;
    }

    /// Another page is worth reading while little of what is in memory can be sent now.
    fn wants_page(&self) -> bool {
        if !self.more_in_store || self.queued >= TOTAL_CAP {
            return false;
        }
        let now = now_ms();
        let ready: usize = self
            .queues
            .values()
            .filter(|q| q.items.front().is_some_and(|h| h.next_attempt_ms <= now))
            .map(|q| q.items.len())
            .sum();
        ready < LOAD_PAGE / 2
    }

    async fn load(&mut self) -> Result<(), crate::engine::EngineError> {
        while let Some(channel) = self.refill.first().cloned() {
            self.refill_channel(&channel).await?;
            self.refill.remove(&channel);
        }
        if !self.wants_page() {
            return Ok(());
        }
        let page = self
            .ctx
            .state
            .webhook_pending(&self.ctx.id, self.loaded_key, LOAD_PAGE)
            .await?;
        self.more_in_store = page.len() == LOAD_PAGE;
        for p in page {
            self.loaded_key = self.loaded_key.max(p.key);
            let queue = self.queues.entry(p.item.channel.clone()).or_default();
            if queue.spilled_after.is_none() && queue.items.len() < CHANNEL_CAP {
                queue.items.push_back(self.ctx.due(p));
                self.queued += 1;
            } else if queue.spilled_after.is_none() {
                queue.spilled_after = queue.items.back().map(|last| last.key);
            }
        }
        Ok(())
    }

    /// Reads back the part of a channel's backlog that was left in the store.
    async fn refill_channel(&mut self, channel: &str) -> Result<(), crate::engine::EngineError> {
        let Some(after) = self.queues.get(channel).and_then(|q| q.spilled_after) else {
            return Ok(());
        };
        let rows = self
            .ctx
            .state
            .webhook_pending_channel(&self.ctx.id, channel, after, self.loaded_key, CHANNEL_CAP)
            .await?;
        let Some(queue) = self.queues.get_mut(channel) else {
            return Ok(());
        };
        queue.spilled_after = if rows.len() == CHANNEL_CAP {
            rows.last().map(|r| r.key)
        } else {
            None
        };
        self.queued += rows.len();
        for p in rows {
            queue.items.push_back(self.ctx.due(p));
        }
        if queue.items.is_empty() && queue.spilled_after.is_none() {
            self.queues.remove(channel);
        }
        Ok(())
    }

    /// Starts an attempt for every channel whose head is due, taking channels in turn from
    /// where the last round stopped; returns when the next head is due.
    fn start_due(&mut self, attempts: &mut JoinSet<AttemptDone>) -> Option<tokio::time::Instant> {
        let now = now_ms();
        let mut next_due: Option<i64> = None;
        // Channels after the one started last, then from the first up to it.
        let (after, upto) = match &self.started_last {
            Some(last) => (
                self.queues
                    .range::<str, _>((Bound::Excluded(last.as_str()), Bound::Unbounded)),
                Some(
                    self.queues
                        .range::<str, _>((Bound::Unbounded, Bound::Included(last.as_str()))),
                ),
            ),
            None => (self.queues.range::<str, _>(..), None),
        };
        let mut started_last = None;
        for (channel, queue) in after.chain(upto.into_iter().flatten()) {
            if self.in_flight.len() >= MAX_IN_FLIGHT {
                break;
            }
            let Some(head) = queue.items.front() else {
                continue;
            };
            if self.in_flight.contains(channel) {
                continue;
            }
            if head.next_attempt_ms > now {
                next_due =
                    Some(next_due.map_or(head.next_attempt_ms, |d| d.min(head.next_attempt_ms)));
                continue;
            }
            self.in_flight.insert(channel.clone());
            started_last = Some(channel.clone());
            attempts.spawn(attempt(
                self.ctx.client.clone(),
                self.ctx.url.clone(),
                self.ctx.policy.clone(),
                self.ctx.signing.clone(),
                head.clone(),
            ));
        }
        if started_last.is_some() {
            self.started_last = started_last;
        }
        next_due.map(|ms| {
            tokio::time::Instant::now()
                + Duration::from_millis(u64::try_from(ms - now).unwrap_or(0))
        })
    }

    /// Applies one attempt's outcome; true when the webhook disabled itself.
    fn finish(&mut self, done: AttemptDone) -> bool {
        self.in_flight.remove(&done.channel);
        let Some(queue) = self.queues.get_mut(&done.channel) else {
            return false;
        };
        let Some(head) = queue.items.front_mut() else {
            return false;
        };
        let now = now_ms();
        let attempt_no = head.attempt + 1;
        let latency_ms = Some(u64::try_from(done.latency.as_millis()).unwrap_or(u64::MAX));
        self.ctx
            .metrics
            .webhook_latency
            .observe(done.latency.as_secs_f64());
        let mut record = AttemptRecord {
            channel: done.channel.clone(),
            seq: head.item.seq,
            attempt: attempt_no,
            time: rfc3339_ms(now),
            status_code: done.status,
            latency_ms,
            error: None,
            next_attempt: None,
        };
        let mut disabled = None;
        match done.outcome {
            Outcome::Success => {
                count(&self.ctx.metrics, "success");
                self.settles.push(Settle::Done { key: head.key });
                queue.items.pop_front();
                self.queued -= 1;
                if self.ctx.failing_since_ms.take().is_some() {
                    report(
                        &self.ctx,
                        WorkerEvent::Healthy {
                            id: self.ctx.id.clone(),
                        },
                    );
                }
            }
            Outcome::Failure {
                error,
                retry_after,
                gone,
            } => {
                record.error = Some(error.clone());
                let since = *self.ctx.failing_since_ms.get_or_insert(now);
                if gone {
                    count(&self.ctx.metrics, "gone");
                    head.attempt = attempt_no;
                    self.settles.push(Settle::Retry {
                        key: head.key,
                        attempt: attempt_no,
                        next_attempt_ms: now,
                    });
                    disabled = Some("the receiver answered 410 Gone".to_owned());
                } else if let Some(delay) =
                    self.ctx.policy.retry.get(head.attempt as usize).copied()
                {
                    count(&self.ctx.metrics, "failure");
                    let delay = retry_after.unwrap_or(delay);
                    let next =
                        now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
                    head.attempt = attempt_no;
                    head.next_attempt_ms = next;
                    record.next_attempt = Some(rfc3339_ms(next));
                    self.settles.push(Settle::Retry {
                        key: head.key,
                        attempt: attempt_no,
                        next_attempt_ms: next,
                    });
                } else {
                    count(&self.ctx.metrics, "exhausted");
                    self.settles.push(Settle::Done { key: head.key });
                    queue.items.pop_front();
                    self.queued -= 1;
                    report(
                        &self.ctx,
                        WorkerEvent::GaveUp {
                            id: self.ctx.id.clone(),
                        },
                    );
                }
                let failing_for = Duration::from_millis(u64::try_from(now - since).unwrap_or(0));
                if disabled.is_none() && failing_for >= self.ctx.policy.disable_after {
                    disabled = Some(format!(
                        "failing without a success for {} (disable_after)",
                        humantime::format_duration(Duration::from_secs(failing_for.as_secs()))
                    ));
                }
                report(
                    &self.ctx,
                    WorkerEvent::Failing {
                        id: self.ctx.id.clone(),
                        since_ms: since,
                        error,
                    },
                );
            }
        }
        if queue.spilled_after.is_some() && queue.items.len() < CHANNEL_CAP / 2 {
            self.refill.insert(done.channel.clone());
        } else if queue.items.is_empty() && queue.spilled_after.is_none() {
            self.queues.remove(&done.channel);
        }
        if let Ok(json) = serde_json::to_string(&record) {
            self.log.push(json);
        }
        self.settle_by
            .get_or_insert(tokio::time::Instant::now() + SETTLE_DELAY);
        if let Some(reason) = disabled {
            report(
                &self.ctx,
                WorkerEvent::Disable {
                    id: self.ctx.id.clone(),
                    reason,
                },
            );
            return true;
        }
        false
    }

    async fn flush(&mut self) {
        if self.settles.is_empty() && self.log.is_empty() {
            self.settle_by = None;
            return;
        }
        let settles = std::mem::take(&mut self.settles);
        let log = std::mem::take(&mut self.log);
        match self
            .ctx
            .state
            .webhook_settle(&self.ctx.id, settles.clone(), log.clone(), KEEP_LOG)
            .await
        {
            Ok(()) => self.settle_by = None,
            Err(error) => {
                tracing::warn!(webhook = %self.ctx.id, %error, "cannot record webhook outcomes; retrying");
                self.settles = settles;
                self.log = log;
                self.settle_by = Some(tokio::time::Instant::now() + Duration::from_secs(1));
            }
        }
    }
}

fn count(metrics: &Metrics, result: &'static str) {
    metrics
        .webhook_deliveries
        .get_or_create(&vec![("result", result)])
        .inc();
}

fn report(ctx: &WorkerContext, event: WorkerEvent) {
    // The registry outlives its workers; if it is gone, so is the reason to report.
    let _ = ctx.events.send(event);
}

/// One signed POST of one message.
async fn attempt(
    client: reqwest::Client,
    url: url::Url,
    policy: Arc<WebhookPolicy>,
    signing: Signing,
    delivery: PendingDelivery,
) -> AttemptDone {
    let item = &delivery.item;
    let started = Instant::now();
    let done = |status, outcome| AttemptDone {
        channel: item.channel.clone(),
        status,
        latency: started.elapsed(),
        outcome,
    };
    let failure = |error: String| Outcome::Failure {
        error,
        retry_after: None,
        gone: false,
    };
    if let Err(e) = policy.hosts.check_literal(&url) {
        return done(None, failure(e.to_string()));
    }
    let id = format!("{}:{}:{}", item.channel, item.epoch, item.seq);
    let timestamp = now_ms() / 1000;
    let signature = signing.header(&id, timestamp, item.body.as_bytes());
    let request = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", &id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(item.body.clone());
    let deadline = started + policy.timeout;
    let response = match tokio::time::timeout_at(deadline.into(), request.send()).await {
        Err(_) => return done(None, failure(timed_out(policy.timeout))),
        Ok(Err(e)) if e.is_timeout() => return done(None, failure(timed_out(policy.timeout))),
        Ok(Err(e)) => return done(None, failure(describe(&e))),
        Ok(Ok(r)) => r,
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    if status.is_success() {
        // Read (a little of) the answer so the connection can be reused; its content is ignored.
        let _ = tokio::time::timeout_at(deadline.into(), read_some(response)).await;
        return done(Some(status.as_u16()), Outcome::Success);
    }
    let answer = tokio::time::timeout_at(deadline.into(), read_some(response))
        .await
        .unwrap_or_default();
    let mut error = format!("HTTP {status}");
    let quote: String = String::from_utf8_lossy(&answer)
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_QUOTE)
        .collect();
    if !quote.trim().is_empty() {
        error.push_str(": ");
        error.push_str(quote.trim());
    }
    if status.is_redirection() {
        error.push_str(" (redirects are not followed)");
    }
    done(
        Some(status.as_u16()),
        Outcome::Failure {
            error,
            retry_after,
            gone: status == reqwest::StatusCode::GONE,
        },
    )
}

/// At most `MAX_ANSWER` bytes of the body; the rest is never read.
async fn read_some(mut response: reqwest::Response) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < MAX_ANSWER {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = MAX_ANSWER - out.len();
                out.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            _ => break,
        }
    }
    out
}

fn timed_out(timeout: Duration) -> String {
    format!("timed out after {}", humantime::format_duration(timeout))
}

/// The error and its causes, on one line, bounded.
fn describe(e: &reqwest::Error) -> String {
    let mut text = if e.is_connect() {
        "connection failed".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text.chars().take(500).collect()
}

/// `Retry-After` as seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    let delay = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
        let ms = at.timestamp_millis() - now_ms();
        Duration::from_millis(u64::try_from(ms).unwrap_or(0))
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::testing::{self, SharedState};
    use crate::engine::state::{Enqueue, OutboxItem};
    use crate::webhooks::Source;

    const ID: &str = "wh_test";

    async fn enqueue(state: &SharedState, seqs: std::ops::RangeInclusive<u64>) {
        let items = seqs
            .map(|seq| OutboxItem {
                channel: "orders:1".into(),
                epoch: "e".into(),
                seq,
                body: format!("{{\"seq\":{seq}}}"),
                replay: 0,
            })
            .collect();
        state
            .webhook_enqueue(vec![Enqueue {
                webhook: ID.into(),
                items,
                cursors: Vec::new(),
            }])
            .await
            .unwrap();
    }

    /// A worker of webhook `ID` on its own node, its deliveries counted in its own metrics.
    struct Running {
        stop: CancellationToken,
        metrics: Arc<Metrics>,
        task: tokio::task::JoinHandle<()>,
        _inbox: mpsc::UnboundedSender<WorkerMsg>,
    }

    fn spawn_worker(state: &Arc<SharedState>, url: &str, node: &NodeId) -> Running {
        let metrics = Arc::new(Metrics::default());
        let (events, _) = mpsc::unbounded_channel();
        let (inbox, inbox_rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let ctx = WorkerContext {
            id: ID.into(),
            url: url::Url::parse(url).unwrap(),
            signing: Signing {
                current: Secret::generate(),
                previous: None,
            },
            policy: Arc::new(WebhookPolicy::defaults(true)),
            client: reqwest::Client::new(),
            state: state.clone(),
            metrics: metrics.clone(),
            events,
            failing_since_ms: None,
            retry_now: false,
            node: node.clone(),
        };
        let task = tokio::spawn(run(ctx, inbox_rx, cancel.clone()));
        Running {
            stop: cancel,
            metrics,
            task,
            _inbox: inbox,
        }
    }

    async fn wait_for_empty_queue(state: &Arc<SharedState>) {
        let state = state.clone();
        testing::wait_until("the queue to be empty", || {
            let state = state.clone();
            async move { state.webhook_pending_count(ID).await.unwrap() == 0 }
        })
        .await;
    }

    fn delivered(metrics: &Metrics) -> u64 {
        metrics
            .webhook_deliveries
            .get_or_create(&vec![("result", "success")])
            .get()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_node_delivers_and_another_resumes_when_its_lease_lapses() {
        let dir = tempfile::tempdir().unwrap();
        let state = SharedState::open(dir.path());
        let (url, seqs) = testing::receiver().await;
        let record = WebhookRecord {
            id: ID.into(),
            url: url.clone(),
            channels: vec!["orders:*".into()],
            description: None,
            created_ms: now_ms(),
            source: Source::Api,
            secret: Secret::generate().as_str().to_owned(),
            previous_secret: None,
            previous_until_ms: None,
            disabled_reason: None,
            failing_since_ms: None,
            last_error: None,
            failed: 0,
        };
        state_store::put_typed(
            state.as_ref(),
            super::super::registry::DOC_KIND,
            ID,
            &record,
        )
        .await
        .unwrap();
        enqueue(&state, 1..=20).await;
        // A node that died holds the lease for a while: nobody delivers until it lapses.
        let lease = cluster::webhook_lease(ID);
        state.hold(&lease, "node_dead", cluster::LEASE_TTL);
        let (a, b) = (NodeId::generate(), NodeId::generate());
        let workers = [
            spawn_worker(&state, &url, &a),
            spawn_worker(&state, &url, &b),
        ];
        tokio::time::sleep(cluster::RENEW_EVERY * 2).await;
        assert!(
            seqs.lock().unwrap().is_empty(),
            "nothing sent under another's lease"
        );
        let received = seqs.clone();
        testing::wait_until("twenty deliveries", || {
            let n = received.lock().unwrap().len();
            async move { n >= 20 }
        })
        .await;
        wait_for_empty_queue(&state).await;
        let holder = state.holder(&lease).expect("a holder");
        let [first, second] = workers;
        let (dead, live) = if holder == a.as_str() {
            (first, second)
        } else {
            (second, first)
        };
        assert_eq!(delivered(&dead.metrics), 20);
        assert_eq!(delivered(&live.metrics), 0, "the other node sent nothing");

        // The holder dies (its lease lapses, it never releases it); the other goes on from the
        // queue as stored.
        dead.stop.cancel();
        dead.task.await.unwrap();
        state.lapse_leases_of(&holder);
        enqueue(&state, 21..=30).await;
        testing::wait_until("thirty deliveries", || {
            let n = received.lock().unwrap().len();
            async move { n >= 30 }
        })
        .await;
        wait_for_empty_queue(&state).await;
        assert_eq!(
            *seqs.lock().unwrap(),
            (1..=30).collect::<Vec<u64>>(),
            "each once, in order"
        );
        assert_eq!(delivered(&live.metrics), 10);
        live.stop.cancel();
        live.task.await.unwrap();
    }

    #[test]
    fn retry_after_takes_seconds_and_dates_and_is_capped() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("99999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
