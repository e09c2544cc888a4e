"""The pieces a run is made of: the model (backbone frozen), AdamW over the trainable parts, the per-epoch schedule,
and the datasets. Each is a plain function, so the demo and the benchmarks build exactly what training uses."""

from __future__ import annotations

import hashlib
import logging

import torch

from ..configuration_visualad import VisualADConfig
from ..errors import VisualADError
from ..modeling_visualad import VisualADModel
from .arguments import DataArguments, ModelArguments, VisualADTrainingArguments

logger = logging.getLogger("visualad_hf.trainer")

TOKEN_GROUP = "tokens"


class TrainingDataError(VisualADError, ValueError):
    """Training or evaluation data that cannot be used; the message names the folder and the fix."""


def build_model(model_args: ModelArguments) -> VisualADModel:
    """The model to train, in fp32, with the backbone frozen (except its final LayerNorm).

    `--model_name_or_path` continues from a VisualAD folder with *all* its weights, the final LayerNorm included:
    a folder made by `visualad convert` holds the backbone's own LayerNorm by default (`--final-layernorm backbone`,
    the authors' released evaluation) or the one trained with the released heads (`--final-layernorm checkpoint`),
    and training starts from whichever it holds.
    """
    overrides = model_args.config_kwargs()
    if model_args.backbone:
        model = VisualADModel.from_backbone(model_args.backbone, cache_dir=model_args.cache_dir, **overrides)
    elif model_args.model_name_or_path:
        model = VisualADModel.from_pretrained(
            model_args.model_name_or_path, dtype=torch.float32, cache_dir=model_args.cache_dir, **overrides
        )
        source = getattr(model.config, "final_layernorm_source", None)
        if source is not None:
            held = "the backbone's own" if source == "backbone" else "the one trained with the released heads"
            logger.info("%s was converted with --final-layernorm %s: training starts from %s final LayerNorm.",
                        model_args.model_name_or_path, source, held)  # fmt: skip
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


def backbone_fingerprint(model: VisualADModel) -> str:
    """A short digest of the frozen backbone weights; a resumed run must train on the same backbone."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in model.backbone.named_parameters():
            if not parameter.requires_grad:
                values = parameter.detach().double()
                digest.update(f"{name}:{values.sum().item():.12e}:{values.abs().sum().item():.12e}".encode())
    return digest.hexdigest()[:16]


def load_datasets(data_args: DataArguments, seed: int):
    """The training and (optional) evaluation `datasets.Dataset`s."""
    train = _load_one(data_args, seed, "train")
    if len(train) == 0:
        raise TrainingDataError(
            f"The training data ({data_args.train_dataset} at {data_args.train_data_dir}) has no images; "
            "check --train_data_dir and --train_categories."
        )
    evaluation = _load_one(data_args, seed, "eval") if data_args.eval_dataset is not None else None
    return train, evaluation


def _load_one(data_args: DataArguments, seed: int, which: str):
    from ..data import load_anomaly_dataset

    name, data_dir = getattr(data_args, f"{which}_dataset"), getattr(data_args, f"{which}_data_dir")
    categories = getattr(data_args, f"{which}_categories")
    _check_synthetic_benchmark(data_dir, categories)
    dataset = load_anomaly_dataset(
        name,
        data_dir,
        split=getattr(data_args, f"{which}_split"),
        categories=categories,
        cache_dir=data_args.dataset_cache_dir,
    )
    limit = getattr(data_args, f"max_{which}_samples")
    if limit is not None and limit < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(limit))
    return dataset


def _check_synthetic_benchmark(data_dir: str, categories) -> None:
    """A config that asks for the synthetic benchmark's families (e.g. `synthetic_tiny.yaml`) on a folder that does
    not exist yet needs `visualad synthetic`, not the download hint of the dataset layout it borrows."""
    from pathlib import Path

    from ..data.synthetic import FAMILIES

    if Path(data_dir).exists() or not categories or not set(categories) <= set(FAMILIES):
        return
    from ..data import dataset_spec

    real = set(dataset_spec("mvtec").categories)
    if set(categories) <= real:  # e.g. `capsule` alone: an MVTec category too, keep the loader's own hint
        return
    raise TrainingDataError(
        f"{data_dir} does not exist: these categories ({', '.join(categories)}) are families of the synthetic "
        f"benchmark; write it first with `visualad synthetic --output {data_dir}`."
    )


__all__ = [
    "TOKEN_GROUP",
    "TrainingDataError",
    "backbone_fingerprint",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "load_datasets",
]
