//! The query engine: PS3.4 Annex C Query/Retrieve matching, shared by C-FIND
//! (and, later, QIDO-RS and the C-MOVE/C-GET retrieve resolution).
//!
//! # Shape
//!
//! - [`Query::parse`] turns a request Identifier (an [`InMemDicomObject`], as decoded
//!   with the request's Specific Character Set) into typed keys, enforcing the
//!   hierarchical rules of PS3.4 §C.4.1.2.2 unless relational queries were
//!   negotiated (§C.4.1.3), and refusing malformed values with
//!   [`ArchiveError::InvalidQuery`] (→ 0xA900 with Offending Element).
//! - [`Archive::find`] matches the query against the index, refuses more than
//!   `max_matches` matches with [`ArchiveError::TooManyMatches`] before producing
//!   anything (→ 0xA700, no pendings), then builds and hands out one response
//!   Identifier at a time to a sink, which may stop it (C-CANCEL). Every query is
//!   recorded in the event log (device, level, number of matches, Study Instance
//!   UIDs touched: never names or IDs).
//! - [`Archive::resolve_instances`] gives the stored instances below every match of
//!   a query: what C-MOVE / C-GET will send (PS3.4 §C.4.2.2.1 / §C.4.3.2.1).
//!
//! # Matching rules (PS3.4 §C.2.2.2)
//!
//! - **Single value** (§C.2.2.2.1): exact, case-sensitive, except PN (below).
//!   A stored value that is empty never matches a non-universal key (empty value
//!   matching is not negotiated).
//! - **Universal** (§C.2.2.2.3): a zero-length key, or a value of only `*` in a VR that
//!   allows wildcards, matches everything; the attribute is returned.
//! - **Wildcard** (§C.2.2.2.4): `*` (any run, including none) and `?` (exactly one
//!   character) only in AE, CS, LO, LT, PN, SH, ST, UC, UR and UT. Anywhere else (UI,
//!   DA, TM, DT, IS, US) a `*` or `?` is a malformed value and refused: in particular
//!   `*` in a UI key is not a wildcard (pitfall C08).
//! - **Person Name**: matching is **case-insensitive** (Unicode lower-casing of both
//!   sides), for exact and wildcard values alike, so a wildcard result always
//!   contains the exact result. A key without `=` is compared with the whole stored
//!   value and with each of its component groups (alphabetic, ideographic,
//!   phonetic), trailing `^` and `=` ignored; so `王*` finds `Wang^XiaoDong=王^小東=`.
//! - **Range** (§C.2.2.2.5) for DA, TM and DT: `A-B`, `-B`, `A-`, inclusive. A single
//!   DA/TM/DT value is the range of its own precision (`09` = 09:00 to 09:59:59.999999).
//!   Date and time are matched independently (combined date-time matching is not
//!   negotiated). DT (Acquisition DateTime at IMAGE level): a UTC offset suffix
//!   (`&ZZXX`) is taken into account when the key bound and the stored value both
//!   carry one: they are compared as instants (`20150101003000+0100` is
//!   `20141231233000+0000`; a bound of lower precision is the start or end of its
//!   period in its own offset). When either lacks an offset, the local date-times
//!   are compared digit by digit, i.e. the value without an offset is taken to be in
//!   the other's timezone: Bastion does not know a sender's local timezone, and
//!   neither indexes Timezone Offset From UTC (0008,0201) nor reads it from the
//!   identifier (no timezone query adjustment). Malformed values (e.g. a TM range
//!   made of date-times, an offset beyond −1200/+1400, non-ASCII) are refused;
//!   stored values that are malformed match only universal keys.
//! - **List of UID** (§C.2.2.2.2): `\`-separated UIDs, any matches. Other multi-valued
//!   keys are refused, except Modalities in Study, whose values are OR-ed.
//! - **Sequence** (§C.2.2.2.6): a stored sequence matches when any of its items
//!   matches every key of the (single) query item; an empty key sequence is
//!   universal. Matchable sequences are the ones indexed: Procedure Code Sequence
//!   (0008,1032) at study level and Request Attributes Sequence (0040,0275) at series
//!   level, with their items' text attributes.
//!
//! Keys the index cannot match (other attributes, keys below the query level) are
//! treated as universal and returned zero-length; their presence with a value is
//! reported so that the front end answers 0xFF01 (PS3.4 §C.4.1.1.4, "optional keys
//! not supported"). Specific Character Set: responses are built from Unicode text and
//! carry (0008,0005) `ISO_IR 192` whenever a value is not ASCII (or the request asked
//! for (0008,0005)).

use std::collections::{BTreeMap, BTreeSet};

use bastion_audit::events::Outcome;
use bastion_index::query::{Column, EntityRow, Filter, Prefilter, StudyCounts};
use bastion_index::StoredInstance;
use bastion_model::Uid;
use dicom_core::header::Header;
use dicom_core::value::{DataSetSequence, PrimitiveValue, Value};
use dicom_core::{DataElement, Length, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use crate::{Archive, ArchiveError};

/// One stored instance as the front ends see it (C-MOVE/C-GET
/// sub-operations, WADO-RS): its UIDs and stored transfer syntax. The blob
/// behind it is the archive's business ([`Archive::instance_part10`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceRef {
    /// (0008,0018) SOP Instance UID.
    pub sop_instance_uid: String,
    /// (0008,0016) SOP Class UID.
    pub sop_class_uid: String,
    /// (0020,000D) Study Instance UID.
    pub study_instance_uid: String,
    /// (0020,000E) Series Instance UID.
    pub series_instance_uid: String,
    /// (0002,0010) Transfer Syntax UID of the stored encoding.
    pub transfer_syntax_uid: String,
}

impl From<&StoredInstance> for InstanceRef {
    fn from(s: &StoredInstance) -> Self {
        InstanceRef {
            sop_instance_uid: s.sop_instance_uid.clone(),
            sop_class_uid: s.sop_class_uid.clone(),
            study_instance_uid: s.study_instance_uid.clone(),
            series_instance_uid: s.series_instance_uid.clone(),
            transfer_syntax_uid: s.transfer_syntax_uid.clone(),
        }
    }
}

/// The patient of a stored instance or study ([`Archive::patient_of`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatientOf {
    /// An opaque key of the patient record (`p` + row id): counts patients
    /// without naming them (the bulk-retrieval detection rule).
    pub key: String,
    /// (0010,0020) Patient ID.
    pub patient_id: String,
    /// (0010,0010) Patient's Name.
    pub patient_name: String,
    /// (0020,000D) Study Instance UID (empty at the patient level).
    pub study_instance_uid: String,
}

pub use bastion_index::query::Level;

/// Patient Root Query/Retrieve Information Model – FIND (PS3.4 §C.6.1).
pub const PATIENT_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.1.1";
/// Study Root Query/Retrieve Information Model – FIND (PS3.4 §C.6.2).
pub const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";

/// Patient Root Query/Retrieve Information Model – MOVE (PS3.4 §C.6.1).
pub const PATIENT_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.1.2";
/// Patient Root Query/Retrieve Information Model – GET (PS3.4 §C.6.1).
pub const PATIENT_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.1.3";
/// Study Root Query/Retrieve Information Model – MOVE (PS3.4 §C.6.2).
pub const STUDY_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.2.2";
/// Study Root Query/Retrieve Information Model – GET (PS3.4 §C.6.2).
pub const STUDY_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.2.3";

/// Default of `[query] max_matches`.
pub const DEFAULT_MAX_MATCHES: usize = 1000;

/// A Query/Retrieve Information Model (PS3.4 §C.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Model {
    /// Patient Root: PATIENT > STUDY > SERIES > IMAGE.
    PatientRoot,
    /// Study Root: STUDY > SERIES > IMAGE; patient attributes belong to the study.
    StudyRoot,
}

impl Model {
    /// The model of a FIND SOP Class UID.
    pub fn for_find_sop_class(uid: &str) -> Option<Model> {
        match uid {
            PATIENT_ROOT_FIND => Some(Model::PatientRoot),
            STUDY_ROOT_FIND => Some(Model::StudyRoot),
            _ => None,
        }
    }

    /// The model of a MOVE SOP Class UID.
    pub fn for_move_sop_class(uid: &str) -> Option<Model> {
        match uid {
            PATIENT_ROOT_MOVE => Some(Model::PatientRoot),
            STUDY_ROOT_MOVE => Some(Model::StudyRoot),
            _ => None,
        }
    }

    /// The model of a GET SOP Class UID.
    pub fn for_get_sop_class(uid: &str) -> Option<Model> {
        match uid {
            PATIENT_ROOT_GET => Some(Model::PatientRoot),
            STUDY_ROOT_GET => Some(Model::StudyRoot),
            _ => None,
        }
    }

    /// Short name for events.
    pub fn name(self) -> &'static str {
        match self {
            Model::PatientRoot => "patient_root",
            Model::StudyRoot => "study_root",
        }
    }

    fn top(self) -> Level {
        match self {
            Model::PatientRoot => Level::Patient,
            Model::StudyRoot => Level::Study,
        }
    }
}

/// The Query/Retrieve Level (0008,0052) value of a level.
pub fn level_name(level: Level) -> &'static str {
    match level {
        Level::Patient => "PATIENT",
        Level::Study => "STUDY",
        Level::Series => "SERIES",
        Level::Instance => "IMAGE",
    }
}

fn parse_level(s: &str) -> Option<Level> {
    match s {
        "PATIENT" => Some(Level::Patient),
        "STUDY" => Some(Level::Study),
        "SERIES" => Some(Level::Series),
        "IMAGE" => Some(Level::Instance),
        _ => None,
    }
}

/// The unique key of a level (PS3.4 §C.6.1.1 / §C.6.2.1 tables).
pub fn unique_key(level: Level) -> Tag {
    match level {
        Level::Patient => tags::PATIENT_ID,
        Level::Study => tags::STUDY_INSTANCE_UID,
        Level::Series => tags::SERIES_INSTANCE_UID,
        Level::Instance => tags::SOP_INSTANCE_UID,
    }
}

/// How the value of an attribute is matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Wildcard-capable text; `pn`: Person Name rules; `multi`: stored value may
    /// hold several `\`-separated values.
    Text {
        pn: bool,
        multi: bool,
    },
    Uid,
    Date,
    Time,
    DateTime,
    Int,
    Seq,
    /// Text without wildcards allowed and not matchable (e.g. computed counts).
    Other,
}

fn kind_of_vr(vr: VR) -> Kind {
    match vr {
        VR::PN => Kind::Text {
            pn: true,
            multi: false,
        },
        VR::AE | VR::CS | VR::LO | VR::SH | VR::UC => Kind::Text {
            pn: false,
            multi: true,
        },
        VR::LT | VR::ST | VR::UR | VR::UT => Kind::Text {
            pn: false,
            multi: false,
        },
        VR::UI => Kind::Uid,
        VR::DA => Kind::Date,
        VR::TM => Kind::Time,
        VR::DT => Kind::DateTime,
        VR::IS | VR::US | VR::UL | VR::SS | VR::SL => Kind::Int,
        VR::SQ => Kind::Seq,
        _ => Kind::Other,
    }
}

/// Attributes the index can match and return: (tag, VR, level).
const INDEXED: &[(Tag, VR, Level)] = &[
    (tags::PATIENT_NAME, VR::PN, Level::Patient),
    (tags::PATIENT_ID, VR::LO, Level::Patient),
    (tags::ISSUER_OF_PATIENT_ID, VR::LO, Level::Patient),
    (tags::PATIENT_BIRTH_DATE, VR::DA, Level::Patient),
    (tags::PATIENT_SEX, VR::CS, Level::Patient),
    (tags::STUDY_INSTANCE_UID, VR::UI, Level::Study),
    (tags::STUDY_DATE, VR::DA, Level::Study),
    (tags::STUDY_TIME, VR::TM, Level::Study),
    (tags::ACCESSION_NUMBER, VR::SH, Level::Study),
    (tags::STUDY_ID, VR::SH, Level::Study),
    (tags::STUDY_DESCRIPTION, VR::LO, Level::Study),
    (tags::REFERRING_PHYSICIAN_NAME, VR::PN, Level::Study),
    (tags::PROCEDURE_CODE_SEQUENCE, VR::SQ, Level::Study),
    (tags::MODALITIES_IN_STUDY, VR::CS, Level::Study),
    (tags::SERIES_INSTANCE_UID, VR::UI, Level::Series),
    (tags::MODALITY, VR::CS, Level::Series),
    (tags::SERIES_NUMBER, VR::IS, Level::Series),
    (tags::SERIES_DESCRIPTION, VR::LO, Level::Series),
    (tags::BODY_PART_EXAMINED, VR::CS, Level::Series),
    (tags::REQUEST_ATTRIBUTES_SEQUENCE, VR::SQ, Level::Series),
    (tags::SOP_INSTANCE_UID, VR::UI, Level::Instance),
    (tags::SOP_CLASS_UID, VR::UI, Level::Instance),
    (tags::INSTANCE_NUMBER, VR::IS, Level::Instance),
    (tags::ROWS, VR::US, Level::Instance),
    (tags::COLUMNS, VR::US, Level::Instance),
    (tags::NUMBER_OF_FRAMES, VR::IS, Level::Instance),
    (tags::ACQUISITION_DATE_TIME, VR::DT, Level::Instance),
];

/// Return-only attributes computed per entity (PS3.4 §C.3.4 Table C.3-5 …): (tag, VR,
/// level of the entity they describe).
const COMPUTED: &[(Tag, VR, Level)] = &[
    (
        tags::NUMBER_OF_PATIENT_RELATED_STUDIES,
        VR::IS,
        Level::Patient,
    ),
    (
        tags::NUMBER_OF_PATIENT_RELATED_SERIES,
        VR::IS,
        Level::Patient,
    ),
    (
        tags::NUMBER_OF_PATIENT_RELATED_INSTANCES,
        VR::IS,
        Level::Patient,
    ),
    (tags::NUMBER_OF_STUDY_RELATED_SERIES, VR::IS, Level::Study),
    (
        tags::NUMBER_OF_STUDY_RELATED_INSTANCES,
        VR::IS,
        Level::Study,
    ),
    (tags::SOP_CLASSES_IN_STUDY, VR::UI, Level::Study),
    (
        tags::NUMBER_OF_SERIES_RELATED_INSTANCES,
        VR::IS,
        Level::Series,
    ),
];

/// Sequences whose items are indexed (written by [`sequences_json`]).
const INDEXED_SEQUENCES: &[(Tag, Level)] = &[
    (tags::PROCEDURE_CODE_SEQUENCE, Level::Study),
    (tags::REQUEST_ATTRIBUTES_SEQUENCE, Level::Series),
];

fn indexed(tag: Tag) -> Option<(VR, Level)> {
    INDEXED
        .iter()
        .find(|(t, _, _)| *t == tag)
        .map(|(_, vr, l)| (*vr, *l))
}

fn computed(tag: Tag) -> Option<(VR, Level)> {
    COMPUTED
        .iter()
        .find(|(t, _, _)| *t == tag)
        .map(|(_, vr, l)| (*vr, *l))
}

/// One alternative of a text or UID key.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Exact(Vec<char>),
    Glob(Vec<char>),
}

/// A matching condition.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Cond {
    Universal,
    /// Any of the patterns (text: case-folded for PN).
    Text(Vec<Pattern>),
    /// Any of the UIDs.
    Uids(Vec<String>),
    /// Inclusive range of normalised values (see [`norm_lo`]).
    Range(Option<String>, Option<String>),
    Int(i64),
    /// Keys of the query item (sequence matching).
    Seq(Vec<Key>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Key {
    tag: Tag,
    vr: VR,
    kind: Kind,
    cond: Cond,
}

/// A requested return key.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ReturnKey {
    tag: Tag,
    vr: VR,
    /// For sequences: the requested item attributes (`None`: all stored).
    item_tags: Option<Vec<(Tag, VR)>>,
}

/// A parsed C-FIND (or retrieve) identifier.
#[derive(Clone, Debug)]
pub struct Query {
    model: Model,
    level: Level,
    /// Matching keys the index can evaluate (non-universal ones only).
    keys: Vec<Key>,
    returns: Vec<ReturnKey>,
    /// A key with a value was given that the index cannot match.
    unsupported_keys: bool,
    /// (0008,0005) was in the request.
    charset_requested: bool,
}

fn invalid(tag: Tag, what: &str) -> ArchiveError {
    ArchiveError::InvalidQuery {
        comment: format!("{what} {tag}"),
        offending: vec![tag],
    }
}

/// The trimmed text of an element (padding spaces and NULs removed), or `None` for
/// a sequence.
fn elem_text(e: &dicom_object::mem::InMemElement) -> Result<String, ArchiveError> {
    if e.vr() == VR::SQ {
        return Ok(String::new());
    }
    let s = e
        .to_str()
        .map_err(|_| invalid(e.tag(), "unreadable value of"))?;
    Ok(s.trim_matches([' ', '\0']).to_owned())
}

fn has_wild(s: &str) -> bool {
    s.contains(['*', '?'])
}

/// Parses the value of one key of `kind` (tag and VR for errors).
fn parse_cond(tag: Tag, vr: VR, kind: Kind, raw: &str) -> Result<Cond, ArchiveError> {
    if raw.is_empty() {
        return Ok(Cond::Universal);
    }
    match kind {
        Kind::Text { pn, .. } => {
            if raw.chars().all(|c| c == '*') {
                return Ok(Cond::Universal);
            }
            let values: Vec<&str> = raw.split('\\').collect();
            if values.len() > 1 && tag != tags::MODALITIES_IN_STUDY {
                return Err(invalid(
                    tag,
                    "multiple values are not a matching key type for",
                ));
            }
            let pats = values
                .into_iter()
                .map(|v| {
                    let v = v.trim();
                    let chars: Vec<char> = if pn {
                        fold(trim_pn(v))
                    } else {
                        v.chars().collect()
                    };
                    if has_wild(v) {
                        Pattern::Glob(chars)
                    } else {
                        Pattern::Exact(chars)
                    }
                })
                .collect();
            Ok(Cond::Text(pats))
        }
        Kind::Uid => {
            let mut uids = Vec::new();
            for v in raw.split('\\') {
                let v = v.trim_matches([' ', '\0']);
                if has_wild(v) {
                    return Err(invalid(tag, "wildcards are not allowed in UI key"));
                }
                let u = Uid::parse(v).map_err(|_| invalid(tag, "invalid UID in key"))?;
                uids.push(u.as_str().to_owned());
            }
            Ok(Cond::Uids(uids))
        }
        Kind::Date | Kind::Time | Kind::DateTime => {
            if has_wild(raw) || raw.contains('\\') {
                return Err(invalid(tag, "wildcards and lists are not allowed in"));
            }
            parse_range(kind, raw).ok_or_else(|| invalid(tag, "malformed date/time value in"))
        }
        Kind::Int => {
            if has_wild(raw) || raw.contains('\\') {
                return Err(invalid(tag, "wildcards and lists are not allowed in"));
            }
            raw.trim()
                .parse::<i64>()
                .map(Cond::Int)
                .map_err(|_| invalid(tag, "malformed number in"))
        }
        Kind::Seq | Kind::Other => {
            let _ = vr;
            Ok(Cond::Universal)
        }
    }
}

/// Lower-cased characters (PN case-insensitive rule).
fn fold(s: &str) -> Vec<char> {
    s.chars().flat_map(char::to_lowercase).collect()
}

/// A PN value or group without trailing component / group delimiters and spaces.
fn trim_pn(s: &str) -> &str {
    s.trim_end_matches(['^', '=', ' '])
}

/// `*` any run (including none), `?` exactly one character.
fn glob(pat: &[char], s: &[char]) -> bool {
    let (mut p, mut i) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() && (pat[p] == '?' || (pat[p] != '*' && pat[p] == s[i])) {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == '*' {
            star = Some((p, i));
            p += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    while p < pat.len() && pat[p] == '*' {
        p += 1;
    }
    p == pat.len()
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Validates one DA/TM/DT value and returns its digits (without `.`, `:` or offset).
fn digits_of(kind: Kind, v: &str) -> Option<String> {
    match kind {
        Kind::Date => (v.len() == 8 && all_digits(v)).then(|| v.to_owned()),
        Kind::Time => {
            let (main, frac) = match v.split_once('.') {
                Some((m, f)) => (m, Some(f)),
                None => (v, None),
            };
            if !(all_digits(main) && matches!(main.len(), 2 | 4 | 6)) {
                return None;
            }
            if let Some(f) = frac {
                if main.len() != 6 || f.len() > 6 || !all_digits(f) {
                    return None;
                }
            }
            let hh: u32 = main[0..2].parse().ok()?;
            if hh > 23 {
                return None;
            }
            Some(format!("{main}{}", frac.unwrap_or("")))
        }
        Kind::DateTime => {
            // YYYY[MM[DD[HH[MM[SS[.F{1-6}]]]]]][&ZZXX]
            if !v.is_ascii() {
                return None;
            }
            let body = match v.len().checked_sub(5) {
                Some(n) if v[n..].starts_with(['+', '-']) && all_digits(&v[n + 1..]) => {
                    dt_offset(v)?;
                    &v[..n]
                }
                _ => v,
            };
            let (main, frac) = match body.split_once('.') {
                Some((m, f)) => (m, Some(f)),
                None => (body, None),
            };
            if !(all_digits(main) && matches!(main.len(), 4 | 6 | 8 | 10 | 12 | 14)) {
                return None;
            }
            if let Some(f) = frac {
                if main.len() != 14 || f.len() > 6 || !all_digits(f) {
                    return None;
                }
            }
            Some(format!("{main}{}", frac.unwrap_or("")))
        }
        _ => None,
    }
}

fn full_len(kind: Kind) -> usize {
    match kind {
        Kind::Date => 8,
        Kind::Time => 12,
        _ => 20,
    }
}

/// Lower bound: the start of the period the value denotes.
fn norm_lo(kind: Kind, digits: &str) -> String {
    let mut s = digits.to_owned();
    while s.len() < full_len(kind) {
        s.push('0');
    }
    s
}

/// Upper bound: the end of the period (padding with 9s is above every valid value
/// of that period and below the next one).
fn norm_hi(kind: Kind, digits: &str) -> String {
    let mut s = digits.to_owned();
    while s.len() < full_len(kind) {
        s.push('9');
    }
    s
}

fn parse_range(kind: Kind, raw: &str) -> Option<Cond> {
    let raw = raw.trim();
    if !raw.is_ascii() {
        return None;
    }
    let lo = |v: &str| Some(with_offset(kind, v, norm_lo(kind, &digits_of(kind, v)?)));
    let hi = |v: &str| Some(with_offset(kind, v, norm_hi(kind, &digits_of(kind, v)?)));
    let side = |v: &str, bound: &dyn Fn(&str) -> Option<String>| -> Option<Option<String>> {
        if v.is_empty() {
            Some(None)
        } else {
            bound(v).map(Some)
        }
    };
    // A DT offset also uses '-': a single DT with an offset after at least the hour
    // (`20140101120000-0500`) is a single value; otherwise try every '-' as the
    // range separator, then none.
    if kind == Kind::DateTime && raw.len() > 5 {
        let n = raw.len() - 5;
        if raw[n..].starts_with('-') && raw[..n].split('.').next().is_some_and(|m| m.len() >= 10) {
            if let (Some(l), Some(h)) = (lo(raw), hi(raw)) {
                return Some(Cond::Range(Some(l), Some(h)));
            }
        }
    }
    for (pos, _) in raw.match_indices('-') {
        let (a, b) = (&raw[..pos], &raw[pos + 1..]);
        if let (Some(l), Some(h)) = (side(a, &lo), side(b, &hi)) {
            if l.is_none() && h.is_none() {
                return None;
            }
            return Some(Cond::Range(l, h));
        }
    }
    Some(Cond::Range(Some(lo(raw)?), Some(hi(raw)?)))
}

/// `norm` (a normalised DA/TM/DT value) followed by the UTC offset suffix of the
/// DT value `v` (`+HHMM` / `-HHMM`) when it has one; see [`point_cmp`].
fn with_offset(kind: Kind, v: &str, mut norm: String) -> String {
    if kind == Kind::DateTime && dt_offset(v).is_some() {
        norm.push_str(&v[v.len() - 5..]);
    }
    norm
}

/// The UTC offset suffix `&ZZXX` of an (ASCII) DT value, in minutes east of UTC;
/// `None` when there is none or it is out of range (PS3.5 Table 6.2-1: −1200 to
/// +1400, minutes below 60).
fn dt_offset(v: &str) -> Option<i32> {
    let n = v.len().checked_sub(5)?;
    let (sign, d) = (v.as_bytes().get(n)?, v.get(n + 1..)?);
    if !matches!(sign, b'+' | b'-') || !all_digits(d) {
        return None;
    }
    let (h, m): (i32, i32) = (d.get(..2)?.parse().ok()?, d.get(2..)?.parse().ok()?);
    let minutes = h * 60 + m;
    match sign {
        b'+' if m < 60 && minutes <= 14 * 60 => Some(minutes),
        b'-' if m < 60 && minutes <= 12 * 60 => Some(-minutes),
        _ => None,
    }
}

/// Orders two normalised points of `kind` ([`norm_lo`]/[`norm_hi`], and for DT
/// [`with_offset`]). DT points that both carry a UTC offset are compared as
/// instants (PS3.4 §C.2.2.2.5: the offset "shall be taken into account");
/// otherwise, and for DA/TM, digit by digit (local date-times: a DT without an
/// offset is taken to be in the other value's timezone).
fn point_cmp(kind: Kind, a: &str, b: &str) -> std::cmp::Ordering {
    const DIGITS: usize = 20;
    if kind == Kind::DateTime && a.len() == DIGITS + 5 && b.len() == DIGITS + 5 {
        if let (Some(oa), Some(ob)) = (dt_offset(a), dt_offset(b)) {
            return dt_instant(&a[..DIGITS], oa).cmp(&dt_instant(&b[..DIGITS], ob));
        }
    }
    let (a, b) = if kind == Kind::DateTime {
        (a.get(..DIGITS).unwrap_or(a), b.get(..DIGITS).unwrap_or(b))
    } else {
        (a, b)
    };
    a.cmp(b)
}

/// Microseconds since 1970-01-01T00:00Z of 20 normalised DT digits
/// (`YYYYMMDDHHMMSSFFFFFF`) at `offset` minutes east of UTC. Padding outside a
/// field's range (`00` months and days of a lower bound, `99` of an upper one) is
/// clamped to the field's first or last valid value, so a bound stays the start or
/// end of the period it denotes; a leap second counts as second 59.
fn dt_instant(d: &str, offset: i32) -> i64 {
    let field = |from: usize, to: usize| -> i64 {
        d.get(from..to).and_then(|s| s.parse().ok()).unwrap_or(0)
    };
    let year = field(0, 4);
    let month = field(4, 6).clamp(1, 12);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    let day = field(6, 8).clamp(1, month_days);
    // Days from civil (proleptic Gregorian), H. Hinnant's algorithm.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let minutes =
        (days * 24 + field(8, 10).min(23)) * 60 + field(10, 12).min(59) - i64::from(offset);
    (minutes * 60 + field(12, 14).min(59)) * 1_000_000 + field(14, 20)
}

/// A stored DA/TM/DT value as a comparable string, or `None` when it is empty or
/// not in the standard format (such values match only universal keys).
fn stored_point(kind: Kind, v: &str) -> Option<String> {
    let v = v.trim();
    let cleaned: String;
    let v = if kind == Kind::Time && v.contains(':') {
        cleaned = v.replace(':', "");
        &cleaned
    } else {
        v
    };
    if !v.is_ascii() {
        return None;
    }
    digits_of(kind, v).map(|d| with_offset(kind, v, norm_lo(kind, &d)))
}

fn text_matches(stored: &str, pats: &[Pattern], pn: bool, multi: bool) -> bool {
    if stored.is_empty() {
        return false;
    }
    let mut candidates: Vec<Vec<char>> = Vec::new();
    if pn {
        for value in stored.split('\\') {
            candidates.push(fold(trim_pn(value.trim())));
            if value.contains('=') {
                for g in value.split('=') {
                    let g = trim_pn(g.trim());
                    if !g.is_empty() {
                        candidates.push(fold(g));
                    }
                }
            }
        }
    } else if multi {
        candidates.extend(stored.split('\\').map(|v| v.trim().chars().collect()));
    } else {
        candidates.push(stored.chars().collect());
    }
    pats.iter().any(|p| {
        candidates.iter().any(|c| match p {
            Pattern::Exact(e) => e == c,
            Pattern::Glob(g) => glob(g, c),
        })
    })
}

/// Whether stored text `stored` satisfies `key`.
fn value_matches(key: &Key, stored: &str) -> bool {
    match (&key.cond, key.kind) {
        (Cond::Universal, _) => true,
        (Cond::Text(p), Kind::Text { pn, multi }) => text_matches(stored, p, pn, multi),
        (Cond::Uids(u), _) => {
            let s = stored.trim_matches([' ', '\0']);
            u.iter().any(|x| x == s)
        }
        (Cond::Range(lo, hi), k) => match stored_point(k, stored) {
            Some(v) => {
                use std::cmp::Ordering::{Greater, Less};
                lo.as_ref().is_none_or(|lo| point_cmp(k, &v, lo) != Less)
                    && hi.as_ref().is_none_or(|hi| point_cmp(k, &v, hi) != Greater)
            }
            None => false,
        },
        (Cond::Int(n), _) => stored.trim().parse::<i64>().ok() == Some(*n),
        _ => false,
    }
}

/// Items of one indexed sequence: tag (8 hex digits) → text, per item.
type Items = Vec<BTreeMap<String, String>>;

fn tag_key(t: Tag) -> String {
    format!("{:04X}{:04X}", t.group(), t.element())
}

fn parse_tag_key(s: &str) -> Option<Tag> {
    if s.len() != 8 {
        return None;
    }
    let g = u16::from_str_radix(&s[..4], 16).ok()?;
    let e = u16::from_str_radix(&s[4..], 16).ok()?;
    Some(Tag(g, e))
}

fn stored_items(json: &str, seq: Tag) -> Items {
    if json.is_empty() {
        return Vec::new();
    }
    let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let Some(serde_json::Value::Array(items)) = m.get(&tag_key(seq)) else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|it| match it {
            serde_json::Value::Object(o) => Some(
                o.iter()
                    .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The indexed sequences of a dataset at `level`, as the opaque text the index
/// keeps (`""` when there are none): `{"00081032": [{"00080100": "X", …}, …]}`,
/// items holding their primitive text attributes (Unicode, padding trimmed).
pub fn sequences_json(obj: &InMemDicomObject, level: Level) -> String {
    let mut out = serde_json::Map::new();
    for (seq, l) in INDEXED_SEQUENCES {
        if *l != level {
            continue;
        }
        let Some(items) = obj.get(*seq).and_then(|e| e.items()) else {
            continue;
        };
        let items: Vec<serde_json::Value> = items
            .iter()
            .map(|item| {
                let mut m = serde_json::Map::new();
                for e in item.iter() {
                    if e.vr() == VR::SQ || matches!(kind_of_vr(e.vr()), Kind::Other) {
                        continue;
                    }
                    if let Ok(s) = e.to_str() {
                        m.insert(
                            tag_key(e.tag()),
                            s.trim_matches([' ', '\0']).to_owned().into(),
                        );
                    }
                }
                serde_json::Value::Object(m)
            })
            .collect();
        out.insert(tag_key(*seq), items.into());
    }
    if out.is_empty() {
        String::new()
    } else {
        serde_json::Value::Object(out).to_string()
    }
}

fn seq_json_of(row: &EntityRow, seq: Tag) -> &str {
    match INDEXED_SEQUENCES.iter().find(|(t, _)| *t == seq) {
        Some((_, Level::Study)) => &row.study.sequences,
        Some((_, Level::Series)) => &row.series.sequences,
        _ => "",
    }
}

fn item_matches(item: &BTreeMap<String, String>, keys: &[Key]) -> bool {
    keys.iter().all(|k| {
        let v = item.get(&tag_key(k.tag)).map(String::as_str).unwrap_or("");
        value_matches(k, v)
    })
}

/// Stored text of an indexed attribute (`None` for sequences and computed ones).
fn stored_text(row: &EntityRow, tag: Tag) -> Option<String> {
    let int = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
    Some(match tag {
        t if t == tags::PATIENT_NAME => row.patient.patient_name.clone(),
        t if t == tags::PATIENT_ID => row.patient.patient_id.clone(),
        t if t == tags::ISSUER_OF_PATIENT_ID => row.patient.issuer_of_patient_id.clone(),
        t if t == tags::PATIENT_BIRTH_DATE => row.patient.patient_birth_date.clone(),
        t if t == tags::PATIENT_SEX => row.patient.patient_sex.clone(),
        t if t == tags::STUDY_INSTANCE_UID => row.study.study_instance_uid.clone(),
        t if t == tags::STUDY_DATE => row.study.study_date.clone(),
        t if t == tags::STUDY_TIME => row.study.study_time.clone(),
        t if t == tags::ACCESSION_NUMBER => row.study.accession_number.clone(),
        t if t == tags::STUDY_ID => row.study.study_id.clone(),
        t if t == tags::STUDY_DESCRIPTION => row.study.study_description.clone(),
        t if t == tags::REFERRING_PHYSICIAN_NAME => row.study.referring_physician_name.clone(),
        t if t == tags::SERIES_INSTANCE_UID => row.series.series_instance_uid.clone(),
        t if t == tags::MODALITY => row.series.modality.clone(),
        t if t == tags::SERIES_NUMBER => int(row.series.series_number),
        t if t == tags::SERIES_DESCRIPTION => row.series.series_description.clone(),
        t if t == tags::BODY_PART_EXAMINED => row.series.body_part_examined.clone(),
        t if t == tags::SOP_INSTANCE_UID => row.instance.sop_instance_uid.clone(),
        t if t == tags::SOP_CLASS_UID => row.instance.sop_class_uid.clone(),
        t if t == tags::INSTANCE_NUMBER => int(row.instance.instance_number),
        t if t == tags::ROWS => int(row.instance.rows),
        t if t == tags::COLUMNS => int(row.instance.columns),
        t if t == tags::NUMBER_OF_FRAMES => int(row.instance.number_of_frames),
        t if t == tags::ACQUISITION_DATE_TIME => row.instance.acquisition_date_time.clone(),
        _ => return None,
    })
}

impl Query {
    /// Parses a C-FIND identifier for `model`; `relational` when relational queries
    /// were negotiated (SOP Class Extended Negotiation byte 1, PS3.4 §C.5.1).
    ///
    /// # Errors
    /// [`ArchiveError::InvalidQuery`] naming the offending attribute(s): missing or
    /// unknown Query/Retrieve Level (or PATIENT in Study Root), a unique key above
    /// the level that is absent, empty, wildcard or a list (hierarchical queries,
    /// PS3.4 §C.4.1.2.2.1), a malformed value, a wildcard where the VR allows none, a
    /// list where only single values are allowed.
    pub fn parse(
        identifier: &InMemDicomObject,
        model: Model,
        relational: bool,
    ) -> Result<Query, ArchiveError> {
        // Multi-valued / ISO 2022 (0008,0005): text decoded with code extensions.
        let identifier = &*crate::charset::normalize(identifier);
        let level_tag = tags::QUERY_RETRIEVE_LEVEL;
        let level = identifier
            .get(level_tag)
            .map(elem_text)
            .transpose()?
            .and_then(|s| parse_level(&s))
            .ok_or_else(|| invalid(level_tag, "missing or invalid Query/Retrieve Level"))?;
        if level < model.top() {
            return Err(invalid(
                level_tag,
                "level not in this information model: Query/Retrieve Level",
            ));
        }
        let mut q = Query {
            model,
            level,
            keys: Vec::new(),
            returns: Vec::new(),
            unsupported_keys: false,
            charset_requested: false,
        };
        // Hierarchical: unique keys above the level are single values.
        if !relational {
            let mut l = model.top();
            while l < level {
                let t = unique_key(l);
                let raw = identifier.get(t).map(elem_text).transpose()?;
                match raw {
                    None => return Err(invalid(t, "hierarchical query: missing unique key")),
                    Some(v) if v.is_empty() || has_wild(&v) || v.contains('\\') => {
                        return Err(invalid(
                            t,
                            "hierarchical query: unique key must be a single value:",
                        ))
                    }
                    Some(_) => {}
                }
                l = match l {
                    Level::Patient => Level::Study,
                    Level::Study => Level::Series,
                    _ => Level::Instance,
                };
            }
        }
        for e in identifier.iter() {
            let tag = e.tag();
            if tag.element() == 0x0000 || tag == level_tag {
                continue;
            }
            if tag == tags::SPECIFIC_CHARACTER_SET {
                q.charset_requested = true;
                continue;
            }
            if tag == tags::RETRIEVE_AE_TITLE || tag == tags::INSTANCE_AVAILABILITY {
                q.returns.push(ReturnKey {
                    tag,
                    vr: e.vr(),
                    item_tags: None,
                });
                continue;
            }
            let known = indexed(tag).or_else(|| computed(tag));
            let vr = known.map(|(vr, _)| vr).unwrap_or(e.vr());
            let kind = kind_of_vr(vr);
            // Sequence keys.
            if e.vr() == VR::SQ || vr == VR::SQ {
                let items = e.items().unwrap_or(&[]);
                if items.len() > 1 {
                    return Err(invalid(tag, "a sequence key holds at most one item:"));
                }
                let item_tags = items.first().map(|it| {
                    it.iter()
                        .filter(|x| x.tag().element() != 0)
                        .map(|x| (x.tag(), x.vr()))
                        .collect::<Vec<_>>()
                });
                let supported = matches!(indexed(tag), Some((_, l)) if l <= level);
                let mut item_keys = Vec::new();
                if let Some(item) = items.first() {
                    for x in item.iter() {
                        let xk = kind_of_vr(x.vr());
                        if x.vr() == VR::SQ {
                            if !x.items().unwrap_or(&[]).is_empty() {
                                q.unsupported_keys = true;
                            }
                            continue;
                        }
                        let c = parse_cond(x.tag(), x.vr(), xk, &elem_text(x)?)?;
                        if c != Cond::Universal {
                            item_keys.push(Key {
                                tag: x.tag(),
                                vr: x.vr(),
                                kind: xk,
                                cond: c,
                            });
                        }
                    }
                }
                if !item_keys.is_empty() {
                    if supported {
                        q.keys.push(Key {
                            tag,
                            vr: VR::SQ,
                            kind: Kind::Seq,
                            cond: Cond::Seq(item_keys),
                        });
                    } else {
                        q.unsupported_keys = true;
                    }
                }
                q.returns.push(ReturnKey {
                    tag,
                    vr: VR::SQ,
                    item_tags: item_tags.filter(|t| !t.is_empty()),
                });
                continue;
            }
            let raw = elem_text(e)?;
            let cond = parse_cond(tag, vr, kind, &raw)?;
            q.returns.push(ReturnKey {
                tag,
                vr,
                item_tags: None,
            });
            if cond == Cond::Universal {
                // A value of a VR the engine cannot match (AS, DS, FD, …) is not
                // a universal key: it restricts nothing here, so say so (0xFF01,
                // QIDO-RS `Warning: 299`) instead of answering silently.
                if matches!(kind, Kind::Other) && !raw.chars().all(|c| c == '*') {
                    q.unsupported_keys = true;
                }
                continue;
            }
            match indexed(tag) {
                Some((_, l)) if l <= level => q.keys.push(Key {
                    tag,
                    vr,
                    kind,
                    cond,
                }),
                _ => q.unsupported_keys = true,
            }
        }
        Ok(q)
    }

    /// The Query/Retrieve Level.
    pub fn level(&self) -> Level {
        self.level
    }

    /// The information model.
    pub fn model(&self) -> Model {
        self.model
    }

    /// Whether the identifier held keys with values the index cannot match
    /// (treated as universal; the front end answers pendings with 0xFF01).
    pub fn has_unsupported_keys(&self) -> bool {
        self.unsupported_keys
    }

    /// Whether a response needs the study-level computed attributes
    /// (NumberOfStudyRelated*, SOPClassesInStudy, ModalitiesInStudy).
    fn needs_study_counts(&self) -> bool {
        self.returns.iter().any(|rk| {
            rk.tag == tags::MODALITIES_IN_STUDY
                || computed(rk.tag).is_some_and(|(_, l)| l == Level::Study && l <= self.level)
        })
    }

    /// Whether no key restricts the result (every key universal).
    pub fn is_universal(&self) -> bool {
        self.keys.is_empty()
    }

    /// Exact-value prefilters the index can apply without losing a match.
    fn prefilters(&self) -> Vec<Prefilter> {
        let mut out = Vec::new();
        for k in &self.keys {
            let column = match k.tag {
                t if t == tags::PATIENT_ID => Column::PatientId,
                t if t == tags::ISSUER_OF_PATIENT_ID => Column::IssuerOfPatientId,
                t if t == tags::STUDY_INSTANCE_UID => Column::StudyInstanceUid,
                t if t == tags::ACCESSION_NUMBER => Column::AccessionNumber,
                t if t == tags::STUDY_ID => Column::StudyId,
                t if t == tags::SERIES_INSTANCE_UID => Column::SeriesInstanceUid,
                t if t == tags::MODALITY => Column::Modality,
                t if t == tags::SOP_INSTANCE_UID => Column::SopInstanceUid,
                t if t == tags::SOP_CLASS_UID => Column::SopClassUid,
                // Study Date ranges (and single dates, which parse as ranges)
                // use the index on studies.study_date.
                t if t == tags::STUDY_DATE => {
                    if let Cond::Range(lo, hi) = &k.cond {
                        out.push(Prefilter {
                            column: Column::StudyDate,
                            filter: Filter::Range(lo.clone(), hi.clone()),
                        });
                    }
                    continue;
                }
                // PN keys (case-folded patterns): the literal ASCII prefix of
                // every pattern narrows the scan with a case-insensitive LIKE.
                t if t == tags::PATIENT_NAME => {
                    if let Cond::Text(pats) = &k.cond {
                        let prefixes: Option<Vec<String>> = pats
                            .iter()
                            .map(|p| {
                                let chars = match p {
                                    Pattern::Exact(c) | Pattern::Glob(c) => c,
                                };
                                let prefix: String = chars
                                    .iter()
                                    .take_while(|c| **c != '*' && **c != '?')
                                    .collect();
                                (!prefix.is_empty() && prefix.is_ascii()).then_some(prefix)
                            })
                            .collect();
                        if let Some(prefixes) = prefixes.filter(|v| !v.is_empty()) {
                            out.push(Prefilter {
                                column: Column::PatientName,
                                filter: Filter::PrefixNoCase(prefixes),
                            });
                        }
                    }
                    continue;
                }
                _ => continue,
            };
            let any_of = match &k.cond {
                Cond::Uids(u) => u.clone(),
                // Exact single values of non-PN text only (stored multi-valued CS
                // such as Modality are single-valued in practice but could hold
                // `\`: skip prefiltering those with a backslash-free exact value
                // only when the column is single-valued).
                Cond::Text(p) if k.tag != tags::MODALITY => {
                    let mut v = Vec::new();
                    for x in p {
                        match x {
                            Pattern::Exact(c) => v.push(c.iter().collect()),
                            Pattern::Glob(_) => {
                                v.clear();
                                break;
                            }
                        }
                    }
                    if v.is_empty() {
                        continue;
                    }
                    v
                }
                _ => continue,
            };
            out.push(Prefilter {
                column,
                filter: Filter::AnyOf(any_of),
            });
        }
        out
    }

    /// Whether `row` matches every key that needs no extra lookup (PS3.4
    /// §C.2.2.2 attribute matching; sequence matching against the stored item
    /// JSON). Modalities in Study (0008,0061) is not checked here: it needs the
    /// study's counts, which [`Archive::find`] fetches. Public for the
    /// `cfind_query` and `qido` fuzz targets (`fuzz/`).
    pub fn row_matches(&self, row: &EntityRow) -> bool {
        self.keys.iter().all(|k| {
            if k.tag == tags::MODALITIES_IN_STUDY {
                return true; // checked with the study's counts
            }
            if let Cond::Seq(item_keys) = &k.cond {
                let items = stored_items(seq_json_of(row, k.tag), k.tag);
                return items.iter().any(|it| item_matches(it, item_keys));
            }
            match stored_text(row, k.tag) {
                Some(v) => value_matches(k, &v),
                None => true,
            }
        })
    }

    fn modalities_key(&self) -> Option<&Key> {
        self.keys
            .iter()
            .find(|k| k.tag == tags::MODALITIES_IN_STUDY)
    }
}

/// Study-level matches newest first: Study Date, then Study Time,
/// descending (as text: DA/TM order for canonical values); studies without a
/// Study Date last; ties keep index (insertion) order. PS3.4 C.2.2 leaves
/// the order of responses open; a worklist (the web UI, QIDO-RS with
/// `limit`/`offset`, `bastion study list`) wants the latest first, and every
/// match is in memory already (at most `max_matches`).
fn newest_first(rows: &mut [EntityRow]) {
    rows.sort_by(|a, b| {
        let (a, b) = (&a.study, &b.study);
        a.study_date
            .is_empty()
            .cmp(&b.study_date.is_empty())
            .then_with(|| b.study_date.cmp(&a.study_date))
            .then_with(|| b.study_time.cmp(&a.study_time))
    });
}

/// Who asks, and the limits, for [`Archive::find`].
#[derive(Clone, Debug)]
pub struct FindOptions {
    /// Calling AE title of the device (for the event log).
    pub ae: String,
    /// Peer address (for the event log).
    pub peer: String,
    /// Our AE title, returned in Retrieve AE Title (0008,0054).
    pub retrieve_ae: String,
    /// More matches than this: [`ArchiveError::TooManyMatches`], nothing returned.
    pub max_matches: usize,
    /// The query as the client sent it, for the audit trail only (its
    /// Query message's ParticipantObjectQuery, PS3.15 A.5.3): recorded with
    /// [`bastion_audit::events::EventLog::record_private`], never in the
    /// event log (it names patients).
    pub identifier: Option<QueryIdentifier>,
}

/// The query of a [`FindOptions`] as received.
#[derive(Clone, Debug)]
pub struct QueryIdentifier {
    /// The C-FIND identifier dataset bytes, or a QIDO-RS query string.
    pub bytes: Vec<u8>,
    /// The transfer syntax UID of a C-FIND identifier (`None` for QIDO-RS).
    pub transfer_syntax: Option<String>,
}

impl FindOptions {
    fn private(&self) -> serde_json::Value {
        self.identifier
            .as_ref()
            .map_or(serde_json::Value::Null, |q| {
                bastion_audit::audit::private_query(&q.bytes, q.transfer_syntax.as_deref())
            })
    }
}

/// One response Identifier handed to the sink of [`Archive::find`].
#[derive(Debug)]
pub struct FindResponse {
    /// The identifier (Unicode text; (0008,0005) `ISO_IR 192` when needed).
    pub identifier: InMemDicomObject,
    /// Some keys were not supported (PS3.4 status 0xFF01 rather than 0xFF00).
    pub optional_keys_unsupported: bool,
}

/// How a find ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FindSummary {
    /// Matches found.
    pub matches: usize,
    /// Responses handed to the sink.
    pub sent: usize,
    /// The sink stopped it (C-CANCEL) before every match was sent.
    pub cancelled: bool,
}

/// Per-entity computed attributes, fetched lazily.
#[derive(Default)]
struct Extras {
    patient: Option<bastion_index::query::PatientCounts>,
    study: Option<StudyCounts>,
    series: Option<u64>,
}

impl Archive {
    /// The entities of the query's level that match (at most `limit + 1`; the caller
    /// checks `len() > limit`).
    fn matches(&self, q: &Query, limit: usize) -> Result<Vec<EntityRow>, ArchiveError> {
        let idx = self.index();
        let mut out = Vec::new();
        let modalities = q.modalities_key().cloned();
        // Without a Modalities in Study key, stop at limit + 1; with one, candidates
        // are post-filtered, so allow more (bounded) before giving up.
        let cap = if modalities.is_some() {
            limit.saturating_mul(50).max(limit + 1)
        } else {
            limit + 1
        };
        let mut over = false;
        idx.scan(q.level, &q.prefilters(), |row| {
            if q.row_matches(&row) {
                out.push(row);
                if out.len() >= cap {
                    over = true;
                    return false;
                }
            }
            true
        })
        .map_err(query_index_err)?;
        if let Some(k) = modalities {
            let mut kept = Vec::new();
            for row in out {
                let Some(study) = row.ids.study else { continue };
                let c = idx.study_counts(study).map_err(query_index_err)?;
                if c.modalities.iter().any(|m| value_matches(&k, m)) {
                    kept.push(row);
                    if kept.len() > limit {
                        break;
                    }
                }
            }
            if over && kept.len() <= limit {
                // Too many candidates to decide within the bound.
                return Err(ArchiveError::TooManyMatches { limit });
            }
            return Ok(kept);
        }
        Ok(out)
    }

    /// Runs a C-FIND: matches `query`, refuses more than `opts.max_matches` matches,
    /// then builds each response Identifier and passes it to `sink`, which returns
    /// `false` to stop (C-CANCEL). Records a `query.find` event (device, model, level,
    /// number of matches, Study Instance UIDs touched) and, for a universal query
    /// at PATIENT or STUDY level, a `security.universal_query` alert.
    ///
    /// Matching completes before the first response (the limit must be known before
    /// anything is sent); responses are then built and handed out one at a time.
    ///
    /// # Errors
    /// [`ArchiveError::TooManyMatches`] (nothing was passed to `sink`),
    /// [`ArchiveError::Internal`] (index failure).
    pub fn find(
        &self,
        query: &Query,
        opts: &FindOptions,
        sink: &mut dyn FnMut(FindResponse) -> bool,
    ) -> Result<FindSummary, ArchiveError> {
        self.find_for(query, opts, None, sink)
    }

    /// [`Archive::find`] for a local operator rather than a device: the
    /// `query.find` event names `actor` (e.g. `"cli"` for `bastion study`)
    /// instead of `ae`/`peer` (`opts.ae` and `opts.peer` are not recorded),
    /// and no `security.universal_query` alert is raised (the operator at
    /// the data directory holds every key already; the query itself is
    /// still recorded, with its identifier for the audit trail).
    ///
    /// # Errors
    /// As [`Archive::find`].
    pub fn find_local(
        &self,
        query: &Query,
        opts: &FindOptions,
        actor: &str,
        sink: &mut dyn FnMut(FindResponse) -> bool,
    ) -> Result<FindSummary, ArchiveError> {
        self.find_for(query, opts, Some(actor), sink)
    }

    fn find_for(
        &self,
        query: &Query,
        opts: &FindOptions,
        actor: Option<&str>,
        sink: &mut dyn FnMut(FindResponse) -> bool,
    ) -> Result<FindSummary, ArchiveError> {
        let level = level_name(query.level);
        let who = |mut v: serde_json::Value| {
            match actor {
                Some(a) => v["actor"] = a.into(),
                None => {
                    v["ae"] = opts.ae.clone().into();
                    v["peer"] = opts.peer.clone().into();
                }
            }
            v
        };
        if actor.is_none() && query.is_universal() && query.level <= Level::Study {
            self.events().record(
                "security.universal_query",
                Outcome::Alert,
                serde_json::json!({"ae": opts.ae, "peer": opts.peer, "model": query.model.name(), "level": level}),
            );
        }
        let rows = match self.matches(query, opts.max_matches) {
            Ok(r) if r.len() > opts.max_matches => Err(ArchiveError::TooManyMatches {
                limit: opts.max_matches,
            }),
            other => other,
        };
        let mut rows = match rows {
            Ok(r) => r,
            Err(e) => {
                let outcome = match e {
                    ArchiveError::TooManyMatches { .. } => Outcome::Refused,
                    _ => Outcome::Failure,
                };
                self.events().record_private(
                    "query.find",
                    outcome,
                    who(serde_json::json!({"model": query.model.name(),
                        "level": level, "matches": 0, "reason": e.to_string()})),
                    opts.private(),
                );
                return Err(e);
            }
        };
        if query.level == Level::Study {
            newest_first(&mut rows);
        }
        let mut summary = FindSummary {
            matches: rows.len(),
            sent: 0,
            cancelled: false,
        };
        let mut studies = BTreeSet::new();
        let mut result = Ok(());
        // Study-level computed attributes for every match in one read (four
        // statements), not four statements per match.
        let study_counts = if query.needs_study_counts() {
            let ids: Vec<i64> = rows
                .iter()
                .filter_map(|r| r.ids.study)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            self.index()
                .study_counts_many(&ids)
                .map_err(query_index_err)?
        } else {
            Default::default()
        };
        for row in &rows {
            if !row.study.study_instance_uid.is_empty() {
                studies.insert(row.study.study_instance_uid.clone());
            }
            let pre = row.ids.study.and_then(|s| study_counts.get(&s).cloned());
            let identifier = match self.response(query, row, opts, pre) {
                Ok(i) => i,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            summary.sent += 1;
            if !sink(FindResponse {
                identifier,
                optional_keys_unsupported: query.unsupported_keys,
            }) {
                summary.cancelled = summary.sent < rows.len();
                break;
            }
        }
        let outcome = if result.is_ok() {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        self.events().record_private(
            "query.find",
            outcome,
            who(serde_json::json!({"model": query.model.name(),
                "level": level, "matches": summary.matches, "sent": summary.sent,
                "cancelled": summary.cancelled, "study_uids": studies.into_iter().collect::<Vec<_>>()})),
            opts.private(),
        );
        result.map(|()| summary)
    }

    /// Every stored instance below the entities matching `query` (the retrieve
    /// identifier of C-MOVE / C-GET, PS3.4 §C.4.2.2.1: unique keys, UID lists at the
    /// retrieve level), at most `max_matches` entities.
    ///
    /// # Errors
    /// [`ArchiveError::TooManyMatches`], [`ArchiveError::Internal`].
    pub fn resolve_instances(
        &self,
        query: &Query,
        max_matches: usize,
    ) -> Result<Vec<InstanceRef>, ArchiveError> {
        let rows = self.matches(query, max_matches)?;
        if rows.len() > max_matches {
            return Err(ArchiveError::TooManyMatches { limit: max_matches });
        }
        let mut out = Vec::new();
        for row in rows {
            out.extend(
                self.index()
                    .instances_under(query.level, &row.ids)
                    .map_err(query_index_err)?
                    .iter()
                    .map(InstanceRef::from),
            );
        }
        Ok(out)
    }

    /// The stored instance with this SOP Instance UID, if any.
    ///
    /// # Errors
    /// [`ArchiveError::Internal`] when the index cannot be read.
    pub fn find_instance(
        &self,
        sop_instance_uid: &str,
    ) -> Result<Option<InstanceRef>, ArchiveError> {
        self.index()
            .find_instance(sop_instance_uid)
            .map(|found| found.as_ref().map(InstanceRef::from))
            .map_err(|e| ArchiveError::Internal(format!("index: {e}")))
    }

    /// How many instances are stored (replaced ones not counted).
    ///
    /// # Errors
    /// [`ArchiveError::Internal`] when the index cannot be read.
    pub fn instance_count(&self) -> Result<u64, ArchiveError> {
        self.index()
            .counts()
            .map(|c| c.instances)
            .map_err(|e| ArchiveError::Internal(format!("index: {e}")))
    }

    /// Folds the index's write-ahead log into its database file (SQLite
    /// `wal_checkpoint(TRUNCATE)`), e.g. before copying or inspecting it.
    ///
    /// # Errors
    /// [`ArchiveError::Internal`] when the checkpoint fails.
    pub fn checkpoint_index(&self) -> Result<(), ArchiveError> {
        self.index()
            .checkpoint()
            .map_err(|e| ArchiveError::Internal(format!("index: {e}")))
    }

    /// The patient of a stored instance (`by_instance`) or study, for the
    /// audit trail's ParticipantObject (PS3.15 A.5.3), which names the
    /// patient whose data was touched; `None` when unknown or unreadable.
    pub fn patient_of(&self, level: Level, uid: &str) -> Option<PatientOf> {
        let column = match level {
            Level::Instance => Column::SopInstanceUid,
            Level::Series => Column::SeriesInstanceUid,
            Level::Study => Column::StudyInstanceUid,
            Level::Patient => Column::PatientId,
        };
        let mut found = None;
        self.index()
            .scan(
                level,
                &[Prefilter {
                    column,
                    filter: Filter::AnyOf(vec![uid.to_owned()]),
                }],
                |row| {
                    found = Some(PatientOf {
                        key: format!("p{}", row.ids.patient),
                        patient_id: row.patient.patient_id.clone(),
                        patient_name: row.patient.patient_name.clone(),
                        study_instance_uid: row.study.study_instance_uid.clone(),
                    });
                    false
                },
            )
            .ok()?;
        found
    }

    fn response(
        &self,
        q: &Query,
        row: &EntityRow,
        opts: &FindOptions,
        study_counts: Option<StudyCounts>,
    ) -> Result<InMemDicomObject, ArchiveError> {
        let mut obj = InMemDicomObject::new_empty();
        let mut extras = Extras {
            study: study_counts,
            ..Extras::default()
        };
        let mut non_ascii = false;
        let mut put_text = |obj: &mut InMemDicomObject, tag: Tag, vr: VR, s: String| {
            non_ascii |= !s.is_ascii();
            obj.put(if s.is_empty() {
                DataElement::new(tag, vr, PrimitiveValue::Empty)
            } else {
                DataElement::new(tag, vr, PrimitiveValue::from(s))
            });
        };
        put_text(
            &mut obj,
            tags::QUERY_RETRIEVE_LEVEL,
            VR::CS,
            level_name(q.level).to_owned(),
        );
        put_text(
            &mut obj,
            tags::RETRIEVE_AE_TITLE,
            VR::AE,
            opts.retrieve_ae.clone(),
        );
        let idx = self.index();
        let ierr = query_index_err;
        for rk in &q.returns {
            let tag = rk.tag;
            if tag == tags::RETRIEVE_AE_TITLE {
                continue;
            }
            if tag == tags::INSTANCE_AVAILABILITY {
                put_text(&mut obj, tag, VR::CS, "ONLINE".into());
                continue;
            }
            if let Some((vr, l)) = computed(tag).filter(|(_, l)| *l <= q.level) {
                let value = match l {
                    Level::Patient => {
                        if extras.patient.is_none() {
                            extras.patient =
                                Some(idx.patient_counts(row.ids.patient).map_err(ierr)?);
                        }
                        let c = extras.patient.unwrap_or_default();
                        match tag {
                            t if t == tags::NUMBER_OF_PATIENT_RELATED_STUDIES => c.studies,
                            t if t == tags::NUMBER_OF_PATIENT_RELATED_SERIES => c.series,
                            _ => c.instances,
                        }
                        .to_string()
                    }
                    Level::Study => {
                        let c = self.study_extras(&mut extras, row)?;
                        match tag {
                            t if t == tags::NUMBER_OF_STUDY_RELATED_SERIES => c.series.to_string(),
                            t if t == tags::NUMBER_OF_STUDY_RELATED_INSTANCES => {
                                c.instances.to_string()
                            }
                            _ => c.sop_classes.join("\\"),
                        }
                    }
                    _ => {
                        let n = match (extras.series, row.ids.series) {
                            (Some(n), _) => n,
                            (None, Some(s)) => {
                                let n = idx.series_instance_count(s).map_err(ierr)?;
                                extras.series = Some(n);
                                n
                            }
                            (None, None) => 0,
                        };
                        n.to_string()
                    }
                };
                put_text(&mut obj, tag, vr, value);
                continue;
            }
            match indexed(tag).filter(|(_, l)| *l <= q.level) {
                Some((_, _)) if tag == tags::MODALITIES_IN_STUDY => {
                    let c = self.study_extras(&mut extras, row)?;
                    put_text(&mut obj, tag, VR::CS, c.modalities.join("\\"));
                }
                Some((VR::SQ, _)) => {
                    let items = stored_items(seq_json_of(row, tag), tag);
                    let mut out_items = Vec::new();
                    for it in &items {
                        let mut o = InMemDicomObject::new_empty();
                        match &rk.item_tags {
                            Some(want) => {
                                for (t, vr) in want {
                                    let v = it.get(&tag_key(*t)).cloned().unwrap_or_default();
                                    put_text(&mut o, *t, *vr, v);
                                }
                            }
                            None => {
                                for (k, v) in it {
                                    let Some(t) = parse_tag_key(k) else { continue };
                                    let vr = dicom_vr(t);
                                    put_text(&mut o, t, vr, v.clone());
                                }
                            }
                        }
                        out_items.push(o);
                    }
                    obj.put(DataElement::new(
                        tag,
                        VR::SQ,
                        Value::from(DataSetSequence::new(out_items, Length::UNDEFINED)),
                    ));
                }
                Some((vr, _)) => {
                    let v = stored_text(row, tag).unwrap_or_default();
                    put_text(&mut obj, tag, vr, v);
                }
                None => {
                    if rk.vr == VR::SQ {
                        obj.put(DataElement::new(
                            tag,
                            VR::SQ,
                            Value::from(DataSetSequence::new(
                                Vec::<InMemDicomObject>::new(),
                                Length::UNDEFINED,
                            )),
                        ));
                    } else {
                        obj.put(DataElement::new(tag, rk.vr, PrimitiveValue::Empty));
                    }
                }
            }
        }
        if non_ascii || q.charset_requested {
            obj.put(DataElement::new(
                tags::SPECIFIC_CHARACTER_SET,
                VR::CS,
                PrimitiveValue::from("ISO_IR 192"),
            ));
        }
        Ok(obj)
    }

    fn study_extras<'a>(
        &self,
        extras: &'a mut Extras,
        row: &EntityRow,
    ) -> Result<&'a StudyCounts, ArchiveError> {
        if extras.study.is_none() {
            let c = match row.ids.study {
                Some(s) => self.index().study_counts(s).map_err(query_index_err)?,
                None => StudyCounts::default(),
            };
            extras.study = Some(c);
        }
        Ok(extras.study.get_or_insert_with(StudyCounts::default))
    }
}

/// The dictionary VR of a tag (UN when unknown).
fn dicom_vr(t: Tag) -> VR {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
    dicom_dictionary_std::StandardDataDictionary
        .by_tag(t)
        .map(|e| match e.vr() {
            dicom_core::dictionary::VirtualVr::Exact(vr) => vr,
            _ => VR::UN,
        })
        .unwrap_or(VR::UN)
}

/// An index error during a query: an unreachable index database as
/// [`ArchiveError::StoreUnavailable`] (C-FIND 0xC000, QIDO-RS 503 with
/// `Retry-After`, logged naming the index), anything else internal.
fn query_index_err(e: bastion_index::IndexError) -> ArchiveError {
    if e.is_unavailable() {
        return crate::ingest::index_err(e);
    }
    ArchiveError::Internal(format!("query: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn study_matches_are_newest_first_undated_last() {
        let row = |uid: &str, date: &str, time: &str| {
            let mut r = EntityRow::default();
            r.study.study_instance_uid = uid.into();
            r.study.study_date = date.into();
            r.study.study_time = time.into();
            r
        };
        let mut rows = vec![
            row("1.1", "20040119", "072730"),
            row("1.2", "", ""),
            row("1.3", "20240611", "083000"),
            row("1.4", "20240611", "170000"),
            row("1.5", "20040119", "072730"),
        ];
        newest_first(&mut rows);
        let uids: Vec<_> = rows
            .iter()
            .map(|r| r.study.study_instance_uid.as_str())
            .collect();
        // ties keep index order
        assert_eq!(uids, ["1.4", "1.3", "1.1", "1.5", "1.2"]);
        // `bastion study list` prints this order as it comes (it had a
        // sort of its own: the same rows, the same order)
        let mut rows = vec![
            row("1.1", "20200101", "120000"),
            row("1.2", "", ""),
            row("1.3", "20240301", "080000"),
            row("1.4", "20240301", "170000"),
        ];
        newest_first(&mut rows);
        let uids: Vec<_> = rows
            .iter()
            .map(|r| r.study.study_instance_uid.as_str())
            .collect();
        assert_eq!(uids, ["1.4", "1.3", "1.1", "1.2"]);
    }

    fn key(vr: VR, raw: &str) -> Key {
        let kind = kind_of_vr(vr);
        let cond = parse_cond(Tag(0x0010, 0x0010), vr, kind, raw).expect("parses");
        Key {
            tag: Tag(0x0010, 0x0010),
            vr,
            kind,
            cond,
        }
    }

    fn m(vr: VR, q: &str, stored: &str) -> bool {
        value_matches(&key(vr, q), stored)
    }

    #[test]
    fn glob_basics() {
        let g = |p: &str, s: &str| {
            glob(
                &p.chars().collect::<Vec<_>>(),
                &s.chars().collect::<Vec<_>>(),
            )
        };
        assert!(g("*", ""));
        assert!(g("a*c", "abbbc"));
        assert!(g("a*c", "ac"));
        assert!(!g("a*c", "ab"));
        assert!(g("?b", "ab"));
        assert!(!g("?b", "b"));
        assert!(g("*b*", "aaabaaa"));
        assert!(g("王*", "王^小東"));
        assert!(!g("a?c", "ac"));
    }

    #[test]
    fn pn_is_case_insensitive_and_wildcard_contains_exact() {
        for stored in ["Doe^John", "DOE^JANE", "Doerr^J"] {
            // the wildcard result contains the exact result
            for (exact, wild) in [("Doe^John", "Doe^J*"), ("doe^jane", "doe*")] {
                if m(VR::PN, exact, stored) {
                    assert!(m(VR::PN, wild, stored), "{wild} vs {stored}");
                }
            }
        }
        assert!(m(VR::PN, "doe^john", "Doe^John"));
        assert!(m(VR::PN, "D?e^*", "DOE^JANE"));
        assert!(!m(VR::PN, "D?e^*", "Doerr^J"));
        assert!(!m(VR::PN, "Doe^J*", "Doerr^J"));
        assert!(m(VR::PN, "Doe^John", "Doe^John^^^"));
        assert!(m(VR::PN, "王*", "Wang^XiaoDong=王^小東="));
        assert!(m(VR::PN, "Wang^XiaoDong", "Wang^XiaoDong=王^小東="));
        assert!(m(VR::PN, "müller*", "MÜLLER^Jörg"));
        assert!(m(VR::PN, "Buc^Jérôme", "Buc^Jérôme\\Buc^Pierre"));
        assert!(!m(VR::PN, "Doe", "Doe^John"));
        assert!(!m(VR::PN, "x*", ""));
    }

    #[test]
    fn non_pn_text_is_case_sensitive_and_exact() {
        assert!(m(VR::LO, "*THORAX", "CR THORAX"));
        assert!(!m(VR::LO, "*thorax", "CR THORAX"));
        assert!(!m(VR::LO, "THORAX", "CR THORAX"));
        assert!(m(VR::CS, "CT", "OT\\CT"));
        assert_eq!(key(VR::LO, "*").cond, Cond::Universal);
        assert_eq!(key(VR::LO, "").cond, Cond::Universal);
    }

    #[test]
    fn ranges() {
        assert!(m(VR::DA, "20140309-20150309", "20140309"));
        assert!(m(VR::DA, "20140309-20150309", "20150309"));
        assert!(!m(VR::DA, "20140309-20150309", "20150310"));
        assert!(m(VR::DA, "-20150309", "19990101"));
        assert!(m(VR::DA, "20140309-", "20991231"));
        assert!(!m(VR::DA, "20140309-", "20140308"));
        assert!(!m(VR::DA, "20140309-", ""));
        assert!(m(VR::DA, "20140309", "20140309"));
        assert!(m(VR::TM, "090000-120000", "093015.123"));
        assert!(m(VR::TM, "090000-120000", "120000"));
        assert!(!m(VR::TM, "090000-120000", "120001"));
        assert!(m(VR::TM, "09-12", "125959"));
        assert!(m(VR::TM, "0930", "093059"));
        assert!(m(VR::TM, "0930", "09:30:10"));
        assert!(m(
            VR::DT,
            "20140101-20141231235959",
            "20140601120000.5+0100"
        ));
        assert!(m(VR::DT, "2014-2015", "20151231"));
        assert!(m(VR::DT, "20140101120000-0500", "20140101120000"));
        assert!(!m(VR::DT, "-2013", "20140101"));
        // Acquisition DateTime as stored by the corpus (examples_palette.dcm).
        assert!(m(VR::DT, "20110525145628.35", "20110525145628.350000"));
        assert!(!m(VR::DT, "20110525145628.36", "20110525145628.350000"));
        assert!(m(VR::DT, "20110525-20110525", "20110525145628.350000"));
        // UTC offsets on both sides: compared as instants.
        assert!(m(VR::DT, "20141231233000+0000", "20150101003000+0100"));
        assert!(!m(VR::DT, "20141231233000+0000", "20141231233000+0100"));
        assert!(m(VR::DT, "20141231230000+0000-", "20150101003000+0100"));
        assert!(!m(VR::DT, "20141231233001+0000-", "20150101003000+0100"));
        assert!(m(VR::DT, "-20141231233000-0100", "20150101003000+0100"));
        assert!(m(VR::DT, "2015+0100", "20141231233000+0000"));
        assert!(!m(VR::DT, "2015+0100", "20151231233000+0000"));
        // An offset on one side only: local date-times, digit by digit.
        assert!(m(VR::DT, "20150101003000", "20150101003000+0100"));
        assert!(m(VR::DT, "20150101003000-0500", "20150101003000"));
        assert!(!m(VR::DT, "2015+0100", "20141231233000"));
        // Stored values that are not DT never match; offsets out of range are malformed.
        assert!(!m(VR::DT, "2014-", "2014€€"));
        assert!(!m(VR::DT, "2014-", "20140101+9999"));
        let dt = tags::ACQUISITION_DATE_TIME;
        for bad in [
            "20140101120000+1500",
            "20140101120000+1060",
            "2014+0160",
            "€€€€€€",
            "2014€-",
        ] {
            assert!(
                parse_cond(dt, VR::DT, Kind::DateTime, bad).is_err(),
                "{bad}"
            );
        }
        assert!(parse_cond(t_of_study_time(), VR::TM, Kind::Time, "€€€€€€").is_err());
        let t = Tag(0x0008, 0x0030);
        for bad in [
            "20140901090909-20140902101010",
            "9-10",
            "2501",
            "*",
            "0900-1200-1300",
            "-",
        ] {
            assert!(parse_cond(t, VR::TM, Kind::Time, bad).is_err(), "{bad}");
        }
        for bad in ["2014", "201403091", "2014*", "20140309\\20140310"] {
            assert!(parse_cond(t, VR::DA, Kind::Date, bad).is_err(), "{bad}");
        }
    }

    fn t_of_study_time() -> Tag {
        tags::STUDY_TIME
    }

    #[test]
    fn dt_instants() {
        assert_eq!(dt_instant("19700101000000000000", 0), 0);
        assert_eq!(
            dt_instant("20000301000000000000", 0),
            11_017 * 86_400 * 1_000_000
        );
        assert_eq!(dt_instant("19700101010000000001", 60), 1);
        // Padded bounds: the first and last instants of the period.
        assert_eq!(
            dt_instant("20240000000000000000", 0),
            dt_instant("20240101000000000000", 0)
        );
        assert_eq!(
            dt_instant("20249999999999999999", 0),
            dt_instant("20241231235959999999", 0)
        );
        assert_eq!(
            dt_instant("20240299999999999999", 0) + 1,
            dt_instant("20240301000000000000", 0)
        );
        assert_eq!(
            dt_instant("19000299999999999999", 0) + 1,
            dt_instant("19000301000000000000", 0)
        );
    }

    #[test]
    fn uid_lists_and_no_wildcards() {
        assert!(m(VR::UI, "1.2.3\\1.2.4\\9.9.9", "1.2.4"));
        assert!(!m(VR::UI, "1.2.3\\1.2.4", "1.2.5"));
        let t = tags::STUDY_INSTANCE_UID;
        assert!(parse_cond(t, VR::UI, Kind::Uid, "*").is_err());
        assert!(parse_cond(t, VR::UI, Kind::Uid, "1.2.*").is_err());
        assert!(parse_cond(t, VR::UI, Kind::Uid, "1.2.3\\x").is_err());
        // lists are refused for non-UI single-valued keys
        assert!(parse_cond(tags::PATIENT_ID, VR::LO, kind_of_vr(VR::LO), "A\\B").is_err());
        assert!(parse_cond(
            tags::MODALITIES_IN_STUDY,
            VR::CS,
            kind_of_vr(VR::CS),
            "CT\\MR"
        )
        .is_ok());
    }

    #[test]
    fn sequence_items_any_item_all_keys() {
        let mut obj = InMemDicomObject::new_empty();
        let item = |v: &str, s: &str| {
            InMemDicomObject::from_element_iter([
                DataElement::new(tags::CODE_VALUE, VR::SH, PrimitiveValue::from(v)),
                DataElement::new(
                    tags::CODING_SCHEME_DESIGNATOR,
                    VR::SH,
                    PrimitiveValue::from(s),
                ),
            ])
        };
        obj.put(DataElement::new(
            tags::PROCEDURE_CODE_SEQUENCE,
            VR::SQ,
            Value::from(DataSetSequence::new(
                vec![item("DEVICE1", "99X"), item("DEVICE2", "99Y")],
                Length::UNDEFINED,
            )),
        ));
        let json = sequences_json(&obj, Level::Study);
        let items = stored_items(&json, tags::PROCEDURE_CODE_SEQUENCE);
        assert_eq!(items.len(), 2);
        let k = |tag, v: &str| Key {
            tag,
            vr: VR::SH,
            kind: kind_of_vr(VR::SH),
            cond: parse_cond(tag, VR::SH, kind_of_vr(VR::SH), v).expect("parses"),
        };
        let any = |keys: &[Key]| items.iter().any(|it| item_matches(it, keys));
        assert!(any(&[k(tags::CODE_VALUE, "DEVICE2")]));
        assert!(any(&[
            k(tags::CODE_VALUE, "DEVICE2"),
            k(tags::CODING_SCHEME_DESIGNATOR, "99Y")
        ]));
        // every key of the query item must match the same stored item
        assert!(!any(&[
            k(tags::CODE_VALUE, "DEVICE2"),
            k(tags::CODING_SCHEME_DESIGNATOR, "99X")
        ]));
        assert!(!any(&[k(tags::CODE_VALUE, "DEVICE3")]));
    }

    /// Through ingest and the index: an instance whose Procedure Code Sequence
    /// item holds ISO 2022 IR 87 text (PS3.5 Annex H bytes, the dataset's
    /// `\ISO 2022 IR 87`) is found by that text in UTF-8 and returned as
    /// Unicode; its Acquisition DateTime is matched by a DT range at IMAGE level
    /// and returned as stored.
    #[test]
    fn archive_finds_iso_2022_sequence_items_and_dt_ranges() {
        use crate::charset::tests::{element, sequence};
        use std::sync::Arc;
        let dir = tempfile::tempdir().expect("tmp");
        let master = bastion_store::MasterKey::from_bytes([9u8; 32]);
        let store = bastion_store::BlobStore::open(&dir.path().join("blobs"), master.clone())
            .expect("store");
        let index = bastion_index::Index::open(
            &dir.path().join("index.db"),
            &master.derive("bastion index v1"),
        )
        .expect("index");
        let events =
            bastion_audit::events::EventLog::open(&dir.path().join("events.log")).expect("events");
        let archive = Archive::new(
            Arc::new(store),
            Arc::new(index),
            Arc::new(events),
            crate::Limits::default(),
        );
        let sop_class = b"1.2.840.10008.5.1.4.1.1.7\0";
        let item = [
            element(0x0008, 0x0100, b"P1"),
            element(0x0008, 0x0104, b"\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B"),
        ]
        .concat();
        let dataset = [
            element(0x0008, 0x0005, b"\\ISO 2022 IR 87"),
            element(0x0008, 0x0016, sop_class),
            element(0x0008, 0x0018, b"2.25.9001"),
            element(0x0008, 0x002a, b"20150101003000+0100"),
            sequence(0x0008, 0x1032, &[item]),
            element(
                0x0010,
                0x0010,
                b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B",
            ),
            element(0x0020, 0x000d, b"2.25.9002"),
            element(0x0020, 0x000e, b"2.25.9003"),
        ]
        .concat();
        archive
            .ingest(
                crate::Received::Network {
                    dataset,
                    transfer_syntax: "1.2.840.10008.1.2".into(),
                    affected_sop_class: "1.2.840.10008.5.1.4.1.1.7".into(),
                    affected_sop_instance: "2.25.9001".into(),
                },
                &crate::Origin {
                    ae: "MOD1".into(),
                    peer: "127.0.0.1:1".into(),
                    on_conflict: crate::OnConflict::Refuse,
                },
            )
            .expect("stored");
        let opts = FindOptions {
            ae: "FINDER".into(),
            peer: "127.0.0.1:2".into(),
            retrieve_ae: "BASTION".into(),
            max_matches: 10,
            identifier: None,
        };
        let find = |ident: InMemDicomObject| -> Vec<InMemDicomObject> {
            let q = Query::parse(&ident, Model::StudyRoot, true).expect("query");
            let mut got = Vec::new();
            archive
                .find(&q, &opts, &mut |r| {
                    got.push(r.identifier);
                    true
                })
                .expect("find");
            got
        };
        let text = |o: &InMemDicomObject, t: Tag| -> String {
            o.get(t)
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_end().to_owned())
                .unwrap_or_default()
        };
        let ident = |level: &str, keys: Vec<DataElement<InMemDicomObject>>| {
            let mut o = InMemDicomObject::new_empty();
            o.put(DataElement::new(
                tags::QUERY_RETRIEVE_LEVEL,
                VR::CS,
                PrimitiveValue::from(level),
            ));
            for k in keys {
                o.put(k);
            }
            o
        };
        let seq_key = |meaning: &str| {
            DataElement::new(
                tags::PROCEDURE_CODE_SEQUENCE,
                VR::SQ,
                Value::from(DataSetSequence::new(
                    vec![InMemDicomObject::from_element_iter([DataElement::new(
                        tags::CODE_MEANING,
                        VR::LO,
                        PrimitiveValue::from(meaning),
                    )])],
                    Length::UNDEFINED,
                )),
            )
        };
        let got = find(ident("STUDY", vec![seq_key("山田^太郎")]));
        assert_eq!(got.len(), 1);
        let items = got[0]
            .get(tags::PROCEDURE_CODE_SEQUENCE)
            .and_then(|e| e.items())
            .expect("items");
        assert_eq!(text(&items[0], tags::CODE_MEANING), "山田^太郎");
        assert_eq!(text(&got[0], tags::SPECIFIC_CHARACTER_SET), "ISO_IR 192");
        assert!(find(ident("STUDY", vec![seq_key("山田")])).is_empty());
        assert_eq!(find(ident("STUDY", vec![seq_key("山田*")])).len(), 1);

        let dt = |v: &str| {
            DataElement::new(tags::ACQUISITION_DATE_TIME, VR::DT, PrimitiveValue::from(v))
        };
        for (key, n) in [
            ("20150101", 1),
            ("20141231233000+0000", 1),
            ("20141231-20150101", 1),
            ("-20141231", 0),
            ("20150102-", 0),
        ] {
            let got = find(ident("IMAGE", vec![dt(key)]));
            assert_eq!(got.len(), n, "{key}");
            if n == 1 {
                assert_eq!(
                    text(&got[0], tags::ACQUISITION_DATE_TIME),
                    "20150101003000+0100"
                );
            }
        }
    }

    #[test]
    fn hierarchical_rules() {
        let ident = |level: &str, study: Option<&str>, series: Option<&str>| {
            let mut o = InMemDicomObject::new_empty();
            o.put(DataElement::new(
                tags::QUERY_RETRIEVE_LEVEL,
                VR::CS,
                PrimitiveValue::from(level),
            ));
            if let Some(s) = study {
                o.put(DataElement::new(
                    tags::STUDY_INSTANCE_UID,
                    VR::UI,
                    PrimitiveValue::from(s),
                ));
            }
            if let Some(s) = series {
                o.put(DataElement::new(
                    tags::SERIES_INSTANCE_UID,
                    VR::UI,
                    PrimitiveValue::from(s),
                ));
            }
            o.put(DataElement::new(
                tags::SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.3.4"),
            ));
            o
        };
        let off = |r: Result<Query, ArchiveError>| match r {
            Err(ArchiveError::InvalidQuery { offending, .. }) => offending,
            other => panic!("{other:?}"),
        };
        let m = Model::StudyRoot;
        assert!(Query::parse(&ident("IMAGE", Some("1.2"), Some("1.2.3")), m, false).is_ok());
        assert_eq!(
            off(Query::parse(
                &ident("IMAGE", Some(""), Some("1.2.3")),
                m,
                false
            )),
            vec![tags::STUDY_INSTANCE_UID]
        );
        assert_eq!(
            off(Query::parse(
                &ident("IMAGE", Some("1.2"), Some("*")),
                m,
                false
            )),
            vec![tags::SERIES_INSTANCE_UID]
        );
        assert_eq!(
            off(Query::parse(
                &ident("IMAGE", Some("1.2\\1.3"), Some("1.2.3")),
                m,
                false
            )),
            vec![tags::STUDY_INSTANCE_UID]
        );
        // relational: zero-length is universal; `*` in UI is still not a wildcard
        assert!(Query::parse(&ident("IMAGE", Some(""), Some("")), m, true).is_ok());
        assert!(Query::parse(&ident("IMAGE", Some("*"), Some("")), m, true).is_err());
        assert!(Query::parse(&ident("PATIENT", None, None), m, false).is_err());
    }
}
