//! The soak's joins: `tunnel token` on the hub and a join from a spare
//! host, which must get in and reach the hub. The spare hosts are used in
//! turn, and the site a host had before is stopped and revoked first, so
//! that a long soak keeps a steady number of sites.

use std::time::{Duration, Instant};

use super::{POOL, Soak, address_of};
use crate::{Host, Node};

impl Soak<'_> {
    pub(super) fn join(&mut self) {
        let k = self.s.joins + 1;
        self.s.joins += 1;
        let slot = (k - 1) % POOL;
        // Room first: the site before on this host leaves, and is revoked.
        if let Some(i) = self.pool[slot].take()
            && self.tracked[i].live
        {
            self.leave_and_revoke(i);
        }
        let Some(token) = self.token() else {
            return;
        };
        let host = self.lab.host(3 + slot);
        let t = Instant::now();
        let node = self.spawn_join(&host, &token, k);
        let label = format!("join-{k} (host {})", 3 + slot);
        let i = self.track(&label, &node, None);
        self.pool[slot] = Some(i);
        let Some(addr) = self.joined_address(&node, t) else {
            let why = format!("join {k} did not get in; {}", self.tail(i));
            self.fail(why);
            return;
        };
        self.tracked[i].site = Some(addr.clone());
        match self.reach(&host, self.cfg.back_within) {
            Some(_) => {
                let took = t.elapsed();
                self.s.join_max = self.s.join_max.max(took);
                self.say(&format!(
                    "join {k}: {addr} from host {} in and reaching the hub {} ms after join started",
                    3 + slot,
                    took.as_millis()
                ));
            }
            None => {
                let why = format!(
                    "lost peer: join {k} ({addr}) got in but does not reach the hub; {}",
                    self.tail(i)
                );
                self.fail(why);
            }
        }
    }

    /// Stops tracked site `i` (SIGTERM, which must exit 0) and revokes it
    /// on the hub.
    fn leave_and_revoke(&mut self, i: usize) {
        let proc = self.tracked[i].proc;
        let status = self.lab.proc(proc).terminate();
        self.tracked[i].live = false;
        self.tracked[i].to = Some(self.start.elapsed());
        if !status.success() {
            let why = format!(
                "{} exited with {status} on SIGTERM; {}",
                self.tracked[i].label,
                self.tail(i)
            );
            self.fail(why);
        }
        let addr = self.tracked[i].site.clone().unwrap_or_default();
        let mut args = self.hub.local("revoke");
        args.push(&addr);
        let out = self.lab.tunnel(&self.hub.host, &args);
        if out.status.success() {
            self.s.rotated += 1;
        } else {
            let why = format!(
                "revoke {addr}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            self.fail(why);
        }
    }

    /// A new token from the hub; `None`, a failure, when it gives none.
    fn token(&mut self) -> Option<String> {
        let out = self.lab.tunnel(&self.hub.host, &self.hub.local("token"));
        let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || token.is_empty() {
            let why = format!(
                "tunnel token: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            self.fail(why);
            return None;
        }
        Some(token)
    }

    /// Starts join number `k` from `host`, not waiting for it: whether it
    /// gets in is what the soak checks.
    fn spawn_join(&mut self, host: &Host, token: &str, k: usize) -> Node {
        let tag = format!("j{k}");
        let (iface, state) = (self.lab.iface(&tag), self.lab.state_dir(&tag));
        let server = self.hub.host.ip.clone();
        let proc = self.lab.spawn(
            host,
            &[
                "join",
                token,
                &server,
                "--iface",
                &iface,
                "--state-dir",
                state.to_str().expect("a UTF-8 path"),
                "--backend",
                "userspace",
            ],
        );
        Node {
            proc,
            host: host.clone(),
            iface,
            state,
            lines: vec![],
        }
    }

    /// The tunnel address of the site `node` once it is in (its summary
    /// line); `None` when it exits first, as it does after its own
    /// timeout, or is not in after [`crate::UP`] from `t`.
    fn joined_address(&mut self, node: &Node, t: Instant) -> Option<String> {
        let joined = loop {
            let p = self.lab.proc(node.proc);
            if p.stdout().ends_with('\n') {
                break true;
            }
            if !p.running() || t.elapsed() > crate::UP {
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        joined
            .then(|| {
                let out = self.lab.tunnel(
                    &node.host,
                    &["status", "--json", "--state-dir", node.state.to_str()?],
                );
                address_of(&serde_json::from_slice(&out.stdout).ok()?, "joined")
            })
            .flatten()
    }
}
