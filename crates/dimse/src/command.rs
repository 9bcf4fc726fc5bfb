//! Typed DIMSE command sets (PS3.7 §9.3 and Annex E).
//!
//! dicom-rs has no DIMSE layer: this module encodes and decodes the command
//! group (0000,xxxx), always Implicit VR Little Endian (PS3.7 §6.3.1), with
//! dicom-object doing the element encoding.

use bastion_archive::scan::{self, Encoding, ScanLimits};
use dicom_core::{dicom_value, DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;

use crate::status::Status;

/// Command Field values (PS3.7 Table E.1-1).
pub mod field {
    /// C-STORE-RQ.
    pub const C_STORE_RQ: u16 = 0x0001;
    /// C-STORE-RSP.
    pub const C_STORE_RSP: u16 = 0x8001;
    /// C-GET-RQ.
    pub const C_GET_RQ: u16 = 0x0010;
    /// C-GET-RSP.
    pub const C_GET_RSP: u16 = 0x8010;
    /// C-FIND-RQ.
    pub const C_FIND_RQ: u16 = 0x0020;
    /// C-FIND-RSP.
    pub const C_FIND_RSP: u16 = 0x8020;
    /// C-MOVE-RQ.
    pub const C_MOVE_RQ: u16 = 0x0021;
    /// C-MOVE-RSP.
    pub const C_MOVE_RSP: u16 = 0x8021;
    /// C-ECHO-RQ.
    pub const C_ECHO_RQ: u16 = 0x0030;
    /// C-ECHO-RSP.
    pub const C_ECHO_RSP: u16 = 0x8030;
    /// C-CANCEL-RQ.
    pub const C_CANCEL_RQ: u16 = 0x0FFF;
}

/// Command Data Set Type value meaning "no dataset" (PS3.7 §E.1).
pub const NO_DATASET: u16 = 0x0101;

/// Largest command set accepted, in bytes (a command group is a few hundred
/// bytes; anything larger is hostile).
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// A request command received from a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// C-ECHO-RQ (PS3.7 §9.3.5.1).
    CEcho {
        /// (0000,0110) Message ID.
        message_id: u16,
        /// (0000,0002) Affected SOP Class UID.
        sop_class: String,
    },
    /// C-STORE-RQ (PS3.7 §9.3.1.1); a dataset follows.
    CStore {
        /// (0000,0110) Message ID.
        message_id: u16,
        /// (0000,0002) Affected SOP Class UID.
        sop_class: String,
        /// (0000,1000) Affected SOP Instance UID.
        sop_instance: String,
    },
    /// C-FIND-RQ (PS3.7 §9.1.2.1); an Identifier follows.
    CFind {
        /// (0000,0110) Message ID.
        message_id: u16,
        /// (0000,0002) Affected SOP Class UID: the Q/R information model.
        sop_class: String,
        /// (0000,0700) Priority: 0 medium, 1 high, 2 low (PS3.7 §9.3.2.1). Bastion
        /// serves requests in arrival order; the value is kept for the log.
        priority: u16,
    },
    /// C-MOVE-RQ (PS3.7 §9.1.4.1); an Identifier follows.
    CMove {
        /// (0000,0110) Message ID.
        message_id: u16,
        /// (0000,0002) Affected SOP Class UID: the Q/R information model.
        sop_class: String,
        /// (0000,0700) Priority (kept for the log).
        priority: u16,
        /// (0000,0600) Move Destination, as received (trimmed when looked up).
        move_destination: String,
    },
    /// C-GET-RQ (PS3.7 §9.1.3.1); an Identifier follows.
    CGet {
        /// (0000,0110) Message ID.
        message_id: u16,
        /// (0000,0002) Affected SOP Class UID: the Q/R information model.
        sop_class: String,
        /// (0000,0700) Priority (kept for the log).
        priority: u16,
    },
    /// C-STORE-RSP (PS3.7 §9.3.1.2) answering one of our C-GET sub-operations.
    CStoreRsp {
        /// (0000,0120) Message ID Being Responded To.
        message_id_being_responded_to: u16,
        /// (0000,0900) Status.
        status: u16,
    },
    /// C-CANCEL-RQ (PS3.7 §9.3.2.3): cancels the operation whose Message ID it names.
    CCancel {
        /// (0000,0120) Message ID Being Responded To.
        message_id_being_responded_to: u16,
    },
    /// Any other command: answered "unrecognized operation" or "not
    /// authorized" according to the device's permissions.
    Other {
        /// (0000,0100) Command Field.
        command_field: u16,
        /// (0000,0110) Message ID (0 when absent, e.g. C-CANCEL-RQ).
        message_id: u16,
        /// (0000,0002) Affected SOP Class UID, may be empty.
        sop_class: String,
        /// Whether a dataset follows.
        has_dataset: bool,
    },
}

impl Request {
    /// Whether a dataset follows this command (Command Data Set Type).
    pub fn has_dataset(&self) -> bool {
        match self {
            Request::CEcho { .. } => false,
            Request::CStore { .. }
            | Request::CFind { .. }
            | Request::CMove { .. }
            | Request::CGet { .. } => true,
            Request::CCancel { .. } | Request::CStoreRsp { .. } => false,
            Request::Other { has_dataset, .. } => *has_dataset,
        }
    }
}

/// A response command we send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// (0000,0100) Command Field of the response.
    pub command_field: u16,
    /// (0000,0120) Message ID Being Responded To.
    pub message_id: u16,
    /// (0000,0002) Affected SOP Class UID.
    pub sop_class: String,
    /// (0000,1000) Affected SOP Instance UID, for C-STORE-RSP.
    pub sop_instance: Option<String>,
    /// (0000,0900) Status.
    pub status: Status,
    /// (0000,0902) Error Comment (≤ 64 characters, PS3.7 §C.4).
    pub error_comment: Option<String>,
    /// (0000,0901) Offending Element: the attributes at fault (PS3.7 §C.4.2).
    pub offending_elements: Vec<Tag>,
    /// Whether a dataset (C-FIND Identifier) follows: Command Data Set Type is then
    /// 0x0000 instead of 0x0101 (PS3.7 §E.1).
    pub dataset_follows: bool,
    /// Sub-operation counts of a C-MOVE-RSP / C-GET-RSP (PS3.7 §9.3.3.2, §9.3.4.2).
    pub sub_operations: Option<SubOperations>,
}

/// Sub-operation counts (0000,1020)–(0000,1023) of a C-MOVE-RSP or C-GET-RSP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubOperations {
    /// (0000,1020) Number of Remaining Sub-operations: present in pending and
    /// cancel responses only (PS3.7 §9.3.3.2).
    pub remaining: Option<u16>,
    /// (0000,1021) Number of Completed Sub-operations.
    pub completed: u16,
    /// (0000,1022) Number of Failed Sub-operations.
    pub failed: u16,
    /// (0000,1023) Number of Warning Sub-operations.
    pub warning: u16,
}

/// A command set that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed DIMSE command: {0}")]
pub struct CommandError(pub String);

fn uid_of(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
        .unwrap_or_default()
}

fn u16_of(obj: &InMemDicomObject, tag: Tag) -> Option<u16> {
    obj.get(tag).and_then(|e| e.to_int::<u16>().ok())
}

/// Decodes a command set (PS3.7 §6.3.1, Implicit VR LE).
///
/// # Errors
/// [`CommandError`] when the bytes are oversized, malformed, or lack the
/// Command Field.
pub fn decode(bytes: &[u8]) -> Result<Request, CommandError> {
    if bytes.len() > MAX_COMMAND_BYTES {
        return Err(CommandError(format!(
            "command set of {} bytes exceeds {MAX_COMMAND_BYTES}",
            bytes.len()
        )));
    }
    let report = scan::scan(
        bytes,
        Encoding {
            explicit_vr: false,
            little_endian: true,
        },
        ScanLimits {
            max_element_len: MAX_COMMAND_BYTES as u64,
            max_depth: 0,
        },
        Some(0x0000),
    )
    .map_err(|e| CommandError(e.to_string()))?;
    // The scan stops at the first element of another group, so what follows
    // was not bounds-checked: a command set holds group 0000 only (PS3.7
    // §6.3.1), refuse it rather than let the parser allocate its lengths.
    if report.end != bytes.len() {
        return Err(CommandError(format!(
            "element outside the command group (0000,xxxx) at byte offset {}",
            report.end
        )));
    }
    let obj = InMemDicomObject::read_dataset_with_ts(bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .map_err(|e| CommandError(e.to_string()))?;
    let command_field = u16_of(&obj, tags::COMMAND_FIELD)
        .ok_or_else(|| CommandError("no Command Field (0000,0100)".into()))?;
    let message_id = u16_of(&obj, tags::MESSAGE_ID).unwrap_or(0);
    let has_dataset = u16_of(&obj, tags::COMMAND_DATA_SET_TYPE).is_some_and(|t| t != NO_DATASET);
    let sop_class = uid_of(&obj, tags::AFFECTED_SOP_CLASS_UID);
    Ok(match command_field {
        field::C_ECHO_RQ if !has_dataset => Request::CEcho {
            message_id,
            sop_class,
        },
        field::C_STORE_RQ if has_dataset => Request::CStore {
            message_id,
            sop_class,
            sop_instance: uid_of(&obj, tags::AFFECTED_SOP_INSTANCE_UID),
        },
        field::C_FIND_RQ if has_dataset => Request::CFind {
            message_id,
            sop_class,
            priority: u16_of(&obj, tags::PRIORITY).unwrap_or(0),
        },
        field::C_MOVE_RQ if has_dataset => Request::CMove {
            message_id,
            sop_class,
            priority: u16_of(&obj, tags::PRIORITY).unwrap_or(0),
            move_destination: obj
                .get(tags::MOVE_DESTINATION)
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_matches(['\0', ' ']).to_owned())
                .unwrap_or_default(),
        },
        field::C_GET_RQ if has_dataset => Request::CGet {
            message_id,
            sop_class,
            priority: u16_of(&obj, tags::PRIORITY).unwrap_or(0),
        },
        field::C_STORE_RSP if !has_dataset => Request::CStoreRsp {
            message_id_being_responded_to: u16_of(&obj, tags::MESSAGE_ID_BEING_RESPONDED_TO)
                .unwrap_or(0),
            status: u16_of(&obj, tags::STATUS)
                .ok_or_else(|| CommandError("C-STORE-RSP without a Status".into()))?,
        },
        field::C_CANCEL_RQ => Request::CCancel {
            message_id_being_responded_to: u16_of(&obj, tags::MESSAGE_ID_BEING_RESPONDED_TO)
                .unwrap_or(0),
        },
        _ => Request::Other {
            command_field,
            message_id,
            sop_class,
            has_dataset,
        },
    })
}

/// Encodes a response command set with its Command Group Length.
pub fn encode(rsp: &Response) -> Vec<u8> {
    let mut elements = vec![DataElement::new(
        tags::AFFECTED_SOP_CLASS_UID,
        VR::UI,
        PrimitiveValue::from(pad_uid(&rsp.sop_class)),
    )];
    elements.push(DataElement::new(
        tags::COMMAND_FIELD,
        VR::US,
        dicom_value!(U16, [rsp.command_field]),
    ));
    elements.push(DataElement::new(
        tags::MESSAGE_ID_BEING_RESPONDED_TO,
        VR::US,
        dicom_value!(U16, [rsp.message_id]),
    ));
    elements.push(DataElement::new(
        tags::COMMAND_DATA_SET_TYPE,
        VR::US,
        dicom_value!(
            U16,
            [if rsp.dataset_follows {
                0x0000
            } else {
                NO_DATASET
            }]
        ),
    ));
    elements.push(DataElement::new(
        tags::STATUS,
        VR::US,
        dicom_value!(U16, [rsp.status.code()]),
    ));
    if let Some(inst) = &rsp.sop_instance {
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(pad_uid(inst)),
        ));
    }
    if let Some(n) = rsp.sub_operations {
        for (tag, v) in [
            (tags::NUMBER_OF_REMAINING_SUBOPERATIONS, n.remaining),
            (tags::NUMBER_OF_COMPLETED_SUBOPERATIONS, Some(n.completed)),
            (tags::NUMBER_OF_FAILED_SUBOPERATIONS, Some(n.failed)),
            (tags::NUMBER_OF_WARNING_SUBOPERATIONS, Some(n.warning)),
        ] {
            if let Some(v) = v {
                elements.push(DataElement::new(tag, VR::US, dicom_value!(U16, [v])));
            }
        }
    }
    if !rsp.offending_elements.is_empty() {
        elements.push(DataElement::new(
            tags::OFFENDING_ELEMENT,
            VR::AT,
            PrimitiveValue::Tags(rsp.offending_elements.iter().copied().collect()),
        ));
    }
    if let Some(comment) = &rsp.error_comment {
        // LO: at most 64 characters, no backslash or control characters; a
        // longer comment is cut at a word and ends with "...".
        let clean: String = comment
            .chars()
            .filter(|c| !c.is_control() && *c != '\\' && c.is_ascii())
            .collect();
        let clean = bastion_model::cut_lo(&clean);
        let clean = if clean.len() % 2 == 1 {
            format!("{clean} ")
        } else {
            clean
        };
        elements.push(DataElement::new(
            tags::ERROR_COMMENT,
            VR::LO,
            PrimitiveValue::from(clean),
        ));
    }
    // command_from_element_iter computes (0000,0000) Command Group Length.
    let obj = InMemDicomObject::command_from_element_iter(elements);
    let mut out = Vec::new();
    // Writing into a Vec cannot fail for I/O reasons; encoding errors would
    // be a bug in the values above, which are all well-formed.
    if let Err(e) = obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased()) {
        tracing::error!(error = %e, "cannot encode a DIMSE response");
    }
    out
}

/// Largest C-FIND identifier accepted, bytes.
pub const MAX_IDENTIFIER_BYTES: usize = 1024 * 1024;

/// Decodes a C-FIND Identifier received in transfer syntax `ts_uid`, after a bounds
/// check of every declared length. Text is decoded with the Identifier's own
/// Specific Character Set (0008,0005) (dicom-rs honours single-valued sets; with a
/// multi-valued or ISO 2022 set, `Query::parse` re-decodes the text with
/// `bastion_archive::charset`).
///
/// # Errors
/// [`CommandError`] when the transfer syntax is unknown or the bytes are oversized
/// or malformed.
pub fn decode_identifier(bytes: &[u8], ts_uid: &str) -> Result<InMemDicomObject, CommandError> {
    use dicom_encoding::TransferSyntaxIndex;
    if bytes.len() > MAX_IDENTIFIER_BYTES {
        return Err(CommandError(format!(
            "identifier of {} bytes exceeds {MAX_IDENTIFIER_BYTES}",
            bytes.len()
        )));
    }
    let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get(ts_uid.trim_end_matches(['\0', ' ']))
        .ok_or_else(|| CommandError("unknown transfer syntax".into()))?;
    let uid = ts.uid();
    if matches!(uid, "1.2.840.10008.1.2.1.99" | "1.2.840.10008.1.2.4.95") {
        return Err(CommandError(
            "deflated identifiers are not supported".into(),
        ));
    }
    scan::scan(
        bytes,
        Encoding {
            explicit_vr: uid != "1.2.840.10008.1.2",
            little_endian: ts.endianness() == dicom_encoding::transfer_syntax::Endianness::Little,
        },
        ScanLimits {
            max_element_len: MAX_IDENTIFIER_BYTES as u64,
            max_depth: 4,
        },
        None,
    )
    .map_err(|e| CommandError(e.to_string()))?;
    InMemDicomObject::read_dataset_with_ts(bytes, ts).map_err(|e| CommandError(e.to_string()))
}

/// Encodes a response Identifier in transfer syntax `ts_uid`; text is written in the
/// character set its (0008,0005) names (UTF-8 for `ISO_IR 192`).
///
/// # Errors
/// [`CommandError`] when the transfer syntax is unknown or encoding fails.
pub fn encode_identifier(obj: &InMemDicomObject, ts_uid: &str) -> Result<Vec<u8>, CommandError> {
    use dicom_encoding::TransferSyntaxIndex;
    let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get(ts_uid.trim_end_matches(['\0', ' ']))
        .ok_or_else(|| CommandError("unknown transfer syntax".into()))?;
    let mut out = Vec::new();
    pad_ui_values(obj)
        .write_dataset_with_ts(&mut out, ts)
        .map_err(|e| CommandError(e.to_string()))?;
    Ok(out)
}

/// A copy of `obj` in which every odd-length UI value ends with the NUL
/// padding byte that PS3.5 §6.2 (VR UI) requires; dicom-object would pad it
/// with a space. Applied through sequence items too.
fn pad_ui_values(obj: &InMemDicomObject) -> InMemDicomObject {
    use dicom_core::{
        header::Header,
        value::{DataSetSequence, Value},
    };
    InMemDicomObject::from_element_iter(obj.iter().map(|e| match e.value() {
        Value::Primitive(p) if e.vr() == VR::UI => {
            let joined = p.to_str();
            if joined.len() % 2 == 1 {
                DataElement::new(e.tag(), VR::UI, PrimitiveValue::from(format!("{joined}\0")))
            } else {
                e.clone()
            }
        }
        Value::Sequence(seq) => {
            let items: Vec<InMemDicomObject> = seq.items().iter().map(pad_ui_values).collect();
            DataElement::new(e.tag(), VR::SQ, DataSetSequence::from(items))
        }
        _ => e.clone(),
    }))
}

/// Encodes the Identifier of a final C-MOVE-RSP / C-GET-RSP: the Failed SOP
/// Instance UID List (0008,0058) (PS3.4 C.4.2.1.5, C.4.3.1.4), in transfer syntax
/// `ts_uid`.
///
/// # Errors
/// [`CommandError`] when the transfer syntax is unknown or encoding fails.
pub fn encode_failed_list(uids: &[String], ts_uid: &str) -> Result<Vec<u8>, CommandError> {
    let obj = InMemDicomObject::from_element_iter([DataElement::new(
        tags::FAILED_SOP_INSTANCE_UID_LIST,
        VR::UI,
        PrimitiveValue::Strs(uids.iter().cloned().collect()),
    )]);
    encode_identifier(&obj, ts_uid)
}

fn pad_uid(uid: &str) -> String {
    if uid.len() % 2 == 1 {
        format!("{uid}\0")
    } else {
        uid.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzz finding (`fuzz/corpus/dimse_command/regression-oom-other-group`): a
    /// 115-byte command set whose second element is in group 0002 passed the
    /// bounds scan (which stops at the first element of another group), and
    /// dicom-object then allocated the declared lengths that followed: 4 GB
    /// and 14 s for one command. It is now refused, and a command with a
    /// large declared length after a foreign element costs nothing.
    #[test]
    fn regression_element_outside_group_0000_is_refused() {
        let input = include_bytes!("../../../fuzz/corpus/dimse_command/regression-oom-other-group");
        let err = decode(input).expect_err("a foreign group is refused");
        assert!(err.0.contains("outside the command group"), "{err}");
        assert!(err.0.contains("offset 12"), "{err}");

        // C-ECHO-RQ, then (0008,0016) declaring 0xFFFFFFF0 bytes.
        let mut echo = Vec::new();
        for (g, e, v) in [
            (0x0000u16, 0x0100u16, 0x0030u16),
            (0x0000, 0x0110, 1),
            (0x0000, 0x0800, NO_DATASET),
        ] {
            echo.extend_from_slice(&g.to_le_bytes());
            echo.extend_from_slice(&e.to_le_bytes());
            echo.extend_from_slice(&2u32.to_le_bytes());
            echo.extend_from_slice(&v.to_le_bytes());
        }
        assert!(matches!(
            decode(&echo),
            Ok(Request::CEcho { message_id: 1, .. })
        ));
        echo.extend_from_slice(&[0x08, 0x00, 0x16, 0x00, 0xF0, 0xFF, 0xFF, 0xFF]);
        let err = decode(&echo).expect_err("a foreign group is refused");
        assert!(err.0.contains("offset 30"), "{err}");
    }

    #[test]
    fn identifier_uids_are_nul_padded() {
        let obj = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::STUDY_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.345"),
            ),
            DataElement::new(
                tags::FAILED_SOP_INSTANCE_UID_LIST,
                VR::UI,
                PrimitiveValue::Strs(["1.2".into(), "1.234".into()].into_iter().collect()),
            ),
        ]);
        let bytes = encode_identifier(&obj, "1.2.840.10008.1.2.1").unwrap_or_default();
        let find = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"1.2.345\0"), "{bytes:?}");
        assert!(find(b"1.2\\1.234\0"), "{bytes:?}");
        assert!(!find(b"1.2.345 "));
    }

    #[test]
    fn a_long_error_comment_is_cut_at_a_word() {
        let rsp = Response {
            command_field: field::C_STORE_RSP,
            message_id: 1,
            sop_class: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance: Some("1.2.3".into()),
            status: Status::CANNOT_UNDERSTAND,
            error_comment: Some(
                "malformed dataset: declared length 200 exceeds the 4 bytes present at offset 312"
                    .into(),
            ),
            offending_elements: vec![],
            dataset_follows: false,
            sub_operations: None,
        };
        let bytes = encode(&rsp);
        let obj =
            InMemDicomObject::read_dataset_with_ts(&bytes[..], &IMPLICIT_VR_LITTLE_ENDIAN.erased());
        let Ok(obj) = obj else { panic!("decodes") };
        let c = uid_of(&obj, tags::ERROR_COMMENT);
        assert_eq!(
            c.trim_end(),
            "malformed dataset: declared length 200 exceeds the 4 bytes..."
        );
        assert!(c.len() <= 64);
    }

    #[test]
    fn response_roundtrips_through_the_decoder_shape() {
        let rsp = Response {
            command_field: field::C_STORE_RSP,
            message_id: 7,
            sop_class: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance: Some("1.2.3".into()),
            status: Status::DUPLICATE_SOP_INSTANCE,
            error_comment: Some("already stored\\with\ndifferent content".into()),
            offending_elements: vec![],
            dataset_follows: false,
            sub_operations: None,
        };
        let bytes = encode(&rsp);
        let obj =
            InMemDicomObject::read_dataset_with_ts(&bytes[..], &IMPLICIT_VR_LITTLE_ENDIAN.erased());
        let Ok(obj) = obj else { panic!("decodes") };
        assert_eq!(u16_of(&obj, tags::STATUS), Some(0x0111));
        assert_eq!(u16_of(&obj, tags::MESSAGE_ID_BEING_RESPONDED_TO), Some(7));
        assert_eq!(uid_of(&obj, tags::AFFECTED_SOP_INSTANCE_UID), "1.2.3");
        let group_len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
        assert_eq!(&bytes[0..4], &[0, 0, 0, 0], "starts with (0000,0000)");
        assert_eq!(group_len, bytes.len() - 12);
        // exactly one Command Group Length: the next element is (0000,0002)
        assert_eq!(&bytes[12..16], &[0x00, 0x00, 0x02, 0x00]);
        assert_eq!(
            uid_of(&obj, tags::ERROR_COMMENT),
            "already storedwithdifferent content"
        );
    }

    #[test]
    fn decodes_echo_and_refuses_garbage() {
        let mut cmd = InMemDicomObject::command_from_element_iter([
            DataElement::new(
                tags::AFFECTED_SOP_CLASS_UID,
                VR::UI,
                PrimitiveValue::from("1.2.840.10008.1.1\0"),
            ),
            DataElement::new(
                tags::COMMAND_FIELD,
                VR::US,
                dicom_value!(U16, [field::C_ECHO_RQ]),
            ),
            DataElement::new(tags::MESSAGE_ID, VR::US, dicom_value!(U16, [3])),
            DataElement::new(
                tags::COMMAND_DATA_SET_TYPE,
                VR::US,
                dicom_value!(U16, [NO_DATASET]),
            ),
        ]);
        let mut bytes = Vec::new();
        assert!(cmd
            .write_dataset_with_ts(&mut bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
            .is_ok());
        assert_eq!(
            decode(&bytes),
            Ok(Request::CEcho {
                message_id: 3,
                sop_class: "1.2.840.10008.1.1".into()
            })
        );
        cmd.remove_element(tags::COMMAND_FIELD);
        let mut bytes = Vec::new();
        assert!(cmd
            .write_dataset_with_ts(&mut bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
            .is_ok());
        assert!(decode(&bytes).is_err());
        assert!(decode(&[0x00, 0x00, 0x00, 0x01, 0xFF, 0xFF, 0xFF, 0x7F, 1, 2]).is_err());
    }
}
