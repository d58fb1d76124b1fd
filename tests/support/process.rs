//! The `keygate` binary as users run it: subcommands, and `keygate run` as a child
//! process whose listening address is read from its own log.

use std::io::{BufRead as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// What a finished command printed.
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A command with a clean environment (no `KEYGATE_CONFIG`, no `RUST_LOG`, and
/// none of the secrets unless given in `env`).
fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    command_on(None, args, env)
}

/// `command`, run on one CPU (`taskset -c CPU`) if `cpu` is given.
fn command_on(cpu: Option<usize>, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = match cpu {
        Some(cpu) => {
            let mut taskset = Command::new("taskset");
            taskset.args(["-c", &cpu.to_string(), env!("CARGO_BIN_EXE_keygate")]);
            taskset
        }
        None => Command::new(env!("CARGO_BIN_EXE_keygate")),
    };
    cmd.args(args)
        .env_remove("KEYGATE_CONFIG")
        .env_remove("RUST_LOG")
        .env_remove("CONFLUENCE_API_TOKEN")
        .env_remove("KEYGATE_ADMIN_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `keygate ARGS` to completion, feeding `stdin` if given.
pub fn cli(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Output {
    let mut cmd = command(args, env);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `keygate run` as a child process.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    /// The ops listener, if configured.
    pub ops: Option<SocketAddr>,
    /// Everything it wrote to standard error (JSON log lines).
    pub log: PathBuf,
}

impl Process {
    /// Starts `keygate --log-format json run --config CONFIG`, with standard
    /// output going to `stdout`; returns once it listens (bounded).
    pub fn spawn(config: &Path, stdout: Stdio, env: &[(&str, &str)]) -> Process {
        Process::spawn_on(None, config, stdout, env)
    }

    /// `spawn`, on one CPU if `cpu` is given (keygate then runs its
    /// single-threaded scheduler, as on a one-core machine).
    pub fn spawn_on(
        cpu: Option<usize>,
        config: &Path,
        stdout: Stdio,
        env: &[(&str, &str)],
    ) -> Process {
        let log = config.with_file_name("keygate.log");
        let mut child = command_on(
            cpu,
            &[
                "--log-format",
                "json",
                "run",
                "--config",
                config.to_str().unwrap(),
            ],
            env,
        )
        .env(
            "RUST_LOG",
            env.iter()
                .find(|(k, _)| *k == "RUST_LOG")
                .map_or("info", |(_, v)| *v),
        )
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut file = std::fs::File::create(&log).unwrap();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = writeln!(file, "{line}");
                if !sent {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                    if v["message"] == "keygate listening" {
                        if let Some(addr) = v["listen"].as_str().and_then(|a| a.parse().ok()) {
                            // Logged as `Some(ADDR)` or `None`.
                            let ops = v["ops"].as_str().and_then(|o| {
                                o.strip_prefix("Some(")?.strip_suffix(')')?.parse().ok()
                            });
                            let _ = tx.send((addr, ops));
                            sent = true;
                        }
                    }
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok((addr, ops)) => Process {
                child,
                addr,
                ops,
                log,
            },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "keygate did not start: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ops_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ops.expect("an ops listener"))
    }

    /// Sends a signal (`TERM`, `KILL`, `HUP`) by name.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit (bounded); its exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process's resident set size in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    proc_kib(pid, "status", "VmRSS:")
}

/// A process's anonymous memory in KiB (`smaps_rollup`).
pub fn anonymous_kib(pid: u32) -> u64 {
    proc_kib(pid, "smaps_rollup", "Anonymous:")
}

/// A `FIELD: N kB` line of `/proc/PID/FILE`, in KiB (0 when absent).
fn proc_kib(pid: u32, file: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
