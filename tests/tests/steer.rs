//! Operators steer mail already queued: hold and release, a new primary,
//! a per-domain queue lifetime. Embedded (`backupmx run`) and on the AWS
//! emulator with `retry-fn poll`.

use std::process::Command;
use std::time::Duration;

use backupmx_tests::sink::Sink;
use backupmx_tests::*;

const WAIT: Duration = Duration::from_secs(30);

fn send(s: &Server, n: usize) {
    let mut c = s.client();
    let reply = c.send_message(
        "alice@remote.test",
        &["bob@example.test"],
        &format!("Subject: message {n}\r\n\r\nbody {n}\r\n"),
    );
    assert!(reply.starts_with("250"), "{reply}");
}

fn poll(s: &Server) -> String {
    let out = Command::new(retry_fn_bin())
        .arg("--config")
        .arg(&s.config_path)
        .args(["poll", "--exit-when-idle", "3s"])
        .output()
        .expect("run retry-fn poll");
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "poll: {log}");
    log
}

#[test]
fn held_mail_is_not_attempted_does_not_expire_and_goes_out_at_once_on_release() {
    let sink = Sink::start(0);
    let s = Server::start_run(
        "",
        "queue_lifetime = \"3s\"\n[delivery]\nretry_initial = \"1s\"\n",
        &format!("[\"{}\"]", sink.addr),
    );
    let held = succeeded(&s.cli(&["domain", "set", "example.test", "--hold"]));
    assert!(held.contains("held (operator)"), "{held}");
    send(&s, 1);
    send(&s, 2);
    // Past the domain's 3 s lifetime, with the primary up all along.
    std::thread::sleep(Duration::from_secs(5));
    assert!(sink.received().is_empty(), "held mail was sent");
    let queued = s.queue();
    assert_eq!(queued.len(), 2);
    assert!(queued.iter().all(|e| e["attempts"] == 0), "{queued:?}");
    assert!(!s.log().contains("bounce_queued"), "{}", s.log());
    let shown = succeeded(&s.cli(&["domain", "show", "example.test"]));
    assert!(shown.contains("hold: yes (operator) since "), "{shown}");
    assert!(shown.contains("queue_lifetime: 3s"), "{shown}");
    assert!(shown.contains("queued: 2"), "{shown}");

    let released = succeeded(&s.cli(&["domain", "set", "example.test", "--release"]));
    assert!(
        released.contains("2 queued message(s) released"),
        "{released}"
    );
    // Delivered on their first attempt, expired or not: no DSN.
    sink.wait_for(2, WAIT);
    eventually(WAIT, "an empty queue", || {
        s.queue().is_empty().then_some(())
    });
    assert!(!s.log().contains("bounce_queued"), "{}", s.log());
}

#[test]
fn a_hold_from_the_cli_survives_a_restart_with_a_config_that_does_not_mention_it() {
    let sink = Sink::start(0);
    let mut s = Server::start_run("", "", &format!("[\"{}\"]", sink.addr));
    succeeded(&s.cli(&["domain", "set", "example.test", "--hold"]));
    s.restart();
    send(&s, 1);
    std::thread::sleep(Duration::from_secs(2));
    assert!(sink.received().is_empty(), "held mail was sent");
    succeeded(&s.cli(&["domain", "set", "example.test", "--release"]));
    sink.wait_for(1, WAIT);
}

#[test]
fn a_new_primary_applies_to_mail_already_queued() {
    let dead = format!("127.0.0.1:{}", free_port());
    let s = Server::start_run(
        "",
        "[delivery]\nretry_initial = \"1h\"\nretry_max = \"2h\"\nprobe_interval = \"1h\"\n",
        &format!("[\"{dead}\"]"),
    );
    send(&s, 1);
    eventually(WAIT, "a failed attempt", || {
        s.queue()
            .first()
            .filter(|e| e["attempts"].as_u64() > Some(0))
            .cloned()
    });
    // The next attempt is an hour away; a new primary does not wait for it.
    let sink = Sink::start(0);
    let out = succeeded(&s.cli(&[
        "domain",
        "set",
        "example.test",
        "--primary",
        &sink.addr.to_string(),
    ]));
    assert!(out.contains("released for delivery"), "{out}");
    let got = sink.wait_for(1, WAIT);
    assert_eq!(got[0].rcpts, ["bob@example.test"]);
}

#[test]
fn bad_settings_are_refused_with_one_line() {
    let s = Server::start("", "");
    for (args, needle) in [
        (&["--queue-lifetime", "61d"][..], "at most 60d"),
        (&["--primary", "mx:0"][..], "mx:0"),
        (&["--hold", "--release"][..], "cannot be used with"),
    ] {
        let mut cmd = vec!["domain", "set", "example.test"];
        cmd.extend_from_slice(args);
        let out = s.cli(&cmd);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let out = s.cli(&["domain", "set", "nothosted.test", "--hold"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such domain"));
}

#[test]
fn hold_release_and_a_new_primary_on_aws() {
    let sink = Sink::start(0);
    let Some(s) = Server::start_aws(
        "",
        "queue_lifetime = \"3s\"\n[delivery]\nretry_initial = \"1s\"\n",
        &format!("[\"{}\"]", sink.addr),
        false,
    ) else {
        return;
    };
    succeeded(&s.cli(&["domain", "set", "example.test", "--hold"]));
    send(&s, 1);
    send(&s, 2);
    std::thread::sleep(Duration::from_secs(4));
    let log = poll(&s);
    assert!(log.contains("delivery_held"), "{log}");
    assert!(sink.received().is_empty(), "held mail was sent");
    let queued = s.queue();
    assert_eq!(queued.len(), 2, "{queued:?}");
    assert!(queued.iter().all(|e| e["attempts"] == 0), "{queued:?}");
    succeeded(&s.cli(&["domain", "set", "example.test", "--release"]));
    poll(&s);
    assert_eq!(sink.received().len(), 2);
    assert!(s.queue().is_empty());

    // A new primary for mail queued while the old one was dead.
    let dead = format!("127.0.0.1:{}", free_port());
    succeeded(&s.cli(&[
        "domain",
        "set",
        "example.test",
        "--primary",
        &dead,
        "--queue-lifetime",
        "5d",
    ]));
    send(&s, 3);
    poll(&s);
    assert_eq!(s.queue().len(), 1, "still queued for the dead primary");
    let other = Sink::start(0);
    succeeded(&s.cli(&[
        "domain",
        "set",
        "example.test",
        "--primary",
        &other.addr.to_string(),
    ]));
    poll(&s);
    assert_eq!(other.received().len(), 1);
    assert!(s.queue().is_empty());
}

/// A primary that came back broken: every recipient refused, postmaster
/// included.
fn refuse_everyone(sink: &Sink) {
    sink.set(|b| b.only_users = Some(Vec::new()));
}

/// The primary fixed: everyone accepted.
fn accept_everyone(sink: &Sink) {
    sink.set(|b| b.only_users = None);
}

fn send_to(s: &Server, i: usize) {
    let mut c = s.client();
    let reply = c.send_message(
        "alice@remote.test",
        &[&format!("user{i}@example.test")],
        &format!("Subject: message {i}\r\n\r\nbody {i}\r\n"),
    );
    assert!(reply.starts_with("250"), "{reply}");
}

#[test]
fn a_primary_refusing_everyone_after_an_outage_is_held_not_bounced() {
    let hook = HookReceiver::start();
    let sink = Sink::start(0);
    let primary = TcpProxy::start(sink.addr);
    primary.set_down(true);
    let s = Server::start_run(
        "",
        &format!(
            "[delivery]\nretry_initial = \"1s\"\nretry_max = \"2s\"\nprobe_interval = \"1s\"\n[alerts]\nwebhook = \"{}\"\n",
            hook.url()
        ),
        &format!("[\"{}\"]", primary.addr),
    );
    for i in 0..12 {
        send_to(&s, i);
    }
    eventually(WAIT, "a primary_down alert", || {
        (hook.count("primary_down") > 0).then_some(())
    });
    // The primary comes back misconfigured: 550 to everyone.
    refuse_everyone(&sink);
    primary.set_down(false);
    eventually(WAIT, "the domain held by the guard", || {
        let shown =
            String::from_utf8_lossy(&s.cli(&["domain", "show", "example.test"]).stdout).to_string();
        shown.contains("hold: yes (bounce_storm)").then_some(())
    });
    eventually(WAIT, "a domain_held alert", || {
        (hook.count("domain_held") > 0).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(s.queue().len(), 12, "every message still queued");
    assert!(!s.log().contains("bounce_queued"), "{}", s.log());
    let held: Vec<_> = hook
        .alerts()
        .into_iter()
        .filter(|a| a["event"] == "domain_held")
        .collect();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0]["reason"], "bounce_storm");
    assert_eq!(held[0]["domain"], "example.test");
    // One storm, one event (concurrent batches used to log one each).
    let log = s.log();
    assert_eq!(log.matches("event=\"bounce_storm\"").count(), 1, "{log}");
    assert_eq!(hook.count("primary_down"), 1, "{:?}", hook.alerts());
    assert_eq!(hook.count("primary_up"), 1, "{:?}", hook.alerts());
    let down = hook
        .alerts()
        .into_iter()
        .find(|a| a["event"] == "primary_down")
        .unwrap();
    assert!(down["queued"].as_u64() >= Some(1), "{down}");

    // The operator fixes the primary and releases: everything delivered.
    accept_everyone(&sink);
    succeeded(&s.cli(&["domain", "set", "example.test", "--release"]));
    sink.wait_for(12, WAIT);
    eventually(WAIT, "an empty queue", || {
        s.queue().is_empty().then_some(())
    });
    eventually(WAIT, "a domain_released alert", || {
        (hook.count("domain_released") == 1).then_some(())
    });
    assert!(!s.log().contains("bounce_queued"), "{}", s.log());
}

/// A server whose primary is down (a proxy in front of a sink) with twelve
/// messages queued and attempted once; `delivery` adds `[delivery]` keys.
fn twelve_queued_while_down(delivery: &str) -> (Server, Sink, TcpProxy) {
    let sink = Sink::start(0);
    let primary = TcpProxy::start(sink.addr);
    primary.set_down(true);
    let s = Server::start_run(
        "",
        &format!(
            "[delivery]\nretry_initial = \"1s\"\nretry_max = \"2s\"\nprobe_interval = \"1s\"\n{delivery}"
        ),
        &format!("[\"{}\"]", primary.addr),
    );
    for i in 0..12 {
        send_to(&s, i);
    }
    eventually(WAIT, "a failed attempt", || {
        s.queue()
            .first()
            .filter(|e| e["attempts"].as_u64() > Some(0))
            .cloned()
    });
    (s, sink, primary)
}

#[test]
fn a_few_unknown_users_in_a_drain_bounce_at_once_from_a_healthy_primary() {
    // The default drain window (10 minutes): a primary that takes the
    // other recipients is healthy, and its refusal is final at once.
    let (s, sink, primary) = twelve_queued_while_down("");
    sink.set(|b| {
        b.rcpt_replies = vec![(
            "user3@example.test".into(),
            "550 5.1.1 <user3@example.test>: User unknown".into(),
        )]
    });
    primary.set_down(false);
    sink.wait_for(11, WAIT);
    eventually(WAIT, "the one refusal bounced", || {
        s.log().contains("bounce_queued").then_some(())
    });
    let shown = succeeded(&s.cli(&["domain", "show", "example.test"]));
    assert!(shown.contains("hold: no"), "{shown}");
}

#[test]
fn a_healthy_primary_refusing_the_outages_spam_is_not_held() {
    // 300 spam messages to made-up users and 5 real ones queued during the
    // outage; the primary comes back healthy: it knows postmaster and the
    // real users, and refuses the rest.
    let (s, sink, primary) = twelve_queued_while_down("");
    let real: Vec<String> = (0..12).map(|i| format!("user{i}@example.test")).collect();
    for i in 0..300 {
        let mut c = s.client();
        let reply = c.send_message(
            "spammer@remote.test",
            &[&format!("random{i}@example.test")],
            "Subject: buy now\r\n\r\nspam\r\n",
        );
        assert!(reply.starts_with("250"), "{reply}");
    }
    sink.set(|b| {
        let mut users = real.clone();
        users.push("postmaster@example.test".into());
        b.only_users = Some(users);
    });
    primary.set_down(false);
    // The real mail goes out (a liveness bound, far above what it takes).
    let got = sink.wait_for(12, Duration::from_secs(60));
    assert!(
        got.iter().all(|m| m.rcpts[0].starts_with("user")),
        "{got:?}"
    );
    // Every spam refusal is final: one DSN each (RFC 5321 §6.1), to the
    // sender; the domain is never held.
    eventually(
        Duration::from_secs(60),
        "a DSN for each refused spam",
        || (s.log().matches("bounce_queued").count() >= 300).then_some(()),
    );
    let shown = succeeded(&s.cli(&["domain", "show", "example.test"]));
    assert!(shown.contains("hold: no"), "{shown}");
    let log = s.log();
    assert!(!log.contains("event=\"bounce_storm\""), "{log}");
    // A refusal held back means the guard did not know the primary healthy
    // yet: then it asked. (When the drain's first attempt also delivered
    // to the real users, it knew at once, and nothing was held back.)
    assert!(
        !log.contains("held back: the primary answered again") || log.contains("storm_guard_asked"),
        "{log}"
    );
}

#[test]
fn a_refusal_of_mail_accepted_after_the_outage_bounces_at_once() {
    // The default drain window (10 minutes): the fresh message's refusal
    // must not wait for it.
    let (s, sink, primary) = twelve_queued_while_down("");
    primary.set_down(false);
    sink.wait_for(12, WAIT);
    // Accepted after the primary answered again (a second later, so its
    // arrival is after the drain's start even at one-second resolution).
    std::thread::sleep(Duration::from_millis(1100));
    sink.set(|b| {
        b.rcpt_replies = vec![(
            "user50@example.test".into(),
            "550 5.1.1 <user50@example.test>: User unknown".into(),
        )]
    });
    send_to(&s, 50);
    eventually(WAIT, "the fresh refusal bounced during the drain", || {
        s.log().contains("bounce_queued").then_some(())
    });
    assert!(!s.log().contains("held back"), "{}", s.log());
}

#[test]
fn bounce_storm_and_alerts_on_aws() {
    let hook = HookReceiver::start();
    let sink = Sink::start(0);
    let primary = TcpProxy::start(sink.addr);
    primary.set_down(true);
    let Some(s) = Server::start_aws(
        "",
        &format!(
            // Backoff grows (1 s, 2 s, 4 s …) so a poller finds itself idle.
            "[delivery]\nretry_initial = \"1s\"\nprobe_interval = \"1s\"\n[alerts]\nwebhook = \"{}\"\n",
            hook.url()
        ),
        &format!("[\"{}\"]", primary.addr),
        false,
    ) else {
        return;
    };
    for i in 0..12 {
        send_to(&s, i);
    }
    poll(&s);
    assert_eq!(hook.count("primary_down"), 1, "{:?}", hook.alerts());
    refuse_everyone(&sink);
    primary.set_down(false);
    let polled = poll(&s);
    let shown = succeeded(&s.cli(&["domain", "show", "example.test"]));
    assert!(shown.contains("hold: yes (bounce_storm)"), "{shown}");
    assert_eq!(s.queue().len(), 12, "every message still queued: {polled}");
    assert_eq!(hook.count("domain_held"), 1, "{:?}", hook.alerts());
    assert_eq!(hook.count("primary_up"), 1, "{:?}", hook.alerts());
    accept_everyone(&sink);
    succeeded(&s.cli(&["domain", "set", "example.test", "--release"]));
    poll(&s);
    assert_eq!(sink.received().len(), 12);
    assert!(s.queue().is_empty());
    assert_eq!(hook.count("domain_released"), 1, "{:?}", hook.alerts());
}

#[test]
fn queue_age_and_expiry_alerts_fire_once() {
    let hook = HookReceiver::start();
    let dead = format!("127.0.0.1:{}", free_port());
    let s = Server::start_run(
        "",
        &format!(
            "queue_lifetime = \"4s\"\n[delivery]\nretry_initial = \"1s\"\nretry_max = \"1s\"\nprobe_interval = \"1s\"\n[alerts]\nwebhook = \"{}\"\nqueue_age = \"2s\"\n",
            hook.url()
        ),
        &format!("[\"{dead}\"]"),
    );
    // Null senders: an expired message leaves no DSN behind to age again.
    for n in 1..=2 {
        let mut c = s.client();
        let reply = c.send_message(
            "",
            &["bob@example.test"],
            &format!("Subject: {n}\r\n\r\nx\r\n"),
        );
        assert!(reply.starts_with("250"), "{reply}");
    }
    eventually(WAIT, "a queue_age alert", || {
        (hook.count("queue_age") > 0).then_some(())
    });
    eventually(WAIT, "an expired alert", || {
        (hook.count("expired") > 0).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    // Two messages expired, both aged: one alert of each kind.
    assert_eq!(hook.count("expired"), 1, "{:?}", hook.alerts());
    assert_eq!(hook.count("queue_age"), 1, "{:?}", hook.alerts());
    assert_eq!(hook.count("primary_down"), 1, "{:?}", hook.alerts());
    let aged = hook
        .alerts()
        .into_iter()
        .find(|a| a["event"] == "queue_age")
        .unwrap();
    assert!(aged["age_secs"].as_u64() > Some(2), "{aged}");
}

/// Twelve messages queued while the primary was down; it comes back
/// refusing everyone and the guard holds the domain; three more arrive
/// while it is held. Returns how many recipients' refusals were held back
/// (those attempted before the hold).
fn held_by_the_guard() -> (Server, Sink, TcpProxy, usize) {
    let (s, sink, primary) = twelve_queued_while_down("");
    refuse_everyone(&sink);
    primary.set_down(false);
    eventually(WAIT, "the domain held by the guard", || {
        let shown = succeeded(&s.cli(&["domain", "show", "example.test"]));
        shown.contains("hold: yes (bounce_storm)").then_some(())
    });
    let marked = s
        .queue()
        .iter()
        .filter(|e| e["recipient_status"][0]["held_refusal"] == "held")
        .count();
    assert!(marked >= 1, "{:#?}", s.queue());
    // Mail that arrives while held is never attempted: nothing held back.
    for i in 20..23 {
        send_to(&s, i);
    }
    (s, sink, primary, marked)
}

#[test]
fn a_release_with_discard_refused_drops_the_held_back_refusals_and_delivers_the_rest() {
    let (s, sink, _primary, marked) = held_by_the_guard();
    accept_everyone(&sink);
    let out = succeeded(&s.cli(&[
        "domain",
        "set",
        "example.test",
        "--release",
        "--discard-refused",
    ]));
    assert!(
        out.contains(&format!("{marked} held-back refusal(s) discarded")),
        "{out}"
    );
    sink.wait_for(15 - marked, WAIT);
    eventually(WAIT, "an empty queue", || {
        s.queue().is_empty().then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(sink.received().len(), 15 - marked);
    let log = s.log();
    assert!(!log.contains("bounce_queued"), "{log}");
}

#[test]
fn queue_delete_refused_only_removes_just_the_held_back_refusals() {
    let (s, sink, _primary, marked) = held_by_the_guard();
    let out = succeeded(&s.cli(&[
        "queue",
        "delete",
        "--domain",
        "example.test",
        "--refused-only",
    ]));
    assert!(
        out.contains(&format!("deleted {marked} message(s)")),
        "{out}"
    );
    assert_eq!(s.queue().len(), 15 - marked);
    // A release (no refusal left to make final) gets the rest out.
    accept_everyone(&sink);
    succeeded(&s.cli(&["domain", "set", "example.test", "--release"]));
    sink.wait_for(15 - marked, WAIT);
    eventually(WAIT, "an empty queue", || {
        s.queue().is_empty().then_some(())
    });
    // Without --domain or an id: one line, non-zero exit.
    let out = s.cli(&["queue", "delete"]);
    assert!(!out.status.success());
}
