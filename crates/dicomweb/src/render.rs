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
//!    the sandboxed child process `serve` registers); other syntaxes
//!    (JPEG-LS…) are [`DicomWebError::Unsupported`].
//!    The whole instance is decoded even for one frame (transcode works per
//!    dataset).
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
//! 4. **Colour**: RGB passes through (16-bit samples scaled to 8 bits by
//!    Bits Stored), YBR_FULL is converted to RGB (PS3.3 §C.7.6.3.1.2), both
//!    planar configurations; the window does not apply. PALETTE COLOR,
//!    YBR_FULL_422 (native) and other interpretations are unsupported.
//! 5. **Size**: the image is scaled down (box filter, aspect ratio kept) to
//!    fit the viewport when one is given; never up.
//! 6. **Encode**: PNG (`png`, 8-bit grey or RGB) or baseline JPEG
//!    (`jpeg-encoder`, quality per request).

use dicom_core::DicomValue;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

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
    frame: u32,
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
        let native = transcode(dataset, ts_uid, EXPLICIT_VR_LE).map_err(|e| {
            // The dataset itself is valid here: say what failed in decoding,
            // without the "not a valid DICOM dataset" prefix.
            DicomWebError::InvalidImage(match e {
                bastion_archive::ArchiveError::NotDicom(m) => m,
                other => other.to_string(),
            })
        })?;
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
    if !matches!(g.bits_allocated, 8 | 16 | 32) {
        return Err(DicomWebError::Unsupported(format!(
            "rendering Bits Allocated {}",
            g.bits_allocated
        )));
    }
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
        (3, "RGB" | "YBR_FULL") => {
            let ybr = g.photometric == "YBR_FULL";
            (3, colour(&reader, g, pixels, ybr), None)
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
            let (y, cb, cr) = (f64::from(a), f64::from(b) - 128.0, f64::from(c) - 128.0);
            let clamp = |v: f64| v.round().clamp(0.0, 255.0) as u8;
            out.push(clamp(y + 1.402 * cr));
            out.push(clamp(y - 0.344_136 * cb - 0.714_136 * cr));
            out.push(clamp(y + 1.772 * cb));
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
    use super::*;

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
