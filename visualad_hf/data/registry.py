"""The benchmarks we can read: one `DatasetSpec` per name, with its layouts, flags and provenance.

`scan_dataset` picks the first layout of a spec that the folder matches, scans it, and turns any mismatch into an
error that says which layout(s) the dataset expects and what the folder holds.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from . import layouts as L
from .layouts import DatasetLayoutError, Sample
from .masks import LOSSLESS_THRESHOLD, LOSSY_THRESHOLD


@dataclass(frozen=True)
class Layout:
    """One on-disk form of a dataset: how to recognise it, and how to read it."""

    description: str
    detect: Callable[[Path], bool]
    scan: Callable[..., list[Sample]]  # (root, split, **options) -> samples


@dataclass(frozen=True)
class DatasetSpec:
    """What `load_anomaly_dataset(name, ...)` knows about a benchmark.

    `anomaly_only` sets (only anomalous images) have no image-level AUROC/AP; evaluation reports pixel metrics only.
    `mask_threshold` is the `>=` threshold for the dataset's standard mask files (see `masks.py`); `binarize_mask`
    infers it from each decoded file, so this value matters only for masks already turned into arrays.
    """

    name: str
    title: str
    domain: str  # "industrial", "medical" or "any"
    source: str  # where to get it (names, official page)
    layouts: tuple[Layout, ...]
    splits: tuple[str, ...] = ("test",)
    options: tuple[str, ...] = ()
    anomaly_only: bool = False
    has_masks: bool = True
    mask_threshold: int = LOSSLESS_THRESHOLD
    categories: tuple[str, ...] = ()  # the published categories, for reference; the loaders read what is on disk
    in_paper: bool = False  # one of the 13 benchmarks the VisualAD README lists
    url: str | None = None
    short_name: str = ""  # the paper's spelling in tables and model cards ("MVTec-AD"); default: `title`

    @property
    def display_name(self) -> str:
        """How result tables, model cards and logs name the dataset: the paper's spelling where it has one."""
        return self.short_name or self.title

    @property
    def expected_layout(self) -> str:
        return "\n".join(f"  ({i}) {layout.description}" for i, layout in enumerate(self.layouts, start=1))


def _mvtec_copy(what: str, *, normal: str = "good", suffixes: Sequence[str] = ("_mask",), masks: bool = True) -> Layout:
    """The MVTec-form copy that AdaCLIP (and others) make of every dataset."""
    tail = f", masks <cat>/ground_truth/<defect>/<stem>{suffixes[0]}.png" if masks else " (no masks)"
    return Layout(
        f"{what}: <root>/<cat>/test/{{{normal},<defect>}}/*{tail}",
        L.has_mvtec_layout,
        partial(L.scan_mvtec_layout, normal_dirs=(normal,), mask_suffixes=suffixes, masks=masks),
    )


def _paired(image_dir: str, mask_dir: str, category: str, suffix: str = "") -> Layout:
    return Layout(
        f"<root>/{image_dir}/<name>.* with masks <root>/{mask_dir}/<name>{suffix}.*",
        lambda root: (root / image_dir).is_dir(),
        lambda root, split: L.scan_paired_folders(
            root, root / image_dir, root / mask_dir, category=category, mask_suffixes=(suffix,)
        ),
    )


def _bmad(category: str, inner: str, *, masks: bool, defect_type: Callable[[Path], str] | None = None) -> Layout:
    mask_dirs = ("anomaly_mask", "label") if masks else ()
    tail = ", masks Ungood/{anomaly_mask,label}/<same name>" if masks else " (no masks)"
    return Layout(
        f"BMAD/MVFA: <root>[/{inner}]/{{test,valid,train}}/{{good,Ungood}}/[img/]*{tail}",
        lambda root: L.bmad_base(root, (inner,)) is not None,
        partial(L.scan_bmad, category=category, inner=(inner,), mask_dirs=mask_dirs, defect_type=defect_type),
    )


_MVTEC = Layout(
    "<root>/<cat>/{train,test}/{good,<defect>}/*.png, masks <root>/<cat>/ground_truth/<defect>/<stem>_mask.png",
    L.has_mvtec_layout,
    partial(L.scan_mvtec_layout, mask_suffixes=("_mask",)),
)


def _names(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _always(root: Path) -> bool:
    """Formats whose options (or meta file) say where the data is; the scan reports what is missing."""
    return True


_SPECS = [
    DatasetSpec(
        "mvtec",
        "MVTec AD",
        "industrial",
        "MVTec Software GmbH, MVTec AD download page",
        (_MVTEC,),
        splits=("test", "train"),
        in_paper=True,
        url="https://www.mvtec.com/company/research/datasets/mvtec-ad",
        categories=_names(
            "bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush transistor wood zipper"
        ),
        short_name="MVTec-AD",
    ),
    DatasetSpec(
        "visa",
        "VisA (Visual Anomaly)",
        "industrial",
        "Amazon spot-diff repository (VisA_20220922.tar)",
        (
            Layout(
                "raw tar: <root>/split_csv/1cls.csv + <root>/<cat>/Data/Images/{Normal,Anomaly}/*.JPG, "
                "masks <root>/<cat>/Data/Masks/Anomaly/<stem>.png",
                lambda root: (root / "split_csv" / "1cls.csv").is_file(),
                L.scan_visa_csv,
            ),
            Layout(
                "prepared: <root>[/1cls or /visa_pytorch]/<cat>/{train,test}/{good,bad}/*.JPG, "
                "masks <cat>/ground_truth/bad/<stem>.png",
                lambda root: L.visa_prepared_base(root) is not None,
                lambda root, split: L.scan_mvtec_layout(
                    root, split, base=L.visa_prepared_base(root), mask_suffixes=("", "_mask")
                ),
            ),
        ),
        splits=("test", "train"),
        in_paper=True,
        url="https://github.com/amazon-science/spot-diff",
        categories=_names("candle capsules cashew chewinggum fryum macaroni1 macaroni2 pcb1 pcb2 pcb3 pcb4 pipe_fryum"),
        short_name="VisA",
    ),
    DatasetSpec(
        "btad",
        "BTAD (beanTech)",
        "industrial",
        "BTAD from the VT-ADL paper (Mishra et al.); BTech_Dataset_transformed",
        (
            Layout(
                "<root>/{01,02,03}/{train,test}/{ok,ko}/*.{bmp,png}, masks <root>/<cat>/ground_truth/ko/<stem>.{png,bmp}",
                L.has_mvtec_layout,
                partial(L.scan_mvtec_layout, normal_dirs=("ok", "good"), mask_suffixes=("",)),
            ),
        ),
        splits=("test", "train"),
        in_paper=True,
        categories=("01", "02", "03"),
        short_name="BTAD",
    ),
    DatasetSpec(
        "ksdd2",
        "KolektorSDD2",
        "industrial",
        "ViCoS lab KolektorSDD2 page (or Bayes-PFL's rebuilt copy)",
        (
            Layout(
                "rebuilt (Bayes-PFL): <root>[/KSDD2]/Metal/test/{good,anomaly}/*.bmp, "
                "masks Metal/ground_truth/anomaly/<stem>.png",
                lambda root: L.ksdd2_rebuilt_base(root) is not None,
                L.scan_ksdd2_rebuilt,
            ),
            Layout(
                "official: <root>/{train,test}/<id>.png + <id>_GT.png (all-zero GT = normal)",
                lambda root: (root / "test").is_dir() or (root / "train").is_dir(),
                L.scan_ksdd2_official,
            ),
        ),
        splits=("test", "train"),
        options=("protocol", "seed"),
        in_paper=True,
        categories=("Metal",),
        url="https://www.vicos.si/resources/kolektorsdd2/",
        short_name="KSDD2",
    ),
    DatasetSpec(
        "dagm",
        "DAGM 2007",
        "industrial",
        "DAGM 2007 competition (HCI Heidelberg); Kaggle upload DAGM_KaggleUpload",
        (
            Layout(
                "AdaCLIP DAGM_anomaly_detection: <root>/Class<N>/test/{good,defect}/*, "
                "masks Class<N>/ground_truth/defect/<stem>_label.PNG",
                L.dagm_is_adaclip_copy,
                partial(L.scan_mvtec_layout, mask_suffixes=("_label",), is_category=L.DAGM_CLASS.fullmatch),
            ),
            Layout(
                "Kaggle: <root>/Class<N>/{Train,Test}/*.PNG, defects have Label/<stem>_label.PNG",
                lambda root: any(L.DAGM_CLASS.fullmatch(d.name) for d in L.list_dirs(root)),
                L.scan_dagm,
            ),
        ),
        splits=("test", "train"),
        in_paper=True,
        categories=tuple(f"Class{i}" for i in range(1, 11)),
        short_name="DAGM",
    ),
    DatasetSpec(
        "dtd_synthetic",
        "DTD-Synthetic",
        "industrial",
        "DTD-Synthetic (Aota et al., WACV 2023), as linked by AnomalyCLIP",
        (
            Layout(
                "<root>/<cls>/{train,test}/{good,bad}/*.png, masks <root>/<cls>/ground_truth/bad/<stem>_mask.png",
                L.has_mvtec_layout,
                partial(L.scan_mvtec_layout, mask_suffixes=("_mask",)),
            ),
        ),
        splits=("test", "train"),
        in_paper=True,
        categories=_names(
            "Woven_001 Woven_127 Woven_104 Stratified_154 Blotchy_099 Woven_068 Woven_125 Marbled_078 Perforated_037 Mesh_114 Fibrous_183 Matted_069"
        ),
        short_name="DTD-Synthetic",
    ),
    DatasetSpec(
        "mpdd",
        "MPDD (Metal Parts Defect Detection)",
        "industrial",
        "MPDD GitHub repository (stepanje/MPDD)",
        (_MVTEC,),
        splits=("test", "train"),
        url="https://github.com/stepanje/MPDD",
        categories=("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"),
        short_name="MPDD",
    ),
    DatasetSpec(
        "sdd",
        "KolektorSDD (SDD)",
        "industrial",
        "ViCoS lab KolektorSDD page, converted to strips (DRA/AdaCLIP script)",
        (
            Layout(
                "converted: <root>/electrical commutators/{train,test}/{good,defect}/*.png, "
                "masks ground_truth/defect/<stem>_mask.png (cut the raw kosNN/ download into strips first, with "
                "DRA's convert_SDD.py or AdaCLIP's sdd-pre.py)",
                L.has_mvtec_layout,
                L.scan_sdd,
            ),
        ),
        splits=("test", "train"),
        categories=("electrical commutators",),
        url="https://www.vicos.si/resources/kolektorsdd/",
    ),
    DatasetSpec(
        "oct17",
        "Retina OCT2017 (BMAD)",
        "medical",
        "BMAD / MVFA pre-processed Retina_OCT2017_AD",
        (_bmad("Retina_OCT2017", "OCT2017", masks=False, defect_type=L.oct17_defect_type),),
        splits=("test", "validation", "train"),
        has_masks=False,
        in_paper=True,
        url="https://github.com/DorisBao/BMAD",
    ),
    DatasetSpec(
        "brainmri",
        "Brain MRI (brain tumour)",
        "medical",
        'Kaggle "Brain MRI Images for Brain Tumor Detection"',
        (
            Layout(
                "Kaggle: <root>[/brain_tumor_dataset]/{no,yes}/* (mixed .jpg/.JPG/.jpeg/.png)",
                lambda root: L.brainmri_base(root) is not None,
                lambda root, split: L.scan_yes_no(root, split, base=L.brainmri_base(root)),
            ),
            _mvtec_copy("AdaCLIP BrainMRI", masks=False),
        ),
        has_masks=False,
        in_paper=True,
    ),
    DatasetSpec(
        "br35h",
        "Br35H",
        "medical",
        'Kaggle "Br35H :: Brain Tumor Detection 2020"',
        (
            Layout(
                "Kaggle: <root>/{no,yes}/*.jpg (pred/ is ignored)",
                lambda root: (root / "no").is_dir() and (root / "yes").is_dir(),
                L.scan_yes_no,
            ),
            _mvtec_copy("AdaCLIP Br35h_anomaly_detection", masks=False),
        ),
        has_masks=False,
    ),
    DatasetSpec(
        "headct",
        "Head CT (hemorrhage)",
        "medical",
        'Kaggle "Head CT - hemorrhage"',
        (
            Layout(
                "Kaggle: <root>/labels.csv (id, hemorrhage) + <root>/head_ct/head_ct/000.png ...",
                lambda root: L.headct_images_dir(root) is not None,
                L.scan_headct_kaggle,
            ),
            _mvtec_copy("AnomalyCLIP (<cat> = brain) or AdaCLIP (<cat> = headct)", masks=False),
        ),
        has_masks=False,
    ),
    DatasetSpec(
        "brain_ad",
        "Brain_AD (BraTS2021 slices, BMAD)",
        "medical",
        "BMAD / MVFA pre-processed Brain_AD",
        (_bmad("Brain", "BraTS2021_slice", masks=True),),
        splits=("test", "validation", "train"),
        in_paper=True,
        url="https://github.com/DorisBao/BMAD",
    ),
    DatasetSpec(
        "his",
        "Histopathology (Camelyon16 patches, BMAD)",
        "medical",
        "BMAD / MVFA pre-processed Histopathology_AD",
        (_bmad("Histopathology", "camelyon16_256", masks=False),),
        splits=("test", "validation", "train"),
        has_masks=False,
        in_paper=True,
        url="https://github.com/DorisBao/BMAD",
    ),
    DatasetSpec(
        "clinicdb",
        "CVC-ClinicDB",
        "medical",
        "CVC-ClinicDB (Computer Vision Center, Barcelona)",
        (
            _paired("images", "masks", "colon"),
            _paired("Original", "Ground Truth", "colon"),
            _mvtec_copy("AdaCLIP CVC-ClinicDB", suffixes=("", "_mask")),
        ),
        anomaly_only=True,
        in_paper=True,
    ),
    DatasetSpec(
        "colondb",
        "CVC-ColonDB",
        "medical",
        "CVC-ColonDB (Computer Vision Center, Barcelona)",
        (_paired("images", "masks", "colon"), _mvtec_copy("AdaCLIP CVC-ColonDB", suffixes=("", "_mask"))),
        anomaly_only=True,
    ),
    DatasetSpec(
        "endo",
        "EndoTect 2020 (segmentation test set)",
        "medical",
        "EndoTect 2020 challenge",
        (
            Layout(
                "<root>/images/<id>.jpg with masks <root>/masks/<id>.png (only images/ and masks/ are read)",
                lambda root: (root / "images").is_dir(),
                lambda root, split: L.scan_paired_folders(root, root / "images", root / "masks", category="colon"),
            ),
            _mvtec_copy("AdaCLIP EndoTect", suffixes=("", "_mask")),
        ),
        anomaly_only=True,
        in_paper=True,
    ),
    DatasetSpec(
        "kvasir",
        "Kvasir-SEG",
        "medical",
        "Simula Kvasir-SEG page",
        (_paired("images", "masks", "colon"), _mvtec_copy("prepared", suffixes=("", "_mask"))),
        anomaly_only=True,
        mask_threshold=LOSSY_THRESHOLD,
        in_paper=True,
        url="https://datasets.simula.no/kvasir-seg/",
    ),
    DatasetSpec(
        "isic",
        "ISIC 2016 Part 1 test (ISBI)",
        "medical",
        "ISIC Challenge 2016 data",
        (
            Layout(
                "AnomalyCLIP: <root>/skin/test/<abnormal>/*.jpg, masks <root>/skin/"
                f"{L.ISIC_TEST_GT}/<stem>_Segmentation.png",
                lambda root: (root / "skin" / "test").is_dir(),
                L.scan_isic_skin,
            ),
            _paired(L.ISIC_TEST_DATA, L.ISIC_TEST_GT, "skin", "_Segmentation"),
            _mvtec_copy("AdaCLIP ISIC", suffixes=("_Segmentation", "")),
        ),
        anomaly_only=True,
        url="https://challenge.isic-archive.com/data/",
    ),
    DatasetSpec(
        "tn3k",
        "TN3K (thyroid nodules)",
        "medical",
        "TN3K from the TRFE-Net repository",
        (
            Layout(
                "<root>/test-image/<id>.jpg with masks <root>/test-mask/<id>.jpg (train: trainval-image/-mask)",
                lambda root: (root / "test-image").is_dir() or (root / "trainval-image").is_dir(),
                lambda root, split: L.scan_paired_folders(
                    root,
                    root / f"{'test' if split == 'test' else 'trainval'}-image",
                    root / f"{'test' if split == 'test' else 'trainval'}-mask",
                    category="thyroid",
                ),
            ),
            _mvtec_copy("AdaCLIP TN3K", suffixes=("", "_mask")),
        ),
        splits=("test", "train"),
        anomaly_only=True,
        mask_threshold=LOSSY_THRESHOLD,
    ),
    DatasetSpec(
        "meta_json",
        "any folder with an AnomalyCLIP-style meta.json",
        "any",
        "written by AnomalyCLIP/VisualAD scripts",
        (
            Layout(
                '<root>/meta.json: {"test": {"<class>": [{"img_path", "mask_path", "cls_name", "specie_name", '
                '"anomaly"}, ...]}} with root-relative paths',
                _always,
                L.scan_meta_json,
            ),
        ),
        splits=("test", "train", "validation"),
        options=("meta_file", "check_mask_names"),
    ),
    DatasetSpec(
        "folder",
        "your own images",
        "any",
        "your own data",
        (
            Layout(
                "<root>/<normal_dir>/*, <root>/<abnormal_dir>/*, optional masks <root>/<mask_dir>/<stem>[_mask].*",
                _always,
                L.scan_folder,
            ),
        ),
        splits=("test", "train", "validation"),
        options=("normal_dir", "abnormal_dir", "mask_dir", "mask_suffix", "category"),
    ),
]

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}
ALIASES = {
    "mvtec_ad": "mvtec",
    "btech": "btad",
    "kolektorsdd2": "ksdd2",
    "dagm2007": "dagm",
    "dtd": "dtd_synthetic",
    "kolektorsdd": "sdd",
    "br35": "br35h",
    "head_ct": "headct",
    "cvc_clinicdb": "clinicdb",
    "cvc_colondb": "colondb",
    "endotect": "endo",
    "kvasir_seg": "kvasir",
    "isbi": "isic",
    "isic2016": "isic",
    "retina_oct2017": "oct17",
}


def display_name(name: str) -> str:
    """The display name of a dataset name or alias (`"mvtec"` -> `"MVTec-AD"`); other text comes back as given, so a
    free-form name (`"synthetic benchmark (target families)"`) passes through. The one table of display names."""
    try:
        return dataset_spec(name).display_name
    except ValueError:
        return name


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of a dataset name (case-insensitive; `-` and `_` are the same; a few common aliases work)."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[key]


def scan_dataset(
    name: str,
    data_dir: str | os.PathLike,
    split: str = "test",
    categories: str | Sequence[str] | None = None,
    **options,
) -> list[Sample]:
    """Read a benchmark folder into `Sample`s, sorted by (category, image path), without building a dataset."""
    spec = dataset_spec(name)
    split = L.SPLIT_ALIASES.get(split, split)
    if split not in spec.splits:
        raise ValueError(f"{spec.name} has no {split!r} split; it has {', '.join(spec.splits)}")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        accepted = ", ".join(spec.options) or "none"
        raise TypeError(f"{spec.name} does not take option(s) {unknown}; it accepts: {accepted}")
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(data_dir))))
    if not root.is_dir():
        raise FileNotFoundError(
            f"{spec.name}: data_dir {root} does not exist or is not a folder. Download {spec.title} "
            f"({spec.source}) and point data_dir at a folder laid out as:\n{spec.expected_layout}"
        )
    layout = next((layout for layout in spec.layouts if layout.detect(root)), None)
    try:
        if layout is None:
            raise DatasetLayoutError("it matches none of the expected layouts")
        with L.collect_skipped() as skipped:
            samples = layout.scan(root, split, **options)
        if not samples:
            raise DatasetLayoutError(f"no images found for split {split!r}")
        _check_unique(samples)
    except DatasetLayoutError as error:
        raise DatasetLayoutError(
            f"{root} is not a readable `{spec.name}` ({spec.title}) folder: {error}\n"
            f"Expected layout:\n{spec.expected_layout}\nFound in {root}: {L.describe_folder(root)}"
        ) from None
    _report_skipped(root, skipped)
    _check_utf8_names(root, samples)
    samples.sort(key=lambda s: (s.category, s.image))
    return _select(spec, samples, categories)


MAX_LISTED = 20  # entries a warning lists before "(+N more)"


def _report_skipped(root: Path, skipped: dict[Path, str]) -> None:
    """One warning listing the entries the scan passed over (dangling/looping links, FIFOs, ...)."""
    if not skipped:
        return
    items = [f"{_printable(L.relative(root, path))} ({why})" for path, why in sorted(skipped.items())]
    more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    warnings.warn(
        f"{root}: skipped {len(items)} entr{'y' if len(items) == 1 else 'ies'} that are neither files nor folders: "
        f"{', '.join(items[:MAX_LISTED])}{more}. Fix or remove them if they should be data.",
        UserWarning,
        stacklevel=3,
    )


def _printable(name: str) -> str:
    """A file name as text even when it is not valid UTF-8 (undecodable bytes shown as \\xNN)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _check_utf8_names(root: Path, samples: list[Sample]) -> None:
    """Dataset tables store paths as UTF-8 text: a name that is not valid UTF-8 is refused by name, before
    `datasets` fails on it without saying which file it was."""
    for sample in samples:
        for text in (sample.image, sample.mask, sample.category, sample.defect_type):
            if text is None:
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                path = sample.mask if text == sample.mask else sample.image
                raise DatasetLayoutError(
                    f"{root}: the file name {_printable(path)} is not valid UTF-8 (the \\x escapes are its raw bytes); "
                    "rename it to a UTF-8 name (e.g. `convmv -f latin1 -t utf8 --notest` on the folder)"
                ) from None


def _check_unique(samples: list[Sample]) -> None:
    seen: set[str] = set()
    for sample in samples:
        if sample.image in seen:
            raise DatasetLayoutError(f"image {sample.image} is listed twice")
        seen.add(sample.image)


def _select(spec: DatasetSpec, samples: list[Sample], categories: str | Sequence[str] | None) -> list[Sample]:
    if categories is None:
        return samples
    wanted = [categories] if isinstance(categories, str) else list(categories)
    available = sorted({s.category for s in samples})
    missing = [c for c in wanted if c not in available]
    if missing:
        raise ValueError(
            f"{spec.name} has no categor{'y' if len(missing) == 1 else 'ies'} {missing}; available: {available}"
        )
    keep = set(wanted)
    return [s for s in samples if s.category in keep]
