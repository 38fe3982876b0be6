//! Storage engines: where channel histories, dedupe keys and channel metadata live.
//!
//! An engine commits publishes durably and, after each commit, hands the committed messages to
//! a [`LiveSink`] in seq order, so live delivery never runs ahead of durability. The hub knows
//! nothing about SQL or Redis; engines know nothing about transports.

pub mod redis;
pub mod redis_state;
#[cfg(test)]
pub mod redis_testing;
pub mod sqlite;
pub mod sqlite_state;
pub mod state;

use async_trait::async_trait;

use crate::hub::retention::RetentionRules;
use crate::hub::types::{ChannelName, Epoch, NewMessage, Seq, SharedMessage};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store error: {0}")]
    Internal(String),
}

impl From<rusqlite::Error> for EngineError {
    fn from(e: rusqlite::Error) -> Self {
        EngineError::Internal(e.to_string())
    }
}

/// Connection trouble (refused, dropped, timed out, authentication, a server still loading or
/// read-only) is `Unavailable`; anything else (a script or type error) is `Internal`.
impl From<::redis::RedisError> for EngineError {
    fn from(e: ::redis::RedisError) -> Self {
        use ::redis::{ErrorKind, ServerErrorKind};
        let unavailable = e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || matches!(
                e.kind(),
                ErrorKind::AuthenticationFailed
                    | ErrorKind::Server(
                        ServerErrorKind::BusyLoading
                            | ServerErrorKind::MasterDown
                            | ServerErrorKind::TryAgain
                            | ServerErrorKind::ClusterDown
                            | ServerErrorKind::ReadOnly
                    )
            );
        if unavailable {
            EngineError::Unavailable(format!("redis: {e}"))
        } else {
            EngineError::Internal(format!("redis: {e}"))
        }
    }
}

/// The outcome of publishing one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub seq: Seq,
    pub id: String,
    pub duplicate: bool,
}

/// A slice of a channel's retained history.
#[derive(Debug, Clone)]
pub struct Page {
    pub epoch: Epoch,
    pub messages: Vec<SharedMessage>,
    pub last_seq: Seq,
    /// The oldest retained seq (`last_seq + 1` when nothing is retained).
    pub first_seq: Seq,
}

#[derive(Debug, Clone)]
pub struct ChannelMeta {
    pub name: ChannelName,
    pub epoch: Epoch,
    pub last_seq: Seq,
    pub messages: u64,
    pub last_activity_ms: Option<i64>,
}

/// Subscribers to wake once the publisher has its answer; see [`LiveSink::committed_deferred`].
#[must_use = "subscribers wait until this is woken"]
pub struct Wake(Box<dyn FnOnce() + Send>);

impl Wake {
    pub fn new(wake: impl FnOnce() + Send + 'static) -> Self {
        Self(Box::new(wake))
    }

    pub fn wake(self) {
        (self.0)();
    }
}

/// Receives committed messages in commit order; implemented by the hub's live fan-out.
pub trait LiveSink: Send + Sync + 'static {
    /// `messages` are one channel's, consecutive, in seq order, all of `epoch`; readers see
    /// them at once, subscribers are woken only when the returned [`Wake`] is: an engine
    /// acknowledges the publisher first, so the next publish is on its way while this one fans
    /// out (and later subscribers of the round get both in one write).
    fn committed_deferred(
        &self,
        channel: &ChannelName,
        epoch: &Epoch,
        messages: &[SharedMessage],
    ) -> Wake;
    /// [`committed_deferred`](Self::committed_deferred), waking subscribers at once.
    fn committed(&self, channel: &ChannelName, epoch: &Epoch, messages: &[SharedMessage]) {
        self.committed_deferred(channel, epoch, messages).wake();
    }
    /// The channel's history was dropped; `epoch` is the new one and seq restarts at 1.
    fn reset(&self, channel: &ChannelName, epoch: &Epoch);
    /// Channels someone is waiting on, with the epoch and newest seq the sink holds: an engine
    /// whose notices can be lost (Redis pub/sub across a reconnect) catches these up.
    fn watched(&self) -> Vec<(ChannelName, Option<Epoch>, Seq)> {
        Vec::new()
    }
}

#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Commits `batch` atomically and in order, deduplicating by id, then notifies the sink.
    async fn publish(
        &self,
        channel: &ChannelName,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Published>, EngineError>;

    /// Messages with seq > `after`, none accepted before `not_before_ms`: at most `limit` of
    /// them, and past the first, at most `max_bytes` of message JSON in all.
    async fn read(
        &self,
        channel: &ChannelName,
        after: Seq,
        limit: usize,
        max_bytes: usize,
        not_before_ms: i64,
    ) -> Result<Page, EngineError>;

    async fn channel(&self, channel: &ChannelName) -> Result<ChannelMeta, EngineError>;

    async fn channels(&self) -> Result<Vec<ChannelMeta>, EngineError>;

    /// Drops a channel's history and dedupe keys; returns the new epoch.
    async fn delete_channel(&self, channel: &ChannelName) -> Result<Epoch, EngineError>;

    /// Applies retention and expires dedupe keys older than `dedupe_window_ms`.
    async fn prune(
        &self,
        rules: &RetentionRules,
        dedupe_window_ms: i64,
    ) -> Result<u64, EngineError>;

    async fn health(&self) -> Result<(), EngineError>;

    /// Finishes pending writes; later calls fail with `Unavailable`.
    async fn close(&self);
}
