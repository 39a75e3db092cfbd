//! Exit codes through one trait: 0 success, 2 bad usage or input (a token,
//! an address, a name, missing privileges, a missing Docker), 1 a runtime
//! failure. Each error type says whether the user's input is at fault;
//! one that wraps another asks it.

use crate::containers::ContainerError;
use crate::control::ControlError;
use crate::docker::DockerError;
use crate::driver::DriverError;
use crate::endpoint::EndpointError;
use crate::firewall::FirewallError;
use crate::gateway::GatewayError;
use crate::hub::HubError;
use crate::hub::run::ServeError;
use crate::net::NetError;
use crate::node::NodeError;
use crate::site::SiteError;
use crate::store::StateError;
use crate::transport::TransportError;
use crate::wg::WgError;

/// Whether an error is the input's fault (exit 2) or the run's (exit 1).
pub trait Exit {
    fn is_input(&self) -> bool;

    fn code(&self) -> u8 {
        if self.is_input() { 2 } else { 1 }
    }
}

/// Errors that are always the input's: a bad token, name, address or
/// limit, missing privileges, a Docker engine that is not there.
macro_rules! always_input {
    ($($t:ty),*) => {$(
        impl Exit for $t {
            fn is_input(&self) -> bool {
                true
            }
        }
    )*};
}

/// Errors that are never the input's.
macro_rules! never_input {
    ($($t:ty),*) => {$(
        impl Exit for $t {
            fn is_input(&self) -> bool {
                false
            }
        }
    )*};
}

always_input!(
    DockerError,
    crate::token::TokenError,
    crate::sys::SysError,
    crate::ipam::IpamError,
    crate::limits::LimitError,
    crate::metrics::MetricsError
);
never_input!(
    StateError,
    ControlError,
    crate::control::auth::AuthError,
    crate::keys::KeyError
);

impl Exit for NetError {
    fn is_input(&self) -> bool {
        matches!(
            self,
            NetError::Permission(_) | NetError::Exists(_) | NetError::BadName(..)
        )
    }
}

impl Exit for WgError {
    fn is_input(&self) -> bool {
        match self {
            WgError::Net(n) => n.is_input(),
            WgError::TunPermission
            | WgError::UapiInUse(..)
            | WgError::PortInUse(_)
            | WgError::KernelWebSocket => true,
            _ => false,
        }
    }
}

impl Exit for FirewallError {
    fn is_input(&self) -> bool {
        matches!(self, FirewallError::Permission(_))
    }
}

impl Exit for GatewayError {
    fn is_input(&self) -> bool {
        match self {
            GatewayError::Firewall(f) => f.is_input(),
            GatewayError::Net(n) => n.is_input(),
            _ => false,
        }
    }
}

impl Exit for EndpointError {
    fn is_input(&self) -> bool {
        match self {
            EndpointError::Cleanup(n) => n.is_input(),
            EndpointError::Create { source, .. } => source.is_input(),
        }
    }
}

impl Exit for DriverError {
    fn is_input(&self) -> bool {
        matches!(self, DriverError::BadName(_) | DriverError::InUse(_))
    }
}

impl Exit for ContainerError {
    fn is_input(&self) -> bool {
        match self {
            ContainerError::Docker(_) => true,
            ContainerError::Attach { source, .. } => source.is_input(),
            ContainerError::Namespace { source, .. } => source.is_input(),
            ContainerError::Endpoint { .. } => false,
        }
    }
}

impl Exit for NodeError {
    fn is_input(&self) -> bool {
        match self {
            NodeError::Containers(c) => c.is_input(),
            NodeError::Driver(d) => d.is_input(),
            NodeError::Control(_) => false,
        }
    }
}

impl Exit for TransportError {
    fn is_input(&self) -> bool {
        TransportError::is_input(self)
    }
}

impl Exit for crate::dns::DnsError {
    fn is_input(&self) -> bool {
        matches!(self, crate::dns::DnsError::BadZone(..))
    }
}

impl Exit for HubError {
    fn is_input(&self) -> bool {
        match self {
            HubError::Wg(w) => w.is_input(),
            HubError::Net(n) => n.is_input(),
            HubError::State(_) => false,
        }
    }
}

impl Exit for SiteError {
    fn is_input(&self) -> bool {
        SiteError::is_input(self)
            || match self {
                SiteError::Wg(w) => w.is_input(),
                SiteError::Gateway(g) => g.is_input(),
                SiteError::Net(n) => n.is_input(),
                SiteError::Containers(c) => c.is_input(),
                SiteError::Driver(d) => d.is_input(),
                SiteError::Node(n) => n.is_input(),
                SiteError::Endpoint(e) => e.is_input(),
                _ => false,
            }
    }
}

impl Exit for ServeError {
    fn is_input(&self) -> bool {
        match self {
            ServeError::Input(_) | ServeError::Ipam(_) => true,
            ServeError::Hub(h) => h.is_input(),
            ServeError::Wg(w) => w.is_input(),
            ServeError::Net(n) => n.is_input(),
            ServeError::Gateway(g) => g.is_input(),
            ServeError::Transport(t) => t.is_input(),
            ServeError::Dns(d) => d.is_input(),
            ServeError::Node(n) => n.is_input(),
            ServeError::Endpoint(e) => e.is_input(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_error_takes_the_code_of_what_it_wraps() {
        let port = || WgError::PortInUse(51820);
        assert_eq!(port().code(), 2);
        let created = EndpointError::Create {
            iface: "wg0".into(),
            source: port(),
        };
        assert_eq!(created.code(), 2);
        assert_eq!(ServeError::Endpoint(created).code(), 2);
        assert_eq!(SiteError::Wg(WgError::NoTun).code(), 1);
        let perm = NetError::Permission("adding a link".into());
        assert_eq!(GatewayError::Net(perm).code(), 2);
        assert_eq!(ServeError::NoFreePort.code(), 1);
        assert_eq!(ServeError::Input("--subnet".into()).code(), 2);
    }

    #[test]
    fn a_site_that_cannot_make_its_device_or_was_given_bad_input_exits_2() {
        let exists = EndpointError::Create {
            iface: "wg0".into(),
            source: WgError::Net(NetError::Exists("wg0".into())),
        };
        assert_eq!(SiteError::Endpoint(exists).code(), 2);
        let gone = EndpointError::Create {
            iface: "wg0".into(),
            source: WgError::NoTun,
        };
        assert_eq!(SiteError::Endpoint(gone).code(), 1);
        assert_eq!(SiteError::input("\"a b\" is not HOST[:PORT]").code(), 2);
    }

    #[test]
    fn docker_missing_is_input_and_an_endpoint_refusal_is_not() {
        let gone = ContainerError::Docker(DockerError::Unavailable("no socket".into()));
        assert_eq!(NodeError::Containers(gone).code(), 2);
        let refused = ContainerError::Endpoint {
            container: "web".into(),
            reason: "quota".into(),
        };
        assert_eq!(refused.code(), 1);
    }
}
