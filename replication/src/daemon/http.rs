//! The Prometheus endpoint (`--metrics ADDR:PORT`): a deliberately small HTTP/1.x server on
//! the daemon's tokio runtime that answers `GET /metrics` and nothing else (404).

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use super::histogram::Histogram;

/// Longest request head read.
const MAX_HEAD: usize = 8192;
/// Scrapes answered at once.
const MAX_CONNS: usize = 16;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds the metrics listener (`ADDR:PORT`, port 0 picks one).
pub fn bind(addr: &str) -> anyhow::Result<std::net::TcpListener> {
    let sa: SocketAddr = addr
        .to_socket_addrs()
        .with_context(|| format!("--metrics {addr}: expected ADDR:PORT"))?
        .next()
        .with_context(|| format!("--metrics {addr} resolves to no address"))?;
    let l = std::net::TcpListener::bind(sa).with_context(|| format!("binding --metrics {sa}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serves `render()` at `GET /metrics` on `l` until the runtime ends.
pub fn serve(
    rt: &tokio::runtime::Handle,
    l: std::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) {
    rt.spawn(async move {
        let l = match tokio::net::TcpListener::from_std(l) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("metrics endpoint: {e}");
                return;
            }
        };
        let slots = Arc::new(Semaphore::new(MAX_CONNS));
        loop {
            let (mut s, _) = match l.accept().await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let render = render.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    let head = read_head(&mut s).await?;
                    let (status, body) = if is_metrics_get(&head) {
                        let r = render.clone();
                        let body = tokio::task::spawn_blocking(move || r())
                            .await
                            .unwrap_or_default();
                        ("200 OK", body)
                    } else {
                        (
                            "404 Not Found",
                            "not found: only GET /metrics is served\n".into(),
                        )
                    };
                    let ct = if status.starts_with("200") {
                        CONTENT_TYPE
                    } else {
                        "text/plain; charset=utf-8"
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\
                         Connection: close\r\n\r\n{body}",
                        body.len()
                    );
                    s.write_all(resp.as_bytes()).await?;
                    s.shutdown().await
                })
                .await;
            });
        }
    });
}

async fn read_head(s: &mut tokio::net::TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        if buf.len() >= MAX_HEAD {
            break;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf)
}

/// Whether a request head is `GET /metrics` (a query string is allowed).
fn is_metrics_get(head: &[u8]) -> bool {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return false;
    };
    let path = target.split('?').next().unwrap_or_default();
    method == "GET" && path == "/metrics"
}

/// Labels of one series.
pub type Labels = Vec<(&'static str, String)>;

/// Encodes one metric family: a single unlabelled row as a plain metric, otherwise one series
/// per row, each value written by `encode`.
fn family<T>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    rows: &[(Labels, T)],
    encode: impl Fn(&T, MetricEncoder<'_>) -> std::fmt::Result,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    if let [(labels, v)] = rows {
        if labels.is_empty() {
            return encode(v, m);
        }
    }
    for (labels, v) in rows {
        encode(v, m.encode_family(labels)?)?;
    }
    Ok(())
}

/// Encodes a counter family (`name` gets `_total` appended by the encoder).
pub fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> std::fmt::Result {
    family(enc, name, help, MetricType::Counter, rows, |v, m| {
        ConstCounter::new(*v).encode(m)
    })
}

/// Encodes a gauge family.
pub fn gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, f64)],
) -> std::fmt::Result {
    family(enc, name, help, MetricType::Gauge, rows, |v, m| {
        ConstGauge::new(*v).encode(m)
    })
}

/// Encodes a histogram family (values in seconds).
pub fn histograms(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, &Histogram)],
) -> std::fmt::Result {
    family(enc, name, help, MetricType::Histogram, rows, |h, mut m| {
        let s = h.snapshot();
        m.encode_histogram::<NoLabelSet>(s.sum, s.count, &s.buckets, None)
    })
}

/// Renders a registry in the OpenMetrics text format.
pub fn render(reg: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, reg) {
        tracing::warn!("encoding metrics: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics() {
        assert!(is_metrics_get(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(is_metrics_get(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"));
        assert!(!is_metrics_get(b"POST /metrics HTTP/1.1\r\n\r\n"));
        assert!(!is_metrics_get(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(!is_metrics_get(b"GET /metricsx HTTP/1.1\r\n\r\n"));
        assert!(!is_metrics_get(b""));
    }

    /// One unlabelled row encodes as a plain metric, several rows as labelled series.
    #[test]
    fn families_render() {
        #[derive(Debug)]
        struct C(Histogram);
        impl prometheus_client::collector::Collector for C {
            fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
                counters(&mut enc, "t_ops", "Ops", &[(Vec::new(), 7)])?;
                gauges(
                    &mut enc,
                    "t_lag",
                    "Lag",
                    &[
                        (vec![("slave", "a".to_string())], 1.5),
                        (vec![("slave", "b".to_string())], 2.0),
                    ],
                )?;
                histograms(
                    &mut enc,
                    "t_apply_seconds",
                    "Apply",
                    &[(Vec::new(), &self.0)],
                )
            }
        }
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(C(Histogram::default())));
        let out = render(&reg);
        for want in [
            "# TYPE t_ops counter\nt_ops_total 7\n",
            "t_lag{slave=\"a\"} 1.5\nt_lag{slave=\"b\"} 2.0\n",
            "# TYPE t_apply_seconds histogram\nt_apply_seconds_sum 0.0\nt_apply_seconds_count 0\n",
        ] {
            assert!(out.contains(want), "{want:?} not in:\n{out}");
        }
    }

    #[test]
    fn serves_and_refuses() {
        use std::io::{Read, Write};
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let l = bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        serve(
            rt.handle(),
            l,
            Arc::new(|| "x_total 1\n# EOF\n".to_string()),
        );
        let get = |req: &str| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let ok = get("GET /metrics HTTP/1.1\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.ends_with("x_total 1\n# EOF\n"), "{ok}");
        assert!(get("GET /other HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get("DELETE /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    }
}
