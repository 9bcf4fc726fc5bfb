//! QIDO-RS (PS3.18 §10.6, Search Transaction) translated for the one query
//! engine that C-FIND uses.
//!
//! [`qido_to_query`] builds a C-FIND Identifier from the resource path and
//! the query parameters (PS3.18 §8.3.4) and parses it with
//! [`Query::parse`] in the Study Root model with relational queries allowed
//! (a `/series` or `/instances` search needs no Study Instance UID), so the
//! matching rules, the refusals and the index prefilters are exactly those of
//! C-FIND (PS3.4 §C.2.2.2): one matcher for every front end.
//!
//! The Identifier holds:
//! - Query/Retrieve Level `STUDY`, `SERIES` or `IMAGE`;
//! - the UIDs of the path (`/studies/{study}/series/{series}/instances`) as
//!   single-value keys;
//! - each `{attributeID}={value}` parameter, the attribute named by keyword
//!   (`PatientID`), by tag (`00100020`) or, for a sequence item attribute, by
//!   `Sequence.Attribute` (§8.3.4.1); a UID list may be separated by `,` as
//!   well as `\` (§8.3.4.1, "UID list matching");
//! - return keys for the attributes PS3.18 Tables 10.6.3-3 (study), 10.6.3-4
//!   (series) and 10.6.3-5 (instance) require at the level, plus those of the
//!   levels above it that the path does not fix (§10.6.3.3.1), plus each
//!   `includefield` (§8.3.4.3; `all` adds every attribute the archive
//!   stores at those levels).
//!
//! Retrieve URL (0008,1190) is not a key the engine knows: [`qido_result_json`]
//! adds it to each response from the real UIDs of the match.
//!
//! `fuzzymatching=true` (§8.3.4.5): Person Name matching in this engine is
//! already case-insensitive; fuzzy matching also turns each PN key without a
//! trailing `*` into a prefix match (`doe` → `doe*`). A `*` at the end of a
//! wildcard pattern only adds matches, so the fuzzy result always contains
//! the literal result.
//!
//! Keys the index cannot match (e.g. `BitsAllocated=16`) are treated as
//! universal by the engine, as for C-FIND; `Query::has_unsupported_keys`
//! tells the web layer to add a `Warning: 299` header (§8.3.4.6 note).

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Length, Tag, VR};
use dicom_dictionary_std::{tags, StandardDataDictionary};
use dicom_object::InMemDicomObject;
use serde_json::Value;

use bastion_archive::query::{level_name, Level, Model, Query};
use bastion_archive::ArchiveError;
use bastion_model::Uid;

use crate::json::{hex_tag, parse_hex_tag, to_dicom_json, JsonOptions};
use crate::{clip, DicomWebError};

/// The resource searched (PS3.18 §10.6.1: `…/studies`, `…/series`,
/// `…/instances`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QidoLevel {
    /// Search for studies.
    Study,
    /// Search for series.
    Series,
    /// Search for instances.
    Instance,
}

impl QidoLevel {
    /// The query engine's level (Query/Retrieve Level `STUDY`, `SERIES`,
    /// `IMAGE`).
    pub fn level(self) -> Level {
        match self {
            QidoLevel::Study => Level::Study,
            QidoLevel::Series => Level::Series,
            QidoLevel::Instance => Level::Instance,
        }
    }
}

/// The UIDs fixed by the resource path: `/studies/{study}/series` has
/// `study`, `/studies/{study}/series/{series}/instances` both (PS3.18
/// §10.6.1.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathUids {
    /// Study Instance UID from the path.
    pub study: Option<Uid>,
    /// Series Instance UID from the path.
    pub series: Option<Uid>,
}

/// The parameters of a search that are not matching keys (PS3.18 §8.3.4).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QidoOptions {
    /// `limit`: at most this many results (§8.3.4.4); `None` when absent
    /// (the web layer applies its own cap).
    pub limit: Option<usize>,
    /// `offset`: results to skip first (§8.3.4.4); 0 when absent.
    pub offset: usize,
    /// `fuzzymatching=true` (§8.3.4.5).
    pub fuzzy: bool,
    /// `includefield=all` (§8.3.4.3).
    pub include_all: bool,
    /// The attributes named by `includefield`, in request order (sequence
    /// attributes by their top-level tag).
    pub include_fields: Vec<Tag>,
    /// Every attribute the request named, as a matching key or in
    /// `includefield` (top-level tags): an empty one of these is returned
    /// empty, any other empty attribute is left out ([`omit_empty_unnamed`]).
    pub named: Vec<Tag>,
}

/// Translates a QIDO-RS search into the engine's [`Query`] and the
/// non-matching options; see the module docs for the Identifier it builds.
///
/// `params` are the decoded query parameters in request order. `accept` and
/// `charset` (§8.3.3.1, for the web layer's negotiation) are ignored.
///
/// # Errors
/// - [`DicomWebError::UnknownAttribute`]: a parameter or `includefield`
///   names neither an option nor a dictionary attribute (→ 400);
/// - [`DicomWebError::InvalidParameter`]: `limit`/`offset` not a
///   non-negative integer, `fuzzymatching` not `true`/`false`, an attribute
///   given twice (except UID lists), a path UID contradicted by a parameter,
///   a sequence key nested more than one level;
/// - [`DicomWebError::InvalidQuery`]: the engine refused a value
///   (wildcard in a UID, malformed date range…), as C-FIND would (0xA900).
pub fn qido_to_query(
    level: QidoLevel,
    path: &PathUids,
    params: &[(String, String)],
) -> Result<(Query, QidoOptions), DicomWebError> {
    let mut opts = QidoOptions::default();
    // (tag, vr, item attribute, value) in request order.
    let mut keys: Vec<Key> = Vec::new();
    for (name, value) in params {
        match name.to_ascii_lowercase().as_str() {
            "limit" => opts.limit = Some(parse_count(name, value)?),
            "offset" => opts.offset = parse_count(name, value)?,
            "fuzzymatching" => {
                opts.fuzzy = match value.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(DicomWebError::InvalidParameter {
                            name: "fuzzymatching".into(),
                            reason: "must be true or false".into(),
                        })
                    }
                }
            }
            "includefield" => {
                for field in value.split(',').map(str::trim).filter(|f| !f.is_empty()) {
                    if field == "all" {
                        opts.include_all = true;
                    } else {
                        let (attr, _) = resolve(field)?;
                        opts.include_fields.push(attr.0);
                    }
                }
            }
            "accept" | "charset" => {}
            _ => {
                let (attr, item) = resolve(name)?;
                // A control character (NUL, ESC…) is never part of a
                // matching key's value in a URL (PS3.18 §8.3.4.1): refused
                // rather than matched against stored text.
                if value.chars().any(char::is_control) {
                    return Err(DicomWebError::InvalidParameter {
                        name: name.clone(),
                        reason: "control characters are not allowed in a matching value".into(),
                    });
                }
                add_key(&mut keys, attr, item, value.clone())?;
            }
        }
    }
    // Path UIDs: single-value keys that a parameter may repeat, not change.
    let path_keys = [
        (tags::STUDY_INSTANCE_UID, path.study.as_ref()),
        (tags::SERIES_INSTANCE_UID, path.series.as_ref()),
    ];
    for (tag, uid) in path_keys {
        let Some(uid) = uid else { continue };
        match keys.iter_mut().find(|k| k.tag == tag && k.item.is_none()) {
            Some(k) if k.value.split('\\').any(|v| v == uid.as_str()) => {
                k.value = uid.as_str().to_owned();
            }
            Some(_) => {
                return Err(DicomWebError::InvalidParameter {
                    name: keyword(tag),
                    reason: "contradicts the UID in the resource path".into(),
                })
            }
            None => keys.push(Key {
                tag,
                vr: VR::UI,
                item: None,
                value: uid.as_str().to_owned(),
            }),
        }
    }
    opts.named = keys
        .iter()
        .map(|k| k.tag)
        .chain(opts.include_fields.iter().copied())
        .collect();
    if opts.fuzzy {
        for k in keys.iter_mut().filter(|k| k.is_pn() && !k.value.is_empty()) {
            if !k.value.ends_with('*') {
                k.value.push('*');
            }
        }
    }
    let mut identifier = InMemDicomObject::new_empty();
    identifier.put(DataElement::new(
        tags::QUERY_RETRIEVE_LEVEL,
        VR::CS,
        PrimitiveValue::from(level_name(level.level())),
    ));
    put_keys(&mut identifier, &keys);
    // Return keys: required attributes, includefield, all.
    let mut returns: Vec<(Tag, VR)> = Vec::new();
    let levels = levels_returned(level, path);
    for l in &levels {
        returns.extend_from_slice(required(*l));
    }
    if opts.include_all {
        for l in &levels {
            returns.extend_from_slice(required(*l));
            returns.extend_from_slice(stored(*l));
        }
    }
    for tag in &opts.include_fields {
        returns.push((*tag, dictionary_vr(*tag)));
    }
    for (tag, vr) in returns {
        if identifier.get(tag).is_some() {
            continue;
        }
        identifier.put(empty_element(tag, vr));
    }
    let query = Query::parse(&identifier, Model::StudyRoot, true).map_err(|e| match e {
        ArchiveError::InvalidQuery { comment, .. } => DicomWebError::InvalidQuery(comment),
        other => DicomWebError::InvalidQuery(other.to_string()),
    })?;
    Ok((query, opts))
}

/// The QIDO-RS result object (PS3.18 §10.6.3.3, Annex F) of one response
/// Identifier (taken by value: it is consumed, not copied) of `Archive::find`: Query/Retrieve Level removed, Retrieve URL
/// (0008,1190) added for the level's resource (`{base}/studies/{study}`,
/// `…/series/{series}`, `…/instances/{sop}`) from the match's UIDs (left out
/// when one of them is missing or not a valid UID), then converted with
/// [`to_dicom_json`].
///
/// `base` is the service root, e.g. `https://host:8443/dicomweb`.
pub fn qido_result_json(
    identifier: InMemDicomObject,
    level: QidoLevel,
    base: &str,
    opts: &JsonOptions,
) -> Value {
    let mut obj = identifier;
    obj.remove_element(tags::QUERY_RETRIEVE_LEVEL);
    let uid = |tag| {
        obj.get(tag)
            .and_then(|e| e.to_str().ok())
            .and_then(|s| Uid::parse(&s).ok())
    };
    let study = uid(tags::STUDY_INSTANCE_UID);
    let series = uid(tags::SERIES_INSTANCE_UID);
    let sop = uid(tags::SOP_INSTANCE_UID);
    let url = match (level, &study, &series, &sop) {
        (QidoLevel::Study, Some(st), _, _) => Some(retrieve_url(base, st, None, None)),
        (QidoLevel::Series, Some(st), Some(se), _) => Some(retrieve_url(base, st, Some(se), None)),
        (QidoLevel::Instance, Some(st), Some(se), Some(i)) => {
            Some(retrieve_url(base, st, Some(se), Some(i)))
        }
        _ => None,
    };
    if let Some(url) = url {
        obj.put(DataElement::new(
            tags::RETRIEVE_URL,
            VR::UR,
            PrimitiveValue::from(url),
        ));
    }
    to_dicom_json(&obj, opts)
}

/// Leaves out of a QIDO-RS result the attributes that have no value and that
/// the request did not name (`named`, [`QidoOptions::named`]): PS3.18
/// §10.6.3.3 allows an empty attribute either way, and real clients break on
/// one they did not ask for (OHIF's worklist fails on `"00080061": {"vr":
/// "CS"}` with no Value for a study without Modality). The UIDs are never
/// empty.
pub fn omit_empty_unnamed(obj: &mut InMemDicomObject, named: &[Tag]) {
    let empty: Vec<Tag> = obj
        .iter()
        .filter(|e| !named.contains(&e.header().tag) && value_is_empty(e.value()))
        .map(|e| e.header().tag)
        .collect();
    for tag in empty {
        obj.remove_element(tag);
    }
}

/// No value: an empty primitive (or one of only padding and separators),
/// a sequence without items.
fn value_is_empty(v: &dicom_core::DicomValue<InMemDicomObject>) -> bool {
    match v {
        dicom_core::DicomValue::Primitive(p) => {
            p.multiplicity() == 0
                || (matches!(p, PrimitiveValue::Str(_) | PrimitiveValue::Strs(_))
                    && p.to_str().trim_matches(['\0', ' ', '\\']).is_empty())
        }
        dicom_core::DicomValue::Sequence(s) => s.items().is_empty(),
        dicom_core::DicomValue::PixelSequence(_) => false,
    }
}

/// The WADO-RS URL of a study, series or instance (PS3.18 §10.4.1, the
/// value of Retrieve URL (0008,1190)): `{base}/studies/{study}`, with
/// `/series/{series}` and `/instances/{sop}` when given (`sop` is used only
/// with `series`). UIDs are digits and dots, so nothing needs escaping.
pub fn retrieve_url(base: &str, study: &Uid, series: Option<&Uid>, sop: Option<&Uid>) -> String {
    let mut url = format!("{}/studies/{study}", base.trim_end_matches('/'));
    if let Some(series) = series {
        url.push_str(&format!("/series/{series}"));
        if let Some(sop) = sop {
            url.push_str(&format!("/instances/{sop}"));
        }
    }
    url
}

/// One matching key from the parameters.
#[derive(Debug)]
struct Key {
    tag: Tag,
    vr: VR,
    /// For `Sequence.Attribute`: the item attribute.
    item: Option<(Tag, VR)>,
    value: String,
}

impl Key {
    fn is_pn(&self) -> bool {
        match self.item {
            Some((_, vr)) => vr == VR::PN,
            None => self.vr == VR::PN,
        }
    }

    fn value_vr(&self) -> VR {
        self.item.map_or(self.vr, |(_, vr)| vr)
    }
}

fn parse_count(name: &str, value: &str) -> Result<usize, DicomWebError> {
    value
        .parse::<usize>()
        .map_err(|_| DicomWebError::InvalidParameter {
            name: clip(name),
            reason: "must be a non-negative integer".into(),
        })
}

/// `Keyword`, `GGGGEEEE` or `Seq.Attr` (one level: the engine matches one
/// level of sequence items) → ((tag, VR), item attribute).
#[allow(clippy::type_complexity)]
fn resolve(name: &str) -> Result<((Tag, VR), Option<(Tag, VR)>), DicomWebError> {
    let mut parts = name.split('.');
    let first = parts.next().unwrap_or_default();
    let top = lookup(first).ok_or_else(|| DicomWebError::UnknownAttribute { name: clip(name) })?;
    match (parts.next(), parts.next()) {
        (None, _) => Ok((top, None)),
        (Some(sub), None) if top.1 == VR::SQ => {
            let item =
                lookup(sub).ok_or_else(|| DicomWebError::UnknownAttribute { name: clip(name) })?;
            Ok((top, Some(item)))
        }
        _ => Err(DicomWebError::InvalidParameter {
            name: clip(name),
            reason: "only one level of sequence item attributes can be matched".into(),
        }),
    }
}

/// A dictionary attribute by keyword or by 8-hex-digit tag.
fn lookup(name: &str) -> Option<(Tag, VR)> {
    let dict = StandardDataDictionary;
    if let Some(tag) = parse_hex_tag(name) {
        return dict.by_tag(tag).map(|e| (tag, e.vr().relaxed()));
    }
    let entry = dict.by_name(name)?;
    // Group-range entries (e.g. overlays, 60xx) have no single tag.
    Some((entry.tag(), entry.vr().relaxed()))
}

fn dictionary_vr(tag: Tag) -> VR {
    StandardDataDictionary
        .by_tag(tag)
        .map_or(VR::UN, |e| e.vr().relaxed())
}

fn keyword(tag: Tag) -> String {
    StandardDataDictionary
        .by_tag(tag)
        .map_or_else(|| hex_tag(tag), |e| e.alias().to_owned())
}

fn add_key(
    keys: &mut Vec<Key>,
    (tag, vr): (Tag, VR),
    item: Option<(Tag, VR)>,
    mut value: String,
) -> Result<(), DicomWebError> {
    let value_vr = item.map_or(vr, |(_, vr)| vr);
    if value_vr == VR::UI {
        // §8.3.4.1: a UID list may be separated by commas.
        value = value.replace(',', "\\");
    }
    if let Some(k) = keys.iter_mut().find(|k| k.tag == tag && k.item == item) {
        if k.value_vr() == VR::UI {
            k.value = format!("{}\\{value}", k.value);
            return Ok(());
        }
        return Err(DicomWebError::InvalidParameter {
            name: keyword(item.map_or(tag, |(t, _)| t)),
            reason: "given more than once".into(),
        });
    }
    if item.is_some() && keys.iter().any(|k| k.tag == tag && k.item.is_none()) {
        return Err(DicomWebError::InvalidParameter {
            name: keyword(tag),
            reason: "given both as a sequence and as an item attribute".into(),
        });
    }
    keys.push(Key {
        tag,
        vr,
        item,
        value,
    });
    Ok(())
}

/// Writes the keys, grouping item attributes of one sequence in one item.
fn put_keys(identifier: &mut InMemDicomObject, keys: &[Key]) {
    let mut sequences: Vec<(Tag, InMemDicomObject)> = Vec::new();
    for k in keys {
        match k.item {
            None => {
                identifier.put(text_element(k.tag, k.vr, &k.value));
            }
            Some((tag, vr)) => {
                let item = match sequences.iter_mut().find(|(t, _)| *t == k.tag) {
                    Some((_, item)) => item,
                    None => {
                        sequences.push((k.tag, InMemDicomObject::new_empty()));
                        &mut sequences.last_mut().expect("just pushed").1
                    }
                };
                item.put(text_element(tag, vr, &k.value));
            }
        }
    }
    for (tag, item) in sequences {
        identifier.put(DataElement::new(
            tag,
            VR::SQ,
            DataSetSequence::new(vec![item], Length::UNDEFINED),
        ));
    }
}

/// A key as the engine reads it: text (its `elem_text`), empty when
/// universal. A plain `SQ=` parameter is an empty (universal) sequence.
fn text_element(tag: Tag, vr: VR, value: &str) -> DataElement<InMemDicomObject> {
    if vr == VR::SQ || value.is_empty() {
        return empty_element(tag, vr);
    }
    DataElement::new(tag, vr, PrimitiveValue::from(value))
}

fn empty_element(tag: Tag, vr: VR) -> DataElement<InMemDicomObject> {
    if vr == VR::SQ {
        // Table 10.6.3-4: Request Attributes Sequence with its two item
        // attributes.
        let item: Vec<InMemDicomObject> = if tag == tags::REQUEST_ATTRIBUTES_SEQUENCE {
            vec![InMemDicomObject::from_element_iter(vec![
                DataElement::new(
                    tags::SCHEDULED_PROCEDURE_STEP_ID,
                    VR::SH,
                    PrimitiveValue::Empty,
                ),
                DataElement::new(tags::REQUESTED_PROCEDURE_ID, VR::SH, PrimitiveValue::Empty),
            ])]
        } else {
            Vec::new()
        };
        return DataElement::new(tag, VR::SQ, DataSetSequence::new(item, Length::UNDEFINED));
    }
    DataElement::new(tag, vr, PrimitiveValue::Empty)
}

/// The levels whose attributes a search returns (PS3.18 §10.6.3.3.1): the
/// searched level and every level above it not fixed by the path.
fn levels_returned(level: QidoLevel, path: &PathUids) -> Vec<Level> {
    let mut levels = vec![level.level()];
    if level != QidoLevel::Study && path.study.is_none() {
        levels.push(Level::Study);
    }
    if level == QidoLevel::Instance && path.series.is_none() {
        levels.push(Level::Series);
    }
    levels
}

/// Required attributes of a level's results: PS3.18 Tables 10.6.3-3
/// (study, plus Study Description, which viewers list), 10.6.3-4 (series)
/// and 10.6.3-5 (instance). Retrieve URL is added by [`qido_result_json`].
fn required(level: Level) -> &'static [(Tag, VR)] {
    match level {
        Level::Patient | Level::Study => &[
            (tags::STUDY_DATE, VR::DA),
            (tags::STUDY_TIME, VR::TM),
            (tags::ACCESSION_NUMBER, VR::SH),
            (tags::INSTANCE_AVAILABILITY, VR::CS),
            (tags::MODALITIES_IN_STUDY, VR::CS),
            (tags::REFERRING_PHYSICIAN_NAME, VR::PN),
            (tags::TIMEZONE_OFFSET_FROM_UTC, VR::SH),
            (tags::PATIENT_NAME, VR::PN),
            (tags::PATIENT_ID, VR::LO),
            (tags::PATIENT_BIRTH_DATE, VR::DA),
            (tags::PATIENT_SEX, VR::CS),
            (tags::STUDY_INSTANCE_UID, VR::UI),
            (tags::STUDY_ID, VR::SH),
            (tags::STUDY_DESCRIPTION, VR::LO),
            (tags::NUMBER_OF_STUDY_RELATED_SERIES, VR::IS),
            (tags::NUMBER_OF_STUDY_RELATED_INSTANCES, VR::IS),
        ],
        Level::Series => &[
            (tags::MODALITY, VR::CS),
            (tags::TIMEZONE_OFFSET_FROM_UTC, VR::SH),
            (tags::SERIES_DESCRIPTION, VR::LO),
            (tags::SERIES_INSTANCE_UID, VR::UI),
            (tags::SERIES_NUMBER, VR::IS),
            (tags::NUMBER_OF_SERIES_RELATED_INSTANCES, VR::IS),
            (tags::PERFORMED_PROCEDURE_STEP_START_DATE, VR::DA),
            (tags::PERFORMED_PROCEDURE_STEP_START_TIME, VR::TM),
            (tags::REQUEST_ATTRIBUTES_SEQUENCE, VR::SQ),
        ],
        Level::Instance => &[
            (tags::SOP_CLASS_UID, VR::UI),
            (tags::SOP_INSTANCE_UID, VR::UI),
            (tags::INSTANCE_AVAILABILITY, VR::CS),
            (tags::TIMEZONE_OFFSET_FROM_UTC, VR::SH),
            (tags::INSTANCE_NUMBER, VR::IS),
            (tags::ROWS, VR::US),
            (tags::COLUMNS, VR::US),
            (tags::BITS_ALLOCATED, VR::US),
            (tags::NUMBER_OF_FRAMES, VR::IS),
        ],
    }
}

/// The other attributes the archive indexes and returns at a level
/// (`bastion_archive::query`'s table of indexed and computed attributes),
/// for `includefield=all`.
fn stored(level: Level) -> &'static [(Tag, VR)] {
    match level {
        Level::Patient | Level::Study => &[
            (tags::ISSUER_OF_PATIENT_ID, VR::LO),
            (tags::PROCEDURE_CODE_SEQUENCE, VR::SQ),
            (tags::SOP_CLASSES_IN_STUDY, VR::UI),
            (tags::NUMBER_OF_PATIENT_RELATED_STUDIES, VR::IS),
            (tags::NUMBER_OF_PATIENT_RELATED_SERIES, VR::IS),
            (tags::NUMBER_OF_PATIENT_RELATED_INSTANCES, VR::IS),
        ],
        Level::Series => &[(tags::BODY_PART_EXAMINED, VR::CS)],
        Level::Instance => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn uid(s: &str) -> Uid {
        Uid::parse(s).expect("uid")
    }

    #[test]
    fn keywords_tags_and_options() {
        let (q, o) = qido_to_query(
            QidoLevel::Study,
            &PathUids::default(),
            &p(&[
                ("PatientID", "123"),
                ("00080061", "CT"),
                ("includefield", "00081030,PatientAge"),
                ("includefield", "all"),
                ("limit", "10"),
                ("offset", "5"),
            ]),
        )
        .expect("valid");
        assert_eq!(q.level(), Level::Study);
        assert!(!q.is_universal());
        assert_eq!(o.limit, Some(10));
        assert_eq!(o.offset, 5);
        assert!(o.include_all);
        assert_eq!(
            o.include_fields,
            vec![tags::STUDY_DESCRIPTION, tags::PATIENT_AGE]
        );
    }

    #[test]
    fn refusals() {
        let none = PathUids::default();
        let err = |params: &[(&str, &str)]| {
            qido_to_query(QidoLevel::Study, &none, &p(params))
                .err()
                .map(|e| e.http_status())
        };
        assert!(matches!(
            qido_to_query(QidoLevel::Study, &none, &p(&[("PatientNam", "x")])),
            Err(DicomWebError::UnknownAttribute { .. })
        ));
        assert_eq!(err(&[("includefield", "Nope")]), Some(400));
        assert_eq!(err(&[("limit", "-1")]), Some(400));
        assert_eq!(err(&[("fuzzymatching", "yes")]), Some(400));
        assert_eq!(err(&[("StudyInstanceUID", "1.2.*")]), Some(400));
        assert_eq!(err(&[("StudyDate", "2020-x")]), Some(400));
        assert_eq!(err(&[("PatientID", "1"), ("PatientID", "2")]), Some(400));
        assert_eq!(err(&[("FFFF0001", "1")]), Some(400));
        assert_eq!(err(&[("PatientName", "\0")]), Some(400));
        assert_eq!(err(&[("PatientID", "a\u{1b}b")]), Some(400));
        // The error never echoes a value.
        let e = qido_to_query(QidoLevel::Study, &none, &p(&[("StudyDate", "Doe^John")]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!e.contains("Doe"), "{e}");
    }

    #[test]
    fn path_uids_and_uid_lists() {
        let path = PathUids {
            study: Some(uid("1.2.3")),
            series: None,
        };
        assert!(qido_to_query(QidoLevel::Series, &path, &[]).is_ok());
        assert!(qido_to_query(
            QidoLevel::Series,
            &path,
            &p(&[("StudyInstanceUID", "1.2.4")])
        )
        .is_err());
        assert!(qido_to_query(
            QidoLevel::Series,
            &path,
            &p(&[("StudyInstanceUID", "1.2.3,1.2.4")])
        )
        .is_ok());
        assert!(qido_to_query(
            QidoLevel::Instance,
            &PathUids::default(),
            &p(&[("SOPInstanceUID", "1.2.3,1.2.4"), ("SOPInstanceUID", "1.5")])
        )
        .is_ok());
        assert!(qido_to_query(
            QidoLevel::Series,
            &PathUids::default(),
            &p(&[("RequestAttributesSequence.ScheduledProcedureStepID", "A*")])
        )
        .is_ok());
    }

    #[test]
    fn retrieve_urls() {
        let (st, se, i) = (uid("1.2"), uid("1.2.3"), uid("1.2.3.4"));
        assert_eq!(
            retrieve_url("https://h/dicomweb/", &st, Some(&se), Some(&i)),
            "https://h/dicomweb/studies/1.2/series/1.2.3/instances/1.2.3.4"
        );
        let ident = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::QUERY_RETRIEVE_LEVEL,
                VR::CS,
                PrimitiveValue::from("SERIES"),
            ),
            DataElement::new(
                tags::STUDY_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2"),
            ),
            DataElement::new(
                tags::SERIES_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.3\0"),
            ),
        ]);
        let j = qido_result_json(
            ident,
            QidoLevel::Series,
            "https://h/dicomweb",
            &JsonOptions::default(),
        );
        assert_eq!(
            j["00081190"]["Value"][0],
            "https://h/dicomweb/studies/1.2/series/1.2.3"
        );
        assert!(j.get("00080052").is_none());
    }
}
