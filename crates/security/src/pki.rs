//! Bastion's private PKI (PS3.15 Annex B.1 secure transport connection
//! profile needs certificates): a CA, the server certificate, and one client
//! certificate per device. Generated with rcgen; every key is RSA-2048
//! because Debian's DCMTK 3.6.7 BCP 195 profiles offer only RSA suites in
//! TLS 1.2.
//!
//! Files under `DIR/tls/`: `ca.crt`, `ca.key` (0600), `server.crt`,
//! `server.key` (0600).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_RSA_SHA256,
};
use sha2::{Digest, Sha256};

use crate::{io_err, secrets, Result, SecurityError};

/// Paths of the PKI files inside a data directory.
#[derive(Debug, Clone)]
pub struct PkiPaths {
    /// `tls/ca.crt`: the CA certificate clients must trust.
    pub ca_cert: PathBuf,
    /// `tls/ca.key`: the CA private key (0600).
    pub ca_key: PathBuf,
    /// `tls/server.crt`: the server certificate.
    pub server_cert: PathBuf,
    /// `tls/server.key`: the server private key (0600).
    pub server_key: PathBuf,
}

impl PkiPaths {
    /// The standard layout under `data_dir/tls`.
    pub fn new(data_dir: &Path) -> Self {
        let tls = data_dir.join("tls");
        PkiPaths {
            ca_cert: tls.join("ca.crt"),
            ca_key: tls.join("ca.key"),
            server_cert: tls.join("server.crt"),
            server_key: tls.join("server.key"),
        }
    }
}

/// A client certificate issued to a device.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// PKCS#8 private key, PEM, unencrypted.
    pub key_pem: String,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// SHA-256 of the DER certificate, lowercase hex.
    pub sha256: String,
    /// The serial number, lowercase hex (as `openssl x509 -serial` shows it).
    pub serial: String,
    /// End of the validity period.
    pub not_after: time::OffsetDateTime,
}

fn cert_err(e: rcgen::Error) -> SecurityError {
    SecurityError::Certificate(e.to_string())
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

fn sans(names: &[String]) -> Result<Vec<SanType>> {
    let mut out = Vec::new();
    for n in names {
        let san = match n.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(n.clone().try_into().map_err(cert_err)?),
        };
        if !out.contains(&san) {
            out.push(san);
        }
    }
    Ok(out)
}

/// Creates the CA and the server certificate. `hosts` are extra SAN entries
/// (the configured listen addresses); `localhost`, `127.0.0.1` and `::1` are
/// always included. Keys are written 0600.
///
/// # Errors
/// [`SecurityError::Io`] when a file exists already or cannot be written;
/// [`SecurityError::Certificate`] when generation fails.
pub fn generate(paths: &PkiPaths, hosts: &[String]) -> Result<()> {
    let ca_key = KeyPair::generate_for(&PKCS_RSA_SHA256).map_err(cert_err)?;
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Bastion PACS private CA");
    dn.push(DnType::OrganizationName, "Bastion PACS");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca, 3650);
    let ca_cert = ca.self_signed(&ca_key).map_err(cert_err)?;

    let (server_key, server_cert) = server_certificate(&Issuer::from_params(&ca, &ca_key), hosts)?;

    if let Some(dir) = paths.ca_cert.parent() {
        std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    }
    secrets::write_secret(&paths.ca_key, ca_key.serialize_pem().as_bytes())?;
    secrets::write_public(&paths.ca_cert, ca_cert.pem().as_bytes())?;
    secrets::write_secret(&paths.server_key, server_key.serialize_pem().as_bytes())?;
    secrets::write_public(&paths.server_cert, server_cert.pem().as_bytes())?;
    Ok(())
}

/// Parameters of an end-entity certificate: CN (and O), SANs, digital
/// signature + key encipherment, serverAuth + clientAuth (servers also open
/// outbound associations; devices may also be C-MOVE destinations), 825 days.
fn leaf_params(cn: &str, org: Option<&str>, names: &[String]) -> Result<CertificateParams> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(o) = org {
        dn.push(DnType::OrganizationName, o);
    }
    p.distinguished_name = dn;
    p.subject_alt_names = sans(names)?;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut p, 825);
    Ok(p)
}

/// An RSA server key and certificate for `localhost`, `127.0.0.1`, `::1`
/// and `hosts`, with serverAuth and clientAuth usages.
fn server_certificate(
    issuer: &Issuer<'_, impl rcgen::SigningKey>,
    hosts: &[String],
) -> Result<(KeyPair, rcgen::Certificate)> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    names.extend(hosts.iter().cloned());
    let server_key = KeyPair::generate_for(&PKCS_RSA_SHA256).map_err(cert_err)?;
    let sp = leaf_params("Bastion PACS server", None, &names)?;
    let cert = sp.signed_by(&server_key, issuer).map_err(cert_err)?;
    Ok((server_key, cert))
}

/// Replaces the server certificate and key (signed by the existing CA) with
/// one whose SAN lists `hosts` besides the loopback names, e.g. after the
/// listen address changed. The previous files are kept as `*.old`. `serve`
/// must be restarted to use them.
///
/// # Errors
/// [`SecurityError::InsecurePermissions`] when the CA key is readable by
/// others; [`SecurityError::Certificate`] / [`SecurityError::Io`] otherwise.
pub fn renew_server(paths: &PkiPaths, hosts: &[String]) -> Result<()> {
    let ca_key_pem = String::from_utf8(secrets::read_secret(&paths.ca_key)?)
        .map_err(|_| SecurityError::Certificate("CA key is not PEM".into()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(cert_err)?;
    let ca_pem = std::fs::read_to_string(&paths.ca_cert).map_err(io_err("read", &paths.ca_cert))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key).map_err(cert_err)?;
    let (key, cert) = server_certificate(&issuer, hosts)?;
    for p in [&paths.server_key, &paths.server_cert] {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        let old = p.with_extension(format!("{ext}.old"));
        let _ = std::fs::remove_file(&old);
        std::fs::rename(p, &old).map_err(io_err("keep previous", p))?;
    }
    secrets::write_secret(&paths.server_key, key.serialize_pem().as_bytes())?;
    secrets::write_public(&paths.server_cert, cert.pem().as_bytes())?;
    Ok(())
}

/// Issues a client certificate for device `ae`, signed by the CA, with
/// serverAuth and clientAuth usages (a device may also be a C-MOVE
/// destination) and `host` in the SAN when given.
///
/// # Errors
/// [`SecurityError::InsecurePermissions`] when the CA key is readable by
/// others; [`SecurityError::Certificate`] when parsing or signing fails.
pub fn issue_client(paths: &PkiPaths, ae: &str, host: Option<&str>) -> Result<IssuedCert> {
    let ca_key_pem = String::from_utf8(secrets::read_secret(&paths.ca_key)?)
        .map_err(|_| SecurityError::Certificate("CA key is not PEM".into()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(cert_err)?;
    let ca_pem = std::fs::read_to_string(&paths.ca_cert).map_err(io_err("read", &paths.ca_cert))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key).map_err(cert_err)?;

    let key = KeyPair::generate_for(&PKCS_RSA_SHA256).map_err(cert_err)?;
    let hosts: Vec<String> = host.map(str::to_owned).into_iter().collect();
    let p = leaf_params(ae, Some("Bastion PACS device"), &hosts)?;
    let cert = p.signed_by(&key, &issuer).map_err(cert_err)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.der())
        .map_err(|e| SecurityError::Certificate(format!("issued certificate: {e}")))?;
    let not_after =
        time::OffsetDateTime::from_unix_timestamp(parsed.validity().not_after.timestamp())
            .map_err(|e| SecurityError::Certificate(format!("issued certificate: {e}")))?;
    let serial = hex::encode(parsed.raw_serial());
    Ok(IssuedCert {
        key_pem: key.serialize_pem(),
        cert_pem: cert.pem(),
        sha256: fingerprint(cert.der()),
        serial,
        not_after,
    })
}

/// What the admin posture shows of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// The subject distinguished name, e.g. `CN=Bastion PACS CA`.
    pub subject: String,
    /// End of the validity period.
    pub not_after: time::OffsetDateTime,
}

/// The subject and expiry of the first certificate of the PEM file `path`
/// (the end-entity certificate of a chain).
///
/// # Errors
/// [`SecurityError::Io`] when the file cannot be read,
/// [`SecurityError::Certificate`] when it holds no parseable certificate.
pub fn certificate_info(path: &Path) -> Result<CertificateInfo> {
    let pem = std::fs::read(path).map_err(io_err("read", path))?;
    let bad = |what: &str| SecurityError::Certificate(format!("{}: {what}", path.display()));
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(&pem).map_err(|_| bad("not a PEM certificate"))?;
    let cert = pem
        .parse_x509()
        .map_err(|_| bad("not a valid X.509 certificate"))?;
    let not_after =
        time::OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp())
            .map_err(|_| bad("validity end out of range"))?;
    Ok(CertificateInfo {
        subject: cert.subject().to_string(),
        not_after,
    })
}

/// SHA-256 of a DER certificate as 64 lowercase hex digits.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_ca_server_and_client() -> Result<()> {
        let dir = tempfile::tempdir().map_err(io_err("tempdir", Path::new("/tmp")))?;
        let paths = PkiPaths::new(dir.path());
        generate(&paths, &["pacs.example.org".into()])?;
        secrets::check_private(&paths.ca_key)?;
        secrets::check_private(&paths.server_key)?;
        let issued = issue_client(&paths, "MOD1", Some("10.0.0.5"))?;
        assert_eq!(issued.sha256.len(), 64);
        assert!(!issued.serial.is_empty());
        assert!(issued.not_after > time::OffsetDateTime::now_utc() + time::Duration::days(800));
        assert!(issued.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(issued.key_pem.contains("PRIVATE KEY"));
        // A second generate on the same directory must not overwrite keys.
        assert!(generate(&paths, &[]).is_err());
        let before =
            std::fs::read(&paths.server_cert).map_err(io_err("read", &paths.server_cert))?;
        renew_server(&paths, &["10.1.2.3".into()])?;
        let after =
            std::fs::read(&paths.server_cert).map_err(io_err("read", &paths.server_cert))?;
        assert_ne!(before, after);
        secrets::check_private(&paths.server_key)?;
        assert!(paths.server_cert.with_extension("crt.old").exists());
        let ca = certificate_info(&paths.ca_cert)?;
        let server = certificate_info(&paths.server_cert)?;
        assert!(ca.subject.contains("CN="), "{}", ca.subject);
        let now = time::OffsetDateTime::now_utc();
        assert!(server.not_after > now + time::Duration::days(300));
        assert!(ca.not_after >= server.not_after);
        assert!(certificate_info(&paths.ca_key).is_err());
        Ok(())
    }
}
