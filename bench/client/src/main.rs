//! `bench-client SPEC.json OUT.json`: the measuring DICOM client of
//! `bench/query.py` (not part of Bastion; never run by the tests).
//!
//! It times Query/Retrieve operations against Bastion and Orthanc alike, with
//! as little client overhead as possible, so that the benchmark's ratios show
//! the servers rather than the client (pynetdicom adds ~4 ms to every C-FIND
//! and caps C-GET at ~100 MiB/s on this machine):
//!
//! - `op = "find"`: Study Root C-FIND at STUDY level (PS3.4 C.4.1), one query
//!   per entry of `queries` after `warmup` untimed ones, over one
//!   association; each request → final response cycle is timed.
//! - `op = "get"`: Study Root C-GET of `study` (PS3.4 C.4.3) proposing the SCP
//!   role for CT Image Storage (PS3.7 D.3.3.4); each C-STORE sub-operation is
//!   answered 0x0000 and its dataset bytes counted (not written).
//! - `op = "move"`: Study Root C-MOVE of `study` to `destination` (C.4.2).
//!
//! The spec is the JSON that `query.py` gives its Python worker (host, port,
//! calling, called, max_pdu, optional tls {ca, crt, key, server_name}); the
//! output has the same fields as that worker's, plus the raw per-query UIDs.
//!
//! Built on the dicom-rs upper layer (dicom-ul, sync client) and dicom-object
//! for command sets and identifiers; this file only drives them.

use std::{
    collections::HashMap,
    io::{Read, Write},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use dicom_core::{dicom_value, DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::{
    EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
};
use dicom_ul::{
    association::client::{ClientAssociation, ClientAssociationOptions, CloseSocket},
    pdu::{PDataValue, PDataValueType, Pdu, PresentationContextResultReason},
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use serde_json::{json, Value};

const FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
const MOVE: &str = "1.2.840.10008.5.1.4.1.2.2.2";
const GET: &str = "1.2.840.10008.5.1.4.1.2.2.3";
const CT_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
const IMPLICIT: &str = "1.2.840.10008.1.2";
const EXPLICIT: &str = "1.2.840.10008.1.2.1";

/// Return keys of every benchmark C-FIND (as in `query.py` RETURN_KEYS).
const RETURN_KEYS: [(Tag, VR, &str); 9] = [
    (tags::STUDY_INSTANCE_UID, VR::UI, "StudyInstanceUID"),
    (tags::PATIENT_NAME, VR::PN, "PatientName"),
    (tags::PATIENT_ID, VR::LO, "PatientID"),
    (tags::STUDY_DATE, VR::DA, "StudyDate"),
    (tags::STUDY_TIME, VR::TM, "StudyTime"),
    (tags::ACCESSION_NUMBER, VR::SH, "AccessionNumber"),
    (tags::STUDY_DESCRIPTION, VR::LO, "StudyDescription"),
    (tags::MODALITIES_IN_STUDY, VR::CS, "ModalitiesInStudy"),
    (
        tags::NUMBER_OF_STUDY_RELATED_INSTANCES,
        VR::IS,
        "NumberOfStudyRelatedInstances",
    ),
];

#[derive(Deserialize)]
struct Tls {
    ca: String,
    crt: String,
    key: String,
    #[serde(default = "localhost")]
    server_name: String,
}

fn localhost() -> String {
    "localhost".into()
}

#[derive(Deserialize)]
struct Query {
    value: String,
}

#[derive(Deserialize)]
struct Spec {
    op: String,
    host: String,
    port: u16,
    calling: String,
    called: String,
    #[serde(default = "default_pdu")]
    max_pdu: u32,
    tls: Option<Tls>,
    #[serde(default)]
    timeout: Option<f64>,
    // find
    #[serde(default)]
    qtype: String,
    #[serde(default)]
    warmup: usize,
    #[serde(default)]
    queries: Vec<Query>,
    // get / move
    #[serde(default)]
    study: String,
    #[serde(default)]
    destination: String,
}

fn default_pdu() -> u32 {
    16382
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: bench-client SPEC.json OUT.json");
        std::process::exit(2);
    }
    let out = match run(Path::new(&args[1])) {
        Ok(v) => v,
        Err(e) => json!({ "error": format!("{e:#}") }),
    };
    if let Err(e) = std::fs::write(&args[2], out.to_string()) {
        eprintln!("cannot write {}: {e}", args[2]);
        std::process::exit(1);
    }
}

fn run(spec_path: &Path) -> Result<Value> {
    let spec: Spec = serde_json::from_slice(&std::fs::read(spec_path)?)
        .with_context(|| format!("bad spec {}", spec_path.display()))?;
    let timeout = Duration::from_secs_f64(spec.timeout.unwrap_or(60.0));
    let mut opts = ClientAssociationOptions::new()
        .calling_ae_title(spec.calling.clone())
        .called_ae_title(spec.called.clone())
        .max_pdu_length(spec.max_pdu)
        .read_timeout(timeout)
        .write_timeout(timeout)
        .connection_timeout(timeout);
    opts = match spec.op.as_str() {
        "find" => opts.with_presentation_context(FIND, vec![EXPLICIT, IMPLICIT]),
        "move" => opts.with_presentation_context(MOVE, vec![EXPLICIT, IMPLICIT]),
        "get" => opts
            .with_presentation_context(GET, vec![EXPLICIT, IMPLICIT])
            .with_presentation_context(CT_STORAGE, vec![EXPLICIT, IMPLICIT])
            .with_role_selection(CT_STORAGE, false, true),
        other => bail!("unknown op {other}"),
    };
    let addr = (spec.host.as_str(), spec.port);
    match &spec.tls {
        None => {
            let mut a = opts.establish(addr).map_err(|e| anyhow!("{e}"))?;
            a.inner_stream().set_nodelay(true)?;
            dispatch(a, &spec)
        }
        Some(t) => {
            let cfg = tls_config(t)?;
            let mut a = opts
                .tls_config(cfg)
                .server_name(&t.server_name)
                .establish_tls(addr)
                .map_err(|e| anyhow!("{e}"))?;
            a.inner_stream().sock.set_nodelay(true)?;
            dispatch(a, &spec)
        }
    }
}

fn tls_config(t: &Tls) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&t.ca)? {
        roots.add(c?)?;
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&t.crt)?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&t.key)?;
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    Ok(Arc::new(cfg))
}

fn dispatch<S: CloseSocket + Read + Write>(
    mut a: ClientAssociation<S>,
    spec: &Spec,
) -> Result<Value> {
    let out = match spec.op.as_str() {
        "find" => find(&mut a, spec),
        "get" | "move" => retrieve(&mut a, spec),
        _ => unreachable!("checked in run"),
    };
    let _ = a.release();
    out
}

/// The accepted context for `abstract_syntax`: (id, transfer syntax).
fn context<S: CloseSocket + Read + Write>(
    a: &ClientAssociation<S>,
    abstract_syntax: &str,
) -> Result<(u8, String)> {
    a.presentation_contexts()
        .iter()
        .find(|pc| {
            pc.reason == PresentationContextResultReason::Acceptance
                && pc.abstract_syntax.trim_end_matches('\0') == abstract_syntax
        })
        .map(|pc| (pc.id, pc.transfer_syntax.trim_end_matches('\0').to_owned()))
        .ok_or_else(|| anyhow!("presentation context for {abstract_syntax} not accepted"))
}

fn ts_of(uid: &str) -> dicom_transfer_syntax_registry::TransferSyntax {
    if uid == EXPLICIT {
        EXPLICIT_VR_LITTLE_ENDIAN.erased()
    } else {
        IMPLICIT_VR_LITTLE_ENDIAN.erased()
    }
}

fn uid_value(uid: &str) -> PrimitiveValue {
    let mut s = uid.to_owned();
    if s.len() % 2 == 1 {
        s.push('\0');
    }
    PrimitiveValue::from(s)
}

fn encode_command(elements: Vec<DataElement<InMemDicomObject>>) -> Result<Vec<u8>> {
    let obj = InMemDicomObject::command_from_element_iter(elements);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())?;
    Ok(out)
}

fn request(
    sop_class: &str,
    field: u16,
    message_id: u16,
    extra: Vec<DataElement<InMemDicomObject>>,
) -> Result<Vec<u8>> {
    let mut el = vec![
        DataElement::new(tags::AFFECTED_SOP_CLASS_UID, VR::UI, uid_value(sop_class)),
        DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [field])),
        DataElement::new(tags::MESSAGE_ID, VR::US, dicom_value!(U16, [message_id])),
        DataElement::new(tags::PRIORITY, VR::US, dicom_value!(U16, [0])),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [0x0001]),
        ),
    ];
    el.extend(extra);
    encode_command(el)
}

fn send_message<S: CloseSocket + Read + Write>(
    a: &mut ClientAssociation<S>,
    pc: u8,
    command: Vec<u8>,
    dataset: Option<Vec<u8>>,
) -> Result<()> {
    a.send(&Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: pc,
            value_type: PDataValueType::Command,
            is_last: true,
            data: command,
        }],
    })
    .map_err(|e| anyhow!("{e}"))?;
    if let Some(ds) = dataset {
        let max = (a.acceptor_max_pdu_length() as usize).clamp(1024, 1 << 20) - 6;
        let mut chunks = ds.chunks(max).peekable();
        while let Some(c) = chunks.next() {
            a.send(&Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: pc,
                    value_type: PDataValueType::Data,
                    is_last: chunks.peek().is_none(),
                    data: c.to_vec(),
                }],
            })
            .map_err(|e| anyhow!("{e}"))?;
        }
    }
    Ok(())
}

/// A complete DIMSE message received: its context, command set, and the
/// dataset bytes (when the command says one follows).
struct Message {
    pc: u8,
    command: InMemDicomObject,
    dataset: Option<Vec<u8>>,
    /// Bytes of the dataset (also when only counted).
    dataset_len: u64,
}

/// Reassembles DIMSE messages from P-DATA-TF PDUs (PS3.8 Annex E).
///
/// Each PDU is read whole with one `read_exact` into a reused buffer
/// (dicom-ul's own `receive` reads through a fresh 8 KiB buffer each time and
/// copies every fragment, which made this client the bottleneck). P-DATA-TF
/// PDV items are split here (PS3.8 §9.3.5: item length, context ID, message
/// control header); a data fragment that is only counted is never copied.
/// Any other PDU is decoded by dicom-ul's `read_pdu` and is an error here.
struct Receiver {
    /// PDVs of the last PDU not yet consumed, with their data length.
    queue: std::collections::VecDeque<(PDataValue, usize)>,
    buf: Vec<u8>,
    /// Whether data PDVs are only counted, not kept (C-GET datasets).
    count_only: bool,
}

impl Receiver {
    fn new(count_only: bool) -> Receiver {
        Receiver {
            queue: Default::default(),
            buf: Vec::new(),
            count_only,
        }
    }

    fn next_pdv<S: CloseSocket + Read + Write>(
        &mut self,
        a: &mut ClientAssociation<S>,
    ) -> Result<(PDataValue, usize)> {
        loop {
            if let Some(p) = self.queue.pop_front() {
                return Ok(p);
            }
            let stream = a.inner_stream();
            self.buf.resize(6, 0);
            stream.read_exact(&mut self.buf[..6])?;
            let len = u32::from_be_bytes([self.buf[2], self.buf[3], self.buf[4], self.buf[5]]);
            if len > (1 << 24) {
                bail!("PDU of {len} bytes");
            }
            self.buf.resize(6 + len as usize, 0);
            stream.read_exact(&mut self.buf[6..])?;
            if self.buf[0] != 0x04 {
                let mut cursor = std::io::Cursor::new(&self.buf[..]);
                match dicom_ul::pdu::read_pdu(&mut cursor, 1 << 24, false)? {
                    Some(other) => bail!("unexpected {}", other.short_description()),
                    None => bail!("incomplete PDU"),
                }
            }
            let mut pos = 6;
            while pos < self.buf.len() {
                let head = self
                    .buf
                    .get(pos..pos + 6)
                    .ok_or_else(|| anyhow!("truncated PDV item"))?;
                let item_len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
                let (pc, mch) = (head[4], head[5]);
                let end = pos + 4 + item_len;
                let data = self
                    .buf
                    .get(pos + 6..end)
                    .ok_or_else(|| anyhow!("PDV item overruns its PDU"))?;
                let is_command = mch & 1 == 1;
                let keep = is_command || !self.count_only;
                self.queue.push_back((
                    PDataValue {
                        presentation_context_id: pc,
                        value_type: if is_command {
                            PDataValueType::Command
                        } else {
                            PDataValueType::Data
                        },
                        is_last: mch & 2 == 2,
                        data: if keep { data.to_vec() } else { Vec::new() },
                    },
                    data.len(),
                ));
                pos = end;
            }
        }
    }

    fn next<S: CloseSocket + Read + Write>(
        &mut self,
        a: &mut ClientAssociation<S>,
    ) -> Result<Message> {
        let mut cmd = Vec::new();
        let pc = loop {
            let (p, _) = self.next_pdv(a)?;
            if p.value_type != PDataValueType::Command {
                bail!("dataset fragment where a command was expected");
            }
            cmd.extend_from_slice(&p.data);
            if p.is_last {
                break p.presentation_context_id;
            }
        };
        let command =
            InMemDicomObject::read_dataset_with_ts(&cmd[..], &IMPLICIT_VR_LITTLE_ENDIAN.erased())?;
        let has_ds = command
            .get(tags::COMMAND_DATA_SET_TYPE)
            .and_then(|e| e.to_int::<u16>().ok())
            .is_some_and(|v| v != 0x0101);
        let mut dataset_len = 0u64;
        let dataset = if has_ds {
            let mut ds = Vec::new();
            loop {
                let (p, len) = self.next_pdv(a)?;
                if p.value_type != PDataValueType::Data {
                    bail!("command fragment where a dataset was expected");
                }
                dataset_len += len as u64;
                if self.count_only {
                    // Only the length is needed.
                } else if ds.is_empty() {
                    ds = p.data;
                } else {
                    ds.extend_from_slice(&p.data);
                }
                if p.is_last {
                    break;
                }
            }
            Some(ds)
        } else {
            None
        };
        Ok(Message {
            pc,
            command,
            dataset,
            dataset_len,
        })
    }
}

fn int(obj: &InMemDicomObject, tag: Tag) -> Option<u32> {
    obj.get(tag).and_then(|e| e.to_int::<u32>().ok())
}

fn find<S: CloseSocket + Read + Write>(a: &mut ClientAssociation<S>, spec: &Spec) -> Result<Value> {
    let (pc, ts) = context(a, FIND)?;
    let (qtag, qvr) = match spec.qtype.as_str() {
        "PatientID" => (tags::PATIENT_ID, VR::LO),
        "PatientName" => (tags::PATIENT_NAME, VR::PN),
        "StudyDate" => (tags::STUDY_DATE, VR::DA),
        other => bail!("unknown qtype {other}"),
    };
    let mut rx = Receiver::new(false);
    let mut results = Vec::new();
    let all = spec.queries[..spec.warmup.min(spec.queries.len())]
        .iter()
        .chain(spec.queries.iter());
    for (i, q) in all.enumerate() {
        let mut id = InMemDicomObject::new_empty();
        id.put(DataElement::new(
            tags::QUERY_RETRIEVE_LEVEL,
            VR::CS,
            PrimitiveValue::from("STUDY"),
        ));
        for (tag, vr, _) in RETURN_KEYS {
            id.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
        }
        let mut v = q.value.clone();
        if v.len() % 2 == 1 {
            v.push(' ');
        }
        id.put(DataElement::new(qtag, qvr, PrimitiveValue::from(v)));
        let mut ds = Vec::new();
        id.write_dataset_with_ts(&mut ds, &ts_of(&ts))?;
        let message_id = (i % 60000 + 1) as u16;
        let cmd = request(FIND, 0x0020, message_id, Vec::new())?;
        let t0 = Instant::now();
        send_message(a, pc, cmd, Some(ds))?;
        let mut uids = Vec::new();
        let mut missing: Vec<&str> = Vec::new();
        let final_status = loop {
            let m = rx.next(a)?;
            let status = int(&m.command, tags::STATUS).ok_or_else(|| anyhow!("no Status"))?;
            if status == 0xFF00 || status == 0xFF01 {
                let bytes = m
                    .dataset
                    .ok_or_else(|| anyhow!("pending without identifier"))?;
                let obj = InMemDicomObject::read_dataset_with_ts(&bytes[..], &ts_of(&ts))?;
                let uid = obj
                    .get(tags::STUDY_INSTANCE_UID)
                    .and_then(|e| e.to_str().ok())
                    .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
                    .unwrap_or_default();
                uids.push(uid);
                for (tag, _, kw) in RETURN_KEYS {
                    if obj.get(tag).is_none() && !missing.contains(&kw) {
                        missing.push(kw);
                    }
                }
            } else {
                break status;
            }
        };
        let secs = t0.elapsed().as_secs_f64();
        if i < spec.warmup {
            continue;
        }
        results.push(json!({"secs": secs, "status": final_status, "uids": uids,
                            "missing": missing}));
    }
    Ok(json!({ "results": results }))
}

fn retrieve<S: CloseSocket + Read + Write>(
    a: &mut ClientAssociation<S>,
    spec: &Spec,
) -> Result<Value> {
    let is_get = spec.op == "get";
    let model = if is_get { GET } else { MOVE };
    let (pc, ts) = context(a, model)?;
    let mut id = InMemDicomObject::new_empty();
    id.put(DataElement::new(
        tags::QUERY_RETRIEVE_LEVEL,
        VR::CS,
        PrimitiveValue::from("STUDY"),
    ));
    id.put(DataElement::new(
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        uid_value(&spec.study),
    ));
    let mut ds = Vec::new();
    id.write_dataset_with_ts(&mut ds, &ts_of(&ts))?;
    let cmd = if is_get {
        request(GET, 0x0010, 1, Vec::new())?
    } else {
        let mut dest = spec.destination.clone();
        if dest.len() % 2 == 1 {
            dest.push(' ');
        }
        request(
            MOVE,
            0x0021,
            1,
            vec![DataElement::new(
                tags::MOVE_DESTINATION,
                VR::AE,
                PrimitiveValue::from(dest),
            )],
        )?
    };
    let mut rx = Receiver::new(true);
    let (mut received, mut bytes) = (0u64, 0u64);
    let t0 = Instant::now();
    send_message(a, pc, cmd, Some(ds))?;
    let (status, counts, comment) = loop {
        let m = rx.next(a)?;
        let field = int(&m.command, tags::COMMAND_FIELD).unwrap_or(0);
        if field == 0x0001 {
            // C-STORE-RQ of a C-GET sub-operation: count, answer Success.
            received += 1;
            bytes += m.dataset_len;
            let text = |t: Tag| {
                m.command
                    .get(t)
                    .and_then(|e| e.to_str().ok())
                    .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
                    .unwrap_or_default()
            };
            let rsp = encode_command(vec![
                DataElement::new(
                    tags::AFFECTED_SOP_CLASS_UID,
                    VR::UI,
                    uid_value(&text(tags::AFFECTED_SOP_CLASS_UID)),
                ),
                DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [0x8001])),
                DataElement::new(
                    tags::MESSAGE_ID_BEING_RESPONDED_TO,
                    VR::US,
                    dicom_value!(U16, [int(&m.command, tags::MESSAGE_ID).unwrap_or(0) as u16]),
                ),
                DataElement::new(
                    tags::COMMAND_DATA_SET_TYPE,
                    VR::US,
                    dicom_value!(U16, [0x0101]),
                ),
                DataElement::new(tags::STATUS, VR::US, dicom_value!(U16, [0x0000])),
                DataElement::new(
                    tags::AFFECTED_SOP_INSTANCE_UID,
                    VR::UI,
                    uid_value(&text(tags::AFFECTED_SOP_INSTANCE_UID)),
                ),
            ])?;
            send_message(a, m.pc, rsp, None)?;
            continue;
        }
        let status = int(&m.command, tags::STATUS).ok_or_else(|| anyhow!("no Status"))?;
        if status == 0xFF00 {
            continue;
        }
        let mut counts = HashMap::new();
        for (k, t) in [
            ("Completed", tags::NUMBER_OF_COMPLETED_SUBOPERATIONS),
            ("Failed", tags::NUMBER_OF_FAILED_SUBOPERATIONS),
            ("Warning", tags::NUMBER_OF_WARNING_SUBOPERATIONS),
        ] {
            counts.insert(k, int(&m.command, t).map_or(-1, i64::from));
        }
        let comment = m
            .command
            .get(tags::ERROR_COMMENT)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        break (status, counts, comment);
    };
    let secs = t0.elapsed().as_secs_f64();
    Ok(
        json!({"secs": secs, "status": status, "counts": counts, "received": received,
              "bytes": bytes, "comment": comment}),
    )
}
