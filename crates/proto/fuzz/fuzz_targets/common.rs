//! The shared fuzz body: decode packets from the input until it runs out or fails; every packet
//! that decodes must re-encode, `encoded_len` must match, and decoding the re-encoding must give
//! the same packet back.

use bytes::BytesMut;
use ferrohub_proto::mqtt::{ProtocolVersion, decode, encode, encoded_len};

/// The first input byte picks a packet-size limit so that `TooLarge` paths are exercised too.
pub fn run(data: &[u8], version: ProtocolVersion) {
    let Some((&limit, data)) = data.split_first() else {
        return;
    };
    let max = if limit == 0xFF {
        usize::MAX
    } else {
        usize::from(limit) * 4
    };
    let mut buf = BytesMut::from(data);
    while let Ok(Some(packet)) = decode(&mut buf, version, max) {
        let mut out = BytesMut::new();
        match encode(&packet, version, &mut out) {
            Ok(()) => {}
            Err(e) => panic!("decoded packet does not re-encode: {e}: {packet:?}"),
        }
        assert_eq!(encoded_len(&packet, version), Ok(out.len()));
        let again = decode(&mut out, version, usize::MAX);
        assert_eq!(
            again,
            Ok(Some(packet)),
            "re-encoding does not decode to the same packet"
        );
        assert!(out.is_empty(), "re-encoding has trailing bytes");
    }
}
