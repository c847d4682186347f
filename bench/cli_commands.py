"""Wall time of the commands people type on a grown database: `agentwatch
status`, `agentwatch items --limit 50` and `agentwatch dlq list`, each run as a
subprocess on a database of 50,000 items, and whether any of them imports the
`anthropic` SDK (it must not: about 50 MB and a second).

    python bench/cli_commands.py [--items 50000] [--runs 5] [--rebuild]

The database is built by big_db.py's builder (the product's own `admit` and
`Store.record_poll`, then the pipeline's end states in bulk), with smaller polls
so that 50,000 items are mostly finished rather than one first-poll baseline:
200 items in each of 100 sources' first polls, then polls of 500; the last one
leaves 300 dead-lettered and 40 waiting. Cached under /tmp/agentwatch-bench/.

The import check runs each command once more under `python -X importtime`,
which lists every module the process imported (lazy imports inside the
command included), and looks for `anthropic` among them."""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import big_db
from common import agentwatch_command

COMMANDS = (["status"], ["items", "--limit", "50"], ["dlq", "list"])
RUN_MAIN = "import sys, agentwatch; sys.argv = ['agentwatch', *sys.argv[1:]]; agentwatch.main()"


def environment() -> dict:
    return {"COLUMNS": "200", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp"}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(args: list[str], config: Path, runs: int) -> tuple[float, float, float, str]:
    """Median and worst wall time, and median CPU time (user + system, which other
    load on the machine disturbs less than wall time), of `runs` runs."""
    times, cpus, out = [], [], ""
    for _ in range(runs):
        cpu_before = children_cpu()
        started = time.perf_counter()
        result = subprocess.run(
            [*agentwatch_command(), *args, "--config", str(config)],
            capture_output=True, text=True, env=environment(),
        )  # fmt: skip
        times.append(time.perf_counter() - started)
        cpus.append(children_cpu() - cpu_before)
        if result.returncode != 0:
            sys.exit(f"agentwatch {' '.join(args)} failed: {result.stderr}")
        out = result.stdout
    return statistics.median(times), max(times), statistics.median(cpus), out


def imported(args: list[str], config: Path) -> set[str]:
    """Every module `agentwatch ARGS` imported, from -X importtime's report."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", RUN_MAIN, *args, "--config", str(config)],
        capture_output=True, text=True, env=environment(),
    )  # fmt: skip
    if result.returncode != 0:
        sys.exit(f"agentwatch {' '.join(args)} failed: {result.stderr[-2000:]}")
    modules = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            modules.add(line.rsplit("|", 1)[1].strip())
    if len(modules) < 20:  # the report itself went missing: say so, not "no anthropic"
        sys.exit(f"no -X importtime report for agentwatch {' '.join(args)}")
    return modules


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()
    big_db.CACHE.mkdir(exist_ok=True)
    cached = big_db.CACHE / f"cli-{args.items}.db"
    if args.rebuild or not cached.exists():
        big_db.BASELINE, big_db.PER_POLL = 200, 500
        big_db.build(cached, args.items)
    with tempfile.TemporaryDirectory(dir=big_db.CACHE) as tmp:
        folder = Path(tmp)
        db = folder / "cli.db"
        shutil.copyfile(cached, db)
        config = big_db.write_config(folder, db, "http://127.0.0.1:9", 100, 300, 9)
        timed(["status"], config, runs=1)  # opens (and migrates) once, warms the page cache
        print(f"{args.items:,} items ({big_db.size_mb(db)}), median of {args.runs} runs:")
        failed = False
        for command in COMMANDS:
            median, worst, cpu, out = timed(command, config, args.runs)
            modules = imported(command, config)
            sdk = sorted(m for m in modules if m == "anthropic" or m.startswith("anthropic."))
            failed = failed or bool(sdk)
            print(f"  agentwatch {' '.join(command)}: median {median:.3f} s, max {worst:.3f} s, "
                  f"CPU {cpu:.3f} s, "
                  f"{len(out.splitlines())} lines; {len(modules)} modules imported, "
                  + (f"IMPORTS {sdk[0]}" if sdk else "no anthropic"))  # fmt: skip
        if failed:
            sys.exit("a command imported the anthropic SDK")


if __name__ == "__main__":
    main()
