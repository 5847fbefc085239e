"""Prometheus metrics: what they are, how events feed them, how they are written.

The daemon's events already say everything a metric needs, so the one hook is
the EventLog's observer: with --metrics on, `Metrics.observe(event)` sees every
event (early talkers too under --no-report-attacks), in `emit()`, or when an
`emit_built()` one is built (the server's snapshot builds every one that waits
first), and costs a field look-up, a
counter increment and, for four kinds of event, a bisect into a histogram.
With --metrics off nothing is hooked and nothing is counted here. Counters the
server keeps anyway (held, relays, refusals, the cache's answers, dropped
events, events by name) are read only when someone scrapes.

A scrape turns a *snapshot* (plain dicts and lists of numbers, JSON-able) into
the text exposition format. Snapshots add up: with --workers each worker sends
its own over the pipe that already carries `stats` (SIGUSR1, the same request),
and the parent sums them and serves one endpoint. That was chosen over
prometheus-client's multiprocess mode, which keeps one mmap'ed file per
process and metric in a directory that every worker must still be able to
write after dropping privileges (and inside a chroot), that must be emptied at
start and cleaned of dead workers' files (`mark_process_dead`), and that turns
every counter increment into a write to shared memory under a lock. The pipe
costs one JSON line of under a few KiB per worker and scrape (docs/ARCHITECTURE.md).

prometheus-client, the Prometheus project's own Python library, provides the
metric families and `generate_latest`, on a registry of our own built per
scrape (never the process-global one, which other code may fill); its
histogram and counter *objects* are not used on the hot path because each
takes a lock per update and cannot be summed across processes. It and h11 are
plain dependencies, not an extra: both are small pure-Python wheels with no
dependencies of their own, and a flag that fails on some installs would be a
worse trade than ~200 KiB. This module imports no trio and no sockets (its own
layer in docs/ARCHITECTURE.md); the endpoint is shell/metrics_http.py.
"""

from __future__ import annotations

import bisect
import resource
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from repeld import __version__
from repeld.core.dnsbl import RESULTS
from repeld.core.events import Event
from repeld.core.hold import PassReason
from repeld.core.names import (
    EarlyAction,
    EnforceEnd,
    EventName,
    ExecEnd,
    HandOffResult,
    HangupHow,
    ProxyOutcome,
    RelayEnd,
)
from repeld.core.policy import Refuse

__all__ = [
    "CONTENT_TYPE",
    "COUNTERS",
    "GAUGES",
    "HISTOGRAMS",
    "LABELLED_GAUGES",
    "PROCESS",
    "TOTALS",
    "Histogram",
    "Metrics",
    "ProcessStats",
    "Snapshot",
    "WorkerTally",
    "counters_only",
    "empty_snapshot",
    "merge",
    "render",
]

#: The Content-Type of a scrape's answer: text format 0.0.4, which is what
#: generate_latest writes for names like ours (prometheus-client 0.22+ would
#: announce 1.0.0, and older releases know no other constant).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Seconds from accept to early talk or hang-up: fine below a few seconds, where
#: the bots that never wait are, and every few seconds up to a minute, where the
#: give-up curve of the ones that do wait can be read.
GIVE_UP_BUCKETS = (0.1, 0.5, 1, 2, 3, 5, 7.5, 10, 12.5, 15, 20, 25, 30, 40, 50, 60)
#: Seconds a relayed session lasted, from a refused RCPT to a long DATA.
RELAY_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: Seconds one batched trip to the pass cache took (memory: microseconds; SQLite:
#: a thread hop; Redis: a network round trip).
LOOKUP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


@dataclass(frozen=True, slots=True)
class _Family:
    key: str  # the snapshot's key
    name: str  # the metric's name, without _total for counters
    help: str
    label: str = ""  # the one label of a labelled counter
    seed: tuple[str, ...] = ()  # label values shown as 0 before the first event


#: Counters with one label: snapshot["labelled"][key][value] = count.
COUNTERS = (
    _Family(
        "early_talkers",
        "repeld_early_talkers",
        "Clients that spoke before the greeting, by what was done (penalty: cut off unheard)",
        "action",
        tuple(str(a) for a in EarlyAction),
    ),
    _Family(
        "hangups",
        "repeld_hangups",
        "Clients that left before the greeting, by how (close: FIN, reset: RST)",
        "how",
        tuple(str(h) for h in HangupHow),
    ),
    _Family(
        "passes",
        "repeld_passes",
        "Clients handed to the MTA, by reason",
        "reason",
        tuple(str(r) for r in PassReason),
    ),
    _Family(
        "refusals",
        "repeld_refusals",
        "Clients turned away with 421 at a limit, by limit",
        "limit",
        tuple(str(r) for r in Refuse),
    ),
    _Family(
        "relay_ends",
        "repeld_relay_ends",
        "Relayed sessions over, by how they ended",
        "end",
        tuple(str(e) for e in RelayEnd),
    ),
    _Family(
        "exec_ends",
        "repeld_exec_ends",
        "--exec programs done, by how they ended",
        "end",
        tuple(str(e) for e in ExecEnd),
    ),
    _Family(
        "enforce_ends",
        "repeld_enforce_sessions",
        "Early talkers under --on-early enforce, by how their dialogue ended (gone: left "
        "before the greeting; busy: dropped, every session taken)",
        "end",
        tuple(str(e) for e in EnforceEnd),
    ),
    _Family(
        "handoffs",
        "repeld_handoffs",
        "Clients handed to Postfix's smtpd through a pass:PATH backend, by result "
        "(taken, or the cause of the 421)",
        "result",
        tuple(str(o) for o in HandOffResult),
    ),
    _Family(
        "cache_lookups",
        "repeld_cache_lookups",
        "Pass-cache answers, by answer",
        "answer",
        ("good", "bad", "unknown"),
    ),
    _Family(
        "dns_lookups",
        "repeld_dns_lookups",
        "DNS list answers, one per list and client, by result (listed, refused, clear: a "
        "query answered, refused with only refusal codes; timeout, error: none; cached: no "
        "query; skipped: none, no query; "
        "late: answered after its clients were decided)",
        "result",
        RESULTS,
    ),
    _Family(
        "dns_hits",
        "repeld_dns_hits",
        "Clients a DNS list listed, by list (answers given to clients still held)",
        "list",
    ),
    _Family("events", "repeld_events", "Events emitted, by event name", "event"),
    _Family(
        "proxy",
        "repeld_proxy_connections",
        "Connections from --proxy-from balancers, by outcome (client: a header for a client; "
        "check: a health check; timeout, error, truncated, reset: closed with proxy-error)",
        "outcome",
        tuple(str(o) for o in ProxyOutcome),
    ),
)
#: Counters without labels: snapshot["totals"][key].
TOTALS = (
    _Family("backend_errors", "repeld_backend_errors", "Passed clients the MTA could not take"),
    _Family("cache_errors", "repeld_cache_errors", "Failed pass-cache operations"),
    _Family("cache_outages", "repeld_cache_outages", "Times the pass cache became unusable"),
    _Family("events_dropped", "repeld_events_dropped", "Events the syslog target did not take"),
    _Family("shutdown_held", "repeld_shutdown_held", "Held clients told 421 at shutdown"),
    _Family("worker_restarts", "repeld_worker_restarts", "Workers that died and were replaced"),
)
#: Gauges: snapshot["gauges"][key]; a gauge a snapshot lacks is not exposed.
GAUGES = (
    _Family("held", "repeld_held", "Clients held now, waiting for their greeting"),
    _Family(
        "proxy_pending",
        "repeld_proxy_pending",
        "Connections from --proxy-from balancers whose PROXY header is still to come",
    ),
    _Family(
        "relays",
        "repeld_relays",
        "Passed clients being relayed, run by --exec, or handed to smtpd and not yet taken, now",
    ),
    _Family("cache_entries", "repeld_cache_entries", "Entries in the memory pass cache"),
    _Family("enforcing", "repeld_enforcing", "Enforce sessions (--on-early enforce) running now"),
    _Family("workers", "repeld_workers", "Worker processes running"),
    _Family(
        "workers_answered",
        "repeld_workers_answered",
        "Workers that answered this scrape in time (the others: their last values)",
    ),
    _Family("max_held", "repeld_max_held", "The --max-held limit (the sum over workers)"),
)
#: Gauges with one label: snapshot["labelled_gauges"][key][value] = n; absent, not exposed.
LABELLED_GAUGES = (
    _Family(
        "backend_up",
        "repeld_backend_up",
        "1 if the backend passed its last periodic check (--backend-check-interval), else 0",
        "backend",
    ),
)
#: The standard process metrics, as prometheus-client's ProcessCollector names them:
#: snapshot["process"][key]. (key, kind, how --workers combines them, help)
PROCESS = (
    ("cpu_seconds_total", "counter", "sum", "Total user and system CPU time spent in seconds."),
    ("resident_memory_bytes", "gauge", "sum", "Resident memory size in bytes."),
    ("virtual_memory_bytes", "gauge", "sum", "Virtual memory size in bytes."),
    (
        "start_time_seconds",
        "gauge",
        "min",
        "Start time of the process since unix epoch in seconds.",
    ),
    ("open_fds", "gauge", "fullest", "Number of open file descriptors."),
    ("max_fds", "gauge", "fullest", "Maximum number of open file descriptors."),
)
#: Histograms: snapshot["histograms"][key] = [count per bucket ..., count above, sum].
HISTOGRAMS = (
    _Family("early_talk", "repeld_early_talk_seconds", "Seconds from accept to early talk"),
    _Family("hangup", "repeld_hangup_seconds", "Seconds from accept to a hang-up"),
    _Family("relay_duration", "repeld_relay_duration_seconds", "Seconds a relayed session lasted"),
    _Family(
        "cache_lookup",
        "repeld_cache_lookup_seconds",
        "Seconds of the batched pass-cache trip, once per client in the batch",
    ),
)
BUCKETS: dict[str, tuple[float, ...]] = {
    "early_talk": GIVE_UP_BUCKETS,
    "hangup": GIVE_UP_BUCKETS,
    "relay_duration": RELAY_BUCKETS,
    "cache_lookup": LOOKUP_BUCKETS,
}

#: {"labelled": {key: {value: n}}, "totals": {key: n}, "gauges": {key: n},
#:  "histograms": {key: [n, ..., sum]}, "labelled_gauges": {key: {value: n}},
#:  "process": {key: n}}: what a scrape shows, and a worker sends.
Snapshot = dict[str, dict[str, Any]]


class Histogram:
    """Counts per bucket (not cumulative) and the sum: two list updates per value."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le = less or equal).
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times

    def as_list(self) -> list[float]:
        return [*self.counts, self.sum]


class ProcessStats:
    """This process's CPU, memory and descriptors, read from /proc by prometheus-client.

    The collector is made at start-up, before a chroot can hide /proc; where
    /proc cannot be read (FreeBSD, a chroot without it) the CPU time comes from
    getrusage(2) and the descriptor limit from getrlimit(2), and the rest is
    left out rather than guessed.
    """

    def __init__(self) -> None:
        self._collector = ProcessCollector(registry=None)

    def snapshot(self) -> dict[str, float]:
        found: dict[str, float] = {}
        for family in self._collector.collect():
            for sample in family.samples:
                found[sample.name.removeprefix("process_")] = sample.value
        if "cpu_seconds_total" not in found:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            found["cpu_seconds_total"] = usage.ru_utime + usage.ru_stime
        if "max_fds" not in found:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if soft != resource.RLIM_INFINITY:
                found["max_fds"] = float(soft)
        return found


class Metrics:
    """What one process counts from its events; `snapshot()` adds the server's counters."""

    def __init__(self) -> None:
        self.process = ProcessStats()
        self.labelled: dict[str, Counter[str]] = {f.key: Counter() for f in COUNTERS}
        self.histograms = {f.key: Histogram(BUCKETS[f.key]) for f in HISTOGRAMS}
        self._early = self.labelled["early_talkers"]
        self._hangups = self.labelled["hangups"]
        self._passes = self.labelled["passes"]
        self._relay_ends = self.labelled["relay_ends"]
        self._exec_ends = self.labelled["exec_ends"]
        self._enforce_ends = self.labelled["enforce_ends"]
        self._early_talk = self.histograms["early_talk"]
        self._hangup = self.histograms["hangup"]
        self._relay = self.histograms["relay_duration"]
        self._lookup = self.histograms["cache_lookup"]

    def observe(self, event: Event) -> None:
        """Count one event (EventLog's hook); fields it does not know are ignored."""
        name = event.name
        if name == EventName.PASS:
            self._passes[str(event.get("reason"))] += 1
        elif name == EventName.EARLY_TALKER:
            action = str(event.get("action"))
            self._early[action] += 1
            if action != EarlyAction.PENALTY:  # a penalty is cut off unheard: no talk to time
                self._early_talk.observe(_number(event.get("elapsed")))
            if action == EarlyAction.ENFORCE:
                self._enforce_ends[str(event.get("end"))] += 1
        elif name == EventName.HANGUP:
            self._hangups[str(event.get("how"))] += 1
            self._hangup.observe(_number(event.get("elapsed")))
        elif name == EventName.RELAY_END:
            self._relay_ends[str(event.get("end"))] += 1
            self._relay.observe(_number(event.get("duration")))
        elif name == EventName.EXEC_END:
            self._exec_ends[str(event.get("end"))] += 1

    def observe_lookup(self, seconds: float, clients: int) -> None:
        """One batched trip to the pass cache that answered `clients` clients."""
        self._lookup.observe(seconds, clients)

    def snapshot(
        self,
        *,
        labelled: Mapping[str, Mapping[str, int]] = {},
        totals: Mapping[str, int] = {},
        gauges: Mapping[str, int] = {},
    ) -> Snapshot:
        """This process's metrics, plus the counters and gauges the server keeps itself."""
        counted = {key: dict(values) for key, values in self.labelled.items()}
        for key, values in labelled.items():
            counted[key] = dict(values)
        return {
            "labelled": counted,
            "totals": dict(totals),
            "gauges": dict(gauges),
            "histograms": {key: h.as_list() for key, h in self.histograms.items()},
            "process": self.process.snapshot(),
        }


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def empty_snapshot() -> Snapshot:
    return {
        "labelled": {},
        "totals": {},
        "gauges": {},
        "histograms": {},
        "labelled_gauges": {},
        "process": {},
    }


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """The sum of several processes' snapshots (the --workers parent's endpoint).

    Anything malformed in a worker's snapshot is skipped, never trusted to crash the
    parent: the pipe is internal, but a parent outlives any one worker's bug.
    """
    total = empty_snapshot()
    for snap in snapshots:
        for section in ("labelled", "labelled_gauges"):
            for key, values in _section(snap, section).items():
                if isinstance(values, dict):
                    into = total[section].setdefault(key, {})
                    for value, n in values.items():
                        if isinstance(n, int | float):
                            into[value] = into.get(value, 0) + n
        for section in ("totals", "gauges"):
            for key, n in _section(snap, section).items():
                if isinstance(n, int | float):
                    total[section][key] = total[section].get(key, 0) + n
        for key, counts in _section(snap, "histograms").items():
            size = len(BUCKETS.get(key, ())) + 2
            if not (isinstance(counts, list) and len(counts) == size):
                continue
            into = total["histograms"].setdefault(key, [0] * size)
            for i, n in enumerate(counts):
                if isinstance(n, int | float):
                    into[i] += n
        _merge_process(total["process"], _section(snap, "process"))
    return total


def _merge_process(into: dict[str, Any], process: dict[str, Any]) -> None:
    """Add one process's figures: sums, the earliest start, the fullest descriptor table.

    Descriptors are not summed: the limit is per process, so the pair shown is
    the one of the process nearest its own limit, and open/max stays a share
    an alert can compare with the same threshold, workers or not.
    """
    numbers = {k: float(v) for k, v in process.items() if isinstance(v, int | float)}
    for key, _, how, _ in PROCESS:
        if key not in numbers or how == "fullest":
            continue
        if how == "sum":
            into[key] = into.get(key, 0.0) + numbers[key]
        elif key not in into or numbers[key] < into[key]:  # "min"
            into[key] = numbers[key]
    if numbers.get("max_fds", 0) > 0 and "open_fds" in numbers:
        share = numbers["open_fds"] / numbers["max_fds"]
        if into.get("max_fds", 0) <= 0 or share > into.get("open_fds", 0.0) / into["max_fds"]:
            into["open_fds"], into["max_fds"] = numbers["open_fds"], numbers["max_fds"]
    elif "max_fds" in numbers and "max_fds" not in into:
        into["max_fds"] = numbers["max_fds"]


def counters_only(snap: Snapshot) -> Snapshot:
    """What of a snapshot only ever grows: what a dead worker leaves to the sum."""
    kept = empty_snapshot()
    for section in ("labelled", "totals", "histograms"):
        kept[section] = dict(_section(snap, section))
    cpu = _section(snap, "process").get("cpu_seconds_total")
    if isinstance(cpu, int | float):
        kept["process"]["cpu_seconds_total"] = cpu
    return kept


class WorkerTally:
    """The --workers parent's sum, which never goes backwards.

    Each worker's latest snapshot is kept until a newer one comes, so a worker
    that is late for a scrape is counted with the values it last sent; when a
    worker dies, its counters (not its gauges) are folded into `retired` and
    its successor's count from zero on top of them. Prometheus reads a counter
    that drops as a reset, which a dead worker is not: the parent serves on.
    """

    def __init__(self) -> None:
        self.latest: dict[int, Snapshot] = {}
        self.retired: Snapshot = empty_snapshot()

    def update(self, pid: int, snap: Snapshot) -> None:
        self.latest[pid] = snap

    def retire(self, pid: int) -> None:
        """Worker `pid` is gone: keep what it counted, forget what it held."""
        snap = self.latest.pop(pid, None)
        if snap is not None:
            self.retired = merge([self.retired, counters_only(snap)])

    def total(self, own: Snapshot) -> Snapshot:
        """The sum to serve: every worker that ever ran, and the parent's own `own`."""
        return merge([self.retired, *self.latest.values(), own])


def _section(snap: object, name: str) -> dict[str, Any]:
    section = snap.get(name) if isinstance(snap, dict) else None
    return section if isinstance(section, dict) else {}


def _bound(value: float) -> str:
    # The le label as Prometheus's own clients write it: 1.0, 7.5, 60.0.
    return repr(float(value))


def families(snap: Snapshot) -> Iterator[Metric]:
    """The metric families of a snapshot, every documented family always present."""
    info = InfoMetricFamily("repeld_build", "The repeld version serving", labels=["version"])
    info.add_metric([__version__], {})
    yield info
    labelled = snap.get("labelled", {})
    for family in COUNTERS:
        counter = CounterMetricFamily(family.name, family.help, labels=[family.label])
        values = dict.fromkeys(family.seed, 0) | labelled.get(family.key, {})
        for value, n in sorted(values.items()):
            counter.add_metric([value], n)
        yield counter
    totals = snap.get("totals", {})
    for family in TOTALS:
        if family.key == "worker_restarts" and family.key not in totals:
            continue  # only a --workers parent has workers
        yield CounterMetricFamily(family.name, family.help, value=totals.get(family.key, 0))
    gauges = snap.get("gauges", {})
    for family in GAUGES:
        if family.key in gauges:
            yield GaugeMetricFamily(family.name, family.help, value=gauges[family.key])
    labelled_gauges = snap.get("labelled_gauges", {})
    for family in LABELLED_GAUGES:
        if labelled_gauges.get(family.key):  # absent, or no backend to check (--exec)
            gauge = GaugeMetricFamily(family.name, family.help, labels=[family.label])
            for value, n in sorted(labelled_gauges[family.key].items()):
                gauge.add_metric([value], n)
            yield gauge
    process = snap.get("process", {})
    for key, kind, _, text in PROCESS:
        if key in process:
            make = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield make(f"process_{key.removesuffix('_total')}", text, value=process[key])
    histograms = snap.get("histograms", {})
    for family in HISTOGRAMS:
        bounds = BUCKETS[family.key]
        data = histograms.get(family.key) or [0] * (len(bounds) + 2)
        *counts, total = data
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, n in zip([*map(_bound, bounds), "+Inf"], counts, strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(family.name, family.help, buckets=buckets, sum_value=total)


class _Collector(Collector):
    """A prometheus-client collector over one snapshot."""

    def __init__(self, snap: Snapshot) -> None:
        self._snap = snap

    def collect(self) -> Iterable[Metric]:
        return families(self._snap)


def render(snap: Snapshot) -> bytes:
    """The text exposition of a snapshot, from a registry of its own (never the global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snap))
    return generate_latest(registry)
