"""The --workers parent's reload round on real child processes and a real pipe.

The children stand in for workers that handle SIGHUP (they ignore it, and the
test writes on the stats pipe what a worker's `report_reload` writes, with the
time its reload began on the host's monotonic clock). The parent counts an
answer only from a reload that began after its signal: a worker still busy
with the last reload when that reload's wait ended answers that one first, and
that answer must not stand for this one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from repeld.config.errors import ConfigError
from repeld.config.file import SETTINGS_ENV, inherited_settings, settings_from_text
from repeld.config.settings import Settings, load_trusted
from repeld.core.policy import TrustedNetworks
from repeld.process import workers
from repeld.process.workers import Supervisor
from repeld.shell.eventlog import EventLog

_IGNORE_HUP = "import signal, time; signal.signal(signal.SIGHUP, signal.SIG_IGN); time.sleep(60)"


def _answer(fd: int, pid: int, refused: str, began: float, stopping: bool = False) -> None:
    line = {"pid": pid, "reload": refused, "began": began, "stopping": int(stopping)}
    os.write(fd, json.dumps(line).encode() + b"\n")


@contextlib.asynccontextmanager
async def _two_workers(
    *, second_starting: bool = False
) -> AsyncIterator[tuple[Supervisor, int, int, int, trio.Nursery]]:
    """A parent with two ready children standing in for its workers, reading the
    stats pipe: (the parent, the pipe's write end, one pid, the other, a nursery).
    `second_starting`: the other was spawned and is not ready yet."""
    sup = Supervisor(Settings(), [], [], EventLog(None, hostname="test"))
    children = [await trio.lowlevel.open_process([sys.executable, "-c", _IGNORE_HUP]) for _ in "ab"]
    read_fd, write_fd = os.pipe()
    try:
        for index, child in enumerate(children):
            sup.procs[index] = child
            sup.ready.add(child.pid)
        a, b = (child.pid for child in children)
        if second_starting:
            sup.ready.discard(b)
            sup._spawned = {a: time.monotonic(), b: time.monotonic()}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup._read_stats, read_fd)
            yield sup, write_fd, a, b, nursery
            nursery.cancel_scope.cancel()
    finally:
        os.close(write_fd)
        for child in children:
            child.kill()
            await child.wait()


async def test_an_answer_to_an_earlier_reload_does_not_answer_this_one() -> None:
    async with _two_workers() as (sup, write_fd, a, b, nursery):
        # Reload 1: `a` answers at once, `b` is still resolving its backend.
        before_first = time.monotonic()
        _answer(write_fd, a, "", time.monotonic())
        with trio.move_on_after(0.5):  # (RELOAD_WAIT is 10 s)
            await sup.reload_workers()

        # Reload 2: the files are refused now. `b` first answers reload 1 (it
        # began before this signal), then this one.
        async def workers_answer() -> None:
            await trio.sleep(0.05)
            _answer(write_fd, b, "", before_first)  # reload 1, late: reloaded
            await trio.sleep(0.05)
            _answer(write_fd, a, "cannot read", time.monotonic())
            await trio.sleep(0.2)
            _answer(write_fd, b, "cannot read", time.monotonic())

        nursery.start_soon(workers_answer)
        assert await sup.reload_workers() == (0, ["cannot read", "cannot read"], 0)
    assert workers.RELOAD_WAIT == 10.0


async def test_a_worker_ready_only_after_the_signal_answers_this_reload() -> None:
    # `b` was still starting at the SIGHUP (one would have killed it): it is sent
    # the reload on its ready, and its refusal is this reload's, not "reloaded".
    async with _two_workers(second_starting=True) as (sup, write_fd, a, b, nursery):

        async def workers_answer() -> None:
            await trio.sleep(0.05)
            _answer(write_fd, a, "", time.monotonic())
            await trio.sleep(0.2)
            os.write(write_fd, json.dumps({"pid": b, "ready": 1}).encode() + b"\n")
            await trio.sleep(0.05)
            _answer(write_fd, b, "cannot read", time.monotonic())

        nursery.start_soon(workers_answer)
        assert await sup.reload_workers() == (1, ["cannot read"], 0)
        assert b in sup.ready


async def test_a_worker_never_ready_is_counted_silent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with _two_workers(second_starting=True) as (sup, write_fd, a, _, nursery):

        async def workers_answer() -> None:
            await trio.sleep(0.05)
            _answer(write_fd, a, "", time.monotonic())

        nursery.start_soon(workers_answer)
        started = trio.current_time()
        assert await sup.reload_workers() == (1, [], 1)
        assert trio.current_time() - started >= workers.RELOAD_WAIT


async def test_a_draining_worker_is_not_waited_for(autojump_clock: trio.testing.MockClock) -> None:
    # A worker that got a SIGTERM of its own drains and does not reload; it says
    # so, and the parent neither waits RELOAD_WAIT for it nor counts it silent.
    async with _two_workers() as (sup, write_fd, a, b, nursery):

        async def workers_answer() -> None:
            await trio.sleep(0.05)
            _answer(write_fd, a, "", time.monotonic())
            _answer(write_fd, b, "", time.monotonic(), stopping=True)

        nursery.start_soon(workers_answer)
        started = trio.current_time()
        assert await sup.reload_workers() == (1, [], 0)
        assert trio.current_time() - started < workers.RELOAD_WAIT


async def test_reloads_run_one_at_a_time_and_sighups_meanwhile_are_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Five SIGHUPs during a reload that waits: one more reload after it, not five
    # rounds of RELOADING=1 / READY=1 in a row (trio's signal receiver merged them
    # when the signal loop waited for each reload itself).
    from repeld.process.reloads import Reloads

    stopping = False
    runs: list[tuple[str, float]] = []

    async def reload() -> None:
        runs.append(("begin", trio.current_time()))
        await trio.sleep(1.0)
        runs.append(("end", trio.current_time()))

    skipped: list[float] = []
    reloads = Reloads(lambda: stopping, lambda: skipped.append(trio.current_time()))
    async with trio.open_nursery() as nursery:
        reloads.request(nursery, reload)
        await trio.sleep(0.1)
        for _ in range(5):
            reloads.request(nursery, reload)
    assert [what for what, _ in runs] == ["begin", "end", "begin", "end"]
    assert runs[2][1] >= runs[1][1]  # never two at once

    runs.clear()
    async with trio.open_nursery() as nursery:
        reloads.request(nursery, reload)
        await trio.sleep(0.1)
        reloads.request(nursery, reload)  # waits behind the first
        stopping = True  # a SIGTERM: the waiting one never begins, no new one starts
        reloads.request(nursery, reload)
    assert [what for what, _ in runs] == ["begin", "end"]
    assert len(skipped) == 2  # each told (a worker answers its parent)


_COUNT_HUPS = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGHUP, lambda *_: open(sys.argv[1], 'a').write('hup\\n'))\n"
    "time.sleep(60)\n"
)


@pytest.mark.parametrize("ready", ["during the wait", "after it", "spawned after it"])
async def test_a_worker_spawned_during_a_reload_is_sent_it(tmp_path: Path, ready: str) -> None:
    # A worker started again while a reload waits for the others' answers is
    # given the settings of before it (the reload is not taken yet), and was
    # not sent its SIGHUP: it served the old settings until it next died. It
    # is sent the reload when it is taken, or on its ready if later; one
    # spawned once it is taken starts with it.
    hups = tmp_path / "hups"
    new = Settings(delay=7.0)
    assert Settings().delay != 7.0
    async with _two_workers() as (sup, write_fd, a, b, nursery):
        late = await trio.lowlevel.open_process([sys.executable, "-c", _COUNT_HUPS, str(hups)])
        try:
            await trio.sleep(0.5)  # its handler set

            def spawn_late() -> None:
                sup.procs[2] = late
                sup._spawned[late.pid] = time.monotonic()

            def late_is_ready() -> None:
                os.write(write_fd, json.dumps({"pid": late.pid, "ready": 1}).encode() + b"\n")

            async def workers_answer() -> None:
                await trio.sleep(0.05)
                if ready != "spawned after it":
                    spawn_late()
                if ready == "during the wait":
                    late_is_ready()
                    await trio.sleep(0.1)
                    assert not hups.exists()  # with the settings of before, until taken
                _answer(write_fd, a, "", time.monotonic())
                _answer(write_fd, b, "", time.monotonic())

            nursery.start_soon(workers_answer)
            assert await sup.reload_workers() == (2, [], 0)
            sup.adopt(new, TrustedNetworks())
            if ready == "spawned after it":
                spawn_late()
            assert sup.settings.delay == 7.0  # what a worker spawned now starts with
            if ready != "during the wait":
                late_is_ready()
            await trio.sleep(0.3)
            told = hups.read_text().count("hup") if hups.exists() else 0
            assert told == (0 if ready == "spawned after it" else 1)
        finally:
            late.kill()
            await late.wait()


def test_what_a_worker_is_given_reads_back_with_the_trusted_files_inline(
    tmp_path: Path,
) -> None:
    nets = tmp_path / "trusted.txt"
    nets.write_text("192.0.2.0/24\n2001:db8::/32  # v6\n")
    base = settings_from_text('backend = "127.0.0.1:10025"\n', "settings")
    settings = dataclasses.replace(
        base, delay=3.0, trusted=("198.51.100.7/32",), trusted_file=(str(nets),)
    )
    trusted = load_trusted(settings)
    nets.write_text("")  # a later edit, not reloaded, is not what the workers serve
    text = workers.settings_text(settings, trusted)
    given = settings_from_text(text, "settings")
    assert given == dataclasses.replace(
        settings, trusted=("198.51.100.7/32", "192.0.2.0/24", "2001:db8::/32"), trusted_file=()
    )
    assert load_trusted(given).sources == trusted.sources


def test_a_worker_that_cannot_read_its_parents_settings_says_so_in_one_line() -> None:
    # A repeld upgraded under its running parent, the option gone.
    fd = os.memfd_create("test-settings")
    os.write(fd, b'backend = "127.0.0.1:10025"\nbogus = 1\n')
    env = {SETTINGS_ENV: str(fd)}
    with pytest.raises(ConfigError) as caught:
        inherited_settings(env)
    assert caught.value.problems == [
        "a worker cannot take its parent's settings (after an upgrade, restart repeld): "
        "settings:2: unknown key 'bogus'"
    ]
    assert env == {}
    with pytest.raises(OSError):  # read once, and closed
        os.fstat(fd)
    assert inherited_settings({}) is None  # not a worker


def test_settings_that_do_not_read_back_are_not_handed_over(tmp_path: Path) -> None:
    # A pid file named by a flag not in UTF-8 (argv's surrogate escapes): the text
    # cannot carry it. The parent died of UnicodeEncodeError at the first spawn;
    # now its workers read the files themselves, as before the hand-over.
    base = settings_from_text('backend = "127.0.0.1:10025"\n', "settings")
    text, why = workers.handover(base, TrustedNetworks())
    assert text is not None and why == ""
    odd = dataclasses.replace(base, pidfile=str(tmp_path / "p\udcff.pid"))
    text, why = workers.handover(odd, TrustedNetworks())
    assert text is None and "surrogates not allowed" in why
    sup = Supervisor(odd, [], [], EventLog(None, hostname="test"))
    assert sup._handed is None


async def test_a_reload_no_worker_was_there_to_answer_is_what_the_next_one_gets() -> None:
    # Every worker being replaced (an OOM kill of both) at the SIGHUP: the reload
    # was reported done, but each new worker was handed the old settings.
    sup = Supervisor(Settings(), [], [], EventLog(None, hostname="test"))
    assert await sup.reload_workers() == (0, [], 0)
    sup.settle(Settings(delay=7.0), TrustedNetworks(), 0, [], 0)
    assert sup.settings.delay == 7.0


@pytest.mark.parametrize("late", ["", "cannot read"], ids=["taken", "refused"])
async def test_a_reload_answered_late_is_settled_by_the_first_late_answer(
    late: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with _two_workers() as (sup, write_fd, a, _, _nursery):
        assert await sup.reload_workers() == (0, [], 2)  # both silent for RELOAD_WAIT
        sup.settle(Settings(delay=7.0), TrustedNetworks(), 0, [], 2)
        assert sup.settings.delay != 7.0  # not yet: they may refuse it
        _answer(write_fd, a, late, time.monotonic())
        await trio.sleep(0.5)
        assert (sup.settings.delay == 7.0) is (late == "")
        _answer(write_fd, a, "", time.monotonic())  # settled: one answer decides
        await trio.sleep(0.5)
        assert (sup.settings.delay == 7.0) is (late == "")


async def test_a_reload_whose_silent_workers_all_die_is_given_to_their_replacements(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with _two_workers(second_starting=True) as (sup, _write_fd, _a, _b, _nursery):
        assert await sup.reload_workers() == (0, [], 2)
        sup.settle(Settings(delay=7.0), TrustedNetworks(), 0, [], 2)
        del sup.procs[0]  # `a` died without an answer: `b` may still give one
        sup._settle_late()
        assert sup.settings.delay != 7.0
        del sup.procs[1]  # and `b`: nobody is left to take it or refuse it
        sup._settle_late()
        assert sup.settings.delay == 7.0
