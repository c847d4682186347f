"""How long from a frozen agentwatch (SIGSTOP) to a healthy replacement under
watchdog.sh, with the watchdog's default timeouts. Prints figures; asserts nothing.

    python bench/watchdog_recovery.py [--runs 3] [--stale]

Each run: watchdog.sh starts agentwatch, the process is frozen with SIGSTOP,
then watchdog.sh runs again (as cron would, at once). The clock starts at the
SIGSTOP and stops at the first GET /health that answers 200 from a new pid,
polled every 50 ms from this script. Under cron, add the wait for the next
minute (0-60 s, 30 s on average).

--stale measures the other failure instead: a source that blocks the event loop
(time.sleep in a drop-in), so /health answers 503 and the process cannot handle
TERM; the watchdog has to wait AGENTWATCH_STOP_TIMEOUT (15 s) and KILL it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STALL = """
import os, time
from dataclasses import dataclass
from agentwatch import Source, source

@source("stall")
class Stall(Source):
    @dataclass(frozen=True)
    class Options:
        flag: str

    async def poll(self):
        if os.path.exists(self.options.flag):
            time.sleep(60)
        return []
"""


def executable() -> str:
    beside = Path(sys.executable).parent / "agentwatch"
    return str(beside) if beside.exists() else (shutil.which("agentwatch") or "agentwatch")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int) -> tuple[int, dict]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}
    except OSError:
        return 0, {}


def one_run(folder: Path, stale: bool) -> float:
    port = free_port()
    flag = folder / "stall-now"
    config = folder / "agentwatch.toml"
    text = f'[agentwatch]\nhealth = "127.0.0.1:{port}"\nlog_file = "agentwatch.log"\n'
    text += '[llm]\nprovider = "none"\n'
    if stale:
        text = text.replace("[llm]", 'stale_after = "2s"\n[llm]')
        text += f'[[sources]]\nname = "s"\ntype = "stall"\nflag = "{flag}"\nevery = "1s"\n'
        (folder / "sources").mkdir(exist_ok=True)
        (folder / "sources" / "stall.py").write_text(STALL)
    config.write_text(text)
    env = {
        **os.environ,
        "AGENTWATCH_HEALTH_URL": f"http://127.0.0.1:{port}/health",
        "AGENTWATCH_PIDFILE": str(folder / "agentwatch.pid"),
        "AGENTWATCH_CONFIG": str(config),
        "AGENTWATCH_LOG": str(folder / "watchdog.log"),
        "AGENTWATCH_CMD": f"{executable()} run",
    }
    watchdog = ["sh", str(ROOT / "watchdog.sh")]
    subprocess.run(watchdog, env=env, cwd=folder, check=True, timeout=120)
    old = int((folder / "agentwatch.pid").read_text())
    if stale:
        flag.touch()
        while health(port)[0] != 503:
            time.sleep(0.05)
        flag.unlink()
        started = time.monotonic()  # the clock starts when /health turns 503
    else:
        os.kill(old, signal.SIGSTOP)
        started = time.monotonic()
    run = subprocess.Popen(watchdog, env=env, cwd=folder)
    while True:
        status, body = health(port)
        if status == 200 and body.get("pid") not in (None, old):
            elapsed = time.monotonic() - started
            break
        time.sleep(0.05)
    run.wait(120)
    new = int((folder / "agentwatch.pid").read_text())
    os.kill(new, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and Path(f"/proc/{new}").exists():
        stat = Path(f"/proc/{new}/stat").read_text() if Path(f"/proc/{new}").exists() else ""
        if stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]:
            break
        time.sleep(0.05)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--stale", action="store_true", help="a blocked loop instead of SIGSTOP")
    args = parser.parse_args()
    what = "stale (blocked loop, 503)" if args.stale else "SIGSTOP"
    times = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="aw-bench-") as tmp:
            times.append(one_run(Path(tmp), args.stale))
        print(f"run {i + 1}: {what} -> healthy replacement in {times[-1]:.2f} s", flush=True)
    print(
        f"{what} -> healthy replacement: median {statistics.median(times):.2f} s, "
        f"min {min(times):.2f} s, max {max(times):.2f} s over {len(times)} run(s); "
        "under cron add 0-60 s until the next minute"
    )


if __name__ == "__main__":
    main()
