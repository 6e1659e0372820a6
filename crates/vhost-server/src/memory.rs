//! Giving memory back to the system after a wave of client connections has come and gone.
//!
//! Where it sits: a background task on the `vhost-admin` runtime looks at the proxy's
//! connection counts every few seconds ([`trim_after_waves`]); what it asks of the allocators
//! happens on the proxy threads themselves.
//!
//! Rust allocations go to mimalloc, with its default purge delays: a page that became free is
//! given back to the system only after a while, so that under load a freed page is reused
//! instead of given back and faulted in again on the next request (measured: a purge delay of
//! 0 cost ≈ 0.9 page faults per request, docs/performance.md). But a purge happens only when
//! some thread allocates later, and the free pages of a thread are that thread's to give back:
//! after a wave the proxy threads sit idle and would keep the wave's memory. So when the
//! connections seen open have dropped by a quarter (or to none) since the last look, the task
//! asks every proxy thread to collect its free pages and purge them at once
//! ([`vhost_pingora::Connections::run_on_workers`]).
//!
//! OpenSSL allocates with the C library's `malloc`; glibc keeps what thousands of closed TLS
//! connections freed in its arenas unless asked to trim them. The task asks — only after at
//! least [`WAVE`] connections closed since the last look, so a steady load never pays.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vhost_pingora::Connections;

/// Connections that must have closed since the previous look before glibc's arenas are trimmed.
const WAVE: usize = 1024;

/// How often the open-connection count is looked at.
const EVERY: Duration = Duration::from_secs(5);

/// Runs until `stop` flips.
pub(crate) async fn trim_after_waves(conns: Arc<Connections>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let peak = conns.take_peak();
        let open = conns.open();
        if quieter(peak, open) {
            conns.run_on_workers(collect_this_thread);
            tracing::debug!(
                peak,
                open,
                workers = conns.workers(),
                "fewer connections: proxy threads give their free pages back"
            );
        }
        if peak.saturating_sub(open) >= WAVE {
            trim();
            tracing::debug!(
                peak,
                open,
                "connection wave over: freed C-library memory returned to the system"
            );
        }
    }
}

/// Whether the proxy got quieter since the last look: the most connections open at once since
/// then was `peak`, now `open` are — at least a quarter of them (and at least one) gone.
fn quieter(peak: usize, open: usize) -> bool {
    let gone = peak.saturating_sub(open);
    gone > 0 && gone >= peak / 4
}

/// Asks mimalloc to give the calling thread's free pages back and to purge every arena's free
/// memory now, without waiting for the purge delay.
#[allow(unsafe_code)]
fn collect_this_thread() {
    // SAFETY: mi_collect takes no pointers; it works on the calling thread's own heap and on
    // the arenas, which mimalloc synchronises itself.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}

/// Returns the free memory of every glibc arena to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() {
    // SAFETY: malloc_trim takes no pointers and has no preconditions; glibc takes each arena's
    // lock while trimming it, so it is safe to call while other threads allocate.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other C libraries: nothing to do.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quarter_of_the_connections_gone_is_quieter() {
        assert!(!quieter(0, 0), "nothing happened");
        assert!(!quieter(100, 100), "steady");
        assert!(!quieter(100, 76), "under a quarter gone");
        assert!(quieter(100, 75));
        assert!(quieter(3, 0));
        assert!(quieter(1, 0), "the last one gone");
        assert!(!quieter(5000, 4000), "churn under load");
    }
}
