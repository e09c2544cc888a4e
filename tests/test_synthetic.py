"""The synthetic zero-shot benchmark: deterministic, exact masks, MVTec layout, disjoint sides."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visualad_hf.cli import main as cli_main
from visualad_hf.data import SyntheticBenchmark, generate_synthetic_benchmark, load_anomaly_dataset, load_mask
from visualad_hf.data.synthetic import DEFECT_TYPES, FAMILIES, render_sample

REPO = Path(__file__).resolve().parents[1]

SMALL = {"image_size": 48, "num_train": 1, "num_test_normal": 2, "num_test_anomalous": 4}


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_files_other_seed_other_pixels(tmp_path):
    first = files(generate_synthetic_benchmark(tmp_path / "a", seed=3, **SMALL).root)
    second = files(generate_synthetic_benchmark(tmp_path / "b", seed=3, **SMALL).root)
    assert first == second
    other = files(generate_synthetic_benchmark(tmp_path / "c", seed=4, **SMALL).root)
    assert first.keys() == other.keys()
    images = [k for k in first if k.endswith(".png") and "ground_truth" not in k]
    assert all(first[k] != other[k] for k in images)


def test_an_image_does_not_depend_on_what_else_is_generated(tmp_path):
    small = generate_synthetic_benchmark(
        tmp_path / "small", auxiliary_categories=["disc"], target_categories=["cloud"], **SMALL
    )
    large = generate_synthetic_benchmark(
        tmp_path / "large",
        image_size=48,
        num_train=3,
        num_test_normal=3,
        num_test_anomalous=8,
        auxiliary_categories=["stripes", "disc"],
        target_categories=["nut", "cloud"],
    )
    for rel, content in files(small.root).items():
        if rel.endswith(".png"):
            assert (large.root / rel).read_bytes() == content, rel


@pytest.mark.parametrize("category", sorted(FAMILIES))
def test_masks_cover_exactly_the_drawn_defects(category):
    normal = render_sample(category, 0, image_size=64)
    assert np.array_equal(normal.image, normal.clean) and not normal.mask.any()
    for defect in DEFECT_TYPES:
        for index in range(3):
            sample = render_sample(category, index, defect_type=defect, image_size=64)
            changed = np.any(sample.image != sample.clean, axis=-1)
            assert np.array_equal(changed, sample.mask), (defect, index)  # outside equal, inside all differ
            assert sample.mask.sum() >= 0.008 * 64 * 64
            contrast = np.abs(sample.image.astype(int) - sample.clean.astype(int))[sample.mask].mean()
            assert contrast > 25, (defect, index, contrast)  # visible enough for a small model to learn


def test_written_files_match_the_rendered_samples(tmp_path):
    bench = generate_synthetic_benchmark(tmp_path / "bench", seed=7, **SMALL)
    sample = render_sample("nut", 0, defect_type="hole", seed=7, image_size=48)
    assert np.array_equal(np.asarray(Image.open(bench.root / "nut/test/hole/000.png")), sample.image)
    mask = np.asarray(Image.open(bench.root / "nut/ground_truth/hole/000_mask.png"))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    assert np.array_equal(mask > 0, sample.mask)


def test_layout_loads_with_the_mvtec_loader_and_sides_are_disjoint(tmp_path):
    bench = generate_synthetic_benchmark(tmp_path / "bench", **SMALL)
    assert set(bench.auxiliary_categories).isdisjoint(bench.target_categories)
    assert len(bench.auxiliary_categories) == len(bench.target_categories) == 4
    cache = tmp_path / "cache"
    target = bench.load("target", cache_dir=cache)
    assert sorted(set(target["category"])) == sorted(bench.target_categories)
    assert len(target) == 4 * 6 and sum(target["label"]) == 4 * 4
    assert set(target["defect_type"]) == {"good", *DEFECT_TYPES}
    for row in target:
        assert (row["mask"] is None) == (row["label"] == 0)
        if row["label"]:
            assert load_mask(row).any()
    auxiliary = load_anomaly_dataset("mvtec", bench.root, categories=list(bench.auxiliary_categories), cache_dir=cache)
    assert set(auxiliary["category"]) == set(bench.auxiliary_categories)
    assert len(bench.load("auxiliary", split="train", cache_dir=cache)) == 4
    via_meta = load_anomaly_dataset("meta_json", bench.root, cache_dir=cache)  # the written meta.json agrees
    everything = load_anomaly_dataset("mvtec", bench.root, cache_dir=cache)
    assert via_meta["image_path"] == everything["image_path"] and via_meta["label"] == everything["label"]
    assert SyntheticBenchmark.from_dir(bench.root) == bench


def test_regenerating_replaces_a_previous_benchmark_but_never_foreign_files(tmp_path):
    out = tmp_path / "bench"
    generate_synthetic_benchmark(out, image_size=48, num_train=1, num_test_normal=3, num_test_anomalous=8)
    generate_synthetic_benchmark(out, **SMALL)
    assert not (out / "disc/test/good/002.png").exists()  # no stale images from the larger run
    assert json.loads((out / "benchmark.json").read_text())["num_test_normal"] == 2
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_synthetic_benchmark(foreign, **SMALL)


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="disjoint"):
        generate_synthetic_benchmark(tmp_path / "x", auxiliary_categories=["disc"], target_categories=["disc"])
    with pytest.raises(ValueError, match="unknown synthetic category 'carpet'"):
        generate_synthetic_benchmark(tmp_path / "x", target_categories=["carpet"])
    with pytest.raises(ValueError, match="defect_types"):
        generate_synthetic_benchmark(tmp_path / "x", defect_types=["crack"])


def test_cli_writes_the_benchmark(tmp_path, capsys):
    out = tmp_path / "cli"
    args = [
        "synthetic",
        "--out",
        str(out),
        "--seed",
        "1",
        "--image-size",
        "40",
        "--num-train",
        "0",
        "--num-normal",
        "1",
        "--num-anomalous",
        "2",
        "--auxiliary",
        "stripes",
        "--target",
        "ring",
        "--defects",
        "hole,stain",
    ]
    assert cli_main(args) == 0
    printed = capsys.readouterr()
    assert "target (evaluate on): ring" in printed.out
    assert "--out is deprecated" in printed.err and "use --output" in printed.err  # the old spelling still works
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "ring/ground_truth/hole/000_mask.png",
        "ring/ground_truth/stain/000_mask.png",
        "ring/test/good/000.png",
        "ring/test/hole/000.png",
        "ring/test/stain/000.png",
        "stripes/ground_truth/hole/000_mask.png",
        "stripes/ground_truth/stain/000_mask.png",
        "stripes/test/good/000.png",
        "stripes/test/hole/000.png",
        "stripes/test/stain/000.png",
    ]
    assert cli_main(["synthetic", "--output", str(tmp_path / "cli"), "--target", "carpet"]) == 2
    assert "unknown synthetic category 'carpet'" in capsys.readouterr().err  # one line, no traceback


def test_one_split_everywhere(tmp_path):
    """`visualad synthetic`'s default target side is what the demo and the tiny config evaluate on."""
    import yaml

    from visualad_hf.data.synthetic import DEFAULT_AUXILIARY, DEFAULT_TARGET
    from visualad_hf.demo import TINY_CONFIG

    config = yaml.safe_load(TINY_CONFIG.read_text())
    assert tuple(config["train_categories"]) == DEFAULT_AUXILIARY
    assert tuple(config["eval_categories"]) == DEFAULT_TARGET
    assert (REPO / "training" / "configs" / "synthetic_tiny.yaml").resolve() == TINY_CONFIG.resolve()

    assert cli_main(["synthetic", "--output", str(tmp_path / "bench"), "--num-train", "0", "--num-normal", "1",
                 "--num-anomalous", "1"]) == 0  # fmt: skip
    bench = SyntheticBenchmark.from_dir(tmp_path / "bench")
    assert set(bench.load("target", cache_dir=tmp_path / "cache")["category"]) == set(config["eval_categories"])
    assert set(bench.load("auxiliary", cache_dir=tmp_path / "cache")["category"]) == set(config["train_categories"])
