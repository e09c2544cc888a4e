"""Wall time of `visualad demo` with one torch thread (the default) against torch's own choice (one per core, the
first release's default), in alternating runs, with the load average beside each run.

    python benchmarks/demo_threads.py --rounds 2            # the full demo, 2 x 2 runs
    python benchmarks/demo_threads.py --rounds 1 --small    # a quick check (small benchmark, 40 steps)

Each run is a fresh `python -m visualad_cli demo` process with OMP_NUM_THREADS unset, as a user's shell has it.
The tables must agree: the script prints the largest difference between the runs' `metrics.json` means (thread
counts change floating-point summation order, so expect about 1e-7, far below the tables' 0.1 points).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_once(threads: int, out: Path, small: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "visualad_cli", "demo", "--output", str(out), "--threads", str(threads)]
    if small:
        command += ["--small", "--steps", "40"]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"{cores} logical CPUs; torch's default would be {cores} threads")
    means: dict[int, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for threads in (cores, 1):
                out = Path(tmp) / f"demo_{threads}_{round_index}"
                seconds = run_once(threads, out, args.small)
                load = os.getloadavg()[0]
                print(f"round {round_index + 1}  threads={threads}  {seconds:6.1f} s  (load average {load:.2f})")
                metrics = json.loads((out / "model" / "eval_results" / "metrics.json").read_text())["mean"]
                means.setdefault(threads, []).append(metrics)
    first = next(iter(means.values()))[0]
    largest = max(
        abs(m[name] - first[name]) for runs in means.values() for m in runs for name in first if first[name] is not None
    )
    print(f"largest difference between runs' mean metrics: {largest:.2e} (tables show 1e-3 steps)")


if __name__ == "__main__":
    main()
