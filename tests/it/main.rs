//! One integration-test binary: every test starts the real `tidings` binary on an ephemeral
//! loopback port and talks to it as a client would. Shared helpers live in `support`.

#![allow(clippy::unwrap_used)]

mod auth;
mod bad_input;
mod bench;
mod channels_api;
mod cli;
mod cluster;
mod cluster_jobs;
mod feed_server;
mod feeds;
mod guarantees;
mod guarantees_durability;
mod guarantees_handoff;
mod guarantees_slow;
mod guarantees_truncation;
mod jobs;
mod jobs_failure;
mod jobs_isolation;
mod jobs_schedule;
#[path = "../../src/engine/redis_testing.rs"]
mod redis_support;
mod shutdown;
mod smoke;
mod support;
mod webhook_receiver;
mod webhooks;
