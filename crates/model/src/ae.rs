//! Application Entity titles (PS3.5 §6.2, VR AE; PS3.8 §9.3.2).

use std::fmt;

use crate::{clip, ModelError};

/// An AE title with leading and trailing spaces removed: 1–16 characters of
/// the default character repertoire without backslash or control characters
/// (PS3.5 §6.2). Leading and trailing spaces are not significant, so
/// `" MOD1 "` and `"MOD1"` parse to equal values; an all-space title is
/// refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct AeTitle(String);

impl AeTitle {
    /// Parses an AE title from a PDU field, a DIMSE attribute or the CLI.
    ///
    /// # Errors
    /// [`ModelError::InvalidAeTitle`] when blank, longer than 16 characters,
    /// or holding a backslash or a control character.
    pub fn parse(raw: &str) -> Result<AeTitle, ModelError> {
        let value = raw.trim_matches(|c| c == ' ' || c == '\0');
        let err = |reason| ModelError::InvalidAeTitle {
            value: clip(raw),
            reason,
        };
        if value.is_empty() {
            return Err(err("blank"));
        }
        if value.len() > 16 {
            return Err(err("longer than 16 characters"));
        }
        if !value
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
        {
            return Err(err("only printable ASCII without '\\' is allowed"));
        }
        Ok(AeTitle(value.to_owned()))
    }

    /// The title without padding.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AeTitle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spaces_are_not_significant() {
        let a = AeTitle::parse("MOD1").ok();
        assert!(a.is_some());
        assert_eq!(AeTitle::parse("MOD1 ").ok(), a);
        assert_eq!(AeTitle::parse(" MOD1").ok(), a);
        assert_eq!(AeTitle::parse("MOD1\0\0").ok(), a);
    }

    #[test]
    fn rejects_blank_long_and_odd() {
        for bad in ["", "    ", "ABCDEFGHIJKLMNOPQ", "A\\B", "A\nB"] {
            assert!(AeTitle::parse(bad).is_err(), "{bad:?}");
        }
    }
}
