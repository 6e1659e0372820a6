//! Health checking in the real binary: a killed backend is marked down (API, metrics), traffic
//! goes to its sibling, and it returns when it comes back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;

#[test]
fn traffic_follows_health() {
    let rt = runtime();
    let mut victim = TestBackend::start(&rt, "victim");
    let sibling = TestBackend::start(&rt, "sibling");
    let body = format!(
        "[health_check]\ninterval_secs = 1\ntimeout_secs = 1\nunhealthy_threshold = 1\nhealthy_threshold = 1\n\n\
         [[virtual_hosts]]\ndomain = \"app.test\"\nenabled_backends_tag = \"a\"\n\n\
         [[backends]]\nid = \"victim\"\naddress = \"{}\"\ntags = [\"a\"]\n\n\
         [[backends]]\nid = \"sibling\"\naddress = \"{}\"\ntags = [\"a\"]\n",
        victim.addr, sibling.addr
    );
    let proxy = ProxyProcess::start(tempfile::tempdir().unwrap(), "", &body, false);
    let c = client(&[], true);
    let health_of = |id: &str| -> String {
        rt.block_on(async {
            let r = c
                .get(proxy.admin_url(&format!("/api/v1/backends/{id}")))
                .send()
                .await
                .unwrap();
            let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            v["health"].as_str().unwrap().to_owned()
        })
    };
    let served_by = |n: usize| -> Vec<String> {
        rt.block_on(async {
            let mut out = Vec::new();
            for _ in 0..n {
                out.push(proxy.backend_for(&c, "app.test").await);
            }
            out
        })
    };
    assert!(served_by(10).iter().any(|b| b == "victim"));

    victim.kill();
    wait_until("the victim to be marked down", || {
        health_of("victim") == "down"
    });
    assert!(served_by(20).iter().all(|b| b == "sibling"));
    let metrics = rt.block_on(async {
        c.get(proxy.admin_url("/api/v1/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    assert!(
        metrics.contains("health_check_status{backend=\"victim\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("health_check_status{backend=\"sibling\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("health_check_transitions_total{backend=\"victim\",to=\"down\"} 1"),
        "{metrics}"
    );

    victim.restart();
    wait_until("the victim to be marked up", || health_of("victim") == "up");
    wait_until("traffic to return to the victim", || {
        served_by(4).iter().any(|b| b == "victim")
    });
    assert!(proxy.log().contains("backend health changed"));
}
