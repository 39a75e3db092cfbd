//! `tunnel route add|del CIDR` on a running site: the LANs behind it
//! change without a new join. The change is checked as at `join`, told to
//! the hub (which checks it against the other sites and pokes them), then
//! put in the firewall and the saved state, so that `up` keeps it.

use super::host::site_policy;
use crate::control::ControlError;
use crate::control::auth::Signer;
use crate::control::local::{LanChange, LanSet, LocalError};
use crate::control::tunnel::{self, HubApi};
use crate::gateway::Gateway;
use crate::net::NetOps;
use crate::state::Endpoint;
use crate::store::StateDir;
use ipnetwork::IpNetwork;
use std::sync::Arc;
use std::time::Duration;

/// The site's LANs while it runs, and the firewall they live in.
pub(super) struct Lans {
    pub(super) net: Arc<dyn NetOps>,
    pub(super) iface: String,
    pub(super) store: StateDir,
    pub(super) api: HubApi,
    pub(super) signer: Signer,
    pub(super) subnets: Vec<IpNetwork>,
    /// The gateway, given back at teardown; the lock also keeps two
    /// changes from crossing.
    pub(super) gateway: tokio::sync::Mutex<Option<Gateway>>,
    pub(super) current: std::sync::Mutex<(Vec<IpNetwork>, bool)>,
}

impl Lans {
    pub(super) fn new(
        joined: &crate::state::JoinedState,
        net: Arc<dyn NetOps>,
        iface: &str,
        store: &StateDir,
        api: HubApi,
        gateway: Gateway,
    ) -> Result<Self, crate::control::auth::AuthError> {
        Ok(Lans {
            net,
            iface: iface.to_owned(),
            store: store.clone(),
            api,
            signer: Signer::new(&joined.private_key, &joined.server_public_key)?,
            subnets: joined.subnets().all(),
            gateway: tokio::sync::Mutex::new(Some(gateway)),
            current: std::sync::Mutex::new((joined.routes.clone(), joined.masquerade)),
        })
    }

    pub(super) fn routes(&self) -> Vec<IpNetwork> {
        self.current.lock().expect("not poisoned").0.clone()
    }

    /// Tells the hub the site leaves (when it stops cleanly), then
    /// removes the device and undoes what the site changed on the host.
    pub(super) async fn teardown(
        &self,
        device: &dyn crate::wg::WgDevice,
        clean: bool,
    ) -> Result<(), crate::wg::WgError> {
        if clean
            && let Err(e) =
                tunnel::leave_hub(self.api, &self.signer, Duration::from_millis(500)).await
        {
            tracing::debug!("telling the server we leave: {e}");
        }
        let gateway = self.gateway.lock().await.take();
        let gateway = gateway.expect("the gateway is taken once");
        crate::node::remove(device, gateway, self.net.as_ref(), &self.iface).await
    }

    pub(super) async fn change(&self, req: LanChange) -> Result<LanSet, LocalError> {
        let mut guard = self.gateway.lock().await;
        let Some(gateway) = guard.as_mut() else {
            return Err(LocalError::Unavailable("the site is stopping".to_owned()));
        };
        let (routes, masquerade) = self.current.lock().expect("not poisoned").clone();
        let (next, masq) = req
            .apply(&routes, masquerade, &self.subnets)
            .map_err(LocalError::BadRequest)?;
        if !gateway.guarded() && (req.add || masq != masquerade) {
            return Err(LocalError::BadRequest(
                "the firewall is off or nftables is missing here: LANs change with a new join (or up) only"
                    .to_owned(),
            ));
        }
        // The hub first: it may refuse (another site has the prefix), and
        // then nothing here has changed.
        let pending =
            tunnel::advertise_routes(self.api, &self.signer, &next, Duration::from_secs(5))
                .await
                .map_err(|e| match e {
                    ControlError::Refused { .. } => {
                        LocalError::BadRequest(format!("the hub refused: {e}"))
                    }
                    e => LocalError::Unavailable(format!(
                        "the hub did not answer ({e}); nothing changed"
                    )),
                })?;
        gateway.keep(Some(site_policy(&self.iface, &next, masq)));
        if let Err(e) = gateway.forward(self.net.as_ref(), false).await {
            tracing::warn!("forwarding towards the new LANs: {e}");
        }
        match self.store.load(&self.iface) {
            Ok(Some(Endpoint::Joined(mut j))) => {
                j.routes = next.clone();
                j.masquerade = masq;
                if let Err(e) = self.store.save(&self.iface, &Endpoint::Joined(j)) {
                    tracing::warn!("saving the LANs: {e}");
                }
            }
            Ok(_) => tracing::warn!("no saved site for {} to keep the LANs in", self.iface),
            Err(e) => tracing::warn!("{e}"),
        }
        *self.current.lock().expect("not poisoned") = (next.clone(), masq);
        let verb = if req.add {
            "now routes"
        } else {
            "no longer routes"
        };
        tracing::info!("{} {verb} {}", self.iface, req.prefix);
        Ok(LanSet {
            routes: next,
            masquerade: masq,
            pending,
        })
    }
}
