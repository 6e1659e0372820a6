//! Runs every `curl` line of docs/api.md, in order, against the real binary and checks the status
//! code written after `# →` — so the documentation cannot drift from the API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;

#[test]
fn every_curl_example_in_docs_api_md_runs_with_the_documented_status() {
    assert!(
        Command::new("curl").arg("--version").output().is_ok(),
        "this test needs curl (scripts/deps.sh installs it)"
    );
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.md")).unwrap();
    let examples: Vec<(String, String)> = doc
        .lines()
        .filter(|l| l.starts_with("curl "))
        .filter_map(|l| {
            let (cmd, status) = l.split_once("# →")?;
            Some((cmd.trim().to_owned(), status.trim().to_owned()))
        })
        .collect();
    assert!(
        examples.len() >= 20,
        "only {} examples found",
        examples.len()
    );

    // The documented backend addresses, served for real (health checks run).
    let rt = runtime();
    let live: Vec<(String, TestBackend)> = ["127.0.0.1:3001", "127.0.0.1:3002", "127.0.0.1:3003"]
        .iter()
        .map(|doc_addr| (doc_addr.to_string(), TestBackend::start(&rt, doc_addr)))
        .collect();
    let real = |text: &str| {
        live.iter().fold(text.to_owned(), |t, (doc_addr, b)| {
            t.replace(doc_addr, &b.addr.to_string())
        })
    };
    let body = real(
        "[[virtual_hosts]]\ndomain = \"example.com\"\nenabled_backends_tag = \"a\"\nhttp_to_https = true\n\n\
         [[backends]]\nid = \"web-v1\"\naddress = \"127.0.0.1:3001\"\ntags = [\"a\"]\n",
    );
    let proxy = ProxyProcess::start(tempfile::tempdir().unwrap(), "", &body, false);
    let base = format!("http://{}", proxy.admin);
    for (cmd, expected) in examples {
        let cmd = real(&cmd).replace("http://127.0.0.1:8080", &base);
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("{cmd} -s -o /dev/null -w '%{{http_code}}'"))
            .output()
            .unwrap();
        let got = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(
            got, expected,
            "`{cmd}` answered {got}, docs/api.md says {expected}"
        );
    }
}
