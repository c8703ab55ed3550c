//! Harnesses for hostile bytes, shared by the cargo-fuzz targets in `fuzz/` (nightly,
//! libFuzzer) and by property tests that run in the normal, stable test suite.
//!
//! Each harness must never panic, whatever the input; when the input does decode, what it
//! decodes to must survive an encode/decode round trip unchanged.

use crate::frame::{self, FrameType};
use crate::{auth, msg, op, Compression};

/// `frame::parse` on arbitrary bytes, and the message decoders on what it yields.
pub fn frame_parse(data: &[u8]) {
    let Ok(f) = frame::parse(data) else {
        return;
    };
    assert!(f.wire_len <= data.len());
    assert!(f.payload.len() <= crate::MAX_PAYLOAD);
    // Re-encoding what was parsed gives a frame that parses to the same thing.
    let again = frame::parse(&frame::encode_vec(
        f.kind,
        f.seq,
        &f.payload,
        Compression::None,
    ))
    .expect("re-encoded frame parses");
    assert_eq!(
        (again.kind, again.seq, &again.payload),
        (f.kind, f.seq, &f.payload)
    );
    let p = &f.payload;
    match f.kind {
        FrameType::Ops => op_decode_batch(p),
        FrameType::Hello => drop(msg::Hello::decode(p)),
        FrameType::HelloAck => drop(msg::HelloAck::decode(p)),
        FrameType::Refuse => drop(msg::Refuse::decode(p)),
        FrameType::Ack => drop(msg::Ack::decode(p)),
        FrameType::ApplyError => drop(msg::ApplyError::decode(p)),
        FrameType::AuthRequest => drop(auth::AuthRequest::decode(p)),
        FrameType::AuthChallenge => drop(auth::AuthChallenge::decode(p)),
        FrameType::AuthResponse => drop(auth::AuthResponse::decode(p)),
        FrameType::AuthOk => drop(auth::AuthOk::decode(p)),
        _ => {}
    }
}

/// `op::decode_batch` on arbitrary bytes; a batch that decodes re-encodes to one that
/// decodes to the same ops.
pub fn op_decode_batch(data: &[u8]) {
    let Ok(ops) = op::decode_batch(data) else {
        return;
    };
    let mut out = Vec::new();
    op::encode_batch(ops.iter(), &mut out);
    let again = op::decode_batch(&out).expect("re-encoded batch decodes");
    assert_eq!(again, ops);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The fuzz target `frame_parse`, run on random bytes.
        #[test]
        fn fuzz_frame_parse(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            frame_parse(&data);
        }

        /// The fuzz target `frame_parse` on random payloads inside valid frames of every
        /// type, so the decoders behind the crc check get exercised too.
        #[test]
        fn fuzz_frame_parse_valid_envelope(
            kind in prop::sample::select(&[1u8, 2, 3, 4, 5, 6, 7, 20, 21, 22, 23][..]),
            payload in proptest::collection::vec(any::<u8>(), 0..1024),
        ) {
            let kind = FrameType::from_u8(kind).unwrap();
            frame_parse(&frame::encode_vec(kind, 1, &payload, Compression::None));
            frame_parse(&frame::encode_vec(kind, 1, &payload, Compression::Lzf));
        }

        /// The fuzz target `op_decode_batch`, run on random bytes.
        #[test]
        fn fuzz_op_decode_batch(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            op_decode_batch(&data);
        }

        /// The fuzz target `op_decode_batch` on random bytes after a plausible batch header
        /// (a small op count and a known tag), to get past the first checks.
        #[test]
        fn fuzz_op_decode_batch_plausible(
            n in 1u32..4,
            tag in 1u8..=17,
            rest in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut data = n.to_le_bytes().to_vec();
            data.push(tag);
            data.extend_from_slice(&rest);
            op_decode_batch(&data);
        }
    }
}
