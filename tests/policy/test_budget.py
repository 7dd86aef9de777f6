"""Paper and block budgets (policy/budget.py, docs/method.md §4)."""

import pytest

from refreekv_vllm.policy.budget import (
    block_budget,
    freeable_block_range,
    layer_block_budget,
    layer_paper_budget,
    paper_budget,
)


@pytest.mark.parametrize(
    ("cut", "m", "bs", "expected"),
    [
        (4, 4, 16, range(1, 1)),  # nothing pruned
        (31, 4, 16, range(1, 1)),  # gap [4, 31) holds no whole block
        (32, 4, 16, range(1, 2)),  # [16, 32) is inside the gap
        (100, 4, 16, range(1, 6)),
        (100, 0, 16, range(0, 6)),
        (100, 16, 16, range(1, 6)),
        (100, 17, 16, range(2, 6)),
        (8, 4, 1, range(4, 8)),  # token-granular blocks reproduce the exact gap
    ],
)
def test_freeable_block_range(cut, m, bs, expected):
    assert freeable_block_range(cut, m, bs) == expected


def test_freeable_blocks_lie_inside_the_gap():
    for bs in (1, 7, 16, 32):
        for m in (0, 4, 20):
            for cut in range(m, 200):
                for i in freeable_block_range(cut, m, bs):
                    assert m <= i * bs and (i + 1) * bs <= cut


def test_layer_budgets():
    # docs/method.md §3: s = 8, n = 12 -> 8 / 12.
    assert layer_paper_budget(8, 12) == pytest.approx(8 / 12)
    assert layer_paper_budget(4, 12) == 1.0
    assert layer_paper_budget(4, 5) == 1.0  # n <= m + 1
    assert layer_block_budget(8, 12, 4, 16) == 1.0  # no whole block in the gap
    assert layer_block_budget(40, 100, 4, 16) == pytest.approx((100 - 16) / 100)
    assert layer_block_budget(40, 100, 4, 1) == pytest.approx(layer_paper_budget(40, 100))
    with pytest.raises(ValueError, match="outside"):
        layer_paper_budget(3, 100)
    with pytest.raises(ValueError, match="outside"):
        layer_block_budget(100, 100, 4, 16)


def test_block_budget_is_at_least_the_paper_budget():
    for n in (6, 50, 333):
        for cut in range(4, n):
            for bs in (1, 16, 32):
                assert layer_block_budget(cut, n, 4, bs) >= layer_paper_budget(cut, n) - 1e-12


def test_sample_budgets_count_frozen_layers_at_one():
    cuts = [4, 4, 50, 90]  # frozen layers' cuts are ignored
    n = 100
    assert paper_budget(cuts, n) == pytest.approx((1 + 1 + 0.54 + 0.14) / 4)
    assert paper_budget([99, 99, 50, 90], n) == paper_budget(cuts, n)
    assert block_budget(cuts, n, 16) == pytest.approx((1 + 1 + 0.68 + 0.36) / 4)
    assert paper_budget(cuts, n, frozen_layers=()) == pytest.approx((1 + 1 + 0.54 + 0.14) / 4)
    with pytest.raises(ValueError, match="at least one layer"):
        paper_budget([], n)


def test_one_block_budget_for_cuts_and_for_released_blocks():
    from refreekv_vllm.policy.budget import freeable_block_range, resident_budget

    n, bs = 1000, 32
    cuts = [4, 4, 300, 999, 37]
    freed = [len(freeable_block_range(c, 4, bs)) for c in cuts]
    assert freed == [0, 0, 8, 30, 0]
    assert block_budget(cuts, n, bs, frozen_layers=()) == pytest.approx(
        resident_budget(n, freed, bs))
    # Tokens resident over prompt tokens (not blocks over prompt blocks): 1000 - 8 x 32 of 1000.
    assert resident_budget(n, [8], bs) == pytest.approx(0.744)
