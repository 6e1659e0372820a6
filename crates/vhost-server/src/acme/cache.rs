//! The ACME cache directory: account credentials and one PEM file per domain (private key and
//! certificate chain together, so a renewal replaces both in one atomic rename).
//!
//! Layout under `cache_dir` (mode 0700, files 0600), `<ca>` being the directory URL made a file
//! name, so staging and production (or any two CAs) never share an account or a certificate:
//! - `accounts/<ca>.json`: the account;
//! - `certificates/<ca>/<domain>.pem`: key + chain of a domain.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A cache operation failed.
#[derive(Debug, thiserror::Error)]
#[error("ACME cache_dir {}: cannot {action}: {source}", path.display())]
pub(crate) struct CacheError {
    /// The file or directory.
    pub(crate) path: PathBuf,
    /// What was being done.
    pub(crate) action: &'static str,
    /// The I/O error.
    pub(crate) source: std::io::Error,
}

/// The cache directory.
#[derive(Debug, Clone)]
pub(crate) struct Cache {
    root: PathBuf,
    /// The CA's directory URL as a file name.
    ca: String,
}

fn err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(std::io::Error) -> CacheError + 'a {
    move |source| CacheError {
        path: path.to_owned(),
        action,
        source,
    }
}

impl Cache {
    /// The cache at `root` for the CA at `directory_url`.
    pub(crate) fn new(root: PathBuf, directory_url: &str) -> Self {
        let ca = directory_url
            .trim_start_matches("https://")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Self { root, ca }
    }

    /// Creates the directory tree (0700) if needed and proves it writable by writing and
    /// removing a probe file: better to fail before ordering than to lose a certificate.
    pub(crate) fn ensure_writable(&self) -> Result<(), CacheError> {
        for dir in [
            self.root.clone(),
            self.root.join("accounts"),
            self.root.join("certificates"),
            self.root.join("certificates").join(&self.ca),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(err(&dir, "create the directory"))?;
            let meta = std::fs::metadata(&dir).map_err(err(&dir, "inspect the directory"))?;
            if meta.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(err(&dir, "restrict the directory to its owner (0700)"))?;
            }
        }
        let probe = self
            .root
            .join("certificates")
            .join(&self.ca)
            .join(".write-probe");
        write_private(&probe, b"probe")?;
        std::fs::remove_file(&probe).map_err(err(&probe, "remove the write probe"))?;
        Ok(())
    }

    /// Where the account is kept.
    pub(crate) fn account_path(&self) -> PathBuf {
        self.root.join("accounts").join(format!("{}.json", self.ca))
    }

    /// Where the key and chain of `domain` are kept.
    pub(crate) fn certificate_path(&self, domain: &str) -> PathBuf {
        self.root
            .join("certificates")
            .join(&self.ca)
            .join(format!("{domain}.pem"))
    }

    /// Reads a file of the cache; `Ok(None)` if it does not exist.
    pub(crate) fn read(&self, path: &Path) -> Result<Option<Vec<u8>>, CacheError> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(path, "read")(e)),
        }
    }
}

/// Writes `bytes` to `path` atomically (temporary file in the same directory, fsync, rename),
/// readable by the owner only.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err(&tmp, "create"))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(err(&tmp, "write"))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(err(path, "replace"))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_private_and_writes_replace_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("acme"), "https://127.0.0.1:14000/dir");
        cache.ensure_writable().unwrap();
        let mode = std::fs::metadata(dir.path().join("acme"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let path = cache.certificate_path("shop.example.com");
        write_private(&path, b"one").unwrap();
        write_private(&path, b"two").unwrap();
        assert_eq!(cache.read(&path).unwrap().unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(cache
            .read(&cache.certificate_path("other.example.com"))
            .unwrap()
            .is_none());
        assert!(cache
            .account_path()
            .ends_with("accounts/127.0.0.1_14000_dir.json"));
        assert!(path.ends_with("certificates/127.0.0.1_14000_dir/shop.example.com.pem"));
    }

    #[test]
    fn an_unwritable_cache_is_reported_before_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"x").unwrap();
        // A path below a regular file can never be created, whoever runs the test.
        let cache = Cache::new(blocker.join("acme"), "https://ca.example/dir");
        let e = cache.ensure_writable().unwrap_err().to_string();
        assert!(e.contains("cannot create the directory"), "{e}");
    }
}
