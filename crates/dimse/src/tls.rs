//! DICOM-TLS server configuration (PS3.15 Annex B.9/B.10, BCP 195 profile).
//!
//! rustls with the aws-lc-rs provider offers only BCP 195-conformant suites
//! (TLS 1.3, and TLS 1.2 with ECDHE + AEAD); both versions are enabled
//! because DCMTK 3.6.7's `+pz` profile is TLS 1.2 only. The server key is
//! RSA so TLS 1.2 peers whose profiles offer only RSA suites connect.
//!
//! Client certificates are *requested* but not required at the TLS layer:
//! the association policy decides per device (`tls`: optional, must chain to
//! our CA; `mtls`: required, chain or pinned SHA-256). To let the policy see
//! the certificate before the A-ASSOCIATE-AC, each connection gets its own
//! [`rustls::ServerConfig`] whose verifier records what it saw in a
//! [`CertSlot`].

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use bastion_security::policy::PeerCertificate;
use rustls::{
    client::danger::HandshakeSignatureValid,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        WebPkiClientVerifier,
    },
    sign::CertifiedKey,
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use sha2::{Digest, Sha256};

use crate::DimseError;

/// Where the verifier leaves the client certificate it saw, if any.
pub type CertSlot = Arc<Mutex<Option<PeerCertificate>>>;

/// The server identity and trust anchors, loaded once at start-up.
#[derive(Debug)]
pub struct TlsIdentity {
    certified: Arc<CertifiedKey>,
    ca_verifier: Arc<dyn ClientCertVerifier>,
    client: Arc<rustls::ClientConfig>,
}

impl TlsIdentity {
    /// Loads `server.crt`, `server.key` (must be 0600, checked by the
    /// caller) and `ca.crt`.
    ///
    /// # Errors
    /// [`DimseError::Tls`] naming the file that could not be used.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<TlsIdentity, DimseError> {
        let tls = |what: &str, p: &Path, e: String| {
            DimseError::Tls(format!("{what} {}: {e}", p.display()))
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| tls("cannot read certificate", cert, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| tls("cannot parse certificate", cert, e.to_string()))?;
        let key_der = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| tls("cannot read private key", key, e.to_string()))?;
        let client_chain = chain.clone();
        let client_key = key_der.clone_key();
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let certified = CertifiedKey::from_der(chain, key_der, &provider)
            .map_err(|e| tls("certificate and key do not match", cert, e.to_string()))?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca)
            .map_err(|e| tls("cannot read CA", ca, e.to_string()))?
        {
            let c = c.map_err(|e| tls("cannot parse CA", ca, e.to_string()))?;
            roots
                .add(c)
                .map_err(|e| tls("cannot use CA", ca, e.to_string()))?;
        }
        let roots = Arc::new(roots);
        // Outbound associations (C-MOVE destinations) trust only our CA and
        // present the server certificate, which carries clientAuth.
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(provider.clone()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| DimseError::Tls(e.to_string()))?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(client_chain, client_key)
            .map_err(|e| tls("cannot use as client certificate", cert, e.to_string()))?;
        let ca_verifier = WebPkiClientVerifier::builder_with_provider(roots, Arc::new(provider))
            .allow_unauthenticated()
            .build()
            .map_err(|e| tls("cannot build verifier from", ca, e.to_string()))?;
        Ok(TlsIdentity {
            certified: Arc::new(certified),
            ca_verifier,
            client: Arc::new(client),
        })
    }

    /// The client configuration for outbound associations: trusts only
    /// Bastion's CA, presents the server certificate as client certificate.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client.clone()
    }

    /// A server configuration for one connection, recording the client
    /// certificate into `slot`.
    ///
    /// # Errors
    /// [`DimseError::Tls`] when rustls refuses the configuration.
    pub fn config_for_connection(&self, slot: CertSlot) -> Result<Arc<ServerConfig>, DimseError> {
        let verifier = Arc::new(RecordingVerifier {
            inner: self.ca_verifier.clone(),
            slot,
        });
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| DimseError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                self.certified.clone(),
            )));
        Ok(Arc::new(cfg))
    }
}

/// Accepts any client certificate whose handshake signature verifies (proof
/// of key possession), and records whether it chains to our CA. The policy
/// refuses untrusted ones with A-ASSOCIATE-RJ 1/1/3 unless pinned.
#[derive(Debug)]
struct RecordingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    slot: CertSlot,
}

impl ClientCertVerifier for RecordingVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let chains_to_ca = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .is_ok();
        let sha256 = hex::encode(Sha256::digest(end_entity.as_ref()));
        let subject_cn = subject_common_name(end_entity.as_ref());
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(PeerCertificate {
            sha256,
            chains_to_ca,
            subject_cn,
        });
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The first subject Common Name of a DER certificate, if it parses.
fn subject_common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    Some(cn)
}
