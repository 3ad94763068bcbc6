//! Throwaway Redis topologies for the high-availability tests: a primary
//! with a replica and a Sentinel, and a 3-primary Redis Cluster. Every
//! server runs from the `redis-server` binary (a sentinel too, with
//! `--sentinel`) on free TCP ports of 127.0.0.1 (never a fixed one), with
//! its files in a fresh temporary directory removed on drop; the processes
//! are killed on drop. Without `redis-server` and `redis-cli` the caller
//! skips, saying so — except with `CI=true`, where it fails.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether the binaries are here (`None`: skip, after saying so).
pub fn available() -> bool {
    let found = |bin: &str| {
        Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if found("redis-server") && found("redis-cli") {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("redis-server and redis-cli are needed and CI=true: apt-get install redis-server redis-tools");
    }
    eprintln!("Redis HA tests skipped: redis-server / redis-cli not found (apt-get install redis-server redis-tools, brew install redis)");
    false
}

/// A free TCP port on 127.0.0.1 whose cluster bus port (+10,000) is free too.
pub fn free_port() -> u16 {
    for _ in 0..1_000 {
        let Ok(l) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(addr) = l.local_addr() else { continue };
        let port = addr.port();
        if port > 55_000 {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair found");
}

fn temp_dir(tag: &str) -> PathBuf {
    use std::hash::{BuildHasher, RandomState};
    let dir = std::env::temp_dir().join(format!(
        "semaforo-{tag}-{}-{}",
        std::process::id(),
        RandomState::new().hash_one(Instant::now())
    ));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    dir
}

fn wait_for_port(port: u16) {
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "port {port} never opened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `redis-cli -p port [-a password] args…`, its output.
pub fn cli(port: u16, password: Option<&str>, args: &[&str]) -> String {
    let mut c = Command::new("redis-cli");
    c.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    if let Some(p) = password {
        c.args(["-a", p, "--no-auth-warning"]);
    }
    let out = c.args(args).output().expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One server process.
pub struct Node {
    pub port: u16,
    child: Option<Child>,
}

impl Node {
    fn start(dir: &PathBuf, port: u16, args: &[String]) -> Node {
        let child = Command::new("redis-server")
            .args(args)
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        wait_for_port(port);
        Node {
            port,
            child: Some(child),
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn server_args(port: u16, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// A primary, one replica and one sentinel watching them as `mymaster`
/// (quorum 1, down after 500 ms). With `password`, the servers and the
/// sentinel all require it.
pub struct SentinelSet {
    pub primary: Node,
    pub replica: Node,
    pub sentinel: Node,
    pub password: Option<String>,
    dir: PathBuf,
}

impl SentinelSet {
    pub fn start(password: Option<&str>) -> SentinelSet {
        let dir = temp_dir("sentinel");
        let (p1, p2, s) = (free_port(), free_port(), free_port());
        let auth: Vec<&str> = match password {
            Some(p) => vec!["--requirepass", p, "--masterauth", p],
            None => vec![],
        };
        let pdir = dir.join("primary");
        let rdir = dir.join("replica");
        std::fs::create_dir_all(&pdir).unwrap();
        std::fs::create_dir_all(&rdir).unwrap();
        let primary = Node::start(&pdir, p1, &server_args(p1, &auth));
        let p1s = p1.to_string();
        let mut replica_args = auth.clone();
        replica_args.extend(["--replicaof", "127.0.0.1", &p1s]);
        let replica = Node::start(&rdir, p2, &server_args(p2, &replica_args));
        let mut conf = format!(
            "port {s}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {p1} 1\n\
             sentinel down-after-milliseconds mymaster 500\n\
             sentinel failover-timeout mymaster 5000\nsentinel parallel-syncs mymaster 1\n"
        );
        if let Some(p) = password {
            conf.push_str(&format!(
                "sentinel auth-pass mymaster {p}\nrequirepass {p}\n"
            ));
        }
        let conf_path = dir.join("sentinel.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let sentinel = Node::start(
            &dir,
            s,
            &[conf_path.display().to_string(), "--sentinel".to_string()],
        );
        let set = SentinelSet {
            primary,
            replica,
            sentinel,
            password: password.map(str::to_owned),
            dir,
        };
        // The replica has caught up and the sentinel knows both.
        let t0 = Instant::now();
        loop {
            let info = cli(p2, password, &["INFO", "replication"]);
            let seen = cli(s, password, &["SENTINEL", "replicas", "mymaster"]);
            if info.contains("master_link_status:up") && seen.contains(&p2.to_string()) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "replication never came up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        set
    }

    /// The sentinel's URL (with the password, if any).
    pub fn sentinel_url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.sentinel.port),
            None => format!("redis://127.0.0.1:{}", self.sentinel.port),
        }
    }

    /// The port the sentinel names as primary now.
    pub fn primary_port(&self) -> Option<u16> {
        let out = cli(
            self.sentinel.port,
            self.password.as_deref(),
            &["SENTINEL", "get-master-addr-by-name", "mymaster"],
        );
        out.lines().nth(1)?.trim().parse().ok()
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        self.sentinel.kill();
        self.replica.kill();
        self.primary.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three primaries, the 16,384 slots split between them.
pub struct Cluster {
    pub nodes: Vec<Node>,
    dir: PathBuf,
}

impl Cluster {
    pub fn start() -> Cluster {
        let dir = temp_dir("cluster");
        let mut nodes = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let ndir = dir.join(format!("n{i}"));
            std::fs::create_dir_all(&ndir).unwrap();
            nodes.push(Node::start(
                &ndir,
                port,
                &server_args(
                    port,
                    &["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"],
                ),
            ));
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        create.args(&addrs);
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = create.output().expect("redis-cli --cluster create runs");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Cluster { nodes, dir };
        let t0 = Instant::now();
        while !cluster
            .nodes
            .iter()
            .all(|n| cli(n.port, None, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "cluster never became ok"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The node id of the server on `port`.
    pub fn id(&self, port: u16) -> String {
        cli(port, None, &["CLUSTER", "MYID"]).trim().to_owned()
    }

    /// The port of the node that owns `slot`.
    pub fn owner(&self, slot: u16) -> u16 {
        // `CLUSTER NODES`: id addr flags master - ping pong epoch state slots…
        let nodes = cli(self.nodes[0].port, None, &["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 {
                continue;
            }
            let port: u16 = f[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            for range in &f[8..] {
                let (a, b) = match range.split_once('-') {
                    Some((a, b)) => (a.parse().unwrap_or(u16::MAX), b.parse().unwrap_or(0)),
                    None => {
                        let v = range.parse().unwrap_or(u16::MAX);
                        (v, v)
                    }
                };
                if (a..=b).contains(&slot) {
                    return port;
                }
            }
        }
        panic!("no owner for slot {slot}: {nodes}");
    }

    /// Moves `slot` from its owner to another node, key by key, the way
    /// `redis-cli --cluster reshard` does: while it runs, a key already
    /// moved is answered `ASK` by the source.
    pub fn move_slot(&self, slot: u16, pause_between_keys: Duration) -> (u16, u16) {
        let src = self.owner(slot);
        let dst = self
            .nodes
            .iter()
            .map(|n| n.port)
            .find(|p| *p != src)
            .expect("another node");
        let (src_id, dst_id) = (self.id(src), self.id(dst));
        let s = slot.to_string();
        cli(dst, None, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &src_id]);
        cli(src, None, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &dst_id]);
        loop {
            let keys = cli(src, None, &["CLUSTER", "GETKEYSINSLOT", &s, "1"]);
            let Some(key) = keys.lines().next().filter(|k| !k.is_empty()) else {
                break;
            };
            cli(
                src,
                None,
                &["MIGRATE", "127.0.0.1", &dst.to_string(), key, "0", "5000"],
            );
            std::thread::sleep(pause_between_keys);
        }
        for n in &self.nodes {
            cli(n.port, None, &["CLUSTER", "SETSLOT", &s, "NODE", &dst_id]);
        }
        (src, dst)
    }

    /// The slot of `key`.
    pub fn slot(&self, key: &str) -> u16 {
        cli(self.nodes[0].port, None, &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("a slot")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
