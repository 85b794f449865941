"""Session-wide hooks: the RTL fuzz's summary line (``make fuzz``)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """How many fuzz configurations and images ran, from the log the fuzz workers append to."""
    log = os.environ.get("HWGEN_FUZZ_LOG")
    if not log or not Path(log).is_file() or hasattr(config, "workerinput"):
        return
    rows = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
    families = sorted({row["family"] for row in rows})
    per_family = ", ".join(f"{family} {sum(row['family'] == family for row in rows)}" for family in families)
    failed = sum(not row["ok"] for row in rows)
    terminalreporter.write_line(
        f"RTL fuzz: {len(rows)} configurations ({per_family}), {sum(row['images'] for row in rows)} images; "
        f"{len(rows) - failed} equal to golden on every word, {failed} not (shrinking runs count too)")
