//! The SAM template itself, deployed with CloudFormation into the AWS
//! emulator (`ci/aws-emulator.sh deploy`), then `backupmx ingest`,
//! `retry-fn poll` and `retry-fn sweep` run against the resources it
//! created, given the variables the template gives them (names from the
//! stack's outputs). The function stays off there, and `Emulator=true`
//! leaves out the NAT gateways (infra/README.md).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use backupmx_tests::sink::Sink;
use backupmx_tests::*;
use serde_yaml::Value;

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn template() -> Value {
    let text = std::fs::read_to_string(repo("infra/template.yaml")).unwrap();
    serde_yaml::from_str(&text).expect("template is YAML")
}

/// `!Ref X` → `X`.
fn reference(v: &Value) -> Option<String> {
    match v {
        Value::Tagged(t) if t.tag == "!Ref" => t.value.as_str().map(String::from),
        _ => None,
    }
}

/// The retry function's variables that name a stack resource, with the
/// values the deployed stack's outputs give those resources.
fn function_variables(outputs: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let t = template();
    // Output key by the resource it is a `!Ref` of.
    let mut by_resource = BTreeMap::new();
    for (key, output) in t["Outputs"].as_mapping().unwrap() {
        if let Some(resource) = reference(&output["Value"]) {
            let key = key.as_str().unwrap().to_string();
            if let Some(value) = outputs.get(&key) {
                by_resource.insert(resource, value.clone());
            }
        }
    }
    let vars = t["Resources"]["RetryFunction"]["Properties"]["Environment"]["Variables"]
        .as_mapping()
        .unwrap();
    let mut env = Vec::new();
    for (name, value) in vars {
        let name = name.as_str().unwrap().to_string();
        match reference(value).and_then(|r| by_resource.get(&r).cloned()) {
            Some(v) => env.push((name, v)),
            None if name.starts_with("BACKUPMX_AWS__") => {
                panic!("{name} names no resource the stack outputs")
            }
            None => {}
        }
    }
    env
}

#[test]
fn the_template_deploys_and_the_binaries_run_on_its_resources() {
    if !aws_available() {
        return;
    }
    let stack = format!(
        "t{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let out = Command::new("bash")
        .arg(repo("ci/aws-emulator.sh"))
        .args([
            "deploy",
            repo("infra/template.yaml").to_str().unwrap(),
            &stack,
        ])
        .output()
        .expect("run ci/aws-emulator.sh deploy");
    assert!(
        out.status.success(),
        "deploy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outputs: BTreeMap<String, String> =
        serde_json::from_slice(&out.stdout).expect("stack outputs as JSON");
    let env = function_variables(&outputs);
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    for required in [
        "BACKUPMX_AWS__DOMAINS_TABLE",
        "BACKUPMX_AWS__GREYLIST_TABLE",
        "BACKUPMX_AWS__QUEUE_TABLE",
        "BACKUPMX_AWS__BUCKET",
        "BACKUPMX_AWS__QUEUE_URL",
        "BACKUPMX_AWS__DEAD_LETTER_QUEUE_URL",
    ] {
        assert!(names.contains(&required), "{required} missing: {names:?}");
    }
    let sink = Sink::start(0);
    let mut s = Server::prepare_ingest_aws("", &format!("[\"{}\"]", sink.addr));
    for (k, v) in &env {
        s.set_env(k, v);
    }
    s.spawn();
    let mut c = s.client();
    let body = "From: alice@remote.test\r\nSubject: on the stack\r\n\r\nbody\r\n";
    let reply = c.send_message("alice@remote.test", &["bob@example.test"], body);
    assert!(reply.starts_with("250 "), "{reply}");
    // The domain index (flush), the due index (sweep) and the dead-letter
    // queue (sweep) are the template's.
    let flush = s.cli(&["queue", "flush", "--domain", "example.test"]);
    assert!(
        flush.status.success(),
        "{}",
        String::from_utf8_lossy(&flush.stderr)
    );
    let retry_fn = |args: &[&str]| {
        let mut cmd = Command::new(retry_fn_bin());
        cmd.arg("--config").arg(&s.config_path).args(args);
        for (k, v) in s.env_vars() {
            cmd.env(k, v);
        }
        cmd.output().expect("run retry-fn")
    };
    let sweep = retry_fn(&["sweep"]);
    let log = String::from_utf8_lossy(&sweep.stderr).to_string();
    assert!(sweep.status.success(), "{log}");
    assert!(log.contains("sweep_done"), "{log}");
    let poll = retry_fn(&["poll", "--exit-when-idle", "3s"]);
    assert!(
        poll.status.success(),
        "{}",
        String::from_utf8_lossy(&poll.stderr)
    );
    let got = sink.wait_for(1, Duration::from_secs(10));
    assert_eq!(got[0].rcpts, ["bob@example.test"]);
    assert!(s.queue().is_empty());
}
