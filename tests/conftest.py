"""Layer markers for every test, and fixtures shared by the tests that run repeld.

The tests mirror the layers of the code: tests/unit (pure code, seconds),
tests/shell (the trio shell in-process, on real loopback sockets) and
tests/system (repeld and real peers as processes). Each test is marked with
its folder's name, so `pytest -m unit` equals `pytest tests/unit`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .procs import LineBackend, SyslogUDP

LAYERS = ("unit", "shell", "system")


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
