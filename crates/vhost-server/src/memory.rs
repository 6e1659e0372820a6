//! Giving memory back to the system after a wave of client connections has come and gone.
//!
//! Rust allocations go to mimalloc. By default it returns a freed page to the system only after
//! a delay *and* on a later allocation by the same thread — so a proxy that goes quiet after a
//! burst keeps the burst's memory. [`release_freed_pages_promptly`] makes it return pages as
//! soon as they are entirely free; under a steady load pages are reused and this costs nothing
//! (measured: docs/performance.md).
//!
//! OpenSSL allocates with the C library's `malloc`; glibc keeps what thousands of closed TLS
//! connections freed in its arenas unless asked to trim them. [`trim_after_waves`] asks — only
//! after at least [`WAVE`] connections closed since the last look, so a steady load never pays.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vhost_pingora::Connections;

/// Connections that must have closed since the previous look before memory is trimmed.
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

/// mimalloc option ids (v3, `mi_option_e` in mimalloc.h; checked by a test).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const MI_OPTION_ARENA_PURGE_MULT: libmimalloc_sys::mi_option_t = 24;

/// Makes mimalloc return pages to the system as soon as they are free (no purge delay), instead
/// of waiting for a later allocation on the thread that freed them. Call once, early, in a
/// binary whose global allocator is mimalloc (it configures mimalloc's options either way).
#[allow(unsafe_code)]
pub fn release_freed_pages_promptly() {
    // SAFETY: mi_option_set stores an integer in mimalloc's option table; it takes no pointers
    // and may be called at any time.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_PURGE_MULT, 0);
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
    #[allow(unsafe_code)]
    fn the_option_ids_name_the_purge_options() {
        // SAFETY: reads an integer from mimalloc's option table.
        let (delay, mult) = unsafe {
            (
                libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY),
                libmimalloc_sys::mi_option_get(MI_OPTION_ARENA_PURGE_MULT),
            )
        };
        // mimalloc v3's defaults for purge_delay and arena_purge_mult.
        assert_eq!((delay, mult), (1000, 1));
    }
}
