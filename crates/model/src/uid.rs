//! DICOM Unique Identifiers (PS3.5 §9.1).

use std::fmt;

use crate::ModelError;

/// A syntactically valid DICOM UID: 1–64 characters, components of digits
/// separated by `.`, no empty component, no leading zero in a component of
/// more than one digit (PS3.5 §9.1). Trailing NUL padding (PS3.5 §6.2, VR UI)
/// and surrounding spaces are removed by [`Uid::parse`].
///
/// Because only digits and dots survive parsing, a `Uid` is safe to show in
/// logs and can never act as a path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Uid(String);

impl Uid {
    /// Parses a UID as it appears in a dataset or a DIMSE command.
    ///
    /// # Errors
    /// [`ModelError::InvalidUid`] naming the rule that was broken.
    pub fn parse(raw: &str) -> Result<Uid, ModelError> {
        let value = raw.trim_end_matches('\0').trim();
        let err = |reason| ModelError::InvalidUid {
            len: raw.chars().count(),
            reason,
        };
        if value.is_empty() {
            return Err(err("empty"));
        }
        if value.len() > 64 {
            return Err(err("longer than 64 characters"));
        }
        for component in value.split('.') {
            if component.is_empty() {
                return Err(err("empty component"));
            }
            if !component.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err("only digits and '.' are allowed"));
            }
            if component.len() > 1 && component.starts_with('0') {
                return Err(err("component with a leading zero"));
            }
        }
        Ok(Uid(value.to_owned()))
    }

    /// The UID text, without padding.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_uids() {
        for ok in [
            "1.2.840.10008.1.1",
            "0",
            "1.0.2",
            "2.25.123456789012345678901234567890",
        ] {
            assert_eq!(Uid::parse(ok).map(|u| u.0), Ok(ok.to_owned()), "{ok}");
        }
        assert_eq!(Uid::parse("1.2.3\0").map(|u| u.0), Ok("1.2.3".to_owned()));
    }

    #[test]
    fn errors_do_not_echo_the_value() {
        let e = Uid::parse("Doe^John")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!e.contains("Doe"), "{e}");
        assert!(e.contains("8 characters"), "{e}");
    }

    #[test]
    fn rejects_invalid_uids() {
        for bad in [
            "",
            "../../x",
            "1..2",
            ".1",
            "1.",
            "1.02",
            "1.2.a",
            &"1".repeat(65),
            "1 .2",
        ] {
            assert!(Uid::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
