//! Recorded telemetry for `ferrohub sim replay`: CSV files read as one stream of messages, one
//! per (device, timestamp), in time order.
//!
//! # Layouts (detected from the header)
//!
//! * **Export**: what `ferrohub ctl telemetry export --format csv` writes,
//!   `tenant,device,metric,ts,value,type`: one value per row, `type` one of `float`, `int`,
//!   `bool`, `string` (the kind is kept exactly). `tenant` is ignored (the replay's credentials
//!   decide the tenant); without a `type` column values are inferred as in the wide layout.
//! * **Wide**: `ts,device,<metric>,<metric>,...` (the time column may also be called `time` or
//!   `timestamp`; columns in any order): one row per (device, time), one column per metric. Values
//!   are inferred: `true`/`false` a boolean, an integer an integer, a number a float, anything
//!   else a string; an empty cell is no value.
//!
//! Timestamps are RFC 3339 (`2026-01-01T00:00:00.000Z`, `+02:00` offsets allowed; no offset means
//! UTC) or integer milliseconds since the Unix epoch. A file ending in `.gz` is gunzipped.
//!
//! A **Parquet** file of the hub's export (`PARQUET_SCHEMA` of `ferrohub-export`: `device`,
//! `metric`, `ts` and one of `value_float`, `value_int`, `value_bool`, `value_str`; recognised by
//! its magic bytes) is first converted, row group by row group, into an anonymous temporary CSV
//! of the export layout, which is then read like any export (bad rows are reported with the line
//! of that CSV: row N of the Parquet file is line N + 1). That costs disk (the CSV is several
//! times the Parquet file's size), not memory.
//!
//! # Memory
//!
//! A first pass ([`Recording::scan`]) checks every row (reporting bad ones with their line), lists
//! the devices and splits each file into *runs*: stretches in which time does not go backwards. A
//! file sorted by time is one run; an export is sorted by series (device, metric), then time, so
//! it is one run per series. The second pass ([`Recording::messages`]) merges the runs by time
//! (a k-way merge): each run has its own reader over its byte range of the file (positional
//! reads, one shared file handle) with a buffer of 64 MiB / runs (1–64 KiB), so memory is bounded
//! by the number of runs, not the file's size; files with more than `max_runs` runs (neither
//! sorted by time nor by series) are refused. The rows that share one timestamp are held together
//! to be grouped per device. A gzipped file with more than one run is decompressed into an
//! anonymous temporary file for each merge (each `--loop`; gzip cannot be read from the middle).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferrohub_types::telemetry::MAX_METRIC_LEN;
use thiserror::Error;

use super::generate::Value;

/// Default limit on the runs of increasing time a recording may be split into.
pub const DEFAULT_MAX_RUNS: usize = 100_000;
/// Read buffers of all runs together.
const BUFFER_BUDGET: usize = 64 << 20;
const MIN_RUN_BUFFER: usize = 1 << 10;
const MAX_RUN_BUFFER: usize = 64 << 10;
/// The hub takes at most 10,000 samples from one payload (`[telemetry.limits] max_samples`): a
/// device with more metrics at one instant gets several messages.
pub const MAX_VALUES_PER_MESSAGE: usize = 10_000;

/// Why a recording cannot be read.
#[derive(Debug, Error)]
pub enum RecordingError {
    /// Opening or reading a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The CSV reader failed (other than on one row).
    #[error("{}: {source}", path.display())]
    Csv {
        /// The file.
        path: PathBuf,
        /// The error.
        source: csv::Error,
    },
    /// The header matches no layout.
    #[error("{}: unknown format: {reason}", path.display())]
    UnknownFormat {
        /// The file.
        path: PathBuf,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// A bad row, with `--strict`.
    #[error("{0}")]
    BadRow(BadRow),
    /// A Parquet file could not be read.
    #[error("{}: reading Parquet: {source}", path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The error.
        source: parquet::errors::ParquetError,
    },
    /// Time goes backwards too often to merge.
    #[error(
        "{}: time goes backwards more than {limit} times: the file is sorted neither by time nor \
         by series (device, metric); sort it by time first (or raise --max-runs)",
        path.display()
    )]
    TooManyRuns {
        /// The file.
        path: PathBuf,
        /// The limit.
        limit: usize,
    },
}

/// A row that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// The file.
    pub path: PathBuf,
    /// Its line (1-based; the header is line 1).
    pub line: u64,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for BadRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.reason)
    }
}

/// How a file's columns map onto rows.
#[derive(Debug, Clone)]
enum Layout {
    /// One value per row (the hub's export).
    Export {
        device: usize,
        metric: usize,
        ts: usize,
        value: usize,
        kind: Option<usize>,
    },
    /// One row per (device, time), a column per metric.
    Wide {
        device: usize,
        ts: usize,
        metrics: Vec<(usize, Arc<str>)>,
    },
}

impl Layout {
    fn name(&self) -> &'static str {
        match self {
            Layout::Export { .. } => "export",
            Layout::Wide { .. } => "wide",
        }
    }

    /// Detects the layout from the header.
    fn detect(path: &Path, header: &csv::StringRecord) -> Result<Layout, RecordingError> {
        let unknown = |reason: String| RecordingError::UnknownFormat {
            path: path.to_path_buf(),
            reason,
        };
        let names: Vec<&str> = header
            .iter()
            .enumerate()
            // A UTF-8 byte order mark would otherwise stick to the first name.
            .map(|(i, n)| {
                if i == 0 {
                    n.trim_start_matches('\u{feff}')
                } else {
                    n
                }
            })
            .map(str::trim)
            .collect();
        let find = |want: &[&str]| {
            names
                .iter()
                .position(|n| want.iter().any(|w| n.eq_ignore_ascii_case(w)))
        };
        const EXPORT: [&str; 6] = ["tenant", "device", "metric", "ts", "value", "type"];
        const TS: [&str; 3] = ["ts", "time", "timestamp"];
        let expected = "expected the header of `ferrohub ctl telemetry export --format csv` \
                        (tenant,device,metric,ts,value,type) or a wide CSV (ts,device,<metric>,...)";
        if let (Some(device), Some(metric), Some(ts), Some(value)) = (
            find(&["device"]),
            find(&["metric"]),
            find(&["ts"]),
            find(&["value"]),
        ) && names
            .iter()
            .all(|n| EXPORT.iter().any(|e| n.eq_ignore_ascii_case(e)))
        {
            return Ok(Layout::Export {
                device,
                metric,
                ts,
                value,
                kind: find(&["type"]),
            });
        }
        let (Some(device), Some(ts)) = (find(&["device"]), find(&TS)) else {
            return Err(unknown(format!(
                "the header {:?} has no {}; {expected}",
                names.join(","),
                if find(&TS).is_none() {
                    "ts column"
                } else {
                    "device column"
                }
            )));
        };
        let mut metrics: Vec<(usize, Arc<str>)> = Vec::new();
        for (i, n) in names.iter().enumerate() {
            if i == device || i == ts {
                continue;
            }
            check_metric(n).map_err(|e| unknown(format!("column {}: {e}", i + 1)))?;
            if metrics.iter().any(|(_, m)| &**m == *n) {
                return Err(unknown(format!("metric column {n:?} appears twice")));
            }
            metrics.push((i, Arc::from(*n)));
        }
        if metrics.is_empty() {
            return Err(unknown(format!("no metric columns; {expected}")));
        }
        Ok(Layout::Wide {
            device,
            ts,
            metrics,
        })
    }
}

fn check_metric(m: &str) -> Result<(), String> {
    if m.is_empty() || m.len() > MAX_METRIC_LEN || m.chars().any(char::is_control) {
        return Err(format!(
            "metric name {m:?} is not 1-{MAX_METRIC_LEN} bytes without control characters"
        ));
    }
    Ok(())
}

fn check_device(d: &str) -> Result<(), String> {
    // The id is the MQTT client id and a topic level: no wildcards, separators or controls.
    if d.is_empty()
        || d.len() > 128
        || d.contains(['/', '+', '#'])
        || d.chars().any(char::is_control)
    {
        return Err(format!(
            "device id {d:?} is not 1-128 characters without / + # or control characters"
        ));
    }
    Ok(())
}

/// A timestamp: integer milliseconds since the epoch, or RFC 3339.
pub fn parse_ts(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let bad = || format!("timestamp {s:?} is neither RFC 3339 nor epoch milliseconds");
    // humantime reads UTC times only: take a numeric offset off and apply it ourselves.
    let (base, offset_min) = match s.len().checked_sub(6) {
        Some(i) if i >= 19 && matches!(s.as_bytes().get(i), Some(b'+' | b'-')) => {
            let (base, tail) = (s.get(..i).ok_or_else(bad)?, s.get(i..).ok_or_else(bad)?);
            let sign = if tail.starts_with('-') { -1 } else { 1 };
            let hh: i64 = tail
                .get(1..3)
                .and_then(|h| h.parse().ok())
                .ok_or_else(bad)?;
            let mm: i64 = tail
                .get(4..6)
                .and_then(|m| m.parse().ok())
                .ok_or_else(bad)?;
            if tail.as_bytes().get(3) != Some(&b':') || hh > 23 || mm > 59 {
                return Err(bad());
            }
            (base, sign * (hh * 60 + mm))
        }
        _ => (s, 0),
    };
    let t = humantime::parse_rfc3339_weak(base).map_err(|_| bad())?;
    let d = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("timestamp {s:?} is before 1970"))?;
    let ms = i64::try_from(d.as_millis()).map_err(|_| bad())?;
    Ok(ms - offset_min * 60_000)
}

/// A value of unknown kind: boolean, integer, float or string; empty (or blank) is none.
/// Spaces around a boolean or a number are ignored (`21.5, 3` as hand-written CSV has them); a
/// string is kept exactly.
fn infer(s: &str) -> Result<Option<Value>, String> {
    let t = s.trim();
    if t.is_empty() {
        return Ok(None);
    }
    Ok(Some(match t {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => {
            if let Ok(i) = t.parse::<i64>() {
                Value::Int(i)
            } else if let Ok(f) = t.parse::<f64>() {
                finite(f, s)?
            } else {
                Value::Str(Arc::from(s))
            }
        }
    }))
}

fn finite(f: f64, s: &str) -> Result<Value, String> {
    if f.is_finite() {
        Ok(Value::Float(f))
    } else {
        Err(format!(
            "value {s:?} is not finite (the hub refuses NaN and infinities)"
        ))
    }
}

/// A value of the export's `type`.
fn typed(s: &str, kind: &str) -> Result<Value, String> {
    let bad = || format!("value {s:?} is not of type {kind}");
    Ok(match kind {
        "float" => finite(s.trim().parse::<f64>().map_err(|_| bad())?, s)?,
        "int" => Value::Int(s.trim().parse().map_err(|_| bad())?),
        "bool" => match s.trim() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(bad()),
        },
        "string" => Value::Str(Arc::from(s)),
        other => {
            return Err(format!("type {other:?} is not float, int, bool or string"));
        }
    })
}

/// One usable row: a device's values at one time.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Milliseconds since the epoch.
    pub ts: i64,
    /// Index in [`Recording::devices`].
    pub device: u32,
    /// Metric names and values.
    pub values: Vec<(Arc<str>, Value)>,
}

/// The recording's devices, in order of first appearance.
#[derive(Debug, Default)]
pub struct Devices {
    names: Vec<Arc<str>>,
    index: HashMap<Arc<str>, u32>,
}

impl Devices {
    /// Device ids, by index.
    pub fn names(&self) -> &[Arc<str>] {
        &self.names
    }

    fn get(&self, d: &str) -> Option<u32> {
        self.index.get(d).copied()
    }

    fn intern(&mut self, d: &str) -> u32 {
        if let Some(i) = self.index.get(d) {
            return *i;
        }
        let i = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        let name: Arc<str> = Arc::from(d);
        self.names.push(name.clone());
        self.index.insert(name, i);
        i
    }
}

/// Turns CSV records of one file into rows.
struct Parser {
    layout: Layout,
    /// Metric names seen (export layout), shared by all their rows.
    metrics: HashMap<Box<str>, Arc<str>>,
}

impl Parser {
    fn new(layout: Layout) -> Parser {
        Parser {
            layout,
            metrics: HashMap::new(),
        }
    }

    /// The row of `rec` (`Ok(None)`: a row without values), its device looked up by `device`.
    fn parse(
        &mut self,
        rec: &csv::StringRecord,
        device: &mut dyn FnMut(&str) -> Option<u32>,
    ) -> Result<Option<Row>, String> {
        let field = |i: usize| {
            rec.get(i)
                .ok_or_else(|| format!("{} fields, expected at least {}", rec.len(), i + 1))
        };
        match &self.layout {
            Layout::Export {
                device: d,
                metric,
                ts,
                value,
                kind,
            } => {
                let ts = parse_ts(field(*ts)?)?;
                let dev = field(*d)?.trim();
                check_device(dev)?;
                let m = field(*metric)?;
                check_metric(m)?;
                let raw = field(*value)?;
                let v = match kind {
                    Some(k) => typed(raw, field(*k)?.trim())?,
                    None => match infer(raw)? {
                        Some(v) => v,
                        None => return Ok(None),
                    },
                };
                let m = match self.metrics.get(m) {
                    Some(m) => m.clone(),
                    None => {
                        let a: Arc<str> = Arc::from(m);
                        self.metrics.insert(Box::from(m), a.clone());
                        a
                    }
                };
                let Some(device) = device(dev) else {
                    return Ok(None);
                };
                Ok(Some(Row {
                    ts,
                    device,
                    values: vec![(m, v)],
                }))
            }
            Layout::Wide {
                device: d,
                ts,
                metrics,
            } => {
                let ts = parse_ts(field(*ts)?)?;
                let dev = field(*d)?.trim();
                check_device(dev)?;
                let mut values = Vec::with_capacity(metrics.len());
                for (i, m) in metrics {
                    // A short row leaves its last metrics empty, as spreadsheets write them.
                    let raw = rec.get(*i).unwrap_or("");
                    if let Some(v) = infer(raw).map_err(|e| format!("{m}: {e}"))? {
                        values.push((m.clone(), v));
                    }
                }
                if rec.len() > metrics.len() + 2 {
                    return Err(format!(
                        "{} fields, the header has {}",
                        rec.len(),
                        metrics.len() + 2
                    ));
                }
                if values.is_empty() {
                    return Ok(None);
                }
                let Some(device) = device(dev) else {
                    return Ok(None);
                };
                Ok(Some(Row { ts, device, values }))
            }
        }
    }
}

/// A stretch of a file in which time does not go backwards.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Byte offset of its first record (in the decompressed stream for .gz).
    start: u64,
    /// Byte offset after its last record (`u64::MAX`: the end of the file).
    end: u64,
}

/// Where a file's CSV comes from.
#[derive(Debug)]
enum Source {
    /// The file itself (`gz`: gunzipped on the fly).
    File { gz: bool },
    /// A Parquet file converted into an anonymous temporary CSV.
    Converted(Arc<File>),
}

/// One file of a recording, as the first pass saw it.
#[derive(Debug)]
struct FileIndex {
    path: PathBuf,
    source: Source,
    layout: Layout,
    runs: Vec<Run>,
}

/// What the first pass found in a recording (one or more files replayed as one).
#[derive(Debug)]
pub struct Recording {
    files: Vec<FileIndex>,
    /// The devices.
    pub devices: Arc<Devices>,
    /// Earliest timestamp (ms).
    pub first_ts: i64,
    /// Latest timestamp (ms).
    pub last_ts: i64,
    /// Usable rows.
    pub rows: u64,
    /// Values in them.
    pub values: u64,
    /// Rows skipped (bad).
    pub bad_rows: u64,
}

/// How the first pass treats bad rows and unsorted files.
#[derive(Debug, Clone, Copy)]
pub struct ScanOptions {
    /// Fail at the first bad row instead of skipping it.
    pub strict: bool,
    /// Most runs of increasing time (over all files).
    pub max_runs: usize,
}

fn open(path: &Path) -> Result<(Box<dyn Read + Send>, bool), RecordingError> {
    let file = File::open(path).map_err(|source| RecordingError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let gz = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"));
    let buffered = BufReader::with_capacity(256 * 1024, file);
    Ok(if gz {
        (Box::new(flate2::read::MultiGzDecoder::new(buffered)), true)
    } else {
        (Box::new(buffered), false)
    })
}

/// Whether `path` starts with Parquet's magic bytes.
fn is_parquet(path: &Path) -> Result<bool, RecordingError> {
    let mut magic = [0u8; 4];
    let mut f = File::open(path).map_err(|source| RecordingError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(f.read_exact(&mut magic).is_ok() && &magic == b"PAR1")
}

/// Converts a Parquet export into a temporary CSV of the export layout (epoch-millisecond
/// times, floats written to round-trip), streaming row group by row group.
fn parquet_to_csv(path: &Path) -> Result<File, RecordingError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let io_err = |source| RecordingError::Io {
        path: path.to_path_buf(),
        source,
    };
    let pq = |source| RecordingError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let reader = SerializedFileReader::new(File::open(path).map_err(io_err)?).map_err(pq)?;
    let columns: Vec<String> = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    for want in ["device", "metric", "ts"] {
        if !columns.iter().any(|c| c == want) {
            return Err(RecordingError::UnknownFormat {
                path: path.to_path_buf(),
                reason: format!(
                    "a Parquet file without a `{want}` column; expected the hub's export \
                     (tenant, device, metric, ts, value_float, value_int, value_bool, value_str)"
                ),
            });
        }
    }
    let tmp = tempfile::tempfile().map_err(io_err)?;
    let mut w = csv::Writer::from_writer(io::BufWriter::with_capacity(256 * 1024, tmp));
    let csv_err = |source| RecordingError::Csv {
        path: path.to_path_buf(),
        source,
    };
    w.write_record(["device", "metric", "ts", "value", "type"])
        .map_err(csv_err)?;
    let (mut device, mut metric, mut ts, mut value) =
        (String::new(), String::new(), String::new(), String::new());
    for row in reader.get_row_iter(None).map_err(pq)? {
        let row = row.map_err(pq)?;
        let mut kind = "";
        for s in [&mut device, &mut metric, &mut ts, &mut value] {
            s.clear();
        }
        for (name, field) in row.get_column_iter() {
            match (name.as_str(), field) {
                ("device", Field::Str(d)) => device.push_str(d),
                ("metric", Field::Str(m)) => metric.push_str(m),
                ("ts", Field::TimestampMillis(t) | Field::Long(t)) => ts = t.to_string(),
                ("value_float", Field::Double(f)) => (value, kind) = (format!("{f:?}"), "float"),
                ("value_int", Field::Long(i)) => (value, kind) = (i.to_string(), "int"),
                ("value_bool", Field::Bool(b)) => (value, kind) = (b.to_string(), "bool"),
                ("value_str", Field::Str(v)) => (value, kind) = (v.clone(), "string"),
                _ => {}
            }
        }
        // A row without a value keeps an empty type: the first pass reports it.
        w.write_record([&*device, &*metric, &*ts, &*value, kind])
            .map_err(csv_err)?;
    }
    let buffered = w.into_inner().map_err(|e| io_err(e.into_error()))?;
    buffered.into_inner().map_err(|e| io_err(e.into_error()))
}

fn csv_reader<R: Read>(r: R, capacity: usize) -> csv::Reader<R> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .buffer_capacity(capacity)
        .from_reader(r)
}

impl Recording {
    /// The first pass: reads every file once, reports each bad row to `on_bad` (or fails on it
    /// when `strict`), and indexes the runs.
    pub fn scan(
        paths: &[PathBuf],
        opts: ScanOptions,
        on_bad: &mut dyn FnMut(&BadRow),
    ) -> Result<Recording, RecordingError> {
        let mut devices = Devices::default();
        let mut files = Vec::with_capacity(paths.len());
        let (mut first_ts, mut last_ts) = (i64::MAX, i64::MIN);
        let (mut rows, mut values, mut bad_rows) = (0u64, 0u64, 0u64);
        let mut total_runs = 0usize;
        for path in paths {
            let gz = path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gz"));
            let (read, source): (Box<dyn Read + Send>, Source) = if !gz && is_parquet(path)? {
                let csv = Arc::new(parquet_to_csv(path)?);
                let read = RangeRead {
                    file: csv.clone(),
                    pos: 0,
                    end: u64::MAX,
                };
                (Box::new(read), Source::Converted(csv))
            } else {
                let (read, gz) = open(path)?;
                (read, Source::File { gz })
            };
            let mut peek = io::BufReader::new(read);
            let magic = io::BufRead::fill_buf(&mut peek)
                .map_err(|source| RecordingError::Io {
                    path: path.clone(),
                    source,
                })?
                .get(..4)
                .map(<[u8]>::to_vec);
            if magic.as_deref() == Some(b"PAR1") {
                return Err(RecordingError::UnknownFormat {
                    path: path.clone(),
                    reason: "a gzipped Parquet file: gunzip it first".into(),
                });
            }
            let mut rdr = csv_reader(peek, MAX_RUN_BUFFER);
            let mut rec = csv::StringRecord::new();
            let csv_err = |source: csv::Error| RecordingError::Csv {
                path: path.clone(),
                source,
            };
            if !rdr.read_record(&mut rec).map_err(csv_err)? {
                return Err(RecordingError::UnknownFormat {
                    path: path.clone(),
                    reason: "the file is empty; expected a CSV header".into(),
                });
            }
            let layout = Layout::detect(path, &rec)?;
            let mut parser = Parser::new(layout.clone());
            let mut runs: Vec<Run> = Vec::new();
            let mut prev = i64::MIN;
            loop {
                let (line, start, result) = match rdr.read_record(&mut rec) {
                    Ok(false) => break,
                    Ok(true) => {
                        let (line, byte) = rec.position().map_or((0, 0), |p| (p.line(), p.byte()));
                        let parsed = parser.parse(&rec, &mut |d| Some(devices.intern(d)));
                        (line, byte, parsed)
                    }
                    // A row that is not UTF-8: the reader goes on with the next one.
                    Err(e) if matches!(e.kind(), csv::ErrorKind::Utf8 { .. }) => {
                        let line = e.position().map_or(0, csv::Position::line);
                        (line, 0, Err("not valid UTF-8".to_string()))
                    }
                    Err(e) => return Err(csv_err(e)),
                };
                match result {
                    Ok(Some(row)) => {
                        if row.ts < prev || runs.is_empty() {
                            if let Some(last) = runs.last_mut() {
                                last.end = start;
                            }
                            total_runs += 1;
                            if total_runs > opts.max_runs {
                                return Err(RecordingError::TooManyRuns {
                                    path: path.clone(),
                                    limit: opts.max_runs,
                                });
                            }
                            runs.push(Run {
                                start,
                                end: u64::MAX,
                            });
                        }
                        prev = row.ts;
                        first_ts = first_ts.min(row.ts);
                        last_ts = last_ts.max(row.ts);
                        rows += 1;
                        values += row.values.len() as u64;
                    }
                    Ok(None) => {}
                    Err(reason) => {
                        let bad = BadRow {
                            path: path.clone(),
                            line,
                            reason,
                        };
                        if opts.strict {
                            return Err(RecordingError::BadRow(bad));
                        }
                        bad_rows += 1;
                        on_bad(&bad);
                    }
                }
            }
            files.push(FileIndex {
                path: path.clone(),
                source,
                layout,
                runs,
            });
        }
        Ok(Recording {
            files,
            devices: Arc::new(devices),
            first_ts: if rows == 0 { 0 } else { first_ts },
            last_ts: if rows == 0 { 0 } else { last_ts },
            rows,
            values,
            bad_rows,
        })
    }

    /// Layout names of the files (`export`, `wide`), in file order.
    pub fn layouts(&self) -> Vec<&'static str> {
        self.files.iter().map(|f| f.layout.name()).collect()
    }

    /// Runs of increasing time over all files.
    pub fn runs(&self) -> usize {
        self.files.iter().map(|f| f.runs.len()).sum()
    }

    /// The second pass: the recording's messages in time order (a k-way merge of the runs).
    pub fn messages(&self) -> Result<Messages, RecordingError> {
        let per_run = (BUFFER_BUDGET / self.runs().max(1)).clamp(MIN_RUN_BUFFER, MAX_RUN_BUFFER);
        let mut cursors = Vec::with_capacity(self.runs());
        for f in &self.files {
            if f.runs.is_empty() {
                continue;
            }
            let io_err = |source| RecordingError::Io {
                path: f.path.clone(),
                source,
            };
            let shared: Arc<File> = if let Source::Converted(csv) = &f.source {
                csv.clone()
            } else if let Source::File { gz: true } = f.source {
                if f.runs.len() == 1 {
                    // One run: stream the decompressed file from its first record.
                    let (read, _) = open(&f.path)?;
                    let mut skip = read.take(f.runs[0].start);
                    io::copy(&mut skip, &mut io::sink()).map_err(io_err)?;
                    let read = skip.into_inner();
                    cursors.push(Cursor::new(f, read, MAX_RUN_BUFFER, self.devices.clone()));
                    continue;
                }
                let (mut read, _) = open(&f.path)?;
                let mut tmp = tempfile::tempfile().map_err(io_err)?;
                io::copy(&mut read, &mut tmp).map_err(io_err)?;
                Arc::new(tmp)
            } else {
                Arc::new(File::open(&f.path).map_err(io_err)?)
            };
            for run in &f.runs {
                let read = RangeRead {
                    file: shared.clone(),
                    pos: run.start,
                    end: run.end,
                };
                cursors.push(Cursor::new(
                    f,
                    Box::new(read),
                    per_run,
                    self.devices.clone(),
                ));
            }
        }
        let mut heap = BinaryHeap::with_capacity(cursors.len());
        for (i, c) in cursors.iter_mut().enumerate() {
            if let Some(ts) = c.advance()? {
                heap.push(Reverse((ts, i)));
            }
        }
        Ok(Messages {
            cursors,
            heap,
            slice: Vec::new(),
            out: VecDeque::new(),
        })
    }
}

/// Reads `file` from `pos` to `end` with positional reads (no shared seek position).
struct RangeRead {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl Read for RangeRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = usize::try_from(self.end.saturating_sub(self.pos)).unwrap_or(usize::MAX);
        let want = buf.len().min(left);
        if want == 0 {
            return Ok(0);
        }
        let n = read_at(&self.file, &mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(unix)]
fn read_at(f: &File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(f, buf, pos)
}

#[cfg(windows)]
fn read_at(f: &File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(f, buf, pos)
}

/// One run being read.
struct Cursor {
    path: PathBuf,
    reader: csv::Reader<Box<dyn Read + Send>>,
    parser: Parser,
    devices: Arc<Devices>,
    record: csv::StringRecord,
    next: Option<Row>,
}

impl Cursor {
    fn new(
        f: &FileIndex,
        read: Box<dyn Read + Send>,
        capacity: usize,
        devices: Arc<Devices>,
    ) -> Cursor {
        Cursor {
            path: f.path.clone(),
            reader: csv_reader(read, capacity),
            parser: Parser::new(f.layout.clone()),
            devices,
            record: csv::StringRecord::new(),
            next: None,
        }
    }

    /// Reads the run's next usable row (bad rows were reported by the first pass); its time.
    fn advance(&mut self) -> Result<Option<i64>, RecordingError> {
        loop {
            match self.reader.read_record(&mut self.record) {
                Ok(false) => {
                    self.next = None;
                    return Ok(None);
                }
                Ok(true) => {
                    let devices = &self.devices;
                    if let Ok(Some(row)) = self.parser.parse(&self.record, &mut |d| devices.get(d))
                    {
                        let ts = row.ts;
                        self.next = Some(row);
                        return Ok(Some(ts));
                    }
                }
                Err(e) if matches!(e.kind(), csv::ErrorKind::Utf8 { .. }) => {}
                Err(source) => {
                    return Err(RecordingError::Csv {
                        path: self.path.clone(),
                        source,
                    });
                }
            }
        }
    }
}

/// One message to publish: a device's values at one time.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Milliseconds since the epoch, as recorded.
    pub ts: i64,
    /// Index in [`Recording::devices`].
    pub device: u32,
    /// Metric names and values (each metric once).
    pub values: Vec<(Arc<str>, Value)>,
}

/// The recording's messages in time order (ties: by device index).
pub struct Messages {
    cursors: Vec<Cursor>,
    heap: BinaryHeap<Reverse<(i64, usize)>>,
    /// Rows of the current timestamp.
    slice: Vec<Row>,
    out: VecDeque<Message>,
}

impl Messages {
    /// Takes every row of the next timestamp and groups them per device.
    fn fill(&mut self) -> Result<(), RecordingError> {
        let Some(Reverse((ts, _))) = self.heap.peek().copied() else {
            return Ok(());
        };
        while let Some(Reverse((t, i))) = self.heap.peek().copied() {
            if t != ts {
                break;
            }
            self.heap.pop();
            let Some(c) = self.cursors.get_mut(i) else {
                continue;
            };
            if let Some(row) = c.next.take() {
                self.slice.push(row);
            }
            if let Some(next) = c.advance()? {
                self.heap.push(Reverse((next, i)));
            }
        }
        // Stable: a device's rows keep their file order, so a later value of a metric wins.
        self.slice.sort_by_key(|r| r.device);
        let mut rows = self.slice.drain(..).peekable();
        while let Some(first) = rows.next() {
            let mut values = first.values;
            // Positions of the metrics, once a device has enough that a scan per value would
            // cost (an export gives one row per metric).
            let mut index: Option<HashMap<Arc<str>, usize>> = None;
            while let Some(r) = rows.next_if(|r| r.device == first.device) {
                for (m, v) in r.values {
                    if index.is_none() && values.len() >= 16 {
                        index = Some(
                            values
                                .iter()
                                .enumerate()
                                .map(|(i, (k, _))| (k.clone(), i))
                                .collect(),
                        );
                    }
                    let at = match &index {
                        Some(ix) => ix.get(&m).copied(),
                        None => values.iter().position(|(n, _)| *n == m),
                    };
                    match at.and_then(|i| values.get_mut(i)) {
                        Some(slot) => slot.1 = v,
                        None => {
                            if let Some(ix) = index.as_mut() {
                                ix.insert(m.clone(), values.len());
                            }
                            values.push((m, v));
                        }
                    }
                }
            }
            while values.len() > MAX_VALUES_PER_MESSAGE {
                let rest = values.split_off(MAX_VALUES_PER_MESSAGE);
                self.out.push_back(Message {
                    ts,
                    device: first.device,
                    values,
                });
                values = rest;
            }
            self.out.push_back(Message {
                ts,
                device: first.device,
                values,
            });
        }
        Ok(())
    }
}

impl Iterator for Messages {
    type Item = Result<Message, RecordingError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.out.is_empty()
            && let Err(e) = self.fill()
        {
            return Some(Err(e));
        }
        self.out.pop_front().map(Ok)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn write(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn scan(path: &Path, strict: bool) -> Result<(Recording, Vec<BadRow>), RecordingError> {
        let mut bad = Vec::new();
        let r = Recording::scan(
            &[path.to_path_buf()],
            ScanOptions {
                strict,
                max_runs: DEFAULT_MAX_RUNS,
            },
            &mut |b| bad.push(b.clone()),
        )?;
        Ok((r, bad))
    }

    /// A message as (time, device id, values).
    type Flat = (i64, String, Vec<(String, Value)>);

    fn all(r: &Recording) -> Vec<Flat> {
        r.messages()
            .unwrap()
            .map(|m| {
                let m = m.unwrap();
                (
                    m.ts,
                    r.devices.names()[m.device as usize].to_string(),
                    m.values
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                )
            })
            .collect()
    }

    fn s(v: &str) -> Value {
        Value::Str(Arc::from(v))
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_ts("1767225600000").unwrap(), 1_767_225_600_000);
        assert_eq!(
            parse_ts("2026-01-01T00:00:00.123Z").unwrap(),
            1_767_225_600_123
        );
        assert_eq!(parse_ts("2026-01-01T00:00:00Z").unwrap(), 1_767_225_600_000);
        assert_eq!(parse_ts("2026-01-01 00:00:00").unwrap(), 1_767_225_600_000);
        assert_eq!(
            parse_ts("2026-01-01T02:00:00.5+02:00").unwrap(),
            1_767_225_600_500
        );
        assert_eq!(
            parse_ts("2025-12-31T23:30:00-00:30").unwrap(),
            1_767_225_600_000
        );
        for bad in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-01-01T00:00:00+25:00",
            "1.5",
        ] {
            assert!(parse_ts(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn export_files_merge_series_by_time_and_keep_kinds() {
        // Sorted by series, then time: as the hub exports.
        let text = "tenant,device,metric,ts,value,type\n\
            default,d1,a,2026-01-01T00:00:00.000Z,1.0,float\n\
            default,d1,a,2026-01-01T00:00:01.000Z,2.5,float\n\
            default,d1,b,2026-01-01T00:00:00.000Z,7,int\n\
            default,d1,b,2026-01-01T00:00:01.000Z,8,int\n\
            default,d2,ok,2026-01-01T00:00:00.500Z,true,bool\n\
            default,d2,state,2026-01-01T00:00:00.500Z,\"idle, \"\"really\"\"\",string\n\
            default,d2,state,2026-01-01T00:00:02.000Z,,string\n";
        let (_dir, path) = write("rec.csv", text);
        let (r, bad) = scan(&path, true).unwrap();
        assert!(bad.is_empty());
        assert_eq!(r.layouts(), ["export"]);
        assert_eq!((r.rows, r.values, r.runs()), (7, 7, 3));
        let t0 = 1_767_225_600_000;
        assert_eq!((r.first_ts, r.last_ts), (t0, t0 + 2000));
        let a = |k: &str, v: Value| (k.to_string(), v);
        assert_eq!(
            all(&r),
            vec![
                (
                    t0,
                    "d1".into(),
                    vec![a("a", Value::Float(1.0)), a("b", Value::Int(7))]
                ),
                (
                    t0 + 500,
                    "d2".into(),
                    vec![
                        a("ok", Value::Bool(true)),
                        a("state", s("idle, \"really\""))
                    ]
                ),
                (
                    t0 + 1000,
                    "d1".into(),
                    vec![a("a", Value::Float(2.5)), a("b", Value::Int(8))]
                ),
                (t0 + 2000, "d2".into(), vec![a("state", s(""))]),
            ]
        );
    }

    #[test]
    fn wide_files_infer_kinds_and_skip_empty_cells() {
        let text = "device,ts,temp,count,on,mode\n\
            d1, 1000, 21.5, 3,true,auto\n\
            d2,1000,,4,,\n\
            d1,2000,22,5,false,\n\
            d2,2000,,,,\n";
        let (_dir, path) = write("wide.csv", text);
        let (r, _) = scan(&path, true).unwrap();
        assert_eq!(r.layouts(), ["wide"]);
        assert_eq!((r.rows, r.runs()), (3, 1));
        let got = all(&r);
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[0].2,
            vec![
                ("temp".into(), Value::Float(21.5)),
                ("count".into(), Value::Int(3)),
                ("on".into(), Value::Bool(true)),
                ("mode".into(), s("auto")),
            ]
        );
        assert_eq!((got[1].0, got[1].1.as_str()), (1000, "d2"));
        assert_eq!(got[1].2, vec![("count".into(), Value::Int(4))]);
        assert_eq!(got[2].2[0], ("temp".into(), Value::Int(22)));
    }

    #[test]
    fn bad_rows_are_reported_with_their_line_and_skipped() {
        let text = "tenant,device,metric,ts,value,type\n\
            t,d1,a,1000,1.5,float\n\
            t,d1,a,later,1.5,float\n\
            t,d1,a,2000,abc,float\n\
            t,d1,a,3000,1,color\n\
            t,d/1,a,3000,1,int\n\
            t,d1,a,4000,NaN,float\n\
            t,d1\n\
            t,d1,a,5000,2,int\n";
        let (_dir, path) = write("bad.csv", text);
        let (r, bad) = scan(&path, false).unwrap();
        assert_eq!(r.rows, 2);
        assert_eq!(r.bad_rows, 6);
        let lines: Vec<u64> = bad.iter().map(|b| b.line).collect();
        assert_eq!(lines, [3, 4, 5, 6, 7, 8]);
        assert!(
            bad[0].to_string().ends_with(
                "bad.csv:3: timestamp \"later\" is neither RFC 3339 nor epoch milliseconds"
            ),
            "{}",
            bad[0]
        );
        assert!(bad[4].reason.contains("not finite"), "{:?}", bad[4]);
        assert_eq!(all(&r).len(), 2);
        // --strict: the first bad row fails the scan, naming file and line.
        let e = scan(&path, true).err().unwrap().to_string();
        assert!(
            e.ends_with(
                "bad.csv:3: timestamp \"later\" is neither RFC 3339 nor epoch milliseconds"
            ),
            "{e}"
        );
    }

    #[test]
    fn rows_of_one_device_and_time_are_one_message_and_the_later_value_wins() {
        let mut text = String::from("tenant,device,metric,ts,value,type\n");
        for m in 0..40 {
            text += &format!("t,d1,m{m},1000,{m},int\n");
        }
        text += "t,d1,m3,1000,-3,int\nt,d1,m39,1000,-39,int\n";
        let (_dir, path) = write("dup.csv", &text);
        let (r, _) = scan(&path, true).unwrap();
        let got = all(&r);
        assert_eq!(got.len(), 1);
        let values = &got[0].2;
        assert_eq!(values.len(), 40);
        assert_eq!(values[3], ("m3".into(), Value::Int(-3)));
        assert_eq!(values[39], ("m39".into(), Value::Int(-39)));
        assert_eq!(values[38], ("m38".into(), Value::Int(38)));
    }

    #[test]
    fn unknown_formats_are_named() {
        for (text, want) in [
            ("", "the file is empty"),
            ("a,b,c\n1,2,3\n", "has no ts column"),
            ("ts,temp\n1,2\n", "has no device column"),
            ("ts,device\n1,d\n", "no metric columns"),
        ] {
            let (_dir, path) = write("x.csv", text);
            let e = scan(&path, false).err().unwrap().to_string();
            assert!(
                e.contains("unknown format") && e.contains(want),
                "{text:?}: {e}"
            );
        }
        // Parquet's magic bytes, then nothing a Parquet reader can use.
        let (_dir, path) = write("x.csv", "PAR1....");
        let e = scan(&path, false).err().unwrap().to_string();
        assert!(e.contains("x.csv: reading Parquet"), "{e}");
    }

    #[test]
    fn unsorted_files_are_refused_past_the_run_limit() {
        let mut text = String::from("ts,device,v\n");
        for i in 0..10 {
            text += &format!("{},d,{i}\n", 10 - i);
        }
        let (_dir, path) = write("u.csv", &text);
        let (r, _) = scan(&path, false).unwrap();
        assert_eq!(r.runs(), 10);
        let ts: Vec<i64> = all(&r).iter().map(|m| m.0).collect();
        assert_eq!(ts, (1..=10).collect::<Vec<_>>());
        let e = Recording::scan(
            &[path],
            ScanOptions {
                strict: false,
                max_runs: 5,
            },
            &mut |_| {},
        )
        .err()
        .unwrap();
        assert!(
            matches!(e, RecordingError::TooManyRuns { limit: 5, .. }),
            "{e}"
        );
    }

    #[test]
    fn gzipped_files_are_read_sorted_or_not() {
        let text = "tenant,device,metric,ts,value,type\n\
            t,d1,a,1000,1,int\nt,d1,a,3000,3,int\nt,d1,b,2000,2,int\n";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.csv.gz");
        let mut gz = flate2::write::GzEncoder::new(
            File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        gz.write_all(text.as_bytes()).unwrap();
        gz.finish().unwrap();
        let (r, _) = scan(&path, true).unwrap();
        assert_eq!(r.runs(), 2);
        let got: Vec<(i64, Vec<(String, Value)>)> =
            all(&r).into_iter().map(|m| (m.0, m.2)).collect();
        assert_eq!(
            got,
            vec![
                (1000, vec![("a".into(), Value::Int(1))]),
                (2000, vec![("b".into(), Value::Int(2))]),
                (3000, vec![("a".into(), Value::Int(3))]),
            ]
        );
    }

    #[test]
    fn several_files_are_one_recording() {
        let (_d1, p1) = write("a.csv", "ts,device,v\n1000,d1,1\n3000,d1,3\n");
        let (_d2, p2) = write("b.csv", "ts,device,w\n2000,d2,2\n");
        let r = Recording::scan(
            &[p1, p2],
            ScanOptions {
                strict: true,
                max_runs: 10,
            },
            &mut |_| {},
        )
        .unwrap();
        let got: Vec<(i64, String)> = all(&r).into_iter().map(|m| (m.0, m.1)).collect();
        assert_eq!(
            got,
            [
                (1000, "d1".into()),
                (2000, "d2".into()),
                (3000, "d1".into())
            ]
        );
    }
}
