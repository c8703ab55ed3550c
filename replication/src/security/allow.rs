//! `--allow HOST/CIDR`: which peer addresses a slave accepts.

use std::net::{IpAddr, ToSocketAddrs};

/// One allowed network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Parses `ADDR`, `ADDR/PREFIX` or a host name (every address it resolves to, now).
pub fn parse(spec: &str) -> Result<Vec<Net>, String> {
    let (host, prefix) = match spec.split_once('/') {
        Some((h, p)) => (
            h,
            Some(
                p.parse::<u8>()
                    .map_err(|_| format!("bad prefix length in --allow {spec:?}"))?,
            ),
        ),
        None => (spec, None),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<IpAddr> = match host.parse::<IpAddr>() {
        Ok(a) => vec![a.to_canonical()],
        Err(_) if prefix.is_none() && !host.is_empty() => (host, 0)
            .to_socket_addrs()
            .map_err(|e| format!("--allow {spec:?}: cannot resolve {host:?}: {e}"))?
            .map(|a| a.ip().to_canonical())
            .collect(),
        Err(_) => {
            return Err(format!(
                "--allow {spec:?}: expected an address, ADDR/PREFIX or a host name"
            ))
        }
    };
    addrs
        .into_iter()
        .map(|addr| {
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix = prefix.unwrap_or(max);
            if prefix > max {
                return Err(format!("--allow {spec:?}: prefix over {max}"));
            }
            Ok(Net { addr, prefix })
        })
        .collect()
}

/// The slave's allow-list; empty means every address may connect.
#[derive(Debug, Clone, Default)]
pub struct AllowList(Vec<Net>);

impl AllowList {
    pub fn parse(specs: &[String]) -> Result<Self, String> {
        let mut nets = Vec::new();
        for s in specs {
            nets.extend(parse(s)?);
        }
        Ok(AllowList(nets))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        self.0.is_empty() || self.0.iter().any(|n| n.contains(ip))
    }
}
