//! A bounds-checked cursor over one packet's bytes.

use std::sync::Arc;

use bytes::Bytes;

use super::DecodeError;

/// The error for any read past the end of the packet (or of a property block).
pub(super) const TRUNCATED: DecodeError =
    DecodeError::Malformed("packet shorter than its declared content");

/// Reads MQTT data types from `buf[pos..end]`.
///
/// `src`, when present, is the same bytes as `buf` held as [`Bytes`], so that binary fields can
/// be returned as zero-copy slices; without it they are copied (only packets that carry no
/// binary fields are parsed that way).
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
    src: Option<&'a Bytes>,
}

impl<'a> Reader<'a> {
    /// A reader over `buf[pos..]`.
    pub(super) fn new(buf: &'a [u8], pos: usize, src: Option<&'a Bytes>) -> Self {
        Reader {
            buf,
            pos: pos.min(buf.len()),
            end: buf.len(),
            src,
        }
    }

    /// Bytes left before `end`.
    #[inline]
    pub(super) fn remaining(&self) -> usize {
        self.end - self.pos
    }

    /// True when every byte has been read.
    #[inline]
    pub(super) fn is_empty(&self) -> bool {
        self.pos >= self.end
    }

    /// The absolute position of the cursor in `buf`.
    #[inline]
    pub(super) fn position(&self) -> usize {
        self.pos
    }

    /// Fails with `Malformed` unless everything was read (no trailing bytes).
    #[inline]
    pub(super) fn finish(&self) -> Result<(), DecodeError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed(
                "trailing bytes after the packet's content",
            ))
        }
    }

    /// The next `n` bytes.
    #[inline]
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(TRUNCATED);
        }
        let start = self.pos;
        self.pos += n;
        self.buf.get(start..self.pos).ok_or(TRUNCATED)
    }

    /// Everything up to `end`.
    #[inline]
    pub(super) fn rest(&mut self) -> &'a [u8] {
        let start = self.pos;
        self.pos = self.end;
        self.buf.get(start..self.end).unwrap_or_default()
    }

    /// A reader over the next `n` bytes, which this one skips.
    pub(super) fn sub(&mut self, n: usize) -> Result<Reader<'a>, DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Malformed("property length exceeds the packet"));
        }
        let sub = Reader {
            buf: self.buf,
            pos: self.pos,
            end: self.pos + n,
            src: self.src,
        };
        self.pos += n;
        Ok(sub)
    }

    /// A byte.
    #[inline]
    pub(super) fn u8(&mut self) -> Result<u8, DecodeError> {
        match self.take(1)? {
            [b] => Ok(*b),
            _ => Err(TRUNCATED),
        }
    }

    /// A Two Byte Integer.
    #[inline]
    pub(super) fn u16(&mut self) -> Result<u16, DecodeError> {
        match self.take(2)? {
            [a, b] => Ok(u16::from_be_bytes([*a, *b])),
            _ => Err(TRUNCATED),
        }
    }

    /// A Four Byte Integer.
    #[inline]
    pub(super) fn u32(&mut self) -> Result<u32, DecodeError> {
        match self.take(4)? {
            [a, b, c, d] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
            _ => Err(TRUNCATED),
        }
    }

    /// A Variable Byte Integer (at most four bytes).
    pub(super) fn varint(&mut self) -> Result<u32, DecodeError> {
        let mut value = 0u32;
        for shift in [0, 7, 14, 21] {
            let b = self.u8()?;
            value |= u32::from(b & 0x7F) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Malformed(
            "variable byte integer longer than 4 bytes",
        ))
    }

    /// A UTF-8 Encoded String, validated.
    #[inline]
    pub(super) fn str(&mut self) -> Result<&'a str, DecodeError> {
        let n = self.u16()?;
        utf8(self.take(usize::from(n))?)
    }

    /// A UTF-8 Encoded String as an owned `String`.
    pub(super) fn string(&mut self) -> Result<String, DecodeError> {
        self.str().map(str::to_owned)
    }

    /// A UTF-8 Encoded String as a shared `Arc<str>`.
    #[inline]
    pub(super) fn arc_str(&mut self) -> Result<Arc<str>, DecodeError> {
        self.str().map(Arc::from)
    }

    /// Binary Data: a zero-copy slice when the reader has its source `Bytes`.
    pub(super) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = usize::from(self.u16()?);
        let start = self.pos;
        let data = self.take(n)?;
        Ok(match self.src {
            Some(src) if src.len() == self.buf.len() => src.slice(start..start + n),
            _ => Bytes::copy_from_slice(data),
        })
    }
}

/// Validates an MQTT UTF-8 string: well-formed UTF-8 (which already excludes surrogates) and no
/// U+0000, both of which the spec makes a Malformed Packet.
#[inline]
pub(super) fn utf8(bytes: &[u8]) -> Result<&str, DecodeError> {
    if bytes.contains(&0) {
        return Err(DecodeError::Malformed("U+0000 in a UTF-8 string"));
    }
    std::str::from_utf8(bytes).map_err(|_| DecodeError::Malformed("invalid UTF-8 string"))
}

/// The outcome of reading a fixed header's Remaining Length from the front of a buffer.
pub(super) enum Header {
    /// More bytes are needed to know the length.
    Incomplete,
    /// The Remaining Length and the total header size (type byte included).
    Complete {
        /// Remaining Length.
        remaining: usize,
        /// 1 + the length of the Variable Byte Integer.
        header_len: usize,
    },
}

/// Reads the Remaining Length that follows the type byte at `buf[0]`.
#[inline]
pub(super) fn fixed_header(buf: &[u8]) -> Result<Header, DecodeError> {
    let mut remaining = 0usize;
    for (i, shift) in [0usize, 7, 14, 21].into_iter().enumerate() {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(Header::Incomplete);
        };
        remaining |= usize::from(b & 0x7F) << shift;
        if b & 0x80 == 0 {
            return Ok(Header::Complete {
                remaining,
                header_len: 2 + i,
            });
        }
    }
    Err(DecodeError::Malformed(
        "remaining length longer than 4 bytes",
    ))
}
