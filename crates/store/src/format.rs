//! File layout shared by the log and the snapshot: a fixed header, then framed records.
//!
//! ```text
//! header (32 bytes): magic "FHSTORE1" | u16 LE format version | u8 kind (1 log, 2 snapshot) |
//!                    u8 reserved (0) | u64 LE epoch | u64 LE next message id |
//!                    u32 LE CRC-32 of the 28 bytes before it
//! record:            u32 LE payload length | u32 LE CRC-32 of the payload | payload
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

/// File magic.
pub(crate) const MAGIC: &[u8; 8] = b"FHSTORE1";
/// Current (and only) format version of the log and snapshot files.
pub(crate) const FORMAT_VERSION: u16 = 1;
/// Kind byte of a log file.
pub(crate) const KIND_LOG: u8 = 1;
/// Kind byte of a snapshot file.
pub(crate) const KIND_SNAPSHOT: u8 = 2;
/// Size of the file header.
pub(crate) const HEADER_LEN: usize = 32;
/// Size of a record header.
pub(crate) const RECORD_HEADER_LEN: usize = 8;
/// Largest record payload written or accepted.
pub(crate) const MAX_RECORD_LEN: usize = 1 << 30;

/// Prefix of write-ahead log files: `wal-{epoch:016x}.log`.
pub(crate) const LOG_PREFIX: &str = "wal-";
/// Suffix of write-ahead log files.
pub(crate) const LOG_SUFFIX: &str = ".log";
/// The snapshot.
pub(crate) const SNAPSHOT_FILE: &str = "snapshot.bin";
/// The lock file.
pub(crate) const LOCK_FILE: &str = "LOCK";
/// Suffix of files being written before their atomic rename.
pub(crate) const TMP_SUFFIX: &str = ".tmp";

/// File name of the log of `epoch`.
pub(crate) fn log_name(epoch: u64) -> String {
    format!("{LOG_PREFIX}{epoch:016x}{LOG_SUFFIX}")
}

/// The epoch of a log file name, if it is one.
pub(crate) fn parse_log_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix(LOG_PREFIX)?.strip_suffix(LOG_SUFFIX)?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Epochs of the log files in `dir`, ascending.
pub(crate) fn list_logs(dir: &Path) -> io::Result<Vec<u64>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if let Some(epoch) = e.file_name().to_str().and_then(parse_log_name) {
            v.push(epoch);
        }
    }
    v.sort_unstable();
    Ok(v)
}

/// Deletes the logs of epochs up to `epoch` (contained in a snapshot of that epoch).
pub(crate) fn delete_logs_up_to(dir: &Path, epoch: u64) -> io::Result<()> {
    for e in list_logs(dir)? {
        if e <= epoch {
            match std::fs::remove_file(path(dir, &log_name(e))) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
    }
    Ok(())
}

/// A decoded file header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileHeader {
    /// [`KIND_LOG`] or [`KIND_SNAPSHOT`].
    pub kind: u8,
    /// Log generation: a snapshot of epoch `e` contains everything of the logs up to epoch `e`.
    pub epoch: u64,
    /// Next message id when the file was started (a floor that survives the loss of the snapshot).
    pub next_message_id: u64,
}

/// Why a header was refused.
#[derive(Debug)]
pub(crate) enum HeaderError {
    /// Not one of our files, or damaged.
    Corrupt(String),
    /// A valid header of a format version this build does not know.
    UnsupportedVersion(u16),
}

pub(crate) fn encode_header(h: &FileHeader) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[..8].copy_from_slice(MAGIC);
    b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[10] = h.kind;
    b[11] = 0;
    b[12..20].copy_from_slice(&h.epoch.to_le_bytes());
    b[20..28].copy_from_slice(&h.next_message_id.to_le_bytes());
    let crc = crc32fast::hash(&b[..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

pub(crate) fn decode_header(b: &[u8; HEADER_LEN], kind: u8) -> Result<FileHeader, HeaderError> {
    if &b[..8] != MAGIC {
        return Err(HeaderError::Corrupt("bad magic".into()));
    }
    if crc32fast::hash(&b[..28]) != le_u32(&b[28..32]) {
        return Err(HeaderError::Corrupt("header CRC mismatch".into()));
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    if version != FORMAT_VERSION {
        return Err(HeaderError::UnsupportedVersion(version));
    }
    if b[10] != kind {
        return Err(HeaderError::Corrupt(format!(
            "file kind {} where {} was expected",
            b[10], kind
        )));
    }
    Ok(FileHeader {
        kind: b[10],
        epoch: le_u64(&b[12..20]),
        next_message_id: le_u64(&b[20..28]),
    })
}

/// Appends one framed record whose payload `encode` writes. Returns the payload length.
pub(crate) fn put_record(buf: &mut Vec<u8>, encode: impl FnOnce(&mut Vec<u8>)) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
    encode(buf);
    let len = buf.len() - start - RECORD_HEADER_LEN;
    let crc = crc32fast::hash(&buf[start + RECORD_HEADER_LEN..]);
    // Callers bound the payload by MAX_RECORD_LEN (< u32::MAX) beforehand.
    let len32 = u32::try_from(len).unwrap_or(u32::MAX);
    buf[start..start + 4].copy_from_slice(&len32.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    len
}

/// What [`RecordReader::next`] found.
pub(crate) enum Next<'a> {
    /// A record whose CRC checks.
    Record(&'a [u8]),
    /// The clean end of the file.
    End,
    /// Damage at [`RecordReader::good_len`]: everything from there on is unusable.
    Damaged(String),
}

/// Streams the records of a file after its header, verifying each.
pub(crate) struct RecordReader {
    reader: BufReader<File>,
    file_len: u64,
    good_len: u64,
    buf: Vec<u8>,
}

impl RecordReader {
    /// `file` positioned just after its header; `file_len` its length.
    pub(crate) fn new(file: File, file_len: u64) -> Self {
        RecordReader {
            reader: BufReader::with_capacity(256 * 1024, file),
            file_len,
            good_len: HEADER_LEN as u64,
            buf: Vec::new(),
        }
    }

    /// Length of the file up to the end of the last good record.
    pub(crate) fn good_len(&self) -> u64 {
        self.good_len
    }

    /// The next record. I/O errors other than an unexpected end of file are returned as errors.
    pub(crate) fn next(&mut self) -> io::Result<Next<'_>> {
        let remaining = self.file_len.saturating_sub(self.good_len);
        if remaining == 0 {
            return Ok(Next::End);
        }
        let at = self.good_len;
        if remaining < RECORD_HEADER_LEN as u64 {
            return Ok(Next::Damaged(format!(
                "incomplete record header ({remaining} bytes) at offset {at}"
            )));
        }
        let mut head = [0u8; RECORD_HEADER_LEN];
        match self.reader.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Ok(Next::Damaged(format!(
                    "file ends inside the record at offset {at}"
                )));
            }
            Err(e) => return Err(e),
        }
        let len = u64::from(le_u32(&head[..4]));
        let crc = le_u32(&head[4..8]);
        let available = remaining - RECORD_HEADER_LEN as u64;
        if len > MAX_RECORD_LEN as u64 || len > available {
            return Ok(Next::Damaged(format!(
                "record at offset {at} claims {len} bytes but only {available} remain"
            )));
        }
        // `len` <= MAX_RECORD_LEN, so it fits in usize.
        let len = len as usize;
        self.buf.clear();
        self.buf.resize(len, 0);
        match self.reader.read_exact(&mut self.buf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Ok(Next::Damaged(format!(
                    "file ends inside the record at offset {at}"
                )));
            }
            Err(e) => return Err(e),
        }
        if crc32fast::hash(&self.buf) != crc {
            return Ok(Next::Damaged(format!(
                "CRC mismatch in the record at offset {at}"
            )));
        }
        self.good_len += (RECORD_HEADER_LEN + len) as u64;
        Ok(Next::Record(&self.buf))
    }
}

/// Reads the header of an open file positioned at its start.
pub(crate) fn read_header(
    file: &mut File,
    file_len: u64,
    kind: u8,
) -> io::Result<Result<FileHeader, HeaderError>> {
    if file_len < HEADER_LEN as u64 {
        return Ok(Err(HeaderError::Corrupt(format!(
            "file is {file_len} bytes long, shorter than its header"
        ))));
    }
    let mut b = [0u8; HEADER_LEN];
    file.read_exact(&mut b)?;
    Ok(decode_header(&b, kind))
}

/// `dir/name`.
pub(crate) fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// `dir/name.tmp`.
pub(crate) fn tmp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}{TMP_SUFFIX}"))
}

/// fsyncs a directory so that creations and renames in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Atomically creates a new, empty log of `epoch`: header written to a temporary file, fsynced,
/// renamed to its name, directory fsynced. Returns the log opened for appending.
pub(crate) fn create_log(dir: &Path, epoch: u64, next_message_id: u64) -> io::Result<File> {
    let name = log_name(epoch);
    let tmp = tmp_path(dir, &name);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(&encode_header(&FileHeader {
        kind: KIND_LOG,
        epoch,
        next_message_id,
    }))?;
    f.sync_all()?;
    std::fs::rename(&tmp, path(dir, &name))?;
    sync_dir(dir)?;
    Ok(f)
}

/// Deletes leftover temporary files of interrupted snapshot or log creations.
pub(crate) fn remove_tmp_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name.starts_with(LOG_PREFIX) || name.starts_with(SNAPSHOT_FILE);
        if ours && name.ends_with(TMP_SUFFIX) {
            let p = e.path();
            match std::fs::remove_file(&p) {
                Ok(()) => removed.push(p),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
        }
    }
    Ok(removed)
}

/// Milliseconds since the epoch, for names of files set aside.
pub(crate) fn now_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn log_names() {
        assert_eq!(log_name(0x2a), "wal-000000000000002a.log");
        assert_eq!(parse_log_name(&log_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_log_name("wal-2a.log"), None);
        assert_eq!(parse_log_name("wal-000000000000002a.log.tmp"), None);
        assert_eq!(parse_log_name("wal-000000000000002a.log.bad-1"), None);
    }

    #[test]
    fn header_round_trip_and_damage() {
        let h = FileHeader {
            kind: KIND_LOG,
            epoch: 42,
            next_message_id: 7,
        };
        let b = encode_header(&h);
        assert_eq!(decode_header(&b, KIND_LOG).unwrap(), h);
        assert!(matches!(
            decode_header(&b, KIND_SNAPSHOT),
            Err(HeaderError::Corrupt(_))
        ));
        for i in 0..HEADER_LEN {
            let mut bad = b;
            bad[i] ^= 0x10;
            assert!(decode_header(&bad, KIND_LOG).is_err());
        }
        let mut future = b;
        future[8] = 9;
        let crc = crc32fast::hash(&future[..28]);
        future[28..32].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode_header(&future, KIND_LOG),
            Err(HeaderError::UnsupportedVersion(9))
        ));
    }
}
