//! Read access for the query engine (C-FIND, later QIDO-RS and retrieval).
//!
//! The index does no DICOM matching: [`Index::scan`] walks the entities of one level
//! with their ancestors' attributes, optionally narrowed by exact-value
//! [`Prefilter`]s on indexed columns, and the caller (the archive's query engine,
//! which implements PS3.4 §C.2.2.2) decides what matches. The other methods compute
//! the per-entity counts that Q/R returns (PS3.4 §C.3.4, Table C.3-x "Number of ...
//! Related ...") and list the instances below an entity for retrieval.

use rusqlite::params_from_iter;

use crate::{
    sql_err, to_u64, Conn, Index, IndexError, InstanceAttrs, PatientAttrs, SeriesAttrs,
    StoredInstance, StudyAttrs,
};

/// A level of the patient / study / series / instance hierarchy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    /// Patients.
    Patient,
    /// Studies.
    Study,
    /// Series.
    Series,
    /// Instances (Q/R level IMAGE).
    Instance,
}

/// An indexed text column a [`Prefilter`] can narrow on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Column {
    /// `patients.patient_id`.
    PatientId,
    /// `patients.issuer_of_patient_id`.
    IssuerOfPatientId,
    /// `patients.patient_name`.
    PatientName,
    /// `studies.study_instance_uid`.
    StudyInstanceUid,
    /// `studies.accession_number`.
    AccessionNumber,
    /// `studies.study_id`.
    StudyId,
    /// `studies.study_date`.
    StudyDate,
    /// `series.series_instance_uid`.
    SeriesInstanceUid,
    /// `series.modality`.
    Modality,
    /// `instances.sop_instance_uid`.
    SopInstanceUid,
    /// `instances.sop_class_uid`.
    SopClassUid,
}

impl Column {
    fn sql(self) -> &'static str {
        match self {
            Column::PatientId => "p.patient_id",
            Column::IssuerOfPatientId => "p.issuer_of_patient_id",
            Column::PatientName => "p.patient_name",
            Column::StudyInstanceUid => "st.study_instance_uid",
            Column::AccessionNumber => "st.accession_number",
            Column::StudyId => "st.study_id",
            Column::StudyDate => "st.study_date",
            Column::SeriesInstanceUid => "se.series_instance_uid",
            Column::Modality => "se.modality",
            Column::SopInstanceUid => "i.sop_instance_uid",
            Column::SopClassUid => "i.sop_class_uid",
        }
    }

    /// The level whose table holds the column.
    pub fn level(self) -> Level {
        match self {
            Column::PatientId | Column::IssuerOfPatientId | Column::PatientName => Level::Patient,
            Column::StudyInstanceUid
            | Column::AccessionNumber
            | Column::StudyId
            | Column::StudyDate => Level::Study,
            Column::SeriesInstanceUid | Column::Modality => Level::Series,
            Column::SopInstanceUid | Column::SopClassUid => Level::Instance,
        }
    }
}

/// How a [`Prefilter`] narrows a column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Equals one of the values exactly (byte-wise, case-sensitive). An empty
    /// list matches nothing.
    AnyOf(Vec<String>),
    /// Lies in the inclusive range of fixed-width digit strings (DA
    /// `YYYYMMDD`; either end open, PS3.4 C.2.2.2.5). Stored values that are
    /// not plain digits of the bound's width are kept for the matcher.
    Range(Option<String>, Option<String>),
    /// Starts with one of the (ASCII) prefixes, compared case-insensitively
    /// (PN wildcard keys such as `DOE^J*`). Stored values with several values
    /// (`\`) or component groups (`=`) are kept for the matcher.
    PrefixNoCase(Vec<String>),
}

/// Narrows a scan in SQL before the caller's matcher runs. A prefilter must
/// never exclude a row the caller's matcher would accept: it is an
/// optimisation, not the matching rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prefilter {
    /// The column.
    pub column: Column,
    /// The condition.
    pub filter: Filter,
}

/// Row ids of one entity and its ancestors (`None` below the scanned level).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EntityIds {
    /// Patient row id.
    pub patient: i64,
    /// Study row id.
    pub study: Option<i64>,
    /// Series row id.
    pub series: Option<i64>,
    /// Instance row id.
    pub instance: Option<i64>,
}

/// One entity of the scanned level with its ancestors' attributes. Attributes of
/// levels below the scanned one are left at their defaults. Of the instance, only the
/// attributes C-FIND can return are read (`transfer_syntax_uid` is filled, blob data
/// is not part of a row).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EntityRow {
    /// Row ids.
    pub ids: EntityIds,
    /// Patient attributes.
    pub patient: PatientAttrs,
    /// Study attributes (level ≥ study).
    pub study: StudyAttrs,
    /// Series attributes (level ≥ series).
    pub series: SeriesAttrs,
    /// Instance attributes (level instance).
    pub instance: InstanceAttrs,
}

/// Counts below one patient (PS3.4 Number of Patient Related Studies/Series/Instances).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PatientCounts {
    /// Studies of the patient.
    pub studies: u64,
    /// Series of the patient.
    pub series: u64,
    /// Instances of the patient.
    pub instances: u64,
}

/// Counts and modalities below one study.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StudyCounts {
    /// Series of the study.
    pub series: u64,
    /// Instances of the study.
    pub instances: u64,
    /// Distinct non-empty Modality values of its series, sorted.
    pub modalities: Vec<String>,
    /// Distinct non-empty SOP Class UIDs of its instances, sorted.
    pub sop_classes: Vec<String>,
}

/// Rows of `(study row id, value)` from `sql`, whose parameters are `ids`.
fn pairs<T: rusqlite::types::FromSql>(
    conn: &rusqlite::Connection,
    sql: &str,
    ids: &[i64],
) -> Result<Vec<(i64, T)>, IndexError> {
    let mut stmt = conn.prepare(sql).map_err(sql_err("study counts"))?;
    let rows = stmt
        .query_map(params_from_iter(ids.iter()), |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(sql_err("study counts"))?;
    rows.collect::<Result<_, _>>()
        .map_err(sql_err("study counts"))
}

/// The WHERE clause of the partial index `studies_study_date_noncanonical`
/// (schema V3), verbatim: study dates that are not exactly 8 digits.
const NONCANONICAL_DATE: &str = "length(study_date) != 8 OR study_date GLOB '*[^0-9]*'";

const PATIENT_COLS: &str = "p.id, p.patient_id, p.issuer_of_patient_id, p.patient_name,
    p.patient_birth_date, p.patient_sex";
const STUDY_COLS: &str = "st.id, st.study_instance_uid, st.study_date, st.study_time,
    st.accession_number, st.study_id, st.study_description, st.referring_physician_name,
    st.sequences";
const SERIES_COLS: &str = "se.id, se.series_instance_uid, se.modality, se.series_number,
    se.series_description, se.body_part_examined, se.sequences";
const INSTANCE_COLS: &str = r#"i.id, i.sop_instance_uid, i.sop_class_uid, i.instance_number,
    i.transfer_syntax_uid, i."rows", i."columns", i.number_of_frames,
    i.specific_character_set, i.acquisition_date_time"#;

fn scan_sql(level: Level, prefilters: &[Prefilter]) -> (String, Vec<String>) {
    let (cols, from, order) = match level {
        Level::Patient => (PATIENT_COLS.to_owned(), "patients p", "p.id"),
        Level::Study => (
            format!("{PATIENT_COLS}, {STUDY_COLS}"),
            "studies st JOIN patients p ON p.id = st.patient_ref",
            "st.id",
        ),
        Level::Series => (
            format!("{PATIENT_COLS}, {STUDY_COLS}, {SERIES_COLS}"),
            "series se JOIN studies st ON st.id = se.study_ref
             JOIN patients p ON p.id = st.patient_ref",
            "se.id",
        ),
        Level::Instance => (
            format!("{PATIENT_COLS}, {STUDY_COLS}, {SERIES_COLS}, {INSTANCE_COLS}"),
            "instances i JOIN series se ON se.id = i.series_ref
             JOIN studies st ON st.id = se.study_ref
             JOIN patients p ON p.id = st.patient_ref",
            "i.id",
        ),
    };
    let mut sql = format!("SELECT {cols} FROM {from}");
    let mut args = Vec::new();
    let mut first = true;
    for f in prefilters.iter().filter(|f| f.column.level() <= level) {
        sql.push_str(if first { " WHERE " } else { " AND " });
        first = false;
        let col = f.column.sql();
        match &f.filter {
            Filter::Range(lo, hi)
                if f.column == Column::StudyDate
                    && lo.as_ref().or(hi.as_ref()).is_some_and(|v| v.len() == 8)
                    && lo.iter().chain(hi.iter()).all(|v| v.len() == 8) =>
            {
                // Indexed both ways (schema V3): canonical dates in range, plus every
                // non-canonical value for the matcher to decide.
                sql.push_str("st.id IN (SELECT id FROM studies WHERE 1");
                if let Some(lo) = lo {
                    sql.push_str(" AND study_date >= ?");
                    args.push(lo.clone());
                }
                if let Some(hi) = hi {
                    sql.push_str(" AND study_date <= ?");
                    args.push(hi.clone());
                }
                sql.push_str(" AND length(study_date) = 8 AND study_date NOT GLOB '*[^0-9]*'");
                sql.push_str(
                    " UNION ALL SELECT id FROM studies INDEXED BY studies_study_date_noncanonical WHERE ",
                );
                sql.push_str(NONCANONICAL_DATE);
                sql.push(')');
            }
            Filter::Range(lo, hi) => {
                let width = lo.as_ref().or(hi.as_ref()).map_or(0, String::len);
                // Non-canonical stored values stay in for the matcher.
                sql.push_str(&format!(
                    "(length({col}) != {width} OR {col} GLOB '*[^0-9]*' OR (1"
                ));
                if let Some(lo) = lo {
                    sql.push_str(&format!(" AND {col} >= ?"));
                    args.push(lo.clone());
                }
                if let Some(hi) = hi {
                    sql.push_str(&format!(" AND {col} <= ?"));
                    args.push(hi.clone());
                }
                sql.push_str("))");
            }
            Filter::PrefixNoCase(prefixes) => {
                // LIKE is case-insensitive for ASCII; `\` escapes % and _.
                sql.push_str(&format!(
                    "(instr({col}, '=') > 0 OR instr({col}, char(92)) > 0"
                ));
                for p in prefixes {
                    sql.push_str(&format!(" OR {col} LIKE ? ESCAPE '\\'"));
                    let escaped: String = p
                        .chars()
                        .flat_map(|c| match c {
                            '%' | '_' | '\\' => vec!['\\', c],
                            c => vec![c],
                        })
                        .collect();
                    args.push(format!("{escaped}%"));
                }
                sql.push(')');
            }
            Filter::AnyOf(values) if values.is_empty() => sql.push('0'),
            Filter::AnyOf(values) => {
                sql.push_str(col);
                sql.push_str(" IN (");
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        sql.push_str(", ");
                    }
                    sql.push('?');
                    args.push(v.clone());
                }
                sql.push(')');
            }
        }
    }
    sql.push_str(" ORDER BY ");
    sql.push_str(order);
    (sql, args)
}

fn read_entity(r: &rusqlite::Row<'_>, level: Level) -> rusqlite::Result<EntityRow> {
    let mut e = EntityRow::default();
    e.ids.patient = r.get(0)?;
    e.patient = PatientAttrs {
        patient_id: r.get(1)?,
        issuer_of_patient_id: r.get(2)?,
        patient_name: r.get(3)?,
        patient_birth_date: r.get(4)?,
        patient_sex: r.get(5)?,
    };
    if level >= Level::Study {
        e.ids.study = Some(r.get(6)?);
        e.study = StudyAttrs {
            study_instance_uid: r.get(7)?,
            study_date: r.get(8)?,
            study_time: r.get(9)?,
            accession_number: r.get(10)?,
            study_id: r.get(11)?,
            study_description: r.get(12)?,
            referring_physician_name: r.get(13)?,
            sequences: r.get(14)?,
        };
    }
    if level >= Level::Series {
        e.ids.series = Some(r.get(15)?);
        e.series = SeriesAttrs {
            series_instance_uid: r.get(16)?,
            modality: r.get(17)?,
            series_number: r.get(18)?,
            series_description: r.get(19)?,
            body_part_examined: r.get(20)?,
            sequences: r.get(21)?,
        };
    }
    if level >= Level::Instance {
        e.ids.instance = Some(r.get(22)?);
        e.instance = InstanceAttrs {
            sop_instance_uid: r.get(23)?,
            sop_class_uid: r.get(24)?,
            instance_number: r.get(25)?,
            transfer_syntax_uid: r.get(26)?,
            rows: r.get(27)?,
            columns: r.get(28)?,
            number_of_frames: r.get(29)?,
            specific_character_set: r.get(30)?,
            acquisition_date_time: r.get(31)?,
        };
    }
    Ok(e)
}

impl Index {
    /// Walks every entity of `level` that passes all `prefilters` (those on columns
    /// below `level` are ignored), in insertion order, calling `each` per row until it
    /// returns `false`. The index lock is held for the walk: keep `each` cheap and
    /// never block in it (collect, then act).
    ///
    /// # Errors
    /// [`IndexError::Sqlite`].
    pub fn scan(
        &self,
        level: Level,
        prefilters: &[Prefilter],
        mut each: impl FnMut(EntityRow) -> bool,
    ) -> Result<(), IndexError> {
        let conn = match self.conn() {
            Conn::Sqlite(c) => c,
            Conn::Postgres(pg) => return pg.scan_any_thread(level, prefilters, &mut each),
        };
        let (sql, args) = scan_sql(level, prefilters);
        let mut stmt = conn.prepare_cached(&sql).map_err(sql_err("query scan"))?;
        let mut rows = stmt
            .query(params_from_iter(args.iter()))
            .map_err(sql_err("query scan"))?;
        while let Some(row) = rows.next().map_err(sql_err("query scan"))? {
            let e = read_entity(row, level).map_err(sql_err("query scan"))?;
            if !each(e) {
                break;
            }
        }
        Ok(())
    }

    /// Studies, series and instances of patient row `patient`.
    ///
    /// # Errors
    /// [`IndexError::Sqlite`], [`IndexError::Corrupt`].
    pub fn patient_counts(&self, patient: i64) -> Result<PatientCounts, IndexError> {
        let conn = match self.conn() {
            Conn::Sqlite(c) => c,
            Conn::Postgres(pg) => return crate::pg::off_runtime(|| pg.patient_counts(patient)),
        };
        let (a, b, c): (i64, i64, i64) = conn
            .prepare_cached(
                "SELECT (SELECT count(*) FROM studies WHERE patient_ref = ?1),
                        (SELECT count(*) FROM series se JOIN studies st ON st.id = se.study_ref
                            WHERE st.patient_ref = ?1),
                        (SELECT count(*) FROM instances i JOIN series se ON se.id = i.series_ref
                            JOIN studies st ON st.id = se.study_ref WHERE st.patient_ref = ?1)",
            )
            .and_then(|mut s| s.query_row([patient], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))))
            .map_err(sql_err("patient counts"))?;
        Ok(PatientCounts {
            studies: to_u64(a, "count")?,
            series: to_u64(b, "count")?,
            instances: to_u64(c, "count")?,
        })
    }

    /// [`study_counts`](Self::study_counts) of many study rows at once: four
    /// statements in one read transaction whatever the number of studies (in
    /// batches of 500 ids), instead of four per study. Rows that no longer
    /// exist get zero counts.
    ///
    /// # Errors
    /// [`IndexError::Sqlite`], [`IndexError::Corrupt`].
    pub fn study_counts_many(
        &self,
        studies: &[i64],
    ) -> Result<std::collections::HashMap<i64, StudyCounts>, IndexError> {
        let mut out: std::collections::HashMap<i64, StudyCounts> = studies
            .iter()
            .map(|s| (*s, StudyCounts::default()))
            .collect();
        let mut conn = match self.conn() {
            Conn::Sqlite(c) => c,
            Conn::Postgres(pg) => return crate::pg::off_runtime(|| pg.study_counts_many(studies)),
        };
        let tx = conn.transaction().map_err(sql_err("study counts"))?;
        for batch in studies.chunks(500) {
            let marks = vec!["?"; batch.len()].join(",");
            let counts = |sql: &str| pairs::<i64>(&tx, sql, batch);
            let strings = |sql: &str| pairs::<String>(&tx, sql, batch);
            for (study, n) in counts(&format!(
                "SELECT study_ref, count(*) FROM series WHERE study_ref IN ({marks}) GROUP BY study_ref"
            ))? {
                if let Some(c) = out.get_mut(&study) {
                    c.series = to_u64(n, "count")?;
                }
            }
            for (study, n) in counts(&format!(
                "SELECT se.study_ref, count(*) FROM instances i JOIN series se ON se.id = i.series_ref
                 WHERE se.study_ref IN ({marks}) GROUP BY se.study_ref"
            ))? {
                if let Some(c) = out.get_mut(&study) {
                    c.instances = to_u64(n, "count")?;
                }
            }
            for (study, m) in strings(&format!(
                "SELECT DISTINCT study_ref, modality FROM series
                 WHERE study_ref IN ({marks}) AND modality <> ''"
            ))? {
                if let Some(c) = out.get_mut(&study) {
                    c.modalities.push(m);
                }
            }
            for (study, m) in strings(&format!(
                "SELECT DISTINCT se.study_ref, i.sop_class_uid FROM instances i
                 JOIN series se ON se.id = i.series_ref
                 WHERE se.study_ref IN ({marks}) AND i.sop_class_uid <> ''"
            ))? {
                if let Some(c) = out.get_mut(&study) {
                    c.sop_classes.push(m);
                }
            }
        }
        tx.commit().map_err(sql_err("study counts"))?;
        for c in out.values_mut() {
            c.modalities.sort();
            c.sop_classes.sort();
        }
        Ok(out)
    }

    /// Series and instance counts, modalities and SOP classes of study row `study`.
    ///
    /// # Errors
    /// [`IndexError::Sqlite`], [`IndexError::Corrupt`].
    pub fn study_counts(&self, study: i64) -> Result<StudyCounts, IndexError> {
        let conn = match self.conn() {
            Conn::Sqlite(c) => c,
            Conn::Postgres(pg) => {
                return Ok(crate::pg::off_runtime(|| pg.study_counts_many(&[study]))?
                    .remove(&study)
                    .unwrap_or_default())
            }
        };
        let (a, b): (i64, i64) = conn
            .prepare_cached(
                "SELECT (SELECT count(*) FROM series WHERE study_ref = ?1),
                        (SELECT count(*) FROM instances i JOIN series se ON se.id = i.series_ref
                            WHERE se.study_ref = ?1)",
            )
            .and_then(|mut s| s.query_row([study], |r| Ok((r.get(0)?, r.get(1)?))))
            .map_err(sql_err("study counts"))?;
        let strings = |sql: &str| -> Result<Vec<String>, IndexError> {
            let mut stmt = conn.prepare_cached(sql).map_err(sql_err("study counts"))?;
            let rows = stmt
                .query_map([study], |r| r.get::<_, String>(0))
                .map_err(sql_err("study counts"))?;
            rows.collect::<Result<_, _>>()
                .map_err(sql_err("study counts"))
        };
        let modalities = strings(
            "SELECT DISTINCT modality FROM series WHERE study_ref = ?1 AND modality <> ''
             ORDER BY modality",
        )?;
        let sop_classes = strings(
            "SELECT DISTINCT i.sop_class_uid FROM instances i JOIN series se ON se.id = i.series_ref
             WHERE se.study_ref = ?1 AND i.sop_class_uid <> '' ORDER BY i.sop_class_uid",
        )?;
        Ok(StudyCounts {
            series: to_u64(a, "count")?,
            instances: to_u64(b, "count")?,
            modalities,
            sop_classes,
        })
    }

    /// Instances of series row `series`.
    ///
    /// # Errors
    /// [`IndexError::Sqlite`], [`IndexError::Corrupt`].
    pub fn series_instance_count(&self, series: i64) -> Result<u64, IndexError> {
        let conn = match self.conn() {
            Conn::Sqlite(c) => c,
            Conn::Postgres(pg) => {
                return crate::pg::off_runtime(|| pg.series_instance_count(series))
            }
        };
        let n: i64 = conn
            .prepare_cached("SELECT count(*) FROM instances WHERE series_ref = ?1")
            .and_then(|mut s| s.query_row([series], |r| r.get(0)))
            .map_err(sql_err("series counts"))?;
        to_u64(n, "count")
    }

    /// Every stored instance at or below the entity `ids` identifies at `level`
    /// (for retrieval: C-MOVE/C-GET sub-operations, WADO-RS), in insertion order.
    ///
    /// # Errors
    /// [`IndexError::Sqlite`], [`IndexError::Corrupt`]; an id missing for `level`
    /// is [`IndexError::Corrupt`].
    pub fn instances_under(
        &self,
        level: Level,
        ids: &EntityIds,
    ) -> Result<Vec<StoredInstance>, IndexError> {
        let missing = || IndexError::Corrupt {
            reason: format!("no row id for level {level:?}"),
        };
        let (cond, id) = match level {
            Level::Patient => ("st.patient_ref = ?1", ids.patient),
            Level::Study => ("st.id = ?1", ids.study.ok_or_else(missing)?),
            Level::Series => ("se.id = ?1", ids.series.ok_or_else(missing)?),
            Level::Instance => ("i.id = ?1", ids.instance.ok_or_else(missing)?),
        };
        let conn = match self.conn() {
            Conn::Sqlite(c) => c,
            Conn::Postgres(pg) => return crate::pg::off_runtime(|| pg.instances_under(cond, id)),
        };
        let sql = format!("{} WHERE {cond} ORDER BY i.id", crate::SELECT_INSTANCE);
        let mut stmt = conn
            .prepare_cached(&sql)
            .map_err(sql_err("list instances"))?;
        let rows = stmt
            .query_map([id], crate::read_row)
            .map_err(sql_err("list instances"))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row.map_err(sql_err("list instances"))?.into_stored()?.0);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefilters_below_the_level_are_ignored_and_empty_lists_match_nothing() {
        let (sql, args) = scan_sql(
            Level::Study,
            &[
                Prefilter {
                    column: Column::StudyInstanceUid,
                    filter: Filter::AnyOf(vec!["1.2".into(), "1.3".into()]),
                },
                Prefilter {
                    column: Column::SopInstanceUid,
                    filter: Filter::AnyOf(vec!["9".into()]),
                },
                Prefilter {
                    column: Column::PatientId,
                    filter: Filter::AnyOf(vec![]),
                },
            ],
        );
        assert!(sql.contains("st.study_instance_uid IN (?, ?)"), "{sql}");
        assert!(!sql.contains("sop_instance_uid"), "{sql}");
        assert!(sql.contains(" AND 0"), "{sql}");
        assert_eq!(args, vec!["1.2".to_owned(), "1.3".to_owned()]);
    }

    /// Acquisition DateTime (schema V4) is written, read back by `scan` at
    /// instance level, updated by a replace and kept with the replaced row.
    #[test]
    fn acquisition_date_time_round_trips() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let idx = Index::open(&dir.path().join("i.db"), &[4u8; 32])?;
        let mut rec = crate::NewInstance::default();
        rec.study.study_instance_uid = "1.2".into();
        rec.series.series_instance_uid = "1.2.3".into();
        rec.instance.sop_instance_uid = "1.2.3.4".into();
        rec.instance.acquisition_date_time = "20110525145628.350000+0100".into();
        rec.content_sha256 = "a".into();
        idx.commit_batch(std::slice::from_ref(&rec))?;
        let read = |idx: &Index| -> Result<Vec<String>, IndexError> {
            let mut got = Vec::new();
            idx.scan(Level::Instance, &[], |e| {
                got.push(e.instance.acquisition_date_time);
                true
            })?;
            Ok(got)
        };
        assert_eq!(read(&idx)?, vec!["20110525145628.350000+0100".to_owned()]);
        rec.instance.acquisition_date_time = "2012".into();
        rec.content_sha256 = "b".into();
        rec.on_conflict = crate::OnConflict::Replace;
        idx.commit_batch(std::slice::from_ref(&rec))?;
        assert_eq!(read(&idx)?, vec!["2012".to_owned()]);
        let kept: String = idx.lock().query_row(
            "SELECT acquisition_date_time FROM replaced_instances",
            [],
            |r| r.get(0),
        )?;
        assert_eq!(kept, "20110525145628.350000+0100");
        Ok(())
    }

    /// An index written at schema V3 (an older data directory) opens, migrates to
    /// V4, and its instances read back with an empty Acquisition DateTime.
    #[test]
    fn v3_index_migrates_with_empty_acquisition_date_time() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("i.db");
        let key = [5u8; 32];
        {
            let conn = rusqlite::Connection::open(&path)?;
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            conn.execute_batch(&format!("PRAGMA key = \"x'{hex}'\";"))?;
            for sql in &crate::schema::MIGRATIONS[..3] {
                conn.execute_batch(sql)?;
            }
            conn.execute_batch(
                "CREATE TABLE schema_version (version INTEGER NOT NULL);
                 INSERT INTO schema_version VALUES (3);
                 INSERT INTO patients VALUES (1, 'P', '', '', 'N', '', '');
                 INSERT INTO studies (id, patient_ref, study_instance_uid, study_date, study_time,
                    accession_number, study_id, study_description, referring_physician_name)
                    VALUES (1, 1, '1.2', '', '', '', '', '', '');
                 INSERT INTO series (id, study_ref, series_instance_uid, modality,
                    series_description, body_part_examined) VALUES (1, 1, '1.2.3', '', '', '');
                 INSERT INTO instances (series_ref, sop_instance_uid, sop_class_uid,
                    transfer_syntax_uid, specific_character_set, blob_id, key_id, stored_size,
                    stored_sha256, content_sha256, source_ae, received_at)
                    VALUES (1, '1.2.3.4', '1.2.840.10008.5.1.4.1.1.7', '', '', 'b', 'k', 1,
                    '', '', '', '');",
            )?;
        }
        let idx = Index::open(&path, &key)?;
        let version: i64 =
            idx.lock()
                .query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))?;
        assert_eq!(version, i64::from(crate::SCHEMA_VERSION));
        let mut got = Vec::new();
        idx.scan(Level::Instance, &[], |e| {
            got.push((
                e.instance.sop_instance_uid,
                e.instance.acquisition_date_time,
            ));
            true
        })?;
        assert_eq!(got, vec![("1.2.3.4".to_owned(), String::new())]);
        Ok(())
    }

    /// A StudyDate range is answered through indexes (the study_date index and
    /// the partial index of non-canonical dates), never a scan of all studies.
    #[test]
    fn study_date_ranges_use_the_indexes() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let idx = Index::open(&dir.path().join("i.db"), &[3u8; 32])?;
        let (sql, args) = scan_sql(
            Level::Study,
            &[Prefilter {
                column: Column::StudyDate,
                filter: Filter::Range(Some("20150101".into()), Some("20150301".into())),
            }],
        );
        let conn = idx.lock();
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
        let plan: Vec<String> = stmt
            .query_map(params_from_iter(args.iter()), |r| r.get::<_, String>(3))?
            .collect::<Result<_, _>>()?;
        let plan = plan.join("\n");
        assert!(plan.contains("studies_study_date "), "{plan}");
        assert!(plan.contains("studies_study_date_noncanonical"), "{plan}");
        // The only scan is of the (small) partial index.
        assert!(
            plan.lines()
                .filter(|l| l.contains("SCAN"))
                .all(|l| l.contains("studies_study_date_noncanonical")),
            "{plan}"
        );
        Ok(())
    }
}
