//! The run record: one execution of a job, as stored, listed and published.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::engine::state::StoredRun;
use crate::engine::EngineError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    Interrupted,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::TimedOut => "timed_out",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Interrupted => "interrupted",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }

    /// Failures that `retries` applies to.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            RunStatus::Failed | RunStatus::TimedOut | RunStatus::Interrupted
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    Schedule,
    Api,
    Cli,
    Ui,
}

/// Run ids increase in the order runs are created, even within one millisecond, so ordering
/// by id (run history, newest first) is creation order. (`Ulid::new` is random within a
/// millisecond.)
fn next_id() -> ulid::Ulid {
    static IDS: std::sync::Mutex<ulid::Generator> = std::sync::Mutex::new(ulid::Generator::new());
    let mut ids = IDS.lock().unwrap_or_else(|e| e.into_inner());
    // Err only if 2^80 ids were made in one millisecond.
    ids.generate().unwrap_or_else(|_| ulid::Ulid::new())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub id: String,
    pub job: String,
    pub status: RunStatus,
    pub trigger: Trigger,
    pub attempt: u32,
    pub params: BTreeMap<String, String>,
    pub channel: String,
    pub created: String,
    pub started: Option<String>,
    pub finished: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub error: Option<String>,
}

impl Run {
    pub fn new(
        job: &str,
        trigger: Trigger,
        attempt: u32,
        params: BTreeMap<String, String>,
    ) -> Self {
        let id = next_id().to_string();
        Self {
            channel: format!("jobs:{job}:{id}"),
            id,
            job: job.to_owned(),
            status: RunStatus::Queued,
            trigger,
            attempt,
            params,
            created: crate::clock::rfc3339_ms(crate::clock::now_ms()),
            started: None,
            finished: None,
            exit_code: None,
            signal: None,
            error: None,
        }
    }

    pub fn to_stored(&self) -> Result<StoredRun, EngineError> {
        Ok(StoredRun {
            id: self.id.clone(),
            job: self.job.clone(),
            status: self.status.as_str().to_owned(),
            json: serde_json::to_string(self)
                .map_err(|e| EngineError::Internal(format!("cannot encode run: {e}")))?,
        })
    }

    pub fn from_stored(stored: &StoredRun) -> Result<Self, EngineError> {
        serde_json::from_str(&stored.json)
            .map_err(|e| EngineError::Internal(format!("corrupt run {}: {e}", stored.id)))
    }

    /// The value of the job's `concurrency_key` parameter for this run, if any.
    pub fn key_value(&self, key: Option<&str>) -> Option<&str> {
        key.and_then(|k| self.params.get(k)).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_as_the_spec_says() {
        let run = Run::new("build", Trigger::Api, 1, BTreeMap::new());
        let v = serde_json::to_value(&run).unwrap();
        for field in [
            "id",
            "job",
            "status",
            "trigger",
            "attempt",
            "params",
            "channel",
            "created",
            "started",
            "finished",
            "exit_code",
            "signal",
            "error",
        ] {
            assert!(v.get(field).is_some(), "{field}");
        }
        assert_eq!(v["status"], "queued");
        assert_eq!(v["trigger"], "api");
        assert!(run.channel.starts_with("jobs:build:"));
        let stored = run.to_stored().unwrap();
        assert_eq!(Run::from_stored(&stored).unwrap(), run);
        assert_eq!(
            serde_json::to_value(RunStatus::TimedOut).unwrap(),
            "timed_out"
        );
    }

    #[test]
    fn ids_increase_in_creation_order() {
        let ids: Vec<String> = (0..2000)
            .map(|_| Run::new("j", Trigger::Api, 1, BTreeMap::new()).id)
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "run ids out of order");
    }
}
