//! The one HTTP stack (hyper, HTTP/1.1) behind both of the server's web
//! listeners: the admin page and API, and `[metrics] listen`. A listener
//! serves a bounded number of connections at once, each for a bounded
//! time, with a header timeout and a capped buffer, so a scraper or a
//! slow client cannot hold the process's resources.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::net::TcpListener;

pub(crate) type Reply = Response<Full<Bytes>>;

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// Longest a connection is served (keep-alive included).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

/// Binds `listen` and serves `handler` on it in the background; returns
/// the bound address. The handler gets each request with its client's
/// address. `what` names the listener in the bind error.
pub(crate) async fn serve<H, F>(
    listen: SocketAddr,
    what: &'static str,
    handler: H,
) -> anyhow::Result<SocketAddr>
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen for {what} on {listen}"))?;
    let addr = listener.local_addr().unwrap_or(listen);
    let handler = Arc::new(handler);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let reply = handler(req, peer);
                    async move { Ok::<_, Infallible>(reply.await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .max_buf_size(64 * 1024)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                // A kept-alive or trickling connection holds one of the
                // few slots: none is kept longer than this.
                let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
                drop(permit);
            });
        }
    });
    Ok(addr)
}
