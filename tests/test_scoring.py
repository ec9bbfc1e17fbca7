"""Scores: padded/chunked maxsim equals the per-pair definition; hybrid formulas."""

from __future__ import annotations

import numpy as np
import torch

from trine import scoring


def ragged(rng, count, dim):
    return [rng.standard_normal((int(rng.integers(1, 9)), dim)).astype(np.float32) for _ in range(count)]


def test_colbert_padded_equals_per_pair_definition():
    rng = np.random.default_rng(0)
    qs, ps = ragged(rng, 5, 6), ragged(rng, 7, 6)
    qv, qm = scoring.pad_vectors(qs)
    pv, pm = scoring.pad_vectors(ps)
    brute = np.array([[scoring.colbert_score(q, p) for p in ps] for q in qs])
    full = scoring.colbert_scores_padded(qv, qm, pv, pm).numpy()
    np.testing.assert_allclose(full, brute, atol=1e-5)
    tiny_budget = scoring.colbert_scores_padded(qv, qm, pv, pm, max_elements=10).numpy()
    np.testing.assert_allclose(tiny_budget, brute, atol=1e-5)
    pv5, pm5 = scoring.pad_vectors(ps[:5])
    pair = scoring.colbert_scores_padded(qv, qm, pv5, pm5, pairwise=True).numpy()
    np.testing.assert_allclose(pair, np.diag(brute[:, :5]), atol=1e-5)


def test_colbert_padding_never_wins():
    q = torch.tensor([[[1.0, 0.0]]])
    p = torch.tensor([[[-1.0, 0.0], [0.0, 0.0]]])  # the second position is padding
    s = scoring.colbert_scores_padded(q, torch.tensor([[True]]), p, torch.tensor([[True, False]]))
    assert float(s) == -1.0


def test_lexical_and_hybrid():
    a = {"1": 0.5, "7": 2.0}
    b = {"7": 1.5, "9": 3.0}
    assert scoring.lexical_matching_score(a, b) == 3.0
    assert scoring.lexical_scores([a, b], [b]).tolist() == [[3.0], [1.5 * 1.5 + 9.0]]
    h = scoring.hybrid_scores([1.0], [2.0], [4.0], weights=[1.0, 0.5, 2.0])
    assert h["sparse+dense"][0] == (0.5 * 2 + 1) / 1.5
    assert h["colbert+sparse+dense"][0] == (1 + 0.5 * 2 + 2 * 4) / 3.5


def test_chunked_maxsim_gradients_equal_unchunked():
    torch.manual_seed(0)
    q = torch.randn(3, 5, 4, requires_grad=True)
    p = torch.randn(7, 6, 4, requires_grad=True)
    qm = torch.rand(3, 5) > 0.3
    pm = torch.rand(7, 6) > 0.3
    qm[:, 0] = pm[:, 0] = True
    grads = []
    for budget in (1 << 26, 40):
        q.grad = p.grad = None
        scoring.colbert_scores_padded(q, qm, p, pm, max_elements=budget).pow(2).sum().backward()
        grads.append((q.grad.clone(), p.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
