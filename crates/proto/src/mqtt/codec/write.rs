//! The two sinks every encoder writes to: a byte counter and a buffer.

use bytes::{BufMut, BytesMut};

use super::{EncodeError, MAX_REMAINING_LENGTH};

/// Where encoded bytes go. Encoders are generic over it so that [`Counter`] (for
/// `encoded_len` and for length prefixes) and [`BytesMut`] see exactly the same calls.
pub(super) trait Sink {
    /// True for [`Counter`]: lets length prefixes skip a second counting pass.
    const COUNTING: bool;
    /// Appends a byte.
    fn u8(&mut self, v: u8);
    /// Appends a big-endian Two Byte Integer.
    fn u16(&mut self, v: u16);
    /// Appends a big-endian Four Byte Integer.
    fn u32(&mut self, v: u32);
    /// Appends raw bytes.
    fn slice(&mut self, b: &[u8]);
    /// Accounts for `n` bytes without their content (counters only; writers never get it).
    fn skip(&mut self, n: usize);
}

/// Counts bytes instead of writing them.
#[derive(Default)]
pub(super) struct Counter(pub(super) usize);

impl Sink for Counter {
    const COUNTING: bool = true;
    #[inline]
    fn u8(&mut self, _: u8) {
        self.0 = self.0.saturating_add(1);
    }
    #[inline]
    fn u16(&mut self, _: u16) {
        self.0 = self.0.saturating_add(2);
    }
    #[inline]
    fn u32(&mut self, _: u32) {
        self.0 = self.0.saturating_add(4);
    }
    #[inline]
    fn slice(&mut self, b: &[u8]) {
        self.0 = self.0.saturating_add(b.len());
    }
    #[inline]
    fn skip(&mut self, n: usize) {
        self.0 = self.0.saturating_add(n);
    }
}

impl Sink for BytesMut {
    const COUNTING: bool = false;
    #[inline]
    fn u8(&mut self, v: u8) {
        self.put_u8(v);
    }
    #[inline]
    fn u16(&mut self, v: u16) {
        self.put_u16(v);
    }
    #[inline]
    fn u32(&mut self, v: u32) {
        self.put_u32(v);
    }
    #[inline]
    fn slice(&mut self, b: &[u8]) {
        self.put_slice(b);
    }
    #[inline]
    fn skip(&mut self, _: usize) {}
}

/// Bytes a Variable Byte Integer takes for `v` (which must be at most [`MAX_REMAINING_LENGTH`]).
#[inline]
pub(super) fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Appends a Variable Byte Integer; values past four bytes' worth cannot be encoded.
#[inline]
pub(super) fn varint<S: Sink>(s: &mut S, mut v: usize) -> Result<(), EncodeError> {
    if v > MAX_REMAINING_LENGTH {
        return Err(EncodeError::TooLarge);
    }
    loop {
        // Truncation intended: the low seven bits.
        let byte = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            s.u8(byte);
            return Ok(());
        }
        s.u8(byte | 0x80);
    }
}

/// A length-prefixed field (UTF-8 string or binary data); `field` names it in the error.
#[inline]
pub(super) fn prefixed<S: Sink>(
    s: &mut S,
    bytes: &[u8],
    field: &'static str,
) -> Result<(), EncodeError> {
    let n = u16::try_from(bytes.len()).map_err(|_| EncodeError::FieldTooLong(field))?;
    s.u16(n);
    s.slice(bytes);
    Ok(())
}
