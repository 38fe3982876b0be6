//! Configuration: TOML file, then `TIDINGS__SECTION__KEY` environment variables, then command-line
//! flags, resolved once into typed values (durations, patterns) so nothing downstream parses.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::engine::sqlite::Sync;
use crate::hub::pattern::Pattern;
use crate::hub::retention::{Retention, RetentionRules};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Parse(String),
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: String,
    data: PathBuf,
    cors_origins: Vec<String>,
    engine: Option<String>,
    sync: Sync,
    max_subscriptions_per_connection: usize,
    shutdown_grace: String,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            data: "./tidings-data".into(),
            cors_origins: vec!["*".into()],
            engine: None,
            sync: Sync::Full,
            max_subscriptions_per_connection: 1000,
            shutdown_grace: "10s".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawAuth {
    api_keys: Vec<String>,
    token_secret: Option<String>,
    public: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    publish_per_second_per_ip: u32,
    dedupe_window: String,
    max_concurrent_runs: usize,
    feed_timeout: String,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            publish_per_second_per_ip: 0,
            dedupe_window: "7d".into(),
            max_concurrent_runs: 32,
            feed_timeout: "30s".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    pattern: String,
    max_messages: Option<u64>,
    max_age: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
struct RawConfig {
    server: RawServer,
    auth: Option<RawAuth>,
    limits: RawLimits,
    retention: Vec<RawRetention>,
    /// Sections owned by subsystems that validate them themselves (jobs, feeds, webhooks).
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

/// Command-line flags of `tidings serve`; each one wins over the file and the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data: Option<PathBuf>,
    pub engine: Option<String>,
    pub insecure: bool,
}

#[derive(Debug, Clone)]
pub enum EngineChoice {
    Embedded,
    Redis(String),
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub api_keys: Vec<String>,
    pub token_secret: Option<String>,
    pub public: Vec<Pattern>,
}

impl AuthConfig {
    /// With no API keys everything is open (development on loopback).
    pub fn is_open(&self) -> bool {
        self.api_keys.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub data: PathBuf,
    pub cors_origins: Vec<String>,
    pub engine: EngineChoice,
    pub sync: Sync,
    pub max_subscriptions_per_connection: usize,
    pub shutdown_grace: Duration,
    pub auth: AuthConfig,
    pub publish_per_second_per_ip: u32,
    pub dedupe_window: Duration,
    pub retention: RetentionRules,
    pub insecure: bool,
    /// The folder relative paths in the file are resolved against (the file's; else the cwd).
    pub base_dir: PathBuf,
    /// Sections for later subsystems, as parsed.
    pub sections: serde_json::Map<String, serde_json::Value>,
    pub jobs: Vec<crate::jobs::spec::JobSpec>,
    pub feeds: Vec<crate::jobs::spec::FeedSpec>,
    /// Runs that may execute at once across all jobs.
    pub max_concurrent_runs: usize,
    /// The most one feed fetch (connect, headers and body) may take.
    pub feed_timeout: Duration,
    pub webhook_policy: crate::webhooks::spec::WebhookPolicy,
    pub webhooks: Vec<crate::webhooks::spec::ConfigWebhook>,
}

impl Config {
    /// Loads defaults, then `file`, then the environment, then `overrides`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        Self::load_from(file, Env::prefixed("TIDINGS__").split("__"), overrides)
    }

    fn load_from(
        file: Option<&Path>,
        env: Env,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(RawConfig::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Parse(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        let figment = figment.merge(env);
        let raw: RawConfig = figment.extract().map_err(describe_figment_error)?;
        let base_dir = file
            .and_then(|p| p.parent())
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        let mut config = resolve(raw, overrides, base_dir)?;
        if file.is_none() && config.jobs.is_empty() && config.feeds.is_empty() {
            // No configuration at all: show both flagship uses out of the box.
            let (jobs, feeds) = crate::jobs::spec::defaults();
            config.jobs = jobs;
            config.feeds = feeds;
        }
        Ok(config)
    }

    /// Parses a config from TOML text (tests and `--check`).
    pub fn from_toml(text: &str, overrides: &Overrides) -> Result<Self, ConfigError> {
        let raw: RawConfig = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(describe_figment_error)?;
        resolve(raw, overrides, PathBuf::from("."))
    }
}

fn describe_figment_error(e: figment::Error) -> ConfigError {
    let mut parts = Vec::new();
    for err in e {
        let key = err.path.join(".");
        if key.is_empty() {
            parts.push(err.kind.to_string());
        } else {
            parts.push(format!("key `{key}`: {}", err.kind));
        }
    }
    ConfigError::Parse(parts.join("; "))
}

/// Parses "30s", "5m", "7d", "1h 30m"; a bare number is seconds.
pub fn parse_duration(key: &str, text: &str) -> Result<Duration, ConfigError> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text).map_err(|e| {
        invalid(
            key,
            format!("{text:?} is not a duration like \"30s\", \"5m\" or \"7d\" ({e})"),
        )
    })
}

/// Top-level sections read by subsystems other than the core (each validates its own).
const LATER_SECTIONS: &[&str] = &["jobs", "feeds", "webhooks", "webhook_policy"];

fn resolve(
    raw: RawConfig,
    overrides: &Overrides,
    base_dir: PathBuf,
) -> Result<Config, ConfigError> {
    let listen = overrides.listen.clone().unwrap_or(raw.server.listen);
    if listen.trim().is_empty() {
        return Err(invalid(
            "server.listen",
            "must be an address like 127.0.0.1:8080",
        ));
    }
    let data = overrides.data.clone().unwrap_or(raw.server.data);
    let engine = match overrides.engine.clone().or(raw.server.engine) {
        None => EngineChoice::Embedded,
        Some(e) if e == "embedded" || e == "sqlite" => EngineChoice::Embedded,
        Some(e) if e.starts_with("redis://") || e.starts_with("rediss://") => {
            EngineChoice::Redis(e)
        }
        Some(e) => {
            return Err(invalid(
                "server.engine",
                format!("{e:?} is neither \"embedded\" nor a redis:// URL"),
            ))
        }
    };
    if raw.server.max_subscriptions_per_connection == 0 {
        return Err(invalid(
            "server.max_subscriptions_per_connection",
            "must be at least 1",
        ));
    }
    let auth_raw = raw.auth.unwrap_or_default();
    if auth_raw.api_keys.iter().any(|k| k.trim().is_empty()) {
        return Err(invalid("auth.api_keys", "keys must not be empty"));
    }
    if auth_raw
        .token_secret
        .as_deref()
        .is_some_and(|s| s.is_empty())
    {
        return Err(invalid("auth.token_secret", "must not be empty"));
    }
    let public = auth_raw
        .public
        .iter()
        .map(|p| Pattern::parse(p).map_err(|e| invalid("auth.public", e.0)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rules = Vec::new();
    for (i, r) in raw.retention.iter().enumerate() {
        let key = format!("retention[{i}]");
        let pattern =
            Pattern::parse(&r.pattern).map_err(|e| invalid(format!("{key}.pattern"), e.0))?;
        let defaults = RetentionRules::default().for_channel_pattern(&pattern);
        let max_messages = r.max_messages.unwrap_or(defaults.max_messages);
        if max_messages == 0 {
            return Err(invalid(format!("{key}.max_messages"), "must be at least 1"));
        }
        let max_age = match &r.max_age {
            Some(t) => parse_duration(&format!("{key}.max_age"), t)?,
            None => defaults.max_age,
        };
        if max_age.is_zero() {
            return Err(invalid(format!("{key}.max_age"), "must be longer than 0"));
        }
        rules.push((
            pattern,
            Retention {
                max_messages,
                max_age,
            },
        ));
    }
    if let Some(unknown) = raw
        .rest
        .keys()
        .find(|k| !LATER_SECTIONS.contains(&k.as_str()))
    {
        return Err(invalid(unknown.clone(), "unknown section"));
    }
    let dedupe_window = parse_duration("limits.dedupe_window", &raw.limits.dedupe_window)?;
    if raw.limits.max_concurrent_runs == 0 {
        return Err(invalid("limits.max_concurrent_runs", "must be at least 1"));
    }
    let (jobs, feeds) = crate::jobs::spec::resolve(&raw.rest, &base_dir)?;
    let feed_timeout = parse_duration("limits.feed_timeout", &raw.limits.feed_timeout)?;
    if feed_timeout.is_zero() {
        return Err(invalid("limits.feed_timeout", "must be longer than 0"));
    }
    let shutdown_grace = parse_duration("server.shutdown_grace", &raw.server.shutdown_grace)?;
    let (webhook_policy, webhooks) =
        crate::webhooks::spec::resolve(&raw.rest, crate::app::is_loopback(&listen))?;
    Ok(Config {
        listen,
        data,
        cors_origins: raw.server.cors_origins,
        engine,
        sync: raw.server.sync,
        max_subscriptions_per_connection: raw.server.max_subscriptions_per_connection,
        shutdown_grace,
        auth: AuthConfig {
            api_keys: auth_raw.api_keys,
            token_secret: auth_raw.token_secret,
            public,
        },
        publish_per_second_per_ip: raw.limits.publish_per_second_per_ip,
        dedupe_window,
        retention: RetentionRules::new(rules),
        insecure: overrides.insecure,
        base_dir,
        sections: raw.rest,
        jobs,
        feeds,
        max_concurrent_runs: raw.limits.max_concurrent_runs,
        feed_timeout,
        webhook_policy,
        webhooks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::from_toml("", &Overrides::default()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080");
        assert!(c.auth.is_open());
        assert_eq!(c.dedupe_window, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(c.max_subscriptions_per_connection, 1000);
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../tidings.example.toml");
        let c = Config::from_toml(text, &Overrides::default()).unwrap();
        assert_eq!(c.auth.public.len(), 2);
        let chat = crate::hub::types::ChannelName::parse("chat:x").unwrap();
        assert_eq!(c.retention.for_channel(&chat).max_messages, 500);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[limits]\ndedupe_window = \"soon\"", "limits.dedupe_window"),
            ("[[retention]]\npattern = \"a*b\"", "retention[0].pattern"),
            (
                "[[retention]]\npattern = \"x\"\nmax_age = \"-1\"",
                "retention[0].max_age",
            ),
            ("[server]\nlisten = 5", "server.listen"),
            ("[server]\nbogus = 1", "bogus"),
            ("[auth]\npublic = [\"bad name\"]", "auth.public"),
            ("[typo]\nx = 1", "typo"),
        ];
        for (text, key) in cases {
            let err = Config::from_toml(text, &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API fixes the error type
    fn environment_overrides_file_and_flags_override_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("t.toml", "[server]\nlisten = \"127.0.0.1:1\"\ndata = \"d\"")?;
            jail.set_env("TIDINGS__SERVER__LISTEN", "127.0.0.1:2");
            jail.set_env("TIDINGS__LIMITS__PUBLISH_PER_SECOND_PER_IP", "5");
            let env = Env::prefixed("TIDINGS__").split("__");
            let c = Config::load_from(Some(Path::new("t.toml")), env, &Overrides::default())
                .map_err(|e| e.to_string())?;
            assert_eq!(c.listen, "127.0.0.1:2");
            assert_eq!(c.publish_per_second_per_ip, 5);
            let flags = Overrides {
                listen: Some("127.0.0.1:3".into()),
                ..Default::default()
            };
            let env = Env::prefixed("TIDINGS__").split("__");
            let c = Config::load_from(Some(Path::new("t.toml")), env, &flags)
                .map_err(|e| e.to_string())?;
            assert_eq!(c.listen, "127.0.0.1:3");
            Ok(())
        });
    }
}
