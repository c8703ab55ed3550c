use std::net::IpAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tdfs_protocol::seal::Protection;
use tdfs_protocol::FrameType;

use crate::security::handshake::{self, AuthError, Authenticated};
use crate::security::{AllowList, Secret};

fn secret(s: &str) -> Secret {
    Secret::from_bytes(s.as_bytes().to_vec()).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

type Outcome = Result<Authenticated, AuthError>;

/// Runs both sides over an in-memory pipe; returns (master result, slave result).
fn exchange(m: Secret, s: Secret) -> (Outcome, Outcome) {
    exchange_with(vec![m], Protection::Mac, vec![s], Protection::Mac)
}

fn exchange_with(
    m: Vec<Secret>,
    mp: Protection,
    s: Vec<Secret>,
    sp: Protection,
) -> (Outcome, Outcome) {
    rt().block_on(async move {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let master = async move {
            let r = handshake::connect(&mut a, &m, mp).await;
            drop(a);
            r
        };
        let slave = async move {
            let r = handshake::accept(&mut b, &s, sp).await;
            drop(b);
            r
        };
        tokio::join!(master, slave)
    })
}

#[test]
fn same_secret_authenticates_both_ways() {
    let (m, s) = exchange(
        secret("0123456789abcdef-one"),
        secret("0123456789abcdef-one\n"),
    );
    let (mut m, mut s) = (m.unwrap(), s.unwrap());
    assert_eq!(m.secret, s.secret);
    // The sessions that follow are sealed both ways, each direction under its own key.
    let mut f =
        m.tx.encode_vec(FrameType::Ops, 1, b"op", Default::default());
    assert_eq!(&s.rx.parse(&mut f).unwrap().payload[..], b"op");
    let mut f =
        s.tx.encode_vec(FrameType::Ack, 0, b"ack", Default::default());
    assert_eq!(&m.rx.parse(&mut f).unwrap().payload[..], b"ack");
    let mut f =
        m.tx.encode_vec(FrameType::Ops, 2, b"op", Default::default());
    assert!(m.rx.parse(&mut f).is_err());
}

#[test]
fn rotation_window_and_a_third_secret() {
    let (old, new, third) = (
        secret("0123456789abcdef-old"),
        secret("0123456789abcdef-new"),
        secret("0123456789abcdef-third"),
    );
    // Slave accepting both; master on either: authenticated, with the master's secret.
    for m in [&old, &new] {
        let (rm, rs) = exchange_with(
            vec![m.clone()],
            Protection::Mac,
            vec![old.clone(), new.clone()],
            Protection::Mac,
        );
        assert_eq!(rm.unwrap().secret, m.key_id());
        assert_eq!(rs.unwrap().secret, m.key_id());
    }
    // A master offering two: the slave takes the first it knows.
    let (rm, _) = exchange_with(
        vec![new.clone(), old.clone()],
        Protection::Mac,
        vec![old.clone()],
        Protection::Mac,
    );
    assert_eq!(rm.unwrap().secret, old.key_id());
    // A third secret is refused.
    let (rm, rs) = exchange_with(
        vec![third],
        Protection::Mac,
        vec![old, new],
        Protection::Mac,
    );
    assert!(matches!(rm, Err(AuthError::Refused(ref m)) if m == handshake::FAILED_MESSAGE));
    let e = rs.err().unwrap().to_string();
    assert!(e.contains("wrong secret"), "{e}");
}

#[test]
fn encryption_mismatch_is_a_clear_error_on_both_sides() {
    let k = secret("0123456789abcdef-one");
    for (mp, sp, needle) in [
        (Protection::Encrypt, Protection::Mac, "the master encrypts"),
        (
            Protection::Mac,
            Protection::Encrypt,
            "requires encrypted frames",
        ),
    ] {
        let (rm, rs) = exchange_with(vec![k.clone()], mp, vec![k.clone()], sp);
        let (em, es) = (rm.err().unwrap().to_string(), rs.err().unwrap().to_string());
        assert!(
            em.contains("encryption mismatch") && em.contains(needle),
            "{em}"
        );
        assert!(
            es.contains("encryption mismatch") && es.contains(needle),
            "{es}"
        );
    }
    let (rm, rs) = exchange_with(
        vec![k.clone()],
        Protection::Encrypt,
        vec![k],
        Protection::Encrypt,
    );
    assert!(rm.unwrap().tx.sealer().unwrap().encrypts());
    assert!(rs.is_ok());
}

#[test]
fn wrong_secret_is_refused_on_both_sides() {
    let (m, s) = exchange(
        secret("0123456789abcdef-one"),
        secret("0123456789abcdef-two"),
    );
    assert!(
        matches!(&m, Err(AuthError::Refused(msg)) if msg == handshake::FAILED_MESSAGE),
        "{m:?}"
    );
    assert!(matches!(s, Err(AuthError::Failed(_))), "{s:?}");
}

#[test]
fn hello_without_auth_is_refused() {
    rt().block_on(async {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let hello = tdfs_protocol::msg::Hello {
            proto_min: tdfs_protocol::msg::PROTO_MIN,
            proto_max: tdfs_protocol::msg::PROTO_MAX,
            history: tdfs_protocol::History::genesis([1; 16], 1),
            next_seq: 1,
            flags: 0,
            label: "x".repeat(1000),
        };
        let f = tdfs_protocol::frame::encode_vec(
            tdfs_protocol::FrameType::Hello,
            0,
            &hello.encode(),
            tdfs_protocol::Compression::None,
        );
        a.write_all(&f).await.unwrap();
        let r = handshake::accept(&mut b, &[secret("0123456789abcdef")], Protection::Mac).await;
        assert!(matches!(r, Err(AuthError::Failed(_))), "{r:?}");
        drop(b);
        let mut got = Vec::new();
        a.read_to_end(&mut got).await.unwrap();
        let f = tdfs_protocol::frame::parse(&got).unwrap();
        assert_eq!(f.kind, tdfs_protocol::FrameType::Refuse);
        let r = tdfs_protocol::msg::Refuse::decode(&f.payload).unwrap();
        assert!(r.message.contains("--secret-file"), "{}", r.message);
    });
}

#[test]
fn an_older_exchange_version_is_refused_by_number() {
    // Version 2 sealed frames with BLAKE3 / AES-GCM: such a peer must hear why, not fail
    // its first frame's tag.
    rt().block_on(async {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let req = tdfs_protocol::auth::AuthRequest { version: 2 };
        let f = tdfs_protocol::frame::encode_vec(
            FrameType::AuthRequest,
            0,
            &req.encode(),
            tdfs_protocol::Compression::None,
        );
        a.write_all(&f).await.unwrap();
        let r = handshake::accept(&mut b, &[secret("0123456789abcdef")], Protection::Mac).await;
        assert!(matches!(r, Err(AuthError::Protocol(_))), "{r:?}");
        drop(b);
        let mut got = Vec::new();
        a.read_to_end(&mut got).await.unwrap();
        let f = tdfs_protocol::frame::parse(&got).unwrap();
        assert_eq!(f.kind, FrameType::Refuse);
        let r = tdfs_protocol::msg::Refuse::decode(&f.payload).unwrap();
        assert_eq!(r.code, tdfs_protocol::msg::RefuseCode::Version);
        assert!(
            r.message
                .contains("authentication version 2 not supported (this slave speaks 3"),
            "{}",
            r.message
        );
    });
}

#[test]
fn secret_rules() {
    assert!(Secret::from_bytes(b"short\n".to_vec()).is_err());
    assert_eq!(
        Secret::from_bytes(b"0123456789abcdef\r\n".to_vec())
            .unwrap()
            .bytes(),
        b"0123456789abcdef"
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    std::fs::write(&p, "0123456789abcdef0123\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Secret::load(&p).unwrap_err();
    assert!(e.contains("chmod 600"), "{e}");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(Secret::load(&p).is_err());
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(Secret::load(&p).is_ok());
    assert!(format!("{:?}", Secret::load(&p).unwrap()).contains("20 bytes"));
    // At most two secrets, and not the same one twice.
    let q = dir.path().join("q");
    std::fs::write(&q, "another secret of twenty\n").unwrap();
    std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(Secret::load_all(&[p.clone(), q.clone()]).unwrap().len(), 2);
    let e = Secret::load_all(&[p.clone(), q.clone(), p.clone()]).unwrap_err();
    assert!(e.contains("at most 2"), "{e}");
    let e = Secret::load_all(&[p.clone(), p]).unwrap_err();
    assert!(e.contains("same secret"), "{e}");
}

#[test]
fn allow_lists() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let l =
        AllowList::parse(&["10.0.0.0/8".into(), "192.168.1.7".into(), "fd00::/8".into()]).unwrap();
    assert!(l.allows(ip("10.1.2.3")));
    assert!(l.allows(ip("::ffff:10.1.2.3")));
    assert!(l.allows(ip("192.168.1.7")));
    assert!(!l.allows(ip("192.168.1.8")));
    assert!(!l.allows(ip("127.0.0.1")));
    assert!(l.allows(ip("fd12::1")));
    assert!(!l.allows(ip("fe80::1")));
    let all = AllowList::parse(&["0.0.0.0/0".into()]).unwrap();
    assert!(all.allows(ip("8.8.8.8")));
    assert!(!all.allows(ip("::1")));
    assert!(AllowList::parse(&[]).unwrap().allows(ip("1.2.3.4")));
    assert!(AllowList::parse(&["10.0.0.0/33".into()]).is_err());
    assert!(AllowList::parse(&["10.0.0.0/x".into()]).is_err());
    assert!(AllowList::parse(&["localhost".into()])
        .unwrap()
        .allows(ip("127.0.0.1")));
}

#[test]
fn server_names() {
    use crate::security::tls::server_name;
    assert_eq!(
        format!("{:?}", server_name("localhost:4731").unwrap()),
        format!(
            "{:?}",
            rustls_pki_types::ServerName::try_from("localhost").unwrap()
        )
    );
    assert!(server_name("127.0.0.1:1").is_ok());
    assert!(server_name("[::1]:1").is_ok());
}
