//! The OHIF Viewer (npm `@ohif/app`), served by Bastion at `/viewer/` from a
//! directory the administrator unpacked (`[http] ohif_dir`, `serve
//! --ohif-dir`): same origin as Bastion's DICOMweb, so OHIF's requests carry
//! the user's session cookie (no token in JavaScript, no CORS).
//!
//! What is served, and why:
//! - `/viewer/app-config.js`: generated, not the package's: one data source,
//!   Bastion's own DICOMweb (`/dicomweb`, PS3.18) on this origin; before the
//!   app starts it asks `/api/me` and, without a session, sends the user to
//!   Bastion's login page.
//! - `/viewer/init-service-worker.js`: an empty script. OHIF's service
//!   worker would keep responses in the browser's cache storage; patient
//!   data must not outlive the session on a shared workstation.
//! - `index.html` and any path without a file (the viewer's own routes,
//!   e.g. `/viewer/viewer?StudyInstanceUIDs=…`): the package's `index.html`
//!   with its absolute paths moved under `/viewer/` (the package is built
//!   for `/`), and `window.PUBLIC_URL = "/viewer/"`.
//! - every other file as it is in the package, except that the webpack
//!   public path (`__webpack_require__.p = "/"`) in JavaScript and the
//!   absolute `url(/…)` in CSS are moved under `/viewer/` too.
//!
//! The files are program code with no patient data: they are served without
//! authentication, like the built-in UI's, and successful reads of them are
//! not recorded as requests (a page load fetches about 60). Everything they
//! then ask of `/dicomweb` is authenticated, authorised and audited as any
//! other request.
//!
//! The Content-Security-Policy of these responses ([`Ohif::csp`]) stays
//! strict; what it allows beyond the built-in UI's, and why, is in
//! `docs/ohif.md`.

use std::{
    io,
    path::{Component, Path, PathBuf},
};

use axum::{
    extract::{Request, State},
    http::{header, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
    Extension,
};
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::{audit::Note, error::ApiError, AppState};

/// Where the viewer is served.
pub const PREFIX: &str = "/viewer/";

/// Why an OHIF directory cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum OhifError {
    /// The directory does not exist.
    #[error(
        "{0}: no such directory (give the unpacked @ohif/app package: the directory holding dist/)"
    )]
    Missing(PathBuf),
    /// No `index.html` in the directory nor in its `dist/`.
    #[error(
        "{0}: no index.html here nor in dist/ (expected an unpacked @ohif/app package, or its dist/ directory)"
    )]
    NotOhif(PathBuf),
    /// The index cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// An OHIF distribution ready to serve.
#[derive(Debug)]
pub struct Ohif {
    root: PathBuf,
    index: Vec<u8>,
    csp: HeaderValue,
}

impl Ohif {
    /// Opens the distribution in `dir`: the unpacked package (with its
    /// `dist/`) or `dist/` itself.
    ///
    /// # Errors
    /// [`OhifError`] when there is no readable `index.html`.
    pub fn open(dir: &Path) -> Result<Ohif, OhifError> {
        if !dir.is_dir() {
            return Err(OhifError::Missing(dir.to_path_buf()));
        }
        let root = if dir.join("dist").join("index.html").is_file() {
            dir.join("dist")
        } else if dir.join("index.html").is_file() {
            dir.to_path_buf()
        } else {
            return Err(OhifError::NotOhif(dir.to_path_buf()));
        };
        // Symbolic links are resolved once here; a file whose real path
        // leaves this root is never served ([`Ohif::file`]).
        let root = root.canonicalize().map_err(|source| OhifError::Read {
            path: root.clone(),
            source,
        })?;
        let path = root.join("index.html");
        let html = std::fs::read_to_string(&path).map_err(|source| OhifError::Read {
            path: path.clone(),
            source,
        })?;
        let index = rewrite_index(&html);
        let csp = csp_for(&inline_scripts(&index));
        Ok(Ohif {
            root,
            index: index.into_bytes(),
            csp: HeaderValue::from_str(&csp).unwrap_or(HeaderValue::from_static(
                crate::protect::CONTENT_SECURITY_POLICY,
            )),
        })
    }

    /// The directory files are served from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The Content-Security-Policy of the viewer's responses: the built-in
    /// UI's, plus the two inline scripts of OHIF's `index.html` by hash,
    /// `'wasm-unsafe-eval'` (its image codecs are WebAssembly), `worker-src
    /// 'self' blob:` (decoding runs in workers) and `font-src 'self' data:`.
    pub fn csp(&self) -> &HeaderValue {
        &self.csp
    }

    /// The response for `path` (the part after `/viewer/`). A JavaScript
    /// response carries [`WORKER_CSP`] (see there), every other one
    /// [`Ohif::csp`].
    fn respond(&self, path: &str) -> Result<Response, ApiError> {
        let mut r = self.file(path)?;
        let is_js = r
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/javascript"));
        let csp = if is_js {
            HeaderValue::from_static(WORKER_CSP)
        } else {
            self.csp.clone()
        };
        r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, csp);
        Ok(r)
    }

    fn file(&self, path: &str) -> Result<Response, ApiError> {
        match path {
            "app-config.js" => return Ok(js(APP_CONFIG.as_bytes().to_vec())),
            "init-service-worker.js" => {
                return Ok(js(
                    b"// Bastion: no service worker (patient data must not be cached).\n".to_vec(),
                ))
            }
            "" | "index.html" => return Ok(self.index()),
            _ => {}
        }
        let Some(rel) = safe_relative(path) else {
            return Err(ApiError::NotFound);
        };
        let file = self.root.join(&rel);
        // A symbolic link inside the package must not lead out of it.
        let file = match file.canonicalize() {
            Ok(real) if real.starts_with(&self.root) => real,
            Ok(_) => return Err(ApiError::NotFound),
            Err(_) if rel.extension().is_none() => return Ok(self.index()),
            Err(_) => return Err(ApiError::NotFound),
        };
        if file.is_dir() {
            return Ok(self.index());
        }
        match std::fs::read(&file) {
            Ok(bytes) => {
                let mime = mime_guess::from_path(&rel).first_or_octet_stream();
                let mime = if mime.subtype() == "javascript" {
                    mime_guess::mime::TEXT_JAVASCRIPT
                } else {
                    mime
                };
                let bytes = match mime.subtype().as_str() {
                    "javascript" => replace_all(
                        &bytes,
                        b"__webpack_require__.p = \"/\"",
                        b"__webpack_require__.p = \"/viewer/\"",
                    ),
                    "css" => replace_all(&bytes, b"url(/", b"url(/viewer/"),
                    _ => bytes,
                };
                let mut r = bytes.into_response();
                if let Ok(v) = HeaderValue::from_str(mime.essence_str()) {
                    r.headers_mut().insert(header::CONTENT_TYPE, v);
                }
                // Program files of the package (no patient data; most
                // names carry a content hash): the browser may keep them a
                // day instead of fetching ~20 MB at every page load. The
                // index and the generated config stay no-store.
                r.headers_mut().insert(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("private, max-age=86400"),
                );
                Ok(r)
            }
            // The viewer's own routes (no extension): the SPA's index.
            Err(_) if rel.extension().is_none() => Ok(self.index()),
            Err(_) => Err(ApiError::NotFound),
        }
    }

    fn index(&self) -> Response {
        let mut r = self.index.clone().into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        r
    }
}

/// The policy of a JavaScript response. A browser applies a script
/// response's own policy only when the script is a worker's (a script in a
/// page runs under the page's policy, [`Ohif::csp`]): this lets OHIF's image
/// decoding workers, whose Emscripten glue builds functions with `new
/// Function`, run with `'unsafe-eval'` inside the worker — no DOM, no
/// access to the page — while the page itself never may evaluate strings.
pub const WORKER_CSP: &str =
    "default-src 'self'; script-src 'self' 'unsafe-eval' 'wasm-unsafe-eval'; \
     worker-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'";

/// The generated `app-config.js`: OHIF's configuration (`window.config`)
/// with Bastion's DICOMweb as the only data source, on this origin.
pub const APP_CONFIG: &str = r#"// Generated by Bastion: OHIF's only data source is this server's DICOMweb,
// authenticated by your Bastion session (no token in JavaScript).
(function () {
  var root = window.location.origin + '/dicomweb';
  window.config = {
    routerBasename: '/viewer',
    extensions: [],
    modes: [],
    customizationService: {},
    showStudyList: true,
    maxNumberOfWebWorkers: 3,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: true,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    investigationalUseDialog: { option: 'never' },
    maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
    showErrorDetails: 'always',
    defaultDataSourceName: 'bastion',
    dataSources: [
      {
        namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
        sourceName: 'bastion',
        configuration: {
          friendlyName: 'Bastion PACS',
          name: 'bastion',
          wadoUriRoot: root,
          qidoRoot: root,
          wadoRoot: root,
          qidoSupportsIncludeField: true,
          imageRendering: 'wadors',
          thumbnailRendering: 'wadors',
          enableStudyLazyLoad: true,
          supportsFuzzyMatching: false,
          supportsWildcard: true,
          staticWado: false,
          singlepart: 'bulkdata,video,pdf',
          bulkDataURI: { enabled: true, relativeResolution: 'studies' },
          omitQuotationForMultipartRequest: true,
          requestOptions: { requestCredentials: 'same-origin' },
        },
      },
    ],
  };
  // Without a Bastion session, log in first; a session that may not view
  // images (an auditor, a password to change first) goes back to Bastion's
  // own pages, which say why.
  fetch('/api/me', { credentials: 'same-origin' }).then(function (r) {
    if (r.status !== 200) {
      window.location.replace('/');
      return null;
    }
    return r.json();
  }).then(function (me) {
    if (me && (me.must_change_password || (me.permissions || []).indexOf('view') < 0)) {
      window.location.replace('/');
    }
  });
})();
"#;

/// `index.html` with its absolute paths under [`PREFIX`].
fn rewrite_index(html: &str) -> String {
    html.replace("window.PUBLIC_URL=\"/\"", "window.PUBLIC_URL=\"/viewer/\"")
        .replace("href=\"/", "href=\"/viewer/")
        .replace("src=\"/", "src=\"/viewer/")
        .replace("content=\"/", "content=\"/viewer/")
}

/// The contents of the inline `<script>` elements (those without `src`).
fn inline_scripts(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find("<script") {
        let after = &rest[start..];
        let Some(open_end) = after.find('>') else {
            break;
        };
        let tag = &after[..open_end];
        let body = &after[open_end + 1..];
        let Some(close) = body.find("</script>") else {
            break;
        };
        if !tag.contains("src=") {
            out.push(body[..close].to_owned());
        }
        rest = &body[close..];
    }
    out
}

/// The `<style>` elements OHIF 3.13 (the version `scripts/test.sh` pins)
/// adds at run time, by hash, found by the browser test (`docs/ohif.md`):
/// sonner's toast styles (OHIF's notifications), radix's scroll-area rule
/// (hides a second scrollbar) and an empty one. Another OHIF version may add
/// others: they are then refused (a console error; nothing else breaks),
/// never allowed wholesale with `'unsafe-inline'`.
const STYLE_HASHES: &str = "'sha256-Od9mHMH7x2G6QuoV3hsPkDCwIyqbg2DX3F5nLeCYQBc=' \
     'sha256-vGQdhYJbTuF+M8iCn1IZCHpdkiICocWHDq4qnQF4Rjw=' \
     'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='";

/// The viewer's Content-Security-Policy for `inline` scripts.
fn csp_for(inline: &[String]) -> String {
    let hashes: Vec<String> = inline
        .iter()
        .map(|s| {
            let digest = Sha256::digest(s.as_bytes());
            format!(
                "'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(digest)
            )
        })
        .collect();
    format!(
        "default-src 'self'; script-src 'self' {} 'wasm-unsafe-eval'; worker-src 'self' blob:; \
         style-src 'self' {STYLE_HASHES}; img-src 'self' data: blob:; font-src 'self' data:; \
         connect-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'self'; \
         form-action 'self'",
        hashes.join(" ")
    )
}

/// `path` as a relative path of normal components only (no `..`, no root,
/// no empty or hidden component), or `None`.
fn safe_relative(path: &str) -> Option<PathBuf> {
    if path.is_empty() || path.contains('\\') || path.contains('\0') {
        return None;
    }
    let p = Path::new(path);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) if !s.to_string_lossy().starts_with('.') => out.push(s),
            _ => return None,
        }
    }
    Some(out)
}

fn replace_all(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let finder = memchr::memmem::Finder::new(from);
    let mut out = Vec::with_capacity(bytes.len() + 64);
    let mut last = 0;
    for at in finder.find_iter(bytes) {
        out.extend_from_slice(&bytes[last..at]);
        out.extend_from_slice(to);
        last = at + from.len();
    }
    out.extend_from_slice(&bytes[last..]);
    out
}

fn js(bytes: Vec<u8>) -> Response {
    let mut r = bytes.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    r
}

/// Whether `GET path` is a viewer file (anonymous, like the UI's).
pub fn is_viewer_path(method: &Method, path: &str) -> bool {
    (*method == Method::GET || *method == Method::HEAD)
        && (path == "/viewer" || path.starts_with(PREFIX))
}

/// `GET /viewer/…`: a file of the viewer (404 when no `ohif_dir` is
/// configured).
pub async fn serve(
    State(state): State<AppState>,
    Extension(note): Extension<Note>,
    req: Request,
) -> Result<Response, ApiError> {
    note.action("viewer.asset");
    let Some(ohif) = state.ohif() else {
        return Err(ApiError::NotFound);
    };
    let path = req.uri().path();
    if path == "/viewer" {
        let mut r = StatusCode::PERMANENT_REDIRECT.into_response();
        r.headers_mut()
            .insert(header::LOCATION, HeaderValue::from_static(PREFIX));
        return Ok(r);
    }
    let rel = path.strip_prefix(PREFIX).unwrap_or_default().to_owned();
    let ohif2 = ohif.clone();
    let r = tokio::task::spawn_blocking(move || ohif2.respond(&rel))
        .await
        .map_err(|e| ApiError::internal("viewer task", e))??;
    note.quiet();
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_directory_are_refused() {
        assert_eq!(safe_relative("app.js"), Some(PathBuf::from("app.js")));
        assert_eq!(
            safe_relative("assets/x.png"),
            Some(PathBuf::from("assets/x.png"))
        );
        for bad in [
            "../etc/passwd",
            "a/../../b",
            "/etc/passwd",
            ".git/config",
            "a/.b",
            "",
            "a\\b",
        ] {
            assert_eq!(safe_relative(bad), None, "{bad}");
        }
    }

    #[test]
    fn index_paths_move_under_the_prefix_and_inline_scripts_are_hashed() {
        let html = r#"<script>window.PUBLIC_URL="/"</script><link href="/app.css"><script defer src="/app.js"></script><script>f()</script>"#;
        let out = rewrite_index(html);
        assert_eq!(
            out,
            r#"<script>window.PUBLIC_URL="/viewer/"</script><link href="/viewer/app.css"><script defer src="/viewer/app.js"></script><script>f()</script>"#
        );
        let inline = inline_scripts(&out);
        assert_eq!(inline, ["window.PUBLIC_URL=\"/viewer/\"", "f()"]);
        let csp = csp_for(&inline);
        // sha256("f()") in base64
        let digest = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(b"f()"));
        assert!(csp.contains(&format!("'sha256-{digest}'")), "{csp}");
        assert!(!csp.contains("unsafe-inline"));
        assert!(!csp.contains("'unsafe-eval'"));
    }

    #[test]
    fn webpack_public_path_moves() {
        let out = replace_all(
            b"a;__webpack_require__.p = \"/\";b",
            b"__webpack_require__.p = \"/\"",
            b"__webpack_require__.p = \"/viewer/\"",
        );
        assert_eq!(out, b"a;__webpack_require__.p = \"/viewer/\";b");
    }
}
