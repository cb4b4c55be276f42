//! The HTTP client of `ferrohub ctl`: reqwest over our own rustls configuration (the aws-lc-rs
//! provider, like the rest of the hub: no second crypto provider), bearer authentication, and
//! the API's `{"code", "message"}` errors turned into a message and a hint for the operator.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use reqwest::header::CONTENT_TYPE;
use reqwest::{Method, StatusCode, Url};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::Value;

/// A failure the operator can act on: what went wrong, and what to check.
#[derive(Debug)]
pub(crate) struct Failure {
    /// What went wrong.
    pub(crate) message: String,
    /// What to check or do.
    pub(crate) hint: Option<String>,
}

impl Failure {
    pub(crate) fn new(message: impl Into<String>, hint: Option<String>) -> Failure {
        Failure {
            message: message.into(),
            hint,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// A request body.
pub(crate) enum Body {
    /// No body.
    Empty,
    /// A JSON document.
    Json(Value),
    /// Raw bytes of a content type.
    Raw(&'static str, Vec<u8>),
}

/// A client of one hub's `/api/v1`.
pub(crate) struct Client {
    http: reqwest::Client,
    /// `.../api/v1`.
    base: Url,
    /// The address as the operator gave it, for messages.
    hub: String,
    token: Option<String>,
    timeout: Duration,
}

/// The base URL of the API from the hub's address: `http://host:8080` (or `.../api/v1`).
fn api_base(url: &str) -> Result<Url, Failure> {
    let hint = Some("write it like http://127.0.0.1:8080 or https://hub.example.com".to_string());
    let mut base = Url::parse(url.trim())
        .map_err(|e| Failure::new(format!("--url {url:?} is not a URL: {e}"), hint.clone()))?;
    if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
        return Err(Failure::new(
            format!("--url {url:?} must start with http:// or https://"),
            hint,
        ));
    }
    base.set_query(None);
    base.set_fragment(None);
    let path = base.path().trim_end_matches('/').to_string();
    let path = path.strip_suffix("/api/v1").unwrap_or(&path);
    base.set_path(&format!("{path}/api/v1"));
    Ok(base)
}

/// The messages of an error's sources, without reqwest's and hyper's wrappers (which repeat the
/// URL): e.g. `tcp connect error: Connection refused (os error 111)`.
fn cause_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        let wrapper = s.starts_with("error sending request") || s.starts_with("client error (");
        if !wrapper && !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

impl Client {
    /// A client for the hub at `url`.
    pub(crate) fn new(
        url: &str,
        token: Option<&str>,
        ca_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<Client> {
        let base = api_base(url)?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = ca_file {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading --ca-file {}", path.display()))?;
            let mut added = 0;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| {
                    Failure::new(
                        format!("--ca-file {}: not a PEM certificate: {e}", path.display()),
                        None,
                    )
                })?;
                roots.add(cert).map_err(|e| {
                    Failure::new(
                        format!("--ca-file {}: unusable CA certificate: {e}", path.display()),
                        None,
                    )
                })?;
                added += 1;
            }
            if added == 0 {
                return Err(Failure::new(
                    format!(
                        "--ca-file {} holds no certificate (-----BEGIN CERTIFICATE-----)",
                        path.display()
                    ),
                    None,
                )
                .into());
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("setting up TLS")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(Duration::from_secs(10).min(timeout))
            .timeout(timeout)
            .user_agent(concat!("ferrohub-ctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("setting up the HTTP client")?;
        Ok(Client {
            http,
            base,
            hub: url.trim().to_string(),
            token: token
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_string),
            timeout,
        })
    }

    /// The URL of `segments` under `/api/v1` (each segment percent-encoded).
    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Result<Url> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| Failure::new("the --url cannot have a path", None))?
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        Ok(url)
    }

    /// Sends a request; a non-2xx answer becomes a [`Failure`] with the API's message.
    async fn send(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Body,
    ) -> Result<reqwest::Response> {
        let token = self.token.as_deref().ok_or_else(|| {
            Failure::new(
                "no API token",
                Some(
                    "pass --token TOKEN or set FERROHUB_TOKEN; the hub prints its first admin \
                     token when it starts for the first time (or set one with FERROHUB_ADMIN_TOKEN)"
                        .into(),
                ),
            )
        })?;
        let url = self.url(segments, query)?;
        let mut req = self.http.request(method, url).bearer_auth(token);
        req = match body {
            Body::Empty => req,
            Body::Json(v) => req.json(&v),
            Body::Raw(content_type, bytes) => req.header(CONTENT_TYPE, content_type).body(bytes),
        };
        let resp = req.send().await.map_err(|e| self.transport_failure(&e))?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(self.api_failure(resp).await.into())
        }
    }

    /// Sends a request and reads the JSON answer (`null` for an empty one, e.g. 204).
    pub(crate) async fn call(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Body,
    ) -> Result<Value> {
        let resp = self.send(method, segments, query, body).await?;
        let bytes = resp.bytes().await.map_err(|e| self.transport_failure(&e))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            Failure::new(
                format!("the hub's answer is not JSON: {e}"),
                Some(format!("is {} a Ferrohub hub's HTTP address?", self.hub)),
            )
            .into()
        })
    }

    /// `GET` of a JSON document.
    pub(crate) async fn get(&self, segments: &[&str], query: &[(&str, String)]) -> Result<Value> {
        self.call(Method::GET, segments, query, Body::Empty).await
    }

    /// `GET` of a paged listing: its `items`, starting at `cursor`; with `all`, following the
    /// cursor the hub returns in `next_field` until the last page. Returns the items and the
    /// cursor of the next page (`None` on the last one).
    pub(crate) async fn get_pages(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
        mut cursor: Option<String>,
        all: bool,
        next_field: &str,
    ) -> Result<(Vec<Value>, Option<String>)> {
        let mut items = Vec::new();
        loop {
            let mut q = query.to_vec();
            if let Some(c) = &cursor {
                q.push(("cursor", c.clone()));
            }
            let page = self.get(segments, &q).await?;
            items.extend(
                page.get("items")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .cloned(),
            );
            let next = page
                .get(next_field)
                .and_then(Value::as_str)
                .filter(|c| !c.is_empty())
                .map(str::to_string);
            match next {
                Some(n) if all => {
                    if cursor.as_deref() == Some(n.as_str()) {
                        return Err(
                            Failure::new("the hub returned the same cursor twice", None).into()
                        );
                    }
                    cursor = Some(n);
                }
                next => return Ok((items, next)),
            }
        }
    }

    /// `GET` of a text document (e.g. a PEM certificate).
    pub(crate) async fn get_text(&self, segments: &[&str]) -> Result<String> {
        let resp = self.send(Method::GET, segments, &[], Body::Empty).await?;
        resp.text().await.map_err(|e| self.transport_failure(&e))
    }

    /// A request that reached no answer: refused, timed out, TLS failure.
    fn transport_failure(&self, e: &reqwest::Error) -> anyhow::Error {
        let detail = cause_text(e);
        let lower = detail.to_ascii_lowercase();
        let https = self.base.scheme() == "https";
        let failure = if e.is_timeout() {
            Failure::new(
                format!(
                    "the hub at {} did not answer within {} s",
                    self.hub,
                    self.timeout.as_secs()
                ),
                Some("is the hub overloaded or the network slow? raise --timeout".into()),
            )
        } else if e.is_connect()
            && ["certificate", "tls", "handshake", "unknownissuer"]
                .iter()
                .any(|w| lower.contains(w))
        {
            Failure::new(
                format!("the TLS connection to {} failed: {detail}", self.hub),
                Some(
                    "for a hub with a self-signed or private-CA certificate, pass --ca-file CA.pem"
                        .into(),
                ),
            )
        } else if e.is_connect() && https && lower.contains("corrupt message") {
            Failure::new(
                format!("the TLS connection to {} failed: {detail}", self.hub),
                Some("the hub seems to serve plain HTTP at this address: try http://".into()),
            )
        } else if e.is_connect() {
            Failure::new(
                format!("cannot connect to {}: {detail}", self.hub),
                Some(format!(
                    "is the hub running at {}? (set --url or FERROHUB_URL to its HTTP address)",
                    self.hub
                )),
            )
        } else {
            Failure::new(
                format!("the request to {} failed: {detail}", self.hub),
                None,
            )
        };
        failure.into()
    }

    /// An error answer: the API's message, and a hint by status.
    async fn api_failure(&self, resp: reqwest::Response) -> Failure {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let (code, message) = match serde_json::from_str::<Value>(&text) {
            Ok(v) if v.get("message").is_some_and(Value::is_string) => (
                v.get("code")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                v.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            ),
            _ => {
                let t: String = text.trim().chars().take(300).collect();
                let reason = status.canonical_reason().unwrap_or("error");
                (
                    String::new(),
                    if t.is_empty() {
                        reason.to_string()
                    } else {
                        format!("{reason}: {t}")
                    },
                )
            }
        };
        let hint = hint_for(status, &message, &self.hub);
        let code = if code.is_empty() {
            String::new()
        } else {
            format!(" {code}")
        };
        Failure::new(format!("{message} (HTTP {}{code})", status.as_u16()), hint)
    }
}

/// What to check after an error answer.
fn hint_for(status: StatusCode, message: &str, hub: &str) -> Option<String> {
    match status.as_u16() {
        401 => Some(
            "check --token / FERROHUB_TOKEN (the token is missing, wrong, expired or revoked)"
                .into(),
        ),
        403 => Some(
            "the token's role does not allow this: devices, credentials and groups need an \
             operator token; tenants, policies and tokens an admin token"
                .into(),
        ),
        404 if message.starts_with("tenant ") => Some(
            "check --tenant / FERROHUB_TENANT (a tenant-scoped token sees only its own tenant)"
                .into(),
        ),
        404 if message.starts_with("there is no route") => Some(format!(
            "is {hub} the hub's HTTP address (--url)? the hub may be older than this ctl"
        )),
        409 if message.starts_with("version conflict") => Some(
            "read the twin again (ferrohub ctl twins get) and retry with --if-match its version"
                .into(),
        ),
        409 if message.contains(" is offline") => Some(
            "send it with --queued: the hub stores it and delivers it when the device connects"
                .into(),
        ),
        413 => Some("send less at once (for imports: a smaller --chunk-size)".into()),
        500..=599 => Some("the cause is in the hub's log".into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(s: &str) -> String {
        api_base(s).map(|u| u.to_string()).unwrap_or_default()
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            base("http://127.0.0.1:8080"),
            "http://127.0.0.1:8080/api/v1"
        );
        assert_eq!(
            base("http://127.0.0.1:8080/"),
            "http://127.0.0.1:8080/api/v1"
        );
        assert_eq!(base("https://h/api/v1/"), "https://h/api/v1");
        assert_eq!(base("https://h/hub"), "https://h/hub/api/v1");
        assert!(api_base("ftp://h").is_err());
        assert!(api_base("127.0.0.1:8080").is_err());
    }

    #[test]
    fn segments_are_encoded() {
        let c = Client::new("http://h:1", Some("t"), None, Duration::from_secs(1));
        let url = c
            .and_then(|c| c.url(&["tenants", "a/b", "devices"], &[("tag", "k:v w".into())]))
            .map(|u| u.to_string())
            .unwrap_or_default();
        assert_eq!(url, "http://h:1/api/v1/tenants/a%2Fb/devices?tag=k%3Av+w");
    }
}
