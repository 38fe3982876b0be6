//! The embedded engine: SQLite in WAL mode, one writer thread committing publishes in groups,
//! and a small pool of reader connections.
//!
//! Every write (publish, delete, prune) goes through the writer thread, in arrival order, so
//! seqs are assigned by exactly one owner and live delivery follows commit order.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use super::{ChannelMeta, Engine, EngineError, LiveSink, Page, Published, Wake};
use crate::hub::retention::RetentionRules;
use crate::hub::types::{ChannelName, Epoch, Message, MessageId, NewMessage, Seq, SharedMessage};
use crate::metrics::Metrics;

/// How many queued commands one group commit takes at most.
const MAX_GROUP: usize = 1024;
const MAX_IDLE_READERS: usize = 8;

/// How the embedded store trades latency for durability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sync {
    /// fsync on every group commit: survives power loss.
    Full,
    /// fsync at checkpoints only: survives a process crash (`kill -9`), not power loss.
    Normal,
}

pub struct SqliteOptions {
    pub dir: PathBuf,
    pub sync: Sync,
    pub dedupe_window_ms: i64,
}

enum WriteCmd {
    Publish {
        channel: ChannelName,
        batch: Vec<NewMessage>,
        reply: oneshot::Sender<Result<Vec<Published>, EngineError>>,
    },
    Delete {
        channel: ChannelName,
        reply: oneshot::Sender<Result<Epoch, EngineError>>,
    },
    Prune {
        rules: RetentionRules,
        dedupe_window_ms: i64,
        reply: oneshot::Sender<Result<u64, EngineError>>,
    },
    /// Commit what came before, then stop.
    Close { reply: oneshot::Sender<()> },
}

pub struct SqliteEngine {
    writer: mpsc::Sender<WriteCmd>,
    readers: Arc<ReaderPool>,
    salt: Arc<[u8; 32]>,
    closed: AtomicBool,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl SqliteEngine {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(
        options: &SqliteOptions,
        sink: Arc<dyn LiveSink>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, EngineError> {
        let dir = &options.dir;
        std::fs::create_dir_all(dir).map_err(|e| {
            EngineError::Unavailable(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
        let path = dir.join("tidings.db");
        let conn = open_connection(&path)?;
        conn.pragma_update(
            None,
            "synchronous",
            match options.sync {
                Sync::Full => "FULL",
                Sync::Normal => "NORMAL",
            },
        )?;
        create_schema(&conn)?;
        let salt = Arc::new(load_or_create_salt(&conn)?);
        let (tx, rx) = mpsc::channel(16 * 1024);
        let writer = Writer {
            conn,
            sink,
            metrics,
            salt: salt.clone(),
            channels: HashMap::new(),
            last_time_ms: 0,
            last_dedupe_sweep_ms: 0,
            dedupe_window_ms: options.dedupe_window_ms,
        };
        let handle = std::thread::Builder::new()
            .name("tidings-sqlite-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| EngineError::Unavailable(format!("cannot start writer thread: {e}")))?;
        Ok(Self {
            writer: tx,
            readers: Arc::new(ReaderPool {
                path,
                idle: Mutex::new(Vec::new()),
            }),
            salt,
            closed: AtomicBool::new(false),
            writer_thread: Mutex::new(Some(handle)),
        })
    }

    async fn send(&self, cmd: WriteCmd) -> Result<(), EngineError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(EngineError::Unavailable("the store is shut down".into()));
        }
        self.writer
            .send(cmd)
            .await
            .map_err(|_| EngineError::Unavailable("the store writer has stopped".into()))
    }

    async fn with_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let pool = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = pool.take()?;
            let result = f(&mut conn);
            pool.give_back(conn);
            result
        })
        .await
        .map_err(|e| EngineError::Internal(format!("reader task failed: {e}")))?
    }
}

fn reply_gone() -> EngineError {
    EngineError::Unavailable("the store writer stopped before answering".into())
}

#[async_trait]
impl Engine for SqliteEngine {
    async fn publish(
        &self,
        channel: &ChannelName,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Published>, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteCmd::Publish {
            channel: channel.clone(),
            batch,
            reply,
        })
        .await?;
        rx.await.map_err(|_| reply_gone())?
    }

    async fn read(
        &self,
        channel: &ChannelName,
        after: Seq,
        limit: usize,
        max_bytes: usize,
        not_before_ms: i64,
    ) -> Result<Page, EngineError> {
        let channel = channel.clone();
        let salt = self.salt.clone();
        let bounds = ReadBounds {
            after,
            limit,
            max_bytes,
            not_before_ms,
        };
        self.with_reader(move |conn| read_page(conn, &salt, &channel, bounds))
            .await
    }

    async fn channel(&self, channel: &ChannelName) -> Result<ChannelMeta, EngineError> {
        let channel = channel.clone();
        let salt = self.salt.clone();
        self.with_reader(move |conn| channel_meta(conn, &salt, &channel))
            .await
    }

    async fn channels(&self) -> Result<Vec<ChannelMeta>, EngineError> {
        let salt = self.salt.clone();
        self.with_reader(move |conn| {
            let names: Vec<String> = conn
                .prepare_cached("SELECT name FROM channels ORDER BY name")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            names
                .iter()
                .filter_map(|n| ChannelName::parse(n).ok())
                .map(|name| channel_meta(conn, &salt, &name))
                .collect()
        })
        .await
    }

    async fn delete_channel(&self, channel: &ChannelName) -> Result<Epoch, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteCmd::Delete {
            channel: channel.clone(),
            reply,
        })
        .await?;
        rx.await.map_err(|_| reply_gone())?
    }

    async fn prune(
        &self,
        rules: &RetentionRules,
        dedupe_window_ms: i64,
    ) -> Result<u64, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.send(WriteCmd::Prune {
            rules: rules.clone(),
            dedupe_window_ms,
            reply,
        })
        .await?;
        rx.await.map_err(|_| reply_gone())?
    }

    async fn health(&self) -> Result<(), EngineError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(EngineError::Unavailable("the store is shut down".into()));
        }
        self.with_reader(|conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))?;
            Ok(())
        })
        .await
    }

    async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let (reply, done) = oneshot::channel();
        if self.writer.send(WriteCmd::Close { reply }).await.is_ok() {
            let _ = done.await;
        }
        let handle = self
            .writer_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

fn open_connection(path: &Path) -> Result<Connection, EngineError> {
    let conn = Connection::open(path).map_err(|e| {
        EngineError::Unavailable(format!("cannot open store {}: {e}", path.display()))
    })?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    Ok(conn)
}

fn create_schema(conn: &Connection) -> Result<(), EngineError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (
             key TEXT PRIMARY KEY,
             value BLOB NOT NULL
         );
         CREATE TABLE IF NOT EXISTS channels (
             name TEXT PRIMARY KEY,
             epoch TEXT NOT NULL,
             last_seq INTEGER NOT NULL,
             last_activity INTEGER
         ) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS messages (
             channel TEXT NOT NULL,
             seq INTEGER NOT NULL,
             id TEXT NOT NULL,
             time INTEGER NOT NULL,
             json BLOB NOT NULL,
             PRIMARY KEY (channel, seq)
         ) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS dedupe (
             channel TEXT NOT NULL,
             id TEXT NOT NULL,
             seq INTEGER NOT NULL,
             time INTEGER NOT NULL,
             PRIMARY KEY (channel, id)
         ) WITHOUT ROWID;",
    )?;
    Ok(())
}

fn load_or_create_salt(conn: &Connection) -> Result<[u8; 32], EngineError> {
    let existing: Option<Vec<u8>> = conn
        .query_row("SELECT value FROM meta WHERE key = 'epoch_salt'", [], |r| {
            r.get(0)
        })
        .optional()?;
    if let Some(v) = existing.filter(|v| v.len() == 32) {
        let mut salt = [0u8; 32];
        salt.copy_from_slice(&v);
        return Ok(salt);
    }
    let salt: [u8; 32] = rand::random();
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch_salt', ?1)",
        params![salt.to_vec()],
    )?;
    Ok(salt)
}

/// The epoch of a channel nobody has published to: stable for this store, so a reader who saw
/// it before the first publish is not told its history was lost.
fn unpublished_epoch(salt: &[u8; 32], channel: &ChannelName) -> Epoch {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(channel.as_str().as_bytes());
    Epoch::from_digest(&h.finalize())
}

fn stored_channel(
    conn: &Connection,
    channel: &ChannelName,
) -> Result<Option<(Epoch, Seq, Option<i64>)>, EngineError> {
    let row: Option<(String, i64, Option<i64>)> = conn
        .prepare_cached("SELECT epoch, last_seq, last_activity FROM channels WHERE name = ?1")?
        .query_row(params![channel.as_str()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    match row {
        None => Ok(None),
        Some((epoch, last_seq, activity)) => {
            let epoch = Epoch::parse(&epoch)
                .map_err(|e| EngineError::Internal(format!("corrupt epoch in store: {e}")))?;
            Ok(Some((epoch, last_seq.max(0) as Seq, activity)))
        }
    }
}

fn channel_meta(
    conn: &Connection,
    salt: &[u8; 32],
    channel: &ChannelName,
) -> Result<ChannelMeta, EngineError> {
    let Some((epoch, last_seq, last_activity_ms)) = stored_channel(conn, channel)? else {
        return Ok(ChannelMeta {
            name: channel.clone(),
            epoch: unpublished_epoch(salt, channel),
            last_seq: 0,
            messages: 0,
            last_activity_ms: None,
        });
    };
    let first: Option<i64> = conn
        .prepare_cached("SELECT MIN(seq) FROM messages WHERE channel = ?1")?
        .query_row(params![channel.as_str()], |r| r.get(0))?;
    let messages = first.map_or(0, |f| last_seq.saturating_sub(f.max(1) as Seq) + 1);
    Ok(ChannelMeta {
        name: channel.clone(),
        epoch,
        last_seq,
        messages,
        last_activity_ms,
    })
}

/// Which messages a read returns: seq > `after`, none accepted before `not_before_ms`, at most
/// `limit`, and past the first, at most `max_bytes` of JSON.
struct ReadBounds {
    after: Seq,
    limit: usize,
    max_bytes: usize,
    not_before_ms: i64,
}

fn read_page(
    conn: &mut Connection,
    salt: &[u8; 32],
    channel: &ChannelName,
    bounds: ReadBounds,
) -> Result<Page, EngineError> {
    let ReadBounds {
        after,
        limit,
        max_bytes,
        not_before_ms,
    } = bounds;
    // One read transaction, so the metadata and the rows are of the same snapshot.
    let tx = conn.transaction()?;
    let (epoch, last_seq) = match stored_channel(&tx, channel)? {
        Some((epoch, last_seq, _)) => (epoch, last_seq),
        None => (unpublished_epoch(salt, channel), 0),
    };
    let mut messages = Vec::with_capacity(limit.min(1024));
    let mut first_seq = last_seq + 1;
    {
        let mut stmt = tx.prepare_cached(
            "SELECT seq, id, time, json FROM messages
             WHERE channel = ?1 AND seq > ?2 AND time >= ?3
             ORDER BY seq LIMIT ?4",
        )?;
        let after_i = i64::try_from(after).unwrap_or(i64::MAX);
        let fetch = limit.max(1) as i64;
        let mut rows = stmt.query(params![channel.as_str(), after_i, not_before_ms, fetch])?;
        let mut bytes = 0usize;
        while let Some(row) = rows.next()? {
            let seq = row.get::<_, i64>(0)?.max(0) as Seq;
            if messages.is_empty() && first_seq > seq {
                first_seq = seq;
            }
            if messages.len() >= limit {
                break;
            }
            let json: Vec<u8> = row.get(3)?;
            bytes = bytes.saturating_add(json.len());
            if !messages.is_empty() && bytes > max_bytes {
                break;
            }
            messages.push(Arc::new(Message::new(
                channel.clone(),
                seq,
                row.get(1)?,
                row.get(2)?,
                Bytes::from(json),
            )));
        }
    }
    tx.finish()?;
    Ok(Page {
        epoch,
        messages,
        last_seq,
        first_seq,
    })
}

struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReaderPool {
    fn take(&self) -> Result<Connection, EngineError> {
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match pooled {
            Some(c) => Ok(c),
            None => open_connection(&self.path),
        }
    }

    fn give_back(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
    }
}

struct ChannelState {
    epoch: Epoch,
    last_seq: Seq,
}

struct Writer {
    conn: Connection,
    sink: Arc<dyn LiveSink>,
    metrics: Arc<Metrics>,
    salt: Arc<[u8; 32]>,
    /// Seq counters of channels this writer has touched; the writer is their only owner.
    channels: HashMap<ChannelName, ChannelState>,
    last_time_ms: i64,
    last_dedupe_sweep_ms: i64,
    /// Keys older than this are ignored by lookups even before the sweep removes them.
    dedupe_window_ms: i64,
}

/// What a command produced inside the transaction, released only after commit.
enum Done {
    Published {
        reply: oneshot::Sender<Result<Vec<Published>, EngineError>>,
        results: Vec<Published>,
        channel: ChannelName,
        epoch: Epoch,
        messages: Vec<SharedMessage>,
    },
    Deleted {
        reply: oneshot::Sender<Result<Epoch, EngineError>>,
        channel: ChannelName,
        epoch: Epoch,
    },
    Pruned {
        reply: oneshot::Sender<Result<u64, EngineError>>,
        removed: u64,
    },
    Closed {
        reply: oneshot::Sender<()>,
    },
}

impl Done {
    fn fail(self, error: &EngineError) {
        let e = || EngineError::Internal(error.to_string());
        match self {
            Done::Published { reply, .. } => drop(reply.send(Err(e()))),
            Done::Deleted { reply, .. } => drop(reply.send(Err(e()))),
            Done::Pruned { reply, .. } => drop(reply.send(Err(e()))),
            Done::Closed { reply } => drop(reply.send(())),
        }
    }
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<WriteCmd>) {
        while let Some(first) = rx.blocking_recv() {
            let mut closing = matches!(first, WriteCmd::Close { .. });
            let mut group = vec![first];
            while group.len() < MAX_GROUP && !closing {
                match rx.try_recv() {
                    Ok(cmd) => {
                        closing = matches!(cmd, WriteCmd::Close { .. });
                        group.push(cmd);
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(group);
            if closing {
                break;
            }
        }
        tracing::debug!("store writer stopped");
    }

    fn commit_group(&mut self, group: Vec<WriteCmd>) {
        let started = Instant::now();
        let mut done = Vec::with_capacity(group.len());
        let outcome = self.apply_group(group, &mut done);
        let outcome = outcome.and_then(|()| {
            self.conn.execute_batch("COMMIT")?;
            Ok(())
        });
        self.metrics
            .store_commit
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(()) => {
                // Every publisher hears first, then every subscriber: see `committed_deferred`.
                let wakes: Vec<_> = done.into_iter().filter_map(|d| self.release(d)).collect();
                wakes.into_iter().for_each(Wake::wake);
            }
            Err(error) => {
                tracing::error!(%error, "group commit failed; every publish in it is refused");
                let _ = self.conn.execute_batch("ROLLBACK");
                // Seq counters may have advanced inside the failed transaction.
                self.channels.clear();
                done.into_iter().for_each(|d| d.fail(&error));
            }
        }
    }

    /// Runs every command of the group inside one transaction. Input is validated at the edge,
    /// so an error here is the store's (disk full, I/O): it aborts the whole group.
    fn apply_group(
        &mut self,
        group: Vec<WriteCmd>,
        done: &mut Vec<Done>,
    ) -> Result<(), EngineError> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let mut pending = group.into_iter();
        while let Some(cmd) = pending.next() {
            let step = match cmd {
                WriteCmd::Publish {
                    channel,
                    batch,
                    reply,
                } => match self.publish(&channel, batch) {
                    Ok((results, epoch, messages)) => Ok(Done::Published {
                        reply,
                        results,
                        channel,
                        epoch,
                        messages,
                    }),
                    Err(e) => Err((
                        e,
                        WriteCmd::Publish {
                            channel,
                            batch: Vec::new(),
                            reply,
                        },
                    )),
                },
                WriteCmd::Delete { channel, reply } => match self.delete(&channel) {
                    Ok(epoch) => Ok(Done::Deleted {
                        reply,
                        channel,
                        epoch,
                    }),
                    Err(e) => Err((e, WriteCmd::Delete { channel, reply })),
                },
                WriteCmd::Prune {
                    rules,
                    dedupe_window_ms,
                    reply,
                } => match self.prune(&rules, dedupe_window_ms) {
                    Ok(removed) => Ok(Done::Pruned { reply, removed }),
                    Err(e) => Err((
                        e,
                        WriteCmd::Prune {
                            rules,
                            dedupe_window_ms,
                            reply,
                        },
                    )),
                },
                WriteCmd::Close { reply } => {
                    done.push(Done::Closed { reply });
                    continue;
                }
            };
            match step {
                Ok(d) => done.push(d),
                Err((error, failed)) => {
                    fail_cmd(failed, &error);
                    for cmd in pending {
                        fail_cmd(cmd, &error);
                    }
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    /// Answers the command; a publish's subscribers are woken by the caller afterwards.
    fn release(&self, done: Done) -> Option<Wake> {
        match done {
            Done::Published {
                reply,
                results,
                channel,
                epoch,
                messages,
            } => {
                let wake = (!messages.is_empty())
                    .then(|| self.sink.committed_deferred(&channel, &epoch, &messages));
                let _ = reply.send(Ok(results));
                wake
            }
            Done::Deleted {
                reply,
                channel,
                epoch,
            } => {
                self.sink.reset(&channel, &epoch);
                let _ = reply.send(Ok(epoch));
                None
            }
            Done::Pruned { reply, removed } => {
                let _ = reply.send(Ok(removed));
                None
            }
            Done::Closed { reply } => {
                let _ = reply.send(());
                None
            }
        }
    }

    fn channel_state(&mut self, channel: &ChannelName) -> Result<&mut ChannelState, EngineError> {
        if !self.channels.contains_key(channel) {
            let state = match stored_channel(&self.conn, channel)? {
                Some((epoch, last_seq, _)) => ChannelState { epoch, last_seq },
                None => ChannelState {
                    epoch: unpublished_epoch(&self.salt, channel),
                    last_seq: 0,
                },
            };
            self.channels.insert(channel.clone(), state);
        }
        self.channels
            .get_mut(channel)
            .ok_or_else(|| EngineError::Internal("channel state vanished".into()))
    }

    fn next_time_ms(&mut self) -> i64 {
        // Never earlier than the previous message, so age and seq order agree.
        self.last_time_ms = crate::clock::now_ms().max(self.last_time_ms);
        self.last_time_ms
    }

    fn publish(
        &mut self,
        channel: &ChannelName,
        batch: Vec<NewMessage>,
    ) -> Result<(Vec<Published>, Epoch, Vec<SharedMessage>), EngineError> {
        let now = self.next_time_ms();
        let dedupe_since = now - self.dedupe_window_ms;
        let (epoch, mut seq) = {
            let state = self.channel_state(channel)?;
            (state.epoch.clone(), state.last_seq)
        };
        let mut results = Vec::with_capacity(batch.len());
        let mut messages = Vec::with_capacity(batch.len());
        for message in batch {
            if let Some(id) = &message.id {
                let seen: Option<i64> = self
                    .conn
                    .prepare_cached(
                        "SELECT seq FROM dedupe WHERE channel = ?1 AND id = ?2 AND time >= ?3",
                    )?
                    .query_row(params![channel.as_str(), id.as_str(), dedupe_since], |r| {
                        r.get(0)
                    })
                    .optional()?;
                if let Some(original) = seen {
                    results.push(Published {
                        seq: original.max(0) as Seq,
                        id: id.as_str().to_owned(),
                        duplicate: true,
                    });
                    continue;
                }
            }
            seq += 1;
            let id = message.id.unwrap_or_else(MessageId::generate).into_string();
            let json = Message::encode(
                channel,
                seq,
                &id,
                message.event.as_str(),
                now,
                message.data.as_str(),
            );
            let seq_i = seq as i64;
            self.conn
                .prepare_cached(
                    "INSERT INTO messages (channel, seq, id, time, json) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![channel.as_str(), seq_i, id, now, &json[..]])?;
            self.conn
                .prepare_cached(
                    "INSERT OR REPLACE INTO dedupe (channel, id, seq, time) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![channel.as_str(), id, seq_i, now])?;
            results.push(Published {
                seq,
                id: id.clone(),
                duplicate: false,
            });
            messages.push(Arc::new(Message::new(channel.clone(), seq, id, now, json)));
        }
        if !messages.is_empty() {
            self.conn
                .prepare_cached(
                    "INSERT INTO channels (name, epoch, last_seq, last_activity) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(name) DO UPDATE SET last_seq = excluded.last_seq,
                                                     last_activity = excluded.last_activity",
                )?
                .execute(params![channel.as_str(), epoch.as_str(), seq as i64, now])?;
            self.channel_state(channel)?.last_seq = seq;
        }
        Ok((results, epoch, messages))
    }

    fn delete(&mut self, channel: &ChannelName) -> Result<Epoch, EngineError> {
        let epoch = Epoch::random();
        let now = self.next_time_ms();
        self.conn
            .prepare_cached("DELETE FROM messages WHERE channel = ?1")?
            .execute(params![channel.as_str()])?;
        self.conn
            .prepare_cached("DELETE FROM dedupe WHERE channel = ?1")?
            .execute(params![channel.as_str()])?;
        self.conn
            .prepare_cached(
                "INSERT INTO channels (name, epoch, last_seq, last_activity) VALUES (?1, ?2, 0, ?3)
                 ON CONFLICT(name) DO UPDATE SET epoch = excluded.epoch, last_seq = 0,
                                                 last_activity = excluded.last_activity",
            )?
            .execute(params![channel.as_str(), epoch.as_str(), now])?;
        self.channels.insert(
            channel.clone(),
            ChannelState {
                epoch: epoch.clone(),
                last_seq: 0,
            },
        );
        Ok(epoch)
    }

    fn prune(&mut self, rules: &RetentionRules, dedupe_window_ms: i64) -> Result<u64, EngineError> {
        self.dedupe_window_ms = dedupe_window_ms;
        let now = crate::clock::now_ms();
        let rows: Vec<(String, i64)> = self
            .conn
            .prepare_cached("SELECT name, last_seq FROM channels")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut removed = 0u64;
        for (name, last_seq) in rows {
            let Ok(channel) = ChannelName::parse(&name) else {
                continue;
            };
            let rule = rules.for_channel(&channel);
            let keep_from_count = last_seq - i64::try_from(rule.max_messages).unwrap_or(i64::MAX);
            let keep_from_age = self.last_expired_seq(&name, now - rule.max_age_ms())?;
            let cut = keep_from_count.max(keep_from_age);
            if cut > 0 {
                removed += self
                    .conn
                    .prepare_cached("DELETE FROM messages WHERE channel = ?1 AND seq <= ?2")?
                    .execute(params![name, cut])? as u64;
            }
        }
        if now - self.last_dedupe_sweep_ms > 60_000 {
            self.last_dedupe_sweep_ms = now;
            self.conn
                .prepare_cached("DELETE FROM dedupe WHERE time < ?1")?
                .execute(params![now - dedupe_window_ms])?;
        }
        Ok(removed)
    }

    /// The newest seq accepted before `cutoff_ms` (0 if none), found by binary search on seq:
    /// the writer stamps times that never go backwards, so time grows with seq.
    fn last_expired_seq(&self, channel: &str, cutoff_ms: i64) -> Result<i64, EngineError> {
        let bounds: (Option<i64>, Option<i64>) = self
            .conn
            .prepare_cached("SELECT MIN(seq), MAX(seq) FROM messages WHERE channel = ?1")?
            .query_row(params![channel], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let (Some(mut lo), Some(mut hi)) = bounds else {
            return Ok(0);
        };
        let time_at = |seq: i64| -> Result<Option<i64>, EngineError> {
            Ok(self
                .conn
                .prepare_cached(
                    "SELECT time FROM messages WHERE channel = ?1 AND seq >= ?2 ORDER BY seq LIMIT 1",
                )?
                .query_row(params![channel, seq], |r| r.get(0))
                .optional()?)
        };
        if time_at(lo)?.is_none_or(|t| t >= cutoff_ms) {
            return Ok(0);
        }
        // Invariant: time(lo) < cutoff; find the largest such seq.
        while lo < hi {
            let mid = lo + (hi - lo + 1) / 2;
            if time_at(mid)?.is_some_and(|t| t < cutoff_ms) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        Ok(lo)
    }
}

fn fail_cmd(cmd: WriteCmd, error: &EngineError) {
    let e = || EngineError::Internal(error.to_string());
    match cmd {
        WriteCmd::Publish { reply, .. } => drop(reply.send(Err(e()))),
        WriteCmd::Delete { reply, .. } => drop(reply.send(Err(e()))),
        WriteCmd::Prune { reply, .. } => drop(reply.send(Err(e()))),
        WriteCmd::Close { reply } => drop(reply.send(())),
    }
}
