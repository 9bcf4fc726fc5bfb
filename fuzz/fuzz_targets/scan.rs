//! The pre-parse length scanner (`crates/archive/src/scan.rs`, PS3.5 §7.1,
//! §7.5, §A.4) in each encoding, with the ingest limits (or the file-meta
//! ones when `only_group` is set). What it reports must lie within the input:
//! the end, the Pixel Data offset and the non-content ranges (ordered, not
//! overlapping), which ingest slices without further checks.
//!
//! Input: byte 0 bit 0 = explicit VR, bit 1 = little endian, bit 2 = stop at
//! the first non-0002 group (file meta); the dataset follows.
#![no_main]

use bastion_archive::scan::{scan, Encoding, ScanLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, buf)) = data.split_first() else {
        return;
    };
    let enc = Encoding {
        explicit_vr: flags & 1 != 0,
        little_endian: flags & 2 != 0,
    };
    let meta = flags & 4 != 0;
    let limits = if meta {
        ScanLimits {
            max_element_len: 64 * 1024,
            max_depth: 1,
        }
    } else {
        let l = bastion_archive::Limits::default();
        ScanLimits {
            max_element_len: l.max_element_bytes,
            max_depth: l.max_sequence_depth,
        }
    };
    let Ok(report) = scan(buf, enc, limits, meta.then_some(0x0002)) else {
        return;
    };
    assert!(report.end <= buf.len(), "end beyond the input");
    if let Some(p) = report.pixel_data_offset {
        assert!(p < report.end, "Pixel Data beyond the end");
    }
    let mut at = 0;
    for &(start, end) in &report.non_content {
        assert!(at <= start && start < end && end <= buf.len(), "bad range");
        at = end;
    }
});
