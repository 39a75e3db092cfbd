//! TLS for the WebSocket transport (rustls, no OpenSSL).
//!
//! A hub that terminates TLS itself has a self-signed certificate, made
//! once and kept in the state directory (0600, beside the keys). Its
//! SHA-256 rides in the token, and the joiner accepts exactly that
//! certificate: no CA is involved, and nothing else can stand in for the
//! hub. Behind a reverse proxy, the joiner verifies the proxy's
//! certificate against the system's roots (`SSL_CERT_FILE` is honoured).

use super::TransportError;
pub use crate::reach::{hex, unhex32};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::path::Path;
use std::sync::{Arc, Mutex};

pub fn sha256(der: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    d.as_ref().try_into().expect("32 bytes")
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The hub's certificate and key.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl Identity {
    pub fn fingerprint(&self) -> [u8; 32] {
        sha256(&self.cert)
    }

    /// Loads the certificate at `path`, or makes one and saves it there
    /// (0600, atomically). `names` go into its subjectAltName; they do not
    /// matter to joiners, who pin the certificate itself.
    pub fn load_or_create(path: &Path, names: Vec<String>) -> Result<Self, TransportError> {
        let fail = |e: Box<dyn std::error::Error + Send + Sync>| TransportError::Certificate {
            path: path.to_owned(),
            source: e,
        };
        match std::fs::read(path) {
            Ok(pem) => {
                let cert = CertificateDer::from_pem_slice(&pem).map_err(|e| fail(e.into()))?;
                let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| fail(e.into()))?;
                Ok(Self { cert, key })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let made = rcgen::generate_simple_self_signed(names).map_err(|e| fail(e.into()))?;
                let pem = zeroize::Zeroizing::new(format!(
                    "{}{}",
                    made.signing_key.serialize_pem(),
                    made.cert.pem()
                ));
                // The state error names the path already; its text is enough.
                crate::store::write_atomic(path, pem.as_bytes())
                    .map_err(|e| fail(e.to_string().into()))?;
                tracing::info!(
                    "made the TLS certificate of the WebSocket transport, {} (SHA-256 {})",
                    path.display(),
                    hex(&sha256(made.cert.der()))
                );
                Self::load_or_create(path, vec![])
            }
            Err(e) => Err(fail(e.into())),
        }
    }

    /// The server side: TLS 1.2/1.3 with this certificate, HTTP/1.1.
    pub fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, rustls::Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

/// Accepts exactly the certificate whose SHA-256 is `pin`, whatever its
/// names and issuer; the handshake signatures are still verified.
#[derive(Debug)]
pub struct Pinned {
    pin: [u8; 32],
    /// The fingerprint seen when it did not match, for the error message.
    pub seen: Mutex<Option<[u8; 32]>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = sha256(end_entity);
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            *self.seen.lock().expect("pin lock") = Some(got);
            Err(rustls::Error::General(
                "the certificate does not match the pinned fingerprint".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// How a client checks the server.
pub enum Trust {
    Pinned(Arc<Pinned>),
    /// The system's roots (`SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured).
    Roots,
    /// The system's roots and the CA certificates of a PEM file (an HTTPS
    /// proxy's, `--proxy-ca`).
    RootsAnd(std::path::PathBuf),
}

impl Trust {
    pub fn pinned(pin: [u8; 32]) -> Self {
        Trust::Pinned(Arc::new(Pinned {
            pin,
            seen: Mutex::new(None),
            provider: provider(),
        }))
    }

    pub fn connector(&self) -> Result<tokio_rustls::TlsConnector, TransportError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("configuring TLS", e))?;
        let config = match self {
            Trust::Pinned(p) => builder
                .dangerous()
                .with_custom_certificate_verifier(p.clone())
                .with_no_client_auth(),
            Trust::Roots | Trust::RootsAnd(_) => {
                let mut roots = rustls::RootCertStore::empty();
                if let Trust::RootsAnd(file) = self {
                    let fail =
                        |e: Box<dyn std::error::Error + Send + Sync>| TransportError::Certificate {
                            path: file.clone(),
                            source: e,
                        };
                    let pem = std::fs::read(file).map_err(|e| fail(e.into()))?;
                    let certs: Vec<CertificateDer<'static>> =
                        rustls::pki_types::pem::PemObject::pem_slice_iter(&pem)
                            .collect::<Result<_, _>>()
                            .map_err(|e| fail(e.into()))?;
                    if certs.is_empty() {
                        return Err(fail("no certificate in it".into()));
                    }
                    let (added, _) = roots.add_parsable_certificates(certs);
                    if added == 0 {
                        return Err(fail("no usable CA certificate in it".into()));
                    }
                }
                let found = rustls_native_certs::load_native_certs();
                for e in &found.errors {
                    tracing::debug!("loading system roots: {e}");
                }
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    tracing::warn!("no trusted root certificates found on this system");
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
        };
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }

    /// The pin error, when a failed handshake was a pin mismatch.
    pub fn mismatch(&self) -> Option<TransportError> {
        match self {
            Trust::Pinned(p) => {
                p.seen
                    .lock()
                    .expect("pin lock")
                    .map(|got| TransportError::PinMismatch {
                        expected: hex(&p.pin),
                        got: hex(&got),
                    })
            }
            Trust::Roots | Trust::RootsAnd(_) => None,
        }
    }
}

fn tls_err(what: &str, e: rustls::Error) -> TransportError {
    TransportError::Tls {
        target: what.to_owned(),
        source: std::io::Error::other(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let b = [0xab; 32];
        assert_eq!(unhex32(&hex(&b)), Some(b));
        assert_eq!(unhex32("zz"), None);
    }

    #[test]
    fn a_certificate_is_made_once_owner_only_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("wg0.wss.pem");
        let a = Identity::load_or_create(&path, vec!["tunnel".into()]).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let b = Identity::load_or_create(&path, vec!["other".into()]).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(a.acceptor().is_ok());
    }
}
