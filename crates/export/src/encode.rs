//! Turning rows into file bytes: Parquet through the `parquet` crate's low-level column writers
//! (no arrow), CSV through the `csv` crate. Synchronous and CPU-bound: the exporter runs
//! [`Encoder::encode_pending`] and [`Encoder::finish`] on tokio's blocking pool.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use parquet::basic::{Compression, Encoding};
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::{SerializedFileWriter, SerializedRowGroupWriter};
use parquet::schema::types::ColumnPath;

use crate::batch::{RowBatch, Slot, ValueRef};
use crate::{ExportError, ExportFormat, PARQUET_SCHEMA};

/// Rows the CSV encoder formats per trip to the blocking pool.
const CSV_CHUNK_ROWS: usize = 64 * 1024;

/// Text (names, string values) buffered before a Parquet row group is cut early, so that long
/// string values cannot make a row group, and memory, grow without bound.
const ROW_GROUP_TEXT_BYTES: usize = 256 * 1024 * 1024;

/// Same, for CSV.
const CSV_CHUNK_TEXT_BYTES: usize = 16 * 1024 * 1024;

/// Values handed to a column writer per call: bounds the scratch vectors.
const COLUMN_CHUNK: usize = 64 * 1024;

/// End of the range humantime formats: 10000-01-01T00:00:00Z.
const MAX_CSV_TS_MS: i64 = 253_402_300_800_000;

/// Encodes one export file: buffers rows until a row group (Parquet) or chunk (CSV) is full.
pub(crate) struct Encoder {
    pending: RowBatch,
    flush_rows: usize,
    flush_text: usize,
    format: FormatEncoder,
}

/// Boxed: both are a few hundred bytes, and an `Encoder` moves to the blocking pool and back.
enum FormatEncoder {
    Parquet(Box<ParquetEncoder>),
    Csv(Box<CsvEncoder>),
}

impl Encoder {
    /// An encoder for the file `file` (named in errors).
    pub(crate) fn new(
        format: ExportFormat,
        tenant: &str,
        file: String,
        row_group_rows: usize,
    ) -> Result<Self, ExportError> {
        let (format, flush_rows, flush_text) = match format {
            ExportFormat::Parquet => (
                FormatEncoder::Parquet(Box::new(ParquetEncoder::new(tenant, file)?)),
                row_group_rows,
                ROW_GROUP_TEXT_BYTES,
            ),
            ExportFormat::Csv => (
                FormatEncoder::Csv(Box::new(CsvEncoder::new(tenant, file)?)),
                CSV_CHUNK_ROWS,
                CSV_CHUNK_TEXT_BYTES,
            ),
        };
        Ok(Self {
            pending: RowBatch::with_capacity(flush_rows.min(CSV_CHUNK_ROWS)),
            flush_rows,
            flush_text,
            format,
        })
    }

    /// Rows that fit before [`Encoder::is_full`].
    pub(crate) fn room(&self) -> usize {
        self.flush_rows.saturating_sub(self.pending.len())
    }

    /// Buffers rows `range` of `batch`. CSV timestamps are range-checked here, so that the
    /// error comes from the call that brought the row.
    pub(crate) fn push(
        &mut self,
        batch: &RowBatch,
        range: std::ops::Range<usize>,
    ) -> Result<(), ExportError> {
        if let FormatEncoder::Csv(_) = self.format {
            check_csv_ts(batch, range.clone())?;
        }
        self.pending.extend_from(batch, range);
        Ok(())
    }

    /// Whether the buffered rows should be encoded now.
    pub(crate) fn is_full(&self) -> bool {
        self.pending.len() >= self.flush_rows || self.pending.text_len() >= self.flush_text
    }

    /// Encodes the buffered rows; returns the bytes of the file produced so far.
    pub(crate) fn encode_pending(&mut self) -> Result<Bytes, ExportError> {
        if !self.pending.is_empty() {
            match &mut self.format {
                FormatEncoder::Parquet(p) => p.write_row_group(&mut self.pending)?,
                FormatEncoder::Csv(c) => c.write_rows(&self.pending)?,
            }
            self.pending.clear();
        }
        match &mut self.format {
            FormatEncoder::Parquet(p) => p.take_output(),
            FormatEncoder::Csv(c) => c.take_output(),
        }
    }

    /// Encodes the buffered rows and ends the file; returns its remaining bytes.
    pub(crate) fn finish(mut self) -> Result<Bytes, ExportError> {
        let body = self.encode_pending()?;
        let tail = match self.format {
            FormatEncoder::Parquet(p) => p.finish()?,
            FormatEncoder::Csv(_) => Bytes::new(),
        };
        Ok(match (body.is_empty(), tail.is_empty()) {
            (_, true) => body,
            (true, false) => tail,
            (false, false) => [body, tail].concat().into(),
        })
    }
}

/// The Parquet writer's settings.
///
/// - Dictionary encoding only for the string columns, whose values repeat; numbers and
///   timestamps rarely do.
/// - `ts` and `value_int` as DELTA_BINARY_PACKED: timestamps of a series grow by small steps
///   and counters likewise; every current reader (parquet-mr, pyarrow, DuckDB, Spark) reads it.
/// - Compression: see [`compression`].
fn writer_properties() -> WriterProperties {
    let mut props = WriterProperties::builder()
        .set_compression(compression())
        .set_dictionary_enabled(false)
        .set_created_by(format!("ferrohub-export {}", env!("CARGO_PKG_VERSION")))
        .set_key_value_metadata(Some(vec![KeyValue::new(
            "ferrohub.schema".to_owned(),
            "telemetry/1".to_owned(),
        )]));
    for column in ["tenant", "device", "metric", "value_str"] {
        props = props.set_column_dictionary_enabled(ColumnPath::from(column), true);
    }
    for column in ["ts", "value_int"] {
        props = props.set_column_encoding(ColumnPath::from(column), Encoding::DELTA_BINARY_PACKED);
    }
    props.build()
}

/// SNAPPY by default: the `parquet` crate's zstd feature compiles the zstd C library (about
/// 30 s of build on CI's 2 cores, as much again as the parquet crate itself), Snappy is pure
/// Rust and builds in under a second. The `zstd` cargo feature switches to ZSTD (level 3),
/// typically a third smaller, for builds that can afford it.
fn compression() -> Compression {
    #[cfg(feature = "zstd")]
    {
        match parquet::basic::ZstdLevel::try_new(3) {
            Ok(level) => Compression::ZSTD(level),
            Err(_) => Compression::SNAPPY,
        }
    }
    #[cfg(not(feature = "zstd"))]
    {
        Compression::SNAPPY
    }
}

/// One Parquet file being written into memory; [`ParquetEncoder::take_output`] drains it.
struct ParquetEncoder {
    writer: SerializedFileWriter<Vec<u8>>,
    tenant: ByteArray,
    file: String,
    // Scratch, reused between column chunks and row groups.
    bytes: Vec<ByteArray>,
    ints: Vec<i64>,
    floats: Vec<f64>,
    bools: Vec<bool>,
    defs: Vec<i16>,
}

impl ParquetEncoder {
    fn new(tenant: &str, file: String) -> Result<Self, ExportError> {
        let fail = |error| ExportError::Parquet {
            file: file.clone(),
            error,
        };
        let schema = parquet::schema::parser::parse_message_type(PARQUET_SCHEMA).map_err(fail)?;
        let writer =
            SerializedFileWriter::new(Vec::new(), Arc::new(schema), Arc::new(writer_properties()))
                .map_err(fail)?;
        Ok(Self {
            writer,
            tenant: ByteArray::from(Bytes::copy_from_slice(tenant.as_bytes())),
            file,
            bytes: Vec::new(),
            ints: Vec::new(),
            floats: Vec::new(),
            bools: Vec::new(),
            defs: Vec::new(),
        })
    }

    fn fail(&self) -> impl Fn(parquet::errors::ParquetError) -> ExportError + '_ {
        |error| ExportError::Parquet {
            file: self.file.clone(),
            error,
        }
    }

    /// Writes `rows` as one row group. Takes the batch's text: its strings become the column
    /// values without a copy per value (each is a slice of one shared buffer).
    fn write_row_group(&mut self, rows: &mut RowBatch) -> Result<(), ExportError> {
        let text = Bytes::from(rows.take_text().into_bytes());
        let rows: &RowBatch = rows;
        let n = rows.len();
        let Self {
            writer,
            tenant,
            file,
            bytes,
            ints,
            floats,
            bools,
            defs,
        } = self;
        let fail = |error| ExportError::Parquet {
            file: file.clone(),
            error,
        };
        let mut group = writer.next_row_group().map_err(fail)?;
        let span = |s: usize| ByteArray::from(text.slice(rows.span_range(s)));

        // The order of the columns in PARQUET_SCHEMA.
        write_column::<ByteArrayType>(
            &mut group,
            n,
            |range, out| {
                out.extend(range.map(|_| tenant.clone()));
            },
            bytes,
        )
        .map_err(fail)?;
        write_column::<ByteArrayType>(
            &mut group,
            n,
            |range, out| {
                out.extend(rows.device_spans()[range].iter().map(|&s| span(s)));
            },
            bytes,
        )
        .map_err(fail)?;
        write_column::<ByteArrayType>(
            &mut group,
            n,
            |range, out| {
                out.extend(rows.metric_spans()[range].iter().map(|&s| span(s)));
            },
            bytes,
        )
        .map_err(fail)?;
        write_column::<Int64Type>(
            &mut group,
            n,
            |range, out| {
                out.extend_from_slice(&rows.ts()[range]);
            },
            ints,
        )
        .map_err(fail)?;
        write_optional::<DoubleType>(
            &mut group,
            rows.slots(),
            |slot| match slot {
                Slot::Float(f) => Some(*f),
                _ => None,
            },
            floats,
            defs,
        )
        .map_err(fail)?;
        write_optional::<Int64Type>(
            &mut group,
            rows.slots(),
            |slot| match slot {
                Slot::Int(i) => Some(*i),
                _ => None,
            },
            ints,
            defs,
        )
        .map_err(fail)?;
        write_optional::<BoolType>(
            &mut group,
            rows.slots(),
            |slot| match slot {
                Slot::Bool(b) => Some(*b),
                _ => None,
            },
            bools,
            defs,
        )
        .map_err(fail)?;
        write_optional::<ByteArrayType>(
            &mut group,
            rows.slots(),
            |slot| match slot {
                Slot::Str(s) => Some(span(*s)),
                _ => None,
            },
            bytes,
            defs,
        )
        .map_err(fail)?;
        group.close().map_err(fail)?;
        bytes.clear(); // drops the last references to `text`
        Ok(())
    }

    /// The bytes written since the last call.
    fn take_output(&mut self) -> Result<Bytes, ExportError> {
        self.writer.flush().map_err(|e| self.fail()(e.into()))?;
        // Taking the bytes out of the Vec does not disturb the writer: it tracks offsets itself.
        Ok(Bytes::from(std::mem::take(self.writer.inner_mut())))
    }

    /// Writes the footer; returns the remaining bytes.
    fn finish(mut self) -> Result<Bytes, ExportError> {
        self.writer.finish().map_err(self.fail())?;
        self.take_output()
    }
}

/// Writes the next column of `group`, a required one, `COLUMN_CHUNK` values at a time:
/// `fill(range, out)` appends the values of rows `range` to `out`.
fn write_column<T: parquet::data_type::DataType>(
    group: &mut SerializedRowGroupWriter<'_, Vec<u8>>,
    rows: usize,
    mut fill: impl FnMut(std::ops::Range<usize>, &mut Vec<T::T>),
    scratch: &mut Vec<T::T>,
) -> parquet::errors::Result<()> {
    let mut column = next_column(group)?;
    let writer = column.typed::<T>();
    for start in (0..rows).step_by(COLUMN_CHUNK) {
        scratch.clear();
        fill(start..(start + COLUMN_CHUNK).min(rows), scratch);
        writer.write_batch(&scratch[..], None, None)?;
    }
    scratch.clear();
    column.close()
}

/// Writes the next column of `group`, an optional one: `pick(slot)` is the row's value in this
/// column, if any.
fn write_optional<T: parquet::data_type::DataType>(
    group: &mut SerializedRowGroupWriter<'_, Vec<u8>>,
    slots: &[Slot],
    pick: impl Fn(&Slot) -> Option<T::T>,
    scratch: &mut Vec<T::T>,
    defs: &mut Vec<i16>,
) -> parquet::errors::Result<()> {
    let mut column = next_column(group)?;
    let writer = column.typed::<T>();
    for chunk in slots.chunks(COLUMN_CHUNK) {
        scratch.clear();
        defs.clear();
        for slot in chunk {
            match pick(slot) {
                Some(v) => {
                    scratch.push(v);
                    defs.push(1);
                }
                None => defs.push(0),
            }
        }
        writer.write_batch(&scratch[..], Some(&defs[..]), None)?;
    }
    scratch.clear();
    column.close()
}

fn next_column<'a>(
    group: &'a mut SerializedRowGroupWriter<'_, Vec<u8>>,
) -> parquet::errors::Result<parquet::file::writer::SerializedColumnWriter<'a>> {
    group
        .next_column()?
        .ok_or_else(|| parquet::errors::ParquetError::General("schema has fewer columns".into()))
}

/// Fails on the first timestamp of `range` that humantime cannot format.
fn check_csv_ts(rows: &RowBatch, range: std::ops::Range<usize>) -> Result<(), ExportError> {
    match rows.ts()[range.clone()]
        .iter()
        .position(|ts| !(0..MAX_CSV_TS_MS).contains(ts))
    {
        None => Ok(()),
        Some(i) => {
            let i = range.start + i;
            Err(ExportError::TimestampOutOfRange {
                ts_ms: rows.ts()[i],
                device: rows.device(i).to_owned(),
                metric: rows.metric(i).to_owned(),
            })
        }
    }
}

/// One CSV file being written into memory.
struct CsvEncoder {
    writer: csv::Writer<Vec<u8>>,
    tenant: String,
    file: String,
    ts: String,
    value: String,
}

impl CsvEncoder {
    fn new(tenant: &str, file: String) -> Result<Self, ExportError> {
        let mut encoder = Self {
            writer: csv::Writer::from_writer(Vec::new()),
            tenant: tenant.to_owned(),
            file,
            ts: String::new(),
            value: String::new(),
        };
        encoder
            .writer
            .write_record(["tenant", "device", "metric", "ts", "value", "type"])
            .map_err(|error| encoder.fail(error))?;
        Ok(encoder)
    }

    fn fail(&self, error: csv::Error) -> ExportError {
        ExportError::Csv {
            file: self.file.clone(),
            error,
        }
    }

    fn write_rows(&mut self, rows: &RowBatch) -> Result<(), ExportError> {
        check_csv_ts(rows, 0..rows.len())?;
        for row in rows.iter() {
            self.ts.clear();
            let time = UNIX_EPOCH + Duration::from_millis(row.ts_ms.unsigned_abs());
            // In range (checked above), so formatting cannot fail; `write!` to a String never does.
            let _ = write!(self.ts, "{}", humantime::format_rfc3339_millis(time));
            self.value.clear();
            let _ = match row.value {
                ValueRef::Bool(b) => write!(self.value, "{b}"),
                ValueRef::Int(i) => write!(self.value, "{i}"),
                // Debug, unlike Display, keeps a float recognisable (`1.0`, not `1`) and uses an
                // exponent for huge and tiny magnitudes; both parse back to the same f64.
                ValueRef::Float(f) => write!(self.value, "{f:?}"),
                ValueRef::Str(s) => {
                    self.value.push_str(s);
                    Ok(())
                }
            };
            let record = [
                self.tenant.as_str(),
                row.device,
                row.metric,
                self.ts.as_str(),
                self.value.as_str(),
                row.value.type_name(),
            ];
            if let Err(e) = self.writer.write_record(record) {
                return Err(self.fail(e));
            }
        }
        Ok(())
    }

    fn take_output(&mut self) -> Result<Bytes, ExportError> {
        // csv::Writer lends no `&mut` to its Vec; a fresh writer per chunk costs one small
        // buffer per 64k rows.
        let writer = std::mem::replace(&mut self.writer, csv::Writer::from_writer(Vec::new()));
        match writer.into_inner() {
            Ok(bytes) => Ok(Bytes::from(bytes)),
            Err(e) => Err(self.fail(e.into_error().into())),
        }
    }
}
