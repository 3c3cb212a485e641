//! Prometheus text exposition at `/metrics` on `[metrics] listen`.

use std::net::SocketAddr;

use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Installs the global recorder and serves it.
pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen for metrics on {listen}"))?;
    tracing::info!(event = "metrics_listening", addr = %listen);
    describe();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let handle = handle.clone();
            tokio::spawn(respond(stream, handle));
        }
    });
    Ok(())
}

fn describe() {
    metrics::describe_counter!("backupmx_sessions_total", "SMTP sessions accepted");
    metrics::describe_gauge!("backupmx_sessions_active", "SMTP sessions open now");
    metrics::describe_counter!(
        "backupmx_messages_accepted_total",
        "messages stored and answered 250"
    );
    metrics::describe_counter!(
        "backupmx_bytes_accepted_total",
        "bytes of accepted messages"
    );
    metrics::describe_counter!(
        "backupmx_rejections_total",
        "rejected commands and connections by reason and code"
    );
    metrics::describe_gauge!("backupmx_queue_depth", "queue entries waiting for delivery");
}

/// A minimal HTTP/1.0 responder: the exposition is the only resource.
async fn respond(mut stream: tokio::net::TcpStream, handle: PrometheusHandle) {
    let mut buf = vec![0u8; 4096];
    let mut used = 0;
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while used < buf.len() {
            match stream.read(&mut buf[used..]).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => used += n,
            }
            if buf[..used].windows(4).any(|w| w == b"\r\n\r\n") {
                return true;
            }
        }
        false
    })
    .await;
    if !matches!(read, Ok(true)) {
        return;
    }
    let request_line = String::from_utf8_lossy(&buf[..used])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let (status, body) = if request_line.starts_with("GET /metrics ") {
        ("200 OK", handle.render())
    } else {
        ("404 Not Found", "not found\n".to_string())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}
