//! A minimal `log` backend: one line per record on stderr, level from `LANEGUARD_LOG`.

use std::io::Write;
use std::str::FromStr;

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    level: LevelFilter,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            // Logging must never take the service down: a failed write is dropped.
            let _ = writeln!(
                std::io::stderr().lock(),
                "[{} {}] {}",
                record.level(),
                record.target(),
                record.args()
            );
        }
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// Install the logger. The level is `LANEGUARD_LOG` (`off`, `error`, ... `trace`), default
/// `info`; an unreadable value falls back to `info` and says so.
pub fn init() {
    let raw = std::env::var("LANEGUARD_LOG").ok();
    let parsed = raw.as_deref().map(LevelFilter::from_str);
    let level = match parsed {
        Some(Ok(level)) => level,
        _ => LevelFilter::Info,
    };
    // Installed once per process; the leak is the logger's 'static lifetime.
    let logger: &'static StderrLogger = Box::leak(Box::new(StderrLogger { level }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
    if let (Some(raw), Some(Err(_))) = (raw, parsed) {
        log::warn!("LANEGUARD_LOG={raw:?} is not a log level; using info");
    }
}
