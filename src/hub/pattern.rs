//! Channel patterns (`feeds:stackoverflow`, `feeds:*`) used by auth, retention and webhooks.

use std::fmt;

use serde::{Serialize, Serializer};

use super::types::{ChannelName, InvalidValue};

/// A channel name, or a prefix ending in `*`; the longest matching pattern wins.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    text: String,
}

impl Pattern {
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        if raw == "*" {
            return Ok(Self { text: raw.into() });
        }
        let body = raw.strip_suffix('*').unwrap_or(raw);
        if body.contains('*') {
            return Err(InvalidValue(format!(
                "pattern {raw:?} may contain '*' only at its end"
            )));
        }
        if raw.ends_with('*') {
            // A prefix: every character must be allowed in a channel name.
            if raw.len() > ChannelName::MAX_LEN + 1
                || !body
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.@-:".contains(c))
            {
                return Err(InvalidValue(format!(
                    "pattern {raw:?} is not a valid prefix"
                )));
            }
        } else {
            ChannelName::parse(raw)?;
        }
        Ok(Self { text: raw.into() })
    }

    pub fn matches(&self, channel: &ChannelName) -> bool {
        match self.text.strip_suffix('*') {
            Some(prefix) => channel.as_str().starts_with(prefix),
            None => channel.as_str() == self.text,
        }
    }

    /// Longer patterns are more specific; an exact name beats a prefix of the same length.
    pub fn specificity(&self) -> (usize, bool) {
        (self.text.len(), !self.text.ends_with('*'))
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// Picks the value of the longest pattern matching `channel`.
pub fn most_specific<'a, T>(
    rules: impl IntoIterator<Item = (&'a Pattern, T)>,
    channel: &ChannelName,
) -> Option<T> {
    rules
        .into_iter()
        .filter(|(p, _)| p.matches(channel))
        .max_by_key(|(p, _)| p.specificity())
        .map(|(_, v)| v)
}

pub fn any_matches(patterns: &[Pattern], channel: &ChannelName) -> bool {
    patterns.iter().any(|p| p.matches(channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(s: &str) -> ChannelName {
        ChannelName::parse(s).unwrap()
    }

    #[test]
    fn matching() {
        let p = Pattern::parse("feeds:*").unwrap();
        assert!(p.matches(&ch("feeds:so")));
        assert!(!p.matches(&ch("feedsx")));
        assert!(Pattern::parse("*").unwrap().matches(&ch("anything")));
        assert!(Pattern::parse("a:b").unwrap().matches(&ch("a:b")));
        assert!(!Pattern::parse("a:b").unwrap().matches(&ch("a:bc")));
        assert!(Pattern::parse("a*b").is_err());
        assert!(Pattern::parse("a b*").is_err());
        assert!(Pattern::parse("").is_err());
    }

    #[test]
    fn longest_wins() {
        let rules = [
            (Pattern::parse("*").unwrap(), 1),
            (Pattern::parse("jobs:*").unwrap(), 2),
            (Pattern::parse("jobs:build:*").unwrap(), 3),
        ];
        let pick = |c: &str| most_specific(rules.iter().map(|(p, v)| (p, *v)), &ch(c));
        assert_eq!(pick("x"), Some(1));
        assert_eq!(pick("jobs:x"), Some(2));
        assert_eq!(pick("jobs:build:1"), Some(3));
    }
}
