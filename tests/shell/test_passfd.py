"""The pass pool (shell/passfd.py) against a real UNIX-domain listener standing in for
smtpd's `pass` service: it accepts the channel, takes the descriptor and the attribute
list with recvmsg as smtpd's pass_accept_attr does, and closes the channel (or not).

What is checked is when each hand-off is settled and how: by the next hand-off when
smtpd was quick, by the pool's own set when it was slow, at the deadline when it never
came, and at stop by one last look. tests/system/test_postfix_pass.py has the real
Postfix; the real clock here, with short bounds, and no speed asserted.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import resource
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator

import trio
import trio.testing

from repeld.core.names import HandOffResult
from repeld.core.postfixpass import pass_attributes
from repeld.shell.passfd import COLLECT_AGE, STOP_WAIT, SWEEP_INTERVAL, Done, PassPool

ATTRIBUTES = pass_attributes("127.0.0.9", 40009, "127.0.0.1", 25)
#: Long enough never to end a hand-off these tests expect smtpd to take.
LONG = 30.0


class Smtpd:
    """A listening UNIX socket that takes descriptors when told to."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(64)
        self.path = path

    def take(self, answer: bytes = b"") -> tuple[socket.socket, bytes]:
        """Accept one channel, receive the client and the list, then answer or close."""
        chan, _ = self.listener.accept()
        with chan:
            fds = array.array("i")
            _, ancillary, _, _ = chan.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
            ((_, _, data),) = ancillary
            fds.frombytes(data[: fds.itemsize])
            attributes = chan.recv(4096)
            if answer:
                chan.sendall(answer)
        return socket.socket(fileno=fds[0]), attributes

    def accept_only(self) -> socket.socket:
        """Accept a channel and leave it open: smtpd that never gets to it."""
        chan, _ = self.listener.accept()
        return chan


@contextlib.contextmanager
def _smtpd() -> Iterator[Smtpd]:
    with tempfile.TemporaryDirectory() as tmp:
        smtpd = Smtpd(os.path.join(tmp, "smtpd"))
        with smtpd.listener:
            yield smtpd


def _client_pair() -> tuple[socket.socket, socket.socket]:
    """(repeld's accepted socket, the remote client), on loopback TCP."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        remote = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    accepted.setblocking(False)
    return accepted, remote


class Outcomes:
    def __init__(self) -> None:
        self.seen: dict[int, tuple[HandOffResult, str]] = {}

    def send(
        self, pool: PassPool, smtpd: Smtpd, key: int, timeout: float = LONG
    ) -> tuple[socket.socket, socket.socket]:
        """Hand a new client to `smtpd` as `key`: (repeld's socket, the remote client)."""
        client, remote = _client_pair()
        pool.hand_off(client, smtpd.path, ATTRIBUTES, timeout, self.done_for(key, client))
        return client, remote

    def done_for(self, key: int, sock: socket.socket) -> Done:
        def done(outcome: HandOffResult, detail: str) -> None:
            assert key not in self.seen, "done twice"
            self.seen[key] = (outcome, detail)
            sock.close()

        return done

    async def wait_for(self, key: int) -> tuple[HandOffResult, str]:
        with trio.fail_after(10):
            while key not in self.seen:
                await trio.sleep(0.005)
        return self.seen[key]


@contextlib.asynccontextmanager
async def _pool() -> AsyncIterator[PassPool]:
    errors: list[str] = []
    pool = PassPool(errors.append)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run)
        await trio.sleep(0)
        yield pool
        nursery.cancel_scope.cancel()
    assert errors == []


async def test_a_quick_smtpd_is_seen_at_the_next_hand_off_and_has_the_client() -> None:
    outcomes = Outcomes()
    with _smtpd() as smtpd:
        async with _pool() as pool:
            _, first_remote = outcomes.send(pool, smtpd, 1)
            taken, attributes = smtpd.take()
            assert attributes == ATTRIBUTES
            # smtpd holds the client itself: what it writes, the remote client reads
            taken.sendall(b"220 smtpd\r\n")
            assert first_remote.recv(64) == b"220 smtpd\r\n"
            assert 1 not in outcomes.seen  # nothing read the channel yet
            await trio.sleep(COLLECT_AGE)  # handed on in an earlier wake-up
            _, second_remote = outcomes.send(pool, smtpd, 2)
            # the second hand-off itself read the first channel's end of file
            assert outcomes.seen[1] == (HandOffResult.TAKEN, "")
            assert len(pool) == 1
            taken2, _ = smtpd.take()
            assert await outcomes.wait_for(2) == (HandOffResult.TAKEN, "")
            assert len(pool) == 0
            for s in (taken, taken2, first_remote, second_remote):
                s.close()
        assert pool.outcomes[HandOffResult.TAKEN] == 2


async def test_a_hand_off_leaves_a_channel_handed_on_just_before(
    mock_clock: trio.testing.MockClock,
) -> None:
    # Clients taken in one wake-up are handed on within microseconds: smtpd has
    # seldom closed the last one's channel yet, and reading it would find it
    # open (a system call and an exception). A channel younger than COLLECT_AGE
    # waits for a later hand-off, which reads every older one in order.
    outcomes = Outcomes()
    with _smtpd() as smtpd:
        async with _pool() as pool:
            remotes = [outcomes.send(pool, smtpd, 1)[1]]
            taken = [smtpd.take()[0]]  # smtpd took it at once
            mock_clock.jump(COLLECT_AGE / 2)
            remotes.append(outcomes.send(pool, smtpd, 2)[1])
            assert outcomes.seen == {} and len(pool) == 2  # the first was left unread
            taken.append(smtpd.take()[0])
            mock_clock.jump(COLLECT_AGE * 1.5)  # both older than COLLECT_AGE now
            remotes.append(outcomes.send(pool, smtpd, 3)[1])
            assert outcomes.seen == {1: (HandOffResult.TAKEN, ""), 2: (HandOffResult.TAKEN, "")}
            assert len(pool) == 1
            taken.append(smtpd.take()[0])
            for s in taken + remotes:
                s.close()


async def test_with_no_next_hand_off_the_pool_settles_a_taken_client_by_itself() -> None:
    outcomes = Outcomes()
    with _smtpd() as smtpd:
        async with _pool() as pool:
            client, remote = outcomes.send(pool, smtpd, 1)
            taken, _ = smtpd.take()
            assert await outcomes.wait_for(1) == (HandOffResult.TAKEN, "")
            assert client.fileno() == -1  # repeld's copy is closed; smtpd's lives on
            taken.sendall(b"220 still here\r\n")
            assert remote.recv(64) == b"220 still here\r\n"
            taken.close()
            remote.close()


async def test_a_slow_smtpd_is_waited_for_in_the_set_and_still_takes_the_client() -> None:
    outcomes = Outcomes()
    with _smtpd() as smtpd:
        async with _pool() as pool:
            _, remote = outcomes.send(pool, smtpd, 1)
            # past the sweep, the channel still open: it waits in the pool's set
            await trio.sleep(SWEEP_INTERVAL * 5)
            assert 1 not in outcomes.seen and len(pool) == 1
            taken, _ = smtpd.take()
            assert await outcomes.wait_for(1) == (HandOffResult.TAKEN, "")
            taken.close()
            remote.close()


async def test_a_poller_that_fails_still_settles_the_channel() -> None:
    # The kernel refuses to unwatch a channel (a fault injected into the poller's
    # update, as EBADF would come): the channel is closed, its hand-off settled
    # and counted all the same, and the error reported, never raised.
    outcomes = Outcomes()
    errors: list[str] = []
    with _smtpd() as smtpd:
        pool = PassPool(errors.append)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run)
            await trio.sleep(0)
            _, remote = outcomes.send(pool, smtpd, 1)
            await trio.sleep(SWEEP_INTERVAL * 2)  # unread at the sweep: in the set
            assert len(pool) == 1

            def refuse(fd: int, old: int, new: int) -> None:
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))

            pool._poller.update = refuse  # type: ignore[method-assign]
            taken, _ = smtpd.take()
            assert await outcomes.wait_for(1) == (HandOffResult.TAKEN, "")
            assert len(pool) == 0 and pool.outcomes[HandOffResult.TAKEN] == 1
            nursery.cancel_scope.cancel()
        assert errors == [
            f"pass pool: cannot unwatch a channel: {OSError(errno.EBADF, os.strerror(errno.EBADF))!r}"
        ]
        for sock in (taken, remote):
            sock.close()


async def test_a_service_that_answers_with_bytes_is_no_pass_service() -> None:
    outcomes = Outcomes()
    with _smtpd() as smtpd:
        async with _pool() as pool:
            for key in (1, 2):  # seen by the next hand-off, then by the pool's sweep
                _, remote = outcomes.send(pool, smtpd, key)
                taken, _ = smtpd.take(answer=b"220 a unix service\r\n")
                taken.close()
                remote.close()
            for key in (1, 2):
                outcome, detail = await outcomes.wait_for(key)
                assert outcome is HandOffResult.DESCRIPTOR_REFUSED
                assert "220 a unix service" in detail


async def test_out_of_descriptors_for_the_channel_is_a_failed_hand_off() -> None:
    # The accept took the last descriptor the process may have: the channel's
    # socket cannot be made. That hand-off fails like any other (the caller
    # tells the client 421 and writes a backend-error), and is counted.
    outcomes = Outcomes()
    with _smtpd() as smtpd:
        async with _pool() as pool:
            client, remote = _client_pair()
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (client.fileno() + 8, hard))
            filler: list[int] = []
            try:
                with contextlib.suppress(OSError):  # take every descriptor left
                    while True:
                        filler.append(os.open(os.devnull, os.O_RDONLY))
                pool.hand_off(client, smtpd.path, ATTRIBUTES, LONG, outcomes.done_for(1, client))
            finally:
                for fd in filler:
                    os.close(fd)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            outcome, detail = outcomes.seen[1]
            assert outcome is HandOffResult.ERROR
            assert detail.startswith("no socket for the channel: ") and "Too many open files" in (
                detail
            )
            assert pool.outcomes[HandOffResult.ERROR] == 1 and len(pool) == 0
            remote.close()


async def test_no_answer_within_the_bound_is_a_timeout() -> None:
    outcomes = Outcomes()
    with _smtpd() as smtpd:
        async with _pool() as pool:
            _, remote = outcomes.send(pool, smtpd, 1, 0.3)
            chan = smtpd.accept_only()  # accepted, never read
            outcome, detail = await outcomes.wait_for(1)
            assert outcome is HandOffResult.TIMEOUT
            assert "in time" in detail
            chan.close()
            remote.close()


async def test_at_stop_a_taken_client_is_taken_and_only_the_others_time_out() -> None:
    outcomes = Outcomes()
    with _smtpd() as smtpd:
        async with _pool() as pool:
            _, taken_remote = outcomes.send(pool, smtpd, 1)
            _, waiting_remote = outcomes.send(pool, smtpd, 2)
            taken, _ = smtpd.take()  # the first, after the second hand-off looked
            chan = smtpd.accept_only()
            assert outcomes.seen == {}
        # the pool stopped before its sweep: its last look settles both
        assert outcomes.seen[1] == (HandOffResult.TAKEN, "")
        assert outcomes.seen[2] == (HandOffResult.TIMEOUT, "repeld is stopping")
        for s in (taken, chan, taken_remote, waiting_remote):
            s.close()


async def test_at_stop_smtpd_still_has_a_moment_to_take_the_last_clients() -> None:
    # A hard stop (no grace left) just after a hand-off: the descriptor is queued
    # at smtpd already. A client smtpd takes within STOP_WAIT is TAKEN, never
    # told 421 first.
    outcomes = Outcomes()
    with _smtpd() as smtpd:
        async with trio.open_nursery() as outer:
            taken: list[socket.socket] = []

            async def smtpd_a_little_late() -> None:
                await trio.sleep(STOP_WAIT / 5)
                taken.append(smtpd.take()[0])

            async with _pool() as pool:
                _, remote = outcomes.send(pool, smtpd, 1)
                outer.start_soon(smtpd_a_little_late)
            # the pool's run ended here: cancelled, it waited for the channel
        assert outcomes.seen[1] == (HandOffResult.TAKEN, "")
        taken[0].sendall(b"220 smtpd\r\n")
        assert remote.recv(64) == b"220 smtpd\r\n"  # no 421 before it
        for s in (*taken, remote):
            s.close()


async def test_a_bound_shorter_than_the_sweep_is_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ended: list[tuple[HandOffResult, float]] = []
    with _smtpd() as smtpd:
        async with _pool() as pool:
            client, remote = _client_pair()
            start = trio.current_time()
            bound = SWEEP_INTERVAL / 4

            def done(outcome: HandOffResult, _detail: str) -> None:
                ended.append((outcome, trio.current_time()))
                client.close()

            pool.hand_off(client, smtpd.path, ATTRIBUTES, bound, done)
            chan = smtpd.accept_only()  # accepted, never read
            with trio.fail_after(10):
                while not ended:
                    await trio.sleep(bound / 10)
            ((outcome, when),) = ended
            assert outcome is HandOffResult.TIMEOUT
            assert when - start < SWEEP_INTERVAL / 2  # at its bound, not at the sweep
            chan.close()
            remote.close()


async def test_a_bound_shortened_by_a_reload_is_kept_behind_a_longer_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # After a reload that shortens --connect-timeout the newest hand-off is due
    # before the ones waiting ahead of it: it still ends at its own bound.
    outcomes = Outcomes()
    with _smtpd() as smtpd:
        async with _pool() as pool:
            start = trio.current_time()
            bound = SWEEP_INTERVAL / 4
            opened = []
            for key, timeout in ((1, LONG), (2, bound)):
                _, remote = outcomes.send(pool, smtpd, key, timeout)
                opened += [remote, smtpd.accept_only()]  # accepted, never read
            with trio.fail_after(10):
                while 2 not in outcomes.seen:
                    await trio.sleep(bound / 10)
            assert outcomes.seen[2][0] is HandOffResult.TIMEOUT
            # at its bound, not at the first's sweep
            assert trio.current_time() - start < SWEEP_INTERVAL / 2
            assert 1 not in outcomes.seen  # the first still waits for smtpd
            for sock in opened:
                sock.close()


class _Steps(trio.abc.Instrument):
    """Counts the steps of the tasks whose name ends in `name`: each one a time
    the task was woken (trio's public instrument API)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.name):
            self.count += 1


async def test_steady_hand_offs_never_wake_the_pool(mock_clock: trio.testing.MockClock) -> None:
    # A hand-off every half sweep, smtpd taking each at once: each settles the one
    # before, so the sweep it was due for would find nothing, and the pool's task
    # is never woken for it (each such wake-up of the process costs CPU).
    outcomes = Outcomes()
    steps = _Steps("PassPool.run")
    count = 20
    with _smtpd() as smtpd:
        async with _pool() as pool:
            await trio.testing.wait_all_tasks_blocked()  # the pool's task is waiting
            trio.lowlevel.add_instrument(steps)
            try:
                for key in range(count):
                    _, remote = outcomes.send(pool, smtpd, key)
                    taken, _ = smtpd.take()
                    taken.close()
                    remote.close()
                    mock_clock.jump(SWEEP_INTERVAL / 2)
                    await trio.testing.wait_all_tasks_blocked()
            finally:
                trio.lowlevel.remove_instrument(steps)
            assert steps.count == 0
            assert sorted(outcomes.seen) == list(range(count - 1))  # each by the next one
            # the last one, with no hand-off after it, by the pool's sweep
            mock_clock.jump(SWEEP_INTERVAL)
            await trio.testing.wait_all_tasks_blocked()
            assert outcomes.seen[count - 1] == (HandOffResult.TAKEN, "")
            assert len(pool) == 0


async def test_a_batch_of_hand_offs_moves_the_pools_wake_up_once_at_its_end(
    mock_clock: trio.testing.MockClock,
) -> None:
    # The accept loop's batch (defer ... write_deferred): hand-offs leave the
    # pool's wake-up alone, and the batch's end sets it for all of them at once.
    outcomes = Outcomes()
    steps = _Steps("PassPool.run")
    with _smtpd() as smtpd:
        async with _pool() as pool:
            await trio.testing.wait_all_tasks_blocked()
            pool.defer()
            remotes = [outcomes.send(pool, smtpd, key)[1] for key in range(3)]
            for _ in remotes:
                taken, _ = smtpd.take()
                taken.close()
            trio.lowlevel.add_instrument(steps)
            try:
                mock_clock.jump(2 * SWEEP_INTERVAL)  # no wake-up was set: none comes
                await trio.testing.wait_all_tasks_blocked()
                assert steps.count == 0 and outcomes.seen == {} and len(pool) == 3
                pool.write_deferred()  # the batch is over: due long ago, so at once
                await trio.testing.wait_all_tasks_blocked()
            finally:
                trio.lowlevel.remove_instrument(steps)
            assert steps.count == 1  # one wake-up settled the whole batch
            assert outcomes.seen == {key: (HandOffResult.TAKEN, "") for key in range(3)}
            assert len(pool) == 0
            # outside a batch a hand-off sets the wake-up itself, as before
            _, remote = outcomes.send(pool, smtpd, 3)
            taken, _ = smtpd.take()
            taken.close()
            mock_clock.jump(SWEEP_INTERVAL)
            await trio.testing.wait_all_tasks_blocked()
            assert outcomes.seen[3] == (HandOffResult.TAKEN, "")
            for sock in [*remotes, remote]:
                sock.close()
