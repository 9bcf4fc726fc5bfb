//! dicom-ul's PDU decoder (A-ASSOCIATE-RQ/AC/RJ, P-DATA-TF, A-RELEASE,
//! A-ABORT; PS3.8 §9.3) fed the way Bastion's server feeds it: the bytes of
//! a connection, strict, with the default `max_pdu_length` of the
//! configuration. Every PDU decoded is re-encoded and decoded again and must
//! come back equal (modelled on dicom-rs `ul/fuzz/fuzz_targets/pdu_roundtrip.rs`).
//! The P-DATA-TF command fragments are reassembled and handed to the DIMSE
//! command decoder, as `server.rs` does.
#![no_main]

use std::io::Cursor;

use dicom_ul::pdu::{read_pdu, write_pdu, PDataValueType, Pdu, MAXIMUM_PDU_SIZE};
use libfuzzer_sys::fuzz_target;

/// `[dimse] max_pdu_length` default (docs/defaults.md).
const MAX_PDU: u32 = 131_072;
/// PDUs read from one input at most (each needs 6 bytes, so this only
/// bounds pathological inputs).
const MAX_PDUS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let mut cursor = Cursor::new(data);
    let mut command = Vec::new();
    for _ in 0..MAX_PDUS {
        let start = cursor.position() as usize;
        let pdu = match read_pdu(&mut cursor, MAX_PDU, true) {
            Ok(Some(pdu)) => pdu,
            Ok(None) | Err(_) => break,
        };
        let consumed = cursor.position() as usize - start;
        assert!(consumed >= 6 && start + consumed <= data.len());
        let mut again = Vec::new();
        write_pdu(&mut again, &pdu).expect("a decoded PDU encodes");
        let back = read_pdu(&mut Cursor::new(&again[..]), MAXIMUM_PDU_SIZE, false)
            .expect("an encoded PDU decodes")
            .expect("an encoded PDU is complete");
        assert_eq!(back, pdu, "PDU does not survive a round trip");
        if let Pdu::PData { data: pdvs } = pdu {
            for pdv in pdvs {
                if pdv.value_type != PDataValueType::Command {
                    continue;
                }
                if command.len() + pdv.data.len() > bastion_dimse::command::MAX_COMMAND_BYTES {
                    return;
                }
                command.extend_from_slice(&pdv.data);
                if pdv.is_last {
                    let _ = bastion_dimse::command::decode(&command);
                    command.clear();
                }
            }
        }
    }
});
