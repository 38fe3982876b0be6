//! `[webhook_policy]` and `[[webhooks]]` from the configuration, resolved once at start-up.

use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::sign::Secret;
use super::target::{HostPolicy, HostRule};
use crate::config::{parse_duration, ConfigError};
use crate::hub::pattern::Pattern;

/// How deliveries are made and given up on.
#[derive(Debug, Clone)]
pub struct WebhookPolicy {
    /// The longest one attempt (connect, request, answer) may take.
    pub timeout: Duration,
    /// Delay before each retry; when it is exhausted the delivery is recorded as failed.
    pub retry: Vec<Duration>,
    /// A webhook failing without a success for this long is disabled.
    pub disable_after: Duration,
    pub hosts: HostPolicy,
}

impl WebhookPolicy {
    /// The defaults of SPEC §3, with private destinations allowed only on a loopback-only hub.
    pub fn defaults(listen_is_loopback: bool) -> Self {
        let h = |n: u64| Duration::from_secs(n * 3600);
        Self {
            timeout: Duration::from_secs(10),
            retry: vec![
                Duration::from_secs(5),
                Duration::from_secs(300),
                Duration::from_secs(1800),
                h(2),
                h(5),
                h(10),
                h(10),
            ],
            disable_after: h(5 * 24),
            hosts: HostPolicy {
                allow_private: listen_is_loopback,
                allow: Vec::new(),
                deny: Vec::new(),
            },
        }
    }
}

/// A webhook declared in the configuration file.
#[derive(Debug, Clone)]
pub struct ConfigWebhook {
    /// Derived from the URL and patterns, so it stays the same across restarts.
    pub id: String,
    pub url: String,
    pub channels: Vec<Pattern>,
    pub secret: Option<Secret>,
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    timeout: Option<String>,
    retry: Option<Vec<String>>,
    disable_after: Option<String>,
    allow_private: Option<bool>,
    #[serde(default)]
    allow_hosts: Vec<String>,
    #[serde(default)]
    deny_hosts: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    channels: Vec<String>,
    secret: Option<String>,
    description: Option<String>,
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Reads `[webhook_policy]` and `[[webhooks]]` out of the config's subsystem sections.
pub fn resolve(
    sections: &serde_json::Map<String, serde_json::Value>,
    listen_is_loopback: bool,
) -> Result<(WebhookPolicy, Vec<ConfigWebhook>), ConfigError> {
    let mut policy = WebhookPolicy::defaults(listen_is_loopback);
    if let Some(value) = sections.get("webhook_policy") {
        let raw: RawPolicy = serde_json::from_value(value.clone())
            .map_err(|e| invalid("webhook_policy", e.to_string()))?;
        apply_policy(&mut policy, raw)?;
    }
    let mut hooks: Vec<ConfigWebhook> = Vec::new();
    if let Some(value) = sections.get("webhooks") {
        let raws: Vec<serde_json::Value> = serde_json::from_value(value.clone()).map_err(|e| {
            invalid(
                "webhooks",
                format!("must be a list of [[webhooks]] tables: {e}"),
            )
        })?;
        for (i, raw) in raws.into_iter().enumerate() {
            let key = format!("webhooks[{i}]");
            let raw: RawWebhook =
                serde_json::from_value(raw).map_err(|e| invalid(&key, e.to_string()))?;
            let hook = resolve_webhook(&key, raw, &policy)?;
            if hooks.iter().any(|h| h.id == hook.id) {
                return Err(invalid(key, "the same URL and channels are declared twice"));
            }
            hooks.push(hook);
        }
    }
    Ok((policy, hooks))
}

fn apply_policy(policy: &mut WebhookPolicy, raw: RawPolicy) -> Result<(), ConfigError> {
    if let Some(t) = raw.timeout {
        policy.timeout = parse_duration("webhook_policy.timeout", &t)?;
        if policy.timeout.is_zero() {
            return Err(invalid("webhook_policy.timeout", "must be longer than 0"));
        }
    }
    if let Some(retry) = raw.retry {
        policy.retry = retry
            .iter()
            .enumerate()
            .map(|(i, t)| parse_duration(&format!("webhook_policy.retry[{i}]"), t))
            .collect::<Result<_, _>>()?;
    }
    if let Some(t) = raw.disable_after {
        policy.disable_after = parse_duration("webhook_policy.disable_after", &t)?;
        if policy.disable_after.is_zero() {
            return Err(invalid(
                "webhook_policy.disable_after",
                "must be longer than 0",
            ));
        }
    }
    if let Some(allow) = raw.allow_private {
        policy.hosts.allow_private = allow;
    }
    let rules = |key: &str, list: &[String]| {
        list.iter()
            .map(|r| HostRule::parse(r).map_err(|e| invalid(key, e)))
            .collect::<Result<Vec<_>, _>>()
    };
    policy.hosts.allow = rules("webhook_policy.allow_hosts", &raw.allow_hosts)?;
    policy.hosts.deny = rules("webhook_policy.deny_hosts", &raw.deny_hosts)?;
    Ok(())
}

fn resolve_webhook(
    key: &str,
    raw: RawWebhook,
    policy: &WebhookPolicy,
) -> Result<ConfigWebhook, ConfigError> {
    let url = policy
        .hosts
        .check_without_lookup(&raw.url)
        .map_err(|e| invalid(format!("{key}.url"), e.to_string()))?;
    let channels =
        parse_patterns(&raw.channels).map_err(|e| invalid(format!("{key}.channels"), e))?;
    let secret = raw
        .secret
        .as_deref()
        .map(Secret::parse)
        .transpose()
        .map_err(|e| invalid(format!("{key}.secret"), e.to_string()))?;
    let description = raw
        .description
        .map(|d| check_description(&d).map(|_| d))
        .transpose()
        .map_err(|e| invalid(format!("{key}.description"), e))?;
    let mut digest = Sha256::new();
    digest.update(url.as_str().as_bytes());
    for p in &channels {
        digest.update(b"\n");
        digest.update(p.as_str().as_bytes());
    }
    let hex: String = digest
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(ConfigWebhook {
        id: format!("wh_cfg_{hex}"),
        url: url.to_string(),
        channels,
        secret,
        description,
    })
}

/// At most this many patterns per webhook.
pub const MAX_PATTERNS: usize = 64;
/// At most this long a description.
pub const MAX_DESCRIPTION: usize = 1024;

/// One or more valid, distinct channel patterns.
pub fn parse_patterns(raw: &[String]) -> Result<Vec<Pattern>, String> {
    if raw.is_empty() {
        return Err("at least one channel pattern is needed".into());
    }
    if raw.len() > MAX_PATTERNS {
        return Err(format!("at most {MAX_PATTERNS} channel patterns"));
    }
    let mut out: Vec<Pattern> = Vec::new();
    for p in raw {
        let pattern = Pattern::parse(p).map_err(|e| e.0)?;
        if !out.contains(&pattern) {
            out.push(pattern);
        }
    }
    Ok(out)
}

pub fn check_description(d: &str) -> Result<(), String> {
    if d.len() > MAX_DESCRIPTION {
        return Err(format!("at most {MAX_DESCRIPTION} bytes"));
    }
    if d.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err("control characters are not allowed".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sections(toml_text: &str) -> serde_json::Map<String, serde_json::Value> {
        let value: toml::Value = toml::from_str(toml_text).unwrap();
        serde_json::to_value(value)
            .unwrap()
            .as_object()
            .unwrap()
            .clone()
    }

    #[test]
    fn policy_and_webhooks_resolve_with_stable_ids() {
        let text = r#"
            [webhook_policy]
            timeout = "300ms"
            retry = ["100ms", "1s"]
            disable_after = "1m"
            allow_hosts = ["*.corp.example", "10.0.0.0/8"]
            [[webhooks]]
            url = "https://example.org/hook"
            channels = ["accounts:*", "accounts:*"]
            secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
        "#;
        let (policy, hooks) = resolve(&sections(text), true).unwrap();
        assert_eq!(policy.timeout, Duration::from_millis(300));
        assert_eq!(policy.retry.len(), 2);
        assert!(policy.hosts.allow_private);
        assert_eq!(policy.hosts.allow.len(), 2);
        assert_eq!(hooks.len(), 1);
        assert_eq!(hooks[0].channels.len(), 1);
        let (_, again) = resolve(&sections(text), false).unwrap();
        assert_eq!(hooks[0].id, again[0].id);
        let (defaults, _) = resolve(&sections(""), false).unwrap();
        assert!(!defaults.hosts.allow_private);
        assert_eq!(defaults.retry.len(), 7);
    }

    #[test]
    fn bad_entries_name_their_key() {
        for (text, key) in [
            (
                "[webhook_policy]\ntimeout = \"soon\"",
                "webhook_policy.timeout",
            ),
            (
                "[webhook_policy]\nretry = [\"1s\", \"x\"]",
                "webhook_policy.retry[1]",
            ),
            (
                "[webhook_policy]\nallow_hosts = [\"a*b\"]",
                "webhook_policy.allow_hosts",
            ),
            ("[webhook_policy]\nbogus = 1", "webhook_policy"),
            (
                "[[webhooks]]\nurl = \"ftp://x\"\nchannels = [\"a\"]",
                "webhooks[0].url",
            ),
            (
                "[[webhooks]]\nurl = \"http://x\"\nchannels = []",
                "webhooks[0].channels",
            ),
            (
                "[[webhooks]]\nurl = \"http://x/#top\"\nchannels = [\"a\"]",
                "webhooks[0].url",
            ),
            (
                "[webhook_policy]\nallow_private = false\n[[webhooks]]\nurl = \"http://10.0.0.1/\"\nchannels = [\"a\"]",
                "webhooks[0].url",
            ),
            (
                "[webhook_policy]\ndeny_hosts = [\"*.example\"]\n[[webhooks]]\nurl = \"http://a.example/\"\nchannels = [\"a\"]",
                "webhooks[0].url",
            ),
            (
                "[[webhooks]]\nurl = \"http://x\"\nchannels = [\"a\"]\nsecret = \"s\"",
                "webhooks[0].secret",
            ),
        ] {
            let err = resolve(&sections(text), true).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }
}
