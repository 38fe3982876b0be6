//! The jobs supervisor: the one owner of run state. Starts, ticks, cancels and completions
//! all arrive as `Event`s on one queue, so concurrency limits are decided in one place.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rand::Rng;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::execute::{execute, publish_final};
use super::run::{Run, RunStatus, Trigger};
use super::spec::{JobSpec, Schedule};
use crate::engine::state::StateStore;
use crate::engine::EngineError;
use crate::hub::types::{ChannelName, Data, EventName, NewMessage};
use crate::hub::Hub;

/// The longest a run parameter value may be.
pub const MAX_PARAM_LEN: usize = 1024;

pub use crate::metrics::LabelSet;

/// What a run needs from the rest of the hub.
pub struct JobsContext {
    pub hub: Arc<Hub>,
    pub state: Arc<dyn StateStore>,
    /// The hub's own URL, given to runs as `TIDINGS_URL`.
    pub self_url: String,
    /// Signs each run's `TIDINGS_TOKEN`.
    pub token_key: Vec<u8>,
    pub runs_total: Family<LabelSet, Counter>,
    pub skipped_ticks_total: Family<LabelSet, Counter>,
    /// Runs that may execute at once across all jobs; more wait as `queued`.
    pub max_concurrent_runs: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no job named {0:?}")]
    UnknownJob(String),
    #[error("{0}")]
    BadParams(String),
    #[error("job {job:?} is busy (concurrency {limit})")]
    Busy {
        job: String,
        limit: usize,
        run: Box<Run>,
    },
    #[error(transparent)]
    Store(#[from] EngineError),
    #[error("the jobs supervisor has stopped")]
    Stopped,
}

/// A job as `GET /api/jobs` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobState {
    pub name: String,
    pub kind: &'static str,
    pub schedule: Option<String>,
    pub concurrency: usize,
    pub concurrency_key: Option<String>,
    pub params: Vec<String>,
    pub running: Vec<String>,
    pub last_run: Option<Run>,
    pub skipped_ticks: u64,
}

enum Event {
    Start {
        job: String,
        params: BTreeMap<String, String>,
        trigger: Trigger,
        attempt: u32,
        reply: Option<oneshot::Sender<Result<Run, StartError>>>,
    },
    Tick {
        job: String,
    },
    /// A run ended and is recorded final. `freed` is answered once its slot is free and
    /// `last_run` shows it; only then is its `exit` published.
    Finished {
        run: Run,
        freed: oneshot::Sender<()>,
    },
    Cancel {
        id: String,
        reply: oneshot::Sender<Result<Option<(Run, bool)>, StartError>>,
    },
    States {
        reply: oneshot::Sender<Vec<JobState>>,
    },
}

/// A cheap handle to the supervisor.
#[derive(Clone)]
pub struct Jobs {
    events: mpsc::Sender<Event>,
    specs: Arc<BTreeMap<String, Arc<JobSpec>>>,
    state: Arc<dyn StateStore>,
}

impl Jobs {
    /// Starts the supervisor and one scheduler per scheduled job. Interrupted runs are recorded
    /// (and retried) first. The returned tracker finishes once every run has ended after
    /// `shutdown`.
    pub async fn start(
        ctx: JobsContext,
        specs: Vec<JobSpec>,
        shutdown: CancellationToken,
    ) -> Result<(Jobs, TaskTracker), EngineError> {
        let specs: Arc<BTreeMap<String, Arc<JobSpec>>> = Arc::new(
            specs
                .into_iter()
                .map(|s| (s.name.clone(), Arc::new(s)))
                .collect(),
        );
        let ctx = Arc::new(ctx);
        let (tx, rx) = mpsc::channel(1024);
        let tasks = TaskTracker::new();
        let mut supervisor = Supervisor {
            ctx: ctx.clone(),
            specs: specs.clone(),
            events: tx.clone(),
            running: HashMap::new(),
            queued: VecDeque::new(),
            last_run: HashMap::new(),
            skipped: HashMap::new(),
            runs: TaskTracker::new(),
            shutdown: shutdown.clone(),
        };
        let retry = supervisor.recover_interrupted().await?;
        // After the recovery, so a run the restart interrupted shows as such.
        for name in specs.keys() {
            if let Some(stored) = ctx.state.runs_of_job(name, 1).await?.into_iter().next() {
                supervisor
                    .last_run
                    .insert(name.clone(), Run::from_stored(&stored)?);
            }
        }
        for (job, params, trigger, attempt) in retry {
            let _ = tx.try_send(Event::Start {
                job,
                params,
                trigger,
                attempt,
                reply: None,
            });
        }
        tasks.spawn(supervisor.run(rx));
        for spec in specs.values() {
            if !matches!(spec.schedule, Schedule::Manual) {
                tasks.spawn(schedule_ticks(
                    spec.clone(),
                    ctx.state.clone(),
                    tx.clone(),
                    shutdown.clone(),
                ));
            }
        }
        tasks.close();
        Ok((
            Jobs {
                events: tx,
                specs,
                state: ctx.state.clone(),
            },
            tasks,
        ))
    }

    pub fn spec(&self, name: &str) -> Option<&Arc<JobSpec>> {
        self.specs.get(name)
    }

    pub async fn start_run(
        &self,
        job: &str,
        params: BTreeMap<String, String>,
        trigger: Trigger,
    ) -> Result<Run, StartError> {
        let (reply, rx) = oneshot::channel();
        self.events
            .send(Event::Start {
                job: job.to_owned(),
                params,
                trigger,
                attempt: 1,
                reply: Some(reply),
            })
            .await
            .map_err(|_| StartError::Stopped)?;
        rx.await.map_err(|_| StartError::Stopped)?
    }

    /// Cancels a run; `None` when no such run exists. The flag says whether anything was
    /// cancelled (false: the run had already finished and is returned unchanged).
    pub async fn cancel(&self, id: &str) -> Result<Option<(Run, bool)>, StartError> {
        let (reply, rx) = oneshot::channel();
        self.events
            .send(Event::Cancel {
                id: id.to_owned(),
                reply,
            })
            .await
            .map_err(|_| StartError::Stopped)?;
        rx.await.map_err(|_| StartError::Stopped)?
    }

    pub async fn states(&self) -> Result<Vec<JobState>, StartError> {
        let (reply, rx) = oneshot::channel();
        self.events
            .send(Event::States { reply })
            .await
            .map_err(|_| StartError::Stopped)?;
        rx.await.map_err(|_| StartError::Stopped)
    }

    pub async fn run(&self, id: &str) -> Result<Option<Run>, EngineError> {
        match self.state.run(id).await? {
            Some(stored) => Ok(Some(Run::from_stored(&stored)?)),
            None => Ok(None),
        }
    }

    pub async fn runs_of(&self, job: &str, limit: usize) -> Result<Vec<Run>, EngineError> {
        self.state
            .runs_of_job(job, limit)
            .await?
            .iter()
            .map(Run::from_stored)
            .collect()
    }
}

struct Running {
    run: Run,
    cancel: CancellationToken,
}

struct Supervisor {
    ctx: Arc<JobsContext>,
    specs: Arc<BTreeMap<String, Arc<JobSpec>>>,
    events: mpsc::Sender<Event>,
    running: HashMap<String, Running>,
    /// Runs waiting for a global slot, oldest first.
    queued: VecDeque<Run>,
    last_run: HashMap<String, Run>,
    skipped: HashMap<String, u64>,
    runs: TaskTracker,
    shutdown: CancellationToken,
}

/// Validates run parameters: only declared names, bounded printable values.
pub fn check_params(spec: &JobSpec, params: &BTreeMap<String, String>) -> Result<(), StartError> {
    for (name, value) in params {
        if !spec.params.contains(name) {
            let allowed = if spec.params.is_empty() {
                "it takes none".to_owned()
            } else {
                format!("allowed: {}", spec.params.join(", "))
            };
            return Err(StartError::BadParams(format!(
                "job {:?} has no parameter {name:?} ({allowed})",
                spec.name
            )));
        }
        if value.len() > MAX_PARAM_LEN {
            return Err(StartError::BadParams(format!(
                "parameter {name:?} is over {MAX_PARAM_LEN} bytes"
            )));
        }
        if value.chars().any(|c| c.is_control()) {
            return Err(StartError::BadParams(format!(
                "parameter {name:?} contains control characters"
            )));
        }
    }
    Ok(())
}

/// Publishes a run's state change on `jobs:{name}`.
pub async fn publish_run_event(hub: &Hub, run: &Run) {
    let Ok(channel) = ChannelName::parse(&format!("jobs:{}", run.job)) else {
        return;
    };
    let data = match serde_json::to_value(run)
        .ok()
        .and_then(|v| Data::from_value(&v).ok())
    {
        Some(d) => d,
        None => return,
    };
    let message = NewMessage {
        id: None,
        event: EventName::parse("run").unwrap_or_default(),
        data,
    };
    if let Err(error) = hub.publish(&channel, vec![message]).await {
        tracing::warn!(%error, run = %run.id, "could not publish a run's state change");
    }
}

fn backoff(attempt: u32) -> Duration {
    let base = 5.0 * 2f64.powi(attempt.saturating_sub(1).min(16) as i32);
    let capped = base.min(600.0);
    let jitter = rand::thread_rng().gen_range(0.8..=1.2);
    Duration::from_secs_f64(capped * jitter)
}

impl Supervisor {
    async fn run(mut self, mut rx: mpsc::Receiver<Event>) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                event = rx.recv() => match event {
                    Some(event) => self.handle(event).await,
                    None => break,
                },
            }
        }
        self.stop(rx).await;
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Start {
                job,
                params,
                trigger,
                attempt,
                reply,
            } => {
                let result = self.start(&job, params, trigger, attempt).await;
                if let Err(error) = &result {
                    if reply.is_none() {
                        tracing::warn!(%error, %job, "a retry could not start");
                    }
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Event::Tick { job } => self.tick(&job).await,
            Event::Finished { run, freed } => {
                self.finished(run).await;
                let _ = freed.send(());
            }
            Event::Cancel { id, reply } => {
                let _ = reply.send(self.cancel(&id).await);
            }
            Event::States { reply } => {
                let _ = reply.send(self.states());
            }
        }
    }

    fn busy_with<'a>(&'a self, spec: &JobSpec, key: Option<&str>) -> Vec<&'a Run> {
        self.running
            .values()
            .map(|r| &r.run)
            .chain(self.queued.iter())
            .filter(|r| r.job == spec.name)
            .filter(|r| key.is_none() || r.key_value(spec.concurrency_key.as_deref()) == key)
            .collect()
    }

    async fn start(
        &mut self,
        job: &str,
        params: BTreeMap<String, String>,
        trigger: Trigger,
        attempt: u32,
    ) -> Result<Run, StartError> {
        let spec = self
            .specs
            .get(job)
            .cloned()
            .ok_or_else(|| StartError::UnknownJob(job.to_owned()))?;
        check_params(&spec, &params)?;
        let key = spec
            .concurrency_key
            .as_deref()
            .and_then(|k| params.get(k))
            .map(String::as_str);
        let busy = self.busy_with(&spec, key);
        if busy.len() >= spec.concurrency {
            if let Some(first) = busy.first() {
                return Err(StartError::Busy {
                    job: job.to_owned(),
                    limit: spec.concurrency,
                    run: Box::new((*first).clone()),
                });
            }
        }
        let run = Run::new(job, trigger, attempt, params);
        self.ctx.state.put_run(run.to_stored()?).await?;
        publish_run_event(&self.ctx.hub, &run).await;
        if self.running.len() < self.ctx.max_concurrent_runs {
            Ok(self.launch(spec, run).await)
        } else {
            self.queued.push_back(run.clone());
            Ok(run)
        }
    }

    /// Marks `run` running, persists it and starts executing it.
    async fn launch(&mut self, spec: Arc<JobSpec>, mut run: Run) -> Run {
        run.status = RunStatus::Running;
        run.started = Some(crate::clock::rfc3339_ms(crate::clock::now_ms()));
        match run.to_stored() {
            Ok(stored) => {
                if let Err(error) = self.ctx.state.put_run(stored).await {
                    tracing::warn!(%error, run = %run.id, "could not record a run as running");
                }
            }
            Err(error) => tracing::warn!(%error, "could not encode a run"),
        }
        publish_run_event(&self.ctx.hub, &run).await;
        let cancel = self.shutdown.child_token();
        self.running.insert(
            run.id.clone(),
            Running {
                run: run.clone(),
                cancel: cancel.clone(),
            },
        );
        let ctx = self.ctx.clone();
        let events = self.events.clone();
        let to_execute = run.clone();
        self.runs.spawn(async move {
            let finished = execute(ctx.clone(), spec, to_execute, cancel).await;
            // The slot is freed before anyone can learn that the run ended: a client that sees
            // `exit` may start the next run at once (SPEC §4).
            let (freed, slot_freed) = oneshot::channel();
            let event = Event::Finished {
                run: finished.clone(),
                freed,
            };
            if events.send(event).await.is_ok() {
                // Err: the supervisor is gone (shutting down); announce anyway.
                let _ = slot_freed.await;
            }
            publish_final(&ctx.hub, &finished).await;
        });
        run
    }

    async fn tick(&mut self, job: &str) {
        let Some(spec) = self.specs.get(job).cloned() else {
            return;
        };
        if let Err(error) = self
            .ctx
            .state
            .put_doc("job_tick", job, crate::clock::now_ms().to_string())
            .await
        {
            tracing::warn!(%error, %job, "could not record a tick");
        }
        match self.start(job, BTreeMap::new(), Trigger::Schedule, 1).await {
            Ok(_) => {}
            Err(StartError::Busy { .. }) => {
                *self.skipped.entry(job.to_owned()).or_default() += 1;
                self.ctx
                    .skipped_ticks_total
                    .get_or_create(&vec![("job", spec.name.clone())])
                    .inc();
                tracing::info!(%job, "tick skipped: the job is still running");
            }
            Err(error) => tracing::warn!(%error, %job, "scheduled run could not start"),
        }
    }

    async fn finished(&mut self, run: Run) {
        self.running.remove(&run.id);
        self.ctx
            .runs_total
            .get_or_create(&vec![
                ("job", run.job.clone()),
                ("status", run.status.as_str().to_owned()),
            ])
            .inc();
        self.last_run.insert(run.job.clone(), run.clone());
        if let Some(spec) = self.specs.get(&run.job).cloned() {
            self.maybe_retry(&spec, &run);
        }
        self.launch_queued().await;
    }

    fn maybe_retry(&self, spec: &JobSpec, run: &Run) {
        if !run.status.is_retryable() || run.attempt > spec.retries || self.shutdown.is_cancelled()
        {
            return;
        }
        let delay = backoff(run.attempt);
        tracing::info!(job = %run.job, run = %run.id, attempt = run.attempt + 1, ?delay, "retrying");
        let events = self.events.clone();
        let shutdown = self.shutdown.clone();
        let event = Event::Start {
            job: run.job.clone(),
            params: run.params.clone(),
            trigger: run.trigger,
            attempt: run.attempt + 1,
            reply: None,
        };
        self.runs.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(delay) => { let _ = events.send(event).await; }
            }
        });
    }

    async fn launch_queued(&mut self) {
        while self.running.len() < self.ctx.max_concurrent_runs {
            let Some(run) = self.queued.pop_front() else {
                return;
            };
            match self.specs.get(&run.job).cloned() {
                Some(spec) => {
                    self.launch(spec, run).await;
                }
                None => continue,
            }
        }
    }

    async fn cancel(&mut self, id: &str) -> Result<Option<(Run, bool)>, StartError> {
        if let Some(running) = self.running.get(id) {
            running.cancel.cancel();
            return Ok(Some((running.run.clone(), true)));
        }
        if let Some(pos) = self.queued.iter().position(|r| r.id == id) {
            if let Some(mut run) = self.queued.remove(pos) {
                run.status = RunStatus::Cancelled;
                run.finished = Some(crate::clock::rfc3339_ms(crate::clock::now_ms()));
                self.ctx.state.put_run(run.to_stored()?).await?;
                self.last_run.insert(run.job.clone(), run.clone());
                publish_final(&self.ctx.hub, &run).await;
                return Ok(Some((run, true)));
            }
        }
        match self.ctx.state.run(id).await? {
            Some(stored) => Ok(Some((Run::from_stored(&stored)?, false))),
            None => Ok(None),
        }
    }

    fn states(&self) -> Vec<JobState> {
        self.specs
            .values()
            .map(|spec| {
                let mut running: Vec<String> = self
                    .running
                    .values()
                    .filter(|r| r.run.job == spec.name)
                    .map(|r| r.run.id.clone())
                    .collect();
                running.sort();
                JobState {
                    name: spec.name.clone(),
                    kind: "command",
                    schedule: spec.schedule.describe(),
                    concurrency: spec.concurrency,
                    concurrency_key: spec.concurrency_key.clone(),
                    params: spec.params.clone(),
                    running,
                    last_run: self.last_run.get(&spec.name).cloned(),
                    skipped_ticks: self.skipped.get(&spec.name).copied().unwrap_or(0),
                }
            })
            .collect()
    }

    /// Runs left `running`/`queued` by a previous process are `interrupted`; returns the ones
    /// to retry.
    async fn recover_interrupted(
        &self,
    ) -> Result<Vec<(String, BTreeMap<String, String>, Trigger, u32)>, EngineError> {
        let mut retry = Vec::new();
        for stored in self
            .ctx
            .state
            .runs_with_status(&["running", "queued"])
            .await?
        {
            let mut run = Run::from_stored(&stored)?;
            let id = run.id.clone();
            let left =
                tokio::task::spawn_blocking(move || super::process::kill_leftovers_of_run(&id))
                    .await
                    .unwrap_or(0);
            if left > 0 {
                tracing::warn!(run = %run.id, processes = left, "killed processes a previous hub left running");
            }
            run.status = RunStatus::Interrupted;
            run.finished = Some(crate::clock::rfc3339_ms(crate::clock::now_ms()));
            run.error = Some("the hub stopped while this run was active".into());
            self.ctx.state.put_run(run.to_stored()?).await?;
            publish_final(&self.ctx.hub, &run).await;
            tracing::warn!(job = %run.job, run = %run.id, "run interrupted by a restart");
            if let Some(spec) = self.specs.get(&run.job) {
                if run.attempt <= spec.retries {
                    retry.push((
                        run.job.clone(),
                        run.params.clone(),
                        run.trigger,
                        run.attempt + 1,
                    ));
                }
            }
        }
        Ok(retry)
    }

    /// Cancels every running run and waits for each to finish (they SIGTERM, then SIGKILL
    /// after their grace), recording them `cancelled`.
    async fn stop(mut self, mut rx: mpsc::Receiver<Event>) {
        for running in self.running.values() {
            running.cancel.cancel();
        }
        for mut run in std::mem::take(&mut self.queued) {
            run.status = RunStatus::Cancelled;
            run.finished = Some(crate::clock::rfc3339_ms(crate::clock::now_ms()));
            match run.to_stored() {
                Ok(stored) => {
                    if let Err(error) = self.ctx.state.put_run(stored).await {
                        tracing::warn!(%error, run = %run.id, "could not record a queued run as cancelled");
                    }
                }
                Err(error) => tracing::warn!(%error, "could not encode a run"),
            }
            // Its followers wait for an `exit` like any other run's.
            publish_final(&self.ctx.hub, &run).await;
        }
        while !self.running.is_empty() {
            match rx.recv().await {
                Some(Event::Finished { run, freed }) => {
                    self.running.remove(&run.id);
                    let _ = freed.send(());
                }
                Some(Event::Start {
                    reply: Some(reply), ..
                }) => {
                    let _ = reply.send(Err(StartError::Stopped));
                }
                Some(Event::Cancel { reply, .. }) => {
                    let _ = reply.send(Err(StartError::Stopped));
                }
                Some(_) => {}
                None => break,
            }
        }
        self.runs.close();
        self.runs.wait().await;
    }
}

/// Sends a `Tick` at each scheduled time until shutdown. `every` fires at start-up first;
/// a cron job with `catch_up` fires once at start-up if a tick was missed while down.
async fn schedule_ticks(
    spec: Arc<JobSpec>,
    state: Arc<dyn StateStore>,
    events: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) {
    let now = chrono::Utc::now();
    let fire_now = match &spec.schedule {
        Schedule::Every(_) => true,
        Schedule::Cron { .. } if spec.catch_up => {
            let last = state
                .doc("job_tick", &spec.name)
                .await
                .ok()
                .flatten()
                .and_then(|s| s.parse::<i64>().ok())
                .and_then(chrono::DateTime::from_timestamp_millis);
            match last {
                Some(last) => spec.schedule.next_after(last).is_some_and(|t| t <= now),
                None => false,
            }
        }
        _ => false,
    };
    let tick = || Event::Tick {
        job: spec.name.clone(),
    };
    if fire_now && events.send(tick()).await.is_err() {
        return;
    }
    let mut from = chrono::Utc::now();
    loop {
        let Some(next) = spec.schedule.next_after(from) else {
            return;
        };
        let wait = (next - chrono::Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if events.send(tick()).await.is_err() {
            return;
        }
        // Ticks missed while the process was suspended are not replayed one by one.
        from = next.max(chrono::Utc::now() - chrono::Duration::milliseconds(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        for (attempt, base) in [(1u32, 5.0), (2, 10.0), (3, 20.0), (10, 600.0), (40, 600.0)] {
            let d = backoff(attempt).as_secs_f64();
            assert!(
                d >= base * 0.8 - 1e-9 && d <= base * 1.2 + 1e-9,
                "{attempt}: {d}"
            );
        }
    }
}
