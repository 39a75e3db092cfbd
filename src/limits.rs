//! Bounds on what users and peers may ask for, in one place: the command
//! line, the local API and the hub all check against these, so that no
//! value can overflow a time computation or size an allocation.

use std::time::Duration;

/// The longest a token may stay valid. A token is a bearer secret; a year
/// is already generous, and it keeps `now + ttl` far from any overflow.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// The shortest: expiry is kept in whole seconds.
pub const MIN_TOKEN_TTL: Duration = Duration::from_secs(1);
/// Tokens minted by one request (`serve --tokens`, `tunnel token --count`).
pub const MAX_TOKENS_PER_REQUEST: usize = 1000;
/// Endpoints (containers) one site may register with the hub, by default.
pub const DEFAULT_ENDPOINTS_PER_SITE: u16 = 64;
/// Names of sites and endpoints: what status shows and revoke matches.
pub const MAX_NAME_LEN: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    #[error("a token TTL must be between 1s and 366d, not {0}")]
    Ttl(String),
    #[error("the token count must be between {min} and {MAX_TOKENS_PER_REQUEST}, not {got}")]
    Count { min: usize, got: u64 },
    #[error(
        "name {0:?}: use 1-{MAX_NAME_LEN} characters from letters, digits, '.', '_' and '-', starting with a letter or digit"
    )]
    Name(String),
}

pub fn check_ttl(ttl: Duration) -> Result<Duration, LimitError> {
    if (MIN_TOKEN_TTL..=MAX_TOKEN_TTL).contains(&ttl) {
        Ok(ttl)
    } else {
        Err(LimitError::Ttl(
            humantime::format_duration(Duration::from_secs(ttl.as_secs())).to_string(),
        ))
    }
}

/// `min` is 0 for `serve --tokens` (a restart may want none), 1 elsewhere.
pub fn check_count(count: u64, min: usize) -> Result<usize, LimitError> {
    match usize::try_from(count) {
        Ok(n) if (min..=MAX_TOKENS_PER_REQUEST).contains(&n) => Ok(n),
        _ => Err(LimitError::Count { min, got: count }),
    }
}

/// Site and endpoint names: Docker's container-name alphabet, so that a
/// container's name is always a valid endpoint name, and nothing that a
/// terminal or a log would interpret.
pub fn check_name(name: &str) -> Result<&str, LimitError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(name)
    } else {
        Err(LimitError::Name(name.chars().take(80).collect()))
    }
}

/// clap value parser for TTL flags.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    check_ttl(d).map_err(|e| e.to_string())
}

/// The longest a command waits for a tunnel to come up.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// clap value parser for `--timeout` flags: a deadline computed from it
/// can never overflow the clock.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() || d > MAX_WAIT {
        return Err(format!(
            "a timeout must be more than 0 and at most 24h, not {s}"
        ));
    }
    Ok(d)
}

/// clap value parser for name flags.
pub fn parse_name(s: &str) -> Result<String, String> {
    check_name(s).map(str::to_owned).map_err(|e| e.to_string())
}

/// Why the kernel would refuse `name` as an interface name
/// (`dev_valid_name`), if it would.
pub fn ifname_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("it is empty");
    }
    if name.len() > 15 {
        return Some("it is longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return Some("it is a path component");
    }
    if name
        .bytes()
        .any(|c| c == b'/' || c == b':' || c.is_ascii_whitespace() || !c.is_ascii_graphic())
    {
        return Some("it may not hold '/', ':', spaces or control characters");
    }
    None
}

/// [`ifname_problem`] as a sentence, for the consistency checks of records.
pub fn check_ifname(name: &str) -> Result<(), String> {
    ifname_problem(name).map_or(Ok(()), |why| {
        Err(format!("invalid interface name {name:?}: {why}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_bounds() {
        assert!(check_ttl(Duration::from_secs(1)).is_ok());
        assert!(check_ttl(MAX_TOKEN_TTL).is_ok());
        assert!(check_ttl(Duration::ZERO).is_err());
        assert!(check_ttl(Duration::from_millis(500)).is_err());
        assert!(check_ttl(MAX_TOKEN_TTL + Duration::from_secs(1)).is_err());
        assert!(check_ttl(Duration::MAX).is_err());
        assert!(parse_ttl("100000000000d").is_err());
        assert!(parse_ttl("30m").is_ok());
        assert!(parse_timeout("100000000000d").is_err());
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("20s").is_ok());
    }

    #[test]
    fn count_bounds() {
        assert_eq!(check_count(0, 0), Ok(0));
        assert!(check_count(0, 1).is_err());
        assert_eq!(check_count(1000, 1), Ok(1000));
        assert!(check_count(1001, 1).is_err());
        assert!(check_count(1_000_000_000, 1).is_err());
        assert!(check_count(u64::MAX, 1).is_err());
    }

    #[test]
    fn names() {
        for good in ["web", "branch-office", "a", "db_1.x", "0abc"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        let long = "a".repeat(65);
        for bad in [
            "",
            "-x",
            ".x",
            "a b",
            "a/b",
            "é",
            "a\nb",
            "a\u{1b}[31m",
            &long,
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
