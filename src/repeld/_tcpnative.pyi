"""Types for repeld._tcpnative, the cffi module built by native/build_tcpnative.py.

Only what repeld.tcptune uses is declared; the C side is native/tcpnative.c.
"""

from typing import Literal, Protocol

class _TcpInfoPtr(Protocol):
    """A ``struct repeld_tcp_info *`` from ``ffi.new``; fields read through the pointer."""

    state: int
    rtt_us: int
    rttvar_us: int
    retransmits: int
    bytes_received: int

class _CharPtr(Protocol):
    """A ``const char *`` returned by the library, read with ``ffi.string``."""

class _FFI:
    errno: int
    def new(self, cdecl: Literal["struct repeld_tcp_info *"]) -> _TcpInfoPtr: ...
    def string(self, cdata: _CharPtr, maxlen: int = ...) -> bytes: ...

class _Lib:
    REPELD_HAVE_USER_TIMEOUT: int
    REPELD_UNSUPPORTED: int
    def repeld_set_user_timeout(self, fd: int, ms: int, /) -> int: ...
    def repeld_tcp_info(self, fd: int, out: _TcpInfoPtr, /) -> int: ...
    def repeld_tcp_rtt_us(self, fd: int, /) -> int: ...
    def repeld_tcp_state_name(self, state: int, /) -> _CharPtr: ...
    def repeld_sysctl_uint(self, name: bytes, /) -> int: ...

ffi: _FFI
lib: _Lib
