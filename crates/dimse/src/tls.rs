//! DICOM-TLS server configuration (PS3.15 Annex B.9/B.10, BCP 195 profile).
//!
//! rustls with the aws-lc-rs provider offers only BCP 195-conformant suites
//! (TLS 1.3, and TLS 1.2 with ECDHE + AEAD); both versions are enabled
//! because DCMTK 3.6.7's `+pz` profile is TLS 1.2 only. The server key is
//! RSA so TLS 1.2 peers whose profiles offer only RSA suites connect.
//!
//! Client certificates are *requested* but not required at the TLS layer: a
//! `tls` device may connect without one, and the association policy decides
//! per device (`mtls`: required). A certificate that *is* presented is
//! verified during the handshake, so an unauthenticated peer never reaches
//! the A-ASSOCIATE-RQ parser: it must not be revoked
//! ([`bastion_security::certs`]) and must either be exactly the pinned
//! fingerprint of a registered device, or chain to Bastion's CA, be within
//! its validity period, carry the clientAuth extended key usage and, when it
//! has a key usage extension, digitalSignature. A refusal ends the handshake
//! with a TLS alert and its reason is left in a [`RejectSlot`] for the log
//! and the event trail. A valid certificate issued to another AE title can
//! only be refused by the policy, once the A-ASSOCIATE-RQ names the AE. Each
//! connection gets its own [`rustls::ServerConfig`] whose verifier records
//! what it saw in a [`CertSlot`].
//!
//! Outbound (C-MOVE destinations): [`TlsIdentity::client_config_reporting`]
//! wraps the server-certificate verifier so that the exact reason of a
//! refused destination certificate reaches the caller ([`ServerReject`]).

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use bastion_security::{
    certs::{TrustCache, TrustSnapshot},
    policy::PeerCertificate,
};
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        WebPkiClientVerifier,
    },
    sign::CertifiedKey,
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use sha2::{Digest, Sha256};

use crate::DimseError;

/// Where the verifier leaves the client certificate it accepted, if any.
pub type CertSlot = Arc<Mutex<Option<PeerCertificate>>>;

/// Why the handshake refused a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRejection {
    /// Event-log code: `certificate_revoked`, `certificate_expired`,
    /// `certificate_not_yet_valid`, `certificate_not_trusted`,
    /// `certificate_wrong_usage`, `certificate_invalid` or
    /// `revocation_list_unavailable`.
    pub code: &'static str,
    /// The exact verification failure, for people.
    pub detail: String,
    /// SHA-256 of the DER certificate, lowercase hex.
    pub sha256: String,
    /// The subject Common Name, if it parses (peer-supplied text).
    pub subject_cn: Option<String>,
}

/// Where the verifier leaves the reason it refused a client certificate.
pub type RejectSlot = Arc<Mutex<Option<CertRejection>>>;

/// Where a reporting server-certificate verifier leaves the exact reason it
/// refused a peer's certificate (Bastion as a TLS client).
pub type ServerReject = Arc<Mutex<Option<String>>>;

/// The server identity and trust anchors, loaded once at start-up.
#[derive(Debug)]
pub struct TlsIdentity {
    certified: Arc<CertifiedKey>,
    ca_verifier: Arc<dyn ClientCertVerifier>,
    server_verifier: Arc<dyn ServerCertVerifier>,
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
        let server_verifier: Arc<dyn ServerCertVerifier> =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), Arc::new(provider.clone()))
                .build()
                .map_err(|e| tls("cannot build verifier from", ca, e.to_string()))?;
        let ca_verifier = WebPkiClientVerifier::builder_with_provider(roots, Arc::new(provider))
            .allow_unauthenticated()
            .build()
            .map_err(|e| tls("cannot build verifier from", ca, e.to_string()))?;
        Ok(TlsIdentity {
            certified: Arc::new(certified),
            ca_verifier,
            server_verifier,
            client: Arc::new(client),
        })
    }

    /// [`TlsIdentity::client_config`] whose server-certificate verifier
    /// leaves the exact reason of a refusal (wrong name, untrusted issuer,
    /// expired…) in `slot`, for the log and a `tls.peer_rejected` event.
    pub fn client_config_reporting(&self, slot: ServerReject) -> Arc<rustls::ClientConfig> {
        let mut cfg = (*self.client).clone();
        cfg.dangerous()
            .set_certificate_verifier(Arc::new(ReportingServerVerifier::new(
                self.server_verifier.clone(),
                slot,
            )));
        Arc::new(cfg)
    }

    /// The client configuration for outbound associations: trusts only
    /// Bastion's CA, presents the server certificate as client certificate.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client.clone()
    }

    /// A server configuration for one connection: the client certificate
    /// accepted goes into `slot`, the reason of a refusal into `rejected`;
    /// `trust` holds the revocation list and the pinned fingerprints.
    ///
    /// # Errors
    /// [`DimseError::Tls`] when rustls refuses the configuration.
    pub fn config_for_connection(
        &self,
        slot: CertSlot,
        rejected: RejectSlot,
        trust: Arc<TrustCache>,
    ) -> Result<Arc<ServerConfig>, DimseError> {
        let verifier = Arc::new(RecordingVerifier {
            inner: self.ca_verifier.clone(),
            slot,
            rejected,
            trust,
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

/// Verifies a presented client certificate (see the module documentation)
/// and records it, or the reason it was refused. The handshake signature
/// (proof of key possession) is checked by the inner verifier.
#[derive(Debug)]
struct RecordingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    slot: CertSlot,
    rejected: RejectSlot,
    trust: Arc<TrustCache>,
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
        let chain = self
            .inner
            .verify_client_cert(end_entity, intermediates, now);
        let chains_to_ca = chain.is_ok();
        let sha256 = hex::encode(Sha256::digest(end_entity.as_ref()));
        let subject_cn = subject_common_name(end_entity.as_ref());
        let reject = |code: &'static str, detail: String, error: rustls::Error| {
            *self.rejected.lock().unwrap_or_else(|p| p.into_inner()) = Some(CertRejection {
                code,
                detail,
                sha256: sha256.clone(),
                subject_cn: subject_cn.clone(),
            });
            Err(error)
        };
        // Before refusing a certificate for something a newer snapshot may
        // change (a pin registered, or a certificate issued, a moment ago),
        // re-read the list; a fingerprint on the list stays revoked.
        let may_be_stale = |t: &TrustSnapshot| {
            (!chains_to_ca && !t.pinned(&sha256))
                || (!t.listed(&sha256)
                    && t.revoked(&sha256, chains_to_ca, subject_cn.as_deref())
                        .is_some())
        };
        let trust = match self.trust.current().and_then(|t| {
            if may_be_stale(&t) {
                self.trust.refresh()
            } else {
                Ok(t)
            }
        }) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the certificate revocation list; refusing the client certificate");
                return reject(
                    "revocation_list_unavailable",
                    "the certificate revocation list cannot be read".into(),
                    rustls::Error::InvalidCertificate(CertificateError::UnknownRevocationStatus),
                );
            }
        };
        if let Some(why) = trust.revoked(&sha256, chains_to_ca, subject_cn.as_deref()) {
            return reject(
                "certificate_revoked",
                why.into(),
                rustls::Error::InvalidCertificate(CertificateError::Revoked),
            );
        }
        // Exactly the pinned fingerprint of a registered device: accepted
        // whatever its issuer (the policy binds it to that device).
        if !trust.pinned(&sha256) {
            if let Err(e) = chain {
                return reject(rejection_code(&e), e.to_string(), e);
            }
            if let Some(why) = key_usage_problem(end_entity.as_ref()) {
                return reject(
                    "certificate_wrong_usage",
                    why.into(),
                    rustls::Error::InvalidCertificate(CertificateError::InvalidPurpose),
                );
            }
        }
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

/// The event-log code of a certificate verification failure.
fn rejection_code(e: &rustls::Error) -> &'static str {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "certificate_expired"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "certificate_not_yet_valid"
            }
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                "certificate_not_trusted"
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "certificate_wrong_usage"
            }
            CertificateError::Revoked => "certificate_revoked",
            _ => "certificate_invalid",
        },
        _ => "certificate_invalid",
    }
}

/// Why a CA-issued client certificate's key usage extension (RFC 5280
/// §4.2.1.3) does not allow a TLS client signature, or `None` (no extension,
/// or digitalSignature set). webpki checks the extended key usage only.
fn key_usage_problem(der: &[u8]) -> Option<&'static str> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Some("certificate cannot be parsed");
    };
    match cert.key_usage() {
        Ok(None) => None,
        Ok(Some(ku)) if ku.value.digital_signature() => None,
        Ok(Some(_)) => Some("key usage does not include digitalSignature"),
        Err(_) => Some("key usage extension is malformed or repeated"),
    }
}

/// A server-certificate verifier that leaves the exact reason of a refusal
/// in a [`ServerReject`] slot (Bastion as a TLS client: C-MOVE
/// destinations, the syslog collector), so the caller can log it and raise
/// an alert. Decisions are the inner verifier's.
#[derive(Debug)]
pub struct ReportingServerVerifier {
    inner: Arc<dyn ServerCertVerifier>,
    slot: ServerReject,
}

impl ReportingServerVerifier {
    /// Wraps `inner`, reporting its refusals into `slot`.
    pub fn new(inner: Arc<dyn ServerCertVerifier>, slot: ServerReject) -> Self {
        ReportingServerVerifier { inner, slot }
    }
}

impl ServerCertVerifier for ReportingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| {
                *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!(
                    "{e} (server name {}, certificate SHA-256 {})",
                    server_name.to_str(),
                    hex::encode(Sha256::digest(end_entity.as_ref()))
                ));
            })
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

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.inner.root_hint_subjects()
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

#[cfg(test)]
mod tests {
    use super::*;
    use bastion_model::{AeTitle, PermissionSet, Transport};
    use bastion_security::{
        certs::CertRegistry,
        db::SecurityDb,
        devices::{Device, DeviceRegistry, OnConflict},
        pki::{self, PkiPaths},
    };
    use rcgen::{
        date_time_ymd, CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
        KeyUsagePurpose,
    };
    use rustls::{ClientConfig, ClientConnection, ServerConnection};
    use std::time::Duration;

    struct Fixture {
        _dir: tempfile::TempDir,
        paths: PkiPaths,
        identity: TlsIdentity,
        db: Arc<SecurityDb>,
        trust: Arc<TrustCache>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = PkiPaths::new(dir.path());
        pki::generate(&paths, &[]).expect("pki");
        let identity = TlsIdentity::load(&paths.server_cert, &paths.server_key, &paths.ca_cert)
            .expect("identity");
        let db = Arc::new(SecurityDb::open(&dir.path().join("security.db"), &[9; 32]).expect("db"));
        // TTL zero: every handshake reads the list afresh.
        let trust = Arc::new(TrustCache::new(db.clone(), Duration::ZERO));
        Fixture {
            _dir: dir,
            paths,
            identity,
            db,
            trust,
        }
    }

    type Pair = (CertificateDer<'static>, PrivateKeyDer<'static>);

    enum Usage {
        Client,
        ServerAuthOnly,
        NoDigitalSignature,
    }

    /// A leaf certificate for `cn`, signed by our CA (`ours`), by a foreign
    /// CA, or self-signed.
    fn leaf(fx: &Fixture, signer: &str, cn: &str, expired: bool, usage: Usage) -> Pair {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        if expired {
            p.not_before = date_time_ymd(2020, 1, 1);
            p.not_after = date_time_ymd(2021, 1, 1);
        }
        match usage {
            Usage::Client => {
                p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            Usage::ServerAuthOnly => {
                p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            }
            Usage::NoDigitalSignature => {
                p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
        }
        let cert = match signer {
            "ours" => {
                let ca_key =
                    KeyPair::from_pem(&std::fs::read_to_string(&fx.paths.ca_key).expect("ca key"))
                        .expect("ca key");
                let ca_pem = std::fs::read_to_string(&fx.paths.ca_cert).expect("ca");
                let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key).expect("issuer");
                p.signed_by(&key, &issuer).expect("sign")
            }
            "foreign" => {
                let ca_key = KeyPair::generate().expect("key");
                let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
                ca.distinguished_name
                    .push(DnType::CommonName, "Bastion PACS private CA");
                ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
                ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
                let issuer = Issuer::from_params(&ca, &ca_key);
                p.signed_by(&key, &issuer).expect("sign")
            }
            _ => p.self_signed(&key).expect("self-signed"),
        };
        (
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    }

    fn issued(fx: &Fixture, ae: &str) -> (Pair, String) {
        let i = pki::issue_client(&fx.paths, ae, None).expect("issue");
        let cert = CertificateDer::from_pem_slice(i.cert_pem.as_bytes()).expect("cert");
        let key = PrivateKeyDer::from_pem_slice(i.key_pem.as_bytes()).expect("key");
        ((cert, key), i.sha256)
    }

    struct Outcome {
        result: Result<(), rustls::Error>,
        accepted: Option<PeerCertificate>,
        rejected: Option<CertRejection>,
    }

    /// A real TLS 1.3 handshake in memory between a rustls client and the
    /// per-connection server configuration.
    fn handshake(fx: &Fixture, client_cert: Option<Pair>) -> Outcome {
        let slot: CertSlot = Arc::new(Mutex::new(None));
        let rejected: RejectSlot = Arc::new(Mutex::new(None));
        let cfg = fx
            .identity
            .config_for_connection(slot.clone(), rejected.clone(), fx.trust.clone())
            .expect("server config");
        let mut server = ServerConnection::new(cfg).expect("server");
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&fx.paths.ca_cert).expect("ca") {
            roots.add(c.expect("ca")).expect("root");
        }
        let builder = ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_root_certificates(roots);
        let client_cfg = match client_cert {
            Some((c, k)) => builder.with_client_auth_cert(vec![c], k).expect("client"),
            None => builder.with_no_client_auth(),
        };
        let name = ServerName::try_from("localhost").expect("name");
        let mut client = ClientConnection::new(Arc::new(client_cfg), name).expect("client");
        let mut result = Err(rustls::Error::General("handshake did not finish".into()));
        // Bounded: a TLS 1.3 handshake takes three flights.
        for _ in 0..10 {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).expect("client write");
            if !buf.is_empty() {
                server.read_tls(&mut buf.as_slice()).expect("server read");
                if let Err(e) = server.process_new_packets() {
                    result = Err(e);
                    break;
                }
            }
            let mut buf = Vec::new();
            server.write_tls(&mut buf).expect("server write");
            if !buf.is_empty() {
                client.read_tls(&mut buf.as_slice()).expect("client read");
                if let Err(e) = client.process_new_packets() {
                    result = Err(e);
                    break;
                }
            }
            if !client.is_handshaking() && !server.is_handshaking() {
                result = Ok(());
                break;
            }
        }
        let accepted = slot.lock().expect("slot").clone();
        let rejected = rejected.lock().expect("slot").clone();
        Outcome {
            result,
            accepted,
            rejected,
        }
    }

    fn refused(o: &Outcome, code: &str) {
        assert!(o.result.is_err(), "handshake passed");
        assert!(o.accepted.is_none());
        let r = o.rejected.as_ref().expect("a rejection reason");
        assert_eq!(r.code, code, "{}", r.detail);
    }

    #[test]
    fn valid_certificate_and_no_certificate_pass() {
        let fx = fixture();
        let ((c, k), sha) = issued(&fx, "MOD1");
        let o = handshake(&fx, Some((c, k)));
        assert_eq!(o.result, Ok(()));
        let got = o.accepted.expect("recorded");
        assert_eq!(got.sha256, sha);
        assert!(got.chains_to_ca);
        assert_eq!(got.subject_cn.as_deref(), Some("MOD1"));
        assert!(o.rejected.is_none());
        let o = handshake(&fx, None);
        assert_eq!(o.result, Ok(()));
        assert!(o.accepted.is_none() && o.rejected.is_none());
        // another AE's valid certificate passes the handshake: only the
        // policy, once the A-ASSOCIATE-RQ names the AE, can refuse it
        let (pair, _) = issued(&fx, "CT9");
        assert_eq!(handshake(&fx, Some(pair)).result, Ok(()));
    }

    #[test]
    fn self_signed_expired_foreign_and_wrong_usage_fail_the_handshake() {
        let fx = fixture();
        let o = handshake(&fx, Some(leaf(&fx, "self", "MOD1", false, Usage::Client)));
        refused(&o, "certificate_not_trusted");
        let o = handshake(
            &fx,
            Some(leaf(&fx, "foreign", "MOD1", false, Usage::Client)),
        );
        refused(&o, "certificate_not_trusted");
        let o = handshake(&fx, Some(leaf(&fx, "ours", "MOD1", true, Usage::Client)));
        refused(&o, "certificate_expired");
        assert!(
            o.rejected
                .as_ref()
                .is_some_and(|r| r.detail.contains("expired")),
            "{:?}",
            o.rejected
        );
        let o = handshake(
            &fx,
            Some(leaf(&fx, "ours", "MOD1", false, Usage::ServerAuthOnly)),
        );
        refused(&o, "certificate_wrong_usage");
        let o = handshake(
            &fx,
            Some(leaf(&fx, "ours", "MOD1", false, Usage::NoDigitalSignature)),
        );
        refused(&o, "certificate_wrong_usage");
        // sanity: the same generator with the right usage passes
        let o = handshake(&fx, Some(leaf(&fx, "ours", "MOD1", false, Usage::Client)));
        assert_eq!(o.result, Ok(()));
    }

    #[test]
    fn revoked_certificate_fails_the_handshake() {
        let fx = fixture();
        let ((c, k), sha) = issued(&fx, "MOD1");
        assert_eq!(
            handshake(&fx, Some((c.clone(), k.clone_key()))).result,
            Ok(())
        );
        CertRegistry::new(&fx.db)
            .revoke_sha256(&sha)
            .expect("revoke");
        let o = handshake(&fx, Some((c, k)));
        refused(&o, "certificate_revoked");
        assert_eq!(o.rejected.map(|r| r.sha256), Some(sha));
        // revoking the AE also revokes its certificates never recorded
        // (issued before certificates were recorded)
        let (pair, _) = issued(&fx, "CT2");
        CertRegistry::new(&fx.db)
            .revoke_ae(&AeTitle::parse("CT2").expect("ae"))
            .expect("revoke");
        refused(&handshake(&fx, Some(pair)), "certificate_revoked");
    }

    #[test]
    fn pinned_certificate_passes_whatever_its_issuer() {
        let fx = fixture();
        let pair = leaf(&fx, "self", "LEGACY", true, Usage::Client);
        let sha = hex::encode(Sha256::digest(pair.0.as_ref()));
        DeviceRegistry::new(&fx.db)
            .add(&Device {
                ae: AeTitle::parse("LEGACY").expect("ae"),
                network: "127.0.0.0/8".parse().expect("net"),
                transport: Transport::Mtls,
                allow: PermissionSet::parse_list("echo").expect("allow"),
                cert_sha256: Some(sha.clone()),
                host: None,
                port: None,
                on_conflict: OnConflict::Refuse,
                move_destinations: Vec::new(),
            })
            .expect("add");
        let o = handshake(&fx, Some((pair.0.clone(), pair.1.clone_key())));
        assert_eq!(o.result, Ok(()));
        assert_eq!(
            o.accepted.map(|c| (c.sha256, c.chains_to_ca)),
            Some((sha.clone(), false))
        );
        // a pinned certificate can still be revoked
        CertRegistry::new(&fx.db)
            .revoke_sha256(&sha)
            .expect("revoke");
        refused(&handshake(&fx, Some(pair)), "certificate_revoked");
    }
}
