"""transformers' own common test mixins, taken from the pinned transformers source distribution at test time.

The wheel has no tests, so `pip download --no-deps --no-binary :all: transformers==<installed version>` fetches the
sdist into a cache once (`VISUALAD_TRANSFORMERS_SDIST_CACHE`, default `~/.cache/visualad-hf/transformers-sdist`) and
its `tests/*.py` are imported as the package `transformers_common_tests`. Nothing of transformers' test code is
kept in this repository.

The sdist ships only the top-level `tests/*.py`. Four names those files import live elsewhere in transformers'
repository and are provided here, each for the reason given:

- `tests/exporters/test_export.py::ExportTesterMixin`, the base class of `ModelTesterMixin`: its tests drive
  transformers' own exporter backends (ONNX, OpenVINO, ExecuTorch, TensorRT); an empty base class stands in, and
  VisualAD's export path has its own tests (`tests/test_modeling.py`, dynamic-shape `torch.export` + save/load).
- `tests/generation/test_utils.py::GenerationTesterMixin`: only used in an `issubclass` check, which must be False
  for a model that cannot generate; a class nobody inherits from is exactly that.
- `tests/utils/test_configuration_utils.py::config_common_kwargs`: read only by `check_config_arguments_init`, which
  returns before reading it for composite configs (VisualAD's has a `vision_config`); it fails loudly if ever read.
- `utils/fetch_hub_objects_for_ci.py::url_to_local_path`: downloads COCO images for the backend-equivalence tests,
  which need two backends (VisualAD has the PIL one); tests run offline, so it refuses.

Run this file (`python tests/transformers_sdist.py`) to fill the cache ahead of the tests, as `.ci/run` does.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from collections.abc import Mapping
from pathlib import Path

import transformers
from filelock import FileLock

PACKAGE = "transformers_common_tests"
COMMON_MODULES = ("test_modeling_common", "test_configuration_common", "test_image_processing_common")
DOWNLOAD_TIMEOUT_S = 600


def cache_root() -> Path:
    default = Path.home() / ".cache" / "visualad-hf" / "transformers-sdist"
    return Path(os.environ.get("VISUALAD_TRANSFORMERS_SDIST_CACHE", default))


def _complete(tests_dir: Path) -> bool:
    return all((tests_dir / f"{name}.py").is_file() for name in (*COMMON_MODULES, "__init__"))


def common_tests_dir(version: str = transformers.__version__) -> Path:
    """The `tests/` folder of transformers' sdist for `version`, downloaded and unpacked on first use."""
    root = cache_root() / version
    tests_dir = root / "tests"
    if _complete(tests_dir):
        return tests_dir
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):  # several pytest workers may get here at once
        if _complete(tests_dir):
            return tests_dir
        with tempfile.TemporaryDirectory(dir=root) as download:
            command = [
                sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                f"transformers=={version}", "-d", download,
            ]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False)
            archives = sorted(Path(download).glob(f"transformers-{version}.tar.gz"))
            if result.returncode != 0 or not archives:
                raise RuntimeError(
                    f"Could not download the transformers {version} source distribution for its common tests "
                    f"({' '.join(command)} exited {result.returncode}: {result.stderr.strip()[-400:]}); run it where "
                    f"PyPI is reachable, or unpack the sdist's tests/ folder into {tests_dir}."
                )
            staging = Path(tempfile.mkdtemp(dir=root))
            prefix = f"transformers-{version}/tests/"
            with tarfile.open(archives[0]) as archive:
                members = [m for m in archive.getmembers() if m.name.startswith(prefix) and m.isfile()]
                for member in members:
                    member.name = member.name[len(prefix) :]
                archive.extractall(staging, members=members, filter="data")
            # `direct_transformers_import(tests/)` executes `tests/__init__.py` (empty in transformers' repository)
            (staging / "__init__.py").touch()
            if tests_dir.exists():
                raise RuntimeError(f"{tests_dir} exists but lacks the common test files; remove it and run again.")
            staging.rename(tests_dir)
    return tests_dir


class _NotShipped(Mapping):
    """`config_common_kwargs` stand-in: the sdist does not ship it, and no test that reaches it may run silently."""

    def _fail(self, *args):
        raise RuntimeError(
            "config_common_kwargs (tests/utils/test_configuration_utils.py) is not in the transformers sdist; "
            "this test needs transformers' repository checkout."
        )

    __getitem__ = __iter__ = __len__ = _fail


def _url_to_local_path(url: str, *args, **kwargs) -> str:
    raise RuntimeError(f"Tests run offline: cannot fetch {url} (utils/fetch_hub_objects_for_ci.py is not in the sdist).")


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def load_common_tests() -> types.SimpleNamespace:
    """Import transformers' common test modules; returns them as attributes (`test_modeling_common`, ...)."""
    if PACKAGE not in sys.modules:
        tests_dir = common_tests_dir()
        spec = importlib.util.spec_from_loader(PACKAGE, loader=None, is_package=True)
        package = importlib.util.module_from_spec(spec)
        package.__path__ = [str(tests_dir)]
        sys.modules[PACKAGE] = package
        for subpackage in ("exporters", "generation", "utils"):
            _module(f"{PACKAGE}.{subpackage}").__path__ = []
        _module(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=type("ExportTesterMixin", (), {}))
        _module(f"{PACKAGE}.generation.test_utils", GenerationTesterMixin=type("GenerationTesterMixin", (), {}))
        _module(f"{PACKAGE}.utils.test_configuration_utils", config_common_kwargs=_NotShipped())
        _module("fetch_hub_objects_for_ci", url_to_local_path=_url_to_local_path)
    return types.SimpleNamespace(
        **{name: importlib.import_module(f"{PACKAGE}.{name}") for name in COMMON_MODULES}
    )


if __name__ == "__main__":
    print(common_tests_dir())
