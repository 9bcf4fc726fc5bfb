//! # bastion-dicomweb: DICOMweb building blocks without HTTP
//!
//! Pure functions for the DICOMweb services of PS3.18, called by the HTTP
//! front end (`bastion-web`), which owns routing, authentication, content
//! negotiation and the one mapping of errors to HTTP statuses. Nothing here
//! opens a socket, reads a file or knows an HTTP type: inputs are bytes,
//! strings and dicom-rs objects, outputs are bytes and `serde_json` values.
//!
//! | module | PS3.18 | main items |
//! |---|---|---|
//! | [`json`] | Annex F, DICOM JSON Model | [`to_dicom_json`], [`JsonOptions`] |
//! | [`qido`] | §10.6 QIDO-RS (Search) | [`qido_to_query`], [`QidoOptions`], [`qido_result_json`] |
//! | [`multipart`] | §8.6.1.2 multipart/related payloads | [`MultipartWriter`], [`parse_multipart_related`] |
//! | [`frames`](mod@frames) | §10.4.1.1.3 Frames resources | [`frames()`](fn@frames), [`frame_transfer_syntax`] |
//! | [`render`](mod@render) | §10.4.1.1.4, §8.3.5.1 Rendered / Thumbnail | [`render()`](fn@render), [`thumbnail`], [`RenderOptions`] |
//!
//! Every failure is a [`DicomWebError`]; [`DicomWebError::http_status`]
//! suggests the status (PS3.18 §8.6.3 / §10.x "Status Codes") and no
//! message ever contains a value from a dataset or a query (patient data),
//! only tags, keywords, frame numbers, sizes and transfer syntax UIDs.
//!
//! ## Example: a QIDO-RS search, translated for the C-FIND engine
//!
//! ```
//! use bastion_dicomweb::{qido_to_query, QidoLevel, PathUids};
//!
//! let params = vec![
//!     ("PatientID".to_owned(), "12345".to_owned()),
//!     ("includefield".to_owned(), "00081030".to_owned()),
//!     ("limit".to_owned(), "25".to_owned()),
//! ];
//! let (query, opts) = qido_to_query(QidoLevel::Study, &PathUids::default(), &params)?;
//! assert_eq!(opts.limit, Some(25));
//! assert!(!query.is_universal());
//! # Ok::<(), bastion_dicomweb::DicomWebError>(())
//! ```
//!
//! The web layer then runs `Archive::find(&query, …)`, skips `opts.offset`
//! responses, keeps `opts.limit`, and turns each identifier into JSON with
//! [`qido_result_json`].
//!
//! Invariants:
//! - one query engine: QIDO-RS builds a C-FIND Identifier and parses it with
//!   `bastion_archive::query::Query::parse`, so matching is PS3.4 §C.2.2.2
//!   exactly as for C-FIND;
//! - decoded sizes are checked against the bytes present (native pixel data)
//!   or against `bastion_archive::transcode::MAX_DECODED_PIXEL_BYTES`
//!   (compressed) before any large allocation;
//! - errors carry no patient data.

pub mod frames;
pub mod json;
pub mod multipart;
pub mod qido;
pub mod render;

mod pixel;

pub use frames::{
    can_return_native, frame_media_type, frame_transfer_syntax, frames, native_frames,
};
pub use json::{to_dicom_json, JsonOptions};
pub use multipart::{
    parse_multipart_related, MultipartLimits, MultipartRelated, MultipartWriter, OwnedPart, Part,
    PartSplitter, SpillChunk,
};
pub use qido::{
    omit_empty_unnamed, qido_result_json, qido_to_query, retrieve_url, PathUids, QidoLevel,
    QidoOptions,
};
pub use render::{
    render, render_image, thumbnail, ImageFormat, RenderOptions, Rendered, THUMBNAIL_SIZE,
};

/// Why a DICOMweb operation failed. [`DicomWebError::http_status`] gives the
/// suggested HTTP status; messages name attributes, sizes and frame numbers,
/// never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DicomWebError {
    /// A query parameter names no attribute of the data dictionary (PS3.18
    /// §8.3.4: 400). `name` is the parameter name, clipped to 64 printable
    /// ASCII characters, `?` otherwise.
    #[error("unknown attribute or query parameter `{name}`")]
    UnknownAttribute {
        /// The parameter, clipped.
        name: String,
    },
    /// A query parameter or request option has a malformed value (400).
    #[error("invalid value for `{name}`: {reason}")]
    InvalidParameter {
        /// The parameter (keyword or option name), clipped.
        name: String,
        /// What is wrong, without the value.
        reason: String,
    },
    /// The query engine refused the identifier built from the parameters
    /// (malformed date range, wildcard in a UID…: 400).
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// A multipart body or its Content-Type is malformed (400).
    #[error("malformed multipart body: {0}")]
    BadMultipart(String),
    /// The request body is not `multipart/related` or its `type` parameter
    /// is not acceptable (415).
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    /// A multipart body exceeds a part-count or part-size limit (413).
    #[error("multipart body exceeds the limit of {limit} {what}")]
    MultipartTooLarge {
        /// "parts" or "bytes per part".
        what: &'static str,
        /// The limit.
        limit: usize,
    },
    /// A requested frame does not exist (PS3.18 §10.4.1.1.3: 404).
    #[error("frame {frame} requested, the instance has {frames}")]
    FrameNotFound {
        /// The 1-based frame number asked for.
        frame: u32,
        /// Number of Frames of the instance.
        frames: u32,
    },
    /// The instance has no pixel data (404: no such resource).
    #[error("the instance has no pixel data")]
    NoPixelData,
    /// The pixel data cannot be rendered or split by Bastion: a transfer
    /// syntax it does not decode (JPEG-LS, JPEG 2000…) or an image type it
    /// does not render (406: the representation cannot be produced).
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The image attributes contradict the pixel data (e.g. Rows × Columns
    /// larger than the pixel data present, a codestream that does not match),
    /// or the decoded size exceeds the cap (422).
    #[error("invalid image: {0}")]
    InvalidImage(String),
    /// The stored dataset cannot be parsed (500: stored data is checked at
    /// ingest, so this is an internal inconsistency).
    #[error("dataset cannot be decoded: {0}")]
    InvalidDataset(String),
    /// Buffering a streamed body would exceed the server's memory budget
    /// (503 with `Retry-After`: a resource refusal, PS3.18 §10.5.3).
    #[error("{0}")]
    Budget(#[from] bastion_archive::budget::BudgetError),
}

impl DicomWebError {
    /// The HTTP status this error suggests (PS3.18 §8.6.3 and the "Status
    /// Codes" tables of §10): 400 Bad Request, 404 Not Found, 406 Not
    /// Acceptable, 413 Payload Too Large, 415 Unsupported Media Type,
    /// 422 Unprocessable Content, 500 Internal Server Error, 503 Service
    /// Unavailable. The web layer
    /// keeps the one authoritative mapping; this is its hint.
    pub fn http_status(&self) -> u16 {
        match self {
            DicomWebError::UnknownAttribute { .. }
            | DicomWebError::InvalidParameter { .. }
            | DicomWebError::InvalidQuery(_)
            | DicomWebError::BadMultipart(_) => 400,
            DicomWebError::FrameNotFound { .. } | DicomWebError::NoPixelData => 404,
            DicomWebError::Unsupported(_) => 406,
            DicomWebError::MultipartTooLarge { .. } => 413,
            DicomWebError::UnsupportedMediaType(_) => 415,
            DicomWebError::InvalidImage(_) => 422,
            DicomWebError::InvalidDataset(_) => 500,
            DicomWebError::Budget(_) => 503,
        }
    }
}

/// A peer-supplied name made safe for an error message: printable ASCII
/// only, at most 64 characters.
pub(crate) fn clip(name: &str) -> String {
    let clipped: String = name
        .chars()
        .take(64)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    if name.chars().count() > 64 {
        format!("{clipped}…")
    } else {
        clipped
    }
}
