//! Waiting for the signal to stop (SIGTERM, SIGINT; SIGHUP reloads the
//! TLS certificate) and the drain after it.

use crate::tls::Tls;

/// Returns on SIGTERM or SIGINT; reloads `tls` on each SIGHUP meanwhile.
pub(crate) async fn wait_for_shutdown(tls: Option<Tls>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!(event = "signals_unavailable");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                if let Some(t) = &tls { t.reload().await; }
            }
        }
    }
}
