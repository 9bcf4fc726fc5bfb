//! QIDO-RS query-string parsing (PS3.18 §8.3.4, §10.6): the query string
//! decoded as the web layer's `Query<Vec<(String, String)>>` extractor does
//! (`application/x-www-form-urlencoded`), then `qido_to_query`
//! (`crates/dicomweb/src/qido.rs`) at each level, then the matcher against
//! index rows.
//!
//! Input: byte 0 bits 0..1 = level, bit 2 = a Study UID in the path, bit 3 =
//! a Series UID too; byte 1 = length of a trailing string used as every
//! stored value of a second row; the query string in between.
#![no_main]

use bastion_dicomweb::{qido_to_query, PathUids, QidoLevel};
use bastion_model::Uid;
use libfuzzer_sys::fuzz_target;

#[path = "common/rows.rs"]
mod rows;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (flags, tail_len) = (data[0], usize::from(data[1]));
    let body = &data[2..];
    let (query_string, stored) = body.split_at(body.len().saturating_sub(tail_len));
    let level = match flags & 3 {
        0 => QidoLevel::Study,
        1 => QidoLevel::Series,
        _ => QidoLevel::Instance,
    };
    let uid = |s: &str| Uid::parse(s).ok();
    let path = PathUids {
        study: (flags & 4 != 0).then(|| uid("1.2.3.4")).flatten(),
        series: (flags & 8 != 0).then(|| uid("1.2.3.4.5")).flatten(),
    };
    let params: Vec<(String, String)> = form_urlencoded::parse(query_string)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let Ok((query, opts)) = qido_to_query(level, &path, &params) else {
        return;
    };
    let _ = (query.level(), query.is_universal(), opts.limit, opts.offset);
    let _ = query.row_matches(&rows::realistic());
    let _ = query.row_matches(&rows::from_input(&String::from_utf8_lossy(stored)));
});
