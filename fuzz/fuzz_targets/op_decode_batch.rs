//! Hostile bytes into the op batch decoder.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tdfs_protocol::fuzzing::op_decode_batch(data);
});
