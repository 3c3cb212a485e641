//! End-to-end: the command-line contract and bad-input handling.

use std::process::Command;

use backupmx_tests::*;

fn one_line_error(out: &std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "unexpected success: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn domain_commands_manage_the_registry_used_by_the_running_server() {
    let s = Server::start("", "");
    succeeded(&s.cli(&[
        "domain",
        "add",
        "Added.Test",
        "--primary",
        "127.0.0.1:2626",
        "--primary",
        "mx.added.test",
        "--no-greylist",
        "--max-size",
        "5000",
        "--recipient",
        "one@added.test",
    ]));
    let list: serde_json::Value =
        serde_json::from_str(&succeeded(&s.cli(&["domain", "list", "--json"]))).unwrap();
    let added = list
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "added.test")
        .expect("listed");
    assert_eq!(
        added["primary"],
        serde_json::json!(["127.0.0.1:2626", "mx.added.test"])
    );
    assert_eq!(added["greylist"], false);
    assert_eq!(added["max_message_size"], 5000);
    assert_eq!(added["recipients"], serde_json::json!(["one@added.test"]));
    let show = succeeded(&s.cli(&["domain", "show", "added.test"]));
    assert!(
        show.contains("primary: 127.0.0.1:2626, mx.added.test"),
        "{show}"
    );
    assert!(succeeded(&s.cli(&["domain", "list"])).contains("added.test"));

    // The running server sees the change at once.
    let mut c = s.client();
    c.expect("EHLO client.test", "250");
    c.expect("MAIL FROM:<a@remote.test>", "250");
    c.expect("RCPT TO:<one@added.test>", "250");
    c.expect("RCPT TO:<two@added.test>", "550 5.1.1");
    succeeded(&s.cli(&["domain", "remove", "added.test"]));
    c.expect("RCPT TO:<one@added.test>", "550 5.7.1");

    let err = one_line_error(&s.cli(&["domain", "remove", "added.test"]));
    assert!(err.contains("no such domain"), "{err}");
    one_line_error(&s.cli(&["domain", "show", "nope.test"]));
    one_line_error(&s.cli(&["domain", "add", "bad domain"]));
    one_line_error(&s.cli(&["domain", "add", "ok.test", "--primary", "host:99999"]));
    one_line_error(&s.cli(&["domain", "add", "ok.test", "--recipient", "x@other.test"]));
}

#[test]
fn queue_commands_show_and_delete() {
    let s = Server::start("", "");
    let mut c = s.client();
    let id = queue_id(&c.send_message(
        "a@remote.test",
        &["user@example.test"],
        "Subject: q\r\n\r\nx\r\n",
    ));
    let show: serde_json::Value =
        serde_json::from_str(&succeeded(&s.cli(&["queue", "show", &id]))).unwrap();
    assert_eq!(show["id"], id.as_str());
    assert_eq!(show["attempts"], 0);
    let human = succeeded(&s.cli(&["queue", "list"]));
    assert!(
        human.contains(&id) && human.contains("1 message(s)"),
        "{human}"
    );
    assert_eq!(
        s.cli(&["queue", "list", "--domain", "other.test", "--json"])
            .stdout,
        b"[]\n"
    );
    succeeded(&s.cli(&["queue", "delete", &id]));
    assert!(s.queue().is_empty());
    one_line_error(&s.cli(&["queue", "delete", &id]));
    one_line_error(&s.cli(&["queue", "show", "../../etc/passwd"]));
}

#[test]
fn bad_config_files_give_one_line_and_a_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[smtp]\nlisten = \"nowhere\"\n", "listen"),
        ("[smtp]\nunknown_key = 1\n", "unknown_key"),
        ("[greylist]\ndelay = \"soon\"\n", "delay"),
        (
            "[tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n",
            "cert",
        ),
    ];
    for (text, needle) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            format!(
                "[storage]\ndata_dir = \"{}\"\n{text}",
                dir.path().join("d").display()
            ),
        )
        .unwrap();
        let out = Command::new(backupmx_bin())
            .args(["run", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = one_line_error(&out);
        assert!(err.to_lowercase().contains(needle), "{text:?}: {err}");
    }
    let out = Command::new(backupmx_bin())
        .args(["run", "--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    one_line_error(&out);
    // A TOML syntax error keeps its caret under the mistake, on its lines.
    let path = dir.path().join("syntax.toml");
    std::fs::write(&path, "[smtp\nlisten = 1\n").unwrap();
    let out = Command::new(backupmx_bin())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("TOML parse error at line 1")
            && err.contains("1 | [smtp")
            && err.contains('^'),
        "{err}"
    );
}

#[test]
fn config_errors_point_at_the_line_and_suggest_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.toml");
    std::fs::write(
        &path,
        "hostname = \"mx2.test\"\n[smtp]\nmax_mesage_size = 5\n",
    )
    .unwrap();
    let out = Command::new(backupmx_bin())
        .args(["domain", "list", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = one_line_error(&out);
    assert!(err.contains(&format!("{}:3:", path.display())), "{err}");
    assert!(err.contains("unknown key `smtp.max_mesage_size`"), "{err}");
    assert!(err.contains("did you mean `max_message_size`?"), "{err}");
    assert!(
        !err.contains("default.") && !err.contains("TOML source string"),
        "{err}"
    );
    std::fs::write(&path, "[greylist]\ndelay = \"five minutes\"\n").unwrap();
    let out = Command::new(backupmx_bin())
        .args(["domain", "list", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = one_line_error(&out);
    assert!(
        err.contains(":2:") && err.contains("\"90s\", \"5m\""),
        "{err}"
    );
}

#[test]
fn read_only_commands_in_an_empty_directory_create_nothing_and_say_where_they_looked() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["queue", "list"][..],
        &["domain", "list"],
        &["queue", "flush"],
        &["domain", "remove", "example.test"],
    ] {
        let out = Command::new(backupmx_bin())
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let err = one_line_error(&out);
        assert!(
            err.contains("no store in the data directory ./data"),
            "{args:?}: {err}"
        );
        assert!(err.contains("built-in defaults"), "{args:?}: {err}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing created"
    );
    let out = Command::new(backupmx_bin())
        .args(["-v", "domain", "add", "example.test"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(succeeded(&out).trim(), "added example.test");
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        said.contains("configuration built-in defaults") && said.contains("data/backupmx.db"),
        "{said}"
    );
}

#[test]
fn a_second_server_on_the_same_data_directory_is_refused() {
    let s = Server::start("", "");
    let out = Command::new(backupmx_bin())
        .args(["ingest", "--config"])
        .arg(&s.config_path)
        .env(
            "BACKUPMX_SMTP__LISTEN",
            format!("[\"127.0.0.1:{}\"]", free_port()),
        )
        .current_dir(s.dir.path())
        .output()
        .unwrap();
    let err = one_line_error(&out);
    assert!(err.contains("already serving the data directory"), "{err}");
    assert!(err.contains("pid"), "{err}");
    // Admin commands still work alongside the running server.
    succeeded(&s.cli(&["domain", "list"]));
}

#[test]
fn domain_add_does_not_silently_replace_and_refuses_bad_names() {
    let s = Server::start("", "");
    let err = one_line_error(&s.cli(&["domain", "add", "example.test", "--primary", "10.0.0.1"]));
    assert!(
        err.contains("already hosted") && err.contains("--replace"),
        "{err}"
    );
    let out = succeeded(&s.cli(&[
        "domain",
        "add",
        "example.test",
        "--primary",
        "127.0.0.1:2626",
        "--replace",
    ]));
    assert_eq!(out.trim(), "replaced example.test");
    for bad in ["1.2.3.4", "localhost", "xn--zz.test"] {
        let err = one_line_error(&s.cli(&["domain", "add", bad]));
        assert!(err.contains(bad), "{bad}: {err}");
    }
    let out = succeeded(&s.cli(&["domain", "remove", "example.test"]));
    assert_eq!(out.trim(), "removed example.test");
    let out = s.cli(&["domain", "list"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no hosted domains in"));
}

#[test]
fn an_unusable_data_dir_gives_one_line_and_a_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let out = Command::new(backupmx_bin())
        .args(["queue", "list"])
        .env("BACKUPMX_STORAGE__DATA_DIR", &file)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = one_line_error(&out);
    assert!(err.contains("data directory"), "{err}");
    let out = Command::new(backupmx_bin())
        .args(["domain", "add", "example.test"])
        .env("BACKUPMX_STORAGE__DATA_DIR", &file)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = one_line_error(&out);
    assert!(err.contains("data directory"), "{err}");
}

#[test]
fn environment_overrides_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(backupmx_bin())
        .args(["domain", "add", "example.test"])
        .env("BACKUPMX_STORAGE__DATA_DIR", dir.path().join("envdata"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    succeeded(&out);
    assert!(dir.path().join("envdata").join("backupmx.db").exists());
    let out = Command::new(backupmx_bin())
        .args(["domain", "list", "--json"])
        .env("BACKUPMX_STORAGE__DATA_DIR", dir.path().join("envdata"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(succeeded(&out).contains("example.test"));
}

#[test]
fn metrics_are_served_in_prometheus_text() {
    let port = free_port();
    let s = Server::start("", &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    let mut c = s.client();
    queue_id(&c.send_message(
        "a@remote.test",
        &["user@example.test"],
        "Subject: m\r\n\r\nx\r\n",
    ));
    c.expect("RCPT TO:<x@elsewhere.test>", "503");
    let mut http = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    use std::io::{Read, Write};
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    http.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("backupmx_messages_accepted_total 1"),
        "{text}"
    );
    assert!(text.contains("backupmx_sessions_total"), "{text}");
    assert!(
        text.contains("backupmx_rejections_total{reason=\"sequence\",code=\"503\"} 1"),
        "{text}"
    );
}

#[test]
fn every_documented_metric_is_there_from_the_start_with_help_and_type() {
    let port = free_port();
    let s = Server::start_run(
        "",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
        "",
    );
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"),
    )
    .unwrap();
    let section = readme
        .split("## Metrics and logs")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .unwrap();
    let documented: Vec<&str> = section
        .split('`')
        .filter(|w| w.starts_with("backupmx_"))
        .map(|w| w.split('{').next().unwrap())
        // A series per configured DNSBL zone, created by its first lookup.
        .filter(|w| *w != "backupmx_dnsbl_lookups_total")
        .collect();
    assert!(documented.len() >= 15, "{documented:?}");
    let mut http = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    use std::io::{Read, Write};
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    http.read_to_string(&mut text).unwrap();
    for m in documented {
        assert!(
            text.contains(&format!("# HELP {m} ")),
            "{m} has no HELP:\n{text}"
        );
        assert!(
            text.contains(&format!("# TYPE {m} ")),
            "{m} has no TYPE:\n{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with(m) && !l.starts_with('#')),
            "{m} has no series at start:\n{text}"
        );
    }
    drop(s);
}
