//! The web UI and `/tidings.js`: plain HTML/CSS/JS modules from `web/`, embedded in the binary
//! (no build step, no external assets). Always open (§3 Auth): the pages call the API, which
//! checks credentials itself.
//!
//! HTML pages carry a Content-Security-Policy that forbids inline script and style, so even a
//! bug that inserted message content as markup could not run it. Every response has an `ETag`
//! (SHA-256 of the content) and `Cache-Control: no-cache`, so browsers revalidate cheaply and
//! never run a stale client after an upgrade.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::ApiError;

/// The policy of every page: scripts, styles and connections from this origin only.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; object-src 'none'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

struct Asset {
    name: &'static str,
    body: &'static [u8],
    content_type: &'static str,
    etag: HeaderValue,
}

impl Asset {
    fn new(name: &'static str, body: &'static [u8], content_type: &'static str) -> Self {
        let digest = Sha256::digest(body);
        let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        let etag = HeaderValue::from_str(&format!("\"{hex}\""))
            .unwrap_or_else(|_| HeaderValue::from_static("\"0\""));
        Self {
            name,
            body,
            content_type,
            etag,
        }
    }
}

macro_rules! asset {
    ($file:literal, $type:expr) => {
        Asset::new(
            $file,
            include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/web/", $file)),
            $type,
        )
    };
}

static PAGES: LazyLock<[Asset; 3]> = LazyLock::new(|| {
    [
        asset!("index.html", HTML),
        asset!("channel.html", HTML),
        asset!("run.html", HTML),
    ]
});

static CLIENT: LazyLock<Asset> = LazyLock::new(|| asset!("tidings.js", JS));

/// Everything under `/assets/`.
static ASSETS: LazyLock<Vec<Asset>> = LazyLock::new(|| {
    vec![
        asset!("app.css", CSS),
        asset!("ui.js", JS),
        asset!("ansi.js", JS),
        asset!("dashboard.js", JS),
        asset!("channel.js", JS),
        asset!("run.js", JS),
        asset!("favicon.svg", SVG),
    ]
});

fn respond(asset: &Asset, request: &HeaderMap, page: bool) -> Response {
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| {
            tags.split(',')
                .any(|t| t.trim().trim_start_matches("W/") == asset.etag.to_str().unwrap_or(""))
        });
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, asset.etag.clone());
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if page {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("same-origin"),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    response
}

/// `GET /`: the dashboard.
pub async fn dashboard(request: HeaderMap) -> Response {
    respond(&PAGES[0], &request, true)
}

/// `GET /channels/{ch}`: one channel, live (the page reads the name from its URL).
pub async fn channel_page(Path(_channel): Path<String>, request: HeaderMap) -> Response {
    respond(&PAGES[1], &request, true)
}

/// `GET /runs/{id}`: one run's log, live.
pub async fn run_page(Path(_id): Path<String>, request: HeaderMap) -> Response {
    respond(&PAGES[2], &request, true)
}

/// `GET /tidings.js`: the client library (CORS per `server.cors_origins`, from the router).
pub async fn client(request: HeaderMap) -> Response {
    respond(&CLIENT, &request, false)
}

/// `GET /assets/{file}`: the pages' styles and scripts.
pub async fn asset(Path(file): Path<String>, request: HeaderMap) -> Result<Response, ApiError> {
    ASSETS
        .iter()
        .find(|a| a.name == file)
        .map(|a| respond(a, &request, false))
        .ok_or_else(|| ApiError::NotFound(format!("no asset {file:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_named_once() {
        let mut names: Vec<_> = ASSETS.iter().map(|a| a.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ASSETS.len());
    }

    /// The CSP forbids inline script and style, so the pages must have none.
    #[test]
    fn pages_have_no_inline_script_or_style() {
        for page in PAGES.iter() {
            let html = std::str::from_utf8(page.body).unwrap_or_default();
            assert!(!html.contains(" style="), "{}: style attribute", page.name);
            assert!(!html.contains("<style"), "{}: <style>", page.name);
            let handler = html.match_indices(" on").any(|(i, _)| {
                let rest = &html[i + 3..];
                let name_len = rest.chars().take_while(char::is_ascii_lowercase).count();
                name_len > 0 && rest[name_len..].starts_with('=')
            });
            assert!(!handler, "{}: inline event handler", page.name);
            for (i, _) in html.match_indices("<script") {
                let tag = &html[i..html[i..].find('>').map_or(html.len(), |e| i + e)];
                assert!(tag.contains(" src="), "{}: inline <script>", page.name);
            }
        }
    }

    /// Message content is only ever inserted as text.
    #[test]
    fn scripts_never_assign_markup() {
        for asset in ASSETS.iter().chain(std::iter::once(&*CLIENT)) {
            let text = std::str::from_utf8(asset.body).unwrap_or_default();
            for forbidden in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
            ] {
                let code: String = text
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("//"))
                    .collect();
                assert!(!code.contains(forbidden), "{} uses {forbidden}", asset.name);
            }
        }
    }
}
