//! `tunnel peer add NAME`: admits a stock WireGuard client (a phone, a
//! laptop: seed 001's road warriors) on the running hub and prints its
//! wg-quick config, or that config as a QR code for the mobile apps.
//!
//! The client's key is made on the client: only its public key comes
//! here, and the config carries every line but the client's own
//! `PrivateKey`. With `--allow-generated-key` the key is made here instead,
//! for that one config: printed once, and stored nowhere.

use super::{Failure, LocalArgs, not_running};
use crate::control::local::{self, PeerGrant, PeerRequest};
use crate::keys::{PrivateKey, PublicKey};
use crate::wg::KEEPALIVE;
use crate::wg::quick::endpoint_line;
use anyhow::anyhow;
use clap::{Args, Subcommand};
use std::fmt::Write as _;
use std::io::Write;

#[derive(Debug, Args)]
pub struct PeerArgs {
    #[command(subcommand)]
    pub command: PeerCommand,
}

#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Admit a stock WireGuard client and print its wg-quick config (revoke it with `tunnel revoke NAME`)
    Add(AddArgs),
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// A name for the client (unique; shown in status, used by revoke)
    #[arg(value_parser = crate::limits::parse_name)]
    pub name: String,
    #[command(flatten)]
    pub local: LocalArgs,
    /// The client's public key, made on the client (the app's, or `wg genkey | wg pubkey`)
    #[arg(long, value_parser = parse_key)]
    pub public_key: Option<PublicKey>,
    /// Without --public-key: make the client's key here, print it in this one config, and keep it nowhere
    #[arg(long, conflicts_with = "public_key")]
    pub allow_generated_key: bool,
    /// Print the config as a QR code (for the WireGuard mobile apps) instead of text
    #[arg(long)]
    pub qr: bool,
    /// The server as the client reaches it, HOST[:PORT] [default: serve's --endpoint]
    #[arg(long, value_name = "HOST[:PORT]")]
    pub endpoint: Option<String>,
}

fn parse_key(s: &str) -> Result<PublicKey, String> {
    PublicKey::from_base64(s.trim()).map_err(|e| format!("not a WireGuard public key: {e}"))
}

/// The client's wg-quick config; `key` is its private key when made here.
pub fn render(name: &str, grant: &PeerGrant, endpoint: &str, key: Option<&PrivateKey>) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# {name}: a WireGuard client of this tunnel hub");
    let _ = writeln!(o, "[Interface]");
    match key {
        Some(k) => {
            let _ = writeln!(o, "PrivateKey = {}", k.to_base64().as_str());
        }
        None => {
            let _ = writeln!(o, "# PrivateKey = <the private key made on this device>");
        }
    }
    let addresses: Vec<String> = grant.addresses.iter().map(|n| n.to_string()).collect();
    let _ = writeln!(o, "Address = {}", addresses.join(", "));
    let _ = writeln!(o, "MTU = {}", grant.mtu);
    let _ = writeln!(o, "\n[Peer]");
    let _ = writeln!(o, "PublicKey = {}", grant.server_public_key);
    let _ = writeln!(o, "Endpoint = {}", endpoint_line(endpoint, grant.port));
    let allowed: Vec<String> = grant.allowed_ips.iter().map(|n| n.to_string()).collect();
    let _ = writeln!(o, "AllowedIPs = {}", allowed.join(", "));
    let _ = writeln!(o, "PersistentKeepalive = {KEEPALIVE}");
    o
}

/// `text` as a QR code of Unicode half blocks, light on dark as terminals
/// are, with its quiet zone.
pub fn qr(text: &str) -> Result<String, Failure> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::new(text.as_bytes())
        .map_err(|e| anyhow!("the config does not fit a QR code: {e}"))?;
    Ok(code
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

pub async fn run(args: PeerArgs) -> Result<(), Failure> {
    let PeerCommand::Add(args) = args.command;
    if let Some(e) = &args.endpoint {
        super::serve::check_hint(e)?;
    }
    let generated = match (args.public_key, args.allow_generated_key) {
        (Some(_), _) => None,
        (None, true) => Some(PrivateKey::generate()),
        (None, false) => {
            return Err(Failure::input(anyhow!(
                "give the client's --public-key (made on the client), or --allow-generated-key to make one here for this config only"
            )));
        }
    };
    let public_key = args
        .public_key
        .or_else(|| generated.as_ref().map(|k| k.public_key()))
        .expect("one of them");
    let req = PeerRequest {
        name: args.name.clone(),
        public_key,
        endpoint: args.endpoint.clone(),
    };
    let grant = local::request_peer(&args.local.socket(), &req)
        .await
        .map_err(|e| not_running(&args.local, e))?;
    let endpoint = args
        .endpoint
        .or(grant.endpoint_hint.clone())
        .expect("the hub refuses a request that has neither");
    let config = zeroize::Zeroizing::new(render(&args.name, &grant, &endpoint, generated.as_ref()));
    let out = if args.qr {
        qr(&config)?
    } else {
        config.to_string()
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| anyhow!("writing the config to stdout: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> PeerGrant {
        PeerGrant {
            addresses: vec![
                "10.77.0.5/24".parse().unwrap(),
                "fd00:77::5/64".parse().unwrap(),
            ],
            server_public_key: PrivateKey::generate().public_key(),
            port: 51820,
            endpoint_hint: None,
            allowed_ips: vec![
                "10.77.0.0/24".parse().unwrap(),
                "192.168.50.0/24".parse().unwrap(),
            ],
            mtu: 1420,
        }
    }

    #[test]
    fn the_config_has_everything_but_the_clients_own_key() {
        let g = grant();
        let text = render("phone", &g, "vpn.example.org", None);
        assert!(!text.lines().any(|l| l.starts_with("PrivateKey")), "{text}");
        for want in [
            "Address = 10.77.0.5/24, fd00:77::5/64",
            "Endpoint = vpn.example.org:51820",
            "AllowedIPs = 10.77.0.0/24, 192.168.50.0/24",
            "PersistentKeepalive = 25",
            &format!("PublicKey = {}", g.server_public_key),
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
        let k = PrivateKey::generate();
        let text = render("phone", &g, "192.0.2.1:4000", Some(&k));
        assert!(text.contains(&format!("PrivateKey = {}", k.to_base64().as_str())));
        assert!(text.contains("Endpoint = 192.0.2.1:4000"));
    }

    #[test]
    fn the_qr_code_is_made_of_half_blocks() {
        let q = qr(&render("phone", &grant(), "vpn.example.org", None)).unwrap();
        assert!(q.lines().count() > 20);
        assert!(q.chars().all(|c| " \u{2580}\u{2584}\u{2588}\n".contains(c)));
    }
}
