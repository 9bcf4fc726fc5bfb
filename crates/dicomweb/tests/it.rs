//! The DICOMweb building blocks on the pinned pydicom corpus, and QIDO-RS
//! through the real query engine on an encrypted archive in a temporary
//! directory.
//!
//! The corpus is found as `bastion-archive`'s tests find it:
//! `$BASTION_CORPUS` (relative paths from the workspace root), else
//! `.cache/corpus` in the workspace; `scripts/fetch-corpus.sh` downloads it.
//! A missing corpus fails the tests.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bastion_archive::query::{FindOptions, Level};
use bastion_archive::transcode::{transcode, EXPLICIT_VR_LE, JPEG_BASELINE};
use bastion_archive::OnConflict;
use bastion_archive::{Archive, Limits, Origin, Received};
use bastion_audit::events::EventLog;
use bastion_dicomweb::json::bulk_value;
use bastion_dicomweb::{
    frame_transfer_syntax, frames, parse_multipart_related, qido_result_json, qido_to_query,
    render, render_image, thumbnail, to_dicom_json, DicomWebError, ImageFormat, JsonOptions,
    MultipartLimits, MultipartWriter, PathUids, QidoLevel, RenderOptions,
};
use bastion_index::Index;
use bastion_model::Uid;
use bastion_store::{BlobStore, MasterKey};
use dicom_core::value::{PixelFragmentSequence, PrimitiveValue};
use dicom_core::{DataElement, DicomValue, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::{meta::FileMetaTable, InMemDicomObject};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use serde_json::{json, Value};

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

fn file(rel: &str) -> Vec<u8> {
    std::fs::read(corpus().join("pydicom").join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// (transfer syntax, dataset bytes as stored) of a corpus Part 10 file.
fn stored(rel: &str) -> (String, Vec<u8>) {
    let bytes = file(rel);
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

fn encode(obj: &InMemDicomObject, ts: &str) -> Vec<u8> {
    let ts = TransferSyntaxRegistry
        .get(ts)
        .expect("known transfer syntax");
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, ts).expect("encode");
    out
}

fn opts() -> JsonOptions {
    JsonOptions {
        bulk_base: "https://pacs/dicomweb/studies/S/series/R/instances/I/bulk".into(),
        bulk_threshold: 1024,
    }
}

// ---------------------------------------------------------------- JSON

#[test]
fn json_of_ct_small() {
    let (ts, ds) = stored("test_files/CT_small.dcm");
    let j = to_dicom_json(&parse(&ds, &ts), &opts());
    assert_eq!(
        j["00100010"],
        json!({"vr": "PN", "Value": [{"Alphabetic": "CompressedSamples^CT1"}]})
    );
    assert_eq!(j["00100020"], json!({"vr": "LO", "Value": ["1CT1"]}));
    assert_eq!(j["00280010"], json!({"vr": "US", "Value": [128]}));
    assert_eq!(j["00280100"], json!({"vr": "US", "Value": [16]}));
    assert_eq!(
        j["00200032"]["Value"],
        json!([-158.135803, -179.035797, -75.699997])
    );
    assert_eq!(j["00200013"], json!({"vr": "IS", "Value": [1]}));
    assert_eq!(
        j["7FE00010"],
        json!({"vr": "OW", "BulkDataURI":
            "https://pacs/dicomweb/studies/S/series/R/instances/I/bulk/7FE00010"})
    );
    assert_eq!(j["00080016"]["Value"], json!(["1.2.840.10008.5.1.4.1.1.2"]));
    // Every attribute has a VR and at most one value field.
    for (tag, attr) in j.as_object().expect("object") {
        assert_eq!(tag.len(), 8, "{tag}");
        assert!(attr["vr"].is_string(), "{tag}");
        let fields = ["Value", "BulkDataURI", "InlineBinary"]
            .iter()
            .filter(|k| attr.get(**k).is_some())
            .count();
        assert!(fields <= 1, "{tag}");
    }
    // The bulk data behind the URI is the pixel data.
    let obj = parse(&ds, &ts);
    assert_eq!(
        bulk_value(&obj, "7FE00010").expect("bulk").len(),
        128 * 128 * 2
    );
}

#[test]
fn json_of_iso2022_japanese_person_name() {
    let (ts, ds) = stored("charset_files/chrH31.dcm");
    let j = to_dicom_json(&parse(&ds, &ts), &opts());
    assert_eq!(
        j["00100010"]["Value"][0],
        json!({"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎",
            "Phonetic": "やまだ^たろう"})
    );
    assert_eq!(j["00080005"]["Value"], json!(["ISO_IR 192"]));
}

// ---------------------------------------------------------------- multipart

#[test]
fn multipart_round_trip() {
    let (_, ct) = stored("test_files/CT_small.dcm");
    let (_, mr) = stored("test_files/MR_small.dcm");
    let mut w = MultipartWriter::new();
    w.add_part("application/dicom", &ct);
    w.add_part("application/dicom", &mr);
    let content_type = w.content_type();
    let boundary = w.boundary().to_owned();
    let body = w.finish();
    assert!(body.starts_with(format!("--{boundary}\r\n").as_bytes()));
    let limits = MultipartLimits::default();
    for ct_header in [
        content_type.clone(),
        format!("multipart/related; type=\"application/dicom\"; boundary=\"{boundary}\""),
        format!("multipart/related; type=application/dicom; boundary={boundary}"),
    ] {
        let parts = parse_multipart_related(&ct_header, &body, &limits).expect("parts");
        assert_eq!(parts.len(), 2, "{ct_header}");
        assert_eq!(parts[0].content_type(), Some("application/dicom"));
        assert_eq!(parts[0].body, &ct[..]);
        assert_eq!(parts[1].body, &mr[..]);
    }
    // Missing final boundary.
    let cut = &body[..body.len() - format!("\r\n--{boundary}--\r\n").len()];
    assert!(matches!(
        parse_multipart_related(&content_type, cut, &limits),
        Err(DicomWebError::BadMultipart(_))
    ));
    // Too many parts.
    let one = MultipartLimits {
        max_parts: 1,
        ..limits
    };
    assert_eq!(
        parse_multipart_related(&content_type, &body, &one)
            .err()
            .map(|e| e.http_status()),
        Some(413)
    );
}

// ---------------------------------------------------------------- frames

#[test]
fn native_multiframe_frames_are_slices() {
    let (ts, ds) = stored("test_files/rtdose.dcm");
    let obj = parse(&ds, &ts);
    let n: u32 = obj
        .get(tags::NUMBER_OF_FRAMES)
        .and_then(|e| e.to_int().ok())
        .expect("frames");
    assert!(n > 2);
    let pixels = obj
        .get(tags::PIXEL_DATA)
        .and_then(|e| e.to_bytes().ok())
        .expect("pixels")
        .into_owned();
    let all: Vec<u32> = (1..=n).collect();
    let got = frames(&ds, &ts, &all).expect("frames");
    assert_eq!(got.len(), n as usize);
    assert_eq!(got.concat(), pixels[..got.concat().len()]);
    assert_eq!(got[0].len() * n as usize, pixels.len());
    let picked = frames(&ds, &ts, &[3, 1, 3]).expect("frames");
    assert_eq!(picked, vec![got[2].clone(), got[0].clone(), got[2].clone()]);
    assert_eq!(frame_transfer_syntax(&ts), EXPLICIT_VR_LE);
    assert_eq!(
        frames(&ds, &ts, &[n + 1]),
        Err(DicomWebError::FrameNotFound {
            frame: n + 1,
            frames: n
        })
    );
    assert!(matches!(
        frames(&ds, &ts, &[0]),
        Err(DicomWebError::FrameNotFound { .. })
    ));
}

#[test]
fn rle_frames_are_the_fragments_and_decode_to_the_native_frames() {
    // rtdose is 32-bit: split, not decoded (transcode decodes 8 and 16 bits).
    for (rle, decode) in [
        ("test_files/rtdose_rle.dcm", false),
        ("test_files/SC_rgb_rle_2frame.dcm", true),
        ("test_files/SC_rgb_rle_16bit_2frame.dcm", true),
    ] {
        let (ts, ds) = stored(rle);
        let obj = parse(&ds, &ts);
        let fragments = obj
            .get(tags::PIXEL_DATA)
            .and_then(|e| e.value().fragments().map(<[Vec<u8>]>::to_vec))
            .expect("fragments");
        let n = fragments.len() as u32;
        let all: Vec<u32> = (1..=n).collect();
        assert_eq!(frames(&ds, &ts, &all).expect(rle), fragments, "{rle}");
        assert_eq!(frame_transfer_syntax(&ts), ts);
        if !decode {
            continue;
        }
        // Decoded, the frames are the decoded pixel data's slices.
        let decoded = transcode(&ds, &ts, EXPLICIT_VR_LE).expect("decode");
        let native_frames = frames(&decoded, EXPLICIT_VR_LE, &all).expect(rle);
        let pixels = parse(&decoded, EXPLICIT_VR_LE)
            .get(tags::PIXEL_DATA)
            .and_then(|e| e.to_bytes().ok())
            .expect("pixels")
            .into_owned();
        assert_eq!(
            native_frames.concat(),
            pixels[..native_frames.concat().len()]
        );
        assert_eq!(native_frames.len(), n as usize);
        assert_eq!(native_frames[0].len(), native_frames[1].len());
        assert_ne!(
            native_frames[0], native_frames[1],
            "{rle}: two different frames"
        );
    }
}

/// One JPEG image split into fragments per frame, with an empty Basic
/// Offset Table or a filled one.
fn multi_fragment_jpeg(with_bot: bool) -> (Vec<u8>, Vec<u8>) {
    let (ts, ds) = stored("test_files/SC_rgb_jpeg_dcmtk.dcm");
    assert_eq!(ts, JPEG_BASELINE);
    let mut obj = parse(&ds, &ts);
    let jpeg = obj
        .get(tags::PIXEL_DATA)
        .and_then(|e| e.value().fragments().map(<[Vec<u8>]>::concat))
        .expect("fragments");
    let mut cut = jpeg.len() / 3;
    cut += cut % 2;
    let (a, b) = jpeg.split_at(cut);
    let mut b = b.to_vec();
    if b.len() % 2 == 1 {
        b.push(0);
    }
    let fragments = vec![a.to_vec(), b.clone(), a.to_vec(), b.clone(), a.to_vec(), b];
    let frame_len = (8 + a.len() + 8 + fragments[1].len()) as u32;
    let bot = if with_bot {
        vec![0, frame_len, 2 * frame_len]
    } else {
        Vec::new()
    };
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        DicomValue::PixelSequence(PixelFragmentSequence::new(bot, fragments)),
    ));
    obj.put(DataElement::new(
        tags::NUMBER_OF_FRAMES,
        VR::IS,
        PrimitiveValue::from("3"),
    ));
    let mut whole = jpeg;
    if whole.len() % 2 == 1 {
        whole.push(0);
    }
    (encode(&obj, &ts), whole)
}

#[test]
fn multi_fragment_jpeg_frames_are_concatenated() {
    for with_bot in [false, true] {
        let (ds, jpeg) = multi_fragment_jpeg(with_bot);
        let got = frames(&ds, JPEG_BASELINE, &[1, 2, 3]).expect("frames");
        assert_eq!(got, vec![jpeg.clone(), jpeg.clone(), jpeg.clone()]);
        // And each renders.
        let png = render(&ds, JPEG_BASELINE, 3, &RenderOptions::default()).expect("render");
        assert_eq!(png_size(&png), (100, 100, png::ColorType::Rgb));
    }
}

// ---------------------------------------------------------------- rendered

fn png_size(bytes: &[u8]) -> (u32, u32, png::ColorType) {
    let decoder = png::Decoder::new(Cursor::new(bytes));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0u8; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("decodes");
    (info.width, info.height, info.color_type)
}

#[test]
fn rendered_png_of_ct_mr_jpeg_and_rle() {
    for (rel, w, h, colour) in [
        (
            "test_files/CT_small.dcm",
            128,
            128,
            png::ColorType::Grayscale,
        ),
        ("test_files/MR_small.dcm", 64, 64, png::ColorType::Grayscale),
        (
            "test_files/SC_rgb_jpeg_dcmtk.dcm",
            100,
            100,
            png::ColorType::Rgb,
        ),
        (
            "test_files/SC_jpeg_no_color_transform.dcm",
            256,
            256,
            png::ColorType::Rgb,
        ),
        (
            "test_files/MR_small_RLE.dcm",
            64,
            64,
            png::ColorType::Grayscale,
        ),
        ("test_files/SC_rgb_rle.dcm", 100, 100, png::ColorType::Rgb),
    ] {
        let (ts, ds) = stored(rel);
        let png =
            render(&ds, &ts, 1, &RenderOptions::default()).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(png_size(&png), (w, h, colour), "{rel}");
        let jpeg = render(
            &ds,
            &ts,
            1,
            &RenderOptions {
                format: ImageFormat::Jpeg,
                window: Some((40.0, 400.0)),
                ..RenderOptions::default()
            },
        )
        .expect(rel);
        assert!(jpeg.starts_with(&[0xFF, 0xD8]), "{rel}");
        let thumb = thumbnail(&ds, &ts, ImageFormat::Png).expect(rel);
        let (tw, th, _) = png_size(&thumb);
        assert!(
            tw <= 128 && th <= 128 && (tw == 128 || th == 128 || (tw, th) == (w, h)),
            "{rel}"
        );
    }
}

#[test]
fn rendered_rle_equals_rendered_native() {
    let (ts, ds) = stored("test_files/MR_small.dcm");
    let (rts, rds) = stored("test_files/MR_small_RLE.dcm");
    let o = RenderOptions::default();
    assert_eq!(render(&ds, &ts, 1, &o), render(&rds, &rts, 1, &o));
}

#[test]
fn the_window_used_is_reported() {
    // CT_small has no Window Center/Width: the frame's range is used, and
    // rendering with that window again gives the same image.
    let (ts, ds) = stored("test_files/CT_small.dcm");
    let d = render_image(&ds, &ts, 1, &RenderOptions::default()).expect("render");
    let (c, w) = d.window.expect("a grey image reports its window");
    assert!(w > 100.0 && c.is_finite(), "{c},{w}");
    let again = render_image(
        &ds,
        &ts,
        1,
        &RenderOptions {
            window: Some((c, w)),
            ..RenderOptions::default()
        },
    )
    .expect("render");
    assert_eq!(again.bytes, d.bytes);
    assert_eq!(again.window, Some((c, w)));
    // A requested window is reported as given; colour has none.
    let asked = RenderOptions {
        window: Some((40.0, 400.0)),
        ..RenderOptions::default()
    };
    let r = render_image(&ds, &ts, 1, &asked).expect("render");
    assert_eq!(r.window, Some((40.0, 400.0)));
    let (jts, jds) = stored("test_files/SC_rgb_jpeg_dcmtk.dcm");
    let colour = render_image(&jds, &jts, 1, &RenderOptions::default()).expect("render");
    assert_eq!(colour.window, None);
}

#[test]
fn window_changes_the_image() {
    let (ts, ds) = stored("test_files/CT_small.dcm");
    let narrow = RenderOptions {
        window: Some((0.0, 1.0)),
        ..RenderOptions::default()
    };
    let wide = RenderOptions {
        window: Some((0.0, 4000.0)),
        ..RenderOptions::default()
    };
    assert_ne!(render(&ds, &ts, 1, &narrow), render(&ds, &ts, 1, &wide));
    assert_eq!(
        render(&ds, &ts, 2, &narrow),
        Err(DicomWebError::FrameNotFound {
            frame: 2,
            frames: 1
        })
    );
}

#[test]
fn crafted_rows_are_refused_before_allocating() {
    // Native: Rows × Columns far beyond the pixel data present.
    let (ts, ds) = stored("test_files/CT_small.dcm");
    let mut obj = parse(&ds, &ts);
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
    let crafted = encode(&obj, &ts);
    let e = render(&crafted, &ts, 1, &RenderOptions::default()).expect_err("crafted");
    assert!(matches!(e, DicomWebError::InvalidImage(_)), "{e}");
    assert!(matches!(
        frames(&crafted, &ts, &[1]),
        Err(DicomWebError::InvalidImage(_))
    ));
    // Compressed: the decoded size is over the cap.
    let (ts, ds) = stored("test_files/SC_rgb_jpeg_dcmtk.dcm");
    let mut obj = parse(&ds, &ts);
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
    let crafted = encode(&obj, &ts);
    let e = render(&crafted, &ts, 1, &RenderOptions::default()).expect_err("crafted");
    assert_eq!(e.http_status(), 422, "{e}");
}

#[test]
fn undecoded_syntaxes_are_not_acceptable() {
    // 12-bit JPEG Extended: jpeg-decoder has no 12-bit DCT; a clean 4xx.
    let (ts, ds) = stored("test_files/JPEG-lossy.dcm");
    let e = render(&ds, &ts, 1, &RenderOptions::default()).expect_err("12-bit");
    assert!((400..500).contains(&e.http_status()), "{e}");
    let (ts, ds) = stored("test_files/MR_small_jp2klossless.dcm");
    let e = render(&ds, &ts, 1, &RenderOptions::default()).expect_err("J2K");
    assert_eq!(e.http_status(), 406);
    // Frames need no decoding.
    assert_eq!(frames(&ds, &ts, &[1]).map(|f| f.len()), Ok(1));
}

// ---------------------------------------------------------------- QIDO-RS

fn archive(dir: &Path) -> Arc<Archive> {
    let master = MasterKey::from_bytes([7u8; 32]);
    let store = BlobStore::open(&dir.join("blobs"), master.clone()).expect("store");
    let index =
        Index::open(&dir.join("index.db"), &master.derive("bastion index v1")).expect("index");
    let events = EventLog::open(&dir.join("events/events.log")).expect("events");
    Arc::new(Archive::new(
        Arc::new(store),
        Arc::new(index),
        Arc::new(events),
        Limits::default(),
    ))
}

fn search(
    a: &Archive,
    level: QidoLevel,
    path: &PathUids,
    params: &[(&str, &str)],
) -> Result<Vec<Value>, DicomWebError> {
    let params: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let (query, qopts) = qido_to_query(level, path, &params)?;
    let find = FindOptions {
        ae: "WEB".into(),
        peer: "127.0.0.1:1".into(),
        retrieve_ae: String::new(),
        max_matches: 100,
        identifier: None,
    };
    let mut out = Vec::new();
    let mut seen = 0usize;
    a.find(&query, &find, &mut |r| {
        seen += 1;
        if seen > qopts.offset && qopts.limit.is_none_or(|l| out.len() < l) {
            out.push(qido_result_json(
                r.identifier.clone(),
                level,
                "https://pacs/dicomweb",
                &JsonOptions::default(),
            ));
        }
        true
    })
    .expect("find");
    Ok(out)
}

#[test]
fn qido_through_the_query_engine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = archive(dir.path());
    let origin = Origin {
        ae: "IMPORT".into(),
        peer: "test".into(),
        on_conflict: OnConflict::Refuse,
    };
    for rel in [
        "test_files/CT_small.dcm",
        "test_files/MR_small.dcm",
        "charset_files/chrH31.dcm",
    ] {
        a.ingest(Received::File(file(rel)), &origin)
            .unwrap_or_else(|e| panic!("{rel}: {e}"));
    }
    let none = PathUids::default();
    let all = search(&a, QidoLevel::Study, &none, &[]).expect("all");
    assert_eq!(all.len(), 3);

    let ct = search(&a, QidoLevel::Study, &none, &[("PatientID", "1CT1")]).expect("ct");
    assert_eq!(ct.len(), 1);
    let study = ct[0]["0020000D"]["Value"][0]
        .as_str()
        .expect("uid")
        .to_owned();
    assert_eq!(
        ct[0]["00081190"]["Value"][0],
        json!(format!("https://pacs/dicomweb/studies/{study}"))
    );
    assert_eq!(
        ct[0]["00100010"]["Value"][0]["Alphabetic"],
        "CompressedSamples^CT1"
    );
    assert_eq!(ct[0]["00201208"]["Value"], json!([1]));
    assert_eq!(ct[0]["00080061"]["Value"], json!(["CT"]));
    for required in ["00080020", "00080030", "00080050", "00080090", "00200010"] {
        assert!(ct[0].get(required).is_some(), "{required}");
    }
    // The same through the tag, and an includefield.
    let by_tag = search(
        &a,
        QidoLevel::Study,
        &none,
        &[("00100020", "1CT1"), ("includefield", "IssuerOfPatientID")],
    )
    .expect("tag");
    assert_eq!(by_tag.len(), 1);
    assert!(by_tag[0].get("00100021").is_some());

    // Person name: the engine is case-insensitive; fuzzy adds a prefix match.
    let literal = search(
        &a,
        QidoLevel::Study,
        &none,
        &[("PatientName", "yamada^tarou")],
    )
    .expect("literal");
    assert_eq!(literal.len(), 1);
    let prefix = [("PatientName", "compressedsamples")];
    assert!(search(&a, QidoLevel::Study, &none, &prefix)
        .expect("no fuzzy")
        .is_empty());
    let fuzzy = search(
        &a,
        QidoLevel::Study,
        &none,
        &[
            ("PatientName", "compressedsamples"),
            ("fuzzymatching", "true"),
        ],
    )
    .expect("fuzzy");
    assert_eq!(fuzzy.len(), 2, "CT1 and MR1");
    let fuzzy_literal = search(
        &a,
        QidoLevel::Study,
        &none,
        &[("PatientName", "yamada^tarou"), ("fuzzymatching", "true")],
    )
    .expect("fuzzy");
    assert!(fuzzy_literal.len() >= literal.len());

    // Series of the study, from the path; instances below them.
    let path = PathUids {
        study: Some(Uid::parse(&study).expect("uid")),
        series: None,
    };
    let series = search(&a, QidoLevel::Series, &path, &[]).expect("series");
    assert_eq!(series.len(), 1);
    assert_eq!(series[0]["00080060"]["Value"], json!(["CT"]));
    let series_uid = series[0]["0020000E"]["Value"][0]
        .as_str()
        .expect("uid")
        .to_owned();
    let instances = search(
        &a,
        QidoLevel::Instance,
        &none,
        &[("SeriesInstanceUID", &series_uid)],
    )
    .expect("instances");
    assert_eq!(instances.len(), 1);
    let sop = instances[0]["00080018"]["Value"][0].as_str().expect("uid");
    assert_eq!(
        instances[0]["00081190"]["Value"][0],
        json!(format!(
            "https://pacs/dicomweb/studies/{study}/series/{series_uid}/instances/{sop}"
        ))
    );
    assert_eq!(instances[0]["00280010"]["Value"], json!([128]));
    // Study attributes come along when the path does not fix the study.
    assert!(instances[0].get("00100020").is_some());

    // limit / offset.
    assert_eq!(
        search(&a, QidoLevel::Study, &none, &[("limit", "2")])
            .expect("limit")
            .len(),
        2
    );
    assert_eq!(
        search(&a, QidoLevel::Study, &none, &[("offset", "2")])
            .expect("offset")
            .len(),
        1
    );
    // Unknown attribute → 400.
    assert_eq!(
        search(&a, QidoLevel::Study, &none, &[("PatientsName", "x")])
            .err()
            .map(|e| e.http_status()),
        Some(400)
    );
    assert_eq!(Level::Study, QidoLevel::Study.level());
}
