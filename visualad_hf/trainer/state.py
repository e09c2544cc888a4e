"""What a run knows about its own progress (`TrainerState`, saved in every checkpoint and the final folder) and what
`train` returns (`TrainOutput`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TRAINER_STATE_NAME = "trainer_state.json"


@dataclass
class TrainerState:
    """Progress of a run; saved as `trainer_state.json` in every checkpoint and in the final folder.

    The fields after `skipped_step_numbers` describe the data position (steps per epoch, batch size, processes) and
    what the run trains on (fingerprints): a resumed run must agree on all of them to continue exactly.
    """

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

    # Fields that must be equal for a checkpoint to be resumed exactly (see `checkpoints.resume_mismatches`).
    RESUME_KEYS = (
        "num_update_steps_per_epoch",
        "total_train_batch_size",
        "num_processes",
        "train_dataset_fingerprint",
        "backbone_fingerprint",
        "max_steps",
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})

    @property
    def training_loss(self) -> float:
        """The mean of the logged training losses (NaN before the first log line)."""
        losses = [entry["train/loss"] for entry in self.log_history if "train/loss" in entry]
        return sum(losses) / len(losses) if losses else float("nan")


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

__all__ = ["TRAINER_STATE_NAME", "StepCallback", "TrainOutput", "TrainerState"]
