//! Throwaway certificates for TLS tests: one CA, a slave certificate for `localhost` and
//! `127.0.0.1`, a master (client) certificate.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Paths of the PEM files [`write_pki`] made.
pub struct Pki {
    pub ca: String,
    pub slave_cert: String,
    pub slave_key: String,
    pub master_cert: String,
    pub master_key: String,
}

fn file(dir: &Path, name: &str, content: &str, mode: u32) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p.to_string_lossy().into_owned()
}

/// A CA (named after `prefix`) and certificates it signed, written into `dir`.
pub fn write_pki(dir: &Path, prefix: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{prefix} test CA"));
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (sc, sk) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
    let (mc, mk) = leaf(vec!["tdfs-master".into()]);
    Pki {
        ca: file(dir, &format!("{prefix}-ca.pem"), &ca_cert.pem(), 0o644),
        slave_cert: file(dir, &format!("{prefix}-slave.pem"), &sc, 0o644),
        slave_key: file(dir, &format!("{prefix}-slave.key"), &sk, 0o600),
        master_cert: file(dir, &format!("{prefix}-master.pem"), &mc, 0o644),
        master_key: file(dir, &format!("{prefix}-master.key"), &mk, 0o600),
    }
}
