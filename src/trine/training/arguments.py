"""Fine-tuning arguments, with FlagEmbedding's names where FlagEmbedding has the argument."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import TrainingArguments

from trine.data.text import check_template
from trine.modeling.pooling import check_pooling_method
from trine.modeling.trihead import HEAD_INITS
from trine.training.losses import KD_LOSS_TYPES
from trine.training.model import TRAINING_MODES, check_bm25_distill, check_matryoshka

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class HubArguments:
    """Where a Hub id ``model_name_or_path`` comes from (FlagEmbedding's ``cache_dir`` and ``token``, and the
    revision). :meth:`resolve_model_reference` fetches it into the Hugging Face cache when a run starts (not
    when the arguments are parsed: parsing reads no model), so every later reader of ``model_name_or_path``
    (the family, the output checks, LoRA's base) sees a local folder; ``model_reference`` keeps what the user
    named (the model card's base model)."""

    cache_dir: str | None = field(default=None, metadata={"help": "Hugging Face cache folder for a Hub id model "
                                                                  "(default: HF_HUB_CACHE, else HF_HOME/hub)"})
    revision: str | None = field(default=None, metadata={"help": "branch, tag or commit of a Hub id model "
                                                                 "(also model_name_or_path org/name@revision)"})
    token: str | None = field(default=None, metadata={"help": "Hugging Face token for a private or gated Hub id "
                                                              "(default: HF_TOKEN, else the saved login)"})

    def resolve_model_reference(self) -> None:
        """``model_name_or_path`` as its local folder (once: a second call leaves it)."""
        from trine.modeling.loading import resolve_model

        if getattr(self, "model_reference", None) is not None:
            return
        self.model_reference = self.model_name_or_path
        self.model_name_or_path = resolve_model(self.model_name_or_path, revision=self.revision,
                                                cache_dir=self.cache_dir, token=self.token)


@dataclass(kw_only=True)
class LoraArguments(HubArguments):
    """LoRA options (FlagEmbedding's names), shared by the embedder and reranker model arguments."""

    use_lora: bool = field(default=False, metadata={"help": "train a LoRA adapter (peft) instead of the backbone; "
                                                            "checkpoints are adapter folders (trine merge-lora "
                                                            "merges)"})
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank (FlagEmbedding's default)"})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.1, metadata={"help": "dropout of the LoRA layers"})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "modules LoRA adapts (default: a decoder's q/k/v/o/gate/up/down projections "
                                        "as FlagEmbedding; peft's default for the architecture otherwise)"}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "modules trained in full and saved beside the adapter"}
    )

    def check_lora(self) -> None:
        if not self.use_lora and (self.target_modules or self.modules_to_save):
            raise ValueError("target_modules and modules_to_save configure LoRA: they need use_lora")
        if self.use_lora:
            from trine.modeling.lora import LoraOptions

            LoraOptions.from_arguments(self)  # checks the values


@dataclass(kw_only=True)
class FlagEmbeddingModelOptions:
    """FlagEmbedding's model options that trine takes with FlagEmbedding's meaning though it needs no new
    mechanism for them, shared by the embedder and reranker model arguments (``cache_dir`` and ``token`` are
    :class:`HubArguments`')."""

    use_flash_attn: bool = field(
        default=False, metadata={"help": "FlagEmbedding's: attn_implementation flash_attention_2"}
    )

    def resolve_flash_attn(self) -> None:
        """``use_flash_attn`` is ``attn_implementation: flash_attention_2`` (FlagEmbedding's switch for it)."""
        if not self.use_flash_attn:
            return
        if self.attn_implementation not in (None, "flash_attention_2"):
            raise ValueError(f"use_flash_attn contradicts attn_implementation {self.attn_implementation!r}; give one")
        self.attn_implementation = "flash_attention_2"


#: FlagEmbedding's training options both training commands refuse, and why (``trine.config`` reports them by name)
_REFUSED_COMMON = {
    "config_name": "trine reads the model config from model_name_or_path (put the config.json in that folder)",
    "tokenizer_name": "trine reads the tokenizer from model_name_or_path (save the tokenizer in that folder)",
    "use_fast_tokenizer": "trine loads the folder's tokenizer as transformers does by default (the fast one)",
    "cache_path": "trine reads the JSONL training files itself: there is no datasets cache to place",
    "from_peft": "trine does not start from a separate PEFT adapter: pass the adapter folder trine saved as "
                 "model_name_or_path, or merge it into a folder first (`trine merge-lora`)",
    "raw_peft": "trine does not start from a separate PEFT adapter: pass the adapter folder trine saved as "
                "model_name_or_path, or merge it into a folder first (`trine merge-lora`)",
    "save_merged_lora_model": "trine saves the LoRA adapter folder; merge it after training with `trine merge-lora`",
}
#: ... those only ``trine finetune`` refuses
EMBEDDER_REFUSED_OPTIONS = {
    **_REFUSED_COMMON,
    "use_slow_tokenizer": _REFUSED_COMMON["use_fast_tokenizer"],
    "peft_model_path": _REFUSED_COMMON["from_peft"],
    "only_merge_lora_model": "merge a LoRA adapter folder with `trine merge-lora`",
    "fix_position_embedding": "trine has no option to freeze the position embeddings",
    "additional_special_tokens": "add the tokens to the model folder's tokenizer (and resize its embeddings) before "
                                 "training",
}
#: ... those only ``trine finetune-reranker`` refuses
RERANKER_REFUSED_OPTIONS = {
    **_REFUSED_COMMON,
    "max_len": "trine cuts a pair to query_max_len + passage_max_len tokens (FlagReranker's inference rule): set "
               "passage_max_len to max_len - query_max_len",
    "model_type": "pick the reranker with --model_family (cross-encoder, llm-reranker, llm-reranker-layerwise)",
    "sub_batch_size": "the reranker trainer has no sub-batches (gradient caching is trine finetune's "
                      "gradcache_chunk_size)",
}


@dataclass
class ModelArguments(LoraArguments, FlagEmbeddingModelOptions):
    model_name_or_path: str = field(metadata={"help": "model folder (a backbone, or a tri-head BGE-M3 folder), or a "
                                                                    "Hugging Face Hub id (org/name[@revision])"})
    sentence_pooling_method: str | None = field(
        default=None, metadata={"help": "cls, mean or last_token (default: the folder's sentence-transformers config, "
                                        "else cls)"}
    )
    normalize_embeddings: bool = field(default=True, metadata={"help": "L2-normalise dense vectors"})
    init_missing_heads: str | None = field(
        default=None, metadata={"help": "start lexical/ColBERT heads for a folder without them: random, neutral, "
                                        "or bm25 (the lexical head fitted to BM25 term weights on the training "
                                        "passages, ColBERT as neutral)"}
    )
    colbert_dim: int = field(default=-1, metadata={"help": "ColBERT dimension (-1: hidden size)"})
    model_family: str = field(default="trihead", metadata={"help": "a registered embedder model family "
                                                                   "(trine.modeling.families)"})
    trust_remote_code: bool = field(default=False)
    attn_implementation: str | None = field(
        default=None, metadata={"help": "transformers attention implementation: sdpa, eager, ... "
                                        "(default: the transformers default)"}
    )
    REFUSED_OPTIONS: ClassVar[dict[str, str]] = EMBEDDER_REFUSED_OPTIONS

    def __post_init__(self) -> None:
        self.check_lora()
        self.resolve_flash_attn()
        if self.sentence_pooling_method is not None:
            check_pooling_method(self.sentence_pooling_method)
        if self.init_missing_heads is not None and self.init_missing_heads not in HEAD_INITS:
            raise ValueError(f"init_missing_heads must be one of {', '.join(HEAD_INITS)}, "
                             f"got {self.init_missing_heads!r}")


@dataclass
class TrainDataArguments:
    """What embedder and reranker training data share."""

    train_data: list[str] = field(metadata={"help": "JSONL files and/or folders of them"})
    train_group_size: int = field(default=8, metadata={"help": "1 positive + (G-1) negatives per query"})
    query_max_len: int = field(default=32)
    passage_max_len: int = field(default=128)
    pad_to_multiple_of: int | None = field(default=None)
    knowledge_distillation: bool = field(default=False, metadata={"help": "use pos_scores/neg_scores as teacher"})
    same_dataset_within_batch: bool = field(
        default=False, metadata={"help": "each global batch from one file; every rank on the same file at a step"}
    )
    group_by_length: bool = field(
        default=False, metadata={"help": "sort records of similar length into the same batch (less padding)"}
    )
    fill_missing_negatives: str = field(
        default="error", metadata={"help": "too few negatives: error, or random (fill from other records)"}
    )
    file_options: dict[str, dict[str, Any]] | str | None = field(
        default=None,
        metadata={"help": 'JSON {"path": {"batch_size": N, "in_batch_negatives": false}} (a mapping in a config)'},
    )
    max_example_num_per_dataset: int | None = field(
        default=None, metadata={"help": "keep at most this many records of each file (a seeded sample; "
                                        "FlagEmbedding's option; default: all)"}
    )
    shuffle_ratio: float = field(
        default=0.0, metadata={"help": "augmentation: with this probability a positive longer than 100 characters "
                                       "is cut in three chunks, shuffled and joined with spaces (FlagEmbedding's)"}
    )
    small_threshold: int = field(
        default=0, metadata={"help": "same_dataset_within_batch: the files of a train_data folder with fewer "
                                     "records are merged into one dataset (a file named on its own with fewer is "
                                     "left out, as in FlagEmbedding)"}
    )
    drop_threshold: int = field(
        default=0, metadata={"help": "same_dataset_within_batch: a merge of small files (small_threshold) with "
                                     "fewer records is left out"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.train_data, str):
            self.train_data = [self.train_data]
        if self.fill_missing_negatives not in ("error", "random"):
            raise ValueError(f"fill_missing_negatives must be error or random, got {self.fill_missing_negatives!r}")
        if self.max_example_num_per_dataset is not None and self.max_example_num_per_dataset < 1:
            raise ValueError(f"max_example_num_per_dataset must be >= 1, got {self.max_example_num_per_dataset}")
        if not 0.0 <= self.shuffle_ratio <= 1.0:
            raise ValueError(f"shuffle_ratio must be between 0 and 1, got {self.shuffle_ratio}")
        if self.small_threshold < 0 or self.drop_threshold < 0:
            raise ValueError("small_threshold and drop_threshold must be >= 0")
        if (self.small_threshold or self.drop_threshold) and not self.same_dataset_within_batch:
            raise ValueError("small_threshold and drop_threshold merge small files into one dataset for "
                             "same_dataset_within_batch; set it (FlagEmbedding ignores them without it)")
        for name in ("query_instruction_format", "passage_instruction_format"):
            template = getattr(self, name, None)  # the embedder's and the reranker's data arguments have both
            if template is not None:
                check_template(template.replace("\\n", "\n"), name)

    def parsed_file_options(self) -> dict[str, dict[str, Any]]:
        if self.file_options is None:
            return {}
        if isinstance(self.file_options, dict):
            return self.file_options
        try:
            value = json.loads(self.file_options)
        except json.JSONDecodeError as err:
            raise ValueError(f"file_options: not valid JSON: {err}") from err
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise ValueError("file_options: must map file paths to option mappings")
        return value


@dataclass
class DataArguments(TrainDataArguments):
    query_instruction_for_retrieval: str | None = field(default=None)
    query_instruction_format: str | None = field(
        default=None, metadata={"help": "how the instruction and the query join (default: the model family's: "
                                        "'<instruct>{}\\n<query>{}' for decoder models, '{}{}' otherwise)"}
    )
    passage_instruction_for_retrieval: str | None = field(default=None)
    passage_instruction_format: str = field(default="{}{}")
    retrieval_use_examples: bool = field(
        default=False, metadata={"help": "decoder models (FlagEmbedding's ICL training): each query gets 0-5 "
                                         "in-context examples, (query, positive) pairs of other queries of its batch"}
    )
    example_query_max_len: int = field(default=64, metadata={"help": "ICL: tokens kept of an example's query"})
    example_passage_max_len: int = field(default=96, metadata={"help": "ICL: tokens kept of an example's passage"})
    icl_suffix_str: str = field(
        default="\n<response>", metadata={"help": "ICL: what ends each query and joins an example's query and "
                                                  "passage (FlagICLModel's suffix)"}
    )
    eval_data: str | None = field(
        default=None, metadata={"help": "held-out retrieval set (BEIR or FlagEmbedding custom layout) for eval"}
    )
    eval_split: str = field(default="test")


@dataclass
class SafeTrainingArguments(TrainingArguments):
    """What every trine trainer adds to Hugging Face's arguments: the output-folder policy, and transformers 4's
    ``warmup_ratio`` (FlagEmbedding's scripts pass it; transformers 5 folded it into ``warmup_steps``)."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "replace an output_dir an earlier trine run wrote (never a folder trine did "
                                         "not write); without it an existing, non-empty output_dir is an error "
                                         "unless resuming"}
    )
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "transformers 4's (and FlagEmbedding's): warm up over this fraction of the "
                                        "training steps, 0 <= ratio < 1 (transformers 5's warmup_steps given a "
                                        "fraction)"}
    )

    def __post_init__(self) -> None:
        if self.warmup_ratio is not None:
            if not 0.0 <= self.warmup_ratio < 1.0:
                raise ValueError(f"warmup_ratio must be at least 0 and below 1, got {self.warmup_ratio}")
            if self.warmup_steps:
                raise ValueError(f"warmup_ratio {self.warmup_ratio} contradicts warmup_steps {self.warmup_steps}; "
                                 "give one")
            self.warmup_steps = float(self.warmup_ratio)  # transformers 5 reads a fraction below 1 as a ratio
        super().__post_init__()


@dataclass
class EmbedderTrainingArguments(SafeTrainingArguments):
    temperature: float = field(default=0.02)
    negatives_cross_device: bool = field(default=False, metadata={"help": "add other ranks' passages as negatives"})
    kd_loss_type: str = field(default="kl_div", metadata={"help": "kl_div or m3_kd_loss"})
    training_mode: str = field(default="dense", metadata={"help": f"one of {', '.join(TRAINING_MODES)}"})
    unified_finetuning: bool = field(default=False, metadata={"help": "FlagEmbedding's name for training_mode unified"})
    use_self_distill: bool = field(default=False, metadata={"help": "unified: the ensemble teaches each head"})
    self_distill_start_step: int = field(default=-1, metadata={"help": "self-distillation after this many steps"})
    fix_encoder: bool = field(default=False, metadata={"help": "train the heads only (backbone frozen)"})
    gradcache_chunk_size: int | None = field(
        default=None, metadata={"help": "gradient caching: encode the batch in sub-batches of this many texts"}
    )
    gradcache_max_tokens: int | None = field(
        default=None, metadata={"help": "gradient caching: sub-batches of at most this many padded tokens"}
    )
    sub_batch_size: int | None = field(
        default=None, metadata={"help": "FlagEmbedding's name for gradcache_chunk_size (its chunked forward gives "
                                        "the same loss and gradients; gradient caching also keeps memory flat)"}
    )
    head_learning_rate: float | None = field(
        default=None, metadata={"help": "learning rate of the lexical and ColBERT heads (default: learning_rate); "
                                        "new heads usually want a larger one than the backbone"}
    )
    ensemble_dense_weight: float = field(default=1.0, metadata={"help": "weight of dense scores in the ensemble"})
    ensemble_sparse_weight: float = field(default=0.3, metadata={"help": "weight of lexical scores in the ensemble"})
    ensemble_colbert_weight: float = field(default=1.0, metadata={"help": "weight of ColBERT scores in the ensemble"})
    sparse_temperature: float | None = field(
        default=None, metadata={"help": "temperature of the lexical scores (default: temperature); lexical scores "
                                        "live on another scale than cosines"}
    )
    sparse_flops_weight: float = field(
        default=0.0, metadata={"help": "weight of SPLADE's FLOPS regulariser on the lexical weights (sparser "
                                        "weights; the logs report non-zero weights per text)"}
    )
    sparse_bm25_distill_weight: float = field(
        default=0.0, metadata={"help": "weight of BM25 score distillation into the lexical head (sparse and unified "
                                       "modes): KL from the softmax of BM25's scores of every (query, in-batch "
                                       "passage) pair, over the model's token ids with document frequencies of the "
                                       "training passages, to the lexical scores; 0: off"}
    )
    sparse_bm25_distill_temperature: float | None = field(
        default=None, metadata={"help": "temperature of the BM25 teacher's scores (normalised so one shared token "
                                        "adds at most 1; default: sparse_temperature)"}
    )
    dense_loss_weight: float = field(default=1.0)
    sparse_loss_weight: float = field(default=0.1)
    colbert_loss_weight: float = field(default=1.0)
    ensemble_loss_weight: float = field(default=1.0)
    retrieval_eval_steps: int = field(
        default=0, metadata={"help": "every N steps (and before training) log nDCG@10 and MRR@10 on eval_data"}
    )
    dynamic_negatives_steps: int = field(
        default=0, metadata={"help": "every N steps re-mine each query's negatives with the model being trained "
                                     "(ANCE-style; `trine mine`'s selection rule), swapped in without a restart; "
                                     "0: off (trine.training.dynamic_negatives)"}
    )
    dynamic_negatives_epochs: int = field(
        default=0, metadata={"help": "re-mine dynamic negatives at the start of every N-th epoch (after the first); "
                                     "0: off (with dynamic_negatives_steps both apply)"}
    )
    dynamic_negatives_range: str = field(
        default="2-100", metadata={"help": "dynamic negatives: ranks to sample from, 0-based, end exclusive "
                                           "(`trine mine --range_for_sampling`)"}
    )
    dynamic_negatives_number: int = field(
        default=15, metadata={"help": "dynamic negatives per query (`trine mine --negative_number`)"}
    )
    dynamic_negatives_relative_margin: float | None = field(
        default=None, metadata={"help": "dynamic negatives: drop candidates scoring above (1 - margin) x the lowest "
                                        "positive score (`trine mine --relative_margin`)"}
    )
    dynamic_negatives_hybrid_weights: list[float] | None = field(
        default=None, metadata={"help": "dynamic negatives: rank by w_dense * dense + w_sparse * lexical (two "
                                        "numbers; a model with heads; `trine mine --hybrid_weights`)"}
    )
    dynamic_negatives_candidate_pool: str | None = field(
        default=None, metadata={"help": 'dynamic negatives: JSONL of {"text"} added to the training passages as '
                                        "the pool (`trine mine --candidate_pool`)"}
    )
    diagnostics_steps: int = field(
        default=0, metadata={"help": "every N steps (and at step 1) diagnose the batch in memory: in-batch accuracy, "
                                     "score margins, false-negative suspects, alignment/uniformity, lexical sparsity; "
                                     "a report with plots in diagnostics_dir (0: off)"}
    )
    diagnostics_dir: str | None = field(
        default=None, metadata={"help": "where the diagnostics go (default: <output_dir>/diagnostics)"}
    )
    diagnostics_collapse_cosine: float = field(
        default=0.99, metadata={"help": "warn of collapse when the mean cosine between a batch's passages reaches this"}
    )
    diagnostics_max_suspects: int = field(
        default=20, metadata={"help": "false-negative suspects (hard negatives above their positive) written per "
                                      "record"}
    )
    matryoshka_dims: list[int] | None = field(
        default=None, metadata={"help": "Matryoshka training: the dense loss becomes the weighted sum of the loss of "
                                        "the dense vectors cut to each of these leading dimensions and re-normalised, "
                                        "e.g. 384 256 128 64 (the full size counts only if listed)"}
    )
    matryoshka_weights: list[float] | None = field(
        default=None, metadata={"help": "one loss weight per matryoshka_dims entry (default: all 1; with use_mrl: "
                                        "all 1/len, FlagEmbedding's mean)"}
    )
    use_mrl: bool = field(
        default=False, metadata={"help": "FlagEmbedding's name: Matryoshka training over mrl_dims, the loss the mean "
                                         "over the dimensions as FlagEmbedding's"}
    )
    mrl_dims: list[int] | None = field(default=None, metadata={"help": "FlagEmbedding's name for matryoshka_dims "
                                                                       "(used with use_mrl)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kd_loss_type not in KD_LOSS_TYPES:
            raise ValueError(f"kd_loss_type must be one of {KD_LOSS_TYPES}, got {self.kd_loss_type!r}")
        if self.sub_batch_size is not None:
            if self.gradcache_chunk_size not in (None, self.sub_batch_size):
                raise ValueError(f"sub_batch_size {self.sub_batch_size} contradicts gradcache_chunk_size "
                                 f"{self.gradcache_chunk_size}; give one")
            self.gradcache_chunk_size = self.sub_batch_size
        for name in ("sub_batch_size", "gradcache_chunk_size", "gradcache_max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number, got {value}")
        if self.unified_finetuning:
            if self.training_mode not in ("dense", "unified"):
                raise ValueError(f"unified_finetuning contradicts training_mode {self.training_mode!r}")
            self.training_mode = "unified"
        if self.training_mode not in TRAINING_MODES:
            raise ValueError(f"training_mode must be one of {TRAINING_MODES}, got {self.training_mode!r}")
        self._resolve_matryoshka()
        self._check_dynamic_negatives()
        check_bm25_distill(self.sparse_bm25_distill_weight, self.sparse_bm25_distill_temperature, self.training_mode)

    def _check_dynamic_negatives(self) -> None:
        for name in ("dynamic_negatives_steps", "dynamic_negatives_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.dynamic_negatives_steps or self.dynamic_negatives_epochs):
            return
        from trine.curation.mining import parse_range

        try:
            parse_range(self.dynamic_negatives_range)
        except ValueError as err:
            raise ValueError(f"dynamic_negatives_range: {err}") from None
        if self.dataloader_num_workers:
            raise ValueError("dynamic negatives are swapped in the main process's dataset; "
                             f"dataloader_num_workers={self.dataloader_num_workers} would keep stale copies in the "
                             "worker processes: use 0")

    def _resolve_matryoshka(self) -> None:
        """FlagEmbedding's ``use_mrl``/``mrl_dims`` into ``matryoshka_dims``/``matryoshka_weights``
        (FlagEmbedding averages the per-dimension losses: weights 1/len unless given), then checked."""
        weights = self.matryoshka_weights
        if self.use_mrl:
            if not self.mrl_dims:
                raise ValueError("use_mrl needs mrl_dims (FlagEmbedding's Matryoshka dimensions)")
            if self.matryoshka_dims and list(self.matryoshka_dims) != list(self.mrl_dims):
                raise ValueError(f"mrl_dims {list(self.mrl_dims)} contradicts matryoshka_dims "
                                 f"{list(self.matryoshka_dims)}; give one of them")
            if not weights:
                weights = [1.0 / len(self.mrl_dims)] * len(self.mrl_dims)
            self.matryoshka_dims = list(self.mrl_dims)
        elif self.mrl_dims:
            logger.warning("mrl_dims is ignored without use_mrl (as FlagEmbedding); use matryoshka_dims or add use_mrl")
        dims, weights = check_matryoshka(self.matryoshka_dims, weights)
        self.matryoshka_dims = list(dims) or None
        self.matryoshka_weights = list(weights) or None
