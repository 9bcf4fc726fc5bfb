//! STOW-RS `multipart/related` parsing (RFC 2046 §5.1.1, RFC 2387, PS3.18
//! §10.5.1.2; `crates/dicomweb/src/multipart.rs`): the request's
//! Content-Type, then the parts, as the STOW-RS handler iterates them. Every
//! part lent must lie inside the body and within the limits. Then a round
//! trip: the same bytes cut into parts by `MultipartWriter` must parse back
//! into the same parts.
//!
//! Input: byte 0 = length of the Content-Type; the Content-Type; the body.
#![no_main]

use bastion_dicomweb::{MultipartLimits, MultipartRelated, MultipartWriter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&ct_len, rest)) = data.split_first() else {
        return;
    };
    let (ct, body) = rest.split_at(usize::from(ct_len).min(rest.len()));
    let limits = MultipartLimits {
        max_parts: 16,
        max_part_bytes: 4096,
        max_header_bytes: 512,
    };

    if let Ok(related) = MultipartRelated::from_content_type(&String::from_utf8_lossy(ct)) {
        assert!((1..=70).contains(&related.boundary.len()));
        let range = body.as_ptr_range();
        let mut n = 0;
        for part in related.parts(body, &limits) {
            let Ok(part) = part else { break };
            n += 1;
            assert!(n <= limits.max_parts, "more parts than the limit");
            assert!(
                part.body.len() <= limits.max_part_bytes,
                "part over the limit"
            );
            let r = part.body.as_ptr_range();
            assert!(
                part.body.is_empty() || (range.start <= r.start && r.end <= range.end),
                "part body outside the request body"
            );
            let _ = part.content_type();
        }
    }

    // Round trip through the writer: the body cut in (up to) three parts at
    // offsets given by the Content-Type bytes.
    let cut = |i: usize| ct.get(i).map_or(0, |&b| usize::from(b) * body.len() / 256);
    let (a, b) = (cut(0).min(cut(1)), cut(0).max(cut(1)));
    let pieces = [&body[..a], &body[a..b], &body[b..]];
    let mut w = MultipartWriter::with_type("application/dicom");
    for p in pieces {
        w.add_part("application/dicom", p);
    }
    let content_type = w.content_type();
    let encoded = w.finish();
    let related = MultipartRelated::from_content_type(&content_type).expect("our Content-Type");
    let back: Vec<_> = related
        .parts(&encoded, &MultipartLimits::default())
        .collect::<Result<_, _>>()
        .expect("our body parses");
    assert_eq!(back.len(), 3);
    for (p, q) in back.iter().zip(pieces) {
        assert_eq!(p.body, q);
        assert_eq!(p.content_type(), Some("application/dicom"));
    }
});
