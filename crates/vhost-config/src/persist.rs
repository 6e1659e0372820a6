//! Write-back of runtime changes: the config file stays the single source of truth.
//!
//! The admin API applies a [`Command`](vhost_routing::Command) to the model, then hands the
//! resulting [`Change`] to [`ConfigWriter::persist`], which edits only the affected
//! `[[virtual_hosts]]` / `[[backends]]` entry of the file as it is on disk now (comments,
//! ordering and formatting of everything else — including hand edits made since start-up — are
//! kept, thanks to `toml_edit`) and replaces the file atomically: temp file in the same directory,
//! fsync, rename, fsync of the directory. A crash at any instant leaves either the old or the new
//! file. If anything fails, the file is unchanged. The file is parsed per change rather than kept
//! in memory: writes are rare, and a parsed 10 000-domain document would cost megabytes.

use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;
use toml_edit::{Array, ArrayOfTables, DocumentMut, InlineTable, Item, Table, Value};
use vhost_routing::{
    Backend, BackendId, Change, DomainName, ProbeKind, ProbeOverride, VirtualHost,
};

/// Persisting failed; the file on disk is unchanged.
#[derive(Debug, Error)]
pub enum PersistError {
    /// The file could not be read or parsed when the writer was opened.
    #[error("cannot open {} for write-back: {message}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// `virtual_hosts` or `backends` is not an array of tables.
    #[error("cannot edit {}: `{key}` is not an array of tables", path.display())]
    Shape {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
    },
    /// The entry to change is not in the file (it was edited by hand since it was loaded).
    #[error("cannot edit {}: no `{key}` entry for {name}; was the file edited by hand?", path.display())]
    MissingEntry {
        /// The file.
        path: PathBuf,
        /// `virtual_hosts` or `backends`.
        key: &'static str,
        /// The domain or id looked for.
        name: String,
    },
    /// Writing the new file failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Writes changes back to the config file.
#[derive(Debug)]
pub struct ConfigWriter {
    path: PathBuf,
}

const VHOSTS: &str = "virtual_hosts";
const BACKENDS: &str = "backends";

impl ConfigWriter {
    /// Prepares write-back to the file at `path` (following a symlink to the real file), checking
    /// that it can be read and parsed.
    pub fn open(path: &Path) -> Result<Self, PersistError> {
        let real = std::fs::canonicalize(path).map_err(|e| PersistError::Open {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let writer = Self { path: real };
        writer.read()?;
        Ok(writer)
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<DocumentMut, PersistError> {
        let open_err = |message: String| PersistError::Open {
            path: self.path.clone(),
            message,
        };
        std::fs::read_to_string(&self.path)
            .map_err(|e| open_err(e.to_string()))?
            .parse::<DocumentMut>()
            .map_err(|e| open_err(e.to_string()))
    }

    /// Applies `change` to the file. On error the file is unchanged.
    pub fn persist(&mut self, change: &Change) -> Result<(), PersistError> {
        let mut doc = self.read()?;
        self.edit(&mut doc, change)?;
        write_atomically(&self.path, doc.to_string().as_bytes()).map_err(|source| {
            PersistError::Write {
                path: self.path.clone(),
                source,
            }
        })
    }

    /// Writes several changes to the file in one atomic replacement (all or none).
    pub fn persist_all(&mut self, changes: &[Change]) -> Result<(), PersistError> {
        let mut doc = self.read()?;
        for change in changes {
            self.edit(&mut doc, change)?;
        }
        write_atomically(&self.path, doc.to_string().as_bytes()).map_err(|source| {
            PersistError::Write {
                path: self.path.clone(),
                source,
            }
        })
    }

    fn edit(&self, doc: &mut DocumentMut, change: &Change) -> Result<(), PersistError> {
        match change {
            Change::DomainAdded(v) => self
                .entries(doc, VHOSTS)?
                .push(vhost_table(v, Table::new())),
            Change::DomainUpdated { after: v, .. } | Change::TagSwitched { vhost: v, .. } => {
                let i = self.find_vhost(doc, &v.domain)?;
                let entries = self.entries(doc, VHOSTS)?;
                if let Some(t) = entries.get_mut(i) {
                    let old = std::mem::take(t);
                    *t = vhost_table(v, old);
                }
            }
            Change::DomainDeleted(v) => {
                let i = self.find_vhost(doc, &v.domain)?;
                self.entries(doc, VHOSTS)?.remove(i);
            }
            Change::BackendAdded(b) => {
                self.entries(doc, BACKENDS)?
                    .push(backend_table(b, Table::new()));
            }
            Change::BackendUpdated { after: b, .. } => {
                let i = self.find_backend(doc, &b.id)?;
                let entries = self.entries(doc, BACKENDS)?;
                if let Some(t) = entries.get_mut(i) {
                    let old = std::mem::take(t);
                    *t = backend_table(b, old);
                }
            }
            Change::BackendDeleted(b) => {
                let i = self.find_backend(doc, &b.id)?;
                self.entries(doc, BACKENDS)?.remove(i);
            }
        }
        Ok(())
    }

    /// The array of tables under `key`, created if absent; an inline array of inline tables is
    /// converted to `[[key]]` form.
    fn entries<'d>(
        &self,
        doc: &'d mut DocumentMut,
        key: &'static str,
    ) -> Result<&'d mut ArrayOfTables, PersistError> {
        let shape_err = || PersistError::Shape {
            path: self.path.clone(),
            key,
        };
        if let Some(Item::Value(Value::Array(_))) = doc.get(key) {
            // The key's own comment would end up inside the `[[key]]` header: move it in front
            // of the first table instead.
            let prefix = doc.as_table_mut().key_mut(key).and_then(|mut k| {
                let prefix = k.leaf_decor().prefix().cloned();
                k.leaf_decor_mut().clear();
                prefix
            });
            if let Some(item) = doc.get_mut(key) {
                let mut converted = std::mem::take(item)
                    .into_array_of_tables()
                    .map_err(|_| shape_err())?;
                if let (Some(prefix), Some(first)) = (prefix, converted.get_mut(0)) {
                    first.decor_mut().set_prefix(prefix);
                }
                *item = Item::ArrayOfTables(converted);
            }
        }
        doc.entry(key)
            .or_insert_with(|| Item::ArrayOfTables(ArrayOfTables::new()))
            .as_array_of_tables_mut()
            .ok_or_else(shape_err)
    }

    fn find_vhost(
        &self,
        doc: &mut DocumentMut,
        domain: &DomainName,
    ) -> Result<usize, PersistError> {
        let entries = self.entries(doc, VHOSTS)?;
        entries
            .iter()
            .position(|t| {
                t.get("domain")
                    .and_then(Item::as_str)
                    .and_then(|s| DomainName::parse(s).ok())
                    .is_some_and(|d| &d == domain)
            })
            .ok_or_else(|| PersistError::MissingEntry {
                path: self.path.clone(),
                key: VHOSTS,
                name: domain.to_string(),
            })
    }

    fn find_backend(&self, doc: &mut DocumentMut, id: &BackendId) -> Result<usize, PersistError> {
        let entries = self.entries(doc, BACKENDS)?;
        entries
            .iter()
            .position(|t| t.get("id").and_then(Item::as_str) == Some(id.as_str()))
            .ok_or_else(|| PersistError::MissingEntry {
                path: self.path.clone(),
                key: BACKENDS,
                name: id.to_string(),
            })
    }
}

/// Sets `key` to `new`, keeping the comment and spacing around the old value if there was one.
fn set(table: &mut Table, key: &str, new: Value) {
    match table.get_mut(key).and_then(Item::as_value_mut) {
        Some(old) => {
            let decor = old.decor().clone();
            *old = new;
            *old.decor_mut() = decor;
        }
        None => {
            table.insert(key, Item::Value(new));
        }
    }
}

/// Sets an optional key; `None` removes it.
fn set_opt(table: &mut Table, key: &str, new: Option<Value>) {
    match new {
        Some(v) => set(table, key, v),
        None => {
            table.remove(key);
        }
    }
}

fn str_value(s: &str) -> Value {
    Value::from(s)
}

fn vhost_table(v: &VirtualHost, mut t: Table) -> Table {
    set(&mut t, "domain", str_value(v.domain.as_str()));
    set(
        &mut t,
        "enabled_backends_tag",
        str_value(v.enabled_backends_tag.as_str()),
    );
    if v.http_to_https || t.contains_key("http_to_https") {
        set(&mut t, "http_to_https", Value::from(v.http_to_https));
    }
    set_opt(
        &mut t,
        "tls_cert_path",
        v.tls_cert_path.as_deref().map(str_value),
    );
    set_opt(
        &mut t,
        "tls_key_path",
        v.tls_key_path.as_deref().map(str_value),
    );
    set_opt(&mut t, "canary", v.canary.as_deref().map(canary_value));
    set_opt(&mut t, "acme", v.acme.map(Value::from));
    set_opt(
        &mut t,
        "rate_limit",
        v.rate_limit.as_deref().map(rate_limit_value),
    );
    for (key, list) in [("allow", &v.allow), ("deny", &v.deny)] {
        let value = (!list.is_empty()).then(|| {
            let array: Array = list.iter().map(|c| c.to_string()).collect();
            Value::Array(array)
        });
        set_opt(&mut t, key, value);
    }
    set_opt(
        &mut t,
        "request_headers",
        v.request_headers.as_deref().map(header_rules_value),
    );
    set_opt(
        &mut t,
        "response_headers",
        v.response_headers.as_deref().map(header_rules_value),
    );
    t
}

fn rate_limit_value(r: &vhost_routing::RateLimit) -> Value {
    let mut t = InlineTable::new();
    t.insert(
        "requests_per_second",
        Value::from(i64::from(r.requests_per_second)),
    );
    if let Some(burst) = r.burst {
        t.insert("burst", Value::from(i64::from(burst)));
    }
    if r.key != vhost_routing::RateLimitKey::ClientIp {
        t.insert("key", Value::from(r.key.as_text().as_ref()));
    }
    Value::InlineTable(t)
}

fn header_rules_value(r: &vhost_routing::HeaderRules) -> Value {
    let map = |m: &std::collections::BTreeMap<String, String>| {
        let mut t = InlineTable::new();
        for (k, v) in m {
            t.insert(k, Value::from(v.as_str()));
        }
        Value::InlineTable(t)
    };
    let mut t = InlineTable::new();
    if !r.set.is_empty() {
        t.insert("set", map(&r.set));
    }
    if !r.add.is_empty() {
        t.insert("add", map(&r.add));
    }
    if !r.remove.is_empty() {
        let names: Array = r.remove.iter().map(String::as_str).collect();
        t.insert("remove", Value::Array(names));
    }
    Value::InlineTable(t)
}

fn canary_value(c: &vhost_routing::Canary) -> Value {
    let mut t = InlineTable::new();
    t.insert("tag", Value::from(c.tag.as_str()));
    t.insert("weight", Value::from(c.weight.percent()));
    t.insert("sticky_key", Value::from(c.sticky_key.as_text().as_ref()));
    if !c.steps.is_empty() {
        let steps: Array = c.steps.iter().map(|w| w.percent()).collect();
        t.insert("steps", Value::Array(steps));
    }
    if c.step_interval_secs != 60 {
        t.insert(
            "step_interval_secs",
            Value::from(to_i64(c.step_interval_secs)),
        );
    }
    if let Some(a) = &c.analysis {
        let mut at = InlineTable::new();
        if let Some(r) = a.max_error_rate {
            at.insert("max_error_rate", Value::from(r.get()));
        }
        if let Some(ms) = a.max_p99_ms {
            at.insert("max_p99_ms", Value::from(to_i64(ms)));
        }
        if let Some(r) = a.max_p99_ratio {
            at.insert("max_p99_ratio", Value::from(r.get()));
        }
        at.insert("min_requests", Value::from(to_i64(a.min_requests)));
        at.insert("interval_secs", Value::from(to_i64(a.interval_secs)));
        at.insert("failure_limit", Value::from(i64::from(a.failure_limit)));
        t.insert("analysis", Value::InlineTable(at));
    }
    if c.state != vhost_routing::RolloutState::Progressing {
        t.insert("state", Value::from(c.state.as_str()));
    }
    if c.step != 0 {
        t.insert("step", Value::from(to_i64(c.step as u64)));
    }
    if let Some(reason) = &c.abort_reason {
        t.insert("abort_reason", Value::from(reason.as_str()));
    }
    Value::InlineTable(t)
}

/// TOML integers are i64; validated settings are far below its maximum.
fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn backend_table(b: &Backend, mut t: Table) -> Table {
    set(&mut t, "id", str_value(b.id.as_str()));
    set(&mut t, "address", str_value(b.address.as_str()));
    let tags: Array = b.tags.iter().map(|tag| tag.as_str()).collect();
    set(&mut t, "tags", Value::Array(tags));
    if b.weight != 1 || t.contains_key("weight") {
        set(&mut t, "weight", Value::from(i64::from(b.weight)));
    }
    set_opt(
        &mut t,
        "health_check",
        b.health_check.as_ref().map(probe_value),
    );
    let protocol = (!b.protocol.is_default() || t.contains_key("protocol"))
        .then(|| str_value(b.protocol.as_str()));
    set_opt(&mut t, "protocol", protocol);
    let verify = (!b.tls_verify || t.contains_key("tls_verify")).then(|| Value::from(b.tls_verify));
    set_opt(&mut t, "tls_verify", verify);
    set_opt(
        &mut t,
        "tls_sni",
        b.tls_sni.as_ref().map(|n| str_value(n.as_str())),
    );
    set_opt(
        &mut t,
        "tls_ca_path",
        b.tls_ca_path.as_deref().map(str_value),
    );
    t
}

fn probe_value(p: &ProbeOverride) -> Value {
    let mut t = InlineTable::new();
    if let Some(kind) = p.kind {
        let kind = match kind {
            ProbeKind::Tcp => "tcp",
            ProbeKind::Http => "http",
            ProbeKind::Grpc => "grpc",
        };
        t.insert("kind", Value::from(kind));
    }
    if let Some(path) = &p.path {
        t.insert("path", Value::from(path.as_str()));
    }
    if let Some(host) = &p.host {
        t.insert("host", Value::from(host.as_str()));
    }
    if let Some([lo, hi]) = p.expected_status {
        let range: Array = [i64::from(lo), i64::from(hi)].into_iter().collect();
        t.insert("expected_status", Value::Array(range));
    }
    Value::InlineTable(t)
}

/// Replaces `path` with `contents` so that a crash leaves the old or the new file, never a mix:
/// write a temp file beside it, fsync it, rename it over `path`, fsync the directory.
pub fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".pingora-vhost-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    if let Ok(meta) = std::fs::metadata(path) {
        tmp.as_file().set_permissions(meta.permissions())?;
    }
    tmp.write_all(contents)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}
