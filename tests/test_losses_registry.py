"""Loss objects: the registry and its errors, each loss against a hand computation, and every training
mode's loss, parts and gradients equal to the numbers the earlier if-chain code gave on fixed inputs."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from trine.training.losses import (
    LOSSES,
    M3KD,
    InfoNCE,
    KLDistill,
    Loss,
    Objective,
    PointwiseBCE,
    ScoreBatch,
    SelfDistill,
    build_loss,
    objective,
    register,
)
from trine.training.model import EmbedderTrainingModel
from trine.training.reranker import RerankerTrainingModel

SCORES = [[2.0, 0.5, -1.0, 0.0, 1.5, -0.3], [0.3, 1.0, 0.2, -0.5, 0.9, 0.1]]
TARGETS = [0, 3]  # query 0's group is columns 0-2, query 1's columns 3-5
TEACHER = [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]
GROUP = 3


def batch(**kwargs) -> ScoreBatch:
    fields = {"scores": torch.tensor(SCORES), "targets": torch.tensor(TARGETS), "group_size": GROUP}
    return ScoreBatch(**{**fields, **kwargs})


def log_softmax(row: list[float]) -> list[float]:
    lse = math.log(sum(math.exp(x) for x in row))
    return [x - lse for x in row]


def test_registry_names_and_errors():
    assert {"infonce", "group_ce", "kl_div", "m3_kd_loss", "bce", "self_distill", "bm25_distill"} <= set(LOSSES)
    assert isinstance(build_loss("group_ce"), InfoNCE) and build_loss("group_ce").name == "infonce"
    assert isinstance(build_loss("kl_div"), KLDistill) and isinstance(build_loss("m3_kd_loss"), M3KD)
    assert isinstance(build_loss("bce"), PointwiseBCE) and isinstance(build_loss("self_distill"), SelfDistill)
    with pytest.raises(ValueError,
                       match="unknown loss 'mse'; known losses: bce, bm25_distill, group_ce, infonce, kl_div"):
        build_loss("mse")
    with pytest.raises(ValueError, match="loss 'kl_div' has no option.s. temperature; its options: none"):
        build_loss("kl_div", temperature=0.1)
    with pytest.raises(ValueError, match="already registered"):
        register("bce")(PointwiseBCE)
    with pytest.raises(ValueError, match="kd_loss_type must be one of"):
        objective("infonce", "mse")
    with pytest.raises(ValueError, match="m3_kd_loss replaces infonce"):
        objective("bce", "m3_kd_loss")
    with pytest.raises(ValueError, match="distinct"):
        Objective([InfoNCE(), InfoNCE()])
    with pytest.raises(ValueError, match="m3_kd_loss replaces"):
        RerankerTrainingModel(nn.Linear(1, 1), reranker_loss="bce", kd_loss_type="m3_kd_loss")
    with pytest.raises(ValueError, match="kd_loss_type"):
        RerankerTrainingModel(nn.Linear(1, 1), kd_loss_type="mse")


def test_a_registered_loss_with_options_composes():
    @dataclass(frozen=True)
    class Margin(Loss):
        part: ClassVar[str] = "margin"
        needs: ClassVar[frozenset[str]] = frozenset({"scores", "targets"})
        margin: float = 1.0

        def __call__(self, b: ScoreBatch) -> torch.Tensor:
            pos = b.scores.gather(1, b.targets[:, None])
            return (self.margin - pos + b.scores).clamp(min=0).mean()

    register("test_margin")(Margin)
    try:
        with pytest.raises(ValueError, match="its options: margin"):
            build_loss("test_margin", margn=2)
        loss, parts = Objective([build_loss("test_margin", margin=0.5), build_loss("infonce")])(batch())
        want = sum(max(0.0, 0.5 - row[t] + x) for row, t in zip(SCORES, TARGETS) for x in row) / 12
        assert parts["margin"].item() == pytest.approx(want, rel=1e-6)
        assert loss.item() == pytest.approx(want + parts["ce"].item(), rel=1e-6)
    finally:
        del LOSSES["test_margin"]


def test_infonce_and_group_ce_by_hand():
    want = -sum(log_softmax(row)[t] for row, t in zip(SCORES, TARGETS)) / 2
    assert InfoNCE()(batch()).item() == pytest.approx(want, rel=1e-6)
    # A reranker's group: the positive first, the matrix is the group.
    rows = [r[:GROUP] for r in SCORES]
    got = build_loss("group_ce")(batch(scores=torch.tensor(rows), targets=torch.zeros(2, dtype=torch.long)))
    assert got.item() == pytest.approx(-sum(log_softmax(r)[0] for r in rows) / 2, rel=1e-6)


def test_kl_distill_by_hand():
    want = 0.0
    for row, t, teacher in zip(SCORES, TARGETS, TEACHER):
        student = log_softmax(row[t : t + GROUP])
        want -= sum(p * s for p, s in zip(teacher, student)) / 2
    assert KLDistill()(batch(teacher=torch.tensor(TEACHER))).item() == pytest.approx(want, rel=1e-6)


def test_m3_kd_by_hand():
    want = 0.0
    for g in range(GROUP):
        for row, t, teacher in zip(SCORES, TARGETS, TEACHER):
            kept = [x for c, x in enumerate(row) if not t <= c < t + g]  # earlier group columns masked out
            lse = math.log(sum(math.exp(x) for x in kept))
            want += teacher[g] * (lse - row[t + g]) / 2
    assert M3KD()(batch(teacher=torch.tensor(TEACHER))).item() == pytest.approx(want, rel=1e-6)


def test_pointwise_bce_by_hand():
    def nll(x: float, y: float) -> float:
        p = 1 / (1 + math.exp(-x))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    want = sum(nll(x, float(c == t)) for row, t in zip(SCORES, TARGETS) for c, x in enumerate(row)) / 12
    assert PointwiseBCE()(batch()).item() == pytest.approx(want, rel=1e-6)


def test_self_distill_by_hand_and_no_gradient_to_the_ensemble():
    ensemble = [[x * 0.5 + c * 0.1 for c, x in enumerate(row)] for row in SCORES]
    want = 0.0
    for row, ens in zip(SCORES, ensemble):
        teacher = [math.exp(v) for v in log_softmax(ens)]
        want -= sum(p * s for p, s in zip(teacher, log_softmax(row))) / 2
    ens = torch.tensor(ensemble, requires_grad=True)
    got = SelfDistill()(batch(scores=torch.tensor(SCORES, requires_grad=True), ensemble=ens))
    assert got.item() == pytest.approx(want, rel=1e-6)
    got.backward()
    assert ens.grad is None


def test_objective_runs_the_terms_the_batch_has():
    kl, m3 = objective("infonce", "kl_div"), objective("infonce", "m3_kd_loss")
    teacher = torch.tensor(TEACHER)
    ce = InfoNCE()(batch())
    loss, parts = kl(batch())
    assert list(parts) == ["ce"] and torch.equal(loss, ce)
    loss, parts = m3(batch())
    assert list(parts) == ["ce"] and torch.equal(loss, ce)
    loss, parts = kl(batch(teacher=teacher))
    assert set(parts) == {"kd", "ce"} and torch.equal(loss, KLDistill()(batch(teacher=teacher)) + ce)
    loss, parts = m3(batch(teacher=teacher))  # m3_kd_loss replaces the cross-entropy
    assert list(parts) == ["kd"] and torch.equal(loss, M3KD()(batch(teacher=teacher)))
    with pytest.raises(ValueError, match="no loss term applies"):
        Objective([KLDistill()])(batch())


# ---- every training path equal to the earlier code --------------------------------------------------
VOCAB = 50
NQ = 4


class StubEncoder(nn.Module):
    """What EmbedderTrainingModel reads off a tri-head model when losses come from representations."""

    has_heads = True
    vocab_size = VOCAB

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(2, 2)
        self.sparse_linear = nn.Linear(2, 1)
        self.colbert_linear = nn.Linear(2, 2)


def fixed(shape: tuple[int, ...], offset: float) -> torch.Tensor:
    """Deterministic values in [-1, 1] (no random generator, so the same on every machine)."""
    return torch.sin(torch.arange(math.prod(shape), dtype=torch.float64) * 1.37 + offset).float().view(shape)


def reps(n: int, offset: float) -> dict[str, torch.Tensor]:
    length, dim = 5, 8
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[::2, -2:] = False
    out = {
        "dense_vecs": nn.functional.normalize(fixed((n, dim), offset), dim=-1),
        "token_weights": fixed((n, length), offset + 1).abs(),
        "input_ids": (torch.arange(n * length).view(n, length) * 7 + int(offset * 10)) % VOCAB,
        "colbert_vecs": nn.functional.normalize(fixed((n, length, dim), offset + 2), dim=-1) * mask[..., None],
        "colbert_mask": mask,
    }
    return {k: (v.requires_grad_(True) if v.is_floating_point() else v) for k, v in out.items()}


def fingerprint(grads: list[torch.Tensor]) -> tuple[float, float]:
    """Sum of |g| and a fixed weighting of g over the input gradients, in float64."""
    g = torch.cat([t.double().flatten() for t in grads])
    return g.abs().sum().item(), (g * (1.5 + fixed((g.numel(),), 0.7).double())).sum().item()


def embedder_cases():
    for mode, kd, teacher, in_batch, self_distill in itertools.product(
        ("dense", "sparse", "colbert", "unified"), ("kl_div", "m3_kd_loss"), (False, True), (True, False), (False, True)
    ):
        if mode == "unified" or not self_distill:
            yield mode, kd, teacher, in_batch, self_distill


def run_embedder(mode, kd, teacher, in_batch, self_distill):
    model = EmbedderTrainingModel(StubEncoder(), temperature=0.05, kd_loss_type=kd, training_mode=mode,
                                  use_self_distill=self_distill)
    q, p = reps(NQ, 0.3), reps(NQ * GROUP, 5.1)
    out = model.loss_from_reps(q, p, fixed((NQ, GROUP), 9.0) * 3 if teacher else None, in_batch)
    out["loss"].backward()
    grads = [v.grad for r in (q, p) for v in r.values() if v.is_floating_point() and v.grad is not None]
    return out, fingerprint(grads)


def reranker_cases():
    for loss, kd, teacher in itertools.product(("group_ce", "bce"), ("kl_div", "m3_kd_loss"), (False, True)):
        if loss != "bce" or kd != "m3_kd_loss":
            yield loss, kd, teacher


def run_reranker(loss, kd, teacher):
    model = RerankerTrainingModel(nn.Linear(1, 1), reranker_loss=loss, kd_loss_type=kd)
    logits = (fixed((NQ * GROUP,), 2.2) * 4).requires_grad_(True)
    out = model.loss(logits, GROUP, fixed((NQ, GROUP), 9.0) * 3 if teacher else None)
    out["loss"].backward()
    return out, fingerprint([logits.grad])


def key(*case) -> str:
    """("dense", "kl_div", True, True, False) -> "dense kl_div t1 b1 s0" (teacher, in-batch, self-distill)."""
    flags = "".join(f" {c}{int(v)}" for c, v in zip("tbs", case[2:]))
    return f"{case[0]} {case[1]}{flags}"


def check(out, fp, want):
    loss, negatives, want_fp, parts = want
    assert out["loss"].item() == pytest.approx(loss, rel=1e-6, abs=1e-6)
    assert {k: v.item() for k, v in out["parts"].items()} == pytest.approx(parts, rel=1e-6, abs=1e-6)
    assert out["negatives_per_query"] == negatives
    assert fp[0] == pytest.approx(want_fp[0], rel=1e-6)
    assert fp[1] == pytest.approx(want_fp[1], abs=1e-6 * want_fp[0])


@pytest.mark.parametrize("mode,kd,teacher,in_batch,self_distill", list(embedder_cases()))
def test_embedder_losses_equal_the_earlier_code(mode, kd, teacher, in_batch, self_distill):
    case = (mode, kd, teacher, in_batch, self_distill)
    check(*run_embedder(*case), REFERENCE[key(*case)])


@pytest.mark.parametrize("loss,kd,teacher", list(reranker_cases()))
def test_reranker_losses_equal_the_earlier_code(loss, kd, teacher):
    check(*run_reranker(loss, kd, teacher), REFERENCE[key(loss, kd, teacher)])


# Captured from the if-chain code (commit a2cfee8: losses.score_loss, EmbedderTrainingModel._loss,
# RerankerTrainingModel.loss) with run_embedder / run_reranker above, 9 significant digits:
# key -> (loss, negatives per query, gradient fingerprint, loss parts).
# The loss objects gave the same numbers bit for bit, full gradient tensors included.
REFERENCE = {
    "dense kl_div t0 b1 s0": (21.699358, 11, (162.306593, 34.7866837), {"ce": 21.699358}),
    "dense kl_div t0 b0 s0": (12.0827255, 2, (182.932789, 12.0037263), {"ce": 12.0827255}),
    "dense kl_div t1 b1 s0": (28.2510929, 11, (251.692725, 44.5498815), {"kd": 6.55173492, "ce": 21.699358}),
    "dense kl_div t1 b0 s0": (18.6344604, 2, (278.500034, 21.7669183), {"kd": 6.55173492, "ce": 12.0827255}),
    "dense m3_kd_loss t0 b1 s0": (21.699358, 11, (162.306593, 34.7866837), {"ce": 21.699358}),
    "dense m3_kd_loss t0 b0 s0": (12.0827255, 2, (182.932789, 12.0037263), {"ce": 12.0827255}),
    "dense m3_kd_loss t1 b1 s0": (16.1639633, 11, (133.67498, 32.5378458), {"kd": 16.1639633}),
    "dense m3_kd_loss t1 b0 s0": (6.34127712, 2, (95.1315781, 9.48879294), {"kd": 6.34127712}),
    "sparse kl_div t0 b1 s0": (31.7129745, 11, (98.5040716, 138.734304), {"ce": 31.7129745}),
    "sparse kl_div t0 b0 s0": (9.71070194, 2, (24.8867124, 36.1500903), {"ce": 9.71070194}),
    "sparse kl_div t1 b1 s0": (41.2200851, 11, (122.907571, 173.988687), {"kd": 9.5071106, "ce": 31.7129745}),
    "sparse kl_div t1 b0 s0": (19.2178116, 2, (49.2902125, 71.4044744), {"kd": 9.5071106, "ce": 9.71070194}),
    "sparse m3_kd_loss t0 b1 s0": (31.7129745, 11, (98.5040716, 138.734304), {"ce": 31.7129745}),
    "sparse m3_kd_loss t0 b0 s0": (9.71070194, 2, (24.8867124, 36.1500903), {"ce": 9.71070194}),
    "sparse m3_kd_loss t1 b1 s0": (31.5010052, 11, (98.0409001, 137.890734), {"kd": 31.5010052}),
    "sparse m3_kd_loss t1 b0 s0": (9.05422974, 2, (24.0681563, 34.9610667), {"kd": 9.05422974}),
    "colbert kl_div t0 b1 s0": (4.57464886, 11, (93.070189, 0.962286842), {"ce": 4.57464886}),
    "colbert kl_div t0 b0 s0": (2.44872046, 2, (89.0705918, 0.51841671), {"ce": 2.44872046}),
    "colbert kl_div t1 b1 s0": (7.33405876, 11, (158.922229, 5.07209733), {"kd": 2.75941014, "ce": 4.57464886}),
    "colbert kl_div t1 b0 s0": (5.20813084, 2, (156.499003, 4.62822293), {"kd": 2.75941014, "ce": 2.44872046}),
    "colbert m3_kd_loss t0 b1 s0": (4.57464886, 11, (93.070189, 0.962286842), {"ce": 4.57464886}),
    "colbert m3_kd_loss t0 b0 s0": (2.44872046, 2, (89.0705918, 0.51841671), {"ce": 2.44872046}),
    "colbert m3_kd_loss t1 b1 s0": (4.8464303, 11, (100.567774, 4.44629483), {"kd": 4.8464303}),
    "colbert m3_kd_loss t1 b0 s0": (2.07441783, 2, (68.648143, 2.82509945), {"kd": 2.07441783}),
    "unified kl_div t0 b1 s0": (14.8140278, 11, (141.038833, 10.0770164),
        {"dense": 21.699358, "sparse": 31.7129745, "colbert": 4.57464886, "ensemble": 29.8108044}),
    "unified kl_div t0 b1 s1": (8.40332222, 11, (70.3459404, 7.11465933),
        {"dense": 21.699358, "sparse": 31.7129745, "colbert": 4.57464886, "ensemble": 29.8108044, "self_distill_dense":
         1.17203891, "self_distill_sparse": 0.073296994, "self_distill_colbert": 4.79847956}),
    "unified kl_div t0 b0 s0": (7.2142992, 2, (143.470674, 4.34277397),
        {"dense": 12.0827255, "sparse": 9.71070194, "colbert": 2.44872046, "ensemble": 13.354681}),
    "unified kl_div t0 b0 s1": (4.28779221, 2, (71.7580578, 3.64066291),
        {"dense": 12.0827255, "sparse": 9.71070194, "colbert": 2.44872046, "ensemble": 13.354681, "self_distill_dense":
         0.179118425, "self_distill_sparse": 0.823959231, "self_distill_colbert": 3.82234001}),
    "unified kl_div t1 b1 s0": (19.3978176, 11, (209.269732, 14.7647519),
        {"dense": 28.2510929, "sparse": 41.2200851, "colbert": 7.33405876, "ensemble": 37.8841095}),
    "unified kl_div t1 b1 s1": (10.6952171, 11, (105.379283, 9.45852781),
        {"dense": 28.2510929, "sparse": 41.2200851, "colbert": 7.33405876, "ensemble": 37.8841095, "self_distill_dense":
         1.17203891, "self_distill_sparse": 0.073296994, "self_distill_colbert": 4.79847956}),
    "unified kl_div t1 b0 s0": (11.79809, 2, (212.601868, 9.0305091),
        {"dense": 18.6344604, "sparse": 19.2178116, "colbert": 5.20813084, "ensemble": 21.4279861}),
    "unified kl_div t1 b0 s1": (6.57968712, 2, (107.77747, 5.98452982),
        {"dense": 18.6344604, "sparse": 19.2178116, "colbert": 5.20813084, "ensemble": 21.4279861, "self_distill_dense":
         0.179118425, "self_distill_sparse": 0.823959231, "self_distill_colbert": 3.82234001}),
    "unified m3_kd_loss t0 b1 s0": (14.8140278, 11, (141.038833, 10.0770164),
        {"dense": 21.699358, "sparse": 31.7129745, "colbert": 4.57464886, "ensemble": 29.8108044}),
    "unified m3_kd_loss t0 b1 s1": (8.40332222, 11, (70.3459404, 7.11465933),
        {"dense": 21.699358, "sparse": 31.7129745, "colbert": 4.57464886, "ensemble": 29.8108044, "self_distill_dense":
         1.17203891, "self_distill_sparse": 0.073296994, "self_distill_colbert": 4.79847956}),
    "unified m3_kd_loss t0 b0 s0": (7.2142992, 2, (143.470674, 4.34277397),
        {"dense": 12.0827255, "sparse": 9.71070194, "colbert": 2.44872046, "ensemble": 13.354681}),
    "unified m3_kd_loss t0 b0 s1": (4.28779221, 2, (71.7580578, 3.64066291),
        {"dense": 12.0827255, "sparse": 9.71070194, "colbert": 2.44872046, "ensemble": 13.354681, "self_distill_dense":
         0.179118425, "self_distill_sparse": 0.823959231, "self_distill_colbert": 3.82234001}),
    "unified m3_kd_loss t1 b1 s0": (12.1674519, 11, (121.793899, 10.3581589),
        {"dense": 16.1639633, "sparse": 31.5010052, "colbert": 4.8464303, "ensemble": 24.5093117}),
    "unified m3_kd_loss t1 b1 s1": (7.08003378, 11, (65.7023843, 7.25523065),
        {"dense": 16.1639633, "sparse": 31.5010052, "colbert": 4.8464303, "ensemble": 24.5093117, "self_distill_dense":
         1.17203891, "self_distill_sparse": 0.073296994, "self_distill_colbert": 4.79847956}),
    "unified m3_kd_loss t1 b0 s0": (4.29283237, 2, (77.9115755, 4.05760338),
        {"dense": 6.34127712, "sparse": 9.05422974, "colbert": 2.07441783, "ensemble": 7.85021019}),
    "unified m3_kd_loss t1 b0 s1": (2.82705855, 2, (48.0250128, 3.49807613),
        {"dense": 6.34127712, "sparse": 9.05422974, "colbert": 2.07441783, "ensemble": 7.85021019, "self_distill_dense":
         0.179118425, "self_distill_sparse": 0.823959231, "self_distill_colbert": 3.82234001}),
    "group_ce kl_div t0": (2.38907242, 2, (0.998413693, -0.0760365873), {"ce": 2.38907242}),
    "group_ce kl_div t1": (2.81538463, 2, (1.11738456, -0.0148104282), {"kd": 0.426312268, "ce": 2.38907242}),
    "group_ce m3_kd_loss t0": (2.38907242, 2, (0.998413693, -0.0760365873), {"ce": 2.38907242}),
    "group_ce m3_kd_loss t1": (0.272636741, 2, (0.13040392, 0.0657072988), {"kd": 0.272636741}),
    "bce kl_div t0": (1.0597949, 2, (0.397567539, 0.248233262), {"bce": 1.0597949}),
    "bce kl_div t1": (1.48610711, 2, (0.499562167, 0.309459412), {"bce": 1.0597949, "kd": 0.426312268}),
}
