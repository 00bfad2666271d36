"""Top-k selection (issue 14): the device's selection and prefetch candidates equal a brute-force
reference for the same scores (ties, -0.0, the sink/recent rule, rows with fewer blocks than k)."""

from __future__ import annotations

import pytest
import torch

from worker.kv.topk import INF, candidates, order_key, recent_blocks, select_blocks

# ---- selection against brute force ------------------------------------------------------------------

def _scores(g, b, n, ties: bool) -> torch.Tensor:
    s = torch.randn(b, n, generator=g)
    if ties:
        s = (s * 2).round() / 2  # many equal scores, -0.0 among them
        s[s == 0] = torch.where(torch.rand(int((s == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
    return s


def _best(s: list[float], pool: list[int], forced: list[int]) -> list[int]:
    """Brute force: forced blocks first (lowest id first), then by score descending, ties to the lower id."""
    rest = sorted((j for j in pool if j not in forced and s[j] > -INF), key=lambda j: (-s[j], j))
    return sorted(forced) + rest


def test_order_key_orders_like_the_scores_with_ties_to_the_lower_block():
    s = torch.tensor([[0.0, -0.0, 1.0, -1.0, INF, -INF, 1.0, 1e-40, -1e-40, -2.0, 3.5, -INF]])
    key = order_key(s)[0].tolist()
    v = s[0].tolist()
    for i in range(len(v)):
        for j in range(len(v)):
            assert (key[i] > key[j]) == (v[i] > v[j] or (v[i] == v[j] and i < j)), (i, j)


@pytest.mark.parametrize("seed", range(24))
def test_selection_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    b, n = 4, int(torch.randint(6, 40, (), generator=g))
    k = int(torch.randint(2, min(12, n) + 1, (), generator=g))
    recent = recent_blocks(k)
    frontier = torch.randint(0, n, (b,), generator=g)
    frontier[0] = min(k - 2, n - 1)  # a row with fewer live blocks than k
    scores = _scores(g, b, n, ties=seed % 2 == 0)
    avail = None if seed % 3 == 0 else torch.rand(b, n, generator=g) < 0.7
    sel, valid = select_blocks(scores, k, frontier, avail, recent)
    for r in range(b):
        f = int(frontier[r])
        pool = [j for j in range(f + 1) if avail is None or bool(avail[r, j])]
        forced = [j for j in pool if j == 0 or j > f - recent]
        want = sorted(_best(scores[r].tolist(), pool, forced)[:k])
        assert sel[r].tolist() == want + [0] * (k - len(want))
        assert valid[r].tolist() == [True] * len(want) + [False] * (k - len(want))


@pytest.mark.parametrize("seed", range(24))
def test_prefetch_candidates_equal_brute_force(seed):
    """Offloaded blocks only (below the ring), the sink and offloaded recent blocks first, then the best
    by the better of a block's and its predecessor's score; exactly min(k, offloaded) per row (the count the host sizes the copy by), -1 after."""
    g = torch.Generator().manual_seed(100 + seed)
    b, n, ring = 4, int(torch.randint(4, 40, (), generator=g)), int(torch.randint(1, 6, (), generator=g))
    k = int(torch.randint(2, n + 4, (), generator=g))  # sometimes more than there are blocks
    recent = recent_blocks(k)
    frontier = torch.randint(0, n + 1, (b,), generator=g).clamp(max=n)  # may be one past the scored blocks
    scores = _scores(g, b, n, ties=seed % 2 == 1)
    got = candidates(scores, frontier, ring, k, recent)
    assert got.shape == (b, k) and got.dtype == torch.long
    for r in range(b):
        f = int(frontier[r])
        lo = min(max(0, f - ring + 1), n)
        pool = list(range(lo))
        row = scores[r].tolist()
        ahead = [max(row[j], row[j - 1]) if j else row[j] for j in range(n)]  # a block or the one before it
        want = _best(ahead, pool, [j for j in pool if j == 0 or j > f - recent])[:k]
        assert got[r].tolist() == want + [-1] * (k - len(want))
        assert len(want) == min(k, lo)
