//! DIMSE status codes (PS3.7 Annex C; PS3.4 B.2.3 for C-STORE) and the one
//! mapping from archive errors to statuses.

use bastion_archive::ArchiveError;

/// A DIMSE status (0000,0900).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(u16);

impl Status {
    /// 0x0000 Success.
    pub const SUCCESS: Status = Status(0x0000);
    /// 0x0111 Duplicate SOP Instance (PS3.7 C.5.x): used for a different
    /// dataset sent under a stored SOP Instance UID.
    pub const DUPLICATE_SOP_INSTANCE: Status = Status(0x0111);
    /// 0x0122 Refused: SOP Class not supported.
    pub const SOP_CLASS_NOT_SUPPORTED: Status = Status(0x0122);
    /// 0x0124 Refused: Not Authorized (PS3.7 C.5.x).
    pub const NOT_AUTHORIZED: Status = Status(0x0124);
    /// 0x0211 Unrecognized operation.
    pub const UNRECOGNIZED_OPERATION: Status = Status(0x0211);
    /// 0xA700 Refused: Out of Resources (PS3.4 B.2.3).
    pub const OUT_OF_RESOURCES: Status = Status(0xA700);
    /// 0xA900 Error: Data Set does not match SOP Class (PS3.4 B.2.3).
    pub const DATASET_DOES_NOT_MATCH_SOP_CLASS: Status = Status(0xA900);
    /// 0xC000 Error: Cannot understand (PS3.4 B.2.3); for C-FIND "Unable to
    /// process" (PS3.4 C.4.1.1.4).
    pub const CANNOT_UNDERSTAND: Status = Status(0xC000);
    /// 0xA900 Failed: Identifier does not match SOP Class (PS3.4 C.4.1.1.4).
    pub const IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS: Status = Status(0xA900);
    /// 0xFE00 Cancel: matching terminated due to Cancel request (PS3.4 C.4.1.1.4).
    pub const CANCEL: Status = Status(0xFE00);
    /// 0xA702 Refused: Out of Resources – Unable to perform sub-operations
    /// (PS3.4 C.4.2.1.5, C.4.3.1.4): used as the final C-MOVE/C-GET status when
    /// every sub-operation failed (destination unreachable, no SCP-role context).
    pub const UNABLE_TO_PERFORM_SUBOPERATIONS: Status = Status(0xA702);
    /// 0xA701 Refused: Out of Resources – Unable to calculate number of
    /// matches (PS3.4 C.4.2.1.5): a C-MOVE refused while the audit trail
    /// cannot record.
    pub const OUT_OF_RESOURCES_MATCHES: Status = Status(0xA701);
    /// 0xA801 Refused: Move Destination unknown (PS3.4 C.4.2.1.5); also used for
    /// a registered destination the requesting device may not move to.
    pub const MOVE_DESTINATION_UNKNOWN: Status = Status(0xA801);
    /// 0xB000 Warning: Sub-operations Complete – One or more Failures or
    /// Warnings (PS3.4 C.4.2.1.5, C.4.3.1.4).
    pub const SUBOPERATIONS_WARNING: Status = Status(0xB000);
    /// 0xFF00 Pending: matches are continuing (PS3.4 C.4.1.1.4); for C-MOVE and
    /// C-GET, sub-operations are continuing.
    pub const PENDING: Status = Status(0xFF00);
    /// 0xFF01 Pending: matches are continuing, but one or more Optional Keys were
    /// not supported (PS3.4 C.4.1.1.4).
    pub const PENDING_WARNING: Status = Status(0xFF01);

    /// The 16-bit code.
    pub fn code(self) -> u16 {
        self.0
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0x{:04X}", self.0)
    }
}

/// The C-STORE-RSP status and Error Comment for an ingest failure. The only
/// place where archive errors become DIMSE statuses.
pub fn for_ingest_error(e: &ArchiveError) -> (Status, String) {
    let status = match e {
        ArchiveError::NotDicom(_) => Status::CANNOT_UNDERSTAND,
        ArchiveError::InvalidDataset(_) => Status::DATASET_DOES_NOT_MATCH_SOP_CLASS,
        ArchiveError::Conflict { .. } => Status::DUPLICATE_SOP_INSTANCE,
        ArchiveError::TooLarge { .. }
        | ArchiveError::Busy { .. }
        | ArchiveError::SpoolFull { .. }
        | ArchiveError::AttributesTooLarge { .. }
        | ArchiveError::NoSpace => Status::OUT_OF_RESOURCES,
        ArchiveError::NotFound(_) | ArchiveError::Internal(_) => Status::OUT_OF_RESOURCES,
        // Nothing was stored; retrying later may succeed (PS3.4 §B.2.3).
        ArchiveError::StoreUnavailable(_) => Status::OUT_OF_RESOURCES,
        ArchiveError::InvalidQuery { .. } => Status::IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
        ArchiveError::TooManyMatches { .. } => Status::OUT_OF_RESOURCES,
    };
    // The Error Comment is an LO of at most 64 characters (PS3.7 C.4):
    // the useful part first. 0xC000 already says "not DICOM", and the
    // SOP Instance UID of a conflict is the response's Affected SOP
    // Instance UID.
    let comment = match e {
        // Internal details stay in the operator log.
        ArchiveError::Internal(_) | ArchiveError::NotFound(_) => {
            "internal error; see the archive log".to_owned()
        }
        ArchiveError::NotDicom(reason) => reason.clone(),
        ArchiveError::Conflict { .. } => {
            "already stored with different content; refused".to_owned()
        }
        // The store's detail stays in the operator log.
        ArchiveError::StoreUnavailable(_) => "image store unavailable; retry later".to_owned(),
        other => other.to_string(),
    };
    (status, comment)
}

/// The final C-FIND-RSP status, Error Comment and Offending Elements for a query
/// failure (PS3.4 C.4.1.1.4): 0xA900 for a refused identifier (with the offending
/// attributes), 0xA700 over `max_matches` ("refine the query"), 0xC000 Unable to
/// process for anything else (details in the operator log).
pub fn for_query_error(e: &ArchiveError) -> (Status, String, Vec<dicom_core::Tag>) {
    match e {
        ArchiveError::InvalidQuery { comment, offending } => (
            Status::IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
            comment.clone(),
            offending.clone(),
        ),
        ArchiveError::TooManyMatches { .. } => (Status::OUT_OF_RESOURCES, e.to_string(), vec![]),
        _ => (
            Status::CANNOT_UNDERSTAND,
            "unable to process the query; see the archive log".to_owned(),
            vec![],
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingest_error_comments_lead_with_the_reason() {
        let (st, c) = for_ingest_error(&ArchiveError::NotDicom(
            "malformed dataset: declared length 200 of (0010,0020) past the end".into(),
        ));
        assert_eq!(st, Status::CANNOT_UNDERSTAND);
        assert!(
            c.starts_with("malformed dataset: declared length 200"),
            "{c}"
        );
        let (st, c) = for_ingest_error(&ArchiveError::Conflict {
            sop_instance_uid: bastion_model::Uid::parse("1.2.3").expect("uid"),
        });
        assert_eq!(st, Status::DUPLICATE_SOP_INSTANCE);
        assert!(c.len() <= 64 && c.contains("different content"), "{c}");
        let (_, c) = for_ingest_error(&ArchiveError::Internal("/data/x Doe^John".into()));
        assert_eq!(c, "internal error; see the archive log");
        let (st, c) = for_ingest_error(&ArchiveError::StoreUnavailable(
            "object store s3://b at http://127.0.0.1:1 unavailable".into(),
        ));
        assert_eq!(st, Status::OUT_OF_RESOURCES);
        assert_eq!(c, "image store unavailable; retry later");
    }
}
