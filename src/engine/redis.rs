//! The Redis engine: channel histories in Redis so that any number of stateless Tidings nodes
//! can share them (SPEC §6).
//!
//! Layout (every key starts with the prefix, `tidings:` by default):
//! - `salt` — random bytes (hex) made once per Redis data set. Channels nobody has published to
//!   get an epoch derived from it, so a Redis that lost its data gives every channel a new epoch
//!   and clients are told `reset` instead of silently missing messages.
//! - `ch:{channel}` — hash: `epoch`, `last_seq`, `activity` (ms).
//! - `s:{channel}` — stream, one entry per message, id `{seq}-1`, fields `t` (ms), `i` (id),
//!   `j` (the message JSON). Retention trims it (`XTRIM MAXLEN` / `MINID`).
//! - `d:{channel}:{epoch}:{id}` — a dedupe key holding the seq, expiring after `dedupe_window`;
//!   a new epoch makes the old keys unreachable.
//! - `channels` — sorted set of channel names by last activity.
//! - pub/sub channel `events` — every commit and reset, for the live fan-out of every node.
//!
//! Publishing is one Lua script (dedupe, next seq, append, metadata, notify), so seqs stay
//! 1..N without holes whatever node publishes, and the notice is published in the same atomic
//! step, so pub/sub carries a channel's commits in seq order. Each node holds one pub/sub
//! connection and hands every notice to its [`LiveSink`]; after a reconnect it catches up the
//! channels its subscribers are waiting on from the streams. Redis Cluster is not supported
//! (the script touches keys it computes); one Redis or Valkey primary, with replicas if wanted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::{ChannelMeta, Engine, EngineError, LiveSink, Page, Published};
use crate::hub::retention::RetentionRules;
use crate::hub::types::{ChannelName, Epoch, Message, MessageId, NewMessage, Seq, SharedMessage};
use crate::metrics::Metrics;

/// How long a node waits for Redis to connect or answer before calling it unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Stream entries read at once when a read must skip messages older than `max_age`.
const READ_CHUNK: usize = 512;

/// Options of `--engine redis://…`.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub url: String,
    pub prefix: String,
    pub dedupe_window_ms: i64,
}

struct Keys {
    prefix: String,
}

impl Keys {
    fn salt(&self) -> String {
        format!("{}salt", self.prefix)
    }
    fn meta(&self, c: &ChannelName) -> String {
        format!("{}ch:{}", self.prefix, c.as_str())
    }
    fn stream(&self, c: &ChannelName) -> String {
        format!("{}s:{}", self.prefix, c.as_str())
    }
    fn dedupe_prefix(&self, c: &ChannelName) -> String {
        format!("{}d:{}:", self.prefix, c.as_str())
    }
    fn channels(&self) -> String {
        format!("{}channels", self.prefix)
    }
    fn events(&self) -> String {
        format!("{}events", self.prefix)
    }
}

/// Dedupe, next seq, append, metadata and the notice, atomically.
/// KEYS: meta, stream, channels, salt. ARGV: salt, unpublished epoch, channel, now, dedupe ms,
/// events channel, dedupe key prefix, n, then per message: explicit ("1"/"0"), id, head, tail
/// (the JSON is `head .. seq .. tail`).
const PUBLISH_LUA: &str = r#"
local meta, stream, chans, saltkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('GET', saltkey) ~= ARGV[1] then
  return redis.error_reply('TIDINGS_SALT the store was reset')
end
local channel, now, dd, events, dprefix = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6], ARGV[7]
local n = tonumber(ARGV[8])
local epoch = redis.call('HGET', meta, 'epoch')
local last = 0
if epoch then
  last = tonumber(redis.call('HGET', meta, 'last_seq') or '0')
else
  epoch = ARGV[2]
end
local out = {epoch}
local parts = {}
local fresh = 0
for i = 0, n - 1 do
  local b = 9 + i * 4
  local explicit, id, head, tail = ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3]
  local dkey = nil
  local dup = nil
  if explicit == '1' then
    dkey = dprefix .. epoch .. ':' .. id
    dup = redis.call('GET', dkey)
  end
  if dup then
    out[#out + 1] = tonumber(dup)
    out[#out + 1] = 1
  else
    last = last + 1
    local json = head .. last .. tail
    redis.call('XADD', stream, last .. '-1', 't', now, 'i', id, 'j', json)
    if dkey then
      redis.call('SET', dkey, last, 'PX', dd)
    end
    out[#out + 1] = last
    out[#out + 1] = 0
    parts[#parts + 1] = last .. '\t' .. #id .. '\t' .. #json .. '\n' .. id .. json
    fresh = fresh + 1
  end
end
if fresh > 0 then
  redis.call('HSET', meta, 'epoch', epoch, 'last_seq', last, 'activity', now)
  redis.call('ZADD', chans, now, channel)
  redis.call('PUBLISH', events,
    'M' .. channel .. '\t' .. epoch .. '\t' .. now .. '\t' .. fresh .. '\n' .. table.concat(parts))
end
return out
"#;

/// Drops a channel's history and gives it a new epoch. KEYS: meta, stream, channels.
/// ARGV: new epoch, now, events channel, channel.
const DELETE_LUA: &str = r#"
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'last_seq', 0, 'activity', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[4])
redis.call('PUBLISH', ARGV[3], 'R' .. ARGV[4] .. '\t' .. ARGV[1])
return ARGV[1]
"#;

/// Whether this node can talk to Redis, as last seen.
pub struct RedisHealth {
    down: AtomicBool,
    /// `tidings_store_up`.
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl RedisHealth {
    fn set(&self, up: bool) {
        self.gauge.set(i64::from(up));
        let was_down = self.down.swap(!up, Ordering::Relaxed);
        if up && was_down {
            tracing::info!("Redis is reachable again");
        } else if !up && !was_down {
            tracing::error!("Redis is unreachable: publishes answer 503 until it is back");
        }
    }
}

pub struct RedisEngine {
    conn: ConnectionManager,
    keys: Arc<Keys>,
    salt: RwLock<String>,
    dedupe_window_ms: i64,
    publish: Script,
    delete: Script,
    health: Arc<RedisHealth>,
    metrics: Arc<Metrics>,
    /// This node's live fan-out: told of its own commits and resets at once (read-your-writes
    /// on the node that published), and of everyone's through pub/sub.
    sink: Arc<dyn LiveSink>,
    stop: CancellationToken,
    listener: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2))
}

impl RedisEngine {
    /// Connects, makes sure the salt exists, and starts the node's pub/sub listener.
    pub async fn connect(
        options: &RedisOptions,
        sink: Arc<dyn LiveSink>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, EngineError> {
        let client = redis::Client::open(options.url.as_str())
            .map_err(|e| EngineError::Internal(format!("bad Redis URL: {e}")))?;
        let conn = tokio::time::timeout(
            CONNECT_TIMEOUT * 3,
            ConnectionManager::new_with_config(client.clone(), manager_config()),
        )
        .await
        .map_err(|_| EngineError::Unavailable(format!("Redis at {} did not answer", options.url)))?
        .map_err(|e| EngineError::Unavailable(format!("Redis at {}: {e}", options.url)))?;
        let keys = Arc::new(Keys {
            prefix: options.prefix.clone(),
        });
        let engine = Arc::new(Self {
            conn,
            keys,
            salt: RwLock::new(String::new()),
            dedupe_window_ms: options.dedupe_window_ms.max(1),
            publish: Script::new(PUBLISH_LUA),
            delete: Script::new(DELETE_LUA),
            health: Arc::new(RedisHealth {
                down: AtomicBool::new(false),
                gauge: metrics.store_up.clone(),
            }),
            metrics,
            sink: sink.clone(),
            stop: CancellationToken::new(),
            listener: std::sync::Mutex::new(None),
        });
        engine.reload_salt().await?;
        let listener = tokio::spawn(listen(
            client,
            engine.keys.events(),
            Arc::downgrade(&engine),
            sink,
            engine.stop.clone(),
        ));
        *engine.listener.lock().unwrap_or_else(|e| e.into_inner()) = Some(listener);
        Ok(engine)
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn salt(&self) -> String {
        self.salt.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the data set's salt, making it if Redis has none (first start, or data lost).
    async fn reload_salt(&self) -> Result<String, EngineError> {
        let fresh = hex(&rand::random::<[u8; 32]>());
        let mut conn = self.conn();
        let (salt,): (String,) = redis::pipe()
            .cmd("SET")
            .arg(self.keys.salt())
            .arg(&fresh)
            .arg("NX")
            .ignore()
            .get(self.keys.salt())
            .query_async(&mut conn)
            .await
            .map_err(|e| self.seen(e))?;
        *self.salt.write().unwrap_or_else(|e| e.into_inner()) = salt.clone();
        Ok(salt)
    }

    /// Notes a Redis error in the health state and converts it.
    fn seen(&self, e: redis::RedisError) -> EngineError {
        let e = EngineError::from(e);
        if matches!(e, EngineError::Unavailable(_)) {
            self.health.set(false);
        }
        e
    }

    fn ok<T>(&self, v: T) -> T {
        self.health.set(true);
        v
    }

    async fn publish_once(
        &self,
        channel: &ChannelName,
        batch: &[(bool, String, String, String)],
        now: i64,
    ) -> Result<Value, redis::RedisError> {
        let salt = self.salt();
        let mut invocation = self.publish.prepare_invoke();
        invocation
            .key(self.keys.meta(channel))
            .key(self.keys.stream(channel))
            .key(self.keys.channels())
            .key(self.keys.salt())
            .arg(&salt)
            .arg(unpublished_epoch(&salt, channel).as_str())
            .arg(channel.as_str())
            .arg(now)
            .arg(self.dedupe_window_ms)
            .arg(self.keys.events())
            .arg(self.keys.dedupe_prefix(channel))
            .arg(batch.len());
        for (explicit, id, head, tail) in batch {
            invocation
                .arg(if *explicit { "1" } else { "0" })
                .arg(id)
                .arg(head)
                .arg(tail);
        }
        let mut conn = self.conn();
        invocation.invoke_async(&mut conn).await
    }

    async fn meta(&self, channel: &ChannelName) -> Result<ChannelMeta, EngineError> {
        let mut conn = self.conn();
        let (salt, (epoch, last_seq, activity), len): MetaReply = redis::pipe()
            .atomic()
            .get(self.keys.salt())
            .cmd("HMGET")
            .arg(self.keys.meta(channel))
            .arg("epoch")
            .arg("last_seq")
            .arg("activity")
            .cmd("XLEN")
            .arg(self.keys.stream(channel))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.seen(e))?;
        self.ok(());
        let epoch = self.epoch_or_unpublished(channel, epoch, salt).await?;
        Ok(ChannelMeta {
            name: channel.clone(),
            epoch,
            last_seq: last_seq.unwrap_or(0),
            messages: len,
            last_activity_ms: activity,
        })
    }

    async fn epoch_or_unpublished(
        &self,
        channel: &ChannelName,
        stored: Option<String>,
        salt: Option<String>,
    ) -> Result<Epoch, EngineError> {
        if let Some(e) = stored {
            return Epoch::parse(&e)
                .map_err(|e| EngineError::Internal(format!("corrupt epoch in Redis: {e}")));
        }
        let salt = match salt {
            Some(s) if s == self.salt() => s,
            _ => self.reload_salt().await?,
        };
        Ok(unpublished_epoch(&salt, channel))
    }

    /// Catches up the channels the sink is waiting on (after the pub/sub connection was lost).
    async fn catch_up(&self, sink: &dyn LiveSink) {
        for (channel, epoch, last) in sink.watched() {
            let Ok(meta) = self.meta(&channel).await else {
                return;
            };
            if epoch.as_ref().is_some_and(|e| *e != meta.epoch) {
                sink.reset(&channel, &meta.epoch);
                continue;
            }
            if meta.last_seq <= last {
                continue;
            }
            let after = if last == 0 { meta.last_seq - 1 } else { last };
            if let Ok(page) = self.read(&channel, after, 1024, usize::MAX, i64::MIN).await {
                if !page.messages.is_empty() {
                    sink.committed(&channel, &page.epoch, &page.messages);
                }
            }
        }
    }
}

/// salt, (epoch, last_seq, activity), stream length.
type MetaReply = (
    Option<String>,
    (Option<String>, Option<u64>, Option<i64>),
    u64,
);
/// salt, (epoch, last_seq), the first stream entries.
type ReadReply = (Option<String>, (Option<String>, Option<u64>), Value);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The epoch of a channel nobody has published to in this Redis data set.
fn unpublished_epoch(salt: &str, channel: &ChannelName) -> Epoch {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update(channel.as_str().as_bytes());
    Epoch::from_digest(&h.finalize())
}

/// `{"channel":…,"seq":` and `,"id":…,"event":…,"time":…,"data":…}`: the script puts the seq
/// between them.
fn split_json(channel: &ChannelName, id: &str, m: &NewMessage, now: i64) -> (String, String) {
    const MARK: Seq = 0;
    let whole = Message::encode(channel, MARK, id, m.event.as_str(), now, m.data.as_str());
    let text = String::from_utf8_lossy(&whole);
    let needle = ",\"seq\":0";
    match text.find(needle) {
        Some(at) => {
            let cut = at + needle.len() - 1;
            (text[..cut].to_owned(), text[cut + 1..].to_owned())
        }
        None => (text.into_owned(), String::new()),
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// One stream entry: (seq, time, id, json); takes the entry apart without copying the JSON.
fn entry(v: Value) -> Option<(Seq, i64, String, Bytes)> {
    let Value::Array(parts) = v else { return None };
    let mut parts = parts.into_iter();
    let (Some(id), Some(Value::Array(fields)), None) = (parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let id = text(&id)?;
    let seq: Seq = id.split('-').next()?.parse().ok()?;
    let (mut time, mut mid, mut json) = (None, None, None);
    let mut fields = fields.into_iter();
    while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
        match text(&k)?.as_str() {
            "t" => time = int(&v),
            "i" => mid = text(&v),
            "j" => {
                if let Value::BulkString(b) = v {
                    json = Some(Bytes::from(b));
                }
            }
            _ => {}
        }
    }
    Some((seq, time?, mid?, json?))
}

#[async_trait]
impl Engine for RedisEngine {
    async fn publish(
        &self,
        channel: &ChannelName,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Published>, EngineError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let now = crate::clock::now_ms();
        let prepared: Vec<(bool, String, String, String)> = batch
            .iter()
            .map(|m| {
                let explicit = m.id.is_some();
                let id =
                    m.id.clone()
                        .unwrap_or_else(MessageId::generate)
                        .into_string();
                let (head, tail) = split_json(channel, &id, m, now);
                (explicit, id, head, tail)
            })
            .collect();
        let started = std::time::Instant::now();
        let mut reply = self.publish_once(channel, &prepared, now).await;
        if let Err(e) = &reply {
            if e.code() == Some("TIDINGS_SALT") {
                tracing::warn!("the Redis data set was reset; channels get new epochs");
                self.reload_salt().await?;
                reply = self.publish_once(channel, &prepared, now).await;
            }
        }
        let reply = reply.map_err(|e| self.seen(e))?;
        self.ok(());
        self.metrics
            .store_commit
            .observe(started.elapsed().as_secs_f64());
        let Value::Array(items) = reply else {
            return Err(EngineError::Internal(
                "unexpected answer from the publish script".into(),
            ));
        };
        let epoch = items
            .first()
            .and_then(text)
            .and_then(|e| Epoch::parse(&e).ok());
        let mut results = Vec::with_capacity(prepared.len());
        let mut fresh: Vec<SharedMessage> = Vec::new();
        for (pair, (_, id, head, tail)) in items.get(1..).unwrap_or(&[]).chunks(2).zip(&prepared) {
            let [seq, dup] = pair else { break };
            let seq = int(seq).unwrap_or(0).max(0) as Seq;
            let duplicate = int(dup) == Some(1);
            if !duplicate {
                let json = Bytes::from(format!("{head}{seq}{tail}"));
                fresh.push(Arc::new(Message::new(
                    channel.clone(),
                    seq,
                    id.clone(),
                    now,
                    json,
                )));
            }
            results.push(Published {
                seq,
                id: id.clone(),
                duplicate,
            });
        }
        if results.len() != prepared.len() {
            return Err(EngineError::Internal(
                "the publish script answered for fewer messages than sent".into(),
            ));
        }
        if let (Some(epoch), false) = (epoch, fresh.is_empty()) {
            self.sink.committed(channel, &epoch, &fresh);
        }
        Ok(results)
    }

    async fn read(
        &self,
        channel: &ChannelName,
        after: Seq,
        limit: usize,
        max_bytes: usize,
        not_before_ms: i64,
    ) -> Result<Page, EngineError> {
        let fetch = limit.clamp(1, READ_CHUNK);
        let mut conn = self.conn();
        let (salt, (epoch, last_seq), first): ReadReply = redis::pipe()
            .atomic()
            .get(self.keys.salt())
            .cmd("HMGET")
            .arg(self.keys.meta(channel))
            .arg("epoch")
            .arg("last_seq")
            .cmd("XRANGE")
            .arg(self.keys.stream(channel))
            .arg(format!("{}-0", after.saturating_add(1)))
            .arg("+")
            .arg("COUNT")
            .arg(fetch)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.seen(e))?;
        self.ok(());
        let epoch = self.epoch_or_unpublished(channel, epoch, salt).await?;
        let last_seq = last_seq.unwrap_or(0);
        let mut messages: Vec<SharedMessage> = Vec::with_capacity(limit.min(1024));
        let mut first_seq = last_seq + 1;
        let mut bytes = 0usize;
        let mut chunk = first;
        'outer: loop {
            let Value::Array(entries) = chunk else { break };
            let full = entries.len() >= fetch;
            let entries: Vec<Value> = entries;
            let mut last_seen = None;
            for raw in entries {
                let Some((seq, time, id, json)) = entry(raw) else {
                    continue;
                };
                last_seen = Some(seq);
                if seq > last_seq || time < not_before_ms {
                    continue;
                }
                if messages.is_empty() && first_seq > seq {
                    first_seq = seq;
                }
                if messages.len() >= limit {
                    break 'outer;
                }
                bytes = bytes.saturating_add(json.len());
                if !messages.is_empty() && bytes > max_bytes {
                    break 'outer;
                }
                messages.push(Arc::new(Message::new(channel.clone(), seq, id, time, json)));
            }
            // More to read only when old entries were skipped and the page is not full yet.
            let Some(seen) = last_seen else { break };
            if !full || messages.len() >= limit.max(1) || seen >= last_seq {
                break;
            }
            chunk = redis::cmd("XRANGE")
                .arg(self.keys.stream(channel))
                .arg(format!("{}-0", seen + 1))
                .arg("+")
                .arg("COUNT")
                .arg(fetch)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.seen(e))?;
        }
        Ok(Page {
            epoch,
            messages,
            last_seq,
            first_seq,
        })
    }

    async fn channel(&self, channel: &ChannelName) -> Result<ChannelMeta, EngineError> {
        self.meta(channel).await
    }

    async fn channels(&self) -> Result<Vec<ChannelMeta>, EngineError> {
        let mut conn = self.conn();
        let names: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.keys.channels())
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.seen(e))?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let Ok(channel) = ChannelName::parse(&name) else {
                continue;
            };
            out.push(self.meta(&channel).await?);
        }
        Ok(out)
    }

    async fn delete_channel(&self, channel: &ChannelName) -> Result<Epoch, EngineError> {
        let epoch = Epoch::random();
        let mut conn = self.conn();
        let _: String = self
            .delete
            .key(self.keys.meta(channel))
            .key(self.keys.stream(channel))
            .key(self.keys.channels())
            .arg(epoch.as_str())
            .arg(crate::clock::now_ms())
            .arg(self.keys.events())
            .arg(channel.as_str())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.seen(e))?;
        self.sink.reset(channel, &epoch);
        Ok(epoch)
    }

    async fn prune(
        &self,
        rules: &RetentionRules,
        _dedupe_window_ms: i64,
    ) -> Result<u64, EngineError> {
        // Dedupe keys expire by themselves (PX).
        let mut conn = self.conn();
        let names: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.keys.channels())
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.seen(e))?;
        let now = crate::clock::now_ms();
        let mut removed = 0u64;
        for name in names {
            let Ok(channel) = ChannelName::parse(&name) else {
                continue;
            };
            let retention = rules.for_channel(&channel);
            let stream = self.keys.stream(&channel);
            let trimmed: u64 = redis::cmd("XTRIM")
                .arg(&stream)
                .arg("MAXLEN")
                .arg(retention.max_messages)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.seen(e))?;
            removed += trimmed;
            let cutoff = now.saturating_sub(retention.max_age_ms());
            // Find the first entry young enough and trim everything before it.
            let mut start = "-".to_owned();
            loop {
                let chunk: Value = redis::cmd("XRANGE")
                    .arg(&stream)
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(READ_CHUNK)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.seen(e))?;
                let Value::Array(entries) = chunk else { break };
                let parsed: Vec<(Seq, i64)> = entries
                    .into_iter()
                    .filter_map(entry)
                    .map(|(seq, time, _, _)| (seq, time))
                    .collect();
                let young = parsed.iter().find(|(_, t)| *t >= cutoff).map(|(s, _)| *s);
                let old_end = match young {
                    Some(seq) => Some(seq),
                    None if parsed.len() < READ_CHUNK => parsed.last().map(|(s, _)| s + 1),
                    None => None,
                };
                if let Some(min) = old_end {
                    let n: u64 = redis::cmd("XTRIM")
                        .arg(&stream)
                        .arg("MINID")
                        .arg(format!("{min}-0"))
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| self.seen(e))?;
                    removed += n;
                    break;
                }
                match parsed.last() {
                    Some((seq, _)) => start = format!("{}-0", seq + 1),
                    None => break,
                }
            }
        }
        self.ok(());
        Ok(removed)
    }

    async fn health(&self) -> Result<(), EngineError> {
        let mut conn = self.conn();
        let pong: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
        match pong {
            Ok(_) => {
                self.health.set(true);
                Ok(())
            }
            Err(e) => Err(self.seen(e)),
        }
    }

    async fn close(&self) {
        self.stop.cancel();
        let task = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// The node's one pub/sub subscription: every commit and reset of every node, handed to the
/// sink in the order Redis published them. Reconnects by itself; after a reconnect the
/// channels the sink is waiting on are caught up from the streams.
async fn listen(
    client: redis::Client,
    events: String,
    engine: std::sync::Weak<RedisEngine>,
    sink: Arc<dyn LiveSink>,
    stop: CancellationToken,
) {
    let mut delay = Duration::from_millis(100);
    let mut first = true;
    loop {
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            c = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub()) => c,
        };
        match connected {
            Ok(Ok(mut pubsub)) => match pubsub.subscribe(&events).await {
                Ok(()) => {
                    delay = Duration::from_millis(100);
                    if !first {
                        if let Some(engine) = engine.upgrade() {
                            engine.health.set(true);
                            engine.catch_up(sink.as_ref()).await;
                        }
                    }
                    first = false;
                    let mut messages = pubsub.on_message();
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            m = messages.next() => match m {
                                Some(m) => deliver(sink.as_ref(), Bytes::copy_from_slice(m.get_payload_bytes())),
                                None => break,
                            },
                        }
                    }
                    tracing::warn!("lost the Redis pub/sub connection; reconnecting");
                }
                Err(e) => tracing::warn!(error = %e, "cannot subscribe to Redis notices"),
            },
            Ok(Err(e)) => tracing::debug!(error = %e, "Redis pub/sub connect failed"),
            Err(_) => tracing::debug!("Redis pub/sub connect timed out"),
        }
        if let Some(engine) = engine.upgrade() {
            engine.health.set(false);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Parses one notice (see the scripts) and hands it to the sink; a malformed one is ignored.
fn deliver(sink: &dyn LiveSink, payload: Bytes) {
    match payload.split_first() {
        Some((b'M', _)) => {
            if let Some((channel, epoch, messages)) = parse_commit(payload.slice(1..)) {
                sink.committed(&channel, &epoch, &messages);
            }
        }
        Some((b'R', rest)) => {
            let text = String::from_utf8_lossy(rest);
            if let Some((c, e)) = text.split_once('\t') {
                if let (Ok(c), Ok(e)) = (ChannelName::parse(c), Epoch::parse(e)) {
                    sink.reset(&c, &e);
                }
            }
        }
        _ => {}
    }
}

/// The messages' JSON are slices of the one notice buffer (no copy per message).
fn parse_commit(rest: Bytes) -> Option<(ChannelName, Epoch, Vec<SharedMessage>)> {
    let header_end = rest.iter().position(|b| *b == b'\n')?;
    let header = std::str::from_utf8(&rest[..header_end]).ok()?;
    let mut fields = header.split('\t');
    let channel = ChannelName::parse(fields.next()?).ok()?;
    let epoch = Epoch::parse(fields.next()?).ok()?;
    let time: i64 = fields.next()?.parse().ok()?;
    let count: usize = fields.next()?.parse().ok()?;
    let mut at = header_end + 1;
    let mut messages = Vec::with_capacity(count.min(4096));
    for _ in 0..count {
        let line_end = at + rest.get(at..)?.iter().position(|b| *b == b'\n')?;
        let line = std::str::from_utf8(&rest[at..line_end]).ok()?;
        let mut f = line.split('\t');
        let seq: Seq = f.next()?.parse().ok()?;
        let id_len: usize = f.next()?.parse().ok()?;
        let json_len: usize = f.next()?.parse().ok()?;
        let id_start = line_end + 1;
        let json_start = id_start.checked_add(id_len)?;
        let json_end = json_start.checked_add(json_len)?;
        let id = std::str::from_utf8(rest.get(id_start..json_start)?).ok()?;
        if json_end > rest.len() {
            return None;
        }
        let json = rest.slice(json_start..json_end);
        messages.push(Arc::new(Message::new(
            channel.clone(),
            seq,
            id.to_owned(),
            time,
            json,
        )));
        at = json_end;
    }
    Some((channel, epoch, messages))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_splits_around_the_seq() {
        let channel = ChannelName::parse("a:b").unwrap();
        let m = NewMessage {
            id: None,
            event: crate::hub::types::EventName::parse("message").unwrap(),
            data: crate::hub::types::Data::from_valid_json("{\"seq\":0}").unwrap(),
        };
        let (head, tail) = split_json(&channel, "X", &m, 0);
        let joined = format!("{head}42{tail}");
        let expected = Message::encode(&channel, 42, "X", "message", 0, "{\"seq\":0}");
        assert_eq!(joined.as_bytes(), &expected[..]);
    }

    #[test]
    fn notices_parse_and_garbage_is_ignored() {
        let json = b"{\"x\":1}";
        let mut payload = b"Ma:b\tAbCdEf12\t5\t1\n7\t2\t7\nid".to_vec();
        payload.extend_from_slice(json);
        let (c, _, messages) =
            parse_commit(Bytes::from(payload[1..].to_vec())).unwrap_or_else(|| {
                panic!("parse {:?}", String::from_utf8_lossy(&payload));
            });
        assert_eq!(c.as_str(), "a:b");
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].seq, 7);
        assert_eq!(&messages[0].json[..], json);
        for bad in [
            &b"M"[..],
            b"Ma:b\tE\t5\t2\n1\t0\t1\nx",
            b"Ma:b\tE\tx\t1\n",
            b"\xff\xfe",
        ] {
            let _ = parse_commit(Bytes::copy_from_slice(bad.get(1..).unwrap_or(&[])));
        }
    }
}
