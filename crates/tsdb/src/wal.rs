//! The write-ahead log: what has been acknowledged but not yet sealed into a part.
//!
//! ```text
//! segment wal/{seq:016x}.wal: header (16 bytes): magic "FHTSWAL1" | u16 LE version | 6 bytes zero
//! record:                     u32 LE payload length | u32 LE CRC-32 of the payload | payload
//! payload:                    1 = series definition: varint id | tenant | device | metric | u8 kind
//!                             2 = points: varint count | (varint id | zigzag ts delta | value)*
//! ```
//!
//! Series ids are private to a process run; every segment defines the ids it uses before their first
//! point, so a segment replays on its own once older ones are deleted. Replay stops reading a
//! segment at the first bad record (short, oversized or failing its CRC), reports it and goes on
//! with the next segment: a torn tail after a crash costs only the unacknowledged group it held.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::bin_io::Reader;
use crate::error::TsdbError;

const MAGIC: &[u8; 8] = b"FHTSWAL1";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 16;
/// Largest record accepted on replay (a larger length field is corruption).
pub const MAX_RECORD: usize = 64 << 20;

/// Record type: series definition.
pub const REC_SERIES: u8 = 1;
/// Record type: points.
pub const REC_POINTS: u8 = 2;

/// Name of the segment with sequence number `seq`.
pub fn segment_name(seq: u64) -> String {
    format!("{seq:016x}.wal")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".wal")?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok())?
}

/// Sequence numbers of the segments in `dir`, ascending.
pub fn list_segments(dir: &Path) -> Result<Vec<u64>, TsdbError> {
    let mut v = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| TsdbError::io("listing", dir, e))?;
    for e in rd {
        let e = e.map_err(|e| TsdbError::io("listing", dir, e))?;
        if let Some(seq) = e.file_name().to_str().and_then(parse_segment_name) {
            v.push(seq);
        }
    }
    v.sort_unstable();
    Ok(v)
}

/// Appends records to the current segment.
pub struct WalWriter {
    dir: PathBuf,
    seq: u64,
    file: File,
    size: u64,
    buf: Vec<u8>,
}

impl WalWriter {
    /// Creates segment `seq` in `dir`.
    pub fn create(dir: &Path, seq: u64) -> Result<WalWriter, TsdbError> {
        let path = dir.join(segment_name(seq));
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| TsdbError::io("creating WAL segment", &path, e))?;
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[8..10].copy_from_slice(&VERSION.to_le_bytes());
        file.write_all(&header)
            .map_err(|e| TsdbError::io("writing WAL segment", &path, e))?;
        crate::part::sync_dir(dir)?;
        Ok(WalWriter {
            dir: dir.to_owned(),
            seq,
            file,
            size: HEADER_LEN as u64,
            buf: Vec::with_capacity(1 << 20),
        })
    }

    /// The current segment's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Bytes in the current segment (written or buffered).
    pub fn size(&self) -> u64 {
        self.size + self.buf.len() as u64
    }

    /// Buffers one record; `payload` starts with its record type.
    pub fn append(&mut self, payload: &[u8]) {
        self.buf
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.buf
            .extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        self.buf.extend_from_slice(payload);
    }

    /// Writes the buffered records and, when `fsync`, makes them durable.
    pub fn commit(&mut self, fsync: bool) -> Result<(), TsdbError> {
        let path = || self.dir.join(segment_name(self.seq));
        if !self.buf.is_empty() {
            self.file
                .write_all(&self.buf)
                .map_err(|e| TsdbError::io("writing WAL segment", path(), e))?;
            self.size += self.buf.len() as u64;
            self.buf.clear();
        }
        if fsync {
            self.file
                .sync_data()
                .map_err(|e| TsdbError::io("syncing WAL segment", path(), e))?;
        }
        Ok(())
    }

    /// Commits what is buffered and starts segment `seq + 1`.
    pub fn rotate(&mut self, fsync: bool) -> Result<u64, TsdbError> {
        self.commit(fsync)?;
        *self = WalWriter::create(&self.dir, self.seq + 1)?;
        Ok(self.seq)
    }
}

/// What replay found wrong in one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalDamage {
    /// The segment.
    pub segment: String,
    /// Byte offset of the first unreadable record.
    pub offset: u64,
    /// Bytes skipped from there to the end of the segment.
    pub skipped_bytes: u64,
    /// Why.
    pub reason: String,
}

/// Replays every record of every segment in `dir`, in order. Damaged segments are reported, not
/// fatal; `apply` errors (a record that parses badly) are reported the same way.
pub fn replay(
    dir: &Path,
    mut apply: impl FnMut(u64, &[u8]) -> Result<(), TsdbError>,
) -> Result<(Vec<u64>, Vec<WalDamage>), TsdbError> {
    let segments = list_segments(dir)?;
    let mut damage = Vec::new();
    for &seq in &segments {
        let path = dir.join(segment_name(seq));
        let bytes =
            std::fs::read(&path).map_err(|e| TsdbError::io("reading WAL segment", &path, e))?;
        let mut report = |offset: usize, reason: String| {
            damage.push(WalDamage {
                segment: segment_name(seq),
                offset: offset as u64,
                skipped_bytes: (bytes.len() - offset) as u64,
                reason,
            })
        };
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
            // A crash between creating the file and writing its header leaves it empty.
            if !bytes.is_empty() {
                report(0, "not a WAL segment (bad header)".into());
            }
            continue;
        }
        let mut pos = HEADER_LEN;
        while pos < bytes.len() {
            let mut r = Reader::new(&bytes[pos..], "WAL record");
            let (Ok(len), Ok(crc)) = (r.u32(), r.u32()) else {
                report(pos, "truncated record header".into());
                break;
            };
            let len = len as usize;
            if len > MAX_RECORD || len == 0 {
                report(pos, format!("record length {len} out of range"));
                break;
            }
            let Ok(payload) = r.take(len) else {
                report(pos, "truncated record".into());
                break;
            };
            if crc32fast::hash(payload) != crc {
                report(pos, "checksum mismatch".into());
                break;
            }
            if let Err(e) = apply(seq, payload) {
                report(pos, e.to_string());
                break;
            }
            pos += 8 + len;
        }
    }
    Ok((segments, damage))
}

/// Deletes segments with sequence numbers below `seq` (their points are in parts).
pub fn delete_below(dir: &Path, seq: u64) -> Result<(), TsdbError> {
    for s in list_segments(dir)? {
        if s < seq {
            let path = dir.join(segment_name(s));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(TsdbError::io("deleting WAL segment", &path, e)),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_tail_is_reported_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WalWriter::create(dir.path(), 1).unwrap();
        for i in 0..10u8 {
            w.append(&[REC_POINTS, i, i, i]);
        }
        w.commit(true).unwrap();
        let seq = w.rotate(true).unwrap();
        assert_eq!(seq, 2);
        w.append(&[REC_POINTS, 42]);
        w.commit(true).unwrap();
        let path = dir.path().join(segment_name(1));
        let len = std::fs::metadata(&path).unwrap().len();
        // Cut the last record of segment 1 in half and corrupt one in the middle: replay keeps the
        // records before the damage and still reads segment 2.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 2).unwrap();
        let mut seen = Vec::new();
        let (segs, damage) = replay(dir.path(), |s, p| {
            seen.push((s, p.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(segs, vec![1, 2]);
        assert_eq!(seen.len(), 10);
        assert_eq!(seen[9], (2, vec![REC_POINTS, 42]));
        assert_eq!(damage.len(), 1);
        assert_eq!(damage[0].reason, "truncated record");

        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_LEN + 12 * 3 + 9] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let mut n = 0;
        let (_, damage) = replay(dir.path(), |_, _| {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 3 + 1);
        assert_eq!(damage[0].reason, "checksum mismatch");
        delete_below(dir.path(), 2).unwrap();
        assert_eq!(list_segments(dir.path()).unwrap(), vec![2]);
    }
}
