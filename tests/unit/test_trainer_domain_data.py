"""The federated domain data: real documentation, dealt deterministically to devices."""

from __future__ import annotations

import pytest

from coordinator.demo.domain_data import (
    Group,
    device_slices,
    domain_documents,
    general_heldout,
    general_heldout_texts,
)


@pytest.mark.parametrize("group", ["alpha", "beta"])
def test_slices_are_disjoint_cover_the_domain_and_hold_out_a_part(group: Group) -> None:
    documents = domain_documents(group)
    assert len(documents) > 500
    slices = device_slices(group, devices=3, heldout_fraction=0.2)
    assert [s.index for s in slices] == [0, 1, 2]
    names = [d.name for s in slices for d in (*s.train, *s.heldout)]
    assert sorted(names) == sorted(d.name for d in documents)
    seen = [id(d) for s in slices for d in (*s.train, *s.heldout)]
    assert len(seen) == len(set(seen))
    for piece in slices:
        share = len(piece.heldout) / (len(piece.train) + len(piece.heldout))
        assert 0.12 < share < 0.28
        assert len(piece.train) > 100


def test_dealing_is_deterministic_and_depends_on_the_device_count() -> None:
    first = device_slices("alpha", devices=3)
    again = device_slices("alpha", devices=3)
    assert first == again
    five = device_slices("alpha", devices=5)
    assert len(five) == 5
    assert {d.name for d in five[0].train} != {d.name for d in first[0].train}


def test_groups_and_general_text_do_not_overlap() -> None:
    alpha = {d.text for d in domain_documents("alpha")}
    beta = {d.text for d in domain_documents("beta")}
    general = set(general_heldout_texts())
    assert not alpha & beta
    assert not (alpha | beta) & general
    assert sum(len(t) for t in general) > 100_000
    assert all(d.name.startswith("numpy/") for d in domain_documents("alpha"))
    assert all(d.name.startswith("sqlalchemy/") for d in domain_documents("beta"))
    assert not any(">>>" in d.text for d in domain_documents("alpha"))


def test_caps_keep_small_slices_small() -> None:
    slices = device_slices("beta", devices=3, heldout_fraction=0.25, max_chars=20_000)
    for piece in slices:
        assert 10_000 < sum(map(len, piece.train_texts())) <= 15_000
        assert 2_000 < sum(map(len, piece.heldout_texts())) <= 5_000
    assert sum(map(len, general_heldout(max_chars=5000))) == 5000


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="devices must be >= 1, got 0"):
        device_slices("alpha", devices=0)
    with pytest.raises(ValueError, match=r"heldout_fraction must lie in \(0, 1\), got 1"):
        device_slices("alpha", heldout_fraction=1)
