//! The feed poller: one task per feed fetching it as Miniflux does (conditional GET, limited
//! redirects, size and time limits, decompression), publishing each new entry once, oldest
//! first, and keeping its state (shown by `GET /api/feeds`) in the state store.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::parse::{self, FeedEntry};
use crate::cluster::{self, NodeId};
use crate::engine::state::{self as state_store, StateStore};
use crate::engine::EngineError;
use crate::hub::types::{ChannelName, Data, EventName, MessageId, NewMessage};
use crate::hub::Hub;
use crate::jobs::spec::{FeedSource, FeedSpec};

pub const MAX_BODY: usize = 10 * 1024 * 1024;
pub const MAX_REDIRECTS: usize = 5;
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
const PARSE_TIMEOUT: Duration = Duration::from_secs(20);

pub use crate::metrics::LabelSet;

/// A feed's poll state, persisted and shown by the API.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FeedState {
    pub status: String,
    pub last_poll: Option<String>,
    pub next_poll: Option<String>,
    pub http_status: Option<u16>,
    pub error: Option<String>,
    pub entries_seen: u64,
    pub consecutive_errors: u32,
    #[serde(default)]
    pub etag: Option<String>,
    #[serde(default)]
    pub last_modified: Option<String>,
    /// The keys of the entries of the last document read. They count as still in the feed
    /// until a document without them arrives, however long the feed answers 304 or fails, so
    /// `dedupe_window` runs from when an entry leaves the feed (SPEC §4), not from when it was
    /// last parsed.
    #[serde(default)]
    pub keys: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum FeedsError {
    #[error("no feed named {0:?}")]
    Unknown(String),
    #[error("a feed named {0:?} already exists")]
    Taken(String),
    #[error("feed {0:?} comes from the configuration file; change it there")]
    FromConfig(String),
    #[error(transparent)]
    Store(#[from] EngineError),
}

/// What a feed's poller shares with the registry.
struct Poller {
    state: Arc<Mutex<FeedState>>,
    cancel: CancellationToken,
    held: Arc<AtomicBool>,
}

struct Registered {
    spec: FeedSpec,
    state: Arc<Mutex<FeedState>>,
    cancel: CancellationToken,
    /// This node holds the feed's lease (polls it); otherwise its state is read from the store.
    held: Arc<AtomicBool>,
}

pub struct FeedsContext {
    pub hub: Arc<Hub>,
    pub state: Arc<dyn StateStore>,
    pub dedupe_window: Duration,
    pub polls_total: Family<LabelSet, Counter>,
    /// The most one fetch (connect, headers, body) may take.
    pub fetch_timeout: Duration,
    /// This node, holder of the `feed:{name}` leases of the feeds it polls.
    pub node: NodeId,
}

/// The registry of polled feeds; each feed's loop owns its own polling.
#[derive(Clone)]
pub struct Feeds {
    ctx: Arc<FeedsContext>,
    client: reqwest::Client,
    feeds: Arc<Mutex<BTreeMap<String, Registered>>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

const SPEC_KIND: &str = "feed";
const STATE_KIND: &str = "feed_state";

fn seen_set(name: &str) -> String {
    format!("feed:{name}")
}

impl Feeds {
    /// Starts polling the configured feeds and the ones added earlier through the API.
    pub async fn start(
        ctx: FeedsContext,
        configured: Vec<FeedSpec>,
        shutdown: CancellationToken,
    ) -> Result<Feeds, EngineError> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
            .timeout(ctx.fetch_timeout)
            .connect_timeout(ctx.fetch_timeout.min(Duration::from_secs(10)))
            .user_agent(concat!(
                "Tidings/",
                env!("CARGO_PKG_VERSION"),
                " (feed poller)"
            ))
            .build()
            .map_err(|e| EngineError::Internal(format!("cannot build the HTTP client: {e}")))?;
        let feeds = Feeds {
            ctx: Arc::new(ctx),
            client,
            feeds: Arc::new(Mutex::new(BTreeMap::new())),
            tasks: TaskTracker::new(),
            shutdown,
        };
        let mut specs = configured;
        let mut stored = HashSet::new();
        for (name, json) in feeds.ctx.state.docs(SPEC_KIND).await? {
            stored.insert(name.clone());
            match serde_json::from_str::<FeedSpec>(&json) {
                Ok(spec) if !specs.iter().any(|s| s.name == spec.name) => specs.push(spec),
                Ok(_) => {
                    tracing::warn!(%name, "a feed added through the API now has the name of a configured feed; the configured one wins")
                }
                Err(error) => tracing::warn!(%name, %error, "ignoring an unreadable stored feed"),
            }
        }
        for spec in specs {
            feeds.launch(spec).await?;
        }
        if feeds.ctx.state.is_shared() {
            feeds.tasks.spawn(feeds.clone().follow_store(stored));
        }
        Ok(feeds)
    }

    pub fn tasks(&self) -> TaskTracker {
        self.tasks.clone()
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Registered>> {
        self.feeds.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn launch(&self, spec: FeedSpec) -> Result<(), EngineError> {
        let initial = self.stored_state(&spec.name).await?;
        if let Some(poller) = self.claim(&spec, initial) {
            self.spawn_poller(spec, poller);
        }
        Ok(())
    }

    /// The feed's saved poll state, `pending` if it never polled.
    async fn stored_state(&self, name: &str) -> Result<FeedState, EngineError> {
        let mut state: FeedState = state_store::get_typed(&*self.ctx.state, STATE_KIND, name)
            .await?
            .unwrap_or_default();
        if state.status.is_empty() {
            state.status = "pending".into();
        }
        Ok(state)
    }

    /// Registers the feed under its name unless one is registered already; the handles its
    /// poller needs, or `None` when the name is taken.
    fn claim(&self, spec: &FeedSpec, initial: FeedState) -> Option<Poller> {
        let mut registry = self.registry();
        if registry.contains_key(&spec.name) {
            return None;
        }
        let poller = Poller {
            state: Arc::new(Mutex::new(initial)),
            cancel: self.shutdown.child_token(),
            held: Arc::new(AtomicBool::new(false)),
        };
        registry.insert(
            spec.name.clone(),
            Registered {
                spec: spec.clone(),
                state: poller.state.clone(),
                cancel: poller.cancel.clone(),
                held: poller.held.clone(),
            },
        );
        Some(poller)
    }

    fn spawn_poller(&self, spec: FeedSpec, poller: Poller) {
        self.tasks.spawn(poll_loop(
            self.ctx.clone(),
            self.client.clone(),
            spec,
            poller.state,
            poller.held,
            poller.cancel,
        ));
    }

    /// On a shared store, follows what other nodes do every `cluster::RELOAD_EVERY`: feeds
    /// added, changed or removed through their API, and the state of the feeds they poll.
    /// `known`: the names of the feeds stored (added through an API) at the last look.
    async fn follow_store(self, mut known: HashSet<String>) {
        let mut tick = tokio::time::interval(cluster::RELOAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(error) = self.reload(&mut known).await {
                tracing::warn!(%error, "could not read the feeds of other nodes; will retry");
            }
        }
    }

    async fn reload(&self, known: &mut HashSet<String>) -> Result<(), EngineError> {
        let mut stored: BTreeMap<String, FeedSpec> = BTreeMap::new();
        for (name, json) in self.ctx.state.docs(SPEC_KIND).await? {
            if let Ok(spec) = serde_json::from_str::<FeedSpec>(&json) {
                stored.insert(name, spec);
            }
        }
        let states = self.ctx.state.docs(STATE_KIND).await?;
        // Removed through another node. One added here but not stored yet was not there at the
        // last look either, so it stays.
        let gone: Vec<(String, Registered)> = {
            let mut registry = self.registry();
            let names: Vec<String> = registry
                .iter()
                .filter(|(name, r)| {
                    r.spec.source == FeedSource::Api
                        && !stored.contains_key(*name)
                        && known.contains(*name)
                })
                .map(|(name, _)| name.clone())
                .collect();
            names
                .into_iter()
                .filter_map(|name| registry.remove(&name).map(|r| (name, r)))
                .collect()
        };
        for (name, removed) in gone {
            removed.cancel.cancel();
            tracing::info!(feed = %name, "feed removed through another node");
        }
        // Added through another node, or removed and added again with another spec.
        for (name, spec) in &stored {
            let current = self.registry().get(name).map(|r| {
                (
                    r.spec.source == FeedSource::Config,
                    same_spec(&r.spec, spec),
                    r.state.clone(),
                )
            });
            match current {
                Some((true, _, _)) | Some((false, true, _)) => continue,
                Some((false, false, old)) => {
                    let replaced = {
                        let mut registry = self.registry();
                        if registry
                            .get(name)
                            .is_some_and(|r| Arc::ptr_eq(&r.state, &old))
                        {
                            registry.remove(name)
                        } else {
                            None
                        }
                    };
                    if let Some(replaced) = replaced {
                        replaced.cancel.cancel();
                    }
                }
                None => {}
            }
            if self.adopt(name).await? {
                tracing::info!(feed = %name, "feed added through another node");
            }
        }
        // What the feeds other nodes poll show now.
        {
            let registry = self.registry();
            for (name, json) in states {
                let Some(r) = registry.get(&name) else {
                    continue;
                };
                if r.held.load(Ordering::SeqCst) {
                    continue;
                }
                if let Ok(mut state) = serde_json::from_str::<FeedState>(&json) {
                    if state.status.is_empty() {
                        state.status = "pending".into();
                    }
                    *r.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
                }
            }
        }
        *known = stored.into_keys().collect();
        Ok(())
    }

    /// Starts the stored feed `name` unless it is known here already or no longer stored;
    /// true when started.
    async fn adopt(&self, name: &str) -> Result<bool, EngineError> {
        let initial = self.stored_state(name).await?;
        // Read last, so a local `remove` (which deletes the document before it forgets the
        // feed) cannot be undone here.
        let Some(spec) =
            state_store::get_typed::<FeedSpec>(&*self.ctx.state, SPEC_KIND, name).await?
        else {
            return Ok(false);
        };
        let Some(poller) = self.claim(&spec, initial) else {
            return Ok(false);
        };
        self.spawn_poller(spec, poller);
        Ok(true)
    }

    /// Every feed with its state, by name.
    pub fn list(&self) -> Vec<serde_json::Value> {
        self.registry()
            .values()
            .map(|r| feed_json(&r.spec, &r.state.lock().unwrap_or_else(|e| e.into_inner())))
            .collect()
    }

    pub async fn add(&self, spec: FeedSpec) -> Result<serde_json::Value, FeedsError> {
        let fresh = FeedState {
            status: "pending".into(),
            ..Default::default()
        };
        // Claim the name before the first await, so two adds of one name at the same moment
        // cannot both succeed and leave a poller behind that nothing can remove.
        let Some(poller) = self.claim(&spec, fresh.clone()) else {
            return Err(FeedsError::Taken(spec.name));
        };
        if let Err(e) = self.persist_new(&spec).await {
            let mut registry = self.registry();
            if registry
                .get(&spec.name)
                .is_some_and(|r| Arc::ptr_eq(&r.state, &poller.state))
            {
                registry.remove(&spec.name);
            }
            return Err(e.into());
        }
        if poller.cancel.is_cancelled() {
            // Removed while it was being stored: make sure it does not come back at restart.
            self.ctx.state.delete_doc(SPEC_KIND, &spec.name).await?;
            self.ctx.state.delete_doc(STATE_KIND, &spec.name).await?;
            return Ok(feed_json(&spec, &fresh));
        }
        self.spawn_poller(spec.clone(), poller);
        Ok(feed_json(&spec, &fresh))
    }

    async fn persist_new(&self, spec: &FeedSpec) -> Result<(), EngineError> {
        state_store::put_typed(&*self.ctx.state, SPEC_KIND, &spec.name, spec).await?;
        // A feed added again under an old name starts with fresh state but keeps its memory of
        // entries, so nothing already published is published again.
        self.ctx.state.delete_doc(STATE_KIND, &spec.name).await?;
        Ok(())
    }

    pub async fn remove(&self, name: &str) -> Result<serde_json::Value, FeedsError> {
        let found = {
            let registry = self.registry();
            match registry.get(name) {
                None => return Err(FeedsError::Unknown(name.to_owned())),
                Some(r) if r.spec.source == FeedSource::Config => {
                    return Err(FeedsError::FromConfig(name.to_owned()))
                }
                Some(r) => r.state.clone(),
            }
        };
        // The document goes first: on a shared store, a node that still finds it stored
        // starts the feed (`adopt`), so it must be gone before the feed is forgotten here.
        self.ctx.state.delete_doc(SPEC_KIND, name).await?;
        let removed = {
            let mut registry = self.registry();
            if registry
                .get(name)
                .is_some_and(|r| Arc::ptr_eq(&r.state, &found))
            {
                registry.remove(name)
            } else {
                None
            }
        };
        let Some(removed) = removed else {
            return Err(FeedsError::Unknown(name.to_owned()));
        };
        removed.cancel.cancel();
        let state = removed
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Ok(feed_json(&removed.spec, &state))
    }
}

fn same_spec(a: &FeedSpec, b: &FeedSpec) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

/// How long a node holds a feed's lease without renewing it: past the longest poll (it is
/// renewed before each), and at least the cluster's lease time.
fn feed_lease_ttl(fetch_timeout: Duration) -> Duration {
    (fetch_timeout + PARSE_TIMEOUT + cluster::RENEW_EVERY).max(cluster::LEASE_TTL)
}

pub fn feed_json(spec: &FeedSpec, state: &FeedState) -> serde_json::Value {
    serde_json::json!({
        "name": spec.name,
        "url": spec.url,
        "every": humantime::format_duration(spec.every).to_string(),
        "channel": spec.channel,
        "source": spec.source,
        "status": state.status,
        "last_poll": state.last_poll,
        "next_poll": state.next_poll,
        "http_status": state.http_status,
        "error": state.error,
        "entries_seen": state.entries_seen,
        "consecutive_errors": state.consecutive_errors,
    })
}

/// What one fetch produced.
enum Fetched {
    NotModified {
        status: u16,
    },
    Body {
        status: u16,
        /// Where the body came from after redirects: relative links resolve against it.
        url: String,
        body: Vec<u8>,
        content_type: Option<String>,
        etag: Option<String>,
        last_modified: Option<String>,
        max_age: Option<Duration>,
    },
}

#[derive(Debug)]
struct PollError {
    message: String,
    http_status: Option<u16>,
    retry_after: Option<Duration>,
}

impl PollError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            http_status: None,
            retry_after: None,
        }
    }
}

/// An error with its causes, e.g. "error sending request: connection refused".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn header(resp: &reqwest::Response, name: reqwest::header::HeaderName) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate_to_unix(value)?;
    let now = crate::clock::now_ms() / 1000;
    Some(Duration::from_secs(when.saturating_sub(now).max(0) as u64))
}

fn httpdate_to_unix(value: &str) -> Option<i64> {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::PrimitiveDateTime::parse(value, &format)
        .ok()
        .map(|t| t.assume_utc().unix_timestamp())
}

/// `Cache-Control: max-age=N`.
pub fn parse_max_age(value: &str) -> Option<Duration> {
    value.split(',').find_map(|part| {
        let (k, v) = part.trim().split_once('=')?;
        (k.eq_ignore_ascii_case("max-age"))
            .then(|| v.trim().parse::<u64>().ok())
            .flatten()
            .map(Duration::from_secs)
    })
}

async fn fetch(
    client: &reqwest::Client,
    url: &str,
    state: &FeedState,
    timeout: Duration,
) -> Result<Fetched, PollError> {
    let mut req = client.get(url).header(
        reqwest::header::ACCEPT,
        "application/rss+xml, application/atom+xml, application/feed+json, application/json, application/xml;q=0.9, text/xml;q=0.9, */*;q=0.8",
    );
    if let Some(etag) = &state.etag {
        req = req.header(reqwest::header::IF_NONE_MATCH, etag);
    }
    if let Some(lm) = &state.last_modified {
        req = req.header(reqwest::header::IF_MODIFIED_SINCE, lm);
    }
    let resp = req.send().await.map_err(|e| {
        let message = if e.is_redirect() {
            format!("too many redirects (more than {MAX_REDIRECTS})")
        } else if e.is_timeout() {
            format!("no answer within {}", humantime::format_duration(timeout))
        } else {
            format!("fetch failed: {}", error_chain(&e))
        };
        PollError::new(message)
    })?;
    let status = resp.status().as_u16();
    if status == 304 {
        return Ok(Fetched::NotModified { status });
    }
    if !resp.status().is_success() {
        return Err(PollError {
            message: format!("the feed answered HTTP {status}"),
            http_status: Some(status),
            retry_after: header(&resp, reqwest::header::RETRY_AFTER)
                .and_then(|v| parse_retry_after(&v)),
        });
    }
    let final_url = resp.url().to_string();
    let content_type = header(&resp, reqwest::header::CONTENT_TYPE);
    let etag = header(&resp, reqwest::header::ETAG);
    let last_modified = header(&resp, reqwest::header::LAST_MODIFIED);
    let max_age = header(&resp, reqwest::header::CACHE_CONTROL).and_then(|v| parse_max_age(&v));
    if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(PollError {
            message: format!("the feed is larger than {} MiB", MAX_BODY / (1024 * 1024)),
            http_status: Some(status),
            retry_after: None,
        });
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| PollError {
            message: if e.is_timeout() {
                format!(
                    "the body did not arrive within {}",
                    humantime::format_duration(timeout)
                )
            } else {
                format!("reading the body failed: {e}")
            },
            http_status: Some(status),
            retry_after: None,
        })?;
        if body.len() + chunk.len() > MAX_BODY {
            return Err(PollError {
                message: format!("the feed is larger than {} MiB", MAX_BODY / (1024 * 1024)),
                http_status: Some(status),
                retry_after: None,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Fetched::Body {
        status,
        url: final_url,
        body,
        content_type,
        etag,
        last_modified,
        max_age,
    })
}

/// One poll: fetch, parse, publish what is new. Returns how long to wait before the next.
async fn poll_once(
    ctx: &FeedsContext,
    client: &reqwest::Client,
    spec: &FeedSpec,
    state: &Mutex<FeedState>,
) -> Result<(Duration, u16, u64), PollError> {
    let snapshot = state.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let fetched = fetch(client, &spec.url, &snapshot, ctx.fetch_timeout).await?;
    let (status, url, body, content_type, etag, last_modified, max_age) = match fetched {
        Fetched::NotModified { status } => return Ok((spec.every, status, 0)),
        Fetched::Body {
            status,
            url,
            body,
            content_type,
            etag,
            last_modified,
            max_age,
        } => (
            status,
            url,
            body,
            content_type,
            etag,
            last_modified,
            max_age,
        ),
    };
    let parsed = tokio::time::timeout(
        PARSE_TIMEOUT,
        tokio::task::spawn_blocking(move || {
            parse::parse_feed(&body, content_type.as_deref(), &url)
        }),
    )
    .await
    .map_err(|_| PollError::new("parsing took too long"))?
    .map_err(|e| PollError::new(format!("the parser failed: {e}")))?
    .map_err(|e| PollError {
        message: format!("not a readable feed: {e}"),
        http_status: Some(status),
        retry_after: None,
    })?;
    let (published, keys) = publish_new(ctx, spec, parsed.entries, &snapshot.keys)
        .await
        .map_err(|e| PollError::new(format!("could not store entries: {e}")))?;
    {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.etag = etag;
        s.last_modified = last_modified;
        s.keys = keys;
    }
    let wait = [Some(spec.every), parsed.ttl, max_age]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(spec.every)
        .min(Duration::from_secs(24 * 3600));
    Ok((wait, status, published))
}

/// Publishes the entries not seen before (oldest first, one atomic batch) and refreshes the
/// memory of every entry still in the feed and of those that were in the `previous` document
/// (their time in the dedupe window starts now, as they leave). Returns how many were newly
/// published and the keys of this document. Public for `tidings bench feeds`, which times this
/// path on documents from disk.
pub async fn publish_new(
    ctx: &FeedsContext,
    spec: &FeedSpec,
    mut entries: Vec<FeedEntry>,
    previous: &[String],
) -> Result<(u64, Vec<String>), EngineError> {
    let mut keys_in_doc = HashSet::new();
    entries.retain(|e| keys_in_doc.insert(e.key.clone()));
    let now = crate::clock::now_ms();
    let window_ms = i64::try_from(ctx.dedupe_window.as_millis()).unwrap_or(i64::MAX);
    let set = seen_set(&spec.name);
    let keys: Vec<String> = entries.iter().map(|e| e.key.clone()).collect();
    let unseen = ctx
        .state
        .unseen(&set, keys.clone(), now.saturating_sub(window_ms))
        .await?;
    let in_previous: HashSet<&str> = previous.iter().map(String::as_str).collect();
    let mut fresh: Vec<FeedEntry> = entries
        .into_iter()
        .zip(unseen)
        .filter_map(|(e, new)| (new && !in_previous.contains(e.key.as_str())).then_some(e))
        .collect();
    parse::order_oldest_first(&mut fresh);
    let mut published = 0;
    if !fresh.is_empty() {
        let channel = ChannelName::parse(&spec.channel).map_err(|e| EngineError::Internal(e.0))?;
        let event = EventName::parse("entry").unwrap_or_default();
        let messages: Vec<NewMessage> = fresh
            .iter()
            .filter_map(|entry| {
                let data = message_data(entry, &spec.name)?;
                Some(NewMessage {
                    id: MessageId::parse(&entry.key).ok(),
                    event: event.clone(),
                    data,
                })
            })
            .collect();
        if !messages.is_empty() {
            let results = ctx.hub.publish(&channel, messages).await?;
            published = results.iter().filter(|r| !r.duplicate).count() as u64;
        }
    }
    let mut remember = keys.clone();
    remember.extend(
        previous
            .iter()
            .filter(|k| !keys_in_doc.contains(k.as_str()))
            .cloned(),
    );
    ctx.state
        .mark_seen(&set, remember, now, now.saturating_sub(window_ms))
        .await?;
    Ok((published, keys))
}

/// The `data` of an entry's message, within the hub's size limit: a summary too long for one
/// message (a long post's full text) is cut on a character boundary and ends with "…", then
/// the title if need be, then the categories are dropped — the entry is published either way.
fn message_data(entry: &FeedEntry, feed: &str) -> Option<Data> {
    if let Ok(data) = Data::from_value(&parse::entry_data(entry, feed)) {
        return Some(data);
    }
    let mut cut = entry.clone();
    let fields: [fn(&mut FeedEntry) -> &mut Option<String>; 2] =
        [|e| &mut e.summary, |e| &mut e.title];
    for field in fields {
        if let Some(data) = shorten_to_fit(&mut cut, feed, field) {
            return Some(data);
        }
    }
    cut.categories.clear();
    match Data::from_value(&parse::entry_data(&cut, feed)) {
        Ok(data) => Some(data),
        Err(error) => {
            tracing::warn!(%feed, key = %entry.key, %error, "an entry is too large to publish even when shortened");
            None
        }
    }
}

/// Cuts one text field of `entry` to the longest prefix with which the data fits, found by
/// bisection over its character boundaries; None (and the field emptied) when even an empty
/// prefix does not fit.
fn shorten_to_fit(
    entry: &mut FeedEntry,
    feed: &str,
    field: fn(&mut FeedEntry) -> &mut Option<String>,
) -> Option<Data> {
    let text = field(entry).take()?;
    let cuts: Vec<usize> = text
        .char_indices()
        .map(|(i, _)| i)
        .chain([text.len()])
        .collect();
    let (mut lo, mut hi) = (0usize, cuts.len());
    let mut best = None;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        *field(entry) = Some(format!("{}…", &text[..cuts[mid]]));
        match Data::from_value(&parse::entry_data(entry, feed)) {
            Ok(data) => {
                best = Some((mid, data));
                lo = mid + 1;
            }
            Err(_) => hi = mid,
        }
    }
    match best {
        Some((mid, data)) => {
            *field(entry) = Some(format!("{}…", &text[..cuts[mid]]));
            Some(data)
        }
        None => {
            *field(entry) = None;
            None
        }
    }
}

/// How long until the feed's next poll by its saved state: resumes the schedule a restart (or
/// another node) left; a feed never polled goes at once. A healthy feed waits at most its
/// (possibly newly lowered) interval; a failing one keeps its backoff.
fn resume_wait(spec: &FeedSpec, state: &Mutex<FeedState>) -> Duration {
    let s = state.lock().unwrap_or_else(|e| e.into_inner());
    let cap = if s.consecutive_errors == 0 {
        spec.every
    } else {
        MAX_BACKOFF
    };
    s.next_poll
        .as_deref()
        .and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        })
        .map(|t| {
            let ms = (t.unix_timestamp_nanos() / 1_000_000) as i64 - crate::clock::now_ms();
            Duration::from_millis(ms.max(0) as u64).min(cap)
        })
        .unwrap_or(Duration::ZERO)
}

/// Replaces the feed's state in memory by the one saved in the store, if any.
async fn reload_state(
    ctx: &FeedsContext,
    spec: &FeedSpec,
    state: &Mutex<FeedState>,
) -> Result<(), EngineError> {
    if let Some(mut saved) =
        state_store::get_typed::<FeedState>(&*ctx.state, STATE_KIND, &spec.name).await?
    {
        if saved.status.is_empty() {
            saved.status = "pending".into();
        }
        *state.lock().unwrap_or_else(|e| e.into_inner()) = saved;
    }
    Ok(())
}

/// Polls one feed until cancelled. In a cluster every node runs this loop, but only the node
/// holding the lease `feed:{name}` polls: it renews the lease every `cluster::RENEW_EVERY` (and
/// before each poll), the others try to take it as often, and the one that takes it over goes
/// on from the state and schedule its holder saved.
async fn poll_loop(
    ctx: Arc<FeedsContext>,
    client: reqwest::Client,
    spec: FeedSpec,
    state: Arc<Mutex<FeedState>>,
    held: Arc<AtomicBool>,
    cancel: CancellationToken,
) {
    let label = |result: &str| vec![("feed", spec.name.clone()), ("result", result.to_owned())];
    let shared = ctx.state.is_shared();
    let lease = cluster::feed_lease(&spec.name);
    let lease_ttl = cluster::ms(feed_lease_ttl(ctx.fetch_timeout));
    let mut due = tokio::time::Instant::now() + resume_wait(&spec, &state);
    loop {
        let wake = if shared {
            due.min(tokio::time::Instant::now() + cluster::RENEW_EVERY)
        } else {
            due
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep_until(wake) => {}
        }
        match ctx.state.lease(&lease, ctx.node.as_str(), lease_ttl).await {
            Ok(true) => {
                let taken_over = !held.swap(true, Ordering::SeqCst);
                if taken_over && shared {
                    // Another node may have polled it until now: go on from its state.
                    if let Err(error) = reload_state(&ctx, &spec, &state).await {
                        tracing::warn!(feed = %spec.name, %error, "could not read the feed's state; will retry");
                        held.store(false, Ordering::SeqCst);
                        due = due.max(tokio::time::Instant::now() + cluster::RENEW_EVERY);
                        continue;
                    }
                    due = tokio::time::Instant::now() + resume_wait(&spec, &state);
                    tracing::info!(feed = %spec.name, node = %ctx.node, "this node polls the feed");
                }
            }
            Ok(false) => {
                if held.swap(false, Ordering::SeqCst) {
                    tracing::info!(feed = %spec.name, "another node polls the feed now");
                }
                due = due.max(tokio::time::Instant::now() + cluster::RENEW_EVERY);
                continue;
            }
            Err(error) => {
                tracing::warn!(feed = %spec.name, %error, "could not take or renew the feed's lease; will retry");
                due = due.max(tokio::time::Instant::now() + cluster::RENEW_EVERY);
                continue;
            }
        }
        if tokio::time::Instant::now() < due {
            continue;
        }
        let started = crate::clock::now_ms();
        let outcome = tokio::select! {
            _ = cancel.cancelled() => break,
            outcome = poll_once(&ctx, &client, &spec, &state) => outcome,
        };
        let wait;
        let snapshot = {
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            s.last_poll = Some(crate::clock::rfc3339_ms(started));
            match outcome {
                Ok((next, status, published)) => {
                    ctx.polls_total.get_or_create(&label("ok")).inc();
                    s.status = "ok".into();
                    s.http_status = Some(status);
                    s.error = None;
                    s.consecutive_errors = 0;
                    s.entries_seen += published;
                    wait = next;
                }
                Err(e) => {
                    ctx.polls_total.get_or_create(&label("error")).inc();
                    tracing::info!(feed = %spec.name, error = %e.message, "feed poll failed");
                    s.status = "error".into();
                    s.http_status = e.http_status;
                    s.error = Some(e.message);
                    s.consecutive_errors = s.consecutive_errors.saturating_add(1);
                    let factor = 2u32.saturating_pow(s.consecutive_errors.min(20));
                    let backoff = spec.every.saturating_mul(factor).min(MAX_BACKOFF);
                    wait = backoff
                        .max(e.retry_after.unwrap_or_default())
                        .min(MAX_BACKOFF.max(e.retry_after.unwrap_or_default()));
                }
            }
            s.next_poll = Some(crate::clock::rfc3339_ms(
                crate::clock::now_ms() + wait.as_millis() as i64,
            ));
            s.clone()
        };
        if let Err(error) =
            state_store::put_typed(&*ctx.state, STATE_KIND, &spec.name, &snapshot).await
        {
            tracing::warn!(feed = %spec.name, %error, "could not save feed state");
        }
        due = tokio::time::Instant::now() + wait;
    }
    if shared && held.load(Ordering::SeqCst) {
        // Removed or shutting down: another node may take the feed over at once.
        let release = ctx.state.release(&lease, ctx.node.as_str());
        match tokio::time::timeout(cluster::RELEASE_TIMEOUT, release).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(feed = %spec.name, %error, "could not release the feed's lease; it lapses")
            }
            Err(_) => {
                tracing::warn!(feed = %spec.name, "releasing the feed's lease took too long; it lapses")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::testing::{self, SharedState};
    use std::sync::atomic::AtomicUsize;

    const RSS: &str = r#"<?xml version="1.0"?><rss version="2.0"><channel><title>t</title>
        <item><guid>a</guid><title>A</title></item>
        <item><guid>b</guid><title>B</title></item></channel></rss>"#;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_node_polls_a_feed_and_another_takes_over_when_it_stops() {
        let dir = tempfile::tempdir().unwrap();
        let hub = testing::hub(&dir.path().join("hub"));
        let state = SharedState::open(&dir.path().join("state"));
        let fetches = Arc::new(AtomicUsize::new(0));
        let counted = fetches.clone();
        let router = axum::Router::new().route(
            "/feed",
            axum::routing::get(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async { ([("content-type", "application/rss+xml")], RSS) }
            }),
        );
        let spec = FeedSpec {
            name: "news".into(),
            url: format!("{}/feed", testing::serve(router).await),
            every: Duration::from_secs(1),
            channel: "feeds:news".into(),
            source: FeedSource::Config,
        };
        let start = || async {
            let polls = Family::<LabelSet, Counter>::default();
            let shutdown = CancellationToken::new();
            let feeds = Feeds::start(
                FeedsContext {
                    hub: hub.clone(),
                    state: state.clone(),
                    dedupe_window: Duration::from_secs(3600),
                    polls_total: polls.clone(),
                    fetch_timeout: Duration::from_secs(5),
                    node: NodeId::generate(),
                },
                vec![spec.clone()],
                shutdown.clone(),
            )
            .await
            .unwrap();
            (feeds, polls, shutdown)
        };
        let ok = |polls: &Family<LabelSet, Counter>| {
            polls
                .get_or_create(&vec![
                    ("feed", "news".to_owned()),
                    ("result", "ok".to_owned()),
                ])
                .get()
        };
        let (a, a_polls, a_stop) = start().await;
        let counter = a_polls.clone();
        testing::wait_until("A's first poll", || {
            let n = ok(&counter);
            async move { n >= 1 }
        })
        .await;
        let (b, b_polls, b_stop) = start().await;
        let before = ok(&a_polls);
        testing::wait_until("two more polls by A", || {
            let n = ok(&counter);
            async move { n >= before + 2 }
        })
        .await;
        assert_eq!(ok(&b_polls), 0, "B does not poll while A holds the feed");
        assert!(fetches.load(Ordering::SeqCst) as u64 <= ok(&a_polls) + 1);

        // A stops and gives the feed up; B goes on from A's state.
        a_stop.cancel();
        a.tasks().close();
        a.tasks().wait().await;
        let counter = b_polls.clone();
        testing::wait_until("B's first poll", || {
            let n = ok(&counter);
            async move { n >= 1 }
        })
        .await;
        let channel = ChannelName::parse("feeds:news").unwrap();
        let page = hub
            .engine()
            .read(&channel, 0, 100, 1 << 20, i64::MIN)
            .await
            .unwrap();
        assert_eq!(page.messages.len(), 2, "each entry published once");
        let listed = b.list();
        assert_eq!(listed[0]["entries_seen"], 2, "{listed:?}");
        b_stop.cancel();
        b.tasks().close();
        b.tasks().wait().await;
    }

    #[test]
    fn retry_after_and_cache_headers() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(
            parse_max_age("public, max-age=300"),
            Some(Duration::from_secs(300))
        );
        assert_eq!(parse_max_age("no-cache"), None);
    }

    #[test]
    fn an_entry_too_large_for_one_message_is_shortened_not_lost() {
        let entry = |title: &str, summary: &str| FeedEntry {
            key: "k".repeat(64),
            id: Some("id".into()),
            title: Some(title.into()),
            summary: Some(summary.into()),
            categories: vec!["c".into()],
            ..Default::default()
        };
        let small = entry("t", "s");
        assert_eq!(
            message_data(&small, "f").map(|d| d.as_str().to_owned()),
            Data::from_value(&parse::entry_data(&small, "f"))
                .ok()
                .map(|d| d.as_str().to_owned()),
            "what fits is unchanged"
        );
        let cases = [
            entry("t", &"é\"<".repeat(40_000)),
            entry(&"T".repeat(100_000), &"s".repeat(100_000)),
        ];
        for case in cases {
            let data = message_data(&case, "f").expect("published");
            assert!(data.as_str().len() <= crate::hub::types::MAX_DATA_BYTES);
            let value: serde_json::Value = serde_json::from_str(data.as_str()).unwrap();
            assert_eq!(value["id"], "id");
        }
        let data = message_data(&entry("t", &"é".repeat(50_000)), "f").unwrap();
        let value: serde_json::Value = serde_json::from_str(data.as_str()).unwrap();
        let summary = value["summary"].as_str().unwrap();
        assert!(
            summary.ends_with('…') && summary.len() > 60_000,
            "as much as fits"
        );
    }
}
