//! The Storage SCU against a real peer: DCMTK `storescp` on 127.0.0.1, in
//! plain and over TLS with a certificate from Bastion's CA.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bastion_dimse::{
    scu::{Destination, StoreRequest, StoreScu},
    tls::TlsIdentity,
};
use bastion_model::{AeTitle, Transport};
use bastion_security::pki;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN;

const SC: &str = "1.2.840.10008.5.1.4.1.1.7";
const EVRLE: &str = "1.2.840.10008.1.2.1";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn storescp(port: u16, out: &Path, tls: Option<(&Path, &Path, &Path)>) -> Peer {
    assert!(
        Path::new("/usr/bin/storescp").exists(),
        "DCMTK storescp is required (scripts/test.sh installs it)"
    );
    let mut cmd = Command::new("/usr/bin/storescp");
    cmd.env("TCP_NODELAY", "1")
        .arg("-aet")
        .arg("DEST")
        .arg("-od")
        .arg(out);
    if let Some((key, crt, ca)) = tls {
        cmd.arg("+tls").arg(key).arg(crt).arg("+cf").arg(ca);
    }
    cmd.arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd.spawn().expect("spawn storescp");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "storescp did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Peer(child)
}

fn dataset(sop: &str) -> Vec<u8> {
    let mut obj = InMemDicomObject::new_empty();
    for (tag, vr, v) in [
        (tags::SOP_CLASS_UID, VR::UI, SC),
        (tags::SOP_INSTANCE_UID, VR::UI, sop),
        (tags::PATIENT_ID, VR::LO, "SCU-TEST"),
        (tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3.4"),
        (tags::SERIES_INSTANCE_UID, VR::UI, "1.2.3.4.5"),
    ] {
        obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
    }
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::from(vec![7u8; 300_000]),
    ));
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &EXPLICIT_VR_LITTLE_ENDIAN.erased())
        .expect("encode");
    out
}

async fn send_two(
    dest: Destination,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    out: &Path,
) {
    let ours = AeTitle::parse("BASTION").expect("ae");
    let mut scu = StoreScu::connect(
        &ours,
        &dest,
        &[(SC.into(), EVRLE.into())],
        tls,
        Duration::from_secs(10),
    )
    .await
    .expect("associate");
    for sop in ["1.2.3.4.5.1", "1.2.3.4.5.2"] {
        let ds = dataset(sop);
        let st = scu
            .store(StoreRequest {
                sop_class: SC,
                sop_instance: sop,
                transfer_syntax: EVRLE,
                dataset: &ds,
                move_originator: Some(("MOVER", 7)),
            })
            .await
            .expect("store");
        assert_eq!(st, 0x0000);
        // storescp names files <modality>.<sop uid>; the dataset must arrive whole
        let received = std::fs::read_dir(out)
            .expect("out dir")
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with(sop))
            .map(|e| std::fs::read(e.path()).expect("read"))
            .expect("file received");
        assert!(
            received.ends_with(&ds[ds.len() - 1000..]),
            "pixel data arrived intact"
        );
    }
    // a context that was not proposed cannot be used
    let err = scu
        .store(StoreRequest {
            sop_class: "1.2.840.10008.5.1.4.1.1.2",
            sop_instance: "1.2.9",
            transfer_syntax: EVRLE,
            dataset: &[],
            move_originator: None,
        })
        .await;
    assert!(matches!(
        err,
        Err(bastion_dimse::scu::ScuError::NoContext { .. })
    ));
    scu.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_to_dcmtk_storescp_plain() {
    let out = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let _peer = storescp(port, out.path(), None);
    let dest = Destination {
        ae: AeTitle::parse("DEST").expect("ae"),
        host: "127.0.0.1".into(),
        port,
        transport: Transport::Plain,
    };
    send_two(dest, None, out.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_to_dcmtk_storescp_over_tls_with_our_ca() {
    let dir = tempfile::tempdir().expect("tmp");
    let paths = pki::PkiPaths::new(dir.path());
    pki::generate(&paths, &[]).expect("pki");
    let issued = pki::issue_client(&paths, "DEST", Some("127.0.0.1")).expect("issue");
    let (key, crt) = (dir.path().join("dest.key"), dir.path().join("dest.crt"));
    std::fs::write(&key, issued.key_pem).expect("key");
    std::fs::write(&crt, issued.cert_pem).expect("crt");
    let out = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let _peer = storescp(port, out.path(), Some((&key, &crt, &paths.ca_cert)));
    let identity =
        TlsIdentity::load(&paths.server_cert, &paths.server_key, &paths.ca_cert).expect("identity");
    let dest = Destination {
        ae: AeTitle::parse("DEST").expect("ae"),
        host: "127.0.0.1".into(),
        port,
        transport: Transport::Mtls,
    };
    send_two(dest, Some(identity.client_config()), out.path()).await;
}
