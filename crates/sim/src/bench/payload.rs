//! The benchmark payload: a 16-byte stamp (send time, publisher, sequence) followed by filler.
//!
//! Layout, little-endian: bytes 0..8 are the send time in nanoseconds since the run's monotonic
//! epoch (one `Instant` shared by every task of the process, so publish→deliver latency is exact
//! when publishers and subscribers live in the same process); bytes 8..12 the publisher index;
//! bytes 12..16 that publisher's message sequence number (wrapping). The rest is filler.

/// The smallest payload that can carry a [`Stamp`].
pub const STAMP_LEN: usize = 16;

/// What a benchmark payload carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Send time, nanoseconds since the run epoch.
    pub sent_ns: u64,
    /// Index of the publisher that sent it.
    pub publisher: u32,
    /// The publisher's sequence number for this message.
    pub seq: u32,
}

impl Stamp {
    /// Writes the stamp into the first [`STAMP_LEN`] bytes of `out`; returns false (writing
    /// nothing) when `out` is too short.
    pub fn write(&self, out: &mut [u8]) -> bool {
        let Some(dst) = out.get_mut(..STAMP_LEN) else {
            return false;
        };
        dst[..8].copy_from_slice(&self.sent_ns.to_le_bytes());
        dst[8..12].copy_from_slice(&self.publisher.to_le_bytes());
        dst[12..16].copy_from_slice(&self.seq.to_le_bytes());
        true
    }

    /// Reads a stamp from the front of a payload; `None` when the payload is too short to be one
    /// of ours.
    pub fn read(payload: &[u8]) -> Option<Stamp> {
        let b = payload.get(..STAMP_LEN)?;
        let mut ns = [0u8; 8];
        ns.copy_from_slice(&b[..8]);
        let mut p = [0u8; 4];
        p.copy_from_slice(&b[8..12]);
        let mut s = [0u8; 4];
        s.copy_from_slice(&b[12..16]);
        Some(Stamp {
            sent_ns: u64::from_le_bytes(ns),
            publisher: u32::from_le_bytes(p),
            seq: u32::from_le_bytes(s),
        })
    }
}

/// A payload of `len` bytes (at least [`STAMP_LEN`]): a zero stamp then printable filler.
pub fn template(len: usize) -> Vec<u8> {
    let len = len.max(STAMP_LEN);
    let mut v = vec![0u8; len];
    for (i, b) in v.iter_mut().enumerate().skip(STAMP_LEN) {
        *b = b'a' + (i % 26) as u8;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips() {
        let s = Stamp {
            sent_ns: 0x0102_0304_0506_0708,
            publisher: 77,
            seq: u32::MAX - 1,
        };
        let mut buf = template(64);
        assert!(s.write(&mut buf));
        assert_eq!(Stamp::read(&buf), Some(s));
        assert_eq!(buf.len(), 64);
        assert_eq!(buf[16], b'q');
    }

    #[test]
    fn short_payloads_are_rejected() {
        let s = Stamp {
            sent_ns: 1,
            publisher: 2,
            seq: 3,
        };
        let mut short = [0u8; 15];
        assert!(!s.write(&mut short));
        assert_eq!(Stamp::read(&short), None);
        assert_eq!(template(3).len(), STAMP_LEN);
    }
}
