//! A real browser for page tests: Debian's headless Chromium driven over
//! WebDriver (W3C) by its `chromedriver`, both installed by
//! `scripts/install-test-deps`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::http::{base64_decode, request};

/// The key of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A headless Chromium session.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
}

fn chromium_binary() -> Option<PathBuf> {
    // Debian's /usr/bin/chromium is a wrapper script; the driver wants the
    // program itself.
    ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn chromedriver_binary() -> Option<PathBuf> {
    ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// How many fresh ports chromedriver is tried on before giving up.
const DRIVER_ATTEMPTS: usize = 5;

/// Starts chromedriver on a free loopback port and waits until it listens.
///
/// The port is free when picked but may be taken before chromedriver binds
/// it (every test in the run opens connections); chromedriver also binds the
/// port on IPv6 and exits when that is taken. Either way it exits at once, so
/// an exit means another port, not a 30-second wait.
fn start_driver(driver: &Path) -> (Child, SocketAddr) {
    let mut outputs = Vec::new();
    for _ in 0..DRIVER_ATTEMPTS {
        let port = crate::free_port();
        let log = tempfile::NamedTempFile::new().expect("chromedriver log");
        let mut child = Command::new(driver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(log.reopen().expect("chromedriver log"))
            .stderr(log.reopen().expect("chromedriver log"))
            .spawn()
            .expect("start chromedriver");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(addr).is_ok() {
                return (child, addr);
            }
            if let Ok(Some(status)) = child.try_wait() {
                let output = std::fs::read_to_string(log.path()).unwrap_or_default();
                outputs.push(format!("port {port}: {status}: {}", output.trim()));
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let output = std::fs::read_to_string(log.path()).unwrap_or_default();
                outputs.push(format!(
                    "port {port}: not listening after 30 s: {}",
                    output.trim()
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!(
        "chromedriver did not listen in {DRIVER_ATTEMPTS} attempts:\n{}",
        outputs.join("\n")
    );
}

impl Browser {
    /// Starts chromedriver on a free loopback port and opens a session
    /// with a window of `width`×`height`.
    pub fn start(width: u32, height: u32) -> Browser {
        let (Some(chromium), Some(driver)) = (chromium_binary(), chromedriver_binary()) else {
            panic!("Chromium and chromedriver are needed (Debian packages chromium, chromium-driver: scripts/install-test-deps installs them)");
        };
        let (child, addr) = start_driver(&driver);
        let profile = tempfile::tempdir().expect("profile dir");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.display().to_string(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--no-first-run",
                    "--disable-extensions", "--disable-background-networking",
                    "--disable-sync", "--disable-component-update",
                    "--hide-scrollbars", "--force-device-scale-factor=1",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let mut browser = Browser {
            driver: child,
            addr,
            session: String::new(),
            _profile: profile,
        };
        let answer = browser.call("POST", "/session", Some(caps));
        browser.session = answer["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {answer}"))
            .to_string();
        browser
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let body = if method == "POST" && body.is_empty() {
            "{}".to_string()
        } else {
            body
        };
        let r = request(
            self.addr,
            method,
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        let v = r.json();
        assert!(
            r.status == 200,
            "WebDriver {method} {path}: {} {v}",
            r.status
        );
        v["value"].clone()
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    /// Loads `url` and waits for it.
    pub fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({ "url": url })));
    }

    /// The address of the page shown.
    pub fn url(&self) -> String {
        self.session_call("GET", "/url", None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The page's HTML as the browser has it.
    pub fn source(&self) -> String {
        self.session_call("GET", "/source", None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Every element matching a CSS selector.
    pub fn find_all(&self, css: &str) -> Vec<String> {
        self.session_call(
            "POST",
            "/elements",
            Some(json!({ "using": "css selector", "value": css })),
        )
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e[ELEMENT].as_str().map(str::to_string))
        .collect()
    }

    /// The first element matching a CSS selector; panics with the page
    /// source when there is none.
    pub fn find(&self, css: &str) -> String {
        self.find_all(css)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no element {css:?} on {}:\n{}", self.url(), self.source()))
    }

    /// The rendered text of an element (what a person reads).
    pub fn text(&self, element: &str) -> String {
        self.session_call("GET", &format!("/element/{element}/text"), None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The rendered text of the first element matching `css`.
    pub fn text_of(&self, css: &str) -> String {
        self.text(&self.find(css))
    }

    /// Clicks an element as a person would (it must be visible).
    pub fn click(&self, element: &str) {
        self.session_call("POST", &format!("/element/{element}/click"), None);
    }

    /// Clicks something that loads another page (a link, a form's
    /// button) and waits until the address contains `expect` and the page
    /// has loaded.
    pub fn click_to(&self, element: &str, expect: &str) {
        self.click(element);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = self.session_call(
                "POST",
                "/execute/sync",
                Some(json!({ "script": "return document.readyState", "args": [] })),
            );
            if self.url().contains(expect) && ready == "complete" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no page at {expect:?} after the click (at {})",
                self.url()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (20 s at most) until an element matching `css` is there.
    pub fn wait_for(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(e) = self.find_all(css).into_iter().next() {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no element {css:?} on {}:\n{}",
                self.url(),
                self.source()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types into an input.
    pub fn type_into(&self, element: &str, text: &str) {
        self.session_call(
            "POST",
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// Resizes the window (a phone, a desktop).
    pub fn resize(&self, width: u32, height: u32) {
        self.session_call(
            "POST",
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        );
    }

    /// A PNG of the viewport, written to `path`.
    pub fn screenshot(&self, path: &Path) {
        let png = base64_decode(
            self.session_call("GET", "/screenshot", None)
                .as_str()
                .unwrap_or_default(),
        );
        assert!(png.starts_with(b"\x89PNG"), "not a PNG screenshot");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _ = request(
                    self.addr,
                    "DELETE",
                    &format!("/session/{}", self.session),
                    &[],
                    b"",
                );
            }));
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
