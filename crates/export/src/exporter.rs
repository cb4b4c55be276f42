//! The exporter: rows in, finished files out, rolling over to a new file every
//! `max_rows_per_file` rows.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::encode::Encoder;
use crate::sink::{self, Sink};
use crate::{Destination, ExportError, ExportFormat, RowBatch};

/// S3's smallest part (except the last).
const S3_MIN_PART: usize = 5 * 1024 * 1024;
/// S3's largest part.
const S3_MAX_PART: usize = 5 * 1024 * 1024 * 1024;

/// How an export is cut into files and uploaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    /// The tenant the rows belong to (the `tenant` column).
    pub tenant: String,
    /// Rows per file; the export rolls over to `{stem}-00001.{ext}`, `{stem}-00002.{ext}`… after
    /// that many. Default 10 000 000.
    pub max_rows_per_file: u64,
    /// Rows per Parquet row group (CSV ignores it). Memory holds about one row group
    /// (~40 bytes a row plus its distinct strings), and readers skip data a row group at a time.
    /// Default 1 000 000.
    pub row_group_rows: usize,
    /// Size of the parts of a multipart upload (object stores only). S3 allows 5 MiB to 5 GiB;
    /// a file can have at most 10 000 parts, so the default 8 MiB allows files up to 78 GiB.
    pub upload_part_bytes: usize,
}

impl ExportOptions {
    /// Defaults for `tenant`.
    pub fn new(tenant: impl Into<String>) -> Self {
        Self {
            tenant: tenant.into(),
            max_rows_per_file: 10_000_000,
            row_group_rows: 1_000_000,
            upload_part_bytes: 8 * 1024 * 1024,
        }
    }
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self::new("")
    }
}

/// What a finished export produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// Rows written.
    pub rows: u64,
    /// The files, in order: local paths, or URLs (`s3://bucket/prefix/stem.parquet`).
    pub files: Vec<String>,
    /// Total size of the files.
    pub bytes: u64,
}

/// Rows written so far by an [`Exporter`], readable from any thread (for a progress bar or an
/// API's status endpoint) while the export runs.
#[derive(Debug, Clone, Default)]
pub struct Progress(Arc<AtomicU64>);

impl Progress {
    /// Rows accepted by [`Exporter::write`] so far.
    pub fn rows(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Where the files go, once the destination is set up.
enum Target {
    Local(PathBuf),
    Store {
        store: Arc<dyn ObjectStore>,
        prefix: ObjectPath,
        url: String,
        part_size: usize,
    },
}

/// The file being written.
struct OpenFile {
    /// `None` while encoding runs on the blocking pool (and after a cancelled call).
    encoder: Option<Encoder>,
    sink: Sink,
    done: Done,
    rows: u64,
}

/// A file, for the summary and for removing it if the export is abandoned.
struct Done {
    name: String,
    bytes: u64,
    place: Place,
}

enum Place {
    Local(PathBuf),
    Store(Arc<dyn ObjectStore>, ObjectPath),
}

/// Writes rows to one or more files of one format.
///
/// Files appear under their final names only once complete: locally as `name.tmp` renamed on
/// completion, in object stores as multipart uploads completed at the end. An export that fails,
/// or is dropped before [`Exporter::finish`], leaves nothing behind: the open file is discarded
/// (the upload aborted) and files finished by earlier rollovers are deleted, so a partial export
/// is never mistaken for a complete one. (After a drop, the object store requests run as
/// background tasks on the current tokio runtime.)
///
/// Memory stays at about one Parquet row group (or 64k CSV rows) plus, for object stores,
/// four upload parts, whatever the size of the export.
pub struct Exporter {
    target: Target,
    format: ExportFormat,
    stem: String,
    options: ExportOptions,
    current: Option<OpenFile>,
    done: Vec<Done>,
    progress: Progress,
    rows: u64,
    /// Set by an error: the export is over.
    failed: bool,
    /// Set by `finish`: nothing to clean up on drop.
    finished: bool,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("format", &self.format)
            .field("stem", &self.stem)
            .field("rows", &self.rows)
            .field(
                "files",
                &(self.done.len() + usize::from(self.current.is_some())),
            )
            .finish_non_exhaustive()
    }
}

impl Exporter {
    /// Starts an export of `format` files named after `file_stem` (`{stem}.parquet`, then
    /// `{stem}-00001.parquet`…) in `destination`.
    ///
    /// Creates a local folder if missing; for object stores, starts the first upload, so wrong
    /// credentials or a missing bucket fail here rather than after the first row group.
    pub async fn create(
        destination: Destination,
        format: ExportFormat,
        file_stem: &str,
        options: ExportOptions,
    ) -> Result<Self, ExportError> {
        check_stem(file_stem)?;
        if options.max_rows_per_file == 0 || options.row_group_rows == 0 {
            return Err(ExportError::BadOptions(
                "max_rows_per_file and row_group_rows must be at least 1".into(),
            ));
        }
        let target = match destination {
            Destination::Local(dir) => {
                tokio::fs::create_dir_all(&dir)
                    .await
                    .map_err(|error| ExportError::Io {
                        path: dir.clone(),
                        error,
                    })?;
                // Summaries name absolute paths: the hub's working directory means little to
                // whoever reads them.
                let dir = tokio::fs::canonicalize(&dir).await.unwrap_or(dir);
                Target::Local(dir)
            }
            Destination::S3(s3) => {
                if !(S3_MIN_PART..=S3_MAX_PART).contains(&options.upload_part_bytes) {
                    return Err(ExportError::BadOptions(format!(
                        "upload_part_bytes is {}; S3 accepts parts of 5 MiB to 5 GiB",
                        options.upload_part_bytes
                    )));
                }
                let store = s3.build()?;
                let prefix =
                    ObjectPath::parse(&s3.prefix).map_err(|e| ExportError::BadDestination {
                        input: s3.url(),
                        reason: e.to_string(),
                    })?;
                Target::Store {
                    store,
                    prefix,
                    url: s3.url(),
                    part_size: options.upload_part_bytes,
                }
            }
            Destination::Store { store, prefix, url } => Target::Store {
                store,
                prefix,
                url: url.trim_end_matches('/').to_owned(),
                part_size: options.upload_part_bytes.max(1),
            },
        };
        let mut exporter = Self {
            target,
            format,
            stem: file_stem.to_owned(),
            options,
            current: None,
            done: Vec::new(),
            progress: Progress::default(),
            rows: 0,
            failed: false,
            finished: false,
        };
        // The first file exists from the start: an export of no rows is a valid empty file.
        let result = exporter.open_next().await;
        exporter.check(result).await?;
        Ok(exporter)
    }

    /// A handle on the number of rows written so far.
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Writes the rows of `batch` (which the caller may then clear and refill).
    ///
    /// Encoding runs on tokio's blocking pool, a row group at a time; a call returns once its
    /// rows are buffered or written. After an error the export is aborted (see [`Exporter`]) and
    /// further calls fail.
    pub async fn write(&mut self, batch: &RowBatch) -> Result<(), ExportError> {
        if self.failed {
            return Err(ExportError::Aborted);
        }
        let result = self.write_rows(batch).await;
        self.check(result).await
    }

    /// Completes the files; returns what was written.
    pub async fn finish(mut self) -> Result<ExportSummary, ExportError> {
        if self.failed {
            return Err(ExportError::Aborted);
        }
        let result = self.close_current().await;
        self.check(result).await?;
        self.finished = true;
        let files = self.done.iter().map(|d| d.name.clone()).collect();
        let bytes = self.done.iter().map(|d| d.bytes).sum();
        Ok(ExportSummary {
            rows: self.rows,
            files,
            bytes,
        })
    }

    /// Abandons the export now, removing what it wrote (dropping it does the same in the
    /// background).
    pub async fn abort(mut self) {
        self.abort_now().await;
    }

    async fn write_rows(&mut self, batch: &RowBatch) -> Result<(), ExportError> {
        let mut start = 0;
        while start < batch.len() {
            if self.current.is_none() {
                self.open_next().await?;
            }
            let file = self.current.as_mut().ok_or(ExportError::Aborted)?;
            let encoder = file.encoder.as_mut().ok_or(ExportError::Aborted)?;
            let file_room = self.options.max_rows_per_file - file.rows;
            let take = (batch.len() - start)
                .min(usize::try_from(file_room).unwrap_or(usize::MAX))
                .min(encoder.room().max(1));
            encoder.push(batch, start..start + take)?;
            start += take;
            file.rows += take as u64;
            self.rows += take as u64;
            self.progress.0.store(self.rows, Ordering::Relaxed);
            let file_full = file.rows >= self.options.max_rows_per_file;
            let encoder_full = encoder.is_full();
            if file_full {
                self.close_current().await?;
            } else if encoder_full {
                self.encode_pending().await?;
            }
        }
        Ok(())
    }

    /// Opens the next file.
    async fn open_next(&mut self) -> Result<(), ExportError> {
        let index = self.done.len();
        let ext = self.format.extension();
        let name = if index == 0 {
            format!("{}.{ext}", self.stem)
        } else {
            format!("{}-{index:05}.{ext}", self.stem)
        };
        let (sink, display, place) = match &self.target {
            Target::Local(dir) => {
                let path = dir.join(&name);
                let sink = Sink::local(dir, &name).await?;
                (sink, path.display().to_string(), Place::Local(path))
            }
            Target::Store {
                store,
                prefix,
                url,
                part_size,
            } => {
                let location = prefix.clone().join(name.as_str());
                let file_url = format!("{url}/{name}");
                let sink = Sink::upload(
                    store.clone(),
                    location.clone(),
                    file_url.clone(),
                    *part_size,
                )
                .await?;
                (sink, file_url, Place::Store(store.clone(), location))
            }
        };
        let encoder = Encoder::new(
            self.format,
            &self.options.tenant,
            display.clone(),
            self.options.row_group_rows,
        )?;
        self.current = Some(OpenFile {
            encoder: Some(encoder),
            sink,
            done: Done {
                name: display,
                bytes: 0,
                place,
            },
            rows: 0,
        });
        Ok(())
    }

    /// Encodes the buffered rows of the open file and sends the bytes on.
    async fn encode_pending(&mut self) -> Result<(), ExportError> {
        let file = self.current.as_mut().ok_or(ExportError::Aborted)?;
        let mut encoder = file.encoder.take().ok_or(ExportError::Aborted)?;
        let (encoder, bytes) = tokio::task::spawn_blocking(move || {
            let bytes = encoder.encode_pending();
            (encoder, bytes)
        })
        .await
        .map_err(|e| ExportError::Task(e.to_string()))?;
        file.encoder = Some(encoder);
        file.sink.write(bytes?).await
    }

    /// Ends the open file, if any, and makes it visible under its final name.
    async fn close_current(&mut self) -> Result<(), ExportError> {
        let Some(file) = self.current.as_mut() else {
            return Ok(());
        };
        let encoder = file.encoder.take().ok_or(ExportError::Aborted)?;
        let bytes: Bytes = tokio::task::spawn_blocking(move || encoder.finish())
            .await
            .map_err(|e| ExportError::Task(e.to_string()))??;
        file.sink.write(bytes).await?;
        let Some(mut file) = self.current.take() else {
            return Err(ExportError::Aborted);
        };
        file.done.bytes = file.sink.finish().await?;
        self.done.push(file.done);
        Ok(())
    }

    /// On error, aborts the export before handing the error back.
    async fn check<T>(&mut self, result: Result<T, ExportError>) -> Result<T, ExportError> {
        if result.is_err() {
            self.abort_now().await;
        }
        result
    }

    async fn abort_now(&mut self) {
        self.failed = true;
        if let Some(file) = self.current.take() {
            file.sink.abort().await;
        }
        for done in self.done.drain(..) {
            match done.place {
                Place::Local(path) => remove_local(&path),
                Place::Store(store, location) => {
                    if let Err(e) = store.delete(&location).await {
                        tracing::warn!(url = %done.name, error = %e, "cannot delete file of an abandoned export");
                    }
                }
            }
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // The open file's sink cleans up after itself as it drops.
        self.current = None;
        for done in self.done.drain(..) {
            match done.place {
                Place::Local(path) => remove_local(&path),
                Place::Store(store, location) => {
                    sink::delete_in_background(store, location, done.name)
                }
            }
        }
    }
}

fn remove_local(path: &std::path::Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot delete file of an abandoned export");
    }
}

/// A stem names a file in a folder: no separators, nothing a shell or a store treats specially.
/// Public so that callers can refuse a bad name before starting an export.
pub fn check_stem(stem: &str) -> Result<(), ExportError> {
    let bad = |reason| {
        Err(ExportError::BadStem {
            stem: stem.to_owned(),
            reason,
        })
    };
    if stem.is_empty() || stem.len() > 200 {
        return bad("use 1 to 200 characters");
    }
    if stem.starts_with('.') {
        return bad("it may not start with a dot");
    }
    if !stem
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '='))
    {
        return bad("use letters, digits, `-`, `_`, `.` and `=` only");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hub spawns exports as tasks.
    #[test]
    fn exporter_and_its_futures_are_send() {
        fn send<T: Send>(_: T) {}
        // Compiled, not run: the futures are only built to check their type.
        let _create = || {
            let dest = Destination::Local(PathBuf::from("unused"));
            send(Exporter::create(
                dest,
                ExportFormat::Csv,
                "x",
                ExportOptions::new("t"),
            ))
        };
        let _write = |e: &mut Exporter, b: &RowBatch| send(e.write(b));
        let _finish = |e: Exporter| send(e.finish());
        let _progress = |e: &Exporter| send(e.progress());
    }

    #[test]
    fn stems() {
        for ok in ["export", "t1_2026-01-01", "year=2026", "a.b"] {
            assert!(check_stem(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "a\\b", "..", "a b", "é"] {
            assert!(check_stem(bad).is_err(), "{bad}");
        }
    }
}
