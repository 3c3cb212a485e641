//! The status page: plain server-rendered HTML from the same views the API
//! returns as JSON. No script: actions are forms, and each asks for a
//! confirmation by unfolding a `<details>` first, which works the same on
//! a phone. Every value from the store is escaped.

use std::fmt::Write as _;

use super::{rfc3339, DomainStatus, QueuePage, Status};

const STYLE: &str = r#"
:root{--fg:#1d2330;--muted:#5b6478;--line:#d9dde6;--bg:#f6f7fa;--ok:#13795b;--bad:#b42318;--warn:#a15c07;--accent:#2952cc}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);background:var(--bg)}
header{background:#1d2330;color:#fff;padding:.7rem 1rem;display:flex;flex-wrap:wrap;gap:.3rem 1rem;align-items:baseline}
header a{color:#fff;text-decoration:none;font-weight:600}
header .meta{color:#c7cddb;font-size:.85rem}
header .signout{margin-left:auto}header .signout button{font-size:.8rem}
main{padding:1rem;max-width:72rem;margin:0 auto}
h1{font-size:1.25rem;margin:.2rem 0 1rem}
h2{font-size:1.05rem;margin:1.4rem 0 .6rem}
table{width:100%;border-collapse:collapse;background:#fff;border:1px solid var(--line);border-radius:6px}
th,td{text-align:left;padding:.45rem .6rem;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:.8rem;text-transform:uppercase;letter-spacing:.03em;color:var(--muted);background:#eef0f5}
td.num{font-variant-numeric:tabular-nums}
.err{color:var(--bad);font-family:ui-monospace,Menlo,monospace;font-size:.85rem;word-break:break-word}
.mono{font-family:ui-monospace,Menlo,monospace;font-size:.85rem;overflow-wrap:anywhere}
.badge{display:inline-block;padding:.05rem .45rem;border-radius:999px;font-size:.8rem;font-weight:600}
.up{background:#dcf5ea;color:var(--ok)}.down{background:#fde4e2;color:var(--bad)}
.unknown{background:#eceef3;color:var(--muted)}.held{background:#fdf0d5;color:var(--warn)}
.muted{color:var(--muted)}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.3rem 1rem;background:#fff;border:1px solid var(--line);border-radius:6px;padding:.8rem 1rem;margin:0}
dt{color:var(--muted)}dd{margin:0}
.actions{display:flex;flex-wrap:wrap;gap:.6rem;margin:1rem 0}
details{background:#fff;border:1px solid var(--line);border-radius:6px;padding:.35rem .7rem}
details[open]{border-color:var(--accent)}
summary{cursor:pointer;font-weight:600;color:var(--accent)}
details form{margin:.5rem 0 .2rem}
button{font:inherit;padding:.35rem .8rem;border-radius:5px;border:1px solid var(--accent);background:var(--accent);color:#fff;cursor:pointer}
button.danger{background:var(--bad);border-color:var(--bad)}
input[type=search],input[type=password]{font:inherit;padding:.35rem .5rem;border:1px solid var(--line);border-radius:5px;min-width:14rem;max-width:100%}
form.search{display:flex;gap:.5rem;flex-wrap:wrap;margin:.6rem 0}
a{color:var(--accent)}
.timeline{display:block;width:100%;height:auto;margin:.4rem 0 1rem}
.sparkline{display:block}
.flash{background:#dcf5ea;color:var(--ok);border:1px solid #a6dcc4;border-radius:6px;padding:.5rem .8rem}
@media (max-width:700px){
 table,thead,tbody,tr,th,td{display:block}
 thead{display:none}
 table{border:none;background:none}
 tr{background:#fff;border:1px solid var(--line);border-radius:6px;margin:0 0 .7rem;padding:.3rem .2rem}
 td{border:none;padding:.2rem .6rem}
 td[data-label]::before{content:attr(data-label);display:block;font-size:.72rem;text-transform:uppercase;letter-spacing:.03em;color:var(--muted)}
 dl{grid-template-columns:1fr}
 dt{margin-top:.3rem}
}
"#;

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A duration in seconds as an operator reads it: `45s`, `12m`, `3h 5m`, `2d 4h`.
pub fn age(secs: u64) -> String {
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, 0) => format!("{h}h"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, 0, _) => format!("{d}d"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

/// Seconds between reloads of the overview (it has no forms to lose).
const OVERVIEW_REFRESH: u32 = 30;

fn layout(title: &str, hostname: &str, at: u64, body: &str) -> String {
    page_with(title, hostname, at, body, "")
}

fn page_with(title: &str, hostname: &str, at: u64, body: &str, head: &str) -> String {
    page_frame(title, hostname, at, body, head, SIGN_OUT)
}

/// The sign-out button of every page but the sign-in form.
const SIGN_OUT: &str =
    "<form class=\"signout\" method=\"post\" action=\"/logout\"><button>Sign out</button></form>";

fn page_frame(
    title: &str,
    hostname: &str,
    at: u64,
    body: &str,
    head: &str,
    signout: &str,
) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">{head}\
<title>{title} · backupmx</title><style>{STYLE}</style></head><body>\
<header><a href=\"/\">backupmx</a><span class=\"meta\">{host}</span>\
<span class=\"meta\">as of {at}</span>{signout}</header><main>{body}</main></body></html>\n",
        title = escape(title),
        host = escape(hostname),
        at = rfc3339(at),
    )
}

fn primary_badge(s: &DomainStatus, now: u64) -> String {
    match s.primary_state {
        None => "<span class=\"badge unknown\">unknown</span>".into(),
        Some(p) => format!(
            "<span class=\"badge {cls}\">{word}</span> <span class=\"muted\" title=\"{since}\">for {age}</span>",
            cls = if p.up { "up" } else { "down" },
            word = if p.up { "up" } else { "down" },
            since = rfc3339(p.since),
            age = age(now.saturating_sub(p.since)),
        ),
    }
}

fn held_cell(s: &DomainStatus, now: u64) -> String {
    match s.domain.as_ref().and_then(|d| d.hold) {
        None => "<span class=\"muted\">no</span>".into(),
        Some(h) => format!(
            "<span class=\"badge held\">held</span> {reason}, {age} ago",
            reason = escape(&h.reason.to_string()),
            age = age(now.saturating_sub(h.since)),
        ),
    }
}

fn oldest_cell(s: &DomainStatus, now: u64) -> String {
    match s.oldest_received {
        None => "<span class=\"muted\">—</span>".into(),
        Some(t) => format!(
            "<span title=\"{}\">{}</span>",
            rfc3339(t),
            age(now.saturating_sub(t))
        ),
    }
}

fn error_cell(s: &DomainStatus) -> String {
    match &s.last_error {
        None => "<span class=\"muted\">—</span>".into(),
        Some(e) => format!("<span class=\"err\">{}</span>", escape(e)),
    }
}

/// The overview at `/`: every hosted domain in one table.
pub fn overview(
    status: &Status,
    peaks: &[(crate::address::DomainName, Vec<(u64, u64)>)],
    hostname: &str,
) -> String {
    let now = status.at;
    let total = status.domains.iter().map(|d| d.queued).sum::<usize>() + status.other.queued;
    let mut body = String::new();
    let down = status
        .domains
        .iter()
        .filter(|d| d.primary_state.is_some_and(|p| !p.up))
        .count();
    let held = status
        .domains
        .iter()
        .filter(|d| d.domain.as_ref().is_some_and(|d| d.hold.is_some()))
        .count();
    let _ = write!(
        body,
        "<h1>Status</h1><p><span id=\"total-queued\">{total}</span> message(s) queued · \
{n} domain(s) · {down} primary down · {held} held</p>",
        n = status.domains.len(),
    );
    body.push_str(
        "<table id=\"domains\"><thead><tr><th>Domain</th><th>Primary</th><th>Queued</th>\
<th>Oldest</th><th>Last 24 h</th><th>Held</th><th>Last error</th><th>Recipient cache</th></tr></thead><tbody>",
    );
    let day_ago = now.saturating_sub(24 * 3600);
    for s in &status.domains {
        let Some(d) = &s.domain else { continue };
        let name = escape(d.name.as_str());
        let cache = match s.cache {
            None => "<span class=\"muted\">off</span>".into(),
            Some(c) => format!("{} valid, {} invalid", c.valid, c.invalid),
        };
        let disabled = if d.enabled {
            ""
        } else {
            " <span class=\"badge unknown\">disabled</span>"
        };
        let _ = write!(
            body,
            "<tr id=\"domain-{name}\" data-domain=\"{name}\">\
<td data-label=\"Domain\"><a href=\"/domain/{name}\">{name}</a>{disabled}</td>\
<td data-label=\"Primary\" class=\"primary\">{primary}</td>\
<td data-label=\"Queued\" class=\"num queued\">{queued}</td>\
<td data-label=\"Oldest\" class=\"oldest\">{oldest}</td>\
<td data-label=\"Last 24 h\" class=\"spark\">{spark}</td>\
<td data-label=\"Held\" class=\"hold\">{held}</td>\
<td data-label=\"Last error\">{error}</td>\
<td data-label=\"Recipient cache\">{cache}</td></tr>",
            primary = primary_badge(s, now),
            queued = s.queued,
            oldest = oldest_cell(s, now),
            spark = super::history_view::sparkline_svg(
                &d.name,
                peaks
                    .iter()
                    .find(|(n, _)| *n == d.name)
                    .map_or(&[][..], |(_, p)| p.as_slice()),
                day_ago,
                now,
            ),
            held = held_cell(s, now),
            error = error_cell(s),
        );
    }
    if status.domains.is_empty() {
        body.push_str(
            "<tr><td colspan=\"8\" class=\"muted\">No hosted domains: add one with \
<code>backupmx domain add NAME</code>.</td></tr>",
        );
    }
    body.push_str("</tbody></table>");
    if status.other.queued > 0 {
        let _ = write!(
            body,
            "<h2>Other destinations</h2><p id=\"other\"><span class=\"queued\">{}</span> \
message(s) queued for destinations that are not hosted domains (delivery status \
notifications to senders, mail of removed domains); oldest {}.</p>",
            status.other.queued,
            oldest_cell(&status.other, now),
        );
    }
    page_with(
        "Status",
        hostname,
        now,
        &body,
        &format!("<meta http-equiv=\"refresh\" content=\"{OVERVIEW_REFRESH}\">"),
    )
}

/// How many queued messages a domain page lists at most.
pub const PAGE_ROWS: usize = 200;

fn confirm_form(summary: &str, action: &str, question: &str, button: &str, danger: bool) -> String {
    format!(
        "<details><summary>{summary}</summary><form method=\"post\" action=\"{action}\">\
<p>{question}</p><button type=\"submit\"{cls}>{button}</button></form></details>",
        summary = escape(summary),
        action = escape(action),
        question = escape(question),
        button = escape(button),
        cls = if danger { " class=\"danger\"" } else { "" },
    )
}

/// A domain's page: its state, actions, and its queue (at most
/// [`PAGE_ROWS`] of the messages matching `query`).
pub fn domain_page(
    s: &DomainStatus,
    queue: &QueuePage,
    query: &str,
    flash: Option<&str>,
    history: Option<(&crate::history::History, u64)>,
    hostname: &str,
    now: u64,
) -> String {
    let Some(d) = &s.domain else {
        return layout("Not found", hostname, now, "<h1>No such domain</h1>");
    };
    let name = escape(d.name.as_str());
    let mut body = String::new();
    let _ = write!(body, "<h1>{name}</h1>");
    if let Some(f) = flash {
        let _ = write!(body, "<p class=\"flash\" id=\"flash\">{}</p>", escape(f));
    }
    body.push_str("<dl id=\"summary\">");
    let primary = if d.primary.is_empty() {
        "MX lookup".to_string()
    } else {
        d.primary.join(", ")
    };
    let _ = write!(
        body,
        "<dt>Primary</dt><dd class=\"primary\">{badge} <span class=\"mono\">{hop}</span></dd>\
<dt>Queued</dt><dd class=\"queued\">{queued}</dd>\
<dt>Oldest</dt><dd>{oldest}</dd>\
<dt>Held</dt><dd class=\"hold\">{held}</dd>\
<dt>Last error</dt><dd>{error}</dd>\
<dt>Enabled</dt><dd>{enabled}</dd>\
<dt>Recipient verification</dt><dd>{verify}</dd>\
<dt>TLS to the primary</dt><dd class=\"tls\">{tls}</dd>\
<dt>Content filter</dt><dd class=\"filter\">{filter}</dd>\
<dt>Bounce-storm guard</dt><dd class=\"storm-guard\">{storm_guard}</dd>\
<dt>Sender authentication</dt><dd class=\"auth\">{auth}</dd>",
        auth = match d.auth {
            crate::domain::AuthPolicy::Off => "off",
            crate::domain::AuthPolicy::Annotate => "annotate (SPF, DKIM, DMARC, iprev in a header)",
            crate::domain::AuthPolicy::Enforce => "enforce (DMARC p=reject failures refused)",
        },
        storm_guard = if d.bounce_storm_guard { "on" } else { "off" },
        tls = escape(&d.tls.to_string()),
        filter = if d.filter {
            "on (when [filter] is set)"
        } else {
            "off"
        },
        badge = primary_badge(s, now),
        hop = escape(&primary),
        queued = s.queued,
        oldest = oldest_cell(s, now),
        held = held_cell(s, now),
        error = error_cell(s),
        enabled = if d.enabled { "yes" } else { "no" },
        verify = match s.cache {
            None => escape(&d.recipient_verify.to_string()),
            Some(c) => format!(
                "{}; cache: {} valid, {} invalid",
                escape(&d.recipient_verify.to_string()),
                c.valid,
                c.invalid
            ),
        },
    );
    body.push_str("</dl><div class=\"actions\">");
    if d.hold.is_some() {
        body.push_str(&confirm_form(
            "Release…",
            &format!("/domain/{name}/release"),
            &format!(
                "Release {}? Its {} queued message(s) go out at once.",
                d.name, s.queued
            ),
            "Release now",
            false,
        ));
    } else {
        body.push_str(&confirm_form(
            "Flush…",
            &format!("/domain/{name}/flush"),
            &format!(
                "Attempt all {} queued message(s) for {} now?",
                s.queued, d.name
            ),
            "Flush now",
            false,
        ));
        body.push_str(&confirm_form(
            "Hold…",
            &format!("/domain/{name}/hold"),
            &format!(
                "Hold {}? Its mail stays queued: no attempt, no expiry, no bounce, until released.",
                d.name
            ),
            "Hold now",
            true,
        ));
    }
    body.push_str("</div>");
    if let Some((h, days)) = history {
        let other = if days == 30 { 7 } else { 30 };
        let _ = write!(
            body,
            "<h2 id=\"history\">Outages, last {days} days</h2>\
<p class=\"muted\">Bars: the primary down; line: messages queued here. \
<a href=\"/domain/{name}?days={other}#history\">Last {other} days</a></p>{svg}{table}",
            svg = super::history_view::timeline_svg(h, now.saturating_sub(days * 86_400), now),
            table = super::history_view::outages_table(h, now),
        );
    }
    let _ = write!(
        body,
        "<h2>Queue</h2><form class=\"search\" method=\"get\" action=\"/domain/{name}\">\
<input type=\"search\" name=\"q\" value=\"{q}\" placeholder=\"id, sender, recipient, error\" aria-label=\"Search the queue\">\
<button type=\"submit\">Search</button></form>",
        q = escape(query),
    );
    let shown = queue.shown.len();
    let _ = write!(
        body,
        "<p class=\"muted\" id=\"matches\">{} message(s){}{}</p>",
        queue.matching,
        if query.trim().is_empty() {
            String::new()
        } else {
            format!(" matching “{}”", escape(query.trim()))
        },
        if shown < queue.matching {
            format!("; the first {shown} shown")
        } else {
            String::new()
        }
    );
    body.push_str(
        "<table id=\"queue\"><thead><tr><th>Id</th><th>Sender</th><th>Recipients</th><th>Size</th>\
<th>Attempts</th><th>Next attempt</th><th>Last error</th><th></th></tr></thead><tbody>",
    );
    for e in &queue.shown {
        let id = escape(&e.id.to_string());
        let recipients: Vec<String> = e.pending_recipients().map(|r| escape(&r.address)).collect();
        let next = if e.next_attempt <= now {
            "due".to_string()
        } else {
            format!("in {}", age(e.next_attempt - now))
        };
        let _ = write!(
            body,
            "<tr class=\"message\" data-id=\"{id}\"><td data-label=\"Id\" class=\"mono\">{id}</td>\
<td data-label=\"Sender\" class=\"mono\">&lt;{sender}&gt;</td>\
<td data-label=\"Recipients\" class=\"mono\">{rcpts}</td>\
<td data-label=\"Size\" class=\"num\">{size}</td>\
<td data-label=\"Attempts\" class=\"num\">{attempts}</td>\
<td data-label=\"Next attempt\" title=\"{next_at}\">{next}</td>\
<td data-label=\"Last error\">{error}</td><td>{delete}</td></tr>",
            sender = escape(&e.sender),
            rcpts = recipients.join("<br>"),
            size = e.size,
            attempts = e.attempts,
            next_at = rfc3339(e.next_attempt),
            error = match &e.last_error {
                None => "<span class=\"muted\">—</span>".into(),
                Some(x) => format!("<span class=\"err\">{}</span>", escape(x)),
            },
            delete = confirm_form(
                "Delete…",
                &format!("/message/{id}/delete"),
                &format!("Delete {}? It will not be delivered.", e.id),
                "Delete",
                true
            ),
        );
    }
    if queue.shown.is_empty() {
        body.push_str("<tr><td colspan=\"8\" class=\"muted\">Nothing queued.</td></tr>");
    }
    body.push_str("</tbody></table>");
    layout(d.name.as_str(), hostname, now, &body)
}

/// The sign-in form, shown with 401 when a token is required.
pub fn login(hostname: &str, now: u64, failed: bool) -> String {
    let note = if failed {
        "<p class=\"err\">That token is not right.</p>"
    } else {
        ""
    };
    let body = format!(
        "<h1>Sign in</h1>{note}<form method=\"post\" action=\"/login\" class=\"search\">\
<input type=\"password\" name=\"token\" placeholder=\"admin token\" aria-label=\"Admin token\" autocomplete=\"current-password\">\
<button type=\"submit\">Sign in</button></form>\
<p class=\"muted\">The token is <code>[admin] token</code> in the server's configuration.</p>"
    );
    page_frame("Sign in", hostname, now, &body, "", "")
}

/// A page that only says something (not found, bad request, an error).
pub fn notice(title: &str, text: &str, hostname: &str, now: u64) -> String {
    let body = format!(
        "<h1>{}</h1><p>{}</p><p><a href=\"/\">Back to the status page</a></p>",
        escape(title),
        escape(text)
    );
    layout(title, hostname, now, &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::DomainName;
    use crate::domain::{Domain, Hold, HoldReason};
    use crate::verify::PrimaryState;

    fn status_of(name: &str, queued: usize, error: Option<&str>) -> DomainStatus {
        let mut d = Domain::new(DomainName::parse(name).unwrap());
        d.hold = Some(Hold {
            reason: HoldReason::BounceStorm,
            since: 1_000,
        });
        DomainStatus {
            domain: Some(d),
            primary_state: Some(PrimaryState {
                up: false,
                since: 400,
                observed: 990,
            }),
            queued,
            oldest_received: Some(100),
            last_error: error.map(str::to_string),
            cache: None,
        }
    }

    #[test]
    fn escapes_markup_from_the_store() {
        assert_eq!(
            escape(r#"<b a="x">&'"#),
            "&lt;b a=&quot;x&quot;&gt;&amp;&#39;"
        );
        let s = Status {
            domains: vec![status_of(
                "example.org",
                2,
                Some("421 <script>alert(1)</script>"),
            )],
            other: status_of("x.example", 0, None),
            at: 4_000,
        };
        let page = overview(&s, &[], "mx2.<example>");
        assert!(!page.contains("<script>"));
        assert!(page.contains("421 &lt;script&gt;"));
        assert!(page.contains("mx2.&lt;example&gt;"));
    }

    #[test]
    fn overview_shows_state_depth_age_and_hold() {
        let s = Status {
            domains: vec![status_of("example.org", 3, Some("connection refused"))],
            other: DomainStatus {
                domain: None,
                primary_state: None,
                queued: 1,
                oldest_received: Some(3_900),
                last_error: None,
                cache: None,
            },
            at: 4_000,
        };
        let page = overview(&s, &[], "mx2.example.net");
        assert!(page.contains("<span id=\"total-queued\">4</span>"));
        assert!(page.contains("class=\"num queued\">3<"));
        assert!(page.contains(
            "badge down\">down</span> <span class=\"muted\" title=\"1970-01-01T00:06:40Z\">for 1h"
        ));
        assert!(page.contains("held</span> bounce_storm, 50m ago"));
        assert!(page.contains("connection refused"));
        assert!(page.contains("Other destinations"));
        assert!(page.contains("name=\"viewport\""));
        assert!(page.contains("http-equiv=\"refresh\" content=\"30\""));
    }

    #[test]
    fn domain_page_offers_release_for_a_held_domain_and_escapes_the_query() {
        let s = status_of("example.org", 0, None);
        let page = domain_page(
            &s,
            &QueuePage::default(),
            "\"><img",
            Some("<done>"),
            None,
            "mx2",
            4_000,
        );
        assert!(page.contains("action=\"/domain/example.org/release\""));
        assert!(!page.contains("/domain/example.org/flush"));
        assert!(page.contains("value=\"&quot;&gt;&lt;img\""));
        assert!(page.contains("Nothing queued."));
        assert!(page.contains("id=\"flash\">&lt;done&gt;</p>"));
    }

    #[test]
    fn ages_read_like_an_operator_says_them() {
        assert_eq!(age(45), "45s");
        assert_eq!(age(600), "10m");
        assert_eq!(age(3600), "1h");
        assert_eq!(age(3660), "1h 1m");
        assert_eq!(age(2 * 86_400 + 4 * 3600 + 5), "2d 4h");
        assert_eq!(age(86_400), "1d");
    }
}
