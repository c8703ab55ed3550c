//! What the supervisor asks of etcd, each call bounded in time.
//!
//! Every node holds one etcd lease for its session (TTL `--ttl`), kept alive every
//! `ttl / 6`. Its liveness record and, while it leads, the leader key are attached to that
//! lease: if the node stops renewing (dead, cut off, stuck), both vanish when the TTL runs
//! out, and that is what lets another node take over. Nothing here waits longer than the
//! per-call timeout, so a node cut off from etcd notices within a second, and a request
//! that failed drops the connection, so the next one starts afresh (an HTTP/2 connection to
//! an unreachable host can otherwise hang on for minutes).

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, Txn, TxnOp,
};

/// One key of the cluster's prefix as read: key, value, and the lease it is attached to.
#[derive(Debug, Clone)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub lease: i64,
}

/// The outcome of one renewal of the session lease.
#[derive(Debug)]
pub enum Renewal {
    /// etcd extended the lease by its full TTL.
    Renewed,
    /// etcd no longer knows the lease: it expired (this node was cut off for longer than
    /// the TTL, or etcd lost it). Whatever was attached to it is gone.
    Lost,
    /// No answer in time, or an error: nothing is known.
    Failed(String),
}

/// Shared by the supervisor's loop and its renewer task: every method takes `&self`.
pub struct Etcd {
    endpoints: Vec<String>,
    client: Mutex<Option<Client>>,
    keeper: tokio::sync::Mutex<Option<(LeaseKeeper, LeaseKeepAliveStream)>>,
    /// The session lease, once granted.
    lease: Mutex<Option<i64>>,
    ttl: i64,
    timeout: Duration,
}

impl Etcd {
    pub fn new(endpoints: Vec<String>, ttl: i64, timeout: Duration) -> Etcd {
        Etcd {
            endpoints,
            client: Mutex::new(None),
            keeper: tokio::sync::Mutex::new(None),
            lease: Mutex::new(None),
            ttl,
            timeout,
        }
    }

    /// The session lease, if one is held.
    pub fn lease(&self) -> Option<i64> {
        *self.lease.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_lease(&self, l: Option<i64>) {
        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = l;
    }

    /// Forgets the connection after a failure (the keep-alive stream on it is dropped by
    /// the renewal that finds it broken).
    fn reset(&self) {
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    async fn client(&self) -> anyhow::Result<Client> {
        if let Some(c) = &*self.client.lock().unwrap_or_else(|p| p.into_inner()) {
            return Ok(c.clone());
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            // HTTP/2 pings find a dead connection even while no request is waiting.
            .with_keep_alive(Duration::from_secs(1), self.timeout)
            .with_keep_alive_while_idle(true);
        let c = tokio::time::timeout(self.timeout, Client::connect(&self.endpoints, Some(opts)))
            .await
            .map_err(|_| anyhow!("connecting to etcd: no answer within {:?}", self.timeout))?
            .context("connecting to etcd")?;
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        Ok(c)
    }

    /// Runs one request with the timeout; a failure drops the connection.
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> anyhow::Result<T>
    where
        F: FnOnce(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let r = async {
            let c = self.client().await?;
            match tokio::time::timeout(self.timeout, f(c)).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(anyhow!("{what}: {e}")),
                Err(_) => Err(anyhow!("{what}: no answer within {:?}", self.timeout)),
            }
        }
        .await;
        if r.is_err() {
            self.reset();
        }
        r
    }

    /// Grants a new session lease (the old one, if any, is forgotten: it expires by itself
    /// or was lost already).
    pub async fn grant(&self) -> anyhow::Result<i64> {
        let ttl = self.ttl;
        let r = self
            .call("granting a lease", |mut c| async move {
                c.lease_grant(ttl, None).await
            })
            .await?;
        *self.keeper.lock().await = None;
        self.set_lease(Some(r.id()));
        Ok(r.id())
    }

    /// Renews the session lease once.
    pub async fn keep_alive(&self) -> Renewal {
        let Some(id) = self.lease() else {
            return Renewal::Lost;
        };
        let mut keeper = self.keeper.lock().await;
        let r: anyhow::Result<i64> = async {
            if let Some((k, stream)) = keeper.as_mut() {
                k.keep_alive().await.map_err(|e| anyhow!("{e}"))?;
                match tokio::time::timeout(self.timeout, stream.message()).await {
                    Ok(Ok(Some(resp))) => Ok(resp.ttl()),
                    Ok(Ok(None)) => Err(anyhow!("keep-alive stream closed")),
                    Ok(Err(e)) => Err(anyhow!("{e}")),
                    Err(_) => Err(anyhow!("no answer within {:?}", self.timeout)),
                }
            } else {
                let mut c = self.client().await?;
                // Opening the stream renews once and fails with "lease not found" for a
                // lease etcd no longer has.
                match tokio::time::timeout(self.timeout, c.lease_keep_alive(id)).await {
                    Ok(Ok(pair)) => {
                        *keeper = Some(pair);
                        Ok(self.ttl)
                    }
                    Ok(Err(e)) if e.to_string().contains("lease not found") => Ok(0),
                    Ok(Err(e)) => Err(anyhow!("{e}")),
                    Err(_) => Err(anyhow!("no answer within {:?}", self.timeout)),
                }
            }
        }
        .await;
        match r {
            Ok(ttl) if ttl > 0 => Renewal::Renewed,
            Ok(_) => {
                *keeper = None;
                if self.lease() == Some(id) {
                    self.set_lease(None);
                }
                Renewal::Lost
            }
            Err(e) => {
                *keeper = None;
                self.reset();
                Renewal::Failed(format!("renewing the lease: {e:#}"))
            }
        }
    }

    /// Puts `key`, attached to the session lease when `leased`.
    pub async fn put(&self, key: &str, value: Vec<u8>, leased: bool) -> anyhow::Result<()> {
        let opts = if leased {
            let Some(id) = self.lease() else {
                bail!("no session lease");
            };
            Some(PutOptions::new().with_lease(id))
        } else {
            None
        };
        let key = key.to_string();
        self.call("writing to etcd", |mut c| async move {
            c.put(key, value, opts).await
        })
        .await
        .map(drop)
    }

    /// Every key under `prefix`.
    pub async fn get_prefix(&self, prefix: &str) -> anyhow::Result<Vec<Kv>> {
        let prefix = prefix.to_string();
        let r = self
            .call("reading from etcd", |mut c| async move {
                c.get(prefix, Some(GetOptions::new().with_prefix())).await
            })
            .await?;
        Ok(r.kvs()
            .iter()
            .map(|kv| Kv {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: kv.value().to_vec(),
                lease: kv.lease(),
            })
            .collect())
    }

    /// Takes `key` (the leader key) for this session if nobody holds it: one transaction,
    /// so two nodes can never both succeed.
    pub async fn campaign(&self, key: &str, value: &str) -> anyhow::Result<bool> {
        let Some(id) = self.lease() else {
            bail!("no session lease");
        };
        let txn = Txn::new()
            .when(vec![Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(id)),
            )]);
        let r = self
            .call(
                "taking the leader key",
                |mut c| async move { c.txn(txn).await },
            )
            .await?;
        Ok(r.succeeded())
    }

    /// Gives up `key` if this session holds it (a planned step-down: the others need not
    /// wait for the TTL).
    pub async fn resign(&self, key: &str, value: &str) -> anyhow::Result<bool> {
        let Some(id) = self.lease() else {
            return Ok(false);
        };
        let txn = Txn::new()
            .when(vec![
                Compare::value(key, CompareOp::Equal, value),
                Compare::lease(key, CompareOp::Equal, id),
            ])
            .and_then(vec![TxnOp::delete(key, None::<DeleteOptions>)]);
        let r = self
            .call("giving up the leader key", |mut c| async move {
                c.txn(txn).await
            })
            .await?;
        Ok(r.succeeded())
    }

    /// Seconds left on `lease` (negative or zero: gone).
    pub async fn ttl_of(&self, lease: i64) -> anyhow::Result<i64> {
        let r = self
            .call("reading a lease", |mut c| async move {
                c.lease_time_to_live(lease, None).await
            })
            .await?;
        Ok(r.ttl())
    }

    /// Ends the session now (clean exit): what is attached to it goes at once.
    pub async fn revoke(&self) {
        let id = self.lease.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(id) = id {
            let _ = self
                .call("revoking the lease", |mut c| async move {
                    c.lease_revoke(id).await
                })
                .await;
        }
        *self.keeper.lock().await = None;
    }
}
