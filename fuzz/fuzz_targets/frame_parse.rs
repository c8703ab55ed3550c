//! Hostile bytes into the frame decoder (and the message decoders behind it).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tdfs_protocol::fuzzing::frame_parse(data);
});
