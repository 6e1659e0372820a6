//! Runs every `curl` line of docs/api.md and docs/canary.md, in order, against the real binary
//! and checks the status code written after `# →` — so the documentation cannot drift from the
//! API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;

/// Runs the `curl ... # → status` lines of `doc` (under docs/) against the binary started with
/// `body`; the documented backend addresses 127.0.0.1:3001-3003 are served for real, the admin
/// API's documented address is the real one, and so is the proxy's (`http://127.0.0.1:80`).
fn run_curl_examples(doc: &str, body: &str, at_least: usize) {
    assert!(
        Command::new("curl").arg("--version").output().is_ok(),
        "this test needs curl (scripts/deps.sh installs it)"
    );
    let text = std::fs::read_to_string(format!("{}/../../docs/{doc}", env!("CARGO_MANIFEST_DIR")))
        .unwrap();
    let examples: Vec<(String, String)> = text
        .lines()
        .filter(|l| l.starts_with("curl "))
        .filter_map(|l| {
            let (cmd, status) = l.split_once("# →")?;
            Some((cmd.trim().to_owned(), status.trim().to_owned()))
        })
        .collect();
    assert!(
        examples.len() >= at_least,
        "only {} examples found in {doc}",
        examples.len()
    );

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
    let proxy = ProxyProcess::start(tempfile::tempdir().unwrap(), "", &real(body), false);
    let admin = format!("http://{}", proxy.admin);
    let http = format!("http://{}", proxy.http);
    for (cmd, expected) in examples {
        let cmd = real(&cmd)
            .replace("http://127.0.0.1:8080", &admin)
            .replace("http://127.0.0.1:80", &http);
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("{cmd} -s -o /dev/null -w '%{{http_code}}'"))
            .output()
            .unwrap();
        let got = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(
            got, expected,
            "`{cmd}` answered {got}, docs/{doc} says {expected}"
        );
    }
}

#[test]
fn every_curl_example_in_docs_api_md_runs_with_the_documented_status() {
    run_curl_examples(
        "api.md",
        "[[virtual_hosts]]\ndomain = \"example.com\"\nenabled_backends_tag = \"a\"\nhttp_to_https = true\n\n\
         [[backends]]\nid = \"web-v1\"\naddress = \"127.0.0.1:3001\"\ntags = [\"a\"]\n",
        20,
    );
}

#[test]
fn every_curl_example_in_docs_canary_md_runs_with_the_documented_status() {
    run_curl_examples(
        "canary.md",
        "[[virtual_hosts]]\ndomain = \"example.com\"\nenabled_backends_tag = \"a\"\n\n\
         [[backends]]\nid = \"web-v1\"\naddress = \"127.0.0.1:3001\"\ntags = [\"a\"]\n\n\
         [[backends]]\nid = \"web-v2\"\naddress = \"127.0.0.1:3002\"\ntags = [\"b\"]\n",
        15,
    );
}
