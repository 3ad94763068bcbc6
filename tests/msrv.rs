//! The MSRV in `Cargo.toml` is a promise: no runtime dependency (normal, not dev)
//! may require a newer compiler. Our own use of std is checked by clippy's
//! `incompatible_msrv` lint, which reads the same `rust-version`.

use std::process::Command;

fn version(s: &str) -> [u64; 3] {
    let mut v = [0; 3];
    for (slot, part) in v.iter_mut().zip(s.split('.')) {
        *slot = part.parse().unwrap_or(0);
    }
    v
}

fn host_triple() -> String {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc -vV runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc prints its host")
        .to_owned()
}

#[test]
fn no_runtime_dependency_needs_a_newer_rust_than_ours() {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--all-features",
        ])
        .args(["--filter-platform", &host_triple()])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let packages = meta["packages"].as_array().expect("packages");
    let by_id = |id: &str| packages.iter().find(|p| p["id"] == id);
    let ours = packages
        .iter()
        .find(|p| p["name"] == "semaforo")
        .expect("our package");
    let msrv = version(ours["rust_version"].as_str().expect("rust-version is set"));

    // Walk the resolve graph from semaforo through normal dependencies only.
    let nodes = meta["resolve"]["nodes"].as_array().expect("resolve graph");
    let node = |id: &str| nodes.iter().find(|n| n["id"] == id);
    let mut todo = vec![ours["id"].as_str().unwrap().to_owned()];
    let mut seen = std::collections::BTreeSet::new();
    let mut too_new = Vec::new();
    while let Some(id) = todo.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let pkg = by_id(&id).expect("package in metadata");
        if let Some(rv) = pkg["rust_version"].as_str() {
            if version(rv) > msrv {
                too_new.push(format!("{} {} needs {rv}", pkg["name"], pkg["version"]));
            }
        }
        for dep in node(&id).expect("node")["deps"].as_array().unwrap() {
            let normal = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"].is_null());
            if normal {
                todo.push(dep["pkg"].as_str().unwrap().to_owned());
            }
        }
    }
    assert!(
        seen.len() > 5,
        "walked the dependency graph ({} packages)",
        seen.len()
    );
    assert!(
        too_new.is_empty(),
        "dependencies newer than our MSRV: {too_new:?}"
    );
}
