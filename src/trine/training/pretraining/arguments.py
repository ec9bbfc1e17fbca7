"""The options of `trine pretrain`: model, corpus and masking, training."""

from __future__ import annotations

from dataclasses import dataclass, field

from trine.config import parse_config
from trine.training.arguments import HubArguments, SafeTrainingArguments


@dataclass
class PretrainModelArguments(HubArguments):
    model_name_or_path: str = field(metadata={"help": "masked-LM model folder (BERT or RoBERTa/XLM-R family) "
                                                                    "or Hub id (org/name[@revision])"})
    model_family: str = field(default="retromae", metadata={"help": "a registered pre-training model family "
                                                                    "(trine.modeling.families)"})
    extend_position_embeddings_to: int | None = field(
        default=None, metadata={"help": "grow the position table to this many rows before training "
                                        "(config.max_position_embeddings; BGE-M3: 8194 for 8192 tokens)"}
    )
    position_extension: str = field(default="copy", metadata={"help": "copy or interpolate (new position rows)"})
    allow_new_mlm_head: bool = field(
        default=False, metadata={"help": "start a new MLM head when the folder has none (else an error)"}
    )
    trust_remote_code: bool = field(default=False)
    attn_implementation: str | None = field(
        default=None, metadata={"help": "transformers attention implementation of the encoder: sdpa, eager, ..."}
    )

    def __post_init__(self) -> None:
        if self.position_extension not in ("copy", "interpolate"):
            raise ValueError(f"position_extension must be copy or interpolate, got {self.position_extension!r}")


@dataclass
class PretrainDataArguments:
    train_data: list[str] = field(metadata={"help": 'JSONL files of {"text": ...} and/or folders of them'})
    max_seq_length: int = field(default=512, metadata={"help": "tokens per text, special tokens included"})
    encoder_mlm_probability: float = field(default=0.3, metadata={"help": "share of tokens the encoder predicts"})
    decoder_mlm_probability: float = field(
        default=0.5, metadata={"help": "share of tokens hidden from each decoder row (besides its own position)"}
    )
    shuffle_buffer_size: int = field(
        default=10000, metadata={"help": "texts held for streaming shuffle (0: file order)"}
    )
    pad_to_multiple_of: int | None = field(default=None)

    def __post_init__(self) -> None:
        if isinstance(self.train_data, str):
            self.train_data = [self.train_data]
        for name in ("encoder_mlm_probability", "decoder_mlm_probability"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.max_seq_length < 4:
            raise ValueError(f"max_seq_length must be at least 4, got {self.max_seq_length}")
        if self.shuffle_buffer_size < 0:
            raise ValueError(f"shuffle_buffer_size must be >= 0, got {self.shuffle_buffer_size}")


@dataclass
class PretrainTrainingArguments(SafeTrainingArguments):
    encoder_output_dir: str | None = field(
        default=None, metadata={"help": "where the final encoder goes (default: <output_dir>/encoder_model)"}
    )


def parse_args(argv: list[str]) -> tuple[PretrainModelArguments, PretrainDataArguments, PretrainTrainingArguments]:
    """Command-line flags, or one YAML/JSON config file; unknown names are errors."""
    return parse_config(argv, (PretrainModelArguments, PretrainDataArguments, PretrainTrainingArguments),
                        prog="trine pretrain",
                        description="RetroMAE pre-training of an MLM encoder on JSONL {\"text\": ...} corpora, on the\n"
                                    "Hugging Face Trainer. Flags, or one YAML/JSON config file as the only argument.")
