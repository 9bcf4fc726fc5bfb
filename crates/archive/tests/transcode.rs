//! Decompression for retrieval (`bastion_archive::transcode`) on the pinned
//! pydicom corpus: each compressed file is decoded and its pixel data
//! compared with the uncompressed file of the same image.
//!
//! The corpus is found as the interop tests find it: `$BASTION_CORPUS`
//! (relative paths from the workspace root), else `.cache/corpus` in the
//! workspace; `scripts/fetch-corpus.sh` downloads it (`scripts/test.sh` runs
//! it before `cargo test`). A missing corpus fails the tests.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use bastion_archive::scan::{scan, Encoding, ScanLimits};
use bastion_archive::transcode::{
    can_transcode, transcode, EXPLICIT_VR_LE, FALLBACKS, IMPLICIT_VR_LE, JPEG_BASELINE,
    JPEG_EXTENDED, JPEG_LOSSLESS, JPEG_LOSSLESS_SV1, MAX_DECODED_PIXEL_BYTES, RLE_LOSSLESS,
};
use bastion_archive::ArchiveError;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::{meta::FileMetaTable, InMemDicomObject};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

/// Encapsulated transfer syntaxes are explicit VR little endian (PS3.5 §A.4).
const EXPLICIT_LE: Encoding = Encoding {
    explicit_vr: true,
    little_endian: true,
};
/// The ingest defaults (`Limits::default`).
const SCAN_LIMITS: ScanLimits = ScanLimits {
    max_element_len: 1 << 30,
    max_depth: 16,
};

fn corpus() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let root = std::env::var_os("BASTION_CORPUS")
        .map(|p| workspace.join(p))
        .unwrap_or_else(|| workspace.join(".cache/corpus"));
    assert!(
        root.join("pydicom").is_dir(),
        "corpus missing at {}: run scripts/fetch-corpus.sh (or set BASTION_CORPUS)",
        root.display()
    );
    root
}

/// (transfer syntax, dataset bytes as stored) of a corpus Part 10 file.
fn stored(rel: &str) -> (String, Vec<u8>) {
    let bytes = std::fs::read(corpus().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert_eq!(&bytes[128..132], b"DICM", "{rel}");
    let mut cursor = Cursor::new(&bytes[128..]);
    let meta = FileMetaTable::from_reader(&mut cursor).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let start = 128 + cursor.position() as usize;
    (
        meta.transfer_syntax().trim_end_matches('\0').to_owned(),
        bytes[start..].to_vec(),
    )
}

fn parse(dataset: &[u8], ts: &str) -> InMemDicomObject {
    let ts = TransferSyntaxRegistry
        .get(ts)
        .expect("known transfer syntax");
    InMemDicomObject::read_dataset_with_ts(dataset, ts).expect("parse")
}

fn text(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<String> {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches([' ', '\0']).to_owned())
}

fn us(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<u16> {
    obj.get(tag).and_then(|e| e.uint16().ok())
}

fn pixels(obj: &InMemDicomObject) -> Vec<u8> {
    obj.get(tags::PIXEL_DATA)
        .expect("Pixel Data")
        .to_bytes()
        .expect("native Pixel Data")
        .into_owned()
}

/// Decodes `compressed` to `to` and returns the parsed result, after checking
/// what every decoded dataset must say.
fn decode(compressed: &str, to: &str) -> InMemDicomObject {
    let (ts, data) = stored(compressed);
    assert!(can_transcode(&ts, to), "{compressed}: {ts} → {to}");
    let out = transcode(&data, &ts, to).unwrap_or_else(|e| panic!("{compressed}: {e}"));
    let obj = parse(&out, to);
    let vr = obj.get(tags::PIXEL_DATA).expect("Pixel Data").vr();
    if to == EXPLICIT_VR_LE {
        let want = if us(&obj, tags::BITS_ALLOCATED) == Some(8) {
            VR::OB
        } else {
            VR::OW
        };
        assert_eq!(vr, want, "{compressed}: Pixel Data VR");
    }
    for tag in [
        tags::EXTENDED_OFFSET_TABLE,
        tags::EXTENDED_OFFSET_TABLE_LENGTHS,
        tags::ENCAPSULATED_PIXEL_DATA_VALUE_TOTAL_LENGTH,
    ] {
        assert!(obj.get(tag).is_none(), "{compressed}: {tag} left");
    }
    if us(&obj, tags::SAMPLES_PER_PIXEL) == Some(3) {
        assert_eq!(
            us(&obj, tags::PLANAR_CONFIGURATION),
            Some(0),
            "{compressed}"
        );
    }
    obj
}

/// A lossless source decodes to exactly the reference's pixel data, and
/// keeps its Photometric Interpretation.
fn assert_lossless_pair(compressed: &str, reference: &str) {
    let (ref_ts, ref_data) = stored(reference);
    let want = parse(&ref_data, &ref_ts);
    for to in FALLBACKS {
        let got = decode(compressed, to);
        let (got_px, want_px) = (pixels(&got), pixels(&want));
        assert_eq!(got_px.len(), want_px.len(), "{compressed} → {to}: length");
        assert!(
            got_px == want_px,
            "{compressed} → {to}: pixel data differs from {reference}"
        );
        assert_eq!(
            text(&got, tags::PHOTOMETRIC_INTERPRETATION),
            text(&want, tags::PHOTOMETRIC_INTERPRETATION),
            "{compressed}"
        );
        for tag in [tags::SOP_INSTANCE_UID, tags::ROWS, tags::COLUMNS] {
            assert_eq!(
                got.get(tag).map(|e| e.to_bytes().ok()),
                want.get(tag).map(|e| e.to_bytes().ok()),
                "{compressed}: {tag}"
            );
        }
    }
}

#[test]
fn rle_decodes_byte_for_byte() {
    // 16-bit monochrome, 8-bit RGB, 16-bit RGB with 2 frames, 10 frames,
    // 8-bit palette colour
    assert_lossless_pair(
        "pydicom/test_files/MR_small_RLE.dcm",
        "pydicom/test_files/MR_small.dcm",
    );
    assert_lossless_pair(
        "pydicom/test_files/SC_rgb_rle.dcm",
        "pydicom-data/SC_rgb.dcm",
    );
    assert_lossless_pair(
        "pydicom/test_files/SC_rgb_rle_16bit_2frame.dcm",
        "pydicom-data/SC_rgb_16bit_2frame.dcm",
    );
    assert_lossless_pair(
        "pydicom-data/emri_small_RLE.dcm",
        "pydicom-data/emri_small.dcm",
    );
    assert_lossless_pair("pydicom-data/OBXXXX1A_rle.dcm", "pydicom-data/OBXXXX1A.dcm");
}

#[test]
fn rle_32_bit_decodes_byte_for_byte() {
    // dicom-rs's RLE adapter refuses 32 bits: Bastion's own PackBits decoder
    assert_lossless_pair(
        "pydicom/test_files/rtdose_rle.dcm",
        "pydicom/test_files/rtdose.dcm",
    );
    assert_lossless_pair(
        "pydicom/test_files/SC_rgb_rle_32bit_2frame.dcm",
        "pydicom-data/SC_rgb_32bit_2frame.dcm",
    );
}

#[test]
fn jpeg_lossless_decodes_byte_for_byte() {
    // SV1 (1.2.840.10008.1.2.4.70), 8-bit RGB: GDCM's compression of SC_rgb
    assert_lossless_pair(
        "pydicom/test_files/SC_rgb_jpeg_gdcm.dcm",
        "pydicom-data/SC_rgb.dcm",
    );
}

/// Files with no uncompressed twin in the corpus: the SHA-256 of the pixel
/// data DCMTK 3.6.7 `dcmdjpeg` (IJG libjpeg) decodes from them.
#[test]
fn jpeg_lossless_matches_an_independent_decoder() {
    use sha2::{Digest, Sha256};
    for (file, sha) in [
        (
            "pydicom-data/JPEG-LL.dcm", // 16-bit, 1024 × 256
            "a6e9d32143339d3f5748b5520aa4e6c6ffb3550b6f71fdf17bdb2ebb44bc2611",
        ),
        (
            "pydicom-data/JPGLosslessP14SV1_1s_1f_8b.dcm", // 8-bit, 768 × 1024
            "36e27e4f1e87a7d50407463323ddc3736736ecff35eb4e4a4c1b74646938835d",
        ),
    ] {
        let got = decode(file, EXPLICIT_VR_LE);
        assert_eq!(hex::encode(Sha256::digest(pixels(&got))), sha, "{file}");
        assert_eq!(
            text(&got, tags::LOSSY_IMAGE_COMPRESSION).as_deref(),
            Some("00")
        );
    }
}

#[test]
fn jpeg_baseline_is_decoded_to_rgb() {
    // YBR_FULL_422 in the dataset, YCbCr 4:2:2 in the codestream
    let got = decode(
        "pydicom/test_files/SC_rgb_dcmtk_+eb+cy+np.dcm",
        EXPLICIT_VR_LE,
    );
    assert_eq!(
        text(&got, tags::PHOTOMETRIC_INTERPRETATION).as_deref(),
        Some("RGB")
    );
    assert_eq!(
        text(&got, tags::LOSSY_IMAGE_COMPRESSION).as_deref(),
        Some("01")
    );
    assert!(got.get(tags::LOSSY_IMAGE_COMPRESSION_METHOD).is_some());
    let got_px = pixels(&got);
    assert_eq!(got_px.len(), 100 * 100 * 3);
    // DCMTK's decompression of the same file: lossy decoders differ only by
    // rounding in the IDCT, upsampling and colour conversion.
    let (ts, data) = stored("pydicom-data/SC_rgb_dcmtk_ebcynp_dcmd.dcm");
    let want = pixels(&parse(&data, &ts));
    assert_eq!(got_px.len(), want.len());
    let max = got_px
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    assert!(max <= 8, "differs from DCMTK's decoding by up to {max}");

    // 30 frames of YBR_FULL_422
    let got = decode("pydicom/test_files/examples_ybr_color.dcm", IMPLICIT_VR_LE);
    assert_eq!(
        text(&got, tags::PHOTOMETRIC_INTERPRETATION).as_deref(),
        Some("RGB")
    );
    assert_eq!(pixels(&got).len(), 240 * 320 * 3 * 30);

    // 3 × 3 RGB: 27 bytes, padded to an even length
    let got = decode(
        "pydicom/test_files/SC_rgb_small_odd_jpeg.dcm",
        EXPLICIT_VR_LE,
    );
    assert_eq!(pixels(&got).len(), 28);

    // monochrome stays monochrome
    let got = decode("pydicom-data/JPEG-LL.dcm", IMPLICIT_VR_LE);
    assert_eq!(
        text(&got, tags::PHOTOMETRIC_INTERPRETATION).as_deref(),
        Some("MONOCHROME2")
    );
}

#[test]
fn what_the_decoders_cannot_do_fails_cleanly() {
    // 12-bit JPEG needs the isolated decoder (libjpeg-turbo in the sandboxed
    // child), which no library test registers.
    let file = "pydicom/test_files/JPGExtended.dcm";
    let (ts, data) = stored(file);
    assert!(can_transcode(&ts, EXPLICIT_VR_LE), "{file}");
    match transcode(&data, &ts, EXPLICIT_VR_LE) {
        Err(ArchiveError::NotDicom(msg)) => {
            assert!(
                msg.contains("decompress") && msg.contains("12-bit"),
                "{msg}"
            )
        }
        other => panic!("{file} (12-bit JPEG Extended): {other:?}"),
    }
    for file in [
        "pydicom/test_files/MR_small_jpeg_ls_lossless.dcm",
        "pydicom/test_files/MR_small_jp2klossless.dcm",
    ] {
        let (ts, data) = stored(file);
        assert!(!can_transcode(&ts, EXPLICIT_VR_LE), "{file}");
        assert!(transcode(&data, &ts, EXPLICIT_VR_LE).is_err(), "{file}");
    }
}

/// Every corpus file in a decodable transfer syntax either decodes to a
/// dataset that parses in the target syntax or fails with an error: none
/// panics.
#[test]
fn every_decodable_corpus_file_decodes_or_fails_cleanly() {
    let decodable = [
        RLE_LOSSLESS,
        JPEG_BASELINE,
        JPEG_EXTENDED,
        JPEG_LOSSLESS,
        JPEG_LOSSLESS_SV1,
    ];
    let root = corpus();
    let mut files: Vec<PathBuf> = ["pydicom/test_files", "pydicom-data"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).expect("corpus dir"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
        .collect();
    files.sort();
    let (mut ok, mut failed) = (0, Vec::new());
    for path in files {
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        if bytes.get(128..132) != Some(b"DICM".as_slice()) {
            continue;
        }
        let mut cursor = Cursor::new(&bytes[128..]);
        let Ok(meta) = FileMetaTable::from_reader(&mut cursor) else {
            continue;
        };
        let ts = meta.transfer_syntax().trim_end_matches('\0').to_owned();
        if !decodable.contains(&ts.as_str()) {
            continue;
        }
        let data = &bytes[128 + cursor.position() as usize..];
        // Only what ingest stores: the bounds check refuses the rest (e.g.
        // SC_rgb_jpeg.dcm, an implicit VR dataset under a JPEG syntax).
        if scan(data, EXPLICIT_LE, SCAN_LIMITS, None).is_err() {
            continue;
        }
        match transcode(data, &ts, EXPLICIT_VR_LE) {
            Ok(out) => {
                let ts = TransferSyntaxRegistry
                    .get(EXPLICIT_VR_LE)
                    .expect("registry");
                assert!(
                    InMemDicomObject::read_dataset_with_ts(out.as_slice(), ts).is_ok(),
                    "{}: output does not parse",
                    path.display()
                );
                ok += 1;
            }
            Err(e) => failed.push(format!("{}: {e}", path.display())),
        }
    }
    eprintln!(
        "{ok} decoded, {} failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert!(ok >= 20, "only {ok} corpus files decoded");
}

/// Rows × Columns × Frames far beyond what the fragments hold is refused
/// before anything is decoded (nothing is allocated for it).
#[test]
fn oversized_image_attributes_are_refused_before_decoding() {
    let (ts, data) = stored("pydicom/test_files/MR_small_RLE.dcm");
    let mut obj = parse(&data, &ts);
    obj.put(DataElement::new(
        tags::ROWS,
        VR::US,
        PrimitiveValue::from(0xFFFF_u16),
    ));
    obj.put(DataElement::new(
        tags::COLUMNS,
        VR::US,
        PrimitiveValue::from(0xFFFF_u16),
    ));
    obj.put(DataElement::new(
        tags::NUMBER_OF_FRAMES,
        VR::IS,
        PrimitiveValue::from("1000"),
    ));
    let mut crafted = Vec::new();
    let rle = TransferSyntaxRegistry.get(&ts).expect("registry");
    obj.write_dataset_with_ts(&mut crafted, rle)
        .expect("encode");
    let t0 = std::time::Instant::now();
    match transcode(&crafted, &ts, EXPLICIT_VR_LE) {
        Err(ArchiveError::NotDicom(msg)) => {
            assert!(msg.contains(&MAX_DECODED_PIXEL_BYTES.to_string()), "{msg}")
        }
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed().as_secs() < 5);

    // Under the cap but larger than the encoded segments: refused by the
    // codestream check, not by the RLE adapter's unchecked indexing.
    obj.put(DataElement::new(
        tags::ROWS,
        VR::US,
        PrimitiveValue::from(128_u16),
    ));
    obj.put(DataElement::new(
        tags::COLUMNS,
        VR::US,
        PrimitiveValue::from(128_u16),
    ));
    obj.remove_element(tags::NUMBER_OF_FRAMES);
    let mut crafted = Vec::new();
    obj.write_dataset_with_ts(&mut crafted, rle)
        .expect("encode");
    match transcode(&crafted, &ts, EXPLICIT_VR_LE) {
        Err(ArchiveError::NotDicom(msg)) => assert!(msg.contains("RLE segment"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

/// Photometric Interpretation RGB means the JPEG samples are RGB (PS3.5
/// §8.2.1), even without an Adobe APP14 marker saying so: jpeg-decoder's own
/// rule (component identifiers 0, 1, 2 → YCbCr) would convert the colours of
/// this file, and dicom-rs's JPEG adapter follows it (mean error ≈ 48).
/// Its twin, the same slide tile encoded with APP14, decodes to nearly the
/// same samples.
#[test]
fn rgb_jpeg_without_app14_is_not_colour_converted() {
    let plain = decode(
        "pydicom/test_files/SC_jpeg_no_color_transform.dcm",
        EXPLICIT_VR_LE,
    );
    let app14 = decode(
        "pydicom/test_files/SC_jpeg_no_color_transform_2.dcm",
        EXPLICIT_VR_LE,
    );
    let (a, b) = (pixels(&plain), pixels(&app14));
    assert_eq!(a.len(), 256 * 256 * 3);
    assert_eq!(a.len(), b.len());
    let sum: u64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    let mean = sum as f64 / a.len() as f64;
    assert!(mean < 4.0, "mean difference {mean}");
    assert_eq!(
        text(&plain, tags::PHOTOMETRIC_INTERPRETATION).as_deref(),
        Some("RGB")
    );
}
