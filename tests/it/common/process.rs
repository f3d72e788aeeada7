//! Running the real `relaygate` binary from tests.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_relaygate");

/// A fresh directory of its own under the system temp dir.
pub fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relaygate-test-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `contents` written to `name` in a fresh temp dir.
pub fn temp_file(name: &str, contents: &str) -> PathBuf {
    let path = temp_dir().join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// A memory figure of a process (`pid`, or `"self"`) from
/// `/proc/<pid>/status`, in bytes: `field` is `"VmRSS"` (resident now) or
/// `"VmHWM"` (its peak).
pub fn proc_status_bytes(pid: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    kib * 1024
}

/// A running `relaygate` process and the address it printed.
pub struct Proc {
    pub child: Child,
    pub url: String,
    stdout: BufReader<tokio::process::ChildStdout>,
}

impl Proc {
    /// Starts `relaygate ARGS` and waits for its `listening on` line. With
    /// `capture_stderr`, stderr is kept for `finish` (read it: a full pipe
    /// would block the process); otherwise it is discarded.
    pub async fn spawn(args: &[&str], env: &[(&str, &str)]) -> Proc {
        Self::spawn_with(args, env, true).await
    }

    pub async fn spawn_quiet(args: &[&str]) -> Proc {
        Self::spawn_with(args, &[], false).await
    }

    async fn spawn_with(args: &[&str], env: &[(&str, &str)], capture_stderr: bool) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(if capture_stderr { Stdio::piped() } else { Stdio::null() })
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut proc = Proc {
            child,
            url: String::new(),
            stdout,
        };
        proc.url = loop {
            if let Some(url) = proc.next_line().await.strip_prefix("relaygate listening on ") {
                break url.to_owned();
            }
        };
        proc
    }

    /// The next line of stdout (without its newline), waiting up to 10 s.
    pub async fn next_line(&mut self) -> String {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), self.stdout.read_line(&mut line))
            .await
            .expect("relaygate prints a line")
            .unwrap();
        assert!(n > 0, "relaygate closed stdout");
        line.truncate(line.trim_end().len());
        line
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().unwrap().to_string();
        let status = std::process::Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for exit; returns the exit code, the rest of stdout and all of stderr.
    pub async fn finish(mut self) -> (i32, String, String) {
        let mut stderr = self.child.stderr.take().unwrap();
        let mut out = String::new();
        let mut err = String::new();
        let (status, _, _) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(
                self.child.wait(),
                self.stdout.read_to_string(&mut out),
                stderr.read_to_string(&mut err)
            )
        })
        .await
        .expect("relaygate exits");
        (status.unwrap().code().unwrap_or(-1), out, err)
    }
}
