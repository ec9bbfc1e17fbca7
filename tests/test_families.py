"""The model-family registry: the training commands build their models through it."""

from __future__ import annotations

import pytest
from test_finetune import common_args, write_data

from trine.errors import OptionError
from trine.modeling import families
from trine.modeling.families import FAMILIES, ModelFamily, build_model, get_family, register_family


def test_built_in_families_and_errors():
    assert {n: f.role for n, f in FAMILIES.items()}.items() >= {"trihead": "embedder", "cross-encoder": "reranker",
                                                         "retromae": "pretraining"}.items()
    with pytest.raises(OptionError, match="not a registered embedder family.*trihead"):
        get_family("cross-encoder", "embedder")
    with pytest.raises(OptionError, match="not a registered"):
        get_family("nope", "embedder")
    with pytest.raises(ValueError, match="already registered"):
        register_family(ModelFamily("trihead", "embedder", lambda m, a: None))
    with pytest.raises(ValueError, match="role"):
        register_family(ModelFamily("x", "server", lambda m, a: None))


def test_a_new_family_trains_without_editing_the_trainer(tmp_path, splade_tiny_dir, monkeypatch):
    """A family registered from outside is what `trine finetune --model_family NAME` trains."""
    from trine.training.finetune import build_trainer, parse_args

    built = []

    def frozen_heads_trihead(model_args, args):
        model = FAMILIES["trihead"].from_arguments(model_args, args)
        built.append(model)
        return model

    monkeypatch.setitem(FAMILIES, "test-family", ModelFamily("test-family", "embedder", frozen_heads_trihead))
    data = write_data(tmp_path / "train.jsonl")
    argv = common_args(splade_tiny_dir, data, tmp_path / "out", model_family="test-family", max_steps=1)
    trainer = build_trainer(*parse_args(argv))
    assert built and trainer.model.encoder is built[0]
    model_args, _, args = parse_args(common_args(splade_tiny_dir, data, tmp_path / "o2", model_family="retromae"))
    with pytest.raises(OptionError, match="not a registered embedder family"):
        build_model(model_args, args, "embedder")
    assert families.ROLES == ("embedder", "reranker", "pretraining")


def test_the_encoder_loads_through_the_family(monkeypatch, tiny_m3_dir):
    from trine import M3Embedder

    loaded = []

    def load(path, **options):
        model = FAMILIES["trihead"].load(path, **options)
        loaded.append(path)
        return model

    monkeypatch.setitem(FAMILIES, "probe", ModelFamily("probe", "embedder", lambda m, a: None, "", load))
    a = M3Embedder(tiny_m3_dir, model_family="probe", show_progress=False, devices="cpu")
    b = M3Embedder(tiny_m3_dir, show_progress=False, devices="cpu")
    assert loaded == [tiny_m3_dir]
    texts = ["chmod changes file mode bits", "malloc"]
    assert (a.encode(texts)["dense_vecs"] == b.encode(texts)["dense_vecs"]).all()
    with pytest.raises(OptionError, match="not a registered embedder family"):
        M3Embedder(tiny_m3_dir, model_family="retromae")
