//! Headless Chromium driven over WebDriver (Debian's `chromedriver`, through `fantoccini`).
//!
//! Each test gets its own chromedriver on a free loopback port and a fresh profile; both are
//! killed (the whole process group) when the `Browser` is dropped, even if the test panicked.
//! Waits poll a JavaScript condition with a deadline — never a fixed sleep.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder};
use serde_json::{json, Value};

/// How long any single wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// Chromium's flags for a container without GPU, sandbox or network beyond loopback.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--disable-default-apps",
    "--mute-audio",
    "--window-size=1280,900",
];

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// The Chromium binary: Debian's real one behind its wrapper script when present.
fn chromium() -> PathBuf {
    let real = PathBuf::from("/usr/lib/chromium/chromium");
    if real.is_file() {
        return real;
    }
    which("chromium")
        .or_else(|| which("chromium-browser"))
        .or_else(|| which("google-chrome"))
        .unwrap_or_else(|| {
            panic!(
                "headless Chromium is required for the browser tests and was not found: \
                 install it with `apt-get install -y chromium chromium-driver` \
                 (scripts/test.sh does this)"
            )
        })
}

fn chromedriver() -> PathBuf {
    which("chromedriver").unwrap_or_else(|| {
        panic!(
            "chromedriver is required for the browser tests and was not found: install it with \
             `apt-get install -y chromium chromium-driver` (scripts/test.sh does this)"
        )
    })
}

/// chromedriver's process group, killed whole on drop (it takes Chromium with it).
struct Driver {
    child: Child,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `POST /session/{id}/se/log` — chromedriver's browser console log (W3C mode).
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _url: &url::Url) -> (axum::http::Method, Option<String>) {
        (
            axum::http::Method::POST,
            Some(json!({"type": "browser"}).to_string()),
        )
    }
}

pub struct Browser {
    pub client: Client,
    _driver: Driver,
    _profile: tempfile::TempDir,
    /// Console entries already read (the log endpoint drains; tests want all of them).
    console: Vec<String>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Browser {
    pub async fn start() -> Self {
        let chromium = chromium();
        let driver_bin = chromedriver();
        let profile = tempfile::tempdir().expect("profile dir");
        let port = free_port();
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(&driver_bin)
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("could not start {}: {e}", driver_bin.display()))
        };
        let driver = Driver { child };
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium.to_string_lossy(), "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        });
        let capabilities = match capabilities {
            Value::Object(map) => map,
            _ => unreachable!(),
        };
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + WAIT;
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("could not start a Chromium session via chromedriver: {e}"),
            }
        };
        Browser {
            client,
            _driver: driver,
            _profile: profile,
            console: Vec::new(),
        }
    }

    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    pub async fn refresh(&self) {
        self.client.refresh().await.expect("reload the page");
    }

    /// Runs `script` (a function body: use `return`) in the page.
    pub async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Runs `script` with `done` as the callback; returns what it passes to `done`.
    pub async fn js_async(&self, script: &str) -> Value {
        let body = format!("const done = arguments[arguments.length - 1];\n{script}");
        self.client
            .execute_async(&body, vec![])
            .await
            .unwrap_or_else(|e| panic!("async script failed: {e}\n{script}"))
    }

    /// Polls `script` until it returns something truthy; returns that value.
    pub async fn wait(&mut self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        let mut last;
        loop {
            match self.client.execute(script, vec![]).await {
                Ok(v) if truthy(&v) => return v,
                Ok(v) => last = v,
                // A navigation in progress: the page is not there to ask yet.
                Err(e) => last = Value::String(format!("error: {e}")),
            }
            if Instant::now() > deadline {
                let console = self.console_all().await;
                let url = self.client.current_url().await.map(|u| u.to_string());
                panic!(
                    "timed out waiting for {what}\n  condition: {script}\n  last value: {last}\n  \
                     page: {url:?}\n  console: {console:#?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every console entry so far, as "LEVEL message".
    pub async fn console_all(&mut self) -> Vec<String> {
        if let Ok(Value::Array(entries)) = self.client.issue_cmd(BrowserLog).await {
            for e in entries {
                self.console.push(format!(
                    "{} {}",
                    e["level"].as_str().unwrap_or("?"),
                    e["message"].as_str().unwrap_or("")
                ));
            }
        }
        self.console.clone()
    }

    /// Console errors (level SEVERE) so far, minus those `allowed` matches.
    pub async fn console_errors(&mut self, allowed: &[&str]) -> Vec<String> {
        self.console_all()
            .await
            .into_iter()
            .filter(|l| l.starts_with("SEVERE"))
            .filter(|l| !allowed.iter().any(|a| l.contains(a)))
            .collect()
    }

    pub async fn resize(&self, width: u32, height: u32) {
        self.client
            .set_window_size(width, height)
            .await
            .expect("resize the window");
    }

    /// Saves a PNG of the viewport as `target/screenshots/{name}.png`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    pub async fn close(self) {
        let Browser {
            client, _driver, ..
        } = self;
        let _ = tokio::time::timeout(Duration::from_secs(5), client.close()).await;
        drop(_driver);
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}
