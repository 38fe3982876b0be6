//! `[[jobs]]` and `[[feeds]]` from the configuration, resolved into typed specs once at start-up.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{parse_duration, ConfigError};
use crate::hub::pattern::Pattern;
use crate::hub::types::ChannelName;

/// A job or feed name: one channel segment (`[A-Za-z0-9_.@-]`), at most 64 characters.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'))
}

/// A run parameter name: letters, digits and `_`, so it maps onto `TIDINGS_PARAM_{NAME}`.
pub fn valid_param_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[derive(Debug, Clone)]
pub enum Schedule {
    /// Runs only when asked (API, CLI, UI).
    Manual,
    /// First at start-up, then every interval.
    Every(Duration),
    /// Follows the clock in `timezone`.
    Cron {
        expression: String,
        cron: Box<croner::Cron>,
        timezone: chrono_tz::Tz,
    },
}

impl Schedule {
    /// What `GET /api/jobs` shows.
    pub fn describe(&self) -> Option<String> {
        match self {
            Schedule::Manual => None,
            Schedule::Every(d) => Some(format!("every {}", humantime::format_duration(*d))),
            Schedule::Cron {
                expression,
                timezone,
                ..
            } => Some(format!("cron {expression} ({timezone})")),
        }
    }

    /// The next tick strictly after `after` (None for manual jobs or an exhausted cron).
    pub fn next_after(
        &self,
        after: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        match self {
            Schedule::Manual => None,
            Schedule::Every(d) => chrono::Duration::from_std(*d).ok().map(|d| after + d),
            Schedule::Cron { cron, timezone, .. } => {
                let local = after.with_timezone(timezone);
                cron.find_next_occurrence(&local, false)
                    .ok()
                    .map(|t| t.with_timezone(&chrono::Utc))
            }
        }
    }

    /// The next tick strictly after `after` when several nodes share the schedule: `every`
    /// ticks fall on multiples of the interval since the Unix epoch, so all nodes name each tick
    /// alike (cron ticks are on the clock already).
    pub fn next_shared_after(
        &self,
        after: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        match self {
            Schedule::Every(d) => {
                let step = i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1);
                let next = (after.timestamp_millis().div_euclid(step) + 1).checked_mul(step)?;
                chrono::DateTime::from_timestamp_millis(next)
            }
            _ => self.next_after(after),
        }
    }

    /// For `every`, the shared tick at or before `at`: what a node starting at `at` runs
    /// (unless another node ran it already).
    pub fn shared_tick_at_or_before(
        &self,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        match self {
            Schedule::Every(d) => {
                let step = i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1);
                let tick = at.timestamp_millis().div_euclid(step).checked_mul(step)?;
                chrono::DateTime::from_timestamp_millis(tick)
            }
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct JobSpec {
    pub name: String,
    pub command: Vec<String>,
    pub dir: PathBuf,
    pub env: Vec<(String, String)>,
    pub schedule: Schedule,
    pub timeout: Option<Duration>,
    pub kill_grace: Duration,
    pub retries: u32,
    pub catch_up: bool,
    pub concurrency: usize,
    pub concurrency_key: Option<String>,
    pub params: Vec<String>,
    pub publish: Vec<Pattern>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeedSource {
    Config,
    Api,
}

#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct FeedSpec {
    pub name: String,
    pub url: String,
    #[serde(with = "duration_secs")]
    pub every: Duration,
    pub channel: String,
    pub source: FeedSource,
}

mod duration_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: String,
    command: Vec<String>,
    dir: Option<String>,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    cron: Option<String>,
    every: Option<String>,
    timezone: Option<String>,
    timeout: Option<String>,
    kill_grace: Option<String>,
    retries: Option<u32>,
    catch_up: Option<bool>,
    concurrency: Option<usize>,
    concurrency_key: Option<String>,
    #[serde(default)]
    params: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFeed {
    name: String,
    url: String,
    every: Option<String>,
    channel: Option<String>,
}

fn invalid(key: String, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// Feeds may not be polled more often than this.
pub const MIN_FEED_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_FEED_INTERVAL: Duration = Duration::from_secs(30);

pub fn parse_cron(key: &str, expression: &str, timezone: &str) -> Result<Schedule, ConfigError> {
    let fields = expression.split_whitespace().count();
    if !(5..=6).contains(&fields) {
        return Err(invalid(
            key.to_owned(),
            format!("{expression:?} has {fields} fields; a cron expression has 5, or 6 with seconds first"),
        ));
    }
    let cron = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(expression)
        .map_err(|e| {
            invalid(
                key.to_owned(),
                format!("{expression:?} is not a valid cron expression: {e}"),
            )
        })?;
    let timezone = chrono_tz::Tz::from_str(timezone).map_err(|_| {
        invalid(
            key.replace("cron", "timezone"),
            format!("{timezone:?} is not an IANA time zone like \"UTC\" or \"Europe/Paris\""),
        )
    })?;
    Ok(Schedule::Cron {
        expression: expression.to_owned(),
        cron: Box::new(cron),
        timezone,
    })
}

fn resolve_job(i: usize, raw: RawJob, base_dir: &Path) -> Result<JobSpec, ConfigError> {
    let key = |field: &str| format!("jobs[{i}].{field}");
    if !valid_name(&raw.name) {
        return Err(invalid(
            key("name"),
            format!(
                "{:?} must be 1-64 characters of A-Z a-z 0-9 _ . @ -",
                raw.name
            ),
        ));
    }
    if raw.command.is_empty() || raw.command[0].is_empty() {
        return Err(invalid(
            key("command"),
            "must name a program, e.g. [\"./build.sh\"]",
        ));
    }
    let schedule = match (&raw.cron, &raw.every) {
        (Some(_), Some(_)) => return Err(invalid(key("cron"), "give cron or every, not both")),
        (Some(c), None) => parse_cron(&key("cron"), c, raw.timezone.as_deref().unwrap_or("UTC"))?,
        (None, Some(e)) => {
            let d = parse_duration(&key("every"), e)?;
            if d < Duration::from_secs(1) {
                return Err(invalid(key("every"), "must be at least 1s"));
            }
            Schedule::Every(d)
        }
        (None, None) => Schedule::Manual,
    };
    if raw.timezone.is_some() && raw.cron.is_none() {
        return Err(invalid(key("timezone"), "only applies to a cron schedule"));
    }
    let timeout = match raw.timeout.as_deref() {
        None => Some(Duration::from_secs(3600)),
        Some(t) => Some(parse_duration(&key("timeout"), t)?).filter(|d| !d.is_zero()),
    };
    let kill_grace = match raw.kill_grace.as_deref() {
        None => Duration::from_secs(5),
        Some(t) => parse_duration(&key("kill_grace"), t)?,
    };
    let concurrency = raw.concurrency.unwrap_or(1);
    if concurrency == 0 {
        return Err(invalid(key("concurrency"), "must be at least 1"));
    }
    for p in &raw.params {
        if !valid_param_name(p) {
            return Err(invalid(
                key("params"),
                format!("{p:?} must be letters, digits and _"),
            ));
        }
    }
    if let Some(k) = &raw.concurrency_key {
        if !raw.params.contains(k) {
            return Err(invalid(
                key("concurrency_key"),
                format!("{k:?} is not one of this job's params"),
            ));
        }
    }
    for name in raw.env.keys() {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(invalid(
                key("env"),
                format!("{name:?} is not a valid variable name"),
            ));
        }
    }
    let publish = raw
        .publish
        .iter()
        .map(|p| Pattern::parse(p).map_err(|e| invalid(key("publish"), e.0)))
        .collect::<Result<Vec<_>, _>>()?;
    let dir = match raw.dir {
        Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
        Some(d) => base_dir.join(d),
        None => base_dir.to_path_buf(),
    };
    Ok(JobSpec {
        name: raw.name,
        command: raw.command,
        dir,
        env: raw.env.into_iter().collect(),
        schedule,
        timeout,
        kill_grace,
        retries: raw.retries.unwrap_or(0),
        catch_up: raw.catch_up.unwrap_or(false),
        concurrency,
        concurrency_key: raw.concurrency_key,
        params: raw.params,
        publish,
    })
}

/// Validates a feed (from the config or the API); `key` prefixes error keys.
pub fn feed_spec(
    key: &str,
    name: &str,
    url: &str,
    every: Option<&str>,
    channel: Option<&str>,
    source: FeedSource,
) -> Result<FeedSpec, ConfigError> {
    if !valid_name(name) {
        return Err(invalid(
            format!("{key}name"),
            format!("{name:?} must be 1-64 characters of A-Z a-z 0-9 _ . @ -"),
        ));
    }
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| invalid(format!("{key}url"), format!("{url:?} is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(format!("{key}url"), "must be http:// or https://"));
    }
    let every = match every {
        None => DEFAULT_FEED_INTERVAL,
        Some(e) => parse_duration(&format!("{key}every"), e)?,
    };
    if every < MIN_FEED_INTERVAL {
        return Err(invalid(format!("{key}every"), "must be at least 1s"));
    }
    let channel = match channel {
        Some(c) => c.to_owned(),
        None => format!("feeds:{name}"),
    };
    ChannelName::parse(&channel).map_err(|e| invalid(format!("{key}channel"), e.0))?;
    Ok(FeedSpec {
        name: name.to_owned(),
        url: url.to_owned(),
        every,
        channel,
        source,
    })
}

/// The no-config defaults: the Q&A feed mirror and a demo job, so both flagship uses show.
pub fn defaults() -> (Vec<JobSpec>, Vec<FeedSpec>) {
    let demo = JobSpec {
        name: "demo".into(),
        command: vec![
            "sh".into(),
            "-c".into(),
            "for i in $(seq 1 20); do echo \"demo line $i of 20: $(date -u +%H:%M:%S)\"; sleep 1; done".into(),
        ],
        dir: PathBuf::from("."),
        env: Vec::new(),
        schedule: Schedule::Manual,
        timeout: Some(Duration::from_secs(120)),
        kill_grace: Duration::from_secs(5),
        retries: 0,
        catch_up: false,
        concurrency: 1,
        concurrency_key: None,
        params: Vec::new(),
        publish: Vec::new(),
    };
    let feed = FeedSpec {
        name: "stackoverflow".into(),
        url: "https://stackoverflow.com/feeds".into(),
        every: DEFAULT_FEED_INTERVAL,
        channel: "feeds:stackoverflow".into(),
        source: FeedSource::Config,
    };
    (vec![demo], vec![feed])
}

/// Resolves the `jobs` and `feeds` sections of the configuration.
pub fn resolve(
    sections: &serde_json::Map<String, serde_json::Value>,
    base_dir: &Path,
) -> Result<(Vec<JobSpec>, Vec<FeedSpec>), ConfigError> {
    let mut jobs = Vec::new();
    if let Some(value) = sections.get("jobs") {
        let raws: Vec<serde_json::Value> = serde_json::from_value(value.clone()).map_err(|e| {
            invalid(
                "jobs".into(),
                format!("must be a list of [[jobs]] tables: {e}"),
            )
        })?;
        for (i, raw) in raws.into_iter().enumerate() {
            let raw: RawJob = serde_json::from_value(raw)
                .map_err(|e| invalid(format!("jobs[{i}]"), e.to_string()))?;
            let job = resolve_job(i, raw, base_dir)?;
            if jobs.iter().any(|j: &JobSpec| j.name == job.name) {
                return Err(invalid(
                    format!("jobs[{i}].name"),
                    format!("{:?} is used twice", job.name),
                ));
            }
            jobs.push(job);
        }
    }
    let mut feeds: Vec<FeedSpec> = Vec::new();
    if let Some(value) = sections.get("feeds") {
        let raws: Vec<serde_json::Value> = serde_json::from_value(value.clone()).map_err(|e| {
            invalid(
                "feeds".into(),
                format!("must be a list of [[feeds]] tables: {e}"),
            )
        })?;
        for (i, raw) in raws.into_iter().enumerate() {
            let raw: RawFeed = serde_json::from_value(raw)
                .map_err(|e| invalid(format!("feeds[{i}]"), e.to_string()))?;
            let key = format!("feeds[{i}].");
            let feed = feed_spec(
                &key,
                &raw.name,
                &raw.url,
                raw.every.as_deref(),
                raw.channel.as_deref(),
                FeedSource::Config,
            )?;
            if feeds.iter().any(|f| f.name == feed.name) {
                return Err(invalid(
                    format!("{key}name"),
                    format!("{:?} is used twice", feed.name),
                ));
            }
            feeds.push(feed);
        }
    }
    Ok((jobs, feeds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sections(toml_text: &str) -> serde_json::Map<String, serde_json::Value> {
        let v: toml::Value = toml::from_str(toml_text).unwrap();
        serde_json::to_value(v)
            .unwrap()
            .as_object()
            .unwrap()
            .clone()
    }

    #[test]
    fn a_full_job_resolves() {
        let s = sections(
            r#"
            [[jobs]]
            name = "build"
            command = ["./build.sh", "--fast"]
            dir = "work"
            env = { TARGET = "release" }
            cron = "0 */5 * * * *"
            timezone = "Europe/Paris"
            timeout = "0"
            kill_grace = "2s"
            retries = 2
            concurrency = 3
            concurrency_key = "account"
            params = ["branch", "account"]
            publish = ["accounts:*"]

            [[feeds]]
            name = "so"
            url = "https://example.org/feed"
            every = "1m"
            "#,
        );
        let (jobs, feeds) = resolve(&s, Path::new("/etc/tidings")).unwrap();
        let j = &jobs[0];
        assert_eq!(j.dir, PathBuf::from("/etc/tidings/work"));
        assert_eq!(j.timeout, None);
        assert_eq!(j.kill_grace, Duration::from_secs(2));
        assert!(matches!(j.schedule, Schedule::Cron { .. }));
        assert_eq!(feeds[0].channel, "feeds:so");
        assert_eq!(feeds[0].every, Duration::from_secs(60));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[[jobs]]\nname = \"a\"\ncommand = [\"x\"]\ncron = \"* * *\"", "jobs[0].cron"),
            ("[[jobs]]\nname = \"a\"\ncommand = [\"x\"]\ncron = \"61 * * * *\"", "jobs[0].cron"),
            ("[[jobs]]\nname = \"a\"\ncommand = [\"x\"]\ncron = \"* * * * *\"\ntimezone = \"Mars/Base\"", "jobs[0].timezone"),
            ("[[jobs]]\nname = \"a\"\ncommand = [\"x\"]\nevery = \"often\"", "jobs[0].every"),
            ("[[jobs]]\nname = \"a\"\ncommand = [\"x\"]\ntimeout = \"1 fortnight\"", "jobs[0].timeout"),
            ("[[jobs]]\nname = \"a b\"\ncommand = [\"x\"]", "jobs[0].name"),
            ("[[jobs]]\nname = \"a\"\ncommand = []", "jobs[0].command"),
            ("[[jobs]]\nname = \"a\"\ncommand = [\"x\"]\nconcurrency_key = \"k\"", "jobs[0].concurrency_key"),
            ("[[jobs]]\nname = \"a\"\ncommand = [\"x\"]\nbogus = 1", "jobs[0]"),
            ("[[feeds]]\nname = \"f\"\nurl = \"ftp://x\"", "feeds[0].url"),
            ("[[feeds]]\nname = \"f\"\nurl = \"http://x\"\nevery = \"500ms\"", "feeds[0].every"),
        ];
        for (text, key) in cases {
            let err = resolve(&sections(text), Path::new("."))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn cron_with_and_without_seconds_and_time_zones() {
        let at = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .unwrap()
                .with_timezone(&chrono::Utc)
        };
        let five = parse_cron("k", "*/5 * * * *", "UTC").unwrap();
        assert_eq!(
            five.next_after(at("2026-11-22T10:01:30Z")),
            Some(at("2026-11-22T10:05:00Z"))
        );
        let secs = parse_cron("k", "*/10 * * * * *", "UTC").unwrap();
        assert_eq!(
            secs.next_after(at("2026-11-22T10:00:01Z")),
            Some(at("2026-11-22T10:00:10Z"))
        );
        // 09:00 in Paris is 08:00 UTC in winter.
        let paris = parse_cron("k", "0 9 * * *", "Europe/Paris").unwrap();
        assert_eq!(
            paris.next_after(at("2026-11-22T00:00:00Z")),
            Some(at("2026-11-22T08:00:00Z"))
        );
        let every = Schedule::Every(Duration::from_secs(30));
        assert_eq!(
            every.next_after(at("2026-11-22T10:00:00Z")),
            Some(at("2026-11-22T10:00:30Z"))
        );
        assert_eq!(
            Schedule::Manual.next_after(at("2026-11-22T10:00:00Z")),
            None
        );
    }

    #[test]
    fn shared_every_ticks_fall_on_multiples_of_the_interval() {
        let at = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .unwrap()
                .with_timezone(&chrono::Utc)
        };
        let every = Schedule::Every(Duration::from_secs(30));
        let cases = [
            (
                "2026-11-22T10:00:00Z",
                "2026-11-22T10:00:30Z",
                "2026-11-22T10:00:00Z",
            ),
            (
                "2026-11-22T10:00:01.5Z",
                "2026-11-22T10:00:30Z",
                "2026-11-22T10:00:00Z",
            ),
            (
                "2026-11-22T10:00:29.999Z",
                "2026-11-22T10:00:30Z",
                "2026-11-22T10:00:00Z",
            ),
            (
                "2026-11-22T10:00:30Z",
                "2026-11-22T10:01:00Z",
                "2026-11-22T10:00:30Z",
            ),
        ];
        for (now, next, slot) in cases {
            assert_eq!(every.next_shared_after(at(now)), Some(at(next)), "{now}");
            assert_eq!(
                every.shared_tick_at_or_before(at(now)),
                Some(at(slot)),
                "{now}"
            );
        }
        let cron = parse_cron("k", "*/5 * * * *", "UTC").unwrap();
        assert_eq!(
            cron.next_shared_after(at("2026-11-22T10:01:30Z")),
            cron.next_after(at("2026-11-22T10:01:30Z"))
        );
        assert_eq!(
            cron.shared_tick_at_or_before(at("2026-11-22T10:01:30Z")),
            None
        );
    }
}
