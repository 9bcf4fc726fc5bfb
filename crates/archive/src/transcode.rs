//! Transfer syntax conversion for retrieval: PS3.4 C.4.2.2 (C-MOVE) and
//! C.4.3.3.1 (C-GET) let the SCP send an instance in a transfer syntax the
//! peer accepts when it can produce it, the stored one being offered first.
//!
//! Two kinds of conversion ([`can_transcode`] says which pairs):
//!
//! - **Re-encoding** between the uncompressed transfer syntaxes (PS3.5
//!   §A.1–A.3), with Deflated Explicit VR Little Endian (§A.5) as a source:
//!   dicom-object decodes and encodes, the values are unchanged.
//! - **Decompression** of encapsulated pixel data (§A.4) to native pixel data,
//!   written in Explicit or Implicit VR Little Endian, by pure-Rust decoders:
//!   RLE Lossless ([`RLE_LOSSLESS`], 8 or 16 bits allocated) by
//!   dicom-transfer-syntax-registry's RLE adapter (feature `rle`), 32 bits
//!   allocated by a PackBits decoder here (PS3.5 §G.3.1; the adapter refuses
//!   more than 16 bits); JPEG
//!   Baseline ([`JPEG_BASELINE`]), JPEG Extended ([`JPEG_EXTENDED`], 8-bit
//!   samples: jpeg-decoder has no 12-bit DCT, see below) and JPEG Lossless
//!   ([`JPEG_LOSSLESS`], [`JPEG_LOSSLESS_SV1`], 2–16 bit samples) by
//!   `jpeg-decoder`, the decoder behind dicom-rs's `jpeg` adapter, called
//!   directly because the adapter lets it pick the colour transform (below).
//!
//! **JPEG 2000** (.90, .91), **JPEG-LS** (.80, .81) and **12-bit JPEG
//! Extended** (.51 whose frame header says more than 8 bits) are decoded
//! only through the [`crate::isolated::IsolatedDecoder`] the binary
//! registers (`bastion serve`: a child process under seccomp and resource
//! limits, see `crates/bastion/src/decoder_sandbox.rs`): the only decoders
//! are OpenJPEG (C) / `openjp2` (OpenJPEG translated into `unsafe` Rust),
//! CharLS (C++) and libjpeg-turbo's 12-bit API (C), and a peer-supplied
//! codestream is never parsed by them in the server process. Each frame's
//! image is checked against Rows, Columns, Samples per Pixel and Bits
//! Allocated; a JPEG 2000 colour image comes out RGB (the decoder applies
//! the inverse YBR_RCT/YBR_ICT transform), a 12-bit colour JPEG too
//! (libjpeg-turbo converts YCbCr), JPEG-LS keeps its Photometric
//! Interpretation. Without a registered decoder these are not decodable.
//!
//! **Not decoded**, so such instances go out as stored or not at all:
//! JPEG XL, MPEG/HEVC video, Deflated Image Frame Compression, Encapsulated
//! Uncompressed.
//!
//! ## What the decoded dataset says (PS3.3 §C.7.6.3, PS3.5 §8)
//!
//! - Pixel Data (7FE0,0010) holds every frame, little endian, with VR OB when
//!   Bits Allocated is 8 and OW when 16 or 32, padded to even length. Extended
//!   Offset Table (7FE0,0001), its Lengths (7FE0,0002) and Encapsulated Pixel
//!   Data Value Total Length (7FE0,0003) describe fragments and are removed.
//! - Photometric Interpretation (0028,0004), 3-component lossy JPEG: the
//!   dataset decides the colour transform, as DCMTK does by default (PS3.5
//!   §8.2.1: RGB means the samples were compressed without one): `RGB` is
//!   decoded as is, YBR_FULL / YBR_FULL_422 (or anything else) is converted
//!   from YCbCr, chroma upsampled; the result is `RGB` either way.
//!   jpeg-decoder's own rule (component identifiers, then JFIF/Adobe
//!   markers), which dicom-rs's adapter uses, converts an RGB image that has
//!   no Adobe marker. RLE and lossless JPEG keep the samples as encoded, so
//!   the stored value stays (RGB, YBR_FULL, MONOCHROME1/2, PALETTE COLOR).
//!   (dicom-pixeldata's `Transcode` labels every 3-sample result RGB, wrong
//!   for RLE or lossless YBR_FULL: not used.)
//! - Planar Configuration (0028,0006) is 0 (colour-by-pixel, as both decoders
//!   interleave) whenever Samples per Pixel > 1.
//! - Lossy Image Compression (0028,2110) is `01` after a lossy JPEG process
//!   (baseline/extended) and Lossy Image Compression Method (0028,2114) is
//!   `ISO_10918_1` when absent; after a lossless source both stay as stored
//!   (an earlier lossy step keeps its `01`).
//! - An Icon Image Sequence (0088,0200, Type 3) whose icon is itself
//!   encapsulated is dropped; any other encapsulated value left is an error.
//! - Bits Stored, High Bit, Pixel Representation and Number of Frames are
//!   unchanged.
//!
//! ## Bounds
//!
//! Stored datasets passed the ingest bounds check ([`crate::scan`]), but the
//! image attributes are not bounded by it: before anything is decoded the
//! decoded size (Rows × Columns × Samples per Pixel × Bits Allocated / 8 ×
//! Number of Frames) must be at most [`MAX_DECODED_PIXEL_BYTES`] (and is
//! reserved with `try_reserve`, an error rather than an abort when memory is
//! short), and the codestream must agree with the attributes (RLE: one
//! fragment per frame, header, segment count and decoded segment lengths;
//! JPEG: one image per frame whose frame header has the same rows, columns,
//! components and a precision that fits Bits Allocated), so neither the RLE
//! adapter nor jpeg-decoder allocates from an unchecked header or indexes
//! out of bounds. A panic inside a decoder is still caught and reported as
//! an error. Peak memory of one decompression is about the stored dataset
//! plus twice the decoded pixel data (decoded, then encoded).

use std::borrow::Cow;
use std::panic::{catch_unwind, AssertUnwindSafe};

use dicom_core::{DataElement, DicomValue, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::adapters::{PixelDataObject, RawPixelData};
use dicom_encoding::{Codec, TransferSyntaxIndex};
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::isolated::IsolatedCodec;
use crate::ArchiveError;

/// Implicit VR Little Endian.
pub const IMPLICIT_VR_LE: &str = uids::IMPLICIT_VR_LITTLE_ENDIAN;
/// Explicit VR Little Endian.
pub const EXPLICIT_VR_LE: &str = uids::EXPLICIT_VR_LITTLE_ENDIAN;
/// Explicit VR Big Endian (retired).
pub const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";
/// Deflated Explicit VR Little Endian.
pub const DEFLATED_EXPLICIT_VR_LE: &str = uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN;
/// RLE Lossless (PS3.5 Annex G).
pub const RLE_LOSSLESS: &str = uids::RLE_LOSSLESS;
/// JPEG Baseline (Process 1), lossy.
pub const JPEG_BASELINE: &str = uids::JPEG_BASELINE8_BIT;
/// JPEG Extended (Process 2 & 4), lossy.
pub const JPEG_EXTENDED: &str = uids::JPEG_EXTENDED12_BIT;
/// JPEG Lossless, Non-Hierarchical (Process 14).
pub const JPEG_LOSSLESS: &str = uids::JPEG_LOSSLESS;
/// JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14,
/// Selection Value 1).
pub const JPEG_LOSSLESS_SV1: &str = uids::JPEG_LOSSLESS_SV1;

/// Targets offered as a fallback, in order of preference.
pub const FALLBACKS: [&str; 2] = [EXPLICIT_VR_LE, IMPLICIT_VR_LE];

/// Largest native pixel data a decompression may produce, in bytes (1 GiB,
/// the default `max_dataset_bytes`): a larger decoded size is refused before
/// anything is allocated.
pub const MAX_DECODED_PIXEL_BYTES: u64 = 1 << 30;

/// Whether a dataset stored in `from` can be re-encoded in `to`: between
/// different uncompressed syntaxes (Deflated as a source too), or from a
/// decodable compressed syntax (see the module docs) to Explicit or Implicit
/// VR Little Endian.
///
/// This is a property of the pair; one instance can still fail (e.g. a 12-bit
/// JPEG Extended image without a registered isolated decoder, a codestream
/// contradicting its attributes), and [`transcode`] then says why.
pub fn can_transcode(from: &str, to: &str) -> bool {
    let uncompressed = |ts: &str| matches!(ts, IMPLICIT_VR_LE | EXPLICIT_VR_LE | EXPLICIT_VR_BE);
    if from == to {
        return false;
    }
    if uncompressed(from) || from == DEFLATED_EXPLICIT_VR_LE {
        return uncompressed(to);
    }
    Decoder::of(from).is_some() && matches!(to, EXPLICIT_VR_LE | IMPLICIT_VR_LE)
}

/// Re-encodes `dataset` (bytes in `from`) in `to`, decoding compressed pixel
/// data when `from` is encapsulated (see the module docs for the attributes
/// that change).
///
/// # Errors
/// [`ArchiveError::NotDicom`] when the pair is not supported, the dataset
/// cannot be decoded or encoded, its decoded pixel data would exceed
/// [`MAX_DECODED_PIXEL_BYTES`], or its codestream contradicts its image
/// attributes.
pub fn transcode(dataset: &[u8], from: &str, to: &str) -> Result<Vec<u8>, ArchiveError> {
    if !can_transcode(from, to) {
        return Err(ArchiveError::NotDicom(format!(
            "cannot convert {from} to {to}"
        )));
    }
    let lookup = |ts: &str| {
        TransferSyntaxRegistry
            .get(ts)
            .ok_or_else(|| ArchiveError::NotDicom(format!("unknown transfer syntax {ts}")))
    };
    let mut obj = InMemDicomObject::read_dataset_with_ts(dataset, lookup(from)?)
        .map_err(|e| ArchiveError::NotDicom(format!("stored dataset cannot be decoded: {e}")))?;
    if let Some(decoder) = Decoder::of(from) {
        if obj.get(tags::PIXEL_DATA).is_some() {
            decode_pixel_data(&mut obj, from, decoder)?;
        }
        if has_encapsulated(&obj) {
            return Err(ArchiveError::NotDicom(format!(
                "encapsulated pixel data nested in a sequence cannot be written in {to}"
            )));
        }
    }
    let mut out = Vec::with_capacity(dataset.len() + 1024);
    obj.write_dataset_with_ts(&mut out, lookup(to)?)
        .map_err(|e| ArchiveError::NotDicom(format!("dataset cannot be encoded in {to}: {e}")))?;
    Ok(out)
}

/// The decoders Bastion uses, by source transfer syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoder {
    /// RLE Lossless (PS3.5 Annex G).
    Rle,
    /// ISO 10918-1 (ITU-T T.81); `lossy` for the DCT processes.
    Jpeg {
        /// Baseline or extended (DCT) rather than lossless (process 14).
        lossy: bool,
    },
    /// JPEG 2000 (ISO 15444-1) or JPEG-LS (ISO 14495-1), by the registered
    /// [`crate::isolated::IsolatedDecoder`] (a sandboxed child process),
    /// only when one is registered.
    Isolated(IsolatedCodec),
}

impl Decoder {
    fn of(ts: &str) -> Option<Self> {
        let isolated = |codec| {
            crate::isolated::isolated_decoder()
                .is_some()
                .then_some(Decoder::Isolated(codec))
        };
        match ts {
            RLE_LOSSLESS => Some(Decoder::Rle),
            JPEG_BASELINE | JPEG_EXTENDED => Some(Decoder::Jpeg { lossy: true }),
            JPEG_LOSSLESS | JPEG_LOSSLESS_SV1 => Some(Decoder::Jpeg { lossy: false }),
            crate::isolated::JPEG_2000_LOSSLESS | crate::isolated::JPEG_2000 => {
                isolated(IsolatedCodec::Jpeg2000)
            }
            crate::isolated::JPEG_LS_LOSSLESS | crate::isolated::JPEG_LS => {
                isolated(IsolatedCodec::JpegLs)
            }
            _ => None,
        }
    }
}

/// The image attributes that size the native pixel data (PS3.3 §C.7.6.3).
#[derive(Debug, Clone, Copy)]
struct Geometry {
    rows: u16,
    cols: u16,
    samples: u16,
    bits_allocated: u16,
    bits_stored: u16,
    frames: u32,
}

impl Geometry {
    fn of(obj: &InMemDicomObject) -> Result<Self, String> {
        let us = |tag, name: &str| {
            obj.get(tag)
                .ok_or_else(|| format!("{name} is missing"))?
                .uint16()
                .map_err(|e| format!("{name} is not a US value: {e}"))
        };
        let bits_allocated = us(tags::BITS_ALLOCATED, "Bits Allocated")?;
        let frames = match obj.get(tags::NUMBER_OF_FRAMES) {
            None => 1,
            Some(e) => e
                .to_int::<u32>()
                .map_err(|e| format!("Number of Frames is not a positive integer: {e}"))?,
        };
        let g = Geometry {
            rows: us(tags::ROWS, "Rows")?,
            cols: us(tags::COLUMNS, "Columns")?,
            samples: us(tags::SAMPLES_PER_PIXEL, "Samples per Pixel")?,
            bits_allocated,
            bits_stored: us(tags::BITS_STORED, "Bits Stored").unwrap_or(bits_allocated),
            frames,
        };
        if g.rows == 0 || g.cols == 0 || g.frames == 0 {
            return Err(format!(
                "empty image: {} rows, {} columns, {} frames",
                g.rows, g.cols, g.frames
            ));
        }
        if !matches!(g.samples, 1 | 3) {
            return Err(format!(
                "Samples per Pixel {} (1 or 3 can be decoded)",
                g.samples
            ));
        }
        if !matches!(g.bits_allocated, 8 | 16 | 32) {
            return Err(format!(
                "Bits Allocated {} (8, 16 or 32 can be decoded)",
                g.bits_allocated
            ));
        }
        Ok(g)
    }

    /// Bytes of one decoded frame (fits: at most 65535² × 3 × 2).
    fn frame_bytes(&self) -> u64 {
        u64::from(self.rows)
            * u64::from(self.cols)
            * u64::from(self.samples)
            * u64::from(self.bits_allocated / 8)
    }

    /// Bytes of all decoded frames, refused above [`MAX_DECODED_PIXEL_BYTES`].
    fn checked_total(&self) -> Result<usize, String> {
        let total = self
            .frame_bytes()
            .checked_mul(u64::from(self.frames))
            .filter(|t| *t <= MAX_DECODED_PIXEL_BYTES)
            .ok_or_else(|| {
                format!(
                    "decoded pixel data of {} × {} × {} samples × {} bits × {} frames exceeds \
                     the {MAX_DECODED_PIXEL_BYTES}-byte cap",
                    self.rows, self.cols, self.samples, self.bits_allocated, self.frames
                )
            })?;
        usize::try_from(total).map_err(|_| format!("{total} bytes do not fit in memory"))
    }
}

/// Replaces the encapsulated Pixel Data of `obj` (in `ts`) by native pixel
/// data and updates the attributes that describe it.
fn decode_pixel_data(
    obj: &mut InMemDicomObject,
    ts: &str,
    decoder: Decoder,
) -> Result<(), ArchiveError> {
    let fail = |msg: String| ArchiveError::NotDicom(format!("cannot decompress {ts}: {msg}"));
    let g = Geometry::of(obj).map_err(fail)?;
    // Before any decoding: the cap on what the decoders will allocate.
    let total = g.checked_total().map_err(fail)?;
    let Some(pixel_data) = obj.get(tags::PIXEL_DATA) else {
        return Ok(());
    };
    let (Some(fragments), Some(offset_table)) = (
        pixel_data.value().fragments(),
        pixel_data.value().offset_table(),
    ) else {
        return Err(fail("Pixel Data is not encapsulated".into()));
    };
    let photometric = obj
        .get(tags::PHOTOMETRIC_INTERPRETATION)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches([' ', '\0']).to_owned());
    let mut native = Vec::new();
    // The one large allocation, within the cap; refused rather than aborting
    // the process when memory is short.
    native
        .try_reserve_exact(total)
        .map_err(|e| fail(format!("cannot allocate {total} bytes: {e}")))?;
    if g.bits_allocated == 32 && decoder != Decoder::Rle {
        return Err(fail(
            "Bits Allocated 32 (only RLE Lossless is decoded at 32 bits)".into(),
        ));
    }
    match decoder {
        Decoder::Rle if g.bits_allocated == 32 => {
            check_rle(fragments, &g).map_err(fail)?;
            decode_rle_32(fragments, &g, &mut native).map_err(fail)?;
        }
        Decoder::Rle => {
            check_rle(fragments, &g).map_err(fail)?;
            let reader = match TransferSyntaxRegistry.get(ts).map(|t| t.codec()) {
                Some(Codec::EncapsulatedPixelData(Some(reader), _)) => reader,
                _ => return Err(fail("no decoder registered".into())),
            };
            let source = Encapsulated {
                ts,
                g,
                photometric: photometric.as_deref(),
                fragments,
                offset_table,
            };
            catch_unwind(AssertUnwindSafe(|| reader.decode(&source, &mut native)))
                .map_err(|_| fail("the RLE decoder panicked".into()))?
                .map_err(|e| fail(error_chain(&e)))?;
        }
        Decoder::Jpeg { lossy } => {
            let data = fragments.concat();
            let images = check_jpeg(&data, &g, lossy).map_err(fail)?;
            if lossy && images.iter().any(|f| f.precision > 8) {
                // 12-bit DCT (process 4): jpeg-decoder has none; libjpeg-turbo
                // (C) decodes it in the sandboxed child when one is registered.
                let decoder = crate::isolated::isolated_decoder().ok_or_else(|| {
                    fail("12-bit JPEG needs the isolated decoder, none is registered".into())
                })?;
                let codestreams = images
                    .iter()
                    .map(|f| data.get(f.start..f.end).unwrap_or_default().to_vec())
                    .collect::<Vec<_>>();
                decode_isolated(
                    decoder.as_ref(),
                    IsolatedCodec::Jpeg12,
                    &codestreams,
                    &g,
                    &mut native,
                )
                .map_err(fail)?;
            } else {
                // DCMTK's default rule (PS3.5 §8.2.1): the dataset, not the
                // JFIF/Adobe markers or component identifiers that jpeg-decoder
                // would otherwise go by, says whether the samples are YCbCr.
                let colour = (lossy && g.samples == 3).then(|| {
                    if photometric.as_deref() == Some("RGB") {
                        jpeg_decoder::ColorTransform::None
                    } else {
                        jpeg_decoder::ColorTransform::YCbCr
                    }
                });
                decode_jpeg(&data, &images, &g, colour, &mut native).map_err(fail)?;
            }
        }
        Decoder::Isolated(codec) => {
            let decoder = crate::isolated::isolated_decoder()
                .ok_or_else(|| fail(format!("no {} decoder registered", codec.label())))?;
            let codestreams =
                crate::isolated::frame_codestreams(codec, fragments, g.frames).map_err(fail)?;
            decode_isolated(decoder.as_ref(), codec, &codestreams, &g, &mut native)
                .map_err(fail)?;
        }
    }
    if native.len() != total {
        return Err(fail(format!(
            "decoder produced {} bytes, {total} expected",
            native.len()
        )));
    }
    if native.len() % 2 == 1 {
        native.push(0); // PS3.5 §7.1.1: even value length
    }
    let vr = if g.bits_allocated == 8 {
        VR::OB
    } else {
        VR::OW
    };
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        vr,
        PrimitiveValue::from(native),
    ));
    for tag in [
        tags::EXTENDED_OFFSET_TABLE,
        tags::EXTENDED_OFFSET_TABLE_LENGTHS,
        tags::ENCAPSULATED_PIXEL_DATA_VALUE_TOTAL_LENGTH,
    ] {
        obj.remove_element(tag);
    }
    if g.samples > 1 {
        obj.put(DataElement::new(
            tags::PLANAR_CONFIGURATION,
            VR::US,
            PrimitiveValue::from(0_u16),
        ));
    }
    if decoder == Decoder::Isolated(IsolatedCodec::Jpeg2000) && g.samples == 3 {
        // The decoder applied the inverse component transform (YBR_RCT,
        // YBR_ICT): the samples are RGB (PS3.5 §8.2.4).
        obj.put(DataElement::new(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            PrimitiveValue::from("RGB"),
        ));
    }
    if decoder == (Decoder::Jpeg { lossy: true }) {
        if g.samples == 3 {
            obj.put(DataElement::new(
                tags::PHOTOMETRIC_INTERPRETATION,
                VR::CS,
                PrimitiveValue::from("RGB"),
            ));
        }
        obj.put(DataElement::new(
            tags::LOSSY_IMAGE_COMPRESSION,
            VR::CS,
            PrimitiveValue::from("01"),
        ));
        if obj.get(tags::LOSSY_IMAGE_COMPRESSION_METHOD).is_none() {
            obj.put(DataElement::new(
                tags::LOSSY_IMAGE_COMPRESSION_METHOD,
                VR::CS,
                PrimitiveValue::from("ISO_10918_1"),
            ));
        }
    }
    let icon_encapsulated = obj
        .get(tags::ICON_IMAGE_SEQUENCE)
        .and_then(|e| e.value().items())
        .is_some_and(|items| items.iter().any(has_encapsulated));
    if icon_encapsulated {
        obj.remove_element(tags::ICON_IMAGE_SEQUENCE);
    }
    Ok(())
}

/// Decodes each frame's codestream with the isolated decoder, checks it
/// against the attributes and appends its samples to `out`.
fn decode_isolated(
    decoder: &dyn crate::isolated::IsolatedDecoder,
    codec: IsolatedCodec,
    codestreams: &[Vec<u8>],
    g: &Geometry,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let frame_bytes = usize::try_from(g.frame_bytes()).map_err(|e| e.to_string())?;
    for (i, cs) in codestreams.iter().enumerate() {
        let image = decoder
            .decode(codec, cs, frame_bytes)
            .map_err(|e| format!("frame {}: {e}", i + 1))?;
        check_isolated(&image, g).map_err(|e| format!("frame {}: {e}", i + 1))?;
        out.extend_from_slice(&image.samples);
    }
    Ok(())
}

/// `e` and its sources: the RLE adapter puts the reason in the source.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Whether an encapsulated (fragment sequence) value remains anywhere.
fn has_encapsulated(obj: &InMemDicomObject) -> bool {
    obj.iter().any(|e| match e.value() {
        DicomValue::PixelSequence(_) => true,
        DicomValue::Sequence(s) => s.items().iter().any(has_encapsulated),
        DicomValue::Primitive(_) => false,
    })
}

/// RLE Lossless (PS3.5 §G.3–G.5) against the attributes: one fragment per
/// frame, each with a 64-byte header naming `samples × bytes per sample`
/// segments in order within the fragment, each segment decoding to at least
/// one byte per pixel (the adapter indexes its output without checking).
fn check_rle(fragments: &[Vec<u8>], g: &Geometry) -> Result<(), String> {
    if fragments.len() != g.frames as usize {
        return Err(format!(
            "{} RLE fragments for {} frames (one per frame required)",
            fragments.len(),
            g.frames
        ));
    }
    let segments = usize::from(g.samples) * usize::from(g.bits_allocated / 8);
    let pixels = usize::from(g.rows) * usize::from(g.cols);
    for (frame, fragment) in fragments.iter().enumerate() {
        let header: Vec<usize> = fragment
            .get(..64)
            .ok_or_else(|| format!("frame {frame}: RLE fragment shorter than its header"))?
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize)
            .collect();
        let count = header[0];
        if count != segments {
            return Err(format!(
                "frame {frame}: {count} RLE segments, {segments} expected"
            ));
        }
        for s in 0..count {
            let start = header[1 + s];
            let end = if s + 1 < count {
                header[2 + s]
            } else {
                fragment.len()
            };
            let segment = fragment
                .get(start..end)
                .filter(|_| s > 0 || start == 64)
                .ok_or_else(|| {
                    format!("frame {frame}: RLE segment {s} offset {start} out of order or bounds")
                })?;
            let decoded = packbits_len(segment);
            if decoded < pixels {
                return Err(format!(
                    "frame {frame}: RLE segment {s} decodes to {decoded} bytes, {pixels} expected"
                ));
            }
        }
    }
    Ok(())
}

/// RLE Lossless at 32 bits allocated (PS3.5 §G.2: one segment per byte of
/// each sample, most significant first), decoded here because dicom-rs's
/// RLE adapter refuses more than 16 bits. `check_rle` has checked the
/// header and that each segment yields at least one byte per pixel; the
/// output is interleaved, little endian.
fn decode_rle_32(fragments: &[Vec<u8>], g: &Geometry, out: &mut Vec<u8>) -> Result<(), String> {
    let samples = usize::from(g.samples);
    let pixels = usize::from(g.rows) * usize::from(g.cols);
    let frame_bytes = pixels * samples * 4;
    for fragment in fragments {
        let base = out.len();
        out.resize(base + frame_bytes, 0);
        let offset = |i: usize| -> usize {
            fragment
                .get(4 * i..4 * i + 4)
                .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize)
                .unwrap_or(0)
        };
        let count = samples * 4;
        let mut segment_bytes = Vec::with_capacity(pixels);
        for s in 0..count {
            let start = offset(1 + s);
            let end = if s + 1 < count {
                offset(2 + s)
            } else {
                fragment.len()
            };
            let segment = fragment
                .get(start..end)
                .ok_or_else(|| format!("RLE segment {s} out of bounds"))?;
            segment_bytes.clear();
            packbits_decode(segment, pixels, &mut segment_bytes);
            if segment_bytes.len() < pixels {
                return Err(format!("RLE segment {s} decodes to too few bytes"));
            }
            let (sample, byte) = (s / 4, 3 - s % 4);
            for (p, b) in segment_bytes.iter().take(pixels).enumerate() {
                out[base + (p * samples + sample) * 4 + byte] = *b;
            }
        }
    }
    Ok(())
}

/// Decodes a PackBits segment (PS3.5 §G.3.1) into `out`, stopping at
/// `max` bytes.
fn packbits_decode(segment: &[u8], max: usize, out: &mut Vec<u8>) {
    let mut pos = 0usize;
    while let Some(&header) = segment.get(pos) {
        if out.len() >= max {
            break;
        }
        pos += 1;
        let n = header as i8;
        if n >= 0 {
            let run = (n as usize + 1).min(segment.len() - pos);
            out.extend_from_slice(&segment[pos..pos + run]);
            pos += run;
        } else if n != -128 {
            if let Some(&b) = segment.get(pos) {
                let run = (1 - isize::from(n)) as usize;
                out.extend(std::iter::repeat_n(b, run));
            }
            pos += 1;
        }
    }
    out.truncate(max);
}

/// Bytes a PackBits segment decodes to (PS3.5 §G.3.1), as the adapter reads
/// it: a literal run cut by the segment end yields what is present.
fn packbits_len(segment: &[u8]) -> usize {
    let (mut pos, mut out) = (0usize, 0usize);
    while let Some(&header) = segment.get(pos) {
        pos += 1;
        let n = header as i8;
        if n >= 0 {
            let run = n as usize + 1;
            out += run.min(segment.len() - pos);
            pos += run;
        } else if n != -128 {
            if pos < segment.len() {
                out += (1 - isize::from(n)) as usize;
            }
            pos += 1;
        }
    }
    out
}

/// One JPEG image: where it is and its frame header (ITU-T T.81 §B.2.2).
#[derive(Debug, PartialEq, Eq)]
struct JpegFrame {
    /// Byte range from its SOI to its EOI (or the end of the data).
    start: usize,
    end: usize,
    /// The SOF marker code (0xC0–0xCF).
    marker: u8,
    precision: u8,
    rows: u16,
    cols: u16,
    /// Sampling factors (H << 4 | V), one per component.
    sampling: Vec<u8>,
}

/// JPEG (all fragments concatenated, as the adapter decodes them) against
/// the attributes: one image per frame, each a Huffman non-hierarchical
/// process matching the transfer syntax (lossy: SOF0/SOF1; lossless: SOF3)
/// with the image's rows, columns and components, a precision that fits
/// Bits Allocated (≤ 8 for 8, > 8 for 16: jpeg-decoder emits one byte per
/// sample up to 8 bits) and, for lossless, no subsampling.
fn check_jpeg(data: &[u8], g: &Geometry, lossy: bool) -> Result<Vec<JpegFrame>, String> {
    let frames = jpeg_frames(data)?;
    if frames.len() != g.frames as usize {
        return Err(format!(
            "{} JPEG images for {} frames",
            frames.len(),
            g.frames
        ));
    }
    for (i, f) in frames.iter().enumerate() {
        let allowed: &[u8] = if lossy { &[0xC0, 0xC1] } else { &[0xC3] };
        if !allowed.contains(&f.marker) {
            return Err(format!(
                "frame {i}: JPEG process SOF{} does not belong to this transfer syntax",
                f.marker - 0xC0
            ));
        }
        if (f.rows, f.cols, f.sampling.len()) != (g.rows, g.cols, usize::from(g.samples)) {
            return Err(format!(
                "frame {i}: JPEG image is {}×{}×{}, the attributes say {}×{}×{}",
                f.rows,
                f.cols,
                f.sampling.len(),
                g.rows,
                g.cols,
                g.samples
            ));
        }
        if (f.precision <= 8) != (g.bits_allocated == 8) {
            return Err(format!(
                "frame {i}: JPEG precision {} does not fit Bits Allocated {}",
                f.precision, g.bits_allocated
            ));
        }
        if !lossy && f.sampling.iter().any(|&s| s != 0x11) {
            return Err(format!("frame {i}: subsampled lossless JPEG"));
        }
    }
    Ok(frames)
}

/// Whether an image decoded by the isolated decoder is what the dataset
/// says (PS3.5 §8.2.4, §8.2.3, §8.2.1: the codestream's size, components
/// and precision must agree with Rows, Columns, Samples per Pixel and Bits
/// Allocated).
fn check_isolated(image: &crate::isolated::DecodedImage, g: &Geometry) -> Result<(), String> {
    if image.width != u32::from(g.cols) || image.height != u32::from(g.rows) {
        return Err(format!(
            "codestream of {}×{} for an image of {}×{}",
            image.width, image.height, g.cols, g.rows
        ));
    }
    if image.components != g.samples {
        return Err(format!(
            "{} components for Samples per Pixel {}",
            image.components, g.samples
        ));
    }
    if (image.precision <= 8) != (g.bits_allocated == 8) {
        return Err(format!(
            "precision {} does not fit Bits Allocated {}",
            image.precision, g.bits_allocated
        ));
    }
    let expected = g.frame_bytes();
    if image.samples.len() as u64 != expected {
        return Err(format!(
            "{} bytes decoded, {expected} expected",
            image.samples.len()
        ));
    }
    Ok(())
}

/// Decodes each checked image with jpeg-decoder and appends its samples,
/// interleaved and little endian, to `out`.
fn decode_jpeg(
    data: &[u8],
    images: &[JpegFrame],
    g: &Geometry,
    colour: Option<jpeg_decoder::ColorTransform>,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let frame_bytes = usize::try_from(g.frame_bytes()).map_err(|e| e.to_string())?;
    for (i, image) in images.iter().enumerate() {
        let bytes = data.get(image.start..image.end).unwrap_or_default();
        let mut decoder = jpeg_decoder::Decoder::new(bytes);
        decoder.set_max_decoding_buffer_size(frame_bytes);
        if let Some(colour) = colour {
            decoder.set_color_transform(colour);
        }
        let mut samples = catch_unwind(AssertUnwindSafe(|| decoder.decode()))
            .map_err(|_| format!("frame {i}: the JPEG decoder panicked"))?
            .map_err(|e| format!("frame {i}: {e}"))?;
        if samples.len() != frame_bytes {
            return Err(format!(
                "frame {i}: {} bytes decoded, {frame_bytes} expected",
                samples.len()
            ));
        }
        if cfg!(target_endian = "big") && g.bits_allocated == 16 {
            // jpeg-decoder emits samples of more than 8 bits in native order
            samples.chunks_exact_mut(2).for_each(|s| s.swap(0, 1));
        }
        out.extend_from_slice(&samples);
    }
    Ok(())
}

/// The frame header of every JPEG image in `data`: each image starts at an
/// SOI marker (bytes between images, e.g. fragment padding, are skipped as
/// the adapter does) and ends at EOI or at the end of the data. Marker
/// segments are skipped by their length, entropy-coded data up to the next
/// marker that is not a stuffed 0xFF00 or an RSTn (T.81 §B.1.1.5).
fn jpeg_frames(data: &[u8]) -> Result<Vec<JpegFrame>, String> {
    let mut frames = Vec::new();
    let mut pos = 0usize;
    while let Some(start) = find_soi(data, pos) {
        pos = start + 2;
        let mut frame = None;
        loop {
            match data.get(pos) {
                None => break,
                Some(0xFF) => {}
                Some(b) => {
                    return Err(format!(
                        "JPEG marker expected at offset {pos}, found 0x{b:02X}"
                    ))
                }
            }
            while data.get(pos) == Some(&0xFF) {
                pos += 1; // fill bytes
            }
            let Some(&code) = data.get(pos) else { break };
            pos += 1;
            match code {
                0xD9 => break,           // EOI
                0x01 | 0xD0..=0xD7 => {} // TEM, RSTn: no length
                0x00 | 0xD8 => {
                    return Err(format!(
                        "unexpected JPEG marker 0xFF{code:02X} at offset {pos}"
                    ))
                }
                _ => {
                    let len = data
                        .get(pos..pos + 2)
                        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
                        .ok_or_else(|| format!("JPEG segment length cut at offset {pos}"))?;
                    let body = data
                        .get(pos + 2..pos + len)
                        .filter(|_| len >= 2)
                        .ok_or_else(|| format!("JPEG segment at offset {pos} out of bounds"))?;
                    if matches!(code, 0xC0..=0xCF) && !matches!(code, 0xC4 | 0xC8 | 0xCC) {
                        if frame.is_some() {
                            return Err("two JPEG frame headers in one image".into());
                        }
                        frame = Some(parse_sof(code, body)?);
                    }
                    pos += len;
                    if code == 0xDA {
                        pos = skip_entropy_coded(data, pos);
                    }
                }
            }
        }
        let n = frames.len();
        let (marker, precision, rows, cols, sampling) =
            frame.ok_or_else(|| format!("JPEG image {n} has no frame header"))?;
        frames.push(JpegFrame {
            start,
            end: pos.min(data.len()),
            marker,
            precision,
            rows,
            cols,
            sampling,
        });
    }
    Ok(frames)
}

fn find_soi(data: &[u8], from: usize) -> Option<usize> {
    data.get(from..)?
        .windows(2)
        .position(|w| w == [0xFF, 0xD8])
        .map(|p| from + p)
}

/// Position of the first marker after entropy-coded data starting at `pos`.
fn skip_entropy_coded(data: &[u8], mut pos: usize) -> usize {
    while let Some(&b) = data.get(pos) {
        if b == 0xFF {
            match data.get(pos + 1) {
                Some(0x00 | 0xD0..=0xD7) => pos += 2,
                _ => return pos,
            }
        } else {
            pos += 1;
        }
    }
    pos
}

/// Marker, precision, rows, columns and sampling factors of a frame header.
type FrameHeader = (u8, u8, u16, u16, Vec<u8>);

fn parse_sof(marker: u8, body: &[u8]) -> Result<FrameHeader, String> {
    let (Some(&precision), Some(rows), Some(cols), Some(&count)) =
        (body.first(), body.get(1..3), body.get(3..5), body.get(5))
    else {
        return Err("JPEG frame header too short".into());
    };
    let components = body
        .get(6..6 + 3 * usize::from(count))
        .ok_or("JPEG frame header too short for its components")?;
    Ok((
        marker,
        precision,
        u16::from_be_bytes([rows[0], rows[1]]),
        u16::from_be_bytes([cols[0], cols[1]]),
        components.chunks_exact(3).map(|c| c[1]).collect(),
    ))
}

/// The encapsulated pixel data of one dataset, as dicom-rs's RLE adapter
/// reads it; the attributes come from the checked [`Geometry`].
struct Encapsulated<'a> {
    ts: &'a str,
    g: Geometry,
    photometric: Option<&'a str>,
    fragments: &'a [Vec<u8>],
    offset_table: &'a [u32],
}

impl PixelDataObject for Encapsulated<'_> {
    fn transfer_syntax_uid(&self) -> &str {
        self.ts
    }

    fn rows(&self) -> Option<u16> {
        Some(self.g.rows)
    }

    fn cols(&self) -> Option<u16> {
        Some(self.g.cols)
    }

    fn samples_per_pixel(&self) -> Option<u16> {
        Some(self.g.samples)
    }

    fn bits_allocated(&self) -> Option<u16> {
        Some(self.g.bits_allocated)
    }

    fn bits_stored(&self) -> Option<u16> {
        Some(self.g.bits_stored)
    }

    fn photometric_interpretation(&self) -> Option<&str> {
        self.photometric
    }

    fn number_of_frames(&self) -> Option<u32> {
        Some(self.g.frames)
    }

    fn number_of_fragments(&self) -> Option<u32> {
        u32::try_from(self.fragments.len()).ok()
    }

    fn fragment(&self, fragment: usize) -> Option<Cow<'_, [u8]>> {
        self.fragments
            .get(fragment)
            .map(|f| Cow::Borrowed(f.as_slice()))
    }

    fn offset_table(&self) -> Option<Cow<'_, [u32]>> {
        Some(Cow::Borrowed(self.offset_table))
    }

    fn raw_pixel_data(&self) -> Option<RawPixelData> {
        Some(RawPixelData {
            fragments: self.fragments.iter().cloned().collect(),
            offset_table: self.offset_table.iter().copied().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_to_implicit_and_back_keeps_the_values() {
        let obj = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.3\0"),
            ),
            DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("Doe^John")),
            DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(512_u16)),
            DataElement::new(
                tags::PIXEL_DATA,
                VR::OW,
                PrimitiveValue::from(vec![1u8, 2, 3, 4]),
            ),
        ]);
        let mut evr = Vec::new();
        let Some(ts) = TransferSyntaxRegistry.get(EXPLICIT_VR_LE) else {
            panic!("registry")
        };
        assert!(obj.write_dataset_with_ts(&mut evr, ts).is_ok());
        let ivr = transcode(&evr, EXPLICIT_VR_LE, IMPLICIT_VR_LE).unwrap_or_default();
        assert_ne!(ivr, evr);
        // implicit VR: the 4-byte length follows the tag directly
        assert_eq!(&ivr[..8], &[0x08, 0x00, 0x18, 0x00, 6, 0, 0, 0]);
        assert_eq!(
            transcode(&ivr, IMPLICIT_VR_LE, EXPLICIT_VR_LE).unwrap_or_default(),
            evr
        );
        assert!(transcode(&evr, EXPLICIT_VR_LE, EXPLICIT_VR_LE).is_err());
    }

    #[test]
    fn pairs() {
        for from in [
            RLE_LOSSLESS,
            JPEG_BASELINE,
            JPEG_EXTENDED,
            JPEG_LOSSLESS,
            JPEG_LOSSLESS_SV1,
        ] {
            assert!(can_transcode(from, EXPLICIT_VR_LE), "{from}");
            assert!(can_transcode(from, IMPLICIT_VR_LE), "{from}");
            assert!(!can_transcode(from, EXPLICIT_VR_BE), "{from}");
            assert!(!can_transcode(EXPLICIT_VR_LE, from), "{from}");
        }
        // JPEG 2000 needs the isolated decoder, which no library test
        // registers.
        for from in [
            "1.2.840.10008.1.2.4.80", // JPEG-LS
            "1.2.840.10008.1.2.4.90", // JPEG 2000
            "1.2.840.10008.1.2.4.91",
        ] {
            assert!(!can_transcode(from, EXPLICIT_VR_LE), "{from}");
        }
        assert!(can_transcode(DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE));
        assert!(!can_transcode(EXPLICIT_VR_LE, DEFLATED_EXPLICIT_VR_LE));
    }

    #[test]
    fn packbits_lengths() {
        // literal of 3, replicate 5 × 0x07, no-op, literal cut short
        assert_eq!(packbits_len(&[2, 1, 2, 3, 0xFC, 7, 0x80, 4, 9]), 3 + 5 + 1);
        // replicate run without its byte
        assert_eq!(packbits_len(&[0xFF]), 0);
        assert_eq!(packbits_len(&[]), 0);
    }

    fn geometry(rows: u16, cols: u16, samples: u16, bits: u16, frames: u32) -> Geometry {
        Geometry {
            rows,
            cols,
            samples,
            bits_allocated: bits,
            bits_stored: bits,
            frames,
        }
    }

    #[test]
    fn rle_header_is_checked_before_the_adapter_sees_it() {
        let g = geometry(2, 2, 1, 8, 1);
        let mut ok = vec![0u8; 64];
        ok[0] = 1;
        ok[4] = 64;
        ok.extend_from_slice(&[0xFD, 9]); // 4 × 9
        assert_eq!(check_rle(std::slice::from_ref(&ok), &g), Ok(()));
        let short = ok[..63].to_vec();
        assert!(check_rle(&[short], &g).is_err());
        let mut many = ok.clone();
        many[0] = 15;
        assert!(check_rle(&[many], &g).is_err());
        let mut offset = ok.clone();
        offset[4] = 0xFF;
        offset[5] = 0xFF;
        assert!(check_rle(&[offset], &g).is_err());
        let mut cut = ok.clone();
        cut[64] = 0xFE; // 3 bytes < 4 pixels
        assert!(check_rle(&[cut], &g).is_err());
        assert!(
            check_rle(&[ok.clone(), ok], &g).is_err(),
            "two fragments, one frame"
        );
    }

    /// A minimal JPEG: SOI, SOF (given), SOS with two entropy bytes including
    /// a stuffed 0xFF00 and an RST, EOI.
    fn jpeg(marker: u8, precision: u8, rows: u16, cols: u16, sampling: &[u8]) -> Vec<u8> {
        let mut j = vec![0xFF, 0xD8, 0xFF, marker];
        let len = 8 + 3 * sampling.len() as u16;
        j.extend_from_slice(&len.to_be_bytes());
        j.push(precision);
        j.extend_from_slice(&rows.to_be_bytes());
        j.extend_from_slice(&cols.to_be_bytes());
        j.push(sampling.len() as u8);
        for (i, s) in sampling.iter().enumerate() {
            j.extend_from_slice(&[i as u8 + 1, *s, 0]);
        }
        j.extend_from_slice(&[0xFF, 0xDA, 0, 2, 0x12, 0xFF, 0x00, 0xFF, 0xD0, 0x34]);
        j.extend_from_slice(&[0xFF, 0xD9]);
        j
    }

    #[test]
    fn jpeg_frame_headers_must_match_the_attributes() {
        let g = geometry(64, 32, 1, 16, 2);
        let one = jpeg(0xC3, 16, 64, 32, &[0x11]);
        let mut two = one.clone();
        two.push(0); // fragment padding between images
        two.extend_from_slice(&one);
        assert_eq!(check_jpeg(&two, &g, false).map(|f| f.len()), Ok(2));
        assert!(
            check_jpeg(&one, &g, false).is_err(),
            "one image for two frames"
        );
        assert!(
            check_jpeg(&two, &g, true).is_err(),
            "lossless in a lossy syntax"
        );
        let huge = [one.clone(), jpeg(0xC3, 16, 0xFFFF, 0xFFFF, &[0x11])].concat();
        assert!(
            check_jpeg(&huge, &g, false).is_err(),
            "frame header larger than the image"
        );
        let eight = [one.clone(), jpeg(0xC3, 8, 64, 32, &[0x11])].concat();
        assert!(
            check_jpeg(&eight, &g, false).is_err(),
            "8-bit samples in 16 bits"
        );
        let g = geometry(8, 8, 3, 8, 1);
        assert!(check_jpeg(&jpeg(0xC0, 8, 8, 8, &[0x22, 0x11, 0x11]), &g, true).is_ok());
        assert!(check_jpeg(&jpeg(0xC3, 8, 8, 8, &[0x22, 0x11, 0x11]), &g, false).is_err());
        let mut cut = jpeg(0xC0, 8, 8, 8, &[0x11, 0x11, 0x11]);
        cut.truncate(8); // inside the frame header
        assert!(check_jpeg(&cut, &g, true).is_err());
        assert!(check_jpeg(&[0xFF, 0xD8, 0x12], &g, true).is_err());
    }

    /// One RLE fragment: the header, then each segment as literal runs.
    fn rle_fragment(segments: &[Vec<u8>]) -> Vec<u8> {
        let coded: Vec<Vec<u8>> = segments
            .iter()
            .map(|s| {
                s.chunks(128)
                    .flat_map(|c| std::iter::once(c.len() as u8 - 1).chain(c.iter().copied()))
                    .collect()
            })
            .collect();
        let mut header = vec![0u8; 64];
        header[..4].copy_from_slice(&(segments.len() as u32).to_le_bytes());
        let mut at = 64u32;
        for (i, c) in coded.iter().enumerate() {
            header[4 + 4 * i..8 + 4 * i].copy_from_slice(&at.to_le_bytes());
            at += c.len() as u32;
        }
        header.extend(coded.concat());
        header
    }

    #[test]
    fn rle_32_bit_is_decoded_most_significant_segment_first() {
        // 1 × 2 pixels, 1 sample, 32 bits: values 0x01020304, 0xA0B0C0D0
        let g = geometry(1, 2, 1, 32, 1);
        let frag = rle_fragment(&[
            vec![0x01, 0xA0],
            vec![0x02, 0xB0],
            vec![0x03, 0xC0],
            vec![0x04, 0xD0],
        ]);
        assert_eq!(check_rle(std::slice::from_ref(&frag), &g), Ok(()));
        let mut out = Vec::new();
        decode_rle_32(&[frag], &g, &mut out).expect("decoded");
        let mut want = 0x0102_0304u32.to_le_bytes().to_vec();
        want.extend(0xA0B0_C0D0u32.to_le_bytes());
        assert_eq!(out, want);
        // a replicate run: 3 × 7, stopped at the pixels wanted
        let mut run = Vec::new();
        packbits_decode(&[0xFE, 7, 0x00, 9], 2, &mut run);
        assert_eq!(run, vec![7, 7]);
    }

    #[test]
    fn oversized_image_is_refused_before_decoding() {
        let g = geometry(0xFFFF, 0xFFFF, 3, 16, 1);
        assert!(g.checked_total().is_err());
        let g = geometry(512, 512, 1, 16, 10_000);
        assert!(g.checked_total().is_err());
        assert_eq!(geometry(512, 512, 1, 16, 2).checked_total(), Ok(1 << 20));
    }
}
