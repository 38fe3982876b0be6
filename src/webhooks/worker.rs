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
use crate::clock::{now_ms, rfc3339_ms};
use crate::engine::state::{PendingDelivery, Settle, StateStore};
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
}

/// Runs until `cancel` fires or the webhook disables itself.
pub async fn run(
    ctx: WorkerContext,
    mut inbox: mpsc::UnboundedReceiver<WorkerMsg>,
    cancel: CancellationToken,
) {
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
    };
    let mut attempts: JoinSet<AttemptDone> = JoinSet::new();
    let mut load_retry: Option<tokio::time::Instant> = None;
    loop {
        if load_retry.is_none() && (w.wants_page() || !w.refill.is_empty()) {
            if let Err(error) = w.load().await {
                tracing::warn!(webhook = %w.ctx.id, %error, "cannot read the webhook queue; retrying");
                load_retry = Some(tokio::time::Instant::now() + Duration::from_secs(1));
            }
        }
        let next_due = w.start_due(&mut attempts);
        let wake_at = [next_due, w.settle_by, load_retry]
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
