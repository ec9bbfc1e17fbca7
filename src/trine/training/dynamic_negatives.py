"""Dynamic hard negatives (ANCE-style): every ``dynamic_negatives_steps`` steps (and/or at the start
of every ``dynamic_negatives_epochs``-th epoch) the model being trained re-mines each query's
negatives, and they replace the records' ``neg`` lists in place.

The selection is `trine mine`'s own (:class:`trine.curation.mining.NegativeMiner`: candidates
ranked ``dynamic_negatives_range``, never a positive, the query or a duplicate, the relative
margin filter, ``dynamic_negatives_number`` sampled, random back-fill), run with the in-training
encoder (eval mode, no gradients) through an :class:`~trine.inference.M3Embedder` with the
training's instructions and maximum lengths. The pool is fixed when the run starts: every distinct
passage of the training records (as `trine mine` without ``--candidate_pool``) followed by
``dynamic_negatives_candidate_pool``'s texts. The re-mine at step ``s`` samples with seed
``seed + s`` (record i: ``numpy.random.default_rng([seed + s, i])``, as `trine mine --seed`).

The batch plan stays valid (the records do not change, only their negatives); the next batch
already samples its group from the new lists. Negatives are swapped in the main process's
dataset, so ``dataloader_num_workers`` must be 0 (worker processes would keep stale copies).

Resume: after each re-mine the negatives (pool rows, compressed) are put in the trainer state
(``stateful_callbacks["DynamicNegatives"]``), which every checkpoint writes inside its own
``trainer_state.json``; a run resumed from ``checkpoint-k`` puts back the negatives that were in
force at step k (and checks that the pool and the records are the same).

Under DDP the pool's encoding is shared out: rank r encodes its contiguous shard of the pool
(:func:`trine.partition.contiguous_bounds`: the first ``len(pool) % world_size`` shards one text longer), the shards are
all-gathered in rank order (:func:`gather_pool_encodings`: dense vectors as tensors padded to the
longest shard, lexical weights as objects), and every rank indexes the whole gathered pool, so its
encoding takes 1/world_size of the time. Every rank then searches it with the queries (the same
work on the same vectors, so no rank waits long at the next collective) and rank 0's result is
broadcast, so that all ranks train on identical negatives even where kernels are not bitwise
reproducible across devices. The negatives equal a single process's (tested with 2 processes).
Memory: each rank holds the gathered pool's vectors once more while indexing them.

Logged at each re-mine: ``dynamic_neg_margin`` (mean positive score minus mean mined-negative
score under the current weights: it shrinks as negatives get harder), ``dynamic_neg_changed``
(records whose set of negatives changed) and ``dynamic_neg_seconds``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
import zlib
from typing import Any

import numpy as np
from transformers import TrainerCallback

from trine.data.records import Record
from trine.errors import OptionError
from trine.partition import contiguous_bounds
from trine.training.dataset import EpochPlanDataset
from trine.training.distributed import world
from trine.training.trainer import log_keeping_step_log

logger = logging.getLogger(__name__)

STATE_KEY = "DynamicNegatives"  # the trainer state's entry (not a callback class name: HF never rebuilds it)


def pool_fingerprint(pool: list[str]) -> str:
    h = hashlib.sha256()
    for text in pool:
        h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()


def encode_negatives(rows: list[list[int]]) -> str:
    """Each record's pool rows as one compact string: zlib of int32 counts then rows, base64."""
    counts = np.array([len(r) for r in rows], dtype=np.int32)
    flat = np.array([x for r in rows for x in r], dtype=np.int32)
    return base64.b64encode(zlib.compress(counts.tobytes() + flat.tobytes(), 6)).decode("ascii")


def decode_negatives(text: str, records: int) -> list[list[int]]:
    raw = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.int32)
    counts, flat = raw[:records], raw[records:]
    if len(counts) != records or int(counts.sum()) != len(flat):
        raise ValueError("dynamic negatives in the checkpoint do not fit this run's records")
    ends = np.cumsum(counts).tolist()
    return [flat[e - c : e].tolist() for c, e in zip(counts.tolist(), ends)]


def negatives_hash(pool: list[str], rows: list[list[int]]) -> str:
    """A short hash of the negatives in force (their texts), for logs and checks."""
    h = hashlib.sha256()
    for r in rows:
        h.update(b"\x00".join(pool[x].encode() for x in r) + b"\x01")
    return h.hexdigest()[:16]


def gather_pool_encodings(embedder: Any, pool: list[str], outputs: tuple[str, ...], device: Any = "cpu") -> Any:
    """The pool's passage encodings (an :class:`~trine.inference.result.EncodeResult`, pool order): each rank
    encodes its shard (:func:`trine.partition.contiguous_bounds`) and all ranks gather every shard; one
    process encodes it all.
    ``device``: where the dense vectors travel (the rank's GPU for NCCL, the CPU for gloo)."""
    import torch
    import torch.distributed as dist

    from trine.inference.result import EncodeResult

    rank, size = world()
    if size == 1:
        return embedder.encode_result(pool, outputs, kind="passage")
    bounds = contiguous_bounds(len(pool), size)
    lo, hi = bounds[rank]
    own = embedder.encode_result(pool[lo:hi], outputs, kind="passage") if hi > lo else None
    # the vector size, from any rank that has a shard (a rank may have none when the pool is tiny)
    dim = torch.tensor([own.dense_vecs.shape[1] if own is not None else 0], device=device)
    dist.all_reduce(dim, op=dist.ReduceOp.MAX)
    longest = bounds[0][1] - bounds[0][0]  # part 0 is a longest part (trine.partition)
    block = torch.zeros(longest, int(dim), dtype=torch.float32, device=device)
    if own is not None:
        block[: hi - lo] = torch.from_numpy(np.ascontiguousarray(own.dense_vecs, dtype=np.float32)).to(device)
    parts = [torch.empty_like(block) for _ in range(size)]
    dist.all_gather(parts, block)
    dense = np.concatenate([p[: e - s].cpu().numpy() for p, (s, e) in zip(parts, bounds)])
    lexical = None
    if "sparse" in outputs:
        shards: list[Any] = [None] * size
        dist.all_gather_object(shards, list(own.lexical_weights) if own is not None else [])
        lexical = [w for shard in shards for w in shard]
        if len(lexical) != len(pool):
            raise RuntimeError(f"gathered lexical weights of {len(lexical)} texts for a pool of {len(pool)}")
    return EncodeResult(dense, lexical)


class DynamicNegativesCallback(TrainerCallback):
    """Re-mines every record's negatives with the model being trained, every ``every`` steps and/or at
    the start of every ``every_epochs``-th epoch."""

    def __init__(self, encoder: Any, dataset: EpochPlanDataset, every: int, *, every_epochs: int = 0, device: Any,
                 range_for_sampling: tuple[int, int],
                 negative_number: int, relative_margin: float | None, seed: int,
                 hybrid_weights: list[float] | None = None, candidate_pool: list[str] | None = None,
                 query_max_len: int, passage_max_len: int, query_instruction: str | None,
                 query_instruction_format: str | None, passage_instruction: str | None = None,
                 passage_instruction_format: str = "{}{}", show_progress: bool = False):
        from trine.inference.embedder import M3Embedder

        if every < 0 or every_epochs < 0 or not (every or every_epochs):
            raise OptionError(f"dynamic_negatives_steps ({every}) or dynamic_negatives_epochs ({every_epochs}) must "
                              "be a positive number")
        for file in dataset.files:
            if file.kind.startswith("symmetric"):
                raise OptionError(f"dynamic_negatives_steps: {file.path}: type {file.kind!r} records' negatives are "
                                  "not retrieval negatives (labels, pairs): dynamic negatives are for 'normal' and "
                                  "'only_1neg' files")
        self.dataset, self.every, self.every_epochs, self.seed = dataset, every, every_epochs, seed
        self.trainer: Any = None  # set once the trainer exists: re-mines are logged through it
        self.records: list[Record] = [r for f in dataset.files for r in f.records]
        seen: dict[str, None] = {}
        for r in self.records:  # `trine mine`'s default pool: the records' passages, in first-seen order
            seen.update(dict.fromkeys(r.pos))
            seen.update(dict.fromkeys(r.neg))
        seen.update(dict.fromkeys(candidate_pool or ()))
        self.pool = list(seen)
        self.pool_hash = pool_fingerprint(self.pool)
        was_training = encoder.training
        self.embedder = M3Embedder(
            encoder, devices=str(device), normalize_embeddings=encoder.normalize_embeddings,
            show_progress=False, query_instruction_for_retrieval=query_instruction,
            query_instruction_format=query_instruction_format, passage_instruction_for_retrieval=passage_instruction,
            passage_instruction_format=passage_instruction_format, query_max_length=query_max_len,
            passage_max_length=passage_max_len,
        )
        encoder.train(was_training)
        self.encoder, self.device = encoder, device
        self.hybrid = hybrid_weights is not None
        self.options = dict(range_for_sampling=tuple(range_for_sampling), negative_number=negative_number,
                            relative_margin=relative_margin, hybrid_weights=hybrid_weights,
                            show_progress=show_progress)
        self.miner(0)  # every option checked now, before anything trains
        self.rows: list[list[int]] | None = None  # the negatives in force (pool rows); None: the file's own
        self.step = 0  # the step they were mined at
        self.history: list[dict[str, Any]] = []  # (step, hash, margin, changed) of every re-mine and restore

    def miner(self, step: int):  # noqa: ANN201
        from trine.curation.mining import NegativeMiner

        try:
            return NegativeMiner(self.embedder, seed=self.seed + step, **self.options)
        except ValueError as err:
            raise OptionError(f"dynamic_negatives: {err}") from err

    def mine(self, step: int) -> tuple[list[list[int]], dict[str, float]]:
        """Every record's negatives (pool rows) under the current weights, and the hardness numbers."""
        import torch

        started = time.perf_counter()
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            with torch.no_grad():
                miner = self.miner(step)
                encodings = None
                if world()[1] > 1:  # each rank encodes its shard of the pool; all of them index the whole
                    outputs = ("dense", "sparse") if self.hybrid else ("dense",)
                    encodings = [gather_pool_encodings(self.embedder, self.pool, outputs, self._collective_device())]
                summary, picks = miner.mine(self.records, self.pool, encodings=encodings)
                del encodings
                rows = list(picks)
        finally:
            self.encoder.train(was_training)
        pos = np.asarray(summary.positive_scores, dtype=np.float64)
        neg = np.asarray(summary.negative_scores, dtype=np.float64)
        margin = float(pos.mean() - neg.mean()) if pos.size and neg.size else float("nan")
        return rows, {"dynamic_neg_margin": round(margin, 6),
                      "dynamic_neg_seconds": round(time.perf_counter() - started, 3)}

    def _collective_device(self) -> Any:
        import torch
        import torch.distributed as dist

        return torch.device(self.device) if dist.get_backend() == "nccl" else torch.device("cpu")

    def swap(self, rows: list[list[int]]) -> int:
        """Put ``rows`` in as the records' negatives; returns how many records' sets changed."""
        changed = 0
        for record, picked in zip(self.records, rows):
            new = [self.pool[x] for x in picked]
            changed += set(new) != set(record.neg)
            record.neg = new
            record.neg_scores = None  # teacher scores of the old negatives no longer apply
        self.rows = rows
        return changed

    def _state(self, state) -> None:  # noqa: ANN001
        state.stateful_callbacks[STATE_KEY] = {
            "step": self.step, "seed": self.seed + self.step, "records": len(self.records), "pool": self.pool_hash,
            "hash": negatives_hash(self.pool, self.rows), "negatives": encode_negatives(self.rows),
        }

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        saved = (state.stateful_callbacks or {}).get(STATE_KEY)
        if not saved:
            return
        if saved.get("pool") != self.pool_hash or saved.get("records") != len(self.records):
            raise OptionError(f"resume: the checkpoint's dynamic negatives were mined for another pool or other "
                              f"records ({saved.get('records')} records; this run has {len(self.records)}): resume "
                              "with the same train_data and dynamic_negatives_candidate_pool")
        rows = decode_negatives(saved["negatives"], len(self.records))
        if negatives_hash(self.pool, rows) != saved.get("hash"):
            raise OptionError("resume: the checkpoint's dynamic negatives do not match their hash")
        self.step = int(saved["step"])
        self.swap(rows)
        self.history.append({"step": self.step, "hash": saved["hash"], "restored": True})
        logger.info("dynamic negatives mined at step %d restored (hash %s)", self.step, saved["hash"])

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        step = state.global_step
        if self.every and step % self.every == 0 and step < state.max_steps:  # none after the last step
            self.remine(args, state, control)

    def on_epoch_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        epoch = state.epoch or 0.0
        # only at a true epoch start: a run resumed mid-epoch also begins that epoch, at a fractional state.epoch
        start = round(epoch)
        if self.every_epochs and start > 0 and abs(epoch - start) < 1e-9 and start % self.every_epochs == 0 \
                and state.global_step != self.step:
            self.remine(args, state, control)

    def remine(self, args, state, control) -> None:  # noqa: ANN001
        step = state.global_step
        rows, logs = self.mine(step)
        if world()[1] > 1:  # every rank mined the same; rank 0's result makes them identical bit for bit
            import torch.distributed as dist

            box = [rows]
            dist.broadcast_object_list(box, src=0)
            rows = box[0]
        logs["dynamic_neg_changed"] = self.swap(rows)
        self.step = step
        self._state(state)
        digest = state.stateful_callbacks[STATE_KEY]["hash"]
        self.history.append({"step": step, "hash": digest, **logs})
        logger.info("dynamic negatives re-mined at step %d: %s (hash %s)", step, logs, digest)
        if args.process_index == 0 and self.trainer is not None:
            log_keeping_step_log(self.trainer, control, logs)
