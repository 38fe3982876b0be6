//! Cluster coordination: who this node is, and the names and times of the leases and one-time
//! claims (`StateStore::lease`, `release`, `claim_once`) under which jobs, feeds and webhooks do
//! on one node at a time what must happen once in the cluster. A one-node store grants every
//! lease and claim, so on the embedded engine none of this changes what happens.
//!
//! | name | kind | held by | stands for |
//! |---|---|---|---|
//! | `tick:{job}:{scheduled ms}` | claim | the first node | one scheduled tick: only its claimer starts the run |
//! | `job:{job}:slot`, `job:{job}:slot:{i}` | lease | `{node}/{run}` | a concurrency slot of the job, while the run is queued or running |
//! | `job:{job}:key:{value}`, `job:{job}:key:{value}:slot:{i}` | lease | `{node}/{run}` | the same per `concurrency_key` value |
//! | `run:{run}` | lease | `{node}/{run}` | the run is alive; a node that can take it may declare the run interrupted |
//! | `recover:{run}` | claim | one node | the one node that records an orphaned run interrupted (and retries it) |
//! | `feed:{name}` | lease | `{node}` | polls the feed |
//! | `webhook:{id}` | lease | `{node}` | delivers the webhook's queue |

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// How long a lease lasts when its holder stops renewing it (a node that died loses its work
/// this long after it stopped). Unit tests run on a faster clock.
#[cfg(not(test))]
pub const LEASE_TTL: Duration = Duration::from_secs(15);
#[cfg(test)]
pub const LEASE_TTL: Duration = Duration::from_millis(1500);

/// How often a holder renews its leases, and a node that holds none tries to take them: a third
/// of the TTL, so two renewals in a row may fail before a lease lapses.
#[cfg(not(test))]
pub const RENEW_EVERY: Duration = Duration::from_secs(5);
#[cfg(test)]
pub const RENEW_EVERY: Duration = Duration::from_millis(500);

/// How often a shared store is read for webhooks and feeds other nodes added, changed or removed.
#[cfg(not(test))]
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);
#[cfg(test)]
pub const RELOAD_EVERY: Duration = Duration::from_millis(200);

/// How often a shared store is searched for runs whose node died (their leases lapsed): a
/// run is recorded `interrupted` at most this long after its lease lapsed.
#[cfg(not(test))]
pub const ORPHAN_CHECK_EVERY: Duration = Duration::from_secs(5);
#[cfg(test)]
pub const ORPHAN_CHECK_EVERY: Duration = Duration::from_millis(300);

/// How long a recovered run's claim is kept (only one node ever records it interrupted).
pub const RECOVER_CLAIM_TTL: Duration = Duration::from_secs(24 * 3600);

/// How long a release at shutdown may take (the store may be unreachable).
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Milliseconds, as the store takes them.
pub fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// This process's identity among the nodes sharing a store: made at start, never reused.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeId(Arc<str>);

impl NodeId {
    pub fn generate() -> Self {
        Self(format!("node_{}", ulid::Ulid::new()).into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Who holds a run's leases: the run on this node.
    pub fn run_holder(&self, run: &str) -> String {
        format!("{}/{run}", self.0)
    }

    /// Who takes a run's lease to find out whether the run's node is gone.
    pub fn recovery_holder(&self) -> String {
        format!("{}/recovery", self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn tick_claim(job: &str, scheduled_ms: i64) -> String {
    format!("tick:{job}:{scheduled_ms}")
}

/// The slots a run of `job` may take, in the order they are tried: one per allowed concurrent
/// run, per value of the `concurrency_key` parameter when the run has one.
pub fn job_slots(job: &str, key: Option<&str>, concurrency: usize) -> Vec<String> {
    let base = match key {
        Some(value) => format!("job:{job}:key:{value}"),
        None => format!("job:{job}:slot"),
    };
    match (concurrency, key) {
        (0 | 1, _) => vec![base],
        (n, Some(_)) => (0..n).map(|i| format!("{base}:slot:{i}")).collect(),
        (n, None) => (0..n).map(|i| format!("{base}:{i}")).collect(),
    }
}

pub fn run_lease(run: &str) -> String {
    format!("run:{run}")
}

pub fn recover_claim(run: &str) -> String {
    format!("recover:{run}")
}

pub fn feed_lease(name: &str) -> String {
    format!("feed:{name}")
}

pub fn webhook_lease(id: &str) -> String {
    format!("webhook:{id}")
}

#[cfg(test)]
pub mod testing {
    //! A state store that several in-process "nodes" share, with real leases and claims in
    //! memory over an embedded store: multi-node behaviour tested without Redis.

    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use async_trait::async_trait;

    use crate::engine::sqlite::{SqliteEngine, SqliteOptions, Sync};
    use crate::engine::sqlite_state::SqliteState;
    use crate::engine::state::{
        Enqueue, PendingDelivery, Settle, StateStore, StoredRun, WebhookCursor,
    };
    use crate::engine::EngineError;
    use crate::hub::live::Live;
    use crate::hub::Hub;
    use crate::metrics::Metrics;

    pub struct SharedState {
        inner: SqliteState,
        leases: Mutex<HashMap<String, (String, Instant)>>,
        claims: Mutex<HashMap<String, Instant>>,
        /// Every claim asked for, with whether it was granted.
        pub claim_log: Mutex<Vec<(String, bool)>>,
    }

    impl SharedState {
        pub fn open(dir: &std::path::Path) -> Arc<Self> {
            Arc::new(Self {
                inner: SqliteState::open(dir).expect("state store"),
                leases: Mutex::new(HashMap::new()),
                claims: Mutex::new(HashMap::new()),
                claim_log: Mutex::new(Vec::new()),
            })
        }

        /// Who holds `name` now.
        pub fn holder(&self, name: &str) -> Option<String> {
            let leases = self.leases.lock().unwrap();
            leases
                .get(name)
                .filter(|(_, until)| *until > Instant::now())
                .map(|(h, _)| h.clone())
        }

        /// A node died: its leases lapse now rather than after their time.
        pub fn lapse_leases_of(&self, node: &str) {
            self.leases
                .lock()
                .unwrap()
                .retain(|_, (holder, _)| !holder.starts_with(node));
        }

        /// Takes a lease for `holder` as a node would.
        pub fn hold(&self, name: &str, holder: &str, ttl: std::time::Duration) {
            self.leases
                .lock()
                .unwrap()
                .insert(name.to_owned(), (holder.to_owned(), Instant::now() + ttl));
        }
    }

    /// Serves `router` on a loopback port for the rest of the test; returns its base URL.
    pub async fn serve(router: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        format!("http://{addr}")
    }

    /// A webhook receiver on a loopback port answering 200: its URL, and the seq of every
    /// delivery it was sent (from `webhook-id`), in arrival order.
    pub async fn receiver() -> (String, Arc<Mutex<Vec<u64>>>) {
        let seqs = Arc::new(Mutex::new(Vec::new()));
        let seen = seqs.clone();
        let router = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap| {
                let seq = headers
                    .get("webhook-id")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|id| id.rsplit(':').next())
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0);
                seen.lock().unwrap().push(seq);
                async { axum::http::StatusCode::OK }
            }),
        );
        (format!("{}/hook", serve(router).await), seqs)
    }

    /// Waits until `check` holds (looked at every 20 ms); panics after 10 s.
    pub async fn wait_until<F, Fut>(what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while !check().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// A hub over an embedded engine in `dir`.
    pub fn hub(dir: &std::path::Path) -> Arc<Hub> {
        let metrics = Arc::new(Metrics::default());
        let retention = Arc::new(Default::default());
        let live = Arc::new(Live::new(Arc::clone(&retention)));
        let engine = SqliteEngine::open(
            &SqliteOptions {
                dir: dir.to_owned(),
                sync: Sync::Normal,
                dedupe_window_ms: 60_000,
            },
            live.clone(),
            metrics.clone(),
        )
        .expect("engine");
        Arc::new(Hub::new(Arc::new(engine), live, retention, metrics))
    }

    #[async_trait]
    impl StateStore for SharedState {
        fn is_shared(&self) -> bool {
            true
        }

        async fn lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool, EngineError> {
            let now = Instant::now();
            let mut leases = self.leases.lock().unwrap();
            let free = leases
                .get(name)
                .is_none_or(|(h, until)| h == holder || *until <= now);
            if free {
                let ttl = std::time::Duration::from_millis(ttl_ms.max(1) as u64);
                leases.insert(name.to_owned(), (holder.to_owned(), now + ttl));
            }
            Ok(free)
        }

        async fn release(&self, name: &str, holder: &str) -> Result<(), EngineError> {
            let mut leases = self.leases.lock().unwrap();
            if leases.get(name).is_some_and(|(h, _)| h == holder) {
                leases.remove(name);
            }
            Ok(())
        }

        async fn claim_once(&self, name: &str, ttl_ms: i64) -> Result<bool, EngineError> {
            let now = Instant::now();
            let won = {
                let mut claims = self.claims.lock().unwrap();
                let free = claims.get(name).is_none_or(|until| *until <= now);
                if free {
                    let ttl = std::time::Duration::from_millis(ttl_ms.max(1) as u64);
                    claims.insert(name.to_owned(), now + ttl);
                }
                free
            };
            self.claim_log.lock().unwrap().push((name.to_owned(), won));
            Ok(won)
        }

        async fn secret(&self, name: &str) -> Result<Vec<u8>, EngineError> {
            self.inner.secret(name).await
        }
        async fn put_run(&self, run: StoredRun) -> Result<(), EngineError> {
            self.inner.put_run(run).await
        }
        async fn run(&self, id: &str) -> Result<Option<StoredRun>, EngineError> {
            self.inner.run(id).await
        }
        async fn runs_of_job(
            &self,
            job: &str,
            limit: usize,
        ) -> Result<Vec<StoredRun>, EngineError> {
            self.inner.runs_of_job(job, limit).await
        }
        async fn runs_with_status(&self, statuses: &[&str]) -> Result<Vec<StoredRun>, EngineError> {
            self.inner.runs_with_status(statuses).await
        }
        async fn put_doc(&self, kind: &str, key: &str, json: String) -> Result<(), EngineError> {
            self.inner.put_doc(kind, key, json).await
        }
        async fn doc(&self, kind: &str, key: &str) -> Result<Option<String>, EngineError> {
            self.inner.doc(kind, key).await
        }
        async fn docs(&self, kind: &str) -> Result<Vec<(String, String)>, EngineError> {
            self.inner.docs(kind).await
        }
        async fn delete_doc(&self, kind: &str, key: &str) -> Result<bool, EngineError> {
            self.inner.delete_doc(kind, key).await
        }
        async fn unseen(
            &self,
            set: &str,
            keys: Vec<String>,
            not_before_ms: i64,
        ) -> Result<Vec<bool>, EngineError> {
            self.inner.unseen(set, keys, not_before_ms).await
        }
        async fn mark_seen(
            &self,
            set: &str,
            keys: Vec<String>,
            now_ms: i64,
            forget_before_ms: i64,
        ) -> Result<(), EngineError> {
            self.inner
                .mark_seen(set, keys, now_ms, forget_before_ms)
                .await
        }
        async fn seen_count(&self, set: &str) -> Result<u64, EngineError> {
            self.inner.seen_count(set).await
        }
        async fn forget_set(&self, set: &str) -> Result<(), EngineError> {
            self.inner.forget_set(set).await
        }
        async fn webhook_cursors(&self, webhook: &str) -> Result<Vec<WebhookCursor>, EngineError> {
            self.inner.webhook_cursors(webhook).await
        }
        async fn webhook_enqueue(&self, batch: Vec<Enqueue>) -> Result<(), EngineError> {
            self.inner.webhook_enqueue(batch).await
        }
        async fn webhook_pending(
            &self,
            webhook: &str,
            after_key: i64,
            limit: usize,
        ) -> Result<Vec<PendingDelivery>, EngineError> {
            self.inner.webhook_pending(webhook, after_key, limit).await
        }
        async fn webhook_pending_channel(
            &self,
            webhook: &str,
            channel: &str,
            after_key: i64,
            upto_key: i64,
            limit: usize,
        ) -> Result<Vec<PendingDelivery>, EngineError> {
            self.inner
                .webhook_pending_channel(webhook, channel, after_key, upto_key, limit)
                .await
        }
        async fn webhook_pending_count(&self, webhook: &str) -> Result<u64, EngineError> {
            self.inner.webhook_pending_count(webhook).await
        }
        async fn webhook_settle(
            &self,
            webhook: &str,
            settles: Vec<Settle>,
            log: Vec<String>,
            keep_log: usize,
        ) -> Result<(), EngineError> {
            self.inner
                .webhook_settle(webhook, settles, log, keep_log)
                .await
        }
        async fn webhook_log(
            &self,
            webhook: &str,
            limit: usize,
        ) -> Result<Vec<String>, EngineError> {
            self.inner.webhook_log(webhook, limit).await
        }
        async fn webhook_forget(&self, webhook: &str) -> Result<(), EngineError> {
            self.inner.webhook_forget(webhook).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_per_job_key_and_concurrency() {
        assert_eq!(job_slots("build", None, 1), ["job:build:slot"]);
        assert_eq!(
            job_slots("build", None, 2),
            ["job:build:slot:0", "job:build:slot:1"]
        );
        assert_eq!(job_slots("sync", Some("7"), 1), ["job:sync:key:7"]);
        assert_eq!(
            job_slots("sync", Some("7"), 2),
            ["job:sync:key:7:slot:0", "job:sync:key:7:slot:1"]
        );
        assert_eq!(tick_claim("build", 60_000), "tick:build:60000");
        let node = NodeId::generate();
        assert!(node.as_str().starts_with("node_"));
        assert_ne!(node, NodeId::generate());
        assert_eq!(node.run_holder("r1"), format!("{node}/r1"));
    }
}
