//! WADO-RS Frames (PS3.18 §10.4.1.1.3, `…/instances/{sop}/frames/{list}`):
//! the pixel data of selected frames: [`frames`] as stored (native frames
//! little endian, compressed ones as their codestream),
//! [`native_frames`] decoded to native pixel data (Explicit VR Little
//! Endian, the default of PS3.18 §8.7.3.5.2 for frames), and
//! [`frame_media_type`] the media type of a compressed frame
//! (`image/jls`, `image/jp2`… Table 8.7.3-5).
//!
//! ## How frames are found
//!
//! **Native** pixel data (PS3.5 §8.1.1): frame *n* is bytes
//! `(n − 1) × F .. n × F` with F = Rows × Columns × Samples per Pixel ×
//! Bits Allocated / 8; the end of every requested frame is checked against
//! the bytes present, so crafted attributes give an error, not a read out of
//! bounds. Samples come out little endian (the byte order of the
//! uncompressed transfer syntaxes in use; Explicit VR Big Endian is retired),
//! so native frames are labelled Explicit VR Little Endian
//! ([`frame_transfer_syntax`]). Bits Allocated must be a multiple of 8, or 1 (packed bits, PS3.5 §8.1.1)
//! when a frame is a whole number of bytes.
//!
//! **Encapsulated** pixel data (PS3.5 §A.4), in this order:
//! 1. one frame: every fragment, concatenated;
//! 2. an Extended Offset Table (7FE0,0001) or a non-empty Basic Offset
//!    Table with one offset per frame: the offsets (from the first byte of
//!    the first fragment's Item tag, PS3.5 §A.4.1) must each land on the
//!    Item tag of a fragment, the first at 0, increasing; frame *n* is the
//!    fragments from its offset up to the next frame's;
//! 3. an empty Basic Offset Table and as many fragments as frames: one
//!    fragment per frame (always the case for RLE, PS3.5 §A.4.2);
//! 4. an empty Basic Offset Table and more fragments than frames: a fragment
//!    that begins with a codestream start — JPEG SOI `FF D8` (JPEG, JPEG-LS),
//!    JPEG 2000 SOC+SIZ `FF 4F FF 51` or a JP2 signature box — starts a
//!    frame, the fragments up to the next such start continue it (PS3.5
//!    §A.4: a fragment never holds data of two frames); this must give
//!    exactly Number of Frames frames.
//!
//! Anything else (fewer fragments than frames, offsets between fragments,
//! RLE with more fragments than frames, a count that does not add up) is
//! [`DicomWebError::InvalidImage`]. A multi-fragment frame is returned as
//! its fragments concatenated, which is the frame's codestream.

use dicom_core::header::Header;
use dicom_core::value::PixelFragmentSequence;
use dicom_core::{DataElement, DicomValue, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use bastion_archive::transcode::{
    can_transcode, transcode, EXPLICIT_VR_BE, EXPLICIT_VR_LE, MAX_DECODED_PIXEL_BYTES,
};

use crate::pixel::{parse_dataset, Geometry};
use crate::DicomWebError;

/// The pixel data of frames `numbers` (1-based, in the order asked,
/// repeats allowed) of a dataset stored in transfer syntax `ts_uid` (the
/// dataset bytes as stored, no Part 10 header). See the module docs for how
/// frames are found.
///
/// # Errors
/// - [`DicomWebError::InvalidParameter`]: `numbers` is empty, or the frames
///   asked add up to more than `MAX_DECODED_PIXEL_BYTES` (1 GiB);
/// - [`DicomWebError::FrameNotFound`]: a number is 0 or above Number of
///   Frames (→ 404);
/// - [`DicomWebError::NoPixelData`]; [`DicomWebError::InvalidImage`] (the
///   attributes contradict the pixel data); [`DicomWebError::Unsupported`]
///   (Bits Allocated not a multiple of 8, native); [`DicomWebError::InvalidDataset`].
pub fn frames(
    dataset: &[u8],
    ts_uid: &str,
    numbers: &[u32],
) -> Result<Vec<Vec<u8>>, DicomWebError> {
    if numbers.is_empty() {
        return Err(DicomWebError::InvalidParameter {
            name: "frame list".into(),
            reason: "no frame number".into(),
        });
    }
    let (obj, g) = with_frames(dataset, ts_uid, numbers)?;
    let pixel_data = obj
        .get(tags::PIXEL_DATA)
        .ok_or(DicomWebError::NoPixelData)?;
    let too_many = || DicomWebError::InvalidParameter {
        name: "frame list".into(),
        reason: format!("the frames asked exceed {MAX_DECODED_PIXEL_BYTES} bytes"),
    };
    match pixel_data.value() {
        DicomValue::Primitive(p) => {
            let bytes = p.to_bytes();
            let frame_len = g.frame_bytes()?;
            // Every frame asked must lie within the bytes present (crafted
            // Rows/Columns), then their total within the cap.
            let ranges = numbers
                .iter()
                .map(|n| {
                    let start = u64::from(n - 1) * frame_len;
                    let end = start + frame_len;
                    usize::try_from(start)
                        .ok()
                        .zip(usize::try_from(end).ok())
                        .filter(|(_, e)| *e <= bytes.len())
                        .map(|(s, e)| s..e)
                        .ok_or_else(|| {
                            DicomWebError::InvalidImage(format!(
                                "frame {n} ends at byte {end}, the pixel data has {}",
                                bytes.len()
                            ))
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            frame_len
                .checked_mul(numbers.len() as u64)
                .filter(|t| *t <= MAX_DECODED_PIXEL_BYTES)
                .ok_or_else(too_many)?;
            Ok(ranges.into_iter().map(|r| bytes[r].to_vec()).collect())
        }
        DicomValue::PixelSequence(seq) => {
            let extended = extended_offsets(&obj);
            let groups = frame_fragments(
                seq.fragments(),
                seq.offset_table(),
                extended.as_deref(),
                g.frames,
                ts_uid == uids::RLE_LOSSLESS,
            )?;
            let mut total = 0u64;
            let mut out = Vec::with_capacity(numbers.len());
            for n in numbers {
                let range = groups[(n - 1) as usize].clone();
                let frame: Vec<u8> = seq.fragments()[range].concat();
                total += frame.len() as u64;
                if total > MAX_DECODED_PIXEL_BYTES {
                    return Err(too_many());
                }
                out.push(frame);
            }
            Ok(out)
        }
        DicomValue::Sequence(_) => Err(DicomWebError::InvalidImage(
            "Pixel Data is a sequence".into(),
        )),
    }
}

/// The transfer syntax of the frames [`frames`] returns for an instance
/// stored in `stored_ts` (the `transfer-syntax` parameter of each part's
/// Content-Type, PS3.18 §8.7.3.3.2): Explicit VR Little Endian for the
/// uncompressed syntaxes, the stored one otherwise.
pub fn frame_transfer_syntax(stored_ts: &str) -> &str {
    match stored_ts {
        uids::IMPLICIT_VR_LITTLE_ENDIAN
        | uids::EXPLICIT_VR_LITTLE_ENDIAN
        | uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
        | EXPLICIT_VR_BE => uids::EXPLICIT_VR_LITTLE_ENDIAN,
        other => other,
    }
}

/// Whether `ts` is an uncompressed (native) transfer syntax.
fn is_native(ts: &str) -> bool {
    matches!(
        ts,
        uids::IMPLICIT_VR_LITTLE_ENDIAN
            | uids::EXPLICIT_VR_LITTLE_ENDIAN
            | uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
            | EXPLICIT_VR_BE
    )
}

/// Whether frames of an instance stored in `stored_ts` can be returned as
/// native pixel data (Explicit VR Little Endian, PS3.18 §8.7.3.5.2, the
/// default transfer syntax of frames): stored uncompressed, or in a
/// compressed syntax `bastion_archive::transcode` decodes.
pub fn can_return_native(stored_ts: &str) -> bool {
    is_native(stored_ts) || can_transcode(stored_ts, EXPLICIT_VR_LE)
}

/// The parsed dataset and its image geometry, with pixel data present and
/// every frame of `numbers` within Number of Frames.
fn with_frames(
    dataset: &[u8],
    ts_uid: &str,
    numbers: &[u32],
) -> Result<(InMemDicomObject, Geometry), DicomWebError> {
    let obj = parse_dataset(dataset, ts_uid)?;
    if obj.get(tags::PIXEL_DATA).is_none() {
        return Err(DicomWebError::NoPixelData);
    }
    let g = Geometry::of(&obj)?;
    for n in numbers {
        g.check_frame(*n)?;
    }
    Ok((obj, g))
}

/// The frames `numbers` (as [`frames`]) as native pixel data, little
/// endian (Explicit VR Little Endian): a compressed instance is decoded
/// first by `bastion_archive::transcode` (the whole instance, then the
/// frames taken from it), with the same decoders and caps as C-GET.
///
/// # Errors
/// As [`frames`]; [`DicomWebError::Unsupported`] when the stored syntax is
/// not decoded ([`can_return_native`] is false); [`DicomWebError::InvalidImage`]
/// when decoding fails (the reason, no patient data).
pub fn native_frames(
    dataset: &[u8],
    ts_uid: &str,
    numbers: &[u32],
) -> Result<Vec<Vec<u8>>, DicomWebError> {
    if is_native(ts_uid) {
        return frames(dataset, ts_uid, numbers);
    }
    if !can_transcode(ts_uid, EXPLICIT_VR_LE) {
        return Err(DicomWebError::Unsupported(format!(
            "pixel data in transfer syntax {ts_uid} is not decoded"
        )));
    }
    // Frame numbers are checked before the (costly) decoding.
    if numbers.is_empty() {
        return frames(dataset, ts_uid, numbers);
    }
    let (obj, g) = with_frames(dataset, ts_uid, numbers)?;
    // Decoded sizes within the cap before anything is decoded (a decoded
    // frame has at most Rows × Columns × Samples × Bits Allocated / 8 bytes).
    let decoded = u64::from(g.rows)
        * u64::from(g.cols)
        * u64::from(g.samples)
        * u64::from(g.bits_allocated.div_ceil(8));
    decoded
        .checked_mul(numbers.len() as u64)
        .filter(|t| *t <= MAX_DECODED_PIXEL_BYTES)
        .ok_or_else(|| DicomWebError::InvalidParameter {
            name: "frame list".into(),
            reason: format!("the frames asked exceed {MAX_DECODED_PIXEL_BYTES} bytes"),
        })?;
    // Each frame decoded alone when its fragments can be told apart, so a
    // frame of a long multi-frame image does not cost decoding them all.
    let mut out = Vec::with_capacity(numbers.len());
    for n in numbers {
        match decode_one_frame(&obj, ts_uid, &g, *n)? {
            Some(native) => out.extend(frames(&native, EXPLICIT_VR_LE, &[1])?),
            None => {
                let native = decode_all(dataset, ts_uid)?;
                return frames(&native, EXPLICIT_VR_LE, numbers);
            }
        }
    }
    Ok(out)
}

/// The whole instance decoded to Explicit VR Little Endian.
fn decode_all(dataset: &[u8], ts_uid: &str) -> Result<Vec<u8>, DicomWebError> {
    transcode(dataset, ts_uid, EXPLICIT_VR_LE).map_err(decode_error)
}

/// A decoding failure: the dataset itself is valid, so say what failed in
/// decoding, without the "not a valid DICOM dataset" prefix.
pub(crate) fn decode_error(e: bastion_archive::ArchiveError) -> DicomWebError {
    DicomWebError::InvalidImage(match e {
        bastion_archive::ArchiveError::NotDicom(m) => m,
        other => other.to_string(),
    })
}

/// Frame `n` (1-based, checked) of an encapsulated multi-frame dataset
/// `obj` stored in `ts`, decoded alone: a dataset with the same attributes,
/// Number of Frames 1 and only that frame's fragments (found as
/// [`frames`] finds them; offset tables dropped) goes through
/// `bastion_archive::transcode` to Explicit VR Little Endian. `None` for a
/// single frame or when the frames cannot be delimited by fragments (the
/// caller then decodes the whole instance, whose decoders split the
/// codestreams themselves).
pub(crate) fn decode_one_frame(
    obj: &InMemDicomObject,
    ts: &str,
    g: &Geometry,
    n: u32,
) -> Result<Option<Vec<u8>>, DicomWebError> {
    let Some(DicomValue::PixelSequence(seq)) = obj.get(tags::PIXEL_DATA).map(|e| e.value()) else {
        return Ok(None);
    };
    if g.frames <= 1 {
        return Ok(None);
    }
    let extended = extended_offsets(obj);
    let Ok(groups) = frame_fragments(
        seq.fragments(),
        seq.offset_table(),
        extended.as_deref(),
        g.frames,
        ts == uids::RLE_LOSSLESS,
    ) else {
        return Ok(None);
    };
    let Some(range) = groups.get((n - 1) as usize).cloned() else {
        return Ok(None);
    };
    let fragments: Vec<Vec<u8>> = seq.fragments()[range].to_vec();
    let mut one = InMemDicomObject::from_element_iter(
        obj.iter()
            .filter(|e| {
                !matches!(
                    e.tag(),
                    tags::PIXEL_DATA
                        | tags::NUMBER_OF_FRAMES
                        | tags::EXTENDED_OFFSET_TABLE
                        | tags::EXTENDED_OFFSET_TABLE_LENGTHS
                )
            })
            .cloned(),
    );
    one.put(DataElement::new(
        tags::NUMBER_OF_FRAMES,
        VR::IS,
        PrimitiveValue::from("1"),
    ));
    one.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        DicomValue::PixelSequence(PixelFragmentSequence::new(Vec::<u32>::new(), fragments)),
    ));
    let syntax = TransferSyntaxRegistry
        .get(ts)
        .ok_or_else(|| DicomWebError::Unsupported(format!("unknown transfer syntax {ts}")))?;
    let mut bytes = Vec::new();
    one.write_dataset_with_ts(&mut bytes, syntax)
        .map_err(|e| DicomWebError::InvalidImage(format!("frame {n} cannot be isolated: {e}")))?;
    transcode(&bytes, ts, EXPLICIT_VR_LE)
        .map(Some)
        .map_err(decode_error)
}

/// The media type of a frame kept in its stored compressed transfer syntax
/// (PS3.18 §8.7.3.5.2, Table 8.7.3-5): `image/jpeg`, `image/jls`,
/// `image/jp2`, `image/jpx`, `image/jphc`, `image/dicom-rle`; `None` for the
/// uncompressed syntaxes (`application/octet-stream`) and the others.
pub fn frame_media_type(ts: &str) -> Option<&'static str> {
    Some(match ts {
        "1.2.840.10008.1.2.4.50"
        | "1.2.840.10008.1.2.4.51"
        | "1.2.840.10008.1.2.4.57"
        | "1.2.840.10008.1.2.4.70" => "image/jpeg",
        "1.2.840.10008.1.2.4.80" | "1.2.840.10008.1.2.4.81" => "image/jls",
        "1.2.840.10008.1.2.4.90" | "1.2.840.10008.1.2.4.91" => "image/jp2",
        "1.2.840.10008.1.2.4.92" | "1.2.840.10008.1.2.4.93" => "image/jpx",
        "1.2.840.10008.1.2.4.201" | "1.2.840.10008.1.2.4.202" | "1.2.840.10008.1.2.4.203" => {
            "image/jphc"
        }
        uids::RLE_LOSSLESS => "image/dicom-rle",
        _ => return None,
    })
}

/// Extended Offset Table (7FE0,0001), 64-bit little-endian offsets.
fn extended_offsets(obj: &InMemDicomObject) -> Option<Vec<u64>> {
    let e = obj.get(tags::EXTENDED_OFFSET_TABLE)?;
    let bytes = e.value().to_bytes().ok()?;
    let offsets: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    (!offsets.is_empty()).then_some(offsets)
}

/// For each frame, the range of its fragments (see the module docs).
fn frame_fragments(
    fragments: &[Vec<u8>],
    bot: &[u32],
    extended: Option<&[u64]>,
    frames: u32,
    rle: bool,
) -> Result<Vec<std::ops::Range<usize>>, DicomWebError> {
    let frames = frames as usize;
    let bad = |m: String| DicomWebError::InvalidImage(m);
    if fragments.is_empty() {
        return Err(bad("encapsulated pixel data without fragments".into()));
    }
    if frames == 1 {
        return Ok(std::iter::once(0..fragments.len()).collect());
    }
    let offsets: Option<Vec<u64>> = match extended {
        Some(e) => Some(e.to_vec()),
        None if !bot.is_empty() => Some(bot.iter().map(|o| u64::from(*o)).collect()),
        None => None,
    };
    if let Some(offsets) = offsets {
        if offsets.len() != frames {
            return Err(bad(format!(
                "{} offsets for {frames} frames",
                offsets.len()
            )));
        }
        // Position of each fragment's Item tag from the first one.
        let mut starts = Vec::with_capacity(fragments.len());
        let mut pos = 0u64;
        for f in fragments {
            starts.push(pos);
            pos += 8 + f.len() as u64;
        }
        let mut firsts = Vec::with_capacity(frames);
        for (i, off) in offsets.iter().enumerate() {
            let idx = starts.binary_search(off).map_err(|_| {
                bad(format!(
                    "offset of frame {} does not point at a fragment",
                    i + 1
                ))
            })?;
            if (i == 0 && idx != 0) || firsts.last().is_some_and(|prev| *prev >= idx) {
                return Err(bad("offset table not increasing from 0".into()));
            }
            firsts.push(idx);
        }
        return Ok(ranges(&firsts, fragments.len()));
    }
    if fragments.len() == frames {
        return Ok((0..frames).map(|i| i..i + 1).collect());
    }
    if fragments.len() < frames || rle {
        return Err(bad(format!(
            "{} fragments for {frames} frames and no offset table",
            fragments.len()
        )));
    }
    let firsts: Vec<usize> = fragments
        .iter()
        .enumerate()
        .filter(|(_, f)| starts_codestream(f))
        .map(|(i, _)| i)
        .collect();
    if firsts.len() != frames || firsts.first() != Some(&0) {
        return Err(bad(format!(
            "{} fragments, {} codestream starts, {frames} frames: frames cannot be delimited",
            fragments.len(),
            firsts.len()
        )));
    }
    Ok(ranges(&firsts, fragments.len()))
}

fn ranges(firsts: &[usize], fragments: usize) -> Vec<std::ops::Range<usize>> {
    firsts
        .iter()
        .enumerate()
        .map(|(i, start)| *start..firsts.get(i + 1).copied().unwrap_or(fragments))
        .collect()
}

/// Whether a fragment begins a codestream: JPEG SOI, JPEG 2000 SOC+SIZ, or
/// a JP2 signature box.
fn starts_codestream(fragment: &[u8]) -> bool {
    fragment.starts_with(&[0xFF, 0xD8])
        || bastion_archive::isolated::starts_j2k_codestream(fragment)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frags(sizes: &[(usize, u8)]) -> Vec<Vec<u8>> {
        sizes
            .iter()
            .map(|(n, first)| {
                let mut v = vec![0u8; *n];
                if *first == 1 {
                    v[0] = 0xFF;
                    v[1] = 0xD8;
                }
                v
            })
            .collect()
    }

    #[test]
    fn basic_offset_table() {
        let f = frags(&[(4, 1), (6, 0), (2, 1), (4, 1)]);
        // frame 1: fragments 0-1 (12 + 14 bytes), frame 2: 2, frame 3: 3
        let r = frame_fragments(&f, &[0, 26, 36], None, 3, false).expect("valid");
        assert_eq!(r, vec![0..2, 2..3, 3..4]);
        assert!(frame_fragments(&f, &[0, 25, 36], None, 3, false).is_err());
        assert!(frame_fragments(&f, &[0, 36, 26], None, 3, false).is_err());
        assert!(frame_fragments(&f, &[4, 26, 36], None, 3, false).is_err());
        assert!(frame_fragments(&f, &[0, 26], None, 3, false).is_err());
        let r = frame_fragments(&f, &[], Some(&[0, 26, 36]), 3, false).expect("valid");
        assert_eq!(r, vec![0..2, 2..3, 3..4]);
    }

    #[test]
    fn empty_offset_table() {
        let f = frags(&[(4, 1), (6, 0), (2, 1), (4, 1)]);
        assert_eq!(
            frame_fragments(&f, &[], None, 3, false).expect("markers"),
            vec![0..2, 2..3, 3..4]
        );
        assert_eq!(
            frame_fragments(&f, &[], None, 4, false).expect("one each"),
            vec![0..1, 1..2, 2..3, 3..4]
        );
        assert_eq!(
            frame_fragments(&f, &[], None, 1, false).expect("all"),
            vec![0..4]
        );
        assert!(frame_fragments(&f, &[], None, 2, false).is_err());
        assert!(frame_fragments(&f, &[], None, 5, false).is_err());
        assert!(frame_fragments(&f, &[], None, 3, true).is_err(), "RLE");
    }

    #[test]
    fn media_types_of_compressed_frames() {
        assert_eq!(
            frame_media_type("1.2.840.10008.1.2.4.80"),
            Some("image/jls")
        );
        assert_eq!(
            frame_media_type("1.2.840.10008.1.2.4.90"),
            Some("image/jp2")
        );
        assert_eq!(
            frame_media_type("1.2.840.10008.1.2.4.51"),
            Some("image/jpeg")
        );
        assert_eq!(
            frame_media_type(uids::RLE_LOSSLESS),
            Some("image/dicom-rle")
        );
        assert_eq!(frame_media_type(uids::EXPLICIT_VR_LITTLE_ENDIAN), None);
        assert!(can_return_native(uids::IMPLICIT_VR_LITTLE_ENDIAN));
        assert!(can_return_native(uids::RLE_LOSSLESS));
        // no isolated decoder registered in library tests
        assert!(!can_return_native("1.2.840.10008.1.2.4.80"));
        assert!(matches!(
            native_frames(&[], "1.2.840.10008.1.2.4.80", &[1]),
            Err(DicomWebError::Unsupported(_))
        ));
    }

    #[test]
    fn transfer_syntax_of_frames() {
        assert_eq!(
            frame_transfer_syntax(uids::IMPLICIT_VR_LITTLE_ENDIAN),
            uids::EXPLICIT_VR_LITTLE_ENDIAN
        );
        assert_eq!(
            frame_transfer_syntax(uids::RLE_LOSSLESS),
            uids::RLE_LOSSLESS
        );
    }
}
