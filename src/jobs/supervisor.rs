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
use crate::cluster::{self, NodeId};
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
    /// This node, holder of its runs' cluster leases.
    pub node: NodeId,
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
        /// A run holding the slot; None when another node holds it and its record is not
        /// readable yet.
        run: Option<Box<Run>>,
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
            leases: HashMap::new(),
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
    /// The cluster leases each queued or running run of this node holds: its slot, then
    /// `run:{id}`. Renewed every `cluster::RENEW_EVERY`, released once the run's record is final.
    leases: HashMap<String, Vec<String>>,
    runs: TaskTracker,
    shutdown: CancellationToken,
}

/// A run to start again: job, parameters, trigger, attempt.
type Retry = (String, BTreeMap<String, String>, Trigger, u32);

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
        let shared = self.ctx.state.is_shared();
        let mut renew = tokio::time::interval(cluster::RENEW_EVERY);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut orphans = tokio::time::interval(cluster::ORPHAN_CHECK_EVERY);
        orphans.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The start-up recovery has just run.
        orphans.reset();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                event = rx.recv() => match event {
                    Some(event) => self.handle(event).await,
                    None => break,
                },
                _ = renew.tick() => self.renew_leases().await,
                _ = orphans.tick(), if shared => self.recover_orphans().await,
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
            .cloned();
        let busy = self.busy_with(&spec, key.as_deref());
        if busy.len() >= spec.concurrency {
            if let Some(first) = busy.first() {
                return Err(StartError::Busy {
                    job: job.to_owned(),
                    limit: spec.concurrency,
                    run: Some(Box::new((*first).clone())),
                });
            }
        }
        let run = Run::new(job, trigger, attempt, params);
        // Single-flight across nodes: a slot of the job in the cluster, held while the run is
        // queued or running. Taken before the record exists, so no node ever sees a live run
        // without its lease.
        let Some(leases) = self.take_leases(&spec, key.as_deref(), &run.id).await? else {
            return Err(StartError::Busy {
                job: job.to_owned(),
                limit: spec.concurrency,
                run: self
                    .active_elsewhere(&spec, key.as_deref())
                    .await
                    .map(Box::new),
            });
        };
        self.leases.insert(run.id.clone(), leases);
        let recorded = match run.to_stored() {
            Ok(stored) => self.ctx.state.put_run(stored).await,
            Err(error) => Err(error),
        };
        if let Err(error) = recorded {
            self.release_leases(&run.id).await;
            return Err(error.into());
        }
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
        // Its record is final (`execute` wrote it): the slot may go to any node now.
        self.release_leases(&run.id).await;
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
                let recorded = match run.to_stored() {
                    Ok(stored) => self.ctx.state.put_run(stored).await,
                    Err(error) => Err(error),
                };
                self.release_leases(&run.id).await;
                recorded?;
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

    /// Runs left `running`/`queued` by a process that is gone are `interrupted`; returns the
    /// ones to retry. A run counts as gone once nobody renews its `run:` lease: on a one-node
    /// store (every lease granted) that is every such run not of this process, i.e. what a
    /// previous process left, as before clusters; on a shared store it is the runs of nodes
    /// that died (or lost the store) at least `cluster::LEASE_TTL` ago.
    async fn recover_interrupted(&self) -> Result<Vec<Retry>, EngineError> {
        let mut retry = Vec::new();
        for stored in self
            .ctx
            .state
            .runs_with_status(&["running", "queued"])
            .await?
        {
            if self.running.contains_key(&stored.id)
                || self.queued.iter().any(|r| r.id == stored.id)
            {
                continue;
            }
            let Some(mut run) = self.orphan(&stored.id).await? else {
                continue;
            };
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
            let recorded = match run.to_stored() {
                Ok(stored) => self.ctx.state.put_run(stored).await,
                Err(error) => Err(error),
            };
            if let Err(error) = recorded {
                // Its recovery lease lapses, so it is found again (at the next check on a
                // shared store, at the next start on a one-node store).
                tracing::warn!(%error, run = %run.id, "could not record a run as interrupted");
                continue;
            }
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

    /// The run `id`, if its node is gone and this node is the one to record that. Taking its
    /// `run:` lease proves nobody renews it, and keeps other nodes from recovering it too for
    /// as long as the recording takes (if it fails, the lease lapses and it is tried again).
    async fn orphan(&self, id: &str) -> Result<Option<Run>, EngineError> {
        let state = &self.ctx.state;
        let taken = state
            .lease(
                &cluster::run_lease(id),
                &self.ctx.node.recovery_holder(),
                cluster::ms(cluster::LEASE_TTL),
            )
            .await?;
        if !taken {
            return Ok(None);
        }
        // It may have ended since the list was read: a run's record is final before its lease
        // is released.
        match state.run(id).await? {
            Some(stored) if matches!(stored.status.as_str(), "running" | "queued") => {
                Run::from_stored(&stored).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The periodic search of a shared store for runs whose node died.
    async fn recover_orphans(&mut self) {
        let retry = match self.recover_interrupted().await {
            Ok(retry) => retry,
            Err(error) => {
                tracing::warn!(%error, "could not look for runs of nodes that stopped; will retry");
                return;
            }
        };
        for (job, params, trigger, attempt) in retry {
            if let Err(error) = self.start(&job, params, trigger, attempt).await {
                tracing::warn!(%error, %job, "a retry of an interrupted run could not start");
            }
        }
    }

    /// Takes a free slot of the job in the cluster, then the run's own lease; None when every
    /// slot is held (by runs of this node or of others).
    async fn take_leases(
        &self,
        spec: &JobSpec,
        key: Option<&str>,
        run: &str,
    ) -> Result<Option<Vec<String>>, EngineError> {
        let state = &self.ctx.state;
        let holder = self.ctx.node.run_holder(run);
        let ttl = cluster::ms(cluster::LEASE_TTL);
        let mut slot = None;
        for name in cluster::job_slots(&spec.name, key, spec.concurrency) {
            if state.lease(&name, &holder, ttl).await? {
                slot = Some(name);
                break;
            }
        }
        let Some(slot) = slot else {
            return Ok(None);
        };
        let alive = cluster::run_lease(run);
        let taken = state.lease(&alive, &holder, ttl).await;
        if !matches!(taken, Ok(true)) {
            if let Err(error) = state.release(&slot, &holder).await {
                tracing::warn!(%error, lease = %slot, "could not release a slot; it lapses");
            }
        }
        match taken {
            Ok(true) => Ok(Some(vec![slot, alive])),
            Ok(false) => Err(EngineError::Internal(format!(
                "the lease of the new run {run} is held by someone else"
            ))),
            Err(error) => Err(error),
        }
    }

    /// A queued or running run of the job (with the same key value) as recorded: what a busy
    /// answer shows when another node holds the slot.
    async fn active_elsewhere(&self, spec: &JobSpec, key: Option<&str>) -> Option<Run> {
        let recent = self.ctx.state.runs_of_job(&spec.name, 100).await.ok()?;
        recent
            .iter()
            .filter_map(|stored| Run::from_stored(stored).ok())
            .find(|r| {
                !r.status.is_final()
                    && (key.is_none() || r.key_value(spec.concurrency_key.as_deref()) == key)
            })
    }

    /// Gives up a run's leases: its record is final, or was never written.
    async fn release_leases(&mut self, run: &str) {
        let Some(names) = self.leases.remove(run) else {
            return;
        };
        let holder = self.ctx.node.run_holder(run);
        for name in names {
            if let Err(error) = self.ctx.state.release(&name, &holder).await {
                tracing::warn!(%error, %run, lease = %name, "could not release a run's lease; it lapses");
            }
        }
    }

    /// Renews the leases of this node's runs. A run whose lease another node holds now (this
    /// node could not renew it in time, so that node may have recorded it interrupted) is
    /// cancelled, so the job is single-flight again.
    async fn renew_leases(&mut self) {
        let held: Vec<(String, Vec<String>)> = self
            .leases
            .iter()
            .map(|(run, names)| (run.clone(), names.clone()))
            .collect();
        let ttl = cluster::ms(cluster::LEASE_TTL);
        let mut lost = Vec::new();
        for (run, names) in held {
            let holder = self.ctx.node.run_holder(&run);
            for name in names {
                match self.ctx.state.lease(&name, &holder, ttl).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::error!(%run, lease = %name, "a run lost its cluster lease to another node; cancelling it");
                        lost.push(run.clone());
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, %run, lease = %name, "could not renew a run's lease; will retry");
                    }
                }
            }
        }
        for run in lost {
            // Nothing of it is ours to release any more.
            self.leases.remove(&run);
            if let Err(error) = self.cancel(&run).await {
                tracing::warn!(%error, %run, "could not cancel a run that lost its lease");
            }
        }
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
            self.release_leases(&run.id).await;
            // Its followers wait for an `exit` like any other run's.
            publish_final(&self.ctx.hub, &run).await;
        }
        // Runs keep their leases while they wind down (up to their kill grace).
        let mut renew = tokio::time::interval(cluster::RENEW_EVERY);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.running.is_empty() {
            let event = tokio::select! {
                event = rx.recv() => event,
                _ = renew.tick() => {
                    self.renew_leases().await;
                    continue;
                }
            };
            match event {
                Some(Event::Finished { run, freed }) => {
                    self.running.remove(&run.id);
                    self.release_leases(&run.id).await;
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
///
/// Every node of a cluster runs this loop: each tick is named by the time it was scheduled
/// for and claimed in the store, and only the node that claims it first fires it. On a shared
/// store `every` ticks fall on multiples of the interval (so all nodes name them alike), and
/// the start-up tick is the one of the interval the node starts in — run by the node that
/// starts first, or already by the regular tick.
async fn schedule_ticks(
    spec: Arc<JobSpec>,
    state: Arc<dyn StateStore>,
    events: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) {
    let shared = state.is_shared();
    let now = chrono::Utc::now();
    let at_start = match &spec.schedule {
        Schedule::Every(_) if shared => spec.schedule.shared_tick_at_or_before(now),
        Schedule::Every(_) => Some(now),
        Schedule::Cron { .. } if spec.catch_up => state
            .doc("job_tick", &spec.name)
            .await
            .ok()
            .flatten()
            .and_then(|s| s.parse::<i64>().ok())
            .and_then(chrono::DateTime::from_timestamp_millis)
            .and_then(|last| spec.schedule.next_after(last))
            .filter(|t| *t <= now),
        _ => None,
    };
    if let Some(at) = at_start {
        if !fire(&spec, &*state, &events, at).await {
            return;
        }
    }
    let mut from = chrono::Utc::now();
    loop {
        let next = if shared {
            spec.schedule.next_shared_after(from)
        } else {
            spec.schedule.next_after(from)
        };
        let Some(next) = next else {
            return;
        };
        let wait = (next - chrono::Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if !fire(&spec, &*state, &events, next).await {
            return;
        }
        // Ticks missed while the process was suspended are not replayed one by one.
        from = next.max(chrono::Utc::now() - chrono::Duration::milliseconds(1));
    }
}

/// Fires the tick scheduled for `at` if this node claims it first (always, on a one-node store);
/// false once the supervisor is gone.
async fn fire(
    spec: &JobSpec,
    state: &dyn StateStore,
    events: &mpsc::Sender<Event>,
    at: chrono::DateTime<chrono::Utc>,
) -> bool {
    let claim = cluster::tick_claim(&spec.name, at.timestamp_millis());
    match state
        .claim_once(&claim, cluster::ms(tick_claim_ttl(&spec.schedule)))
        .await
    {
        Ok(true) => events
            .send(Event::Tick {
                job: spec.name.clone(),
            })
            .await
            .is_ok(),
        Ok(false) => {
            tracing::debug!(job = %spec.name, %claim, "another node fired this tick");
            true
        }
        Err(error) => {
            tracing::warn!(%error, job = %spec.name, "could not claim a tick; it is skipped");
            true
        }
    }
}

/// How long a claimed tick is remembered: well past any clock skew between nodes, and for
/// `every` past the interval, so a node starting within it finds its start-up tick taken.
fn tick_claim_ttl(schedule: &Schedule) -> Duration {
    let margin = Duration::from_secs(600);
    match schedule {
        Schedule::Every(d) => d
            .saturating_add(margin)
            .min(Duration::from_secs(31 * 24 * 3600)),
        _ => margin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::testing::{self, SharedState};
    use std::path::PathBuf;

    fn job(name: &str, command: &[&str], schedule: Schedule) -> JobSpec {
        JobSpec {
            name: name.into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            dir: PathBuf::from("/"),
            env: Vec::new(),
            schedule,
            timeout: None,
            kill_grace: Duration::from_secs(1),
            retries: 0,
            catch_up: false,
            concurrency: 1,
            concurrency_key: None,
            params: Vec::new(),
            publish: Vec::new(),
        }
    }

    /// One node of a cluster: its own supervisor over the shared hub and store.
    struct Node {
        jobs: Jobs,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    }

    impl Node {
        async fn start(hub: &Arc<Hub>, state: &Arc<SharedState>, specs: Vec<JobSpec>) -> Node {
            let shutdown = CancellationToken::new();
            let ctx = JobsContext {
                hub: hub.clone(),
                state: state.clone(),
                self_url: "http://127.0.0.1:9".into(),
                token_key: vec![7; 32],
                runs_total: Family::default(),
                skipped_ticks_total: Family::default(),
                max_concurrent_runs: 8,
                node: NodeId::generate(),
            };
            let (jobs, tasks) = Jobs::start(ctx, specs, shutdown.clone()).await.unwrap();
            Node {
                jobs,
                tasks,
                shutdown,
            }
        }

        async fn stop(self) {
            self.shutdown.cancel();
            self.tasks.wait().await;
        }
    }

    async fn status(state: &SharedState, id: &str) -> String {
        state
            .run(id)
            .await
            .unwrap()
            .map(|r| r.status)
            .unwrap_or_default()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn single_flight_holds_across_nodes_and_a_freed_slot_goes_to_any_node() {
        let dir = tempfile::tempdir().unwrap();
        let hub = testing::hub(&dir.path().join("hub"));
        let state = SharedState::open(&dir.path().join("state"));
        let mut keyed = job("sync", &["sleep", "30"], Schedule::Manual);
        keyed.concurrency_key = Some("account".into());
        keyed.params = vec!["account".into()];
        let specs = vec![job("build", &["sleep", "30"], Schedule::Manual), keyed];
        let a = Node::start(&hub, &state, specs.clone()).await;
        let b = Node::start(&hub, &state, specs).await;

        let first = a
            .jobs
            .start_run("build", BTreeMap::new(), Trigger::Api)
            .await
            .unwrap();
        // Longer than a lease lives unrenewed: A renews it, and B's search for runs of nodes
        // that died leaves the run alone.
        tokio::time::sleep(cluster::LEASE_TTL * 2).await;
        match b
            .jobs
            .start_run("build", BTreeMap::new(), Trigger::Api)
            .await
        {
            Err(StartError::Busy { run: Some(run), .. }) => assert_eq!(run.id, first.id),
            other => panic!("expected busy with A's run, got {other:?}"),
        }
        assert_eq!(status(&state, &first.id).await, "running");

        let account = |v: &str| BTreeMap::from([("account".to_owned(), v.to_owned())]);
        b.jobs
            .start_run("sync", account("1"), Trigger::Api)
            .await
            .unwrap();
        assert!(matches!(
            a.jobs.start_run("sync", account("1"), Trigger::Api).await,
            Err(StartError::Busy { .. })
        ));
        a.jobs
            .start_run("sync", account("2"), Trigger::Api)
            .await
            .unwrap();

        a.jobs.cancel(&first.id).await.unwrap();
        let jobs = b.jobs.clone();
        testing::wait_until("B to take the freed slot", || {
            let jobs = jobs.clone();
            async move {
                jobs.start_run("build", BTreeMap::new(), Trigger::Api)
                    .await
                    .is_ok()
            }
        })
        .await;
        assert_eq!(status(&state, &first.id).await, "cancelled");
        a.stop().await;
        b.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_scheduled_tick_fires_on_one_node() {
        let dir = tempfile::tempdir().unwrap();
        let hub = testing::hub(&dir.path().join("hub"));
        let state = SharedState::open(&dir.path().join("state"));
        // Two slots, so only the tick claims (not single-flight) keep a tick from running twice.
        let mut ticking = job("tick", &["true"], Schedule::Every(Duration::from_secs(1)));
        ticking.concurrency = 2;
        let specs = vec![ticking];
        let a = Node::start(&hub, &state, specs.clone()).await;
        let b = Node::start(&hub, &state, specs).await;
        let granted = |state: &SharedState| -> Vec<String> {
            let log = state.claim_log.lock().unwrap();
            log.iter()
                .filter(|(name, won)| *won && name.starts_with("tick:tick:"))
                .map(|(name, _)| name.clone())
                .collect()
        };
        let shared = state.clone();
        testing::wait_until("three ticks", || {
            let n = granted(&shared).len();
            async move { n >= 3 }
        })
        .await;
        a.stop().await;
        b.stop().await;
        let won = granted(&state);
        let lost: Vec<String> = {
            let log = state.claim_log.lock().unwrap();
            log.iter()
                .filter(|(name, won)| !*won && name.starts_with("tick:tick:"))
                .map(|(name, _)| name.clone())
                .collect()
        };
        // Both nodes named the same ticks (on whole seconds); one of them fired each.
        assert!(!lost.is_empty(), "{won:?}");
        assert!(
            lost.iter().all(|name| won.contains(name)),
            "{won:?} {lost:?}"
        );
        assert!(won
            .iter()
            .all(|name| name.trim_start_matches("tick:tick:").ends_with("000")));
        let runs = state.runs_of_job("tick", 100).await.unwrap();
        // A tick fired while both stopped may have started nothing.
        assert!(
            runs.len() <= won.len() && runs.len() + 1 >= won.len(),
            "{} runs for {won:?}",
            runs.len()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_of_a_node_that_died_are_interrupted_once_their_lease_lapses() {
        let dir = tempfile::tempdir().unwrap();
        let hub = testing::hub(&dir.path().join("hub"));
        let state = SharedState::open(&dir.path().join("state"));
        let running = || {
            let mut run = Run::new("work", Trigger::Api, 1, BTreeMap::new());
            run.status = RunStatus::Running;
            run
        };
        // One run of a node that is alive (it renews the run's lease), one of a node long gone.
        let alive = running();
        let gone = running();
        for run in [&alive, &gone] {
            state.put_run(run.to_stored().unwrap()).await.unwrap();
        }
        state.hold(
            &cluster::run_lease(&alive.id),
            &format!("node_other/{}", alive.id),
            Duration::from_secs(60),
        );
        let b = Node::start(&hub, &state, vec![job("work", &["true"], Schedule::Manual)]).await;
        assert_eq!(status(&state, &gone.id).await, "interrupted", "at start-up");
        tokio::time::sleep(cluster::ORPHAN_CHECK_EVERY * 3).await;
        assert_eq!(status(&state, &alive.id).await, "running");
        // Its node dies.
        state.lapse_leases_of("node_other");
        let shared = state.clone();
        let id = alive.id.clone();
        testing::wait_until("the run to be interrupted", || {
            let (shared, id) = (shared.clone(), id.clone());
            async move { status(&shared, &id).await == "interrupted" }
        })
        .await;
        b.stop().await;
    }

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
