"""`visualad demo`, shortened (small benchmark, 40 steps): it runs offline end to end, prints both tables and the gain,
writes overlays, evaluation files and a model folder, and training improves the held-out (target-family) metrics."""

from __future__ import annotations

import json

import torch

from visualad_hf.cli import main


def test_demo_end_to_end_offline_and_training_helps(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--small", "--steps", "40", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    for text in ("Before training", "After training (40 steps, 0 skipped)", "Gain (mean over target families",
                 "tiny random ViT", "Mean"):  # fmt: skip
        assert text in printed

    assert (out / "synthetic" / "benchmark.json").is_file()
    overlays = sorted((out / "overlays").glob("*.png"))
    assert len(overlays) == 16  # per target family: a normal image and one of each of the 3 defect types
    assert {p.name.split("_")[0] for p in overlays} == {"checker", "cloud", "ring", "capsule"}
    assert {p.name.split("_")[1] for p in overlays} == {"good", "scratch", "hole", "stain"}
    assert (out / "model" / "README.md").is_file()

    from visualad_hf import VisualADModel

    model = VisualADModel.from_pretrained(out / "model")
    assert model.config.image_size == 96 and all(torch.isfinite(p).all() for p in model.parameters())

    # Zero-shot: the target families were never trained on; 40 steps must already lift the pixel metrics clearly.
    before = json.loads((out / "eval_before_training" / "metrics.json").read_text())["mean"]
    after = json.loads((out / "model" / "eval_results" / "metrics.json").read_text())["mean"]
    assert after["pixel_auroc"] - before["pixel_auroc"] > 0.10, (before, after)
    assert after["pixel_aupro"] - before["pixel_aupro"] > 0.10, (before, after)
    assert f"pixel_auroc {100 * (after['pixel_auroc'] - before['pixel_auroc']):+.1f}" in printed
