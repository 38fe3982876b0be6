//! Browser end-to-end tests of the web UI and `/tidings.js`, in headless Chromium (Debian's
//! `chromium` + `chromium-driver`; `scripts/test.sh` installs them). Each test starts its own
//! hub (the real binary, on an ephemeral loopback port) and its own browser; they take turns,
//! since two Chromiums on two cores would only make each other slow. Without Chromium the
//! tests fail with the command that installs it — they never skip.
//!
//! Screenshots of every page, desktop and 360 px wide, land in `target/screenshots/`.
//! `http.rs` checks the UI's HTTP surface (types, CSP, ETag, CORS) without a browser.

#![allow(clippy::unwrap_used)]

mod harness;
mod http;
mod pages;
#[path = "../../src/engine/redis_testing.rs"]
mod redis_support;
#[path = "../it/support.rs"]
mod support;

use std::future::Future;

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs one browser test on its own runtime, after any other has finished.
pub fn browser_test<F, Fut>(body: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(body());
}
