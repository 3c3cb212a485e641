//! The admin listener: every API endpoint over HTTP against a real
//! `backupmx run` (and `backupmx admin` alone on the AWS emulator), its
//! answers compared with the CLI's; the status page in headless Chromium.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use backupmx_tests::browser::Browser;
use backupmx_tests::http::{request, request_from, HttpResponse};
use backupmx_tests::sink::Sink;
use backupmx_tests::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "s3cret-admin-token-0123";
/// Nothing is retried or probed on its own: only the operator's actions
/// (release, flush) send queued mail.
const NO_RETRY: &str =
    "[delivery]\nprobe_interval = \"1h\"\nretry_initial = \"1h\"\nretry_max = \"2h\"\n";

fn cli_json(s: &Server, args: &[&str]) -> Value {
    serde_json::from_str(&succeeded(&s.cli(args))).expect("CLI JSON")
}

/// An admin section on a free port; the token when given.
fn admin_section(token: Option<&str>) -> (SocketAddr, String) {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let token = token.map_or(String::new(), |t| format!("token = \"{t}\"\n"));
    (addr, format!("[admin]\nlisten = \"{addr}\"\n{token}"))
}

struct Api {
    addr: SocketAddr,
    token: Option<String>,
}

impl Api {
    fn call(&self, method: &str, path: &str, body: &str) -> HttpResponse {
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = vec![];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        if !body.is_empty() {
            headers.push(("Content-Type", "application/json"));
        }
        request(self.addr, method, path, &headers, body.as_bytes())
    }

    fn get(&self, path: &str) -> HttpResponse {
        self.call("GET", path, "")
    }

    /// A JSON answer with status 200.
    fn json(&self, method: &str, path: &str, body: &str) -> Value {
        let r = self.call(method, path, body);
        assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        r.json()
    }

    /// An error answer: its status and a JSON `error` text.
    fn error(&self, method: &str, path: &str, body: &str, status: u16) -> String {
        let r = self.call(method, path, body);
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
        let v = r.json();
        v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error text: {v}"))
            .to_string()
    }
}

fn send(s: &Server, to: &str, n: usize) -> String {
    let mut c = s.client();
    let reply = c.send_message(
        "alice@remote.test",
        &[to],
        &format!("Subject: message {n}\r\n\r\nbody {n}\r\n"),
    );
    assert!(reply.starts_with("250"), "{reply}");
    queue_id(&reply)
}

/// The API's answer equals the CLI's, once neither is mid-change.
fn same_as_cli(api: &Api, path: &str, s: &Server, args: &[&str]) -> Value {
    eventually(
        WAIT,
        &format!("{path} equal to `{}`", args.join(" ")),
        || {
            let from_api = api.json("GET", path, "");
            (from_api == cli_json(s, args)).then_some(from_api)
        },
    )
}

#[test]
fn api_serves_every_endpoint_with_the_cli_shapes_and_clear_errors() {
    let sink = Sink::start(0);
    let primary = TcpProxy::start(sink.addr);
    primary.set_down(true);
    let (addr, section) = admin_section(Some(TOKEN));
    let s = Server::start_run(
        "",
        &format!("{section}\n{NO_RETRY}"),
        &format!("[\"{}\"]", primary.addr),
    );
    let api = Api {
        addr,
        token: Some(TOKEN.into()),
    };

    // Without the token, or with a wrong one: 401 everywhere.
    let anonymous = Api { addr, token: None };
    for path in ["/api/status", "/api/domains", "/api/queue", "/metrics"] {
        let r = anonymous.get(path);
        assert_eq!(r.status, 401, "{path}: {}", r.text());
        assert!(r
            .header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer")));
    }
    let page = anonymous.get("/");
    assert_eq!(page.status, 401);
    assert!(page.text().contains("name=\"token\""), "{}", page.text());
    let wrong = Api {
        addr,
        token: Some("s3cret-admin-token-0124".into()),
    };
    wrong.error("GET", "/api/domains", "", 401);
    wrong.error("POST", "/api/queue/flush", "", 401);

    let ids: Vec<String> = (0..3).map(|n| send(&s, "bob@example.test", n)).collect();
    eventually(WAIT, "the primary recorded down", || {
        let v = cli_json(&s, &["domain", "show", "example.test", "--json"]);
        (v["primary_state"]["up"] == false).then_some(())
    });

    // The same JSON as the CLI's --json.
    same_as_cli(&api, "/api/domains", &s, &["domain", "list", "--json"]);
    let shown = same_as_cli(
        &api,
        "/api/domains/example.test",
        &s,
        &["domain", "show", "example.test", "--json"],
    );
    assert_eq!(shown["queued"], 3);
    assert_eq!(shown["primary_state"]["up"], false, "{shown}");
    let listed = same_as_cli(&api, "/api/queue", &s, &["queue", "list", "--json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(3));
    same_as_cli(
        &api,
        "/api/queue?domain=example.test",
        &s,
        &["queue", "list", "--domain", "example.test", "--json"],
    );
    same_as_cli(
        &api,
        &format!("/api/queue/{}", ids[0]),
        &s,
        &["queue", "show", &ids[0]],
    );
    same_as_cli(
        &api,
        "/api/domains/example.test/recipients",
        &s,
        &["recipients", "list", "example.test", "--json"],
    );
    let searched = api.json("GET", &format!("/api/queue?q={}", &ids[1][4..]), "");
    assert_eq!(searched.as_array().map(Vec::len), Some(1), "{searched}");

    // The page's numbers, as JSON.
    let status = api.json("GET", "/api/status", "");
    assert_eq!(status["queued"], 3);
    let d = &status["domains"][0];
    assert_eq!(d["name"], "example.test");
    assert_eq!(d["queued"], 3);
    assert_eq!(d["primary_state"]["up"], false);
    assert!(
        d["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{d}"
    );
    assert!(d["oldest_age_seconds"].is_u64(), "{d}");

    // Bad input: 400 with a JSON error; unknown things: 404.
    assert!(api
        .error("GET", "/api/queue/not-an-id", "", 400)
        .contains("queue id"));
    let mut unknown = ids[0].clone();
    let last = if unknown.ends_with('0') { "1" } else { "0" };
    unknown.replace_range(unknown.len() - 1.., last);
    assert!(api
        .error("GET", &format!("/api/queue/{unknown}"), "", 404)
        .contains("no such message"));
    api.error("DELETE", &format!("/api/queue/{unknown}"), "", 404);
    assert!(api
        .error("GET", "/api/domains/unknown.test", "", 404)
        .contains("no such domain"));
    api.error("POST", "/api/domains/unknown.test/hold", "", 404);
    api.error("POST", "/api/queue/flush?domain=unknown.test", "", 404);
    assert!(api
        .error("GET", "/api/domains/bad..name", "", 400)
        .contains("invalid domain name"));
    assert!(api
        .error("POST", "/api/domains/example.test", "{\"bogus\": 1}", 400)
        .contains("unknown field"));
    api.error("POST", "/api/domains/example.test", "not json", 400);
    assert!(api
        .error(
            "POST",
            "/api/domains/example.test",
            "{\"queue_lifetime\": \"100d\"}",
            400
        )
        .contains("at most 60d"));
    api.error(
        "POST",
        "/api/domains/example.test",
        "{\"primary\": [\"host:0\"]}",
        400,
    );
    api.error("PUT", "/api/queue", "", 405);
    api.error("GET", "/api/nothing", "", 404);
    // A page elsewhere cannot make the operator's browser change anything.
    let r = request(
        addr,
        "POST",
        "/api/queue/flush",
        &[
            ("Authorization", &format!("Bearer {TOKEN}")),
            ("Origin", "http://evil.example"),
        ],
        b"",
    );
    assert_eq!(r.status, 403, "{}", r.text());

    // Hold, settings, release: the CLI sees what the API did.
    let held = api.json("POST", "/api/domains/example.test/hold", "");
    assert_eq!(held["hold"]["reason"], "operator", "{held}");
    let shown = succeeded(&s.cli(&["domain", "show", "example.test"]));
    assert!(shown.contains("hold: yes (operator)"), "{shown}");
    let set = api.json(
        "POST",
        "/api/domains/example.test",
        "{\"queue_lifetime\": \"20d\", \"greylist\": true}",
    );
    assert_eq!(set["queue_lifetime"], 20 * 86_400, "{set}");
    assert_eq!(set["greylist"], true);
    assert_eq!(set["released"], 0, "a held domain's mail stays put: {set}");
    let set = api.json(
        "POST",
        "/api/domains/example.test",
        "{\"auth\": \"enforce\"}",
    );
    assert_eq!(set["auth"], "enforce", "{set}");
    let shown = succeeded(&s.cli(&["domain", "show", "example.test"]));
    assert!(shown.contains("auth: enforce"), "{shown}");
    let page = api.get("/domain/example.test").text();
    assert!(
        page.contains("enforce (DMARC p=reject failures refused)"),
        "{page}"
    );
    api.error(
        "POST",
        "/api/domains/example.test",
        "{\"auth\": \"sometimes\"}",
        400,
    );
    api.json(
        "POST",
        "/api/domains/example.test",
        "{\"auth\": \"annotate\"}",
    );
    // With recipient verification on, the status counts the callout cache.
    let set = api.json(
        "POST",
        "/api/domains/example.test",
        "{\"recipient_verify\": \"callout\"}",
    );
    assert_eq!(set["recipient_verify"], "callout");
    let status = api.json("GET", "/api/status", "");
    assert_eq!(
        status["domains"][0]["recipient_cache"],
        serde_json::json!({"valid": 0, "invalid": 0}),
        "{status}"
    );
    api.json(
        "POST",
        "/api/domains/example.test",
        "{\"recipient_verify\": \"off\"}",
    );
    // The primary answers again; a release sends the queue at once.
    primary.set_down(false);
    let deleted = api.json("DELETE", &format!("/api/queue/{}", ids[2]), "");
    assert_eq!(deleted["deleted"], ids[2].as_str());
    api.error("DELETE", &format!("/api/queue/{}", ids[2]), "", 404);
    let released = api.json("POST", "/api/domains/example.test/release", "");
    assert_eq!(released["released"], 2, "{released}");
    assert!(released["hold"].is_null());
    sink.wait_for(2, WAIT);
    eventually(WAIT, "an empty queue", || {
        s.queue().is_empty().then_some(())
    });
    assert_eq!(
        api.json("POST", "/api/queue/flush", "")["released"],
        0,
        "nothing left to flush"
    );
    let shown = eventually(WAIT, "the primary recorded up", || {
        let v = api.json("GET", "/api/domains/example.test", "");
        (v["primary_state"]["up"] == true).then_some(v)
    });
    assert_eq!(shown["queued"], 0);

    // Metrics on the admin listener too, behind the token.
    let metrics = api.get("/metrics");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.text().contains("backupmx_delivered_total 2"),
        "{}",
        metrics.text()
    );

    // Sign in from a form: a cookie that works instead of the header.
    let bad = request(addr, "POST", "/login", &[], b"token=nope");
    assert_eq!(bad.status, 401);
    let signed = request(
        addr,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        format!("token={TOKEN}").as_bytes(),
    );
    assert_eq!(signed.status, 303, "{}", signed.text());
    let cookie = signed.header("set-cookie").expect("cookie").to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap_or_default();
    assert!(
        !pair.contains(TOKEN),
        "the browser keeps a session id, not the token: {cookie}"
    );
    assert!(cookie.contains("Max-Age="), "the session expires: {cookie}");
    let page = request(addr, "GET", "/", &[("Cookie", pair)], b"");
    assert_eq!(page.status, 200);
    assert!(page.text().contains("example.test"));
    assert!(page.text().contains("Sign out"));
    assert!(page
        .header("content-security-policy")
        .is_some_and(|c| c.contains("default-src 'none'")));
    // A cookie holding the token itself (the old form) is no way in.
    let forged = format!("backupmx_admin={TOKEN}");
    assert_eq!(
        request(addr, "GET", "/", &[("Cookie", &forged)], b"").status,
        401
    );
    // Sign-out ends the session: the same cookie is refused after it.
    let out = request(addr, "POST", "/logout", &[("Cookie", pair)], b"");
    assert_eq!(out.status, 303, "{}", out.text());
    assert!(out
        .header("set-cookie")
        .is_some_and(|c| c.contains("Max-Age=0")));
    assert_eq!(
        request(addr, "GET", "/", &[("Cookie", pair)], b"").status,
        401
    );
}

#[test]
fn wrong_tokens_are_braked_per_client_and_domain_sizes_are_checked() {
    let (addr, section) = admin_section(Some(TOKEN));
    let s = Server::start_run("", &section, "");
    let guesser: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let wrong = "Bearer not-the-token";
    let statuses: Vec<u16> = (0..7)
        .map(|_| {
            request_from(
                guesser,
                addr,
                "GET",
                "/api/status",
                &[("Authorization", wrong)],
                b"",
            )
            .status
        })
        .collect();
    assert_eq!(statuses[..5], [401; 5], "{statuses:?}");
    assert_eq!(statuses[5..], [429; 2], "{statuses:?}");
    // Braked now even with the right token, and told when to come back.
    let right = format!("Bearer {TOKEN}");
    let r = request_from(
        guesser,
        addr,
        "GET",
        "/api/status",
        &[("Authorization", &right)],
        b"",
    );
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    // Another client is not affected.
    let api = Api {
        addr,
        token: Some(TOKEN.into()),
    };
    assert_eq!(api.json("GET", "/api/status", "")["queued"], 0);
    // Logged once for the address, not once per guess.
    let log = s.log();
    assert_eq!(log.matches("admin_auth_failed").count(), 1, "{log}");

    // A domain cannot be set to refuse all of its mail, nor above the
    // server's own limit.
    for size in ["0", "999999999999"] {
        let r = api.call(
            "POST",
            "/api/domains/example.test",
            &format!("{{\"max_message_size\": {size}}}"),
        );
        assert_eq!(r.status, 400, "{size}: {}", r.text());
        assert!(
            r.text().contains("max_message_size must be between 1"),
            "{}",
            r.text()
        );
    }
    let out = s.cli(&["domain", "add", "sized.test", "--max-size", "0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_message_size must be between 1"), "{err}");
}

#[test]
fn without_a_token_only_loopback_and_loopback_names_are_served() {
    let (addr, section) = admin_section(None);
    let s = Server::start_run("", &section, "");
    let api = Api { addr, token: None };
    assert_eq!(api.json("GET", "/api/status", "")["queued"], 0);
    // A DNS-rebinding page reaches a loopback listener under its own name.
    let r = request(addr, "GET", "/api/status", &[("Host", "evil.example")], b"");
    assert_eq!(r.status, 403, "{}", r.text());
    let r = request(addr, "GET", "/", &[("Host", "localhost:1")], b"");
    assert_eq!(r.status, 200);

    // A listener others can reach needs a token: one line, non-zero exit.
    let text = std::fs::read_to_string(&s.config_path).expect("config");
    let open = text.replace(&format!("listen = \"{addr}\""), "listen = \"0.0.0.0:9326\"");
    let path = s.dir.path().join("open.toml");
    std::fs::write(&path, open).expect("config");
    let out = Command::new(backupmx_bin())
        .arg("--config")
        .arg(&path)
        .args(["queue", "list"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin.token must be set"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

struct Standalone(Child);

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn backupmx_admin_alone_shows_and_steers_the_aws_store() {
    let Some(s) = Server::start_aws("", "greylist = false\n", "[\"127.0.0.1:9\"]", false) else {
        eprintln!("skipped: no AWS emulator");
        return;
    };
    let id = send(&s, "bob@example.test", 1);
    // The page's own configuration: the ingest's plus [admin].
    let (addr, section) = admin_section(Some(TOKEN));
    let text = std::fs::read_to_string(&s.config_path).expect("config");
    let path = s.dir.path().join("admin.toml");
    std::fs::write(&path, format!("{text}\n{section}")).expect("config");
    let log = std::fs::File::create(s.dir.path().join("admin.log")).expect("log");
    let child = Command::new(backupmx_bin())
        .arg("--config")
        .arg(&path)
        .arg("admin")
        .envs(s.env_vars().iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start backupmx admin");
    let _admin = Standalone(child);
    let api = Api {
        addr,
        token: Some(TOKEN.into()),
    };
    let status = eventually(WAIT, "the admin listener", || {
        std::net::TcpStream::connect(addr)
            .ok()
            .map(|_| api.json("GET", "/api/status", ""))
    });
    assert_eq!(status["queued"], 1, "{status}");
    assert_eq!(status["domains"][0]["name"], "example.test");
    let listed = api.json("GET", "/api/queue", "");
    assert_eq!(listed, cli_json(&s, &["queue", "list", "--json"]));
    assert_eq!(listed[0]["id"], id.as_str());
    let held = api.json("POST", "/api/domains/example.test/hold", "");
    assert_eq!(held["hold"]["reason"], "operator");
    let shown = succeeded(&s.cli(&["domain", "show", "example.test"]));
    assert!(shown.contains("hold: yes (operator)"), "{shown}");
    let page = request(
        addr,
        "GET",
        "/domain/example.test",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        b"",
    );
    assert_eq!(page.status, 200);
    assert!(page.text().contains(&id), "{}", page.text());
    assert!(page.text().contains("/domain/example.test/release"));
    api.json("DELETE", &format!("/api/queue/{id}"), "");
    assert!(s.queue().is_empty());
}

/// Where the screenshots go: kept with the test run's output.
fn screenshot_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots")
}

fn number(text: &str) -> u64 {
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {text:?}"))
}

#[test]
fn status_page_in_a_real_browser_matches_the_queue_and_its_buttons_act() {
    let sink = Sink::start(0);
    let primary = TcpProxy::start(sink.addr);
    primary.set_down(true);
    let (addr, section) = admin_section(Some(TOKEN));
    let s = Server::start_run(
        "",
        &format!(
            "{section}\n{NO_RETRY}\
             [[domain]]\nname = \"second.test\"\nprimary = [\"{}\"]\n",
            sink.addr
        ),
        &format!("[\"{}\"]", primary.addr),
    );
    succeeded(&s.cli(&["domain", "set", "second.test", "--hold"]));
    for n in 0..3 {
        send(&s, "bob@example.test", n);
    }
    send(&s, "carol@second.test", 9);
    eventually(WAIT, "example.test's primary recorded down", || {
        let v = cli_json(&s, &["domain", "show", "example.test", "--json"]);
        (v["primary_state"]["up"] == false).then_some(())
    });
    let queue = s.queue();
    let count = |d: &str| queue.iter().filter(|e| e["domain"] == d).count() as u64;
    assert_eq!((count("example.test"), count("second.test")), (3, 1));

    let browser = Browser::start(1280, 800);
    let base = format!("http://{addr}");
    // Sign in with the form.
    browser.goto(&format!("{base}/"));
    let field = browser.find("input[name=token]");
    browser.type_into(&field, TOKEN);
    browser.click(&browser.find("form[action='/login'] button"));
    browser.wait_for("#total-queued");
    assert_eq!(browser.url(), format!("{base}/"));

    // The overview: the numbers are the queue's.
    assert_eq!(
        number(&browser.text_of("#total-queued")),
        queue.len() as u64
    );
    let row = "#domains tr[data-domain='example.test']";
    assert_eq!(
        number(&browser.text_of(&format!("{row} .queued"))),
        count("example.test")
    );
    assert!(browser
        .text_of(&format!("{row} .primary"))
        .starts_with("down"));
    assert!(browser
        .text_of(&format!("{row} td[data-label='Last error']"))
        .contains("127.0.0.1"));
    let second = "#domains tr[data-domain='second.test']";
    assert_eq!(number(&browser.text_of(&format!("{second} .queued"))), 1);
    assert!(browser
        .text_of(&format!("{second} .hold"))
        .contains("operator"));
    browser.screenshot(&screenshot_dir().join("status-overview.png"));
    browser.resize(390, 844);
    browser.screenshot(&screenshot_dir().join("status-overview-phone.png"));
    browser.resize(1280, 800);

    // The domain's page lists its queue; search narrows it.
    browser.click_to(&browser.find(&format!("{row} a")), "/domain/example.test");
    assert_eq!(browser.url(), format!("{base}/domain/example.test"));
    assert_eq!(browser.find_all("#queue tr.message").len(), 3);
    let id = queue
        .iter()
        .find(|e| e["domain"] == "example.test")
        .and_then(|e| e["id"].as_str())
        .expect("an id")
        .to_string();
    let search = browser.find("form.search input[name=q]");
    browser.type_into(&search, &id[6..]);
    browser.click_to(&browser.find("form.search button"), "q=");
    assert_eq!(browser.find_all("#queue tr.message").len(), 1);
    assert!(browser.text_of("#queue tr.message").contains(&id));
    // Delete… → Delete removes that one message.
    browser.click(&browser.find("#queue tr.message details summary"));
    browser.click_to(
        &browser.find(&format!("form[action='/message/{id}/delete'] button")),
        "done=delete",
    );
    assert!(browser.text_of("#flash").contains("deleted"));
    assert_eq!(browser.find_all("#queue tr.message").len(), 2);
    assert!(s.queue().iter().all(|e| e["id"] != id.as_str()));
    browser.screenshot(&screenshot_dir().join("status-domain.png"));

    // The primary is back: Flush… → Flush now releases the queue.
    primary.set_down(false);
    browser.click(&browser.find("details summary"));
    browser.click_to(
        &browser.find("form[action='/domain/example.test/flush'] button"),
        "done=flush",
    );
    assert!(
        browser.text_of("#flash").contains("2 message(s) released"),
        "{}",
        browser.source()
    );
    sink.wait_for(2, WAIT);
    eventually(WAIT, "example.test's queue empty", || {
        s.queue()
            .iter()
            .all(|e| e["domain"] != "example.test")
            .then_some(())
    });

    // The held domain: Release… → Release now sends its mail.
    browser.goto(&format!("{base}/domain/second.test"));
    browser.click(&browser.find("details summary"));
    browser.click_to(
        &browser.find("form[action='/domain/second.test/release'] button"),
        "done=release",
    );
    assert!(browser.text_of("#flash").contains("1 message(s) released"));
    sink.wait_for(3, WAIT);
    eventually(WAIT, "an empty queue", || {
        s.queue().is_empty().then_some(())
    });
    let shown = succeeded(&s.cli(&["domain", "show", "second.test"]));
    assert!(shown.contains("hold: no"), "{shown}");
    browser.goto(&format!("{base}/"));
    assert_eq!(number(&browser.text_of("#total-queued")), 0);
}
