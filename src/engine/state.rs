//! Durable state of the producers and deliverers (job runs, feeds, feed memory, keys), kept
//! beside the message store. Low-rate writes; one trait so the Redis engine can hold it too.

use async_trait::async_trait;
use serde::{de::DeserializeOwned, Serialize};

use super::EngineError;

/// A run record as stored; the jobs layer owns its shape (serialized JSON).
#[derive(Debug, Clone)]
pub struct StoredRun {
    pub id: String,
    pub job: String,
    pub status: String,
    pub json: String,
}

/// Where a webhook's delivery stands on one channel: everything up to `seq` of `epoch` is queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookCursor {
    pub channel: String,
    pub epoch: String,
    pub seq: u64,
}

/// A message to deliver to a webhook.
#[derive(Debug, Clone)]
pub struct OutboxItem {
    pub channel: String,
    pub epoch: String,
    pub seq: u64,
    /// The message JSON: the request body.
    pub body: String,
    /// 0 for the first delivery; a replay's generation otherwise, so a replay queues the
    /// message again even while its first delivery is still on the queue.
    pub replay: i64,
}

/// One webhook's share of an enqueue: its new items, and where its cursors move.
#[derive(Debug, Clone, Default)]
pub struct Enqueue {
    pub webhook: String,
    pub items: Vec<OutboxItem>,
    pub cursors: Vec<WebhookCursor>,
}

/// A queued delivery; `key` orders a webhook's queue (insertion order).
#[derive(Debug, Clone)]
pub struct PendingDelivery {
    pub key: i64,
    pub item: OutboxItem,
    /// Attempts made so far.
    pub attempt: u32,
    /// When the next attempt may start (ms since the epoch); 0 = now.
    pub next_attempt_ms: i64,
}

/// What became of a queued delivery.
#[derive(Debug, Clone)]
pub enum Settle {
    /// Delivered, or given up: off the queue.
    Done { key: i64 },
    /// To be tried again.
    Retry {
        key: i64,
        attempt: u32,
        next_attempt_ms: i64,
    },
}

#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// A named secret made once and kept (e.g. the key that signs run tokens).
    async fn secret(&self, name: &str) -> Result<Vec<u8>, EngineError>;

    async fn put_run(&self, run: StoredRun) -> Result<(), EngineError>;
    async fn run(&self, id: &str) -> Result<Option<StoredRun>, EngineError>;
    /// Newest first.
    async fn runs_of_job(&self, job: &str, limit: usize) -> Result<Vec<StoredRun>, EngineError>;
    /// Runs whose status is one of `statuses` (start-up recovery).
    async fn runs_with_status(&self, statuses: &[&str]) -> Result<Vec<StoredRun>, EngineError>;

    /// A small JSON document under (kind, key): feeds added at run time, feed poll state …
    async fn put_doc(&self, kind: &str, key: &str, json: String) -> Result<(), EngineError>;
    async fn doc(&self, kind: &str, key: &str) -> Result<Option<String>, EngineError>;
    async fn docs(&self, kind: &str) -> Result<Vec<(String, String)>, EngineError>;
    async fn delete_doc(&self, kind: &str, key: &str) -> Result<bool, EngineError>;

    /// Of `keys`, which were not seen for `set` since `not_before_ms` (in the given order).
    async fn unseen(
        &self,
        set: &str,
        keys: Vec<String>,
        not_before_ms: i64,
    ) -> Result<Vec<bool>, EngineError>;
    /// Records `keys` as seen now in `set`, and forgets keys of `set` last seen before
    /// `forget_before_ms`.
    async fn mark_seen(
        &self,
        set: &str,
        keys: Vec<String>,
        now_ms: i64,
        forget_before_ms: i64,
    ) -> Result<(), EngineError>;
    /// How many keys `set` remembers.
    async fn seen_count(&self, set: &str) -> Result<u64, EngineError>;
    async fn forget_set(&self, set: &str) -> Result<(), EngineError>;

    /// Where each channel's delivery to `webhook` stands.
    async fn webhook_cursors(&self, webhook: &str) -> Result<Vec<WebhookCursor>, EngineError>;
    /// Queues items and moves cursors, all at once (items already queued are skipped).
    async fn webhook_enqueue(&self, batch: Vec<Enqueue>) -> Result<(), EngineError>;
    /// Queued deliveries of `webhook` with a key above `after_key`, in queue order.
    async fn webhook_pending(
        &self,
        webhook: &str,
        after_key: i64,
        limit: usize,
    ) -> Result<Vec<PendingDelivery>, EngineError>;
    /// Queued deliveries of one channel of `webhook` with a key in `(after_key, upto_key]`, in
    /// queue order: refills a channel whose backlog was left in the store.
    async fn webhook_pending_channel(
        &self,
        webhook: &str,
        channel: &str,
        after_key: i64,
        upto_key: i64,
        limit: usize,
    ) -> Result<Vec<PendingDelivery>, EngineError>;
    async fn webhook_pending_count(&self, webhook: &str) -> Result<u64, EngineError>;
    /// Applies outcomes and appends attempt records (JSON), keeping the newest `keep_log`.
    async fn webhook_settle(
        &self,
        webhook: &str,
        settles: Vec<Settle>,
        log: Vec<String>,
        keep_log: usize,
    ) -> Result<(), EngineError>;
    /// Attempt records, newest first.
    async fn webhook_log(&self, webhook: &str, limit: usize) -> Result<Vec<String>, EngineError>;
    /// Drops a webhook's queue, cursors and attempt records.
    async fn webhook_forget(&self, webhook: &str) -> Result<(), EngineError>;

    /// Whether other nodes share this store (the Redis store): then jobs, feeds and webhooks
    /// coordinate through leases and claims, and reload what other nodes add or change. A
    /// one-node store answers false, and everything behaves as on a single node.
    fn is_shared(&self) -> bool {
        false
    }

    /// Takes or renews the cluster-wide lease `name` for `holder` for `ttl_ms`; true when
    /// `holder` holds it afterwards. Work that one node at a time may do (a webhook's
    /// deliveries, a feed's polls, a job's single-flight slot) runs only under its lease, and
    /// a node that dies loses it when the time runs out. A one-node store grants every lease.
    async fn lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool, EngineError> {
        let _ = (name, holder, ttl_ms);
        Ok(true)
    }
    /// Gives the lease up if `holder` holds it, so another node may take it at once.
    async fn release(&self, name: &str, holder: &str) -> Result<(), EngineError> {
        let _ = (name, holder);
        Ok(())
    }
    /// Claims a one-time event such as one scheduled tick of a job: true for the first node
    /// that claims `name` within `ttl_ms`, false for every other. A one-node store always
    /// answers true.
    async fn claim_once(&self, name: &str, ttl_ms: i64) -> Result<bool, EngineError> {
        let _ = (name, ttl_ms);
        Ok(true)
    }
}

/// Typed helpers over the JSON documents.
pub async fn get_typed<T: DeserializeOwned>(
    store: &dyn StateStore,
    kind: &str,
    key: &str,
) -> Result<Option<T>, EngineError> {
    match store.doc(kind, key).await? {
        None => Ok(None),
        Some(json) => serde_json::from_str(&json)
            .map(Some)
            .map_err(|e| EngineError::Internal(format!("corrupt {kind} document {key}: {e}"))),
    }
}

pub async fn put_typed<T: Serialize + Sync>(
    store: &dyn StateStore,
    kind: &str,
    key: &str,
    value: &T,
) -> Result<(), EngineError> {
    let json = serde_json::to_string(value)
        .map_err(|e| EngineError::Internal(format!("cannot encode {kind} {key}: {e}")))?;
    store.put_doc(kind, key, json).await
}
