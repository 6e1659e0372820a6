//! Configuration history: every accepted change — API write, reload, rollout step, rollback —
//! gets the next revision number, with its time, source, client address and the records it
//! changed (before and after). The last [`MAX_REVISIONS`] are kept, in memory and in a JSON
//! Lines file next to the config file (`<config>.history.jsonl`).
//!
//! Where it sits: owned by the admin API's single writer; [`History::record`] runs right after a
//! change is published, under the writer lock, so revisions follow publication order. Readers
//! (the history endpoints) use a [`HistoryReader`] and never wait for a write. The
//! configuration at any kept revision is rebuilt by replaying the recorded changes forward from
//! the nearest earlier full snapshot (one is stored when the process starts, and at the oldest
//! kept entry), so the file holds mostly small diffs.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use vhost_routing::{Backend, BackendId, DomainName, State, VirtualHost};

/// Revisions kept.
pub const MAX_REVISIONS: usize = 1000;

/// Where a change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The configuration the process started with (or found on disk at start).
    Start,
    /// An admin API write.
    Api,
    /// A reload of the config file (SIGHUP or the reload endpoint).
    Reload,
    /// A rollout step, abort or promotion decided by the proxy.
    Rollout,
    /// A rollback to an earlier revision.
    Rollback,
}

/// One virtual host's change: `before` absent = added, `after` absent = removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DomainChange {
    /// The domain.
    #[schema(value_type = String)]
    pub domain: DomainName,
    /// Before the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<VirtualHost>,
    /// After the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<VirtualHost>,
}

/// One backend's change: `before` absent = added, `after` absent = removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackendChange {
    /// The backend.
    #[schema(value_type = String)]
    pub id: BackendId,
    /// Before the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Backend>,
    /// After the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Backend>,
}

/// One revision, as `GET /api/v1/config/history` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Revision {
    /// Increases by one with every accepted change.
    pub revision: u64,
    /// When it was accepted (RFC 3339, UTC).
    pub time: String,
    /// Where it came from.
    pub source: Source,
    /// The client address of an API change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// The virtual hosts it changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<DomainChange>,
    /// The backends it changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendChange>,
}

/// A whole configuration (routing records), as `GET /api/v1/config/revisions/{n}` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    /// The revision.
    pub revision: u64,
    /// Every virtual host.
    pub virtual_hosts: Vec<VirtualHost>,
    /// Every backend.
    pub backends: Vec<Backend>,
}

/// A line of the history file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    revision: Revision,
    /// The whole configuration after this revision, on some entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot: Option<Snapshot>,
}

/// Why a revision cannot be returned.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// Unknown, or older than the kept window.
    #[error("revision {0} is not in the history (the last {MAX_REVISIONS} are kept)")]
    Unknown(u64),
    /// The recorded changes do not add up to a valid configuration (a damaged history file).
    #[error("revision {revision} cannot be rebuilt from the history: {reason}")]
    Damaged {
        /// The revision.
        revision: u64,
        /// Why.
        reason: String,
    },
}

/// The kept entries, oldest first.
type Entries = VecDeque<Arc<Stored>>;

/// The read side of the history: lock-free (an `ArcSwap` of the kept entries, replaced whole by
/// the single writer), so reading it never waits for a write.
#[derive(Debug, Clone, Default)]
pub struct HistoryReader(Arc<ArcSwap<Entries>>);

impl HistoryReader {
    /// The newest revision number.
    pub fn latest(&self) -> u64 {
        self.0.load().back().map_or(0, |e| e.revision.revision)
    }

    /// Up to `limit` revisions, newest first.
    pub fn list(&self, limit: usize) -> Vec<Revision> {
        self.0
            .load()
            .iter()
            .rev()
            .take(limit)
            .map(|e| e.revision.clone())
            .collect()
    }

    /// The configuration at `revision`.
    pub fn state_at(&self, revision: u64) -> Result<State, HistoryError> {
        state_at(&self.0.load(), revision)
    }

    /// [`HistoryReader::state_at`] as the API returns it.
    pub fn snapshot_at(&self, revision: u64) -> Result<Snapshot, HistoryError> {
        self.state_at(revision).map(|s| snapshot_of(revision, &s))
    }
}

/// The history (see the module docs): the writer side.
#[derive(Debug)]
pub struct History {
    events: Arc<crate::events::Events>,
    file: Option<PathBuf>,
    /// The kept entries, published for readers.
    pub(crate) reader: HistoryReader,
}

/// The changes between two states.
pub fn diff(before: &State, after: &State) -> (Vec<DomainChange>, Vec<BackendChange>) {
    fn changes<K: Ord + Clone, V: Clone + PartialEq>(
        before: BTreeMap<K, &V>,
        after: BTreeMap<K, &V>,
    ) -> Vec<(K, Option<V>, Option<V>)> {
        let mut keys: Vec<&K> = before.keys().chain(after.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter_map(|k| {
                let (b, a) = (before.get(k).copied(), after.get(k).copied());
                (b != a).then(|| (k.clone(), b.cloned(), a.cloned()))
            })
            .collect()
    }
    let domains = changes(
        before.vhosts().map(|v| (v.domain.clone(), v)).collect(),
        after.vhosts().map(|v| (v.domain.clone(), v)).collect(),
    )
    .into_iter()
    .map(|(domain, before, after)| DomainChange {
        domain,
        before,
        after,
    })
    .collect();
    let backends = changes(
        before.backends().map(|b| (b.id.clone(), b)).collect(),
        after.backends().map(|b| (b.id.clone(), b)).collect(),
    )
    .into_iter()
    .map(|(id, before, after)| BackendChange { id, before, after })
    .collect();
    (domains, backends)
}

fn now_rfc3339() -> String {
    rfc3339_utc(std::time::SystemTime::now())
}

/// RFC 3339 UTC with seconds, from a system time (no calendar crate needed).
fn rfc3339_utc(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339_unix(i64::try_from(secs).unwrap_or(i64::MAX))
}

/// RFC 3339 UTC with seconds, from seconds since the Unix epoch (times before it show as the
/// epoch).
pub fn rfc3339_unix(secs: i64) -> String {
    let secs = u64::try_from(secs).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn snapshot_of(revision: u64, state: &State) -> Snapshot {
    Snapshot {
        revision,
        virtual_hosts: state.vhosts().cloned().collect(),
        backends: state.backends().cloned().collect(),
    }
}

impl History {
    /// The history of the config file at `config` (`None`: in memory only). If its newest
    /// revision is not `current` (a first start, or the file was edited while the proxy was
    /// down), a `start` revision holding the whole of `current` is added; otherwise the history
    /// simply continues. A missing file starts an empty history; unreadable lines are skipped
    /// with a warning.
    pub fn open(
        config: Option<&std::path::Path>,
        current: &State,
        events: Arc<crate::events::Events>,
    ) -> Self {
        let file = config.map(|p| {
            let mut name = p.as_os_str().to_owned();
            name.push(".history.jsonl");
            PathBuf::from(name)
        });
        let mut entries = VecDeque::new();
        if let Some(path) = &file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    for (i, line) in text.lines().enumerate() {
                        match serde_json::from_str::<Stored>(line) {
                            Ok(entry) => entries.push_back(Arc::new(entry)),
                            Err(e) => tracing::warn!(
                                file = %path.display(),
                                line = i + 1,
                                error = %e,
                                "history: skipping an unreadable line"
                            ),
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "history: cannot read; starting a new one")
                }
            }
        }
        let reader = HistoryReader(Arc::new(ArcSwap::from_pointee(entries)));
        let continues = reader.latest() > 0
            && reader
                .state_at(reader.latest())
                .is_ok_and(|s| s == *current);
        let mut history = Self {
            events,
            file,
            reader,
        };
        if continues {
            return history;
        }
        let revision = history.next_revision();
        history.push(
            Stored {
                revision: Revision {
                    revision,
                    time: now_rfc3339(),
                    source: Source::Start,
                    client: None,
                    domains: Vec::new(),
                    backends: Vec::new(),
                },
                snapshot: Some(snapshot_of(revision, current)),
            },
            true,
        );
        history
    }

    fn next_revision(&self) -> u64 {
        self.reader.latest() + 1
    }

    /// Records the change from `before` to `after` (nothing if they are equal); returns its
    /// revision.
    pub fn record(
        &mut self,
        before: &State,
        after: &State,
        source: Source,
        client: Option<String>,
    ) -> Option<u64> {
        let (domains, backends) = diff(before, after);
        if domains.is_empty() && backends.is_empty() {
            return None;
        }
        let revision = self.next_revision();
        let event = serde_json::json!({
            "revision": revision,
            "source": source,
            "domains": domains.iter().map(|c| c.domain.as_str()).collect::<Vec<_>>(),
            "backends": backends.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        });
        self.push(
            Stored {
                revision: Revision {
                    revision,
                    time: now_rfc3339(),
                    source,
                    client,
                    domains,
                    backends,
                },
                snapshot: None,
            },
            false,
        );
        self.events.publish("config", event);
        Some(revision)
    }

    fn push(&mut self, entry: Stored, rewrite: bool) {
        let mut entries = Entries::clone(&self.reader.0.load());
        entries.push_back(Arc::new(entry));
        let mut rewrite = rewrite;
        while entries.len() > MAX_REVISIONS {
            // Keep the new oldest entry rebuildable: give it the whole configuration.
            let Some(second) = entries.get(1).map(|e| e.revision.revision) else {
                break;
            };
            let needs_snapshot = entries.get(1).is_some_and(|e| e.snapshot.is_none());
            let snapshot = needs_snapshot
                .then(|| state_at(&entries, second).ok())
                .flatten();
            entries.pop_front();
            if let (Some(state), Some(front)) = (snapshot, entries.front_mut()) {
                let mut with_snapshot = Stored::clone(front);
                with_snapshot.snapshot = Some(snapshot_of(second, &state));
                *front = Arc::new(with_snapshot);
            }
            rewrite = true;
        }
        self.save(&entries, rewrite);
        self.reader.0.store(Arc::new(entries));
    }

    /// Appends the newest entry to the file, or rewrites it whole.
    fn save(&self, entries: &Entries, rewrite: bool) {
        let Some(path) = &self.file else { return };
        let line = |e: &Stored| {
            serde_json::to_string(e).map(|mut s| {
                s.push('\n');
                s
            })
        };
        let result = if rewrite {
            let mut text = String::new();
            for e in entries {
                match line(e) {
                    Ok(l) => text.push_str(&l),
                    Err(e) => {
                        tracing::warn!(error = %e, "history: cannot encode an entry");
                    }
                }
            }
            vhost_config::write_atomically(path, text.as_bytes())
        } else {
            match entries.back().map(|e| line(e)) {
                Some(Ok(l)) => std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .and_then(|mut f| {
                        f.write_all(l.as_bytes())?;
                        f.sync_data()
                    }),
                _ => Ok(()),
            }
        };
        if let Err(e) = result {
            metrics::counter!("config_history_write_errors_total").increment(1);
            tracing::warn!(file = %path.display(), error = %e, "history: cannot write (the change itself is applied and saved in the config file)");
        }
    }
}

/// The configuration at `revision`: the nearest earlier full snapshot, with the recorded
/// changes after it replayed in order (no entry between it and `revision` has a snapshot).
fn state_at(entries: &Entries, revision: u64) -> Result<State, HistoryError> {
    if revision > entries.back().map_or(0, |e| e.revision.revision) {
        return Err(HistoryError::Unknown(revision));
    }
    let base = entries
        .iter()
        .rposition(|e| e.revision.revision <= revision && e.snapshot.is_some())
        .ok_or(HistoryError::Unknown(revision))?;
    let damaged = |reason: String| HistoryError::Damaged { revision, reason };
    let snapshot = entries[base]
        .snapshot
        .as_ref()
        .ok_or_else(|| damaged("no snapshot".into()))?;
    let mut vhosts: BTreeMap<DomainName, VirtualHost> = snapshot
        .virtual_hosts
        .iter()
        .map(|v| (v.domain.clone(), v.clone()))
        .collect();
    let mut backends: BTreeMap<BackendId, Backend> = snapshot
        .backends
        .iter()
        .map(|b| (b.id.clone(), b.clone()))
        .collect();
    for entry in entries.iter().skip(base + 1) {
        if entry.revision.revision > revision {
            break;
        }
        for c in &entry.revision.domains {
            match &c.after {
                Some(v) => vhosts.insert(c.domain.clone(), v.clone()),
                None => vhosts.remove(&c.domain),
            };
        }
        for c in &entry.revision.backends {
            match &c.after {
                Some(b) => backends.insert(c.id.clone(), b.clone()),
                None => backends.remove(&c.id),
            };
        }
    }
    State::new(
        vhosts.into_values().collect(),
        backends.into_values().collect(),
    )
    .map_err(|e| damaged(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vhost_routing::{BackendAddress, Command, Tag};

    fn state(domains: &[(&str, &str)]) -> State {
        State::new(
            domains
                .iter()
                .map(|(d, t)| {
                    VirtualHost::new(DomainName::parse(d).unwrap(), Tag::parse(t).unwrap())
                })
                .collect(),
            vec![Backend::new(
                BackendId::parse("web").unwrap(),
                BackendAddress::parse("127.0.0.1:1").unwrap(),
                vec![Tag::parse("a").unwrap()],
            )],
        )
        .unwrap()
    }

    #[test]
    fn revisions_rebuild_and_survive_a_restart_and_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        let s1 = state(&[("a.test", "a")]);
        let mut h = History::open(Some(&config), &s1, Arc::default());
        assert_eq!(h.reader.latest(), 1);
        let (s2, _) = s1
            .apply(Command::SwitchTag {
                domain: DomainName::parse("a.test").unwrap(),
                tag: Tag::parse("b").unwrap(),
            })
            .unwrap();
        assert_eq!(
            h.record(&s1, &s2, Source::Api, Some("127.0.0.1:5".into())),
            Some(2)
        );
        assert_eq!(
            h.record(&s2, &s2, Source::Api, None),
            None,
            "no change, no revision"
        );
        let s3 = state(&[("a.test", "b"), ("b.test", "a")]);
        assert_eq!(h.record(&s2, &s3, Source::Reload, None), Some(3));
        assert_eq!(h.reader.state_at(1).unwrap(), s1);
        assert_eq!(h.reader.state_at(2).unwrap(), s2);
        assert_eq!(h.reader.state_at(3).unwrap(), s3);
        let list = h.reader.list(10);
        assert_eq!(
            list.iter().map(|r| r.revision).collect::<Vec<_>>(),
            [3, 2, 1]
        );
        assert_eq!(list[1].client.as_deref(), Some("127.0.0.1:5"));
        assert_eq!(
            list[1].domains[0]
                .after
                .as_ref()
                .unwrap()
                .enabled_backends_tag
                .as_str(),
            "b"
        );

        // A new process on the same configuration continues the history as it is...
        let h = History::open(Some(&config), &s3, Arc::default());
        assert_eq!(h.reader.latest(), 3);
        assert_eq!(h.reader.state_at(2).unwrap(), s2);
        // ...and one on a configuration edited meanwhile records it as a start revision.
        let h = History::open(Some(&config), &s1, Arc::default());
        assert_eq!(h.reader.latest(), 4);
        assert_eq!(h.reader.list(1)[0].source, Source::Start);
        assert_eq!(h.reader.state_at(4).unwrap(), s1);
        assert_eq!(h.reader.state_at(3).unwrap(), s3);

        // Past the window the oldest go, and what is kept still rebuilds.
        let mut h = History::open(None, &s1, Arc::default());
        let (mut prev, mut next) = (s1.clone(), s2.clone());
        for _ in 0..MAX_REVISIONS + 5 {
            h.record(&prev, &next, Source::Api, None);
            std::mem::swap(&mut prev, &mut next);
        }
        assert_eq!(h.reader.list(usize::MAX).len(), MAX_REVISIONS);
        let oldest = h.reader.list(usize::MAX).last().unwrap().revision;
        assert!(h.reader.state_at(oldest).is_ok());
        assert!(matches!(
            h.reader.state_at(oldest - 1),
            Err(HistoryError::Unknown(_))
        ));
        assert_eq!(h.reader.state_at(h.reader.latest()).unwrap(), prev);
    }

    #[test]
    fn rfc3339() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        assert_eq!(rfc3339_utc(t), "2026-11-18T11:06:40Z");
        assert_eq!(rfc3339_utc(std::time::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }
}
