"""The training script's arguments: three dataclasses parsed by `transformers.HfArgumentParser`, read from YAML
(`--config FILE.yaml`) with the command line overriding the file, and written back as YAML that `--config` reads.

This is the one module under `visualad_hf/` outside `commands/` that builds an argument parser: the training script
keeps the Hugging Face example scripts' conventions (`--output_dir`, `--per_device_train_batch_size`, ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser

from ..backbones import supported_model_types
from ..data.registry import DATASETS
from ..errors import VisualADError

TRAINING_ARGS_NAME = "training_args.yaml"
# The paper's names of its benchmarks, kept as a name for one release: a view of the registry's one table.
PAPER_DATASET_NAMES = {name: spec.display_name for name, spec in DATASETS.items() if spec.short_name}


class TrainingArgumentError(VisualADError, ValueError):
    """A bad training argument or config file; the message names it and says what to give instead."""


@dataclass
class ModelArguments:
    """Which model to train. Give exactly one of `backbone`, `vision_config` or `model_name_or_path`."""

    backbone: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained backbone for fresh VisualAD heads: a Hub id (openai/clip-vit-large-patch14-336, "
            "facebook/dinov2-large, facebook/dinov3-vitl16-pretrain-lvd1689m, google/siglip2-large-patch16-512, "
            "nvidia/C-RADIOv4-H) or a local folder with its config.json and weights."
        },
    )
    vision_config: str | None = field(
        default=None,
        metadata={
            "help": "A randomly initialised backbone from this config instead (JSON object; a mapping in YAML) with a "
            f"model_type of {', '.join(supported_model_types())}. For tests and the offline demo."
        },
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue from a trained VisualAD folder or Hub repo (e.g. fine-tuning)."}
    )
    feature_layers: list[int] | None = field(
        default=None, metadata={"help": "1-indexed backbone layers that produce maps (default 6 12 18 24)."}
    )
    image_size: int | None = field(default=None, metadata={"help": "Square input size (default 518)."})
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": 'Other VisualADConfig fields as a JSON object (a mapping in YAML), e.g. {"saf_type": "linear"}.'
        },
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Backbone attention kernel: sdpa (default), eager, flex_attention, ..."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Hugging Face cache for downloaded backbones."})

    def __post_init__(self):
        self.vision_config = _json_mapping(self.vision_config, "vision_config")
        self.config_overrides = _json_mapping(self.config_overrides, "config_overrides")
        sources = [name for name in ("backbone", "vision_config", "model_name_or_path") if getattr(self, name)]
        if len(sources) != 1:
            raise TrainingArgumentError(
                "Give exactly one model source: --backbone (a pretrained ViT for fresh heads), --vision_config (a "
                f"random backbone, for tests) or --model_name_or_path (a VisualAD model); got {sources or 'none'}."
            )

    def config_kwargs(self) -> dict[str, Any]:
        """`VisualADConfig` fields set by these arguments."""
        kwargs = dict(self.config_overrides or {})
        if self.feature_layers is not None:
            kwargs["feature_layers"] = list(self.feature_layers)
        if self.image_size is not None:
            kwargs["image_size"] = self.image_size
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs


@dataclass
class DataArguments:
    """Training data (the zero-shot protocol trains on the auxiliary dataset's labelled *test* split) and the target
    dataset to evaluate on. Dataset names are those of `visualad_hf.data.DATASETS` (mvtec, visa, ...)."""

    train_dataset: str | None = field(default=None, metadata={"help": "Auxiliary dataset name, e.g. visa."})
    train_data_dir: str | None = field(default=None, metadata={"help": "Its root folder."})
    train_categories: list[str] | None = field(default=None, metadata={"help": "Train on these categories only."})
    train_split: str = field(default="test", metadata={"help": "Split to train on (the protocol: test)."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Target dataset name, e.g. mvtec."})
    eval_data_dir: str | None = field(default=None, metadata={"help": "Its root folder."})
    eval_categories: list[str] | None = field(default=None, metadata={"help": "Evaluate on these categories only."})
    eval_split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    train_dataset_name: str | None = field(
        default=None, metadata={"help": "Name of the training data in the model card (default: from train_dataset)."}
    )
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Name of the target data in results and the card (default: from eval_dataset)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on a seeded random subset of this many images (quick trials)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on a seeded random subset of this many images (quick trials)."}
    )
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "Cache folder of the `datasets` tables."})

    def display_name(self, which: Literal["train", "eval"]) -> str:
        """How results and the model card name the dataset: the paper's spelling for its benchmarks."""
        explicit, name = (
            (self.train_dataset_name, self.train_dataset)
            if which == "train"
            else (self.eval_dataset_name, self.eval_dataset)
        )
        if explicit:
            return explicit
        from ..data import display_name  # the one table of display names (data/registry.py)

        return display_name(name)

    def __post_init__(self):
        if self.train_dataset is None or self.train_data_dir is None:
            raise TrainingArgumentError(
                "Give the training data: --train_dataset NAME --train_data_dir FOLDER (e.g. visa /data/visa)."
            )
        if (self.eval_dataset is None) != (self.eval_data_dir is None):
            raise TrainingArgumentError("Give both --eval_dataset and --eval_data_dir, or neither (no evaluation).")


@dataclass
class VisualADTrainingArguments:
    """The optimisation recipe and the run's bookkeeping. Names follow `transformers.TrainingArguments` where the two
    overlap; defaults are the authors' recipe (SPEC §6)."""

    output_dir: str = field(default="outputs/visualad", metadata={"help": "Checkpoints and the final model go here."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start afresh in an output_dir that holds checkpoints (they are deleted)."}
    )
    num_train_epochs: int = field(default=1, metadata={"help": "Epochs (CLIP: 1 on VisA, 2 on MVTec)."})
    max_steps: int = field(default=-1, metadata={"help": "If > 0: total optimizer steps, overriding num_train_epochs."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Images per process and step."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Images per process in evaluation."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    token_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the two tokens."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the final LayerNorm, SCA, SAF."})
    min_learning_rate: float = field(default=1e-4, metadata={"help": "eta_min of the per-epoch cosine schedule."})
    lr_scheduler_type: Literal["cosine_epoch", "constant"] = field(
        default="cosine_epoch", metadata={"help": "cosine_epoch (the recipe) or constant."}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9)
    adam_beta2: float = field(default=0.999)
    adam_epsilon: float = field(default=1e-8)
    max_token_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradient norm limit of each token, clipped separately (<= 0: no clipping)."}
    )
    seed: int = field(default=111, metadata={"help": "Seed of initialisation, data order and dropout."})
    mixed_precision: Literal["no", "bf16", "fp16"] | None = field(
        default=None,
        metadata={"help": "no (fp32, the recipe), bf16 or fp16; default: what `accelerate launch`/config says."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute backbone activations in the backward pass to save memory."}
    )
    use_cpu: bool = field(default=False, metadata={"help": "Train on CPU even if a GPU is present."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Worker processes decoding images."})
    logging_steps: int = field(default=10, metadata={"help": "Log averaged losses every N optimizer steps."})
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={"help": "Accelerate trackers (tensorboard, wandb, ...) or none."},
    )
    logging_dir: str | None = field(default=None, metadata={"help": "Tracker folder (default OUTPUT_DIR/logs)."})
    run_name: str = field(default="visualad", metadata={"help": "Tracker run name."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N optimizer steps (<= 0: never)."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest' (the newest in output_dir, if any)."}
    )
    eval_strategy: Literal["no", "end", "epoch"] = field(
        default="end", metadata={"help": "Evaluate on the target dataset: no, at the end, or after every epoch."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final folder to --hub_model_id."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository, e.g. user/visualad-clip."})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the repository as private."})
    hub_token: str | None = field(default=None, metadata={"help": "Token (default: the logged-in one)."})

    def __post_init__(self):
        if self.push_to_hub and not self.hub_model_id:
            raise TrainingArgumentError("--push_to_hub needs --hub_model_id (e.g. your-name/visualad-clip).")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise TrainingArgumentError("Give num_train_epochs >= 1 or max_steps >= 1.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise TrainingArgumentError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.logging_steps < 1:
            raise TrainingArgumentError(f"logging_steps must be >= 1, got {self.logging_steps}.")
        self.report_to = [name for name in self.report_to if name not in ("none", "")]


def _json_mapping(value: str | dict | None, name: str) -> dict | None:
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise TrainingArgumentError(f"--{name} must be a JSON object, got {value!r} ({error}).") from error
    if not isinstance(parsed, dict):
        raise TrainingArgumentError(f"--{name} must be a JSON object, got {value!r}.")
    return parsed


ARGUMENT_CLASSES = (ModelArguments, DataArguments, VisualADTrainingArguments)
Arguments = tuple[ModelArguments, DataArguments, VisualADTrainingArguments]


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="A YAML file of arguments (training/configs/*.yaml); arguments on the command line override it.",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> Arguments:
    """Parse `[--config FILE.yaml] [--name value ...]`: the YAML's keys are argument names; the command line wins."""
    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            parser.error("--config needs a YAML file")
        config_path = argv[index + 1]
        del argv[index : index + 2]
    elif argv and argv[0].endswith((".yaml", ".yml")) and not argv[0].startswith("-"):
        config_path, argv = argv[0], argv[1:]
    if config_path is not None:
        argv = config_to_argv(load_config(config_path), parser, source=config_path) + argv
    outputs = parser.parse_args_into_dataclasses(args=argv)
    return tuple(o for o in outputs if dataclasses.is_dataclass(o))  # type: ignore[return-value]


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise TrainingArgumentError(f"Cannot read the training config {path} ({error}); check the path.") from error
    except yaml.YAMLError as error:
        reason = " ".join(str(error).split())
        raise TrainingArgumentError(f"{path} is not valid YAML ({reason}); fix the file.") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainingArgumentError(
            f"{path} must be a mapping of argument names to values, got {type(data).__name__}."
        )
    return data


def config_to_argv(config: dict[str, Any], parser: HfArgumentParser, *, source: str = "config") -> list[str]:
    """The YAML mapping as command-line tokens, so that argparse converts and checks every value as it would on the
    command line (YAML reads `1e-3` as a string, for instance)."""
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(config) - known)
    if unknown:
        import difflib

        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, 1)
            hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
        raise TrainingArgumentError(
            f"{source}: unknown argument(s) {', '.join(hints)}. See `python training/train.py --help`."
        )
    argv: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        if isinstance(value, bool):
            argv += [f"--{key}", str(value).lower()]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *(str(item) for item in value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def arguments_to_dict(arguments: Arguments) -> dict[str, Any]:
    """All arguments as one flat mapping (names are unique across the three classes), without the ones that never
    belong in a saved file (the Hub token, the checkpoint being resumed)."""
    merged: dict[str, Any] = {}
    for item in arguments:
        merged.update(dataclasses.asdict(item))
    merged.pop("resume_from_checkpoint", None)
    merged.pop("hub_token", None)
    return merged


def save_arguments(arguments: Arguments, path: str | os.PathLike) -> None:
    """Write the arguments as a YAML file that `--config` reads back (final folder and every checkpoint)."""
    Path(path).write_text(yaml.safe_dump(arguments_to_dict(arguments), sort_keys=False))


def read_saved_arguments(path: str | os.PathLike) -> dict[str, Any]:
    """A `training_args.yaml` written by `save_arguments`, as a mapping (raises `OSError`/`yaml.YAMLError`)."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise yaml.YAMLError(f"{path} is not a mapping")
    return data


# The arguments that decide what a resumed run computes: a checkpoint refuses to continue under other values.
# (Bookkeeping such as output_dir, logging, saving, evaluation and the Hub may change between the two runs.)
RECIPE_ARGUMENTS = (
    "train_dataset",
    "train_split",
    "train_categories",
    "max_train_samples",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "token_learning_rate",
    "learning_rate",
    "min_learning_rate",
    "lr_scheduler_type",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_token_grad_norm",
    "seed",
    "mixed_precision",
)
