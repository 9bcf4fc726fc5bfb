//! `bastion study list` / `bastion study show`: what is stored, read through
//! the archive's query engine (PS3.4 §C.2.2.2 matching, the same one C-FIND
//! and QIDO-RS use) over the index. Every use is a query of patient data and
//! is recorded as a `query.find` event with actor `cli` (an audit trail Query
//! message, PS3.15 A.5.3), the filters as its private query.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use bastion_archive::{
    query::{FindOptions, Level, Model, Query, QueryIdentifier},
    Archive, ArchiveError,
};
use clap::Subcommand;
use dicom_core::{value::PrimitiveValue, DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use serde::Serialize;

use crate::{config::Config, datadir::DataDir};

/// Prints one line to standard output with every control character of the
/// text (ESC, CR, LF, BEL… from patient data) shown as `\u{…}`: a stored
/// value cannot drive the administrator's terminal or fake a row. A closed
/// pipe (`study list | head`) ends the command quietly.
macro_rules! out {
    () => { $crate::study_cli::write_line(String::new()) };
    ($($arg:tt)*) => { $crate::study_cli::write_line(format!($($arg)*)) };
}

/// JSON (which escapes control characters itself) as it is, ending the
/// command quietly on a closed pipe.
fn write_raw(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{text}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

/// The line of [`out!`], written.
pub(crate) fn write_line(line: String) {
    use std::io::Write;
    let safe: String = line
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect();
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{safe}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

/// The actor named in the events of these commands.
const ACTOR: &str = "cli";

/// At most this many matching entities per command: the query engine
/// refuses more (narrow the filters) rather than reading without bound.
const MAX_MATCHES: usize = 200_000;

/// `bastion study …`.
#[derive(Debug, Subcommand)]
pub enum StudyCommand {
    /// List stored studies, newest first (Study Date, Study Time). Filters
    /// match like C-FIND keys (PS3.4 §C.2.2.2): exact values, `*`/`?`
    /// wildcards in names, date ranges.
    List {
        /// Patient ID (exact; `*`/`?` wildcards allowed).
        #[arg(long, value_name = "ID")]
        patient_id: Option<String>,
        /// Patient's Name, with `*` and `?` wildcards, case-insensitive
        /// (e.g. `'DOE*'`, `'*^JANE'`).
        #[arg(long, value_name = "PATTERN")]
        name: Option<String>,
        /// Study Date: YYYYMMDD, or a range YYYYMMDD-YYYYMMDD, -YYYYMMDD,
        /// YYYYMMDD-.
        #[arg(long, value_name = "YYYYMMDD[-YYYYMMDD]")]
        date: Option<String>,
        /// Accession Number (exact; `*`/`?` wildcards allowed).
        #[arg(long, value_name = "A")]
        accession: Option<String>,
        /// JSON output: an array of {study_instance_uid, patient_id,
        /// patient_name, study_date, study_time, accession_number,
        /// study_description, modalities, series, instances}.
        #[arg(long)]
        json: bool,
    },
    /// Show one study: its series (number, modality, description, Series
    /// Instance UID, instance count) and their instances (SOP Instance UID,
    /// SOP Class UID, instance number). Exit 1 when no such study is stored.
    Show {
        /// Study Instance UID.
        study_uid: String,
        /// JSON output: the study's fields as in `list`, with `series`
        /// an array of {series_instance_uid, series_number, modality,
        /// series_description, instances: [{sop_instance_uid,
        /// sop_class_uid, instance_number}]}.
        #[arg(long)]
        json: bool,
    },
}

/// One study, as `study list` prints it.
#[derive(Debug, Serialize)]
pub(crate) struct StudyRow {
    study_instance_uid: String,
    patient_id: String,
    patient_name: String,
    study_date: String,
    study_time: String,
    accession_number: String,
    study_description: String,
    modalities: Vec<String>,
    series: u64,
    instances: u64,
}

/// One series of `study show`.
#[derive(Debug, Serialize)]
struct SeriesRow {
    series_instance_uid: String,
    series_number: Option<i64>,
    modality: String,
    series_description: String,
    instances: Vec<InstanceRow>,
}

/// One instance of `study show`.
#[derive(Debug, Serialize)]
struct InstanceRow {
    sop_instance_uid: String,
    sop_class_uid: String,
    instance_number: Option<i64>,
}

/// Runs `bastion study …`.
pub fn study(dir: &DataDir, cmd: StudyCommand) -> Result<ExitCode> {
    dir.require_initialised()?;
    dir.check_secret_permissions()?;
    let config = Config::load(&dir.config())?;
    let master = dir.load_master_key()?;
    let archive = dir.open_archive(&master, &config)?;
    match cmd {
        StudyCommand::List {
            patient_id,
            name,
            date,
            accession,
            json,
        } => {
            let filters = [
                (tags::PATIENT_ID, VR::LO, "PatientID", patient_id),
                (tags::PATIENT_NAME, VR::PN, "PatientName", name),
                (tags::STUDY_DATE, VR::DA, "StudyDate", date),
                (tags::ACCESSION_NUMBER, VR::SH, "AccessionNumber", accession),
            ];
            // Newest first: the query engine's order for study matches.
            let studies = list(&archive, &config, &filters)?;
            if json {
                write_raw(&serde_json::to_string_pretty(&studies)?);
            } else if studies.is_empty() {
                out!("no study matches");
            } else {
                print_studies(&studies);
            }
            Ok(ExitCode::SUCCESS)
        }
        StudyCommand::Show { study_uid, json } => show(&archive, &config, &study_uid, json),
    }
}

/// The studies matching `filters` (tag, VR, QIDO-RS keyword for the audit
/// trail's query text, value), in index order (`bastion migrate` compares
/// these answers between the source and the destination).
pub(crate) fn list(
    archive: &Archive,
    config: &Config,
    filters: &[(Tag, VR, &str, Option<String>)],
) -> Result<Vec<StudyRow>> {
    let mut id = identifier(Level::Study);
    let mut text = Vec::new();
    for (tag, vr, keyword, value) in filters {
        match value {
            Some(v) => {
                put(&mut id, *tag, *vr, v);
                text.push(format!("{keyword}={v}"));
            }
            None => put(&mut id, *tag, *vr, ""),
        }
    }
    for (tag, vr) in [
        (tags::STUDY_INSTANCE_UID, VR::UI),
        (tags::STUDY_TIME, VR::TM),
        (tags::STUDY_DESCRIPTION, VR::LO),
        (tags::MODALITIES_IN_STUDY, VR::CS),
        (tags::NUMBER_OF_STUDY_RELATED_SERIES, VR::IS),
        (tags::NUMBER_OF_STUDY_RELATED_INSTANCES, VR::IS),
    ] {
        if !filters.iter().any(|(t, ..)| *t == tag) {
            put(&mut id, tag, vr, "");
        }
    }
    let query = Query::parse(&id, Model::StudyRoot, false).map_err(query_error)?;
    let mut out = Vec::new();
    run(archive, config, &query, text.join("&"), |r| {
        out.push(StudyRow {
            study_instance_uid: text_of(r, tags::STUDY_INSTANCE_UID),
            patient_id: text_of(r, tags::PATIENT_ID),
            patient_name: text_of(r, tags::PATIENT_NAME),
            study_date: text_of(r, tags::STUDY_DATE),
            study_time: text_of(r, tags::STUDY_TIME),
            accession_number: text_of(r, tags::ACCESSION_NUMBER),
            study_description: text_of(r, tags::STUDY_DESCRIPTION),
            modalities: text_of(r, tags::MODALITIES_IN_STUDY)
                .split('\\')
                .map(|m| m.trim().to_owned())
                .filter(|m| !m.is_empty())
                .collect(),
            series: count_of(r, tags::NUMBER_OF_STUDY_RELATED_SERIES),
            instances: count_of(r, tags::NUMBER_OF_STUDY_RELATED_INSTANCES),
        });
    })?;
    Ok(out)
}

/// `study show`: one relational IMAGE-level query (PS3.4 §C.4.1.3) on the
/// Study Instance UID gives the study, its series and instances in one
/// recorded query.
fn show(archive: &Archive, config: &Config, study_uid: &str, json: bool) -> Result<ExitCode> {
    let Ok(uid) = bastion_model::Uid::parse(study_uid.trim()) else {
        eprintln!(
            "error: {study_uid:?} is not a valid Study Instance UID (digits and dots, PS3.5 9.1)"
        );
        return Ok(ExitCode::from(1));
    };
    let mut id = identifier(Level::Instance);
    put(&mut id, tags::STUDY_INSTANCE_UID, VR::UI, uid.as_str());
    for (tag, vr) in [
        (tags::PATIENT_ID, VR::LO),
        (tags::PATIENT_NAME, VR::PN),
        (tags::STUDY_DATE, VR::DA),
        (tags::STUDY_TIME, VR::TM),
        (tags::ACCESSION_NUMBER, VR::SH),
        (tags::STUDY_DESCRIPTION, VR::LO),
        (tags::SERIES_INSTANCE_UID, VR::UI),
        (tags::SERIES_NUMBER, VR::IS),
        (tags::MODALITY, VR::CS),
        (tags::SERIES_DESCRIPTION, VR::LO),
        (tags::SOP_INSTANCE_UID, VR::UI),
        (tags::SOP_CLASS_UID, VR::UI),
        (tags::INSTANCE_NUMBER, VR::IS),
    ] {
        put(&mut id, tag, vr, "");
    }
    let query = Query::parse(&id, Model::StudyRoot, true).map_err(query_error)?;
    let mut study: Option<StudyRow> = None;
    let mut series: Vec<SeriesRow> = Vec::new();
    run(
        archive,
        config,
        &query,
        format!("StudyInstanceUID={uid}"),
        |r| {
            let s = study.get_or_insert_with(|| StudyRow {
                study_instance_uid: text_of(r, tags::STUDY_INSTANCE_UID),
                patient_id: text_of(r, tags::PATIENT_ID),
                patient_name: text_of(r, tags::PATIENT_NAME),
                study_date: text_of(r, tags::STUDY_DATE),
                study_time: text_of(r, tags::STUDY_TIME),
                accession_number: text_of(r, tags::ACCESSION_NUMBER),
                study_description: text_of(r, tags::STUDY_DESCRIPTION),
                modalities: Vec::new(),
                series: 0,
                instances: 0,
            });
            s.instances += 1;
            let series_uid = text_of(r, tags::SERIES_INSTANCE_UID);
            let i = match series
                .iter()
                .position(|x| x.series_instance_uid == series_uid)
            {
                Some(i) => i,
                None => {
                    series.push(SeriesRow {
                        series_instance_uid: series_uid,
                        series_number: int_of(r, tags::SERIES_NUMBER),
                        modality: text_of(r, tags::MODALITY),
                        series_description: text_of(r, tags::SERIES_DESCRIPTION),
                        instances: Vec::new(),
                    });
                    series.len() - 1
                }
            };
            series[i].instances.push(InstanceRow {
                sop_instance_uid: text_of(r, tags::SOP_INSTANCE_UID),
                sop_class_uid: text_of(r, tags::SOP_CLASS_UID),
                instance_number: int_of(r, tags::INSTANCE_NUMBER),
            });
        },
    )?;
    let Some(mut study) = study else {
        eprintln!(
            "error: no study with Study Instance UID {uid} is stored (see `bastion study list`)"
        );
        return Ok(ExitCode::from(1));
    };
    // Series by number (then UID), instances by number (then UID); no
    // number sorts last.
    let key = |n: Option<i64>| n.unwrap_or(i64::MAX);
    series.sort_by(|a, b| {
        (key(a.series_number), &a.series_instance_uid)
            .cmp(&(key(b.series_number), &b.series_instance_uid))
    });
    for s in &mut series {
        s.instances.sort_by(|a, b| {
            (key(a.instance_number), &a.sop_instance_uid)
                .cmp(&(key(b.instance_number), &b.sop_instance_uid))
        });
    }
    let mut modalities: Vec<String> = series
        .iter()
        .map(|s| s.modality.clone())
        .filter(|m| !m.is_empty())
        .collect();
    modalities.sort();
    modalities.dedup();
    study.modalities = modalities;
    study.series = series.len() as u64;
    if json {
        let mut v = serde_json::to_value(&study)?;
        v["series"] = serde_json::to_value(&series)?;
        write_raw(&serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    out!("Study Instance UID  {}", study.study_instance_uid);
    out!("Patient ID          {}", dash(&study.patient_id));
    out!("Patient's Name      {}", dash(&study.patient_name));
    out!(
        "Study Date/Time     {} {}",
        dash(&study.study_date),
        study.study_time
    );
    out!("Accession Number    {}", dash(&study.accession_number));
    out!("Study Description   {}", dash(&study.study_description));
    out!("{} series, {} instances", series.len(), study.instances);
    for s in &series {
        out!();
        out!(
            "Series {}  {}  {}  {}  ({} instances)",
            s.series_number
                .map_or_else(|| "-".to_owned(), |n| n.to_string()),
            dash(&s.modality),
            dash(&s.series_description),
            s.series_instance_uid,
            s.instances.len()
        );
        for i in &s.instances {
            out!(
                "  {:>6}  {}  {}",
                i.instance_number
                    .map_or_else(|| "-".to_owned(), |n| n.to_string()),
                i.sop_instance_uid,
                i.sop_class_uid
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `query` through [`Archive::find_local`] (recorded with actor `cli`
/// and `text` as the query for the audit trail), handing each response to
/// `each`.
fn run(
    archive: &Archive,
    config: &Config,
    query: &Query,
    text: String,
    mut each: impl FnMut(&InMemDicomObject),
) -> Result<()> {
    let opts = FindOptions {
        ae: String::new(),
        peer: String::new(),
        retrieve_ae: config.dicom.ae_title.clone(),
        max_matches: MAX_MATCHES,
        identifier: Some(QueryIdentifier {
            bytes: text.into_bytes(),
            transfer_syntax: None,
        }),
    };
    match archive.find_local(query, &opts, ACTOR, &mut |r| {
        each(&r.identifier);
        true
    }) {
        Ok(_) => Ok(()),
        Err(ArchiveError::TooManyMatches { limit }) => {
            bail!("more than {limit} matches: narrow the query (--patient-id, --name, --date, --accession)")
        }
        Err(e) => Err(e).context("query failed"),
    }
}

/// An empty identifier at `level` (Query/Retrieve Level set).
fn identifier(level: Level) -> InMemDicomObject {
    let mut id = InMemDicomObject::new_empty();
    put(
        &mut id,
        tags::QUERY_RETRIEVE_LEVEL,
        VR::CS,
        bastion_archive::query::level_name(level),
    );
    id
}

fn put(id: &mut InMemDicomObject, tag: Tag, vr: VR, value: &str) {
    id.put(if value.is_empty() {
        DataElement::new(tag, vr, PrimitiveValue::Empty)
    } else {
        DataElement::new(tag, vr, PrimitiveValue::from(value))
    });
}

/// A filter the query engine refused (e.g. a malformed date), as the
/// operator's error.
fn query_error(e: ArchiveError) -> anyhow::Error {
    anyhow::anyhow!("invalid filter: {e}")
}

/// The text of `tag` in a response (trailing padding removed; multiple
/// values joined with `\`).
fn text_of(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches([' ', '\0']).to_owned())
        .unwrap_or_default()
}

fn int_of(obj: &InMemDicomObject, tag: Tag) -> Option<i64> {
    text_of(obj, tag).trim().parse().ok()
}

/// A computed count (IS) of a response; 0 when absent or malformed.
fn count_of(obj: &InMemDicomObject, tag: Tag) -> u64 {
    text_of(obj, tag).trim().parse().unwrap_or(0)
}

fn print_studies(studies: &[StudyRow]) {
    out!(
        "{:<10} {:<16} {:<24} {:<12} {:<10} {:>6} {:>9}  {:<24} STUDY INSTANCE UID",
        "DATE",
        "PATIENT ID",
        "PATIENT'S NAME",
        "ACCESSION",
        "MODALITY",
        "SERIES",
        "INSTANCES",
        "DESCRIPTION"
    );
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    for s in studies {
        out!(
            "{:<10} {:<16} {:<24} {:<12} {:<10} {:>6} {:>9}  {:<24} {}",
            dash(&s.study_date),
            dash(&s.patient_id),
            dash(&s.patient_name),
            dash(&s.accession_number),
            dash(&s.modalities.join(",")),
            s.series,
            s.instances,
            dash(&s.study_description),
            s.study_instance_uid
        );
    }
}
