//! Executes one run: the child process, its output streamed into `jobs:{job}:{run}`, then the
//! final record. [`publish_final`] then sends the `exit` message and the state change; the
//! supervisor calls it only once it has freed the run's slot, so a client that sees `exit` finds
//! the run record already final and may start the next run at once.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::process::{self, Ending, Line, Spawn};
use super::run::{Run, RunStatus};
use super::spec::JobSpec;
use super::supervisor::{publish_run_event, JobsContext};
use crate::hub::types::{ChannelName, Data, EventName, NewMessage};
use crate::hub::Hub;

/// Output lines per store batch; bigger batches from a flooding job are split. Well under the
/// live window (`hub::live::WINDOW_CAP`), so a batch never pushes its own viewers out of the
/// window and back to the store.
const LINES_PER_PUBLISH: usize = 512;

/// A token that may publish to the run's channel and the job's `publish` patterns, and read
/// the run's channel; signed with the hub's own key.
pub fn run_token(key: &[u8], spec: &JobSpec, run: &Run) -> Option<String> {
    let lifetime =
        spec.timeout.unwrap_or(Duration::from_secs(7 * 24 * 3600)) + Duration::from_secs(3600);
    let exp = crate::clock::now_ms() / 1000 + lifetime.as_secs() as i64;
    let mut publish = vec![run.channel.clone()];
    publish.extend(spec.publish.iter().map(|p| p.as_str().to_owned()));
    let claims = json!({
        "sub": format!("run:{}", run.id),
        "exp": exp,
        "publish": publish,
        "subscribe": [run.channel.clone()],
    });
    jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(key)).ok()
}

fn environment(ctx: &JobsContext, spec: &JobSpec, run: &Run) -> Vec<(String, String)> {
    let mut env = spec.env.clone();
    env.push(("TIDINGS_URL".into(), ctx.self_url.clone()));
    env.push(("TIDINGS_RUN_ID".into(), run.id.clone()));
    env.push(("TIDINGS_CHANNEL".into(), run.channel.clone()));
    if let Some(token) = run_token(&ctx.token_key, spec, run) {
        env.push(("TIDINGS_TOKEN".into(), token));
    }
    for (name, value) in &run.params {
        env.push((
            format!("TIDINGS_PARAM_{}", name.to_ascii_uppercase()),
            value.clone(),
        ));
    }
    env
}

/// Runs the command to its end and records the run as final; returns the final run. Nothing is
/// announced yet: see [`publish_final`].
pub async fn execute(
    ctx: Arc<JobsContext>,
    spec: Arc<JobSpec>,
    mut run: Run,
    cancel: CancellationToken,
) -> Run {
    let spawn = Spawn {
        argv: spec.command.clone(),
        dir: spec.dir.clone(),
        env: environment(&ctx, &spec, &run),
        timeout: spec.timeout,
        kill_grace: spec.kill_grace,
    };
    let (lines_tx, lines_rx) = mpsc::channel(8);
    let forwarder = match ChannelName::parse(&run.channel) {
        Ok(channel) => Some(tokio::spawn(forward_lines(
            ctx.hub.clone(),
            channel,
            lines_rx,
        ))),
        Err(_) => None,
    };
    let ending = process::run(spawn, lines_tx, cancel).await;
    let forward_error = match forwarder {
        Some(task) => task.await.ok().flatten(),
        None => Some("the run's channel name is invalid".to_owned()),
    };
    apply_ending(&mut run, &ending);
    if let (Some(e), None) = (&forward_error, &run.error) {
        run.error = Some(format!("output could not be stored: {e}"));
    }
    run.finished = Some(crate::clock::rfc3339_ms(crate::clock::now_ms()));
    match run.to_stored() {
        Ok(stored) => {
            if let Err(error) = ctx.state.put_run(stored).await {
                tracing::error!(%error, run = %run.id, "could not record a finished run");
            }
        }
        Err(error) => tracing::error!(%error, "could not encode a run"),
    }
    tracing::info!(job = %run.job, run = %run.id, status = run.status.as_str(), exit_code = ?run.exit_code, signal = ?run.signal, "run finished");
    run
}

/// Announces a finished run: its one `exit` message, then the state change on `jobs:{name}`.
pub async fn publish_final(hub: &Hub, run: &Run) {
    publish_exit(hub, run).await;
    publish_run_event(hub, run).await;
}

fn apply_ending(run: &mut Run, ending: &Ending) {
    run.exit_code = ending.exit_code();
    run.signal = ending.signal().map(str::to_owned);
    run.status = match ending {
        Ending::Exited(0) => RunStatus::Succeeded,
        Ending::Exited(_) | Ending::Signaled(_) => RunStatus::Failed,
        Ending::TimedOut { .. } => RunStatus::TimedOut,
        Ending::Cancelled { .. } => RunStatus::Cancelled,
        Ending::FailedToStart(reason) | Ending::Lost(reason) => {
            run.error = Some(reason.clone());
            RunStatus::Failed
        }
    };
}

/// Publishes the run's one `exit` message on its channel.
pub async fn publish_exit(hub: &Hub, run: &Run) {
    let Ok(channel) = ChannelName::parse(&run.channel) else {
        return;
    };
    let data =
        json!({"status": run.status.as_str(), "exit_code": run.exit_code, "signal": run.signal});
    let Ok(data) = Data::from_value(&data) else {
        return;
    };
    let message = NewMessage {
        id: Some(
            crate::hub::types::MessageId::parse("exit")
                .unwrap_or_else(|_| crate::hub::types::MessageId::generate()),
        ),
        event: EventName::parse("exit").unwrap_or_default(),
        data,
    };
    if let Err(error) = hub.publish(&channel, vec![message]).await {
        tracing::error!(%error, run = %run.id, "could not publish a run's exit");
    }
}

/// Publishes output batches in order; returns the first store error, if any (output after
/// it is still drained so the child never blocks).
async fn forward_lines(
    hub: Arc<Hub>,
    channel: ChannelName,
    mut rx: mpsc::Receiver<Vec<Line>>,
) -> Option<String> {
    let event = EventName::parse("line").unwrap_or_default();
    let mut failure = None;
    while let Some(batch) = rx.recv().await {
        if failure.is_some() {
            continue;
        }
        for chunk in batch.chunks(LINES_PER_PUBLISH) {
            let messages: Vec<NewMessage> = chunk
                .iter()
                .filter_map(|line| {
                    let data = json!({"stream": line.stream.as_str(), "line": line.text});
                    Data::from_value(&data).ok().map(|data| NewMessage {
                        id: None,
                        event: event.clone(),
                        data,
                    })
                })
                .collect();
            if let Err(error) = hub.publish(&channel, messages).await {
                tracing::error!(%error, %channel, "could not store run output");
                failure = Some(error.to_string());
                break;
            }
        }
    }
    failure
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endings_map_to_statuses() {
        let mut run = Run::new("j", super::super::run::Trigger::Api, 1, Default::default());
        let cases = [
            (Ending::Exited(0), RunStatus::Succeeded, Some(0), None),
            (Ending::Exited(3), RunStatus::Failed, Some(3), None),
            (
                Ending::Signaled("SIGSEGV".into()),
                RunStatus::Failed,
                None,
                Some("SIGSEGV"),
            ),
            (
                Ending::TimedOut {
                    exit_code: None,
                    signal: Some("SIGKILL".into()),
                },
                RunStatus::TimedOut,
                None,
                Some("SIGKILL"),
            ),
            (
                Ending::Cancelled {
                    exit_code: Some(143),
                    signal: None,
                },
                RunStatus::Cancelled,
                Some(143),
                None,
            ),
            (
                Ending::FailedToStart("nope".into()),
                RunStatus::Failed,
                None,
                None,
            ),
        ];
        for (ending, status, code, signal) in cases {
            apply_ending(&mut run, &ending);
            assert_eq!(run.status, status, "{ending:?}");
            assert_eq!(run.exit_code, code, "{ending:?}");
            assert_eq!(run.signal.as_deref(), signal, "{ending:?}");
        }
        assert_eq!(run.error.as_deref(), Some("nope"));
    }
}
