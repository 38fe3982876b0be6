//! `tidings bench feeds`: feed entries parsed, deduped and stored per second, from feed
//! documents on disk, in this process (no hub needed).
//!
//! Two phases over the same documents, read into memory first so only the work is timed:
//! parse only ([`parse::parse_feed`], what the poller runs on each fetched body), then the
//! poller's whole path after the fetch — parse, then [`poller::publish_new`] (dedupe against
//! the feed's seen set, publish the new entries as one batch, remember the keys) — into a fresh
//! embedded store made with the hub's default settings in a temporary folder. Each document is
//! its own feed. With `--rounds` above 1 the later rounds find every entry already seen: that is
//! a feed polled again unchanged, the poller's common case.
//!
//! `scripts/feedparser_bench.py` times Python feedparser on the same list of documents, in the
//! same order; `scripts/bench_feeds.sh` runs both and prints the ratio.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::{json, Value};

use super::procstat::{self, Proc};
use super::stats::human_rate;
use super::{BenchError, CommonArgs, Report};
use crate::config::{Config, Overrides};
use crate::engine::sqlite::{SqliteEngine, SqliteOptions, Sync};
use crate::engine::sqlite_state::SqliteState;
use crate::feeds::parse;
use crate::feeds::poller::{self, FeedsContext, LabelSet};
use crate::hub::live::Live;
use crate::hub::Hub;
use crate::jobs::spec::{FeedSource, FeedSpec};
use crate::metrics::Metrics;

/// The base URL documents are parsed against (the corpus' reference extraction used it).
const BASE_URL: &str = "http://127.0.0.1:8097/";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncArg {
    /// fsync every commit (the hub's default).
    Full,
    /// fsync at checkpoints only.
    Normal,
}

#[derive(Debug, clap::Args)]
pub struct FeedsArgs {
    /// A folder of feed documents: its `manifest.jsonl` (one `{"path","headers"}` per line, in
    /// order) when it has one, else every file under it, sorted by path.
    #[arg(long)]
    pub corpus: PathBuf,
    /// Use only the first N documents.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Passes over the documents in each phase.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// The store's durability (default: the hub's default, full).
    #[arg(long, value_enum, default_value_t = SyncArg::Full)]
    pub sync: SyncArg,
    /// Documents stored at once in the store phase: the hub polls its feeds concurrently, and
    /// the store commits concurrent publishes together (1: one after another).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// One document, read into memory.
pub struct Document {
    /// Relative to the corpus folder, with `/`.
    pub path: String,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl Document {
    fn base_url(&self) -> String {
        format!("{BASE_URL}{}", self.path)
    }
}

/// Totals of one phase.
#[derive(Default)]
struct Phase {
    seconds: f64,
    /// Documents handled, over all rounds.
    documents: u64,
    entries: u64,
    errors: u64,
    first_error: Option<String>,
    /// Entries published as new (the store phase only).
    stored: u64,
    /// Per round: seconds.
    rounds: Vec<f64>,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.entries as f64 / self.seconds.max(1e-9)
    }

    fn to_json(&self) -> Value {
        json!({
            "seconds": (self.seconds * 1e6).round() / 1e6,
            "entries": self.entries,
            "entries_per_s": self.rate().round(),
            "documents_per_s": (self.documents as f64 / self.seconds.max(1e-9)).round(),
            "errors": self.errors,
            "first_error": self.first_error,
            "round_seconds": self.rounds.iter().map(|s| (s * 1e6).round() / 1e6).collect::<Vec<_>>(),
        })
    }

    fn error(&mut self, what: String) {
        self.errors += 1;
        self.first_error.get_or_insert(what);
    }
}

pub async fn run(args: FeedsArgs) -> Result<Report, BenchError> {
    if args.rounds == 0 || args.limit == Some(0) {
        return Err(BenchError::Usage(
            "--rounds and --limit must be at least 1".into(),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(args.common.timeout);
    let docs = load_corpus(&args.corpus, args.limit)?;
    let bytes: usize = docs.iter().map(|d| d.body.len()).sum();
    let docs = Arc::new(docs);
    let me = Proc::me();

    let cpu0 = procstat::try_sample(Some(&me));
    let task_docs = docs.clone();
    let rounds = args.rounds;
    let parse_only = tokio::task::spawn_blocking(move || parse_phase(&task_docs, rounds, deadline))
        .await
        .map_err(|e| BenchError::Io(format!("the parse phase failed: {e}")))?;
    let cpu1 = procstat::try_sample(Some(&me));
    let store = store_phase(&docs, &args, deadline).await?;
    let cpu2 = procstat::try_sample(Some(&me));
    let timed_out = Instant::now() >= deadline;

    let cpu = |a: &Option<procstat::Sample>, b: &Option<procstat::Sample>| match (a, b) {
        (Some(a), Some(b)) => json!(((b.cpu_s - a.cpu_s) * 1000.0).round() / 1000.0),
        _ => Value::Null,
    };
    let mut parse_json = parse_only.to_json();
    parse_json["cpu_s"] = cpu(&cpu0, &cpu1);
    let mut store_json = store.to_json();
    store_json["cpu_s"] = cpu(&cpu1, &cpu2);
    store_json["stored"] = json!(store.stored);
    let json = json!({
        "scenario": "feeds",
        "params": {
            "corpus": args.corpus.display().to_string(),
            "limit": args.limit,
            "rounds": args.rounds,
            "sync": format!("{:?}", args.sync).to_lowercase(),
            "concurrency": args.concurrency,
            "timeout_s": args.common.timeout,
        },
        "documents": docs.len(),
        "bytes": bytes,
        "entries_per_round": parse_only.entries / u64::from(args.rounds),
        "parse": parse_json,
        "parse_dedupe_store": store_json,
        "timed_out": timed_out,
        "rss_kib_peak": cpu2.as_ref().map(|s| s.hwm_kib),
    });
    let summary = format!(
        "feeds {} docs ({:.1} MiB) × {} rounds: parse {} entries/s ({} errors); parse+dedupe+store {} entries/s ({} stored, {} errors)",
        docs.len(),
        bytes as f64 / (1024.0 * 1024.0),
        args.rounds,
        human_rate(parse_only.rate()),
        parse_only.errors / u64::from(args.rounds),
        human_rate(store.rate()),
        store.stored,
        store.errors,
    );
    let problem = timed_out.then(|| "the run did not finish before --timeout".to_owned());
    Ok(Report {
        json,
        summary,
        problem,
    })
}

/// Reads the documents named by `manifest.jsonl` (or every file, sorted) into memory.
pub fn load_corpus(dir: &Path, limit: Option<usize>) -> Result<Vec<Document>, BenchError> {
    let manifest = dir.join("manifest.jsonl");
    let mut listed = if manifest.is_file() {
        from_manifest(&manifest)?
    } else {
        let mut found = Vec::new();
        walk(dir, dir, &mut found)?;
        found.sort();
        found.into_iter().map(|p| (p, None)).collect()
    };
    if let Some(n) = limit {
        listed.truncate(n);
    }
    if listed.is_empty() {
        return Err(BenchError::Usage(format!(
            "--corpus {}: no documents there",
            dir.display()
        )));
    }
    listed
        .into_iter()
        .map(|(path, content_type)| {
            let body = std::fs::read(dir.join(&path))
                .map_err(|e| BenchError::Io(format!("{}: {e}", dir.join(&path).display())))?;
            Ok(Document {
                path,
                content_type,
                body,
            })
        })
        .collect()
}

/// `(path, Content-Type)` of each manifest line, in order.
fn from_manifest(manifest: &Path) -> Result<Vec<(String, Option<String>)>, BenchError> {
    let text = std::fs::read_to_string(manifest)
        .map_err(|e| BenchError::Io(format!("{}: {e}", manifest.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: String| {
            BenchError::Usage(format!("{} line {}: {why}", manifest.display(), i + 1))
        };
        let v: Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let path = v["path"]
            .as_str()
            .ok_or_else(|| bad("no \"path\"".into()))?
            .to_owned();
        let content_type = v["headers"].as_object().and_then(|h| {
            h.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                .and_then(|(_, v)| v.as_str().map(str::to_owned))
        });
        out.push((path, content_type));
    }
    Ok(out)
}

/// Every regular file under `dir`, as paths relative to `root` joined with `/`.
fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), BenchError> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| BenchError::Io(format!("{}: {e}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(|e| BenchError::Io(format!("{}: {e}", dir.display())))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|e| BenchError::Io(format!("{}: {e}", path.display())))?;
        if kind.is_dir() {
            walk(root, &path, out)?;
        } else if kind.is_file() {
            if let Ok(rel) = path.strip_prefix(root) {
                let parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
    }
    Ok(())
}

/// Parses every document `rounds` times (stopping at the deadline).
fn parse_phase(docs: &[Document], rounds: u32, deadline: Instant) -> Phase {
    let mut phase = Phase::default();
    for _ in 0..rounds {
        if Instant::now() >= deadline {
            break;
        }
        let started = Instant::now();
        for doc in docs {
            phase.documents += 1;
            match parse::parse_feed(&doc.body, doc.content_type.as_deref(), &doc.base_url()) {
                Ok(feed) => phase.entries += feed.entries.len() as u64,
                Err(e) => phase.error(format!("{}: {e}", doc.path)),
            }
        }
        let took = started.elapsed().as_secs_f64();
        phase.seconds += took;
        phase.rounds.push(took);
    }
    phase
}

/// A store like the hub's (its default settings) in a folder of its own, removed on drop.
struct TempStore {
    dir: PathBuf,
    ctx: Option<FeedsContext>,
}

impl TempStore {
    fn open(sync: SyncArg) -> Result<Self, BenchError> {
        let defaults = Config::from_toml("", &Overrides::default())
            .map_err(|e| BenchError::Usage(format!("the default configuration: {e}")))?;
        let dir = std::env::temp_dir().join(format!(
            "tidings-bench-feeds-{}-{}",
            std::process::id(),
            crate::clock::now_ms()
        ));
        std::fs::create_dir_all(&dir)
            .map_err(|e| BenchError::Io(format!("{}: {e}", dir.display())))?;
        let mut store = Self { dir, ctx: None };
        let store_error = |e: crate::engine::EngineError| BenchError::Io(format!("the store: {e}"));
        let metrics = Arc::new(Metrics::default());
        let retention = Arc::new(defaults.retention.clone());
        let live = Arc::new(Live::new(retention.clone()));
        let dedupe_window_ms =
            i64::try_from(defaults.dedupe_window.as_millis()).unwrap_or(i64::MAX);
        let engine = SqliteEngine::open(
            &SqliteOptions {
                dir: store.dir.clone(),
                sync: match sync {
                    SyncArg::Full => Sync::Full,
                    SyncArg::Normal => Sync::Normal,
                },
                dedupe_window_ms,
            },
            live.clone(),
            metrics.clone(),
        )
        .map_err(store_error)?;
        let state = SqliteState::open(&store.dir).map_err(store_error)?;
        store.ctx = Some(FeedsContext {
            hub: Arc::new(Hub::new(Arc::new(engine), live, retention, metrics)),
            state: Arc::new(state),
            dedupe_window: defaults.dedupe_window,
            polls_total: Family::<LabelSet, Counter>::default(),
            fetch_timeout: defaults.feed_timeout,
            node: crate::cluster::NodeId::generate(),
        });
        Ok(store)
    }

    /// Commits and closes the store, then removes its folder.
    async fn close(mut self) {
        if let Some(ctx) = self.ctx.take() {
            ctx.hub.engine().close().await;
        }
    }
}

impl Drop for TempStore {
    fn drop(&mut self) {
        // The store must be closed (or dropped) before its files go.
        self.ctx.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Parses each document and runs the poller's dedupe-and-publish on its entries, each
/// document as its own feed, `rounds` times.
async fn store_phase(
    docs: &[Document],
    args: &FeedsArgs,
    deadline: Instant,
) -> Result<Phase, BenchError> {
    let store = TempStore::open(args.sync)?;
    let Some(ctx) = store.ctx.as_ref() else {
        return Err(BenchError::Io("the store did not open".into()));
    };
    let specs: Vec<FeedSpec> = (0..docs.len())
        .map(|i| FeedSpec {
            name: format!("d{i}"),
            url: docs[i].base_url(),
            every: Duration::from_secs(60),
            channel: format!("feeds:d{i}"),
            source: FeedSource::Config,
        })
        .collect();
    // Each feed's keys of its last document, as the poller keeps them in its state.
    let mut previous: Vec<Vec<String>> = vec![Vec::new(); docs.len()];
    let mut phase = Phase::default();
    for _ in 0..args.rounds {
        if Instant::now() >= deadline {
            break;
        }
        let started = Instant::now();
        let previous_round = &previous;
        let specs = &specs;
        let outcomes: Vec<_> = futures_util::stream::iter(docs.iter().enumerate())
            .map(|(i, doc)| async move {
                let entries = match parse::parse_feed(
                    &doc.body,
                    doc.content_type.as_deref(),
                    &doc.base_url(),
                ) {
                    Ok(feed) => feed.entries,
                    Err(_) => return (i, 0, None), // counted in the parse phase
                };
                let count = entries.len() as u64;
                let stored = poller::publish_new(ctx, &specs[i], entries, &previous_round[i]).await;
                (i, count, Some(stored))
            })
            .buffer_unordered(args.concurrency.max(1))
            .collect()
            .await;
        for (i, count, stored) in outcomes {
            phase.documents += 1;
            phase.entries += count;
            match stored {
                None => {}
                Some(Ok((published, keys))) => {
                    phase.stored += published;
                    previous[i] = keys;
                }
                Some(Err(e)) => phase.error(format!("{}: {e}", docs[i].path)),
            }
        }
        let took = started.elapsed().as_secs_f64();
        phase.seconds += took;
        phase.rounds.push(took);
    }
    store.close().await;
    Ok(phase)
}
