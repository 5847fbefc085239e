"""The policy step before the hold: who is passed at once, who must wait.

Pure code like core.py: it is given an address and the listener's flags and
answers `None` (hold the client) or the `PassReason` for passing it at once.
This is where later checks that act before the hold belong (a pass cache,
per-client limits), so the connection shell never grows rules of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import netaddr

from .core import PassReason

__all__ = ["Policy", "TrustedNetworks", "normalize_address"]


def normalize_address(address: str) -> str:
    """The address a rule should see: `::ffff:a.b.c.d` is `a.b.c.d`, scope ids dropped."""
    address = address.split("%", 1)[0]
    if address.lower().startswith("::ffff:") and "." in address:
        return address[7:]
    return address


class TrustedNetworks:
    """A set of networks whose clients skip the delay (IPv4 and IPv6)."""

    __slots__ = ("_set", "sources")

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self.sources: tuple[str, ...] = tuple(networks)
        # Raises netaddr.AddrFormatError for a bad entry; settings.py reports it.
        self._set = netaddr.IPSet(self.sources)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        try:
            ip = netaddr.IPAddress(normalize_address(address))
        except (netaddr.AddrFormatError, ValueError):
            return False
        if ip.version == 6 and ip.is_ipv4_mapped():
            ip = ip.ipv4()
        return ip in self._set

    def __len__(self) -> int:
        return len(self.sources)


@dataclass(frozen=True, slots=True)
class Policy:
    """Decides, before any hold, whether a connection may skip the delay."""

    trusted: TrustedNetworks

    def admit(self, client: str, *, nodelay: bool) -> PassReason | None:
        """`None` to hold the client, else why it passes at once."""
        if client in self.trusted:
            return PassReason.TRUSTED
        if nodelay:
            return PassReason.NODELAY
        return None
