"""Synth and test-suite wall time, against the bare-CDK floor (an empty app through the same CLI and Node).

    .venv/bin/python benchmarks/synth.py [--synth-runs 3] [--suite-runs 1]

Prints the median of each; targets: synth within 3x the floor, suite under 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMPTY_APP = """
import aws_cdk as cdk
app = cdk.App()
cdk.Stack(app, "Empty")
app.synth()
"""


def timed(command: list[str], cwd: Path, runs: int) -> float:
    samples = []
    env = {**os.environ, "PATH": f"{ROOT / 'node_modules' / '.bin'}{os.pathsep}{ROOT / '.venv' / 'bin'}"
                                  f"{os.pathsep}{os.environ['PATH']}"}
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synth-runs", type=int, default=3)
    parser.add_argument("--suite-runs", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as empty:
        Path(empty, "app.py").write_text(EMPTY_APP)
        Path(empty, "cdk.json").write_text(f'{{"app": "{sys.executable} app.py"}}')
        floor = timed(["cdk", "synth", "--quiet"], Path(empty), args.synth_runs)
    synth = timed(["make", "synth"], ROOT, args.synth_runs)
    print(f"bare CDK floor (empty app, cdk synth): {floor:6.1f} s median of {args.synth_runs}")
    print(f"make synth (after set-up):            {synth:6.1f} s median of {args.synth_runs}  "
          f"= {synth / floor:.1f}x the floor (target <= 3x)")
    if args.suite_runs:
        suite = timed(["make", "test"], ROOT, args.suite_runs)
        print(f"make test (whole suite):              {suite:6.1f} s median of {args.suite_runs}  "
              f"(target < 300 s on 2 cores; this machine has {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
