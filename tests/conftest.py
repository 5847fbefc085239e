"""Layer markers for every test, and fixtures shared by the tests that run repeld.

The tests mirror the layers of the code: tests/unit (pure code, seconds),
tests/shell (the trio shell in-process, on real loopback sockets) and
tests/system (repeld and real peers as processes). Each test is marked with
its folder's name, so `pytest -m unit` equals `pytest tests/unit`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .procs import LineBackend, SyslogUDP

LAYERS = ("unit", "shell", "system")

# Every `python -m repeld` a test starts runs the tree under test, as pytest's
# pythonpath = ["src"] does in-process, not whatever repeld is installed (another
# checkout's editable install, or none).
_SRC = str(Path(__file__).resolve().parents[1] / "src")
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_SRC, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _SRC)]
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        layer = item.path.parent.name
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


@pytest.fixture
def syslog() -> Iterator[SyslogUDP]:
    """A UDP syslog receiver on loopback; pass `syslog.target` to --syslog."""
    receiver = SyslogUDP()
    yield receiver
    receiver.close()


@pytest.fixture
def backend() -> Iterator[LineBackend]:
    """A tiny threaded SMTP-shaped MTA on loopback; pass `backend.address` to -b."""
    server = LineBackend()
    yield server
    server.close()
