"""The training run: `train()` as a short sequence of named steps, the epoch/step loop, NaN/Inf handling, and
`main()` (the command-line entry of `training/train.py`).

Reproducibility and resuming. The data order of epoch `e` is a function of `(seed, e)` (Accelerate's seedable
sampler) and the dropout masks of each micro-batch a function of `(seed, optimizer step, micro-batch, process)`: the
global RNG is reseeded before every micro-batch. A run resumed from `checkpoint-S` therefore sees exactly the batches
and dropout masks that the uninterrupted run saw after step S, and ends with bit-identical weights (tested).

NaN/Inf. A step whose loss (on any process) or any trainable gradient is not finite is skipped: no update, the
gradients are dropped, a warning names the step and the batch's images, and the count is logged, saved in
`trainer_state.json` and shown in the model card. With fp16 the gradient scaler still sees the step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..errors import VisualADError
from ..hub import DiskFullError, HubUploadError, is_disk_full, push_folder
from ..modeling_visualad import VisualADModel
from . import builders, checkpoints, output
from .arguments import Arguments, DataArguments, ModelArguments, VisualADTrainingArguments, parse_args
from .state import StepCallback, TrainerState, TrainOutput

logger = logging.getLogger("visualad_hf.trainer")

# Batch entries the model takes; the rest (image paths, ...) is metadata for messages.
MODEL_INPUTS = ("pixel_values", "labels", "masks", "has_mask")


@dataclass
class Run:
    """Everything one training run holds, built by `set_up` and passed to the steps of `train`."""

    accelerator: Any
    arguments: Arguments
    model: Any  # the prepared (possibly DDP-wrapped) model
    unwrapped: VisualADModel
    image_processor: Any
    optimizer: Any
    scheduler: Any
    train_dataloader: Any
    train_dataset: Any
    eval_dataset: Any
    state: TrainerState
    output_dir: Path
    eval_results: Any = None
    last_eval_step: int = -1

    @property
    def args(self) -> VisualADTrainingArguments:
        return self.arguments[2]


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
        VisualADError: bad input (data, output folder, checkpoint); `DiskFullError` when a save ran out of space;
            `HubUploadError` after the local folder is complete, when `push_to_hub` could not upload it.
    """
    accelerator = create_accelerator(args)
    resume_dir = prepare_output_dir(accelerator, args)
    run = set_up(accelerator, (model_args, data_args, args), resume_dir)
    start_logging(run)
    train_epochs(run, callbacks)
    evaluate_at_end(run)
    save_final_folder(run)
    return finish(run)


# ---------------------------------------------------------------------------------------------------------------------
# The steps of `train`


def create_accelerator(args: VisualADTrainingArguments):
    """The Accelerator: precision, gradient accumulation, trackers, and a seedable sampler (for exact resuming)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    accelerator = Accelerator(
        cpu=args.use_cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to or None,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(output.logging_dir(args))),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        step_scheduler_with_optimizer=False,  # the schedule is per epoch; we step it ourselves
    )
    _configure_logging(accelerator)
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        warnings.warn(
            "mixed_precision='fp16' does nothing on CPU (Accelerate leaves autocast off): this run is fp32. "
            "Use bf16 for mixed precision on CPU.",
            stacklevel=3,
        )
    return accelerator


def prepare_output_dir(accelerator, args: VisualADTrainingArguments) -> Path | None:
    """Recover what a killed run left half-done, refuse a folder this run must not write into, and pick the
    checkpoint to resume from (a damaged newest one falls back to the previous one)."""
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        output.recover_output_dir(output_dir)
    accelerator.wait_for_everyone()
    resume_dir = checkpoints.choose_checkpoint(output_dir, args.resume_from_checkpoint, warn=accelerator.is_main_process)
    if args.resume_from_checkpoint == "latest" and resume_dir is None:
        logger.warning("--resume_from_checkpoint latest: no checkpoint in %s yet; starting from scratch.", output_dir)
    output.check_output_dir(output_dir, args, resuming=resume_dir is not None)
    if resume_dir is None and args.overwrite_output_dir:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            output.delete_old_checkpoints(output_dir)
    accelerator.wait_for_everyone()
    return resume_dir


def set_up(accelerator, arguments: Arguments, resume_dir: Path | None) -> Run:
    """Model, image processor, data, optimizer and schedule, prepared by Accelerate; the state, resumed if asked."""
    from accelerate.utils import set_seed

    from ..image_processing_visualad import VisualADImageProcessor

    model_args, data_args, args = arguments
    set_seed(args.seed)
    model = builders.build_model(model_args)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    image_processor = VisualADImageProcessor.from_model_config(model.config)
    train_dataset, eval_dataset = builders.load_datasets(data_args, args.seed)
    collator = build_collator(image_processor, data_args, args)
    train_dataloader = accelerator.prepare(build_train_dataloader(train_dataset, collator, args))
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_epochs, max_steps = _schedule_length(args, steps_per_epoch)

    optimizer = builders.build_optimizer(model, args)
    scheduler = builders.build_scheduler(optimizer, num_epochs, args)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped: VisualADModel = accelerator.unwrap_model(model)
    checkpoints.register_heads_only_checkpointing(accelerator)
    state = TrainerState(
        max_steps=max_steps,
        num_train_epochs=num_epochs,
        num_update_steps_per_epoch=steps_per_epoch,
        total_train_batch_size=args.per_device_train_batch_size
        * args.gradient_accumulation_steps
        * accelerator.num_processes,
        num_processes=accelerator.num_processes,
        train_dataset_fingerprint=getattr(train_dataset, "_fingerprint", ""),
        backbone_fingerprint=builders.backbone_fingerprint(unwrapped),
    )
    if resume_dir is not None:
        state = checkpoints.resume(accelerator, resume_dir, state, arguments=arguments, config=unwrapped.config)
    return Run(accelerator, arguments, model, unwrapped, image_processor, optimizer, scheduler, train_dataloader,
               train_dataset, eval_dataset, state, Path(args.output_dir))  # fmt: skip


def build_collator(image_processor, data_args: DataArguments, args: VisualADTrainingArguments):
    """The training collator: processed images, masks, labels and `has_mask` flags (see `VisualADCollator`). Data
    options that change training batches (e.g. synthetic anomalies) wrap it here; a collator with a `set_epoch`
    method is told each epoch before its batches are drawn (so on-the-fly changes are reproducible on resume)."""
    from ..data.collator import VisualADCollator

    return VisualADCollator(image_processor, metadata_columns=("image_path",))


def build_train_dataloader(train_dataset, collator, args: VisualADTrainingArguments) -> DataLoader:
    """Shuffled batches of `per_device_train_batch_size` (Accelerate's seedable sampler replaces the order)."""
    return DataLoader(
        train_dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
    )


def _schedule_length(args: VisualADTrainingArguments, steps_per_epoch: int) -> tuple[int, int]:
    """(epochs, optimizer steps): `max_steps` wins over `num_train_epochs` when given."""
    if args.max_steps > 0:
        return math.ceil(args.max_steps / steps_per_epoch), args.max_steps
    return args.num_train_epochs, args.num_train_epochs * steps_per_epoch


def start_logging(run: Run) -> None:
    """Start the trackers and say what is about to be trained."""
    _, data_args, args = run.arguments
    if args.report_to:
        run.accelerator.init_trackers(args.run_name, config=_tracker_config(*run.arguments))
    logger.info(
        "Training %s on %d images (%s): %d epoch(s), %d optimizer steps of %d images, %d process(es), precision %s%s.",
        run.unwrapped.config.vision_config.model_type,
        len(run.train_dataset),
        data_args.train_dataset,
        run.state.num_train_epochs,
        run.state.max_steps,
        run.state.total_train_batch_size,
        run.accelerator.num_processes,
        run.accelerator.mixed_precision,
        ", gradient checkpointing" if args.gradient_checkpointing else "",
    )


def train_epochs(run: Run, callbacks: Sequence[StepCallback]) -> None:
    """The epoch loop, from where the state says the run is (a resumed run continues mid-epoch)."""
    from accelerate.data_loader import get_sampler
    from tqdm.auto import tqdm

    state, args = run.state, run.args
    sampler = get_sampler(run.train_dataloader)
    progress = tqdm(total=state.max_steps, initial=state.global_step, desc="train",
                    disable=args.disable_tqdm or not run.accelerator.is_local_main_process)  # fmt: skip
    window = _LossWindow(run.accelerator.device)
    run.model.train()
    for epoch in range(state.global_step // state.num_update_steps_per_epoch, state.num_train_epochs):
        if state.global_step >= state.max_steps:
            break
        train_epoch(run, _epoch_loader(run, sampler, epoch), window, progress, callbacks)
    progress.close()


def train_epoch(run: Run, loader, window: _LossWindow, progress, callbacks: Sequence[StepCallback]) -> None:
    """One epoch of micro-batches; every `gradient_accumulation_steps` of them make one optimizer step."""
    accelerator, args, state = run.accelerator, run.args, run.state
    micro_batch, nonfinite_loss = 0, False
    for batch in loader:
        torch.manual_seed(step_seed(args.seed, state.global_step, micro_batch, accelerator.process_index))
        with accelerator.accumulate(run.model):
            outputs = run.model(**{key: batch[key] for key in MODEL_INPUTS if key in batch})
            if torch.isfinite(outputs.loss):
                window.add(outputs)
            else:
                nonfinite_loss = True
            accelerator.backward(outputs.loss)
            micro_batch += 1
            if not accelerator.sync_gradients:
                continue
            stepped, norms = _optimizer_step(run, nonfinite_loss)
            run.optimizer.zero_grad(set_to_none=True)
        micro_batch, nonfinite_loss = 0, False
        after_optimizer_step(run, batch, stepped, norms, window, progress)
        for callback in callbacks:
            callback(state)
        if state.global_step >= state.max_steps:
            return


def after_optimizer_step(run: Run, batch, stepped: bool, norms: tuple, window: _LossWindow, progress) -> None:
    """Bookkeeping of one optimizer step: counters, the per-epoch schedule, logging, checkpoint, epoch evaluation."""
    state, args = run.state, run.args
    state.global_step += 1
    state.epoch = state.global_step / state.num_update_steps_per_epoch
    if stepped:
        window.add_norms(norms)
    else:
        _record_skipped_step(state, run.accelerator, batch)
    end_of_epoch = state.global_step % state.num_update_steps_per_epoch == 0
    if end_of_epoch:
        run.scheduler.step()
    if state.global_step % args.logging_steps == 0 or state.global_step == state.max_steps or not stepped:
        record = _log_step(run, window)
        if "train/loss" in record:
            progress.set_postfix(loss=f"{record['train/loss']:.4f}", skipped=state.skipped_steps)
    progress.update(1)
    if args.save_steps > 0 and state.global_step % args.save_steps == 0 and state.global_step < state.max_steps:
        checkpoints.save_checkpoint(run.accelerator, run.output_dir, state, args.save_total_limit,
                                    arguments=run.arguments, config=run.unwrapped.config)  # fmt: skip
    if end_of_epoch and args.eval_strategy == "epoch" and run.eval_dataset is not None:
        evaluate(run)
        run.model.train()


def evaluate_at_end(run: Run) -> None:
    """The target-dataset evaluation after training (unless the last epoch's evaluation is already this step's)."""
    if run.args.eval_strategy != "no" and run.eval_dataset is not None and run.last_eval_step != run.state.global_step:
        evaluate(run)
    run.model.eval()
    state = run.state
    if state.skipped_steps:
        logger.warning("%d of %d optimizer steps were skipped because of NaN/Inf (steps %s).",
                       state.skipped_steps, state.global_step, state.skipped_step_numbers[:20])  # fmt: skip


def evaluate(run: Run) -> None:
    """Evaluate on the target dataset (every process takes a share; all get the result) and log the metrics."""
    from ..evaluation import evaluate_model

    args, state = run.args, run.state
    results = evaluate_model(run.model, run.image_processor, run.eval_dataset, batch_size=args.per_device_eval_batch_size,
                             accelerator=run.accelerator, num_workers=args.dataloader_num_workers,
                             progress=not args.disable_tqdm)  # fmt: skip
    mean = {f"eval/{name}": value for name, value in results.mean.items() if value is not None}
    state.log_history.append({"step": state.global_step, **mean})
    run.accelerator.log(results.flat_metrics("eval/"), step=state.global_step)
    if run.accelerator.is_main_process:
        logger.info("Evaluation at step %d:\n%s", state.global_step, results.format_table())
    run.eval_results, run.last_eval_step = results, state.global_step


def save_final_folder(run: Run) -> None:
    """The Hub-ready folder, written by the main process; a failure there (a full disk) stops every process."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    error = None
    if accelerator.is_main_process:
        try:
            output.save_final(run.unwrapped, run.image_processor, run.output_dir, state=run.state,
                              arguments=run.arguments, eval_results=run.eval_results,
                              training_loss=run.state.training_loss)  # fmt: skip
        except Exception as caught:  # noqa: BLE001 - shared with the other processes below, then re-raised here
            error = caught
    what = f"writing the final model into {run.output_dir}"
    checkpoints.raise_if_any_failed(accelerator, error, what=what, disk_full=f"{what} failed.")
    accelerator.end_training()


def finish(run: Run) -> TrainOutput:
    """The result, after the optional upload (main process only; offline it fails fast, the folder is complete)."""
    args = run.args
    result = TrainOutput(
        global_step=run.state.global_step,
        skipped_steps=run.state.skipped_steps,
        training_loss=run.state.training_loss,
        output_dir=str(run.output_dir),
        eval_results=run.eval_results,
    )
    if args.push_to_hub and run.accelerator.is_main_process:
        result.hub_url = push_folder(run.output_dir, args.hub_model_id, token=args.hub_token,
                                     private=args.hub_private_repo)  # fmt: skip
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Inside the loop


def step_seed(seed: int, step: int, micro_batch: int, process_index: int) -> int:
    """The RNG seed of one micro-batch: a pure function of its position, so resumed runs reproduce the dropout."""
    return int(np.random.SeedSequence([seed, step, micro_batch, process_index]).generate_state(1)[0])


def _epoch_loader(run: Run, sampler, epoch: int):
    """The epoch's data: the order is a function of (seed, epoch); a resumed epoch skips the batches already seen
    without loading them."""
    done_in_epoch = run.state.global_step - epoch * run.state.num_update_steps_per_epoch
    skip_batches = done_in_epoch * run.args.gradient_accumulation_steps
    loader = run.train_dataloader
    if skip_batches > 0:
        loader = run.accelerator.skip_first_batches(run.train_dataloader, skip_batches)
    loader.set_epoch(epoch)
    if hasattr(run.train_dataloader.collate_fn, "set_epoch"):
        run.train_dataloader.collate_fn.set_epoch(epoch)
    if hasattr(sampler, "set_epoch"):  # the skipping loader does not always reach the shared sampler itself
        sampler.set_epoch(epoch)
    return loader


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


def _optimizer_step(run: Run, nonfinite_loss: bool) -> tuple[bool, tuple]:
    """Unscale, check for NaN/Inf (loss on any process, any trainable gradient), clip each token, step. Returns whether
    the parameters were updated and the gradient norms (total, anomaly token, normal token) before clipping."""
    accelerator, optimizer = run.accelerator, run.optimizer
    accelerator.unscale_gradients()
    grads = [p.grad for p in run.model.parameters() if p.requires_grad and p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=accelerator.device)
    bad = torch.tensor(float(nonfinite_loss or not torch.isfinite(total_norm)), device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item() > 0:
        if accelerator.scaler is not None:
            optimizer.step()  # the GradScaler sees the Inf, skips the update itself and lowers its scale
        return False, ()
    token_norms = clip_token_gradients(run.unwrapped, run.args.max_token_grad_norm)
    optimizer.step()
    if accelerator.optimizer_step_was_skipped:  # fp16 overflow found by the GradScaler
        return False, ()
    return True, (float(total_norm), *token_norms)


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


def _log_step(run: Run, window: _LossWindow) -> dict[str, float]:
    """Average the window's losses over its steps and processes, add learning rates and counters, send to the
    trackers and the log history."""
    state = run.state
    record = window.flush(run.accelerator)
    record |= {f"lr/{group['name']}": group["lr"] for group in run.optimizer.param_groups}
    record |= {"train/skipped_steps": state.skipped_steps, "train/epoch": state.epoch}
    state.log_history.append({"step": state.global_step, **record})
    run.accelerator.log(record, step=state.global_step)
    return record


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


# ---------------------------------------------------------------------------------------------------------------------
# Command line


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
    """Command-line entry point of `training/train.py`: errors a user can fix end in one line without a traceback
    (exit status 2; 1 for a full disk or a failed upload); `VISUALAD_DEBUG=1` shows the traceback."""
    try:
        model_args, data_args, args = parse_args(argv)
    except (VisualADError, ValueError) as error:
        return _fail(error, 2)
    try:
        result = train(model_args, data_args, args)
    except (HubUploadError, DiskFullError) as error:
        return _fail(error, 1)
    except VisualADError as error:  # bad data folders, output folders, checkpoints: the message says what to do
        return _fail(error, 2)
    except OSError as error:
        if is_disk_full(error):
            where = f" ({error.filename})" if error.filename else ""
            return _fail(f"the disk is full{where}; free some space and run again with --resume_from_checkpoint latest", 1)
        return _fail(error, 2)  # a missing folder or backbone id: transformers and the loaders say which
    print(f"Done: {result.global_step} steps ({result.skipped_steps} skipped); model in {result.output_dir}")
    if result.hub_url:
        print(f"Uploaded to {result.hub_url}")
    return 0


def _fail(error: BaseException | str, status: int) -> int:
    if os.environ.get("VISUALAD_DEBUG") and isinstance(error, BaseException):
        raise error
    print(f"error: {error}", file=sys.stderr)
    return status


__all__ = [
    "MODEL_INPUTS",
    "Run",
    "after_optimizer_step",
    "build_collator",
    "build_train_dataloader",
    "clip_token_gradients",
    "create_accelerator",
    "evaluate",
    "evaluate_at_end",
    "finish",
    "main",
    "prepare_output_dir",
    "save_final_folder",
    "set_up",
    "start_logging",
    "step_seed",
    "train",
    "train_epoch",
    "train_epochs",
]
