//! The embedded operator console: its assets (`crates/api/console/`, compiled into the binary
//! with `include_bytes!`) and the routes serving them at `/` and `/console/{file}`.
//!
//! It lives in the API crate rather than a crate of its own because it shares the HTTP router's
//! fallback (an unknown `/api/…` path must stay a JSON 404, any other unknown path is the
//! console's shell for client-side routing) and needs no state: it is static files that call the
//! `/api/v1` routes next to them. There is no front-end build step: the files are plain HTML,
//! CSS and ES modules, served as written (gzip-compressed once, on first use, when the browser
//! accepts it).
//!
//! Every response carries a strict Content-Security-Policy (`default-src 'self'`, no inline
//! script or style), `ETag` and `Cache-Control: no-cache` (file names carry no hash, so the
//! browser revalidates and gets a 304 while the binary is unchanged).

use std::io::Write;
use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use flate2::Compression;
use flate2::write::GzEncoder;

/// The Content-Security-Policy of every console response: only this origin's scripts, styles and
/// API, no inline code, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Where the console's files are served, below the shell at `/`.
pub const ASSET_PREFIX: &str = "/console/";

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// The shell every console page starts from.
const SHELL: Asset = Asset {
    name: "index.html",
    content_type: "text/html; charset=utf-8",
    body: include_bytes!("../console/index.html"),
};

const ASSETS: &[Asset] = &[
    SHELL,
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../console/app.css"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../console/app.js"),
    },
    Asset {
        name: "api.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../console/api.js"),
    },
    Asset {
        name: "chart.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../console/chart.js"),
    },
    Asset {
        name: "rules.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../console/rules.js"),
    },
    Asset {
        name: "device-panels.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../console/device-panels.js"),
    },
    Asset {
        name: "role.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../console/role.js"),
    },
    Asset {
        name: "confirm.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../console/confirm.js"),
    },
    Asset {
        name: "alarms.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../console/alarms.js"),
    },
    Asset {
        name: "broker.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../console/broker.js"),
    },
    Asset {
        name: "favicon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../console/favicon.svg"),
    },
];

/// An asset with what is computed once per process: its ETag and gzip body.
struct Prepared {
    etag: HeaderValue,
    gzip: Option<Vec<u8>>,
}

fn prepared(index: usize) -> &'static Prepared {
    static PREPARED: OnceLock<Vec<Prepared>> = OnceLock::new();
    let all = PREPARED.get_or_init(|| ASSETS.iter().map(prepare).collect());
    // `index` always comes from a position in ASSETS, which PREPARED mirrors.
    &all[index.min(all.len() - 1)]
}

fn prepare(asset: &Asset) -> Prepared {
    // FNV-1a: stable across builds and processes, so an unchanged file keeps its ETag.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in asset.body {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let etag = HeaderValue::from_str(&format!("\"{hash:016x}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("\"0\""));
    let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
    // Compressing into memory fails only on allocation failure; the plain body is served then.
    let gzip = encoder
        .write_all(asset.body)
        .ok()
        .and_then(|()| encoder.finish().ok())
        .filter(|gz| gz.len() < asset.body.len());
    Prepared { etag, gzip }
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|enc| {
            let mut parts = enc.split(';');
            let name = parts.next().unwrap_or_default().trim();
            let refused = parts.any(|p| matches!(p.trim(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000"));
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

fn not_modified(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.trim_start_matches("W/").as_bytes() == etag.as_bytes()
        })
}

fn respond(index: usize, method: &Method, headers: &HeaderMap) -> Response {
    let asset = &ASSETS[index.min(ASSETS.len() - 1)];
    let prep = prepared(index);
    let mut res_headers = HeaderMap::new();
    res_headers.insert(header::ETAG, prep.etag.clone());
    res_headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res_headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    res_headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    res_headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    res_headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if not_modified(headers, &prep.etag) {
        return (StatusCode::NOT_MODIFIED, res_headers).into_response();
    }
    res_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    let body: &'static [u8] = match &prep.gzip {
        Some(gz) if accepts_gzip(headers) => {
            res_headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            gz.as_slice()
        }
        _ => asset.body,
    };
    if *method == Method::HEAD {
        res_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        return (StatusCode::OK, res_headers).into_response();
    }
    (StatusCode::OK, res_headers, body).into_response()
}

/// `GET /` and any other non-API path: the console's shell (the page routes on the client).
pub async fn shell(method: Method, headers: HeaderMap) -> Response {
    respond(0, &method, &headers)
}

/// `GET /console/{file}`: a console asset, or a plain-text 404.
pub async fn asset(method: Method, headers: HeaderMap, Path(file): Path<String>) -> Response {
    match ASSETS.iter().position(|a| a.name == file) {
        Some(index) => respond(index, &method, &headers),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("the console has no file {file:?}\n"),
        )
            .into_response(),
    }
}

/// Whether an unknown path belongs to the console (answered with the shell) rather than to the
/// APIs (answered with a JSON 404): everything but `/api/…` and the console's asset folder.
pub fn is_console_path(path: &str) -> bool {
    !(path == "/api" || path.starts_with("/api/") || path.starts_with(ASSET_PREFIX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_has_a_distinct_name_and_a_body() {
        for (i, a) in ASSETS.iter().enumerate() {
            assert!(!a.body.is_empty(), "{} is empty", a.name);
            assert!(ASSETS[..i].iter().all(|b| b.name != a.name));
        }
    }

    #[test]
    fn gzip_is_negotiated_and_refusable() {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip, deflate, br"),
        );
        assert!(accepts_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("br, gzip;q=0"),
        );
        assert!(!accepts_gzip(&h));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn api_paths_are_not_console_paths() {
        assert!(is_console_path("/devices/d1"));
        assert!(is_console_path("/"));
        assert!(!is_console_path("/api/v1/nope"));
        assert!(!is_console_path("/console/missing.js"));
    }
}
