//! The C-FIND Identifier path of the server: `command::decode_identifier`
//! (bounds scan, then dicom-object in the negotiated transfer syntax) →
//! `Query::parse` (`crates/archive/src/query.rs`, PS3.4 §C.2.2.2 and
//! §C.4.1.2) → the matcher (`Query::row_matches`) against index rows.
//!
//! Input: byte 0 bit 0 = model (Patient / Study Root), bit 1 = relational,
//! bits 2..3 = transfer syntax; byte 1 = length of a trailing string used as
//! every stored value of a second row; the Identifier in between.
#![no_main]

use bastion_archive::query::{Model, Query};
use libfuzzer_sys::fuzz_target;

#[path = "common/rows.rs"]
mod rows;

const TRANSFER_SYNTAXES: [&str; 4] = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
];

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (flags, tail_len) = (data[0], usize::from(data[1]));
    let body = &data[2..];
    let (identifier, stored) = body.split_at(body.len().saturating_sub(tail_len));
    let model = if flags & 1 == 0 {
        Model::PatientRoot
    } else {
        Model::StudyRoot
    };
    let relational = flags & 2 != 0;
    let ts = TRANSFER_SYNTAXES[usize::from(flags >> 2) % 4];
    let Ok(obj) = bastion_dimse::command::decode_identifier(identifier, ts) else {
        return;
    };
    let Ok(query) = Query::parse(&obj, model, relational) else {
        return;
    };
    let _ = (
        query.level(),
        query.is_universal(),
        query.has_unsupported_keys(),
    );
    let _ = query.row_matches(&rows::realistic());
    let _ = query.row_matches(&rows::from_input(&String::from_utf8_lossy(stored)));
});
