"""The other pass path: hand the client to a program, inetd/ucspi-tcp style.

With `--exec PROGRAM`, a passed client's socket becomes the program's standard
input and output, and the program learns who is on the other end from the
environment variables of ucspi-tcp's tcpserver (TCPREMOTEIP, TCPREMOTEPORT,
TCPLOCALIP, TCPLOCALPORT, PROTO=TCP), as qmail-smtpd and friends expect. The
program greets the client itself; repeld waits for it to exit.

It runs as the user repeld dropped to (and inside its chroot). A program that
cannot be started gets the client the same 421 as an unreachable MTA.

The client's socket is the one socket repeld lets a child inherit. It has left
the holding pen's epoll set before this runs (the pen releases a connection
before its verdict is carried out) and never enters the relay pool's, so no
private readiness set watches a description that the child shares. While the
child is being started, it briefly holds a copy of every fd (until its exec
closes the close-on-exec ones): the pen and the pool take each socket out of
their sets before closing it, so that does them no harm (poller.py's rule).
"""

from __future__ import annotations

import os
import signal
import socket

import trio

from repeld.core import events
from repeld.core.events import ConnInfo
from repeld.core.names import ExecEnd
from repeld.shell.eventlog import EventLog
from repeld.shell.replies import BACKEND_UNAVAILABLE, reply_and_close

__all__ = ["TERMINATE_WAIT", "exec_environment", "handoff_exec"]

#: After SIGTERM at the end of the shutdown grace, the program gets this long.
TERMINATE_WAIT = 5.0


def exec_environment(conn: ConnInfo, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a ucspi-tcp program expects, on top of `base`."""
    env = dict(os.environ if base is None else base)
    env.update(
        PROTO="TCP",
        TCPREMOTEIP=conn.client,
        TCPREMOTEPORT=str(conn.client_port),
        TCPLOCALIP=conn.server,
        TCPLOCALPORT=str(conn.server_port),
    )
    return env


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except OSError:  # all gone already
        pass


async def handoff_exec(
    sock: socket.socket,
    conn: ConnInfo,
    accepted_at: float,
    argv: tuple[str, ...],
    log: EventLog,
    check: bool = False,
) -> None:
    """Run `argv` with the client as stdin/stdout until it exits (`check`: a
    balancer's health check, which is no client: no `exec-end` for it)."""
    program = argv[0]
    try:
        # O_NONBLOCK belongs to the open file, which the program shares: most
        # programs expect an ordinary blocking stdin.
        sock.setblocking(True)
        try:
            proc = await trio.lowlevel.open_process(
                list(argv),
                stdin=sock.fileno(),
                stdout=sock.fileno(),
                env=exec_environment(conn),
                start_new_session=True,  # a ^C on repeld's terminal is not for it
            )
        except (OSError, ValueError) as exc:  # ValueError: what execve cannot take
            sock.setblocking(False)
            reply_and_close(sock, BACKEND_UNAVAILABLE)
            elapsed = trio.current_time() - accepted_at
            why = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
            log.emit(events.backend_error(conn, elapsed, program, why))
            return
        sock.close()  # the program has its own copies
        started = trio.current_time()
        end = ExecEnd.EXIT
        try:
            status = await proc.wait()
        except BaseException:
            end = ExecEnd.SHUTDOWN
            with trio.CancelScope(shield=True):
                # The whole session: a shell's children hold the socket too.
                _signal_group(proc.pid, signal.SIGTERM)
                with trio.move_on_after(TERMINATE_WAIT):
                    await proc.wait()
                _signal_group(proc.pid, signal.SIGKILL)
                await proc.wait()
            status = proc.returncode if proc.returncode is not None else -signal.SIGKILL
            raise
        finally:
            now = trio.current_time()
            if not check:
                elapsed, duration = now - accepted_at, now - started
                log.emit(events.exec_end(conn, elapsed, duration, program, status, end))
    except Exception as exc:  # never let one session take the server down
        log.emit(events.internal_error(conn, trio.current_time() - accepted_at, repr(exc)))
    finally:
        sock.close()
