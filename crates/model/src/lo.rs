//! Long String (LO) values Bastion writes itself, e.g. the Error Comment
//! (0000,0902) of a DIMSE response (PS3.7 C.4) and of a STOW-RS Failed SOP
//! Sequence item (PS3.18 §10.5.3): at most 64 characters (PS3.5 §6.2).

/// Most characters of an LO value.
pub const LO_MAX: usize = 64;

/// `clean` (already printable ASCII without backslash: the callers decide
/// how other characters are cleaned) at most [`LO_MAX`] characters: a longer
/// text is cut at a word (after its 30th character, else at 61) and ends with
/// `...`.
///
/// ```
/// let cut = bastion_model::cut_lo(&"word ".repeat(20));
/// assert!(cut.len() <= 64 && cut.ends_with("word..."));
/// ```
pub fn cut_lo(clean: &str) -> String {
    if clean.len() <= LO_MAX {
        return clean.to_owned();
    }
    let head = &clean[..LO_MAX - 3];
    let cut = head.rfind(' ').filter(|i| *i > 30).unwrap_or(LO_MAX - 3);
    format!("{}...", head[..cut].trim_end())
}
