//! A throw-away PostgreSQL server for one test: `initdb` into a temporary
//! directory, `postgres` on a free loopback port, removed when dropped. As
//! root (CI machines), the server runs as the `postgres` user, which the
//! Debian package creates.
//!
//! Where PostgreSQL is not installed, `Postgres::start` returns `None` after a
//! loud message, unless `KEYGATE_REQUIRE_POSTGRES=1` (CI sets it): then it
//! fails the test.

use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub port: u16,
    owner: Option<(u32, u32)>,
    server: Option<Child>,
}

/// The newest installed PostgreSQL's `bin` directory.
fn find_bin() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// uid and gid of the `postgres` user, from /etc/passwd.
fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres"))
            .then(|| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
            .flatten()
    })
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Postgres {
    /// A new cluster, started; `None` (after a loud message) where PostgreSQL
    /// is missing and not required.
    pub fn start(test: &str) -> Option<Postgres> {
        let required = std::env::var("KEYGATE_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
        let Some(bin) = find_bin() else {
            assert!(
                !required,
                "KEYGATE_REQUIRE_POSTGRES=1 but no PostgreSQL under /usr/lib/postgresql (apt-get install postgresql)"
            );
            eprintln!(
                "\n*** SKIPPED {test}: PostgreSQL is not installed (apt-get install postgresql); the cluster-mode tests need a real server ***\n"
            );
            return None;
        };
        let owner = if running_as_root() {
            Some(postgres_user().expect("running as root: a `postgres` user to run the server"))
        } else {
            None
        };
        let dir = super::temp_dir("pg");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args([
                "-A",
                "trust",
                "-U",
                "keygate",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = owner {
            initdb.uid(uid).gid(gid);
        }
        let out = initdb.output().unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Postgres {
            bin,
            dir,
            port: free_port(),
            owner,
            server: None,
        };
        pg.resume();
        Some(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the server (again, after `stop`) on the same port and data;
    /// returns once it accepts connections.
    pub fn resume(&mut self) {
        assert!(self.server.is_none(), "already running");
        let mut command = Command::new(self.bin.join("postgres"));
        command
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
                "-c",
                "log_min_messages=fatal",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid);
        }
        self.server = Some(command.spawn().unwrap());
        self.wait_until_ready();
    }

    fn wait_until_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "PostgreSQL did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server at once (like a crash or a lost network: no goodbye
    /// to clients); `resume` starts it again.
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            // SIGQUIT: immediate shutdown; the data stays consistent (WAL).
            let _ = Command::new("kill")
                .args(["-QUIT", &server.id().to_string()])
                .status();
            let _ = server.wait();
        }
    }

    /// A client program of the server's installation, pointed at it as `keygate`.
    fn client_tool(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "keygate",
        ]);
        command
    }

    /// A URL for database `name` (created by `create_database`).
    pub fn url(&self, name: &str) -> String {
        format!("postgres://keygate@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates a database; returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        let out = self.client_tool("createdb").arg(name).output().unwrap();
        assert!(
            out.status.success(),
            "createdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(name)
    }

    /// Runs one SQL query with psql; its output rows (unaligned, `|`-separated).
    pub fn query(&self, database: &str, sql: &str) -> Vec<String> {
        let out = self
            .client_tool("psql")
            .args([
                "-d",
                database,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
