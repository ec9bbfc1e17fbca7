"""MiniCPM (openbmb's decoder, the backbone of bge-reranker-v2-minicpm-layerwise) on ``transformers``' Llama modules.

``transformers`` has no MiniCPM (v1) model, and the remote code MiniCPM folders ship no longer runs on
``transformers`` 5. MiniCPM is Llama plus two scalings: the token embeddings times ``scale_emb``, and each
attention and MLP output times ``scale_depth / sqrt(num_hidden_layers)`` before its residual sum (its LM head also
divides by ``hidden_size / dim_model_base``, which the layer-wise reranker's one-output heads do not use). Importing
this module registers the ``minicpm`` model type with ``AutoConfig``/``AutoModel`` (done by ``trine.modeling``), so
``AutoModel.from_pretrained`` reads such a folder, including a layer-wise checkpoint whose ``model.*`` weights are the
decoder, without remote code; ``trine merge-lora`` merges adapters on it the same way.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, LlamaConfig, LlamaModel


@strict
class MiniCPMConfig(LlamaConfig):
    """MiniCPM's configuration: Llama's plus its scalings. FlagEmbedding's layer-wise keys (``start_layer``,
    ``head_multi``, ``head_type``) ride along as extra attributes."""

    model_type = "minicpm"
    scale_emb: int | float = 1
    dim_model_base: int | float = 1
    scale_depth: int | float = 1


class ScaleOutput:
    """A forward hook multiplying a module's output by ``factor`` (a class, not a closure: the model pickles, as the
    device pool's spawned processes need)."""

    def __init__(self, factor: float):
        self.factor = factor

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):  # attention: (output, weights)
            return (output[0] * self.factor, *output[1:])
        return output * self.factor


class MiniCPMModel(LlamaModel):
    """MiniCPM's decoder: Llama's modules and weight names; forward hooks scale the embeddings by ``scale_emb`` and
    every attention and MLP output by ``scale_depth / sqrt(num_hidden_layers)`` (hooks, not new modules, so the
    weight names and LoRA's target modules stay Llama's)."""

    config_class = MiniCPMConfig

    def __init__(self, config: MiniCPMConfig):
        super().__init__(config)
        self.embed_tokens.register_forward_hook(ScaleOutput(float(config.scale_emb)))
        residual = float(config.scale_depth) / config.num_hidden_layers ** 0.5
        for layer in self.layers:
            layer.self_attn.register_forward_hook(ScaleOutput(residual))
            layer.mlp.register_forward_hook(ScaleOutput(residual))


def register() -> None:
    try:
        AutoConfig.register(MiniCPMConfig.model_type, MiniCPMConfig)
        AutoModel.register(MiniCPMConfig, MiniCPMModel)
    except ValueError:  # registered already
        pass


register()
