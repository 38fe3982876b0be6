//! The process layer of command jobs: starts one child in its own process group and streams what it prints.
//!
//! Knows nothing about HTTP or the store. [`run`] starts the command with a cleared environment
//! (SPEC §4), turns each stdout/stderr line into a [`Line`] (split at 16 KiB of UTF-8 on a
//! character boundary, invalid UTF-8 replaced), sends them in batches on a bounded channel — a
//! job that floods is slowed by the channel, never buffered without bound — and ends the whole
//! process group on timeout, on cancel, when the future is dropped, and when the main process
//! exits leaving others behind. Every line is sent before `run` returns.
//!
//! Limit: a process that leaves the group (`setsid`, `setpgid`) escapes the group kill; the pipe
//! readers then give up after a short drain deadline so `run` still returns.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

/// The `PATH` every command gets (the job's `env` may override it).
pub const FIXED_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The most UTF-8 bytes in one [`Line`]; a longer line is sent as several.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// How much one read from a pipe takes at most (the Linux pipe buffer is 64 KiB).
const READ_BUFFER: usize = 64 * 1024;

/// Once the group is gone, a pipe that stays silent this long is given up (someone outside the
/// group still holds it open).
const DRAIN_IDLE: Duration = Duration::from_millis(250);

/// Once the group is gone, the pipe readers are stopped after this long whatever happens.
const DRAIN_MAX: Duration = Duration::from_secs(5);

/// What to start: assembled by the caller from the job's spec and the run. Its `Debug` shows
/// the environment's names only (`TIDINGS_TOKEN` is a secret).
#[derive(Clone)]
pub struct Spawn {
    /// The command; `argv[0]` is looked up on the job's `PATH` (the fixed one unless `env` sets
    /// `PATH`), or taken relative to `dir` when it contains a `/`. Never a shell.
    pub argv: Vec<String>,
    /// Working directory (relative to the hub's current directory if not absolute).
    pub dir: PathBuf,
    /// The job's `env` and the `TIDINGS_*` variables, set after `PATH`, `HOME` and `LANG`.
    pub env: Vec<(String, String)>,
    /// `None` (or zero) = no limit.
    pub timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL on timeout or cancel.
    pub kill_grace: Duration,
}

impl std::fmt::Debug for Spawn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spawn")
            .field("argv", &self.argv)
            .field("dir", &self.dir)
            .field(
                "env",
                &self.env.iter().map(|(key, _)| key).collect::<Vec<_>>(),
            )
            .field("timeout", &self.timeout)
            .field("kill_grace", &self.kill_grace)
            .finish()
    }
}

/// Which pipe a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    /// `"stdout"` or `"stderr"`, as in the `line` event's data.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One line printed by the command (without its newline), or one ≤ 16 KiB piece of a longer one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub stream: Stream,
    pub text: String,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The process exited by itself with this code.
    Exited(i32),
    /// A signal we did not send ended the process; its name, e.g. `"SIGSEGV"`.
    Signaled(String),
    /// The timeout passed and the group was signalled; what finally ended the main process
    /// (an exit code if it handled SIGTERM and exited, else the signal's name).
    TimedOut {
        exit_code: Option<i32>,
        signal: Option<String>,
    },
    /// Cancelled (the token fired) and the group was signalled; as for `TimedOut`. Both `None`
    /// when the token had fired before anything was started.
    Cancelled {
        exit_code: Option<i32>,
        signal: Option<String>,
    },
    /// Nothing was started; the reason, meant to be shown to the user.
    FailedToStart(String),
    /// The process was started but its status could not be read (should not happen); the group
    /// was killed.
    Lost(String),
}

impl Ending {
    /// The exit code for the run's `exit` event, if the process exited by itself.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            Ending::Exited(code) => Some(*code),
            Ending::TimedOut { exit_code, .. } | Ending::Cancelled { exit_code, .. } => *exit_code,
            Ending::Signaled(_) | Ending::FailedToStart(_) | Ending::Lost(_) => None,
        }
    }

    /// The name of the signal that ended the process, e.g. `"SIGKILL"`.
    pub fn signal(&self) -> Option<&str> {
        match self {
            Ending::Signaled(name) => Some(name),
            Ending::TimedOut { signal, .. } | Ending::Cancelled { signal, .. } => signal.as_deref(),
            Ending::Exited(_) | Ending::FailedToStart(_) | Ending::Lost(_) => None,
        }
    }
}

/// Why a command could not be started; the text is meant for the user.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("the command is empty")]
    EmptyCommand,
    #[error("the command or its environment contains a NUL byte")]
    NulByte,
    #[error("environment variable name {0:?} is invalid (it is empty or contains '=')")]
    BadEnvName(String),
    #[error("working directory {0:?} does not exist or is not a folder")]
    NoDir(PathBuf),
    #[error("could not resolve working directory {dir:?}: {source}")]
    DirUnresolved { dir: PathBuf, source: io::Error },
    #[error("command {name:?} not found on PATH={path}")]
    NotOnPath { name: String, path: String },
    #[error("command {0:?} does not exist")]
    NoFile(PathBuf),
    #[error("command {0:?} is not an executable file")]
    NotExecutable(PathBuf),
    #[error("could not start {program:?}: {source}")]
    Spawn { program: PathBuf, source: io::Error },
    #[error("started {0:?} but it has no process id")]
    NoPid(PathBuf),
}

/// Runs the command to its end, sending its output to `lines` in batches (each stream in the
/// order printed; between streams in the order read). Returns once the main process is reaped,
/// the rest of its process group is killed and every line has been sent. If `lines` is closed
/// the output is still read (and dropped) so the command is never blocked by it. Dropping the
/// returned future kills the process group.
///
/// Receive from `lines` concurrently with awaiting `run`: a full channel blocks the readers, which
/// blocks the command (that is the backpressure). A batch holds what one read returned (at most
/// 64 KiB of output) plus at most one 16 KiB piece held over, so memory per stream is bounded by
/// the channel's capacity times one batch.
pub async fn run(
    spawn: Spawn,
    lines: mpsc::Sender<Vec<Line>>,
    cancel: CancellationToken,
) -> Ending {
    if cancel.is_cancelled() {
        return Ending::Cancelled {
            exit_code: None,
            signal: None,
        };
    }
    let (mut child, group) = match start(&spawn) {
        Ok(started) => started,
        Err(err) => return Ending::FailedToStart(err.to_string()),
    };
    let draining = CancellationToken::new();
    let mut readers = Vec::with_capacity(2);
    if let Some(out) = child.stdout.take() {
        readers.push(AbortOnDropHandle::new(tokio::spawn(read_stream(
            out,
            Stream::Stdout,
            lines.clone(),
            draining.clone(),
        ))));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(AbortOnDropHandle::new(tokio::spawn(read_stream(
            err,
            Stream::Stderr,
            lines.clone(),
            draining.clone(),
        ))));
    }
    drop(lines);

    let (reason, status) = supervise(&mut child, &group, &spawn, &cancel).await;
    // The main process is reaped; whatever is left of its group goes now.
    group.kill_rest();
    draining.cancel();
    let all_read = futures_util::future::join_all(readers);
    if tokio::time::timeout(DRAIN_MAX, all_read).await.is_err() {
        tracing::warn!(
            "a job's output pipes stayed open after its process group ended; stopped reading them"
        );
    }
    ending(reason, status)
}

/// Why the main process ended.
enum Reason {
    Finished,
    TimedOut,
    Cancelled,
}

/// Waits for the main process, enforcing the timeout and the cancel token.
async fn supervise(
    child: &mut Child,
    group: &Group,
    spawn: &Spawn,
    cancel: &CancellationToken,
) -> (Reason, io::Result<ExitStatus>) {
    let deadline = async {
        match spawn.timeout {
            Some(limit) if !limit.is_zero() => tokio::time::sleep(limit).await,
            _ => std::future::pending().await,
        }
    };
    let reason = tokio::select! {
        biased;
        status = child.wait() => return (Reason::Finished, status),
        () = cancel.cancelled() => Reason::Cancelled,
        () = deadline => Reason::TimedOut,
    };
    group.signal(Signal::SIGTERM);
    let status = match tokio::time::timeout(spawn.kill_grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            group.signal(Signal::SIGKILL);
            child.wait().await
        }
    };
    (reason, status)
}

fn ending(reason: Reason, status: io::Result<ExitStatus>) -> Ending {
    let (exit_code, signal) = match status {
        Ok(status) => (status.code(), status.signal().map(signal_name)),
        Err(err) => return Ending::Lost(format!("could not wait for the process: {err}")),
    };
    match reason {
        Reason::Finished => match (exit_code, signal) {
            (Some(code), _) => Ending::Exited(code),
            (None, Some(signal)) => Ending::Signaled(signal),
            (None, None) => Ending::Lost("the process ended with an unknown status".into()),
        },
        Reason::TimedOut => Ending::TimedOut { exit_code, signal },
        Reason::Cancelled => Ending::Cancelled { exit_code, signal },
    }
}

/// `"SIGKILL"` for 9, …; `"SIG<n>"` for a number without a name (real-time signals).
pub fn signal_name(number: i32) -> String {
    match Signal::try_from(number) {
        Ok(signal) => signal.as_str().to_string(),
        Err(_) => format!("SIG{number}"),
    }
}

/// The child's process group. Killed with SIGKILL when dropped unless [`Group::kill_rest`] ran,
/// so a dropped `run` leaves nothing behind.
struct Group {
    pgid: Pid,
    armed: bool,
}

impl Group {
    fn signal(&self, signal: Signal) {
        match killpg(self.pgid, signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(err) => {
                tracing::warn!(pgid = self.pgid.as_raw(), %err, "could not signal a job's process group")
            }
        }
    }

    /// SIGKILL to whatever is left of the group, once the main process has been reaped.
    fn kill_rest(mut self) {
        self.signal(Signal::SIGKILL);
        self.armed = false;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if self.armed {
            self.signal(Signal::SIGKILL);
        }
    }
}

/// Checks the spawn, resolves the program and starts it in a new process group.
fn start(spawn: &Spawn) -> Result<(Child, Group), StartError> {
    let name = spawn
        .argv
        .first()
        .filter(|name| !name.is_empty())
        .ok_or(StartError::EmptyCommand)?;
    let has_nul = spawn.argv.iter().any(|arg| arg.contains('\0'))
        || spawn
            .env
            .iter()
            .any(|(key, value)| key.contains('\0') || value.contains('\0'));
    if has_nul {
        return Err(StartError::NulByte);
    }
    if let Some((key, _)) = spawn
        .env
        .iter()
        .find(|(key, _)| key.is_empty() || key.contains('='))
    {
        return Err(StartError::BadEnvName(key.clone()));
    }
    let dir = std::path::absolute(&spawn.dir).map_err(|source| StartError::DirUnresolved {
        dir: spawn.dir.clone(),
        source,
    })?;
    if !dir.is_dir() {
        return Err(StartError::NoDir(spawn.dir.clone()));
    }
    let path = spawn
        .env
        .iter()
        .rev()
        .find(|(key, _)| key == "PATH")
        .map_or(FIXED_PATH, |(_, value)| value.as_str());
    let program = resolve_program(name, path, &dir)?;
    let home = std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .unwrap_or_else(|| OsString::from("/"));

    let mut command = Command::new(&program);
    command
        .arg0(name)
        .args(&spawn.argv[1..])
        .current_dir(&dir)
        .env_clear()
        .env("PATH", FIXED_PATH)
        .env("HOME", home)
        .env("LANG", "C.UTF-8")
        .envs(spawn.env.iter().map(|(key, value)| (key, value)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    let child = command.spawn().map_err(|source| StartError::Spawn {
        program: program.clone(),
        source,
    })?;
    let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) else {
        return Err(StartError::NoPid(program));
    };
    // The child called setpgid(0, 0) before exec, and spawn returns after exec.
    Ok((
        child,
        Group {
            pgid: Pid::from_raw(pid),
            armed: true,
        },
    ))
}

/// `name` with a `/` is taken relative to `dir`; otherwise the first executable file called
/// `name` in `path`'s folders (empty entries are skipped, relative ones are taken from `dir`).
fn resolve_program(name: &str, path: &str, dir: &Path) -> Result<PathBuf, StartError> {
    if name.contains('/') {
        let program = dir.join(name);
        return match std::fs::metadata(&program) {
            Err(_) => Err(StartError::NoFile(program)),
            Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => Ok(program),
            Ok(_) => Err(StartError::NotExecutable(program)),
        };
    }
    path.split(':')
        .filter(|folder| !folder.is_empty())
        .map(|folder| dir.join(folder).join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| StartError::NotOnPath {
            name: name.to_string(),
            path: path.to_string(),
        })
}

/// Reads one pipe to its end, sending one batch of lines per read. After `draining` fires (the
/// group is gone) a read that waits longer than [`DRAIN_IDLE`] ends it.
async fn read_stream<R: AsyncRead + Unpin>(
    mut pipe: R,
    stream: Stream,
    lines: mpsc::Sender<Vec<Line>>,
    draining: CancellationToken,
) {
    let mut buffer = vec![0u8; READ_BUFFER];
    let mut splitter = Splitter::default();
    let mut texts = Vec::new();
    let mut receiver_gone = false;
    loop {
        let read = if draining.is_cancelled() {
            match tokio::time::timeout(DRAIN_IDLE, pipe.read(&mut buffer)).await {
                Ok(read) => read,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                biased;
                read = pipe.read(&mut buffer) => read,
                () = draining.cancelled() => continue,
            }
        };
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) => {
                tracing::debug!(stream = stream.as_str(), %err, "reading a job's output failed");
                break;
            }
        };
        splitter.push(&buffer[..n], &mut texts);
        send(&lines, stream, &mut texts, &mut receiver_gone).await;
    }
    splitter.finish(&mut texts);
    send(&lines, stream, &mut texts, &mut receiver_gone).await;
}

async fn send(
    lines: &mpsc::Sender<Vec<Line>>,
    stream: Stream,
    texts: &mut Vec<String>,
    receiver_gone: &mut bool,
) {
    if texts.is_empty() {
        return;
    }
    let batch: Vec<Line> = texts.drain(..).map(|text| Line { stream, text }).collect();
    if !*receiver_gone && lines.send(batch).await.is_err() {
        *receiver_gone = true;
    }
}

/// Cuts a byte stream into lines of at most [`MAX_LINE_BYTES`] of (lossily decoded) UTF-8.
/// Holds at most one read's worth plus one piece of an unfinished line.
#[derive(Default)]
struct Splitter {
    /// Raw bytes of the unfinished line.
    pending: Vec<u8>,
    /// Pieces of the unfinished line were already emitted.
    split: bool,
}

impl Splitter {
    fn push(&mut self, mut data: &[u8], out: &mut Vec<String>) {
        while let Some(newline) = data.iter().position(|&b| b == b'\n') {
            if self.pending.is_empty() {
                emit_line(&data[..newline], self.split, out);
            } else {
                self.pending.extend_from_slice(&data[..newline]);
                emit_line(&self.pending, self.split, out);
                self.pending.clear();
            }
            self.split = false;
            data = &data[newline + 1..];
        }
        self.pending.extend_from_slice(data);
        // The line is known to be longer than a piece once it has more raw bytes than a piece can
        // hold (decoding never shrinks), plus the 3 bytes that can decide the last character.
        let mut start = 0;
        while self.pending.len() - start >= MAX_LINE_BYTES + 4 {
            let (text, used) = piece(&self.pending[start..]);
            out.push(text);
            start += used;
            self.split = true;
        }
        self.pending.drain(..start);
    }

    /// The end of the stream: a last line without a newline is still a line.
    fn finish(&mut self, out: &mut Vec<String>) {
        if !self.pending.is_empty() {
            emit_line(&self.pending, self.split, out);
            self.pending.clear();
        }
        self.split = false;
    }
}

/// Emits a whole line (its last piece if `split`: then an empty rest emits nothing).
fn emit_line(mut line: &[u8], split: bool, out: &mut Vec<String>) {
    if line.is_empty() && !split {
        out.push(String::new());
    }
    while !line.is_empty() {
        let (text, used) = piece(line);
        out.push(text);
        line = &line[used..];
    }
}

/// The longest prefix of `bytes` that decodes (invalid sequences as U+FFFD) to at most
/// [`MAX_LINE_BYTES`], cut on a character boundary; the decoded text and the bytes it used.
/// Never empty for non-empty input.
fn piece(bytes: &[u8]) -> (String, usize) {
    let mut text = String::with_capacity(bytes.len().min(MAX_LINE_BYTES));
    let mut used = 0;
    for chunk in bytes.utf8_chunks() {
        let valid = chunk.valid();
        let room = MAX_LINE_BYTES - text.len();
        if valid.len() > room {
            let mut cut = room;
            while !valid.is_char_boundary(cut) {
                cut -= 1;
            }
            text.push_str(&valid[..cut]);
            return (text, used + cut);
        }
        text.push_str(valid);
        used += valid.len();
        let invalid = chunk.invalid();
        if !invalid.is_empty() {
            if MAX_LINE_BYTES - text.len() < char::REPLACEMENT_CHARACTER.len_utf8() {
                return (text, used);
            }
            text.push(char::REPLACEMENT_CHARACTER);
            used += invalid.len();
        }
    }
    (text, used)
}

/// Kills (SIGKILL) every process whose environment says it belongs to run `run_id`
/// (`TIDINGS_RUN_ID=…`): what a run left behind when the hub itself was killed. Matching on the
/// environment rather than a stored pid means a reused pid is never hit. Returns how many.
pub fn kill_leftovers_of_run(run_id: &str) -> usize {
    let needle = format!("TIDINGS_RUN_ID={run_id}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let own = std::process::id();
    let mut killed = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid as u32 == own {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|var| var == needle.as_bytes())
            && nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .is_ok()
        {
            killed += 1;
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    const GRACE: Duration = Duration::from_millis(200);

    fn marker() -> String {
        format!("tidings-test-{}", ulid::Ulid::new())
    }

    /// A spawn whose processes all carry `marker` in their environment (and `sh`'s `$0`).
    fn job(argv: &[&str], marker: &str) -> Spawn {
        Spawn {
            argv: argv.iter().map(|arg| arg.to_string()).collect(),
            dir: std::env::temp_dir(),
            env: vec![("TIDINGS_TEST_MARKER".into(), marker.into())],
            timeout: None,
            kill_grace: GRACE,
        }
    }

    fn sh(script: &str, marker: &str) -> Spawn {
        job(&["sh", "-c", script, marker], marker)
    }

    /// Runs to the end, collecting every line; fails the test if it takes over 20 s.
    async fn collect(spawn: Spawn, cancel: CancellationToken) -> (Ending, Vec<Line>) {
        let (tx, mut rx) = mpsc::channel(8);
        let running = tokio::spawn(run(spawn, tx, cancel));
        let gather = async {
            let mut all = Vec::new();
            while let Some(batch) = rx.recv().await {
                all.extend(batch);
            }
            all
        };
        let all = tokio::time::timeout(Duration::from_secs(20), gather)
            .await
            .expect("the run ends within 20 s");
        let ending = running.await.expect("run does not panic");
        (ending, all)
    }

    fn texts(lines: &[Line], stream: Stream) -> Vec<&str> {
        lines
            .iter()
            .filter(|line| line.stream == stream)
            .map(|line| line.text.as_str())
            .collect()
    }

    /// Processes whose command line or environment mentions `marker`.
    fn processes_with(marker: &str) -> Vec<String> {
        let needle = marker.as_bytes();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|entry| {
                entry
                    .file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .filter(|entry| {
                ["cmdline", "environ"].iter().any(|file| {
                    std::fs::read(entry.path().join(file))
                        .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
                })
            })
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// Waits (a killed process takes a moment to go) until no process carries `marker`.
    async fn assert_none_left(marker: &str) {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let left = processes_with(marker);
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "processes left behind: {left:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pieces(input: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        let mut splitter = Splitter::default();
        splitter.push(input, &mut out);
        splitter.finish(&mut out);
        out
    }

    #[test]
    fn splitter_pieces() {
        assert_eq!(pieces(b"a\n\nb\r\nc"), ["a", "", "b\r", "c"]);
        assert!(pieces(b"").is_empty());
        // Fed one byte at a time, a multibyte character is not broken.
        let mut out = Vec::new();
        let mut splitter = Splitter::default();
        for b in "é€\n".bytes() {
            splitter.push(&[b], &mut out);
        }
        splitter.finish(&mut out);
        assert_eq!(out, ["é€"]);
        // Invalid bytes grow when replaced; pieces still stay within the limit.
        let out = pieces(&[0xff; MAX_LINE_BYTES]);
        assert!(out.iter().all(|p| p.len() <= MAX_LINE_BYTES));
        assert_eq!(
            out.iter().map(|p| p.chars().count()).sum::<usize>(),
            MAX_LINE_BYTES
        );
        // Exactly the limit is one line; one more byte makes two.
        assert_eq!(pieces(&[b'x'; MAX_LINE_BYTES]).len(), 1);
        assert_eq!(pieces(&[b'x'; MAX_LINE_BYTES + 1]).len(), 2);
        // A line ending right after a piece adds no empty line.
        let mut input = vec![b'x'; 2 * MAX_LINE_BYTES];
        input.push(b'\n');
        let mut out = Vec::new();
        let mut splitter = Splitter::default();
        splitter.push(&input[..MAX_LINE_BYTES + 4], &mut out);
        splitter.push(&input[MAX_LINE_BYTES + 4..], &mut out);
        splitter.finish(&mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out.concat().len(), 2 * MAX_LINE_BYTES);
    }

    #[tokio::test]
    async fn exit_codes_and_signals() {
        let marker = marker();
        for (script, expected) in [
            ("exit 0", Ending::Exited(0)),
            ("exit 7", Ending::Exited(7)),
            ("kill -KILL $$", Ending::Signaled("SIGKILL".into())),
            ("kill -SEGV $$", Ending::Signaled("SIGSEGV".into())),
        ] {
            let (ending, _) = collect(sh(script, &marker), CancellationToken::new()).await;
            assert_eq!(ending, expected, "{script}");
        }
        assert_eq!(Ending::Signaled("SIGKILL".into()).signal(), Some("SIGKILL"));
        assert_eq!(Ending::Exited(3).exit_code(), Some(3));
        assert_none_left(&marker).await;
    }

    #[tokio::test]
    async fn lines_in_order_per_stream() {
        let marker = marker();
        let script =
            "echo o1; echo e1 >&2; echo o2; echo e2 >&2; printf 'o3\\n\\no5'; printf e3 >&2";
        let (ending, lines) = collect(sh(script, &marker), CancellationToken::new()).await;
        assert_eq!(ending, Ending::Exited(0));
        assert_eq!(texts(&lines, Stream::Stdout), ["o1", "o2", "o3", "", "o5"]);
        assert_eq!(texts(&lines, Stream::Stderr), ["e1", "e2", "e3"]);
        assert_none_left(&marker).await;
    }

    #[tokio::test]
    async fn last_line_without_newline() {
        let marker = marker();
        let (ending, lines) = collect(
            job(&["printf", "one\\ntwo"], &marker),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(ending, Ending::Exited(0));
        assert_eq!(texts(&lines, Stream::Stdout), ["one", "two"]);
    }

    #[tokio::test]
    async fn long_line_split_without_losing_a_byte() {
        let marker = marker();
        let folder = tempfile::tempdir().expect("temp dir");
        // 40 KiB with a two-byte 'é' straddling the 16 KiB boundary.
        let mut original = "a".repeat(MAX_LINE_BYTES - 1);
        original.push('é');
        while original.len() < 40 * 1024 {
            original.push('b');
        }
        std::fs::write(
            folder.path().join("long.txt"),
            format!("{original}\nshort\n"),
        )
        .expect("write");
        let mut spawn = job(&["cat", "long.txt"], &marker);
        spawn.dir = folder.path().to_path_buf();
        let (ending, lines) = collect(spawn, CancellationToken::new()).await;
        assert_eq!(ending, Ending::Exited(0));
        let out = texts(&lines, Stream::Stdout);
        assert_eq!(out.len(), 4, "three pieces and a short line");
        assert_eq!(out[0].len(), MAX_LINE_BYTES - 1);
        assert!(out[1].starts_with('é'));
        assert!(out.iter().all(|piece| piece.len() <= MAX_LINE_BYTES));
        assert_eq!(out[..3].concat(), original);
        assert_eq!(out[3], "short");
    }

    #[tokio::test]
    async fn ten_megabyte_line_streams_in_pieces() {
        let marker = marker();
        let script = "head -c 10000000 /dev/zero | tr '\\0' a";
        let (ending, lines) = collect(sh(script, &marker), CancellationToken::new()).await;
        assert_eq!(ending, Ending::Exited(0));
        assert_eq!(lines.len(), 10_000_000usize.div_ceil(MAX_LINE_BYTES));
        assert!(lines.iter().all(|line| line.text.len() <= MAX_LINE_BYTES));
        assert_eq!(
            lines.iter().map(|line| line.text.len()).sum::<usize>(),
            10_000_000
        );
    }

    #[tokio::test]
    async fn invalid_utf8_is_replaced() {
        let marker = marker();
        let (ending, lines) = collect(
            job(&["printf", "a\\377b\\n\\303"], &marker),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(ending, Ending::Exited(0));
        assert_eq!(texts(&lines, Stream::Stdout), ["a\u{FFFD}b", "\u{FFFD}"]);
    }

    #[tokio::test]
    async fn environment_is_exactly_the_allowed_one() {
        let mut spawn = job(&["env"], "unused");
        spawn.env = vec![
            ("TARGET".into(), "release".into()),
            ("TIDINGS_RUN_ID".into(), "01RUN".into()),
            ("LANG".into(), "C.UTF-8".into()),
        ];
        let (ending, lines) = collect(spawn, CancellationToken::new()).await;
        assert_eq!(ending, Ending::Exited(0));
        let home = std::env::var("HOME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "/".into());
        let mut got = texts(&lines, Stream::Stdout);
        got.sort_unstable();
        let mut expected = vec![
            format!("HOME={home}"),
            "LANG=C.UTF-8".to_string(),
            format!("PATH={FIXED_PATH}"),
            "TARGET=release".to_string(),
            "TIDINGS_RUN_ID=01RUN".to_string(),
        ];
        expected.sort_unstable();
        assert_eq!(got, expected);
        // Debug shows the environment's names, not its values.
        let spawn = job(&["env"], "secret-value");
        assert!(!format!("{spawn:?}").contains("secret-value"));
    }

    #[tokio::test]
    async fn working_directory_is_respected() {
        let marker = marker();
        let folder = tempfile::tempdir().expect("temp dir");
        let mut spawn = job(&["pwd"], &marker);
        spawn.dir = folder.path().to_path_buf();
        let (ending, lines) = collect(spawn, CancellationToken::new()).await;
        assert_eq!(ending, Ending::Exited(0));
        let expected = folder.path().canonicalize().expect("canonical");
        assert_eq!(texts(&lines, Stream::Stdout), [expected.to_string_lossy()]);

        let mut spawn = job(&["pwd"], &marker);
        spawn.dir = folder.path().join("missing");
        let (ending, _) = collect(spawn, CancellationToken::new()).await;
        assert!(
            matches!(&ending, Ending::FailedToStart(msg) if msg.contains("working directory")),
            "{ending:?}"
        );
    }

    #[tokio::test]
    async fn argv0_is_looked_up_on_the_jobs_path() {
        let marker = marker();
        let folder = tempfile::tempdir().expect("temp dir");
        let tool = format!("tidings-tool-{}", ulid::Ulid::new());
        let script = folder.path().join(&tool);
        std::fs::write(&script, "#!/bin/sh\necho \"$1\"\n").expect("write");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");

        // Not on the fixed PATH.
        let (ending, _) = collect(job(&[&tool], &marker), CancellationToken::new()).await;
        assert!(
            matches!(&ending, Ending::FailedToStart(msg) if msg.contains(&tool) && msg.contains("not found on PATH=/usr/local/bin:/usr/bin:/bin")),
            "{ending:?}"
        );
        // On the job's own PATH.
        let mut spawn = job(&[&tool, "x"], &marker);
        let path = folder.path().to_string_lossy().into_owned();
        spawn.env.push(("PATH".into(), path));
        let (ending, lines) = collect(spawn, CancellationToken::new()).await;
        assert_eq!(ending, Ending::Exited(0));
        assert_eq!(texts(&lines, Stream::Stdout), ["x"]);
        // A name with a '/' is taken relative to `dir`.
        let relative = format!("./{tool}");
        let mut spawn = job(&[&relative, "y"], &marker);
        spawn.dir = folder.path().to_path_buf();
        let (ending, lines) = collect(spawn, CancellationToken::new()).await;
        assert_eq!(ending, Ending::Exited(0));
        assert_eq!(texts(&lines, Stream::Stdout), ["y"]);
        // The child sees argv[0] as written, not the resolved path.
        let spawn = job(&["cat", "/proc/self/cmdline"], &marker);
        let (ending, lines) = collect(spawn, CancellationToken::new()).await;
        assert_eq!(ending, Ending::Exited(0));
        assert_eq!(texts(&lines, Stream::Stdout), ["cat\0/proc/self/cmdline\0"]);

        // A program on the hub's PATH but not on the fixed one is not found.
        let fixed: Vec<&Path> = FIXED_PATH.split(':').map(Path::new).collect();
        let hub_only = std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .find_map(|folder| {
                let folder = Path::new(folder);
                if folder.as_os_str().is_empty() || fixed.contains(&folder) {
                    return None;
                }
                std::fs::read_dir(folder).ok()?.flatten().find_map(|entry| {
                    let name = entry.file_name().into_string().ok()?;
                    let executable = entry
                        .metadata()
                        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0);
                    (executable && fixed.iter().all(|dir| !dir.join(&name).exists()))
                        .then_some(name)
                })
            });
        if let Some(name) = hub_only {
            let (ending, _) = collect(job(&[&name], &marker), CancellationToken::new()).await;
            assert!(
                matches!(ending, Ending::FailedToStart(_)),
                "{name}: {ending:?}"
            );
        }
        assert_none_left(&marker).await;
    }

    #[tokio::test]
    async fn missing_command_fails_to_start() {
        let marker = marker();
        let name = format!("tidings-no-such-command-{}", ulid::Ulid::new());
        let (ending, lines) = collect(job(&[&name], &marker), CancellationToken::new()).await;
        assert!(lines.is_empty());
        let Ending::FailedToStart(message) = ending else {
            panic!("expected FailedToStart, got {ending:?}");
        };
        assert!(
            message.contains(&name) && message.contains("not found"),
            "{message}"
        );
        let (ending, _) = collect(job(&[], &marker), CancellationToken::new()).await;
        assert_eq!(ending, Ending::FailedToStart("the command is empty".into()));
        let folder = tempfile::tempdir().expect("temp dir");
        std::fs::write(folder.path().join("data.txt"), "not a program").expect("write");
        let mut spawn = job(&["./data.txt"], &marker);
        spawn.dir = folder.path().to_path_buf();
        let (ending, _) = collect(spawn, CancellationToken::new()).await;
        assert!(
            matches!(&ending, Ending::FailedToStart(msg) if msg.contains("not an executable")),
            "{ending:?}"
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_group() {
        let marker = marker();
        let mut spawn = sh("sleep 1000 & sleep 1000", &marker);
        spawn.timeout = Some(Duration::from_millis(200));
        let started = Instant::now();
        let (ending, _) = collect(spawn, CancellationToken::new()).await;
        assert_eq!(
            ending,
            Ending::TimedOut {
                exit_code: None,
                signal: Some("SIGTERM".into())
            }
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_none_left(&marker).await;
    }

    #[tokio::test]
    async fn term_handler_exit_code_is_reported() {
        let marker = marker();
        let mut spawn = sh("trap 'exit 5' TERM; echo ready; sleep 1000 & wait", &marker);
        spawn.timeout = Some(Duration::from_millis(200));
        let (ending, lines) = collect(spawn, CancellationToken::new()).await;
        assert_eq!(texts(&lines, Stream::Stdout), ["ready"]);
        assert_eq!(
            ending,
            Ending::TimedOut {
                exit_code: Some(5),
                signal: None
            }
        );
        assert_eq!(ending.exit_code(), Some(5));
        assert_none_left(&marker).await;
    }

    #[tokio::test]
    async fn cancel_ends_the_run() {
        let marker = marker();
        let cancel = CancellationToken::new();
        let (tx, mut rx) = mpsc::channel(8);
        let running = tokio::spawn(run(
            sh("echo ready; sleep 1000", &marker),
            tx,
            cancel.clone(),
        ));
        let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a first line")
            .expect("a batch");
        assert_eq!(first[0].text, "ready");
        cancel.cancel();
        while rx.recv().await.is_some() {}
        let ending = tokio::time::timeout(Duration::from_secs(10), running)
            .await
            .expect("run ends")
            .expect("no panic");
        assert_eq!(
            ending,
            Ending::Cancelled {
                exit_code: None,
                signal: Some("SIGTERM".into())
            }
        );
        assert_none_left(&marker).await;

        // Cancelled before the start: nothing is started.
        let (ending, lines) = collect(sh("echo never", &marker), cancel).await;
        assert!(lines.is_empty());
        assert_eq!(ending.signal(), None);
        assert!(matches!(ending, Ending::Cancelled { .. }));
    }

    #[tokio::test]
    async fn ignoring_sigterm_gets_sigkill_after_grace() {
        let marker = marker();
        let mut spawn = sh("trap '' TERM; sleep 1000 & sleep 1000", &marker);
        spawn.timeout = Some(Duration::from_millis(200));
        let started = Instant::now();
        let (ending, _) = collect(spawn, CancellationToken::new()).await;
        assert_eq!(
            ending,
            Ending::TimedOut {
                exit_code: None,
                signal: Some("SIGKILL".into())
            }
        );
        assert!(started.elapsed() >= Duration::from_millis(200) + GRACE);
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_none_left(&marker).await;
    }

    #[tokio::test]
    async fn forking_job_leaves_nothing_and_returns_promptly() {
        let marker = marker();
        // The grandchild holds stdout open; another has closed its pipes.
        let script = "sleep 1000 & sleep 1001 >/dev/null 2>&1 & echo started; exit 3";
        let started = Instant::now();
        let (ending, lines) = collect(sh(script, &marker), CancellationToken::new()).await;
        assert_eq!(ending, Ending::Exited(3));
        assert_eq!(texts(&lines, Stream::Stdout), ["started"]);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_none_left(&marker).await;
    }

    #[tokio::test]
    async fn dropping_the_run_kills_the_group() {
        let marker = marker();
        let (tx, mut rx) = mpsc::channel(8);
        let running = tokio::spawn(run(
            sh("sleep 1000 & echo ready; sleep 1000", &marker),
            tx,
            CancellationToken::new(),
        ));
        let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a first line")
            .expect("a batch");
        assert_eq!(first[0].text, "ready");
        running.abort();
        assert!(running.await.is_err_and(|err| err.is_cancelled()));
        assert_none_left(&marker).await;
    }

    #[tokio::test]
    async fn endless_flood_is_cancelled() {
        let marker = marker();
        let cancel = CancellationToken::new();
        let (tx, mut rx) = mpsc::channel(1);
        let running = tokio::spawn(run(job(&["yes", &marker], &marker), tx, cancel.clone()));
        let gather = async {
            let mut count = 0usize;
            while let Some(batch) = rx.recv().await {
                count += batch.len();
                if count >= 200_000 {
                    cancel.cancel();
                }
            }
            count
        };
        let count = tokio::time::timeout(Duration::from_secs(20), gather)
            .await
            .expect("the flood ends once cancelled");
        assert!(count >= 200_000);
        let ending = running.await.expect("no panic");
        assert_eq!(ending.signal(), Some("SIGTERM"));
        assert!(matches!(ending, Ending::Cancelled { .. }), "{ending:?}");
        assert_none_left(&marker).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flood_is_received_whole() {
        let marker = marker();
        let (tx, mut rx) = mpsc::channel(16);
        let started = Instant::now();
        let running = tokio::spawn(run(
            sh("yes | head -n 1000000", &marker),
            tx,
            CancellationToken::new(),
        ));
        let (mut count, mut batches, mut other) = (0usize, 0usize, 0usize);
        let gather = async {
            while let Some(batch) = rx.recv().await {
                batches += 1;
                for line in batch {
                    count += 1;
                    if line.text != "y" || line.stream != Stream::Stdout {
                        other += 1;
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), gather)
            .await
            .expect("flood ends");
        let ending = running.await.expect("no panic");
        let elapsed = started.elapsed();
        assert_eq!(ending, Ending::Exited(0));
        assert_eq!(count, 1_000_000);
        assert_eq!(other, 0);
        println!(
            "flood: {count} lines in {batches} batches, {elapsed:?}, {:.0} lines/s",
            count as f64 / elapsed.as_secs_f64()
        );
        assert_none_left(&marker).await;
    }
}
