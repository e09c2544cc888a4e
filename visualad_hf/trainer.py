"""Training VisualAD with Accelerate: the authors' recipe (SPEC §6), checkpoints that survive a kill, logging,
evaluation on the target dataset, a Hub-ready output folder.

Run it with `accelerate launch training/train.py --config training/configs/clip_visa.yaml` (one or many processes),
plain `python training/train.py ...`, or `accelerate launch -m visualad_hf.trainer ...` from an installed package.

The recipe: AdamW (betas 0.9/0.999, weight decay 0.01) on the trainable parts only (tokens at 1e-3; final LayerNorm,
SCA and SAF at 1e-4); cosine annealing stepped once per *epoch* (`T_max` = epochs, `eta_min` = 1e-4, so only the token
learning rate moves); each token's gradient norm clipped to 1.0 on its own; batch 8, seed 111, fp32. The backbone is
frozen: no gradients reach its weights, only its activations carry gradients to the tokens.

Reproducibility and resuming. The data order of epoch `e` is a function of `(seed, e)` (Accelerate's seedable
sampler) and the dropout masks of each micro-batch a function of `(seed, optimizer step, micro-batch, process)`: the
global RNG is reseeded before every micro-batch. A run resumed from `checkpoint-S` therefore sees exactly the batches
and dropout masks that the uninterrupted run saw after step S, and ends with bit-identical weights (tested).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from transformers import HfArgumentParser

from . import checkpointing
from .backbones import supported_model_types
from .configuration_visualad import VisualADConfig
from .hub import HubUploadError
from .modeling_visualad import VisualADModel

logger = logging.getLogger(__name__)

TOKEN_GROUP = "tokens"
TRAINING_ARGS_NAME = "training_args.yaml"
TRAIN_RESULTS_NAME = "train_results.json"
EVAL_RESULTS_DIR = "eval_results"  # metrics.json/.csv/.md, scores.csv, figures/
# The paper's names of its benchmarks (model cards and result tables use them).
PAPER_DATASET_NAMES = {
    "mvtec": "MVTec-AD",
    "visa": "VisA",
    "btad": "BTAD",
    "ksdd2": "KSDD2",
    "dagm": "DAGM",
    "dtd_synthetic": "DTD-Synthetic",
    "mpdd": "MPDD",
}


# ---------------------------------------------------------------------------------------------------------------------
# Arguments


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
            raise ValueError(
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
    train_dataset_options: str | None = field(
        default=None, metadata={"help": 'Loader options of the training data as JSON, e.g. \'{"normal_dir": "good"}\'.'}
    )
    # Normal-only fine-tuning (visualad_hf/data/anomaly_synthesis.py).
    synthesize_anomalies: bool = field(
        default=False,
        metadata={"help": "Paste synthetic defects (Perlin-noise textures, cut-paste) with exact masks onto normal "
                  "training images on the fly: train from good images only (e.g. the folder loader)."},
    )
    synthesis_probability: float = field(default=0.5, metadata={"help": "Share of normal images made anomalous."})
    synthesis_methods: list[str] | None = field(default=None, metadata={"help": "perlin and/or cutpaste (default both)."})
    synthesis_textures: list[str] | None = field(
        default=None, metadata={"help": "Perlin textures: images (other images) and/or procedural (default both)."}
    )

    def display_name(self, which: Literal["train", "eval"]) -> str:
        """How results and the model card name the dataset: the paper's spelling for its benchmarks."""
        explicit, name = (
            (self.train_dataset_name, self.train_dataset)
            if which == "train"
            else (self.eval_dataset_name, self.eval_dataset)
        )
        if explicit:
            return explicit
        if name in PAPER_DATASET_NAMES:
            return PAPER_DATASET_NAMES[name]
        from .data import dataset_spec

        return dataset_spec(name).title

    def __post_init__(self):
        if self.train_dataset is None or self.train_data_dir is None:
            raise ValueError(
                "Give the training data: --train_dataset NAME --train_data_dir FOLDER (e.g. visa /data/visa)."
            )
        if (self.eval_dataset is None) != (self.eval_data_dir is None):
            raise ValueError("Give both --eval_dataset and --eval_data_dir, or neither (no evaluation).")
        self.train_dataset_options = _json_mapping(self.train_dataset_options, "train_dataset_options")


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
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/visualad-clip).")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("Give num_train_epochs >= 1 or max_steps >= 1.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.logging_steps < 1:
            raise ValueError(f"logging_steps must be >= 1, got {self.logging_steps}.")
        self.report_to = [name for name in self.report_to if name not in ("none", "")]


def _json_mapping(value: str | dict | None, name: str) -> dict | None:
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"--{name} must be a JSON object, got {value!r} ({error}).") from error
    if not isinstance(parsed, dict):
        raise ValueError(f"--{name} must be a JSON object, got {value!r}.")
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
        raise FileNotFoundError(f"Cannot read the training config {path}: {error}") from error
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must be a mapping of argument names to values, got {type(data).__name__}.")
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
        raise ValueError(f"{source}: unknown argument(s) {', '.join(hints)}. See `python training/train.py --help`.")
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


def save_arguments(arguments: Arguments, path: str | os.PathLike) -> None:
    """Write the arguments as a YAML file that `--config` reads back."""
    merged: dict[str, Any] = {}
    for item in arguments:
        merged.update(dataclasses.asdict(item))
    merged.pop("resume_from_checkpoint", None)
    merged.pop("hub_token", None)
    Path(path).write_text(yaml.safe_dump(merged, sort_keys=False))


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks


def build_model(model_args: ModelArguments) -> VisualADModel:
    """The model to train, in fp32, with the backbone frozen (except its final LayerNorm)."""
    overrides = model_args.config_kwargs()
    if model_args.backbone:
        model = VisualADModel.from_backbone(model_args.backbone, cache_dir=model_args.cache_dir, **overrides)
    elif model_args.model_name_or_path:
        model = VisualADModel.from_pretrained(
            model_args.model_name_or_path, dtype=torch.float32, cache_dir=model_args.cache_dir, **overrides
        )
    else:
        model = VisualADModel(VisualADConfig(vision_config=model_args.vision_config, **overrides))
    model.freeze_backbone()
    return model.float()


def build_optimizer(model: VisualADModel, args: VisualADTrainingArguments) -> torch.optim.AdamW:
    """AdamW with one parameter group per trainable part; the tokens have their own learning rate."""
    groups = []
    for name, params in model.parameter_groups().items():
        if params:
            lr = args.token_learning_rate if name == TOKEN_GROUP else args.learning_rate
            groups.append({"params": params, "lr": lr, "name": name})
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = {id(p) for group in groups for p in group["params"]}
    if trainable != grouped:
        raise RuntimeError(
            f"{len(trainable - grouped)} trainable parameters are in no optimizer group; "
            "VisualADModel.parameter_groups() must cover every trainable parameter."
        )
    return torch.optim.AdamW(
        groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, weight_decay=args.weight_decay
    )


def build_scheduler(optimizer: torch.optim.Optimizer, num_epochs: int, args: VisualADTrainingArguments):
    """Cosine annealing stepped once per epoch (`T_max` = epochs, one `eta_min` for all groups), or constant."""
    if args.lr_scheduler_type == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=num_epochs, eta_min=args.min_learning_rate)


def clip_token_gradients(model: VisualADModel, max_norm: float) -> tuple[float, float]:
    """Clip the gradient norm of the anomaly token and of the normal token separately; return both norms before
    clipping."""
    norms = []
    for token in (model.tokens.anomaly_token, model.tokens.normal_token):
        if token.grad is None:
            norms.append(0.0)
        elif max_norm > 0:
            norms.append(float(torch.nn.utils.clip_grad_norm_([token], max_norm)))
        else:
            norms.append(float(token.grad.norm()))
    return norms[0], norms[1]


def backbone_fingerprint(model: VisualADModel) -> str:
    """A short digest of the frozen backbone weights; a resumed run must train on the same backbone."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in model.backbone.named_parameters():
            if not parameter.requires_grad:
                values = parameter.detach().double()
                digest.update(f"{name}:{values.sum().item():.12e}:{values.abs().sum().item():.12e}".encode())
    return digest.hexdigest()[:16]


def step_seed(seed: int, step: int, micro_batch: int, process_index: int) -> int:
    """The RNG seed of one micro-batch: a pure function of its position, so resumed runs reproduce the dropout."""
    return int(np.random.SeedSequence([seed, step, micro_batch, process_index]).generate_state(1)[0])


def load_datasets(data_args: DataArguments, seed: int):
    """The training and (optional) evaluation `datasets.Dataset`s."""
    from .data import load_anomaly_dataset

    def load(name, data_dir, split, categories, limit, options=None):
        dataset = load_anomaly_dataset(
            name, data_dir, split=split, categories=categories, cache_dir=data_args.dataset_cache_dir, **(options or {})
        )
        if limit is not None and limit < len(dataset):
            dataset = dataset.shuffle(seed=seed).select(range(limit))
        return dataset

    train = load(
        data_args.train_dataset,
        data_args.train_data_dir,
        data_args.train_split,
        data_args.train_categories,
        data_args.max_train_samples,
        data_args.train_dataset_options,
    )
    if len(train) == 0:
        raise ValueError(f"The training data ({data_args.train_dataset} at {data_args.train_data_dir}) has no images.")
    evaluation = None
    if data_args.eval_dataset is not None:
        evaluation = load(
            data_args.eval_dataset,
            data_args.eval_data_dir,
            data_args.eval_split,
            data_args.eval_categories,
            data_args.max_eval_samples,
        )
    return train, evaluation


# ---------------------------------------------------------------------------------------------------------------------
# The training loop


@dataclass
class TrainerState:
    """Progress of a run; saved as `trainer_state.json` in every checkpoint and in the final folder."""

    global_step: int = 0
    epoch: float = 0.0
    max_steps: int = 0
    num_train_epochs: int = 0
    num_update_steps_per_epoch: int = 0
    total_train_batch_size: int = 0
    num_processes: int = 1
    skipped_steps: int = 0
    skipped_step_numbers: list[int] = field(default_factory=list)
    train_dataset_fingerprint: str = ""
    backbone_fingerprint: str = ""
    log_history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


@dataclass
class TrainOutput:
    """What `train` returns."""

    global_step: int
    skipped_steps: int
    training_loss: float
    output_dir: str
    eval_results: Any = None  # the evaluation runner's results on the target dataset, if evaluated
    hub_url: str | None = None


StepCallback = Callable[[TrainerState], None]


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    args: VisualADTrainingArguments,
    *,
    callbacks: Sequence[StepCallback] = (),
) -> TrainOutput:
    """Train VisualAD as configured, save `OUTPUT_DIR` (model, image processor, model card, results) and optionally
    push it to the Hub.

    Args:
        callbacks: called on every process with the `TrainerState` after each optimizer step (and its checkpoint).

    Raises:
        HubUploadError: after the local folder is complete, when `push_to_hub` could not upload it.
    """
    from accelerate import Accelerator
    from accelerate.data_loader import get_sampler
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from .data.collator import VisualADCollator
    from .image_processing_visualad import VisualADImageProcessor

    output_dir = Path(args.output_dir)
    logging_dir = Path(args.logging_dir) if args.logging_dir else output_dir / "logs"
    accelerator = Accelerator(
        cpu=args.use_cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        step_scheduler_with_optimizer=False,  # the schedule is per epoch; we step it ourselves
    )
    _configure_logging(accelerator)
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        warnings.warn(
            "mixed_precision='fp16' does nothing on CPU (Accelerate leaves autocast off): this run is fp32. "
            "Use bf16 for mixed precision on CPU.",
            stacklevel=2,
        )

    resume_dir = _prepare_output_dir(accelerator, output_dir, args)

    set_seed(args.seed)
    model = build_model(model_args)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    image_processor = VisualADImageProcessor.from_model_config(model.config)
    train_dataset, eval_dataset = load_datasets(data_args, args.seed)
    collator = VisualADCollator(image_processor, metadata_columns=("image_path",))
    if data_args.synthesize_anomalies:  # normal-only fine-tuning: synthetic defects on the fly
        from .data.anomaly_synthesis import synthesizing_collator

        collator = synthesizing_collator(collator, data_args, seed=args.seed)

    train_dataloader = DataLoader(
        train_dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
    )
    train_dataloader = accelerator.prepare(train_dataloader)
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_steps > 0:
        max_steps = args.max_steps
        num_epochs = math.ceil(max_steps / steps_per_epoch)
    else:
        num_epochs = args.num_train_epochs
        max_steps = num_epochs * steps_per_epoch

    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, num_epochs, args)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped: VisualADModel = accelerator.unwrap_model(model)
    _register_heads_only_checkpointing(accelerator)

    state = TrainerState(
        max_steps=max_steps,
        num_train_epochs=num_epochs,
        num_update_steps_per_epoch=steps_per_epoch,
        total_train_batch_size=args.per_device_train_batch_size
        * args.gradient_accumulation_steps
        * accelerator.num_processes,
        num_processes=accelerator.num_processes,
        train_dataset_fingerprint=getattr(train_dataset, "_fingerprint", ""),
        backbone_fingerprint=backbone_fingerprint(unwrapped),
    )
    if resume_dir is not None:
        state = _resume(accelerator, resume_dir, state)

    if args.report_to:
        accelerator.init_trackers(args.run_name, config=_tracker_config(model_args, data_args, args))
    logger.info(
        "Training %s on %d images (%s): %d epoch(s), %d optimizer steps of %d images, %d process(es), precision %s%s.",
        unwrapped.config.vision_config.model_type,
        len(train_dataset),
        data_args.train_dataset,
        num_epochs,
        max_steps,
        state.total_train_batch_size,
        accelerator.num_processes,
        accelerator.mixed_precision,
        ", gradient checkpointing" if args.gradient_checkpointing else "",
    )

    sampler = get_sampler(train_dataloader)
    progress = tqdm(
        total=max_steps,
        initial=state.global_step,
        desc="train",
        disable=args.disable_tqdm or not accelerator.is_local_main_process,
    )
    window = _LossWindow(accelerator.device)
    eval_results = None
    last_eval_step = -1
    model.train()
    start_epoch = state.global_step // steps_per_epoch
    for epoch in range(start_epoch, num_epochs):
        if state.global_step >= max_steps:
            break
        done_in_epoch = state.global_step - epoch * steps_per_epoch
        if hasattr(collator, "set_epoch"):  # synthetic defects differ per epoch, reproducibly
            collator.set_epoch(epoch)
        loader = _epoch_loader(
            accelerator, train_dataloader, sampler, epoch, done_in_epoch * args.gradient_accumulation_steps
        )
        micro_batch = 0
        nonfinite_loss = False
        for batch in loader:
            torch.manual_seed(step_seed(args.seed, state.global_step, micro_batch, accelerator.process_index))
            with accelerator.accumulate(model):
                outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"], masks=batch["masks"])
                loss = outputs.loss
                if torch.isfinite(loss):
                    window.add(outputs)
                else:
                    nonfinite_loss = True
                accelerator.backward(loss)
                micro_batch += 1
                if not accelerator.sync_gradients:
                    continue
                stepped, norms = _optimizer_step(accelerator, model, unwrapped, optimizer, args, nonfinite_loss)
                optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            micro_batch, nonfinite_loss = 0, False
            state.epoch = state.global_step / steps_per_epoch
            if stepped:
                window.add_norms(norms)
            else:
                _record_skipped_step(state, accelerator, batch)
            end_of_epoch = state.global_step % steps_per_epoch == 0
            if end_of_epoch:
                scheduler.step()
            if state.global_step % args.logging_steps == 0 or state.global_step == max_steps or not stepped:
                record = _log_step(accelerator, state, window, optimizer)
                if "train/loss" in record:
                    progress.set_postfix(loss=f"{record['train/loss']:.4f}", skipped=state.skipped_steps)
            progress.update(1)
            if args.save_steps > 0 and state.global_step % args.save_steps == 0 and state.global_step < max_steps:
                save_checkpoint(accelerator, output_dir, state, args.save_total_limit)
            if end_of_epoch and args.eval_strategy == "epoch" and eval_dataset is not None:
                eval_results = _evaluate(accelerator, model, image_processor, eval_dataset, args, state)
                last_eval_step = state.global_step
                model.train()
            for callback in callbacks:
                callback(state)
            if state.global_step >= max_steps:
                break
    progress.close()

    if args.eval_strategy != "no" and eval_dataset is not None and last_eval_step != state.global_step:
        eval_results = _evaluate(accelerator, model, image_processor, eval_dataset, args, state)
    model.eval()
    if state.skipped_steps:
        logger.warning(
            "%d of %d optimizer steps were skipped because of NaN/Inf (steps %s).",
            state.skipped_steps,
            state.global_step,
            state.skipped_step_numbers[:20],
        )
    losses = [entry["train/loss"] for entry in state.log_history if "train/loss" in entry]
    training_loss = float(np.mean(losses)) if losses else float("nan")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final(
            unwrapped,
            image_processor,
            output_dir,
            state=state,
            arguments=(model_args, data_args, args),
            eval_results=eval_results,
            training_loss=training_loss,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()

    result = TrainOutput(
        global_step=state.global_step,
        skipped_steps=state.skipped_steps,
        training_loss=training_loss,
        output_dir=str(output_dir),
        eval_results=eval_results,
    )
    if args.push_to_hub and accelerator.is_main_process:
        result.hub_url = push_to_hub(output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo)
    return result


def _epoch_loader(accelerator, train_dataloader, sampler, epoch: int, skip_batches: int):
    """The epoch's data: the order is a function of (seed, epoch); a resumed epoch skips the batches already seen
    without loading them."""
    loader = train_dataloader
    if skip_batches > 0:
        loader = accelerator.skip_first_batches(train_dataloader, skip_batches)
    loader.set_epoch(epoch)
    if hasattr(sampler, "set_epoch"):  # the skipping loader does not always reach the shared sampler itself
        sampler.set_epoch(epoch)
    return loader


def _record_skipped_step(state: TrainerState, accelerator, batch) -> None:
    state.skipped_steps += 1
    state.skipped_step_numbers.append(state.global_step)
    logger.warning(
        "Step %d: the loss or a gradient is NaN/Inf; the optimizer step was skipped (%d skipped so far). "
        "Images of this batch on process %d: %s",
        state.global_step,
        state.skipped_steps,
        accelerator.process_index,
        batch.get("image_path"),
    )


def _log_step(accelerator, state: TrainerState, window: _LossWindow, optimizer) -> dict[str, float]:
    """Average the window's losses over its steps and processes, add learning rates and counters, send to the
    trackers and the log history."""
    record = window.flush(accelerator) | {f"lr/{group['name']}": group["lr"] for group in optimizer.param_groups}
    record |= {"train/skipped_steps": state.skipped_steps, "train/epoch": state.epoch}
    state.log_history.append({"step": state.global_step, **record})
    accelerator.log(record, step=state.global_step)
    return record


def _optimizer_step(accelerator, model, unwrapped, optimizer, args, nonfinite_loss: bool) -> tuple[bool, tuple]:
    """Unscale, check for NaN/Inf (loss on any process, any trainable gradient), clip each token, step. Returns whether
    the parameters were updated and the gradient norms (total, anomaly token, normal token) before clipping."""
    accelerator.unscale_gradients()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=accelerator.device)
    bad = torch.tensor(float(nonfinite_loss or not torch.isfinite(total_norm)), device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item() > 0:
        if accelerator.scaler is not None:
            optimizer.step()  # the GradScaler sees the Inf, skips the update itself and lowers its scale
        return False, ()
    token_norms = clip_token_gradients(unwrapped, args.max_token_grad_norm)
    optimizer.step()
    if accelerator.optimizer_step_was_skipped:  # fp16 overflow found by the GradScaler
        return False, ()
    return True, (float(total_norm), *token_norms)


class _LossWindow:
    """Running sums of the loss terms and gradient norms between two log lines."""

    LOSSES = ("loss", "loss_cls", "loss_seg", "loss_ctr")
    NORMS = ("grad_norm", "grad_norm_anomaly_token", "grad_norm_normal_token")

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self):
        self.sums = torch.zeros(len(self.LOSSES) + 1, device=self.device, dtype=torch.float64)
        self.norms: list[tuple[float, ...]] = []

    def add(self, outputs) -> None:
        values = [getattr(outputs, name) for name in self.LOSSES]
        row = [float(v.detach()) if v is not None else 0.0 for v in values]
        self.sums += torch.tensor([*row, 1.0], device=self.device, dtype=torch.float64)

    def add_norms(self, norms: tuple[float, ...]) -> None:
        self.norms.append(norms)

    def flush(self, accelerator) -> dict[str, float]:
        sums = accelerator.reduce(self.sums.clone(), reduction="sum") if accelerator.num_processes > 1 else self.sums
        record: dict[str, float] = {}
        count = float(sums[-1])
        if count > 0:
            record = {f"train/{name}": float(sums[i]) / count for i, name in enumerate(self.LOSSES)}
        if self.norms:
            means = np.mean(np.asarray(self.norms, dtype=np.float64), axis=0)
            record |= {f"train/{name}": float(value) for name, value in zip(self.NORMS, means)}
        self.reset()
        return record


def _evaluate(accelerator, model, image_processor, dataset, args, state: TrainerState):
    """Evaluate on the target dataset (every process takes a share; all get the result) and log the metrics."""
    from .evaluation import evaluate_model

    results = evaluate_model(
        model,
        image_processor,
        dataset,
        batch_size=args.per_device_eval_batch_size,
        accelerator=accelerator,
        num_workers=args.dataloader_num_workers,
        progress=not args.disable_tqdm,
    )
    mean = {f"eval/{name}": value for name, value in results.mean.items() if value is not None}
    state.log_history.append({"step": state.global_step, **mean})
    accelerator.log(results.flat_metrics("eval/"), step=state.global_step)
    if accelerator.is_main_process:
        logger.info("Evaluation at step %d:\n%s", state.global_step, results.format_table())
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints, output folder, Hub


def _prepare_output_dir(accelerator, output_dir: Path, args: VisualADTrainingArguments) -> Path | None:
    """Create `output_dir`, clear leftovers of interrupted saves, and decide what to resume from."""
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        removed = checkpointing.remove_stale_folders(output_dir)
        if removed:
            logger.warning(
                "Removed incomplete checkpoint folders left by an interrupted run: %s", [p.name for p in removed]
            )
    accelerator.wait_for_everyone()
    resume_dir = checkpointing.resolve_checkpoint(output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint == "latest" and resume_dir is None:
        logger.warning("--resume_from_checkpoint latest: no checkpoint in %s yet; starting from scratch.", output_dir)
    existing = checkpointing.list_checkpoints(output_dir)
    if resume_dir is None and existing:
        if not args.overwrite_output_dir:
            raise ValueError(
                f"{output_dir} already holds checkpoints ({', '.join(p.name for _, p in existing[-3:])}). Pass "
                "--resume_from_checkpoint latest to continue that run, --overwrite_output_dir to delete them and start "
                "afresh, or another --output_dir."
            )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for _, path in existing:
                checkpointing.delete_checkpoint(path)
            logger.warning("--overwrite_output_dir: deleted %d old checkpoint(s) in %s.", len(existing), output_dir)
        accelerator.wait_for_everyone()
    return resume_dir


def _register_heads_only_checkpointing(accelerator) -> None:
    """Make `save_state`/`load_state` store only the trainable weights of the model (the frozen backbone is rebuilt
    from its source on resume), next to Accelerate's optimizer, scheduler and RNG states."""

    def save_hook(models, weights, directory):
        for model in models:
            if accelerator.is_main_process:
                checkpointing.save_trainable_weights(accelerator.unwrap_model(model), directory)
        weights.clear()  # Accelerate must not write the full model (1.3 GB with a ViT-L backbone)

    def load_hook(models, directory):
        while models:
            checkpointing.load_trainable_weights(accelerator.unwrap_model(models.pop()), directory)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir: Path, state: TrainerState, save_total_limit: int | None) -> Path:
    """Write `OUTPUT_DIR/checkpoint-STEP/` atomically (see `visualad_hf.checkpointing`) and apply the retention limit."""
    tmp_dir = checkpointing.temporary_checkpoint_dir(output_dir, state.global_step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp_dir))
    accelerator.wait_for_everyone()
    final = checkpointing.checkpoint_dir(output_dir, state.global_step)
    if accelerator.is_main_process:
        final = checkpointing.finalize_checkpoint(tmp_dir, state.to_dict())
        removed = checkpointing.rotate_checkpoints(output_dir, save_total_limit)
        logger.info("Saved %s%s", final, f"; removed {[p.name for p in removed]}" if removed else "")
    accelerator.wait_for_everyone()
    return final


def _resume(accelerator, checkpoint: Path, fresh: TrainerState) -> TrainerState:
    saved = checkpointing.read_trainer_state(checkpoint)
    for key in (
        "num_update_steps_per_epoch",
        "total_train_batch_size",
        "num_processes",
        "train_dataset_fingerprint",
        "backbone_fingerprint",
        "max_steps",
    ):
        if saved.get(key) != getattr(fresh, key):
            raise checkpointing.CheckpointError(
                f"Cannot resume exactly from {checkpoint}: its {key} is {saved.get(key)!r}, this run's is "
                f"{getattr(fresh, key)!r}. Resume with the same data, model, batch size, gradient accumulation, "
                "number of processes and max_steps/epochs as the run that wrote it, or start a new output_dir."
            )
    accelerator.load_state(str(checkpoint))
    accelerator.step = 0  # checkpoints are taken at optimizer-step boundaries
    state = TrainerState.from_dict(saved)
    logger.info("Resumed from %s at step %d (epoch %.2f).", checkpoint, state.global_step, state.epoch)
    return state


def save_final(
    model: VisualADModel,
    image_processor,
    output_dir: Path,
    *,
    state: TrainerState,
    arguments: Arguments,
    eval_results=None,
    training_loss: float = float("nan"),
) -> None:
    """Write the Hub-ready folder: weights (safetensors), config, image processor, model card, results, arguments.

    Files are written to a temporary folder and moved into `output_dir` one by one (each move is atomic), so a
    kill never leaves a half-written `model.safetensors` next to a good `config.json`.
    """
    staging = output_dir / ".final.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging)
    image_processor.save_pretrained(staging)
    save_arguments(arguments, staging / TRAINING_ARGS_NAME)
    checkpointing.write_json(staging / checkpointing.TRAINER_STATE_NAME, state.to_dict())
    results = {
        "global_step": state.global_step,
        "epoch": state.epoch,
        "skipped_steps": state.skipped_steps,
        "training_loss": training_loss,
    }
    checkpointing.write_json(staging / TRAIN_RESULTS_NAME, results)
    if eval_results is not None:
        eval_results.save(staging / EVAL_RESULTS_DIR)
    write_model_card(model, staging, arguments=arguments, state=state, eval_results=eval_results)
    for path in sorted(staging.iterdir()):  # a folder from an earlier run (eval_results/) is swapped out whole
        checkpointing.replace_path(path, output_dir / path.name)
    staging.rmdir()
    logger.info("Saved the trained model to %s", output_dir)


def write_model_card(
    model: VisualADModel, directory: Path, *, arguments: Arguments, state: TrainerState, eval_results=None
) -> Path:
    """`README.md` of the output folder, filled from the package's model-card template (`visualad_hf.model_card`):
    intended use, training data, recipe, the evaluation table as `model-index` metadata, limitations, citation."""
    from .model_card import create_model_card

    model_args, data_args, args = arguments
    recipe = {
        "epochs": state.num_train_epochs,
        "optimizer steps": state.global_step,
        "skipped (NaN/Inf) steps": state.skipped_steps,
        "batch size (total)": state.total_train_batch_size,
        "optimizer": f"AdamW (betas {args.adam_beta1}/{args.adam_beta2}, weight decay {args.weight_decay})",
        "learning rate, tokens": args.token_learning_rate,
        "learning rate, LayerNorm/SCA/SAF": args.learning_rate,
        "schedule": (
            f"cosine per epoch to {args.min_learning_rate}" if args.lr_scheduler_type == "cosine_epoch" else "constant"
        ),
        "token gradient clipping": args.max_token_grad_norm,
        "precision": args.mixed_precision or "no",
        "seed": args.seed,
    }
    card = create_model_card(
        model.config,
        base_model=model_args.backbone,
        training_data=data_args.display_name("train"),
        eval_results={data_args.display_name("eval"): eval_results.metrics} if eval_results is not None else None,
        eval_split=data_args.eval_split,
        recipe=recipe,
        source="trained",
        repo_id=args.hub_model_id,
    )
    path = directory / "README.md"
    card.save(str(path))
    return path


HUB_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "logs/**", ".final.tmp/**", "*.tmp/**"]


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload VisualAD model",
) -> str:
    """Upload a finished output folder (without checkpoints and logs) to the Hub; return the repository URL.

    Fails fast with `HubUploadError` when offline (`HF_HUB_OFFLINE=1`, or the Hub unreachable) instead of retrying.
    """
    from huggingface_hub import HfApi, constants, is_offline_mode
    from huggingface_hub.utils import get_session

    later = f"The model is complete in {folder}; upload it later with `hf upload {repo_id} {folder}`."
    if is_offline_mode():
        raise HubUploadError(f"Not uploaded to {repo_id}: HF_HUB_OFFLINE=1 forbids network access. {later}")
    try:
        get_session().head(constants.ENDPOINT, timeout=10)
    except Exception as error:
        raise HubUploadError(
            f"Not uploaded to {repo_id}: cannot reach {constants.ENDPOINT} ({error}). {later}"
        ) from error
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, commit_message=commit_message, ignore_patterns=HUB_IGNORE_PATTERNS
        )
    except Exception as error:
        raise HubUploadError(f"Upload to {repo_id} failed: {type(error).__name__}: {error}. {later}") from error
    logger.info("Uploaded %s to %s", folder, url)
    return str(url)


# ---------------------------------------------------------------------------------------------------------------------


def _tracker_config(*arguments) -> dict[str, Any]:
    """Hyper-parameters for the trackers: scalars only (TensorBoard's hparams reject lists and dicts)."""
    flat: dict[str, Any] = {}
    for item in arguments:
        for key, value in dataclasses.asdict(item).items():
            if key == "hub_token":
                continue
            flat[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def _configure_logging(accelerator) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    level = logging.INFO if accelerator.is_local_main_process else logging.WARNING
    logger.setLevel(max(level, logger.level))  # a caller that quietened this logger stays in charge


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point of `training/train.py`."""
    try:
        model_args, data_args, args = parse_args(argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from .data import DatasetLayoutError

    try:
        result = train(model_args, data_args, args)
    except HubUploadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (DatasetLayoutError, checkpointing.CheckpointError, FileNotFoundError, OSError) as error:
        # Bad input (data folders, checkpoints, backbone ids): the message says what and how to fix it.
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Done: {result.global_step} steps ({result.skipped_steps} skipped); model in {result.output_dir}")
    if result.hub_url:
        print(f"Uploaded to {result.hub_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
