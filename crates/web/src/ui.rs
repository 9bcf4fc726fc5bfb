//! The web UI's static assets (plain HTML, CSS and JavaScript under
//! `crates/web/assets/`), embedded in the binary and served anonymously at
//! fixed paths: nothing is read from disk at run time, no build step, no
//! CDN. The page itself holds no patient data; everything it shows comes
//! from the authenticated API and DICOMweb routes. The strict
//! Content-Security-Policy ([`crate::protect`]) holds: no inline script or
//! style in any asset.

use axum::{
    extract::Request,
    http::{header, HeaderValue, Method},
    response::{IntoResponse, Response},
    Extension,
};

use crate::{audit::Note, error::ApiError};

/// One embedded file: its URL path, media type and bytes.
pub struct Asset {
    /// The URL path it is served at.
    pub path: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its content.
    pub bytes: &'static [u8],
}

/// Every asset, by URL path.
pub const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        bytes: include_bytes!("../assets/index.html"),
    },
    Asset {
        path: "/app.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../assets/app.css"),
    },
    Asset {
        path: "/app.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../assets/app.js"),
    },
    Asset {
        path: "/admin.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../assets/admin.js"),
    },
    Asset {
        path: "/favicon.svg",
        content_type: "image/svg+xml",
        bytes: include_bytes!("../assets/favicon.svg"),
    },
];

/// Whether `GET path` is a UI asset (anonymous).
pub fn is_asset(method: &Method, path: &str) -> bool {
    *method == Method::GET && ASSETS.iter().any(|a| a.path == path)
}

/// `GET /`, `/app.css`, `/app.js`, `/admin.js`, `/favicon.svg`: the
/// embedded asset.
pub async fn asset(Extension(note): Extension<Note>, req: Request) -> Result<Response, ApiError> {
    note.action("ui.asset");
    let path = req.uri().path();
    let a = ASSETS
        .iter()
        .find(|a| a.path == path)
        .ok_or(ApiError::NotFound)?;
    let mut r = a.bytes.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_carry_nothing_inline_or_remote() {
        for a in ASSETS {
            let text = String::from_utf8_lossy(a.bytes)
                .to_lowercase()
                .replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
            assert!(!text.contains("<style"), "{}", a.path);
            assert!(!text.contains(" style="), "{}", a.path);
            assert!(!text.contains("http://"), "{}", a.path);
            assert!(!text.contains("https://"), "{}", a.path);
            assert!(!text.contains("eval("), "{}", a.path);
            if a.path == "/" {
                // the only scripts are external, from our origin
                assert_eq!(
                    text.matches("<script").count(),
                    text.matches("<script src=\"/app.js\"").count()
                        + text.matches("<script src=\"/admin.js\"").count(),
                );
                assert_eq!(text.matches("<script").count(), 2);
                let handler = text.split(" on").skip(1).any(|rest| {
                    let name: String = rest.chars().take_while(char::is_ascii_alphabetic).collect();
                    !name.is_empty() && rest[name.len()..].starts_with('=')
                });
                assert!(!handler, "inline event handler in {}", a.path);
            }
        }
    }

    #[test]
    fn only_get_of_the_exact_paths_is_an_asset() {
        assert!(is_asset(&Method::GET, "/"));
        assert!(is_asset(&Method::GET, "/app.js"));
        assert!(!is_asset(&Method::POST, "/"));
        assert!(!is_asset(&Method::GET, "/app.js/x"));
        assert!(!is_asset(&Method::GET, "/index.html"));
    }
}
