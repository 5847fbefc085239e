"""A stand-in for /usr/local/bin/repeld that records how the rc.d script runs it.

Each invocation appends its argv to $FAKE_REPELD_LOG. With --check-config it
reads the -c file and fails, like repeld, when the file contains "bad".
Otherwise it runs until SIGTERM, logging every SIGHUP and the SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any


def log(entry: dict[str, Any]) -> None:
    """Append one JSON line to the fake's log."""
    with open(os.environ["FAKE_REPELD_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\n")


def main() -> int:
    """Check a configuration or run until SIGTERM."""
    argv = sys.argv[1:]
    log({"pid": os.getpid(), "argv": argv})
    config = argv[argv.index("-c") + 1] if "-c" in argv else None
    if "--check-config" in argv:
        if config is None:
            print("repeld: --check-config needs -c", file=sys.stderr)
            return 2
        with open(config) as f:
            if "bad" in f.read():
                print(f"repeld: {config}: line 1: bad value", file=sys.stderr)
                return 2
        print(f"repeld: {config}: OK")
        return 0

    def on_hup(signum: int, frame: object) -> None:
        """Record a reload request."""
        log({"pid": os.getpid(), "signal": "HUP"})

    def on_term(signum: int, frame: object) -> None:
        """Record the stop request and exit."""
        log({"pid": os.getpid(), "signal": "TERM"})
        sys.exit(0)

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, on_term)
    print("repeld: listening", file=sys.stderr, flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
