import pytest

from mergeability import MergeabilityError
from mergeability.estimate import partners_for, plan_trials

POOL = [f"u{i}" for i in range(20)]


def test_partners_are_deterministic_and_exclude_target():
    a = partners_for(7, "u3", 2, POOL, 10)
    assert a == partners_for(7, "u3", 2, list(reversed(POOL)), 10)  # pool order does not matter
    assert len(set(a)) == 10 and "u3" not in a
    assert a != partners_for(7, "u3", 3, POOL, 10) and a != partners_for(8, "u3", 2, POOL, 10)


def test_plan_is_order_independent():
    full = {(t.target, t.trial): t.partners for t in plan_trials(1, POOL, POOL, 5, 4)}
    # planning a subset of targets (a resumed run, another worker) gives the same partners for each trial
    part = plan_trials(1, POOL[5:9][::-1], POOL, 5, 4)
    assert all(full[(t.target, t.trial)] == t.partners for t in part)


def test_too_many_partners():
    with pytest.raises(MergeabilityError, match="larger than the pool"):
        partners_for(0, "u0", 0, POOL, 20)
