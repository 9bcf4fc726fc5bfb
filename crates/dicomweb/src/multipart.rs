//! `multipart/related` payloads (RFC 2387, framed as RFC 2046 §5.1.1) as
//! PS3.18 §8.6.1.2 uses them: WADO-RS responses ([`MultipartWriter`]) and
//! STOW-RS request bodies ([`parse_multipart_related`]).
//!
//! ## Why a home-made boundary scanner
//!
//! `multer`, the maintained multipart parser of the Rust HTTP ecosystem, is
//! built for `multipart/form-data`: its `parse_boundary` refuses any other
//! type and it consumes an async `Stream` of `Bytes`, so using it here would
//! bring an async runtime into a crate of pure functions and copy each part
//! into its own buffers. The framing itself is small: find the delimiter
//! `CRLF--boundary`, read the part headers up to the empty line, check what
//! follows each delimiter. [`Parts`] does that over the body bytes with
//! `memchr`'s substring search, lending each part's body as a slice (no
//! copy), one part at a time, so a caller can ingest part *n* before part
//! *n + 1* is even looked at. Content-Type parsing (quoted and token
//! parameter values) is the `mime` crate's.
//!
//! ## What the parser accepts (RFC 2046 §5.1.1)
//!
//! - a preamble before the first `--boundary` (ignored), and an epilogue
//!   after the closing `--boundary--` (ignored);
//! - transport padding (spaces, tabs) after a boundary, then CRLF;
//! - headers `Name: value` up to an empty line, folded lines joined;
//! - line ends are CRLF; a bare LF before a boundary is part of the body.
//!
//! Refused ([`DicomWebError::BadMultipart`]): no opening boundary, a body
//! that ends before the closing delimiter, a boundary followed by anything
//! but padding/CRLF or `--`, headers that are not UTF-8 or lack a colon, no
//! part at all. Limits ([`MultipartLimits`]) on the number of parts, the
//! size of one part and of its headers give
//! [`DicomWebError::MultipartTooLarge`].

use memchr::memmem;
use rand::RngCore;

use crate::DicomWebError;

/// Builds a `multipart/related` body (PS3.18 §8.6.1.2), one part at a time.
///
/// The boundary is 128 random bits in hex, fresh for each writer (so a
/// response's content cannot be crafted to contain it, and one response
/// cannot predict another's). Either push whole parts with
/// [`add_part`](Self::add_part) and take the body with
/// [`finish`](Self::finish), or stream: send
/// [`part_header`](Self::part_header) then the part's bytes for each part,
/// then [`closing`](Self::closing). Don't mix the two on one writer.
///
/// ```
/// use bastion_dicomweb::{parse_multipart_related, MultipartLimits, MultipartWriter};
///
/// let mut w = MultipartWriter::new();
/// w.add_part("application/dicom", b"first");
/// w.add_part("application/dicom", b"second");
/// let content_type = w.content_type();
/// let body = w.finish();
/// assert!(body.starts_with(b"--"));
/// let parts = parse_multipart_related(&content_type, &body, &MultipartLimits::default())?;
/// assert_eq!(parts[1].body, b"second");
/// # Ok::<(), bastion_dicomweb::DicomWebError>(())
/// ```
#[derive(Debug)]
pub struct MultipartWriter {
    boundary: String,
    root_type: String,
    first: bool,
    buf: Vec<u8>,
}

impl Default for MultipartWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl MultipartWriter {
    /// A writer for `type="application/dicom"` (WADO-RS instances, PS3.18
    /// §8.7.3.1).
    pub fn new() -> Self {
        Self::with_type("application/dicom")
    }

    /// A writer whose `type` parameter (RFC 2387 §3.1, the root part's media
    /// type) is `root_type`, e.g. `application/octet-stream` for frames and
    /// bulk data (PS3.18 §8.7.3.3). CR, LF and `"` are removed from it.
    pub fn with_type(root_type: &str) -> Self {
        let mut random = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut random);
        MultipartWriter {
            boundary: hex::encode(random),
            root_type: header_safe(root_type).replace('"', ""),
            first: true,
            buf: Vec::new(),
        }
    }

    /// The boundary (32 hex digits).
    pub fn boundary(&self) -> &str {
        &self.boundary
    }

    /// The Content-Type of the whole body:
    /// `multipart/related; type="application/dicom"; boundary=…`.
    pub fn content_type(&self) -> String {
        format!(
            "multipart/related; type=\"{}\"; boundary={}",
            self.root_type, self.boundary
        )
    }

    /// Streaming: the bytes that open the next part (delimiter, then
    /// `Content-Type: {content_type}` and the empty line); the part's body
    /// follows. The body starts with `--boundary` (no preamble: some viewers
    /// require it). CR and LF are removed from `content_type`.
    pub fn part_header(&mut self, content_type: &str) -> Vec<u8> {
        let lead = if self.first { "" } else { "\r\n" };
        self.first = false;
        format!(
            "{lead}--{}\r\nContent-Type: {}\r\n\r\n",
            self.boundary,
            header_safe(content_type)
        )
        .into_bytes()
    }

    /// Streaming: the closing delimiter, sent after the last part's body.
    pub fn closing(&mut self) -> Vec<u8> {
        let lead = if self.first { "" } else { "\r\n" };
        self.first = false;
        format!("{lead}--{}--\r\n", self.boundary).into_bytes()
    }

    /// Appends one part to the buffered body.
    pub fn add_part(&mut self, content_type: &str, body: &[u8]) {
        let head = self.part_header(content_type);
        self.buf.extend_from_slice(&head);
        self.buf.extend_from_slice(body);
    }

    /// The buffered body with its closing delimiter.
    pub fn finish(mut self) -> Vec<u8> {
        let close = self.closing();
        self.buf.extend_from_slice(&close);
        self.buf
    }
}

/// Limits applied while parsing a `multipart/related` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultipartLimits {
    /// Most parts accepted.
    pub max_parts: usize,
    /// Largest part body, in bytes.
    pub max_part_bytes: usize,
    /// Largest header block of one part, in bytes.
    pub max_header_bytes: usize,
}

impl Default for MultipartLimits {
    /// 10,000 parts, 1 GiB per part (the default `max_dataset_bytes`),
    /// 16 KiB of headers per part.
    fn default() -> Self {
        MultipartLimits {
            max_parts: 10_000,
            max_part_bytes: 1 << 30,
            max_header_bytes: 16 << 10,
        }
    }
}

/// The parameters of a `multipart/related` Content-Type (RFC 2387 §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultipartRelated {
    /// The boundary, unquoted.
    pub boundary: String,
    /// The `type` parameter (the root part's media type), lower-cased,
    /// e.g. `application/dicom`; `None` when absent.
    pub root_type: Option<String>,
}

impl MultipartRelated {
    /// Parses a request's Content-Type: `multipart/related` with a
    /// `boundary` parameter, quoted or a token (RFC 2046 §5.1.1: 1–70
    /// characters).
    ///
    /// # Errors
    /// [`DicomWebError::UnsupportedMediaType`] when it is not
    /// `multipart/related`; [`DicomWebError::BadMultipart`] when it does not
    /// parse or the boundary is missing or invalid.
    pub fn from_content_type(content_type: &str) -> Result<Self, DicomWebError> {
        // `type=application/dicom` unquoted is not a valid token (`/` is a
        // tspecial, RFC 2045 §5.1) and `mime` refuses it, but clients send
        // it: retry with such a value quoted.
        let m: mime::Mime = content_type
            .parse()
            .or_else(|_| quote_slashed_values(content_type).parse())
            .map_err(|_| DicomWebError::BadMultipart("Content-Type does not parse".into()))?;
        if m.type_() != mime::MULTIPART || m.subtype().as_str() != "related" {
            return Err(DicomWebError::UnsupportedMediaType(
                "a multipart/related body is required".into(),
            ));
        }
        let boundary = m
            .get_param(mime::BOUNDARY)
            .map(|b| b.as_str().to_owned())
            .ok_or_else(|| DicomWebError::BadMultipart("no boundary parameter".into()))?;
        let valid = (1..=70).contains(&boundary.len())
            && !boundary.ends_with(' ')
            && boundary
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b" '()+_,-./:=?".contains(&b));
        if !valid {
            return Err(DicomWebError::BadMultipart(
                "boundary must be 1-70 characters of RFC 2046 bchars".into(),
            ));
        }
        let root_type = m
            .get_param("type")
            .map(|t| t.as_str().trim().to_ascii_lowercase());
        Ok(MultipartRelated {
            boundary,
            root_type,
        })
    }

    /// The parts of `body`, parsed one at a time as the iterator advances.
    pub fn parts<'a>(&self, body: &'a [u8], limits: &MultipartLimits) -> Parts<'a> {
        Parts {
            body,
            dash_boundary: format!("--{}", self.boundary).into_bytes(),
            delimiter: format!("\r\n--{}", self.boundary).into_bytes(),
            limits: *limits,
            pos: None,
            count: 0,
            done: false,
        }
    }
}

/// One body part: its headers and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part<'a> {
    /// Header fields in order, names as sent, values trimmed.
    pub headers: Vec<(String, String)>,
    /// The body, borrowed from the request body.
    pub body: &'a [u8],
}

impl Part<'_> {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The part's Content-Type, if given (RFC 2046 §5.1: default
    /// `text/plain`; STOW-RS parts must give one, PS3.18 §10.5.1.2).
    pub fn content_type(&self) -> Option<&str> {
        self.header("content-type")
    }
}

/// Parses a `multipart/related` body (STOW-RS, PS3.18 §10.5.1.2) given the
/// request's Content-Type; see the module docs for what is accepted. The
/// `type` parameter is not checked here: [`MultipartRelated::root_type`]
/// tells the caller.
///
/// # Errors
/// [`DicomWebError::UnsupportedMediaType`], [`DicomWebError::BadMultipart`],
/// [`DicomWebError::MultipartTooLarge`].
pub fn parse_multipart_related<'a>(
    content_type: &str,
    body: &'a [u8],
    limits: &MultipartLimits,
) -> Result<Vec<Part<'a>>, DicomWebError> {
    let related = MultipartRelated::from_content_type(content_type)?;
    let parts = related.parts(body, limits).collect::<Result<Vec<_>, _>>()?;
    if parts.is_empty() {
        return Err(DicomWebError::BadMultipart("no body part".into()));
    }
    Ok(parts)
}

/// Iterator over the parts of a body ([`MultipartRelated::parts`]); after an
/// error it ends.
#[derive(Debug)]
pub struct Parts<'a> {
    body: &'a [u8],
    dash_boundary: Vec<u8>,
    delimiter: Vec<u8>,
    limits: MultipartLimits,
    /// Just after the last boundary read; `None` before the first.
    pos: Option<usize>,
    count: usize,
    done: bool,
}

impl<'a> Iterator for Parts<'a> {
    type Item = Result<Part<'a>, DicomWebError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.step() {
            Ok(Some(part)) => Some(Ok(part)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

impl<'a> Parts<'a> {
    fn step(&mut self) -> Result<Option<Part<'a>>, DicomWebError> {
        let bad = |m: &str| DicomWebError::BadMultipart(m.into());
        let body = self.body;
        let after_boundary = match self.pos {
            Some(p) => p,
            None => {
                // Opening boundary: at the very start, or after a preamble.
                let start = if body.starts_with(&self.dash_boundary) {
                    0
                } else {
                    memmem::find(body, &self.delimiter)
                        .map(|p| p + 2)
                        .ok_or_else(|| bad("no opening boundary"))?
                };
                start + self.dash_boundary.len()
            }
        };
        // What follows a boundary: `--` (close) or padding + CRLF.
        let rest = &body[after_boundary..];
        if rest.starts_with(b"--") {
            return Ok(None);
        }
        let pad = rest
            .iter()
            .take_while(|b| **b == b' ' || **b == b'\t')
            .count();
        if !rest[pad..].starts_with(b"\r\n") {
            return Err(bad("boundary not followed by CRLF or --"));
        }
        let part_start = after_boundary + pad + 2;
        self.count += 1;
        if self.count > self.limits.max_parts {
            return Err(DicomWebError::MultipartTooLarge {
                what: "parts",
                limit: self.limits.max_parts,
            });
        }
        // Headers: up to the empty line (none when the part starts with it).
        let part = &body[part_start..];
        let (headers, body_start) = if part.starts_with(b"\r\n") {
            (Vec::new(), part_start + 2)
        } else {
            let window = &part[..part.len().min(self.limits.max_header_bytes + 4)];
            let end = memmem::find(window, b"\r\n\r\n").ok_or_else(|| {
                if part.len() > self.limits.max_header_bytes + 4 {
                    DicomWebError::MultipartTooLarge {
                        what: "header bytes per part",
                        limit: self.limits.max_header_bytes,
                    }
                } else {
                    bad("part headers not terminated by an empty line")
                }
            })?;
            (parse_headers(&part[..end])?, part_start + end + 4)
        };
        // Body: up to the next delimiter.
        let found = memmem::find(&body[body_start..], &self.delimiter)
            .ok_or_else(|| bad("body ends before the closing boundary"))?;
        if found > self.limits.max_part_bytes {
            return Err(DicomWebError::MultipartTooLarge {
                what: "bytes per part",
                limit: self.limits.max_part_bytes,
            });
        }
        self.pos = Some(body_start + found + self.delimiter.len());
        Ok(Some(Part {
            headers,
            body: &body[body_start..body_start + found],
        }))
    }
}

/// `Name: value` lines (RFC 5322 §2.2; folded lines joined).
fn parse_headers(block: &[u8]) -> Result<Vec<(String, String)>, DicomWebError> {
    let text = std::str::from_utf8(block)
        .map_err(|_| DicomWebError::BadMultipart("part headers are not UTF-8".into()))?;
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in text.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            match headers.last_mut() {
                Some((_, v)) => {
                    v.push(' ');
                    v.push_str(line.trim());
                    continue;
                }
                None => {
                    return Err(DicomWebError::BadMultipart(
                        "continuation line before any header".into(),
                    ))
                }
            }
        }
        let (name, value) = line
            .split_once(':')
            .filter(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| DicomWebError::BadMultipart("malformed part header".into()))?;
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
    Ok(headers)
}

/// `a/b; type=x/y` → `a/b; type="x/y"`: parameter values holding a `/`
/// quoted when they are not already.
fn quote_slashed_values(content_type: &str) -> String {
    let mut pieces = content_type.split(';');
    let mut out = pieces.next().unwrap_or_default().to_owned();
    for piece in pieces {
        out.push(';');
        match piece.split_once('=') {
            Some((name, value)) if value.contains('/') && !value.trim_start().starts_with('"') => {
                out.push_str(&format!("{name}=\"{}\"", value.trim()));
            }
            _ => out.push_str(piece),
        }
    }
    out
}

/// Text safe inside one header line.
fn header_safe(s: &str) -> String {
    s.chars().filter(|c| *c != '\r' && *c != '\n').collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: MultipartLimits = MultipartLimits {
        max_parts: 3,
        max_part_bytes: 16,
        max_header_bytes: 64,
    };

    #[test]
    fn boundaries_are_random_and_long() {
        let (a, b) = (MultipartWriter::new(), MultipartWriter::new());
        assert_ne!(a.boundary(), b.boundary());
        assert_eq!(a.boundary().len(), 32);
        assert_eq!(
            a.content_type(),
            format!(
                "multipart/related; type=\"application/dicom\"; boundary={}",
                a.boundary()
            )
        );
    }

    #[test]
    fn preamble_padding_folding_epilogue() {
        let body = b"preamble\r\n--b1  \r\nContent-Type: application/dicom\r\nX-A: 1\r\n  2\r\n\r\nAB\r\n--b1\r\n\r\n\r\n--b1--\r\nepilogue";
        let parts = parse_multipart_related("multipart/related; boundary=b1", body, &LIMITS)
            .expect("valid");
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].content_type(), Some("application/dicom"));
        assert_eq!(parts[0].header("x-a"), Some("1 2"));
        assert_eq!(parts[0].body, b"AB");
        assert!(parts[1].headers.is_empty());
        assert_eq!(parts[1].body, b"");
    }

    #[test]
    fn refusals() {
        let ct = "multipart/related; boundary=b1";
        let err = |body: &[u8]| parse_multipart_related(ct, body, &LIMITS).err();
        assert!(matches!(
            err(b"--b1\r\n\r\nAB"),
            Some(DicomWebError::BadMultipart(_))
        ));
        assert!(matches!(
            err(b"--b1\r\n\r\nAB\r\n--b1"),
            Some(DicomWebError::BadMultipart(_))
        ));
        assert!(matches!(
            err(b"--b1x\r\n\r\nAB\r\n--b1--"),
            Some(DicomWebError::BadMultipart(_))
        ));
        assert!(matches!(
            err(b"--b1--"),
            Some(DicomWebError::BadMultipart(_))
        ));
        assert!(matches!(
            err(b"--b1\r\nno colon\r\n\r\nAB\r\n--b1--"),
            Some(DicomWebError::BadMultipart(_))
        ));
        assert!(matches!(
            err(b"--b1\r\n\r\n0123456789abcdefg\r\n--b1--"),
            Some(DicomWebError::MultipartTooLarge { .. })
        ));
        assert!(matches!(
            err(b"--b1\r\n\r\n\r\n--b1\r\n\r\n\r\n--b1\r\n\r\n\r\n--b1\r\n\r\n\r\n--b1--"),
            Some(DicomWebError::MultipartTooLarge { what: "parts", .. })
        ));
        let long_header = format!("--b1\r\nX: {}\r\n\r\nA\r\n--b1--", "x".repeat(100));
        assert!(matches!(
            err(long_header.as_bytes()),
            Some(DicomWebError::MultipartTooLarge { .. })
        ));
        assert!(matches!(
            parse_multipart_related("multipart/form-data; boundary=b1", b"", &LIMITS),
            Err(DicomWebError::UnsupportedMediaType(_))
        ));
        assert!(matches!(
            parse_multipart_related("multipart/related", b"", &LIMITS),
            Err(DicomWebError::BadMultipart(_))
        ));
    }

    #[test]
    fn content_type_parameters() {
        let r = MultipartRelated::from_content_type(
            "Multipart/Related; type=\"application/dicom\"; boundary=\"a b:c\"",
        )
        .expect("valid");
        assert_eq!(r.boundary, "a b:c");
        assert_eq!(r.root_type.as_deref(), Some("application/dicom"));
        let r = MultipartRelated::from_content_type(
            "multipart/related;type=application/dicom;boundary=xyz",
        )
        .expect("valid");
        assert_eq!(r.boundary, "xyz");
        assert_eq!(r.root_type.as_deref(), Some("application/dicom"));
    }
}
