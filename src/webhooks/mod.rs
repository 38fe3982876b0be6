//! Webhooks: registered URLs that receive, by signed HTTP POST, every message of the channels
//! matching their patterns — at least once, in seq order per (webhook, channel), surviving
//! restarts, `kill -9` and receivers that are down for hours.
//!
//! How: the registry task (`registry.rs`) is the one owner of webhooks and of their cursors
//! (how far each channel has been queued). It follows every commit through the hub's commit
//! tap and copies matching messages into each webhook's durable queue in the state store,
//! moving the cursor in the same transaction; after a crash it compares cursors with the
//! channels' `last_seq` and copies what is missing from history. A worker per enabled
//! webhook (`worker.rs`) delivers the queue. The queue lives outside the channel's history, so
//! retention pruning never takes a message a webhook still owes.

pub mod registry;
pub mod sign;
pub mod spec;
pub mod target;
pub mod worker;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::clock::rfc3339_ms;
use crate::engine::EngineError;

pub use registry::{NewWebhook, Webhooks, WebhooksContext};

#[derive(Debug, thiserror::Error)]
pub enum WebhooksError {
    #[error("no webhook with id {0:?}")]
    Unknown(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the webhook service is stopping")]
    Stopped,
    #[error(transparent)]
    Store(#[from] EngineError),
}

/// Where a webhook was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Api,
    Config,
}

/// A webhook as persisted (the state store's `webhook` documents).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookRecord {
    pub id: String,
    pub url: String,
    pub channels: Vec<String>,
    pub description: Option<String>,
    pub created_ms: i64,
    pub source: Source,
    pub secret: String,
    #[serde(default)]
    pub previous_secret: Option<String>,
    #[serde(default)]
    pub previous_until_ms: Option<i64>,
    #[serde(default)]
    pub disabled_reason: Option<String>,
    #[serde(default)]
    pub failing_since_ms: Option<i64>,
    #[serde(default)]
    pub last_error: Option<String>,
    /// Deliveries given up after the retry schedule.
    #[serde(default)]
    pub failed: u64,
}

impl WebhookRecord {
    pub fn state(&self) -> &'static str {
        if self.disabled_reason.is_some() {
            "disabled"
        } else if self.failing_since_ms.is_some() {
            "failing"
        } else {
            "active"
        }
    }

    /// What the API shows (never the secret).
    pub fn view(&self, pending: u64) -> Value {
        json!({
            "id": self.id,
            "url": self.url,
            "channels": self.channels,
            "description": self.description,
            "state": self.state(),
            "created": rfc3339_ms(self.created_ms),
            "source": self.source,
            "disabled_reason": self.disabled_reason,
            "failing_since": self.failing_since_ms.map(rfc3339_ms),
            "last_error": self.last_error,
            "pending": pending,
            "failed": self.failed,
        })
    }
}
