"""Training (`visualad_hf.trainer`): recipe, resumable atomic checkpoints, NaN skipping, 2 CPU processes, output folder.

Every run trains a 2-layer width-32 random backbone on a tiny synthetic benchmark (32 px images, 8 training images).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from visualad_hf import trainer
from visualad_hf.trainer import (
    build_optimizer,
    build_scheduler,
    clip_token_gradients,
    parse_args,
    train,
)
from visualad_hf.trainer import checkpoints as checkpointing

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"
TINY_VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 8,
    "image_size": 32,
}
SUBPROCESS_ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
}


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    from visualad_hf.data import generate_synthetic_benchmark

    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_benchmark(
        root,
        image_size=32,
        auxiliary_categories=["stripes", "disc"],
        target_categories=["grain", "nut"],
        num_train=0,
        num_test_normal=2,
        num_test_anomalous=2,
    )
    return root


def tiny_argv(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """Command-line arguments of a tiny run: 8 training images, batch 2, 4 steps per epoch."""
    return [
        "--vision_config", json.dumps(TINY_VISION),
        "--feature_layers", "1", "2",
        "--image_size", "32",
        "--config_overrides", json.dumps({"gaussian_sigma": 1.0, "max_patches": 64}),
        "--train_dataset", "mvtec", "--train_data_dir", str(data_dir), "--train_categories", "stripes", "disc",
        "--eval_dataset", "mvtec", "--eval_data_dir", str(data_dir), "--eval_categories", "grain", "nut",
        "--eval_dataset_name", "synthetic target",
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4",
        "--token_learning_rate", "1e-2", "--learning_rate", "1e-2",
        "--logging_steps", "1",
        "--report_to", "none",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def run_tiny(data_dir: Path, output_dir: Path, *extra: str, callbacks=()):
    return train(*parse_args(tiny_argv(data_dir, output_dir, *extra)), callbacks=callbacks)


# ---------------------------------------------------------------------------------------------------------------------
# Arguments and configs


def test_yaml_config_then_command_line_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        textwrap.dedent(
            """
            vision_config: {model_type: clip_vision_model, hidden_size: 32, num_attention_heads: 2, patch_size: 8}
            train_dataset: mvtec
            train_data_dir: somewhere
            token_learning_rate: 1e-3      # YAML reads this as a string; argparse must convert it
            feature_layers: [1, 2]
            gradient_checkpointing: true
            max_steps: 7
            """
        )
    )
    model_args, data_args, args = parse_args(["--config", str(config), "--max_steps", "9", "--seed", "3"])
    assert model_args.vision_config["hidden_size"] == 32
    assert model_args.feature_layers == [1, 2]
    assert args.token_learning_rate == 1e-3 and isinstance(args.token_learning_rate, float)
    assert args.gradient_checkpointing is True
    assert (args.max_steps, args.seed) == (9, 3)  # the command line wins over the file
    assert data_args.train_split == "test"  # zero-shot protocol default

    config.write_text("train_dataset: mvtec\ntrain_data_dir: x\nbackbone: b\nlearnig_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"learnig_rate \(did you mean learning_rate\?\)"):
        parse_args(["--config", str(config)])
    with pytest.raises(ValueError, match="exactly one model source"):
        parse_args(["--train_dataset", "mvtec", "--train_data_dir", "x"])


@pytest.mark.parametrize(
    "name, backbone, epochs, train_dataset, eval_dataset",
    [
        ("clip_visa", "openai/clip-vit-large-patch14-336", 1, "visa", "mvtec"),
        ("clip_mvtec", "openai/clip-vit-large-patch14-336", 2, "mvtec", "visa"),
        ("dinov2_visa", "facebook/dinov2-large", 4, "visa", "mvtec"),
        ("dinov2_mvtec", "facebook/dinov2-large", 2, "mvtec", "visa"),
    ],
)
def test_paper_configs_hold_the_recipe(name, backbone, epochs, train_dataset, eval_dataset):
    model_args, data_args, args = parse_args(["--config", str(CONFIGS / f"{name}.yaml")])
    assert model_args.backbone == backbone
    assert model_args.feature_layers == [6, 12, 18, 24] and model_args.image_size == 518
    assert (data_args.train_dataset, data_args.train_split, data_args.eval_dataset) == (
        train_dataset,
        "test",
        eval_dataset,
    )
    assert args.num_train_epochs == epochs
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.seed) == (8, 1, 111)
    assert (args.token_learning_rate, args.learning_rate, args.min_learning_rate) == (1e-3, 1e-4, 1e-4)
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay, args.max_token_grad_norm) == (0.9, 0.999, 0.01, 1.0)
    assert args.lr_scheduler_type == "cosine_epoch" and args.mixed_precision is None


def test_tiny_config_is_one_file_shipped_in_the_package():
    from visualad_hf.demo import TINY_CONFIG

    link = CONFIGS / "synthetic_tiny.yaml"
    assert TINY_CONFIG.is_file() and TINY_CONFIG.parent.name == "resources"
    assert link.resolve() == TINY_CONFIG.resolve()
    model_args, data_args, _ = parse_args(["--config", str(link)])
    assert model_args.vision_config["model_type"] == "clip_vision_model"
    assert not set(data_args.train_categories) & set(data_args.eval_categories)  # zero-shot: disjoint families


# ---------------------------------------------------------------------------------------------------------------------
# Recipe pieces


def test_optimizer_groups_schedule_and_token_clipping(tiny_config):
    from visualad_hf import VisualADModel

    model = VisualADModel(tiny_config)
    args = trainer.VisualADTrainingArguments()  # the defaults are the recipe
    optimizer = build_optimizer(model, args)
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert set(groups) == {"tokens", "final_layernorm", "spatial_cross_attention", "self_alignment"}
    assert groups["tokens"]["lr"] == 1e-3 and all(groups[g]["lr"] == 1e-4 for g in groups if g != "tokens")
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["weight_decay"] == 0.01
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    final_layernorm = {id(p) for p in model.final_layernorm.parameters()}
    frozen = [p for p in model.backbone.parameters() if id(p) not in final_layernorm]
    assert not any(p.requires_grad or id(p) in optimized for p in frozen)

    # Cosine per epoch, eta_min = 1e-4: only the token rate moves (1e-3 -> 1e-4 over T_max = 4 epochs).
    scheduler = build_scheduler(optimizer, 4, args)
    token_rates = []
    for _ in range(4):
        token_rates.append(groups["tokens"]["lr"])
        assert all(groups[g]["lr"] == pytest.approx(1e-4) for g in groups if g != "tokens")
        optimizer.step()
        scheduler.step()
    expected = [1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert token_rates == pytest.approx(expected)

    # Each token is clipped to norm 1 on its own.
    model.tokens.anomaly_token.grad = torch.full_like(model.tokens.anomaly_token, 3.0)
    model.tokens.normal_token.grad = torch.full_like(model.tokens.normal_token, 1e-3)
    norms = clip_token_gradients(model, 1.0)
    assert norms[0] == pytest.approx(3.0 * math.sqrt(64)) and norms[1] == pytest.approx(1e-3 * 8)
    assert model.tokens.anomaly_token.grad.norm() == pytest.approx(1.0, rel=1e-5)
    assert model.tokens.normal_token.grad.norm() == pytest.approx(1e-3 * 8, rel=1e-5)  # untouched


def test_checkpoint_folder_helpers(tmp_path):
    for step in (2, 4, 6):
        tmp = checkpointing.temporary_checkpoint_dir(tmp_path, step)
        tmp.mkdir()
        (tmp / "optimizer.bin").write_bytes(b"x")
        checkpointing.finalize_checkpoint(tmp, {"global_step": step})
    (tmp_path / "checkpoint-8.tmp").mkdir()  # an interrupted save
    (tmp_path / "checkpoint-10").mkdir()  # a folder without trainer_state.json is not a checkpoint
    assert [s for s, _ in checkpointing.list_checkpoints(tmp_path)] == [2, 4, 6]
    assert checkpointing.resolve_checkpoint(tmp_path, "latest").name == "checkpoint-6"
    with pytest.raises(checkpointing.CheckpointError, match="not a complete checkpoint"):
        checkpointing.resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-10"))
    assert [p.name for p in checkpointing.remove_stale_folders(tmp_path)] == ["checkpoint-8.tmp"]
    assert [p.name for p in checkpointing.rotate_checkpoints(tmp_path, 2)] == ["checkpoint-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-4", "checkpoint-6"]
    # Saving a step again replaces the old folder whole.
    tmp = checkpointing.temporary_checkpoint_dir(tmp_path, 6)
    tmp.mkdir()
    checkpointing.finalize_checkpoint(tmp, {"global_step": 6, "again": True})
    assert checkpointing.read_trainer_state(tmp_path / "checkpoint-6")["again"] is True
    assert not (tmp_path / "checkpoint-6" / "optimizer.bin").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Full runs


def test_tiny_run_gives_a_folder_that_loads_in_model_and_pipeline(synthetic_dir, tmp_path, capsys):
    """Train, evaluate, save; `--push_to_hub` offline then fails with a clear message *after* the folder is complete."""
    from huggingface_hub import ModelCard
    from transformers import pipeline

    from visualad_hf import VisualADModel

    out = tmp_path / "run"
    argv = tiny_argv(synthetic_dir, out, "--num_train_epochs", "2", "--save_steps", "3", "--save_total_limit", "1",
                     "--report_to", "tensorboard", "--push_to_hub", "true", "--hub_model_id", "someone/visualad-tiny")  # fmt: skip
    assert trainer.main(argv) == 1
    stderr = capsys.readouterr().err
    assert "HF_HUB_OFFLINE=1" in stderr and f"hf upload someone/visualad-tiny {out}" in stderr

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and state["skipped_steps"] == 0  # 2 epochs x 4 steps
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-6"]  # save every 3, keep 1
    losses = [entry for entry in state["log_history"] if "train/loss" in entry]
    assert {"train/loss_cls", "train/loss_seg", "train/loss_ctr", "lr/tokens", "train/skipped_steps"} <= set(losses[0])
    assert list((out / "logs").rglob("events.out.tfevents.*")), "TensorBoard logs missing"

    model = VisualADModel.from_pretrained(out)
    trained = load_file(str(out / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, trained[name])
    # Checkpoints hold only the trainable weights, not the frozen backbone.
    heads = load_file(str(out / "checkpoint-6" / "model.safetensors"))
    assert set(heads) == {n for n, p in model.named_parameters() if p.requires_grad}

    detector = pipeline("anomaly-detection", model=str(out), device="cpu")
    image = next(synthetic_dir.glob("nut/test/*/000.png"))
    result = detector(str(image))
    assert math.isfinite(result["score"]) and result["anomaly_map"].shape == (32, 32)

    # Model card: metadata, the measured table as model-index, the paper's numbers labelled as the paper's.
    evaluation = json.loads((out / "eval_results" / "metrics.json").read_text())
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "other" and {"anomaly-detection", "custom_code"} <= set(card.data.tags)
    index = {r.metric_type: r.metric_value for r in card.data.eval_results}
    for metric, value in evaluation["mean"].items():
        if value is not None:
            assert index[metric] == round(100 * value, 1)
    assert {r.dataset_name for r in card.data.eval_results} == {"synthetic target"}
    saved_args = yaml.safe_load((out / "training_args.yaml").read_text())
    assert saved_args["seed"] == 111 and "hub_token" not in saved_args


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_kill_during_save_then_resume_latest_equals_uninterrupted(synthetic_dir, tmp_path):
    """SIGKILL a real training process while it writes checkpoint-4 (after step 4, dropout on, gradient accumulation
    2); resume with `latest` (checkpoint-2); the final weights must equal an uninterrupted run's bit for bit."""
    common = ("--max_steps", "6", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
              "--save_steps", "2", "--eval_strategy", "no")  # fmt: skip
    reference = run_tiny(synthetic_dir, tmp_path / "reference", *common)
    assert reference.global_step == 6

    out = tmp_path / "interrupted"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        import torch
        torch.set_num_threads(1)
        from visualad_hf import checkpointing, trainer

        finalize = checkpointing.finalize_checkpoint

        def killing_finalize(tmp_dir, state):
            if state["global_step"] == 4:  # the files of checkpoint-4 are written, the rename has not happened
                os.kill(os.getpid(), signal.SIGKILL)
            return finalize(tmp_dir, state)

        checkpointing.finalize_checkpoint = killing_finalize
        sys.exit(trainer.main({tiny_argv(synthetic_dir, out, *common)!r}))
        """
    )
    process = subprocess.run(
        [sys.executable, "-c", script], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300, check=False
    )
    assert process.returncode == -9, process.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4.tmp"]
    assert not (out / "model.safetensors").exists()

    resumed = run_tiny(synthetic_dir, out, *common, "--resume_from_checkpoint", "latest")
    assert resumed.global_step == 6
    assert not (out / "checkpoint-4.tmp").exists()
    expected, actual = _weights(tmp_path / "reference"), _weights(out)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "train/loss" in entry] == [1, 2, 3, 4, 5, 6]

    # A checkpoint cannot be resumed with other settings: the data position would not mean the same.
    with pytest.raises(checkpointing.CheckpointError, match="Cannot resume exactly"):
        run_tiny(synthetic_dir, out, *common[:-2], "--gradient_accumulation_steps", "1",
                 "--resume_from_checkpoint", str(out / "checkpoint-4"))  # fmt: skip
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run_tiny(synthetic_dir, out, *common)


def test_nan_batch_is_skipped_counted_and_logged(synthetic_dir, tmp_path, monkeypatch, caplog):
    from visualad_hf.data.collator import VisualADCollator

    collate = VisualADCollator.__call__
    calls = {"n": 0}

    def poisoned(self, rows):
        batch = collate(self, rows)
        calls["n"] += 1
        if calls["n"] == 2:  # the second training batch
            batch["pixel_values"][0, 0, 0, 0] = float("nan")
        return batch

    monkeypatch.setattr(VisualADCollator, "__call__", poisoned)
    snapshots = []

    def snapshot(state):
        snapshots.append({k: v.clone() for k, v in checkpointing.trainable_state_dict(model_ref[0]).items()})

    model_ref = []
    original_build = trainer.build_model

    def build_and_keep(model_args):
        model_ref.append(original_build(model_args))
        return model_ref[0]

    monkeypatch.setattr(trainer.builders, "build_model", build_and_keep)  # where the loop looks it up
    with caplog.at_level("WARNING", logger="visualad_hf.trainer"):
        result = run_tiny(synthetic_dir, tmp_path / "nan", "--max_steps", "3", "--save_steps", "0",
                          "--eval_strategy", "no", callbacks=[snapshot])  # fmt: skip
    assert result.skipped_steps == 1
    state = json.loads((tmp_path / "nan" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1 and state["skipped_step_numbers"] == [2]
    assert [e["train/skipped_steps"] for e in state["log_history"]] == [0, 1, 1]
    assert any("Step 2: the loss or a gradient is NaN/Inf" in r.message for r in caplog.records)
    for name in snapshots[0]:
        assert torch.equal(snapshots[0][name], snapshots[1][name])  # step 2 changed nothing
        assert torch.isfinite(snapshots[2][name]).all()
    assert any(not torch.equal(snapshots[1][n], snapshots[2][n]) for n in snapshots[1])  # step 3 trained again


@pytest.mark.slow
def test_two_cpu_processes_train_and_save(synthetic_dir, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "training" / "train.py"),
        *tiny_argv(synthetic_dir, out, "--max_steps", "3", "--save_steps", "2", "--mixed_precision", "bf16",
                   "--gradient_checkpointing", "true"),
    ]  # fmt: skip
    env = {**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "true"}
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert process.returncode == 0, process.stderr[-4000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["global_step"] == 3
    assert state["total_train_batch_size"] == 4 and state["num_update_steps_per_epoch"] == 2
    assert (out / "checkpoint-2" / "random_states_1.pkl").is_file()  # both processes wrote their RNG state
    assert (out / "eval_results" / "metrics.json").is_file()

    from visualad_hf import VisualADModel

    model = VisualADModel.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Output folders, checked resuming, damaged checkpoints, full disks (issue 11), the synthetic data hint


@pytest.fixture(scope="module")
def finished_run(synthetic_dir, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoint-2 (every test copies it before changing anything)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_tiny(synthetic_dir, out, *RESUMABLE)
    return out


RESUMABLE = ("--max_steps", "4", "--save_steps", "2", "--eval_strategy", "no")


def _copy_run(finished_run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(finished_run, tmp_path / "run", symlinks=True))


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_checkpoints_store_config_arguments_and_checksums(finished_run):
    checkpoint = finished_run / "checkpoint-2"
    assert json.loads((checkpoint / "config.json").read_text())["gaussian_sigma"] == 1.0
    assert yaml.safe_load((checkpoint / "training_args.yaml").read_text())["learning_rate"] == 1e-2
    sums = json.loads((checkpoint / "checksums.json").read_text())["files"]
    assert {"model.safetensors", "optimizer.bin", "config.json", "training_args.yaml"} <= set(sums)
    assert checkpointing.verify_checkpoint(checkpoint)["global_step"] == 2
    # The hidden bookkeeping of the final folder is never uploaded.
    from fnmatch import fnmatch

    from visualad_hf.hub import HUB_IGNORE_PATTERNS

    hidden = [p.name for p in finished_run.iterdir() if p.name.startswith(".")]
    assert hidden == [".visualad-contents.json"]
    assert any(fnmatch(hidden[0], pattern) for pattern in HUB_IGNORE_PATTERNS)


def test_resume_with_another_config_or_recipe_is_refused_naming_each_difference(finished_run, synthetic_dir, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    argv = tiny_argv(synthetic_dir, out, *RESUMABLE, "--resume_from_checkpoint", "latest",
                     "--learning_rate", "5e-3", "--config_overrides",
                     json.dumps({"gaussian_sigma": 2.0, "max_patches": 64, "topk_ratio": 0.05}))  # fmt: skip
    with pytest.raises(checkpointing.CheckpointError, match="Cannot resume exactly") as caught:
        train(*parse_args(argv))
    message = str(caught.value)
    assert "\n" not in message
    for difference in ("gaussian_sigma is 1.0 in the checkpoint, 2.0 in this run", "topk_ratio is 0.01",
                       "learning_rate is 0.01 in the checkpoint, 0.005 in this run"):  # fmt: skip
        assert difference in message
    assert "token_learning_rate" not in message  # unchanged settings are not listed


def test_config_mismatches_see_changed_feature_layers_of_the_same_length():
    saved = {"feature_layers": [1, 2], "image_size": 32, "vision_config": {"hidden_size": 32}, "_name_or_path": "a"}
    current = {"feature_layers": [3, 4], "image_size": 32, "vision_config": {"hidden_size": 32}, "_name_or_path": "b"}
    assert checkpointing.config_mismatches(saved, current) == [
        "feature_layers is [1, 2] in the checkpoint, [3, 4] in this run"
    ]
    assert checkpointing.recipe_mismatches({"seed": 1, "max_steps": 4, "num_train_epochs": 1},
                                           {"seed": 1, "max_steps": 4, "num_train_epochs": 9}) == []  # fmt: skip


def test_damaged_newest_checkpoint_falls_back_or_is_named(finished_run, synthetic_dir, tmp_path, caplog):
    out = _copy_run(finished_run, tmp_path)
    (out / "checkpoint-2").rename(out / "checkpoint-1")  # keep an older one to fall back to
    checkpoint_1 = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    import shutil

    shutil.copytree(out / "checkpoint-1", out / "checkpoint-2")
    damaged = out / "checkpoint-2" / "optimizer.bin"
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated
    with pytest.raises(checkpointing.CheckpointError, match=r"optimizer\.bin is damaged: 100 bytes"):
        checkpointing.choose_checkpoint(out, str(out / "checkpoint-2"))
    with caplog.at_level("WARNING", logger="visualad_hf.trainer"):
        chosen = checkpointing.choose_checkpoint(out, "latest")
    assert chosen == out / "checkpoint-1" and checkpoint_1["global_step"] == 2
    assert any("optimizer.bin is damaged" in r.message and "checkpoint-1 instead" in r.message for r in caplog.records)
    (out / "checkpoint-1" / "trainer_state.json").write_text("{not json")
    with pytest.raises(checkpointing.CheckpointError, match="No usable checkpoint"):
        checkpointing.choose_checkpoint(out, "latest")

    # Through the command line: one line naming the file, exit status 2.
    code = trainer.main(tiny_argv(synthetic_dir, out, *RESUMABLE, "--resume_from_checkpoint", str(out / "checkpoint-2")))
    assert code == 2


def test_resume_latest_skips_a_damaged_checkpoint_and_finishes(finished_run, synthetic_dir, tmp_path):
    out = _copy_run(finished_run, tmp_path)
    reference = _weights(out)
    import shutil

    shutil.copytree(out / "checkpoint-2", out / "checkpoint-3")
    state_file = out / "checkpoint-3" / "random_states_0.pkl"
    state_file.write_bytes(b"\0" * state_file.stat().st_size)  # same size, other bytes
    result = run_tiny(synthetic_dir, out, *RESUMABLE, "--resume_from_checkpoint", "latest")
    assert result.global_step == 4
    actual = _weights(out)
    assert all(torch.equal(reference[name], actual[name]) for name in reference)  # resumed exactly from checkpoint-2


def _error_lines(stderr: str) -> list[str]:
    """The message lines of stderr (progress bars of the libraries left out); a traceback would show here."""
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _enospc(path) -> OSError:
    import errno

    return OSError(errno.ENOSPC, "No space left on device", str(path))


def test_full_disk_during_a_checkpoint_ends_in_one_line_and_keeps_the_last_one(synthetic_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    save = torch.save

    def filling_save(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            Path(f).write_bytes(b"partial")
            raise _enospc(f)
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", filling_save)
    argv = tiny_argv(synthetic_dir, out, "--max_steps", "6", "--save_steps", "2", "--eval_strategy", "no")
    assert trainer.main(argv) == 1
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "disk is full" in err[0] and "checkpoint-2 is intact" in err[0], err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    checkpointing.verify_checkpoint(out / "checkpoint-2")

    monkeypatch.setattr(torch, "save", save)
    assert trainer.main([*argv, "--resume_from_checkpoint", "latest"]) == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6


def test_full_disk_during_the_final_save_changes_nothing(finished_run, synthetic_dir, tmp_path, monkeypatch, capsys):
    from visualad_hf import VisualADImageProcessor

    out = _copy_run(finished_run, tmp_path)
    before = _tree_bytes(out)

    def filling_save(self, directory, *args, **kwargs):
        (Path(directory) / "preprocessor_config.json").write_text("{")
        raise _enospc(Path(directory) / "preprocessor_config.json")

    monkeypatch.setattr(VisualADImageProcessor, "save_pretrained", filling_save)
    argv = tiny_argv(synthetic_dir, out, *RESUMABLE, "--overwrite_output_dir", "true", "--seed", "5")
    assert trainer.main(argv) == 1
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "disk is full" in err[0] and "nothing there was changed" in err[0], err
    after = _tree_bytes(out)
    model_files = [name for name in before if not name.startswith(("checkpoint-", "logs/"))]
    assert model_files and all(after[name] == before[name] for name in model_files)  # the old model, untouched
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_output_folder_that_is_not_ours_or_holds_a_model_is_refused(finished_run, synthetic_dir, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert trainer.main(tiny_argv(synthetic_dir, foreign, *RESUMABLE)) == 2
    err = capsys.readouterr().err
    assert "holds files the trainer did not write (notes.txt)" in err and "--overwrite_output_dir" in err

    model_only = _copy_run(finished_run, tmp_path)
    for path in model_only.glob("checkpoint-*"):
        checkpointing.delete_checkpoint(path)
    with pytest.raises(trainer.OutputDirError, match="already holds a trained model"):
        run_tiny(synthetic_dir, model_only, *RESUMABLE)
    with pytest.raises(trainer.OutputDirError, match="already holds a trained model"):  # no checkpoint to resume
        run_tiny(synthetic_dir, model_only, *RESUMABLE, "--resume_from_checkpoint", "latest")
    (model_only / "logs").mkdir(exist_ok=True)  # the run's own entries never make a folder foreign
    result = run_tiny(synthetic_dir, model_only, *RESUMABLE, "--overwrite_output_dir", "true", "--save_steps", "0")
    assert result.global_step == 4 and (model_only / "model.safetensors").is_file()


def _dying_replace(kill_at: int):
    """`os.replace` that ends the process at its `kill_at`-th call the way a kill does: no cleanup code runs."""
    calls, replace = {"n": 0}, os.replace

    def dying_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == kill_at:
            os._exit(9)
        replace(src, dst)

    return dying_replace


def test_interrupted_final_swap_is_undone_at_every_point(tmp_path):
    """Kill (os._exit in a forked child) at every rename of the final-model swap: afterwards, recovery leaves
    exactly the old model or exactly the new one beside the untouched checkpoints."""
    from visualad_hf import hub

    def write(folder: Path, tag: str):
        (folder / "model.safetensors").write_text(f"weights {tag}")
        (folder / "README.md").write_text(f"card {tag}")
        (folder / "eval_results").mkdir()
        (folder / "eval_results" / "metrics.json").write_text(tag)

    def snapshot(folder: Path) -> dict[str, bytes]:
        return {k: v for k, v in _tree_bytes(folder).items() if not k.startswith(".visualad-")}

    def fresh(root: Path) -> Path:
        root.mkdir()
        (root / "checkpoint-2").mkdir()
        (root / "checkpoint-2" / "optimizer.bin").write_text("state")
        with hub.staged_contents(root) as staging:
            write(staging, "old")
        return root

    old = snapshot(fresh(tmp_path / "reference-old"))
    reference_new = fresh(tmp_path / "reference-new")
    with hub.staged_contents(reference_new) as staging:
        write(staging, "new")
        (staging / "extra.json").write_text("new only")
    new = snapshot(reference_new)
    outcomes = set()
    for kill_at in range(1, 30):
        folder = fresh(tmp_path / f"kill-{kill_at}")
        pid = os.fork()
        if pid == 0:  # the child: swap in the new model, dying at the kill_at-th rename
            os.replace = _dying_replace(kill_at)
            with hub.staged_contents(folder) as staging:
                write(staging, "new")
                (staging / "extra.json").write_text("new only")
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        hub.recover_interrupted_contents_swap(folder)
        state = snapshot(folder)
        assert state in (old, new), (kill_at, sorted(state))
        outcomes.add("old" if state == old else "new")
        if os.WEXITSTATUS(status) == 0:
            break
    assert outcomes == {"old", "new"}


def test_checkpoint_left_aside_by_an_interrupted_replacement_is_restored(tmp_path):
    (tmp_path / "checkpoint-4.old").mkdir()  # the kill came between the two renames of a replacement
    (tmp_path / "checkpoint-4.old" / "trainer_state.json").write_text('{"global_step": 4}')
    (tmp_path / "checkpoint-6").mkdir()
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text('{"global_step": 6}')
    (tmp_path / "checkpoint-6.old").mkdir()  # the replacement finished: the aside copy is garbage
    assert [p.name for p in checkpointing.remove_stale_folders(tmp_path)] == ["checkpoint-6.old"]
    assert [s for s, _ in checkpointing.list_checkpoints(tmp_path)] == [4, 6]


def test_missing_synthetic_data_says_how_to_write_it(tmp_path, capsys):
    missing = tmp_path / "data" / "synthetic"
    argv = ["--config", str(CONFIGS / "synthetic_tiny.yaml"), "--train_data_dir", str(missing),
            "--eval_data_dir", str(missing), "--output_dir", str(tmp_path / "out"), "--report_to", "none"]  # fmt: skip
    assert trainer.main(argv) == 2
    err = capsys.readouterr().err
    assert f"visualad synthetic --output {missing}" in err and "Download" not in err


def test_anomalous_image_without_mask_is_left_out_of_the_segmentation_loss(tiny_config):
    from PIL import Image

    from visualad_hf import VisualADImageProcessor, VisualADModel
    from visualad_hf.data.collator import VisualADCollator

    torch.manual_seed(0)
    model = VisualADModel(tiny_config).eval()
    size = tiny_config.image_size
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(3)]
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[: size // 2] = 255
    rows = [{"image": images[0], "mask": Image.fromarray(mask), "label": 1},
            {"image": images[1], "mask": None, "label": 0},       # normal: the all-zero mask is known
            {"image": images[2], "mask": None, "label": 1}]       # anomalous, no mask: unknown  # fmt: skip
    batch = VisualADCollator(VisualADImageProcessor.from_model_config(tiny_config))(rows)
    assert batch["has_mask"].tolist() == [True, True, False]
    inputs = {k: batch[k] for k in ("pixel_values", "labels", "masks", "has_mask")}
    with torch.no_grad():
        flagged = model(**inputs)
        known_only = model(pixel_values=batch["pixel_values"][:2], labels=batch["labels"][:2], masks=batch["masks"][:2])
        unflagged = model(**{k: v for k, v in inputs.items() if k != "has_mask"})
        none_known = model(**{**inputs, "has_mask": torch.zeros(3, dtype=torch.bool)})
    assert torch.allclose(flagged.loss_seg, known_only.loss_seg, atol=1e-6)
    assert not torch.allclose(flagged.loss_seg, unflagged.loss_seg)  # the old behaviour counted it as all-normal
    assert float(none_known.loss_seg) == 0.0 and torch.isfinite(none_known.loss)


def test_collator_hook_is_told_each_epoch(synthetic_dir, tmp_path, monkeypatch):
    """`loop.build_collator` is where data options wrap the collator; one with `set_epoch` hears every epoch."""
    from visualad_hf.trainer import loop

    epochs = []

    class EpochAware:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, rows):
            return self.inner(rows)

        def set_epoch(self, epoch):
            epochs.append(epoch)

    build = loop.build_collator
    monkeypatch.setattr(loop, "build_collator", lambda *a: EpochAware(build(*a)))
    result = run_tiny(synthetic_dir, tmp_path / "epochs", "--max_steps", "5", "--save_steps", "0", "--eval_strategy", "no")
    assert result.global_step == 5 and epochs == [0, 1]


def test_old_checkpointing_import_path_is_the_new_module():
    """`visualad_hf.checkpointing` (deprecated for one release) is `visualad_hf.trainer.checkpoints` itself, so code
    that patches its functions (as the kill test's subprocess does) still reaches the trainer."""
    import importlib

    sys.modules.pop("visualad_hf.checkpointing", None)
    with pytest.warns(DeprecationWarning, match=r"import visualad_hf\.trainer\.checkpoints instead"):
        old = importlib.import_module("visualad_hf.checkpointing")
    assert old is checkpointing


def test_training_from_a_converted_folder_starts_from_its_final_layernorm(synthetic_dir, tmp_path, caplog):
    """`--model_name_or_path` loads every weight of the folder, the final LayerNorm included; the trained folder no
    longer claims to hold the converted LayerNorm."""
    from visualad_hf import VisualADConfig, VisualADModel

    converted = tmp_path / "converted"
    torch.manual_seed(0)
    config = VisualADConfig(vision_config=TINY_VISION, feature_layers=[1, 2], image_size=32, gaussian_sigma=1.0,
                            max_patches=64, final_layernorm_source="backbone")  # fmt: skip
    start = VisualADModel(config)
    with torch.no_grad():
        start.final_layernorm.weight.uniform_(0.5, 1.5)  # not what a fresh model would hold
    start.save_pretrained(converted)
    argv = tiny_argv(synthetic_dir, tmp_path / "out", "--max_steps", "1", "--save_steps", "0", "--eval_strategy", "no")
    index = argv.index("--vision_config")
    argv[index : index + 2] = ["--model_name_or_path", str(converted)]
    model_args = parse_args(argv)[0]
    built = trainer.build_model(model_args)
    assert torch.equal(built.final_layernorm.weight, start.final_layernorm.weight)
    with caplog.at_level("INFO", logger="visualad_hf.trainer"):
        train(*parse_args(argv))
    assert any("--final-layernorm backbone: training starts from the backbone's own" in r.message for r in caplog.records)
    trained = json.loads((tmp_path / "out" / "config.json").read_text())
    assert trained["final_layernorm_source"] is None
