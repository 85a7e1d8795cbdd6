"""Hungarian matching helpers: optimality against brute force, rectangular and empty costs."""

from __future__ import annotations

import itertools

import pytest
import torch

from effvision.models.losses.matching import (
    batched_hungarian_match,
    hungarian_match,
    query_index,
    target_index,
)


def test_beats_greedy_on_a_hand_case():
    # Greedy (take the global minimum 1 first) would give 1 + 9 = 10; the optimum is 2 + 3 = 5.
    cost = torch.tensor([[1.0, 2.0], [3.0, 9.0]])
    rows, cols = hungarian_match(cost)
    assert rows.tolist() == [0, 1]
    assert cols.tolist() == [1, 0]
    assert rows.dtype == cols.dtype == torch.int64


@pytest.mark.parametrize('shape', [(5, 4), (4, 5), (5, 5)])
def test_optimal_against_brute_force(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    for _ in range(5):
        cost = torch.rand(shape, generator=gen)
        rows, cols = hungarian_match(cost)
        q, n = shape
        assert len(rows) == len(cols) == min(q, n)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert rows.tolist() == sorted(rows.tolist())
        if q >= n:
            best = min(
                sum(cost[p[j], j].item() for j in range(n))
                for p in itertools.permutations(range(q), n)
            )
        else:
            best = min(
                sum(cost[i, p[i]].item() for i in range(q))
                for p in itertools.permutations(range(n), q)
            )
        assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-6)


def test_permuted_targets_are_matched_back():
    """A cost built from a permutation of the targets is solved by that permutation."""
    gen = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(8, 16, generator=gen), dim=1)
    perm = torch.randperm(6, generator=gen)
    targets = queries[perm]  # target j is query perm[j]
    rows, cols = hungarian_match(-(queries @ targets.T))
    assert {(r, c) for r, c in zip(rows.tolist(), cols.tolist())} == {
        (perm[j].item(), j) for j in range(6)
    }


def test_no_targets():
    rows, cols = hungarian_match(torch.zeros(4, 0))
    assert rows.shape == cols.shape == (0,)
    assert rows.dtype == torch.int64


def test_float16_cost_and_device():
    rows, cols = hungarian_match(torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float16))
    assert rows.tolist() == [0, 1] and cols.tolist() == [0, 1]
    assert rows.device == torch.device('cpu')


def test_batched_and_flat_indices():
    costs = [
        torch.tensor([[0.0, 5.0], [5.0, 0.0], [9.0, 9.0]]),
        torch.zeros(3, 0),
        torch.tensor([[9.0], [9.0], [0.0]]),
    ]
    indices = batched_hungarian_match(costs)
    assert [r.tolist() for r, _ in indices] == [[0, 1], [], [2]]
    batch, query = query_index(indices)
    assert batch.tolist() == [0, 0, 2] and query.tolist() == [0, 1, 2]
    batch, target = target_index(indices)
    assert batch.tolist() == [0, 0, 2] and target.tolist() == [0, 1, 0]


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_non_finite_cost_is_a_clear_error(bad):
    cost = torch.zeros(3, 2)
    cost[1, 1] = bad
    with pytest.raises(ValueError, match='NaN or inf'):
        hungarian_match(cost)


def test_wrong_rank():
    with pytest.raises(ValueError, match='queries, targets'):
        hungarian_match(torch.zeros(2, 3, 4))
