"""The report as plain text, from a `Tally`; no I/O."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from repeld.report.tally import BIN, CANDIDATES, LAST_BIN, Tally

__all__ = ["render_text"]

#: The events the report breaks down above; the rest are counted by name.
_BROKEN_DOWN = frozenset(
    {"pass", "early-talker", "hangup", "dnsbl", "overload", "backend-error", "proxy-error"}
)


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:5.1f}%" if whole else "    -"


def _shown(text: str) -> str:
    """A name taken from the log, as printable text: anyone who can write to
    syslog can put a terminal's escape sequences or a line end in a JSON event
    (`\\u001b`), and the report's reader must not get them raw."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _breakdown(counts: Counter[str]) -> str:
    return ", ".join(f"{_shown(name)} {n}" for name, n in counts.most_common()) or "none"


def _stamp(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


def bin_label(index: int) -> str:
    """`0-5 s`, ..., `60+ s`."""
    start = index * BIN
    return f"{start}+ s" if start >= LAST_BIN else f"{start}-{start + BIN} s"


def render_text(tally: Tally, top: int = 10) -> str:
    """Totals, the repelled share, the give-up curve, other delays, the busiest networks."""
    out: list[str] = []
    add = out.append
    events = sum(tally.events.values())
    too_long = f", {tally.too_long} of them too long to read" if tally.too_long else ""
    add(
        f"repeld report: {events} events in {tally.lines} lines"
        f" ({tally.skipped} lines skipped: not repeld events{too_long})"
    )
    if tally.first is not None and tally.last is not None:
        add(f"from {_stamp(tally.first)} to {_stamp(tally.last)}")
    add("")
    add("Verdicts")
    add(f"  pass          {sum(tally.passes.values()):7d}  ({_breakdown(tally.passes)})")
    add(f"  early-talker  {sum(tally.early.values()):7d}  ({_breakdown(tally.early)})")
    add(f"  hangup        {sum(tally.hangups.values()):7d}  ({_breakdown(tally.hangups)})")
    add(f"  dnsbl         {sum(tally.dnsbl.values()):7d}  ({_breakdown(tally.dnsbl)})")
    add(f"  refused       {sum(tally.refused.values()):7d}  ({_breakdown(tally.refused)})")
    add(f"  backend-error {tally.backend_errors:7d}")
    add("")
    add("Not verdicts on a client")
    add(
        f"  proxy-error   {sum(tally.proxy_errors.values()):7d}  ({_breakdown(tally.proxy_errors)})"
        "  PROXY headers the load balancer got wrong"
    )
    others = Counter({k: n for k, n in tally.events.items() if k not in _BROKEN_DOWN})
    add(f"  other events  {sum(others.values()):7d}  ({_breakdown(others)})")
    add("")
    judged = tally.judged
    add(
        f"Held the delay: {judged} connections"
        " (not trusted, nodelay, dnswl, cached, penalty or cut off by a DNS list)"
    )
    add(f"  repelled      {tally.repelled:7d}  {_pct(tally.repelled, judged)}")
    if tally.would_repel:
        add(
            f"  would repel   {tally.would_repel:7d}  {_pct(tally.would_repel, judged)}"
            "  (--on-early log: talked early, not cut off)"
        )
    add(f"  passed        {tally.waited:7d}  {_pct(tally.waited, judged)}")
    seen = tally.delays_seen()
    add("  delay in force: " + (", ".join(f"{d} s" for d in seen) if seen else "unknown"))
    add("")
    hangups = tally.curve("hangup")
    early = tally.curve("early", "would")
    add("Give-up curve: seconds waited before hanging up or talking")
    add(f"  {'waited':8s} {'hang-ups':>14s}  {'early talk':>14s}")
    hang_total, early_total = sum(hangups), sum(early)
    for index, (h, e) in enumerate(zip(hangups, early, strict=True)):
        add(f"  {bin_label(index):8s} {h:7d} {_pct(h, hang_total)}  {e:7d} {_pct(e, early_total)}")
    add("")
    add("Other delays on the same clients")
    add(f"  {'delay':15s}{'repelled':>8s} {'':6s} {'passed':>8s} {'unknown':>8s}")
    for delay in CANDIDATES:
        what = tally.what_if(delay)
        more = "at least " if what.unknown else "         "
        add(
            f"  {delay:3d} s {more}{what.repelled:8d} {_pct(what.repelled, judged)}"
            f" {what.passed:8d} {what.unknown:8d}"
        )
    add("  A client that hung up or talked after e seconds is repelled by any delay above e")
    add("  and passed by any other. A passed client waited the delay in force, D, so it is")
    add("  known patient up to D only: for a longer delay it is counted as unknown, and the")
    add("  repelled figure is a lower bound.")
    add("")
    add(f"Busiest early-talking networks (/24, /64), top {top}")
    if not tally.networks.exact:
        add(
            f"  (approximate: more than {tally.networks.capacity} networks; each count may be"
            f" over by up to {tally.networks.error})"
        )
    busiest = tally.networks.most_common(top)
    for network, count in busiest:
        add(f"  {_shown(network):43s} {count:7d}")
    if not busiest:
        add("  none")
    if tally.early["enforce"]:
        _envelopes(tally, top, add)
    return "\n".join(out) + "\n"


def _envelopes(tally: Tally, top: int, add: Callable[[str], None]) -> None:
    # --on-early enforce: whom the cut clients wrote as, and what they called themselves.
    add("")
    add(f"Cut clients' envelopes (--on-early enforce: {tally.early['enforce']} talkers), top {top}")
    unread = tally.envelopes_unread
    if unread:
        add(
            f"  ({unread} read from summary lines, which do not carry the envelope:"
            " read the JSON or RFC 5424 events)"
        )
    for title, counts in (
        ("sender domains", tally.sender_domains),
        ("HELO names", tally.helo_names),
    ):
        add(f"  {title}")
        for name, count in counts.most_common(top):
            add(f"    {_shown(name):41s} {count:7d}")
        if not counts:
            add("    none given" if unread < tally.early["enforce"] else "    not in these lines")
