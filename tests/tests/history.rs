//! The outage history, end to end: a recording primary behind a proxy that
//! plays two outages; mail held, refused (unknown user, DNSBL, greylist),
//! delivered and bounced; the figures in `domain history`, the API, the
//! report and its webhook equal what was sent and what the primary got;
//! the status page draws both outages in headless Chromium. And the same
//! history on the AWS shape through `backupmx admin`.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use backupmx_tests::browser::Browser;
use backupmx_tests::dns::{DnsServer, Rec};
use backupmx_tests::http::request;
use backupmx_tests::sink::Sink;
use backupmx_tests::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn cli_json(s: &Server, args: &[&str]) -> Value {
    serde_json::from_str(&succeeded(&s.cli(args))).expect("CLI JSON")
}

fn history(s: &Server) -> Value {
    cli_json(s, &["domain", "history", "example.test", "--json"])
}

fn outage(s: &Server, number: u64) -> Option<Value> {
    history(s)["outages"]
        .as_array()
        .and_then(|list| list.iter().find(|o| o["number"] == number).cloned())
}

/// Sends one message from `source` (a 127.x address), `rcpts` all taken.
fn send_from(s: &Server, source: &str, rcpts: &[&str], n: usize) {
    let mut c = s.client_from(source);
    let reply = c.send_message(
        "alice@remote.test",
        rcpts,
        &format!("From: alice@remote.test\r\nSubject: message {n}\r\n\r\nbody {n}\r\n"),
    );
    assert!(reply.starts_with("250"), "{reply}");
}

/// The reply to one RCPT from `source`, the transaction then dropped.
fn rcpt_reply(s: &Server, source: &str, rcpt: &str) -> String {
    let mut c = s.client_from(source);
    c.expect("EHLO client.test", "250");
    c.expect("MAIL FROM:<alice@remote.test>", "250");
    let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
    c.cmd("QUIT");
    r
}

fn screenshot_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots")
}

#[test]
fn two_outages_are_recorded_with_exact_figures_reported_and_drawn() {
    let sink = Sink::start(0);
    sink.set(|b| {
        b.rcpt_replies
            .push(("dave@example.test".into(), "550 5.1.1 no such user".into()))
    });
    let primary = TcpProxy::start(sink.addr);
    let hook = HookReceiver::start();
    let dns = DnsServer::start(&[
        ("2.0.0.127.bl.test", Rec::A("127.0.0.2")),
        ("3.0.0.127.bl.test", Rec::A("127.0.0.2")),
    ]);
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // Greylisting is on for the server, off for the domain until the
    // outage is under way (its first refusal is then counted).
    let s = Server::start_run(
        "",
        &format!(
            "greylist = false\nbounce_storm_guard = false\n\
             recipients = [\"bob@example.test\", \"carol@example.test\", \"dave@example.test\"]\n\
             [delivery]\nretry_initial = \"1s\"\nprobe_interval = \"1s\"\n\
             [greylist]\nenabled = true\ndelay = \"1s\"\n\
             [dnsbl]\nzones = [{{ zone = \"bl.test\", weight = 1 }}]\nthreshold = 1\n\
             [alerts]\nwebhook = \"{}\"\n\
             [history]\nsample_interval = \"1s\"\n\
             [admin]\nlisten = \"{admin}\"\n{}",
            hook.url(),
            dns.toml()
        ),
        &format!("[\"{}\"]", primary.addr),
    );

    // Outage 1: the primary goes away; a message comes to us.
    primary.set_down(true);
    send_from(
        &s,
        "127.0.0.1",
        &["bob@example.test", "carol@example.test"],
        1,
    );
    let first = eventually(WAIT, "outage 1 opened", || outage(&s, 1));
    assert_eq!(first["ongoing"], true, "{first}");
    assert_eq!(first["accepted"]["messages"], 1, "{first}");
    assert_eq!(first["accepted"]["recipients"], 2, "{first}");
    // Refused while it lasts: two unknown users, one DNSBL-listed client,
    // one greylisted triplet (whose retry is then taken).
    for _ in 0..2 {
        let r = rcpt_reply(&s, "127.0.0.1", "nobody@example.test");
        assert!(r.starts_with("550 5.1.1"), "{r}");
    }
    let r = rcpt_reply(&s, "127.0.0.3", "bob@example.test");
    assert!(r.starts_with("554 5.7.1"), "{r}");
    succeeded(&s.cli(&["domain", "set", "example.test", "--greylist", "true"]));
    let r = rcpt_reply(&s, "127.0.0.9", "bob@example.test");
    assert!(r.starts_with("450 4.2.0"), "{r}");
    std::thread::sleep(Duration::from_millis(1500));
    send_from(&s, "127.0.0.9", &["bob@example.test"], 2);
    succeeded(&s.cli(&["domain", "set", "example.test", "--greylist", "false"]));
    eventually(WAIT, "the refusals counted", || {
        let o = outage(&s, 1)?;
        (o["refused_total"] == 4).then_some(())
    });
    // A queue-depth point of the outage (sampled every second here).
    eventually(WAIT, "a queue-depth sample", || {
        history(&s)["queue_depth"]
            .as_array()?
            .iter()
            .any(|p| p["queued"] == 2)
            .then_some(())
    });

    // The primary is back: the probe finds it, the drain delivers both.
    primary.set_down(false);
    sink.wait_for(2, WAIT);
    let first = eventually(WAIT, "outage 1 drained", || {
        outage(&s, 1).filter(|o| !o["drained"].is_null())
    });
    assert_eq!(first["ongoing"], false);
    assert_eq!(first["accepted"]["messages"], 2, "{first}");
    assert_eq!(first["accepted"]["recipients"], 3, "{first}");
    assert_eq!(first["refused"]["unknown_user"], 2, "{first}");
    assert_eq!(first["refused"]["dnsbl"], 1, "{first}");
    assert_eq!(first["refused"]["greylist"], 1, "{first}");
    assert_eq!(first["delivered"]["messages"], 2, "{first}");
    assert_eq!(first["delivered"]["recipients"], 3, "{first}");
    let received_rcpts: usize = sink.received().iter().map(|m| m.rcpts.len()).sum();
    assert_eq!(received_rcpts, 3, "what the primary got");
    assert_eq!(first["still_queued"], 0);
    assert!(first["drain_seconds"].as_u64().is_some(), "{first}");
    let report = eventually(WAIT, "the first outage_report", || {
        hook.alerts()
            .into_iter()
            .find(|a| a["event"] == "outage_report")
    });
    assert_eq!(report["domain"], "example.test");
    assert_eq!(
        report["outage"], first,
        "the webhook carries the history's figures"
    );

    // Outage 2: one message, one recipient the primary then refuses.
    primary.set_down(true);
    send_from(
        &s,
        "127.0.0.1",
        &["carol@example.test", "dave@example.test"],
        3,
    );
    eventually(WAIT, "outage 2 opened", || outage(&s, 2));
    let r = rcpt_reply(&s, "127.0.0.1", "nobody@example.test");
    assert!(r.starts_with("550 5.1.1"), "{r}");
    let counted = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        outage(&s, 2).is_some_and(|o| o["refused"]["unknown_user"] == 1)
    });
    assert!(counted, "{}\n{}", history(&s), s.log());
    primary.set_down(false);
    sink.wait_for(3, WAIT);
    let second = eventually(WAIT, "outage 2 drained", || {
        outage(&s, 2).filter(|o| !o["drained"].is_null())
    });
    assert_eq!(second["accepted"]["messages"], 1, "{second}");
    assert_eq!(second["accepted"]["recipients"], 2, "{second}");
    assert_eq!(second["refused_total"], 1, "{second}");
    assert_eq!(second["delivered"]["recipients"], 1, "{second}");
    assert_eq!(second["bounced_recipients"], 1, "{second}");
    assert_eq!(second["still_queued"], 0, "{second}");
    eventually(WAIT, "two outage reports", || {
        (hook.count("outage_report") == 2).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(hook.count("outage_report"), 2, "one report per outage");

    // The report, three ways; the API's history is the CLI's.
    let json = cli_json(
        &s,
        &[
            "domain",
            "report",
            "example.test",
            "--outage",
            "1",
            "--format",
            "json",
        ],
    );
    assert_eq!(json["outage"], first);
    let text = succeeded(&s.cli(&["domain", "report", "example.test", "--last"]));
    assert!(text.contains("outage 2"), "{text}");
    assert!(text.contains("1 message(s) for 2 recipient(s)"), "{text}");
    let html = succeeded(&s.cli(&[
        "domain",
        "report",
        "example.test",
        "--last",
        "--format",
        "html",
    ]));
    assert!(
        html.starts_with("<!doctype html>") && html.contains("<svg"),
        "{html}"
    );
    let missing = s.cli(&["domain", "report", "example.test", "--outage", "9"]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("no outage 9"), "{err}");
    let api = request(admin, "GET", "/api/domains/example.test/history", &[], b"");
    assert_eq!(api.status, 200, "{}", api.text());
    let (mut from_api, mut from_cli) = (api.json(), history(&s));
    // Samples are taken every second: compare what both saw.
    from_api["queue_depth"] = Value::Null;
    from_cli["queue_depth"] = Value::Null;
    assert_eq!(from_api["outages"], from_cli["outages"]);
    let api = request(admin, "GET", "/api/domains/nowhere.test/history", &[], b"");
    assert_eq!(api.status, 404);

    // The page: both outages on the timeline and in the table.
    let browser = Browser::start(1280, 900);
    browser.goto(&format!("http://{admin}/domain/example.test#history"));
    browser.wait_for("#timeline");
    assert_eq!(browser.find_all("#timeline rect.outage").len(), 2);
    assert_eq!(browser.find_all("#outages tr.outage").len(), 2);
    let row = browser.text_of("#outages tr[data-outage='1']");
    assert!(row.contains("2 msg / 3 rcpt"), "{row}");
    assert!(row.contains("2 unknown user"), "{row}");
    std::fs::create_dir_all(screenshot_dir()).expect("screenshot dir");
    browser.screenshot(&screenshot_dir().join("outage-history.png"));
    let source = browser.source();
    let label = source
        .split("aria-label=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
        .to_string();
    assert!(label.contains("2 outage(s); queue peak 2"), "{label}");
    browser.goto(&format!("http://{admin}/"));
    browser.wait_for("#domains");
    let spark = browser.find_all("#domains tr[data-domain='example.test'] svg.sparkline");
    assert_eq!(spark.len(), 1);
    assert!(browser.source().contains("example.test: queue peak 2"));
}

/// A child process killed when the test ends, passed or not.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_aws_shape_keeps_the_same_history() {
    let sink = Sink::start(0);
    let primary = TcpProxy::start(sink.addr);
    primary.set_down(true);
    let Some(s) = Server::start_aws(
        "",
        "recipients = [\"bob@example.test\", \"carol@example.test\"]\n\
         [delivery]\nretry_initial = \"1s\"\nprobe_interval = \"1s\"\n",
        &format!("[\"{}\"]", primary.addr),
        false,
    ) else {
        return;
    };
    let retry_fn = |args: &[&str]| {
        let out = Command::new(retry_fn_bin())
            .arg("--config")
            .arg(&s.config_path)
            .args(args)
            .envs(s.env_vars().iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run retry-fn");
        let log = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "retry-fn {args:?}: {log}");
        log
    };
    send_from(
        &s,
        "127.0.0.1",
        &["bob@example.test", "carol@example.test"],
        1,
    );
    send_from(&s, "127.0.0.1", &["bob@example.test"], 2);
    let log = retry_fn(&["poll", "--exit-when-idle", "3s"]);
    assert!(log.contains("outage_started"), "{log}");
    let r = rcpt_reply(&s, "127.0.0.1", "nobody@example.test");
    assert!(r.starts_with("550 5.1.1"), "{r}");
    // The sweeper samples the queue (two messages held).
    retry_fn(&["sweep"]);

    // The page and API alone, on the same store.
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let text = std::fs::read_to_string(&s.config_path).expect("config");
    let path = s.dir.path().join("admin.toml");
    std::fs::write(&path, format!("{text}\n[admin]\nlisten = \"{admin}\"\n")).expect("config");
    let _admin = Reap(
        Command::new(backupmx_bin())
            .arg("--config")
            .arg(&path)
            .arg("admin")
            .envs(s.env_vars().iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start backupmx admin"),
    );
    let get = |path: &str| {
        eventually(WAIT, "the admin listener", || {
            std::net::TcpStream::connect(admin).ok()?;
            Some(request(admin, "GET", path, &[], b""))
        })
    };
    let h = get("/api/domains/example.test/history").json();
    let o = &h["outages"][0];
    assert_eq!(o["number"], 1, "{h}");
    assert_eq!(o["ongoing"], true, "{h}");
    assert_eq!(o["accepted"]["messages"], 2, "{h}");
    assert_eq!(o["accepted"]["recipients"], 3, "{h}");
    assert_eq!(o["refused"]["unknown_user"], 1, "{h}");
    assert!(
        h["queue_depth"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["queued"] == 2)),
        "{h}"
    );

    primary.set_down(false);
    retry_fn(&["poll", "--exit-when-idle", "5s"]);
    sink.wait_for(2, WAIT);
    let h = get("/api/domains/example.test/history").json();
    let o = &h["outages"][0];
    assert_eq!(o["ongoing"], false, "{h}");
    assert_eq!(o["delivered"]["messages"], 2, "{h}");
    assert_eq!(o["delivered"]["recipients"], 3, "{h}");
    assert_eq!(o["still_queued"], 0, "{h}");
    assert!(!o["drained"].is_null(), "{h}");
    // The CLI reads the same store.
    let cli = cli_json(&s, &["domain", "history", "example.test", "--json"]);
    assert_eq!(cli["outages"], h["outages"]);
    let page = get("/domain/example.test");
    assert!(page.text().contains("data-outage=\"1\""), "{}", page.text());
}
