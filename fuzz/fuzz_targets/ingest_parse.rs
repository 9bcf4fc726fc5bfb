//! The ingest parse (`Archive::parse_received`: Part 10 split, bounds scan,
//! inflation, parse of the attributes before Pixel Data, extraction of the
//! indexed attributes and UID checks), as `bastion import` / STOW-RS (a Part
//! 10 file) and C-STORE (a dataset in a negotiated transfer syntax) run it.
//!
//! Input: byte 0 selects the path: bit 0 clear = a Part 10 file (the rest);
//! set = a network dataset whose transfer syntax is picked by bits 1..4 from
//! the ones Bastion accepts.
#![no_main]

use bastion_archive::{Archive, Limits, Received};
use libfuzzer_sys::fuzz_target;

const TRANSFER_SYNTAXES: [&str; 8] = [
    "1.2.840.10008.1.2",      // Implicit VR Little Endian
    "1.2.840.10008.1.2.1",    // Explicit VR Little Endian
    "1.2.840.10008.1.2.2",    // Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.1.99", // Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50", // JPEG Baseline
    "1.2.840.10008.1.2.5",    // RLE Lossless
    "1.2.840.10008.1.2.4.90", // JPEG 2000 Lossless
    "1.2.3.4",                // unknown
];

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    // Limits small enough that a hostile length fails fast, as it would
    // against the 1 GiB defaults.
    let limits = Limits {
        max_dataset_bytes: 1 << 20,
        max_element_bytes: 1 << 20,
        max_inflated_bytes: 4 << 20,
        ..Limits::default()
    };
    let received = if flags & 1 == 0 {
        Received::File(rest.to_vec())
    } else {
        Received::Network {
            dataset: rest.to_vec(),
            transfer_syntax: TRANSFER_SYNTAXES[usize::from(flags >> 1) % 8].to_owned(),
            affected_sop_class: "1.2.840.10008.5.1.4.1.1.7".to_owned(),
            affected_sop_instance: "1.2.3.4.5".to_owned(),
        }
    };
    if let Ok(attrs) = Archive::parse_received(&received, &limits) {
        for uid in [
            &attrs.instance.sop_class_uid,
            &attrs.instance.sop_instance_uid,
            &attrs.study.study_instance_uid,
            &attrs.series.series_instance_uid,
        ] {
            assert!(
                bastion_model::Uid::parse(uid).is_ok(),
                "an accepted dataset has a valid UID"
            );
        }
    }
});
