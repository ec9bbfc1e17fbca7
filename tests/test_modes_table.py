"""The one table of which outputs a score mode needs (``trine.modes``), checked against the rule the mode
names spell (FlagEmbedding's compute_score keys) and against its users."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trine.modes import FUSED_MODES, HYBRID_KEYS, MODE_NEEDS, mode_outputs, needed_outputs


def test_a_pair_scored_in_a_mode_needs_exactly_the_outputs_the_mode_names():
    """FlagEmbedding's compute_score keys name the outputs they sum ("colbert+sparse+dense")."""
    for mode in HYBRID_KEYS:
        assert set(mode_outputs(mode, "full")) == set(mode.split("+"))
    assert mode_outputs("colbert") == ("dense", "colbert")  # re-ranks the dense top-k
    assert mode_outputs("rrf") == ("dense", "sparse", "colbert")
    assert mode_outputs("bm25") == () and mode_outputs("dense+bm25") == ("dense",)
    for mode, parts in FUSED_MODES.items():
        assert set(MODE_NEEDS[mode]) == set(parts) - {"bm25"}
    assert needed_outputs(["sparse"], dims=[64]) == {"dense", "sparse"}
    assert needed_outputs(["colbert"], colbert_search="full") == {"colbert"}
    with pytest.raises(ValueError, match="unknown score mode 'hybrid'"):
        mode_outputs("hybrid")
    with pytest.raises(ValueError, match="colbert_search must be 'rerank' or 'full'"):
        mode_outputs("colbert", "approximate")


def test_every_user_reads_the_one_table():
    from trine.curation.teacher import EmbedderScorer
    from trine.evaluation import runner
    from trine.modeling import fusion

    assert runner.needed_outputs is needed_outputs and fusion.FUSED_MODES is FUSED_MODES

    class ThreeOutputs:
        outputs = ("dense", "sparse", "colbert")

    assert EmbedderScorer(ThreeOutputs(), "colbert").outputs == ("colbert",)
    assert set(EmbedderScorer(ThreeOutputs(), "colbert+sparse+dense").outputs) == {"dense", "sparse", "colbert"}


def test_the_table_imports_without_torch():
    code = "import sys, trine.modes; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)
