//! Decoders that run outside the server process.
//!
//! JPEG 2000 (PS3.5 §A.4.4, transfer syntaxes 1.2.840.10008.1.2.4.90 and
//! .91) has no memory-safe decoder: dicom-rs offers OpenJPEG (C) or
//! `openjp2`, a translation of OpenJPEG into `unsafe` Rust. JPEG-LS (§A.4.3,
//! .80 and .81) is decoded only by CharLS (C++), and 12-bit JPEG Extended
//! (§A.4.1, .51 with a 12-bit sample precision) only by libjpeg-turbo (C):
//! jpeg-decoder has no 12-bit DCT. A codestream comes from a peer, so
//! Bastion never parses one with these in the process that holds the keys
//! and the open archive: the binary registers an [`IsolatedDecoder`]
//! (`bastion`'s `decoder_sandbox`: a child process under seccomp and
//! resource limits, fed the codestream on stdin) with
//! [`set_isolated_decoder`], and [`crate::transcode`] uses it for these
//! codecs ([`IsolatedCodec`]). Without one registered (library tests,
//! tools), they are not decodable and stay "as stored or not at all".

use std::sync::{Arc, OnceLock};

/// JPEG 2000 Image Compression (Lossless Only).
pub const JPEG_2000_LOSSLESS: &str = "1.2.840.10008.1.2.4.90";
/// JPEG 2000 Image Compression (lossless or lossy).
pub const JPEG_2000: &str = "1.2.840.10008.1.2.4.91";

/// JPEG-LS Lossless Image Compression.
pub const JPEG_LS_LOSSLESS: &str = "1.2.840.10008.1.2.4.80";
/// JPEG-LS Lossy (Near-Lossless) Image Compression.
pub const JPEG_LS: &str = "1.2.840.10008.1.2.4.81";

/// The codecs only an [`IsolatedDecoder`] decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsolatedCodec {
    /// JPEG 2000 (ISO 15444-1), J2K codestream or JP2.
    Jpeg2000,
    /// JPEG-LS (ISO 14495-1).
    JpegLs,
    /// JPEG (ISO 10918-1) DCT with 12-bit samples (JPEG Extended, process 4).
    Jpeg12,
}

impl IsolatedCodec {
    /// The name on the child's command line (`jp2`, `jls`, `jpeg12`).
    pub fn arg(self) -> &'static str {
        match self {
            IsolatedCodec::Jpeg2000 => "jp2",
            IsolatedCodec::JpegLs => "jls",
            IsolatedCodec::Jpeg12 => "jpeg12",
        }
    }

    /// The codec named `arg` ([`IsolatedCodec::arg`]).
    pub fn from_arg(arg: &str) -> Option<Self> {
        [
            IsolatedCodec::Jpeg2000,
            IsolatedCodec::JpegLs,
            IsolatedCodec::Jpeg12,
        ]
        .into_iter()
        .find(|c| c.arg() == arg)
    }

    /// A name for messages ("JPEG 2000", "JPEG-LS", "12-bit JPEG").
    pub fn label(self) -> &'static str {
        match self {
            IsolatedCodec::Jpeg2000 => "JPEG 2000",
            IsolatedCodec::JpegLs => "JPEG-LS",
            IsolatedCodec::Jpeg12 => "12-bit JPEG",
        }
    }
}

/// One decoded image (JPEG 2000, JPEG-LS or 12-bit JPEG).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedImage {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// Components (1 grey, 3 colour; after the inverse multiple-component
    /// transform, so 3 components are RGB).
    pub components: u16,
    /// Bits per sample of the codestream (1–16).
    pub precision: u8,
    /// Whether samples are signed (two's complement in `samples`).
    pub signed: bool,
    /// Samples, component-interleaved, each in 1 byte (precision ≤ 8) or 2
    /// bytes little endian.
    pub samples: Vec<u8>,
}

/// A decoder isolated from the server process.
pub trait IsolatedDecoder: Send + Sync {
    /// Decodes one codestream of `codec` (JPEG 2000: J2K or JP2).
    /// `max_bytes` caps the decoded samples; more is an error before they
    /// are produced where the decoder can tell. Errors are one line for an
    /// operator (never the data).
    ///
    /// # Errors
    /// The reason, as text: malformed codestream, limits exceeded, the
    /// isolated process killed or timed out.
    fn decode(
        &self,
        codec: IsolatedCodec,
        codestream: &[u8],
        max_bytes: usize,
    ) -> Result<DecodedImage, String>;
}

static DECODER: OnceLock<Arc<dyn IsolatedDecoder>> = OnceLock::new();

/// Registers the process-wide isolated decoder (once; later calls are
/// ignored and return `false`).
pub fn set_isolated_decoder(decoder: Arc<dyn IsolatedDecoder>) -> bool {
    DECODER.set(decoder).is_ok()
}

/// The registered decoder, if any.
pub fn isolated_decoder() -> Option<Arc<dyn IsolatedDecoder>> {
    DECODER.get().cloned()
}

/// Whether a fragment begins a JPEG 2000 codestream: SOC+SIZ (`FF 4F FF
/// 51`, ISO 15444-1 §A.4) or a JP2 signature box.
pub fn starts_j2k_codestream(fragment: &[u8]) -> bool {
    fragment.starts_with(&[0xFF, 0x4F, 0xFF, 0x51])
        || fragment.starts_with(&[0, 0, 0, 0x0C, b'j', b'P', b' ', b' '])
}

/// Whether a fragment begins a codestream of `codec`: JPEG 2000 SOC+SIZ or
/// a JP2 signature box ([`starts_j2k_codestream`]), or a JPEG / JPEG-LS SOI
/// marker `FF D8`.
pub fn starts_codestream(codec: IsolatedCodec, fragment: &[u8]) -> bool {
    match codec {
        IsolatedCodec::Jpeg2000 => starts_j2k_codestream(fragment),
        IsolatedCodec::JpegLs | IsolatedCodec::Jpeg12 => fragment.starts_with(&[0xFF, 0xD8]),
    }
}

/// Splits encapsulated fragments into one codestream per frame: one frame
/// takes every fragment; otherwise one fragment per frame, or fragments
/// grouped at each codestream start ([`starts_codestream`]).
///
/// # Errors
/// When the frames cannot be delimited that way.
pub fn frame_codestreams(
    codec: IsolatedCodec,
    fragments: &[Vec<u8>],
    frames: u32,
) -> Result<Vec<Vec<u8>>, String> {
    let frames = frames as usize;
    if fragments.is_empty() {
        return Err("encapsulated pixel data without fragments".into());
    }
    if frames == 1 {
        return Ok(vec![fragments.concat()]);
    }
    if fragments.len() == frames {
        return Ok(fragments.to_vec());
    }
    let firsts: Vec<usize> = fragments
        .iter()
        .enumerate()
        .filter(|(_, f)| starts_codestream(codec, f))
        .map(|(i, _)| i)
        .collect();
    if firsts.len() != frames || firsts.first() != Some(&0) {
        return Err(format!(
            "{} fragments, {} codestream starts, {frames} frames: frames cannot be delimited",
            fragments.len(),
            firsts.len()
        ));
    }
    Ok(firsts
        .iter()
        .enumerate()
        .map(|(i, start)| {
            let end = firsts.get(i + 1).copied().unwrap_or(fragments.len());
            fragments[*start..end].concat()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_delimited_by_codestream_starts() {
        let soc = |n: u8| vec![0xFF, 0x4F, 0xFF, 0x51, n];
        let cont = |n: u8| vec![n, n];
        assert_eq!(
            frame_codestreams(IsolatedCodec::Jpeg2000, &[soc(1), cont(2)], 1),
            Ok(vec![vec![0xFF, 0x4F, 0xFF, 0x51, 1, 2, 2]])
        );
        assert_eq!(
            frame_codestreams(IsolatedCodec::Jpeg2000, &[soc(1), cont(2), soc(3)], 2),
            Ok(vec![vec![0xFF, 0x4F, 0xFF, 0x51, 1, 2, 2], soc(3)])
        );
        assert_eq!(
            frame_codestreams(IsolatedCodec::Jpeg2000, &[soc(1), soc(2)], 2),
            Ok(vec![soc(1), soc(2)])
        );
        assert!(
            frame_codestreams(IsolatedCodec::Jpeg2000, &[soc(1), cont(2), cont(3)], 2).is_err()
        );
        assert!(frame_codestreams(IsolatedCodec::Jpeg2000, &[], 1).is_err());
    }
}
