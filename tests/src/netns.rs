//! Test hosts on one machine: network namespaces joined by a bridge, so that a test can cut
//! one node off (its link down) while the others, and the root namespace, keep talking.
//!
//! The net is `10.213.X.0/24` for a free X. Before anything else, the whole /24 is made
//! `unreachable` in the root namespace (and in every node), so no packet for it can ever
//! follow a default route off the machine, whatever happens to the links. The bridge lives in
//! a namespace of its own (no address, no routes); the root namespace joins it as
//! `10.213.X.1/25`, node `i` as `10.213.X.(10 + i)/25`. Nodes have no default route at all.
//!
//! Processes run in a node with [`TestNet::prefix`] (`nsenter --net=...`): only the network
//! stack is the node's, so a FUSE mount made there is visible to the test (and `ip netns exec`
//! is not used: it would give the process a private copy of the mount table, which pins the
//! FUSE mounts of tests running alongside).
//!
//! Everything is removed on drop, also on panic: nodes, bridge, links, the guard route last.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// `ip` with `prefix` in front (e.g. nsenter), returning stdout or the error text.
fn ip_via(prefix: &[&str], args: &[&str]) -> Result<String, String> {
    let mut cmd = if prefix.is_empty() {
        Command::new("ip")
    } else {
        let mut c = Command::new(prefix[0]);
        c.args(&prefix[1..]).arg("ip");
        c
    };
    let out = cmd
        .args(args)
        .output()
        .map_err(|e| format!("running ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    ip_via(&[], args)
}

#[track_caller]
fn must(r: Result<String, String>) -> String {
    r.unwrap_or_else(|e| panic!("test network setup: {e}"))
}

struct Node {
    ns: String,
    created: bool,
    /// The node's end of its link (inside the node) and the bridge's end.
    veth_in: String,
    veth_br: String,
    addr: String,
}

pub struct TestNet {
    tag: String,
    x: u32,
    subnet: Option<String>,
    switch: String,
    switch_created: bool,
    root_veth: String,
    root_br: String,
    nodes: Vec<Node>,
}

fn ns_path(ns: &str) -> String {
    format!("/run/netns/{ns}")
}

fn in_ns(ns: &str, args: &[&str]) -> Result<String, String> {
    let net = format!("--net={}", ns_path(ns));
    ip_via(&["nsenter", &net], args)
}

impl TestNet {
    /// A new test net with the root namespace on it and no nodes yet.
    pub fn create() -> TestNet {
        if let Err(e) = ip(&["-V"]) {
            panic!("iproute2 is needed for the network namespace tests: {e}");
        }
        if let Err(e) = Command::new("nsenter").arg("--version").output() {
            panic!("nsenter (util-linux) is needed for the network namespace tests: {e}");
        }
        let pid = std::process::id();
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{:x}{n:x}", pid % 0xffff);
        let mut me = TestNet {
            tag: tag.clone(),
            x: 0,
            subnet: None,
            switch: format!("tdfs-sw-{pid}-{n}"),
            switch_created: false,
            root_veth: format!("tr{tag}"),
            root_br: format!("tb{tag}"),
            nodes: Vec::new(),
        };
        // Claim a /24: adding the unreachable route is the lock (it fails with "File exists"
        // when a parallel run, or a leftover, holds it). Skip subnets in use on this host.
        let first = (pid as usize).wrapping_mul(7).wrapping_add(n * 31) % 250 + 1;
        let addrs = must(ip(&["-4", "-o", "addr", "show"]));
        for i in 0..250 {
            let x = ((first + i) % 250 + 1) as u32;
            let subnet = format!("10.213.{x}.0/24");
            if addrs.contains(&format!(" 10.213.{x}.")) {
                continue;
            }
            let routes = must(ip(&[
                "-4", "route", "show", "table", "all", "root", &subnet,
            ]));
            if !routes.trim().is_empty() {
                continue;
            }
            match ip(&["route", "add", "unreachable", &subnet]) {
                Ok(_) => {
                    me.subnet = Some(subnet);
                    me.x = x;
                    break;
                }
                Err(e) if e.contains("File exists") => continue,
                Err(e) => panic!("claiming {subnet}: {e}"),
            }
        }
        let Some(subnet) = me.subnet.clone() else {
            panic!("no free 10.213.X.0/24 for a test net");
        };
        must(ip(&["netns", "add", &me.switch]));
        me.switch_created = true;
        let sw = me.switch.clone();
        must(in_ns(&sw, &["link", "add", "br0", "type", "bridge"]));
        must(in_ns(&sw, &["link", "set", "br0", "up"]));
        must(in_ns(&sw, &["link", "set", "lo", "up"]));
        must(in_ns(&sw, &["route", "add", "unreachable", &subnet]));
        // The root namespace on the net.
        must(ip(&[
            "link",
            "add",
            &me.root_veth,
            "type",
            "veth",
            "peer",
            "name",
            &me.root_br,
            "netns",
            &sw,
        ]));
        must(ip(&[
            "addr",
            "add",
            &format!("10.213.{}.1/25", me.x),
            "dev",
            &me.root_veth,
        ]));
        must(ip(&["link", "set", &me.root_veth, "up"]));
        must(in_ns(&sw, &["link", "set", &me.root_br, "master", "br0"]));
        must(in_ns(&sw, &["link", "set", &me.root_br, "up"]));
        me
    }

    /// The root namespace's address on the net.
    pub fn root_ip(&self) -> String {
        format!("10.213.{}.1", self.x)
    }

    /// Adds a node (a namespace linked to the bridge); returns its index.
    pub fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let ns = format!("tdfs-n{i}-{}", self.tag);
        let subnet = self.subnet.clone().expect("claimed");
        let node = Node {
            ns: ns.clone(),
            created: false,
            veth_in: format!("tn{i}{}", self.tag),
            veth_br: format!("tw{i}{}", self.tag),
            addr: format!("10.213.{}.{}", self.x, 10 + i),
        };
        self.nodes.push(node);
        must(ip(&["netns", "add", &ns]));
        self.nodes[i].created = true;
        let n = &self.nodes[i];
        must(in_ns(&ns, &["route", "add", "unreachable", &subnet]));
        must(in_ns(&ns, &["link", "set", "lo", "up"]));
        must(ip(&[
            "link",
            "add",
            &n.veth_in,
            "netns",
            &ns,
            "type",
            "veth",
            "peer",
            "name",
            &n.veth_br,
            "netns",
            &self.switch,
        ]));
        must(in_ns(
            &ns,
            &["addr", "add", &format!("{}/25", n.addr), "dev", &n.veth_in],
        ));
        must(in_ns(&ns, &["link", "set", &n.veth_in, "up"]));
        must(in_ns(
            &self.switch,
            &["link", "set", &n.veth_br, "master", "br0"],
        ));
        must(in_ns(&self.switch, &["link", "set", &n.veth_br, "up"]));
        let routes = must(in_ns(&ns, &["-4", "route", "show", "table", "all"]));
        assert!(
            !routes.contains("default"),
            "node {i} has a default route:\n{routes}"
        );
        i
    }

    /// Node `i`'s address.
    pub fn ip(&self, i: usize) -> String {
        self.nodes[i].addr.clone()
    }

    /// The command prefix that runs a program in node `i`'s network stack only.
    pub fn prefix(&self, i: usize) -> Vec<String> {
        vec![
            "nsenter".into(),
            format!("--net={}", ns_path(&self.nodes[i].ns)),
        ]
    }

    /// Cuts node `i` off the net (its port on the bridge down), or plugs it back.
    pub fn link(&self, i: usize, up: bool) {
        let n = &self.nodes[i];
        must(in_ns(
            &self.switch,
            &["link", "set", &n.veth_br, if up { "up" } else { "down" }],
        ));
    }

    /// One line naming everything, for messages.
    pub fn describe(&self) -> String {
        format!(
            "test net {} (root {}, nodes {})",
            self.subnet.as_deref().unwrap_or("-"),
            self.root_ip(),
            self.nodes
                .iter()
                .map(|n| format!("{} in {}", n.addr, n.ns))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for n in &self.nodes {
            if n.created && Path::new(&ns_path(&n.ns)).exists() {
                if let Err(e) = ip(&["netns", "del", &n.ns]) {
                    eprintln!("cleanup: {e}");
                }
            }
        }
        if self.switch_created {
            if let Err(e) = ip(&["netns", "del", &self.switch]) {
                eprintln!("cleanup: {e}");
            }
        }
        if ip(&["link", "show", &self.root_veth]).is_ok() {
            if let Err(e) = ip(&["link", "del", &self.root_veth]) {
                eprintln!("cleanup: {e}");
            }
        }
        // The guard route goes last, once nothing of the test subnet is left.
        if let Some(subnet) = &self.subnet {
            if let Err(e) = ip(&["route", "del", "unreachable", subnet]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}
