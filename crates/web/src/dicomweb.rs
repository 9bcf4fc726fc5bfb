//! DICOMweb (PS3.18) routes under `/dicomweb`: QIDO-RS search (§10.6),
//! WADO-RS retrieve (§10.4: instances, metadata, frames, bulk data,
//! rendered, thumbnail) and STOW-RS store (§10.5), on the archive and the
//! `bastion-dicomweb` building blocks.
//!
//! - QIDO-RS: `application/dicom+json` (or `application/json`); an empty
//!   result is `200 []`; `limit`/`offset` applied after matching; more
//!   than `max_matches` matches → 400 ("refine the query"), as C-FIND
//!   refuses them; keys the engine cannot match → `Warning: 299`.
//! - WADO-RS instances: `multipart/related; type="application/dicom"`,
//!   a random boundary, streamed one instance at a time. `transfer-syntax=*`
//!   returns the stored bytes; an explicit transfer syntax is produced by
//!   `bastion_archive::transcode` or answered 406; without one, Explicit VR
//!   Little Endian (the default of PS3.18 §8.7.3.5.2) when it can be
//!   produced, else the stored syntax (documented leniency: every part's
//!   Content-Type names its real transfer syntax).
//! - STOW-RS: `multipart/related; type="application/dicom"`, each part
//!   through `Archive::ingest` (the C-STORE pipeline); 200 all stored, 202
//!   some failed, 409 none stored (§10.5.3), with ReferencedSOPSequence /
//!   FailedSOPSequence and a FailureReason per instance.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    body::Body,
    extract::{Path, Query, Request, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Extension, Router,
};
use bastion_archive::{
    budget::{BudgetError, Reservation},
    ingest::budget_err,
    query::{FindOptions, Query as ArchiveQuery, QueryIdentifier},
    spill::{Spill, SpooledData},
    transcode::{can_transcode, transcode, EXPLICIT_VR_LE},
    Archive, ArchiveError, Ingested, InstanceRef, Origin, Received,
};
use bastion_dicomweb::{
    frame_transfer_syntax, json::bulk_value, omit_empty_unnamed, qido_result_json, qido_to_query,
    retrieve_url, ImageFormat, JsonOptions, MultipartLimits, MultipartRelated, MultipartWriter,
    PartSplitter, PathUids, QidoLevel, RenderOptions, SpillChunk,
};
use bastion_model::{Uid, WebPermission};
use bytes::Bytes;
use serde_json::{json, Value};

use crate::{
    audit::Note,
    auth::Caller,
    body::BodyFrames,
    error::{failure_comment, failure_reason, ApiError},
    negotiate::{parse_accept, MediaRange},
    AppState,
};

/// Media type of DICOM JSON (PS3.18 §8.7.3.2).
const DICOM_JSON: &str = "application/dicom+json";

type Params = Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>;

/// The `/dicomweb` routes.
pub fn routes() -> Router<AppState> {
    const I: &str = "/studies/{study}/series/{series}/instances/{sop}";
    Router::new()
        .route("/studies", get(search_studies).post(stow_all))
        .route("/studies/{study}", get(retrieve_study).post(stow_study))
        .route("/studies/{study}/metadata", get(metadata_study))
        .route("/studies/{study}/series", get(search_series_in_study))
        .route("/studies/{study}/instances", get(search_instances_in_study))
        .route("/studies/{study}/series/{series}", get(retrieve_series))
        .route(
            "/studies/{study}/series/{series}/metadata",
            get(metadata_series),
        )
        .route(
            "/studies/{study}/series/{series}/instances",
            get(search_instances_in_series),
        )
        .route(I, get(retrieve_instance))
        .route(&format!("{I}/metadata"), get(metadata_instance))
        .route(&format!("{I}/frames/{{frames}}"), get(frames))
        .route(
            &format!("{I}/frames/{{frames}}/rendered"),
            get(rendered_frame),
        )
        .route(&format!("{I}/rendered"), get(rendered_instance))
        .route(&format!("{I}/thumbnail"), get(thumbnail))
        .route(&format!("{I}/bulk/{{*path}}"), get(bulk))
        .route("/series", get(search_series))
        .route("/instances", get(search_instances))
}

// ---------------------------------------------------------------- common

fn uid(s: &str) -> Result<Uid, ApiError> {
    Uid::parse(s).map_err(|_| ApiError::BadRequest("invalid UID in the resource path".into()))
}

fn params(p: Params) -> Result<Vec<(String, String)>, ApiError> {
    p.map(|Query(v)| v)
        .map_err(|_| ApiError::BadRequest("malformed query string".into()))
}

/// The service root as the client addressed it: `https://{Host}/dicomweb`.
fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("localhost");
    format!("https://{host}/dicomweb")
}

fn accept(headers: &HeaderMap) -> Vec<MediaRange> {
    parse_accept(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()))
}

/// A JSON response is acceptable (`application/dicom+json`,
/// `application/json` or a wildcard), else 406.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    if accept(headers)
        .iter()
        .any(|r| r.matches(DICOM_JSON) || r.matches("application/json"))
    {
        Ok(())
    } else {
        Err(ApiError::NotAcceptable(
            "this resource is available as application/dicom+json".into(),
        ))
    }
}

fn json_response(value: &Value) -> Result<Response, ApiError> {
    let body = serde_json::to_vec(value).map_err(|e| ApiError::internal("JSON", e))?;
    Ok(([(header::CONTENT_TYPE, DICOM_JSON)], body).into_response())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal("DICOMweb task", e))?
}

fn peer_of(ext: &axum::http::Extensions) -> String {
    crate::auth::peer(ext)
        .map(|a: SocketAddr| a.to_string())
        .unwrap_or_else(|| "unknown".into())
}

// ---------------------------------------------------------------- QIDO-RS

struct Search {
    level: QidoLevel,
    path: PathUids,
    action: &'static str,
}

async fn search(
    state: AppState,
    req: Request,
    s: Search,
    params: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    let note = req.extensions().get::<Note>().cloned().unwrap_or_default();
    note.action(s.action);
    let caller = req
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or(ApiError::Unauthenticated)?;
    caller.require(WebPermission::Query)?;
    require_json(req.headers())?;
    let (query, opts) = qido_to_query(s.level, &s.path, &params)?;
    let raw_query = req.uri().query().unwrap_or("").as_bytes().to_vec();
    note.qido(
        bastion_archive::query::level_name(query.level()),
        query.is_universal(),
        opts.limit,
    );
    note.query(&raw_query);
    let base = base_url(req.headers());
    let find = FindOptions {
        ae: format!("web:{}", caller.identity.username),
        peer: peer_of(req.extensions()),
        retrieve_ae: state.config().ae_title.clone(),
        max_matches: state.config().max_matches,
        identifier: Some(QueryIdentifier {
            bytes: raw_query,
            transfer_syntax: None,
        }),
    };
    let unsupported = query.has_unsupported_keys();
    let archive = state.archive();
    let level = s.level;
    let (results, studies) = blocking(move || {
        let json_opts = JsonOptions {
            bulk_base: base.clone(),
            ..JsonOptions::default()
        };
        let mut seen = 0usize;
        let limit = opts.limit.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut studies = Vec::new();
        archive.find(&query, &find, &mut |r| {
            seen += 1;
            if seen > opts.offset && out.len() < limit {
                if let Some(st) = r
                    .identifier
                    .get(dicom_dictionary_std::tags::STUDY_INSTANCE_UID)
                    .and_then(|e| e.to_str().ok())
                {
                    studies.push(st.trim_end_matches(['\0', ' ']).to_owned());
                }
                let mut identifier = r.identifier.clone();
                omit_empty_unnamed(&mut identifier, &opts.named);
                out.push(qido_result_json(identifier, level, &base, &json_opts));
            }
            out.len() < limit
        })?;
        Ok((out, studies))
    })
    .await?;
    for st in &studies {
        note.study(st);
    }
    let mut r = json_response(&Value::Array(results))?;
    if unsupported {
        r.headers_mut().insert(
            header::WARNING,
            HeaderValue::from_static(
                "299 bastion \"some attributes in the query are not matched and were treated as universal\"",
            ),
        );
    }
    Ok(r)
}

async fn search_studies(
    State(st): State<AppState>,
    p: Params,
    req: Request,
) -> Result<Response, ApiError> {
    let s = Search {
        level: QidoLevel::Study,
        path: PathUids::default(),
        action: "qido.studies",
    };
    search(st, req, s, params(p)?).await
}

async fn search_series(
    State(st): State<AppState>,
    p: Params,
    req: Request,
) -> Result<Response, ApiError> {
    let s = Search {
        level: QidoLevel::Series,
        path: PathUids::default(),
        action: "qido.series",
    };
    search(st, req, s, params(p)?).await
}

async fn search_instances(
    State(st): State<AppState>,
    p: Params,
    req: Request,
) -> Result<Response, ApiError> {
    let s = Search {
        level: QidoLevel::Instance,
        path: PathUids::default(),
        action: "qido.instances",
    };
    search(st, req, s, params(p)?).await
}

async fn search_series_in_study(
    State(st): State<AppState>,
    Path(study): Path<String>,
    p: Params,
    req: Request,
) -> Result<Response, ApiError> {
    let path = PathUids {
        study: Some(uid(&study)?),
        series: None,
    };
    let s = Search {
        level: QidoLevel::Series,
        path,
        action: "qido.series",
    };
    search(st, req, s, params(p)?).await
}

async fn search_instances_in_study(
    State(st): State<AppState>,
    Path(study): Path<String>,
    p: Params,
    req: Request,
) -> Result<Response, ApiError> {
    let path = PathUids {
        study: Some(uid(&study)?),
        series: None,
    };
    let s = Search {
        level: QidoLevel::Instance,
        path,
        action: "qido.instances",
    };
    search(st, req, s, params(p)?).await
}

async fn search_instances_in_series(
    State(st): State<AppState>,
    Path((study, series)): Path<(String, String)>,
    p: Params,
    req: Request,
) -> Result<Response, ApiError> {
    let path = PathUids {
        study: Some(uid(&study)?),
        series: Some(uid(&series)?),
    };
    let s = Search {
        level: QidoLevel::Instance,
        path,
        action: "qido.instances",
    };
    search(st, req, s, params(p)?).await
}

// ---------------------------------------------------------------- WADO-RS

/// A resource of WADO-RS: a study, a series or an instance.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) study: Uid,
    series: Option<Uid>,
    sop: Option<Uid>,
}

impl Target {
    pub(crate) fn study(study: &str) -> Result<Target, ApiError> {
        Ok(Target {
            study: uid(study)?,
            series: None,
            sop: None,
        })
    }
    fn series(study: &str, series: &str) -> Result<Target, ApiError> {
        Ok(Target {
            study: uid(study)?,
            series: Some(uid(series)?),
            sop: None,
        })
    }
    fn instance(study: &str, series: &str, sop: &str) -> Result<Target, ApiError> {
        Ok(Target {
            study: uid(study)?,
            series: Some(uid(series)?),
            sop: Some(uid(sop)?),
        })
    }

    /// The engine query naming exactly this resource.
    pub(crate) fn query(&self) -> Result<ArchiveQuery, ApiError> {
        let path = PathUids {
            study: Some(self.study.clone()),
            series: self.series.clone(),
        };
        let (level, params) = match (&self.series, &self.sop) {
            (None, _) => (QidoLevel::Study, vec![]),
            (Some(_), None) => (QidoLevel::Series, vec![]),
            (Some(_), Some(sop)) => (
                QidoLevel::Instance,
                vec![("SOPInstanceUID".to_owned(), sop.to_string())],
            ),
        };
        Ok(qido_to_query(level, &path, &params)?.0)
    }
}

/// The checks every WADO-RS handler starts with: view permission, action
/// and study recorded, the stored instances of the resource (404 when none).
async fn resolve(
    state: &AppState,
    caller: &Caller,
    note: &Note,
    action: &'static str,
    target: &Target,
) -> Result<Vec<InstanceRef>, ApiError> {
    note.action(action);
    note.study(target.study.as_str());
    caller.require(WebPermission::View)?;
    let query = target.query()?;
    let archive = state.archive();
    let max = state.config().max_matches;
    let found = blocking(move || Ok(archive.resolve_instances(&query, max)?)).await?;
    if found.is_empty() {
        return Err(ApiError::NotFound);
    }
    Ok(found)
}

/// What to send for each instance.
#[derive(Debug, Clone, PartialEq)]
enum Syntax {
    /// The stored bytes.
    Stored,
    /// Exactly this transfer syntax.
    Exactly(String),
    /// Explicit VR Little Endian when it can be produced, else stored.
    Default,
}

/// Picks the first acceptable representation for `instances` (406 when
/// none).
fn negotiate_instances(headers: &HeaderMap, instances: &[InstanceRef]) -> Result<Syntax, ApiError> {
    for r in accept(headers) {
        if !r.matches("multipart/related") {
            continue;
        }
        match r.param("type") {
            None | Some("application/dicom") => {}
            Some(_) => continue,
        }
        match r.param("transfer-syntax") {
            None => return Ok(Syntax::Default),
            Some("*") => return Ok(Syntax::Stored),
            Some(ts) => {
                let ok = instances.iter().all(|i| {
                    i.transfer_syntax_uid == ts || can_transcode(&i.transfer_syntax_uid, ts)
                });
                if ok {
                    return Ok(Syntax::Exactly(ts.to_owned()));
                }
            }
        }
    }
    Err(ApiError::NotAcceptable(
        "instances are available as multipart/related; type=\"application/dicom\" in their stored transfer syntax (transfer-syntax=*) or one Bastion can transcode to".into(),
    ))
}

/// Offset of the dataset in a stored Part 10 file
/// ([`bastion_archive::part10::dataset_offset`]).
fn split_part10(bytes: &[u8]) -> Result<usize, ApiError> {
    bastion_archive::part10::dataset_offset(bytes)
        .ok_or_else(|| ApiError::internal("stored instance", "malformed file meta information"))
}

/// A Part 10 file of `inst` in transfer syntax `ts` (transcoded from the
/// stored bytes).
fn part10_in(inst: &InstanceRef, stored: &[u8], ts: &str) -> Result<Vec<u8>, ApiError> {
    let at = split_part10(stored)?;
    let dataset = transcode(&stored[at..], &inst.transfer_syntax_uid, ts)?;
    Ok(bastion_archive::part10::file(
        ts,
        &inst.sop_class_uid,
        &inst.sop_instance_uid,
        &dataset,
    )?)
}

/// Streams the instances as `multipart/related; type="application/dicom"`,
/// one instance decrypted (and transcoded) at a time on a blocking thread.
/// The response starts only once the first instance is ready, so one that
/// cannot be read (e.g. a blob failing authentication: tampering or
/// corruption) is a clean error status rather than a cut stream; a later
/// instance that cannot be read aborts the stream (the status is sent).
async fn stream_instances(
    archive: Arc<Archive>,
    instances: Vec<InstanceRef>,
    syntax: Syntax,
) -> Result<Response, ApiError> {
    let mut writer = MultipartWriter::new();
    let content_type = writer.content_type();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    tokio::task::spawn_blocking(move || {
        for inst in &instances {
            let ts = inst.transfer_syntax_uid.clone();
            // Sent as stored unless a conversion was asked for (or, with no
            // syntax asked for, Explicit VR LE can be produced).
            let convert_to = match &syntax {
                Syntax::Stored => None,
                Syntax::Exactly(t) if *t == ts => None,
                Syntax::Exactly(t) => Some(t.clone()),
                Syntax::Default if ts == EXPLICIT_VR_LE || !can_transcode(&ts, EXPLICIT_VR_LE) => {
                    None
                }
                Syntax::Default => Some(EXPLICIT_VR_LE.to_owned()),
            };
            let sent = match convert_to {
                None => send_as_stored(&archive, inst, &mut writer, &tx),
                Some(to) => {
                    let produced = (|| -> Result<(Vec<u8>, String), ApiError> {
                        let uid = Uid::parse(&inst.sop_instance_uid)
                            .map_err(|e| ApiError::internal("stored UID", e))?;
                        let stored = archive.instance_part10(&uid)?;
                        match part10_in(inst, &stored, &to) {
                            Ok(bytes) => Ok((bytes, to)),
                            // No syntax asked for: the stored bytes (a 12-bit
                            // JPEG, say, that the decoder refuses) rather than
                            // a broken response.
                            Err(e) if matches!(syntax, Syntax::Default) => {
                                tracing::info!(error = %e, "WADO-RS: sent in the stored transfer syntax");
                                Ok((stored, ts))
                            }
                            Err(e) => Err(e),
                        }
                    })();
                    match produced {
                        Ok((bytes, ts)) => {
                            let head = writer
                                .part_header(&format!("application/dicom; transfer-syntax={ts}"));
                            if tx.blocking_send(Ok(head.into())).is_err()
                                || tx.blocking_send(Ok(bytes.into())).is_err()
                            {
                                Sent::Gone
                            } else {
                                Sent::Ok
                            }
                        }
                        Err(e) => Sent::Failed(e),
                    }
                }
            };
            match sent {
                Sent::Ok => {}
                Sent::Gone => return,
                Sent::Failed(e) => {
                    tracing::warn!(error = %e, sop_instance_uid = %inst.sop_instance_uid, "WADO-RS: instance could not be sent; response aborted");
                    let _ =
                        tx.blocking_send(Err(std::io::Error::other("instance could not be read")));
                    return;
                }
            }
        }
        let _ = tx.blocking_send(Ok(writer.closing().into()));
    });
    let mut rx = rx;
    let first = match rx.recv().await {
        Some(Ok(chunk)) => chunk,
        Some(Err(_)) | None => {
            return Err(ApiError::internal(
                "WADO-RS",
                "a stored instance could not be read",
            ))
        }
    };
    let rest = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let stream = futures_util::StreamExt::chain(
        futures_util::stream::once(async move { Ok::<_, std::io::Error>(first) }),
        rest,
    );
    Ok((
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(stream),
    )
        .into_response())
}

/// How sending one instance of a WADO-RS response went.
enum Sent {
    Ok,
    /// The client went away: stop.
    Gone,
    /// It could not be read: abort the response.
    Failed(ApiError),
}

/// Instances up to this size are read whole before their part is sent (a
/// blob that fails authentication is then an error before any byte of it
/// went out); larger ones stream one blob segment at a time.
const READ_WHOLE_UP_TO: u64 = 8 << 20;

/// Sends one instance as stored: its part header, then its Part 10 bytes,
/// streamed from the blob store when it is large (memory: one segment).
fn send_as_stored(
    archive: &Archive,
    inst: &InstanceRef,
    writer: &mut MultipartWriter,
    tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Sent {
    let uid = match Uid::parse(&inst.sop_instance_uid) {
        Ok(u) => u,
        Err(e) => return Sent::Failed(ApiError::internal("stored UID", e)),
    };
    let mut stream = match archive.open_instance(&uid) {
        Ok(s) => s,
        Err(e) => return Sent::Failed(e.into()),
    };
    let head = writer.part_header(&format!(
        "application/dicom; transfer-syntax={}",
        inst.transfer_syntax_uid
    ));
    if stream.len() <= READ_WHOLE_UP_TO {
        let mut whole = Vec::with_capacity(stream.len() as usize);
        loop {
            match stream.next_chunk() {
                Ok(Some(chunk)) => whole.extend_from_slice(chunk),
                Ok(None) => break,
                Err(e) => return Sent::Failed(e.into()),
            }
        }
        if tx.blocking_send(Ok(head.into())).is_err() || tx.blocking_send(Ok(whole.into())).is_err()
        {
            return Sent::Gone;
        }
        return Sent::Ok;
    }
    if tx.blocking_send(Ok(head.into())).is_err() {
        return Sent::Gone;
    }
    // Segments (64 KiB) gathered into 1 MiB pieces: fewer, larger writes.
    let mut piece = Vec::with_capacity(STREAM_PIECE);
    loop {
        let done = match stream.next_chunk() {
            Ok(Some(chunk)) => {
                piece.extend_from_slice(chunk);
                false
            }
            Ok(None) => true,
            Err(e) => return Sent::Failed(e.into()),
        };
        if (done && !piece.is_empty()) || piece.len() >= STREAM_PIECE {
            let full = std::mem::replace(&mut piece, Vec::with_capacity(STREAM_PIECE));
            if tx.blocking_send(Ok(full.into())).is_err() {
                return Sent::Gone;
            }
        }
        if done {
            return Sent::Ok;
        }
    }
}

/// Bytes per piece of a streamed instance.
const STREAM_PIECE: usize = 1 << 20;

async fn retrieve(
    state: AppState,
    req: Request,
    target: Target,
    action: &'static str,
) -> Result<Response, ApiError> {
    let (caller, note) = who(&req)?;
    let instances = resolve(&state, &caller, &note, action, &target).await?;
    let syntax = negotiate_instances(req.headers(), &instances)?;
    stream_instances(state.archive(), instances, syntax).await
}

fn who(req: &Request) -> Result<(Caller, Note), ApiError> {
    let caller = req
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or(ApiError::Unauthenticated)?;
    let note = req.extensions().get::<Note>().cloned().unwrap_or_default();
    Ok((caller, note))
}

async fn retrieve_study(
    State(st): State<AppState>,
    Path(study): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    retrieve(st, req, Target::study(&study)?, "wado.study").await
}

async fn retrieve_series(
    State(st): State<AppState>,
    Path((study, series)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    retrieve(st, req, Target::series(&study, &series)?, "wado.series").await
}

async fn retrieve_instance(
    State(st): State<AppState>,
    Path((study, series, sop)): Path<(String, String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    retrieve(
        st,
        req,
        Target::instance(&study, &series, &sop)?,
        "wado.instance",
    )
    .await
}

/// The stored dataset of one instance: (stored instance, Part 10 bytes,
/// offset of the dataset).
async fn one_instance(
    state: &AppState,
    (caller, note): &(Caller, Note),
    action: &'static str,
    target: &Target,
) -> Result<(InstanceRef, Vec<u8>, usize), ApiError> {
    let mut found = resolve(state, caller, note, action, target).await?;
    let inst = found.swap_remove(0);
    let archive = state.archive();
    let uid =
        Uid::parse(&inst.sop_instance_uid).map_err(|e| ApiError::internal("stored UID", e))?;
    let bytes = blocking(move || Ok(archive.instance_part10(&uid)?)).await?;
    let at = split_part10(&bytes)?;
    Ok((inst, bytes, at))
}

async fn metadata(
    state: AppState,
    req: Request,
    target: Target,
    action: &'static str,
) -> Result<Response, ApiError> {
    require_json(req.headers())?;
    let (caller, note) = who(&req)?;
    let instances = resolve(&state, &caller, &note, action, &target).await?;
    let base = base_url(req.headers());
    let archive = state.archive();
    let threshold = state.config().bulk_threshold;
    let out = blocking(move || {
        let mut out = Vec::with_capacity(instances.len());
        for inst in &instances {
            let uid = Uid::parse(&inst.sop_instance_uid)
                .map_err(|e| ApiError::internal("stored UID", e))?;
            let bytes = archive.instance_part10(&uid)?;
            let obj = dicom_object::from_reader(&bytes[128..])
                .map_err(|e| ApiError::internal("stored instance", e))?
                .into_inner();
            let opts = JsonOptions {
                bulk_base: format!(
                    "{base}/studies/{}/series/{}/instances/{}/bulk",
                    inst.study_instance_uid, inst.series_instance_uid, inst.sop_instance_uid
                ),
                bulk_threshold: threshold,
            };
            out.push(bastion_dicomweb::to_dicom_json(&obj, &opts));
        }
        Ok(out)
    })
    .await?;
    json_response(&Value::Array(out))
}

async fn metadata_study(
    State(st): State<AppState>,
    Path(study): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    metadata(st, req, Target::study(&study)?, "wado.metadata").await
}

async fn metadata_series(
    State(st): State<AppState>,
    Path((study, series)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    metadata(st, req, Target::series(&study, &series)?, "wado.metadata").await
}

async fn metadata_instance(
    State(st): State<AppState>,
    Path((study, series, sop)): Path<(String, String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    metadata(
        st,
        req,
        Target::instance(&study, &series, &sop)?,
        "wado.metadata",
    )
    .await
}

fn frame_numbers(list: &str) -> Result<Vec<u32>, ApiError> {
    let numbers: Result<Vec<u32>, _> = list.split(',').map(|n| n.trim().parse::<u32>()).collect();
    match numbers {
        Ok(n) if !n.is_empty() && n.len() <= 10_000 && !n.contains(&0) => Ok(n),
        _ => Err(ApiError::BadRequest(
            "frame list must be comma-separated frame numbers from 1".into(),
        )),
    }
}

/// How frames go out (PS3.18 §8.7.3.3.2, §8.7.3.5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
enum FrameForm {
    /// Native pixel data, Explicit VR Little Endian (decoded when stored
    /// compressed).
    Native,
    /// The stored bytes (native little endian or the codestream).
    Stored,
}

/// The first acceptable representation of frames for an instance stored in
/// `stored_ts`: `(form, multipart?)`, or 406. Multipart:
/// `multipart/related; type="application/octet-stream"` (also for an absent
/// Accept or `*/*`) without `transfer-syntax` or with Explicit VR Little
/// Endian → native (the default; the stored syntax when it cannot be
/// decoded), `transfer-syntax=*` or the stored syntax → as stored;
/// `multipart/related; type=image/jls` (the stored syntax's media type) →
/// as stored. Single part: `application/octet-stream` likewise, or the
/// stored syntax's media type (`image/jls`, `image/jp2`…) → as stored.
fn negotiate_frames(headers: &HeaderMap, stored_ts: &str) -> Result<(FrameForm, bool), ApiError> {
    let native_ok = bastion_dicomweb::can_return_native(stored_ts);
    let stored_media = bastion_dicomweb::frame_media_type(stored_ts);
    let uncompressed = stored_media.is_none() && native_ok;
    // For `application/octet-stream` with this transfer-syntax parameter.
    let octet = |ts: Option<&str>| match ts {
        None if native_ok => Some(FrameForm::Native),
        None => Some(FrameForm::Stored),
        Some("*") => Some(FrameForm::Stored),
        Some(EXPLICIT_VR_LE) if native_ok => Some(FrameForm::Native),
        Some(t) if t == stored_ts => Some(FrameForm::Stored),
        Some(_) => None,
    };
    // For the stored syntax's own media type.
    let compressed = |essence: &str, ts: Option<&str>| {
        (Some(essence) == stored_media && matches!(ts, None | Some("*")) || ts == Some(stored_ts))
            .then_some(FrameForm::Stored)
    };
    for r in accept(headers) {
        let ts = r.param("transfer-syntax");
        if r.matches("multipart/related") {
            let form = match r.param("type") {
                None | Some("application/octet-stream") => octet(ts),
                Some(t) => compressed(t, ts),
            };
            if let Some(form) = form {
                return Ok((form, true));
            }
            continue;
        }
        if r.essence == "application/octet-stream" {
            if let Some(form) = octet(ts).filter(|f| *f == FrameForm::Native || uncompressed) {
                return Ok((form, false));
            }
            continue;
        }
        if let Some(form) = compressed(&r.essence, ts) {
            return Ok((form, false));
        }
    }
    let native = if native_ok {
        format!(" or {EXPLICIT_VR_LE}")
    } else {
        String::new()
    };
    Err(ApiError::NotAcceptable(format!(
        "frames are available as multipart/related; type=\"application/octet-stream\" \
         (or single part) in transfer syntax {stored_ts}{native}"
    )))
}

async fn frames(
    State(st): State<AppState>,
    Path((study, series, sop, list)): Path<(String, String, String, String)>,
    headers: HeaderMap,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
) -> Result<Response, ApiError> {
    let who = (caller, note);
    let numbers = frame_numbers(&list)?;
    let target = Target::instance(&study, &series, &sop)?;
    let (inst, bytes, at) = one_instance(&st, &who, "wado.frames", &target).await?;
    let stored_ts = inst.transfer_syntax_uid.clone();
    let (form, multipart) = negotiate_frames(&headers, &stored_ts)?;
    if !multipart && numbers.len() != 1 {
        return Err(ApiError::NotAcceptable(
            "a single-part frames response holds one frame; ask multipart/related for more".into(),
        ));
    }
    let (frame_ts, media) = match form {
        FrameForm::Native => (EXPLICIT_VR_LE.to_owned(), "application/octet-stream"),
        FrameForm::Stored => (
            frame_transfer_syntax(&stored_ts).to_owned(),
            bastion_dicomweb::frame_media_type(&stored_ts).unwrap_or("application/octet-stream"),
        ),
    };
    let ts = stored_ts.clone();
    let parts = blocking(move || {
        Ok(match form {
            FrameForm::Native => bastion_dicomweb::native_frames(&bytes[at..], &ts, &numbers)?,
            FrameForm::Stored => bastion_dicomweb::frames(&bytes[at..], &ts, &numbers)?,
        })
    })
    .await?;
    let part_type = format!("{media}; transfer-syntax={frame_ts}");
    if !multipart {
        let body = parts.into_iter().next().unwrap_or_default();
        return Ok(([(header::CONTENT_TYPE, part_type)], body).into_response());
    }
    let mut w = MultipartWriter::with_type(media);
    for p in &parts {
        w.add_part(&part_type, p);
    }
    let ct = w.content_type();
    Ok(([(header::CONTENT_TYPE, ct)], w.finish()).into_response())
}

async fn bulk(
    State(st): State<AppState>,
    Path((study, series, sop, path)): Path<(String, String, String, String)>,
    headers: HeaderMap,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
) -> Result<Response, ApiError> {
    let who = (caller, note);
    let target = Target::instance(&study, &series, &sop)?;
    // PS3.18 §8.7.3.1: multipart/related (type application/octet-stream),
    // or a single part when the client asks for application/octet-stream
    // (OHIF does, for waveforms and other bulk data); the client's order
    // (and quality) decides, a wildcard means a single part.
    let single = accept(&headers).iter().find_map(|r| {
        if r.essence == "multipart/related" {
            matches!(r.param("type"), None | Some("application/octet-stream")).then_some(false)
        } else {
            r.matches("application/octet-stream").then_some(true)
        }
    });
    let Some(single) = single else {
        return Err(ApiError::NotAcceptable(
            "bulk data is available as application/octet-stream or multipart/related; type=\"application/octet-stream\"".into(),
        ));
    };
    let (_, bytes, _) = one_instance(&st, &who, "wado.bulk", &target).await?;
    let value = blocking(move || {
        let obj = dicom_object::from_reader(&bytes[128..])
            .map_err(|e| ApiError::internal("stored instance", e))?
            .into_inner();
        Ok(bulk_value(&obj, &path)?)
    })
    .await?;
    if single {
        return Ok((
            [(header::CONTENT_TYPE, "application/octet-stream".to_owned())],
            value,
        )
            .into_response());
    }
    let mut w = MultipartWriter::with_type("application/octet-stream");
    w.add_part("application/octet-stream", &value);
    let ct = w.content_type();
    Ok(([(header::CONTENT_TYPE, ct)], w.finish()).into_response())
}

/// The image format from `Accept` (PNG unless JPEG is preferred), else 406.
fn image_format(headers: &HeaderMap) -> Result<ImageFormat, ApiError> {
    for r in accept(headers) {
        if r.essence == "image/jpeg" {
            return Ok(ImageFormat::Jpeg);
        }
        if r.matches("image/png") {
            return Ok(ImageFormat::Png);
        }
    }
    Err(ApiError::NotAcceptable(
        "rendered images are available as image/png or image/jpeg".into(),
    ))
}

/// Rendering parameters (PS3.18 §8.3.5.1): `window=center,width[,function]`,
/// `viewport=vw,vh`, `quality=q`; others are refused (400).
fn render_options(
    params: &[(String, String)],
    format: ImageFormat,
) -> Result<RenderOptions, ApiError> {
    let bad = |what: &str| ApiError::BadRequest(format!("invalid {what} parameter"));
    let mut o = RenderOptions {
        format,
        ..RenderOptions::default()
    };
    for (name, value) in params {
        match name.as_str() {
            "window" => {
                let v: Vec<&str> = value.split(',').collect();
                if !(2..=3).contains(&v.len())
                    || v.get(2).is_some_and(|f| !f.eq_ignore_ascii_case("linear"))
                {
                    return Err(bad("window"));
                }
                let c: f64 = v[0].trim().parse().map_err(|_| bad("window"))?;
                let w: f64 = v[1].trim().parse().map_err(|_| bad("window"))?;
                o.window = Some((c, w));
            }
            "viewport" => {
                let v: Vec<&str> = value.split(',').collect();
                let (Some(w), Some(h), 2) = (v.first(), v.get(1), v.len()) else {
                    return Err(bad("viewport"));
                };
                o.viewport = Some((
                    w.trim().parse().map_err(|_| bad("viewport"))?,
                    h.trim().parse().map_err(|_| bad("viewport"))?,
                ));
            }
            "quality" => o.quality = value.parse().map_err(|_| bad("quality"))?,
            "accept" | "charset" => {}
            _ => return Err(ApiError::BadRequest("unknown rendering parameter".into())),
        }
    }
    Ok(o)
}

/// Response header of `/rendered`: the window applied (`center,width`).
pub const WINDOW_HEADER: &str = "x-bastion-window";

async fn rendered(
    st: AppState,
    headers: &HeaderMap,
    who: (Caller, Note),
    target: Target,
    frame: u32,
    p: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    let format = image_format(headers)?;
    let opts = render_options(&p, format)?;
    let (inst, bytes, at) = one_instance(&st, &who, "wado.rendered", &target).await?;
    let ts = inst.transfer_syntax_uid.clone();
    let image = blocking(move || {
        Ok(bastion_dicomweb::render_image(
            &bytes[at..],
            &ts,
            frame,
            &opts,
        ))
    })
    .await?;
    let image = match image {
        Ok(image) => image,
        Err(e) => return not_displayable(e),
    };
    let mut r = ([(header::CONTENT_TYPE, format.media_type())], image.bytes).into_response();
    // The VOI window applied, `center,width` in modality units (grey
    // images): a viewer starts a window drag from it.
    if let Some((c, w)) = image.window {
        if let Ok(v) = HeaderValue::from_str(&format!("{c},{w}")) {
            r.headers_mut().insert(WINDOW_HEADER, v);
        }
    }
    Ok(r)
}

async fn rendered_instance(
    State(st): State<AppState>,
    Path((study, series, sop)): Path<(String, String, String)>,
    p: Params,
    headers: HeaderMap,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
) -> Result<Response, ApiError> {
    let who = (caller, note);
    let target = Target::instance(&study, &series, &sop)?;
    rendered(st, &headers, who, target, 1, params(p)?).await
}

async fn rendered_frame(
    State(st): State<AppState>,
    Path((study, series, sop, list)): Path<(String, String, String, String)>,
    p: Params,
    headers: HeaderMap,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
) -> Result<Response, ApiError> {
    let who = (caller, note);
    let target = Target::instance(&study, &series, &sop)?;
    let numbers = frame_numbers(&list)?;
    let [frame] = numbers[..] else {
        return Err(ApiError::BadRequest(
            "a rendered frame resource names one frame".into(),
        ));
    };
    rendered(st, &headers, who, target, frame, params(p)?).await
}

async fn thumbnail(
    State(st): State<AppState>,
    Path((study, series, sop)): Path<(String, String, String)>,
    headers: HeaderMap,
    Extension(caller): Extension<Caller>,
    Extension(note): Extension<Note>,
) -> Result<Response, ApiError> {
    let who = (caller, note);
    let target = Target::instance(&study, &series, &sop)?;
    let format = image_format(&headers)?;
    let (inst, bytes, at) = one_instance(&st, &who, "wado.thumbnail", &target).await?;
    let ts = inst.transfer_syntax_uid.clone();
    let image =
        blocking(move || Ok(bastion_dicomweb::thumbnail(&bytes[at..], &ts, format))).await?;
    match image {
        Ok(image) => Ok(([(header::CONTENT_TYPE, format.media_type())], image).into_response()),
        Err(e) => not_displayable(e),
    }
}

/// The error of a rendering that failed: the usual JSON error, plus
/// `reason`, why the image cannot be shown in words for a clinician
/// ([`bastion_dicomweb::render::display_reason`]), which the viewer shows
/// in place of the image. Errors without such a reason are the usual ones.
fn not_displayable(e: bastion_dicomweb::DicomWebError) -> Result<Response, ApiError> {
    let Some(reason) = bastion_dicomweb::render::display_reason(&e) else {
        return Err(e.into());
    };
    let api = ApiError::from(e);
    let status = api.status();
    Ok((
        status,
        axum::Json(json!({"error": api.to_string(), "status": status.as_u16(), "reason": reason})),
    )
        .into_response())
}

// ---------------------------------------------------------------- STOW-RS

async fn stow_all(State(st): State<AppState>, req: Request) -> Result<Response, ApiError> {
    stow(st, req, None).await
}

async fn stow_study(
    State(st): State<AppState>,
    Path(study): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let study = uid(&study)?;
    stow(st, req, Some(study)).await
}

/// Most bytes of a body frame pushed into the part splitter at once.
const STOW_SLICE: usize = 256 << 10;

/// Most failed instances in one STOW-RS request: past it the rest of the body
/// is not read. Each refusal is an audit record; a request of thousands of
/// garbage parts would otherwise write thousands of them.
pub const MAX_FAILED_PARTS: usize = 1000;

/// One instance of a STOW-RS request.
enum Stored {
    Ok {
        class: String,
        sop: String,
        study: String,
        series: String,
    },
    Failed {
        class: String,
        sop: String,
        /// Failure Reason (0008,1197).
        reason: u16,
        /// Error Comment (0000,0902): why, without patient data.
        comment: String,
    },
}

impl Stored {
    /// The FailedSOPSequence item for `e` (Failure Reason and Error
    /// Comment, PS3.18 §10.5.3), named by the part's SOP Class and Instance
    /// UIDs (empty when unknown).
    fn failed(e: &ArchiveError, (class, sop): (String, String)) -> Stored {
        Stored::Failed {
            class,
            sop,
            reason: failure_reason(e),
            comment: failure_comment(e),
        }
    }
}

async fn stow(state: AppState, req: Request, study: Option<Uid>) -> Result<Response, ApiError> {
    let (caller, note) = who(&req)?;
    note.action("stow");
    if let Some(s) = &study {
        note.study(s.as_str());
    }
    let (parts, body) = req.into_parts();
    if let Err(e) = caller
        .require(WebPermission::Upload)
        .and_then(|()| require_json(&parts.headers))
    {
        crate::body::drain(&parts.headers, body).await;
        return Err(e);
    }
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::UnsupportedMediaType("a multipart/related body is required".into())
        })?;
    let related = MultipartRelated::from_content_type(content_type)?;
    if !matches!(
        related.root_type.as_deref(),
        None | Some("application/dicom")
    ) {
        return Err(ApiError::UnsupportedMediaType(
            "STOW-RS accepts multipart/related; type=\"application/dicom\"".into(),
        ));
    }
    let cfg = state.config();
    let archive = state.archive();
    let limits = MultipartLimits {
        max_part_bytes: usize::try_from(archive.limits().max_dataset_bytes)
            .unwrap_or(usize::MAX)
            .saturating_add(1 << 20),
        ..MultipartLimits::default()
    };
    let base = base_url(&parts.headers);
    let origin = Origin {
        // The user is in the request's own event (`http.request`); `peer`
        // stays an address, as for DICOM.
        ae: "DICOMWEB".into(),
        peer: peer_of(&parts.extensions),
        on_conflict: bastion_archive::OnConflict::Refuse,
    };
    // The body is streamed: one part at a time is buffered, under one
    // reservation from the archive's memory budget that also covers its
    // inflated form, and stored before the next part is read (TCP holds the
    // client back meanwhile). A part that does not fit fails alone
    // (FailedSOPSequence, 0xA700) and the parts after it are still stored;
    // a request that finds no room at all is refused whole (503,
    // Retry-After). Each instance stored is whole and acknowledged in the
    // index, even if the request fails later (broken framing, timeout).
    let mut reservation = archive.budget().transfer();
    let mut frames = BodyFrames::new(
        &parts.headers,
        body,
        cfg.max_upload_bytes,
        cfg.body_timeout,
        cfg.body_idle_timeout,
    )?;
    let mut splitter = PartSplitter::new(&related, &limits);
    // The part being spilled to disk: its headers, the spill, and the
    // error that ended the spill early (the part then fails alone).
    let mut spilling: Option<Spilling> = None;
    let mut results = Vec::new();
    let mut failed_parts = 0usize;
    let streamed: Result<(), ApiError> = async {
        while let Some(frame) = frames.next().await? {
            // In slices: a frame may be larger than one part's share (a
            // client or a proxy may send the whole body as one frame).
            for data in frame.chunks(STOW_SLICE) {
                if spilling.is_none() {
                    if let Err(e) = splitter.push(data, &mut reservation) {
                        // The part being received does not fit in memory:
                        // spill it to the encrypted spool, or (no spool, no
                        // room there) drop it, named by its meta information
                        // when that much arrived, and go on.
                        if let Some(spill) = archive.spill().ok().flatten() {
                            if let Some((headers, body)) = splitter.spill_part(&mut reservation)? {
                                let mut spill = spill;
                                let start = spill.append(&body);
                                // Named by its meta information (in the
                                // first bytes) should it fail.
                                let named = crate::peek::meta_uids(&body).unwrap_or_default();
                                spilling = Some((headers, spill, start.err(), named));
                                splitter
                                    .push(data, &mut reservation)
                                    .map_err(|_| ApiError::Busy)?;
                            }
                        }
                        if spilling.is_none() {
                            if results.is_empty() && matches!(e, BudgetError::Exhausted { .. }) {
                                return Err(ApiError::Busy);
                            }
                            let (class, sop) = splitter
                                .current_body()
                                .and_then(crate::peek::meta_uids)
                                .unwrap_or_default();
                            splitter.skip_part(&mut reservation)?;
                            let comment = match e {
                                BudgetError::TransferLimit { .. } => {
                                    "larger than the memory share per request (transfer_budget_mib)"
                                }
                                BudgetError::Exhausted { .. } => {
                                    "server memory budget in use; retry later"
                                }
                            };
                            results.push(Stored::Failed {
                                class,
                                sop,
                                reason: failure_reason(&budget_err(e)),
                                comment: comment.into(),
                            });
                            splitter
                                .push(data, &mut reservation)
                                .map_err(|_| ApiError::Busy)?;
                        }
                    }
                } else {
                    splitter
                        .push(data, &mut reservation)
                        .map_err(|_| ApiError::Busy)?;
                }
                // A spilled part: its body goes to the spool as it arrives,
                // and is stored once its delimiter is found.
                while let Some((_, spill, failure, _)) = spilling.as_mut() {
                    if failure.is_none() {
                        let Some(chunk) = splitter.drain_spill() else {
                            break;
                        };
                        let (SpillChunk::More(bytes) | SpillChunk::Last(bytes)) = &chunk;
                        if let Err(e) = spill.append(bytes) {
                            *failure = Some(e);
                        }
                        if failure.is_none() && matches!(chunk, SpillChunk::More(_)) {
                            continue;
                        }
                    }
                    // The part is complete, or failed: the rest of a failed
                    // one is dropped as it arrives.
                    if failure.is_some() {
                        splitter.abandon_spill();
                    }
                    let Some((headers, spill, failure, (class, sop))) = spilling.take() else {
                        break;
                    };
                    let stored = match failure {
                        Some(e) => Stored::failed(&e, (class, sop)),
                        None => {
                            let (archive, origin, expected) =
                                (archive.clone(), origin.clone(), study.clone());
                            let (stored, back) = blocking(move || {
                                let stored = match spill.finish() {
                                    Ok(body) => store_part(
                                        &archive,
                                        &origin,
                                        expected.as_ref(),
                                        &headers,
                                        PartBody::Spilled(body),
                                        &mut reservation,
                                    )?,
                                    Err(e) => Stored::failed(&e, (class, sop)),
                                };
                                Ok((stored, reservation))
                            })
                            .await?;
                            reservation = back;
                            stored
                        }
                    };
                    tally(stored, &note, &mut results, &mut failed_parts)?;
                }
                if spilling.is_some() {
                    continue;
                }
                while let Some(part) = splitter.next_part(&mut reservation)? {
                    let reserved = part.reserved;
                    let (archive, origin, expected) =
                        (archive.clone(), origin.clone(), study.clone());
                    let (stored, mut back) = blocking(move || {
                        let stored = store_part(
                            &archive,
                            &origin,
                            expected.as_ref(),
                            &part.headers,
                            PartBody::Memory(part.body),
                            &mut reservation,
                        )?;
                        Ok((stored, reservation))
                    })
                    .await?;
                    back.shrink(reserved);
                    reservation = back;
                    tally(stored, &note, &mut results, &mut failed_parts)?;
                }
            }
        }
        Ok(splitter.finish()?)
    }
    .await;
    if let Err(e) = streamed {
        // Instances stored before the request broke (framing, a limit, the
        // body timeout) are whole and acknowledged in the index: the answer
        // says so, with the rest of the request as one failed item naming
        // the error, rather than an error that hides them.
        if !results.iter().any(|r| matches!(r, Stored::Ok { .. })) {
            return Err(e);
        }
        let reason = match e {
            ApiError::BadRequest(_) => 0xC000,
            _ => 0xA700,
        };
        results.push(Stored::Failed {
            class: String::new(),
            sop: String::new(),
            reason,
            comment: crate::error::error_comment(&format!("rest of the request not read: {e}")),
        });
    }
    let mut referenced = Vec::new();
    let mut failed = Vec::new();
    let mut studies = std::collections::BTreeSet::new();
    for r in &results {
        match r {
            Stored::Ok {
                class,
                sop,
                study,
                series,
            } => {
                studies.insert(study.clone());
                let mut item = serde_json::Map::new();
                item.insert("00081150".into(), ui(class));
                item.insert("00081155".into(), ui(sop));
                if let (Ok(st), Ok(se), Ok(i)) =
                    (Uid::parse(study), Uid::parse(series), Uid::parse(sop))
                {
                    item.insert(
                        "00081190".into(),
                        json!({"vr": "UR", "Value": [retrieve_url(&base, &st, Some(&se), Some(&i))]}),
                    );
                }
                referenced.push(Value::Object(item));
            }
            Stored::Failed {
                class,
                sop,
                reason,
                comment,
            } => {
                let mut item = serde_json::Map::new();
                item.insert("00000902".into(), json!({"vr": "LO", "Value": [comment]}));
                item.insert("00081150".into(), ui(class));
                item.insert("00081155".into(), ui(sop));
                item.insert("00081197".into(), json!({"vr": "US", "Value": [reason]}));
                failed.push(Value::Object(item));
            }
        }
    }
    let mut out = serde_json::Map::new();
    if studies.len() == 1 {
        if let Some(Ok(st)) = studies.iter().next().map(|s| Uid::parse(s)) {
            out.insert(
                "00081190".into(),
                json!({"vr": "UR", "Value": [retrieve_url(&base, &st, None, None)]}),
            );
        }
    }
    if !failed.is_empty() {
        out.insert("00081198".into(), json!({"vr": "SQ", "Value": failed}));
    }
    if !referenced.is_empty() {
        out.insert("00081199".into(), json!({"vr": "SQ", "Value": referenced}));
    }
    let status = match (referenced.is_empty(), failed.is_empty()) {
        (false, true) => StatusCode::OK,
        (false, false) => StatusCode::ACCEPTED,
        (true, _) => StatusCode::CONFLICT,
    };
    let body =
        serde_json::to_vec(&Value::Object(out)).map_err(|e| ApiError::internal("JSON", e))?;
    Ok((status, [(header::CONTENT_TYPE, DICOM_JSON)], body).into_response())
}

/// Stores one STOW-RS part through the C-STORE pipeline
/// (`Archive::ingest_reserved`; `reservation` covers its bytes): a part that
/// is not `application/dicom` fails with 0xC000, one of another study than
/// the request's path names with 0xA900 (PS3.18 §10.5.3), an archive
/// refusal with its [`failure_reason`].
///
/// # Errors
/// [`ApiError::Internal`] when the index cannot be read back;
/// [`ApiError::StoreUnavailable`] when the image store is down.
fn store_part(
    archive: &Archive,
    origin: &Origin,
    expected: Option<&Uid>,
    headers: &[(String, String)],
    body: PartBody,
    reservation: &mut Reservation,
) -> Result<Stored, ApiError> {
    let failed = |reason, comment: &str| Stored::Failed {
        class: String::new(),
        sop: String::new(),
        reason,
        comment: comment.to_owned(),
    };
    let is_dicom = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        .map(|(_, c)| c.trim().to_ascii_lowercase())
        .is_some_and(|c| c == "application/dicom" || c.starts_with("application/dicom;"));
    if !is_dicom {
        return Ok(failed(
            0xC000,
            "the part's Content-Type is not application/dicom",
        ));
    }
    if let Some(expected) = expected {
        let head = body.head();
        match crate::peek::study_uid(&head) {
            Some(s) if s == expected.as_str() => {}
            Some(_) => {
                return Ok(failed(
                    0xA900,
                    "Study Instance UID differs from the one in the URL",
                ))
            }
            None => {
                return Ok(failed(
                    0xA900,
                    "no readable Study Instance UID (the URL names a study)",
                ))
            }
        }
    }
    // A failure is named by the part's file meta UIDs when it has readable
    // ones (PS3.18 §10.5.3: the FailedSOPSequence item names the instance).
    let named = crate::peek::meta_uids(&body.head()).unwrap_or_default();
    let received = match body {
        PartBody::Memory(bytes) => Received::File(bytes),
        PartBody::Spilled(spooled) => Received::SpooledFile(spooled),
    };
    match archive.ingest_reserved(received, origin, reservation) {
        Ok(
            Ingested::Stored { sop_instance_uid }
            | Ingested::Duplicate { sop_instance_uid }
            | Ingested::Replaced { sop_instance_uid },
        ) => {
            let row = archive
                .find_instance(sop_instance_uid.as_str())
                .map_err(|e| ApiError::internal("index", e))?;
            let (class, study, series) = row
                .map(|r| (r.sop_class_uid, r.study_instance_uid, r.series_instance_uid))
                .unwrap_or_default();
            Ok(Stored::Ok {
                class,
                sop: sop_instance_uid.to_string(),
                study,
                series,
            })
        }
        // The image store is down: the parts after this one would fail the same
        // way, so the request stops here (503 with Retry-After when nothing was
        // stored; else 202 naming the rest as not read, 0xA700).
        Err(ArchiveError::StoreUnavailable(_)) => Err(ApiError::StoreUnavailable),
        Err(e) => {
            let named = match &e {
                ArchiveError::Conflict { sop_instance_uid } => {
                    (named.0, sop_instance_uid.to_string())
                }
                _ => named,
            };
            Ok(Stored::failed(&e, named))
        }
    }
}

/// Records one part's outcome: the study for the request's event, the
/// result for the response; stops the request after [`MAX_FAILED_PARTS`]
/// failures (each is an audit record).
///
/// # Errors
/// [`ApiError::BadRequest`] at the limit.
fn tally(
    stored: Stored,
    note: &Note,
    results: &mut Vec<Stored>,
    failed_parts: &mut usize,
) -> Result<(), ApiError> {
    if let Stored::Ok { study, .. } = &stored {
        note.study(study);
    }
    if matches!(stored, Stored::Failed { .. }) {
        *failed_parts += 1;
    }
    results.push(stored);
    if *failed_parts >= MAX_FAILED_PARTS {
        return Err(ApiError::BadRequest(format!(
            "{failed_parts} instances of this request failed; the rest is not read"
        )));
    }
    Ok(())
}

/// A STOW-RS part being spilled to disk: its headers, the spill, the error
/// that ended the spill early (the part then fails alone), and its SOP Class
/// and Instance UIDs from its meta information (empty when unreadable).
type Spilling = (
    Vec<(String, String)>,
    Spill,
    Option<ArchiveError>,
    (String, String),
);

/// The body of a STOW-RS part: in memory, or spilled to the encrypted
/// spool (a part larger than the request's memory share).
enum PartBody {
    Memory(Vec<u8>),
    Spilled(SpooledData),
}

impl PartBody {
    /// The first bytes of the body (all of an in-memory one; at most 1 MiB
    /// of a spilled one): enough for the meta header and the attributes a
    /// study check reads.
    fn head(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            PartBody::Memory(b) => std::borrow::Cow::Borrowed(b),
            PartBody::Spilled(s) => {
                let mut head = vec![0u8; s.len().min(1 << 20) as usize];
                match s.read_at(0, &mut head) {
                    Ok(()) => std::borrow::Cow::Owned(head),
                    Err(_) => std::borrow::Cow::Owned(Vec::new()),
                }
            }
        }
    }
}

/// A UI attribute in DICOM JSON (empty: no Value).
fn ui(v: &str) -> Value {
    if v.is_empty() {
        json!({"vr": "UI"})
    } else {
        json!({"vr": "UI", "Value": [v]})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_lists() {
        assert_eq!(frame_numbers("1,3, 2").ok(), Some(vec![1, 3, 2]));
        assert!(frame_numbers("0").is_err());
        assert!(frame_numbers("a").is_err());
        assert!(frame_numbers("").is_err());
    }

    #[test]
    fn frame_negotiation() {
        let rle = "1.2.840.10008.1.2.5";
        let jls = "1.2.840.10008.1.2.4.80"; // no isolated decoder in unit tests
        let ask = |accept: Option<&str>, ts: &str| {
            let mut h = HeaderMap::new();
            if let Some(a) = accept {
                h.insert(header::ACCEPT, HeaderValue::from_str(a).expect("header"));
            }
            negotiate_frames(&h, ts).ok()
        };
        let octet = "multipart/related; type=\"application/octet-stream\"";
        // the default: native, decoded when compressed (PS3.18 §8.7.3.5.2)
        assert_eq!(ask(Some(octet), rle), Some((FrameForm::Native, true)));
        assert_eq!(ask(None, rle), Some((FrameForm::Native, true)));
        assert_eq!(
            ask(Some(octet), EXPLICIT_VR_LE),
            Some((FrameForm::Native, true))
        );
        // not decodable: as stored, labelled so
        assert_eq!(ask(Some(octet), jls), Some((FrameForm::Stored, true)));
        // OHIF's default
        let ohif = "multipart/related; type=application/octet-stream; transfer-syntax=*";
        assert_eq!(ask(Some(ohif), rle), Some((FrameForm::Stored, true)));
        let evrle = format!("{octet}; transfer-syntax={EXPLICIT_VR_LE}");
        assert_eq!(ask(Some(&evrle), rle), Some((FrameForm::Native, true)));
        assert_eq!(ask(Some(&evrle), jls), None, "cannot be decoded: 406");
        // single part
        assert_eq!(
            ask(Some("application/octet-stream"), rle),
            Some((FrameForm::Native, false))
        );
        assert_eq!(
            ask(Some("image/dicom-rle"), rle),
            Some((FrameForm::Stored, false))
        );
        assert_eq!(
            ask(Some("image/jls"), jls),
            Some((FrameForm::Stored, false))
        );
        assert_eq!(ask(Some("image/jls"), rle), None);
        assert_eq!(
            ask(Some("multipart/related; type=\"image/jls\""), jls),
            Some((FrameForm::Stored, true))
        );
        assert_eq!(ask(Some("application/octet-stream"), jls), None);
    }
}
