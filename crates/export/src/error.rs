//! What can go wrong with an export; each message says what to do about it.

use std::path::PathBuf;

/// An export failure.
///
/// Causes are part of the message (not a separate `source`) so that one line, as the API and the
/// CLI print it, is enough to act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The destination string does not parse.
    #[error(
        "invalid export destination `{input}`: {reason}; use a folder path, \
         file:///absolute/path or s3://bucket/prefix"
    )]
    BadDestination {
        /// What was given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The format name is not known.
    #[error("unknown export format `{0}`: use `parquet` or `csv`")]
    UnknownFormat(String),
    /// The file stem cannot name a file.
    #[error("invalid export file name `{stem}`: {reason}")]
    BadStem {
        /// What was given.
        stem: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An option is out of range.
    #[error("invalid export options: {0}")]
    BadOptions(String),
    /// An S3 destination without an access key or secret.
    #[error(
        "no S3 credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
         (and AWS_SESSION_TOKEN for temporary credentials)"
    )]
    MissingCredentials {
        /// The destination.
        url: String,
    },
    /// The S3 client cannot be built from the options.
    #[error(
        "cannot configure the S3 client for {url}: {error}; check AWS_ENDPOINT_URL, AWS_REGION \
         and AWS_ALLOW_HTTP (needed for an http:// endpoint)"
    )]
    S3Config {
        /// The destination.
        url: String,
        /// What the client said.
        error: object_store::Error,
    },
    /// A request to the object store failed.
    #[error(
        "object store error at {url}: {error}; check that the bucket exists, that the endpoint is \
         reachable and that the credentials may write there"
    )]
    Store {
        /// The object (or destination) concerned.
        url: String,
        /// What the store said.
        error: object_store::Error,
    },
    /// A local file or folder cannot be created or written.
    #[error(
        "cannot write {path}: {error}; check that the folder is writable and the disk not full"
    )]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// The Parquet encoder refused the data (a bug or an exhausted resource).
    #[error("Parquet encoding of {file} failed: {error}")]
    Parquet {
        /// The file being written.
        file: String,
        /// What the encoder said.
        error: parquet::errors::ParquetError,
    },
    /// The CSV encoder failed.
    #[error("CSV encoding of {file} failed: {error}")]
    Csv {
        /// The file being written.
        file: String,
        /// What the encoder said.
        error: csv::Error,
    },
    /// A timestamp that an RFC 3339 CSV timestamp cannot show.
    #[error(
        "timestamp {ts_ms} ms of {device}/{metric} lies outside 1970-01-01..9999-12-31, the range \
         of CSV (RFC 3339) timestamps; export to Parquet (raw milliseconds) or narrow the time range"
    )]
    TimestampOutOfRange {
        /// The timestamp in milliseconds since the Unix epoch.
        ts_ms: i64,
        /// Its device.
        device: String,
        /// Its metric.
        metric: String,
    },
    /// An earlier error (or a cancelled call) aborted this export.
    #[error("this export was aborted by an earlier error; start a new export")]
    Aborted,
    /// The background encoding task died.
    #[error("the export's encoding task failed: {0}")]
    Task(String),
}
