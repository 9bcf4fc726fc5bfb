//! STOW-RS `multipart/related` parsing (RFC 2046 §5.1.1, RFC 2387, PS3.18
//! §10.5.1.2; `crates/dicomweb/src/multipart.rs`): the request's
//! Content-Type, then the parts, as the STOW-RS handler iterates them. Every
//! part lent must lie inside the body and within the limits. Then a round
//! trip: the same bytes cut into parts by `MultipartWriter` must parse back
//! into the same parts.
//!
//! The same body is also streamed through `PartSplitter` in pieces of a
//! size the input chooses: with room enough, it must give exactly the
//! parts the slice parser gives (and finish cleanly when that parser does);
//! with a small memory budget, every part it does give (skipping the ones
//! that do not fit) must be the slice parser's part of the same index.
//!
//! Input: byte 0 = length of the Content-Type; the Content-Type; the body.
#![no_main]

use bastion_archive::budget::MemoryBudget;
use bastion_dicomweb::{
    MultipartLimits, MultipartRelated, MultipartWriter, OwnedPart, Part, PartSplitter,
};
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
        assert!(
            (1..=bastion_dicomweb::multipart::MAX_BOUNDARY_LEN).contains(&related.boundary.len())
        );
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
        let whole: Vec<Part> = related.parts(body, &limits).map_while(Result::ok).collect();
        let closed = related.parts(body, &limits).all(|p| p.is_ok());
        let piece = 1 + usize::from(ct.last().copied().unwrap_or(0)) % 61;
        let (parts, finished) = stream(&related, &limits, body, piece, 1 << 30);
        for (i, p) in &parts {
            let q = &whole[*i];
            assert_eq!(
                (&p.headers, p.body.as_slice()),
                (&q.headers, q.body),
                "part {i}"
            );
        }
        let indices: Vec<usize> = parts.iter().map(|(i, _)| *i).collect();
        assert_eq!(
            indices,
            (0..parts.len()).collect::<Vec<_>>(),
            "no part skipped"
        );
        if closed {
            assert!(
                finished,
                "the slice parser closed the body, the splitter did not"
            );
            assert_eq!(parts.len(), whole.len(), "the splitter lost a part");
        }
        // A budget of a few hundred bytes: parts are skipped, never wrong.
        let cap = 64 + usize::from(ct.first().copied().unwrap_or(0)) * 4;
        let (small, _) = stream(&related, &limits, body, piece, cap as u64);
        for (i, p) in &small {
            let q = whole
                .get(*i)
                .expect("a part the slice parser does not give");
            assert_eq!(
                (&p.headers, p.body.as_slice()),
                (&q.headers, q.body),
                "part {i}"
            );
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

/// Streams `body` through a [`PartSplitter`] in pieces of `piece` bytes
/// under a budget of `cap` bytes, skipping a part that does not fit. Gives
/// the parts with their index in the body, and whether it finished cleanly.
fn stream(
    related: &MultipartRelated,
    limits: &MultipartLimits,
    body: &[u8],
    piece: usize,
    cap: u64,
) -> (Vec<(usize, OwnedPart)>, bool) {
    let budget = MemoryBudget::new(cap, cap);
    let mut reservation = budget.transfer();
    let mut splitter = PartSplitter::new(related, limits);
    let mut out = Vec::new();
    for chunk in body.chunks(piece) {
        if splitter.push(chunk, &mut reservation).is_err() {
            if splitter.skip_part(&mut reservation).is_err() {
                return (out, false);
            }
            if splitter.push(chunk, &mut reservation).is_err() {
                return (out, false);
            }
        }
        assert!(reservation.held() <= cap);
        loop {
            let before = splitter.parts_seen();
            match splitter.next_part(&mut reservation) {
                Ok(Some(p)) => {
                    assert!(
                        p.body.capacity() as u64 <= p.reserved,
                        "part bytes not reserved"
                    );
                    reservation.shrink(p.reserved);
                    out.push((before, p));
                }
                Ok(None) => break,
                Err(_) => return (out, false),
            }
        }
    }
    (out, splitter.finish().is_ok())
}
