#!/usr/bin/env python3
"""Run repeld with instruments attached, for finding where memory and time go.

    python bench/profile_repeld.py --out DIR [--gc] [--lag] [--cprofile]
                                     [--tracemalloc FRAMES] -- REPELD-ARGS...

Used by `bench/bench-hold --wrapper '...'` and `bench/bench-relay --wrapper`.
Everything is written into DIR (which must be writable by the service user,
or pass --user root to repeld):

  --gc          every garbage collection: generation, pause (ms), objects
                collected, when (gc.json, written at exit and on SIGUSR2)
  --lag         a task that sleeps 5 ms at a time and records how late it
                wakes up: the event loop's stalls (lag.json)
  --cprofile    cProfile of the whole run (repeld.prof; read it with pstats)
  --tracemalloc N
                trace allocations with N frames; on each SIGUSR2 a snapshot is
                compared with the previous one (tracemalloc-K.txt), together with
                the change in live objects per type (types-K.txt) and the deep
                size of one held connection (held-K.txt)

SIGUSR2 is the instruments' own signal (repeld uses SIGHUP, SIGTERM, SIGINT and
SIGUSR1).  Measurements taken through this wrapper are for attribution only:
the instruments cost time and memory of their own.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import gc
import json
import os
import signal
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from repeld import cli
from repeld.process import daemon

_gc_events: list[dict[str, float]] = []
_gc_start = 0.0
_lags: list[float] = []
_stalls: list[tuple[float, float]] = []  # (monotonic time, lag ms) for lags > 5 ms
_snapshots: list[tracemalloc.Snapshot] = []
_types: list[collections.Counter[str]] = []


def _gc_callback(phase: str, info: dict[str, int]) -> None:
    global _gc_start
    if phase == "start":
        _gc_start = time.perf_counter()
    else:
        _gc_events.append(
            {
                "t": time.monotonic(),
                "gen": info["generation"],
                "ms": (time.perf_counter() - _gc_start) * 1000.0,
                "collected": info["collected"],
            }
        )


async def _lag_monitor() -> None:
    step = 0.005
    while True:
        t = trio.current_time()
        await trio.sleep(step)
        lag = (trio.current_time() - t - step) * 1000.0
        _lags.append(lag)
        if lag > 5.0:
            _stalls.append((time.monotonic(), lag))


def _deep_held() -> dict[str, Any]:
    """sys.getsizeof of one held connection's objects (the pen's Held and what it owns)."""
    for obj in gc.get_objects():
        if type(obj).__name__ == "Held" and type(obj).__module__ == "repeld.shell.pen":
            parts: dict[str, int] = {"Held": sys.getsizeof(obj)}
            for slot in type(obj).__slots__:
                val = getattr(obj, slot, None)
                if val is None:
                    continue
                parts[f"{slot}:{type(val).__name__}"] = sys.getsizeof(val)
                for sub in getattr(type(val), "__slots__", ()):
                    v = getattr(val, sub, None)
                    if isinstance(v, (str, int, float, bytes, tuple)):
                        parts[f"{slot}.{sub}:{type(v).__name__}"] = sys.getsizeof(v)
            return parts
    return {}


def _write_json(out: Path, name: str, data: object) -> None:
    (out / name).write_text(json.dumps(data, indent=1, default=str))


def _summary_gc() -> dict[str, Any]:
    by_gen: dict[int, list[float]] = collections.defaultdict(list)
    for e in _gc_events:
        by_gen[int(e["gen"])].append(e["ms"])
    return {
        "threshold": gc.get_threshold(),
        "frozen": gc.get_freeze_count(),
        "per_generation": {
            g: {
                "count": len(v),
                "total_ms": round(sum(v), 3),
                "max_ms": round(max(v), 3),
                "p99_ms": round(sorted(v)[int(0.99 * (len(v) - 1))], 3),
            }
            for g, v in sorted(by_gen.items())
        },
        "slowest": sorted(_gc_events, key=lambda e: -e["ms"])[:20],
    }


def _summary_lag() -> dict[str, Any]:
    if not _lags:
        return {}
    s = sorted(_lags)
    return {
        "samples": len(s),
        "p50_ms": s[len(s) // 2],
        "p99_ms": s[int(0.99 * (len(s) - 1))],
        "max_ms": s[-1],
        "stalls_over_5ms": _stalls[:200],
    }


def main() -> int:
    argv = sys.argv[1:]
    if "--" not in argv:
        print("usage: profile_repeld.py --out DIR [options] -- REPELD-ARGS", file=sys.stderr)
        return 2
    cut = argv.index("--")
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--gc", action="store_true")
    ap.add_argument("--lag", action="store_true")
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument(
        "--cpu-clock",
        action="store_true",
        help="cProfile counts CPU time (time.process_time), not wall time: "
        "waiting in epoll then costs nothing",
    )
    ap.add_argument("--tracemalloc", type=int, default=0)
    ap.add_argument(
        "--garbage",
        action="store_true",
        help="keep what the collector frees (gc.DEBUG_SAVEALL) and write the "
        "types of the cyclic garbage at each dump (garbage.json)",
    )
    a = ap.parse_args(argv[:cut])
    repeld_argv = argv[cut + 1 :]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o777)

    if a.gc:
        gc.callbacks.append(_gc_callback)
    if a.garbage:
        gc.set_debug(gc.DEBUG_SAVEALL)
    if a.tracemalloc:
        tracemalloc.start(a.tracemalloc)

    def dump_garbage() -> None:
        gc.collect()
        kinds = collections.Counter(
            f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage
        )
        frames = collections.Counter(
            f"{o.f_code.co_filename}:{o.f_code.co_name}"
            for o in gc.garbage
            if type(o).__name__ == "frame"
        )
        _write_json(
            out,
            "garbage.json",
            {
                "objects": len(gc.garbage),
                "types": kinds.most_common(60),
                "frames": frames.most_common(40),
            },
        )

    def dump(signum: int = 0, frame: object = None) -> None:
        k = len(_snapshots)
        if a.garbage:
            dump_garbage()
        if a.gc:
            _write_json(out, "gc.json", _summary_gc())
        if a.lag:
            _write_json(out, "lag.json", _summary_lag())
        if a.tracemalloc:
            t0 = time.perf_counter()
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
            counts = collections.Counter(type(o).__name__ for o in gc.get_objects())
            lines = [
                f"# snapshot {k}: traced {tracemalloc.get_traced_memory()} bytes "
                f"(current, peak); taken in {time.perf_counter() - t0:.2f}s"
            ]
            if _snapshots:
                for st in snap.compare_to(_snapshots[-1], "traceback")[:25]:
                    lines.append(f"{st.size_diff:+,d} B  {st.count_diff:+,d} blocks")
                    lines += [f"    {ln}" for ln in st.traceback.format(limit=a.tracemalloc)]
                lines.append("")
                lines.append("# by line")
                for st in snap.compare_to(_snapshots[-1], "lineno")[:40]:
                    lines.append(str(st))
                tdiff = counts - _types[-1]
                (out / f"types-{k}.txt").write_text(
                    "\n".join(f"{n:+8d} {t}" for t, n in tdiff.most_common(40)) + "\n"
                )
            _snapshots.append(snap)
            _types.append(counts)
            (out / f"tracemalloc-{k}.txt").write_text("\n".join(lines) + "\n")
            _write_json(out, f"held-{k}.json", _deep_held())

    signal.signal(signal.SIGUSR2, dump)

    if a.lag:
        orig: Callable[..., Awaitable[None]] = daemon.serve_forever

        async def serve_with_monitor(*args: Any, **kwargs: Any) -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_lag_monitor)
                await orig(*args, **kwargs)
                nursery.cancel_scope.cancel()

        daemon.serve_forever = serve_with_monitor

    prof: cProfile.Profile | None = None
    if a.cprofile:
        prof = cProfile.Profile(time.process_time) if a.cpu_clock else cProfile.Profile()
    if prof is not None:
        prof.enable()
    try:
        rc = cli.main(repeld_argv)
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(str(out / "repeld.prof"))
        if a.gc:
            _write_json(out, "gc.json", _summary_gc())
        if a.lag:
            _write_json(out, "lag.json", _summary_lag())
        if a.garbage:
            dump_garbage()
    return rc


if __name__ == "__main__":
    sys.exit(main())
