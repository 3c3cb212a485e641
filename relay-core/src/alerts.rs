//! Alerts to an operator's webhook (`[alerts] webhook`): JSON POSTs for
//! `primary_down`, `primary_up`, `domain_held`, `domain_released`,
//! `queue_age` and `expired`.
//!
//! Never in the delivery path: [`Alerter::send`] queues the alert and
//! returns; a background task posts it, retrying with backoff (1 s, 2 s,
//! 4 s, 8 s), and drops it after five failures or when too many are
//! waiting (counted in `backupmx_alerts_total{result}`). Callers fire an
//! alert once per state change (a primary going down, not each message
//! that finds it down); `expired` is coalesced per domain.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::sync::Mutex;

/// Alerts waiting to be posted; past this, new ones are dropped (counted).
const BACKLOG: usize = 1000;
/// Posts of one alert before it is given up.
const TRIES: u32 = 5;
/// Longest a single POST may take.
const POST_TIMEOUT: Duration = Duration::from_secs(10);

/// An `http://HOST:PORT/PATH` webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    host: String,
    port: u16,
    path: String,
}

impl Webhook {
    /// Parses the webhook URL. Only `http://` is supported: point it at a
    /// local receiver (Alertmanager's webhook, a relay) that forwards.
    pub fn parse(url: &str) -> Result<Webhook, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("alerts.webhook {url:?}: only http:// URLs are supported (use a local receiver that forwards)")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let bad_port = |p: &str| format!("alerts.webhook {url:?}: bad port {p:?}");
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("alerts.webhook {url:?}: unclosed ["))?;
            match after.strip_prefix(':') {
                Some(p) => (h, p.parse::<u16>().map_err(|_| bad_port(p))?),
                None => (h, 80),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad_port(p))?),
                None => (authority, 80),
            }
        };
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(format!("alerts.webhook {url:?}: no host"));
        }
        Ok(Webhook {
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }

    async fn post(&self, body: &[u8]) -> Result<(), String> {
        let mut stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: backupmx\r\n\r\n",
            self.path,
            self.host,
            body.len()
        );
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        stream.write_all(body).await.map_err(|e| e.to_string())?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 512];
        while !reply.contains(&b'\n') && reply.len() < 4096 {
            let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
        }
        let status = String::from_utf8_lossy(&reply);
        let code = status.split_whitespace().nth(1).unwrap_or("");
        if code.starts_with('2') {
            Ok(())
        } else {
            Err(format!(
                "answered {:?}",
                status.lines().next().unwrap_or("nothing")
            ))
        }
    }
}

/// Sends alerts in the background; cheap to share.
pub struct Alerter {
    tx: mpsc::Sender<Value>,
    /// When an alert of a coalesced kind last went out, per key.
    last: Mutex<HashMap<(String, String), Instant>>,
}

impl Alerter {
    /// The alerter for a webhook URL (`[alerts] webhook`), started, or
    /// `None` when it is empty; the error is the webhook's.
    pub fn for_webhook(url: &str) -> Result<Option<std::sync::Arc<Alerter>>, String> {
        if url.is_empty() {
            return Ok(None);
        }
        let hook = Webhook::parse(url)?;
        Ok(Some(std::sync::Arc::new(Alerter::start(hook))))
    }

    /// Starts the sender task (call inside a tokio runtime).
    pub fn start(webhook: Webhook) -> Alerter {
        let (tx, mut rx) = mpsc::channel::<Value>(BACKLOG);
        tokio::spawn(async move {
            while let Some(alert) = rx.recv().await {
                let body = alert.to_string().into_bytes();
                let mut pause = Duration::from_secs(1);
                let mut tries = 0;
                loop {
                    tries += 1;
                    match tokio::time::timeout(POST_TIMEOUT, webhook.post(&body)).await {
                        Ok(Ok(())) => {
                            metrics::counter!("backupmx_alerts_total", "result" => "sent")
                                .increment(1);
                            break;
                        }
                        result => {
                            let why = match result {
                                Ok(Err(e)) => e,
                                _ => "timed out".into(),
                            };
                            if tries >= TRIES {
                                metrics::counter!("backupmx_alerts_total", "result" => "failed")
                                    .increment(1);
                                tracing::warn!(event = "alert_failed", alert = %alert, error = %why);
                                break;
                            }
                            tokio::time::sleep(pause).await;
                            pause *= 2;
                        }
                    }
                }
            }
        });
        Alerter {
            tx,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Queues `event` about `domain` with `details` (merged into the JSON
    /// object); never waits.
    pub fn send(&self, event: &str, domain: Option<&str>, details: Value) {
        let mut alert = json!({
            "event": event,
            "domain": domain,
            "at": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        });
        if let (Some(obj), Value::Object(extra)) = (alert.as_object_mut(), details) {
            obj.extend(extra);
        }
        tracing::info!(event = "alert", alert = %alert);
        if self.tx.try_send(alert).is_err() {
            metrics::counter!("backupmx_alerts_total", "result" => "dropped").increment(1);
        }
    }

    /// As [`Alerter::send`], at most once per `every` for one event and
    /// domain (for alerts that would otherwise fire once per message).
    pub fn send_coalesced(&self, event: &str, domain: &str, every: Duration, details: Value) {
        {
            let mut last = self.last.lock();
            let key = (event.to_string(), domain.to_string());
            if last.get(&key).is_some_and(|t| t.elapsed() < every) {
                return;
            }
            last.insert(key, Instant::now());
        }
        self.send(event, Some(domain), details);
    }

    /// Waits (at most `within`) until every queued alert was tried at
    /// least once: for short-lived commands such as `domain set`.
    pub async fn flush(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.tx.capacity() < BACKLOG && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The last one taken off the queue may still be in flight.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a `queue_age` alert is outstanding (fired, and the queue has
/// not got younger since): one alert per time the queue gets too old.
#[derive(Debug, Default)]
pub struct QueueAgeWatch(std::sync::atomic::AtomicBool);

impl QueueAgeWatch {
    /// Looks at the oldest queued message; alerts when it passed
    /// `threshold`, once until the queue is younger again.
    pub async fn check(
        &self,
        queue: &dyn crate::store::DeliveryQueue,
        alerter: &Alerter,
        threshold: Duration,
        now: u64,
    ) {
        use std::sync::atomic::Ordering;
        // A scan keeps the oldest entry and a count, not the queue.
        let mut queued = 0usize;
        let mut oldest: Option<crate::queue::QueueEntry> = None;
        let scanned = queue
            .scan(None, &mut |e| {
                queued += 1;
                if oldest
                    .as_ref()
                    .is_none_or(|o| e.received_at < o.received_at)
                {
                    oldest = Some(e);
                }
            })
            .await;
        if scanned.is_err() {
            return;
        }
        let age = oldest
            .as_ref()
            .map_or(0, |e| now.saturating_sub(e.received_at));
        if age > threshold.as_secs() {
            if !self.0.swap(true, Ordering::SeqCst) {
                if let Some(e) = oldest {
                    alerter.send(
                        "queue_age",
                        Some(e.domain.as_str()),
                        json!({ "oldest_queue_id": e.id.as_str(), "age_secs": age, "queued": queued }),
                    );
                }
            }
        } else {
            self.0.store(false, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhooks_are_http_urls() {
        let w = Webhook::parse("http://127.0.0.1:9000/hook").unwrap();
        assert_eq!(
            (w.host.as_str(), w.port, w.path.as_str()),
            ("127.0.0.1", 9000, "/hook")
        );
        let w = Webhook::parse("http://alerts.example").unwrap();
        assert_eq!((w.port, w.path.as_str()), (80, "/"));
        let w = Webhook::parse("http://[::1]:81/x").unwrap();
        assert_eq!((w.host.as_str(), w.port), ("::1", 81));
        assert!(Webhook::parse("https://alerts.example/").is_err());
        assert!(Webhook::parse("http://:80/").is_err());
        assert!(Webhook::parse("http://h:port/").is_err());
    }
}
