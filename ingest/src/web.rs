//! The admin listener (`[admin] listen`): the status page at `/`, the JSON
//! API under `/api/` and the Prometheus exposition at `/metrics`. Every
//! answer comes from `relay_core::admin`, the code the CLI runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use relay_core::admin::{page, Admin, AdminError, DomainChange};
use serde_json::{json, Value};

/// Largest request body (a form or a JSON settings object).
const MAX_BODY: usize = 64 * 1024;
/// Longest wait for a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// The cookie the sign-in form sets.
const COOKIE: &str = "backupmx_admin";

use crate::auth::Failure;
use crate::http::Reply;

/// What every request needs.
pub(crate) struct Web {
    pub admin: Admin,
    /// Requests must carry it (bearer or cookie) when set.
    pub token: Option<String>,
    pub hostname: String,
    pub metrics: Option<PrometheusHandle>,
    /// Signed-in browsers.
    pub sessions: crate::auth::Sessions,
    /// Wrong tokens per client address.
    pub brake: crate::auth::FailureBrake,
}

/// Binds the listener and serves it in the background.
pub(crate) async fn serve(listen: SocketAddr, web: Arc<Web>) -> anyhow::Result<SocketAddr> {
    let token = web.token.is_some();
    let addr = crate::http::serve(listen, "the admin page and API", move |req, peer| {
        let web = web.clone();
        async move { handle(&web, req, peer).await }
    })
    .await?;
    tracing::info!(event = "admin_listening", addr = %addr, token);
    Ok(addr)
}

fn now() -> u64 {
    relay_core::time::unix_seconds(std::time::SystemTime::now())
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Not no-referrer: with it browsers send `Origin: null` on our own
    // forms, and the origin check could not tell them from another site's.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    r
}

fn json_reply(status: StatusCode, v: &Value) -> Reply {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    respond(status, "application/json", body)
}

fn json_error(status: StatusCode, message: impl std::fmt::Display) -> Reply {
    json_reply(status, &json!({ "error": message.to_string() }))
}

fn html(status: StatusCode, body: String) -> Reply {
    respond(status, "text/html; charset=utf-8", body)
}

fn redirect(to: &str) -> Reply {
    let mut r = respond(StatusCode::SEE_OTHER, "text/plain", "");
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// The status an operation's error is answered with.
fn error_status(e: &AdminError) -> StatusCode {
    match e {
        AdminError::NoSuchDomain(_)
        | AdminError::NoSuchMessage(_)
        | AdminError::NoSuchOutage(_) => StatusCode::NOT_FOUND,
        AdminError::Invalid(_) => StatusCode::BAD_REQUEST,
        AdminError::Store { .. } => {
            tracing::error!(event = "admin_store_error", error = %relay_core::error::Report(e));
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

fn api_error(e: AdminError) -> Reply {
    json_error(error_status(&e), relay_core::error::Report(&e))
}

/// Decodes `%XX` and `+` of a query string or form value.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match bytes.get(i + 1..i + 3) {
                Some(h) if h.iter().all(u8::is_ascii_hexdigit) => {
                    let hex = std::str::from_utf8(h).unwrap_or("00");
                    out.push(u8::from_str_radix(hex, 16).unwrap_or(0));
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of `key` in a query string or urlencoded form.
/// A yes/no query parameter: present and `1`, `true`, `yes` or empty.
fn flag(query: &str, key: &str) -> bool {
    param(query, key).is_some_and(|v| matches!(v.as_str(), "" | "1" | "true" | "yes"))
}

fn param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == key).then(|| percent_decode(v))
    })
}

/// Equal in time independent of where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a request presents to be let in.
#[derive(Debug, PartialEq, Eq)]
enum Presented {
    /// `Authorization: Bearer TOKEN` (scripts, the API).
    Token(String),
    /// The sign-in cookie: a session id.
    Session(String),
}

fn presented(headers: &HeaderMap) -> Option<Presented> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(t) = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
        {
            return Some(Presented::Token(t.trim().to_string()));
        }
    }
    session_cookie(headers).map(Presented::Session)
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == COOKIE).then(|| percent_decode(v))
        })
}

/// A name the browser used for a loopback listener: without a token, a
/// request for any other name is a DNS-rebinding page reaching us through
/// the operator's browser.
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return true; // HTTP/1.0 clients (curl -0, scripts)
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A state-changing request must come from our own page or a script,
/// never from another site's page in the operator's browser.
fn same_origin(headers: &HeaderMap) -> bool {
    // Browsers that say where a request comes from are believed; the
    // Origin header is the check for those that do not.
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return site == "same-origin" || site == "none";
    }
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(origin) => {
            let host = headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            origin == format!("http://{host}") || origin == format!("https://{host}")
        }
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Reply> {
    let body = Limited::new(req.into_body(), MAX_BODY).collect();
    match tokio::time::timeout(BODY_TIMEOUT, body).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(_)) => Err(json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {MAX_BODY} bytes or cut short"),
        )),
        Err(_) => Err(json_error(
            StatusCode::REQUEST_TIMEOUT,
            "request body not received in time",
        )),
    }
}

/// `429` for a client address that sent too many wrong tokens.
fn too_many(retry_after: Duration) -> Reply {
    let mut r = json_error(
        StatusCode::TOO_MANY_REQUESTS,
        "too many wrong tokens from your address: try again later",
    );
    let secs = retry_after.as_secs().max(1).to_string();
    if let Ok(v) = HeaderValue::from_str(&secs) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// Counts a wrong token from `peer`; logs the first of each window and
/// answers `429` past the limit.
fn wrong_token(web: &Web, peer: SocketAddr, what: &'static str) -> Option<Reply> {
    metrics::counter!("backupmx_admin_auth_failures_total").increment(1);
    match web.brake.failed(peer.ip(), Instant::now()) {
        Failure::First => {
            tracing::warn!(event = "admin_auth_failed", client = %peer.ip(), what,
                "wrong token (further ones from this address this minute are counted, not logged)");
            None
        }
        Failure::Again => None,
        Failure::Blocked { retry_after } => Some(too_many(retry_after)),
    }
}

async fn handle(web: &Web, req: Request<Incoming>, peer: SocketAddr) -> Reply {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let method = req.method().clone();
    let is_api = path.starts_with("/api/") || path == "/metrics";
    if web.token.is_none() && !loopback_host(req.headers()) {
        return json_error(
            StatusCode::FORBIDDEN,
            "this listener has no token and answers only requests for a loopback name",
        );
    }
    if method != Method::GET && method != Method::HEAD && !same_origin(req.headers()) {
        return json_error(StatusCode::FORBIDDEN, "cross-site request refused");
    }
    if let Some(wait) = web.brake.blocked(peer.ip(), Instant::now()) {
        return too_many(wait);
    }
    if path == "/login" {
        return login(web, req, peer).await;
    }
    if path == "/logout" {
        return logout(web, &req);
    }
    if let Some(token) = &web.token {
        let ok = match presented(req.headers()) {
            Some(Presented::Token(t)) => {
                let ok = same_secret(t.as_bytes(), token.as_bytes());
                if !ok {
                    if let Some(refused) = wrong_token(web, peer, "bearer") {
                        return refused;
                    }
                }
                ok
            }
            // Session ids are random: an unknown one is an expired or
            // closed session, not a guess.
            Some(Presented::Session(id)) => web.sessions.valid(&id, Instant::now()),
            None => false,
        };
        if !ok {
            if is_api {
                let mut r = json_error(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong token: send Authorization: Bearer TOKEN",
                );
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"backupmx\""),
                );
                return r;
            }
            return html(
                StatusCode::UNAUTHORIZED,
                page::login(&web.hostname, now(), false),
            );
        }
    }
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    if is_api {
        api(web, req, &method, &segs, &query).await
    } else {
        pages(web, &method, &segs, &query).await
    }
}

async fn login(web: &Web, req: Request<Incoming>, peer: SocketAddr) -> Reply {
    if web.token.is_none() {
        return redirect("/");
    }
    if req.method() == Method::GET {
        return html(StatusCode::OK, page::login(&web.hostname, now(), false));
    }
    if req.method() != Method::POST {
        return json_error(StatusCode::METHOD_NOT_ALLOWED, "GET or POST");
    }
    let secure = behind_https(req.headers());
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let given = param(&String::from_utf8_lossy(&body), "token").unwrap_or_default();
    let token = web.token.as_deref().unwrap_or_default();
    if !same_secret(given.as_bytes(), token.as_bytes()) {
        if let Some(refused) = wrong_token(web, peer, "sign-in form") {
            return refused;
        }
        return html(
            StatusCode::UNAUTHORIZED,
            page::login(&web.hostname, now(), true),
        );
    }
    // The browser keeps a random session id, never the token.
    let id = web.sessions.open(Instant::now());
    let lifetime = crate::auth::SESSION_LIFETIME.as_secs();
    let mut r = redirect("/");
    set_cookie(&mut r, &format!("{id}; Max-Age={lifetime}"), secure);
    r
}

/// `POST /logout`: ends the session and forgets the cookie.
fn logout(web: &Web, req: &Request<Incoming>) -> Reply {
    if req.method() != Method::POST {
        return json_error(StatusCode::METHOD_NOT_ALLOWED, "POST");
    }
    if let Some(id) = session_cookie(req.headers()) {
        web.sessions.close(&id);
    }
    let mut r = redirect(if web.token.is_some() { "/login" } else { "/" });
    set_cookie(&mut r, "; Max-Age=0", behind_https(req.headers()));
    r
}

/// Sets the sign-in cookie to `value` (with its attributes); `Secure`
/// when the browser reached us over HTTPS (a TLS front says so).
fn set_cookie(r: &mut Reply, value: &str, secure: bool) {
    let secure = if secure { "; Secure" } else { "" };
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict{secure}"
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
}

/// Whether the request came through an HTTPS front (which says so in
/// `X-Forwarded-Proto`) or from a page served over HTTPS.
fn behind_https(headers: &HeaderMap) -> bool {
    let forwarded = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("https://"));
    forwarded || origin
}

async fn pages(web: &Web, method: &Method, segs: &[&str], query: &str) -> Reply {
    let now = now();
    let notice = |status: StatusCode, title: &str, text: &str| {
        html(status, page::notice(title, text, &web.hostname, now))
    };
    let failed = |e: AdminError| {
        let status = error_status(&e);
        notice(
            status,
            "Not done",
            &relay_core::error::Report(&e).to_string(),
        )
    };
    match (method, segs) {
        (&Method::GET, []) => match web.admin.status(now).await {
            Ok(s) => {
                let names: Vec<_> = s
                    .domains
                    .iter()
                    .filter_map(|d| d.domain.as_ref().map(|d| d.name.clone()))
                    .collect();
                let since = now.saturating_sub(24 * 3600);
                let peaks = match web.admin.queue_peaks(&names, since).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(event = "queue_peaks_unreadable", error = %relay_core::error::Report(&e));
                        Vec::new()
                    }
                };
                html(StatusCode::OK, page::overview(&s, &peaks, &web.hostname))
            }
            Err(e) => failed(e),
        },
        (&Method::GET, ["domain", d]) => {
            let name = match relay_core::admin::parse_domain(d) {
                Ok(n) => n,
                Err(e) => return failed(e),
            };
            let q = param(query, "q").unwrap_or_default();
            let days: u64 = match param(query, "days").as_deref() {
                Some("30") => 30,
                _ => 7,
            };
            let history = web
                .admin
                .domain_history(&name, now.saturating_sub(days * 86_400))
                .await
                .ok();
            match web.admin.domain_status(&name, &q, now).await {
                Ok((status, queue)) => {
                    let flash = match (param(query, "done").as_deref(), param(query, "n")) {
                        (Some("flush"), Some(n)) | (Some("release"), Some(n)) => Some(format!(
                            "{} message(s) released for delivery.",
                            n.parse::<u64>().unwrap_or(0)
                        )),
                        (Some("hold"), _) => {
                            Some("Held: its mail stays queued until released.".to_string())
                        }
                        (Some("delete"), _) => Some("Message deleted.".to_string()),
                        _ => None,
                    };
                    html(
                        StatusCode::OK,
                        page::domain_page(
                            &status,
                            &queue,
                            &q,
                            flash.as_deref(),
                            history.as_ref().map(|h| (h, days)),
                            &web.hostname,
                            now,
                        ),
                    )
                }
                Err(e) => failed(e),
            }
        }
        (&Method::POST, ["domain", d, action @ ("flush" | "hold" | "release")]) => {
            let name = match relay_core::admin::parse_domain(d) {
                Ok(n) => n,
                Err(e) => return failed(e),
            };
            let done = match *action {
                "flush" => match web.admin.domain_view(&name).await {
                    Ok(_) => web.admin.flush(Some(&name), now).await,
                    Err(e) => Err(e),
                },
                hold => {
                    let change = DomainChange {
                        hold: Some(hold == "hold"),
                        ..DomainChange::default()
                    };
                    web.admin
                        .set_domain(&name, change, now)
                        .await
                        .map(|o| o.released)
                }
            };
            match done {
                Ok(n) => {
                    tracing::info!(event = "admin_action", action = *action, domain = %name, released = n);
                    redirect(&format!("/domain/{name}?done={action}&n={n}"))
                }
                Err(e) => failed(e),
            }
        }
        (&Method::POST, ["message", id, "delete"]) => {
            let id = match relay_core::admin::parse_id(id) {
                Ok(i) => i,
                Err(e) => return failed(e),
            };
            let domain = match web.admin.queue_entry(&id).await {
                Ok(e) => e.domain,
                Err(e) => return failed(e),
            };
            match web.admin.delete(&id).await {
                Ok(()) => {
                    tracing::info!(event = "admin_action", action = "delete", id = %id);
                    redirect(&format!("/domain/{domain}?done=delete"))
                }
                Err(e) => failed(e),
            }
        }
        (_, [] | ["domain", _] | ["domain", _, _] | ["message", _, "delete"]) => notice(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            "This address takes another method.",
        ),
        _ => notice(
            StatusCode::NOT_FOUND,
            "Not found",
            "There is nothing at this address.",
        ),
    }
}

async fn api(
    web: &Web,
    req: Request<Incoming>,
    method: &Method,
    segs: &[&str],
    query: &str,
) -> Reply {
    let now = now();
    let admin = &web.admin;
    macro_rules! try_op {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) => return api_error(e),
            }
        };
    }
    let domain_param = || -> Result<Option<relay_core::address::DomainName>, AdminError> {
        param(query, "domain")
            .filter(|d| !d.is_empty())
            .map(|d| relay_core::admin::parse_domain(&d))
            .transpose()
    };
    match (method, segs) {
        (&Method::GET, ["metrics"]) => match &web.metrics {
            Some(h) => respond(StatusCode::OK, "text/plain; version=0.0.4", h.render()),
            None => json_error(StatusCode::NOT_FOUND, "no metrics in this process"),
        },
        (&Method::GET, ["api", "status"]) => {
            json_reply(StatusCode::OK, &try_op!(admin.status(now).await).to_json())
        }
        (&Method::GET, ["api", "domains"]) => {
            let domains = try_op!(admin.domains().await);
            json_reply(StatusCode::OK, &json!(domains))
        }
        (&Method::GET, ["api", "domains", d]) => {
            let name = try_op!(relay_core::admin::parse_domain(d));
            json_reply(
                StatusCode::OK,
                &try_op!(admin.domain_view(&name).await).to_json(),
            )
        }
        (&Method::POST | &Method::PATCH, ["api", "domains", d]) => {
            let name = try_op!(relay_core::admin::parse_domain(d));
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let change: DomainChange = match serde_json::from_slice(&body) {
                Ok(c) => c,
                Err(e) => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        format!("invalid settings object: {e}"),
                    )
                }
            };
            set_domain(admin, &name, change, now).await
        }
        (&Method::POST, ["api", "domains", d, action @ ("hold" | "release")]) => {
            let name = try_op!(relay_core::admin::parse_domain(d));
            let change = DomainChange {
                hold: Some(*action == "hold"),
                discard_refused: *action == "release" && flag(query, "discard_refused"),
                ..DomainChange::default()
            };
            set_domain(admin, &name, change, now).await
        }
        (&Method::POST, ["api", "domains", d, "flush"]) => {
            let name = try_op!(relay_core::admin::parse_domain(d));
            try_op!(admin.domain_view(&name).await);
            let n = try_op!(admin.flush(Some(&name), now).await);
            json_reply(StatusCode::OK, &json!({ "released": n }))
        }
        (&Method::GET, ["api", "domains", d, "history"]) => {
            let name = try_op!(relay_core::admin::parse_domain(d));
            let since = try_op!(since_param(query, now));
            let history = try_op!(admin.domain_history(&name, since).await);
            json_reply(StatusCode::OK, &history.to_json(now))
        }
        (&Method::GET, ["api", "domains", d, "report"]) => {
            let name = try_op!(relay_core::admin::parse_domain(d));
            let number = match param(query, "outage").filter(|v| !v.is_empty()) {
                None => None,
                Some(v) => match v.parse::<u64>() {
                    Ok(n) => Some(n),
                    Err(_) => {
                        return json_error(StatusCode::BAD_REQUEST, "outage must be a number")
                    }
                },
            };
            let outage = try_op!(admin.outage(&name, number).await);
            json_reply(
                StatusCode::OK,
                &relay_core::history::report_json(&name, &outage, now),
            )
        }
        (&Method::GET, ["api", "domains", d, "recipients"]) => {
            let name = try_op!(relay_core::admin::parse_domain(d));
            let cached = try_op!(admin.recipients(&name, now).await);
            let rows: Vec<_> = cached
                .iter()
                .map(relay_core::admin::recipient_json)
                .collect();
            json_reply(StatusCode::OK, &json!(rows))
        }
        (&Method::GET, ["api", "queue"]) => {
            let domain = try_op!(domain_param());
            let entries = try_op!(admin.queue_list(domain.as_ref()).await);
            let q = param(query, "q").unwrap_or_default();
            let mut body = Vec::new();
            let listed = relay_core::admin::write_entries_json(
                entries
                    .iter()
                    .filter(|e| relay_core::admin::matches_search(e, &q)),
                &mut body,
            );
            match listed {
                Ok(()) => respond(StatusCode::OK, "application/json", body),
                Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
        (&Method::POST, ["api", "queue", "flush"]) => {
            let domain = try_op!(domain_param());
            if let Some(d) = &domain {
                try_op!(admin.domain_view(d).await);
            }
            let n = try_op!(admin.flush(domain.as_ref(), now).await);
            json_reply(StatusCode::OK, &json!({ "released": n }))
        }
        (&Method::GET, ["api", "queue", id]) => {
            let id = try_op!(relay_core::admin::parse_id(id));
            let e = try_op!(admin.queue_entry(&id).await);
            json_reply(StatusCode::OK, &relay_core::admin::entry_json(&e))
        }
        (&Method::DELETE, ["api", "queue"]) => {
            let Some(domain) = try_op!(domain_param()) else {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "DELETE /api/queue needs ?domain=D (and optionally refused_only=1)",
                );
            };
            try_op!(admin.domain_view(&domain).await);
            let refused_only = flag(query, "refused_only");
            let d = try_op!(admin.delete_domain_mail(&domain, refused_only).await);
            tracing::info!(event = "admin_action", action = "delete", domain = %domain, refused_only,
                messages = d.messages, recipients = d.recipients);
            json_reply(
                StatusCode::OK,
                &json!({ "messages": d.messages, "recipients": d.recipients }),
            )
        }
        (&Method::DELETE, ["api", "queue", id]) => {
            let id = try_op!(relay_core::admin::parse_id(id));
            try_op!(admin.delete(&id).await);
            tracing::info!(event = "admin_action", action = "delete", id = %id);
            json_reply(StatusCode::OK, &json!({ "deleted": id.to_string() }))
        }
        (
            _,
            ["metrics"]
            | ["api", "status" | "domains" | "queue"]
            | ["api", "domains", _]
            | ["api", "domains", _, "hold" | "release" | "flush" | "recipients" | "history" | "report"]
            | ["api", "queue", _],
        ) => json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed here"),
        ),
        _ => json_error(StatusCode::NOT_FOUND, "no such resource"),
    }
}

/// `?since=DUR` (`7d`, `24h`…): the start of a history; default 7 days.
fn since_param(query: &str, now: u64) -> Result<u64, AdminError> {
    match param(query, "since").filter(|v| !v.is_empty()) {
        None => Ok(now.saturating_sub(7 * 86_400)),
        Some(v) => relay_core::config::parse_duration(&v)
            .map(|d| now.saturating_sub(d.as_secs()))
            .map_err(AdminError::Invalid),
    }
}

/// Applies a change and answers with the `domain show --json` object and
/// how many queued messages were released.
async fn set_domain(
    admin: &Admin,
    name: &relay_core::address::DomainName,
    change: DomainChange,
    now: u64,
) -> Reply {
    let outcome = match admin.set_domain(name, change, now).await {
        Ok(o) => o,
        Err(e) => return api_error(e),
    };
    tracing::info!(event = "admin_action", action = "set", domain = %name, released = outcome.released);
    match admin.domain_view(name).await {
        Ok(view) => {
            let mut v = view.to_json();
            v["released"] = json!(outcome.released);
            let r = outcome.refusals;
            v["refusals"] = json!({
                "bounced": r.bounced,
                "discarded": r.discarded,
                "messages_deleted": r.messages_deleted,
            });
            json_reply(StatusCode::OK, &v)
        }
        Err(e) => api_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_forms_and_queries() {
        assert_eq!(percent_decode("a%20b+c%2"), "a b c%2");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
        assert_eq!(param("q=x%40y&done=flush", "q").as_deref(), Some("x@y"));
        assert_eq!(param("flag&q=", "flag").as_deref(), Some(""));
        assert_eq!(param("q=1", "n"), None);
    }

    #[test]
    fn a_token_from_bearer_or_a_session_from_the_cookie() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(presented(&h), Some(Presented::Token("abc".into())));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("x=1; backupmx_admin=t%3Bk; y=2"),
        );
        assert_eq!(presented(&h), Some(Presented::Session("t;k".into())));
        assert_eq!(presented(&HeaderMap::new()), None);
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
    }

    #[test]
    fn loopback_names_only_without_a_token() {
        let host = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static(v));
            loopback_host(&h)
        };
        assert!(host("127.0.0.1:9326"));
        assert!(host("localhost:9326"));
        assert!(host("[::1]:9326"));
        assert!(!host("evil.example:9326"));
        assert!(!host("10.0.0.1"));
    }

    #[test]
    fn cross_site_posts_are_refused() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        assert!(same_origin(&headers(&[("host", "127.0.0.1:9326")])));
        assert!(same_origin(&headers(&[
            ("host", "127.0.0.1:9326"),
            ("origin", "http://127.0.0.1:9326"),
            ("sec-fetch-site", "same-origin"),
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "127.0.0.1:9326"),
            ("origin", "http://evil.example"),
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "127.0.0.1:9326"),
            ("sec-fetch-site", "cross-site"),
        ])));
    }
}
