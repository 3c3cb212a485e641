//! `backupmx doctor DOMAIN`: for each check, a correct set-up (every
//! check ok, exit 0) and broken ones, asserting the verdict and the fix.
//! Real DNS (hickory on loopback: MX, A, TXT, TLSA), a real primary
//! (`backupmx ingest`, with or without STARTTLS), an HTTPS server for the
//! MTA-STS policy, certificates from a test CA.

use backupmx_tests::dns::{DnsServer, Rec};
use backupmx_tests::https::PolicyServer;
use backupmx_tests::pki::Pki;
use backupmx_tests::*;
use serde_json::Value;

/// One set-up of example.test; [`Setup::good`] is right in every respect.
#[derive(Clone)]
struct Setup {
    /// example.test is in the store.
    hosted: bool,
    mx: Vec<(u16, &'static str)>,
    primary_up: bool,
    /// The primary offers STARTTLS with a CA certificate for its name.
    primary_tls: bool,
    /// The primary's `[smtp] max_message_size`.
    primary_size: Option<u64>,
    /// `domain set --tls`.
    domain_tls: &'static str,
    /// MTA-STS mode and mx lines, if the domain has a policy.
    policy: Option<(&'static str, &'static [&'static str])>,
    /// TLSA at the primary's MX host, at ours.
    tlsa: (bool, bool),
    spf: Option<&'static str>,
    /// Our `[tls]` certificate: names, and whether the CA signed it.
    our_cert: Option<(&'static [&'static str], bool)>,
}

impl Setup {
    fn good() -> Setup {
        Setup {
            hosted: true,
            mx: vec![(10, "mx.example.test"), (20, "mx2.test")],
            primary_up: true,
            primary_tls: true,
            primary_size: None,
            domain_tls: "opportunistic",
            policy: Some(("enforce", &["mx.example.test", "mx2.test"])),
            tlsa: (true, true),
            spf: Some("v=spf1 mx ~all"),
            our_cert: Some((&["mx2.test"], true)),
        }
    }

    /// Runs `backupmx doctor example.test --json`: the report and whether
    /// it exited 0. Also checks the text form's exit status agrees.
    fn run(&self) -> (Value, bool) {
        let pki = Pki::new();
        let mut primary_cfg = String::new();
        if let Some(n) = self.primary_size {
            primary_cfg.push_str(&format!("max_message_size = {n}\n"));
        }
        let primary_tls = if self.primary_tls {
            pki.tls_section("primary", &["mx.example.test"], true)
        } else {
            String::new()
        };
        let primary = self
            .primary_up
            .then(|| Server::start(&primary_cfg, &primary_tls));
        let mx_port = primary.as_ref().map_or_else(free_port, |p| p.addr.port());
        let (cert, key) = pki.issue(&["mta-sts.example.test"], true);
        let policy = self.policy.map(|(mode, mx)| {
            let lines: String = mx.iter().map(|m| format!("mx: {m}\n")).collect();
            PolicyServer::start(
                &cert,
                &key,
                &format!("version: STSv1\nmode: {mode}\n{lines}max_age: 86400\n"),
            )
        });
        let mut records: Vec<(&str, Rec)> = vec![
            ("mx.example.test", Rec::A("127.0.0.1")),
            ("mta-sts.example.test", Rec::A("127.0.0.1")),
        ];
        for (pref, host) in &self.mx {
            records.push(("example.test", Rec::Mx(*pref, host)));
        }
        if self.mx.is_empty() {
            records.push(("www.example.test", Rec::A("127.0.0.1")));
        }
        if policy.is_some() {
            records.push((
                "_mta-sts.example.test",
                Rec::Txt("v=STSv1; id=20261130;".into()),
            ));
        }
        if self.tlsa.0 {
            records.push((
                "_25._tcp.mx.example.test",
                Rec::Tlsa(3, 1, 1, vec![0xab; 32]),
            ));
        }
        if self.tlsa.1 {
            records.push(("_25._tcp.mx2.test", Rec::Tlsa(3, 1, 1, vec![0xcd; 32])));
        }
        if let Some(spf) = self.spf {
            records.push(("example.test", Rec::Txt(spf.into())));
        }
        let dns = DnsServer::start(&records);
        let our_tls = match self.our_cert {
            Some((names, signed)) => pki.tls_section("ours", names, signed),
            None => String::new(),
        };
        let s = Server::prepare_run(
            "",
            &format!(
                "[delivery]\nmx_port = {mx_port}\nmta_sts_port = {}\ntls_ca_file = \"{}\"\n{}\n{our_tls}",
                policy.as_ref().map_or(443, |p| p.addr.port()),
                pki.ca_file().display(),
                dns.toml(),
            ),
            "",
        );
        let added = if self.hosted {
            s.cli(&["domain", "add", "example.test"])
        } else {
            s.cli(&["domain", "add", "other.test"])
        };
        assert!(
            added.status.success(),
            "{}",
            String::from_utf8_lossy(&added.stderr)
        );
        if self.hosted && self.domain_tls != "opportunistic" {
            let set = s.cli(&["domain", "set", "example.test", "--tls", self.domain_tls]);
            assert!(set.status.success());
        }
        let out = s.cli(&["doctor", "example.test", "--json"]);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "doctor JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(report["ok"], out.status.success(), "{report}");
        let text = s.cli(&["doctor", "example.test"]);
        assert_eq!(text.status.success(), out.status.success());
        let stdout = String::from_utf8_lossy(&text.stdout);
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&text.stderr);
            assert!(stderr.contains("check(s) failed"), "{stderr}");
            assert!(stdout.contains("fix: "), "{stdout}");
        }
        (report, out.status.success())
    }
}

fn verdict<'a>(report: &'a Value, check: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["check"] == check))
        .unwrap_or_else(|| panic!("no {check} check in {report:#}"))
}

/// The set-up's `check` has `status`, and its fix mentions `fix`.
fn expect(setup: Setup, check: &str, status: &str, fix: &str) {
    let (report, passed) = setup.run();
    let c = verdict(&report, check);
    assert_eq!(c["status"], status, "{check}: {c:#}\n{report:#}");
    let text = c["fix"].as_str().unwrap_or_default();
    assert!(text.contains(fix), "{check}: fix {text:?} lacks {fix:?}");
    if status == "fail" {
        assert!(!passed);
    }
}

#[test]
fn a_correct_set_up_passes_every_check() {
    let (report, passed) = Setup::good().run();
    assert!(passed, "{report:#}");
    for c in report["checks"].as_array().expect("checks") {
        assert_eq!(c["status"], "ok", "{c:#}");
        assert!(c.get("fix").is_none(), "{c:#}");
    }
    let names: Vec<&str> = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter_map(|c| c["check"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "hosted",
            "mx",
            "mx_lists_backup",
            "mx_preference",
            "route",
            "primary_smtp",
            "primary_size",
            "primary_tls",
            "mta_sts",
            "dane",
            "spf",
            "certificate"
        ]
    );
}

#[test]
fn hosted() {
    let mut s = Setup::good();
    s.hosted = false;
    expect(s, "hosted", "fail", "backupmx domain add example.test");
}

#[test]
fn mx_records() {
    let mut s = Setup::good();
    s.mx = vec![];
    expect(s, "mx", "fail", "example.test. MX 20 mx2.test.");
}

#[test]
fn mx_lists_the_backup() {
    let mut s = Setup::good();
    s.mx = vec![(10, "mx.example.test")];
    expect(
        s,
        "mx_lists_backup",
        "fail",
        "add example.test. MX 20 mx2.test.",
    );
}

#[test]
fn mx_preference() {
    let mut s = Setup::good();
    s.mx = vec![(20, "mx.example.test"), (10, "mx2.test")];
    expect(s, "mx_preference", "fail", "MX 30 mx2.test.");
    let mut s = Setup::good();
    s.mx = vec![(10, "mx.example.test"), (10, "mx2.test")];
    expect(s, "mx_preference", "warn", "MX 20 mx2.test.");
}

#[test]
fn route_does_not_loop_back_to_us() {
    let mut s = Setup::good();
    s.mx = vec![(10, "mx2.test")];
    expect(
        s,
        "route",
        "fail",
        "backupmx domain set example.test --primary HOST",
    );
}

#[test]
fn primary_answers_smtp() {
    let mut s = Setup::good();
    s.primary_up = false;
    expect(
        s,
        "primary_smtp",
        "fail",
        "make the primary reachable from mx2.test",
    );
}

#[test]
fn primary_size() {
    let mut s = Setup::good();
    s.primary_size = Some(100_000);
    expect(
        s,
        "primary_size",
        "fail",
        "backupmx domain set example.test --max-size 100000",
    );
}

#[test]
fn primary_tls() {
    let mut s = Setup::good();
    s.primary_tls = false;
    s.domain_tls = "required";
    expect(s, "primary_tls", "fail", "--tls opportunistic");
    let mut s = Setup::good();
    s.primary_tls = false;
    expect(s, "primary_tls", "warn", "enable STARTTLS on the primary");
}

#[test]
fn mta_sts_lists_the_backup() {
    let mut s = Setup::good();
    s.policy = Some(("enforce", &["mx.example.test"]));
    expect(s, "mta_sts", "fail", "add \"mx: mx2.test\"");
    let mut s = Setup::good();
    s.policy = Some(("testing", &["mx.example.test"]));
    expect(s, "mta_sts", "warn", "add \"mx: mx2.test\"");
}

#[test]
fn dane() {
    let mut s = Setup::good();
    s.tlsa = (true, false);
    expect(s, "dane", "warn", "_25._tcp.mx2.test");
}

#[test]
fn spf() {
    let mut s = Setup::good();
    s.spf = Some("v=spf1 ip4:192.0.2.1 -all");
    expect(
        s,
        "spf",
        "warn",
        "exempt the backup's address from SPF checks",
    );
}

#[test]
fn our_certificate() {
    let mut s = Setup::good();
    s.our_cert = Some((&["other.test"], true));
    expect(s, "certificate", "fail", "get a certificate for mx2.test");
    let mut s = Setup::good();
    s.our_cert = Some((&["mx2.test"], false));
    expect(s, "certificate", "warn", "from a public CA");
    let mut s = Setup::good();
    s.our_cert = None;
    expect(s, "certificate", "warn", "set [tls] cert and key");
}

#[test]
fn doctor_reads_the_domain_record_of_the_aws_store() {
    let dns = DnsServer::start(&[
        ("example.test", Rec::Mx(10, "mx.example.test")),
        ("example.test", Rec::Mx(20, "mx2.test")),
        ("mx.example.test", Rec::A("127.0.0.1")),
    ]);
    let Some(s) = Server::start_aws("", &dns.toml(), "[\"127.0.0.1:9\"]", false) else {
        eprintln!("skipped: no AWS emulator");
        return;
    };
    let set = s.cli(&["domain", "set", "example.test", "--max-size", "1000"]);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let out = s.cli(&["doctor", "example.test", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).expect("doctor JSON");
    assert!(!out.status.success(), "the primary is down: {report:#}");
    let hosted = verdict(&report, "hosted");
    assert_eq!(hosted["status"], "ok", "{hosted:#}");
    assert!(hosted["detail"]
        .as_str()
        .is_some_and(|d| d.contains("127.0.0.1:9")));
    assert_eq!(verdict(&report, "mx_preference")["status"], "ok");
    assert_eq!(verdict(&report, "primary_smtp")["status"], "fail");
    let unknown = s.cli(&["doctor", "nothere.test", "--json"]);
    let report: Value = serde_json::from_slice(&unknown.stdout).expect("doctor JSON");
    assert_eq!(verdict(&report, "hosted")["status"], "fail");
}
