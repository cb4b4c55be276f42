//! Parts: immutable files of compressed columnar chunks, one tenant and one UTC day each.
//!
//! ```text
//! header (16 bytes): magic "FHTSPRT1" | u16 LE format version | 6 bytes zero
//! blocks:            per series: its chunks (timestamp block, value block), its 1-minute rollups;
//!                    then the part's 1-hour rollup table in blocks of ≤ 65,536 rows
//! index:             series (device, metric, kind, count, time range, last point, chunk refs,
//!                    1-minute rollup ref) and hourly-table block refs; varints, CRC-checked
//! footer (24 bytes): u64 LE index offset | u32 LE index length | u32 LE index CRC-32 | "FHTSEND1"
//! ```
//!
//! Every block has its CRC-32 in the index, checked on read. A part is written to `*.tmp`, synced,
//! then renamed, so a crash never leaves a half part under a final name.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferrohub_types::telemetry::{Value, ValueKind};

use crate::bin_io::{PutBytes, Reader};
use crate::column::{self, MAX_CHUNK_POINTS, Values};
use crate::error::TsdbError;
use crate::rollup::{HOUR_MS, MINUTE_MS, RollupRows};

const MAGIC: &[u8; 8] = b"FHTSPRT1";
const END_MAGIC: &[u8; 8] = b"FHTSEND1";
/// Format version of part files.
pub const PART_VERSION: u16 = 1;
const HEADER_LEN: u64 = 16;
const FOOTER_LEN: u64 = 24;
const HOURLY_BLOCK_ROWS: usize = 65_536;
/// Rollup tags of a series in the index: none (strings), 1-minute block plus hourly rows, hourly
/// rows only (series sparser than [`MIN_POINTS_PER_MINUTE_ROW`] points a minute).
const ROLLUPS_NONE: u8 = 0;
const ROLLUPS_MINUTE: u8 = 1;
const ROLLUPS_HOURLY_ONLY: u8 = 2;
/// A series keeps 1-minute rollups only when they hold at least this many points per row on
/// average.
pub const MIN_POINTS_PER_MINUTE_ROW: usize = 2;
/// Largest index accepted (guards allocation on a corrupt footer).
const MAX_INDEX_LEN: u64 = 1 << 31;

/// The points of one series to seal into a part: sorted by time, unique timestamps.
#[derive(Debug, Clone)]
pub struct SeriesData {
    /// Device.
    pub device: Arc<str>,
    /// Metric.
    pub metric: Arc<str>,
    /// Timestamps (ms), ascending and unique.
    pub ts: Vec<i64>,
    /// Values, one per timestamp.
    pub values: Values,
}

/// Where a block is in a part file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRef {
    /// Byte offset.
    pub off: u64,
    /// Length in bytes.
    pub len: u32,
    /// CRC-32 of the bytes.
    pub crc: u32,
}

/// One chunk of a series in a part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// Earliest timestamp.
    pub min_ts: i64,
    /// Latest timestamp.
    pub max_ts: i64,
    /// Number of points.
    pub count: u32,
    /// The timestamp block.
    pub ts: BlockRef,
    /// The value block.
    pub values: BlockRef,
}

/// One series of a part, as its index describes it.
#[derive(Debug, Clone)]
pub struct PartSeries {
    /// Device.
    pub device: String,
    /// Metric.
    pub metric: String,
    /// Kind of values.
    pub kind: ValueKind,
    /// Number of points.
    pub count: u64,
    /// Earliest timestamp.
    pub min_ts: i64,
    /// Latest timestamp.
    pub max_ts: i64,
    /// The latest point's value.
    pub last: Value,
    /// Chunks, in time order.
    pub chunks: Vec<ChunkRef>,
    /// 1-minute rollups (absent for strings and for series sparser than
    /// [`MIN_POINTS_PER_MINUTE_ROW`] points a minute; every non-string series has hourly rows).
    pub minute: Option<BlockRef>,
}

/// A block of the 1-hour rollup table: rows of series positions `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HourlyBlock {
    /// First series position in the block.
    pub first_series: u32,
    /// Last series position in the block.
    pub last_series: u32,
    /// The block.
    pub block: BlockRef,
}

/// A part's index.
#[derive(Debug, Clone, Default)]
pub struct PartIndex {
    /// Series, in file order (their position is the `series` of rollup rows).
    pub series: Vec<PartSeries>,
    /// The 1-hour rollup table.
    pub hourly: Vec<HourlyBlock>,
}

/// Writes a part series by series (streaming: memory holds one series plus the hourly table). The
/// file is written under a temporary name, synced (when `fsync`) and renamed to its final name
/// only by [`PartWriter::finish`]; dropping an unfinished writer removes the temporary file.
pub struct PartWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<std::io::BufWriter<File>>,
    pos: u64,
    fsync: bool,
    index: Vec<u8>,
    series: u64,
    hourly: RollupRows,
    buf: Vec<u8>,
}

impl PartWriter {
    /// Starts a part that will be named `path`.
    pub fn create(path: &Path, fsync: bool) -> Result<PartWriter, TsdbError> {
        let tmp = tmp_path(path);
        let file = File::create(&tmp).map_err(|e| TsdbError::io("creating part", &tmp, e))?;
        let mut w = PartWriter {
            path: path.to_owned(),
            tmp,
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
            pos: 0,
            fsync,
            index: Vec::new(),
            series: 0,
            hourly: RollupRows::default(),
            buf: Vec::new(),
        };
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&PART_VERSION.to_le_bytes());
        header.resize(HEADER_LEN as usize, 0);
        w.emit(&header)?;
        Ok(w)
    }

    fn emit(&mut self, bytes: &[u8]) -> Result<BlockRef, TsdbError> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| TsdbError::Codec("part writer already finished".into()))?;
        file.write_all(bytes)
            .map_err(|e| TsdbError::io("writing part", &self.tmp, e))?;
        let r = BlockRef {
            off: self.pos,
            len: u32::try_from(bytes.len())
                .map_err(|_| TsdbError::Codec("block over 4 GiB".into()))?,
            crc: crc32fast::hash(bytes),
        };
        self.pos += bytes.len() as u64;
        Ok(r)
    }

    fn emit_buf(&mut self) -> Result<BlockRef, TsdbError> {
        let buf = std::mem::take(&mut self.buf);
        let r = self.emit(&buf);
        self.buf = buf;
        self.buf.clear();
        r
    }

    /// Number of series added.
    pub fn series(&self) -> u64 {
        self.series
    }

    /// Appends one series (sorted, unique timestamps; at least one point).
    pub fn add(&mut self, s: &SeriesData) -> Result<(), TsdbError> {
        let encoded = encode_series(s)?;
        self.add_encoded(encoded)
    }

    /// Appends a series encoded by [`encode_series`] (possibly on another thread).
    pub fn add_encoded(&mut self, e: EncodedSeries) -> Result<(), TsdbError> {
        let pos_in_part = u32::try_from(self.series)
            .map_err(|_| TsdbError::Codec("too many series in one part".into()))?;
        let mut refs = Vec::with_capacity(e.blocks.len());
        let mut off = 0usize;
        for &(len, crc) in &e.blocks {
            refs.push(BlockRef {
                off: self.pos + off as u64,
                len,
                crc,
            });
            off += len as usize;
        }
        self.emit(&e.bytes)?;
        self.series += 1;
        self.index.extend_from_slice(&e.meta);
        let mut blocks = refs.into_iter();
        let mut next_block = || {
            blocks
                .next()
                .ok_or_else(|| TsdbError::Codec("encoded series lacks a block".into()))
        };
        for &(min_ts, max_ts, count) in &e.chunks {
            self.index.put_zigzag(min_ts);
            self.index.put_zigzag(max_ts);
            self.index.put_varint(u64::from(count));
            put_block(&mut self.index, next_block()?);
            put_block(&mut self.index, next_block()?);
        }
        self.index.put_u8(e.rollups);
        if e.rollups == ROLLUPS_MINUTE {
            put_block(&mut self.index, next_block()?);
        }
        self.hourly.append_as(&e.hourly, pos_in_part);
        Ok(())
    }

    /// Writes the hourly table, the index and the footer, syncs and renames. Returns the size.
    pub fn finish(mut self) -> Result<u64, TsdbError> {
        let mut index = Vec::new();
        index.put_varint(self.series);
        index.extend_from_slice(&std::mem::take(&mut self.index));
        let hourly = std::mem::take(&mut self.hourly);
        let blocks = hourly.len().div_ceil(HOURLY_BLOCK_ROWS);
        index.put_varint(blocks as u64);
        for b in 0..blocks {
            let range = b * HOURLY_BLOCK_ROWS..((b + 1) * HOURLY_BLOCK_ROWS).min(hourly.len());
            let rows = RollupRows {
                series: hourly.series[range.clone()].to_vec(),
                bucket: hourly.bucket[range.clone()].to_vec(),
                aggs: hourly.aggs[range.clone()].to_vec(),
            };
            rows.encode(&mut self.buf)?;
            index.put_u32(rows.series[0]);
            index.put_u32(rows.series[rows.len() - 1]);
            put_block(&mut index, self.emit_buf()?);
        }
        let index_ref = self.emit(&index)?;
        let mut footer = Vec::with_capacity(FOOTER_LEN as usize);
        footer.put_u64(index_ref.off);
        footer.put_u32(index_ref.len);
        footer.put_u32(index_ref.crc);
        footer.extend_from_slice(END_MAGIC);
        self.emit(&footer)?;
        let file = self
            .file
            .take()
            .ok_or_else(|| TsdbError::Codec("part writer already finished".into()))?
            .into_inner()
            .map_err(|e| TsdbError::io("writing part", &self.tmp, e.into_error()))?;
        if self.fsync {
            file.sync_all()
                .map_err(|e| TsdbError::io("syncing part", &self.tmp, e))?;
        }
        drop(file);
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| TsdbError::io("renaming part", &self.path, e))?;
        if self.fsync {
            sync_dir(self.path.parent().unwrap_or(Path::new(".")))?;
        }
        Ok(self.pos)
    }
}

impl Drop for PartWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes a whole part from `series` (see [`PartWriter`]). Returns the file size.
pub fn write_part(path: &Path, series: &[SeriesData], fsync: bool) -> Result<u64, TsdbError> {
    let mut w = PartWriter::create(path, fsync)?;
    for s in series {
        w.add(s)?;
    }
    w.finish()
}

/// One series compressed for a part, independent of its place in the file, so that series can be
/// encoded on several threads and written in order.
#[derive(Debug)]
pub struct EncodedSeries {
    /// The series' index entry up to its chunk list (names, kind, count, range, last value).
    meta: Vec<u8>,
    /// Per chunk: earliest and latest timestamp, points.
    chunks: Vec<(i64, i64, u32)>,
    /// The blocks, back to back: per chunk timestamps then values, then the 1-minute rollups.
    bytes: Vec<u8>,
    /// Length and CRC-32 of each block in `bytes`.
    blocks: Vec<(u32, u32)>,
    /// Which rollups the series has (`ROLLUPS_*`).
    rollups: u8,
    /// Its hourly rollup rows (series position 0; placed by [`PartWriter::add_encoded`]).
    hourly: RollupRows,
}

/// Compresses one series (sorted, unique timestamps; at least one point): its chunks, its
/// 1-minute rollups when it is dense enough, and its hourly rows.
pub fn encode_series(s: &SeriesData) -> Result<EncodedSeries, TsdbError> {
    let n = s.ts.len();
    if n == 0 || s.values.len() != n {
        return Err(TsdbError::Codec(format!(
            "series {}/{} has {n} timestamps and {} values",
            s.device,
            s.metric,
            s.values.len()
        )));
    }
    let mut e = EncodedSeries {
        meta: Vec::with_capacity(32 + s.device.len() + s.metric.len()),
        chunks: Vec::with_capacity(n.div_ceil(MAX_CHUNK_POINTS)),
        bytes: Vec::new(),
        blocks: Vec::new(),
        rollups: ROLLUPS_NONE,
        hourly: RollupRows::default(),
    };
    let block = |e: &mut EncodedSeries, start: usize| -> Result<(), TsdbError> {
        let bytes = &e.bytes[start..];
        let len =
            u32::try_from(bytes.len()).map_err(|_| TsdbError::Codec("block over 4 GiB".into()))?;
        e.blocks.push((len, crc32fast::hash(bytes)));
        Ok(())
    };
    e.meta.put_str(&s.device);
    e.meta.put_str(&s.metric);
    e.meta.put_u8(kind_tag(s.values.kind()));
    e.meta.put_varint(n as u64);
    e.meta.put_zigzag(s.ts[0]);
    e.meta.put_zigzag(s.ts[n - 1]);
    put_value(&mut e.meta, &s.values.get(n - 1));
    let nchunks = n.div_ceil(MAX_CHUNK_POINTS);
    e.meta.put_varint(nchunks as u64);
    for c in 0..nchunks {
        let range = c * MAX_CHUNK_POINTS..((c + 1) * MAX_CHUNK_POINTS).min(n);
        let start = e.bytes.len();
        column::encode_timestamps(&s.ts[range.clone()], &mut e.bytes)?;
        block(&mut e, start)?;
        let start = e.bytes.len();
        column::encode_values(&s.values.slice(range.clone()), &mut e.bytes)?;
        block(&mut e, start)?;
        e.chunks
            .push((s.ts[range.start], s.ts[range.end - 1], range.len() as u32));
    }
    if s.values.kind() != ValueKind::Str {
        let mut minute = RollupRows::default();
        let value = |i| s.values.f64_at(i).unwrap_or(0.0);
        minute.add_series(0, &s.ts, value, MINUTE_MS);
        e.hourly.add_series(0, &s.ts, value, HOUR_MS);
        if minute.len() * MIN_POINTS_PER_MINUTE_ROW > n {
            // A sparse series: its minute rows would hold about one point each, costing more
            // than the points and saving a query nothing.
            e.rollups = ROLLUPS_HOURLY_ONLY;
        } else {
            let start = e.bytes.len();
            minute.encode(&mut e.bytes)?;
            block(&mut e, start)?;
            e.rollups = ROLLUPS_MINUTE;
        }
    }
    Ok(e)
}

/// The temporary name a part is written under.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Syncs a directory so that renames and removals in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), TsdbError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| TsdbError::io("syncing directory", dir, e))
}

fn put_block(out: &mut Vec<u8>, b: BlockRef) {
    out.put_varint(b.off);
    out.put_varint(u64::from(b.len));
    out.put_u32(b.crc);
}

fn read_block(r: &mut Reader<'_>) -> Result<BlockRef, TsdbError> {
    Ok(BlockRef {
        off: r.varint()?,
        len: u32::try_from(r.varint()?).map_err(|_| TsdbError::Corrupt("block length".into()))?,
        crc: r.u32()?,
    })
}

fn kind_tag(k: ValueKind) -> u8 {
    match k {
        ValueKind::Numeric => 0,
        ValueKind::Bool => 1,
        ValueKind::Str => 2,
    }
}

fn kind_from_tag(t: u8) -> Result<ValueKind, TsdbError> {
    Ok(match t {
        0 => ValueKind::Numeric,
        1 => ValueKind::Bool,
        2 => ValueKind::Str,
        _ => return Err(TsdbError::Corrupt(format!("unknown value kind {t}"))),
    })
}

/// Writes a value with a type tag (shared with the write-ahead log).
pub(crate) fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Int(i) => {
            out.put_u8(0);
            out.put_zigzag(*i);
        }
        Value::Float(f) => {
            out.put_u8(1);
            out.put_f64(*f);
        }
        Value::Bool(b) => out.put_u8(if *b { 3 } else { 2 }),
        Value::Str(s) => {
            out.put_u8(4);
            out.put_str(s);
        }
    }
}

/// Reads a value written by [`put_value`].
pub(crate) fn read_value(r: &mut Reader<'_>) -> Result<Value, TsdbError> {
    Ok(match r.u8()? {
        0 => Value::Int(r.zigzag()?),
        1 => Value::Float(r.f64()?),
        2 => Value::Bool(false),
        3 => Value::Bool(true),
        4 => Value::Str(r.str()?.to_owned()),
        t => return Err(TsdbError::Corrupt(format!("unknown value tag {t}"))),
    })
}

/// An open part file.
#[derive(Debug)]
pub struct PartFile {
    path: PathBuf,
    file: File,
    size: u64,
}

impl PartFile {
    /// Opens a part and reads its index (checking magic, version and CRC).
    pub fn open(path: &Path) -> Result<(PartFile, PartIndex), TsdbError> {
        let io = |what, e| TsdbError::io(what, path, e);
        let file = File::open(path).map_err(|e| io("opening part", e))?;
        let size = file
            .metadata()
            .map_err(|e| io("reading part metadata", e))?
            .len();
        if size < HEADER_LEN + FOOTER_LEN {
            return Err(TsdbError::Corrupt(format!(
                "{} is too short",
                path.display()
            )));
        }
        let pf = PartFile {
            path: path.to_owned(),
            file,
            size,
        };
        let header = pf.read_raw(0, HEADER_LEN as usize)?;
        if &header[..8] != MAGIC {
            return Err(TsdbError::Corrupt(format!(
                "{} is not a part file",
                path.display()
            )));
        }
        let version = u16::from_le_bytes([header[8], header[9]]);
        if version != PART_VERSION {
            return Err(TsdbError::Corrupt(format!(
                "{} has format version {version}; this build reads {PART_VERSION}",
                path.display()
            )));
        }
        let footer = pf.read_raw(size - FOOTER_LEN, FOOTER_LEN as usize)?;
        let mut r = Reader::new(&footer, "part footer");
        let off = r.u64()?;
        let len = r.u32()?;
        let crc = r.u32()?;
        if r.take(8)? != END_MAGIC || u64::from(len) > MAX_INDEX_LEN {
            return Err(TsdbError::Corrupt(format!(
                "{} has a bad footer",
                path.display()
            )));
        }
        let index = pf.read_block(BlockRef { off, len, crc })?;
        let index = parse_index(&index)?;
        Ok((pf, index))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn read_raw(&self, off: u64, len: usize) -> Result<Vec<u8>, TsdbError> {
        if off
            .checked_add(len as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(TsdbError::Corrupt(format!(
                "{}: block beyond the end of the file",
                self.path.display()
            )));
        }
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, off)
            .map_err(|e| TsdbError::io("reading part", &self.path, e))?;
        Ok(buf)
    }

    /// Reads a block and checks its CRC.
    pub fn read_block(&self, b: BlockRef) -> Result<Vec<u8>, TsdbError> {
        let buf = self.read_raw(b.off, b.len as usize)?;
        if crc32fast::hash(&buf) != b.crc {
            return Err(TsdbError::Corrupt(format!(
                "{}: checksum mismatch in the block at byte {}",
                self.path.display(),
                b.off
            )));
        }
        Ok(buf)
    }

    /// Reads and decodes a chunk.
    pub fn read_chunk(&self, c: &ChunkRef) -> Result<(Vec<i64>, Values), TsdbError> {
        let n = c.count as usize;
        let ts = column::decode_timestamps(&self.read_block(c.ts)?, n)?;
        let values = column::decode_values(&self.read_block(c.values)?, n)?;
        Ok((ts, values))
    }

    /// Reads a rollup block.
    pub fn read_rollups(&self, b: BlockRef) -> Result<RollupRows, TsdbError> {
        RollupRows::decode(&self.read_block(b)?)
    }
}

fn parse_index(buf: &[u8]) -> Result<PartIndex, TsdbError> {
    let mut r = Reader::new(buf, "part index");
    let n = r.len(buf.len())?;
    let mut series = Vec::with_capacity(n);
    for _ in 0..n {
        let device = r.str()?.to_owned();
        let metric = r.str()?.to_owned();
        let kind = kind_from_tag(r.u8()?)?;
        let count = r.varint()?;
        let min_ts = r.zigzag()?;
        let max_ts = r.zigzag()?;
        let last = read_value(&mut r)?;
        let nchunks = r.len(buf.len())?;
        let mut chunks = Vec::with_capacity(nchunks);
        for _ in 0..nchunks {
            let min_ts = r.zigzag()?;
            let max_ts = r.zigzag()?;
            let count = r.len(MAX_CHUNK_POINTS)? as u32;
            chunks.push(ChunkRef {
                min_ts,
                max_ts,
                count,
                ts: read_block(&mut r)?,
                values: read_block(&mut r)?,
            });
        }
        let minute = match r.u8()? {
            ROLLUPS_NONE | ROLLUPS_HOURLY_ONLY => None,
            ROLLUPS_MINUTE => Some(read_block(&mut r)?),
            t => return Err(TsdbError::Corrupt(format!("unknown rollup tag {t}"))),
        };
        series.push(PartSeries {
            device,
            metric,
            kind,
            count,
            min_ts,
            max_ts,
            last,
            chunks,
            minute,
        });
    }
    let blocks = r.len(buf.len())?;
    let mut hourly = Vec::with_capacity(blocks);
    for _ in 0..blocks {
        hourly.push(HourlyBlock {
            first_series: r.u32()?,
            last_series: r.u32()?,
            block: read_block(&mut r)?,
        });
    }
    Ok(PartIndex { series, hourly })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(device: &str, metric: &str, n: usize, values: Values) -> SeriesData {
        SeriesData {
            device: device.into(),
            metric: metric.into(),
            ts: (0..n as i64)
                .map(|i| 1_700_000_000_000 + i * 1000)
                .collect(),
            values,
        }
    }

    #[test]
    fn sparse_series_keep_hourly_rollups_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.part");
        let sparse = SeriesData {
            ts: (0..288).map(|i| 1_700_000_000_000 + i * 300_000).collect(),
            ..series("d", "slow", 288, Values::Int((0..288).collect()))
        };
        let dense = series("d", "fast", 600, Values::Int((0..600).collect()));
        write_part(&path, &[dense, sparse], false).unwrap();
        let (pf, index) = PartFile::open(&path).unwrap();
        assert!(index.series[0].minute.is_some());
        assert!(index.series[1].minute.is_none());
        let rows: Vec<u32> = index
            .hourly
            .iter()
            .flat_map(|h| pf.read_rollups(h.block).unwrap().series)
            .collect();
        assert!(rows.contains(&0) && rows.contains(&1));
        // 24 hours of 5-minute points starting mid-hour span 25 hourly buckets.
        assert_eq!(rows.iter().filter(|&&s| s == 1).count(), 25);
    }

    #[test]
    fn write_read_and_detect_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.part");
        let n = 20_000;
        let data = vec![
            series(
                "d1",
                "temp",
                n,
                Values::Float((0..n).map(|i| 20.0 + (i % 100) as f64 * 0.01).collect()),
            ),
            series(
                "d1",
                "state",
                10,
                Values::Str((0..10).map(|i| format!("s{}", i % 2)).collect()),
            ),
            series(
                "d2",
                "on",
                100,
                Values::Bool((0..100).map(|i| i > 50).collect()),
            ),
        ];
        let size = write_part(&path, &data, true).unwrap();
        assert!(!tmp_path(&path).exists());
        let (pf, index) = PartFile::open(&path).unwrap();
        assert_eq!(pf.size(), size);
        assert_eq!(index.series.len(), 3);
        let s0 = &index.series[0];
        assert_eq!(s0.chunks.len(), n.div_ceil(MAX_CHUNK_POINTS));
        let mut ts = Vec::new();
        let mut vals = Values::Float(Vec::new());
        for c in &s0.chunks {
            let (t, v) = pf.read_chunk(c).unwrap();
            ts.extend(t);
            for i in 0..v.len() {
                vals.push_from(&v, i);
            }
        }
        assert_eq!(ts, data[0].ts);
        assert_eq!(vals, data[0].values);
        assert_eq!(index.series[1].last, Value::Str("s1".into()));
        assert!(index.series[1].minute.is_none());
        let minute = pf.read_rollups(s0.minute.unwrap()).unwrap();
        let buckets = |w: i64, ts: &[i64]| {
            ts.iter()
                .map(|t| t.div_euclid(w))
                .collect::<std::collections::BTreeSet<_>>()
                .len()
        };
        assert_eq!(minute.len(), buckets(60_000, &data[0].ts));
        let hourly: usize = index
            .hourly
            .iter()
            .map(|h| pf.read_rollups(h.block).unwrap().len())
            .sum();
        assert_eq!(
            hourly,
            buckets(3_600_000, &data[0].ts) + buckets(3_600_000, &data[2].ts)
        );

        // Flip a byte inside the first chunk: the read reports a checksum error.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_LEN as usize + 3] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (pf, index) = PartFile::open(&path).unwrap();
        assert!(matches!(
            pf.read_chunk(&index.series[0].chunks[0]),
            Err(TsdbError::Corrupt(_))
        ));
        // Truncations never panic.
        for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            assert!(PartFile::open(&path).is_err());
        }
    }
}
