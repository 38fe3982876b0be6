//! The hub: channels, messages, seq/epoch, the backlog→live hand-off and fan-out.
//!
//! It knows nothing about HTTP, SQL or Redis: transports call it, engines store for it.

pub mod json;
pub mod live;
pub mod pattern;
pub mod retention;
pub mod tap;
pub mod types;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::engine::{ChannelMeta, Engine, EngineError, Published};
use crate::metrics::Metrics;
use live::{Live, Look, SubscriberGuard};
use retention::RetentionRules;
use types::{ChannelName, Epoch, NewMessage, Seq, SharedMessage};

/// How many messages one subscriber step hands over at most (one write to the socket).
pub const MAX_BATCH: usize = 256;
/// How many bytes of messages one subscriber step hands over at most (past its first message),
/// so that what a connection may queue for a stalled client is bounded in memory, not only in
/// batches: 256 messages of 64 KiB would be 16 MiB a batch.
pub const MAX_BATCH_BYTES: usize = 512 * 1024;

pub type HubError = EngineError;

/// A read of a channel's history.
#[derive(Debug, Clone)]
pub struct ReadResult {
    pub epoch: Epoch,
    pub messages: Vec<SharedMessage>,
    pub last_seq: Seq,
    pub truncated: bool,
}

/// Where a subscription starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// Only messages published from now on.
    Live,
    /// Everything after `since`; a stale `epoch` means the client's history is gone.
    Since(Seq, Option<Epoch>),
}

/// What the subscriber is told when it starts.
#[derive(Debug, Clone)]
pub struct Subscribed {
    pub epoch: Epoch,
    pub last_seq: Seq,
    pub truncated: bool,
    /// The first seq the subscriber will receive.
    pub first_seq: Seq,
}

/// One step of a subscription.
#[derive(Debug)]
pub enum Event {
    /// The next messages, contiguous after the previous ones.
    Messages(Vec<SharedMessage>),
    /// History was lost (pruned while the subscriber lagged, or a new epoch); delivery goes on
    /// from `first_seq` of `epoch`.
    Reset { epoch: Epoch, first_seq: Seq },
}

pub struct Hub {
    engine: Arc<dyn Engine>,
    live: Arc<Live>,
    retention: Arc<RetentionRules>,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(
        engine: Arc<dyn Engine>,
        live: Arc<Live>,
        retention: Arc<RetentionRules>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            engine,
            live,
            retention,
            metrics,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    pub fn retention(&self) -> &Arc<RetentionRules> {
        &self.retention
    }

    /// Durably publishes `batch` to `channel`, atomically and in order.
    pub async fn publish(
        &self,
        channel: &ChannelName,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Published>, HubError> {
        let results = self.engine.publish(channel, batch).await?;
        let fresh = results.iter().filter(|r| !r.duplicate).count() as u64;
        self.metrics.messages_published.inc_by(fresh);
        Ok(results)
    }

    fn not_before_ms(&self, channel: &ChannelName) -> i64 {
        crate::clock::now_ms().saturating_sub(self.retention.for_channel(channel).max_age_ms())
    }

    /// Messages after `since`, from the hot window when it covers them, else from the store.
    pub async fn read(
        &self,
        channel: &ChannelName,
        since: Seq,
        limit: usize,
        client_epoch: Option<&Epoch>,
    ) -> Result<ReadResult, HubError> {
        let not_before = self.not_before_ms(channel);
        if let Some(w) = self.live.get(channel).and_then(|c| c.read(since, limit)) {
            let fresh = w.messages.first().is_none_or(|m| m.time_ms >= not_before);
            if fresh && client_epoch.is_none_or(|e| *e == w.epoch) {
                return Ok(ReadResult {
                    epoch: w.epoch,
                    messages: w.messages,
                    last_seq: w.last_seq,
                    truncated: false,
                });
            }
        }
        let page = self
            .engine
            .read(channel, since, limit, usize::MAX, not_before)
            .await?;
        if let Some(c) = self.live.get(channel) {
            c.learn_epoch(&page.epoch);
        }
        if client_epoch.is_some_and(|e| *e != page.epoch) {
            let page = self
                .engine
                .read(channel, 0, limit, usize::MAX, not_before)
                .await?;
            return Ok(ReadResult {
                epoch: page.epoch,
                messages: page.messages,
                last_seq: page.last_seq,
                truncated: true,
            });
        }
        let truncated = since < page.last_seq && page.first_seq > since + 1;
        Ok(ReadResult {
            epoch: page.epoch,
            messages: page.messages,
            last_seq: page.last_seq,
            truncated,
        })
    }

    /// A long-poll: answers as soon as a message past `since` exists, or empty after `wait`.
    pub async fn read_wait(
        &self,
        channel: &ChannelName,
        since: Seq,
        limit: usize,
        client_epoch: Option<&Epoch>,
        wait: Duration,
        shutdown: &CancellationToken,
    ) -> Result<ReadResult, HubError> {
        let guard = self.live.subscribe(channel);
        let mut wake = guard.channel().watch();
        wake.borrow_and_update();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let result = self.read(channel, since, limit, client_epoch).await?;
            if !result.messages.is_empty() || result.truncated || wait.is_zero() {
                return Ok(result);
            }
            tokio::select! {
                changed = wake.changed() => if changed.is_err() { return Ok(result) },
                _ = tokio::time::sleep_until(deadline) => return Ok(result),
                _ = shutdown.cancelled() => return Ok(result),
            }
        }
    }

    pub async fn channel(&self, channel: &ChannelName) -> Result<ChannelInfo, HubError> {
        let meta = self.engine.channel(channel).await?;
        Ok(self.info(meta))
    }

    pub async fn channels(&self) -> Result<Vec<ChannelInfo>, HubError> {
        let metas = self.engine.channels().await?;
        Ok(metas.into_iter().map(|m| self.info(m)).collect())
    }

    fn info(&self, meta: ChannelMeta) -> ChannelInfo {
        ChannelInfo {
            subscribers: self.live.subscriber_count(&meta.name),
            meta,
        }
    }

    pub async fn delete_channel(&self, channel: &ChannelName) -> Result<Epoch, HubError> {
        self.engine.delete_channel(channel).await
    }

    /// Starts a subscription. The subscriber is registered before the store is read, so nothing
    /// committed in between can be missed; anything seen twice is skipped by seq.
    pub async fn subscribe(
        self: &Arc<Self>,
        channel: &ChannelName,
        start: Start,
    ) -> Result<(Subscribed, Subscription), HubError> {
        let guard = self.live.subscribe(channel);
        let mut wake = guard.channel().watch();
        wake.borrow_and_update();
        let not_before = self.not_before_ms(channel);
        let page = self
            .engine
            .read(channel, 0, 0, usize::MAX, not_before)
            .await?;
        guard.channel().learn_epoch(&page.epoch);
        let (cursor, truncated) = match start {
            Start::Live => (page.last_seq, false),
            Start::Since(since, epoch) => {
                // A cursor past the end means the client saw a history this store no longer
                // has (the store's last_seq is authoritative): treat it like a stale epoch.
                let stale = epoch.is_some_and(|e| e != page.epoch) || since > page.last_seq;
                let since = if stale { 0 } else { since };
                if since + 1 < page.first_seq && since < page.last_seq {
                    (page.first_seq - 1, true)
                } else {
                    (since, stale)
                }
            }
        };
        self.metrics.subscriptions.inc();
        let subscribed = Subscribed {
            epoch: page.epoch.clone(),
            last_seq: page.last_seq,
            truncated,
            first_seq: cursor + 1,
        };
        let sub = Subscription {
            hub: self.clone(),
            channel: channel.clone(),
            guard,
            wake,
            epoch: page.epoch,
            cursor,
            known_last: page.last_seq,
        };
        Ok((subscribed, sub))
    }
}

#[derive(Debug, Clone)]
pub struct ChannelInfo {
    pub meta: ChannelMeta,
    pub subscribers: usize,
}

/// A subscriber's cursor on one channel. `next` is cancel-safe: the cursor moves only when
/// messages are handed out.
pub struct Subscription {
    hub: Arc<Hub>,
    channel: ChannelName,
    guard: SubscriberGuard,
    wake: watch::Receiver<u64>,
    epoch: Epoch,
    cursor: Seq,
    /// The newest seq the store is known to hold; the window may not cover up to it.
    known_last: Seq,
}

impl Subscription {
    pub fn channel(&self) -> &ChannelName {
        &self.channel
    }

    pub fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    pub fn cursor(&self) -> Seq {
        self.cursor
    }

    /// The next messages after the cursor: backlog first, then live, never a gap or a repeat.
    pub async fn next(&mut self) -> Result<Event, HubError> {
        loop {
            self.wake.borrow_and_update();
            let look =
                self.guard
                    .channel()
                    .look(&self.epoch, self.cursor, MAX_BATCH, MAX_BATCH_BYTES);
            match look {
                Look::Messages(messages) => {
                    if let Some(last) = messages.last() {
                        self.cursor = last.seq;
                        self.known_last = self.known_last.max(last.seq);
                    }
                    return Ok(Event::Messages(messages));
                }
                Look::Reset(epoch) => {
                    self.epoch = epoch.clone();
                    self.cursor = 0;
                    self.known_last = 0;
                    return Ok(Event::Reset {
                        epoch,
                        first_seq: 1,
                    });
                }
                Look::Behind => {
                    if let Some(event) = self.read_from_store().await? {
                        return Ok(event);
                    }
                }
                Look::Nothing if self.cursor < self.known_last => {
                    if let Some(event) = self.read_from_store().await? {
                        return Ok(event);
                    }
                }
                Look::Nothing => {}
            }
            if self.wake.changed().await.is_err() {
                // The sender lives as long as our guard's channel, so this cannot happen; wait
                // forever rather than spin if it ever does.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Reads past the cursor from the store; `None` when there is nothing there (wait instead).
    async fn read_from_store(&mut self) -> Result<Option<Event>, HubError> {
        let not_before = self.hub.not_before_ms(&self.channel);
        let page = self
            .hub
            .engine
            .read(
                &self.channel,
                self.cursor,
                MAX_BATCH,
                MAX_BATCH_BYTES,
                not_before,
            )
            .await?;
        if page.epoch != self.epoch {
            self.epoch = page.epoch.clone();
            self.cursor = 0;
            self.known_last = 0;
            return Ok(Some(Event::Reset {
                epoch: page.epoch,
                first_seq: 1,
            }));
        }
        self.known_last = page.last_seq;
        match page.messages.first() {
            Some(first) if first.seq > self.cursor + 1 => {
                // Pruned while we lagged: say so, then deliver from the oldest retained.
                self.cursor = first.seq - 1;
                Ok(Some(Event::Reset {
                    epoch: page.epoch,
                    first_seq: first.seq,
                }))
            }
            Some(_) => {
                if let Some(last) = page.messages.last() {
                    self.cursor = last.seq;
                }
                Ok(Some(Event::Messages(page.messages)))
            }
            None if page.last_seq > self.cursor => {
                // Everything after the cursor expired by age.
                self.cursor = page.last_seq;
                Ok(Some(Event::Reset {
                    epoch: page.epoch,
                    first_seq: page.last_seq + 1,
                }))
            }
            None => Ok(None),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.metrics.subscriptions.dec();
    }
}
