"""Self-contained model folders: flattened code, auto_map / custom_pipelines, and loading without the package.

The decisive tests run in a subprocess in which `import visualad_hf` fails, once on a local folder and once on the
layout the Hub download gives (a repository in the Hugging Face cache, each code file fetched by its name).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_model
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, pipeline

import visualad_hf
from visualad_hf import AnomalyDetectionPipeline, VisualADImageProcessor, VisualADModel
from visualad_hf.remote_code import (
    AUTO_MAP,
    CUSTOM_PIPELINES,
    RemoteCodeError,
    entry_files,
    flattened_sources,
)

PACKAGE_DIR = Path(visualad_hf.__file__).resolve().parent
_RELATIVE = r"^\s*from\s+\.(\S+)\s+import"


def _relative_imports(source: str) -> set[str]:
    import re

    return set(re.findall(_RELATIVE, source, flags=re.MULTILINE))


# --- the copier -----------------------------------------------------------------------------------------------------


def test_backbones_package_is_written_flat_and_every_import_names_a_written_file():
    sources = flattened_sources()
    adapters = sorted(p.name for p in (PACKAGE_DIR / "backbones").glob("*.py") if p.name != "__init__.py")
    assert "backbones.py" in sources
    assert {f"backbones_{name}" for name in adapters} <= set(sources)
    for name in ("configuration_visualad.py", "modeling_visualad.py", "image_processing_visualad.py",
                 "pipeline_anomaly_detection.py", "remote_code.py", "scoring.py", "image_io.py", "errors.py"):
        assert name in sources
    for name, source in sources.items():
        # transformers fetches `x.py` for each `from .x import` (locally and from the Hub): each must be written
        for target in _relative_imports(source):
            assert f"{target}.py" in sources, (name, target)
        assert "visualad_hf." not in "".join(line for line in source.splitlines() if line.lstrip().startswith(("from ", "import ")))
    # inside the package, siblings were renamed to their flat files; everything else kept its text
    assert "from .backbones_base import" in sources["backbones_clip.py"]
    assert "from .base import" not in sources["backbones_clip.py"]
    assert sources["scoring.py"] == (PACKAGE_DIR / "scoring.py").read_text(encoding="utf-8")


def test_flat_folder_flattens_to_itself(tmp_path):
    """Code loaded from a folder (flat already) saves the same files again: remote-loaded models save too."""
    sources = flattened_sources()
    for name, source in sources.items():
        (tmp_path / name).write_text(source, encoding="utf-8")
    entries = [tmp_path / path.name for path in entry_files()]
    assert flattened_sources(entries) == sources


@pytest.mark.parametrize(
    "line, message",
    [
        ("from ..outside import thing", "cannot be copied"),
        ("from .pkg.inner import thing", "cannot be copied"),
        ("from . import sibling", "cannot be copied"),
        ("from visualad_hf.scoring import topk_mean", "imports visualad_hf absolutely"),
        ("    from .missing import thing", "names neither missing.py nor a package"),
    ],
)
def test_non_flat_imports_are_refused_with_file_and_line(tmp_path, line, message):
    entry = tmp_path / "configuration_visualad.py"
    entry.write_text(f'"""doc"""\n\n{line}\n', encoding="utf-8")
    with pytest.raises(RemoteCodeError, match=message) as raised:
        flattened_sources([entry])
    assert f"{entry}:3" in str(raised.value)


def test_package_files_may_import_only_siblings(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from .nothere import x\n", encoding="utf-8")
    entry = tmp_path / "configuration_visualad.py"
    entry.write_text("from .pkg import x\n", encoding="utf-8")
    with pytest.raises(RemoteCodeError, match="no sibling module nothere.py"):
        flattened_sources([entry])


# --- what every writer puts in a folder --------------------------------------------------------------------------


def _assert_self_contained(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert config["custom_pipelines"] == CUSTOM_PIPELINES
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["auto_map"] == {"AutoImageProcessor": AUTO_MAP["AutoImageProcessor"]}
    for name, source in flattened_sources().items():
        assert (folder / name).read_text(encoding="utf-8") == source, name


def test_model_and_processor_save_write_a_self_contained_folder(tmp_path):
    _assert_self_contained(save_tiny_model(tmp_path))


def test_pipeline_save_writes_a_self_contained_folder(model_dir, tmp_path):
    detector = pipeline("anomaly-detection", model=str(model_dir))
    detector.save_pretrained(tmp_path / "saved")
    _assert_self_contained(tmp_path / "saved")


def test_installed_package_serves_the_folder_without_trust_remote_code(model_dir, monkeypatch):
    """Nothing changes with the package installed: its classes load the folder and nothing asks to run its code."""

    def no_prompt(*args, **kwargs):
        raise AssertionError("transformers asked whether to run the folder's code")

    monkeypatch.setattr("builtins.input", no_prompt)
    assert type(AutoConfig.from_pretrained(model_dir)) is visualad_hf.VisualADConfig
    assert type(AutoModel.from_pretrained(model_dir)) is VisualADModel
    assert type(AutoImageProcessor.from_pretrained(model_dir)) is VisualADImageProcessor
    detector = pipeline("anomaly-detection", model=str(model_dir))
    assert type(detector) is AnomalyDetectionPipeline
    assert "anomaly-detection" not in (getattr(detector.model.config, "custom_pipelines", None) or {})


# --- loading where visualad_hf cannot be imported ---------------------------------------------------------------

PROBE = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "visualad_hf" or name.startswith("visualad_hf."):
                raise ImportError("visualad_hf is blocked in this process")
            return None

    sys.meta_path.insert(0, Blocker())
    try:
        import visualad_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("visualad_hf was importable")

    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, pipeline

    source, image_path, out_path = sys.argv[1:4]
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=True)
    detector = pipeline(model=source, trust_remote_code=True)  # the task comes from the folder
    image = Image.open(image_path)
    with torch.no_grad():
        anomaly_map = model(**processor(image)).anomaly_map
    result = detector(image_path)
    np.savez(out_path, anomaly_map=anomaly_map.numpy(), pipeline_map=result["anomaly_map"],
             score=np.float64(result["score"]))
    json.dump({
        "model": type(model).__module__ + "." + type(model).__name__,
        "processor": type(processor).__module__,
        "pipeline": type(detector).__module__ + "." + type(detector).__name__,
        "task": detector.task,
        "modules": sorted(name for name in sys.modules if name.startswith("visualad_hf")),
    }, open(out_path + ".json", "w"))
    """
)


def _probe(source: str, tmp_path: Path, extra_env: dict[str, str]) -> tuple[dict, dict]:
    image_path = tmp_path / "image.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(image_path)
    out = tmp_path / "probe.npz"
    # A clean sys.path: not the worktree (PYTHONPATH) nor the current directory, so only the folder's code can run.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", **extra_env)
    completed = subprocess.run(
        [sys.executable, "-c", PROBE, source, str(image_path), str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return dict(np.load(out)), json.loads(Path(str(out) + ".json").read_text())


def _installed_numbers(folder: Path, image_path: Path) -> dict:
    model = VisualADModel.from_pretrained(folder).eval()
    processor = VisualADImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        anomaly_map = model(**processor(Image.open(image_path))).anomaly_map.numpy()
    result = pipeline("anomaly-detection", model=str(folder))(str(image_path))
    return {"anomaly_map": anomaly_map, "pipeline_map": result["anomaly_map"], "score": result["score"]}


def _assert_same_numbers(remote: dict, installed: dict) -> None:
    np.testing.assert_array_equal(remote["anomaly_map"], installed["anomaly_map"])
    np.testing.assert_array_equal(remote["pipeline_map"], installed["pipeline_map"])
    assert float(remote["score"]) == installed["score"]


def _assert_remote_classes(info: dict) -> None:
    assert info["modules"] == []
    assert info["model"].startswith("transformers_modules.") and info["model"].endswith(".VisualADModel")
    assert info["processor"].startswith("transformers_modules.")
    assert info["pipeline"].endswith("pipeline_anomaly_detection.AnomalyDetectionPipeline")
    assert info["task"] == "anomaly-detection"


def test_local_folder_loads_with_trust_remote_code_without_the_package(tmp_path):
    folder = save_tiny_model(tmp_path / "visualad-tiny")
    remote, info = _probe(str(folder), tmp_path, {})
    _assert_remote_classes(info)
    _assert_same_numbers(remote, _installed_numbers(folder, tmp_path / "image.png"))


def test_hub_repository_loads_with_trust_remote_code_without_the_package(tmp_path):
    """The Hub's layout: a cached repository snapshot, from which transformers fetches each code file by name."""
    folder = save_tiny_model(tmp_path / "visualad-tiny")
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--visualad-test--visualad-tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    remote, info = _probe("visualad-test/visualad-tiny", tmp_path, {"HF_HUB_CACHE": str(cache)})
    _assert_remote_classes(info)
    assert f".{commit}.modeling_visualad." in info["model"]  # the Hub branch: code fetched per file at that commit
    _assert_same_numbers(remote, _installed_numbers(folder, tmp_path / "image.png"))
