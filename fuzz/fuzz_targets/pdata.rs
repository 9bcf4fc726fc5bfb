//! Bastion's own P-DATA-TF writer (`crates/dimse/src/pdata.rs`, PS3.8 §9.3.5
//! and Annex E) against dicom-ul's reader: whatever the command, dataset,
//! presentation context and fragment size, the PDUs written must decode
//! (strictly, within the PDU length a peer announced) back into the same
//! command and dataset bytes, one last-fragment flag closing each.
//!
//! Input: byte 0 = presentation context ID, bytes 1..3 = fragment size
//! (big-endian, 1..=65535), byte 3 = whether a dataset follows, bytes 4..6 =
//! command length; the command, then the dataset.
#![no_main]

use std::{io::Cursor, sync::OnceLock, time::Duration};

use dicom_ul::pdu::{read_pdu, PDataValueType, Pdu};
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let pc_id = data[0];
    let max_data = usize::from(u16::from_be_bytes([data[1], data[2]])).max(1);
    let with_dataset = data[3] & 1 == 1;
    let cmd_len = usize::from(u16::from_be_bytes([data[4], data[5]]));
    let rest = &data[6..];
    let (command, dataset) = rest.split_at(cmd_len.min(rest.len()));
    let dataset = with_dataset.then_some(dataset);

    let mut out: Vec<u8> = Vec::new();
    runtime()
        .block_on(bastion_dimse::pdata::write_message(
            &mut out,
            pc_id,
            command,
            dataset,
            max_data,
            Duration::from_secs(60),
        ))
        .expect("writing to a Vec cannot fail");

    // A PDU carrying `max_data` bytes of PDV data is 6 bytes longer.
    let max_pdu = u32::try_from(max_data + 6)
        .expect("small")
        .max(dicom_ul::pdu::MINIMUM_PDU_SIZE);
    let mut cursor = Cursor::new(&out[..]);
    let (mut got_cmd, mut got_data) = (Vec::new(), Vec::new());
    let (mut cmd_last, mut data_last) = (0usize, 0usize);
    while (cursor.position() as usize) < out.len() {
        let pdu = read_pdu(&mut cursor, max_pdu, true)
            .expect("our P-DATA-TF decodes")
            .expect("our P-DATA-TF is complete");
        let Pdu::PData { data: pdvs } = pdu else {
            panic!("not a P-DATA-TF: {pdu:?}");
        };
        assert_eq!(pdvs.len(), 1, "one PDV per PDU");
        let pdv = &pdvs[0];
        assert_eq!(pdv.presentation_context_id, pc_id);
        assert!(pdv.data.len() <= max_data);
        if pdv.value_type == PDataValueType::Command {
            assert!(got_data.is_empty() && data_last == 0, "command after data");
            assert_eq!(cmd_last, 0, "command fragment after the last one");
            got_cmd.extend_from_slice(&pdv.data);
            cmd_last += usize::from(pdv.is_last);
        } else {
            assert_eq!(data_last, 0, "data fragment after the last one");
            got_data.extend_from_slice(&pdv.data);
            data_last += usize::from(pdv.is_last);
        }
    }
    assert_eq!(got_cmd, command);
    assert_eq!(cmd_last, 1);
    match dataset {
        Some(d) => {
            assert_eq!(got_data, d);
            assert_eq!(data_last, 1);
        }
        None => assert!(got_data.is_empty() && data_last == 0),
    }
});
