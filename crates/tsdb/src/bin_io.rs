//! Little-endian and varint helpers for the engine's binary formats, with a bounds-checked reader
//! (every persisted byte is untrusted on the way back in: a truncated or corrupted file must give an
//! error, never a panic).

use crate::error::TsdbError;

/// Appends primitives to a byte vector.
pub(crate) trait PutBytes {
    fn put_u8(&mut self, v: u8);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
    fn put_i64(&mut self, v: i64);
    fn put_f64(&mut self, v: f64);
    fn put_varint(&mut self, v: u64);
    fn put_zigzag(&mut self, v: i64);
    fn put_str(&mut self, s: &str);
    fn put_blob(&mut self, b: &[u8]);
}

impl PutBytes for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_i64(&mut self, v: i64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_f64(&mut self, v: f64) {
        self.extend_from_slice(&v.to_bits().to_le_bytes());
    }
    fn put_varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.push(v as u8);
    }
    fn put_zigzag(&mut self, v: i64) {
        self.put_varint(((v << 1) ^ (v >> 63)) as u64);
    }
    fn put_str(&mut self, s: &str) {
        self.put_blob(s.as_bytes());
    }
    fn put_blob(&mut self, b: &[u8]) {
        self.put_varint(b.len() as u64);
        self.extend_from_slice(b);
    }
}

/// Reads primitives from a byte slice; every read is bounds-checked.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`; `what` names the structure in errors.
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }

    fn corrupt(&self, why: &str) -> TsdbError {
        TsdbError::Corrupt(format!("{} at byte {}: {why}", self.what, self.pos))
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// Everything not read yet.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos.min(self.buf.len())..];
        self.pos = self.buf.len();
        s
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], TsdbError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.corrupt("truncated"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], TsdbError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, TsdbError> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32, TsdbError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, TsdbError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(crate) fn i64(&mut self) -> Result<i64, TsdbError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    pub(crate) fn f64(&mut self) -> Result<f64, TsdbError> {
        Ok(f64::from_bits(u64::from_le_bytes(self.array()?)))
    }
    pub(crate) fn varint(&mut self) -> Result<u64, TsdbError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(self.corrupt("varint too long"))
    }
    /// A varint that must fit a `usize` length below `max`.
    pub(crate) fn len(&mut self, max: usize) -> Result<usize, TsdbError> {
        let v = self.varint()?;
        usize::try_from(v)
            .ok()
            .filter(|&n| n <= max)
            .ok_or_else(|| self.corrupt("length out of range"))
    }
    pub(crate) fn zigzag(&mut self) -> Result<i64, TsdbError> {
        let v = self.varint()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }
    pub(crate) fn blob(&mut self) -> Result<&'a [u8], TsdbError> {
        let n = self.len(self.buf.len())?;
        self.take(n)
    }
    pub(crate) fn str(&mut self) -> Result<&'a str, TsdbError> {
        let b = self.blob()?;
        std::str::from_utf8(b).map_err(|_| self.corrupt("invalid UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let mut b = Vec::new();
        b.put_varint(300);
        b.put_zigzag(-5);
        b.put_str("héllo");
        b.put_f64(1.5);
        b.put_i64(-7);
        let mut r = Reader::new(&b, "test");
        assert_eq!(r.varint().unwrap(), 300);
        assert_eq!(r.zigzag().unwrap(), -5);
        assert_eq!(r.str().unwrap(), "héllo");
        assert_eq!(r.f64().unwrap(), 1.5);
        assert_eq!(r.i64().unwrap(), -7);
        assert!(r.is_empty());
        for cut in 0..b.len() {
            let mut r = Reader::new(&b[..cut], "test");
            let res = (|| -> Result<(), TsdbError> {
                r.varint()?;
                r.zigzag()?;
                r.str()?;
                r.f64()?;
                r.i64()?;
                Ok(())
            })();
            assert!(res.is_err(), "cut at {cut}");
        }
    }
}
