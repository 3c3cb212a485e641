//! Alerts to an operator's webhook (`[alerts] webhook`): JSON POSTs for
//! `primary_down`, `primary_up`, `domain_held`, `domain_released`,
//! `queue_age` and `expired`.
//!
//! Never in the delivery path: [`Alerter::send`] queues the alert and
//! returns. A background sender posts up to 32 at once (a hanging
//! receiver holds one slot per alert, not the queue), `domain_held` and
//! `bounce_storm` before the rest, each retried with backoff (1 s, 2 s,
//! 4 s, 8 s) and given up after five failures. A newer alert of the same
//! event and domain replaces one still waiting; a full queue drops its
//! oldest routine alert for the newest. Every alert has an `id`, the same
//! in each retry, so a receiver can drop a repeated post (a slow receiver
//! that answers after our timeout gets the retry too). All counted in
//! `backupmx_alerts_total{result}` (sent, failed, coalesced, dropped).
//! Callers fire an alert once per state change (a primary going down,
//! not each message that finds it down); `expired` is coalesced per
//! domain.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::sync::Mutex;

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

/// Alerts waiting to be posted; past this, the oldest routine one is
/// dropped for the newest (counted).
const BACKLOG: usize = 1000;

/// How the sender posts (the defaults suit a webhook on the same network;
/// tests shorten them).
#[derive(Debug, Clone, Copy)]
pub struct SendSettings {
    /// Posts of one alert before it is given up.
    pub tries: u32,
    /// Longest a single POST may take.
    pub post_timeout: Duration,
    /// The pause after the first failed post (doubling).
    pub first_pause: Duration,
    /// Alerts posted at once: a hanging receiver holds one slot per alert,
    /// not the whole queue.
    pub in_flight: usize,
}

impl Default for SendSettings {
    fn default() -> Self {
        SendSettings {
            tries: 5,
            post_timeout: Duration::from_secs(10),
            first_pause: Duration::from_secs(1),
            in_flight: 32,
        }
    }
}

/// Events an operator must see first: a domain stopped delivering.
fn is_urgent(event: &str) -> bool {
    matches!(event, "domain_held" | "bounce_storm")
}

/// One alert waiting: its coalescing key and its JSON.
#[derive(Debug, Clone)]
struct Waiting {
    key: (String, String),
    alert: Value,
}

/// The alerts not posted yet (pure): urgent ones first; a newer alert of
/// the same event and domain replaces one still waiting (the receiver gets
/// the newest state once, not every step); when full, the oldest routine
/// alert makes room for the newest.
#[derive(Debug, Default)]
struct Pending {
    urgent: VecDeque<Waiting>,
    routine: VecDeque<Waiting>,
}

/// What [`Pending::push`] did with an alert.
#[derive(Debug, PartialEq, Eq)]
enum Pushed {
    Queued,
    /// It replaced a waiting alert of the same event and domain.
    Coalesced,
    /// It was queued, and the oldest routine alert dropped to make room.
    DroppedOldest,
}

impl Pending {
    fn len(&self) -> usize {
        self.urgent.len() + self.routine.len()
    }

    fn push(&mut self, w: Waiting, urgent: bool) -> Pushed {
        let lane = if urgent {
            &mut self.urgent
        } else {
            &mut self.routine
        };
        if let Some(same) = lane.iter_mut().find(|x| x.key == w.key) {
            *same = w;
            return Pushed::Coalesced;
        }
        lane.push_back(w);
        if self.len() <= BACKLOG {
            return Pushed::Queued;
        }
        if self.routine.pop_front().is_none() {
            self.urgent.pop_front();
        }
        Pushed::DroppedOldest
    }

    fn pop(&mut self) -> Option<Waiting> {
        self.urgent.pop_front().or_else(|| self.routine.pop_front())
    }
}

/// What the sender and the callers share.
struct Shared {
    pending: Mutex<Pending>,
    wake: tokio::sync::Notify,
    slots: Arc<tokio::sync::Semaphore>,
    settings: SendSettings,
}

/// Sends alerts in the background; cheap to share.
pub struct Alerter {
    shared: Arc<Shared>,
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
        Ok(Some(std::sync::Arc::new(Alerter::start(
            hook,
            SendSettings::default(),
        ))))
    }

    /// Starts the sender task (call inside a tokio runtime).
    pub fn start(webhook: Webhook, settings: SendSettings) -> Alerter {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: tokio::sync::Notify::new(),
            slots: Arc::new(tokio::sync::Semaphore::new(settings.in_flight.max(1))),
            settings,
        });
        let webhook = Arc::new(webhook);
        let sender = shared.clone();
        tokio::spawn(async move {
            loop {
                // A slot first, then the most urgent alert waiting at that
                // moment (not the one that was first when the slots ran out).
                let Ok(slot) = sender.slots.clone().acquire_owned().await else {
                    return;
                };
                let next = loop {
                    let waiting = sender.pending.lock().pop();
                    match waiting {
                        Some(w) => break w,
                        None => sender.wake.notified().await,
                    }
                };
                let webhook = webhook.clone();
                let settings = sender.settings;
                tokio::spawn(async move {
                    post_with_retries(&webhook, &next.alert, settings).await;
                    drop(slot);
                });
            }
        });
        Alerter {
            shared,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Queues `event` about `domain` with `details` (merged into the JSON
    /// object); never waits. Every alert carries a unique `id`, the same
    /// in each retry, so a receiver can recognise a repeated post.
    pub fn send(&self, event: &str, domain: Option<&str>, details: Value) {
        let mut alert = json!({
            "id": format!("{:016x}", rand::random::<u64>()),
            "event": event,
            "domain": domain,
            "at": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        });
        if let (Some(obj), Value::Object(extra)) = (alert.as_object_mut(), details) {
            obj.extend(extra);
        }
        tracing::info!(event = "alert", alert = %alert);
        let waiting = Waiting {
            key: (event.to_string(), domain.unwrap_or_default().to_string()),
            alert,
        };
        let pushed = self.shared.pending.lock().push(waiting, is_urgent(event));
        match pushed {
            Pushed::Queued => {}
            Pushed::Coalesced => {
                metrics::counter!("backupmx_alerts_total", "result" => "coalesced").increment(1)
            }
            Pushed::DroppedOldest => {
                metrics::counter!("backupmx_alerts_total", "result" => "dropped").increment(1)
            }
        }
        self.shared.wake.notify_one();
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

    /// Waits (at most `within`) until every queued alert was posted or
    /// given up: for short-lived commands such as `domain set`.
    pub async fn flush(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let all = self.shared.settings.in_flight.max(1);
        while Instant::now() < deadline {
            let idle = self.shared.pending.lock().len() == 0
                && self.shared.slots.available_permits() == all;
            if idle {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Posts one alert, retrying with backoff; counts the result.
async fn post_with_retries(webhook: &Webhook, alert: &Value, settings: SendSettings) {
    let body = alert.to_string().into_bytes();
    let mut pause = settings.first_pause;
    for tries in 1..=settings.tries.max(1) {
        let why = match tokio::time::timeout(settings.post_timeout, webhook.post(&body)).await {
            Ok(Ok(())) => {
                metrics::counter!("backupmx_alerts_total", "result" => "sent").increment(1);
                return;
            }
            Ok(Err(e)) => e,
            Err(_) => "timed out".to_string(),
        };
        if tries >= settings.tries {
            metrics::counter!("backupmx_alerts_total", "result" => "failed").increment(1);
            tracing::warn!(event = "alert_failed", alert = %alert, tries, error = %why);
            return;
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
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

    fn waiting(event: &str, domain: &str) -> Waiting {
        Waiting {
            key: (event.into(), domain.into()),
            alert: json!({ "event": event, "domain": domain }),
        }
    }

    #[test]
    fn urgent_alerts_go_first_and_a_newer_state_replaces_a_waiting_one() {
        let mut p = Pending::default();
        assert_eq!(
            p.push(waiting("primary_down", "a.test"), false),
            Pushed::Queued
        );
        assert_eq!(
            p.push(waiting("primary_down", "b.test"), false),
            Pushed::Queued
        );
        assert_eq!(
            p.push(waiting("domain_held", "a.test"), true),
            Pushed::Queued
        );
        let mut newer = waiting("primary_down", "a.test");
        newer.alert = json!({ "event": "primary_down", "domain": "a.test", "queued": 7 });
        assert_eq!(p.push(newer, false), Pushed::Coalesced);
        assert_eq!(p.len(), 3);
        let order: Vec<_> = std::iter::from_fn(|| p.pop()).map(|w| w.alert).collect();
        assert_eq!(order[0]["event"], "domain_held");
        assert_eq!(order[1]["queued"], 7);
        assert_eq!(order[2]["domain"], "b.test");
    }

    #[test]
    fn a_full_queue_drops_its_oldest_routine_alert_for_the_newest() {
        let mut p = Pending::default();
        p.push(waiting("domain_held", "held.test"), true);
        for i in 0..BACKLOG - 1 {
            p.push(waiting("expired", &format!("d{i}.test")), false);
        }
        assert_eq!(p.len(), BACKLOG);
        let pushed = p.push(waiting("expired", "newest.test"), false);
        assert_eq!(pushed, Pushed::DroppedOldest);
        assert_eq!(p.len(), BACKLOG);
        assert_eq!(p.pop().unwrap().key.1, "held.test");
        assert_eq!(p.pop().unwrap().key.1, "d1.test", "d0 was dropped");
        assert_eq!(p.routine.back().unwrap().key.1, "newest.test");
    }

    /// A webhook receiver on loopback: records each request's JSON body,
    /// answers `200` after `delay`, or never (`None`).
    async fn receiver(delay: Option<Duration>) -> (Webhook, Arc<Mutex<Vec<Value>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let record = record.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let Ok(n) = s.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        req.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&req).to_string();
                        if let Some((head, body)) = text.split_once("\r\n\r\n") {
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("Content-Length: "))
                                .and_then(|v| v.trim().parse().ok())
                                .unwrap_or(0);
                            if body.len() >= len {
                                record.lock().push(serde_json::from_str(body).unwrap());
                                break;
                            }
                        }
                    }
                    match delay {
                        None => std::future::pending::<()>().await,
                        Some(d) => {
                            tokio::time::sleep(d).await;
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                                .await;
                        }
                    }
                });
            }
        });
        let hook = Webhook::parse(&format!("http://127.0.0.1:{port}/hook")).unwrap();
        (hook, seen)
    }

    /// Waits (a liveness bound, not a speed check) until `done` holds.
    async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_hanging_receiver_does_not_hold_back_the_other_alerts() {
        let (hook, seen) = receiver(None).await;
        let alerter = Alerter::start(hook, SendSettings::default());
        for i in 0..30 {
            alerter.send("primary_down", Some(&format!("d{i}.test")), json!({}));
        }
        alerter.send("domain_held", Some("held.test"), json!({}));
        // One at a time, the second would wait for the first's 5 tries.
        eventually("every alert posted while the receiver hangs", || {
            seen.lock().len() == 31
        })
        .await;
        assert!(seen.lock().iter().any(|a| a["event"] == "domain_held"));
    }

    #[tokio::test]
    async fn a_slow_receiver_sees_one_id_in_every_retry() {
        let (hook, seen) = receiver(Some(Duration::from_millis(500))).await;
        let settings = SendSettings {
            tries: 3,
            post_timeout: Duration::from_millis(100),
            first_pause: Duration::from_millis(10),
            in_flight: 4,
        };
        let alerter = Alerter::start(hook, settings);
        alerter.send("primary_down", Some("slow.test"), json!({ "queued": 1 }));
        eventually("three tries", || seen.lock().len() == 3).await;
        let seen = seen.lock();
        let id = seen[0]["id"].as_str().unwrap();
        assert_eq!(id.len(), 16);
        assert!(seen.iter().all(|a| a["id"] == id), "{seen:?}");
    }
}
