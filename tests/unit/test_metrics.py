"""repeld/metrics.py: events in, counters and histograms out, snapshots that add up,
and text that Prometheus's own parser reads back.
"""

from __future__ import annotations

import itertools
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from repeld import __version__
from repeld.core import events
from repeld.core.events import ConnInfo, Event, Severity
from repeld.core.hold import EarlyTalk, HangUp, Pass, PassReason
from repeld.core.names import RelayEnd
from repeld.metrics import (
    COUNTERS,
    GAUGES,
    GIVE_UP_BUCKETS,
    HISTOGRAMS,
    LABELLED_GAUGES,
    PROCESS,
    TOTALS,
    Histogram,
    Metrics,
    WorkerTally,
    merge,
    render,
)
from repeld.shell.metrics_http import route

CONN = ConnInfo("192.0.2.1", 4242, "127.0.0.1", 25)


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def _value(text: bytes, name: str, **labels: str) -> float:
    return _samples(text)[(name, tuple(sorted(labels.items())))]


def test_each_verdict_event_lands_in_its_counter_and_histogram() -> None:
    m = Metrics()
    m.observe(events.early_talker(CONN, EarlyTalk(5, b"EHLO ", 0.2), "drop"))
    m.observe(events.early_talker(CONN, EarlyTalk(5, b"EHLO ", 4.0), "reject"))
    m.observe(events.penalized(CONN, 0.0))
    m.observe(events.hangup(CONN, HangUp(3.0, reset=False)))
    m.observe(events.hangup(CONN, HangUp(61.0, reset=True)))
    m.observe(events.passed(CONN, Pass(PassReason.DELAY, 25.0)))
    m.observe(events.passed(CONN, Pass(PassReason.TRUSTED, 0.0)))
    m.observe(events.relay_end(CONN, 30.0, 5.0, 100, 200, RelayEnd.CLIENT_RESET))
    m.observe(events.backend_error(CONN, 25.0, "127.0.0.1:25", "refused"))
    text = render(m.snapshot())
    assert _value(text, "repeld_early_talkers_total", action="drop") == 1
    assert _value(text, "repeld_early_talkers_total", action="reject") == 1
    assert _value(text, "repeld_early_talkers_total", action="penalty") == 1
    assert _value(text, "repeld_hangups_total", how="close") == 1
    assert _value(text, "repeld_hangups_total", how="reset") == 1
    assert _value(text, "repeld_passes_total", reason="delay") == 1
    assert _value(text, "repeld_passes_total", reason="trusted") == 1
    assert _value(text, "repeld_passes_total", reason="cache") == 0  # seeded
    assert _value(text, "repeld_relay_ends_total", end="client-reset") == 1
    # every way a relay ends is seeded, and only those: the code and the seeds share RelayEnd
    assert _value(text, "repeld_relay_ends_total", end="backend-reset") == 0
    assert b'end="client"' not in text
    # A penalty is cut off unheard: two early talks timed, not three.
    assert _value(text, "repeld_early_talk_seconds_count") == 2
    assert _value(text, "repeld_early_talk_seconds_bucket", le="0.5") == 1
    assert _value(text, "repeld_early_talk_seconds_bucket", le="3.0") == 1
    assert _value(text, "repeld_early_talk_seconds_bucket", le="5.0") == 2
    assert _value(text, "repeld_early_talk_seconds_sum") == pytest.approx(4.2)
    assert _value(text, "repeld_hangup_seconds_bucket", le="3.0") == 1  # le: less or equal
    assert _value(text, "repeld_hangup_seconds_bucket", le="60.0") == 1
    assert _value(text, "repeld_hangup_seconds_bucket", le="+Inf") == 2
    assert _value(text, "repeld_relay_duration_seconds_sum") == 5.0
    assert _value(text, "repeld_build_info", version=__version__) == 1


def test_unknown_fields_and_values_are_taken_as_they_come() -> None:
    # Issue 9's observe mode: action=log and an early_bytes field on pass.
    m = Metrics()
    m.observe(events.early_talker(CONN, EarlyTalk(3, b"abc", 1.0), "log"))
    fields = (*events.passed(CONN, Pass(PassReason.CACHE, 1.0)).fields, ("early_bytes", 3))
    m.observe(Event.of("pass", Severity.INFO, fields, "PASS CACHE"))
    m.observe(Event.of("backend-check", Severity.WARNING, (("event", "backend-check"),), "x"))
    text = render(m.snapshot())
    assert _value(text, "repeld_early_talkers_total", action="log") == 1
    assert _value(text, "repeld_passes_total", reason="cache") == 1


def test_a_batched_lookup_is_observed_once_per_client() -> None:
    m = Metrics()
    m.observe_lookup(0.002, 3)
    text = render(m.snapshot())
    assert _value(text, "repeld_cache_lookup_seconds_count") == 3
    assert _value(text, "repeld_cache_lookup_seconds_bucket", le="0.001") == 0
    assert _value(text, "repeld_cache_lookup_seconds_bucket", le="0.0025") == 3
    assert _value(text, "repeld_cache_lookup_seconds_sum") == pytest.approx(0.006)


def test_snapshots_survive_json_and_add_up() -> None:
    one, two = Metrics(), Metrics()
    one.observe(events.hangup(CONN, HangUp(2.0, reset=False)))
    two.observe(events.hangup(CONN, HangUp(2.0, reset=False)))
    two.observe(events.hangup(CONN, HangUp(9.0, reset=True)))
    snaps = [
        json.loads(json.dumps(one.snapshot(gauges={"held": 2}, totals={"backend_errors": 1}))),
        json.loads(
            json.dumps(two.snapshot(gauges={"held": 3}, labelled={"refusals": {"max-held": 4}}))
        ),
    ]
    text = render(merge(snaps))
    assert _value(text, "repeld_hangups_total", how="close") == 2
    assert _value(text, "repeld_hangups_total", how="reset") == 1
    assert _value(text, "repeld_hangup_seconds_bucket", le="2.0") == 2
    assert _value(text, "repeld_hangup_seconds_count") == 3
    assert _value(text, "repeld_held") == 5
    assert _value(text, "repeld_backend_errors_total") == 1
    assert _value(text, "repeld_refusals_total", limit="max-held") == 4


def test_a_malformed_worker_snapshot_is_skipped_not_trusted() -> None:
    good = Metrics().snapshot(gauges={"relays": 1})
    bad = {
        "labelled": {"hangups": "x"},
        "totals": {"cache_errors": "many"},
        "histograms": {"hangup": [1]},
    }
    text = render(merge([good, bad, "nonsense"]))  # type: ignore[list-item]
    assert _value(text, "repeld_relays") == 1
    assert _value(text, "repeld_cache_errors_total") == 0
    assert _value(text, "repeld_hangup_seconds_count") == 0


def test_every_family_is_exposed_with_its_documented_name() -> None:
    full = Metrics().snapshot(gauges={f.key: 0 for f in GAUGES}, totals={f.key: 0 for f in TOTALS})
    full["labelled_gauges"] = {f.key: {"x": 1} for f in LABELLED_GAUGES}
    names = {f.name for f in text_string_to_metric_families(render(full).decode())}
    families = (*COUNTERS, *TOTALS, *GAUGES, *HISTOGRAMS, *LABELLED_GAUGES)
    expected = {f.name for f in families} | {"repeld_build_info"}
    # The process figures of Linux's /proc (getrusage and getrlimit elsewhere).
    expected |= {f"process_{key.removesuffix('_total')}" for key, *_ in PROCESS}
    assert names == expected


def _counts(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {k: v for k, v in _samples(text).items() if k[0].endswith(("_total", "_count"))}


def test_the_workers_sum_never_goes_backwards() -> None:
    # Two workers count early talkers; one dies (its successor starts from zero),
    # the other is late for a scrape (its last snapshot stands in): no count drops.
    tally, own = WorkerTally(), Metrics().snapshot()
    a, b, a2 = Metrics(), Metrics(), Metrics()
    served: list[bytes] = []

    def scrape() -> None:
        served.append(render(tally.total(own)))

    for _ in range(5):
        a.observe(events.early_talker(CONN, EarlyTalk(5, b"EHLO ", 0.2), "drop"))
        b.observe(events.early_talker(CONN, EarlyTalk(5, b"EHLO ", 0.2), "drop"))
    tally.update(1, a.snapshot(gauges={"held": 7}))
    tally.update(2, b.snapshot(gauges={"held": 2}))
    scrape()
    tally.retire(1)  # worker 1 killed
    scrape()
    assert _value(served[-1], "repeld_held") == 2  # a dead worker holds nobody
    a2.observe(events.early_talker(CONN, EarlyTalk(5, b"EHLO ", 0.2), "drop"))
    tally.update(3, json.loads(json.dumps(a2.snapshot())))  # its successor
    scrape()  # worker 2 is late: its last snapshot counts
    assert _value(served[-1], "repeld_early_talkers_total", action="drop") == 11
    assert _value(served[-1], "repeld_early_talk_seconds_count") == 11
    for before, after in itertools.pairwise(served):
        old, new = _counts(before), _counts(after)
        assert all(new.get(k, 0) >= v for k, v in old.items())


def test_process_figures_add_up_and_descriptors_are_the_fullest_process() -> None:
    one = {"process": {"cpu_seconds_total": 1.5, "resident_memory_bytes": 100.0}}
    one["process"] |= {"start_time_seconds": 50.0, "open_fds": 10, "max_fds": 1000}
    two = {"process": {"cpu_seconds_total": 2.0, "resident_memory_bytes": 50.0}}
    two["process"] |= {"start_time_seconds": 40.0, "open_fds": 90, "max_fds": 100}
    text = render(merge([one, two]))
    assert _value(text, "process_cpu_seconds_total") == 3.5
    assert _value(text, "process_resident_memory_bytes") == 150.0
    assert _value(text, "process_start_time_seconds") == 40.0
    assert _value(text, "process_open_fds") == 90 and _value(text, "process_max_fds") == 100
    tally = WorkerTally()
    tally.update(7, two)
    tally.retire(7)  # a dead worker's CPU time stays counted; its memory does not
    text = render(tally.total(one))
    assert _value(text, "process_cpu_seconds_total") == 3.5
    assert _value(text, "process_resident_memory_bytes") == 100.0


def test_histogram_bucket_bounds_are_inclusive() -> None:
    h = Histogram(GIVE_UP_BUCKETS)
    for value in (0.0, 0.1, 0.11, 60.0, 60.5):
        h.observe(value)
    assert h.counts[0] == 2 and h.counts[1] == 1
    assert h.counts[-2] == 1 and h.counts[-1] == 1


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        (b"GET", b"/metrics", 200),
        (b"HEAD", b"/metrics", 200),
        (b"GET", b"/metrics?name[]=x", 200),
        (b"POST", b"/metrics", 405),
        (b"GET", b"/", 404),
        (b"GET", b"/metrics/", 404),
        (b"DELETE", b"/other", 404),
        (b"GET", b"http://127.0.0.1:9100/metrics", 200),
        (b"HEAD", b"HTTP://repeld.example/metrics?x=1", 200),
        (b"GET", b"https://repeld.example/metrics", 200),
        (b"GET", b"http://repeld.example", 404),
        (b"GET", b"http://repeld.example/other", 404),
        (b"GET", b"http://x/metrics/../metrics", 404),
    ],
)
def test_route(method: bytes, target: bytes, status: int) -> None:
    assert route(method, target) == status
