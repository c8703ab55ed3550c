use crate::frame::{self, FrameError, FrameType, HEADER_LEN, MAX_PAYLOAD};
use crate::history::{Epoch, History, Standing};
use crate::msg::{Ack, ApplyError, Hello, HelloAck, Refuse, RefuseCode};
use crate::op::{self, *};
use crate::path::WirePath;
use crate::Compression;
use bytes::Bytes;
use proptest::prelude::*;

fn name() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(1u8..=255, 1..20)
        .prop_filter("valid name", |n| crate::path::validate_name(n).is_ok())
}

fn path() -> impl Strategy<Value = WirePath> {
    proptest::collection::vec(name(), 0..6)
        .prop_map(|c| WirePath::from_components(c).expect("valid components"))
}

fn attr() -> impl Strategy<Value = Attr> {
    (0u32..=0o7777, any::<u32>(), any::<u32>()).prop_map(|(mode, uid, gid)| Attr { mode, uid, gid })
}

fn times() -> impl Strategy<Value = Times> {
    (
        any::<i64>(),
        0u32..1_000_000_000,
        any::<i64>(),
        0u32..1_000_000_000,
    )
        .prop_map(|(a, an, m, mn)| Times {
            atime: Timespec { sec: a, nsec: an },
            mtime: Timespec { sec: m, nsec: mn },
        })
}

fn touch() -> impl Strategy<Value = Touch> {
    prop_oneof![
        times().prop_map(Touch::Own),
        times().prop_map(Touch::Parent),
        (path(), times()).prop_map(|(p, t)| Touch::Path(p, t)),
    ]
}

fn kind() -> impl Strategy<Value = OpKind> {
    let bytes = |max| proptest::collection::vec(any::<u8>(), 0..max);
    prop_oneof![
        (path(), attr()).prop_map(|(path, attr)| OpKind::Create { path, attr }),
        (path(), 1u8..=5, any::<u64>(), attr()).prop_map(|(path, k, rdev, attr)| OpKind::Mknod {
            path,
            kind: [
                NodeKind::Fifo,
                NodeKind::Socket,
                NodeKind::Char,
                NodeKind::Block,
                NodeKind::Regular
            ][k as usize - 1],
            rdev,
            attr
        }),
        (path(), attr()).prop_map(|(path, attr)| OpKind::Mkdir { path, attr }),
        (path(), name(), attr()).prop_map(|(path, target, attr)| OpKind::Symlink {
            path,
            target,
            attr
        }),
        (path(), path()).prop_map(|(existing, new)| OpKind::Link { existing, new }),
        path().prop_map(|path| OpKind::Unlink { path }),
        path().prop_map(|path| OpKind::Rmdir { path }),
        (path(), path(), 0u32..3).prop_map(|(from, to, flags)| OpKind::Rename { from, to, flags }),
        (path(), proptest::option::of(any::<u64>()), attr())
            .prop_map(|(path, size, attr)| OpKind::SetAttr { path, size, attr }),
        (path(), any::<u64>(), bytes(3000)).prop_map(|(path, offset, data)| OpKind::Write {
            path,
            offset,
            data: data.into()
        }),
        (path(), any::<i32>(), any::<u64>(), any::<u64>()).prop_map(|(path, mode, offset, len)| {
            OpKind::Fallocate {
                path,
                mode,
                offset,
                len,
            }
        }),
        (path(), any::<u64>(), path(), any::<u64>(), any::<u64>()).prop_map(
            |(src, src_offset, path, offset, len)| OpKind::CopyRange {
                src,
                src_offset,
                path,
                offset,
                len
            }
        ),
        (path(), name(), bytes(300), any::<i32>()).prop_map(|(path, name, value, flags)| {
            OpKind::SetXattr {
                path,
                name,
                value,
                flags,
            }
        }),
        (path(), name()).prop_map(|(path, name)| OpKind::RemoveXattr { path, name }),
        (proptest::option::of(path()), any::<bool>())
            .prop_map(|(path, datasync)| OpKind::Fsync { path, datasync }),
        path().prop_map(|path| OpKind::SetTimes { path }),
        path().prop_map(|path| OpKind::RemoveTree { path }),
    ]
}

fn an_op() -> impl Strategy<Value = Op> {
    (kind(), proptest::collection::vec(touch(), 0..4)).prop_map(|(kind, touch)| Op { kind, touch })
}

proptest! {
    #[test]
    fn encode_write_matches_encode(p in path(), off in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..5000), t in proptest::collection::vec(touch(), 0..3)) {
        let o = Op { kind: OpKind::Write { path: p.clone(), offset: off, data: data.clone().into() }, touch: t.clone() };
        let mut want = Vec::new();
        o.encode(&mut want);
        prop_assert_eq!(&op::encode_write(&p, off, &data, &t)[..], &want[..]);
    }

    #[test]
    fn header_with_crc_matches_encode(parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..5), seq in any::<u64>()) {
        // Each part checksummed on its own, then combined, as a fan-out sender does.
        let mut crc = crc32fast::Hasher::new();
        for p in &parts {
            let mut h = crc32fast::Hasher::new();
            h.update(p);
            crc.combine(&h);
        }
        let whole: Vec<u8> = parts.concat();
        let mut bytes = frame::header_with_crc(FrameType::Ops, seq, whole.len(), &crc).to_vec();
        bytes.extend_from_slice(&whole);
        prop_assert_eq!(bytes, frame::encode_vec(FrameType::Ops, seq, &whole, Compression::None));
    }

    #[test]
    fn op_roundtrip(o in an_op()) {
        let mut buf = Vec::new();
        o.encode(&mut buf);
        prop_assert_eq!(Op::decode(&buf).unwrap(), o);
    }

    #[test]
    fn batch_frame_roundtrip(ops in proptest::collection::vec(an_op(), 0..8), z in 0u8..3, seq in any::<u64>()) {
        let mut payload = Vec::new();
        op::encode_batch(&ops, &mut payload);
        let comp = Compression::from_level(z).unwrap();
        let bytes = frame::encode_vec(FrameType::Ops, seq, &payload, comp);
        prop_assert_eq!(frame::check(&bytes).unwrap(), bytes.len());
        let f = frame::parse(&bytes).unwrap();
        prop_assert_eq!(f.kind, FrameType::Ops);
        prop_assert_eq!(f.seq, seq);
        prop_assert_eq!(f.wire_len, bytes.len());
        prop_assert_eq!(op::decode_batch(&f.payload).unwrap(), ops.clone());
        // Decoding from a shared buffer gives the same ops, with write data pointing into it.
        let shared = Bytes::from(f.payload.clone());
        let range = shared.as_ptr_range();
        let from_shared = op::decode_batch_shared(&shared).unwrap();
        for o in &from_shared {
            if let OpKind::Write { data, .. } = &o.kind {
                prop_assert!(data.is_empty() || range.contains(&data.as_ptr()));
            }
        }
        prop_assert_eq!(from_shared, ops);
        // The frame's length is known from its header alone (every frame has a whole one).
        prop_assert_eq!(frame::frame_len(&bytes[..HEADER_LEN]).unwrap(), bytes.len());
        // The borrowing parse yields the same frame and copies no uncompressed payload.
        let r = frame::parse_ref(&bytes).unwrap();
        prop_assert_eq!(r.clone().into_owned(), f);
        prop_assert_eq!(matches!(r.payload, std::borrow::Cow::Borrowed(_)), bytes[6] == 0);
        // Every strict prefix is Incomplete, never an error and never a frame.
        for cut in [0, 1, 3, HEADER_LEN - 1, HEADER_LEN, bytes.len() - 1] {
            if cut < bytes.len() {
                prop_assert_eq!(frame::check(&bytes[..cut]), Err(FrameError::Incomplete));
            }
        }
    }

    /// Random bytes never panic, never allocate past the limits, and never parse as ops
    /// unless they really are a valid frame.
    #[test]
    fn random_bytes_are_harmless(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = frame::parse(&bytes);
        let _ = op::decode_batch(&bytes);
        let _ = op::decode_batch_shared(&Bytes::from(bytes.clone()));
        let _ = frame::frame_len(&bytes);
        let _ = Op::decode(&bytes);
        let _ = Hello::decode(&bytes);
        let _ = ApplyError::decode(&bytes);
    }

    /// Flipping any byte of a valid frame is caught (crc, magic, version, type or lengths).
    #[test]
    fn corrupted_frames_are_rejected(o in an_op(), pos in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let mut payload = Vec::new();
        op::encode_batch([&o], &mut payload);
        let mut bytes = frame::encode_vec(FrameType::Ops, 7, &payload, Compression::None);
        let i = pos.index(bytes.len());
        bytes[i] ^= flip;
        if let Ok(f) = frame::parse(&bytes) {
            prop_assert!(false, "corrupted frame parsed: {:?}", f.kind);
        }
    }

    /// Valid frames whose payload is random: the op decoder rejects or decodes, never panics.
    #[test]
    fn random_payload_in_valid_frame(payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let bytes = frame::encode_vec(FrameType::Ops, 1, &payload, Compression::None);
        let f = frame::parse(&bytes).unwrap();
        let _ = op::decode_batch(&f.payload);
    }
}

#[test]
fn oversize_lengths_refused_before_allocation() {
    let mut bytes = frame::encode_vec(FrameType::Ops, 1, b"", Compression::None);
    bytes[16..20].copy_from_slice(&((MAX_PAYLOAD as u32) + 1).to_le_bytes());
    assert_eq!(
        frame::check(&bytes),
        Err(FrameError::TooLarge(MAX_PAYLOAD + 1))
    );
    // A write whose declared data length is huge is refused without reading further.
    let o = Op::new(OpKind::Write {
        path: WirePath::parse(b"f").unwrap(),
        offset: 0,
        data: vec![1, 2, 3].into(),
    });
    let mut enc = Vec::new();
    o.encode(&mut enc);
    // tag(1) + path(2+1+1) + offset(8) then the u32 length
    enc[13..17].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        Op::decode(&enc),
        Err(crate::DecodeError::TooLarge { .. })
    ));
}

#[test]
fn bad_magic_version_type() {
    let good = frame::encode_vec(
        FrameType::Ack,
        0,
        &Ack::default().encode(),
        Compression::None,
    );
    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(frame::check(&b), Err(FrameError::BadMagic(_))));
    assert!(matches!(
        frame::check(b"GET "),
        Err(FrameError::BadMagic(_))
    ));
    let mut b = good.clone();
    b[4] = 99;
    assert_eq!(frame::check(&b), Err(FrameError::BadVersion(99)));
    let mut b = good.clone();
    b[5] = 200;
    assert_eq!(frame::check(&b), Err(FrameError::BadType(200)));
}

#[test]
fn bad_names_refused_by_decoder() {
    // Hand-build a create of "..": tag 1, depth 1, len 2, "..".
    let mut enc = vec![1u8, 1, 0, 2, b'.', b'.'];
    enc.extend_from_slice(&[0; 12]);
    enc.push(0);
    assert!(matches!(Op::decode(&enc), Err(crate::DecodeError::Path(_))));
    let mut enc = vec![1u8, 1, 0, 3, b'a', b'/', b'b'];
    enc.extend_from_slice(&[0; 12]);
    enc.push(0);
    assert!(matches!(Op::decode(&enc), Err(crate::DecodeError::Path(_))));
    let mut enc = vec![1u8, 1, 0, 2, b'a', 0];
    enc.extend_from_slice(&[0; 12]);
    enc.push(0);
    assert!(matches!(Op::decode(&enc), Err(crate::DecodeError::Path(_))));
}

#[test]
fn out_of_range_nanoseconds_refused() {
    let whole_second = Timespec {
        sec: 1,
        nsec: 1_000_000_000,
    };
    let o = Op::new(OpKind::SetTimes {
        path: WirePath::root(),
    })
    .with_touch(Touch::Own(Times {
        atime: Timespec::default(),
        mtime: whole_second,
    }));
    let mut enc = Vec::new();
    o.encode(&mut enc);
    assert_eq!(
        Op::decode(&enc),
        Err(crate::DecodeError::BadNanos(1_000_000_000))
    );
    let l = crate::sync::Listing {
        errno: 0,
        more: false,
        entries: vec![crate::sync::Entry {
            name: b"f".to_vec(),
            mode: 0o100644,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: whole_second,
            rdev: 0,
            ino: 1,
            nlink: 1,
            target: vec![],
            xattrs: vec![],
            flags: 0,
            projid: 0,
        }],
    };
    assert_eq!(
        crate::sync::Listing::decode(&l.encode()),
        Err(crate::DecodeError::BadNanos(1_000_000_000))
    );
}

#[test]
fn messages_roundtrip() {
    let hist = History {
        epochs: vec![
            Epoch {
                number: 1,
                id: [7; 16],
                start: 1,
            },
            Epoch {
                number: 3,
                id: [8; 16],
                start: 90,
            },
        ],
    };
    let h = Hello {
        proto_min: crate::msg::PROTO_MIN,
        proto_max: crate::msg::PROTO_MAX,
        history: hist.clone(),
        next_seq: 42,
        flags: crate::msg::HELLO_FALLBACK,
        label: "host:/data".into(),
    };
    assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
    let range = |proto_min, proto_max| Hello {
        proto_min,
        proto_max,
        ..h.clone()
    };
    assert_eq!(range(3, 3).common_proto(), Some(3));
    // Versions 1 and 2 (before histories joined the handshake) are not spoken any more, but
    // an old peer's Hello still decodes far enough to be told so.
    assert_eq!(range(1, 2).common_proto(), None);
    let mut old = Vec::new();
    old.extend_from_slice(&1u16.to_le_bytes());
    old.extend_from_slice(&1u16.to_le_bytes());
    old.extend_from_slice(&[0u8; 30]);
    assert_eq!(Hello::decode(&old).unwrap().common_proto(), None);
    assert_eq!(range(0, 9).common_proto(), Some(crate::msg::PROTO_MAX));
    assert_eq!(range(7, 9).common_proto(), None);
    assert_eq!(range(0, 0).common_proto(), None);
    assert_eq!(range(3, 0).common_proto(), None);
    for seen in [None, Some(hist.epochs[1])] {
        let a = HelloAck {
            proto: 3,
            history: hist.clone(),
            seen,
            applied: 41,
            flags: crate::msg::ack_flags::SYNCING | crate::msg::ack_flags::STASHING,
            label: "backup:/srv".into(),
        };
        assert_eq!(HelloAck::decode(&a.encode()).unwrap(), a);
    }
    let r = Refuse::new(RefuseCode::Busy, "busy");
    assert_eq!(Refuse::decode(&r.encode()).unwrap(), r);
    let r = Refuse {
        code: RefuseCode::Fenced,
        message: "replaced".into(),
        epoch: Some(hist.epochs[1]),
    };
    assert_eq!(Refuse::decode(&r.encode()).unwrap(), r);
    let e = ApplyError {
        seq: 5,
        errno: 28,
        op: "write".into(),
        path: "/a".into(),
        message: "No space left on device".into(),
    };
    assert_eq!(ApplyError::decode(&e.encode()).unwrap(), e);
}

fn ep(number: u64, id: u8, start: u64) -> Epoch {
    Epoch {
        number,
        id: [id; 16],
        start,
    }
}

fn hist(e: &[Epoch]) -> History {
    History { epochs: e.to_vec() }
}

/// The failover cases of the issue, as histories: A the old master (epoch 1), B promoted
/// (epoch 2 from seq 101), C a replica.
#[test]
fn standing_of_replicas_across_a_failover() {
    use crate::history::standing;
    let a = hist(&[ep(1, 0xa, 1)]);
    let b = hist(&[ep(1, 0xa, 1), ep(2, 0xb, 101)]);
    // C behind B on the same line: continues, nothing stashed.
    assert_eq!(standing(&b, &a, None, 95, false), Standing::Behind);
    assert_eq!(standing(&b, &a, None, 100, false), Standing::Behind);
    // C had applied an op of A's that B never got: diverged after 100.
    assert_eq!(
        standing(&b, &a, None, 101, false),
        Standing::Diverged { branch: 100 }
    );
    // A, cut off, kept writing: diverged. A died uncleanly: its last ops are unknown.
    assert_eq!(
        standing(&b, &a, None, 4000, false),
        Standing::Diverged { branch: 100 }
    );
    assert_eq!(
        standing(&b, &a, None, 50, true),
        Standing::Diverged { branch: 100 }
    );
    // A, restarted as master of epoch 1, meets C that follows B: fenced.
    assert_eq!(
        standing(&a, &b, None, 120, false),
        Standing::Fenced {
            newer: ep(2, 0xb, 101)
        }
    );
    // ... also when C only heard of epoch 2 (a promotion it was told of).
    assert_eq!(
        standing(&a, &a, Some(&ep(2, 0xb, 101)), 90, false),
        Standing::Fenced {
            newer: ep(2, 0xb, 101)
        }
    );
    // Two promotions to one number by mistake are never one epoch.
    let b2 = hist(&[ep(1, 0xa, 1), ep(2, 0xc, 101)]);
    assert!(matches!(
        standing(&b2, &b, None, 120, false),
        Standing::Fenced { .. }
    ));
    // Same epoch, same line: behind or level.
    assert_eq!(standing(&b, &b, None, 150, false), Standing::Behind);
    // A node of no epoch yet: behind (fresh), unless it claims to hold something.
    assert_eq!(
        standing(&b, &History::default(), None, 0, false),
        Standing::Behind
    );
    assert_eq!(
        standing(&b, &History::default(), None, 7, false),
        Standing::Diverged { branch: 0 }
    );
    // Another replica set.
    assert_eq!(
        standing(&b, &hist(&[ep(1, 0xd, 1)]), None, 5, false),
        Standing::Foreign { set: [0xd; 16] }
    );
    // A later promotion from a replica that had followed a rogue branch (epoch 3 of B'):
    // what it applied in the rogue epoch is divergent, what came before is not.
    let rogue = hist(&[ep(1, 0xa, 1), ep(2, 0xe, 60)]);
    let d = hist(&[ep(1, 0xa, 1), ep(2, 0xb, 101), ep(3, 0xf, 200)]);
    assert_eq!(standing(&d, &rogue, None, 59, false), Standing::Behind);
    assert_eq!(
        standing(&d, &rogue, None, 60, false),
        Standing::Diverged { branch: 59 }
    );
}

#[test]
fn promotion_numbers_above_everything_seen() {
    let h = hist(&[ep(1, 1, 1), ep(2, 2, 50)]);
    let p = h.promoted([3; 16], 80, None);
    assert_eq!(p.last(), Some(&ep(3, 3, 80)));
    let p = h.promoted([3; 16], 80, Some(&ep(7, 9, 70)));
    assert_eq!(p.last().unwrap().number, 8);
    assert_eq!(p.epoch_of(60).unwrap().number, 2);
    assert_eq!(p.epoch_of(80).unwrap().number, 8);
    // Encoded histories must grow; a decoder refuses one that does not.
    let mut buf = Vec::new();
    hist(&[ep(2, 1, 1), ep(2, 2, 5)]).encode(&mut crate::wire::Writer { out: &mut buf });
    assert!(History::decode(&mut crate::wire::Reader::new(&buf)).is_err());
}

/// `len` incompressible bytes (xorshift32 from `seed`), the same for every run.
fn noise(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn incompressible_payload_stored_raw() {
    let payload = noise(0x12345678, 100_000);
    let b = frame::encode_vec(FrameType::Ops, 1, &payload, Compression::Lzf);
    assert_eq!(b[6], 0, "random data must be sent raw");
    assert_eq!(b.len(), HEADER_LEN + payload.len());
    let b = frame::encode_vec(FrameType::Ops, 1, &payload, Compression::Lz4);
    assert_eq!(b[6], 0, "random data must be sent raw with lz4 too");
    let text = b"hello tdfs ".repeat(10_000);
    for (c, flag) in [
        (Compression::Lzf, frame::FLAG_COMPRESSED),
        (Compression::Lz4, frame::FLAG_LZ4),
    ] {
        let b = frame::encode_vec(FrameType::Ops, 1, &text, c);
        assert_eq!(b[6], flag);
        assert!(b.len() < text.len() / 4);
        assert_eq!(frame::parse(&b).unwrap().payload, text);
    }
}

/// The probe a sender uses to send a batch raw without assembling it: it reads its sample
/// from the middle of the whole payload, across part boundaries, and agrees with what
/// `encode` does with the assembled payload.
#[test]
fn sample_probe_reads_across_parts() {
    use crate::compress::sample_is_incompressible;
    let random = noise(0x9e37_79b9, 200_000);
    let text = b"hello tdfs ".repeat(20_000);
    for c in [Compression::Lzf, Compression::Lz4] {
        assert!(sample_is_incompressible(c, &[&random]));
        assert!(!sample_is_incompressible(c, &[&text]));
        // Too small to probe: the caller compresses (or not) the whole payload.
        assert!(!sample_is_incompressible(c, &[&random[..1000]]));
        assert!(!sample_is_incompressible(Compression::None, &[&random]));
        // Text before and random after the middle: the sample is random.
        assert!(sample_is_incompressible(
            c,
            &[&text[..100_000], &random[..100_000]]
        ));
        // Random before, text from the middle on.
        assert!(!sample_is_incompressible(
            c,
            &[&random[..100_000], &text[..100_000]]
        ));
        // The middle falls in tiny parts around a boundary: the sample spans several.
        let small: Vec<&[u8]> = random[..70_000].chunks(100).collect();
        assert!(sample_is_incompressible(c, &small));
        let small: Vec<&[u8]> = text[..70_000].chunks(100).collect();
        assert!(!sample_is_incompressible(c, &small));
        // Whatever the probe says, encode agrees on the assembled payload.
        for parts in [vec![&random[..]], vec![&text[..]]] {
            let whole = parts.concat();
            let b = frame::encode_vec(FrameType::Ops, 1, &whole, c);
            assert_eq!(b[6] == 0, sample_is_incompressible(c, &parts));
        }
    }
}

/// A run of exactly 32 literals that fills the output, then a match: the `lzf` crate's
/// compressor indexed one past its buffer on this (a panic that ended a link for good).
/// Every such shape, and random payloads with repeats, must compress (or go raw) and come
/// back whole.
#[test]
fn lzf_literal_run_filling_the_buffer_then_a_match() {
    for k in [64usize, 96, 128, 192, 256, 1024, 4096] {
        let len = k + k / 32;
        let mut data = noise(k as u32 | 1, k);
        let tail = data[1..1 + len - k].to_vec();
        data.extend(tail);
        let b = frame::encode_vec(FrameType::Ops, 1, &data, Compression::Lzf);
        assert_eq!(frame::parse(&b).unwrap().payload, data, "k = {k}");
    }
}

proptest::proptest! {
    #[test]
    fn lzf_roundtrip_with_repeats(seed: u32, len in 64usize..5000, repeat in 0usize..8) {
        let mut data = noise(seed | 1, len);
        for i in 0..repeat {
            let at = (i * 613) % data.len();
            let n = (data.len() - at).min(40);
            let chunk = data[at..at + n].to_vec();
            data.extend(chunk);
        }
        for c in [Compression::Lzf, Compression::Lz4] {
            let b = frame::encode_vec(FrameType::Ops, 1, &data, c);
            proptest::prop_assert_eq!(frame::parse(&b).unwrap().payload, data.clone());
        }
    }
}

#[test]
fn downstream_report_roundtrips_and_refuses_bad_depths() {
    use crate::msg::{DownNode, Downstream, MAX_DOWNSTREAM};
    let d = Downstream {
        nodes: vec![
            DownNode {
                depth: 1,
                addr: "leaf1:4731".into(),
                label: "web1:/srv/www".into(),
                state: "streaming".into(),
                applied: 41,
                lag_ops: 1,
                lag_ms: 3,
                syncs: 1,
                sync_bytes: 4096,
                last_error: String::new(),
            },
            DownNode {
                depth: 2,
                addr: "leaf2".into(),
                state: "syncing".into(),
                last_error: "x".into(),
                ..Default::default()
            },
        ],
    };
    assert_eq!(Downstream::decode(&d.encode()).unwrap(), d);
    for depth in [0u8, 33] {
        let mut bad = d.clone();
        bad.nodes[1].depth = depth;
        assert!(Downstream::decode(&bad.encode()).is_err(), "depth {depth}");
    }
    let mut huge = 0u32.to_le_bytes().to_vec();
    huge[..4].copy_from_slice(&((MAX_DOWNSTREAM as u32) + 1).to_le_bytes());
    assert!(Downstream::decode(&huge).is_err());
    let mut truncated = d.encode();
    truncated.pop();
    assert!(Downstream::decode(&truncated).is_err());
}
