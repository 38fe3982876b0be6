//! The `StateStore` of the Redis engine: run records, documents, feed memory, secrets, webhook
//! cursors / outboxes / attempt logs and cluster-wide leases, shared by every node of a cluster.
//! Mirrors `sqlite_state.rs` semantics exactly.
//!
//! # Key layout
//!
//! Every key starts with the configurable prefix `P` (default [`DEFAULT_PREFIX`], `tidings:`).
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P secrets` | hash | secret name → bytes (made once with `HSETNX`) |
//! | `P run:{id}` | hash | `job`, `status`, `json` of one run |
//! | `P runs:job:{job}` | sorted set | run ids, all scored 0, so the lexicographic (ULID) order gives newest first, like the SQL `ORDER BY id DESC` |
//! | `P runs:status:{status}` | set | run ids with that status (moved by the same script that changes a run's status) |
//! | `P doc:{kind}` | hash | document key → JSON |
//! | `P seen:{set}` | sorted set | key, scored by when it was last seen (ms) |
//! | `P wh:{id}:cursors` | hash | channel → `"{seq} {epoch}"` |
//! | `P wh:{id}:next` | string | the queue-key counter (`INCR`); kept by `webhook_forget` so keys are never reused, like SQLite's `AUTOINCREMENT` |
//! | `P wh:{id}:items` | hash | queue key → the item's record (below) |
//! | `P wh:{id}:queue` | sorted set | queue keys, scored by themselves: queue order |
//! | `P wh:{id}:ch:{channel}` | sorted set | the same, for one channel (`webhook_pending_channel`) |
//! | `P wh:{id}:chans` | set | channels that have a `ch:` set (so `webhook_forget` finds them) |
//! | `P wh:{id}:dedupe` | set | the identity of every queued item: unique per channel, epoch, seq and replay |
//! | `P wh:{id}:log` | list | attempt records (JSON), newest at the head, trimmed to `keep_log` |
//! | `P lease:{name}` | string | the lease holder, expiring after the lease's time (`PX`) |
//! | `P once:{name}` | string | a claimed one-time event, expiring after its time (`SET NX PX`) |
//!
//! An outbox record is `"{attempt} {next_attempt_ms} "` followed by the item's identity
//! `"{replay} {seq} {channel bytes} {epoch bytes}\n{channel}{epoch}"` and then the body. The
//! identity is self-delimiting whatever the channel and epoch hold, is what the dedupe set
//! stores, and lets the settle script find an item's channel without decoding JSON.
//!
//! Whatever changes several keys at once (a run's status, an enqueue with its cursors, a settle
//! with its log, a forget, a lease) is one Lua script, so it is atomic; the reading scripts give
//! a consistent snapshot in one round trip. The scripts build their key names from the prefix,
//! so this store needs a single Redis server (not Redis Cluster), as the engine does; Redis
//! 6.2 or later (`ZMSCORE`).
//!
//! Connection trouble is [`EngineError::Unavailable`] within seconds: each connection attempt
//! may take 2 s, each command 5 s, and a lost connection is re-made by the next call.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::state::{
    Enqueue, OutboxItem, PendingDelivery, Settle, StateStore, StoredRun, WebhookCursor,
};
use super::EngineError;

/// The key prefix used when none is configured.
pub const DEFAULT_PREFIX: &str = "tidings:";

/// How long one attempt to connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a command may wait for its answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// `put_run`: writes the run and moves its id between status sets. Like the SQL upsert, a run
/// keeps the job it was first recorded under.
/// ARGV: run key prefix (`P run:`), job-set prefix, status-set prefix, id, job, status, json.
const PUT_RUN: &str = r"
local rk = ARGV[1] .. ARGV[4]
local old = redis.call('HMGET', rk, 'job', 'status')
local job = ARGV[5]
if old[1] then job = old[1] end
if old[2] and old[2] ~= ARGV[6] then
  redis.call('SREM', ARGV[3] .. old[2], ARGV[4])
end
redis.call('HSET', rk, 'job', job, 'status', ARGV[6], 'json', ARGV[7])
redis.call('ZADD', ARGV[2] .. job, 0, ARGV[4])
redis.call('SADD', ARGV[3] .. ARGV[6], ARGV[4])
return 1
";

/// `runs_of_job`: newest first. KEYS[1]: the job's set. ARGV: run key prefix, last index.
/// Answers id, job, status, json for each run.
const RUNS_OF_JOB: &str = r"
local ids = redis.call('ZREVRANGE', KEYS[1], 0, ARGV[2])
local out = {}
for _, id in ipairs(ids) do
  local r = redis.call('HMGET', ARGV[1] .. id, 'job', 'status', 'json')
  if r[1] and r[2] and r[3] then
    out[#out + 1] = id; out[#out + 1] = r[1]; out[#out + 1] = r[2]; out[#out + 1] = r[3]
  end
end
return out
";

/// `runs_with_status`. ARGV: run key prefix, status-set prefix, then the statuses.
/// Answers one array per status of id, job, status, json for each run.
const RUNS_WITH_STATUS: &str = r"
local groups = {}
for s = 3, #ARGV do
  local ids = redis.call('SMEMBERS', ARGV[2] .. ARGV[s])
  local out = {}
  for _, id in ipairs(ids) do
    local r = redis.call('HMGET', ARGV[1] .. id, 'job', 'status', 'json')
    if r[1] and r[2] and r[3] then
      out[#out + 1] = id; out[#out + 1] = r[1]; out[#out + 1] = r[2]; out[#out + 1] = r[3]
    end
  end
  groups[#groups + 1] = out
end
return groups
";

/// `webhook_enqueue`. ARGV, per webhook: its key base (`P wh:{id}:`), the number of items,
/// the number of cursors; then channel, identity, record per item; then channel, value per
/// cursor. An item whose identity is already queued is skipped.
const ENQUEUE: &str = r"
local i = 1
while i <= #ARGV do
  local base = ARGV[i]
  local items = tonumber(ARGV[i + 1])
  local cursors = tonumber(ARGV[i + 2])
  i = i + 3
  for _ = 1, items do
    local ch, ident, rec = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    i = i + 3
    if redis.call('SADD', base .. 'dedupe', ident) == 1 then
      local key = string.format('%d', redis.call('INCR', base .. 'next'))
      redis.call('HSET', base .. 'items', key, rec)
      redis.call('ZADD', base .. 'queue', key, key)
      redis.call('ZADD', base .. 'ch:' .. ch, key, key)
      redis.call('SADD', base .. 'chans', ch)
    end
  end
  for _ = 1, cursors do
    redis.call('HSET', base .. 'cursors', ARGV[i], ARGV[i + 1])
    i = i + 2
  end
end
return 1
";

/// `webhook_pending` / `webhook_pending_channel`. KEYS: the sorted set to walk, the items
/// hash. ARGV: min, max (ZRANGEBYSCORE syntax), limit. Answers key, record pairs.
const PENDING: &str = r"
local keys = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[2], 'LIMIT', 0, ARGV[3])
local out = {}
for _, k in ipairs(keys) do
  local v = redis.call('HGET', KEYS[2], k)
  if v then
    out[#out + 1] = k; out[#out + 1] = v
  end
end
return out
";

/// `webhook_settle`. ARGV: key base, keep_log, number of settles; then kind (`D`/`R`), key,
/// attempt, next attempt per settle; then the attempt records, oldest first. Every record is
/// read and checked before anything is written, so a corrupt one changes nothing. A settle of
/// a key no longer queued does nothing (a retry never brings back what a done removed).
const SETTLE: &str = r"
local base = ARGV[1]
local items, queue = base .. 'items', base .. 'queue'
local keep = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local head = '^(%d+) (%-?%d+) (%-?%d+) (%d+) (%d+) (%d+)\n'
local todo = {}
local i = 4
for _ = 1, n do
  local kind, key, attempt, nxt = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  i = i + 4
  local v = redis.call('HGET', items, key)
  if v then
    local _, e, a, na, _, _, cl, el = string.find(v, head)
    if not e then
      return redis.error_reply('corrupt outbox record ' .. key)
    end
    cl = tonumber(cl)
    el = tonumber(el)
    local from = #a + #na + 3
    todo[#todo + 1] = {kind, key, attempt, nxt, v, from, e, cl, el}
  end
end
for _, t in ipairs(todo) do
  local kind, key, attempt, nxt, v, from, e, cl, el = unpack(t)
  if kind == 'D' then
    local ch = string.sub(v, e + 1, e + cl)
    local chkey = base .. 'ch:' .. ch
    redis.call('HDEL', items, key)
    redis.call('ZREM', queue, key)
    redis.call('ZREM', chkey, key)
    if redis.call('ZCARD', chkey) == 0 then
      redis.call('SREM', base .. 'chans', ch)
    end
    redis.call('SREM', base .. 'dedupe', string.sub(v, from, e + cl + el))
  elseif redis.call('HEXISTS', items, key) == 1 then
    redis.call('HSET', items, key, attempt .. ' ' .. nxt .. ' ' .. string.sub(v, from))
  end
end
if i <= #ARGV then
  local log = base .. 'log'
  for j = i, #ARGV do
    redis.call('LPUSH', log, ARGV[j])
  end
  if keep > 0 then
    redis.call('LTRIM', log, 0, keep - 1)
  else
    redis.call('DEL', log)
  end
end
return 1
";

/// `webhook_forget`. ARGV: key base. The key counter stays, so keys are never reused.
const FORGET: &str = r"
local base = ARGV[1]
for _, ch in ipairs(redis.call('SMEMBERS', base .. 'chans')) do
  redis.call('DEL', base .. 'ch:' .. ch)
end
redis.call('DEL', base .. 'chans', base .. 'items', base .. 'queue', base .. 'dedupe',
  base .. 'cursors', base .. 'log')
return 1
";

/// `lease`: take a free lease, or renew one `holder` holds. KEYS: the lease. ARGV: holder, ttl.
const LEASE: &str = r"
local v = redis.call('GET', KEYS[1])
if v == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// `release`: drop the lease only if `holder` holds it. KEYS: the lease. ARGV: holder.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

struct Scripts {
    put_run: Script,
    runs_of_job: Script,
    runs_with_status: Script,
    enqueue: Script,
    pending: Script,
    settle: Script,
    forget: Script,
    lease: Script,
    release: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            put_run: Script::new(PUT_RUN),
            runs_of_job: Script::new(RUNS_OF_JOB),
            runs_with_status: Script::new(RUNS_WITH_STATUS),
            enqueue: Script::new(ENQUEUE),
            pending: Script::new(PENDING),
            settle: Script::new(SETTLE),
            forget: Script::new(FORGET),
            lease: Script::new(LEASE),
            release: Script::new(RELEASE),
        }
    }
}

/// The `StateStore` on a shared Redis server; cheap to share (one multiplexed connection that
/// reconnects by itself).
pub struct RedisState {
    conn: ConnectionManager,
    prefix: String,
    scripts: Scripts,
}

impl RedisState {
    /// Connects to `url` (`redis://host:port/db`); every key is prefixed with `prefix`. An
    /// unreachable server is `Unavailable` within a few seconds; a malformed URL is `Internal`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, EngineError> {
        let client = redis::Client::open(url)
            .map_err(|e| EngineError::Internal(format!("invalid Redis URL: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| match EngineError::from(e) {
                EngineError::Unavailable(m) => {
                    EngineError::Unavailable(format!("cannot connect to Redis: {m}"))
                }
                EngineError::Internal(m) => {
                    EngineError::Internal(format!("cannot connect to Redis: {m}"))
                }
            })?;
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
            scripts: Scripts::new(),
        })
    }

    /// Checks that the server answers.
    pub async fn ping(&self) -> Result<(), EngineError> {
        let mut c = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// The start of every key of one webhook.
    fn wh_base(&self, webhook: &str) -> String {
        format!("{}wh:{webhook}:", self.prefix)
    }

    async fn pending_from(
        &self,
        zset: String,
        items: String,
        min: String,
        max: String,
        limit: usize,
    ) -> Result<Vec<PendingDelivery>, EngineError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let flat: Vec<String> = self
            .scripts
            .pending
            .key(zset)
            .key(items)
            .arg(min)
            .arg(max)
            .arg(clamp_count(limit))
            .invoke_async(&mut self.conn())
            .await?;
        let mut out = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks(2) {
            let [key, record] = pair else {
                return Err(corrupt("an odd pending answer"));
            };
            let key: i64 = key
                .parse()
                .map_err(|_| corrupt(&format!("outbox key {key:?}")))?;
            out.push(decode_record(key, record)?);
        }
        Ok(out)
    }
}

/// A count for Redis: `usize` as `i64`, saturating.
fn clamp_count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn corrupt(what: &str) -> EngineError {
    EngineError::Internal(format!("corrupt Redis state: {what}"))
}

/// The identity of an outbox item: self-delimiting, unique per channel, epoch, seq and replay.
fn item_ident(item: &OutboxItem) -> String {
    format!(
        "{} {} {} {}\n{}{}",
        item.replay,
        item.seq,
        item.channel.len(),
        item.epoch.len(),
        item.channel,
        item.epoch
    )
}

/// A fresh outbox record: no attempt yet, due now.
fn new_record(ident: &str, body: &str) -> String {
    let mut rec = String::with_capacity(4 + ident.len() + body.len());
    rec.push_str("0 0 ");
    rec.push_str(ident);
    rec.push_str(body);
    rec
}

fn decode_record(key: i64, record: &str) -> Result<PendingDelivery, EngineError> {
    let bad = || corrupt(&format!("outbox record {key}"));
    let (head, rest) = record.split_once('\n').ok_or_else(bad)?;
    let mut fields = head.split(' ');
    let mut next = || fields.next().ok_or_else(bad);
    let attempt: u32 = next()?.parse().map_err(|_| bad())?;
    let next_attempt_ms: i64 = next()?.parse().map_err(|_| bad())?;
    let replay: i64 = next()?.parse().map_err(|_| bad())?;
    let seq: u64 = next()?.parse().map_err(|_| bad())?;
    let channel_len: usize = next()?.parse().map_err(|_| bad())?;
    let epoch_len: usize = next()?.parse().map_err(|_| bad())?;
    if fields.next().is_some() {
        return Err(bad());
    }
    let epoch_end = channel_len.checked_add(epoch_len).ok_or_else(bad)?;
    let channel = rest.get(..channel_len).ok_or_else(bad)?;
    let epoch = rest.get(channel_len..epoch_end).ok_or_else(bad)?;
    let body = rest.get(epoch_end..).ok_or_else(bad)?;
    Ok(PendingDelivery {
        key,
        item: OutboxItem {
            channel: channel.to_owned(),
            epoch: epoch.to_owned(),
            seq,
            body: body.to_owned(),
            replay,
        },
        attempt,
        next_attempt_ms,
    })
}

fn cursor_value(cursor: &WebhookCursor) -> String {
    format!("{} {}", cursor.seq, cursor.epoch)
}

fn decode_cursor(channel: String, value: &str) -> Result<WebhookCursor, EngineError> {
    let bad = || corrupt(&format!("webhook cursor of {channel:?}"));
    let (seq, epoch) = value.split_once(' ').ok_or_else(bad)?;
    let seq = seq.parse().map_err(|_| bad())?;
    Ok(WebhookCursor {
        epoch: epoch.to_owned(),
        seq,
        channel,
    })
}

/// Runs from a flat id, job, status, json answer.
fn decode_runs(flat: Vec<String>) -> Result<Vec<StoredRun>, EngineError> {
    if flat.len() % 4 != 0 {
        return Err(corrupt("a run answer of the wrong length"));
    }
    let mut out = Vec::with_capacity(flat.len() / 4);
    let mut it = flat.into_iter();
    while let (Some(id), Some(job), Some(status), Some(json)) =
        (it.next(), it.next(), it.next(), it.next())
    {
        out.push(StoredRun {
            id,
            job,
            status,
            json,
        });
    }
    Ok(out)
}

#[async_trait]
impl StateStore for RedisState {
    async fn secret(&self, name: &str) -> Result<Vec<u8>, EngineError> {
        let key = self.key("secrets");
        let fresh: [u8; 32] = rand::random();
        let (value,): (Option<Vec<u8>>,) = redis::pipe()
            .atomic()
            .cmd("HSETNX")
            .arg(&key)
            .arg(name)
            .arg(&fresh[..])
            .ignore()
            .cmd("HGET")
            .arg(&key)
            .arg(name)
            .query_async(&mut self.conn())
            .await?;
        value.ok_or_else(|| corrupt(&format!("secret {name:?} vanished")))
    }

    async fn put_run(&self, run: StoredRun) -> Result<(), EngineError> {
        let _: i64 = self
            .scripts
            .put_run
            .arg(self.key("run:"))
            .arg(self.key("runs:job:"))
            .arg(self.key("runs:status:"))
            .arg(&run.id)
            .arg(&run.job)
            .arg(&run.status)
            .arg(&run.json)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn run(&self, id: &str) -> Result<Option<StoredRun>, EngineError> {
        let (job, status, json): (Option<String>, Option<String>, Option<String>) =
            redis::cmd("HMGET")
                .arg(self.key(&format!("run:{id}")))
                .arg("job")
                .arg("status")
                .arg("json")
                .query_async(&mut self.conn())
                .await?;
        Ok(match (job, status, json) {
            (Some(job), Some(status), Some(json)) => Some(StoredRun {
                id: id.to_owned(),
                job,
                status,
                json,
            }),
            _ => None,
        })
    }

    async fn runs_of_job(&self, job: &str, limit: usize) -> Result<Vec<StoredRun>, EngineError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let flat: Vec<String> = self
            .scripts
            .runs_of_job
            .key(self.key(&format!("runs:job:{job}")))
            .arg(self.key("run:"))
            .arg(clamp_count(limit) - 1)
            .invoke_async(&mut self.conn())
            .await?;
        decode_runs(flat)
    }

    async fn runs_with_status(&self, statuses: &[&str]) -> Result<Vec<StoredRun>, EngineError> {
        if statuses.is_empty() {
            return Ok(Vec::new());
        }
        let mut call = self.scripts.runs_with_status.prepare_invoke();
        call.arg(self.key("run:")).arg(self.key("runs:status:"));
        for status in statuses {
            call.arg(*status);
        }
        let groups: Vec<Vec<String>> = call.invoke_async(&mut self.conn()).await?;
        let mut out = Vec::new();
        for group in groups {
            let mut runs = decode_runs(group)?;
            runs.sort_by(|a, b| a.id.cmp(&b.id));
            out.extend(runs);
        }
        Ok(out)
    }

    async fn put_doc(&self, kind: &str, key: &str, json: String) -> Result<(), EngineError> {
        let _: i64 = redis::cmd("HSET")
            .arg(self.key(&format!("doc:{kind}")))
            .arg(key)
            .arg(json)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn doc(&self, kind: &str, key: &str) -> Result<Option<String>, EngineError> {
        Ok(redis::cmd("HGET")
            .arg(self.key(&format!("doc:{kind}")))
            .arg(key)
            .query_async(&mut self.conn())
            .await?)
    }

    async fn docs(&self, kind: &str) -> Result<Vec<(String, String)>, EngineError> {
        let mut all: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(self.key(&format!("doc:{kind}")))
            .query_async(&mut self.conn())
            .await?;
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }

    async fn delete_doc(&self, kind: &str, key: &str) -> Result<bool, EngineError> {
        let n: i64 = redis::cmd("HDEL")
            .arg(self.key(&format!("doc:{kind}")))
            .arg(key)
            .query_async(&mut self.conn())
            .await?;
        Ok(n > 0)
    }

    async fn unseen(
        &self,
        set: &str,
        keys: Vec<String>,
        not_before_ms: i64,
    ) -> Result<Vec<bool>, EngineError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let scores: Vec<Option<f64>> = redis::cmd("ZMSCORE")
            .arg(self.key(&format!("seen:{set}")))
            .arg(&keys)
            .query_async(&mut self.conn())
            .await?;
        if scores.len() != keys.len() {
            return Err(corrupt("a ZMSCORE answer of the wrong length"));
        }
        let not_before = not_before_ms as f64;
        Ok(scores
            .into_iter()
            .map(|s| !s.is_some_and(|last_seen| last_seen >= not_before))
            .collect())
    }

    async fn mark_seen(
        &self,
        set: &str,
        keys: Vec<String>,
        now_ms: i64,
        forget_before_ms: i64,
    ) -> Result<(), EngineError> {
        let zset = self.key(&format!("seen:{set}"));
        let mut pipe = redis::pipe();
        pipe.atomic();
        if !keys.is_empty() {
            let add = pipe.cmd("ZADD").arg(&zset);
            for k in &keys {
                add.arg(now_ms).arg(k);
            }
            add.ignore();
        }
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&zset)
            .arg("-inf")
            .arg(format!("({forget_before_ms}"))
            .ignore();
        pipe.exec_async(&mut self.conn()).await?;
        Ok(())
    }

    async fn seen_count(&self, set: &str) -> Result<u64, EngineError> {
        let n: u64 = redis::cmd("ZCARD")
            .arg(self.key(&format!("seen:{set}")))
            .query_async(&mut self.conn())
            .await?;
        Ok(n)
    }

    async fn forget_set(&self, set: &str) -> Result<(), EngineError> {
        let _: i64 = redis::cmd("DEL")
            .arg(self.key(&format!("seen:{set}")))
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn webhook_cursors(&self, webhook: &str) -> Result<Vec<WebhookCursor>, EngineError> {
        let all: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(format!("{}cursors", self.wh_base(webhook)))
            .query_async(&mut self.conn())
            .await?;
        let mut out = all
            .into_iter()
            .map(|(channel, value)| decode_cursor(channel, &value))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by(|a, b| a.channel.cmp(&b.channel));
        Ok(out)
    }

    async fn webhook_enqueue(&self, batch: Vec<Enqueue>) -> Result<(), EngineError> {
        let mut call = self.scripts.enqueue.prepare_invoke();
        let mut any = false;
        for e in &batch {
            if e.items.is_empty() && e.cursors.is_empty() {
                continue;
            }
            any = true;
            call.arg(self.wh_base(&e.webhook))
                .arg(e.items.len())
                .arg(e.cursors.len());
            for item in &e.items {
                let ident = item_ident(item);
                let record = new_record(&ident, &item.body);
                call.arg(&item.channel).arg(ident).arg(record);
            }
            for to in &e.cursors {
                call.arg(&to.channel).arg(cursor_value(to));
            }
        }
        if !any {
            return Ok(());
        }
        let _: i64 = call.invoke_async(&mut self.conn()).await?;
        Ok(())
    }

    async fn webhook_pending(
        &self,
        webhook: &str,
        after_key: i64,
        limit: usize,
    ) -> Result<Vec<PendingDelivery>, EngineError> {
        let base = self.wh_base(webhook);
        self.pending_from(
            format!("{base}queue"),
            format!("{base}items"),
            format!("({after_key}"),
            "+inf".to_owned(),
            limit,
        )
        .await
    }

    async fn webhook_pending_channel(
        &self,
        webhook: &str,
        channel: &str,
        after_key: i64,
        upto_key: i64,
        limit: usize,
    ) -> Result<Vec<PendingDelivery>, EngineError> {
        if upto_key <= after_key {
            return Ok(Vec::new());
        }
        let base = self.wh_base(webhook);
        self.pending_from(
            format!("{base}ch:{channel}"),
            format!("{base}items"),
            format!("({after_key}"),
            upto_key.to_string(),
            limit,
        )
        .await
    }

    async fn webhook_pending_count(&self, webhook: &str) -> Result<u64, EngineError> {
        let n: u64 = redis::cmd("HLEN")
            .arg(format!("{}items", self.wh_base(webhook)))
            .query_async(&mut self.conn())
            .await?;
        Ok(n)
    }

    async fn webhook_settle(
        &self,
        webhook: &str,
        settles: Vec<Settle>,
        log: Vec<String>,
        keep_log: usize,
    ) -> Result<(), EngineError> {
        if settles.is_empty() && log.is_empty() {
            return Ok(());
        }
        let mut call = self.scripts.settle.prepare_invoke();
        // Lua counts in doubles: keep the number exact.
        let keep = clamp_count(keep_log).min(1 << 40);
        call.arg(self.wh_base(webhook)).arg(keep).arg(settles.len());
        for s in &settles {
            match s {
                Settle::Done { key } => call.arg("D").arg(*key).arg(0).arg(0),
                Settle::Retry {
                    key,
                    attempt,
                    next_attempt_ms,
                } => call.arg("R").arg(*key).arg(*attempt).arg(*next_attempt_ms),
            };
        }
        for json in &log {
            call.arg(json);
        }
        let _: i64 = call.invoke_async(&mut self.conn()).await?;
        Ok(())
    }

    async fn webhook_log(&self, webhook: &str, limit: usize) -> Result<Vec<String>, EngineError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        Ok(redis::cmd("LRANGE")
            .arg(format!("{}log", self.wh_base(webhook)))
            .arg(0)
            .arg(clamp_count(limit) - 1)
            .query_async(&mut self.conn())
            .await?)
    }

    async fn webhook_forget(&self, webhook: &str) -> Result<(), EngineError> {
        let _: i64 = self
            .scripts
            .forget
            .arg(self.wh_base(webhook))
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool, EngineError> {
        let held: i64 = self
            .scripts
            .lease
            .key(self.key(&format!("lease:{name}")))
            .arg(holder)
            .arg(ttl_ms.max(1))
            .invoke_async(&mut self.conn())
            .await?;
        Ok(held == 1)
    }

    async fn release(&self, name: &str, holder: &str) -> Result<(), EngineError> {
        let _: i64 = self
            .scripts
            .release
            .key(self.key(&format!("lease:{name}")))
            .arg(holder)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn claim_once(&self, name: &str, ttl_ms: i64) -> Result<bool, EngineError> {
        let claimed: bool = redis::cmd("SET")
            .arg(self.key(&format!("once:{name}")))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms.max(1))
            .query_async(&mut self.conn())
            .await?;
        Ok(claimed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::engine::redis_testing::{free_port, RedisServer};

    /// A safety net for what the tests wait on; they pass long before it.
    const WAIT: Duration = Duration::from_secs(10);

    async fn store(server: &RedisServer) -> RedisState {
        RedisState::connect(&server.url(), "t:").await.unwrap()
    }

    async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
        redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    async fn redis_keys(server: &RedisServer, pattern: &str) -> Vec<String> {
        let mut all: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut raw(server).await)
            .await
            .unwrap();
        all.sort();
        all
    }

    fn run(id: &str, job: &str, status: &str) -> StoredRun {
        StoredRun {
            id: id.into(),
            job: job.into(),
            status: status.into(),
            json: format!("{{\"id\":\"{id}\",\"status\":\"{status}\"}}"),
        }
    }

    fn item(channel: &str, seq: u64) -> OutboxItem {
        OutboxItem {
            channel: channel.into(),
            epoch: "EPOCH0001".into(),
            seq,
            body: format!("{{\"channel\":\"{channel}\",\"seq\":{seq}}}"),
            replay: 0,
        }
    }

    fn cursor(channel: &str, seq: u64) -> WebhookCursor {
        WebhookCursor {
            channel: channel.into(),
            epoch: "EPOCH0001".into(),
            seq,
        }
    }

    fn enqueue(webhook: &str, items: Vec<OutboxItem>, cursors: Vec<WebhookCursor>) -> Enqueue {
        Enqueue {
            webhook: webhook.into(),
            items,
            cursors,
        }
    }

    /// (channel, seq, replay) of each delivery, in the order given.
    fn ids(pending: &[PendingDelivery]) -> Vec<(String, u64, i64)> {
        pending
            .iter()
            .map(|p| (p.item.channel.clone(), p.item.seq, p.item.replay))
            .collect()
    }

    fn id(channel: &str, seq: u64) -> (String, u64, i64) {
        (channel.to_owned(), seq, 0)
    }

    async fn pttl(server: &RedisServer, key: &str) -> i64 {
        redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut raw(server).await)
            .await
            .unwrap()
    }

    /// Polls `check` until it is true, failing after `WAIT`.
    async fn eventually<F, Fut>(what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + WAIT;
        while !check().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn records_round_trip_whatever_the_channel_and_epoch_hold() {
        let odd = OutboxItem {
            channel: "a b\n7 8 9\nc".into(),
            epoch: "é p\n".into(),
            seq: u64::MAX,
            body: "{\"x\":\"line\\none\"}\nraw newline".into(),
            replay: -3,
        };
        let ident = item_ident(&odd);
        let got = decode_record(7, &new_record(&ident, &odd.body)).unwrap();
        assert_eq!(got.key, 7);
        assert_eq!(got.item.channel, odd.channel);
        assert_eq!(got.item.epoch, odd.epoch);
        assert_eq!(got.item.seq, odd.seq);
        assert_eq!(got.item.body, odd.body);
        assert_eq!(got.item.replay, odd.replay);
        assert_eq!((got.attempt, got.next_attempt_ms), (0, 0));
        let retried = format!("4 -17 {ident}{}", odd.body);
        let got = decode_record(7, &retried).unwrap();
        assert_eq!((got.attempt, got.next_attempt_ms), (4, -17));
        for bad in [
            "",
            "0 0 0 1 2 3",
            "0 0 0 1 99 0\nshort",
            "x 0 0 1 0 0\n",
            "0 0 0 1 0 0 0\n",
        ] {
            assert!(
                matches!(decode_record(1, bad), Err(EngineError::Internal(_))),
                "{bad:?}"
            );
        }
        assert!(decode_cursor("c".into(), "12 EP OCH")
            .is_ok_and(|c| c.seq == 12 && c.epoch == "EP OCH" && c.channel == "c"));
        assert!(decode_cursor("c".into(), "nope").is_err());
    }

    #[tokio::test]
    async fn secrets_are_made_once_and_shared_by_every_node() {
        let server = RedisServer::start();
        let a = store(&server).await;
        let b = store(&server).await;
        let secret = a.secret("run_tokens").await.unwrap();
        assert_eq!(secret.len(), 32);
        assert_eq!(a.secret("run_tokens").await.unwrap(), secret);
        assert_eq!(b.secret("run_tokens").await.unwrap(), secret);
        assert_ne!(b.secret("other").await.unwrap(), secret);
        // Two nodes racing for a new secret agree on one.
        let (x, y) = tokio::join!(a.secret("raced"), b.secret("raced"));
        assert_eq!(x.unwrap(), y.unwrap());
        a.ping().await.unwrap();
    }

    #[tokio::test]
    async fn runs_newest_first_and_by_status() {
        let server = RedisServer::start();
        let s = store(&server).await;
        assert!(s.run("01A").await.unwrap().is_none());
        for (id, status) in [("01B", "running"), ("01A", "succeeded"), ("01C", "queued")] {
            s.put_run(run(id, "build", status)).await.unwrap();
        }
        s.put_run(run("01D", "deploy", "running")).await.unwrap();
        let of = |runs: Vec<StoredRun>| runs.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(
            of(s.runs_of_job("build", 10).await.unwrap()),
            ["01C", "01B", "01A"]
        );
        assert_eq!(of(s.runs_of_job("build", 2).await.unwrap()), ["01C", "01B"]);
        assert!(s.runs_of_job("build", 0).await.unwrap().is_empty());
        assert_eq!(
            of(s.runs_of_job("deploy", usize::MAX).await.unwrap()),
            ["01D"]
        );
        assert!(s.runs_of_job("nothing", 10).await.unwrap().is_empty());
        assert_eq!(
            of(s.runs_with_status(&["running"]).await.unwrap()),
            ["01B", "01D"]
        );
        assert_eq!(
            of(s.runs_with_status(&["queued", "running"]).await.unwrap()),
            ["01C", "01B", "01D"]
        );
        assert!(s.runs_with_status(&[]).await.unwrap().is_empty());

        // A status change moves the run between the status sets; like the SQL upsert, the run
        // keeps the job it was first recorded under.
        let mut done = run("01B", "elsewhere", "succeeded");
        done.json = "{\"final\":true}".into();
        s.put_run(done).await.unwrap();
        let got = s.run("01B").await.unwrap().unwrap();
        assert_eq!(
            (got.job.as_str(), got.status.as_str(), got.json.as_str()),
            ("build", "succeeded", "{\"final\":true}")
        );
        assert_eq!(of(s.runs_with_status(&["running"]).await.unwrap()), ["01D"]);
        assert_eq!(
            of(s.runs_with_status(&["succeeded"]).await.unwrap()),
            ["01A", "01B"]
        );
        assert!(s.runs_of_job("elsewhere", 10).await.unwrap().is_empty());
        let build = s.runs_of_job("build", 10).await.unwrap();
        assert_eq!(build[1].status, "succeeded");
        assert_eq!(build[1].json, "{\"final\":true}");
        // The same status again changes only the JSON.
        s.put_run(run("01D", "deploy", "running")).await.unwrap();
        assert_eq!(of(s.runs_with_status(&["running"]).await.unwrap()), ["01D"]);
    }

    #[tokio::test]
    async fn documents_by_kind_and_key() {
        let server = RedisServer::start();
        let s = store(&server).await;
        assert!(s.doc("feed", "so").await.unwrap().is_none());
        s.put_doc("feed", "so", "{\"v\":1}".into()).await.unwrap();
        s.put_doc("feed", "hn", "{}".into()).await.unwrap();
        s.put_doc("feed", "so", "{\"v\":2}".into()).await.unwrap();
        s.put_doc("feed_state", "so", "[]".into()).await.unwrap();
        assert_eq!(
            s.doc("feed", "so").await.unwrap().as_deref(),
            Some("{\"v\":2}")
        );
        assert_eq!(
            s.docs("feed").await.unwrap(),
            [
                ("hn".to_owned(), "{}".to_owned()),
                ("so".to_owned(), "{\"v\":2}".to_owned())
            ]
        );
        assert!(s.delete_doc("feed", "so").await.unwrap());
        assert!(!s.delete_doc("feed", "so").await.unwrap());
        assert_eq!(s.docs("feed").await.unwrap().len(), 1);
        assert_eq!(s.docs("feed_state").await.unwrap().len(), 1);
        assert!(s.docs("none").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn seen_keys_have_a_window_and_are_forgotten() {
        let server = RedisServer::start();
        let s = store(&server).await;
        assert!(s.unseen("feed:so", vec![], 0).await.unwrap().is_empty());
        s.mark_seen("feed:so", vec!["a".into(), "b".into()], 1_000, 0)
            .await
            .unwrap();
        assert_eq!(
            s.unseen("feed:so", vec!["a".into(), "c".into(), "b".into()], 0)
                .await
                .unwrap(),
            [false, true, false]
        );
        // Seen exactly at the window's start counts as seen; before it, as unseen.
        assert_eq!(
            s.unseen("feed:so", vec!["a".into()], 1_000).await.unwrap(),
            [false]
        );
        assert_eq!(
            s.unseen("feed:so", vec!["a".into()], 1_001).await.unwrap(),
            [true]
        );
        assert_eq!(
            s.unseen("feed:other", vec!["a".into()], 0).await.unwrap(),
            [true]
        );
        // Marking refreshes a key's time, and forgets keys last seen before the cut-off.
        s.mark_seen("feed:so", vec!["b".into()], 3_000, 0)
            .await
            .unwrap();
        s.mark_seen("feed:so", vec!["c".into()], 5_000, 2_000)
            .await
            .unwrap();
        assert_eq!(s.seen_count("feed:so").await.unwrap(), 2);
        assert_eq!(
            s.unseen("feed:so", vec!["a".into(), "b".into(), "c".into()], 0)
                .await
                .unwrap(),
            [true, false, false]
        );
        // A cut-off that equals a key's time keeps it; nothing to mark still forgets.
        s.mark_seen("feed:so", vec![], 6_000, 3_000).await.unwrap();
        assert_eq!(s.seen_count("feed:so").await.unwrap(), 2);
        s.mark_seen("feed:so", vec![], 6_000, 3_001).await.unwrap();
        assert_eq!(s.seen_count("feed:so").await.unwrap(), 1);
        s.forget_set("feed:so").await.unwrap();
        assert_eq!(s.seen_count("feed:so").await.unwrap(), 0);
        assert_eq!(s.seen_count("never").await.unwrap(), 0);
    }

    #[tokio::test]
    async fn every_key_carries_the_prefix_and_prefixes_do_not_meet() {
        let server = RedisServer::start();
        let a = RedisState::connect(&server.url(), "one:").await.unwrap();
        let b = RedisState::connect(&server.url(), DEFAULT_PREFIX)
            .await
            .unwrap();
        for s in [&a, &b] {
            s.secret("k").await.unwrap();
            s.put_run(run("01A", "build", "running")).await.unwrap();
            s.put_doc("feed", "so", "{}".into()).await.unwrap();
            s.mark_seen("set", vec!["x".into()], 1, 0).await.unwrap();
            s.webhook_enqueue(vec![enqueue(
                "wh_1",
                vec![item("c", 1)],
                vec![cursor("c", 1)],
            )])
            .await
            .unwrap();
            s.webhook_settle("wh_1", vec![], vec!["{}".into()], 10)
                .await
                .unwrap();
            assert!(s.lease("l", "node", 10_000).await.unwrap());
            assert!(s.claim_once("tick", 10_000).await.unwrap());
        }
        a.put_doc("feed", "only-a", "{}".into()).await.unwrap();
        assert_eq!(a.docs("feed").await.unwrap().len(), 2);
        assert_eq!(b.docs("feed").await.unwrap().len(), 1);
        let all = redis_keys(&server, "*").await;
        assert!(
            all.iter()
                .all(|k| k.starts_with("one:") || k.starts_with("tidings:")),
            "{all:?}"
        );
        assert_eq!(
            redis_keys(&server, "tidings:*").await,
            [
                "tidings:doc:feed",
                "tidings:lease:l",
                "tidings:once:tick",
                "tidings:run:01A",
                "tidings:runs:job:build",
                "tidings:runs:status:running",
                "tidings:secrets",
                "tidings:seen:set",
                "tidings:wh:wh_1:ch:c",
                "tidings:wh:wh_1:chans",
                "tidings:wh:wh_1:cursors",
                "tidings:wh:wh_1:dedupe",
                "tidings:wh:wh_1:items",
                "tidings:wh:wh_1:log",
                "tidings:wh:wh_1:next",
                "tidings:wh:wh_1:queue",
            ]
        );
    }

    #[tokio::test]
    async fn enqueue_is_idempotent_and_moves_cursors_with_the_items() {
        let server = RedisServer::start();
        let s = store(&server).await;
        assert!(s.webhook_cursors("wh_1").await.unwrap().is_empty());
        s.webhook_enqueue(vec![]).await.unwrap();
        s.webhook_enqueue(vec![
            enqueue(
                "wh_1",
                vec![item("a", 1), item("b", 1), item("a", 2)],
                vec![cursor("a", 2), cursor("b", 1)],
            ),
            enqueue("wh_2", vec![item("a", 1)], vec![cursor("a", 1)]),
        ])
        .await
        .unwrap();
        let first = s.webhook_pending("wh_1", 0, 100).await.unwrap();
        assert_eq!(ids(&first), [id("a", 1), id("b", 1), id("a", 2)]);
        assert!(first.windows(2).all(|w| w[0].key < w[1].key));
        assert!(first
            .iter()
            .all(|p| p.attempt == 0 && p.next_attempt_ms == 0 && p.item.epoch == "EPOCH0001"));
        assert_eq!(first[0].item.body, "{\"channel\":\"a\",\"seq\":1}");
        assert_eq!(s.webhook_pending_count("wh_2").await.unwrap(), 1);

        // The same items again (a catch-up overlapping a notice) are skipped; new ones queue
        // behind, and the cursors move even when every item was already queued.
        s.webhook_enqueue(vec![enqueue(
            "wh_1",
            vec![item("a", 2), item("a", 1), item("a", 3), item("a", 3)],
            vec![cursor("a", 3)],
        )])
        .await
        .unwrap();
        s.webhook_enqueue(vec![enqueue(
            "wh_1",
            vec![item("b", 1)],
            vec![WebhookCursor {
                channel: "b".into(),
                epoch: "EPOCH0002".into(),
                seq: 7,
            }],
        )])
        .await
        .unwrap();
        let all = s.webhook_pending("wh_1", 0, 100).await.unwrap();
        assert_eq!(ids(&all), [id("a", 1), id("b", 1), id("a", 2), id("a", 3)]);
        assert!(all.windows(2).all(|w| w[0].key < w[1].key));
        assert_eq!(
            s.webhook_cursors("wh_1").await.unwrap(),
            [
                cursor("a", 3),
                WebhookCursor {
                    channel: "b".into(),
                    epoch: "EPOCH0002".into(),
                    seq: 7
                }
            ]
        );
        assert_eq!(s.webhook_cursors("wh_2").await.unwrap(), [cursor("a", 1)]);

        // A replay generation queues a message again, behind what is pending; another epoch
        // is another message.
        let mut replayed = item("a", 1);
        replayed.replay = 1;
        let mut other_epoch = item("a", 1);
        other_epoch.epoch = "EPOCH0002".into();
        s.webhook_enqueue(vec![enqueue(
            "wh_1",
            vec![replayed.clone(), replayed, other_epoch],
            vec![],
        )])
        .await
        .unwrap();
        let all = s.webhook_pending("wh_1", 0, 100).await.unwrap();
        assert_eq!(all.len(), 6);
        assert_eq!(ids(&all[4..5]), [("a".to_owned(), 1, 1)]);
        assert_eq!(all[5].item.epoch, "EPOCH0002");

        // Once delivered (off the queue), the same message may be queued again, with a new key.
        let last_key = all[5].key;
        s.webhook_settle("wh_1", vec![Settle::Done { key: all[0].key }], vec![], 10)
            .await
            .unwrap();
        s.webhook_enqueue(vec![enqueue("wh_1", vec![item("a", 1)], vec![])])
            .await
            .unwrap();
        let all = s.webhook_pending("wh_1", 0, 100).await.unwrap();
        assert_eq!(all.len(), 6);
        assert_eq!(ids(&all[5..]), [id("a", 1)]);
        assert!(all[5].key > last_key);
    }

    #[tokio::test]
    async fn nodes_enqueueing_the_same_items_at_once_queue_each_once() {
        let server = RedisServer::start();
        let a = store(&server).await;
        let b = store(&server).await;
        let items: Vec<OutboxItem> = (1..=200).map(|seq| item("c", seq)).collect();
        let batch = |from: usize| {
            items[from..]
                .chunks(10)
                .map(|chunk| enqueue("wh_1", chunk.to_vec(), vec![]))
                .collect::<Vec<_>>()
        };
        tokio::join!(
            async {
                for e in batch(0) {
                    a.webhook_enqueue(vec![e]).await.unwrap();
                }
            },
            async {
                for e in batch(50) {
                    b.webhook_enqueue(vec![e]).await.unwrap();
                }
            }
        );
        let all = a.webhook_pending("wh_1", 0, 1_000).await.unwrap();
        assert_eq!(all.len(), 200);
        let mut seqs: Vec<u64> = all.iter().map(|p| p.item.seq).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
        assert!(all.windows(2).all(|w| w[0].key < w[1].key));
    }

    #[tokio::test]
    async fn pending_pages_by_key_and_per_channel_within_bounds() {
        let server = RedisServer::start();
        let s = store(&server).await;
        assert!(s.webhook_pending("wh_1", 0, 10).await.unwrap().is_empty());
        let mut items = Vec::new();
        for seq in 1..=5 {
            items.push(item("a", seq));
            items.push(item("b", seq));
        }
        s.webhook_enqueue(vec![enqueue("wh_1", items, vec![])])
            .await
            .unwrap();
        let all = s.webhook_pending("wh_1", 0, 100).await.unwrap();
        let keys: Vec<i64> = all.iter().map(|p| p.key).collect();
        assert_eq!(keys.len(), 10);

        // Pages: keys above `after_key`, at most `limit`.
        let page = s.webhook_pending("wh_1", 0, 3).await.unwrap();
        assert_eq!(ids(&page), [id("a", 1), id("b", 1), id("a", 2)]);
        let page = s.webhook_pending("wh_1", keys[2], 3).await.unwrap();
        assert_eq!(ids(&page), [id("b", 2), id("a", 3), id("b", 3)]);
        assert!(s
            .webhook_pending("wh_1", keys[9], 3)
            .await
            .unwrap()
            .is_empty());
        assert!(s.webhook_pending("wh_1", 0, 0).await.unwrap().is_empty());
        assert_eq!(
            s.webhook_pending("wh_1", i64::MIN, usize::MAX)
                .await
                .unwrap()
                .len(),
            10
        );

        // One channel: keys in (after_key, upto_key], in queue order.
        let a = s
            .webhook_pending_channel("wh_1", "a", 0, i64::MAX, 100)
            .await
            .unwrap();
        assert_eq!(ids(&a), (1..=5).map(|seq| id("a", seq)).collect::<Vec<_>>());
        // keys[2] is a:2 (excluded as after_key), keys[6] is a:4 (included as upto_key).
        let a = s
            .webhook_pending_channel("wh_1", "a", keys[2], keys[6], 100)
            .await
            .unwrap();
        assert_eq!(ids(&a), [id("a", 3), id("a", 4)]);
        // An upto_key between two of the channel's keys, and a limit.
        let a = s
            .webhook_pending_channel("wh_1", "a", keys[0], keys[5], 100)
            .await
            .unwrap();
        assert_eq!(ids(&a), [id("a", 2), id("a", 3)]);
        let a = s
            .webhook_pending_channel("wh_1", "a", 0, i64::MAX, 2)
            .await
            .unwrap();
        assert_eq!(ids(&a), [id("a", 1), id("a", 2)]);
        assert!(s
            .webhook_pending_channel("wh_1", "a", keys[6], keys[6], 100)
            .await
            .unwrap()
            .is_empty());
        assert!(s
            .webhook_pending_channel("wh_1", "a", keys[6], keys[2], 100)
            .await
            .unwrap()
            .is_empty());
        assert!(s
            .webhook_pending_channel("wh_1", "a", 0, i64::MAX, 0)
            .await
            .unwrap()
            .is_empty());
        assert!(s
            .webhook_pending_channel("wh_1", "zzz", 0, i64::MAX, 100)
            .await
            .unwrap()
            .is_empty());
        assert!(s
            .webhook_pending_channel("wh_2", "a", 0, i64::MAX, 100)
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn settle_removes_done_items_and_reschedules_retries() {
        let server = RedisServer::start();
        let s = store(&server).await;
        // Channel names and epochs are opaque to the store, odd characters included.
        let mut odd = item("x y\nz", 1);
        odd.epoch = "E P\n".into();
        s.webhook_enqueue(vec![enqueue(
            "wh_1",
            vec![item("a", 1), item("a", 2), item("b", 1), odd.clone()],
            vec![],
        )])
        .await
        .unwrap();
        let all = s.webhook_pending("wh_1", 0, 100).await.unwrap();
        let keys: Vec<i64> = all.iter().map(|p| p.key).collect();
        assert_eq!(all[3].item.channel, odd.channel);
        assert_eq!(all[3].item.epoch, odd.epoch);

        s.webhook_settle(
            "wh_1",
            vec![
                Settle::Done { key: keys[0] },
                Settle::Retry {
                    key: keys[1],
                    attempt: 3,
                    next_attempt_ms: 1_700_000_000_123,
                },
                Settle::Done { key: keys[3] },
                // Unknown keys change nothing.
                Settle::Done { key: 999_999 },
                Settle::Retry {
                    key: 999_998,
                    attempt: 1,
                    next_attempt_ms: 1,
                },
            ],
            vec!["{\"n\":1}".into(), "{\"n\":2}".into()],
            1_000,
        )
        .await
        .unwrap();
        let all = s.webhook_pending("wh_1", 0, 100).await.unwrap();
        assert_eq!(ids(&all), [id("a", 2), id("b", 1)]);
        assert_eq!(
            (all[0].key, all[0].attempt, all[0].next_attempt_ms),
            (keys[1], 3, 1_700_000_000_123)
        );
        assert_eq!(all[0].item.body, "{\"channel\":\"a\",\"seq\":2}");
        assert_eq!((all[1].attempt, all[1].next_attempt_ms), (0, 0));
        assert_eq!(s.webhook_pending_count("wh_1").await.unwrap(), 2);
        let a = s
            .webhook_pending_channel("wh_1", "a", 0, i64::MAX, 10)
            .await
            .unwrap();
        assert_eq!(ids(&a), [id("a", 2)]);
        assert_eq!(a[0].attempt, 3);
        assert!(s
            .webhook_pending_channel("wh_1", &odd.channel, 0, i64::MAX, 10)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(
            s.webhook_log("wh_1", 10).await.unwrap(),
            ["{\"n\":2}", "{\"n\":1}"]
        );
        // The emptied channel's set is gone, and so is the done items' identity.
        let mut conn = raw(&server).await;
        let chans: Vec<String> = redis::cmd("SMEMBERS")
            .arg("t:wh:wh_1:chans")
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut chans = chans;
        chans.sort();
        assert_eq!(chans, ["a", "b"]);
        let dedupe: u64 = redis::cmd("SCARD")
            .arg("t:wh:wh_1:dedupe")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(dedupe, 2);

        // A retry and a done of the same key in one batch: the later one wins, and a retry
        // after a done does not bring the item back.
        s.webhook_settle(
            "wh_1",
            vec![
                Settle::Retry {
                    key: keys[2],
                    attempt: 1,
                    next_attempt_ms: 5,
                },
                Settle::Done { key: keys[2] },
                Settle::Done { key: keys[1] },
                Settle::Retry {
                    key: keys[1],
                    attempt: 9,
                    next_attempt_ms: 9,
                },
            ],
            vec![],
            1_000,
        )
        .await
        .unwrap();
        assert!(s.webhook_pending("wh_1", 0, 100).await.unwrap().is_empty());
        assert_eq!(s.webhook_pending_count("wh_1").await.unwrap(), 0);
        // Nothing is left of the queue: only the log and the key counter.
        assert_eq!(
            redis_keys(&server, "t:wh:wh_1:*").await,
            ["t:wh:wh_1:log", "t:wh:wh_1:next"]
        );
    }

    #[tokio::test]
    async fn settle_is_all_or_nothing() {
        let server = RedisServer::start();
        let s = store(&server).await;
        s.webhook_enqueue(vec![enqueue(
            "wh_1",
            vec![item("a", 1), item("a", 2)],
            vec![],
        )])
        .await
        .unwrap();
        let all = s.webhook_pending("wh_1", 0, 100).await.unwrap();
        // A record that cannot be read, met after a good settle in the same batch.
        let _: i64 = redis::cmd("HSET")
            .arg("t:wh:wh_1:items")
            .arg(424_242)
            .arg("garbage")
            .query_async(&mut raw(&server).await)
            .await
            .unwrap();
        let err = s
            .webhook_settle(
                "wh_1",
                vec![
                    Settle::Done { key: all[0].key },
                    Settle::Retry {
                        key: all[1].key,
                        attempt: 2,
                        next_attempt_ms: 2,
                    },
                    Settle::Done { key: 424_242 },
                ],
                vec!["{}".into()],
                10,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, EngineError::Internal(_)), "{err}");
        // Nothing of the batch was applied.
        let after = s.webhook_pending("wh_1", 0, 2).await.unwrap();
        assert_eq!(ids(&after), [id("a", 1), id("a", 2)]);
        assert_eq!(after[1].attempt, 0);
        assert!(s.webhook_log("wh_1", 10).await.unwrap().is_empty());
        // Without the bad record the same batch goes through.
        s.webhook_settle(
            "wh_1",
            vec![
                Settle::Done { key: all[0].key },
                Settle::Retry {
                    key: all[1].key,
                    attempt: 2,
                    next_attempt_ms: 2,
                },
            ],
            vec!["{}".into()],
            10,
        )
        .await
        .unwrap();
        let after = s.webhook_pending("wh_1", 0, 1).await.unwrap();
        assert_eq!((after[0].item.seq, after[0].attempt), (2, 2));
    }

    #[tokio::test]
    async fn the_attempt_log_keeps_the_newest_and_lists_them_first() {
        let server = RedisServer::start();
        let s = store(&server).await;
        assert!(s.webhook_log("wh_1", 10).await.unwrap().is_empty());
        let entries = |range: std::ops::Range<u32>| {
            range.map(|n| format!("{{\"n\":{n}}}")).collect::<Vec<_>>()
        };
        s.webhook_settle("wh_1", vec![], entries(1..4), 5)
            .await
            .unwrap();
        s.webhook_settle("wh_1", vec![], entries(4..8), 5)
            .await
            .unwrap();
        assert_eq!(
            s.webhook_log("wh_1", 100).await.unwrap(),
            entries(3..8).into_iter().rev().collect::<Vec<_>>()
        );
        assert_eq!(
            s.webhook_log("wh_1", 2).await.unwrap(),
            ["{\"n\":7}", "{\"n\":6}"]
        );
        assert!(s.webhook_log("wh_1", 0).await.unwrap().is_empty());
        // No new records: no trimming (as in SQLite), even with a smaller keep_log.
        s.webhook_settle("wh_1", vec![Settle::Done { key: 1 }], vec![], 1)
            .await
            .unwrap();
        assert_eq!(s.webhook_log("wh_1", 100).await.unwrap().len(), 5);
        s.webhook_settle("wh_1", vec![], entries(8..9), 2)
            .await
            .unwrap();
        assert_eq!(
            s.webhook_log("wh_1", 100).await.unwrap(),
            ["{\"n\":8}", "{\"n\":7}"]
        );
        // keep_log 0 keeps nothing.
        s.webhook_settle("wh_1", vec![], entries(9..10), 0)
            .await
            .unwrap();
        assert!(s.webhook_log("wh_1", 100).await.unwrap().is_empty());
        assert!(s.webhook_log("wh_2", 100).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn forget_drops_queue_cursors_and_log_of_one_webhook_only() {
        let server = RedisServer::start();
        let s = store(&server).await;
        for webhook in ["wh_1", "wh_2"] {
            s.webhook_enqueue(vec![enqueue(
                webhook,
                vec![item("a", 1), item("b", 1)],
                vec![cursor("a", 1), cursor("b", 1)],
            )])
            .await
            .unwrap();
            s.webhook_settle(webhook, vec![], vec!["{}".into()], 10)
                .await
                .unwrap();
        }
        let before = s.webhook_pending("wh_1", 0, 100).await.unwrap();
        s.webhook_forget("wh_1").await.unwrap();
        assert!(s.webhook_pending("wh_1", 0, 100).await.unwrap().is_empty());
        assert!(s
            .webhook_pending_channel("wh_1", "a", 0, i64::MAX, 100)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(s.webhook_pending_count("wh_1").await.unwrap(), 0);
        assert!(s.webhook_cursors("wh_1").await.unwrap().is_empty());
        assert!(s.webhook_log("wh_1", 100).await.unwrap().is_empty());
        // Only the key counter stays, so a webhook of the same id never reuses a key.
        assert_eq!(redis_keys(&server, "t:wh:wh_1:*").await, ["t:wh:wh_1:next"]);
        s.webhook_forget("wh_1").await.unwrap();
        // The other webhook is untouched.
        assert_eq!(s.webhook_pending_count("wh_2").await.unwrap(), 2);
        assert_eq!(s.webhook_cursors("wh_2").await.unwrap().len(), 2);
        assert_eq!(s.webhook_log("wh_2", 100).await.unwrap().len(), 1);
        // Queueing again after a forget starts afresh (the same messages queue again).
        s.webhook_enqueue(vec![enqueue("wh_1", vec![item("a", 1)], vec![])])
            .await
            .unwrap();
        let again = s.webhook_pending("wh_1", 0, 100).await.unwrap();
        assert_eq!(ids(&again), [id("a", 1)]);
        assert!(before.iter().all(|p| p.key < again[0].key));
    }

    #[tokio::test]
    async fn a_lease_has_one_holder_until_released_or_expired() {
        let server = RedisServer::start();
        let node_a = store(&server).await;
        let node_b = store(&server).await;
        assert!(node_a.is_shared());
        assert!(node_a.lease("webhook:wh_1", "a", 200).await.unwrap());
        assert!(!node_b.lease("webhook:wh_1", "b", 60_000).await.unwrap());
        // Another lease is independent.
        assert!(node_b.lease("feed:so", "b", 60_000).await.unwrap());
        // The holder renews, for the new time.
        assert!(node_a.lease("webhook:wh_1", "a", 60_000).await.unwrap());
        assert!(pttl(&server, "t:lease:webhook:wh_1").await > 30_000);
        assert!(!node_b.lease("webhook:wh_1", "b", 60_000).await.unwrap());
        // Only the holder can release it; then another takes it at once.
        node_b.release("webhook:wh_1", "b").await.unwrap();
        assert!(!node_b.lease("webhook:wh_1", "b", 60_000).await.unwrap());
        node_a.release("webhook:wh_1", "a").await.unwrap();
        assert!(node_b.lease("webhook:wh_1", "b", 150).await.unwrap());
        assert!(!node_a.lease("webhook:wh_1", "a", 60_000).await.unwrap());
        node_a.release("webhook:wh_1", "a").await.unwrap();
        assert!(!node_a.lease("webhook:wh_1", "a", 60_000).await.unwrap());
        // A holder that stops renewing loses it when its time runs out.
        let started = Instant::now();
        let a = &node_a;
        eventually("the lease to expire", move || async move {
            a.lease("webhook:wh_1", "a", 60_000).await.unwrap()
        })
        .await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!node_b.lease("webhook:wh_1", "b", 60_000).await.unwrap());
        // A zero or negative time is taken as the shortest lease, never an error.
        assert!(node_a.lease("zero", "a", 0).await.unwrap());
        assert!(node_a.lease("negative", "a", -5).await.unwrap());
        // Releasing what nobody holds is fine.
        node_a.release("never", "a").await.unwrap();
    }

    #[tokio::test]
    async fn claim_once_goes_to_the_first_claimant_only() {
        let server = RedisServer::start();
        let node_a = store(&server).await;
        let node_b = store(&server).await;
        let (x, y) = tokio::join!(
            node_a.claim_once("tick:build:1700000000", 60_000),
            node_b.claim_once("tick:build:1700000000", 60_000)
        );
        assert!(x.unwrap() ^ y.unwrap(), "exactly one node gets the tick");
        assert!(!node_a
            .claim_once("tick:build:1700000000", 60_000)
            .await
            .unwrap());
        assert!(node_a
            .claim_once("tick:build:1700000060", 60_000)
            .await
            .unwrap());
        // After its time the claim is forgotten.
        assert!(node_a.claim_once("short", 100).await.unwrap());
        assert!(!node_b.claim_once("short", 100).await.unwrap());
        let b = &node_b;
        eventually("the claim to expire", move || async move {
            b.claim_once("short", 60_000).await.unwrap()
        })
        .await;
        assert!(node_b.claim_once("zero", 0).await.unwrap());
    }

    #[tokio::test]
    async fn a_dead_server_is_unavailable_quickly_and_the_store_recovers() {
        let mut server = RedisServer::start();
        let s = store(&server).await;
        s.put_doc("feed", "so", "{}".into()).await.unwrap();
        server.stop();
        assert!(!server.is_running());

        let started = Instant::now();
        let results: Vec<(&str, Result<(), EngineError>)> = vec![
            ("secret", s.secret("k").await.map(drop)),
            ("put_run", s.put_run(run("01A", "j", "running")).await),
            ("run", s.run("01A").await.map(drop)),
            ("runs_of_job", s.runs_of_job("j", 10).await.map(drop)),
            (
                "runs_with_status",
                s.runs_with_status(&["running"]).await.map(drop),
            ),
            ("put_doc", s.put_doc("feed", "so", "{}".into()).await),
            ("doc", s.doc("feed", "so").await.map(drop)),
            ("docs", s.docs("feed").await.map(drop)),
            ("delete_doc", s.delete_doc("feed", "so").await.map(drop)),
            ("unseen", s.unseen("s", vec!["a".into()], 0).await.map(drop)),
            ("mark_seen", s.mark_seen("s", vec!["a".into()], 1, 0).await),
            ("seen_count", s.seen_count("s").await.map(drop)),
            ("forget_set", s.forget_set("s").await),
            ("webhook_cursors", s.webhook_cursors("w").await.map(drop)),
            (
                "webhook_enqueue",
                s.webhook_enqueue(vec![enqueue("w", vec![item("a", 1)], vec![])])
                    .await,
            ),
            (
                "webhook_pending",
                s.webhook_pending("w", 0, 1).await.map(drop),
            ),
            (
                "webhook_pending_channel",
                s.webhook_pending_channel("w", "a", 0, 9, 1).await.map(drop),
            ),
            (
                "webhook_pending_count",
                s.webhook_pending_count("w").await.map(drop),
            ),
            (
                "webhook_settle",
                s.webhook_settle("w", vec![Settle::Done { key: 1 }], vec![], 1)
                    .await,
            ),
            ("webhook_log", s.webhook_log("w", 1).await.map(drop)),
            ("webhook_forget", s.webhook_forget("w").await),
            ("lease", s.lease("l", "a", 1_000).await.map(drop)),
            ("release", s.release("l", "a").await),
            ("claim_once", s.claim_once("c", 1_000).await.map(drop)),
            ("ping", s.ping().await),
        ];
        for (what, result) in results {
            assert!(
                matches!(result, Err(EngineError::Unavailable(_))),
                "{what}: {result:?}"
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?} for all calls",
            started.elapsed()
        );

        // Once Redis is back, the same store works again (reconnecting by itself).
        server.restart();
        let st = &s;
        eventually("the store to reconnect", move || async move {
            st.put_doc("feed", "so", "{}".into()).await.is_ok()
        })
        .await;
        assert_eq!(s.docs("feed").await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn connecting_to_nothing_is_unavailable_quickly() {
        let started = Instant::now();
        let url = format!("redis://127.0.0.1:{}/0", free_port());
        let err = RedisState::connect(&url, "t:").await.err().unwrap();
        assert!(matches!(err, EngineError::Unavailable(_)), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let err = RedisState::connect("nonsense://x", "t:")
            .await
            .err()
            .unwrap();
        assert!(matches!(err, EngineError::Internal(_)), "{err}");
    }
}
