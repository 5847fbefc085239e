"""Who skips the delay: trusted networks, IPv4-mapped addresses, nodelay listeners."""

from __future__ import annotations

import pytest

from repeld.core.addresses import normalize_address
from repeld.core.hold import PassReason
from repeld.core.policy import ANSWERS_KEPT, Policy, TrustedNetworks


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("192.0.2.7", True),
        ("192.0.2.255", True),
        ("192.0.3.1", False),
        ("::ffff:192.0.2.7", True),
        ("::FFFF:192.0.2.7", True),
        ("2001:db8::1", True),
        ("2001:db8:1::1", False),
        ("fe80::1%eth0", False),
        ("not an address", False),
    ],
)
def test_trusted_membership(address: str, expected: bool) -> None:
    trusted = TrustedNetworks(["192.0.2.0/24", "2001:db8::/48"])
    assert (address in trusted) is expected


def test_policy_order_trusted_before_nodelay() -> None:
    policy = Policy(TrustedNetworks(["127.0.0.2"]))
    assert policy.admit("127.0.0.2", nodelay=False) is PassReason.TRUSTED
    assert policy.admit("127.0.0.2", nodelay=True) is PassReason.TRUSTED
    assert policy.admit("127.0.0.1", nodelay=True) is PassReason.NODELAY
    assert policy.admit("127.0.0.1", nodelay=False) is None


def test_normalize_address() -> None:
    assert normalize_address("::ffff:10.1.2.3") == "10.1.2.3"
    assert normalize_address("fe80::1%lo") == "fe80::1"
    assert normalize_address("::1") == "::1"


@pytest.mark.parametrize(
    ("held", "from_client", "expected"),
    [
        (0, 0, None),
        (9, 2, None),
        (10, 0, "max-held"),
        (11, 0, "max-held"),
        (5, 3, "max-per-client"),
        (10, 3, "max-held"),
    ],
)
def test_limits_protect_the_pen(held: int, from_client: int, expected: str | None) -> None:
    policy = Policy(TrustedNetworks(["127.0.0.2"]), max_held=10, max_per_client=3)
    verdict = policy.admit("192.0.2.1", nodelay=False, held=held, held_from_client=from_client)
    assert verdict == expected
    # the limits guard the pen only: trusted and nodelay clients are never held
    assert policy.admit("127.0.0.2", nodelay=False, held=held, held_from_client=from_client) == (
        PassReason.TRUSTED
    )
    assert policy.admit("192.0.2.1", nodelay=True, held=held, held_from_client=from_client) == (
        PassReason.NODELAY
    )
    # admit's two questions asked apart, as the shell asks them: the same answers
    assert policy.at_once("192.0.2.1", False) is None
    assert policy.limit(held, from_client) == expected
    assert policy.at_once("127.0.0.2", False) is PassReason.TRUSTED
    assert policy.at_once("192.0.2.1", True) is PassReason.NODELAY


def test_range_edges_and_overlapping_networks() -> None:
    trusted = TrustedNetworks(["10.0.0.0/24", "10.0.0.128/25", "10.0.1.0/24", "::1", "0.0.0.0/32"])
    inside = [
        "10.0.0.0",
        "10.0.0.255",
        "10.0.1.0",
        "10.0.1.255",
        "::1",
        "0.0.0.0",
        "::ffff:10.0.1.7",
    ]
    outside = ["9.255.255.255", "10.0.2.0", "::2", "::", "0.0.0.1", "255.255.255.255", "10.0.0"]
    assert all(a in trusted for a in inside)
    assert not any(a in trusted for a in outside)
    assert "10.0.0.1" not in TrustedNetworks([])


def test_answers_are_kept_for_a_bounded_number_of_addresses() -> None:
    nets = TrustedNetworks(["10.0.0.0/16"])
    for round_ in range(2):  # the second round asks again, mostly from what is kept
        for i in range(3 * ANSWERS_KEPT):
            address = f"10.{i & 1}.{i >> 8 & 255}.{i & 255}"  # 10.0/16 for even i only
            assert (address in nets) is (i % 2 == 0), (round_, address)
            assert len(nets._answers) <= ANSWERS_KEPT
    assert "10.0.0.1" in nets and "10.1.0.1" not in nets and "::ffff:10.0.0.1" in nets
