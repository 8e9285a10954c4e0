"""`rvllm serve` start-up time (process start to /health 200) and the resident memory of all its
processes when idle.

    python bench/startup.py [--runs 2] [-- SERVE ARGS...]
    python bench/startup.py -- --model qwen2.5-1.5b --load-format dummy --device cuda
    python bench/startup.py --top 8 -- ...   (and each process's largest mappings: libraries, [anon])

On a GPU, delete $RVLLM_CACHE/kernels first for a cold (compiling) start; later runs are warm.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import append_results  # noqa: E402
from bench.rss_stages import top_mappings  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> dict[str, float]:
    """Resident memory of `pid` and each of its descendants, MB, keyed "pid name" (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    held, todo = {}, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            status = Path(f"/proc/{p}/status").read_text().splitlines()
            argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        what = " ".join(a.decode(errors="replace") for a in argv[1:4])[:60]
        for line in status:
            if line.startswith("VmRSS:"):
                held[f"{p} {what}"] = int(line.split()[1]) / 1024
    return held


def one_run(serve_args: list[str], top: int = 0) -> tuple[float, dict[str, float]]:
    port = free_port()
    cmd = [sys.executable, "-m", "rvllm", "serve", "--port", str(port), "--log-level", "warning", *serve_args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"rvllm serve exited with {proc.returncode}: {' '.join(cmd)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        ready = time.perf_counter() - t0
        time.sleep(2.0)  # idle
        held = tree_rss(proc.pid)
        for key in held if top else ():
            try:
                print(f"  largest holders in {key}: " + ", ".join(
                    f"{name} {mb:.1f}" for name, mb in top_mappings(top, int(key.split()[0]))))
            except OSError:
                pass
        return ready, held
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--append-results", action="store_true")
    ap.add_argument("--top", type=int, default=0, help="also list each process's N largest mappings (MB)")
    ap.add_argument("serve_args", nargs="*", help="after --: arguments for rvllm serve")
    args = ap.parse_args()
    rows = []
    for i in range(args.runs):
        ready, held = one_run(args.serve_args, args.top)
        rows.append(f"| {i + 1} | {' '.join(args.serve_args) or '(default model)'} | {ready:.2f} | {sum(held.values()):.0f} |")
        print(f"run {i + 1}, each process (MB): " + "; ".join(f"{k}: {v:.0f}" for k, v in held.items()))
    table = "| run | serve args | to /health 200 (s) | RSS of all processes, idle (MB) |\n|---|---|---|---|\n"
    table += "\n".join(rows)
    print(table)
    if args.append_results:
        append_results("Startup and footprint (bench/startup.py)", table,
                       "run 1 after whatever ran before; later runs warm (OS page cache, kernel cache)")


if __name__ == "__main__":
    main()
