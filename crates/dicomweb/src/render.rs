//! WADO-RS Rendered and Thumbnail resources (PS3.18 §10.4.1.1.4,
//! §10.4.1.1.5; rendering parameters §8.3.5.1): one frame as an 8-bit PNG
//! or JPEG a browser can show.
//!
//! ## Pipeline
//!
//! 1. **Decode.** Native pixel data is read in place. Encapsulated pixel
//!    data is decompressed by `bastion_archive::transcode` (RLE Lossless,
//!    JPEG Baseline/Extended 8-bit/Lossless: the same pure-Rust decoders and
//!    checks as the C-MOVE/C-GET fallback, capped at
//!    `MAX_DECODED_PIXEL_BYTES` before anything is allocated; JPEG 2000 in
//!    the sandboxed child process `serve` registers, as are JPEG-LS and
//!    12-bit JPEG Extended); other syntaxes are
//!    [`DicomWebError::Unsupported`]. RLE at 32 bits allocated too.
//!    A frame of a multi-frame image is decoded alone when its fragments
//!    can be told apart (as [`crate::frames()`] finds them), else the whole
//!    instance is decoded (transcode works per dataset).
//! 2. **Bounds.** The frame's bytes (Rows × Columns × Samples per Pixel ×
//!    Bits Allocated / 8) must lie within the pixel data present, checked
//!    before any buffer is allocated: crafted Rows/Columns are an error.
//! 3. **Grayscale** (MONOCHROME1/2, PS3.3 §C.11): stored values (Bits
//!    Stored at High Bit, signed per Pixel Representation) → Modality LUT
//!    (Rescale Slope/Intercept, PS3.3 §C.11.1) → VOI window (PS3.3
//!    §C.11.2.1.2.1, linear): the request's center/width, else the first
//!    Window Center/Width (0028,1050)/(0028,1051) of the dataset, else the
//!    frame's minimum and maximum → 8 bits; MONOCHROME1 is inverted. A VOI
//!    LUT Sequence and VOI LUT Function other than LINEAR are ignored.
//! 4. **Colour**: RGB passes through (16/32-bit samples scaled to 8 bits by
//!    Bits Stored), YBR_FULL is converted to RGB (PS3.3 §C.7.6.3.1.2), both
//!    planar configurations; native YBR_FULL_422 (`Y1 Y2 Cb Cr` per pair of
//!    pixels, so 2 samples per pixel stored) likewise; PALETTE COLOR
//!    (PS3.3 §C.7.6.3.1.5–6) through the Red/Green/Blue lookup tables, plain
//!    or segmented (§C.7.9.2), 16-bit entries scaled to 8 bits (unless all
//!    fit in 8); the window does not apply. Other interpretations are
//!    unsupported; [`display_reason`] words that for a clinician.
//!    Single-bit pixels (Bits Allocated 1, PS3.5 §8.1.1) are unpacked to
//!    one byte each and shown as grey.
//!
//!    Home-made rather than dicom-pixeldata's rendering: that crate decodes
//!    through its own codec adapters in this process (C decoders included
//!    when enabled; Bastion decodes those only in the sandboxed child), and
//!    it has no 12-bit JPEG or 32-bit RLE; what is left here are lookups on
//!    samples already decoded.
//! 5. **Size**: the image is scaled down (box filter, aspect ratio kept) to
//!    fit the viewport when one is given; never up.
//! 6. **Encode**: PNG (`png`, 8-bit grey or RGB) or baseline JPEG
//!    (`jpeg-encoder`, quality per request).

use dicom_core::DicomValue;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use dicom_encoding::TransferSyntaxIndex;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use bastion_archive::transcode::{can_transcode, transcode, EXPLICIT_VR_LE};

use crate::pixel::{parse_dataset, Geometry};
use crate::DicomWebError;

/// Thumbnail size (PS3.18 §10.4.1.1.5 leaves it to the server): fits in
/// 128 × 128 pixels.
pub const THUMBNAIL_SIZE: u32 = 128;

/// Output media type (PS3.18 §8.7.4: `image/png`, `image/jpeg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageFormat {
    /// `image/png`, 8-bit grey or RGB.
    #[default]
    Png,
    /// `image/jpeg`, baseline.
    Jpeg,
}

impl ImageFormat {
    /// The media type.
    pub fn media_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
        }
    }
}

/// Rendering parameters (PS3.18 §8.3.5.1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenderOptions {
    /// `window=center,width` (§8.3.5.1.4), in modality units; width ≥ 1.
    pub window: Option<(f64, f64)>,
    /// `viewport=vw,vh` (§8.3.5.1.3): the image is scaled down to fit.
    pub viewport: Option<(u32, u32)>,
    /// Output format.
    pub format: ImageFormat,
    /// `quality` (§8.3.5.1.5), 1–100, for JPEG.
    pub quality: u8,
}

impl Default for RenderOptions {
    /// Dataset window, native size, PNG, quality 90.
    fn default() -> Self {
        RenderOptions {
            window: None,
            viewport: None,
            format: ImageFormat::Png,
            quality: 90,
        }
    }
}

/// Renders frame `frame` (1-based) of a dataset stored in `ts_uid` (the
/// stored bytes, no Part 10 header); see the module docs.
///
/// # Errors
/// - [`DicomWebError::InvalidParameter`]: window width < 1 or not finite, a
///   zero viewport dimension, quality outside 1–100;
/// - [`DicomWebError::FrameNotFound`] (→ 404), [`DicomWebError::NoPixelData`];
/// - [`DicomWebError::Unsupported`]: a transfer syntax Bastion does not
///   decode, or a photometric interpretation / bit depth it does not render;
/// - [`DicomWebError::InvalidImage`]: attributes contradicting the pixel
///   data (e.g. Rows × Columns beyond the bytes present), decoded size
///   above the cap, a codestream the decoder refuses;
/// - [`DicomWebError::InvalidDataset`].
pub fn render(
    dataset: &[u8],
    ts_uid: &str,
    frame: u32,
    opts: &RenderOptions,
) -> Result<Vec<u8>, DicomWebError> {
    render_image(dataset, ts_uid, frame, opts).map(|r| r.bytes)
}

/// A rendered frame and the VOI window it was rendered with.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// The encoded image (PNG or JPEG).
    pub bytes: Vec<u8>,
    /// `(center, width)` in modality units actually applied (the request's,
    /// the dataset's, or the frame's minimum–maximum); `None` for colour.
    /// A viewer starts a window drag from it.
    pub window: Option<(f64, f64)>,
}

/// As [`render`], also telling the window used.
///
/// # Errors
/// As [`render`].
pub fn render_image(
    dataset: &[u8],
    ts_uid: &str,
    mut frame: u32,
    opts: &RenderOptions,
) -> Result<Rendered, DicomWebError> {
    check_options(opts)?;
    let mut obj = parse_dataset(dataset, ts_uid)?;
    // An SR, ECG or plan has no image: say that, not which attribute is missing.
    if obj.get(tags::PIXEL_DATA).is_none() {
        return Err(DicomWebError::NoPixelData);
    }
    Geometry::of(&obj)?.check_frame(frame)?;
    let encapsulated = match obj.get(tags::PIXEL_DATA).map(|e| e.value()) {
        None => return Err(DicomWebError::NoPixelData),
        Some(DicomValue::PixelSequence(_)) => true,
        Some(_) => false,
    };
    if encapsulated {
        if !can_transcode(ts_uid, EXPLICIT_VR_LE) {
            return Err(DicomWebError::Unsupported(format!(
                "pixel data in transfer syntax {ts_uid} is not decoded"
            )));
        }
        // The frame alone when its fragments can be told apart, else the
        // whole instance.
        let g = Geometry::of(&obj)?;
        let native = match crate::frames::decode_one_frame(&obj, ts_uid, &g, frame)? {
            Some(one) => {
                frame = 1;
                one
            }
            None => {
                transcode(dataset, ts_uid, EXPLICIT_VR_LE).map_err(crate::frames::decode_error)?
            }
        };
        obj = parse_dataset(&native, EXPLICIT_VR_LE)?;
    }
    let g = Geometry::of(&obj)?;
    let image = frame_image(&obj, &g, frame, opts.window)?;
    let window = image.window;
    let image = match opts.viewport {
        Some((vw, vh)) => image.fit(vw, vh),
        None => image,
    };
    Ok(Rendered {
        bytes: image.encode(opts.format, opts.quality)?,
        window,
    })
}

/// Why an image cannot be shown, in words for a clinician (the viewer
/// shows it in place of the image), for the errors of [`render`] that say
/// something about the image itself; `None` for the others (a bad request,
/// a missing frame, a server fault). Never contains patient data: at most
/// the name of a compression method or colour model.
pub fn display_reason(e: &DicomWebError) -> Option<String> {
    const CANNOT: &str = "This image cannot be displayed";
    match e {
        DicomWebError::NoPixelData => Some(
            "This object has no picture to display (it may be a report, a measurement \
             or a waveform)."
                .into(),
        ),
        DicomWebError::Unsupported(m) if m.contains("transfer syntax") => {
            let method = m
                .split_whitespace()
                .find(|w| w.starts_with("1.2.840.10008."))
                .and_then(|uid| TransferSyntaxRegistry.get(uid))
                .map(|ts| ts.name().to_owned())
                .unwrap_or_else(|| "a method".into());
            Some(format!(
                "{CANNOT}: it is stored compressed with {method}, which this server cannot \
                 decode. Download the study to open it in another viewer."
            ))
        }
        DicomWebError::Unsupported(_) => Some(format!(
            "{CANNOT}: its colour model or bit depth is not one this server can show. \
             Download the study to open it in another viewer."
        )),
        DicomWebError::InvalidImage(_) => Some(format!(
            "{CANNOT}: its picture data is damaged or does not match the image's \
             description (size, colours). The rest of the study is not affected."
        )),
        _ => None,
    }
}

/// The thumbnail (PS3.18 §10.4.1.1.5): the first frame rendered with the
/// dataset's window, scaled down to fit [`THUMBNAIL_SIZE`] pixels.
///
/// # Errors
/// As [`render`].
pub fn thumbnail(
    dataset: &[u8],
    ts_uid: &str,
    format: ImageFormat,
) -> Result<Vec<u8>, DicomWebError> {
    let opts = RenderOptions {
        viewport: Some((THUMBNAIL_SIZE, THUMBNAIL_SIZE)),
        format,
        ..RenderOptions::default()
    };
    render(dataset, ts_uid, 1, &opts)
}

fn check_options(opts: &RenderOptions) -> Result<(), DicomWebError> {
    let bad = |name: &str, reason: &str| DicomWebError::InvalidParameter {
        name: name.into(),
        reason: reason.into(),
    };
    if let Some((c, w)) = opts.window {
        if !c.is_finite() || !w.is_finite() || w < 1.0 {
            return Err(bad("window", "center must be a number, width at least 1"));
        }
    }
    if let Some((vw, vh)) = opts.viewport {
        if vw == 0 || vh == 0 {
            return Err(bad("viewport", "dimensions must be at least 1"));
        }
    }
    if !(1..=100).contains(&opts.quality) {
        return Err(bad("quality", "must be 1 to 100"));
    }
    Ok(())
}

/// An 8-bit image, grey (1 channel) or RGB (3), row by row.
#[derive(Debug)]
struct Image {
    width: u32,
    height: u32,
    channels: u8,
    data: Vec<u8>,
    /// The VOI window applied (grey images).
    window: Option<(f64, f64)>,
}

/// The 8-bit image of one frame of native pixel data.
fn frame_image(
    obj: &InMemDicomObject,
    g: &Geometry,
    frame: u32,
    window: Option<(f64, f64)>,
) -> Result<Image, DicomWebError> {
    let bytes = match obj.get(tags::PIXEL_DATA).map(|e| e.value()) {
        Some(DicomValue::Primitive(p)) => p.to_bytes(),
        Some(_) => {
            return Err(DicomWebError::InvalidImage(
                "pixel data is not native after decoding".into(),
            ))
        }
        None => return Err(DicomWebError::NoPixelData),
    };
    if g.bits_allocated == 1 {
        // PS3.5 §8.1.1 / Annex D: single-bit pixels packed eight per byte,
        // least significant bit first, frames following each other bit by
        // bit; unpacked to one byte per sample.
        let unpacked = unpack_bits(&bytes, g, frame)?;
        let g8 = Geometry {
            bits_allocated: 8,
            bits_stored: 1,
            high_bit: 0,
            signed: false,
            frames: 1,
            ..g.clone()
        };
        return sample_image(obj, &g8, &unpacked, 1, window);
    }
    if !matches!(g.bits_allocated, 8 | 16 | 32) {
        return Err(DicomWebError::Unsupported(format!(
            "rendering Bits Allocated {}",
            g.bits_allocated
        )));
    }
    sample_image(obj, g, &bytes, frame, window)
}

/// One frame of byte-aligned native samples (`bytes`: every frame) as an
/// 8-bit image, by Photometric Interpretation (PS3.3 §C.7.6.3.1.2).
fn sample_image(
    obj: &InMemDicomObject,
    g: &Geometry,
    bytes: &[u8],
    frame: u32,
    window: Option<(f64, f64)>,
) -> Result<Image, DicomWebError> {
    let frame_len = g.frame_bytes()?;
    let start = u64::from(frame - 1) * frame_len;
    let end = start + frame_len;
    // Before any allocation: the frame must be within the bytes present.
    let data = usize::try_from(start)
        .ok()
        .zip(usize::try_from(end).ok())
        .and_then(|(s, e)| bytes.get(s..e))
        .ok_or_else(|| {
            DicomWebError::InvalidImage(format!(
                "frame {frame} of {} × {} × {} samples × {} bits ends at byte {end}, \
                 the pixel data has {}",
                g.rows,
                g.cols,
                g.samples,
                g.bits_allocated,
                bytes.len()
            ))
        })?;
    let pixels = usize::from(g.rows) * usize::from(g.cols);
    let reader = Samples::new(data, g);
    let (channels, out, used) = match (g.samples, g.photometric.as_str()) {
        (1, "MONOCHROME1" | "MONOCHROME2") => {
            let invert = g.photometric == "MONOCHROME1";
            let (out, used) = grayscale(obj, &reader, pixels, window, invert);
            (1, out, Some(used))
        }
        (1, "PALETTE COLOR") => (3, palette(obj, &reader, pixels)?, None),
        (3, "RGB" | "YBR_FULL") => {
            let ybr = g.photometric == "YBR_FULL";
            (3, colour(&reader, g, pixels, ybr), None)
        }
        (3, "YBR_FULL_422") => {
            if g.cols & 1 == 1 {
                return Err(DicomWebError::InvalidImage(format!(
                    "YBR_FULL_422 with an odd number of columns ({})",
                    g.cols
                )));
            }
            (3, ybr_422(&reader, g, pixels), None)
        }
        (samples, photometric) => {
            return Err(DicomWebError::Unsupported(format!(
                "rendering {samples} samples per pixel as {photometric:?}"
            )))
        }
    };
    Ok(Image {
        width: u32::from(g.cols),
        height: u32::from(g.rows),
        channels,
        data: out,
        window: used,
    })
}

/// Frame `frame` of single-bit pixel data, one byte (0 or 1) per sample.
fn unpack_bits(bytes: &[u8], g: &Geometry, frame: u32) -> Result<Vec<u8>, DicomWebError> {
    let bits = u64::from(g.rows) * u64::from(g.cols) * u64::from(g.samples);
    let first = u64::from(frame - 1) * bits;
    let last_byte = (first + bits).div_ceil(8);
    if last_byte > bytes.len() as u64 {
        return Err(DicomWebError::InvalidImage(format!(
            "frame {frame} of {} × {} single-bit pixels ends at byte {last_byte}, \
             the pixel data has {}",
            g.rows,
            g.cols,
            bytes.len()
        )));
    }
    // Within the bytes present, so at most 8 × their length.
    Ok((first..first + bits)
        .map(|b| (bytes[(b / 8) as usize] >> (b % 8)) & 1)
        .collect())
}

/// The Red, Green and Blue Palette Color Lookup Tables (PS3.3 §C.7.6.3.1.5,
/// §C.7.6.3.1.6; segmented ones, §C.7.9.2, expanded) applied to each
/// stored value, 8 bits per channel out.
fn palette(
    obj: &InMemDicomObject,
    s: &Samples<'_>,
    pixels: usize,
) -> Result<Vec<u8>, DicomWebError> {
    let luts = [
        (
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            tags::SEGMENTED_RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            "Red",
        ),
        (
            tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            tags::SEGMENTED_GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            "Green",
        ),
        (
            tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            tags::SEGMENTED_BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            "Blue",
        ),
    ]
    .map(|(desc, data, segmented, name)| Lut::read(obj, desc, data, segmented, name));
    let [r, g, b] = luts;
    let (r, g, b) = (r?, g?, b?);
    let mut out = Vec::with_capacity(pixels * 3);
    for p in 0..pixels {
        let v = s.get(p);
        out.extend_from_slice(&[r.get(v), g.get(v), b.get(v)]);
    }
    Ok(out)
}

/// Largest lookup table: 65536 entries (a descriptor's first value of 0).
const MAX_LUT_ENTRIES: usize = 1 << 16;

/// One palette colour lookup table, entries scaled to 8 bits.
struct Lut {
    first: i64,
    entries: Vec<u8>,
}

impl Lut {
    fn read(
        obj: &InMemDicomObject,
        desc: dicom_core::Tag,
        data: dicom_core::Tag,
        segmented: dicom_core::Tag,
        name: &str,
    ) -> Result<Lut, DicomWebError> {
        let bad = |m: &str| DicomWebError::InvalidImage(format!("{name} palette: {m}"));
        let d: Vec<i64> = obj
            .get(desc)
            .and_then(|e| e.to_multi_int::<i64>().ok())
            .filter(|d| d.len() == 3)
            .ok_or_else(|| bad("the lookup table descriptor is missing or not 3 numbers"))?;
        // PS3.3 §C.7.6.3.1.5: 0 entries means 2^16; the first mapped value
        // is US or SS as the pixel data (a negative value read as US wraps).
        let count = match d[0] {
            0 => MAX_LUT_ENTRIES,
            n if n > 0 && n <= MAX_LUT_ENTRIES as i64 => n as usize,
            _ => return Err(bad("the lookup table descriptor has an invalid size")),
        };
        let nominal_bits = d[2];
        let words = |tag| -> Option<Vec<u16>> {
            let bytes = obj.get(tag)?.value().to_bytes().ok()?;
            Some(
                bytes
                    .chunks_exact(2)
                    .map(|w| u16::from_le_bytes([w[0], w[1]]))
                    .collect(),
            )
        };
        let raw: Vec<u16> = if let Some(plain) = obj.get(data) {
            let bytes = plain
                .value()
                .to_bytes()
                .map_err(|_| bad("the lookup table data is not binary"))?;
            // 8-bit entries may be packed two per word (PS3.3
            // §C.7.6.3.1.6); the data length tells which.
            if bytes.len() == count || (nominal_bits == 8 && bytes.len() == count + 1) {
                bytes[..count].iter().map(|b| u16::from(*b)).collect()
            } else if bytes.len() >= count * 2 {
                bytes
                    .chunks_exact(2)
                    .take(count)
                    .map(|w| u16::from_le_bytes([w[0], w[1]]))
                    .collect()
            } else {
                return Err(bad("the lookup table data is shorter than its descriptor"));
            }
        } else if let Some(seg) = words(segmented) {
            expand_segmented(&seg, count).map_err(|m| bad(&m))?
        } else {
            return Err(bad("the lookup table data is missing"));
        };
        // 16-bit entries are scaled down, unless every one fits in 8 bits
        // (tables declared 16 bits holding 8-bit values exist).
        let wide = nominal_bits > 8 && raw.iter().any(|v| *v > 255);
        let entries = raw
            .iter()
            .map(|v| {
                if wide {
                    (v >> 8) as u8
                } else {
                    (*v).min(255) as u8
                }
            })
            .collect();
        let first = if d[1] > 0x7FFF
            && obj
                .get(tags::PIXEL_REPRESENTATION)
                .and_then(|e| e.uint16().ok())
                == Some(1)
        {
            d[1] - 0x1_0000
        } else {
            d[1]
        };
        Ok(Lut { first, entries })
    }

    /// The entry for stored value `v`: values below the first mapped one
    /// take the first entry, above the table the last (PS3.3 §C.7.6.3.1.5).
    fn get(&self, v: i64) -> u8 {
        let last = self.entries.len().saturating_sub(1);
        let i = (v - self.first).clamp(0, last as i64) as usize;
        self.entries.get(i).copied().unwrap_or(0)
    }
}

/// Expands segmented palette colour lookup table data (PS3.3 §C.7.9.2:
/// discrete, linear and indirect segments) to at most `count` entries.
fn expand_segmented(seg: &[u16], count: usize) -> Result<Vec<u16>, String> {
    let mut out: Vec<u16> = Vec::with_capacity(count);
    expand_segments(seg, 0, seg.len(), count, &mut out, 0)?;
    if out.is_empty() {
        return Err("the segmented lookup table is empty".into());
    }
    out.truncate(count);
    Ok(out)
}

/// Expands the segments of `seg[from..to]` into `out` (bounded by `count`;
/// an indirect segment may not nest).
fn expand_segments(
    seg: &[u16],
    from: usize,
    to: usize,
    count: usize,
    out: &mut Vec<u16>,
    depth: u8,
) -> Result<(), String> {
    let word = |i: usize| {
        seg.get(i)
            .copied()
            .ok_or_else(|| "a segment runs past the segmented lookup table".to_owned())
    };
    let mut i = from;
    while i < to && out.len() < count {
        let (op, n) = (word(i)?, usize::from(word(i + 1)?));
        match op {
            0 => {
                for k in 0..n {
                    out.push(word(i + 2 + k)?);
                }
                i += 2 + n;
            }
            1 => {
                let y1 = f64::from(word(i + 2)?);
                let y0 = f64::from(
                    *out.last()
                        .ok_or("a linear segment without a previous value")?,
                );
                for k in 1..=n {
                    let y = y0 + (y1 - y0) * k as f64 / n as f64;
                    out.push(y.round() as u16);
                }
                i += 3;
            }
            2 if depth == 0 => {
                let offset = usize::from(word(i + 2)?) | (usize::from(word(i + 3)?) << 16);
                // `n` segments starting at word `offset`.
                let mut at = offset;
                for _ in 0..n {
                    let before = out.len();
                    let len = segment_len(seg, at)?;
                    expand_segments(seg, at, at + len, count, out, 1)?;
                    at += len;
                    if out.len() == before || out.len() >= count {
                        break;
                    }
                }
                i += 4;
            }
            2 => return Err("an indirect segment points to another indirect one".into()),
            other => return Err(format!("segment type {other} is not defined")),
        }
        if out.len() > count {
            out.truncate(count);
        }
    }
    Ok(())
}

/// Words taken by the segment at `at`.
fn segment_len(seg: &[u16], at: usize) -> Result<usize, String> {
    match (seg.get(at), seg.get(at + 1)) {
        (Some(0), Some(n)) => Ok(2 + usize::from(*n)),
        (Some(1), Some(_)) => Ok(3),
        (Some(2), Some(_)) => Ok(4),
        _ => Err("an indirect segment points outside the table".into()),
    }
}

/// YBR_FULL_422 (PS3.3 §C.7.6.3.1.2): `Y1 Y2 Cb Cr` for each pair of pixels
/// of a row, converted to RGB as YBR_FULL.
fn ybr_422(s: &Samples<'_>, g: &Geometry, pixels: usize) -> Vec<u8> {
    let down = u32::from(g.bits_stored).saturating_sub(8);
    let to8 = |v: i64| f64::from((v.max(0) >> down).min(255) as u8);
    let mut out = Vec::with_capacity(pixels * 3);
    for pair in 0..pixels / 2 {
        let (y1, y2) = (to8(s.get(pair * 4)), to8(s.get(pair * 4 + 1)));
        let (cb, cr) = (to8(s.get(pair * 4 + 2)), to8(s.get(pair * 4 + 3)));
        for y in [y1, y2] {
            out.extend_from_slice(&ybr_to_rgb(y, cb, cr));
        }
    }
    out
}

/// YBR_FULL to RGB (PS3.3 §C.7.6.3.1.2, ITU-R BT.601 full range).
fn ybr_to_rgb(y: f64, cb: f64, cr: f64) -> [u8; 3] {
    let (cb, cr) = (cb - 128.0, cr - 128.0);
    let clamp = |v: f64| v.round().clamp(0.0, 255.0) as u8;
    [
        clamp(y + 1.402 * cr),
        clamp(y - 0.344_136 * cb - 0.714_136 * cr),
        clamp(y + 1.772 * cb),
    ]
}

/// Stored sample values of one frame (PS3.5 §8.1.1, little endian).
struct Samples<'a> {
    data: &'a [u8],
    bytes: usize,
    shift: u32,
    mask: u64,
    bits_stored: u32,
    signed: bool,
}

impl<'a> Samples<'a> {
    fn new(data: &'a [u8], g: &Geometry) -> Self {
        let bits_stored = u32::from(g.bits_stored);
        Samples {
            data,
            bytes: usize::from(g.bits_allocated / 8),
            shift: u32::from(g.high_bit + 1 - g.bits_stored),
            mask: (1u64 << bits_stored) - 1,
            bits_stored,
            signed: g.signed,
        }
    }

    /// Sample `i` (in stored order), Bits Stored extracted and sign-extended.
    fn get(&self, i: usize) -> i64 {
        let at = i * self.bytes;
        let mut raw = 0u64;
        for (k, b) in self.data[at..at + self.bytes].iter().enumerate() {
            raw |= u64::from(*b) << (8 * k);
        }
        let v = (raw >> self.shift) & self.mask;
        if self.signed && v >> (self.bits_stored - 1) & 1 == 1 {
            v as i64 - (1i64 << self.bits_stored)
        } else {
            v as i64
        }
    }
}

/// First value of a DS attribute.
fn first_ds(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<f64> {
    obj.get(tag)?
        .to_multi_float64()
        .ok()?
        .first()
        .copied()
        .filter(|v| v.is_finite())
}

fn grayscale(
    obj: &InMemDicomObject,
    s: &Samples<'_>,
    pixels: usize,
    window: Option<(f64, f64)>,
    invert: bool,
) -> (Vec<u8>, (f64, f64)) {
    let slope = first_ds(obj, tags::RESCALE_SLOPE)
        .filter(|v| *v != 0.0)
        .unwrap_or(1.0);
    let intercept = first_ds(obj, tags::RESCALE_INTERCEPT).unwrap_or(0.0);
    let modality = |i: usize| s.get(i) as f64 * slope + intercept;
    let dataset_window = || {
        let c = first_ds(obj, tags::WINDOW_CENTER)?;
        let w = first_ds(obj, tags::WINDOW_WIDTH).filter(|w| *w >= 1.0)?;
        Some((c, w))
    };
    let (c, w) = window.or_else(dataset_window).unwrap_or_else(|| {
        let (lo, hi) = (0..pixels)
            .map(modality)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        // The window whose linear ramp runs from lo to hi.
        (lo + 0.5 + (hi - lo) / 2.0, hi - lo + 1.0)
    });
    // PS3.3 §C.11.2.1.2.1, output range 0–255.
    let (low, high) = (c - 0.5 - (w - 1.0) / 2.0, c - 0.5 + (w - 1.0) / 2.0);
    let out = (0..pixels)
        .map(|i| {
            let x = modality(i);
            let y = if x <= low {
                0.0
            } else if x > high {
                255.0
            } else {
                ((x - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0
            };
            let y = y.round().clamp(0.0, 255.0) as u8;
            if invert {
                255 - y
            } else {
                y
            }
        })
        .collect();
    (out, (c, w))
}

fn colour(s: &Samples<'_>, g: &Geometry, pixels: usize, ybr: bool) -> Vec<u8> {
    let down = u32::from(g.bits_stored).saturating_sub(8);
    let to8 = |v: i64| (v.max(0) >> down).min(255) as u8;
    let at = |p: usize, c: usize| {
        if g.planar {
            s.get(c * pixels + p)
        } else {
            s.get(p * 3 + c)
        }
    };
    let mut out = Vec::with_capacity(pixels * 3);
    for p in 0..pixels {
        let (a, b, c) = (to8(at(p, 0)), to8(at(p, 1)), to8(at(p, 2)));
        if ybr {
            out.extend_from_slice(&ybr_to_rgb(f64::from(a), f64::from(b), f64::from(c)));
        } else {
            out.extend_from_slice(&[a, b, c]);
        }
    }
    out
}

impl Image {
    /// Scaled down (box filter) to fit `vw` × `vh`, aspect ratio kept.
    fn fit(self, vw: u32, vh: u32) -> Image {
        if self.width <= vw && self.height <= vh {
            return self;
        }
        let scale = f64::min(
            f64::from(vw) / f64::from(self.width),
            f64::from(vh) / f64::from(self.height),
        );
        let nw = ((f64::from(self.width) * scale).round() as u32).clamp(1, vw);
        let nh = ((f64::from(self.height) * scale).round() as u32).clamp(1, vh);
        let ch = usize::from(self.channels);
        let (w, h) = (self.width as usize, self.height as usize);
        let mut data = Vec::with_capacity(nw as usize * nh as usize * ch);
        for oy in 0..nh as usize {
            let y0 = oy * h / nh as usize;
            let y1 = ((oy + 1) * h / nh as usize).max(y0 + 1);
            for ox in 0..nw as usize {
                let x0 = ox * w / nw as usize;
                let x1 = ((ox + 1) * w / nw as usize).max(x0 + 1);
                let n = ((y1 - y0) * (x1 - x0)) as u64;
                for c in 0..ch {
                    let mut sum = 0u64;
                    for y in y0..y1 {
                        let row = &self.data[(y * w) * ch..(y * w + w) * ch];
                        for x in x0..x1 {
                            sum += u64::from(row[x * ch + c]);
                        }
                    }
                    data.push(((sum + n / 2) / n) as u8);
                }
            }
        }
        Image {
            width: nw,
            height: nh,
            channels: self.channels,
            data,
            window: self.window,
        }
    }

    fn encode(&self, format: ImageFormat, quality: u8) -> Result<Vec<u8>, DicomWebError> {
        let fail = |e: String| DicomWebError::InvalidImage(format!("encoding failed: {e}"));
        let mut out = Vec::new();
        match format {
            ImageFormat::Png => {
                let mut enc = png::Encoder::new(&mut out, self.width, self.height);
                enc.set_color(if self.channels == 3 {
                    png::ColorType::Rgb
                } else {
                    png::ColorType::Grayscale
                });
                enc.set_depth(png::BitDepth::Eight);
                let mut writer = enc.write_header().map_err(|e| fail(e.to_string()))?;
                writer
                    .write_image_data(&self.data)
                    .map_err(|e| fail(e.to_string()))?;
                writer.finish().map_err(|e| fail(e.to_string()))?;
            }
            ImageFormat::Jpeg => {
                let enc = jpeg_encoder::Encoder::new(&mut out, quality);
                let colour = if self.channels == 3 {
                    jpeg_encoder::ColorType::Rgb
                } else {
                    jpeg_encoder::ColorType::Luma
                };
                // Rows and Columns are US values, so both fit in u16.
                let (w, h) = (
                    u16::try_from(self.width).map_err(|e| fail(e.to_string()))?,
                    u16::try_from(self.height).map_err(|e| fail(e.to_string()))?,
                );
                enc.encode(&self.data, w, h, colour)
                    .map_err(|e| fail(e.to_string()))?;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use dicom_core::{DataElement, PrimitiveValue, VR};

    use super::*;

    /// A one-frame image in Explicit VR Little Endian: `rows` × `cols`,
    /// `samples`, `bits` allocated (and stored), `photometric`, `pixels`,
    /// and any `extra` elements.
    fn image(
        rows: u16,
        cols: u16,
        samples: u16,
        bits: u16,
        photometric: &str,
        pixels: Vec<u8>,
        extra: Vec<DataElement<InMemDicomObject>>,
    ) -> Vec<u8> {
        let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
        let mut obj = InMemDicomObject::from_element_iter([
            us(tags::SAMPLES_PER_PIXEL, samples),
            DataElement::new(
                tags::PHOTOMETRIC_INTERPRETATION,
                VR::CS,
                PrimitiveValue::from(photometric),
            ),
            us(tags::ROWS, rows),
            us(tags::COLUMNS, cols),
            us(tags::BITS_ALLOCATED, bits),
            us(tags::BITS_STORED, bits),
            us(tags::HIGH_BIT, bits - 1),
            us(tags::PIXEL_REPRESENTATION, 0),
            DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::from(pixels)),
        ]);
        for e in extra {
            obj.put(e);
        }
        let mut out = Vec::new();
        let Some(ts) = TransferSyntaxRegistry.get(EXPLICIT_VR_LE) else {
            panic!("registry")
        };
        obj.write_dataset_with_ts(&mut out, ts).expect("encode");
        out
    }

    /// The RGB or grey bytes of a rendered PNG.
    fn png_pixels(png_bytes: &[u8]) -> Vec<u8> {
        let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
        let mut reader = decoder.read_info().expect("png");
        let mut buf = vec![0; reader.output_buffer_size().expect("size")];
        let info = reader.next_frame(&mut buf).expect("frame");
        buf.truncate(info.buffer_size());
        buf
    }

    fn lut(tag: dicom_core::Tag, words: &[u16]) -> DataElement<InMemDicomObject> {
        DataElement::new(tag, VR::OW, PrimitiveValue::U16(words.into()))
    }

    #[test]
    fn palette_colour_applies_the_lookup_tables() {
        let desc = |tag| {
            DataElement::new(
                tag,
                VR::US,
                PrimitiveValue::U16([2u16, 0, 16].as_slice().into()),
            )
        };
        let ds = image(
            1,
            2,
            1,
            8,
            "PALETTE COLOR",
            vec![0, 1],
            vec![
                desc(tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR),
                desc(tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR),
                desc(tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR),
                lut(tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA, &[0xFFFF, 0]),
                lut(tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA, &[0, 0xFFFF]),
                lut(
                    tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
                    &[0x8000, 0x8000],
                ),
            ],
        );
        let png = render(&ds, EXPLICIT_VR_LE, 1, &RenderOptions::default()).expect("rendered");
        assert_eq!(png_pixels(&png), vec![255, 0, 128, 0, 255, 128]);
    }

    #[test]
    fn segmented_lookup_tables_expand() {
        // discrete 10 20 30, linear to 50 in 2 steps, indirect: 1 segment at 0
        let seg = [0, 3, 10, 20, 30, 1, 2, 50, 2, 1, 0, 0];
        assert_eq!(
            expand_segmented(&seg, 100),
            Ok(vec![10, 20, 30, 40, 50, 10, 20, 30])
        );
        assert_eq!(expand_segmented(&seg, 4), Ok(vec![10, 20, 30, 40]));
        assert!(expand_segmented(&[0, 5, 1], 10).is_err(), "cut short");
        assert!(expand_segmented(&[1, 2, 50], 10).is_err(), "linear first");
        assert!(expand_segmented(&[7, 1, 1], 10).is_err(), "unknown type");
        assert_eq!(
            expand_segmented(&[0, 1, 5, 2, 1, 0, 0, 2, 1, 3, 0], 10),
            Err("an indirect segment points to another indirect one".into()),
            "no nesting (no loop)"
        );
    }

    #[test]
    fn ybr_full_422_native_has_two_samples_per_pixel() {
        // Y1 Y2 Cb Cr: two grey pixels (no chroma)
        let ds = image(1, 2, 3, 8, "YBR_FULL_422", vec![100, 200, 128, 128], vec![]);
        let png = render(&ds, EXPLICIT_VR_LE, 1, &RenderOptions::default()).expect("rendered");
        assert_eq!(png_pixels(&png), vec![100, 100, 100, 200, 200, 200]);
    }

    #[test]
    fn single_bit_pixels_are_unpacked() {
        // 1 × 8 pixels, least significant bit first: 1 0 1 0 0 0 0 0
        let ds = image(1, 8, 1, 1, "MONOCHROME2", vec![0b0000_0101, 0], vec![]);
        let png = render(&ds, EXPLICIT_VR_LE, 1, &RenderOptions::default()).expect("rendered");
        assert_eq!(png_pixels(&png), vec![255, 0, 255, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn an_image_that_cannot_be_shown_says_why_in_plain_words() {
        let hsv = image(1, 2, 3, 8, "HSV", vec![1, 2, 3, 4, 5, 6], vec![]);
        let e = render(&hsv, EXPLICIT_VR_LE, 1, &RenderOptions::default()).expect_err("HSV");
        let reason = display_reason(&e).expect("a reason");
        assert!(reason.starts_with("This image cannot be displayed: its colour model"));
        let codec = DicomWebError::Unsupported(
            "pixel data in transfer syntax 1.2.840.10008.1.2.4.100 is not decoded".into(),
        );
        let reason = display_reason(&codec).expect("a reason");
        assert!(reason.contains("stored compressed with MPEG2"), "{reason}");
        assert!(
            display_reason(&DicomWebError::NoPixelData).is_some_and(|r| r.contains("no picture"))
        );
        assert_eq!(
            display_reason(&DicomWebError::FrameNotFound {
                frame: 2,
                frames: 1
            }),
            None
        );
    }

    #[test]
    fn box_filter_fits_the_viewport() {
        let img = Image {
            width: 4,
            height: 2,
            channels: 1,
            data: vec![0, 10, 20, 30, 40, 50, 60, 70],
            window: None,
        };
        let small = img.fit(2, 2);
        assert_eq!((small.width, small.height), (2, 1));
        assert_eq!(small.data, vec![25, 45]);
    }

    #[test]
    fn option_checks() {
        let bad = |o: RenderOptions| check_options(&o).is_err();
        let d = RenderOptions::default();
        assert!(!bad(d));
        assert!(bad(RenderOptions {
            window: Some((40.0, 0.5)),
            ..d
        }));
        assert!(bad(RenderOptions {
            window: Some((f64::NAN, 400.0)),
            ..d
        }));
        assert!(bad(RenderOptions {
            viewport: Some((0, 10)),
            ..d
        }));
        assert!(bad(RenderOptions { quality: 0, ..d }));
    }
}
