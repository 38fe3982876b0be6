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
