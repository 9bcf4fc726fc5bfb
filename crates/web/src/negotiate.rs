//! `Accept` negotiation (PS3.18 §8.7): media ranges with their parameters,
//! in the client's order of preference.

/// One media range of an `Accept` header.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaRange {
    /// `type/subtype`, lower case.
    pub essence: String,
    /// Parameters (names lower case, values unquoted), `q` excluded.
    pub params: Vec<(String, String)>,
    /// Quality, 0–1.
    pub q: f32,
}

impl MediaRange {
    /// The value of parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether this range matches `essence` (exactly, `type/*` or `*/*`).
    pub fn matches(&self, essence: &str) -> bool {
        if self.essence == "*/*" || self.essence == essence {
            return true;
        }
        match (self.essence.strip_suffix("/*"), essence.split_once('/')) {
            (Some(t), Some((et, _))) => t == et,
            _ => false,
        }
    }
}

/// Parses an `Accept` header (absent: `*/*`), dropping ranges with q=0,
/// sorted by quality (stable: ties keep the client's order).
pub fn parse_accept(header: Option<&str>) -> Vec<MediaRange> {
    let Some(header) = header.filter(|h| !h.trim().is_empty()) else {
        return vec![MediaRange {
            essence: "*/*".into(),
            params: Vec::new(),
            q: 1.0,
        }];
    };
    let mut out: Vec<MediaRange> = split_outside_quotes(header, ',')
        .into_iter()
        .filter_map(|range| {
            let mut pieces = split_outside_quotes(&range, ';').into_iter();
            let essence = pieces.next()?.trim().to_ascii_lowercase();
            if !essence.contains('/') {
                return None;
            }
            let mut params = Vec::new();
            let mut q = 1.0f32;
            for p in pieces {
                let Some((n, v)) = p.split_once('=') else {
                    continue;
                };
                let n = n.trim().to_ascii_lowercase();
                let v = v.trim().trim_matches('"').to_owned();
                if n == "q" {
                    q = v.parse().unwrap_or(0.0);
                } else {
                    params.push((n, v));
                }
            }
            (q > 0.0).then_some(MediaRange { essence, params, q })
        })
        .collect();
    out.sort_by(|a, b| b.q.partial_cmp(&a.q).unwrap_or(std::cmp::Ordering::Equal));
    out
}

fn split_outside_quotes(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c == sep && !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_with_quoted_type_and_transfer_syntax() {
        let r = parse_accept(Some(
            "multipart/related; type=\"application/dicom\"; transfer-syntax=*, application/json;q=0.5",
        ));
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].essence, "multipart/related");
        assert_eq!(r[0].param("type"), Some("application/dicom"));
        assert_eq!(r[0].param("transfer-syntax"), Some("*"));
        assert!(r[1].matches("application/json"));
        let u = parse_accept(Some("multipart/related; type=application/dicom"));
        assert_eq!(u[0].param("type"), Some("application/dicom"));
        assert!(parse_accept(None)[0].matches("image/png"));
        assert!(parse_accept(Some("image/*"))[0].matches("image/png"));
        assert!(!parse_accept(Some("image/*"))[0].matches("application/json"));
    }
}
