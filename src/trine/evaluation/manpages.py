"""A BEIR-layout test set from Debian's man pages: query = NAME one-liner, document = DESCRIPTION.

Every page is a document; its one-liner is a query judged relevant (1) to that page only. Pages
are split into train and test queries (and, when asked, dev queries for tuning) by a seeded shuffle
(the corpus holds all pages).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence

from trine.datasets.manpages import ManPage, load_manpages
from trine.io import atomic_folder, check_output_path

QUERY_PREFIX = "q:"


def build_manpages_beir(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    pages: Sequence[ManPage] | None = None,
    limit: int | None = None,
    overwrite: bool = False,
    update_package_lists: bool | None = None,
    dev_fraction: float = 0.0,
) -> str:
    """Write ``corpus.jsonl``, ``queries.jsonl``, ``qrels/train.tsv`` and ``qrels/test.tsv``; return the folder.
    ``out_dir`` must be new or empty, or (``overwrite``) a folder trine wrote: :func:`trine.io.atomic_folder`.

    ``dev_fraction`` > 0: that fraction of all pages, drawn (seeded) from the non-test pages, becomes
    ``qrels/dev.tsv`` (for ``trine eval --tune-weights``) and leaves ``train.tsv``; the test pages
    are those the same ``seed`` and ``test_fraction`` give without it, so test numbers stay comparable.

    ``limit`` keeps a seeded random subset of pages (corpus and queries alike).
    ``update_package_lists``: may run ``apt-get update`` to fetch the pages (:func:`load_manpages`).
    """
    check_output_path(out_dir, overwrite=overwrite)  # before reading thousands of pages
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    if not 0 <= dev_fraction < 1 or test_fraction + dev_fraction >= 1:
        raise ValueError(f"dev_fraction must be in [0, 1) with test_fraction + dev_fraction below 1, got "
                         f"{dev_fraction} (test_fraction {test_fraction})")
    pages = list(load_manpages(update_package_lists=update_package_lists) if pages is None else pages)
    rng = random.Random(seed)
    if limit is not None:
        if limit < 2:
            raise ValueError(f"limit must be at least 2 pages, got {limit}")
        pages = rng.sample(pages, min(limit, len(pages)))
    pages.sort(key=lambda p: p.page)
    if len({p.page for p in pages}) != len(pages):
        raise ValueError("man page names must be unique")
    order = list(range(len(pages)))
    rng.shuffle(order)
    n_test = max(1, round(len(pages) * test_fraction))
    test = set(order[:n_test])
    # dev pages: the next ones of the same shuffle, so the test pages do not depend on dev_fraction
    n_dev = max(1, round(len(pages) * dev_fraction)) if dev_fraction > 0 else 0
    if n_test + n_dev > len(pages):
        raise ValueError(f"{len(pages)} pages are too few for {n_test} test and {n_dev} dev queries")
    dev = set(order[n_test : n_test + n_dev])
    split_of = {i: "test" if i in test else "dev" if i in dev else "train" for i in range(len(pages))}
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, "corpus.jsonl"), "w") as f:
            for p in pages:
                f.write(json.dumps({"_id": p.page, "title": "", "text": p.description}) + "\n")
        with open(os.path.join(tmp, "queries.jsonl"), "w") as f:
            for p in pages:
                f.write(json.dumps({"_id": QUERY_PREFIX + p.page, "text": p.name}) + "\n")
        os.makedirs(os.path.join(tmp, "qrels"))
        for split in ("train", "test", "dev") if n_dev else ("train", "test"):
            with open(os.path.join(tmp, "qrels", f"{split}.tsv"), "w") as f:
                f.write("query-id\tcorpus-id\tscore\n")
                for i, p in enumerate(pages):
                    if split_of[i] == split:
                        f.write(f"{QUERY_PREFIX}{p.page}\t{p.page}\t1\n")
    return os.path.abspath(os.fspath(out_dir))
