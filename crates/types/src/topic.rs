use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a topic name or filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TopicError {
    /// Topics must have at least one character.
    #[error("topic is empty")]
    Empty,
    /// Longer than the configured maximum.
    #[error("topic is {len} bytes long, the limit is {max}")]
    TooLong {
        /// Actual length in bytes.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// More `/`-separated levels than the configured maximum.
    #[error("topic has {levels} levels, the limit is {max}")]
    TooManyLevels {
        /// Actual number of levels.
        levels: usize,
        /// Configured limit.
        max: usize,
    },
    /// The NUL character is forbidden by the MQTT specification.
    #[error("topic contains the NUL character")]
    Nul,
    /// `+` or `#` in a topic name (they are only allowed in filters).
    #[error("wildcards '+' and '#' are not allowed in a topic name")]
    WildcardInName,
    /// `#` not alone in the last level, or `+` sharing a level with other characters.
    #[error("wildcard misplaced: '+' must fill a whole level and '#' must be the whole last level")]
    BadWildcard,
    /// `$share/` filter without a group name or filter, or with an invalid group name.
    #[error("malformed shared subscription: expected $share/{{group}}/{{filter}}")]
    BadShare,
}

/// Limits applied when validating topics (configurable per listener).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    /// Maximum length in bytes (the protocol maximum is 65535).
    pub max_len: usize,
    /// Maximum number of levels (`a/b/c` has three).
    pub max_levels: usize,
}

impl Default for TopicLimits {
    fn default() -> Self {
        TopicLimits {
            max_len: 65_535,
            max_levels: 128,
        }
    }
}

impl TopicLimits {
    fn check_common(&self, s: &str) -> Result<(), TopicError> {
        if s.is_empty() {
            return Err(TopicError::Empty);
        }
        if s.len() > self.max_len {
            return Err(TopicError::TooLong {
                len: s.len(),
                max: self.max_len,
            });
        }
        if s.as_bytes().contains(&0) {
            return Err(TopicError::Nul);
        }
        let levels = s.bytes().filter(|&b| b == b'/').count() + 1;
        if levels > self.max_levels {
            return Err(TopicError::TooManyLevels {
                levels,
                max: self.max_levels,
            });
        }
        Ok(())
    }
}

/// A validated topic name: what a PUBLISH is sent to. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TopicName(Arc<str>);

impl TopicName {
    /// Validates `s` as a topic name under `limits`.
    pub fn new(s: &str, limits: &TopicLimits) -> Result<TopicName, TopicError> {
        limits.check_common(s)?;
        if s.bytes().any(|b| b == b'+' || b == b'#') {
            return Err(TopicError::WildcardInName);
        }
        Ok(TopicName(Arc::from(s)))
    }

    /// Validates a shared string as a topic name without copying it.
    pub fn from_arc(s: Arc<str>, limits: &TopicLimits) -> Result<TopicName, TopicError> {
        limits.check_common(&s)?;
        if s.bytes().any(|b| b == b'+' || b == b'#') {
            return Err(TopicError::WildcardInName);
        }
        Ok(TopicName(s))
    }

    /// Validates with the default limits.
    pub fn parse(s: &str) -> Result<TopicName, TopicError> {
        Self::new(s, &TopicLimits::default())
    }

    /// The topic as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The shared string (cloning it is a reference-count increment).
    pub fn as_arc(&self) -> &Arc<str> {
        &self.0
    }

    /// Topics whose first character is `$` are reserved (`$SYS`, platform services) and are never
    /// matched by a filter starting with a wildcard.
    pub fn is_reserved(&self) -> bool {
        self.0.starts_with('$')
    }
}

impl Deref for TopicName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated topic filter: what a SUBSCRIBE names, possibly with `+` and `#` wildcards.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TopicFilter(Arc<str>);

impl TopicFilter {
    /// Validates `s` as a (non-shared) topic filter under `limits`.
    pub fn new(s: &str, limits: &TopicLimits) -> Result<TopicFilter, TopicError> {
        limits.check_common(s)?;
        let mut levels = s.split('/').peekable();
        while let Some(level) = levels.next() {
            let is_last = levels.peek().is_none();
            if level.contains('#') && (level != "#" || !is_last) {
                return Err(TopicError::BadWildcard);
            }
            if level.contains('+') && level != "+" {
                return Err(TopicError::BadWildcard);
            }
        }
        Ok(TopicFilter(Arc::from(s)))
    }

    /// Validates with the default limits.
    pub fn parse(s: &str) -> Result<TopicFilter, TopicError> {
        Self::new(s, &TopicLimits::default())
    }

    /// The filter as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when the filter contains `+` or `#`.
    pub fn has_wildcards(&self) -> bool {
        self.0.bytes().any(|b| b == b'+' || b == b'#')
    }

    /// Whether this filter matches `topic` (MQTT rules, including the `$` rule).
    pub fn matches(&self, topic: &str) -> bool {
        filter_matches(&self.0, topic)
    }
}

impl Deref for TopicFilter {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A filter as the client wrote it: either plain, or `$share/{group}/{filter}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SharedFilter {
    /// The share group name, when the subscription is shared.
    pub group: Option<Arc<str>>,
    /// The filter that topics are matched against.
    pub filter: TopicFilter,
}

/// Parses a subscription filter, recognising `$share/{group}/{filter}`.
pub fn parse_shared(s: &str, limits: &TopicLimits) -> Result<SharedFilter, TopicError> {
    if let Some(rest) = s.strip_prefix("$share/") {
        let (group, filter) = rest.split_once('/').ok_or(TopicError::BadShare)?;
        if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
            return Err(TopicError::BadShare);
        }
        Ok(SharedFilter {
            group: Some(Arc::from(group)),
            filter: TopicFilter::new(filter, limits)?,
        })
    } else {
        Ok(SharedFilter {
            group: None,
            filter: TopicFilter::new(s, limits)?,
        })
    }
}

/// Whether `filter` matches `topic` under the MQTT rules: `+` matches one level, `#` the rest
/// (including the parent level), and a topic starting with `$` is not matched by a filter whose
/// first level is a wildcard.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_rules() {
        assert!(filter_matches("a/b", "a/b"));
        assert!(!filter_matches("a/b", "a/c"));
        assert!(filter_matches("a/+", "a/b"));
        assert!(!filter_matches("a/+", "a/b/c"));
        assert!(filter_matches("a/#", "a"));
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(filter_matches("#", "a/b"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(!filter_matches("+/x", "$SYS/x"));
        assert!(filter_matches("$SYS/#", "$SYS/x"));
        assert!(filter_matches("+/+", "/x"));
        assert!(filter_matches("a/+/c", "a//c"));
        assert!(!filter_matches("a/b/c", "a/b"));
    }

    #[test]
    fn validation() {
        assert!(TopicFilter::parse("a/#/b").is_err());
        assert!(TopicFilter::parse("a/b#").is_err());
        assert!(TopicFilter::parse("a/+b").is_err());
        assert!(TopicFilter::parse("+/+/#").is_ok());
        assert!(TopicName::parse("a/+").is_err());
        assert!(TopicName::parse("").is_err());
        let limits = TopicLimits {
            max_len: 5,
            max_levels: 2,
        };
        assert!(TopicName::new("abcdef", &limits).is_err());
        assert!(TopicName::new("a/b/c", &limits).is_err());
        let s = parse_shared("$share/g1/a/+", &limits).unwrap();
        assert_eq!(s.group.as_deref(), Some("g1"));
        assert_eq!(s.filter.as_str(), "a/+");
        assert!(parse_shared("$share/g1", &limits).is_err());
        assert!(parse_shared("$share//a", &limits).is_err());
    }

    proptest::proptest! {
        /// A filter made of a topic's own levels, with any levels replaced by `+` or a `#` tail,
        /// always matches that topic (unless the `$` rule applies).
        #[test]
        fn wildcard_generalisations_match(levels in proptest::collection::vec("[a-z$]{0,3}", 1..6),
                                          mask in proptest::collection::vec(proptest::bool::ANY, 6),
                                          hash_at in 0usize..7) {
            let topic = levels.join("/");
            let mut f: Vec<String> = levels.iter().enumerate()
                .map(|(i, l)| if mask[i] { "+".to_string() } else { l.clone() }).collect();
            if hash_at < f.len() { f.truncate(hash_at); f.push("#".into()); }
            let filter = f.join("/");
            let dollar_rule = topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#'));
            proptest::prop_assert_eq!(filter_matches(&filter, &topic), !dollar_rule);
        }
    }
}
