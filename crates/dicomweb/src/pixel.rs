//! Shared by [`crate::frames`] and [`crate::render`]: reading a stored
//! dataset and the image attributes that size its pixel data (PS3.3
//! §C.7.6.3).

use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::DicomWebError;

/// Parses a dataset (no Part 10 header) stored in transfer syntax `ts`.
/// Stored datasets passed the ingest bounds check, so declared lengths are
/// backed by bytes.
pub(crate) fn parse_dataset(dataset: &[u8], ts: &str) -> Result<InMemDicomObject, DicomWebError> {
    let syntax = TransferSyntaxRegistry
        .get(ts)
        .ok_or_else(|| DicomWebError::Unsupported(format!("unknown transfer syntax {ts}")))?;
    InMemDicomObject::read_dataset_with_ts(dataset, syntax)
        .map_err(|e| DicomWebError::InvalidDataset(e.to_string()))
}

/// Image Pixel attributes (PS3.3 §C.7.6.3) and Number of Frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub rows: u16,
    pub cols: u16,
    pub samples: u16,
    pub bits_allocated: u16,
    pub bits_stored: u16,
    pub high_bit: u16,
    pub signed: bool,
    pub planar: bool,
    pub frames: u32,
    pub photometric: String,
}

impl Geometry {
    pub(crate) fn of(obj: &InMemDicomObject) -> Result<Self, DicomWebError> {
        let bad = |m: String| DicomWebError::InvalidImage(m);
        let us = |tag, name: &str| -> Result<u16, DicomWebError> {
            obj.get(tag)
                .ok_or_else(|| bad(format!("{name} is missing")))?
                .uint16()
                .map_err(|_| bad(format!("{name} is not a US value")))
        };
        let opt_us = |tag, default: u16| {
            obj.get(tag)
                .and_then(|e| e.uint16().ok())
                .unwrap_or(default)
        };
        let bits_allocated = us(tags::BITS_ALLOCATED, "Bits Allocated")?;
        let bits_stored = opt_us(tags::BITS_STORED, bits_allocated);
        let frames = match obj.get(tags::NUMBER_OF_FRAMES) {
            None => 1,
            Some(e) => e
                .to_int::<u32>()
                .map_err(|_| bad("Number of Frames is not a positive integer".into()))?,
        };
        let g = Geometry {
            rows: us(tags::ROWS, "Rows")?,
            cols: us(tags::COLUMNS, "Columns")?,
            samples: us(tags::SAMPLES_PER_PIXEL, "Samples per Pixel")?,
            bits_allocated,
            bits_stored,
            high_bit: opt_us(tags::HIGH_BIT, bits_stored.saturating_sub(1)),
            signed: opt_us(tags::PIXEL_REPRESENTATION, 0) == 1,
            planar: opt_us(tags::PLANAR_CONFIGURATION, 0) == 1,
            frames,
            photometric: obj
                .get(tags::PHOTOMETRIC_INTERPRETATION)
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_matches([' ', '\0']).to_owned())
                .unwrap_or_default(),
        };
        if g.rows == 0 || g.cols == 0 || g.frames == 0 || g.samples == 0 {
            return Err(bad(format!(
                "empty image: {} rows, {} columns, {} samples, {} frames",
                g.rows, g.cols, g.samples, g.frames
            )));
        }
        // PS3.5 §8.1.1: the stored bits end at High Bit, within the
        // allocated ones (also keeps the sample shift non-negative).
        if g.bits_stored == 0
            || g.bits_stored > g.bits_allocated
            || g.high_bit >= g.bits_allocated
            || g.high_bit + 1 < g.bits_stored
        {
            return Err(bad(format!(
                "Bits Stored {} / High Bit {} do not fit Bits Allocated {}",
                g.bits_stored, g.high_bit, g.bits_allocated
            )));
        }
        Ok(g)
    }

    /// Whether native pixel data holds two luminance samples per chroma
    /// pair (YBR_FULL_422, PS3.3 §C.7.6.3.1.2: `Y1 Y2 Cb Cr` for each two
    /// pixels of a row, so a frame has Rows × Columns × 2 samples).
    pub(crate) fn is_ybr_422(&self) -> bool {
        self.samples == 3 && self.photometric == "YBR_FULL_422"
    }

    /// Samples in one native frame: Rows × Columns × Samples per Pixel,
    /// × 2 instead of × 3 for YBR_FULL_422.
    pub(crate) fn frame_samples(&self) -> u64 {
        let per_pixel = if self.is_ybr_422() {
            2
        } else {
            u64::from(self.samples)
        };
        u64::from(self.rows) * u64::from(self.cols) * per_pixel
    }

    /// Bytes of one native frame, when Bits Allocated is a whole number of
    /// bytes (fits in u64: at most 65535² × 65535 × 8), or 1 with frames of a
    /// whole number of bytes. YBR_FULL_422 counts two samples per pixel
    /// ([`Geometry::frame_samples`]).
    pub(crate) fn frame_bytes(&self) -> Result<u64, DicomWebError> {
        // Single-bit pixels are packed eight per byte, frames following each
        // other bit by bit (PS3.5 §8.1.1): a frame is a byte range when its
        // bit count is a multiple of 8.
        if self.bits_allocated == 1 && self.frame_samples() & 7 == 0 {
            return Ok(self.frame_samples() / 8);
        }
        if self.bits_allocated & 7 != 0 {
            return Err(DicomWebError::Unsupported(format!(
                "Bits Allocated {} (whole bytes per sample are supported)",
                self.bits_allocated
            )));
        }
        Ok(self.frame_samples() * u64::from(self.bits_allocated / 8))
    }

    /// Checks a 1-based frame number.
    pub(crate) fn check_frame(&self, frame: u32) -> Result<(), DicomWebError> {
        if frame == 0 || frame > self.frames {
            return Err(DicomWebError::FrameNotFound {
                frame,
                frames: self.frames,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use dicom_core::{DataElement, PrimitiveValue, VR};

    use super::*;

    #[test]
    fn bit_layout_is_checked() {
        let image = |stored: u16, high: u16| {
            InMemDicomObject::from_element_iter([
                DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(2_u16)),
                DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(2_u16)),
                DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1_u16)),
                DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16_u16)),
                DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(stored)),
                DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(high)),
            ])
        };
        assert!(Geometry::of(&image(12, 11)).is_ok());
        assert!(Geometry::of(&image(12, 15)).is_ok());
        assert!(
            Geometry::of(&image(16, 7)).is_err(),
            "high bit below stored bits"
        );
        assert!(Geometry::of(&image(17, 16)).is_err());
        assert!(Geometry::of(&image(0, 0)).is_err());
    }
}
