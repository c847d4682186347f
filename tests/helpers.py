"""Small helpers shared by the end-to-end tests: reading the store, waiting for it."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path


def recent(minutes: float = 5) -> datetime:
    return datetime.now(UTC) - timedelta(minutes=minutes)


def rows(db: Path, sql: str, *args) -> list[dict]:
    """Read the store the way an operator with sqlite3 would (WAL allows it while running)."""
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql, args)]
    except sqlite3.OperationalError:  # tables not created yet
        return []
    finally:
        con.close()


def items(db: Path) -> dict[str, dict]:
    return {r["title"]: r for r in rows(db, "SELECT * FROM items")}


def wait_until(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
