"""The binaries of benches/bin (hotpaths, lines) as `cargo bench` builds them.

`cargo bench` builds the benchmark package's binaries too, in the bench
profile with the benchmarks' features and dev-dependencies. Asking cargo for
them the same way reuses that build: right after `cargo bench --no-run` (as in
.ci/run) nothing is compiled again, where a plain `cargo build --release --bin
hotpaths` resolves other features and rebuilds ~70 crates (a minute on CI).
"""
import json
import subprocess
import sys


def bench_binary(root, name, package_only=False):
    """Builds (or finds up to date) benches/bin/<name>.rs; returns its path.

    `package_only`: as `cargo bench -p semaforo-benches` builds it (what
    bench-table times: without the library's dev-dependencies, so tokio's
    `test-util` is not unified in and the clock is the peers'). Otherwise as
    `cargo bench` at the root builds it (what .ci/run has just built)."""
    scope = ["-p", "semaforo-benches"] if package_only else []
    out = subprocess.run(["cargo", "bench", "--no-run", "--quiet", *scope, "--bench", "stack",
                          "--message-format=json"],
                         cwd=root, check=True, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        msg = json.loads(line)
        if (msg.get("reason") == "compiler-artifact"
                and msg["target"]["name"] == name and msg.get("executable")):
            return msg["executable"]
    sys.exit(f"cargo built no `{name}` binary (benches/bin/{name}.rs)")
