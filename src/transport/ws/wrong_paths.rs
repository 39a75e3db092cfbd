//! What the hub's listener says about requests for paths that are not
//! the tunnel's: rate-limited log lines that never show the secret.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Requests for other paths. Anything on a public port is scanned, so
/// one line at most per `every`: the first request in full, the rest as
/// a count. The tunnel's secret never appears in a line, not even inside
/// a requested path.
pub(super) struct WrongPaths {
    secret: String,
    every: Duration,
    state: Mutex<WrongState>,
}

#[derive(Default)]
struct WrongState {
    last_line: Option<Instant>,
    unlogged: u64,
}

impl WrongPaths {
    pub(super) fn new(path: &str, every: Duration) -> Self {
        WrongPaths {
            secret: path.rsplit('/').next().unwrap_or_default().to_owned(),
            every,
            state: Mutex::default(),
        }
    }

    /// The line to log for a request for `path` from `peer` at `now`, if
    /// one is due.
    pub(super) fn note(&self, peer: SocketAddr, path: &str, now: Instant) -> Option<String> {
        let mut st = self.state.lock().expect("wrong paths lock");
        if st
            .last_line
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            st.unlogged += 1;
            return None;
        }
        st.last_line = Some(now);
        let more = std::mem::take(&mut st.unlogged);
        let mut shown = if self.secret.is_empty() {
            path.to_owned()
        } else {
            path.replace(&self.secret, "…")
        };
        if let Some((cut, _)) = shown.char_indices().nth(64) {
            shown.truncate(cut);
            shown.push('…');
        }
        Some(format!(
            "WebSocket listener: {peer} asked for {shown:?}, which is not the tunnel's path{}",
            if more > 0 {
                format!(" ({more} more such requests since the last line)")
            } else {
                String::new()
            }
        ))
    }

    /// The count of requests not logged yet, if a line is due at `now`.
    pub(super) fn summary(&self, now: Instant) -> Option<String> {
        let mut st = self.state.lock().expect("wrong paths lock");
        if st.unlogged == 0
            || st
                .last_line
                .is_some_and(|t| now.duration_since(t) < self.every)
        {
            return None;
        }
        st.last_line = Some(now);
        let more = std::mem::take(&mut st.unlogged);
        Some(format!(
            "WebSocket listener: {more} more requests for paths which are not the tunnel's path"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_paths_are_summed_up_and_never_show_the_secret() {
        let secret = "Zq0xVbN3kLmP7rT2wYc9Ea";
        let w = WrongPaths::new(&format!("/tunnel/{secret}"), Duration::from_secs(60));
        let peer: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let first = w
            .note(peer, "/wp-login.php", t0)
            .expect("the first is logged");
        assert!(first.contains("192.0.2.7:4000") && first.contains("/wp-login.php"));
        assert!(first.contains("which is not the tunnel's path"), "{first}");
        // Within the minute: counted, not logged.
        for i in 1..=3 {
            assert_eq!(w.note(peer, "/x", t0 + s(i)), None);
        }
        assert_eq!(w.summary(t0 + s(30)), None);
        let sum = w.summary(t0 + s(61)).expect("the count is logged");
        assert!(sum.contains("3 more"), "{sum}");
        // The count started again; the next line is due a minute later.
        assert_eq!(w.note(peer, "/y", t0 + s(62)), None);
        assert_eq!(w.summary(t0 + s(100)), None);
        let near = format!("/tunnel/{secret}/");
        let line = w.note(peer, &near, t0 + s(122)).expect("due again");
        assert!(line.contains("1 more"), "{line}");
        assert!(!line.contains(secret), "{line}");
        assert!(line.contains("/tunnel/…/"), "{line}");
        assert_eq!(w.summary(t0 + s(200)), None, "nothing left to count");
        // A long path is cut.
        let long = w.note(peer, &"/a".repeat(500), t0 + s(300)).unwrap();
        assert!(long.len() < 300, "{long}");
    }

    #[test]
    fn a_path_without_a_secret_segment_is_shown_as_asked() {
        // A listener on "/" has no secret: nothing is replaced, and in
        // particular not every empty segment.
        let w = WrongPaths::new("/", Duration::from_secs(60));
        let peer: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let line = w.note(peer, "/admin/login", Instant::now()).unwrap();
        assert!(line.contains("\"/admin/login\""), "{line}");
        assert!(!line.contains('…'), "{line}");
    }

    #[test]
    fn nothing_unlogged_means_no_summary_and_a_cut_keeps_characters_whole() {
        let w = WrongPaths::new("/t/s3cr3t", Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(w.summary(t0), None, "no request, no line");
        let peer: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        // Multi-byte characters around the 64th: cut at a character.
        let line = w.note(peer, &"/é".repeat(100), t0).unwrap();
        assert!(line.contains("[2001:db8::1]:443"), "{line}");
        let shown = line.split('"').nth(1).unwrap();
        assert_eq!(shown.chars().count(), 65, "{shown}");
        assert!(shown.ends_with('…'), "{shown}");
    }
}
