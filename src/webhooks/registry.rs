//! The registry: the one owner of webhooks, their cursors and their workers. Everything that
//! changes a webhook — API calls, worker reports, commits to copy into queues — arrives here as
//! a message and is handled in order, so no lock is held across an await.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::sign::Secret;
use super::spec::{self, ConfigWebhook, WebhookPolicy};
use super::target::GuardedResolver;
use super::worker::{self, Signing, WorkerContext, WorkerEvent, WorkerMsg};
use super::{Source, WebhookRecord, WebhooksError};
use crate::clock::now_ms;
use crate::cluster::{self, NodeId};
use crate::engine::state::{self as state_store, Enqueue, OutboxItem, StateStore, WebhookCursor};
use crate::engine::EngineError;
use crate::hub::pattern::Pattern;
use crate::hub::tap::{CommitFeed, CommitNotice};
use crate::hub::types::{ChannelName, Seq};
use crate::hub::Hub;
use crate::metrics::Metrics;

/// The kind of the webhook documents in the state store.
pub(crate) const DOC_KIND: &str = "webhook";
/// How long a replaced secret keeps signing beside the new one.
const ROTATION_OVERLAP_MS: i64 = 24 * 3600 * 1000;
/// Messages copied from history per read.
const HISTORY_PAGE: usize = 500;
const HISTORY_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Commit notices handled per store transaction at most.
const NOTICE_BATCH: usize = 512;

pub struct WebhooksContext {
    pub hub: Arc<Hub>,
    pub state: Arc<dyn StateStore>,
    pub metrics: Arc<Metrics>,
    pub feed: CommitFeed,
    /// This node, holder of the `webhook:{id}` leases of the webhooks it delivers.
    pub node: NodeId,
}

/// A registration, as the API or CLI sends it (already checked by `Webhooks::create`).
#[derive(Debug, Clone)]
pub struct NewWebhook {
    pub url: String,
    pub channels: Vec<String>,
    pub description: Option<String>,
    /// Replay history after this seq on every matching channel first.
    pub since: Option<Seq>,
}

type Reply<T> = oneshot::Sender<Result<T, WebhooksError>>;

enum Command {
    Create {
        record: Box<WebhookRecord>,
        patterns: Vec<Pattern>,
        since: Option<Seq>,
        reply: Reply<()>,
    },
    Delete {
        id: String,
        reply: Reply<WebhookRecord>,
    },
    SetEnabled {
        id: String,
        enabled: bool,
        reply: Reply<()>,
    },
    Rotate {
        id: String,
        reply: Reply<String>,
    },
    Replay {
        id: String,
        channel: ChannelName,
        since: Seq,
        reply: Reply<u64>,
    },
}

/// The handle the HTTP layer and the app hold.
#[derive(Clone)]
pub struct Webhooks {
    commands: mpsc::Sender<Command>,
    records: Arc<RwLock<BTreeMap<String, WebhookRecord>>>,
    state: Arc<dyn StateStore>,
    policy: Arc<WebhookPolicy>,
    tasks: TaskTracker,
}

struct WorkerHandle {
    inbox: mpsc::UnboundedSender<WorkerMsg>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

struct Hook {
    patterns: Vec<Pattern>,
    /// channel → (epoch, seq queued up to).
    cursors: HashMap<String, (String, Seq)>,
    worker: Option<WorkerHandle>,
    /// The secret is fixed by the config file (rotation would be undone at restart).
    secret_from_config: bool,
}

impl Hook {
    fn matches(&self, channel: &ChannelName) -> bool {
        self.patterns.iter().any(|p| p.matches(channel))
    }
}

struct Registry {
    hub: Arc<Hub>,
    state: Arc<dyn StateStore>,
    metrics: Arc<Metrics>,
    policy: Arc<WebhookPolicy>,
    client: reqwest::Client,
    records: Arc<RwLock<BTreeMap<String, WebhookRecord>>>,
    hooks: HashMap<String, Hook>,
    feed: CommitFeed,
    events: mpsc::UnboundedSender<WorkerEvent>,
    shutdown: CancellationToken,
    node: NodeId,
    /// A copy failed or notices were dropped: every webhook is caught up from history.
    rescan_needed: bool,
    /// The generation of the newest replay (unique, so each replay queues its own copies).
    last_replay: i64,
}

fn lock_read(
    records: &RwLock<BTreeMap<String, WebhookRecord>>,
) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, WebhookRecord>> {
    records.read().unwrap_or_else(|e| e.into_inner())
}

impl Webhooks {
    /// Loads the registry, applies `[[webhooks]]`, catches every webhook up with what was
    /// committed while it was not running, and starts delivering.
    pub async fn start(
        ctx: WebhooksContext,
        policy: WebhookPolicy,
        config_hooks: Vec<ConfigWebhook>,
        shutdown: CancellationToken,
    ) -> Result<Self, EngineError> {
        let policy = Arc::new(policy);
        let client = build_client(&policy)
            .map_err(|e| EngineError::Internal(format!("cannot build the webhook client: {e}")))?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let records = Arc::new(RwLock::new(BTreeMap::new()));
        let mut registry = Registry {
            hub: ctx.hub,
            state: ctx.state.clone(),
            metrics: ctx.metrics,
            policy: policy.clone(),
            client,
            records: records.clone(),
            hooks: HashMap::new(),
            feed: ctx.feed,
            events: events_tx,
            shutdown: shutdown.clone(),
            node: ctx.node,
            rescan_needed: false,
            last_replay: 0,
        };
        registry.load(config_hooks).await?;
        let (commands_tx, commands_rx) = mpsc::channel(64);
        let tasks = TaskTracker::new();
        tasks.spawn(registry.run(commands_rx, events_rx));
        Ok(Self {
            commands: commands_tx,
            records,
            state: ctx.state,
            policy,
            tasks,
        })
    }

    /// The tasks to wait for at shutdown.
    pub fn tasks(&self) -> TaskTracker {
        self.tasks.clone()
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, WebhooksError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| WebhooksError::Stopped)?;
        rx.await.map_err(|_| WebhooksError::Stopped)?
    }

    fn record(&self, id: &str) -> Result<WebhookRecord, WebhooksError> {
        lock_read(&self.records)
            .get(id)
            .cloned()
            .ok_or_else(|| WebhooksError::Unknown(id.to_owned()))
    }

    async fn view(&self, record: &WebhookRecord) -> Result<Value, WebhooksError> {
        let pending = self.state.webhook_pending_count(&record.id).await?;
        Ok(record.view(pending))
    }

    pub async fn list(&self) -> Result<Vec<Value>, WebhooksError> {
        let records: Vec<WebhookRecord> = lock_read(&self.records).values().cloned().collect();
        let mut out = Vec::with_capacity(records.len());
        for r in &records {
            out.push(self.view(r).await?);
        }
        Ok(out)
    }

    pub async fn get(&self, id: &str) -> Result<Value, WebhooksError> {
        let record = self.record(id)?;
        self.view(&record).await
    }

    /// Registers a webhook; the answer carries its secret (the only time it is shown).
    pub async fn create(&self, new: NewWebhook) -> Result<Value, WebhooksError> {
        let url = self
            .policy
            .hosts
            .check_url(&new.url)
            .await
            .map_err(|e| WebhooksError::Invalid(e.to_string()))?;
        let patterns = spec::parse_patterns(&new.channels).map_err(WebhooksError::Invalid)?;
        if let Some(d) = &new.description {
            spec::check_description(d)
                .map_err(|e| WebhooksError::Invalid(format!("description: {e}")))?;
        }
        let secret = Secret::generate();
        let record = WebhookRecord {
            id: format!("wh_{}", ulid::Ulid::new()),
            url: url.to_string(),
            channels: patterns.iter().map(|p| p.as_str().to_owned()).collect(),
            description: new.description,
            created_ms: now_ms(),
            source: Source::Api,
            secret: secret.as_str().to_owned(),
            previous_secret: None,
            previous_until_ms: None,
            disabled_reason: None,
            failing_since_ms: None,
            last_error: None,
            failed: 0,
        };
        let id = record.id.clone();
        self.ask(|reply| Command::Create {
            record: Box::new(record),
            patterns,
            since: new.since,
            reply,
        })
        .await?;
        let mut view = self.get(&id).await?;
        view["secret"] = Value::String(secret.as_str().to_owned());
        Ok(view)
    }

    pub async fn delete(&self, id: &str) -> Result<Value, WebhooksError> {
        let before = self.get(id).await?;
        self.ask(|reply| Command::Delete {
            id: id.to_owned(),
            reply,
        })
        .await?;
        Ok(before)
    }

    pub async fn set_enabled(&self, id: &str, enabled: bool) -> Result<Value, WebhooksError> {
        self.record(id)?;
        self.ask(|reply| Command::SetEnabled {
            id: id.to_owned(),
            enabled,
            reply,
        })
        .await?;
        self.get(id).await
    }

    /// Issues a new secret; the old one keeps signing beside it for 24 hours.
    pub async fn rotate(&self, id: &str) -> Result<Value, WebhooksError> {
        self.record(id)?;
        let secret = self
            .ask(|reply| Command::Rotate {
                id: id.to_owned(),
                reply,
            })
            .await?;
        let mut view = self.get(id).await?;
        view["secret"] = Value::String(secret);
        Ok(view)
    }

    /// Queues the channel's retained messages after `since` again; returns how many.
    pub async fn replay(
        &self,
        id: &str,
        channel: ChannelName,
        since: Seq,
    ) -> Result<u64, WebhooksError> {
        self.record(id)?;
        self.ask(|reply| Command::Replay {
            id: id.to_owned(),
            channel,
            since,
            reply,
        })
        .await
    }

    /// Recorded attempts, newest first.
    pub async fn deliveries(&self, id: &str, limit: usize) -> Result<Vec<Value>, WebhooksError> {
        self.record(id)?;
        let rows = self.state.webhook_log(id, limit).await?;
        Ok(rows
            .iter()
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect())
    }
}

fn build_client(policy: &Arc<WebhookPolicy>) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(policy.timeout)
        .connect_timeout(policy.timeout)
        .no_proxy()
        .pool_max_idle_per_host(32)
        .user_agent(concat!("Tidings-Webhooks/", env!("CARGO_PKG_VERSION")))
        .dns_resolver(Arc::new(GuardedResolver(Arc::new(policy.hosts.clone()))))
        .build()
}

impl Registry {
    fn publish_record(&self, record: &WebhookRecord) {
        self.records
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(record.id.clone(), record.clone());
    }

    fn record(&self, id: &str) -> Option<WebhookRecord> {
        lock_read(&self.records).get(id).cloned()
    }

    async fn save(&self, record: &WebhookRecord) -> Result<(), EngineError> {
        state_store::put_typed(self.state.as_ref(), DOC_KIND, &record.id, record).await?;
        self.publish_record(record);
        Ok(())
    }

    /// Start-up: records from the store, `[[webhooks]]` applied, history caught up, workers.
    async fn load(&mut self, config_hooks: Vec<ConfigWebhook>) -> Result<(), EngineError> {
        let mut records: BTreeMap<String, WebhookRecord> = BTreeMap::new();
        for (id, json) in self.state.docs(DOC_KIND).await? {
            match serde_json::from_str::<WebhookRecord>(&json) {
                Ok(r) => {
                    records.insert(id, r);
                }
                Err(error) => {
                    tracing::error!(webhook = %id, %error, "skipping a corrupt webhook record")
                }
            }
        }
        // Config webhooks that left the file are forgotten.
        let stale: Vec<String> = records
            .values()
            .filter(|r| r.source == Source::Config && !config_hooks.iter().any(|c| c.id == r.id))
            .map(|r| r.id.clone())
            .collect();
        for id in stale {
            records.remove(&id);
            self.state.delete_doc(DOC_KIND, &id).await?;
            self.state.webhook_forget(&id).await?;
            tracing::info!(webhook = %id, "webhook removed from the config file; forgotten");
        }
        let mut fresh = Vec::new();
        let mut from_config = Vec::new();
        for c in config_hooks {
            from_config.push(c.id.clone());
            let record = match records.remove(&c.id) {
                Some(mut r) => {
                    r.description = c.description.clone();
                    if let Some(s) = &c.secret {
                        if r.secret != s.as_str() {
                            r.secret = s.as_str().to_owned();
                            r.previous_secret = None;
                            r.previous_until_ms = None;
                        }
                    }
                    r
                }
                None => {
                    fresh.push(c.id.clone());
                    WebhookRecord {
                        id: c.id.clone(),
                        url: c.url.clone(),
                        channels: c.channels.iter().map(|p| p.as_str().to_owned()).collect(),
                        description: c.description.clone(),
                        created_ms: now_ms(),
                        source: Source::Config,
                        secret: c
                            .secret
                            .clone()
                            .unwrap_or_else(Secret::generate)
                            .as_str()
                            .to_owned(),
                        previous_secret: None,
                        previous_until_ms: None,
                        disabled_reason: None,
                        failing_since_ms: None,
                        last_error: None,
                        failed: 0,
                    }
                }
            };
            self.save(&record).await?;
            self.hooks.insert(
                record.id.clone(),
                Hook {
                    patterns: c.channels.clone(),
                    cursors: HashMap::new(),
                    worker: None,
                    secret_from_config: c.secret.is_some(),
                },
            );
        }
        for record in records.into_values() {
            let patterns = record
                .channels
                .iter()
                .filter_map(|p| Pattern::parse(p).ok())
                .collect();
            self.publish_record(&record);
            self.hooks.insert(
                record.id.clone(),
                Hook {
                    patterns,
                    cursors: HashMap::new(),
                    worker: None,
                    secret_from_config: false,
                },
            );
        }
        self.update_wanted();
        let ids: Vec<String> = self.hooks.keys().cloned().collect();
        for id in ids {
            if fresh.contains(&id) {
                // A new config webhook starts with the next message.
                self.snapshot_cursors(&id, None).await?;
            } else {
                let cursors = self.state.webhook_cursors(&id).await?;
                if let Some(hook) = self.hooks.get_mut(&id) {
                    hook.cursors = cursors
                        .into_iter()
                        .map(|c| (c.channel, (c.epoch, c.seq)))
                        .collect();
                }
            }
            // Disabled webhooks keep queueing: `enable` resumes where delivery stopped, even
            // if retention has pruned the channel's history since.
            self.catch_up(&id).await?;
            if self.enabled(&id) {
                self.start_worker(&id, false);
            }
        }
        Ok(())
    }

    fn enabled(&self, id: &str) -> bool {
        self.record(id).is_some_and(|r| r.disabled_reason.is_none())
    }

    /// Notices are only worth making while some webhook exists (disabled ones queue too).
    fn update_wanted(&self) {
        let any = !lock_read(&self.records).is_empty();
        self.feed.set_wanted(any);
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut events: mpsc::UnboundedReceiver<WorkerEvent>,
    ) {
        let mut retry = tokio::time::interval(std::time::Duration::from_secs(1));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shared = self.state.is_shared();
        let mut reload = tokio::time::interval(cluster::RELOAD_EVERY);
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        reload.reset();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                Some(command) = commands.recv() => self.command(command).await,
                Some(event) = events.recv() => self.worker_event(event).await,
                _ = reload.tick(), if shared => {
                    if let Err(error) = self.reload().await {
                        tracing::warn!(%error, "could not read the webhooks of other nodes; will retry");
                    }
                }
                Some(first) = self.feed.receiver.recv() => {
                    let mut notices = vec![first];
                    while notices.len() < NOTICE_BATCH {
                        match self.feed.receiver.try_recv() {
                            Ok(n) => notices.push(n),
                            Err(_) => break,
                        }
                    }
                    self.copy_notices(notices).await;
                }
                _ = retry.tick() => {}
            }
            if self.feed.take_overflow() {
                tracing::warn!("webhook commit notices overflowed; catching up from history");
                self.rescan_needed = true;
            }
            if self.rescan_needed {
                self.rescan_needed = false;
                let ids: Vec<String> = self.hooks.keys().cloned().collect();
                for id in ids {
                    if let Err(error) = self.catch_up(&id).await {
                        tracing::warn!(webhook = %id, %error, "catching up failed; will retry");
                        self.rescan_needed = true;
                    }
                }
            }
        }
        let ids: Vec<String> = self.hooks.keys().cloned().collect();
        for id in &ids {
            self.stop_worker(id).await;
        }
        if shared {
            // Their outcomes are written: other nodes may take the webhooks over at once.
            let release = async {
                for id in &ids {
                    let lease = cluster::webhook_lease(id);
                    if let Err(error) = self.state.release(&lease, self.node.as_str()).await {
                        tracing::warn!(webhook = %id, %error, "could not release the webhook's lease; it lapses");
                    }
                }
            };
            if tokio::time::timeout(cluster::RELEASE_TIMEOUT, release)
                .await
                .is_err()
            {
                tracing::warn!("releasing the webhooks' leases took too long; they lapse");
            }
        }
    }

    /// On a shared store: applies what other nodes did to webhooks (registered, deleted,
    /// enabled, disabled, rotated, their delivery state), as stored.
    async fn reload(&mut self) -> Result<(), EngineError> {
        let mut stored: BTreeMap<String, WebhookRecord> = BTreeMap::new();
        for (id, json) in self.state.docs(DOC_KIND).await? {
            match serde_json::from_str::<WebhookRecord>(&json) {
                Ok(record) => {
                    stored.insert(id, record);
                }
                Err(error) => {
                    tracing::warn!(webhook = %id, %error, "ignoring an unreadable stored webhook")
                }
            }
        }
        let gone: Vec<String> = self
            .hooks
            .keys()
            .filter(|id| !stored.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.stop_worker(&id).await;
            self.hooks.remove(&id);
            self.records
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            tracing::info!(webhook = %id, "webhook deleted through another node");
        }
        for (id, record) in stored {
            let Some(local) = self.record(&id) else {
                self.adopt(record).await?;
                continue;
            };
            if local == record {
                continue;
            }
            let signing_changed = local.secret != record.secret
                || local.previous_secret != record.previous_secret
                || local.previous_until_ms != record.previous_until_ms;
            let was_enabled = local.disabled_reason.is_none();
            let enabled = record.disabled_reason.is_none();
            self.publish_record(&record);
            if was_enabled && !enabled {
                self.stop_worker(&id).await;
            } else if !was_enabled && enabled {
                if let Err(error) = self.catch_up(&id).await {
                    tracing::warn!(webhook = %id, %error, "catching up failed; will retry");
                    self.rescan_needed = true;
                }
                self.start_worker(&id, true);
            } else if signing_changed {
                if let (Some(signing), Some(w)) = (
                    signing_of(&record),
                    self.hooks.get(&id).and_then(|h| h.worker.as_ref()),
                ) {
                    let _ = w.inbox.send(WorkerMsg::Signing(signing));
                }
            }
        }
        self.update_wanted();
        Ok(())
    }

    /// Takes on a webhook registered through another node: its cursors as stored (written
    /// before its record, see `create`), what it misses caught up, and a worker.
    async fn adopt(&mut self, record: WebhookRecord) -> Result<(), EngineError> {
        let id = record.id.clone();
        let patterns = record
            .channels
            .iter()
            .filter_map(|p| Pattern::parse(p).ok())
            .collect();
        let cursors = self
            .state
            .webhook_cursors(&id)
            .await?
            .into_iter()
            .map(|c| (c.channel, (c.epoch, c.seq)))
            .collect();
        self.publish_record(&record);
        self.hooks.insert(
            id.clone(),
            Hook {
                patterns,
                cursors,
                worker: None,
                secret_from_config: false,
            },
        );
        self.update_wanted();
        if let Err(error) = self.catch_up(&id).await {
            tracing::warn!(webhook = %id, %error, "catching up failed; will retry");
            self.rescan_needed = true;
        }
        if self.enabled(&id) {
            self.start_worker(&id, false);
        }
        tracing::info!(webhook = %id, url = %record.url, "webhook registered through another node");
        Ok(())
    }

    /// `retry_now`: pending deliveries are tried at once instead of at their scheduled retry
    /// (enabling a webhook means its receiver is believed fixed).
    fn start_worker(&mut self, id: &str, retry_now: bool) {
        let Some(record) = self.record(id) else {
            return;
        };
        let Some(hook) = self.hooks.get_mut(id) else {
            return;
        };
        if hook.worker.is_some() {
            return;
        }
        let Ok(url) = url::Url::parse(&record.url) else {
            tracing::error!(webhook = %id, url = %record.url, "stored webhook URL does not parse");
            return;
        };
        let Some(signing) = signing_of(&record) else {
            tracing::error!(webhook = %id, "stored webhook secret does not parse");
            return;
        };
        let (inbox_tx, inbox_rx) = mpsc::unbounded_channel();
        let cancel = self.shutdown.child_token();
        let ctx = WorkerContext {
            id: id.to_owned(),
            url,
            signing,
            policy: self.policy.clone(),
            client: self.client.clone(),
            state: self.state.clone(),
            metrics: self.metrics.clone(),
            events: self.events.clone(),
            failing_since_ms: record.failing_since_ms,
            retry_now,
            node: self.node.clone(),
        };
        let task = tokio::spawn(worker::run(ctx, inbox_rx, cancel.clone()));
        hook.worker = Some(WorkerHandle {
            inbox: inbox_tx,
            cancel,
            task,
        });
    }

    async fn stop_worker(&mut self, id: &str) {
        let Some(handle) = self.hooks.get_mut(id).and_then(|h| h.worker.take()) else {
            return;
        };
        handle.cancel.cancel();
        if let Err(error) = handle.task.await {
            tracing::error!(webhook = %id, %error, "webhook worker failed");
        }
    }

    fn poke(&self, id: &str) {
        if let Some(w) = self.hooks.get(id).and_then(|h| h.worker.as_ref()) {
            let _ = w.inbox.send(WorkerMsg::Poke);
        }
    }

    /// Sets cursors to each matching channel's end (or `since`), so delivery starts there.
    async fn snapshot_cursors(&mut self, id: &str, since: Option<Seq>) -> Result<(), EngineError> {
        let metas = self.hub.engine().channels().await?;
        let Some(hook) = self.hooks.get_mut(id) else {
            return Ok(());
        };
        let mut cursors = Vec::new();
        for meta in metas.iter() {
            if !hook.matches(&meta.name) {
                continue;
            }
            let seq = since.map_or(meta.last_seq, |s| s.min(meta.last_seq));
            hook.cursors.insert(
                meta.name.as_str().to_owned(),
                (meta.epoch.as_str().to_owned(), seq),
            );
            cursors.push(WebhookCursor {
                channel: meta.name.as_str().to_owned(),
                epoch: meta.epoch.as_str().to_owned(),
                seq,
            });
        }
        self.state
            .webhook_enqueue(vec![Enqueue {
                webhook: id.to_owned(),
                items: Vec::new(),
                cursors,
            }])
            .await
    }

    /// Copies into the queue whatever matching channels hold past the cursors.
    async fn catch_up(&mut self, id: &str) -> Result<(), EngineError> {
        let metas = self.hub.engine().channels().await?;
        for meta in metas {
            let Some(hook) = self.hooks.get(id) else {
                return Ok(());
            };
            if !hook.matches(&meta.name) {
                continue;
            }
            let behind = match hook.cursors.get(meta.name.as_str()) {
                Some((epoch, seq)) => epoch != meta.epoch.as_str() || *seq < meta.last_seq,
                None => meta.last_seq > 0,
            };
            if behind {
                self.copy_history(id, &meta.name).await?;
            }
        }
        self.poke(id);
        Ok(())
    }

    /// Copies the channel's history past the cursor into the queue, moving the cursor.
    async fn copy_history(&mut self, id: &str, channel: &ChannelName) -> Result<(), EngineError> {
        loop {
            let Some(hook) = self.hooks.get(id) else {
                return Ok(());
            };
            let (epoch, after) = hook
                .cursors
                .get(channel.as_str())
                .cloned()
                .unwrap_or_default();
            let page = self
                .hub
                .engine()
                .read(channel, after, HISTORY_PAGE, HISTORY_PAGE_BYTES, i64::MIN)
                .await?;
            if page.epoch.as_str() != epoch && !(epoch.is_empty() && after == 0) {
                // The channel was deleted and started again: its new history is all news.
                self.set_cursor(id, channel, page.epoch.as_str(), 0);
                if page.last_seq == 0 {
                    return self.persist_cursor(id, channel).await;
                }
                continue;
            }
            let Some(last) = page.messages.last() else {
                if page.last_seq > after {
                    self.note_lost(id, channel, after + 1, page.last_seq).await;
                    self.set_cursor(id, channel, page.epoch.as_str(), page.last_seq);
                }
                return self.persist_cursor(id, channel).await;
            };
            let last_seq = last.seq;
            if let Some(first) = page.messages.first() {
                if first.seq > after + 1 {
                    self.note_lost(id, channel, after + 1, first.seq - 1).await;
                }
            }
            let items = page
                .messages
                .iter()
                .map(|m| outbox_item(channel, page.epoch.as_str(), m))
                .collect();
            self.set_cursor(id, channel, page.epoch.as_str(), last_seq);
            self.state
                .webhook_enqueue(vec![Enqueue {
                    webhook: id.to_owned(),
                    items,
                    cursors: vec![WebhookCursor {
                        channel: channel.as_str().to_owned(),
                        epoch: page.epoch.as_str().to_owned(),
                        seq: last_seq,
                    }],
                }])
                .await?;
            if last_seq >= page.last_seq {
                return Ok(());
            }
        }
    }

    fn set_cursor(&mut self, id: &str, channel: &ChannelName, epoch: &str, seq: Seq) {
        if let Some(hook) = self.hooks.get_mut(id) {
            hook.cursors
                .insert(channel.as_str().to_owned(), (epoch.to_owned(), seq));
        }
    }

    async fn persist_cursor(&self, id: &str, channel: &ChannelName) -> Result<(), EngineError> {
        let Some((epoch, seq)) = self
            .hooks
            .get(id)
            .and_then(|h| h.cursors.get(channel.as_str()).cloned())
        else {
            return Ok(());
        };
        self.state
            .webhook_enqueue(vec![Enqueue {
                webhook: id.to_owned(),
                items: Vec::new(),
                cursors: vec![WebhookCursor {
                    channel: channel.as_str().to_owned(),
                    epoch,
                    seq,
                }],
            }])
            .await
    }

    /// Messages pruned before they could be queued (the webhook was disabled past retention).
    async fn note_lost(&self, id: &str, channel: &ChannelName, from: Seq, to: Seq) {
        tracing::warn!(webhook = %id, %channel, from, to, "messages were pruned before the webhook could be sent them");
        let record = worker::AttemptRecord {
            channel: channel.as_str().to_owned(),
            seq: from,
            attempt: 0,
            time: crate::clock::rfc3339_ms(now_ms()),
            status_code: None,
            latency_ms: None,
            error: Some(format!(
                "seqs {from}..={to} were pruned by retention before they could be delivered"
            )),
            next_attempt: None,
        };
        if let Ok(json) = serde_json::to_string(&record) {
            let _ = self
                .state
                .webhook_settle(id, Vec::new(), vec![json], worker::KEEP_LOG)
                .await;
        }
    }

    /// Copies freshly committed messages into the queues of matching webhooks (disabled ones
    /// included: they resume from their queue), all in one store transaction.
    async fn copy_notices(&mut self, notices: Vec<CommitNotice>) {
        let mut batch: BTreeMap<String, Enqueue> = BTreeMap::new();
        let mut gaps: Vec<(String, ChannelName)> = Vec::new();
        let hooks: Vec<String> = self.hooks.keys().cloned().collect();
        let before: HashMap<String, HashMap<String, (String, Seq)>> = hooks
            .iter()
            .filter_map(|id| self.hooks.get(id).map(|h| (id.clone(), h.cursors.clone())))
            .collect();
        for notice in &notices {
            for id in &hooks {
                let Some(hook) = self.hooks.get_mut(id) else {
                    continue;
                };
                if !hook.matches(&notice.channel) {
                    continue;
                }
                let epoch = notice.epoch.as_str();
                let after = match hook.cursors.get(notice.channel.as_str()) {
                    Some((e, s)) if e == epoch => *s,
                    _ => 0,
                };
                let Some(first) = notice.messages.first() else {
                    continue;
                };
                if first.seq > after + 1 {
                    gaps.push((id.clone(), notice.channel.clone()));
                    continue;
                }
                let items: Vec<OutboxItem> = notice
                    .messages
                    .iter()
                    .filter(|m| m.seq > after)
                    .map(|m| outbox_item(&notice.channel, epoch, m))
                    .collect();
                let Some(last) = items.last().map(|i| i.seq) else {
                    continue;
                };
                hook.cursors
                    .insert(notice.channel.as_str().to_owned(), (epoch.to_owned(), last));
                let entry = batch.entry(id.clone()).or_insert_with(|| Enqueue {
                    webhook: id.clone(),
                    ..Enqueue::default()
                });
                entry.items.extend(items);
                entry
                    .cursors
                    .retain(|c| c.channel != notice.channel.as_str());
                entry.cursors.push(WebhookCursor {
                    channel: notice.channel.as_str().to_owned(),
                    epoch: epoch.to_owned(),
                    seq: last,
                });
            }
        }
        let touched: Vec<String> = batch.keys().cloned().collect();
        if let Err(error) = self
            .state
            .webhook_enqueue(batch.into_values().collect())
            .await
        {
            tracing::warn!(%error, "cannot queue webhook deliveries; will catch up from history");
            for (id, cursors) in before {
                if let Some(hook) = self.hooks.get_mut(&id) {
                    hook.cursors = cursors;
                }
            }
            self.rescan_needed = true;
            return;
        }
        for id in &touched {
            self.poke(id);
        }
        for (id, channel) in gaps {
            if let Err(error) = self.copy_history(&id, &channel).await {
                tracing::warn!(webhook = %id, %error, "cannot copy history; will retry");
                self.rescan_needed = true;
            }
            self.poke(&id);
        }
    }

    async fn worker_event(&mut self, event: WorkerEvent) {
        let id = match &event {
            WorkerEvent::Failing { id, .. }
            | WorkerEvent::Healthy { id }
            | WorkerEvent::GaveUp { id }
            | WorkerEvent::Disable { id, .. } => id.clone(),
        };
        let Some(mut record) = self.record(&id) else {
            return;
        };
        match event {
            WorkerEvent::Failing {
                since_ms, error, ..
            } => {
                record.failing_since_ms.get_or_insert(since_ms);
                record.last_error = Some(error);
            }
            WorkerEvent::Healthy { .. } => record.failing_since_ms = None,
            WorkerEvent::GaveUp { .. } => record.failed += 1,
            WorkerEvent::Disable { reason, .. } => {
                tracing::warn!(webhook = %id, %reason, "webhook disabled");
                record.disabled_reason = Some(reason);
                self.stop_worker(&id).await;
            }
        }
        if let Err(error) = self.save(&record).await {
            tracing::warn!(webhook = %id, %error, "cannot save the webhook's state");
        }
        self.update_wanted();
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Create {
                record,
                patterns,
                since,
                reply,
            } => {
                let _ = reply.send(self.create(*record, patterns, since).await);
            }
            Command::Delete { id, reply } => {
                let _ = reply.send(self.delete(&id).await);
            }
            Command::SetEnabled { id, enabled, reply } => {
                let _ = reply.send(self.set_enabled(&id, enabled).await);
            }
            Command::Rotate { id, reply } => {
                let _ = reply.send(self.rotate(&id).await);
            }
            Command::Replay {
                id,
                channel,
                since,
                reply,
            } => {
                let _ = reply.send(self.replay(&id, &channel, since).await);
            }
        }
    }

    async fn create(
        &mut self,
        record: WebhookRecord,
        patterns: Vec<Pattern>,
        since: Option<Seq>,
    ) -> Result<(), WebhooksError> {
        let id = record.id.clone();
        self.publish_record(&record);
        self.hooks.insert(
            id.clone(),
            Hook {
                patterns,
                cursors: HashMap::new(),
                worker: None,
                secret_from_config: false,
            },
        );
        // Notices on before the snapshot: nothing committed in between is missed, and what
        // the snapshot already covers is skipped by seq.
        self.update_wanted();
        // The cursors (and what `since` queues) are stored before the record: another node
        // sharing the store adopts the webhook from its stored cursors once it finds the record.
        let stored = async {
            self.snapshot_cursors(&id, since).await?;
            if since.is_some() {
                self.catch_up(&id).await?;
            }
            self.save(&record).await
        }
        .await;
        if let Err(error) = stored {
            self.hooks.remove(&id);
            self.records
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            self.update_wanted();
            if let Err(error) = self.state.webhook_forget(&id).await {
                tracing::warn!(webhook = %id, %error, "could not drop the queue of a webhook that failed to register");
            }
            return Err(error.into());
        }
        self.start_worker(&id, false);
        tracing::info!(webhook = %id, url = %record.url, "webhook registered");
        Ok(())
    }

    async fn delete(&mut self, id: &str) -> Result<WebhookRecord, WebhooksError> {
        let record = self
            .record(id)
            .ok_or_else(|| WebhooksError::Unknown(id.to_owned()))?;
        if record.source == Source::Config {
            return Err(WebhooksError::Conflict(format!(
                "webhook {id} comes from the configuration file; remove it there"
            )));
        }
        self.stop_worker(id).await;
        self.hooks.remove(id);
        self.records
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        self.state.delete_doc(DOC_KIND, id).await?;
        self.state.webhook_forget(id).await?;
        self.update_wanted();
        Ok(record)
    }

    async fn set_enabled(&mut self, id: &str, enabled: bool) -> Result<(), WebhooksError> {
        let mut record = self
            .record(id)
            .ok_or_else(|| WebhooksError::Unknown(id.to_owned()))?;
        if enabled {
            if record.disabled_reason.is_none() {
                return Ok(());
            }
            record.disabled_reason = None;
            record.failing_since_ms = None;
            self.save(&record).await?;
            self.update_wanted();
            self.catch_up(id).await?;
            self.start_worker(id, true);
        } else {
            if record.disabled_reason.is_some() {
                return Ok(());
            }
            self.stop_worker(id).await;
            record.disabled_reason = Some("disabled through the API".into());
            self.save(&record).await?;
            self.update_wanted();
        }
        Ok(())
    }

    async fn rotate(&mut self, id: &str) -> Result<String, WebhooksError> {
        let mut record = self
            .record(id)
            .ok_or_else(|| WebhooksError::Unknown(id.to_owned()))?;
        if self.hooks.get(id).is_some_and(|h| h.secret_from_config) {
            return Err(WebhooksError::Conflict(format!(
                "webhook {id} has its secret in the configuration file; change it there"
            )));
        }
        let secret = Secret::generate();
        record.previous_secret = Some(std::mem::replace(
            &mut record.secret,
            secret.as_str().to_owned(),
        ));
        record.previous_until_ms = Some(now_ms() + ROTATION_OVERLAP_MS);
        self.save(&record).await?;
        if let (Some(signing), Some(w)) = (
            signing_of(&record),
            self.hooks.get(id).and_then(|h| h.worker.as_ref()),
        ) {
            let _ = w.inbox.send(WorkerMsg::Signing(signing));
        }
        Ok(secret.as_str().to_owned())
    }

    async fn replay(
        &mut self,
        id: &str,
        channel: &ChannelName,
        since: Seq,
    ) -> Result<u64, WebhooksError> {
        let hook = self
            .hooks
            .get(id)
            .ok_or_else(|| WebhooksError::Unknown(id.to_owned()))?;
        if !hook.matches(channel) {
            return Err(WebhooksError::Invalid(format!(
                "channel {channel} does not match the webhook's patterns"
            )));
        }
        let generation = now_ms().max(self.last_replay + 1);
        self.last_replay = generation;
        let mut after = since;
        let mut queued = 0u64;
        loop {
            let page = self
                .hub
                .engine()
                .read(channel, after, HISTORY_PAGE, HISTORY_PAGE_BYTES, i64::MIN)
                .await?;
            let Some(last) = page.messages.last().map(|m| m.seq) else {
                break;
            };
            queued += page.messages.len() as u64;
            let items = page
                .messages
                .iter()
                .map(|m| OutboxItem {
                    replay: generation,
                    ..outbox_item(channel, page.epoch.as_str(), m)
                })
                .collect();
            self.state
                .webhook_enqueue(vec![Enqueue {
                    webhook: id.to_owned(),
                    items,
                    cursors: Vec::new(),
                }])
                .await?;
            if last >= page.last_seq {
                break;
            }
            after = last;
        }
        self.poke(id);
        Ok(queued)
    }
}

fn outbox_item(
    channel: &ChannelName,
    epoch: &str,
    m: &crate::hub::types::SharedMessage,
) -> OutboxItem {
    OutboxItem {
        channel: channel.as_str().to_owned(),
        epoch: epoch.to_owned(),
        seq: m.seq,
        body: String::from_utf8_lossy(&m.json).into_owned(),
        replay: 0,
    }
}

fn signing_of(record: &WebhookRecord) -> Option<Signing> {
    let current = Secret::parse(&record.secret).ok()?;
    let previous = match (&record.previous_secret, record.previous_until_ms) {
        (Some(s), Some(until)) if until > now_ms() => Secret::parse(s).ok().map(|s| (s, until)),
        _ => None,
    };
    Some(Signing { current, previous })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::testing::{self, SharedState};
    use crate::hub::types::{Data, EventName, NewMessage};

    /// A webhook registered, disabled and deleted through one node is followed by the other;
    /// only one of them delivers it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_follows_webhooks_registered_on_another_and_one_delivers() {
        let dir = tempfile::tempdir().unwrap();
        let hub = testing::hub(&dir.path().join("hub"));
        let state = SharedState::open(&dir.path().join("state"));
        let (url, seqs) = testing::receiver().await;
        let (tap, feed_a) = crate::hub::tap::commit_tap(4096);
        hub.live().set_tap(tap);
        // B's node hears of no commit: only the store connects the two.
        let (_tap_b, feed_b) = crate::hub::tap::commit_tap(4096);
        let start = |feed: CommitFeed| {
            let metrics = Arc::new(Metrics::default());
            let shutdown = CancellationToken::new();
            let started = Webhooks::start(
                WebhooksContext {
                    hub: hub.clone(),
                    state: state.clone(),
                    metrics: metrics.clone(),
                    feed,
                    node: NodeId::generate(),
                },
                WebhookPolicy::defaults(true),
                Vec::new(),
                shutdown.clone(),
            );
            async move { (started.await.unwrap(), metrics, shutdown) }
        };
        let (a, a_metrics, a_stop) = start(feed_a).await;
        let (b, b_metrics, b_stop) = start(feed_b).await;

        let created = a
            .create(NewWebhook {
                url,
                channels: vec!["orders:*".into()],
                description: None,
                since: None,
            })
            .await
            .unwrap();
        let id = created["id"].as_str().unwrap().to_owned();
        let known = |hooks: &Webhooks, id: &str| hooks.record(id).ok();
        testing::wait_until("B to know the webhook", || {
            let found = known(&b, &id).is_some();
            async move { found }
        })
        .await;

        let channel = ChannelName::parse("orders:1").unwrap();
        let messages = (0..20)
            .map(|i| NewMessage {
                id: None,
                event: EventName::default(),
                data: Data::from_value(&serde_json::json!({ "i": i })).unwrap(),
            })
            .collect();
        hub.publish(&channel, messages).await.unwrap();
        let received = seqs.clone();
        testing::wait_until("twenty deliveries", || {
            let n = received.lock().unwrap().len();
            async move { n >= 20 }
        })
        .await;
        assert_eq!(*seqs.lock().unwrap(), (1..=20).collect::<Vec<u64>>());
        let sent = |m: &Metrics| {
            m.webhook_deliveries
                .get_or_create(&vec![("result", "success")])
                .get()
        };
        // Counted once the answer is read, a moment after the receiver saw the request.
        testing::wait_until("twenty successes counted", || {
            let n = sent(&a_metrics) + sent(&b_metrics);
            async move { n >= 20 }
        })
        .await;
        assert_eq!(sent(&a_metrics) + sent(&b_metrics), 20);
        assert!(
            sent(&a_metrics) == 0 || sent(&b_metrics) == 0,
            "one node delivers"
        );

        a.set_enabled(&id, false).await.unwrap();
        testing::wait_until("B to see it disabled", || {
            let disabled = known(&b, &id).is_some_and(|r| r.disabled_reason.is_some());
            async move { disabled }
        })
        .await;
        a.delete(&id).await.unwrap();
        testing::wait_until("B to forget it", || {
            let gone = known(&b, &id).is_none();
            async move { gone }
        })
        .await;
        for (hooks, stop) in [(a, a_stop), (b, b_stop)] {
            stop.cancel();
            hooks.tasks().close();
            hooks.tasks().wait().await;
        }
    }
}
