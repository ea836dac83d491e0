//! Code tokens (a loaded binary and its workers) and execution tokens.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// Names one loaded binary and its worker pool. Printable and parseable
/// (`code-<n>`), so it can cross process boundaries as text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CodeToken(pub(crate) u64);

/// Names one execution; pass it to [`crate::Engine::cancel`]. Printable and
/// parseable (`exec-<shard>-<n>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExecutionToken {
    pub(crate) shard: u32,
    pub(crate) id: u64,
}

impl fmt::Display for CodeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "code-{}", self.0)
    }
}

impl fmt::Display for ExecutionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exec-{}-{}", self.shard, self.id)
    }
}

impl FromStr for CodeToken {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        s.strip_prefix("code-")
            .and_then(|n| n.parse().ok())
            .map(CodeToken)
            .ok_or_else(|| Error::InvalidArgument(format!("{s:?} is not a code token (expected code-<n>)")))
    }
}

impl FromStr for ExecutionToken {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::InvalidArgument(format!("{s:?} is not an execution token (expected exec-<shard>-<n>)"));
        let rest = s.strip_prefix("exec-").ok_or_else(bad)?;
        let (shard, id) = rest.split_once('-').ok_or_else(bad)?;
        Ok(ExecutionToken { shard: shard.parse().map_err(|_| bad())?, id: id.parse().map_err(|_| bad())? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_as_text() {
        let c = CodeToken(42);
        assert_eq!(c.to_string().parse::<CodeToken>().unwrap(), c);
        let e = ExecutionToken { shard: 1, id: 7 };
        assert_eq!(e.to_string(), "exec-1-7");
        assert_eq!("exec-1-7".parse::<ExecutionToken>().unwrap(), e);
        assert!("code-x".parse::<CodeToken>().is_err());
        assert!("exec-1".parse::<ExecutionToken>().is_err());
    }
}
