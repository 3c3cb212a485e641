//! The outage history drawn and told: the domain page's timeline and
//! table, the overview's sparklines (inline SVG drawn here, no script),
//! and the text of `domain history` and `domain report`. Pure functions;
//! every figure also as text (`<title>`, `aria-label`).

use std::fmt::Write as _;

use super::page::{age, escape};
use super::rfc3339;
use crate::address::DomainName;
use crate::history::{Counter, History, Outage, Refusal};

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 140.0;
/// Room for the axis labels under the plot.
const AXIS: f64 = 18.0;

fn x_of(t: u64, from: u64, to: u64) -> f64 {
    let span = to.saturating_sub(from).max(1) as f64;
    (t.clamp(from, to) - from) as f64 / span * WIDTH
}

/// One outage told in a sentence (a bar's title, a report's lead).
pub fn outage_sentence(o: &Outage, now: u64) -> String {
    let c = &o.counts;
    let when = match o.end {
        Some(end) => format!(
            "from {} to {} ({})",
            rfc3339(o.start),
            rfc3339(end),
            age(o.duration(now))
        ),
        None => format!(
            "since {} ({} so far, ongoing)",
            rfc3339(o.start),
            age(o.duration(now))
        ),
    };
    format!(
        "Outage {}: primary down {when}; {} message(s) for {} recipient(s) held, {} refused, {} delivered after it, {} still queued",
        o.number,
        c.get(Counter::AcceptedMessages),
        c.get(Counter::AcceptedRecipients),
        c.refused_total(),
        c.get(Counter::DeliveredMessages),
        o.still_queued(),
    )
}

/// The domain page's timeline from `from` to `to`: outages as bars, the
/// queue depth as a line over them.
pub fn timeline_svg(history: &History, from: u64, to: u64) -> String {
    let plot = HEIGHT - AXIS;
    let mut svg = String::new();
    let shown: Vec<&Outage> = history
        .outages
        .iter()
        .filter(|o| o.end.unwrap_or(to) >= from && o.start <= to)
        .collect();
    let peak = history.samples.iter().map(|s| s.count).max().unwrap_or(0);
    let days = to.saturating_sub(from) / 86_400;
    let label = format!(
        "Timeline of {} over the last {days} day(s): {} outage(s); queue peak {peak} message(s)",
        history.domain,
        shown.len()
    );
    let _ = write!(
        svg,
        "<svg id=\"timeline\" class=\"timeline\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" width=\"100%\" \
role=\"img\" aria-label=\"{}\" xmlns=\"http://www.w3.org/2000/svg\">\
<title>{}</title><rect x=\"0\" y=\"0\" width=\"{WIDTH}\" height=\"{plot}\" fill=\"#fff\" stroke=\"#d9dde6\"/>",
        escape(&label),
        escape(&label)
    );
    // Day ticks (at most 31 labels).
    let step = if days > 10 { 7 * 86_400 } else { 86_400 };
    let mut tick = from - from % 86_400 + 86_400;
    while tick < to {
        let x = x_of(tick, from, to);
        let _ = write!(
            svg,
            "<line x1=\"{x:.1}\" y1=\"0\" x2=\"{x:.1}\" y2=\"{plot}\" stroke=\"#eef0f5\"/>\
<text x=\"{x:.1}\" y=\"{ty}\" font-size=\"10\" fill=\"#5b6478\" text-anchor=\"middle\">{d}</text>",
            ty = HEIGHT - 5.0,
            d = &rfc3339(tick)[5..10],
        );
        tick += step;
    }
    for o in &shown {
        let x0 = x_of(o.start, from, to);
        let x1 = x_of(o.end.unwrap_or(to), from, to).max(x0 + 2.0);
        let _ = write!(
            svg,
            "<rect class=\"outage\" data-outage=\"{n}\" x=\"{x0:.1}\" y=\"0\" width=\"{w:.1}\" height=\"{plot}\" \
fill=\"#b42318\" fill-opacity=\"0.28\" stroke=\"#b42318\" stroke-width=\"1\"><title>{t}</title></rect>",
            n = o.number,
            w = x1 - x0,
            t = escape(&outage_sentence(o, to)),
        );
    }
    if peak > 0 {
        let scale = (plot - 6.0) / peak as f64;
        let mut points = String::new();
        let mut last_x: Option<f64> = None;
        for s in &history.samples {
            if s.minute < from {
                continue;
            }
            let x = x_of(s.minute, from, to);
            let y = plot - s.count as f64 * scale;
            // A gap of more than a minute was a run of empty minutes.
            if let Some(lx) = last_x {
                if x - lx > x_of(from + 120, from, to) {
                    let _ = write!(points, "{lx:.1},{plot} {x:.1},{plot} ");
                }
            }
            let _ = write!(points, "{x:.1},{y:.1} ");
            last_x = Some(x);
        }
        let _ = write!(
            svg,
            "<polyline class=\"depth\" points=\"{}\" fill=\"none\" stroke=\"#2952cc\" stroke-width=\"1.5\">\
<title>Queue depth, peak {peak} message(s)</title></polyline>",
            points.trim_end()
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The overview's 24-hour sparkline of a domain's hourly queue peaks.
pub fn sparkline_svg(domain: &DomainName, peaks: &[(u64, u64)], from: u64, to: u64) -> String {
    let (w, h) = (120.0, 24.0);
    let top = peaks.iter().map(|(_, p)| *p).max().unwrap_or(0);
    let label = if top == 0 {
        format!("{domain}: nothing queued in the last 24 hours")
    } else {
        format!("{domain}: queue peak {top} message(s) in the last 24 hours")
    };
    let mut points = String::new();
    if top > 0 {
        // Every hour of the span, an hour without a sample at zero.
        let scale = (h - 3.0) / top as f64;
        let mut hour = from - from % 3600;
        while hour <= to {
            let peak = peaks
                .iter()
                .find(|(at, _)| *at == hour)
                .map_or(0, |(_, p)| *p);
            let x = x_of(hour, from, to) / WIDTH * w;
            let _ = write!(points, "{x:.1},{:.1} ", h - peak as f64 * scale);
            hour += 3600;
        }
    }
    format!(
        "<svg class=\"sparkline\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\" \
aria-label=\"{l}\" xmlns=\"http://www.w3.org/2000/svg\"><title>{l}</title>\
<line x1=\"0\" y1=\"{h}\" x2=\"{w}\" y2=\"{h}\" stroke=\"#d9dde6\"/>\
<polyline points=\"{p}\" fill=\"none\" stroke=\"#2952cc\" stroke-width=\"1.5\"/></svg>",
        l = escape(&label),
        p = points.trim_end(),
    )
}

/// The table of outages under the timeline, newest first.
pub fn outages_table(history: &History, now: u64) -> String {
    let mut t = String::from(
        "<table id=\"outages\"><thead><tr><th>#</th><th>Down</th><th>For</th><th>Held</th>\
<th>Refused</th><th>Delivered after</th><th>Bounced</th><th>Drain</th><th>Still queued</th></tr></thead><tbody>",
    );
    for o in history.outages.iter().rev() {
        let c = &o.counts;
        let refused = Refusal::ALL
            .iter()
            .filter(|r| c.get(r.counter()) > 0)
            .map(|r| format!("{} {}", c.get(r.counter()), r.label()))
            .collect::<Vec<_>>();
        let drain = match (o.end, o.drained) {
            (None, _) => "<span class=\"badge down\">ongoing</span>".to_string(),
            (Some(e), Some(d)) => age(d.saturating_sub(e)),
            (Some(_), None) => "<span class=\"badge held\">draining</span>".to_string(),
        };
        let held = c.get(Counter::HeldRecipients);
        let _ = write!(
            t,
            "<tr class=\"outage\" data-outage=\"{n}\" title=\"{title}\">\
<td data-label=\"#\" class=\"num\">{n}</td>\
<td data-label=\"Down\">{start}</td>\
<td data-label=\"For\">{dur}</td>\
<td data-label=\"Held\" class=\"num held-count\">{msgs} msg / {rcpts} rcpt</td>\
<td data-label=\"Refused\" class=\"refused\">{refused_total}{refused}</td>\
<td data-label=\"Delivered after\" class=\"num delivered\">{delivered} msg / {drcpts} rcpt</td>\
<td data-label=\"Bounced\" class=\"num\">{bounced}{storm}</td>\
<td data-label=\"Drain\">{drain}</td>\
<td data-label=\"Still queued\" class=\"num\">{queued}</td></tr>",
            n = o.number,
            title = escape(&outage_sentence(o, now)),
            start = escape(&rfc3339(o.start)),
            dur = age(o.duration(now)),
            msgs = c.get(Counter::AcceptedMessages),
            rcpts = c.get(Counter::AcceptedRecipients),
            refused_total = c.refused_total(),
            refused = if refused.is_empty() {
                String::new()
            } else {
                format!(" <span class=\"muted\">({})</span>", refused.join(", "))
            },
            delivered = c.get(Counter::DeliveredMessages),
            drcpts = c.get(Counter::DeliveredRecipients),
            bounced = c.get(Counter::BouncedRecipients),
            storm = if held > 0 {
                format!(" <span class=\"muted\">({held} held by the storm guard)</span>")
            } else {
                String::new()
            },
            queued = o.still_queued(),
        );
    }
    if history.outages.is_empty() {
        t.push_str(
            "<tr><td colspan=\"9\" class=\"muted\">No outage recorded in this period.</td></tr>",
        );
    }
    t.push_str("</tbody></table>");
    t
}

/// `domain history` as text.
pub fn history_text(history: &History, now: u64) -> String {
    let mut out = format!(
        "{}: {} outage(s) since {}\n",
        history.domain,
        history.outages.len(),
        rfc3339(history.since)
    );
    for o in &history.outages {
        let _ = writeln!(out, "  {}", outage_sentence(o, now));
    }
    let peak = history.samples.iter().max_by_key(|s| s.count);
    match peak {
        Some(p) if p.count > 0 => {
            let _ = writeln!(
                out,
                "queue peak: {} message(s) at {}",
                p.count,
                rfc3339(p.minute)
            );
        }
        _ => out.push_str("queue: nothing queued in this period\n"),
    }
    out
}

/// The lines of a report: (label, value), shared by text and HTML.
fn report_lines(o: &Outage, now: u64) -> Vec<(&'static str, String)> {
    let c = &o.counts;
    let mut lines = vec![
        ("Primary down", rfc3339(o.start)),
        (
            "Primary back",
            o.end.map_or("not yet (ongoing)".into(), rfc3339),
        ),
        ("Duration", age(o.duration(now))),
        (
            "Mail held for you",
            format!(
                "{} message(s) for {} recipient(s)",
                c.get(Counter::AcceptedMessages),
                c.get(Counter::AcceptedRecipients)
            ),
        ),
        ("Refused meanwhile", c.refused_total().to_string()),
    ];
    for r in Refusal::ALL {
        let label = match r {
            Refusal::Greylist => "  greylisted (sender to retry)",
            Refusal::Dnsbl => "  listed on a DNSBL",
            Refusal::UnknownUser => "  unknown recipient",
            Refusal::Auth => "  failed DMARC (p=reject)",
            Refusal::Filter => "  refused by the content filter",
        };
        if c.get(r.counter()) > 0 {
            lines.push((label, c.get(r.counter()).to_string()));
        }
    }
    lines.push((
        "Delivered to you after it",
        format!(
            "{} message(s), {} recipient(s)",
            c.get(Counter::DeliveredMessages),
            c.get(Counter::DeliveredRecipients)
        ),
    ));
    lines.push((
        "Bounced",
        format!(
            "{} recipient(s){}",
            c.get(Counter::BouncedRecipients),
            match c.get(Counter::HeldRecipients) {
                0 => String::new(),
                h => format!(" ({h} refusal(s) first held back by the bounce-storm guard)"),
            }
        ),
    ));
    if c.get(Counter::DeletedMessages) > 0 {
        lines.push((
            "Deleted by the operator",
            c.get(Counter::DeletedMessages).to_string(),
        ));
    }
    lines.push((
        "Drain",
        match (o.end, o.drained) {
            (Some(e), Some(d)) => format!(
                "complete at {} ({} after the primary came back)",
                rfc3339(d),
                age(d.saturating_sub(e))
            ),
            (Some(_), None) => "in progress".into(),
            (None, _) => "not started (the primary is still down)".into(),
        },
    ));
    lines.push(("Still queued", o.still_queued().to_string()));
    lines
}

/// `domain report --format text`.
pub fn report_text(domain: &DomainName, o: &Outage, hostname: &str, now: u64) -> String {
    let mut out = format!(
        "Backup MX report for {domain}: outage {} (from {hostname})\n\n",
        o.number
    );
    for (label, value) in report_lines(o, now) {
        let _ = writeln!(out, "{:<32} {value}", format!("{label}:"));
    }
    out
}

/// `domain report --format html`: one self-contained page to send.
pub fn report_html(domain: &DomainName, o: &Outage, hostname: &str, now: u64) -> String {
    let mut rows = String::new();
    for (label, value) in report_lines(o, now) {
        let _ = write!(
            rows,
            "<tr><th scope=\"row\">{}</th><td>{}</td></tr>",
            escape(label.trim()),
            escape(&value)
        );
    }
    let history = History {
        domain: domain.clone(),
        since: o.start,
        outages: vec![o.clone()],
        samples: Vec::new(),
    };
    let to = o.drained.or(o.end).unwrap_or(now).max(o.start + 60);
    let pad = (to - o.start) / 10 + 60;
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<title>Backup MX report for {d}: outage {n}</title>\
<style>body{{font:15px/1.45 system-ui,sans-serif;color:#1d2330;max-width:46rem;margin:2rem auto;padding:0 1rem}}\
table{{border-collapse:collapse;width:100%}}th,td{{text-align:left;padding:.35rem .5rem;border-bottom:1px solid #d9dde6}}\
th{{color:#5b6478;font-weight:normal;width:45%}}</style></head><body>\
<h1>Backup MX report for {d}</h1><p>{lead}</p>{svg}<table>{rows}</table>\
<p style=\"color:#5b6478\">Sent by {h}, the backup MX of {d}.</p></body></html>",
        d = escape(domain.as_str()),
        n = o.number,
        lead = escape(&outage_sentence(o, now)),
        svg = timeline_svg(&history, o.start.saturating_sub(pad), to + pad),
        h = escape(hostname),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{DepthSample, OutageCounts};

    fn outage() -> Outage {
        let mut counts = OutageCounts::default();
        counts
            .add(Counter::AcceptedMessages, 3)
            .add(Counter::AcceptedRecipients, 4)
            .add(Counter::RefusedDnsbl, 2)
            .add(Counter::DeliveredMessages, 3)
            .add(Counter::DeliveredRecipients, 4)
            .add(Counter::FinishedMessages, 3);
        Outage {
            number: 2,
            start: 1_800_000_000,
            end: Some(1_800_003_600),
            drained: Some(1_800_003_660),
            counts,
        }
    }

    fn history() -> History {
        History {
            domain: DomainName::parse("example.test").unwrap(),
            since: 1_800_000_000 - 86_400,
            outages: vec![outage()],
            samples: vec![
                DepthSample {
                    minute: 1_800_000_060,
                    count: 1,
                    oldest_age: Some(60),
                },
                DepthSample {
                    minute: 1_800_003_600,
                    count: 3,
                    oldest_age: Some(3600),
                },
            ],
        }
    }

    #[test]
    fn the_timeline_draws_each_outage_with_its_figures_as_text() {
        let h = history();
        let svg = timeline_svg(&h, h.since, 1_800_010_000);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("data-outage=\"2\""));
        assert!(svg.contains("1 outage(s); queue peak 3"));
        assert!(svg.contains("3 message(s) for 4 recipient(s) held, 2 refused"));
        assert!(svg.contains("class=\"depth\""));
        assert!(!svg.contains("<script"));
    }

    #[test]
    fn a_domain_name_in_a_label_is_escaped() {
        let mut h = history();
        h.domain = DomainName::parse("xn--bcher-kva.test").unwrap();
        let spark = sparkline_svg(
            &h.domain,
            &[(1_800_000_000, 5)],
            1_799_990_000,
            1_800_010_000,
        );
        assert!(spark.contains("queue peak 5"));
    }

    #[test]
    fn the_report_tells_every_figure() {
        let o = outage();
        let d = DomainName::parse("example.test").unwrap();
        let text = report_text(&d, &o, "mx2.test", 1_800_010_000);
        assert!(text.contains("3 message(s) for 4 recipient(s)"), "{text}");
        assert!(text.contains("listed on a DNSBL:"), "{text}");
        assert!(text.contains("complete at"), "{text}");
        let html = report_html(&d, &o, "mx2.<b>", 1_800_010_000);
        assert!(html.contains("mx2.&lt;b&gt;"));
        assert!(html.contains("<svg"));
        let table = outages_table(&history(), 1_800_010_000);
        assert!(table.contains("2 DNSBL"), "{table}");
        assert!(table.contains("1m"), "drain time: {table}");
    }
}
