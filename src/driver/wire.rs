//! The remote plugin protocol's messages, as Docker sends them (PascalCase
//! JSON, every field optional), the driver's answers, and the decisions
//! that depend on nothing but a message: pure, and tested as such.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::IpAddr;

const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";
/// What the container calls its tunnel interface (Docker appends an index).
pub(super) const DST_PREFIX: &str = "tun";
/// The Docker option that lets a tunnel network's containers keep a way
/// to the internet (Docker adds its gateway bridge).
const INTERNET_OPTION: &str = "tunnel.internet";
/// The IPAM pools: the tunnel's subnet, and its IPv6 one.
pub(super) const POOL: &str = "tunnel";
pub(super) const POOL6: &str = "tunnel6";
/// How IPAM asks for a network's gateway rather than a container's address.
pub(super) const GATEWAY_REQUEST: &str = "com.docker.network.gateway";

/// A plugin answer: JSON with Docker's content type.
pub(super) fn reply(v: Value) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], v.to_string()).into_response()
}

/// An operation Docker asked for and that did not happen: `{"Err": ...}`.
pub(super) fn refused(why: impl std::fmt::Display) -> Response {
    let why = why.to_string();
    tracing::warn!("network driver: {why}");
    reply(json!({ "Err": why }))
}

/// A request that does not decode.
pub(super) struct BadRequest(String);

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, CONTENT_TYPE)],
            json!({ "Err": format!("bad request: {}", self.0) }).to_string(),
        )
            .into_response()
    }
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, BadRequest> {
    serde_json::from_slice(body).map_err(|e| BadRequest(e.to_string()))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
pub(super) struct PoolRequest {
    pub(super) pool: String,
    #[serde(rename = "V6")]
    pub(super) v6: bool,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
pub(super) struct AddressRequest {
    #[serde(rename = "PoolID")]
    pub(super) pool_id: String,
    pub(super) address: String,
    pub(super) options: Option<HashMap<String, String>>,
}

impl AddressRequest {
    /// Whether IPAM asks for the network's gateway.
    pub(super) fn for_gateway(&self) -> bool {
        self.options
            .as_ref()
            .and_then(|o| o.get("RequestAddressType"))
            .is_some_and(|t| t == GATEWAY_REQUEST)
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
pub(super) struct NetworkRequest {
    #[serde(rename = "NetworkID")]
    pub(super) network_id: String,
    pub(super) options: Option<HashMap<String, Value>>,
    #[serde(rename = "IPv4Data")]
    pub(super) ipv4_data: Option<Vec<IpamData>>,
    #[serde(rename = "IPv6Data")]
    pub(super) ipv6_data: Option<Vec<IpamData>>,
}

impl NetworkRequest {
    /// The IPv4 pools the network was created with.
    pub(super) fn pools(&self) -> Vec<&str> {
        self.ipv4_data
            .iter()
            .flatten()
            .map(|p| p.pool.as_str())
            .collect()
    }

    /// Its IPv6 pools (`--ipv6`).
    pub(super) fn pools6(&self) -> Vec<&str> {
        self.ipv6_data
            .iter()
            .flatten()
            .map(|p| p.pool.as_str())
            .collect()
    }

    /// Whether the network was created with `-o tunnel.internet=true`
    /// (Docker passes `-o` options as strings; a JSON `true` counts too).
    pub(super) fn internet(&self) -> bool {
        self.options
            .as_ref()
            .and_then(|o| o.get("com.docker.network.generic"))
            .and_then(|g| g.get(INTERNET_OPTION))
            .is_some_and(|v| v == "true" || v == true)
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
pub(super) struct IpamData {
    pool: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
pub(super) struct EndpointRequest {
    #[serde(rename = "NetworkID")]
    pub(super) network_id: String,
    #[serde(rename = "EndpointID")]
    pub(super) endpoint_id: String,
    pub(super) interface: Option<InterfaceData>,
}

impl EndpointRequest {
    /// The address IPAM gave the endpoint.
    pub(super) fn address(&self) -> Option<IpAddr> {
        self.interface.as_ref().and_then(|i| address_of(&i.address))
    }

    /// Its IPv6 address, on a network with `--ipv6`.
    pub(super) fn address6(&self) -> Option<IpAddr> {
        self.interface
            .as_ref()
            .and_then(|i| address_of(&i.address_ipv6))
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
pub(super) struct InterfaceData {
    address: String,
    #[serde(rename = "AddressIPv6")]
    address_ipv6: String,
}

/// The address of `10.77.0.2/24` (or of a bare `10.77.0.2`).
pub(super) fn address_of(cidr: &str) -> Option<IpAddr> {
    cidr.split('/').next()?.parse().ok()
}

/// What an endpoint is called until its container starts (Docker tells a
/// driver nothing about it before): `docker-` and 8 hex digits.
pub(super) fn placeholder(tag: [u8; 4]) -> String {
    let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    format!("docker-{hex}")
}

#[derive(Serialize, Debug, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
struct StaticRoute {
    destination: String,
    route_type: u8,
}

/// Whether a network Docker lists was created with
/// `-o tunnel.internet=true` (its options, flat, as `network inspect`
/// shows them).
pub(super) fn internet_option(options: &std::collections::BTreeMap<String, String>) -> bool {
    options.get(INTERNET_OPTION).is_some_and(|v| v == "true")
}

/// The answer to a join: the link Docker moves into the container and
/// names `tun<n>`, the LANs to route through it (IPv6 ones only when the
/// endpoint has an IPv6 address, `v6`), and whether Docker adds its
/// gateway for the internet.
pub(super) fn joined(iface: &str, lans: &[IpNetwork], internet: bool, v6: bool) -> Value {
    let routes: Vec<StaticRoute> = lans
        .iter()
        .filter(|r| r.is_ipv4() || v6)
        .map(|r| StaticRoute {
            destination: r.to_string(),
            // 1: "connected", through the interface, no next hop.
            route_type: 1,
        })
        .collect();
    json!({
        "InterfaceName": { "SrcName": iface, "DstPrefix": DST_PREFIX },
        "StaticRoutes": routes,
        "DisableGatewayService": !internet,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_read_with_or_without_a_prefix_and_anything_else_is_none() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(address_of("10.77.0.2/24"), Some(ip("10.77.0.2")));
        assert_eq!(address_of("10.77.0.2"), Some(ip("10.77.0.2")));
        assert_eq!(address_of("fd00::2/64"), Some(ip("fd00::2")));
        assert_eq!(address_of(""), None);
        assert_eq!(address_of("web/24"), None);
    }

    #[test]
    fn a_placeholder_is_docker_and_eight_hex_digits() {
        assert_eq!(placeholder([0x0a, 0xbc, 0x00, 0xff]), "docker-0abc00ff");
    }

    #[test]
    fn the_internet_option_is_true_as_a_string_or_a_boolean_and_nothing_else() {
        let net = |options: Value| -> NetworkRequest {
            serde_json::from_value(json!({"NetworkID": "n", "Options": options})).unwrap()
        };
        let generic = |v: Value| net(json!({"com.docker.network.generic": {INTERNET_OPTION: v}}));
        assert!(generic(json!("true")).internet());
        assert!(generic(json!(true)).internet());
        assert!(!generic(json!("yes")).internet());
        assert!(!generic(json!("false")).internet());
        assert!(!net(json!({"com.docker.network.generic": {}})).internet());
        // Only Docker's generic options count, not a top-level key.
        assert!(!net(json!({INTERNET_OPTION: "true"})).internet());
        assert!(!NetworkRequest::default().internet());
    }

    #[test]
    fn the_pools_of_a_network_are_its_ipv4_data() {
        let req: NetworkRequest = serde_json::from_value(json!({
            "IPv4Data": [{"Pool": "10.77.0.0/24", "Gateway": "10.77.0.1/24"}, {"Pool": "x"}]
        }))
        .unwrap();
        assert_eq!(req.pools(), ["10.77.0.0/24", "x"]);
        assert!(NetworkRequest::default().pools().is_empty());
    }

    #[test]
    fn only_the_gateway_request_type_asks_for_the_gateway() {
        let req = |options: Value| -> AddressRequest {
            serde_json::from_value(json!({"PoolID": "tunnel", "Options": options})).unwrap()
        };
        assert!(req(json!({"RequestAddressType": GATEWAY_REQUEST})).for_gateway());
        assert!(!req(json!({"RequestAddressType": "other"})).for_gateway());
        assert!(!req(json!({})).for_gateway());
    }

    #[test]
    fn a_join_routes_the_lans_of_its_families_and_adds_docker_s_gateway_only_for_the_internet() {
        let lans: Vec<IpNetwork> = ["192.168.7.0/24", "fd00:7::/64", "172.27.88.0/24"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let v = joined("wgd2", &lans, false, false);
        assert_eq!(
            v["InterfaceName"],
            json!({"SrcName": "wgd2", "DstPrefix": "tun"})
        );
        assert_eq!(
            v["StaticRoutes"],
            json!([
                {"Destination": "192.168.7.0/24", "RouteType": 1},
                {"Destination": "172.27.88.0/24", "RouteType": 1},
            ])
        );
        assert_eq!(v["DisableGatewayService"], true);
        assert_eq!(
            joined("wgd2", &lans, false, true)["StaticRoutes"][1],
            json!({"Destination": "fd00:7::/64", "RouteType": 1})
        );
        assert_eq!(
            joined("wgd2", &[], true, false)["DisableGatewayService"],
            false
        );
        assert_eq!(joined("wgd2", &[], true, false)["StaticRoutes"], json!([]));
    }
}
