//! Property tests: encode → decode is the identity for every representable packet, `encoded_len`
//! is exact, streams decode at any split, and no input makes the decoder panic.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic on failure.

mod common;

use bytes::BytesMut;
use common::packet;
use ferrohub_proto::mqtt::*;
use proptest::collection::vec;
use proptest::prelude::*;

fn round_trip(p: &Packet, version: ProtocolVersion) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::new();
    encode(p, version, &mut buf).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(encoded_len(p, version), Ok(buf.len()));
    let decoded = decode(&mut buf, version, usize::MAX);
    prop_assert_eq!(decoded, Ok(Some(p.clone())));
    prop_assert!(buf.is_empty());
    Ok(())
}

/// Decodes everything in `buf`, asserting that `Ok(None)` consumes nothing.
fn drain(buf: &mut BytesMut, version: ProtocolVersion, out: &mut Vec<Packet>) {
    loop {
        let before = buf.len();
        match decode(buf, version, usize::MAX) {
            Ok(Some(p)) => out.push(p),
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                return;
            }
            Err(e) => panic!("valid stream failed to decode: {e}"),
        }
    }
}

/// Decoding arbitrary bytes must only ever return; whatever it returns is fine.
fn decode_all(bytes: &[u8], version: ProtocolVersion, max: usize) {
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(p)) = decode(&mut buf, version, max) {
        // Whatever decodes must re-encode to something that decodes to the same packet.
        let mut out = BytesMut::new();
        if encode(&p, version, &mut out).is_ok() {
            assert_eq!(encoded_len(&p, version), Ok(out.len()));
            assert_eq!(decode(&mut out, version, usize::MAX), Ok(Some(p)));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn round_trip_v311(p in packet(ProtocolVersion::V311)) {
        round_trip(&p, ProtocolVersion::V311)?;
    }

    #[test]
    fn round_trip_v31(p in packet(ProtocolVersion::V31)) {
        round_trip(&p, ProtocolVersion::V31)?;
    }

    #[test]
    fn round_trip_v5(p in packet(ProtocolVersion::V5)) {
        round_trip(&p, ProtocolVersion::V5)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Several packets back to back, split in two at an arbitrary point.
    #[test]
    fn stream_splits(
        v5 in any::<bool>(),
        packets in vec(packet(ProtocolVersion::V5), 1..6),
        packets3 in vec(packet(ProtocolVersion::V311), 1..6),
        split in any::<prop::sample::Index>(),
    ) {
        let (version, packets) = if v5 {
            (ProtocolVersion::V5, packets)
        } else {
            (ProtocolVersion::V311, packets3)
        };
        let mut wire = BytesMut::new();
        for p in &packets {
            encode(p, version, &mut wire).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        let at = split.index(wire.len() + 1);
        let mut buf = BytesMut::from(&wire[..at]);
        let mut out = Vec::new();
        drain(&mut buf, version, &mut out);
        buf.extend_from_slice(&wire[at..]);
        drain(&mut buf, version, &mut out);
        prop_assert!(buf.is_empty());
        prop_assert_eq!(out, packets);
    }

    /// Random bytes never panic, under any version and limit.
    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..256), max in 0usize..300) {
        for version in [ProtocolVersion::V31, ProtocolVersion::V311, ProtocolVersion::V5] {
            decode_all(&bytes, version, max);
            decode_all(&bytes, version, usize::MAX);
        }
    }

    /// Valid packets with a few bytes overwritten: much closer to the interesting edge cases
    /// than uniform noise.
    #[test]
    fn mutated_packets_never_panic(
        p in packet(ProtocolVersion::V5),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
            let mut wire = BytesMut::new();
            if encode(&p, version, &mut wire).is_err() {
                continue;
            }
            for (i, b) in &edits {
                let i = i.index(wire.len());
                wire[i] = *b;
            }
            decode_all(&wire, version, usize::MAX);
        }
    }
}

/// Every prefix of a valid stream is `Ok(None)` or whole packets, never an error.
#[test]
fn every_split_point_of_a_stream() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut runner = TestRunner::deterministic();
        let packets: Vec<Packet> = (0..12)
            .map(|_| {
                packet(version)
                    .new_tree(&mut runner)
                    .expect("strategy")
                    .current()
            })
            .collect();
        let mut wire = BytesMut::new();
        for p in &packets {
            encode(p, version, &mut wire).expect("encode");
        }
        for at in 0..=wire.len() {
            let mut buf = BytesMut::from(&wire[..at]);
            let mut out = Vec::new();
            drain(&mut buf, version, &mut out);
            buf.extend_from_slice(&wire[at..]);
            drain(&mut buf, version, &mut out);
            assert!(buf.is_empty());
            assert_eq!(out, packets, "split at {at}");
        }
        // And byte by byte.
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for b in wire.iter() {
            buf.extend_from_slice(&[*b]);
            drain(&mut buf, version, &mut out);
        }
        assert_eq!(out, packets);
    }
}
