//! Containers: which ones to attach to, and following them through Docker
//! events. Docker is reached through its API ([`Bollard`]), never the CLI.
//!
//! [`ContainerRuntime`] is the small surface used; [`fake::FakeRuntime`]
//! backs the unit tests of [`plan`], the pure reconcile step that compares
//! what is attached with what Docker reports.

mod bollard_rt;
#[cfg(test)]
pub mod fake;

pub use bollard_rt::Bollard;

use async_trait::async_trait;
use futures::stream::BoxStream;
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("Docker is not running or not reachable ({0}); start it, or set DOCKER_HOST")]
    Unavailable(String),
    #[error("no container named {0:?}")]
    NoSuchContainer(String),
    #[error(
        "container {0:?} is not running; start it first (tunnel never starts or stops your containers)"
    )]
    NotRunning(String),
    #[error("container {0:?} is named twice (as {1:?} and {2:?})")]
    Duplicate(String, String, String),
    #[error("Docker API: {0}")]
    Api(String),
}

/// What the tool needs to know of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    /// Without the leading '/'.
    pub name: String,
    /// The init process, while the container runs; its network namespace is
    /// `/proc/<pid>/ns/net`.
    pub pid: Option<u32>,
    /// Its network endpoints' ids (for the network driver).
    pub endpoint_ids: Vec<String>,
}

/// A network of one network driver, and the containers Docker keeps on
/// it, running or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverNetwork {
    pub id: String,
    pub name: String,
    /// Its `-o` options.
    pub options: BTreeMap<String, String>,
    pub members: Vec<Member>,
}

/// A container on a driver's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub container: ContainerInfo,
    /// While it runs: its endpoint on this network, and the address IPAM
    /// gave it there.
    pub endpoint: Option<(String, std::net::IpAddr)>,
    /// Its IPv6 address there, on a network with `--ipv6`.
    pub address6: Option<std::net::IpAddr>,
    /// Why its last start failed, as Docker recorded it (empty after a
    /// start that worked).
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Start,
    Die,
    Destroy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    pub kind: EventKind,
    pub id: String,
    pub name: String,
    /// The container's labels (Docker sends them with its events).
    pub labels: BTreeMap<String, String>,
}

/// `--attach-label KEY[=VALUE]`: which containers are attached by label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub key: String,
    /// Without one, any value.
    pub value: Option<String>,
}

impl Label {
    pub const DEFAULT: &str = "tunnel.attach";

    pub fn parse(s: &str) -> Result<Self, String> {
        let (key, value) = match s.split_once('=') {
            Some((k, v)) => (k, Some(v.to_owned())),
            None => (s, None),
        };
        if key.is_empty()
            || key.len() > 255
            || key
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == ',')
        {
            return Err(format!("{s:?} is not a label KEY[=VALUE]"));
        }
        Ok(Self {
            key: key.to_owned(),
            value,
        })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match (labels.get(&self.key), &self.value) {
            (Some(v), Some(want)) => v == want,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// As Docker's `label` filter spells it.
    pub fn filter(&self) -> String {
        match &self.value {
            Some(v) => format!("{}={v}", self.key),
            None => self.key.clone(),
        }
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.filter())
    }
}

#[async_trait]
pub trait ContainerRuntime: Send + Sync {
    /// `None` when no container has that name or id.
    async fn inspect(&self, reference: &str) -> Result<Option<ContainerInfo>, DockerError>;
    /// Container start/die/destroy events from now on.
    fn events(&self) -> BoxStream<'static, Result<ContainerEvent, DockerError>>;
    /// The names of the running containers that carry `label`.
    async fn labelled(&self, label: &Label) -> Result<Vec<String>, DockerError>;
    /// The running containers that hold any of these network endpoints:
    /// (endpoint id, container name).
    async fn by_endpoint(&self, ids: &[String]) -> Result<Vec<(String, String)>, DockerError>;
    /// The networks of network driver `driver`, with their containers.
    async fn driver_networks(&self, driver: &str) -> Result<Vec<DriverNetwork>, DockerError>;
    /// Starts a created or stopped container.
    async fn start(&self, id: &str) -> Result<(), DockerError>;
}

/// Resolves the user's references up front: every container must exist and
/// run, and no container may be named twice (by name and by id, say).
pub async fn resolve_all(
    rt: &dyn ContainerRuntime,
    references: &[String],
) -> Result<Vec<ContainerInfo>, DockerError> {
    let mut found: Vec<(String, ContainerInfo)> = Vec::new();
    for r in references {
        let info = rt
            .inspect(r)
            .await?
            .ok_or_else(|| DockerError::NoSuchContainer(r.clone()))?;
        if info.pid.is_none() {
            return Err(DockerError::NotRunning(r.clone()));
        }
        if let Some((first, _)) = found.iter().find(|(_, i)| i.id == info.id) {
            return Err(DockerError::Duplicate(
                info.name.clone(),
                first.clone(),
                r.clone(),
            ));
        }
        found.push((r.clone(), info));
    }
    Ok(found.into_iter().map(|(_, i)| i).collect())
}

/// Where an endpoint's interface is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub id: String,
    pub pid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Remove the interface from the container it was in (if that still exists).
    Detach,
    /// Create the interface and move it into the namespace of `pid`.
    Attach { id: String, pid: u32 },
}

/// Desired vs observed for one endpoint: what to do so that the endpoint's
/// interface is inside the running container of that name, if any.
pub fn plan(attached: Option<&Attached>, observed: Option<&ContainerInfo>) -> Vec<Action> {
    let target = observed.and_then(|c| {
        c.pid.map(|pid| Attached {
            id: c.id.clone(),
            pid,
        })
    });
    match (attached, target) {
        (Some(a), Some(t)) if *a == t => vec![],
        (Some(_), Some(t)) => vec![
            Action::Detach,
            Action::Attach {
                id: t.id,
                pid: t.pid,
            },
        ],
        (None, Some(t)) => vec![Action::Attach {
            id: t.id,
            pid: t.pid,
        }],
        (Some(_), None) => vec![Action::Detach],
        (None, None) => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeRuntime;
    use super::*;

    fn running(id: &str, name: &str, pid: u32) -> ContainerInfo {
        ContainerInfo {
            id: id.into(),
            name: name.into(),
            pid: Some(pid),
            endpoint_ids: vec![],
        }
    }

    #[test]
    fn plan_covers_every_transition() {
        let a = Attached {
            id: "c1".into(),
            pid: 10,
        };
        // Not attached, container runs: attach.
        assert_eq!(
            plan(None, Some(&running("c1", "web", 10))),
            vec![Action::Attach {
                id: "c1".into(),
                pid: 10
            }]
        );
        // Attached where it runs: nothing.
        assert_eq!(plan(Some(&a), Some(&running("c1", "web", 10))), vec![]);
        // Restarted (new pid, new namespace): detach, attach.
        assert_eq!(
            plan(Some(&a), Some(&running("c1", "web", 11))),
            vec![
                Action::Detach,
                Action::Attach {
                    id: "c1".into(),
                    pid: 11
                }
            ]
        );
        // Re-created under the same name (new id): detach, attach.
        assert_eq!(
            plan(Some(&a), Some(&running("c2", "web", 12))),
            vec![
                Action::Detach,
                Action::Attach {
                    id: "c2".into(),
                    pid: 12
                }
            ]
        );
        // Stopped or removed: detach; the endpoint keeps its address and key.
        let stopped = ContainerInfo {
            id: "c1".into(),
            name: "web".into(),
            pid: None,
            endpoint_ids: vec![],
        };
        assert_eq!(plan(Some(&a), Some(&stopped)), vec![Action::Detach]);
        assert_eq!(plan(Some(&a), None), vec![Action::Detach]);
        assert_eq!(plan(None, Some(&stopped)), vec![]);
        assert_eq!(plan(None, None), vec![]);
    }

    #[tokio::test]
    async fn resolve_reports_missing_stopped_and_duplicates() {
        let rt = FakeRuntime::default();
        rt.set(running("aaa111", "web", 5));
        rt.set(ContainerInfo {
            id: "bbb222".into(),
            name: "db".into(),
            pid: None,
            endpoint_ids: vec![],
        });
        let ok = resolve_all(&rt, &["web".into()]).await.unwrap();
        assert_eq!(ok[0].id, "aaa111");
        let refs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(
            matches!(resolve_all(&rt, &refs(&["nope"])).await, Err(DockerError::NoSuchContainer(n)) if n == "nope")
        );
        assert!(matches!(
            resolve_all(&rt, &refs(&["db"])).await,
            Err(DockerError::NotRunning(_))
        ));
        assert!(matches!(
            resolve_all(&rt, &refs(&["web", "aaa111"])).await,
            Err(DockerError::Duplicate(..))
        ));
        rt.down();
        assert!(matches!(
            resolve_all(&rt, &refs(&["web"])).await,
            Err(DockerError::Unavailable(_))
        ));
    }
}
