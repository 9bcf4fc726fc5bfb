//! `GET /api/studies/{study}/export`: a whole study as a zip of its stored
//! Part 10 files (PS3.10), for the web UI's "Download" button.
//!
//! Needs [`WebPermission::View`] and [`WebPermission::Export`] (roles
//! `admin` and `clinician`; not `technologist`, `auditor`, `researcher`, nor
//! `read`/`upload`-scoped tokens). The request is recorded with action
//! `export.study` and the Study Instance UID, which the audit trail turns
//! into a DICOM "Export" message (EventID 110106, PS3.15 A.5.3.6).
//!
//! Shape of the answer: `200 application/zip`, `Content-Disposition:
//! attachment; filename="study-<Study Instance UID>.zip"`, one entry per
//! instance named `<Series Instance UID>/<SOP Instance UID>.dcm`, the bytes
//! exactly as stored (no transcoding), entries "stored" (no compression:
//! pixel data is often compressed already). The zip is streamed as it is
//! written (zip's stream writer, data descriptors), so memory stays at one
//! instance whatever the study's size. 404 for an unknown study, 400 for a
//! malformed UID, 403 without the permissions. An error after the first
//! byte (a blob that fails authentication, say) aborts the response, so
//! the client sees an incomplete download, never a zip missing a file.

use std::io::Write;

use axum::{
    body::Body,
    extract::{Path, State},
    http::{header, HeaderValue},
    response::{IntoResponse, Response},
    Extension,
};
use bastion_model::{Uid, WebPermission};
use bytes::Bytes;

use crate::{audit::Note, auth::Caller, dicomweb::Target, error::ApiError, AppState};

/// Bytes buffered before a chunk goes to the client.
const CHUNK: usize = 256 << 10;

/// `GET /api/studies/{study}/export`; see the module documentation.
pub async fn study(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
    Path(study): Path<String>,
) -> Result<Response, ApiError> {
    note.action("export.study");
    caller.require(WebPermission::View)?;
    caller.require(WebPermission::Export)?;
    let target = Target::study(&study)?;
    note.study(target.study.as_str());
    let query = target.query()?;
    let archive = state.archive();
    let max = state.config().max_matches;
    let a = archive.clone();
    let instances = tokio::task::spawn_blocking(move || a.resolve_instances(&query, max))
        .await
        .map_err(|e| ApiError::internal("export task", e))??;
    if instances.is_empty() {
        return Err(ApiError::NotFound);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let sink = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
        };
        let result = (|| -> Result<(), String> {
            let mut zip = zip::ZipWriter::new_stream(sink);
            let options = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored)
                .large_file(true);
            for inst in &instances {
                let uid = Uid::parse(&inst.sop_instance_uid).map_err(|e| e.to_string())?;
                let bytes = archive.instance_part10(&uid).map_err(|e| e.to_string())?;
                let name = format!("{}/{}.dcm", inst.series_instance_uid, inst.sop_instance_uid);
                zip.start_file(name, options).map_err(|e| e.to_string())?;
                zip.write_all(&bytes).map_err(|e| e.to_string())?;
            }
            let mut sink = zip.finish().map_err(|e| e.to_string())?.into_inner();
            sink.flush().map_err(|e| e.to_string())
        })();
        if let Err(e) = result {
            tracing::warn!(error = %e, "study export aborted");
            let _ = tx.blocking_send(Err(std::io::Error::other("study export aborted")));
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut r = Body::from_stream(stream).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/zip"),
    );
    let disposition = format!(
        "attachment; filename=\"study-{}.zip\"",
        target.study.as_str()
    );
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&disposition).map_err(|e| ApiError::internal("header", e))?,
    );
    Ok(r)
}

/// A `Write` that sends `CHUNK`-sized pieces down a bounded channel (the
/// response body); fails once the client has gone.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client gone"))
    }
}
