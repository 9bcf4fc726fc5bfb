//! The association decision (PS3.8 §9.3.4, DESIGN §2 "devices").
//!
//! Pure: it sees the attempt and the device registered under the calling AE
//! title (if any) and says yes or why not. The network front maps a
//! [`Refusal`] to the A-ASSOCIATE-RJ fields with [`Refusal::rejects_called_ae`].

use std::net::IpAddr;

use bastion_model::{AeTitle, Transport};

use crate::devices::Device;

/// Which listener the association arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The DICOM-TLS listener (PS3.15 Annex B.1).
    Tls,
    /// The plain DICOM listener (legacy devices only).
    Plain,
}

/// What the TLS layer learnt about the client certificate, if one was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    /// SHA-256 of the DER end-entity certificate, 64 lowercase hex digits.
    pub sha256: String,
    /// Whether it chains to Bastion's CA (and is valid for client auth now).
    pub chains_to_ca: bool,
    /// The subject Common Name; `bastion cert issue` sets it to the device's
    /// AE title, which binds a CA-issued certificate to one device.
    pub subject_cn: Option<String>,
}

/// One association request as seen by the policy.
#[derive(Debug, Clone)]
pub struct AssociationAttempt<'a> {
    /// Our AE title.
    pub our_ae: &'a AeTitle,
    /// Called AE title from the A-ASSOCIATE-RQ, raw.
    pub called_ae: &'a str,
    /// Calling AE title from the A-ASSOCIATE-RQ, raw.
    pub calling_ae: &'a str,
    /// Source address of the TCP connection.
    pub peer: IpAddr,
    /// The listener it arrived on.
    pub listener: Listener,
    /// The client certificate, for TLS associations that sent one.
    pub certificate: Option<&'a PeerCertificate>,
}

/// Why an association is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The called AE title is not ours (RJ 1/1/7).
    CalledAeNotOurs,
    /// No device is registered under the calling AE title (RJ 1/1/3).
    UnknownCallingAe,
    /// The device exists but the source address is outside its network.
    AddressOutsideNetwork,
    /// The device must use another listener (e.g. a `tls` device on plain).
    WrongTransport,
    /// An `mtls` device sent no client certificate.
    CertificateRequired,
    /// The client certificate neither chains to our CA nor matches the pin.
    CertificateNotTrusted,
    /// The certificate chains to our CA but was issued to another AE title.
    CertificateForAnotherDevice,
}

impl Refusal {
    /// True when the A-ASSOCIATE-RJ reason is 7 (called AE title not
    /// recognized); every other refusal is reason 3 (calling AE title not
    /// recognized), result 1 (permanent), source 1 (service user).
    pub fn rejects_called_ae(self) -> bool {
        matches!(self, Refusal::CalledAeNotOurs)
    }

    /// A short operator-facing reason.
    pub fn describe(self) -> &'static str {
        match self {
            Refusal::CalledAeNotOurs => "called AE title is not ours",
            Refusal::UnknownCallingAe => "calling AE title is not a registered device",
            Refusal::AddressOutsideNetwork => "source address is outside the device's network",
            Refusal::WrongTransport => {
                "device is not allowed on this listener (transport mismatch)"
            }
            Refusal::CertificateRequired => "mtls device sent no client certificate",
            Refusal::CertificateNotTrusted => {
                "client certificate does not chain to Bastion's CA or does not match the pinned fingerprint"
            }
            Refusal::CertificateForAnotherDevice => {
                "client certificate was issued to another AE title (subject CN differs from the calling AE)"
            }
        }
    }

    /// The event-log code.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::CalledAeNotOurs => "called_ae_not_ours",
            Refusal::UnknownCallingAe => "unknown_calling_ae",
            Refusal::AddressOutsideNetwork => "address_outside_network",
            Refusal::WrongTransport => "wrong_transport",
            Refusal::CertificateRequired => "certificate_required",
            Refusal::CertificateNotTrusted => "certificate_not_trusted",
            Refusal::CertificateForAnotherDevice => "certificate_for_another_device",
        }
    }
}

/// Decides an association attempt. `device` is the device registered under
/// the (trimmed) calling AE title, or `None`.
pub fn decide(attempt: &AssociationAttempt<'_>, device: Option<&Device>) -> Result<(), Refusal> {
    match AeTitle::parse(attempt.called_ae) {
        Ok(called) if &called == attempt.our_ae => {}
        _ => return Err(Refusal::CalledAeNotOurs),
    }
    let device = device.ok_or(Refusal::UnknownCallingAe)?;
    if !device.network_contains(attempt.peer) {
        return Err(Refusal::AddressOutsideNetwork);
    }
    match (device.transport, attempt.listener) {
        (Transport::Plain, Listener::Plain) => Ok(()),
        (Transport::Plain, Listener::Tls) => Err(Refusal::WrongTransport),
        (Transport::Tls | Transport::Mtls, Listener::Plain) => Err(Refusal::WrongTransport),
        (Transport::Tls, Listener::Tls) => match attempt.certificate {
            None => Ok(()),
            Some(c) => certificate_trusted(device, c),
        },
        (Transport::Mtls, Listener::Tls) => match attempt.certificate {
            None => Err(Refusal::CertificateRequired),
            Some(c) => certificate_trusted(device, c),
        },
    }
}

/// A device with a pinned fingerprint accepts that certificate only. A
/// device without one accepts a certificate that chains to Bastion's CA *and*
/// names the device's AE title as its subject CN, so a certificate issued to
/// one device cannot be used to connect as another.
fn certificate_trusted(device: &Device, cert: &PeerCertificate) -> Result<(), Refusal> {
    use subtle::ConstantTimeEq;
    match device.cert_sha256.as_deref() {
        Some(pin) if bool::from(pin.as_bytes().ct_eq(cert.sha256.as_bytes())) => Ok(()),
        Some(_) => Err(Refusal::CertificateNotTrusted),
        None if !cert.chains_to_ca => Err(Refusal::CertificateNotTrusted),
        None => match cert.subject_cn.as_deref().map(AeTitle::parse) {
            Some(Ok(cn)) if cn == device.ae => Ok(()),
            _ => Err(Refusal::CertificateForAnotherDevice),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::OnConflict;
    use bastion_model::PermissionSet;

    fn device(transport: Transport, pin: Option<&str>) -> Option<Device> {
        Some(Device {
            ae: AeTitle::parse("MOD1").ok()?,
            network: "127.0.0.0/8".parse().ok()?,
            transport,
            allow: PermissionSet::parse_list("echo").ok()?,
            cert_sha256: pin.map(str::to_owned),
            host: None,
            port: None,
            on_conflict: OnConflict::Refuse,
            move_destinations: Vec::new(),
        })
    }

    #[test]
    fn decisions() {
        let ours = AeTitle::parse("BASTION").ok();
        let Some(ours) = ours else { panic!("AE") };
        let lo: IpAddr = [127, 0, 0, 1].into();
        let far: IpAddr = [10, 1, 2, 3].into();
        let good = PeerCertificate {
            sha256: "a".repeat(64),
            chains_to_ca: true,
            subject_cn: Some("MOD1".into()),
        };
        let other_device = PeerCertificate {
            sha256: "c".repeat(64),
            chains_to_ca: true,
            subject_cn: Some("CT9".into()),
        };
        let foreign = PeerCertificate {
            sha256: "b".repeat(64),
            chains_to_ca: false,
            subject_cn: Some("MOD1".into()),
        };
        let at = |called, peer, listener, certificate| AssociationAttempt {
            our_ae: &ours,
            called_ae: called,
            calling_ae: "MOD1",
            peer,
            listener,
            certificate,
        };
        let tls = device(Transport::Tls, None);
        let mtls = device(Transport::Mtls, None);
        let pinned_mtls = device(Transport::Mtls, Some(&"b".repeat(64)));
        let plain = device(Transport::Plain, None);
        use Listener::*;
        assert_eq!(decide(&at("BASTION ", lo, Tls, None), tls.as_ref()), Ok(()));
        assert_eq!(
            decide(&at("OTHER", lo, Tls, None), tls.as_ref()),
            Err(Refusal::CalledAeNotOurs)
        );
        assert_eq!(
            decide(&at("    ", lo, Tls, None), tls.as_ref()),
            Err(Refusal::CalledAeNotOurs)
        );
        assert_eq!(
            decide(&at("BASTION", lo, Tls, None), None),
            Err(Refusal::UnknownCallingAe)
        );
        assert_eq!(
            decide(&at("BASTION", far, Tls, None), tls.as_ref()),
            Err(Refusal::AddressOutsideNetwork)
        );
        assert_eq!(
            decide(&at("BASTION", lo, Plain, None), tls.as_ref()),
            Err(Refusal::WrongTransport)
        );
        assert_eq!(
            decide(&at("BASTION", lo, Tls, None), plain.as_ref()),
            Err(Refusal::WrongTransport)
        );
        assert_eq!(
            decide(&at("BASTION", lo, Plain, None), plain.as_ref()),
            Ok(())
        );
        assert_eq!(
            decide(&at("BASTION", lo, Tls, Some(&foreign)), tls.as_ref()),
            Err(Refusal::CertificateNotTrusted)
        );
        assert_eq!(
            decide(&at("BASTION", lo, Tls, None), mtls.as_ref()),
            Err(Refusal::CertificateRequired)
        );
        assert_eq!(
            decide(&at("BASTION", lo, Tls, Some(&good)), mtls.as_ref()),
            Ok(())
        );
        assert_eq!(
            decide(&at("BASTION", lo, Tls, Some(&foreign)), mtls.as_ref()),
            Err(Refusal::CertificateNotTrusted)
        );
        assert_eq!(
            decide(
                &at("BASTION", lo, Tls, Some(&foreign)),
                pinned_mtls.as_ref()
            ),
            Ok(())
        );
        // a pin excludes every other certificate, even one from our CA
        assert_eq!(
            decide(&at("BASTION", lo, Tls, Some(&good)), pinned_mtls.as_ref()),
            Err(Refusal::CertificateNotTrusted)
        );
        // a CA-issued certificate binds to its AE title (subject CN)
        assert_eq!(
            decide(&at("BASTION", lo, Tls, Some(&other_device)), mtls.as_ref()),
            Err(Refusal::CertificateForAnotherDevice)
        );
        assert_eq!(
            decide(&at("BASTION", lo, Tls, Some(&other_device)), tls.as_ref()),
            Err(Refusal::CertificateForAnotherDevice)
        );
    }
}
