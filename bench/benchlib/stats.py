"""Statistics and output: percentiles, the ramp's busy time, the table, and
the facts of the machine a figure was measured on.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def ramp_stats(samples: Sequence[tuple[float, int]]) -> tuple[float, float]:
    """From (time, descriptors) samples of a ramp: (seconds in which the count
    rose, the longest stretch in which it did not), i.e. busy time and the
    longest stall (a SYN retransmit after an accept-queue overflow is ~1 s)."""
    busy = stall = longest = 0.0
    for (t0, n0), (t1, n1) in itertools.pairwise(samples):
        if n1 > n0:
            busy += t1 - t0
            stall = 0.0
        else:
            stall += t1 - t0
            longest = max(longest, stall)
    return busy, longest


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain-text table, first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        out = [cells[0].ljust(widths[0])]
        out += [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "| " + " | ".join(out) + " |"

    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    sys.stdout.flush()


def machine_facts() -> dict[str, str]:
    """What the figures were measured on."""
    facts = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "kernel": os.uname().release,
        "cpus": str(os.cpu_count()),
        "python": sys.version.split()[0],
        "nofile": "/".join(str(x) for x in resource.getrlimit(resource.RLIMIT_NOFILE)),
    }
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        facts["mem"] = f.readline().split(":", 1)[1].strip()
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        facts["loadavg"] = " ".join(f.read().split()[:3])
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        repo = Path(__file__).resolve().parents[2]
        rev = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty"],
            capture_output=True,
            timeout=10,
            check=False,
        )
        facts["repeld_git"] = rev.stdout.decode().strip() or "unknown"
    for name in ("net/core/somaxconn",):
        with contextlib.suppress(OSError), open(f"/proc/sys/{name}") as f:
            facts[name.rsplit("/", 1)[1]] = f.read().strip()
    return facts
