"""Build repeld._tcpnative (cffi API mode) from tcpnative.h and tcpnative.c.

setup.py names this file in cffi_modules.  It reads its inputs by path and never
touches the repeld package, which is what is being built.  Run it directly to
build in place for development: ``python native/build_tcpnative.py``.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "tcpnative.h").read_text(encoding="utf-8"))
ffibuilder.set_source("repeld._tcpnative", (HERE / "tcpnative.c").read_text(encoding="utf-8"))

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent / "src"), verbose=True)
