//! The usage ledger: one JSON line per finished request, for billing
//! reconciliation (`relaygate usage` reads it back, see `cmd::usage`).
//!
//! A request never waits on the ledger. `Ledger::record` is a `try_send` into
//! a bounded queue; when the queue is full the line is dropped and counted in
//! `relaygate_ledger_dropped_total`. One writer task drains the queue in
//! batches, writes each batch through a `BufWriter` on the blocking pool and
//! flushes after every batch, so a crash loses at most the batch in flight
//! plus whatever was still queued. `Ledger::close` (graceful shutdown) stops
//! accepting lines, writes everything queued, flushes and syncs the file.
//!
//! The file format is documented in `docs/ledger.md`.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prometheus::IntCounter;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify};

/// Most lines written (and flushed) in one batch. Large enough that a burst
/// costs few flushes, small enough that one batch is a short blocking write.
const MAX_BATCH: usize = 512;

/// Write errors tend to repeat (a full disk): log at most one per interval.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One finished request, serialised as one JSON object per line (JSONL).
/// The field names are a file format: `docs/ledger.md` describes each one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LedgerLine {
    /// RFC 3339 UTC with milliseconds, when the request finished (see `format_time`).
    pub time: String,
    pub request_id: String,
    /// The client key's configured name, never the key itself.
    pub key: String,
    /// The configured model name (`other` for a model the config does not know).
    pub model: String,
    /// The upstream that answered last, if any attempt was made.
    pub upstream: Option<String>,
    /// The model name sent to that upstream.
    pub upstream_model: Option<String>,
    pub status: u16,
    /// success, client_error, upstream_error, timeout, rate_limited, circuit_open, overloaded, cancelled.
    pub outcome: String,
    pub stream: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
    /// prompt - cached: the input billed at the cache-miss price.
    pub billable_input_tokens: u64,
    /// completion (reasoning included).
    pub billable_output_tokens: u64,
    pub cost_usd: f64,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub attempts: u32,
    /// True when usage was estimated (e.g. a stream cut before its usage chunk).
    pub usage_estimated: bool,
    /// A shadow (mirrored) request; false when absent.
    #[serde(default)]
    pub shadow: bool,
    /// For `temperature: 0` requests of a model with a shadow: a hash of the
    /// answer's text, so `relaygate compare` can count exact matches between
    /// a primary and its shadow (same `request_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_hash: Option<String>,
    /// For a model with the response cache on: `hit` (answered from the
    /// cache: no tokens bought, cost 0, `saved_usd` set), `miss`, `refresh`
    /// or `bypass`. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    /// A hit: the price of the usage it replayed instead of buying it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_usd: Option<f64>,
}

/// Calls `each` with every line of the ledger at `path` that parses
/// (malformed and blank lines are skipped), reading it once, in order.
pub fn read(path: &Path, mut each: impl FnMut(LedgerLine)) -> io::Result<()> {
    use std::io::BufRead;
    let mut reader = io::BufReader::new(File::open(path)?);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            return Ok(());
        }
        if let Ok(line) = serde_json::from_slice::<LedgerLine>(&buf) {
            each(line);
        }
    }
}

/// `time` as the ledger writes it: RFC 3339 UTC with milliseconds,
/// e.g. `2025-06-01T12:00:00.123Z`.
pub fn format_time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The bounded, batching ledger writer. Cheap to clone: every clone feeds the
/// same queue and file.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    tx: mpsc::Sender<LedgerLine>,
    dropped: IntCounter,
    /// Tells the writer to stop accepting lines and drain.
    shutdown: Arc<Notify>,
    /// Becomes true once the writer has written and flushed everything.
    done: watch::Receiver<bool>,
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Ledger {
    /// Opens (appends to, creating if missing) `path`, and spawns the writer
    /// task on the current tokio runtime. `capacity` bounds the queue of lines
    /// waiting to be written (0 is taken as 1). `dropped` is the counter
    /// `relaygate_ledger_dropped_total`; the caller creates and registers it.
    ///
    /// Fails if the file cannot be opened for appending, or if there is no
    /// current tokio runtime.
    pub fn open(path: &Path, capacity: usize, dropped: IntCounter) -> io::Result<Ledger> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| io::Error::other(format!("the ledger needs a tokio runtime: {e}")))?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open ledger {}: {e}", path.display())))?;
        let sink = Sink {
            path: path.to_path_buf(),
            file: Some(BufWriter::new(file)),
            // A crash mid-write can leave a torn last line: start on a fresh
            // line so it does not swallow the first new one.
            needs_newline: ends_mid_line(path),
            dropped: dropped.clone(),
            errors: ErrorLog::default(),
        };
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let shutdown = Arc::new(Notify::new());
        let (done_tx, done) = watch::channel(false);
        runtime.spawn(write_loop(rx, Arc::clone(&shutdown), sink, done_tx));
        Ok(Ledger {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                tx,
                dropped,
                shutdown,
                done,
            }),
        })
    }

    /// Queues `line` for writing. Never blocks and never awaits: if the queue
    /// is full, or the ledger is closed, the line is dropped and counted.
    pub fn record(&self, line: LedgerLine) {
        if self.inner.tx.try_send(line).is_err() {
            self.inner.dropped.inc();
        }
    }

    /// Stops accepting lines, writes everything queued, flushes and syncs
    /// (`fsync`) the file, and returns when done. Idempotent; every caller
    /// waits for the same drain. The caller bounds it with its own timeout.
    pub async fn close(&self) {
        self.inner.shutdown.notify_one();
        let mut done = self.inner.done.clone();
        // An Err means the writer is gone (its task ended): nothing left to wait for.
        let _ = done.wait_for(|finished| *finished).await;
    }

    /// The file this ledger appends to.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

/// Whether the file's last byte is not a newline. Best effort: a file that
/// cannot be read (or is not a regular file) is taken as ending cleanly.
fn ends_mid_line(path: &Path) -> bool {
    let check = || -> io::Result<bool> {
        let mut f = File::open(path)?;
        let meta = f.metadata()?;
        if !meta.is_file() || meta.len() == 0 {
            return Ok(false);
        }
        f.seek(SeekFrom::End(-1))?;
        let mut last = [0u8; 1];
        f.read_exact(&mut last)?;
        Ok(last[0] != b'\n')
    };
    check().unwrap_or(false)
}

/// The writer task: wait for a line, take whatever else is queued (up to
/// `MAX_BATCH`), write and flush the batch, repeat. On shutdown the queue is
/// closed, drained to the end, and `done` is set.
async fn write_loop(
    mut rx: mpsc::Receiver<LedgerLine>,
    shutdown: Arc<Notify>,
    mut sink: Sink,
    done: watch::Sender<bool>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut closing = false;
    loop {
        let first = if closing {
            rx.recv().await
        } else {
            tokio::select! {
                line = rx.recv() => line,
                () = shutdown.notified() => {
                    // From here `try_send` fails; what is queued is still received.
                    rx.close();
                    closing = true;
                    continue;
                }
            }
        };
        // None: closed and empty, or every `Ledger` handle was dropped.
        let Some(first) = first else { break };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(line) => batch.push(line),
                Err(_) => break,
            }
        }
        batch = sink.write_batch(batch).await;
    }
    sink.sync().await;
    let _ = done.send(true);
}

/// The file side of the writer. Owned by the writer task; the file itself
/// moves onto the blocking pool for each batch and comes back.
struct Sink {
    path: PathBuf,
    /// None only if a blocking write panicked and took the file with it;
    /// the next batch reopens it.
    file: Option<BufWriter<File>>,
    /// The previous write may have left a partial line.
    needs_newline: bool,
    dropped: IntCounter,
    errors: ErrorLog,
}

impl Sink {
    /// Writes and flushes `batch`; returns it emptied, for reuse. On an
    /// error the whole batch is counted as dropped (some of it may have
    /// reached the file) and the next batch starts on a fresh line.
    async fn write_batch(&mut self, batch: Vec<LedgerLine>) -> Vec<LedgerLine> {
        let n = batch.len();
        let file = self.file.take();
        let path = self.path.clone();
        let needs_newline = self.needs_newline;
        let job = tokio::task::spawn_blocking(move || write_blocking(file, &path, needs_newline, batch));
        let (file, batch, result) = match job.await {
            Ok(out) => out,
            Err(e) => (
                None,
                Vec::with_capacity(MAX_BATCH),
                Err(io::Error::other(e.to_string())),
            ),
        };
        self.file = file;
        match result {
            Ok(()) => self.needs_newline = false,
            Err(e) => {
                self.needs_newline = true;
                self.dropped.inc_by(n as u64);
                self.errors.report(&self.path, &e, n);
            }
        }
        batch
    }

    /// Flushing each batch hands it to the OS, which is enough if the
    /// process dies; on shutdown also ask the OS to put it on the disk.
    async fn sync(&mut self) {
        let Some(w) = self.file.take() else { return };
        let job = tokio::task::spawn_blocking(move || {
            let result = w.get_ref().sync_data();
            (w, result)
        });
        if let Ok((w, result)) = job.await {
            self.file = Some(w);
            if let Err(e) = result {
                self.errors.report(&self.path, &e, 0);
            }
        }
    }
}

type WriteOutcome = (Option<BufWriter<File>>, Vec<LedgerLine>, io::Result<()>);

/// Runs on the blocking pool: serialise each line, write, flush.
fn write_blocking(
    file: Option<BufWriter<File>>,
    path: &Path,
    needs_newline: bool,
    mut batch: Vec<LedgerLine>,
) -> WriteOutcome {
    let mut w = match file {
        Some(w) => w,
        None => match OpenOptions::new().create(true).append(true).open(path) {
            Ok(f) => BufWriter::new(f),
            Err(e) => {
                batch.clear();
                return (None, batch, Err(e));
            }
        },
    };
    let result = (|| -> io::Result<()> {
        if needs_newline {
            w.write_all(b"\n")?;
        }
        for line in &mut batch {
            sanitize(line);
            serde_json::to_writer(&mut w, line)?;
            w.write_all(b"\n")?;
        }
        w.flush()
    })();
    batch.clear();
    let w = match result {
        Ok(()) => w,
        // Throw away what is still buffered (it would be retried on drop,
        // out of order) and keep the file for the next batch.
        Err(_) => BufWriter::new(w.into_parts().0),
    };
    (Some(w), batch, result)
}

/// JSON has no NaN or infinity (serde_json would write `null`, which the
/// reader rejects): a non-finite measurement is written as 0 or absent.
fn sanitize(line: &mut LedgerLine) {
    if !line.cost_usd.is_finite() {
        line.cost_usd = 0.0;
    }
    if !line.latency_ms.is_finite() {
        line.latency_ms = 0.0;
    }
    if line.ttft_ms.is_some_and(|t| !t.is_finite()) {
        line.ttft_ms = None;
    }
}

/// Rate-limits write-error logs to one per `ERROR_LOG_INTERVAL`, carrying a
/// count of the errors it kept quiet about.
#[derive(Default)]
struct ErrorLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    /// `lines`: how many lines the failed write lost (0 for a failed sync).
    fn report(&mut self, path: &Path, error: &io::Error, lines: usize) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < ERROR_LOG_INTERVAL) {
            self.suppressed += 1;
            return;
        }
        tracing::error!(
            path = %path.display(),
            %error,
            lines,
            suppressed_errors = self.suppressed,
            "ledger write failed; lost lines are counted in relaygate_ledger_dropped_total"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> IntCounter {
        IntCounter::new("relaygate_ledger_dropped_total", "test").unwrap()
    }

    fn line(id: &str) -> LedgerLine {
        LedgerLine {
            time: "2025-06-01T12:00:00.000Z".into(),
            request_id: id.into(),
            key: "team-a".into(),
            model: "deepseek-chat".into(),
            upstream: Some("holysheep".into()),
            upstream_model: Some("deepseek-v3.2".into()),
            status: 200,
            outcome: "success".into(),
            stream: false,
            prompt_tokens: 10,
            completion_tokens: 5,
            cached_tokens: 2,
            reasoning_tokens: 0,
            billable_input_tokens: 8,
            billable_output_tokens: 5,
            cost_usd: 0.000_004_34,
            latency_ms: 12.5,
            ttft_ms: None,
            attempts: 1,
            usage_estimated: false,
            shadow: false,
            content_hash: None,
            cache: None,
            saved_usd: None,
        }
    }

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "relaygate-ledger-unit-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    fn read_lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn format_time_is_rfc3339_utc_with_millis() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_748_779_200_123);
        assert_eq!(format_time(t), "2025-06-01T12:00:00.123Z");
    }

    #[test]
    fn shadow_defaults_to_false_when_absent() {
        let mut v = serde_json::to_value(line("a")).unwrap();
        v.as_object_mut().unwrap().remove("shadow");
        let back: LedgerLine = serde_json::from_value(v).unwrap();
        assert!(!back.shadow);
    }

    #[test]
    fn sanitize_replaces_non_finite_numbers() {
        let mut l = line("a");
        l.cost_usd = f64::NAN;
        l.latency_ms = f64::INFINITY;
        l.ttft_ms = Some(f64::NAN);
        sanitize(&mut l);
        assert_eq!((l.cost_usd, l.latency_ms, l.ttft_ms), (0.0, 0.0, None));
    }

    #[tokio::test]
    async fn non_finite_numbers_still_produce_a_readable_line() {
        let path = temp_path("nan.jsonl");
        let ledger = Ledger::open(&path, 8, counter()).unwrap();
        let mut l = line("nan");
        l.cost_usd = f64::NAN;
        ledger.record(l);
        ledger.close().await;
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 1);
        let back: LedgerLine = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(back.cost_usd, 0.0);
    }

    #[tokio::test]
    async fn a_torn_last_line_does_not_swallow_the_next_one() {
        let path = temp_path("torn.jsonl");
        std::fs::write(&path, "{\"time\":\"2025-06-01T12:0").unwrap();
        let ledger = Ledger::open(&path, 8, counter()).unwrap();
        ledger.record(line("after-crash"));
        ledger.close().await;
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0], "{\"time\":\"2025-06-01T12:0");
        let back: LedgerLine = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(back.request_id, "after-crash");
    }

    #[tokio::test]
    async fn record_after_close_is_dropped_and_counted() {
        let path = temp_path("closed.jsonl");
        let dropped = counter();
        let ledger = Ledger::open(&path, 8, dropped.clone()).unwrap();
        ledger.record(line("before"));
        ledger.close().await;
        ledger.close().await; // idempotent
        ledger.record(line("after"));
        assert_eq!(dropped.get(), 1);
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("\"before\""));
    }

    #[tokio::test]
    async fn dropping_every_handle_still_flushes_what_was_queued() {
        let path = temp_path("dropped-handles.jsonl");
        let ledger = Ledger::open(&path, 8, counter()).unwrap();
        let mut done = ledger.inner.done.clone();
        ledger.record(line("x"));
        drop(ledger);
        done.wait_for(|d| *d).await.unwrap();
        assert_eq!(read_lines(&path).len(), 1);
    }

    #[test]
    fn open_without_a_runtime_is_an_error_not_a_panic() {
        let err = Ledger::open(&temp_path("no-rt.jsonl"), 8, counter()).unwrap_err();
        assert!(err.to_string().contains("tokio runtime"), "{err}");
    }

    #[tokio::test]
    async fn open_error_names_the_path() {
        let path = temp_path("missing-dir").join("nested").join("usage.jsonl");
        let err = Ledger::open(&path, 8, counter()).unwrap_err();
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }

    /// `/dev/full` accepts the open and fails every write with ENOSPC: each
    /// line of a failed batch is counted as dropped, and close still returns.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn write_errors_count_the_batch_as_dropped() {
        let full = Path::new("/dev/full");
        if !full.exists() {
            return;
        }
        let dropped = counter();
        let ledger = Ledger::open(full, 64, dropped.clone()).unwrap();
        for i in 0..10 {
            ledger.record(line(&i.to_string()));
        }
        ledger.close().await;
        assert_eq!(dropped.get(), 10);
    }
}
