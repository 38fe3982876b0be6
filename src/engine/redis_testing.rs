//! Test support: a real `redis-server` (the Debian package) on a free loopback port, in its own
//! temp directory (without persistence, or with an append-only file fsynced on every write);
//! killed when dropped. Start-up waits until the server answers `PING`, with a time limit
//! (never a fixed sleep). A machine without `redis-server` fails the test: `scripts/test.sh`
//! installs it.
//!
//! Compiled into the library's unit tests (`engine::redis_testing`) and, through `#[path]`,
//! into the integration tests (`tests/it`, `tests/browser`).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer `PING` after it was started.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A running `redis-server`; killed (and reaped) on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// AOF with `appendfsync always`: every acknowledged write survives a kill.
    aof: bool,
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it answers `PING`.
    /// Panics (failing the test) when `redis-server` is missing or will not start.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// Like `start`, with an append-only file fsynced on every write, kept across `restart`.
    pub fn start_aof() -> Self {
        Self::start_with(true)
    }

    fn start_with(aof: bool) -> Self {
        let dir = tempfile::tempdir().expect("a temp directory for redis-server");
        let mut failures = Vec::new();
        // The port is free when found but may be taken before the server binds it: try again.
        for _ in 0..5 {
            let port = free_port();
            match spawn(dir.path(), port, aof) {
                Ok(child) => {
                    return Self {
                        child: Some(child),
                        port,
                        dir,
                        aof,
                    }
                }
                Err(e) => failures.push(e),
            }
        }
        panic!("could not start redis-server: {}", failures.join("; "));
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:{port}/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server now (SIGKILL) and reaps it; the port stops answering at once.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty unless started with `start_aof`).
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match spawn(self.dir.path(), self.port, self.aof) {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(e) if Instant::now() >= deadline => {
                    panic!("could not restart redis-server on port {}: {e}", self.port)
                }
                // The old socket may linger for a moment.
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn spawn(dir: &Path, port: u16, aof: bool) -> Result<Child, String> {
    let log = dir.join(format!("redis-{port}.log"));
    let spawned = Command::new("redis-server")
        .arg("--port")
        .arg(port.to_string())
        .arg("--bind")
        .arg("127.0.0.1")
        .arg("--save")
        .arg("")
        .arg("--appendonly")
        .arg(if aof { "yes" } else { "no" })
        .arg("--appendfsync")
        .arg("always")
        .arg("--daemonize")
        .arg("no")
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "redis-server is not installed (the Redis engine's tests need a real server): \
             run scripts/test.sh, which installs the Debian package redis-server"
        ),
        Err(e) => return Err(format!("cannot run redis-server: {e}")),
    };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let output = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!(
                    "redis-server on port {port} exited ({status}): {}",
                    output.trim()
                ));
            }
            Ok(None) => {}
            Err(e) => return Err(format!("cannot watch redis-server: {e}")),
        }
        // The PID check makes sure the answer is ours, not another test's server that got the
        // same port first (ours then fails to bind and exits).
        if answers_ping(port) && server_pid(port) == Some(child.id()) {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "redis-server on port {port} did not answer PING within {START_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn answers_ping(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = stream.set_write_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut answer = [0u8; 7];
    let mut got = 0;
    while got < answer.len() {
        match stream.read(&mut answer[got..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got += n,
        }
    }
    &answer == b"+PONG\r\n"
}

/// The `process_id` the server on `port` reports (`INFO server`).
fn server_pid(port: u16) -> Option<u32> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    stream
        .set_write_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    stream.write_all(b"INFO server\r\n").ok()?;
    let mut reader = BufReader::new(stream);
    let mut header = String::new();
    reader.read_line(&mut header).ok()?;
    let len: usize = header.strip_prefix('$')?.trim().parse().ok()?;
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).ok()?;
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}
