"""Types for repeld._tcpnative, the cffi module built by native/build_tcpnative.py.

Only what repeld.service.tcptune uses is declared; the C side is native/tcpnative.c.
"""

from typing import Literal, Protocol, overload

class _TcpInfoPtr(Protocol):
    """A ``struct repeld_tcp_info *`` from ``ffi.new``; fields read through the pointer."""

    state: int
    rtt_us: int
    rttvar_us: int
    retransmits: int
    bytes_received: int

class _CharArray(Protocol):
    """A ``char[]`` field, read with ``ffi.string``."""

class _PeerPtr(Protocol):
    """A ``struct repeld_peer *`` from ``ffi.new``: what accept4 said of the client."""

    host: _CharArray
    port: int

class _CharPtr(Protocol):
    """A ``const char *`` returned by the library, read with ``ffi.string``."""

class _FFI:
    errno: int
    @overload
    def new(self, cdecl: Literal["struct repeld_tcp_info *"]) -> _TcpInfoPtr: ...
    @overload
    def new(self, cdecl: Literal["struct repeld_peer *"]) -> _PeerPtr: ...
    def string(self, cdata: _CharPtr | _CharArray, maxlen: int = ...) -> bytes: ...

class _Lib:
    REPELD_HAVE_USER_TIMEOUT: int
    REPELD_UNSUPPORTED: int
    def repeld_accept(self, fd: int, peer: _PeerPtr, /) -> int: ...
    def repeld_timer_open(self) -> int: ...
    def repeld_timer_arm(self, fd: int, ns: int, /) -> int: ...
    def repeld_set_nodelay(self, fd: int, on: int, /) -> int: ...
    def repeld_set_keepalive(self, fd: int, idle: int, interval: int, count: int, /) -> int: ...
    def repeld_set_user_timeout(self, fd: int, ms: int, /) -> int: ...
    def repeld_set_abortive_close(self, fd: int, /) -> int: ...
    def repeld_accept_queue_cap(self) -> int: ...
    def repeld_syn_backlog(self) -> int: ...
    def repeld_tcp_info(self, fd: int, out: _TcpInfoPtr, /) -> int: ...
    def repeld_tcp_rtt_us(self, fd: int, /) -> int: ...
    def repeld_tcp_state_name(self, state: int, /) -> _CharPtr: ...

ffi: _FFI
lib: _Lib
