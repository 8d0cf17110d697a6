//! Where a test's processes write their configuration and logs.
//!
//! `target/laneguard-tests/<label>-<pid>-<n>/`. Every process handle holds a clone; when
//! the last clone is dropped the directory is removed, unless the thread is panicking (a
//! failed assertion) or `LANEGUARD_KEEP_LOGS` is set, so a failure leaves its logs behind.

use crate::{target_dir, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

static SEQ: AtomicUsize = AtomicUsize::new(0);

#[derive(Clone, Debug)]
pub struct RunDir(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    path: PathBuf,
}

impl RunDir {
    pub fn new(label: &str) -> Result<RunDir> {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let safe: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = target_dir()
            .join("laneguard-tests")
            .join(format!("{safe}-{}-{n}", std::process::id()));
        if path.exists() {
            let _ = std::fs::remove_dir_all(&path);
        }
        std::fs::create_dir_all(&path).context(|| format!("creating {}", path.display()))?;
        Ok(RunDir(Arc::new(Inner { path })))
    }

    pub fn path(&self) -> &Path {
        &self.0.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.0.path.join(name)
    }
}

impl AsRef<Path> for RunDir {
    fn as_ref(&self) -> &Path {
        self.path()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let keep = std::thread::panicking() || std::env::var_os("LANEGUARD_KEEP_LOGS").is_some();
        if keep {
            eprintln!("laneguard-tests: logs kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
