//! A throwaway `redis-server` for the tests (and `benches/redis.rs`): a unix
//! socket in a fresh temp directory, no port, nothing on disk, killed on drop.
//! With `REDIS_URL` set, that server is used instead (and never stopped).
//! Without `redis-server`, [`RedisServer::start`] says so in one line and the
//! caller skips — unless `CI=true`, where a missing Redis is a failure.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    dir: Option<PathBuf>,
    url: String,
}

fn socket(dir: &Path) -> PathBuf {
    dir.join("redis.sock")
}

impl RedisServer {
    /// A fresh server, or `None` (skipped) when `redis-server` is missing
    /// outside CI.
    pub fn start() -> Option<RedisServer> {
        if let Ok(url) = std::env::var("REDIS_URL") {
            return Some(RedisServer {
                child: None,
                dir: None,
                url,
            });
        }
        let found = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("redis-server is not installed and CI=true: install it (apt-get install redis-server)");
            }
            eprintln!(
                "Redis tests skipped: redis-server not found (install it: apt-get install redis-server, brew install redis, or set REDIS_URL)"
            );
            return None;
        }
        let n = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "semaforo-redis-{}-{}-{}",
            std::process::id(),
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let url = format!("redis+unix://{}", socket(&dir).display());
        let mut s = RedisServer {
            child: None,
            dir: Some(dir),
            url,
        };
        s.spawn();
        Some(s)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn spawn(&mut self) {
        let dir = self.dir.as_ref().expect("only our own server restarts");
        let sock = socket(dir);
        let _ = std::fs::remove_file(&sock);
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&sock)
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "redis-server did not open {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills the server (SIGKILL: no goodbye to the clients).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, commands queue
    /// up unanswered, as on a Redis stuck in a long command or a paused VM.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT): it answers what queued up.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self
            .child
            .as_ref()
            .expect("only our own server is paused")
            .id();
        let ok = Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid} failed");
    }

    /// Starts it again on the same socket (empty: it keeps nothing).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Runs `redis-cli`-like commands over a fresh connection.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url.as_str()).expect("a valid url")
    }

    /// A raw multiplexed connection (for reading and writing keys directly).
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .expect("a raw connection")
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
