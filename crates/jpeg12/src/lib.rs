//! # bastion-jpeg12: 12-bit JPEG decoding
//!
//! JPEG Extended (ISO 10918-1 process 4, DICOM transfer syntax
//! 1.2.840.10008.1.2.4.51, PS3.5 §A.4.1) may carry 12-bit samples.
//! jpeg-decoder (the pure-Rust decoder the archive uses) has no 12-bit DCT,
//! and no safe Rust binding exposes libjpeg-turbo's 12-bit API, so this
//! crate calls `tj3Decompress12` of libjpeg-turbo 3.1 (C, built from the
//! sources bundled with `turbojpeg-sys`) through FFI. It is the workspace's
//! only `unsafe` code, and it runs only in `bastion`'s sandboxed decoding
//! child (`decoder_sandbox`: seccomp, resource limits), never in the
//! server process.

use turbojpeg_sys as tj;

/// One decoded 12-bit image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// 1 (grey) or 3 (RGB: libjpeg-turbo converts YCbCr).
    pub components: u16,
    /// Sample precision of the frame header (9–12).
    pub precision: u8,
    /// Samples, component-interleaved, row by row.
    pub samples: Vec<u16>,
}

/// A TurboJPEG decompressor handle, destroyed on drop.
struct Handle(tj::tjhandle);

impl Handle {
    fn new() -> Result<Handle, String> {
        // SAFETY: tj3Init has no preconditions; a null result is checked.
        let h = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as CInt) };
        if h.is_null() {
            return Err("cannot initialise the JPEG decoder".into());
        }
        Ok(Handle(h))
    }

    fn get(&self, param: tj::TJPARAM) -> CInt {
        // SAFETY: the handle is valid (non-null, not destroyed until drop).
        unsafe { tj::tj3Get(self.0, param as CInt) }
    }

    fn set(&self, param: tj::TJPARAM, value: CInt) -> Result<(), String> {
        // SAFETY: as in `get`.
        if unsafe { tj::tj3Set(self.0, param as CInt, value) } != 0 {
            return Err(self.error());
        }
        Ok(())
    }

    /// The library's message for the last error (no image data in it).
    fn error(&self) -> String {
        // SAFETY: tj3GetErrorStr returns a pointer to a NUL-terminated
        // string owned by the handle (or a static one), valid until the next
        // call on the handle; it is copied at once.
        let msg = unsafe {
            let p = tj::tj3GetErrorStr(self.0);
            if p.is_null() {
                return "unknown JPEG decoder error".into();
            }
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        };
        msg
    }

    fn fatal(&self) -> bool {
        // SAFETY: as in `get`.
        let code = unsafe { tj::tj3GetErrorCode(self.0) };
        code != tj::TJERR_TJERR_WARNING as CInt
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

type CInt = std::os::raw::c_int;

/// Decodes one JPEG image with 9–12-bit samples. `max_samples` caps the
/// decoded samples (width × height × components), checked from the frame
/// header before anything is allocated or decoded.
///
/// # Errors
/// The reason as one line: not a JPEG, a precision other than 9–12, CMYK,
/// too large, or the library's error for a corrupt codestream.
pub fn decode12(jpeg: &[u8], max_samples: usize) -> Result<Decoded, String> {
    let h = Handle::new()?;
    // SAFETY: the pointer and length describe `jpeg`, which outlives the
    // call; the library only reads it.
    if unsafe { tj::tj3DecompressHeader(h.0, jpeg.as_ptr(), jpeg.len() as _) } != 0 {
        return Err(h.error());
    }
    let width = u32::try_from(h.get(tj::TJPARAM_TJPARAM_JPEGWIDTH)).unwrap_or(0);
    let height = u32::try_from(h.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT)).unwrap_or(0);
    let precision = h.get(tj::TJPARAM_TJPARAM_PRECISION);
    if !(9..=12).contains(&precision) {
        return Err(format!(
            "sample precision {precision} (9 to 12 decoded here)"
        ));
    }
    let colourspace = h.get(tj::TJPARAM_TJPARAM_COLORSPACE);
    let (components, format) = match colourspace as tj::TJCS {
        tj::TJCS_TJCS_GRAY => (1u16, tj::TJPF_TJPF_GRAY),
        tj::TJCS_TJCS_RGB | tj::TJCS_TJCS_YCbCr => (3, tj::TJPF_TJPF_RGB),
        _ => return Err("CMYK / YCCK JPEG images are not decoded".into()),
    };
    let size = usize::try_from(u64::from(width) * u64::from(height) * u64::from(components))
        .ok()
        .filter(|s| *s > 0 && *s <= max_samples)
        .ok_or_else(|| format!("{width}×{height}×{components} samples: empty or over the limit"))?;
    // Progressive images: bound the scans (a crafted file with many scans
    // would otherwise spin for long).
    h.set(tj::TJPARAM_TJPARAM_SCANLIMIT, 500)?;
    let mut buf: Vec<i16> = vec![0; size];
    // SAFETY: `buf` holds width × height × components samples, exactly
    // what the library writes for pitch 0 (width × components) and a
    // pixel format of `components` samples per pixel, as the header it read
    // says; `jpeg` is read only.
    let rc = unsafe {
        tj::tj3Decompress12(
            h.0,
            jpeg.as_ptr(),
            jpeg.len() as _,
            buf.as_mut_ptr(),
            0,
            format as CInt,
        )
    };
    if rc != 0 && h.fatal() {
        return Err(h.error());
    }
    Ok(Decoded {
        width,
        height,
        components,
        precision: precision as u8,
        samples: buf.into_iter().map(|v| v.clamp(0, 4095) as u16).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error() {
        assert!(decode12(b"not a jpeg", 1 << 20).is_err());
        assert!(decode12(&[0xFF, 0xD8, 0xFF, 0xC1, 0, 2], 1 << 20).is_err());
        assert!(decode12(&[], 1 << 20).is_err());
    }
}
