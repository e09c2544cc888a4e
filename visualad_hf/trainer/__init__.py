"""Training VisualAD with Accelerate: the authors' recipe (SPEC §6), checkpoints that survive a kill, logging,
evaluation on the target dataset, a Hub-ready output folder.

Run it with `accelerate launch training/train.py --config training/configs/clip_visa.yaml` (one or many processes),
plain `python training/train.py ...`, or `accelerate launch -m visualad_hf.trainer ...` from an installed package.

The recipe: AdamW (betas 0.9/0.999, weight decay 0.01) on the trainable parts only (tokens at 1e-3; final LayerNorm,
SCA and SAF at 1e-4); cosine annealing stepped once per *epoch* (`T_max` = epochs, `eta_min` = 1e-4, so only the token
learning rate moves); each token's gradient norm clipped to 1.0 on its own; batch 8, seed 111, fp32. The backbone is
frozen: no gradients reach its weights, only its activations carry gradients to the tokens.

The package:

- `arguments`: the three argument dataclasses, YAML configs, `parse_args` (the one HfArgumentParser);
- `builders`: model, optimizer, schedule, datasets;
- `loop`: `train()` as a sequence of named steps, the epoch/step loop, NaN/Inf skipping, `main()`;
- `checkpoints`: atomic checkpoints, integrity checks, exact and checked resuming;
- `output`: which output folders a run may use, the final model folder (swapped in as a whole), the model card;
- `state`: `TrainerState` and `TrainOutput`.
"""

from ..hub import push_folder as push_to_hub
from . import arguments, builders, checkpoints, loop, output, state
from .arguments import (
    ARGUMENT_CLASSES,
    PAPER_DATASET_NAMES,
    RECIPE_ARGUMENTS,
    TRAINING_ARGS_NAME,
    Arguments,
    DataArguments,
    ModelArguments,
    TrainingArgumentError,
    VisualADTrainingArguments,
    arguments_to_dict,
    config_to_argv,
    load_config,
    make_parser,
    parse_args,
    save_arguments,
)
from .builders import (
    TOKEN_GROUP,
    TrainingDataError,
    backbone_fingerprint,
    build_model,
    build_optimizer,
    build_scheduler,
    load_datasets,
)
from .checkpoints import CheckpointError, save_checkpoint
from .loop import clip_token_gradients, main, step_seed, train
from .output import EVAL_RESULTS_DIR, TRAIN_RESULTS_NAME, OutputDirError, save_final, write_model_card
from .state import StepCallback, TrainerState, TrainOutput

__all__ = [
    "ARGUMENT_CLASSES",
    "EVAL_RESULTS_DIR",
    "PAPER_DATASET_NAMES",
    "RECIPE_ARGUMENTS",
    "TOKEN_GROUP",
    "TRAINING_ARGS_NAME",
    "TRAIN_RESULTS_NAME",
    "Arguments",
    "CheckpointError",
    "DataArguments",
    "ModelArguments",
    "OutputDirError",
    "StepCallback",
    "TrainOutput",
    "TrainerState",
    "TrainingArgumentError",
    "TrainingDataError",
    "VisualADTrainingArguments",
    "arguments",
    "arguments_to_dict",
    "backbone_fingerprint",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "builders",
    "checkpoints",
    "clip_token_gradients",
    "config_to_argv",
    "load_config",
    "load_datasets",
    "loop",
    "main",
    "make_parser",
    "output",
    "parse_args",
    "push_to_hub",
    "save_arguments",
    "save_checkpoint",
    "save_final",
    "state",
    "step_seed",
    "train",
    "write_model_card",
]
