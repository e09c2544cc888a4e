"""The run's output folder: which folders a run may write into, and the final Hub-ready model folder (weights,
config, image processor, model card, results, arguments) installed as a whole.

The output folder holds two kinds of entries: the run's working files (`checkpoint-*/`, `logs/`), written while it
trains, and the final model, written once at the end. A whole-folder swap would have to move the checkpoints and
logs too (and a kill in the middle could strand them in a temporary folder), so the final model is installed by
`hub.staged_contents` instead: everything is written into `.visualad-staging.tmp/` inside the output folder, then a
journal is written and the model's entries are renamed in, the previous model's entries renamed aside first. A kill at
any point leaves the previous model or the new one, never a mix (a kill during the old one-file-at-a-time moves once
left a new README beside old weights); the next start finds the journal and puts the previous model back
(`recover_output_dir`). The list of installed entries (`.visualad-contents.json`) tells the next save what to replace.

A run never takes over a folder by accident (as in transformers' example scripts): a folder that holds checkpoints, a
trained model or files the trainer did not write is refused unless the run resumes from one of its checkpoints or
`--overwrite_output_dir` is given.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..hub import (
    CONTENTS_MANIFEST,
    DiskFullError,
    installed_contents,
    is_disk_full,
    recover_interrupted_contents_swap,
    remove_stale_staging,
    staged_contents,
    write_json,
)
from ..modeling_visualad import VisualADModel
from . import checkpoints
from .arguments import TRAINING_ARGS_NAME, Arguments, TrainingArgumentError, VisualADTrainingArguments, save_arguments
from .state import TRAINER_STATE_NAME, TrainerState

logger = logging.getLogger("visualad_hf.trainer")

TRAIN_RESULTS_NAME = "train_results.json"
EVAL_RESULTS_DIR = "eval_results"  # metrics.json/.csv/.md, scores.csv, figures/
# What final folders held before `.visualad-contents.json` listed it (replaced when an old folder is overwritten).
LEGACY_FINAL_ENTRIES = (
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "README.md",
    EVAL_RESULTS_DIR,
    TRAINING_ARGS_NAME,
    TRAINER_STATE_NAME,
    TRAIN_RESULTS_NAME,
)
# Any of these makes a folder "hold a trained model".
MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
_LEGACY_STAGING = ".final.tmp"  # the staging folder of earlier versions


class OutputDirError(TrainingArgumentError):
    """An output folder this run must not write into; the message says which flag to pass instead."""


def logging_dir(args: VisualADTrainingArguments) -> Path:
    return Path(args.logging_dir) if args.logging_dir else Path(args.output_dir) / "logs"


def recover_output_dir(output_dir: Path) -> None:
    """Undo what a killed run left half-done: an interrupted final-model swap (the previous model is put back),
    checkpoint saves and deletions (`checkpoint-N.old` restored, `.tmp`/`.deleting` removed), staging leftovers."""
    done = recover_interrupted_contents_swap(output_dir)
    if done:
        logger.warning("%s", done)
    removed = checkpoints.remove_stale_folders(output_dir) + remove_stale_staging(output_dir)
    legacy = output_dir / _LEGACY_STAGING
    if legacy.is_dir():
        shutil.rmtree(legacy, ignore_errors=True)
        removed.append(legacy)
    if removed:
        logger.warning("Removed what interrupted saves left behind: %s", [p.name for p in removed])


def _is_own_entry(name: str, output_dir: Path, args: VisualADTrainingArguments, installed: set[str]) -> bool:
    logs = logging_dir(args)
    return (
        checkpoints.is_checkpoint_name(name)
        or name in installed
        or name.startswith(".visualad-")
        or (logs.name == name and logs.parent.resolve() == output_dir.resolve())
    )


def check_output_dir(output_dir: Path, args: VisualADTrainingArguments, resuming: bool) -> None:
    """Refuse to start in a folder holding checkpoints, a trained model, or files the trainer did not write, unless
    this run resumes from one of its checkpoints (then the folder is this run's) or `--overwrite_output_dir` is set
    (old checkpoints are deleted now; an old model is replaced only when the new one is complete; other files stay).
    """
    if resuming or args.overwrite_output_dir or not output_dir.is_dir():
        return
    existing = [p.name for _, p in checkpoints.list_checkpoints(output_dir)]
    model = [name for name in MODEL_FILES if (output_dir / name).exists()]
    installed = set(installed_contents(output_dir))
    foreign = sorted(
        p.name for p in output_dir.iterdir() if not _is_own_entry(p.name, output_dir, args, installed)
    )
    if existing:
        also = " and a trained model" if model else ""
        raise OutputDirError(
            f"{output_dir} already holds checkpoints ({', '.join(existing[-3:])}){also}. Pass "
            "--resume_from_checkpoint latest to continue that run, --overwrite_output_dir to delete them and start "
            "afresh, or another --output_dir."
        )
    if model:
        raise OutputDirError(
            f"{output_dir} already holds a trained model ({', '.join(model)}). Pass --overwrite_output_dir to replace "
            "it when this run has finished, or another --output_dir."
        )
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputDirError(
            f"{output_dir} is not empty and holds files the trainer did not write ({shown}). Pass another "
            "--output_dir, or --overwrite_output_dir to write into it anyway (those files are left as they are)."
        )


def delete_old_checkpoints(output_dir: Path) -> None:
    """`--overwrite_output_dir` on a folder with checkpoints: delete them (an old final model stays until replaced)."""
    existing = checkpoints.list_checkpoints(output_dir)
    for _, path in existing:
        checkpoints.delete_checkpoint(path)
    if existing:
        logger.warning("--overwrite_output_dir: deleted %d old checkpoint(s) in %s.", len(existing), output_dir)


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
    """Write the Hub-ready folder: weights (safetensors), config, image processor, model card, results, arguments,
    swapped in as a whole (see the module docstring). A full disk raises `DiskFullError` and changes nothing.

    A model that started from a converted folder no longer holds the converted final LayerNorm (training changed
    it), so its config's `final_layernorm_source` (set by `visualad convert`) is cleared.
    """
    if getattr(model.config, "final_layernorm_source", None) is not None:
        model.config.final_layernorm_source = None
    try:
        with staged_contents(output_dir, replaces=LEGACY_FINAL_ENTRIES) as staging:
            model.save_pretrained(staging)
            image_processor.save_pretrained(staging)
            save_arguments(arguments, staging / TRAINING_ARGS_NAME)
            write_json(staging / TRAINER_STATE_NAME, state.to_dict())
            results = {
                "global_step": state.global_step,
                "epoch": state.epoch,
                "skipped_steps": state.skipped_steps,
                "training_loss": training_loss,
            }
            write_json(staging / TRAIN_RESULTS_NAME, results)
            if eval_results is not None:
                eval_results.save(staging / EVAL_RESULTS_DIR)
            write_model_card(model, staging, arguments=arguments, state=state, eval_results=eval_results)
    except OSError as error:
        if not is_disk_full(error):
            raise
        newest = checkpoints.list_checkpoints(output_dir)
        kept = f"; {newest[-1][1].name} is intact" if newest else ""
        raise DiskFullError(
            f"The disk is full: writing the final model into {output_dir} failed and nothing there was changed"
            f"{kept}. Free some space and run the same command again (with --resume_from_checkpoint latest)."
        ) from error
    logger.info("Saved the trained model to %s", output_dir)


def write_model_card(
    model: VisualADModel, directory: Path, *, arguments: Arguments, state: TrainerState, eval_results=None
) -> Path:
    """`README.md` of the output folder, filled from the package's model-card template (`visualad_hf.model_card`):
    intended use, training data, recipe, the evaluation table as `model-index` metadata, limitations, citation."""
    from ..model_card import create_model_card

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


__all__ = [
    "CONTENTS_MANIFEST",
    "EVAL_RESULTS_DIR",
    "TRAIN_RESULTS_NAME",
    "OutputDirError",
    "check_output_dir",
    "delete_old_checkpoints",
    "recover_output_dir",
    "save_final",
    "write_model_card",
]
