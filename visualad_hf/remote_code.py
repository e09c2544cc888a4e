"""Self-contained model folders: the package's model-side code, flattened, beside the weights (`trust_remote_code`).

A folder written by `save_pretrained` (model, config, image processor or pipeline) carries `auto_map` (AutoConfig,
AutoModel, AutoImageProcessor), `custom_pipelines` ("anomaly-detection") and the model-side source files, so that
`AutoModel.from_pretrained(folder, trust_remote_code=True)` and `pipeline(model=folder, trust_remote_code=True)`
work where `visualad_hf` is not installed. With the package installed nothing changes: its registered classes serve
the folder, and `trust_remote_code` is not needed.

transformers copies and fetches code files one name at a time: `from .x import` must name a file `x.py` beside the
importing file (`dynamic_module_utils.get_relative_import_files` locally, one `x.py` download per name from the Hub).
It cannot follow packages, so the `backbones/` package is written flat: `backbones/__init__.py` becomes
`backbones.py` and `backbones/<name>.py` becomes `backbones_<name>.py`, its `from .<name> import` lines rewritten to
`from .backbones_<name> import`. Run from such a folder (code loaded with `trust_remote_code`), this module finds
the flat files and copies them as they are, so a remotely loaded model saves a folder that loads the same way.

This module is model-side itself (the configuration imports it): flat imports only.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from .errors import VisualADError

AUTO_MAP = {
    "AutoConfig": "configuration_visualad.VisualADConfig",
    "AutoModel": "modeling_visualad.VisualADModel",
    "AutoImageProcessor": "image_processing_visualad.VisualADImageProcessor",
}
PIPELINE_TASK = "anomaly-detection"
CUSTOM_PIPELINES = {
    PIPELINE_TASK: {
        "impl": "pipeline_anomaly_detection.AnomalyDetectionPipeline",
        "pt": ["AutoModel"],
        "type": "image",
    }
}

# `from .name import` / `from .name.sub import` / `from . import` / `from ..x import`, at the start of a line, as
# transformers' own scan sees them (it ignores indentation, so imports inside functions count too).
_RELATIVE_IMPORT = re.compile(r"^(?P<indent>[ \t]*)from\s+(?P<dots>\.+)(?P<target>[\w.]*)\s+import\b", re.MULTILINE)
_ABSOLUTE_PACKAGE_IMPORT = re.compile(r"^[ \t]*(?:from|import)\s+visualad_hf\b", re.MULTILINE)


class RemoteCodeError(VisualADError):
    """Model-side code that transformers could not copy into a Hub folder (a non-flat or absolute import)."""


def _where(source: str, position: int) -> int:
    return source.count("\n", 0, position) + 1


def entry_files() -> list[Path]:
    """The files of the modules transformers loads from a folder (named in `AUTO_MAP` and `CUSTOM_PIPELINES`).

    Imported here, not at the top (the configuration imports this module), and also so that transformers, which
    copies a module's `from .x import` files wherever that module goes, brings every entry module along with this
    one: a model loaded with `trust_remote_code` then saves a complete folder too.
    """
    from .configuration_visualad import VisualADConfig
    from .image_processing_visualad import VisualADImageProcessor
    from .modeling_visualad import VisualADModel
    from .pipeline_anomaly_detection import AnomalyDetectionPipeline

    classes = (VisualADConfig, VisualADModel, VisualADImageProcessor, AnomalyDetectionPipeline)
    return [Path(inspect.getfile(cls)).resolve() for cls in classes]


def flattened_sources(entries: list[Path] | None = None) -> dict[str, str]:
    """`{file name: source}` of the model-side code, laid out flat for a Hub folder.

    Follows the relative imports of `entries` (default: `entry_files()`; each file's folder is its package root)
    recursively: the installed package, or a flat folder loaded with `trust_remote_code`. Raises `RemoteCodeError` naming the file
    and line of any import transformers could not follow: `from ..x`, `from . import x`, `from .a.b`, an absolute
    `visualad_hf` import, or a relative import of something that is neither `x.py` nor a flat-importing package `x/`.
    """
    sources: dict[str, str] = {}
    pending = [(Path(entry), None) for entry in (entry_files() if entries is None else entries)]
    while pending:  # (file, the package it belongs to if any)
        path, package = pending.pop()
        flat_name = _flat_name(path, package)
        if flat_name in sources:
            continue
        source = path.read_text(encoding="utf-8")
        absolute = _ABSOLUTE_PACKAGE_IMPORT.search(source)
        if absolute:
            raise RemoteCodeError(
                f"{path}:{_where(source, absolute.start())}: model-side code imports visualad_hf absolutely; "
                "use a flat relative import (`from .module import name`) so the file works in a Hub folder."
            )
        rewritten, needed = _rewrite_imports(path, source, package)
        sources[flat_name] = rewritten
        pending.extend(needed)
    return dict(sorted(sources.items()))


def _flat_name(path: Path, package: str | None) -> str:
    if package is None:
        return path.name
    return f"{package}.py" if path.name == "__init__.py" else f"{package}_{path.name}"


def _rewrite_imports(path: Path, source: str, package: str | None) -> tuple[str, list[tuple[Path, str | None]]]:
    """The source with package-internal imports renamed to the flat files, and the files it needs."""
    root = path.parent
    needed: list[tuple[Path, str | None]] = []

    def replace(match: re.Match) -> str:
        target = match.group("target")
        if match.group("dots") != "." or not target or "." in target:
            raise RemoteCodeError(
                f"{path}:{_where(source, match.start())}: `{match.group(0).strip()}` cannot be copied into a Hub "
                "folder (transformers follows only `from .module import ...`); import from a sibling module instead."
            )
        if package is not None:  # inside a package: siblings only, renamed to their flat files
            sibling = path.parent / f"{target}.py"
            if not sibling.is_file():
                raise RemoteCodeError(f"{path}:{_where(source, match.start())}: no sibling module {sibling.name}.")
            needed.append((sibling, package))
            return f"{match.group('indent')}from .{package}_{target} import"
        if (root / f"{target}.py").is_file():
            needed.append((root / f"{target}.py", None))
        elif (root / target / "__init__.py").is_file():
            needed.append((root / target / "__init__.py", target))
        else:
            raise RemoteCodeError(
                f"{path}:{_where(source, match.start())}: `from .{target} import` names neither {target}.py nor a "
                f"package {target}/ beside it."
            )
        return match.group(0)

    return _RELATIVE_IMPORT.sub(replace, source), needed


def write_remote_code(folder: str | Path) -> list[Path]:
    """Write the flattened model-side code into `folder` (created if needed); returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, source in flattened_sources().items():
        target = folder / name
        target.write_text(source, encoding="utf-8")
        written.append(target)
    return written


def with_auto_map(serialized: dict, *, classes: tuple[str, ...] = tuple(AUTO_MAP), pipelines: bool = False) -> dict:
    """`serialized` (a config's or processor's dict) with our `auto_map` entries for `classes` (and
    `custom_pipelines`) added; entries of other classes are kept."""
    ours = {name: AUTO_MAP[name] for name in classes}
    serialized["auto_map"] = {**(serialized.get("auto_map") or {}), **ours}
    if pipelines:
        serialized["custom_pipelines"] = {**(serialized.get("custom_pipelines") or {}), **CUSTOM_PIPELINES}
    return serialized


__all__ = [
    "AUTO_MAP",
    "CUSTOM_PIPELINES",
    "RemoteCodeError",
    "entry_files",
    "flattened_sources",
    "with_auto_map",
    "write_remote_code",
]
