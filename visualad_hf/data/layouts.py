"""Scanners: turn one benchmark's folder into a list of `Sample`s.

A scanner reads only file names (and, for KSDD2's official download, mask contents, because that layout decides
labels by them). It fixes the pitfalls of the AnomalyCLIP/VisualAD JSON generators instead of copying them
(`DATASETS.md` §0): masks are paired by name and a missing, ambiguous or orphan mask is an error; every path is
relative to the dataset root; class and label folders are whitelisted, so stray folders (`pred/`, `__MACOSX/`,
a leftover `meta.json`) are never read as classes; a path in a `meta.json` or split csv that leaves the root is
refused.

Scanners raise `DatasetLayoutError` with the problem only; `registry.scan_dataset` adds which layout was expected
and what the folder holds.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from ..errors import VisualADError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
NORMAL, ANOMALOUS = 0, 1
GOOD = "good"  # `defect_type` of every normal sample, whatever the dataset calls its normal folder
ANOMALY = "anomaly"  # `defect_type` of an anomalous sample whose layout names no defect type
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "eval": "test"}


class DatasetLayoutError(VisualADError, ValueError):
    """A folder does not hold the layout that the named dataset loader expects, or its masks do not pair up."""


@dataclass(frozen=True)
class Sample:
    """One image of a benchmark. Paths are POSIX paths relative to the dataset root."""

    category: str
    image: str
    label: int  # NORMAL or ANOMALOUS
    defect_type: str
    mask: str | None = None


# --------------------------------------------------------------------------------------------- file helpers


def is_hidden(name: str) -> bool:
    """Dot files (`.DS_Store`, macOS `._x.png` forks) and archive debris (`__MACOSX`) are never data."""
    return name.startswith(".") or name == "__MACOSX"


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(path.name)


_SKIPPED: ContextVar[dict[Path, str] | None] = ContextVar("skipped_entries", default=None)


@contextmanager
def collect_skipped() -> Iterator[dict[Path, str]]:
    """Collect, while a scan runs, the entries it passed over because they cannot be read as a file or a folder
    (dangling or looping symbolic links, FIFOs, sockets, devices): path -> why. `scan_dataset` reports them."""
    token = _SKIPPED.set({})
    try:
        yield _SKIPPED.get()
    finally:
        _SKIPPED.reset(token)


def unreadable_kind(path: Path) -> str | None:
    """Why `path` is neither a regular file nor a folder (after following links), or None if it is one of them."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symbolic link loop"
        if path.is_symlink():
            return "dangling symbolic link"
        return f"cannot be read ({error.strerror or error})"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "device or other special file"


def _entries(folder: Path) -> list[Path]:
    """The visible entries of `folder`; those that are neither files nor folders are noted for the scan's report."""
    entries = []
    for path in folder.iterdir():
        if is_hidden(path.name):
            continue
        kind = unreadable_kind(path)
        if kind is None:
            entries.append(path)
        elif (skipped := _SKIPPED.get()) is not None:
            skipped[path] = kind
    return entries


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, any extension case (`.PNG`, `.JPG`), sorted by name."""
    return sorted(p for p in _entries(folder) if p.is_file() and is_image_file(p))


def list_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in _entries(folder) if p.is_dir())


def first_dir(parent: Path, names: Iterable[str]) -> Path | None:
    """The first of `parent/<name>` that is a folder (names are matched exactly; list the spellings you accept)."""
    return next((parent / name for name in names if (parent / name).is_dir()), None)


def relative(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def describe_folder(folder: Path, limit: int = 12) -> str:
    """A one-line listing of a folder for error messages: `a/, b/, license.txt (+3 more)`."""
    if not folder.is_dir():
        return "(not a folder)"
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    names = [p.name + ("/" if p.is_dir() else "") for p in entries[:limit]]
    more = f" (+{len(entries) - limit} more)" if len(entries) > limit else ""
    return (", ".join(names) + more) if names else "(empty)"


def resolve_inside(root: Path, raw: str, *, what: str) -> Path:
    """Resolve a path read from a dataset file (meta.json, split csv) against `root`, refusing any that escape it.

    Absolute paths are accepted when they lie inside the root, which covers generators that prefix every path with
    the (absolute) root. Relative paths that were prefixed with a relative root (`data/br35//yes/y0.jpg` read from
    `data/br35`) are repaired by dropping the leading components that repeat the root's last ones. The check is
    lexical (after normalising `..` and `//`), so symlinked data folders inside the root keep working.
    """
    text = raw.replace("\\", "/")
    root = Path(os.path.abspath(root))
    bases = [root] + ([Path(os.path.realpath(root))] if os.path.realpath(root) != str(root) else [])
    parts = [p for p in PurePosixPath(text).parts if p not in ("", ".")]
    if PurePosixPath(text).is_absolute():
        candidate = Path(os.path.normpath(text))
        base = next((b for b in bases if _within(candidate, b)), None)
        if base is None:
            raise DatasetLayoutError(f"{what} {raw!r} points outside the dataset root {root}; refusing to read it")
        candidate = root / candidate.relative_to(base)
    else:
        candidate = Path(os.path.normpath(root / text))
        if not candidate.exists():  # root-prefixed relative path: drop the components that repeat the root's tail
            for k in range(1, len(parts)):
                repaired = Path(os.path.normpath(root.joinpath(*parts[k:])))
                if tuple(parts[:k]) == root.parts[-k:] and repaired.exists():
                    candidate = repaired
                    break
    if not _within(candidate, root):
        raise DatasetLayoutError(f"{what} {raw!r} points outside the dataset root {root}; refusing to read it")
    return candidate


def _within(path: Path, base: Path) -> bool:
    try:
        return os.path.commonpath([path, base]) == str(base)
    except ValueError:  # different drives on Windows
        return False


def pair_masks(
    images: Sequence[Path], mask_dir: Path, suffixes: Sequence[str], *, candidates: Sequence[Path] | None = None
) -> dict[Path, Path]:
    """Pair each image with the one mask in `mask_dir` named `<image stem><suffix>.<any image extension>`.

    The official generators sort images and masks separately and zip them, which silently mis-pairs as soon as one
    file is missing or names sort differently. Here a missing mask, two candidate masks, one mask claimed by two
    images, and a mask that matches no image (an orphan) are all errors that name the files.
    """
    if not mask_dir.is_dir():
        raise DatasetLayoutError(f"mask folder {mask_dir} is missing ({len(images)} anomalous images need masks)")
    by_stem: dict[str, list[Path]] = {}
    for mask in list_images(mask_dir) if candidates is None else candidates:
        by_stem.setdefault(mask.stem, []).append(mask)
    expected = " or ".join(f"'<stem>{s}.*'" for s in suffixes)
    pairs: dict[Path, Path] = {}
    owner: dict[Path, Path] = {}
    for image in images:
        found = [m for s in suffixes for m in by_stem.get(image.stem + s, [])]
        if not found:
            raise DatasetLayoutError(f"no mask for {image} in {mask_dir} (looked for {expected}, stem {image.stem!r})")
        if len(found) > 1:
            raise DatasetLayoutError(f"several masks match {image}: {', '.join(m.name for m in found)}")
        if found[0] in owner:
            raise DatasetLayoutError(f"mask {found[0]} matches two images: {owner[found[0]].name} and {image.name}")
        owner[found[0]] = image
        pairs[image] = found[0]
    orphans = [m for masks in by_stem.values() for m in masks if m not in owner]
    if orphans:
        names = ", ".join(sorted(m.name for m in orphans)[:5])
        raise DatasetLayoutError(
            f"{len(orphans)} mask(s) in {mask_dir} match no image (expected image stem + {expected}): {names}"
        )
    return pairs


def mask_is_empty(path: Path) -> bool:
    """True when a mask file has no nonzero pixel (KSDD2 ships an all-zero `_GT.png` for each normal image)."""
    try:
        with Image.open(path) as mask:
            return mask.getbbox() is None
    except OSError as error:
        raise DatasetLayoutError(f"cannot read mask {path}: {error}") from error


def check_mask_name(image: Path, mask: Path) -> None:
    """A mask must carry its image's stem, optionally followed by `_…`, `-…` or `.…` (`000` -> `000_mask`)."""
    stem, mask_stem = image.stem, mask.stem
    if mask_stem != stem and not any(mask_stem.startswith(stem + sep) for sep in "_-."):
        raise DatasetLayoutError(
            f"mask {mask.name!r} does not belong to image {image.name!r} (a mask's name must start with its "
            "image's stem); the file listing pairs them by position, which is what the official generators do "
            "and gets wrong when a file is missing"
        )


# ------------------------------------------------------------------------------------------ generic layouts


def has_mvtec_layout(base: Path) -> bool:
    """Some category folder holds `test/` or `train/` (MVTec AD, MPDD, BTAD, DTD-Synthetic, AdaCLIP copies...)."""
    return base.is_dir() and any((d / "test").is_dir() or (d / "train").is_dir() for d in list_dirs(base))


def scan_mvtec_layout(
    root: Path,
    split: str,
    *,
    base: Path | None = None,
    normal_dirs: Sequence[str] = (GOOD,),
    mask_suffixes: Sequence[str] = ("_mask",),
    masks: bool = True,
    is_category: Callable[[str], bool] | None = None,
) -> list[Sample]:
    """`<base>/<category>/<split>/<good|defect>/*` with masks in `<base>/<category>/ground_truth/<defect>/`.

    A category is a folder that holds `<split>/` (and passes `is_category`); inside it, the folders named in
    `normal_dirs` are normal and every other folder is a defect type. With `masks`, each defect folder must have
    its `ground_truth/` twin and every image its mask.
    """
    base = root if base is None else base
    categories = [d for d in list_dirs(base) if (d / split).is_dir() and (is_category is None or is_category(d.name))]
    if not categories:
        raise DatasetLayoutError(f"no category folder in {base} holds a '{split}/' folder")
    samples: list[Sample] = []
    for category in categories:
        for kind in list_dirs(category / split):
            images = list_images(kind)
            if not images:
                continue
            if kind.name in normal_dirs:
                samples += [Sample(category.name, relative(root, p), NORMAL, GOOD) for p in images]
                continue
            pairs = pair_masks(images, category / "ground_truth" / kind.name, mask_suffixes) if masks else {}
            samples += [
                Sample(
                    category.name, relative(root, p), ANOMALOUS, kind.name, relative(root, pairs[p]) if masks else None
                )
                for p in images
            ]
    return samples


def scan_paired_folders(
    root: Path, image_dir: Path, mask_dir: Path, *, category: str, mask_suffixes: Sequence[str] = ("",)
) -> list[Sample]:
    """An anomaly-only set: every image in `image_dir` is anomalous and has its mask in `mask_dir`."""
    images = list_images(image_dir)
    pairs = pair_masks(images, mask_dir, mask_suffixes)
    return [Sample(category, relative(root, p), ANOMALOUS, ANOMALY, relative(root, pairs[p])) for p in images]


def scan_label_folders(
    root: Path, base: Path, *, category: str, normal: str, anomalous: Sequence[str], image_subdir: str | None = None
) -> list[Sample]:
    """Class-by-folder sets without masks: only the whitelisted folders `normal` and `anomalous` are read."""
    samples: list[Sample] = []
    for name in (normal, *anomalous):
        folder = base / name
        if not folder.is_dir():
            continue
        if image_subdir and (folder / image_subdir).is_dir():
            folder = folder / image_subdir
        label, defect = (NORMAL, GOOD) if name == normal else (ANOMALOUS, name)
        samples += [Sample(category, relative(root, p), label, defect) for p in list_images(folder)]
    return samples


# ----------------------------------------------------------------------------------------------- industrial


def scan_visa_csv(root: Path, split: str) -> list[Sample]:
    """Raw VisA: `split_csv/1cls.csv` (columns object,split,label,image,mask) decides split and label.

    Columns are read by name, not position; the csv's mask must carry the image's stem.
    """
    csv_path = root / "split_csv" / "1cls.csv"
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"object", "split", "label", "image", "mask"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetLayoutError(f"{csv_path} lacks column(s) {sorted(missing)}; found {reader.fieldnames}")
        rows = [row for row in reader if row["split"].strip() == split]
    if not rows:
        raise DatasetLayoutError(f"{csv_path} has no row with split '{split}'")
    samples = []
    for row in rows:
        label_name = row["label"].strip()
        if label_name not in ("normal", "anomaly"):
            raise DatasetLayoutError(f"{csv_path}: label {label_name!r} is neither 'normal' nor 'anomaly' ({row})")
        image = _existing(resolve_inside(root, row["image"].strip(), what="image path"), csv_path)
        if label_name == "normal":
            samples.append(Sample(row["object"].strip(), relative(root, image), NORMAL, GOOD))
            continue
        if not row["mask"].strip():
            raise DatasetLayoutError(f"{csv_path}: anomalous image {row['image']} has no mask")
        mask = _existing(resolve_inside(root, row["mask"].strip(), what="mask path"), csv_path)
        if mask.stem != image.stem:
            raise DatasetLayoutError(f"{csv_path}: mask {row['mask']} does not carry the stem of image {row['image']}")
        samples.append(Sample(row["object"].strip(), relative(root, image), ANOMALOUS, ANOMALY, relative(root, mask)))
    return samples


def _existing(path: Path, listed_in: Path) -> Path:
    if not path.is_file():
        raise DatasetLayoutError(f"{path} is listed in {listed_in} but does not exist")
    return path


def visa_prepared_base(root: Path) -> Path | None:
    """The folder holding the categories of a prepared VisA copy: the root, its `1cls/` or its `visa_pytorch/`."""
    return next((b for b in (root, root / "1cls", root / "visa_pytorch") if has_mvtec_layout(b)), None)


def ksdd2_rebuilt_base(root: Path) -> Path | None:
    """The folder holding `Metal/` in a Bayes-PFL ("rebuilt") KSDD2 copy: the root or its `KSDD2/`."""
    return next((b for b in (root, root / "KSDD2") if (b / "Metal" / "test").is_dir()), None)


def scan_ksdd2_rebuilt(root: Path, split: str, *, protocol: str = "rebuilt", seed: int = 0) -> list[Sample]:
    """Bayes-PFL's copy as is: `[KSDD2/]Metal/test/{good,anomaly}/*.bmp`, masks `ground_truth/anomaly/<stem>.png`."""
    if protocol != "rebuilt":
        raise DatasetLayoutError(
            f"protocol={protocol!r} needs the official KolektorSDD2 download; this is a rebuilt copy"
        )
    return scan_mvtec_layout(root, split, base=ksdd2_rebuilt_base(root), mask_suffixes=("",))


def scan_ksdd2_official(root: Path, split: str, *, protocol: str = "rebuilt", seed: int = 0) -> list[Sample]:
    """Official KolektorSDD2: `{train,test}/<id>.png` + `<id>_GT.png`; an all-zero GT means a normal image.

    `protocol="rebuilt"` (the paper's 356/356 test set, as Bayes-PFL built it) takes every positive of train and
    test plus as many negatives drawn without replacement by `numpy.random.default_rng(seed)` from all negatives
    sorted by path. It is reproducible, but not the paper's exact draw (only Bayes-PFL's distributed copy is).
    `protocol="official"` keeps the official split folders (test: 894 normal / 110 anomalous).
    """
    if protocol not in ("rebuilt", "official"):
        raise ValueError(f"ksdd2 protocol must be 'rebuilt' or 'official', got {protocol!r}")
    if protocol == "rebuilt" and split != "test":
        raise ValueError("the rebuilt KSDD2 protocol only defines a test split; use protocol='official' for train")
    folders = ["train", "test"] if protocol == "rebuilt" else [split]
    positives: list[Sample] = []
    negatives: list[Sample] = []
    for name in folders:
        folder = root / name
        if not folder.is_dir():
            raise DatasetLayoutError(f"folder {folder} is missing")
        files = list_images(folder)
        masks = [p for p in files if p.stem.endswith("_GT")]
        images = [p for p in files if not p.stem.endswith("_GT")]
        for image, mask in pair_masks(images, folder, ("_GT",), candidates=masks).items():
            if mask_is_empty(mask):
                negatives.append(Sample("Metal", relative(root, image), NORMAL, GOOD))
            else:
                positives.append(Sample("Metal", relative(root, image), ANOMALOUS, ANOMALY, relative(root, mask)))
    if protocol == "rebuilt":
        negatives.sort(key=lambda s: s.image)
        count = min(len(positives), len(negatives))
        chosen = np.sort(np.random.default_rng(seed).choice(len(negatives), size=count, replace=False))
        negatives = [negatives[i] for i in chosen]
    return positives + negatives


DAGM_CLASS = re.compile(r"Class\d+")


def dagm_is_adaclip_copy(root: Path) -> bool:
    return any((d / "test" / GOOD).is_dir() for d in list_dirs(root) if DAGM_CLASS.fullmatch(d.name))


def scan_dagm(root: Path, split: str) -> list[Sample]:
    """Kaggle DAGM 2007: `Class<N>/{Train,Test}/*.PNG`; an image is defective iff `Label/<stem>_label.PNG` exists.

    Only `Class<N>` folders are read (not `Class1_def` or other debris); `Labels.txt` is ignored.
    """
    folder_name = {"train": "Train", "test": "Test"}[split]
    samples: list[Sample] = []
    for category in (d for d in list_dirs(root) if DAGM_CLASS.fullmatch(d.name)):
        folder = category / folder_name
        if not folder.is_dir():
            raise DatasetLayoutError(f"{category.name} has no '{folder_name}/' folder")
        images = {p.stem: p for p in list_images(folder)}
        label_dir = folder / "Label"
        labels = list_images(label_dir) if label_dir.is_dir() else []
        masks: dict[str, Path] = {}
        for label in labels:
            stem = label.stem.removesuffix("_label")
            if stem == label.stem or stem not in images:
                raise DatasetLayoutError(f"label {label} matches no image in {folder} (expected '<stem>_label.PNG')")
            masks[stem] = label
        for stem, image in sorted(images.items()):
            if stem in masks:
                samples.append(
                    Sample(category.name, relative(root, image), ANOMALOUS, ANOMALY, relative(root, masks[stem]))
                )
            else:
                samples.append(Sample(category.name, relative(root, image), NORMAL, GOOD))
    return samples


def scan_sdd(root: Path, split: str) -> list[Sample]:
    """Converted KolektorSDD: `electrical commutators/{train,test}/...` (the underscore spelling works too)."""
    return scan_mvtec_layout(root, split, mask_suffixes=("_mask", ""))


# ------------------------------------------------------------------------------------------------- medical

BMAD_SPLIT_FOLDERS = {"test": ("test",), "validation": ("valid", "val"), "train": ("train",)}


def bmad_base(root: Path, inner: Sequence[str]) -> Path | None:
    """The folder holding the split folders of a BMAD/MVFA copy: the root or its one known inner folder."""
    for base in (root, *(root / name for name in inner)):
        if any((base / s / n).is_dir() for s in ("test", "valid", "val", "train") for n in (GOOD, "Ungood")):
            return base
    return None


def scan_bmad(
    root: Path,
    split: str,
    *,
    category: str,
    inner: Sequence[str],
    mask_dirs: Sequence[str] = (),
    defect_type: Callable[[Path], str] | None = None,
) -> list[Sample]:
    """BMAD/MVFA medical sets: `<split>/{good,Ungood}/[img/]*` with masks (if any) in `<split>/Ungood/<mask_dir>/`."""
    base = bmad_base(root, inner)
    folder = first_dir(base, BMAD_SPLIT_FOLDERS[split]) if base else None
    if folder is None:
        raise DatasetLayoutError(f"no '{'/'.join(BMAD_SPLIT_FOLDERS[split])}' split folder with good/ or Ungood/")
    samples = scan_label_folders(
        root, folder, category=category, normal=GOOD, anomalous=("Ungood",), image_subdir="img"
    )
    if defect_type is not None:
        samples = [s if s.label == NORMAL else replace(s, defect_type=defect_type(Path(s.image))) for s in samples]
    if not mask_dirs:
        return samples
    anomalous = [root / s.image for s in samples if s.label == ANOMALOUS]
    if not anomalous:
        return samples
    mask_dir = first_dir(folder / "Ungood", mask_dirs)
    if mask_dir is None:
        raise DatasetLayoutError(f"{folder / 'Ungood'} has no mask folder ({' or '.join(mask_dirs)})")
    pairs = pair_masks(anomalous, mask_dir, ("",))
    return [s if s.label == NORMAL else replace(s, mask=relative(root, pairs[root / s.image])) for s in samples]


def oct17_defect_type(image: Path) -> str:
    """OCT2017 file names start with the disease: `CNV-6294785-1.jpeg` -> `CNV` (DME, DRUSEN likewise)."""
    prefix = image.name.split("-", 1)[0]
    return prefix if prefix in ("CNV", "DME", "DRUSEN") else "Ungood"


def brainmri_base(root: Path) -> Path | None:
    """Kaggle BrainMRI: prefer `brain_tumor_dataset/` over the zip's duplicate top-level `no/` and `yes/`."""
    for base in (root / "brain_tumor_dataset", root):
        if (base / "no").is_dir() and (base / "yes").is_dir():
            return base
    return None


def scan_yes_no(root: Path, split: str, *, base: Path | None = None) -> list[Sample]:
    """`no/` normal, `yes/` tumour (BrainMRI, Br35H); any other folder (Br35H's `pred/`) is ignored."""
    return scan_label_folders(root, base or root, category="brain", normal="no", anomalous=("yes",))


def headct_images_dir(root: Path) -> Path | None:
    if not (root / "labels.csv").is_file():
        return None
    return first_dir(root, ("head_ct/head_ct", "head_ct", "images")) or root


def scan_headct_kaggle(root: Path, split: str) -> list[Sample]:
    """Kaggle Head CT: `labels.csv` (`id`, `hemorrhage`) plus `head_ct/head_ct/000.png…`; ids match integer stems."""
    csv_path = root / "labels.csv"
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = {name.strip(): name for name in reader.fieldnames or ()}
        if not {"id", "hemorrhage"} <= set(fields):
            raise DatasetLayoutError(f"{csv_path} needs columns 'id' and 'hemorrhage'; found {reader.fieldnames}")
        try:
            labels = {int(row[fields["id"]]): int(row[fields["hemorrhage"]]) for row in reader}
        except (TypeError, ValueError) as error:
            raise DatasetLayoutError(
                f"{csv_path}: every row needs an integer id and hemorrhage 0/1 ({error})"
            ) from None
    images = {}
    for path in list_images(headct_images_dir(root)):
        if path.stem.isdigit():
            images[int(path.stem)] = path
    missing = sorted(set(labels) - set(images))
    if missing:
        raise DatasetLayoutError(f"{csv_path} lists id(s) {missing[:5]} with no image in {headct_images_dir(root)}")
    unlabelled = sorted(set(images) - set(labels))
    if unlabelled:
        raise DatasetLayoutError(f"image(s) {[images[i].name for i in unlabelled[:5]]} have no row in {csv_path}")
    return [
        Sample(
            "brain", relative(root, images[i]), ANOMALOUS if labels[i] else NORMAL, "hemorrhage" if labels[i] else GOOD
        )
        for i in sorted(labels)
    ]


ISIC_TEST_GT = "ISBI2016_ISIC_Part1_Test_GroundTruth"
ISIC_TEST_DATA = "ISBI2016_ISIC_Part1_Test_Data"


def scan_isic_skin(root: Path, split: str) -> list[Sample]:
    """AnomalyCLIP's ISBI copy: `skin/test/<any folder>/*.jpg`, masks `skin/<GT folder>/<stem>_Segmentation.png`.

    Images of every folder under `skin/test/` are paired by name (not position), so more than one abnormal folder
    is fine; a `good/` folder would be normal.
    """
    skin = root / "skin"
    samples: list[Sample] = []
    anomalous: list[tuple[Path, str]] = []
    for folder in list_dirs(skin / "test"):
        for path in list_images(folder):
            if folder.name == GOOD:
                samples.append(Sample("skin", relative(root, path), NORMAL, GOOD))
            else:
                anomalous.append((path, folder.name))
    pairs = pair_masks([p for p, _ in anomalous], skin / ISIC_TEST_GT, ("_Segmentation",))
    samples += [Sample("skin", relative(root, p), ANOMALOUS, d, relative(root, pairs[p])) for p, d in anomalous]
    return samples


# ---------------------------------------------------------------------------------------- generic formats


def scan_meta_json(
    root: Path, split: str, *, meta_file: str = "meta.json", check_mask_names: bool = True
) -> list[Sample]:
    """An AnomalyCLIP-style `meta.json`: `{split: {class: [record, ...]}}` with root-relative paths.

    Split keys match case-insensitively (DAGM.py writes `Train`/`Test`). Records with an empty `img_path` (Bayes-PFL
    puts one placeholder in `train`) are skipped with a log line; every other path must exist and stay inside the
    root. With `check_mask_names`, a mask whose name does not start with its image's stem is an error, because the
    official generators pair masks by sorted position.
    """
    meta_path = resolve_inside(root, meta_file, what="meta_file")
    if not meta_path.is_file():
        raise DatasetLayoutError(f"{meta_path} does not exist")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DatasetLayoutError(f"{meta_path} is not valid JSON: {error}") from error
    if not isinstance(meta, dict):
        raise DatasetLayoutError(f"{meta_path} must hold an object keyed by split, got {type(meta).__name__}")
    wanted = {"validation": ("validation", "valid", "val")}.get(split, (split,))
    key = next((k for k in meta if k.lower() in wanted), None)
    if key is None:
        raise DatasetLayoutError(f"{meta_path} has no '{split}' split; its keys are {sorted(meta)}")
    classes = meta[key]
    if not isinstance(classes, dict):
        raise DatasetLayoutError(f"{meta_path}[{key!r}] must map class names to lists of records")
    samples: list[Sample] = []
    for category, records in sorted(classes.items()):
        if not isinstance(records, list):
            raise DatasetLayoutError(f"{meta_path.name}[{key!r}][{category!r}] must be a list of records")
        for index, record in enumerate(records):
            where = f"{meta_path.name}[{key!r}][{category!r}][{index}]"
            if not isinstance(record, dict) or "anomaly" not in record or "img_path" not in record:
                raise DatasetLayoutError(f"{where} needs at least 'img_path' and 'anomaly': {record!r}")
            if not record["img_path"]:
                logger.info("skipping %s: empty img_path (a placeholder record)", where)
                continue
            if str(record["anomaly"]) not in ("0", "1"):
                raise DatasetLayoutError(f"{where}: 'anomaly' must be 0 or 1, got {record['anomaly']!r}")
            label = int(record["anomaly"])
            image = _existing(resolve_inside(root, record["img_path"], what=f"{where} img_path"), meta_path)
            mask = None
            if label == ANOMALOUS and record.get("mask_path"):
                mask = _existing(resolve_inside(root, record["mask_path"], what=f"{where} mask_path"), meta_path)
                if check_mask_names:
                    try:
                        check_mask_name(image, mask)
                    except DatasetLayoutError as error:
                        raise DatasetLayoutError(
                            f"{where}: {error}; pass check_mask_names=False to accept it"
                        ) from None
            defect = GOOD if label == NORMAL else (record.get("specie_name") or ANOMALY)
            samples.append(
                Sample(category, relative(root, image), label, defect, relative(root, mask) if mask else None)
            )
    return samples


def scan_folder(
    root: Path,
    split: str,
    *,
    normal_dir: str | Sequence[str] | None = None,
    abnormal_dir: str | Sequence[str] | None = None,
    mask_dir: str | None = None,
    mask_suffix: str | Sequence[str] = ("", "_mask"),
    category: str | None = None,
) -> list[Sample]:
    """Your own images: normal and abnormal folders (paths relative to the root), masks optional.

    Each abnormal folder's name becomes the `defect_type`. With `mask_dir`, every abnormal image needs the mask
    named `<stem><suffix>.<any image ext>` (suffixes `""` and `"_mask"` by default) and every mask an image. The
    folder loader ignores `split` except to name the split it returns.
    """
    if normal_dir is None and abnormal_dir is None:
        raise ValueError("the folder loader needs normal_dir=, abnormal_dir= or both (paths relative to data_dir)")
    category = category or root.name
    samples: list[Sample] = []
    for folder in _folders(root, normal_dir, "normal_dir"):
        samples += [Sample(category, relative(root, p), NORMAL, GOOD) for p in list_images(folder)]
    abnormal = [
        (p, folder.name) for folder in _folders(root, abnormal_dir, "abnormal_dir") for p in list_images(folder)
    ]
    pairs: dict[Path, Path] = {}
    if mask_dir is not None:
        suffixes = (mask_suffix,) if isinstance(mask_suffix, str) else tuple(mask_suffix)
        pairs = pair_masks([p for p, _ in abnormal], _folders(root, mask_dir, "mask_dir")[0], suffixes)
    samples += [
        Sample(category, relative(root, p), ANOMALOUS, d, relative(root, pairs[p]) if p in pairs else None)
        for p, d in abnormal
    ]
    return samples


def _folders(root: Path, dirs: str | Sequence[str] | None, option: str) -> list[Path]:
    if dirs is None:
        return []
    folders = []
    for raw in [dirs] if isinstance(dirs, (str, os.PathLike)) else dirs:
        folder = resolve_inside(root, os.fspath(raw), what=option)
        if not folder.is_dir():
            raise DatasetLayoutError(f"{option} {raw!r} is not a folder under {root} (found: {describe_folder(root)})")
        folders.append(folder)
    return folders
