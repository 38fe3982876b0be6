//! Retention rules per channel pattern: how many messages and how old, the longest pattern wins.

use std::time::Duration;

use super::pattern::{most_specific, Pattern};
use super::types::ChannelName;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_messages: u64,
    pub max_age: Duration,
}

impl Retention {
    pub fn max_age_ms(&self) -> i64 {
        i64::try_from(self.max_age.as_millis()).unwrap_or(i64::MAX)
    }
}

#[derive(Debug, Clone)]
pub struct RetentionRules {
    rules: Vec<(Pattern, Retention)>,
}

const DAY: u64 = 24 * 3600;

impl Default for RetentionRules {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl RetentionRules {
    /// Configured rules on top of the defaults (`*`: 1,000 / 7 days, `jobs:*`: 100,000 / 30 days);
    /// a configured rule with the same pattern replaces a default.
    pub fn new(configured: Vec<(Pattern, Retention)>) -> Self {
        let mut rules = vec![
            (
                Pattern::parse("*").expect("'*' is a valid pattern"),
                Retention {
                    max_messages: 1_000,
                    max_age: Duration::from_secs(7 * DAY),
                },
            ),
            (
                Pattern::parse("jobs:*").expect("'jobs:*' is a valid pattern"),
                Retention {
                    max_messages: 100_000,
                    max_age: Duration::from_secs(30 * DAY),
                },
            ),
        ];
        for (pattern, retention) in configured {
            rules.retain(|(p, _)| p != &pattern);
            rules.push((pattern, retention));
        }
        Self { rules }
    }

    pub fn for_channel(&self, channel: &ChannelName) -> Retention {
        most_specific(self.rules.iter().map(|(p, r)| (p, *r)), channel).unwrap_or(self.rules[0].1)
    }
}

impl RetentionRules {
    /// The default a configured pattern starts from (so `pattern = "jobs:x:*"` without
    /// `max_messages` inherits the `jobs:*` default).
    pub fn for_channel_pattern(&self, pattern: &Pattern) -> Retention {
        let probe = pattern.as_str().trim_end_matches('*').trim_end_matches(':');
        match ChannelName::parse(probe) {
            Ok(name) => self.for_channel(&name),
            Err(_) => self.rules[0].1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let rules = RetentionRules::new(vec![(
            Pattern::parse("jobs:build:*").unwrap(),
            Retention {
                max_messages: 5,
                max_age: Duration::from_secs(1),
            },
        )]);
        let ch = |s| ChannelName::parse(s).unwrap();
        assert_eq!(rules.for_channel(&ch("x")).max_messages, 1_000);
        assert_eq!(rules.for_channel(&ch("jobs:a:1")).max_messages, 100_000);
        assert_eq!(rules.for_channel(&ch("jobs:build:1")).max_messages, 5);
    }
}
