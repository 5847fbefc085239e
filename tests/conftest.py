"""Fixtures shared by the tests that run repeld as a real process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .procs import LineBackend, SyslogUDP


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
