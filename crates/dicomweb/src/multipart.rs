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

use bastion_archive::budget::{BudgetError, Reservation};
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

/// Longest boundary accepted in a request (RFC 2046 §5.1.1 says 70; Orthanc
/// 1.10's DICOMweb client sends 73).
pub const MAX_BOUNDARY_LEN: usize = 200;

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
    /// `boundary` parameter, quoted or a token, of RFC 2046 §5.1.1
    /// characters. RFC 2046 allows 1–70 of them; up to
    /// [`MAX_BOUNDARY_LEN`] are accepted, because real clients send more
    /// (Orthanc's DICOMweb plugin: 73).
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
        let valid = (1..=MAX_BOUNDARY_LEN).contains(&boundary.len())
            && !boundary.ends_with(' ')
            && boundary
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b" '()+_,-./:=?".contains(&b));
        if !valid {
            return Err(DicomWebError::BadMultipart(
                "boundary must be 1-200 characters of RFC 2046 bchars".into(),
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

/// The first of `headers` called `name` (case-insensitive).
fn find_header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

impl Part<'_> {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
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

/// One part taken out of a streamed body by [`PartSplitter`]: it owns its
/// bytes (the splitter's buffer, handed over without a copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedPart {
    /// Header fields in order, names as sent, values trimmed.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// Bytes of the caller's [`Reservation`] that cover `body`'s allocation:
    /// give them back (`Reservation::shrink`) once the part is dropped.
    pub reserved: u64,
}

impl OwnedPart {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The part's Content-Type, if given (see [`Part::content_type`]).
    pub fn content_type(&self) -> Option<&str> {
        self.header("content-type")
    }
}

/// Where a [`PartSplitter`] is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    /// Before the opening boundary.
    Preamble,
    /// The buffer starts with `--boundary`.
    Parts,
    /// Dropping the bytes of a part the caller gave up on, up to the next
    /// delimiter (only the last `delimiter.len() - 1` bytes are kept).
    Skipping,
    /// Handing the body of a part the caller spills to disk out in pieces
    /// ([`PartSplitter::drain_spill`]), up to the next delimiter (only the
    /// last `delimiter.len() - 1` bytes are kept between pieces).
    Spilling,
    /// After the closing `--boundary--`: the epilogue is dropped.
    Closed,
}

/// A piece of the body of a part being spilled ([`PartSplitter::drain_spill`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpillChunk {
    /// More of the body; the part goes on.
    More(Vec<u8>),
    /// The end of the body (the delimiter was found): the part is complete.
    Last(Vec<u8>),
}

/// Most bytes of preamble before the opening boundary, and of transport
/// padding after a boundary, a streamed body may carry.
const MAX_PREAMBLE: usize = 64 << 10;

/// Splits a `multipart/related` body (STOW-RS, PS3.18 §10.5.1.2) that
/// arrives in pieces into its parts, so that a request of any size is held
/// in memory one part at a time, each byte buffered under the caller's
/// [`Reservation`] from the archive's memory budget.
///
/// The framing is that of [`MultipartRelated::parts`] (module docs), and
/// for the same bytes the parts are the same, however the bytes are cut
/// (the `multipart` fuzz target checks that), except that a streamed body
/// may carry at most 64 KiB of preamble and of padding after a boundary.
///
/// Use: [`push`](Self::push) each piece, then take every complete part with
/// [`next_part`](Self::next_part) until it gives `None`; at the end of the
/// body, [`finish`](Self::finish). When a part cannot be buffered (the
/// budget is full), [`skip_part`](Self::skip_part) drops it and the parts
/// after it still come out.
#[derive(Debug)]
pub struct PartSplitter {
    dash_boundary: Vec<u8>,
    delimiter: Vec<u8>,
    limits: MultipartLimits,
    /// Unconsumed bytes: from the opening boundary of the current part (or
    /// the preamble, or the kept tail while skipping).
    buf: Vec<u8>,
    /// Bytes of the reservation that cover `buf`'s allocation.
    reserved: u64,
    /// Where the next delimiter search in `buf` starts (what is before was
    /// searched already, minus a delimiter's length).
    searched: usize,
    state: Split,
    count: usize,
}

impl PartSplitter {
    /// A splitter for a body with the boundary of `related`, enforcing
    /// `limits` (parts counted over the whole body).
    pub fn new(related: &MultipartRelated, limits: &MultipartLimits) -> Self {
        PartSplitter {
            dash_boundary: format!("--{}", related.boundary).into_bytes(),
            delimiter: format!("\r\n--{}", related.boundary).into_bytes(),
            limits: *limits,
            buf: Vec::new(),
            reserved: 0,
            searched: 0,
            state: Split::Preamble,
            count: 0,
        }
    }

    /// Bytes buffered and not yet handed out as a part.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Parts handed out or skipped so far.
    pub fn parts_seen(&self) -> usize {
        self.count
    }

    /// The body bytes of the part being received, as far as they are
    /// buffered (after its headers); `None` between parts or before its
    /// headers are complete. For naming a part that is skipped.
    pub fn current_body(&self) -> Option<&[u8]> {
        if self.state != Split::Parts {
            return None;
        }
        let end = memmem::find(&self.buf, b"\r\n\r\n")?;
        self.buf.get(end + 4..)
    }

    /// Whether the closing boundary has been read.
    pub fn is_closed(&self) -> bool {
        self.state == Split::Closed
    }

    /// Appends the next piece of the body, growing `reservation` first by
    /// whatever the buffer must gain. While skipping, only a delimiter's
    /// length of the piece is kept; after the closing boundary, nothing.
    ///
    /// # Errors
    /// The [`BudgetError`] of the reservation; nothing is appended then, and
    /// the caller may [`skip_part`](Self::skip_part) and push again.
    pub fn push(&mut self, bytes: &[u8], reservation: &mut Reservation) -> Result<(), BudgetError> {
        match self.state {
            Split::Closed => Ok(()),
            Split::Skipping => {
                // In slices, so that the buffer stays small whatever the
                // size of a piece.
                let mut rest = bytes;
                while !rest.is_empty() {
                    let take = rest.len().min(64 << 10);
                    let (slice, after) = rest.split_at(take);
                    rest = after;
                    self.append(slice, reservation)?;
                    match memmem::find(&self.buf[self.searched..], &self.delimiter) {
                        Some(p) => {
                            // The skipped part ends here: the buffer starts
                            // again at `--boundary`.
                            let at = self.searched + p + 2;
                            self.buf.drain(..at);
                            self.searched = 0;
                            self.state = Split::Parts;
                            return self.push(rest, reservation);
                        }
                        None => {
                            let keep = self.delimiter.len() - 1;
                            let cut = self.buf.len().saturating_sub(keep);
                            self.buf.drain(..cut);
                            self.searched = 0;
                        }
                    }
                }
                Ok(())
            }
            Split::Preamble | Split::Parts | Split::Spilling => self.append(bytes, reservation),
        }
    }

    /// Turns the part being buffered (whose next piece the caller could not
    /// push: it is larger than the memory share) into a part spilled to
    /// disk: returns its headers and the body bytes buffered so far, and
    /// from then on [`drain_spill`](Self::drain_spill) hands out the rest of
    /// its body as it is pushed, holding only a delimiter's length of it.
    /// `None` (nothing changed) when the part's headers are not complete
    /// yet or no part is being received: skip it instead.
    ///
    /// # Errors
    /// [`DicomWebError::BadMultipart`] for malformed headers,
    /// [`DicomWebError::MultipartTooLarge`] when the part is one too many.
    #[allow(clippy::type_complexity)]
    pub fn spill_part(
        &mut self,
        reservation: &mut Reservation,
    ) -> Result<Option<(Vec<(String, String)>, Vec<u8>)>, DicomWebError> {
        if self.state != Split::Parts {
            return Ok(None);
        }
        let dash = self.dash_boundary.len();
        let Some(rest) = self.buf.get(dash..) else {
            return Ok(None);
        };
        let pad = rest
            .iter()
            .take_while(|b| **b == b' ' || **b == b'\t')
            .count();
        if !rest[pad..].starts_with(b"\r\n") {
            return Ok(None);
        }
        let part_start = dash + pad + 2;
        let part = &self.buf[part_start..];
        let (headers, body_start) = if part.starts_with(b"\r\n") {
            (Vec::new(), part_start + 2)
        } else {
            let window = &part[..part.len().min(self.limits.max_header_bytes + 4)];
            match memmem::find(window, b"\r\n\r\n") {
                Some(end) => (parse_headers(&part[..end])?, part_start + end + 4),
                None => return Ok(None),
            }
        };
        self.count_part()?;
        let keep = self.delimiter.len() - 1;
        let cut = self.buf.len().saturating_sub(keep).max(body_start);
        let body = self.buf[body_start..cut].to_vec();
        let tail = self.buf[cut..].to_vec();
        reservation.shrink(self.reserved);
        self.reserved = 0;
        self.buf = Vec::new();
        self.searched = 0;
        self.state = Split::Spilling;
        self.append(&tail, reservation)?;
        Ok(Some((headers, body)))
    }

    /// The body bytes of the spilled part pushed since the last call (see
    /// [`spill_part`](Self::spill_part)): [`SpillChunk::More`] while the
    /// part goes on, [`SpillChunk::Last`] once its delimiter was found
    /// (the splitter then goes on with the next part); `None` when there is
    /// nothing to hand out or no part is being spilled.
    pub fn drain_spill(&mut self) -> Option<SpillChunk> {
        if self.state != Split::Spilling {
            return None;
        }
        if let Some(p) = memmem::find(&self.buf[self.searched..], &self.delimiter) {
            let at = self.searched + p;
            let chunk = self.buf[..at].to_vec();
            // The buffer starts again at `--boundary`.
            self.buf.drain(..at + 2);
            self.searched = 0;
            self.state = Split::Parts;
            return Some(SpillChunk::Last(chunk));
        }
        let keep = self.delimiter.len() - 1;
        let cut = self.buf.len().saturating_sub(keep);
        if cut == 0 {
            return None;
        }
        let chunk: Vec<u8> = self.buf.drain(..cut).collect();
        self.searched = 0;
        Some(SpillChunk::More(chunk))
    }

    /// Gives up on the part being spilled (the spill failed): the rest of
    /// its body is dropped as with [`skip_part`](Self::skip_part). Only
    /// while spilling; elsewhere it does nothing.
    pub fn abandon_spill(&mut self) {
        if self.state == Split::Spilling {
            self.state = Split::Skipping;
        }
    }

    fn append(&mut self, bytes: &[u8], reservation: &mut Reservation) -> Result<(), BudgetError> {
        let before = self.buf.capacity() as u64;
        reservation.extend_tight(&mut self.buf, bytes)?;
        self.reserved += (self.buf.capacity() as u64).saturating_sub(before);
        Ok(())
    }

    /// Gives up on the part being buffered (the caller could not push its
    /// next piece): its bytes are dropped, and so are those still to come up
    /// to the next delimiter. The part counts towards `max_parts`. Only
    /// between boundaries: elsewhere (preamble, closed) it does nothing.
    ///
    /// # Errors
    /// [`DicomWebError::MultipartTooLarge`] when the skipped part is one
    /// part too many.
    pub fn skip_part(&mut self, reservation: &mut Reservation) -> Result<(), DicomWebError> {
        if self.state != Split::Parts {
            return Ok(());
        }
        self.count_part()?;
        // Keep what may be the start of the next delimiter, drop the rest
        // and its allocation.
        let keep = self.delimiter.len() - 1;
        let tail = self.buf[self.buf.len().saturating_sub(keep)..].to_vec();
        reservation.shrink(self.reserved);
        self.reserved = 0;
        self.buf = Vec::new();
        self.searched = 0;
        self.state = Split::Skipping;
        self.append(&tail, reservation)?;
        Ok(())
    }

    fn count_part(&mut self) -> Result<(), DicomWebError> {
        self.count += 1;
        if self.count > self.limits.max_parts {
            return Err(DicomWebError::MultipartTooLarge {
                what: "parts",
                limit: self.limits.max_parts,
            });
        }
        Ok(())
    }

    /// The next complete part, if the bytes pushed so far hold one. Its
    /// bytes leave the splitter with the share of the reservation that
    /// covers them ([`OwnedPart::reserved`]).
    ///
    /// # Errors
    /// [`DicomWebError::BadMultipart`] for broken framing,
    /// [`DicomWebError::MultipartTooLarge`] as soon as a part, its headers,
    /// the preamble or the number of parts is over its limit, and
    /// [`DicomWebError::Budget`] when the bytes after the part cannot be
    /// kept within the reservation. The splitter is of no further use then.
    pub fn next_part(
        &mut self,
        reservation: &mut Reservation,
    ) -> Result<Option<OwnedPart>, DicomWebError> {
        let bad = |m: &str| DicomWebError::BadMultipart(m.into());
        let dash = self.dash_boundary.len();
        if self.state == Split::Preamble {
            if self.buf.len() < dash && self.dash_boundary.starts_with(&self.buf) {
                return Ok(None);
            }
            if self.buf.starts_with(&self.dash_boundary) {
                self.state = Split::Parts;
            } else if let Some(p) = memmem::find(&self.buf[self.searched..], &self.delimiter) {
                self.buf.drain(..self.searched + p + 2);
                self.searched = 0;
                self.state = Split::Parts;
            } else if self.buf.len() > MAX_PREAMBLE {
                return Err(bad("no opening boundary"));
            } else {
                self.searched = self.buf.len().saturating_sub(self.delimiter.len() - 1);
                return Ok(None);
            }
        }
        if self.state != Split::Parts {
            return Ok(None);
        }
        // What follows the boundary: `--` (close) or padding + CRLF.
        let rest = &self.buf[dash..];
        if rest.starts_with(b"--") {
            self.state = Split::Closed;
            reservation.shrink(self.reserved);
            self.reserved = 0;
            self.buf = Vec::new();
            return Ok(None);
        }
        let pad = rest
            .iter()
            .take_while(|b| **b == b' ' || **b == b'\t')
            .count();
        if pad > MAX_PREAMBLE {
            return Err(bad("boundary not followed by CRLF or --"));
        }
        let after_pad = &rest[pad..];
        if after_pad.len() < 2 {
            // `-` alone may still become `--`.
            if after_pad.is_empty() || after_pad == b"\r" || (pad == 0 && after_pad == b"-") {
                return Ok(None);
            }
            return Err(bad("boundary not followed by CRLF or --"));
        }
        if !after_pad.starts_with(b"\r\n") {
            return Err(bad("boundary not followed by CRLF or --"));
        }
        let part_start = dash + pad + 2;
        // Headers: up to the empty line (none when the part starts with it).
        let part = &self.buf[part_start..];
        let header_window = self.limits.max_header_bytes + 4;
        let (headers, body_start) = if part.starts_with(b"\r\n") {
            (Vec::new(), part_start + 2)
        } else if part.len() < 2 && b"\r\n".starts_with(part) {
            return Ok(None);
        } else {
            let window = &part[..part.len().min(header_window)];
            match memmem::find(window, b"\r\n\r\n") {
                Some(end) => (parse_headers(&part[..end])?, part_start + end + 4),
                None if part.len() > header_window => {
                    return Err(DicomWebError::MultipartTooLarge {
                        what: "header bytes per part",
                        limit: self.limits.max_header_bytes,
                    })
                }
                None => return Ok(None),
            }
        };
        // Body: up to the next delimiter.
        let from = self.searched.max(body_start);
        let Some(found) = memmem::find(&self.buf[from..], &self.delimiter).map(|p| from + p) else {
            if self.buf.len() - body_start > self.limits.max_part_bytes + self.delimiter.len() {
                return Err(DicomWebError::MultipartTooLarge {
                    what: "bytes per part",
                    limit: self.limits.max_part_bytes,
                });
            }
            self.searched = self
                .buf
                .len()
                .saturating_sub(self.delimiter.len() - 1)
                .max(body_start);
            return Ok(None);
        };
        if found - body_start > self.limits.max_part_bytes {
            return Err(DicomWebError::MultipartTooLarge {
                what: "bytes per part",
                limit: self.limits.max_part_bytes,
            });
        }
        self.count_part()?;
        // The bytes after the part start the next buffer (from
        // `--boundary`); the current buffer becomes the part's body.
        let mut next = Vec::new();
        let before = reservation.held();
        reservation.extend_tight(&mut next, &self.buf[found + 2..])?;
        let next_reserved = reservation.held() - before;
        let mut body = std::mem::replace(&mut self.buf, next);
        let reserved = std::mem::replace(&mut self.reserved, next_reserved);
        self.searched = 0;
        body.truncate(found);
        body.drain(..body_start);
        Ok(Some(OwnedPart {
            headers,
            body,
            reserved,
        }))
    }

    /// The end of the body: checks that it was closed.
    ///
    /// # Errors
    /// [`DicomWebError::BadMultipart`] when the body ended before its
    /// closing boundary (or before any boundary).
    pub fn finish(&self) -> Result<(), DicomWebError> {
        match self.state {
            Split::Closed => Ok(()),
            Split::Preamble => Err(DicomWebError::BadMultipart("no opening boundary".into())),
            Split::Parts | Split::Skipping | Split::Spilling => Err(DicomWebError::BadMultipart(
                "body ends before the closing boundary".into(),
            )),
        }
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
    fn long_boundaries_of_real_clients_are_accepted() {
        // Orthanc 1.10's DICOMweb client: two UUIDs, 73 characters.
        let b = "833c12ac-1095-4581-bfe2-4acbe01446a6-833c12ac-1095-4581-bfe2-4acbe01446a6";
        let ct = format!("multipart/related; type=\"application/dicom\"; boundary={b}");
        assert_eq!(
            MultipartRelated::from_content_type(&ct)
                .expect("accepted")
                .boundary,
            b
        );
        let too_long = "x".repeat(MAX_BOUNDARY_LEN + 1);
        let ct = format!("multipart/related; boundary={too_long}");
        assert!(matches!(
            MultipartRelated::from_content_type(&ct),
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

    /// Streams `body` in `piece`-byte pieces under a budget of `cap` bytes,
    /// skipping a part that does not fit; returns (index, part) pairs, the
    /// finish result and the most bytes the reservation ever held.
    fn stream(
        body: &[u8],
        boundary: &str,
        piece: usize,
        cap: u64,
    ) -> (Vec<(usize, OwnedPart)>, Result<(), DicomWebError>, u64) {
        let related = MultipartRelated {
            boundary: boundary.into(),
            root_type: None,
        };
        let budget = bastion_archive::budget::MemoryBudget::new(cap, cap);
        let mut res = budget.transfer();
        let mut split = PartSplitter::new(&related, &MultipartLimits::default());
        let (mut out, mut peak) = (Vec::new(), 0);
        for chunk in body.chunks(piece) {
            if split.push(chunk, &mut res).is_err() {
                split.skip_part(&mut res).expect("skip");
                split.push(chunk, &mut res).expect("push after skip");
            }
            peak = peak.max(res.held());
            loop {
                let index = split.parts_seen();
                match split.next_part(&mut res) {
                    Ok(Some(p)) => {
                        res.shrink(p.reserved);
                        out.push((index, p));
                    }
                    Ok(None) => break,
                    Err(e) => return (out, Err(e), peak),
                }
            }
        }
        let end = split.finish();
        (out, end, peak)
    }

    #[test]
    fn streamed_parts_equal_the_slice_parser_for_every_cut() {
        let mut w = MultipartWriter::with_type("application/dicom");
        w.add_part("application/dicom", b"first\r\n-");
        w.add_part("application/dicom", b"");
        w.add_part("application/octet-stream", b"third part, a bit longer");
        let boundary = w.boundary().to_owned();
        let mut body = b"a preamble\r\n".to_vec();
        body.extend(w.finish());
        body.extend_from_slice(b"\r\nan epilogue");
        let related = MultipartRelated {
            boundary: boundary.clone(),
            root_type: None,
        };
        let whole: Vec<Part> = related
            .parts(&body, &MultipartLimits::default())
            .collect::<Result<_, _>>()
            .expect("parses");
        assert_eq!(whole.len(), 3);
        for piece in 1..=body.len() {
            let (parts, end, _) = stream(&body, &boundary, piece, 1 << 20);
            assert_eq!(end, Ok(()), "piece {piece}");
            assert_eq!(parts.len(), 3, "piece {piece}");
            for ((i, p), q) in parts.iter().zip(&whole) {
                assert_eq!(p.headers, q.headers, "piece {piece} part {i}");
                assert_eq!(p.body, q.body, "piece {piece} part {i}");
            }
        }
    }

    #[test]
    fn a_large_body_is_held_one_part_at_a_time() {
        // 50 parts of 100 KiB (5 MB) through a 400 KiB budget.
        let mut w = MultipartWriter::new();
        for i in 0..50u8 {
            w.add_part("application/dicom", &vec![i; 100 << 10]);
        }
        let boundary = w.boundary().to_owned();
        let body = w.finish();
        let (parts, end, peak) = stream(&body, &boundary, 16 << 10, 400 << 10);
        assert_eq!(end, Ok(()));
        assert_eq!(parts.len(), 50);
        for (i, p) in &parts {
            assert_eq!(p.body.len(), 100 << 10);
            assert!(p.body.iter().all(|b| usize::from(*b) == *i));
        }
        assert!(peak <= 400 << 10, "held {peak} bytes");
    }

    #[test]
    fn a_part_over_the_budget_is_skipped_and_the_rest_still_come() {
        let mut w = MultipartWriter::new();
        w.add_part("application/dicom", &[1; 10 << 10]);
        w.add_part("application/dicom", &[2; 400 << 10]);
        w.add_part("application/dicom", &[3; 10 << 10]);
        let boundary = w.boundary().to_owned();
        let body = w.finish();
        let (parts, end, peak) = stream(&body, &boundary, 8 << 10, 150 << 10);
        assert_eq!(end, Ok(()));
        let indices: Vec<usize> = parts.iter().map(|(i, _)| *i).collect();
        assert_eq!(indices, [0, 2]);
        assert_eq!(parts[1].1.body, vec![3; 10 << 10]);
        assert!(peak <= 150 << 10);
    }

    /// Spill mode: a part over the budget is handed out in pieces instead of
    /// skipped; the pieces join to exactly its body, for every cut of the
    /// body, while the reservation stays within its cap; the parts around it
    /// come out as usual.
    #[test]
    fn a_part_over_the_budget_is_spilled_whole_for_every_cut() {
        let mut w = MultipartWriter::new();
        w.add_part("application/dicom", &[1; 3000]);
        // a body that holds most of a delimiter, to tempt a false end
        let mut big: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let fake = format!("\r\n--{}", w.boundary());
        big[9000..9000 + fake.len() - 1].copy_from_slice(&fake.as_bytes()[..fake.len() - 1]);
        big[9000 + fake.len() - 1] = 0;
        w.add_part("application/dicom", &big);
        w.add_part("application/dicom", &[3; 3000]);
        let boundary = w.boundary().to_owned();
        let body = w.finish();
        let related = MultipartRelated {
            boundary: boundary.clone(),
            root_type: None,
        };
        for piece in [1usize, 7, 100, 997, 4096, 65_536] {
            let budget = bastion_archive::budget::MemoryBudget::new(300_000, 300_000);
            let mut res = budget.transfer();
            let mut split = PartSplitter::new(&related, &MultipartLimits::default());
            let (mut parts, mut spilled, mut spilling, mut peak) =
                (Vec::new(), Vec::<Vec<u8>>::new(), None::<Vec<u8>>, 0);
            for chunk in body.chunks(piece) {
                if spilling.is_some() {
                    split.push(chunk, &mut res).expect("push while spilling");
                } else if split.push(chunk, &mut res).is_err() {
                    let (headers, so_far) = split
                        .spill_part(&mut res)
                        .expect("spill")
                        .expect("headers complete");
                    assert_eq!(headers[0].1, "application/dicom");
                    spilling = Some(so_far);
                    split.push(chunk, &mut res).expect("push after spill");
                }
                peak = peak.max(res.held());
                while let Some(acc) = spilling.as_mut() {
                    match split.drain_spill() {
                        Some(SpillChunk::More(b)) => acc.extend(b),
                        Some(SpillChunk::Last(b)) => {
                            acc.extend(b);
                            spilled.extend(spilling.take());
                        }
                        None => break,
                    }
                }
                while let Some(p) = split.next_part(&mut res).expect("part") {
                    res.shrink(p.reserved);
                    parts.push(p.body);
                }
            }
            split.finish().expect("closed");
            assert_eq!(spilled, vec![big.clone()], "piece {piece}");
            assert_eq!(parts, vec![vec![1; 3000], vec![3; 3000]], "piece {piece}");
            assert!(peak <= 300_000, "piece {piece}: held {peak}");
            assert_eq!(split.parts_seen(), 3);
        }
    }

    #[test]
    fn streamed_refusals() {
        let b = "bnd";
        // Never closed.
        let (parts, end, _) = stream(b"--bnd\r\n\r\nbody\r\n--bnd\r\n\r\nmore", b, 4, 1 << 20);
        assert_eq!(parts.len(), 1);
        assert!(matches!(end, Err(DicomWebError::BadMultipart(_))));
        // No boundary at all.
        let (_, end, _) = stream(b"just some bytes", b, 3, 1 << 20);
        assert!(matches!(end, Err(DicomWebError::BadMultipart(_))));
        // Junk after a boundary.
        let (_, end, _) = stream(b"--bndX\r\n\r\n\r\n--bnd--", b, 2, 1 << 20);
        assert!(matches!(end, Err(DicomWebError::BadMultipart(_))));
        // A part over max_part_bytes fails as soon as it is, not at the end.
        let related = MultipartRelated {
            boundary: b.into(),
            root_type: None,
        };
        let limits = MultipartLimits {
            max_part_bytes: 100,
            ..MultipartLimits::default()
        };
        let budget = bastion_archive::budget::MemoryBudget::new(1 << 20, 1 << 20);
        let mut res = budget.transfer();
        let mut split = PartSplitter::new(&related, &limits);
        split.push(b"--bnd\r\n\r\n", &mut res).expect("push");
        assert_eq!(split.next_part(&mut res), Ok(None));
        split.push(&[0; 200], &mut res).expect("push");
        assert_eq!(
            split.next_part(&mut res),
            Err(DicomWebError::MultipartTooLarge {
                what: "bytes per part",
                limit: 100
            })
        );
    }
}
