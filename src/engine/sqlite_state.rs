//! The embedded `StateStore`: a second SQLite file (`state.db`) in the data directory, so its
//! low-rate writes never queue behind the message writer's group commits.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::state::{
    Enqueue, OutboxItem, PendingDelivery, Settle, StateStore, StoredRun, WebhookCursor,
};
use super::EngineError;

pub struct SqliteState {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteState {
    pub fn open(dir: &Path) -> Result<Self, EngineError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            EngineError::Unavailable(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
        let path = dir.join("state.db");
        let conn = Connection::open(&path).map_err(|e| {
            EngineError::Unavailable(format!("cannot open {}: {e}", path.display()))
        })?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS runs (
                 id TEXT PRIMARY KEY,
                 job TEXT NOT NULL,
                 status TEXT NOT NULL,
                 json TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS runs_by_job ON runs (job, id);
             CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status);
             CREATE TABLE IF NOT EXISTS docs (
                 kind TEXT NOT NULL,
                 key TEXT NOT NULL,
                 json TEXT NOT NULL,
                 PRIMARY KEY (kind, key)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS seen (
                 set_name TEXT NOT NULL,
                 key TEXT NOT NULL,
                 last_seen INTEGER NOT NULL,
                 PRIMARY KEY (set_name, key)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS webhook_cursors (
                 webhook TEXT NOT NULL,
                 channel TEXT NOT NULL,
                 epoch TEXT NOT NULL,
                 seq INTEGER NOT NULL,
                 PRIMARY KEY (webhook, channel)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS webhook_outbox (
                 key INTEGER PRIMARY KEY AUTOINCREMENT,
                 webhook TEXT NOT NULL,
                 channel TEXT NOT NULL,
                 epoch TEXT NOT NULL,
                 seq INTEGER NOT NULL,
                 body TEXT NOT NULL,
                 attempt INTEGER NOT NULL DEFAULT 0,
                 next_attempt INTEGER NOT NULL DEFAULT 0,
                 replay INTEGER NOT NULL DEFAULT 0,
                 UNIQUE (webhook, channel, epoch, seq, replay)
             );
             CREATE INDEX IF NOT EXISTS webhook_outbox_queue ON webhook_outbox (webhook, key);
             CREATE INDEX IF NOT EXISTS webhook_outbox_channel ON webhook_outbox (webhook, channel, key);
             CREATE TABLE IF NOT EXISTS webhook_log (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 webhook TEXT NOT NULL,
                 json TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS webhook_log_by_hook ON webhook_log (webhook, id);",
        )?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| EngineError::Internal(format!("state task failed: {e}")))?
    }
}

fn run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredRun> {
    Ok(StoredRun {
        id: r.get(0)?,
        job: r.get(1)?,
        status: r.get(2)?,
        json: r.get(3)?,
    })
}

#[async_trait]
impl StateStore for SqliteState {
    async fn secret(&self, name: &str) -> Result<Vec<u8>, EngineError> {
        let name = name.to_owned();
        self.with(move |c| {
            let found: Option<Vec<u8>> = c
                .query_row(
                    "SELECT value FROM secrets WHERE name = ?1",
                    params![name],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(v) = found {
                return Ok(v);
            }
            let fresh: [u8; 32] = rand::random();
            c.execute(
                "INSERT INTO secrets (name, value) VALUES (?1, ?2)",
                params![name, fresh.to_vec()],
            )?;
            Ok(fresh.to_vec())
        })
        .await
    }

    async fn put_run(&self, run: StoredRun) -> Result<(), EngineError> {
        self.with(move |c| {
            c.prepare_cached(
                "INSERT INTO runs (id, job, status, json) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET status = excluded.status, json = excluded.json",
            )?
            .execute(params![run.id, run.job, run.status, run.json])?;
            Ok(())
        })
        .await
    }

    async fn run(&self, id: &str) -> Result<Option<StoredRun>, EngineError> {
        let id = id.to_owned();
        self.with(move |c| {
            Ok(
                c.prepare_cached("SELECT id, job, status, json FROM runs WHERE id = ?1")?
                    .query_row(params![id], run_row)
                    .optional()?,
            )
        })
        .await
    }

    async fn runs_of_job(&self, job: &str, limit: usize) -> Result<Vec<StoredRun>, EngineError> {
        let job = job.to_owned();
        self.with(move |c| {
            let rows = c
                .prepare_cached(
                    "SELECT id, job, status, json FROM runs WHERE job = ?1 ORDER BY id DESC LIMIT ?2",
                )?
                .query_map(params![job, limit as i64], run_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    async fn runs_with_status(&self, statuses: &[&str]) -> Result<Vec<StoredRun>, EngineError> {
        let statuses: Vec<String> = statuses.iter().map(|s| s.to_string()).collect();
        self.with(move |c| {
            let mut out = Vec::new();
            for status in statuses {
                let rows = c
                    .prepare_cached("SELECT id, job, status, json FROM runs WHERE status = ?1")?
                    .query_map(params![status], run_row)?
                    .collect::<Result<Vec<_>, _>>()?;
                out.extend(rows);
            }
            Ok(out)
        })
        .await
    }

    async fn put_doc(&self, kind: &str, key: &str, json: String) -> Result<(), EngineError> {
        let (kind, key) = (kind.to_owned(), key.to_owned());
        self.with(move |c| {
            c.prepare_cached(
                "INSERT INTO docs (kind, key, json) VALUES (?1, ?2, ?3)
                 ON CONFLICT(kind, key) DO UPDATE SET json = excluded.json",
            )?
            .execute(params![kind, key, json])?;
            Ok(())
        })
        .await
    }

    async fn doc(&self, kind: &str, key: &str) -> Result<Option<String>, EngineError> {
        let (kind, key) = (kind.to_owned(), key.to_owned());
        self.with(move |c| {
            Ok(
                c.prepare_cached("SELECT json FROM docs WHERE kind = ?1 AND key = ?2")?
                    .query_row(params![kind, key], |r| r.get(0))
                    .optional()?,
            )
        })
        .await
    }

    async fn docs(&self, kind: &str) -> Result<Vec<(String, String)>, EngineError> {
        let kind = kind.to_owned();
        self.with(move |c| {
            let rows = c
                .prepare_cached("SELECT key, json FROM docs WHERE kind = ?1 ORDER BY key")?
                .query_map(params![kind], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    async fn delete_doc(&self, kind: &str, key: &str) -> Result<bool, EngineError> {
        let (kind, key) = (kind.to_owned(), key.to_owned());
        self.with(move |c| {
            Ok(
                c.prepare_cached("DELETE FROM docs WHERE kind = ?1 AND key = ?2")?
                    .execute(params![kind, key])?
                    > 0,
            )
        })
        .await
    }

    async fn unseen(
        &self,
        set: &str,
        keys: Vec<String>,
        not_before_ms: i64,
    ) -> Result<Vec<bool>, EngineError> {
        let set = set.to_owned();
        self.with(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT 1 FROM seen WHERE set_name = ?1 AND key = ?2 AND last_seen >= ?3",
            )?;
            keys.iter()
                .map(|k| {
                    let hit: Option<i64> = stmt
                        .query_row(params![set, k, not_before_ms], |r| r.get(0))
                        .optional()?;
                    Ok(hit.is_none())
                })
                .collect()
        })
        .await
    }

    async fn mark_seen(
        &self,
        set: &str,
        keys: Vec<String>,
        now_ms: i64,
        forget_before_ms: i64,
    ) -> Result<(), EngineError> {
        let set = set.to_owned();
        self.with(move |c| {
            let tx = c.transaction()?;
            {
                let mut upsert = tx.prepare_cached(
                    "INSERT INTO seen (set_name, key, last_seen) VALUES (?1, ?2, ?3)
                     ON CONFLICT(set_name, key) DO UPDATE SET last_seen = excluded.last_seen",
                )?;
                for k in &keys {
                    upsert.execute(params![set, k, now_ms])?;
                }
                tx.prepare_cached("DELETE FROM seen WHERE set_name = ?1 AND last_seen < ?2")?
                    .execute(params![set, forget_before_ms])?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn seen_count(&self, set: &str) -> Result<u64, EngineError> {
        let set = set.to_owned();
        self.with(move |c| {
            let n: i64 = c
                .prepare_cached("SELECT COUNT(*) FROM seen WHERE set_name = ?1")?
                .query_row(params![set], |r| r.get(0))?;
            Ok(n.max(0) as u64)
        })
        .await
    }

    async fn forget_set(&self, set: &str) -> Result<(), EngineError> {
        let set = set.to_owned();
        self.with(move |c| {
            c.prepare_cached("DELETE FROM seen WHERE set_name = ?1")?
                .execute(params![set])?;
            Ok(())
        })
        .await
    }

    async fn webhook_cursors(&self, webhook: &str) -> Result<Vec<WebhookCursor>, EngineError> {
        let webhook = webhook.to_owned();
        self.with(move |c| {
            let rows = c
                .prepare_cached(
                    "SELECT channel, epoch, seq FROM webhook_cursors WHERE webhook = ?1",
                )?
                .query_map(params![webhook], |r| {
                    Ok(WebhookCursor {
                        channel: r.get(0)?,
                        epoch: r.get(1)?,
                        seq: r.get::<_, i64>(2)?.max(0) as u64,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    async fn webhook_enqueue(&self, batch: Vec<Enqueue>) -> Result<(), EngineError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.with(move |c| {
            let tx = c.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT OR IGNORE INTO webhook_outbox (webhook, channel, epoch, seq, body, replay)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                let mut cursor = tx.prepare_cached(
                    "INSERT INTO webhook_cursors (webhook, channel, epoch, seq) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(webhook, channel) DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq",
                )?;
                for e in &batch {
                    for item in &e.items {
                        insert.execute(params![
                            e.webhook,
                            item.channel,
                            item.epoch,
                            item.seq as i64,
                            item.body,
                            item.replay
                        ])?;
                    }
                    for to in &e.cursors {
                        cursor.execute(params![e.webhook, to.channel, to.epoch, to.seq as i64])?;
                    }
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn webhook_pending(
        &self,
        webhook: &str,
        after_key: i64,
        limit: usize,
    ) -> Result<Vec<PendingDelivery>, EngineError> {
        let webhook = webhook.to_owned();
        self.with(move |c| {
            let rows = c
                .prepare_cached(
                    "SELECT key, channel, epoch, seq, body, attempt, next_attempt, replay FROM webhook_outbox
                     WHERE webhook = ?1 AND key > ?2 ORDER BY key LIMIT ?3",
                )?
                .query_map(
                    params![webhook, after_key, i64::try_from(limit).unwrap_or(i64::MAX)],
                    pending_row,
                )?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
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
        let webhook = webhook.to_owned();
        let channel = channel.to_owned();
        self.with(move |c| {
            let rows = c
                .prepare_cached(
                    "SELECT key, channel, epoch, seq, body, attempt, next_attempt, replay FROM webhook_outbox
                     WHERE webhook = ?1 AND channel = ?2 AND key > ?3 AND key <= ?4
                     ORDER BY key LIMIT ?5",
                )?
                .query_map(
                    params![
                        webhook,
                        channel,
                        after_key,
                        upto_key,
                        i64::try_from(limit).unwrap_or(i64::MAX)
                    ],
                    pending_row,
                )?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    async fn webhook_pending_count(&self, webhook: &str) -> Result<u64, EngineError> {
        let webhook = webhook.to_owned();
        self.with(move |c| {
            let n: i64 = c
                .prepare_cached("SELECT COUNT(*) FROM webhook_outbox WHERE webhook = ?1")?
                .query_row(params![webhook], |r| r.get(0))?;
            Ok(n.max(0) as u64)
        })
        .await
    }

    async fn webhook_settle(
        &self,
        webhook: &str,
        settles: Vec<Settle>,
        log: Vec<String>,
        keep_log: usize,
    ) -> Result<(), EngineError> {
        let webhook = webhook.to_owned();
        self.with(move |c| {
            let tx = c.transaction()?;
            {
                let mut done = tx.prepare_cached("DELETE FROM webhook_outbox WHERE key = ?1")?;
                let mut retry = tx.prepare_cached(
                    "UPDATE webhook_outbox SET attempt = ?2, next_attempt = ?3 WHERE key = ?1",
                )?;
                for s in &settles {
                    match s {
                        Settle::Done { key } => {
                            done.execute(params![key])?;
                        }
                        Settle::Retry {
                            key,
                            attempt,
                            next_attempt_ms,
                        } => {
                            retry.execute(params![key, attempt, next_attempt_ms])?;
                        }
                    }
                }
                let mut append =
                    tx.prepare_cached("INSERT INTO webhook_log (webhook, json) VALUES (?1, ?2)")?;
                for json in &log {
                    append.execute(params![webhook, json])?;
                }
                if !log.is_empty() {
                    tx.prepare_cached(
                        "DELETE FROM webhook_log WHERE webhook = ?1 AND id <= (
                             SELECT id FROM webhook_log WHERE webhook = ?1
                             ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                    )?
                    .execute(params![
                        webhook,
                        i64::try_from(keep_log).unwrap_or(i64::MAX)
                    ])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn webhook_log(&self, webhook: &str, limit: usize) -> Result<Vec<String>, EngineError> {
        let webhook = webhook.to_owned();
        self.with(move |c| {
            let rows = c
                .prepare_cached(
                    "SELECT json FROM webhook_log WHERE webhook = ?1 ORDER BY id DESC LIMIT ?2",
                )?
                .query_map(
                    params![webhook, i64::try_from(limit).unwrap_or(i64::MAX)],
                    |r| r.get(0),
                )?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    async fn webhook_forget(&self, webhook: &str) -> Result<(), EngineError> {
        let webhook = webhook.to_owned();
        self.with(move |c| {
            let tx = c.transaction()?;
            for table in ["webhook_outbox", "webhook_cursors", "webhook_log"] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE webhook = ?1"),
                    params![webhook],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }
}

fn pending_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PendingDelivery> {
    Ok(PendingDelivery {
        key: r.get(0)?,
        item: OutboxItem {
            channel: r.get(1)?,
            epoch: r.get(2)?,
            seq: r.get::<_, i64>(3)?.max(0) as u64,
            body: r.get(4)?,
            replay: r.get(7)?,
        },
        attempt: r.get::<_, i64>(5)?.clamp(0, i64::from(u32::MAX)) as u32,
        next_attempt_ms: r.get(6)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_docs_and_seen_keys_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let secret = {
            let s = SqliteState::open(dir.path()).unwrap();
            let secret = s.secret("run_tokens").await.unwrap();
            assert_eq!(secret, s.secret("run_tokens").await.unwrap());
            for (id, status) in [("01A", "succeeded"), ("01B", "running")] {
                s.put_run(StoredRun {
                    id: id.into(),
                    job: "build".into(),
                    status: status.into(),
                    json: format!("{{\"id\":\"{id}\"}}"),
                })
                .await
                .unwrap();
            }
            s.put_doc("feed", "so", "{}".into()).await.unwrap();
            s.mark_seen("feed:so", vec!["a".into(), "b".into()], 1_000, 0)
                .await
                .unwrap();
            secret
        };
        let s = SqliteState::open(dir.path()).unwrap();
        assert_eq!(s.secret("run_tokens").await.unwrap(), secret);
        let runs = s.runs_of_job("build", 10).await.unwrap();
        assert_eq!(
            runs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["01B", "01A"]
        );
        assert_eq!(s.runs_with_status(&["running"]).await.unwrap().len(), 1);
        assert_eq!(s.docs("feed").await.unwrap().len(), 1);
        assert!(s.delete_doc("feed", "so").await.unwrap());
        assert!(!s.delete_doc("feed", "so").await.unwrap());
        let fresh = s
            .unseen("feed:so", vec!["a".into(), "c".into()], 0)
            .await
            .unwrap();
        assert_eq!(fresh, [false, true]);
        // Keys last seen before the window count as unseen, and are forgotten on the next mark.
        assert_eq!(
            s.unseen("feed:so", vec!["a".into()], 2_000).await.unwrap(),
            [true]
        );
        s.mark_seen("feed:so", vec!["c".into()], 5_000, 2_000)
            .await
            .unwrap();
        assert_eq!(s.seen_count("feed:so").await.unwrap(), 1);
    }
}
