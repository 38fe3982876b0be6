//! Tidings: a real-time hub for background work. See `ARCHITECTURE.md` for the map.

pub mod app;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod feeds;
pub mod http;
pub mod hub;
pub mod jobs;
pub mod metrics;
pub mod webhooks;
