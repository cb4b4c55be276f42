//! Where an export goes: a local folder or an object store, parsed from a string.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;

use crate::ExportError;

/// Where the files of an export go.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A local folder, created if missing.
    Local(PathBuf),
    /// A prefix in an S3 bucket (AWS or any S3-compatible store: MinIO, Ceph, moto, R2…).
    S3(S3Destination),
    /// A prefix in an already-configured object store: for stores other than S3, and for tests
    /// (`object_store::memory::InMemory`).
    Store {
        /// The store.
        store: Arc<dyn ObjectStore>,
        /// The folder-like prefix the files go under (empty for the root).
        prefix: ObjectPath,
        /// How files are named in summaries and errors: `{url}/{file name}`.
        url: String,
    },
}

/// A prefix in an S3 bucket and how to reach it.
#[derive(Debug, Clone)]
pub struct S3Destination {
    /// The bucket.
    pub bucket: String,
    /// The prefix files go under, without leading or trailing `/` (empty for the bucket's root).
    pub prefix: String,
    /// Endpoint, region and credentials.
    pub options: S3Options,
}

impl S3Destination {
    /// `s3://bucket/prefix`.
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    /// The configured client. Fails without credentials: object_store would otherwise fall back
    /// to the cloud instance-metadata service, which hangs for minutes outside a cloud VM.
    pub(crate) fn build(&self) -> Result<Arc<dyn ObjectStore>, ExportError> {
        let o = &self.options;
        let (Some(key), Some(secret)) = (&o.access_key_id, &o.secret_access_key) else {
            return Err(ExportError::MissingCredentials { url: self.url() });
        };
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_region(o.region.as_deref().unwrap_or("us-east-1"))
            .with_access_key_id(key)
            .with_secret_access_key(secret)
            .with_allow_http(o.allow_http)
            // bucket.host names do not resolve for MinIO/moto-style endpoints; path style works
            // everywhere, AWS included.
            .with_virtual_hosted_style_request(false);
        if let Some(token) = &o.session_token {
            builder = builder.with_token(token);
        }
        if let Some(endpoint) = &o.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let store = builder.build().map_err(|error| ExportError::S3Config {
            url: self.url(),
            error,
        })?;
        Ok(Arc::new(store))
    }
}

/// How to reach an S3-compatible store.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// Endpoint URL (`http://127.0.0.1:9000`); `None` means AWS itself.
    pub endpoint: Option<String>,
    /// Region; `None` means `us-east-1` (what most S3-compatible stores expect).
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Session token of temporary credentials.
    pub session_token: Option<String>,
    /// Whether a plain `http://` endpoint is allowed.
    pub allow_http: bool,
}

impl S3Options {
    /// Reads the usual variables: `AWS_ENDPOINT_URL`, `AWS_REGION` (else `AWS_DEFAULT_REGION`),
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN` and `AWS_ALLOW_HTTP`
    /// (`true`/`1`). An `http://` endpoint implies `allow_http` (it could not work otherwise).
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`S3Options::from_env`] over any source of variables.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Self {
        let var = |name: &str| var(name).filter(|v| !v.is_empty());
        let endpoint = var("AWS_ENDPOINT_URL");
        let allow_http = var("AWS_ALLOW_HTTP")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
            .unwrap_or(false)
            || endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://"));
        Self {
            endpoint,
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")),
            access_key_id: var("AWS_ACCESS_KEY_ID"),
            secret_access_key: var("AWS_SECRET_ACCESS_KEY"),
            session_token: var("AWS_SESSION_TOKEN"),
            allow_http,
        }
    }
}

// Secrets stay out of logs.
impl fmt::Debug for S3Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redact(&self.secret_access_key))
            .field("session_token", &redact(&self.session_token))
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

impl Destination {
    /// Parses a destination; `s3://` destinations take their options from [`S3Options::from_env`].
    ///
    /// Accepted: a path (`exports`, `/var/lib/ferrohub/exports`), `file:///absolute/path`, and
    /// `s3://bucket` or `s3://bucket/prefix/parts`.
    pub fn parse(input: &str) -> Result<Self, ExportError> {
        Self::parse_with(input, S3Options::from_env)
    }

    /// Parses a destination; `s3://` destinations take `s3()`'s options.
    pub fn parse_with(input: &str, s3: impl FnOnce() -> S3Options) -> Result<Self, ExportError> {
        let bad = |reason: &str| ExportError::BadDestination {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        if input.trim().is_empty() {
            return Err(bad("it is empty"));
        }
        let scheme = input
            .split_once("://")
            .map(|(scheme, _)| scheme.to_ascii_lowercase());
        match scheme.as_deref() {
            None if input.to_ascii_lowercase().starts_with("file:") => {
                Err(bad("a file URL needs three slashes: file:///absolute/path"))
            }
            None => Ok(Destination::Local(PathBuf::from(input))),
            Some("file") => {
                let url = url::Url::parse(input).map_err(|e| bad(&e.to_string()))?;
                let path = url
                    .to_file_path()
                    .map_err(|()| bad("a file URL names a local absolute path: file:///path"))?;
                Ok(Destination::Local(path))
            }
            Some("s3") => {
                let rest = &input["s3://".len()..];
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                check_bucket(bucket).map_err(bad)?;
                let prefix = prefix.trim_matches('/');
                if !prefix.is_empty() {
                    ObjectPath::parse(prefix)
                        .map_err(|e| bad(&format!("bad prefix `{prefix}`: {e}")))?;
                }
                Ok(Destination::S3(S3Destination {
                    bucket: bucket.to_owned(),
                    prefix: prefix.to_owned(),
                    options: s3(),
                }))
            }
            Some(other) => Err(bad(&format!("unsupported scheme `{other}://`"))),
        }
    }

    /// The destination as a URL or path, for messages.
    pub fn url(&self) -> String {
        match self {
            Destination::Local(path) => path.display().to_string(),
            Destination::S3(s3) => s3.url(),
            Destination::Store { url, .. } => url.clone(),
        }
    }
}

impl FromStr for Destination {
    type Err = ExportError;

    /// See [`Destination::parse`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// S3's bucket naming rules (the subset that matters for a path-style URL).
fn check_bucket(bucket: &str) -> Result<(), &'static str> {
    if bucket.is_empty() {
        return Err("the bucket name is missing: s3://bucket/prefix");
    }
    if !(3..=63).contains(&bucket.len()) {
        return Err("a bucket name has 3 to 63 characters");
    }
    let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !bucket.chars().all(valid) || !alnum(bucket.chars().next()) || !alnum(bucket.chars().last())
    {
        return Err(
            "a bucket name has lowercase letters, digits, dots and hyphens, and starts and ends \
             with a letter or digit",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> S3Options {
        S3Options {
            endpoint: Some("http://127.0.0.1:9".into()),
            access_key_id: Some("k".into()),
            secret_access_key: Some("s".into()),
            ..S3Options::default()
        }
    }

    #[test]
    fn parses_local_paths_and_file_urls() {
        for (input, path) in [
            ("exports", "exports"),
            ("./a/b", "./a/b"),
            ("/var/x", "/var/x"),
            ("file:///var/x%20y", "/var/x y"),
            ("FILE:///tmp", "/tmp"),
        ] {
            match Destination::parse_with(input, opts) {
                Ok(Destination::Local(p)) => assert_eq!(p, PathBuf::from(path), "{input}"),
                other => panic!("{input}: {other:?}"),
            }
        }
    }

    #[test]
    fn parses_s3_urls() {
        for (input, bucket, prefix) in [
            ("s3://my-bucket", "my-bucket", ""),
            ("s3://my-bucket/", "my-bucket", ""),
            ("s3://b.example/a/b/", "b.example", "a/b"),
            ("S3://abc/x", "abc", "x"),
        ] {
            match Destination::parse_with(input, opts) {
                Ok(Destination::S3(d)) => {
                    assert_eq!((d.bucket.as_str(), d.prefix.as_str()), (bucket, prefix));
                    assert_eq!(d.options, opts());
                }
                other => panic!("{input}: {other:?}"),
            }
        }
    }

    #[test]
    fn refuses_bad_destinations_with_a_hint() {
        for (input, hint) in [
            ("", "empty"),
            ("s3://", "bucket name is missing"),
            ("s3://Upper/x", "lowercase"),
            ("s3://ab", "3 to 63"),
            ("s3://bucket/a//b", "bad prefix"),
            ("gs://bucket/x", "unsupported scheme `gs://`"),
            ("file:/tmp/x", "three slashes"),
            ("file://host/tmp/x", "local absolute path"),
        ] {
            let err = match Destination::parse_with(input, opts) {
                Err(e) => e.to_string(),
                Ok(d) => panic!("{input}: accepted as {d:?}"),
            };
            assert!(err.contains(hint), "{input}: {err}");
            assert!(err.contains("s3://bucket/prefix"), "{err}");
        }
    }

    #[test]
    fn options_from_variables() {
        let vars = [
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:5000"),
            ("AWS_DEFAULT_REGION", "eu-west-3"),
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "SECRET"),
            ("AWS_SESSION_TOKEN", ""),
        ];
        let o = S3Options::from_lookup(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        });
        assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:5000"));
        assert_eq!(o.region.as_deref(), Some("eu-west-3"));
        assert_eq!(o.access_key_id.as_deref(), Some("AKID"));
        assert_eq!(o.session_token, None);
        assert!(o.allow_http, "an http endpoint implies allow_http");
        assert!(!format!("{o:?}").contains("SECRET"));

        let none = S3Options::from_lookup(|_| None);
        assert_eq!(none, S3Options::default());
        let d = S3Destination {
            bucket: "bkt".into(),
            prefix: "p".into(),
            options: none,
        };
        let err = d.build().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            err.contains("s3://bkt/p") && err.contains("AWS_ACCESS_KEY_ID"),
            "{err}"
        );
    }
}
