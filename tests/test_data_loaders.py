"""Every dataset loader on a tiny fake copy of its real layout, quirks included (DATASETS.md).

Pairing is checked through pixels, not names: image number k is a flat grey of value 8k and its mask marks the top
2·n(k) rows, so `load_mask(row).sum()` proves the row's mask file belongs to the row's image.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visualad_hf.data import (
    DATASETS,
    DatasetLayoutError,
    binarize_mask,
    dataset_spec,
    load_anomaly_dataset,
    load_mask,
    mask_threshold,
    scan_dataset,
)

SIZE = 32


def n_rows(k: int) -> int:
    return k % 11 + 1  # 1..11; 2n is rarely a multiple of 8, so JPEG masks ring at their edge


class Tree:
    """Writes a fake dataset: numbered images, and masks that encode their image's number."""

    def __init__(self, root: Path):
        self.root = root
        self.count = 0

    def image(self, rel: str, mode: str = "RGB") -> int:
        self.count += 1
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, (SIZE, SIZE), 8 * self.count if mode != "RGB" else (8 * self.count,) * 3).save(path)
        return self.count

    def mask(self, rel: str, k: int, *, value: int = 255, mode: str = "L") -> None:
        array = np.zeros((SIZE, SIZE), np.uint8)
        array[: 2 * n_rows(k)] = value
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        mask = Image.fromarray(array, "L")
        if mode == "P":  # a label map: index 0 background, index 1 defect drawn dark red
            mask = Image.fromarray((array > 0).astype(np.uint8), "P")
            mask.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
        elif mode != "L":
            mask = mask.convert(mode)
        mask.save(path)

    def pair(self, image: str, mask: str, **mask_kwargs) -> int:
        k = self.image(image)
        self.mask(mask, k, **mask_kwargs)
        return k

    def file(self, rel: str, text: str = "") -> None:
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.root / rel).write_text(text)


def load(name, root, tmp_path, **kwargs):
    return load_anomaly_dataset(name, root, cache_dir=tmp_path / "hf_cache", **kwargs)


def counts(ds) -> Counter:
    """(category, label) -> number of rows."""
    return Counter(zip(ds["category"], ds["label"]))


def assert_paired(ds) -> None:
    """Each anomalous row with a mask has its own image's mask; rows without masks have none; order is sorted."""
    keys = list(zip(ds["category"], ds["image_path"]))
    assert keys == sorted(keys)
    for row in ds:
        if row["mask"] is None:
            assert not load_mask(row).any()
            continue
        assert row["label"] == 1
        k = round(float(np.asarray(row["image"].convert("L")).mean()) / 8)
        assert load_mask(row).sum() == 2 * n_rows(k) * SIZE, row["image_path"]


# ------------------------------------------------------------------------------------------ industrial


def make_mvtec_like(tree: Tree, *, normal="good", suffix="_mask", image_ext=".png", mask_ext=".png") -> None:
    for i in range(2):
        tree.image(f"bottle/train/{normal}/{i:03d}{image_ext}")
        tree.image(f"bottle/test/{normal}/{i:03d}{image_ext}")
    for defect in ("broken_large", "contamination"):
        for i in range(2):
            tree.pair(
                f"bottle/test/{defect}/{i:03d}{image_ext}", f"bottle/ground_truth/{defect}/{i:03d}{suffix}{mask_ext}"
            )
    tree.image(f"grid/test/{normal}/000{image_ext}", mode="L")  # grid, screw and zipper are grayscale
    k = tree.image(f"grid/test/bent/000{image_ext}", mode="L")
    tree.mask(f"grid/ground_truth/bent/000{suffix}{mask_ext}", k)


def test_mvtec(tmp_path):
    tree = Tree(tmp_path / "mvtec")
    make_mvtec_like(tree)
    tree.file("license.txt", "x")
    tree.file("readme.txt", "x")
    tree.file("__MACOSX/bottle/test/good/._000.png", "junk")
    tree.file("bottle/test/good/._000.png", "resource fork")
    ds = load("mvtec", tree.root, tmp_path)
    assert counts(ds) == {("bottle", 0): 2, ("bottle", 1): 4, ("grid", 0): 1, ("grid", 1): 1}
    assert ds.features["label"].names == ["normal", "anomalous"]
    assert set(ds["defect_type"]) == {"good", "broken_large", "contamination", "bent"}
    assert ds[0]["image_path"] == "bottle/test/broken_large/000.png"
    assert ds.info.dataset_name == "mvtec"
    assert_paired(ds)
    train = load("mvtec", tree.root, tmp_path, split="train")
    assert counts(train) == {("bottle", 0): 2} and all(m is None for m in train["mask"])
    only_grid = load("mvtec", tree.root, tmp_path, categories="grid")
    assert counts(only_grid) == {("grid", 0): 1, ("grid", 1): 1}


def test_mvtec_mask_mismatches_are_errors(tmp_path):
    tree = Tree(tmp_path / "mvtec")
    make_mvtec_like(tree)
    orphan = tree.root / "bottle/ground_truth/broken_large/007_mask.png"
    Image.new("L", (SIZE, SIZE)).save(orphan)
    with pytest.raises(DatasetLayoutError, match="match no image.*007_mask.png"):
        scan_dataset("mvtec", tree.root)
    orphan.unlink()
    (tree.root / "bottle/ground_truth/contamination/001_mask.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"no mask for .*contamination/001.png") as error:
        scan_dataset("mvtec", tree.root)
    assert "Expected layout" in str(error.value) and "ground_truth" in str(error.value)


def test_unknown_category_lists_the_available_ones(tmp_path):
    tree = Tree(tmp_path / "mvtec")
    make_mvtec_like(tree)
    with pytest.raises(ValueError, match=r"no category \['cable'\]; available: \['bottle', 'grid'\]"):
        scan_dataset("mvtec", tree.root, categories=["bottle", "cable"])


def test_visa_raw_split_csv(tmp_path):
    tree = Tree(tmp_path / "VisA_20220922")
    rows = ["object,split,label,image,mask"]
    for category in ("candle", "pcb1"):
        for i in range(2):
            rel = f"{category}/Data/Images/Normal/{i:04d}.JPG"
            tree.image(rel)
            rows.append(f"{category},test,normal,{rel},")
        rel = f"{category}/Data/Images/Normal/{7:04d}.JPG"
        tree.image(rel)
        rows.append(f"{category},train,normal,{rel},")
        for i in range(2):
            image, mask = f"{category}/Data/Images/Anomaly/{i:03d}.JPG", f"{category}/Data/Masks/Anomaly/{i:03d}.png"
            # masks hold defect-class indices (here 3), not 0/255; one category stores them as a palette image
            tree.pair(image, mask, value=3, mode="P" if category == "pcb1" else "L")
            rows.append(f"{category},test,anomaly,{image},{mask}")
    tree.file("split_csv/1cls.csv", "\n".join(rows) + "\n")
    tree.file("candle/image_anno.csv", "image,label,mask\n")
    ds = load("visa", tree.root, tmp_path)
    assert counts(ds) == {("candle", 0): 2, ("candle", 1): 2, ("pcb1", 0): 2, ("pcb1", 1): 2}
    assert_paired(ds)
    assert counts(load("visa", tree.root, tmp_path, split="train")) == {("candle", 0): 1, ("pcb1", 0): 1}
    # a csv row that pairs an image with another image's mask is refused
    bad = tree.root / "split_csv/1cls.csv"
    bad.write_text(bad.read_text().replace("Anomaly/000.png", "Anomaly/001.png", 1))
    with pytest.raises(DatasetLayoutError, match="does not carry the stem"):
        scan_dataset("visa", tree.root)


def test_visa_prepared(tmp_path):
    tree = Tree(tmp_path / "VisA_pytorch")
    for i in range(2):
        tree.image(f"1cls/candle/train/good/{i:04d}.JPG")
        tree.image(f"1cls/candle/test/good/{i:04d}.JPG")
        tree.pair(f"1cls/candle/test/bad/{i:03d}.JPG", f"1cls/candle/ground_truth/bad/{i:03d}.png")
    ds = load("visa", tree.root, tmp_path)
    assert counts(ds) == {("candle", 0): 2, ("candle", 1): 2}
    assert ds[0]["image_path"].startswith("1cls/candle/test/")
    assert_paired(ds)


def test_btad_extensions_per_category(tmp_path):
    tree = Tree(tmp_path / "BTech_Dataset_transformed")
    for category, image_ext, mask_ext in (("01", ".bmp", ".png"), ("02", ".png", ".png"), ("03", ".bmp", ".bmp")):
        tree.image(f"{category}/train/ok/0000{image_ext}")
        tree.image(f"{category}/test/ok/0000{image_ext}")
        for i in range(2):
            tree.pair(f"{category}/test/ko/{i:04d}{image_ext}", f"{category}/ground_truth/ko/{i:04d}{mask_ext}")
    ds = load("btad", tree.root, tmp_path)
    assert counts(ds) == {(c, label): 1 + label for c in ("01", "02", "03") for label in (0, 1)}
    assert set(ds["defect_type"]) == {"good", "ko"}
    assert_paired(ds)


def make_ksdd2_official(tree: Tree) -> None:
    for split, positives, negatives in (("train", 3, 4), ("test", 2, 3)):
        for i in range(positives + negatives):
            stem = f"{split}/{10000 + i}"
            k = tree.image(f"{stem}.png")
            if i < positives:
                tree.mask(f"{stem}_GT.png", k)
            else:
                Image.new("L", (SIZE, SIZE), 0).save(tree.root / f"{stem}_GT.png")  # normal images have an empty GT


def test_ksdd2_official_rebuilt_protocol(tmp_path):
    tree = Tree(tmp_path / "KolektorSDD2")
    make_ksdd2_official(tree)
    ds = load("ksdd2", tree.root, tmp_path)
    assert counts(ds) == {("Metal", 0): 5, ("Metal", 1): 5}  # all 5 positives + 5 of the 7 negatives
    assert {p.split("/")[0] for p in ds["image_path"]} == {"train", "test"}
    assert_paired(ds)
    again = scan_dataset("ksdd2", tree.root)
    assert [s.image for s in again] == ds["image_path"]  # the seeded draw is reproducible
    draws = {tuple(s.image for s in scan_dataset("ksdd2", tree.root, seed=seed) if s.label == 0) for seed in range(6)}
    assert len(draws) > 1  # and the seed matters
    official = load("ksdd2", tree.root, tmp_path, protocol="official")
    assert counts(official) == {("Metal", 0): 3, ("Metal", 1): 2}
    assert counts(load("ksdd2", tree.root, tmp_path, split="train", protocol="official")) == {
        ("Metal", 0): 4,
        ("Metal", 1): 3,
    }


def test_ksdd2_rebuilt_copy(tmp_path):
    tree = Tree(tmp_path / "DATA_three")
    tree.file("meta_KSDD2.json", "{}")
    for i in range(3):
        tree.image(f"KSDD2/Metal/test/good/KSDD2-metal-null-{i:06d}.bmp")
        tree.pair(
            f"KSDD2/Metal/test/anomaly/KSDD2-metal-defect-{i:06d}.bmp",
            f"KSDD2/Metal/ground_truth/anomaly/KSDD2-metal-defect-{i:06d}.png",
        )
    ds = load("ksdd2", tree.root, tmp_path)
    assert counts(ds) == {("Metal", 0): 3, ("Metal", 1): 3}
    assert_paired(ds)
    with pytest.raises(DatasetLayoutError, match="needs the official"):
        scan_dataset("ksdd2", tree.root, protocol="official")


def test_dagm_kaggle(tmp_path):
    tree = Tree(tmp_path / "DAGM_KaggleUpload")
    for category in ("Class1", "Class2"):
        for folder in ("Train", "Test"):
            for i in range(1, 5):
                k = tree.image(f"{category}/{folder}/{i:04d}.PNG", mode="L")
                if i % 2 == 0:
                    tree.mask(f"{category}/{folder}/Label/{i:04d}_label.PNG", k)
            tree.file(f"{category}/{folder}/Label/Labels.txt", "index file\n")
    tree.image("Class1_def/0001.PNG")  # not a Class<N> folder
    ds = load("dagm", tree.root, tmp_path)
    assert counts(ds) == {("Class1", 0): 2, ("Class1", 1): 2, ("Class2", 0): 2, ("Class2", 1): 2}
    assert_paired(ds)
    assert ds[1]["image_path"] == "Class1/Test/0002.PNG" and ds[1]["label"] == 1
    assert len(load("dagm", tree.root, tmp_path, split="train")) == 8
    Image.new("L", (SIZE, SIZE)).save(tree.root / "Class2/Test/Label/0009_label.PNG")
    with pytest.raises(DatasetLayoutError, match="0009_label.PNG matches no image"):
        scan_dataset("dagm", tree.root)


def test_dagm_adaclip_copy(tmp_path):
    tree = Tree(tmp_path / "DAGM_anomaly_detection")
    for i in range(2):
        tree.image(f"Class3/test/good/{i:04d}.PNG")
        tree.pair(f"Class3/test/defect/{i + 5:04d}.PNG", f"Class3/ground_truth/defect/{i + 5:04d}_label.PNG")
    ds = load("dagm", tree.root, tmp_path)
    assert counts(ds) == {("Class3", 0): 2, ("Class3", 1): 2}
    assert_paired(ds)


def test_dtd_synthetic(tmp_path):
    tree = Tree(tmp_path / "DTD-Synthetic")
    for category in ("Woven_001", "Blotchy_099"):
        tree.image(f"{category}/train/good/000.png")
        tree.image(f"{category}/test/good/000.png")
        for i in range(3):
            tree.pair(f"{category}/test/bad/{i:03d}.png", f"{category}/ground_truth/bad/{i:03d}_mask.png")
    ds = load("dtd_synthetic", tree.root, tmp_path)
    assert counts(ds) == {("Blotchy_099", 0): 1, ("Blotchy_099", 1): 3, ("Woven_001", 0): 1, ("Woven_001", 1): 3}
    assert set(ds["defect_type"]) == {"good", "bad"}
    assert_paired(ds)


def test_mpdd(tmp_path):
    tree = Tree(tmp_path / "MPDD")
    tree.image("metal_plate/train/good/000.png")
    tree.image("metal_plate/test/good/000.png")
    for defect in ("major_rust", "scratches", "total_rust"):
        tree.pair(f"metal_plate/test/{defect}/000.png", f"metal_plate/ground_truth/{defect}/000_mask.png")
    tree.image("tubes/test/good/000.png")
    tree.pair("tubes/test/anomalous/000.png", "tubes/ground_truth/anomalous/000_mask.png")
    ds = load("mpdd", tree.root, tmp_path)
    assert counts(ds) == {("metal_plate", 0): 1, ("metal_plate", 1): 3, ("tubes", 0): 1, ("tubes", 1): 1}
    assert_paired(ds)


def test_sdd_category_with_a_space(tmp_path):
    tree = Tree(tmp_path / "SDD")
    category = "electrical commutators"
    for i in range(2):
        tree.image(f"{category}/train/good/kos0{i}_Part0_0.png")
        tree.image(f"{category}/test/good/kos0{i}_Part1_2.png")
        tree.pair(
            f"{category}/test/defect/kos0{i}_Part5_0.png", f"{category}/ground_truth/defect/kos0{i}_Part5_0_mask.png"
        )
    ds = load("sdd", tree.root, tmp_path)
    assert counts(ds) == {(category, 0): 2, (category, 1): 2}
    assert_paired(ds)


# --------------------------------------------------------------------------------------------- medical


def test_oct17_mvfa_and_bmad(tmp_path):
    tree = Tree(tmp_path / "Retina_OCT2017_AD")
    tree.image("test/good/img/NORMAL-5171640-1.jpeg")
    tree.image("test/good/img/NORMAL-5171640-2.jpeg")
    for disease in ("CNV", "DME", "DRUSEN"):
        tree.image(f"test/Ungood/img/{disease}-6294785-1.jpeg")
    tree.image("valid/good/img/NORMAL-1-1.jpeg")
    ds = load("oct17", tree.root, tmp_path)
    assert counts(ds) == {("Retina_OCT2017", 0): 2, ("Retina_OCT2017", 1): 3}
    assert sorted(ds["defect_type"]) == ["CNV", "DME", "DRUSEN", "good", "good"]
    assert all(m is None for m in ds["mask"])
    assert len(load("oct17", tree.root, tmp_path, split="valid")) == 1
    bmad = Tree(tmp_path / "bmad")  # raw BMAD archive: inner OCT2017/, no img/ level, val/
    bmad.image("OCT2017/test/good/NORMAL-1-1.jpeg")
    bmad.image("OCT2017/test/Ungood/CNV-1-1.jpeg")
    bmad.image("OCT2017/val/Ungood/DME-1-1.jpeg")
    assert counts(load("oct17", bmad.root, tmp_path)) == {("Retina_OCT2017", 0): 1, ("Retina_OCT2017", 1): 1}
    assert load("oct17", bmad.root, tmp_path, split="validation")["image_path"] == ["OCT2017/val/Ungood/DME-1-1.jpeg"]


def test_brainmri_mixed_extensions_and_duplicate_folders(tmp_path):
    tree = Tree(tmp_path / "brain_mri")
    for name in ("1 no.jpeg", "N1.JPG", "no 10.jpg", "no 2.png"):
        tree.image(f"brain_tumor_dataset/no/{name}")
    for name in ("Y1.jpg", "Y100.JPG", "Y2.jpeg"):
        tree.image(f"brain_tumor_dataset/yes/{name}")
    tree.image("no/N1.JPG")  # the Kaggle zip's duplicate top-level folders are not read
    tree.image("yes/Y1.jpg")
    ds = load("brainmri", tree.root, tmp_path)
    assert counts(ds) == {("brain", 0): 4, ("brain", 1): 3}
    assert all(p.startswith("brain_tumor_dataset/") for p in ds["image_path"])
    assert all(m is None for m in ds["mask"])


def test_br35h_ignores_pred(tmp_path):
    tree = Tree(tmp_path / "Br35H")
    for i in range(3):
        tree.image(f"yes/y{i}.jpg")
        tree.image(f"no/no{i}.jpg")
        tree.image(f"pred/pred{i}.jpg")
    tree.file("meta.json", "{}")  # a leftover meta.json must not become a class either
    ds = load("br35h", tree.root, tmp_path)
    assert counts(ds) == {("brain", 0): 3, ("brain", 1): 3}
    assert not any(p.startswith("pred/") for p in ds["image_path"])


def test_headct_official_and_kaggle(tmp_path):
    tree = Tree(tmp_path / "headct")
    for i in range(2):
        tree.image(f"brain/test/good/{i:03d}.png", mode="L")
        tree.image(f"brain/test/hemorrhage/{i + 100:03d}.png", mode="L")
    ds = load("headct", tree.root, tmp_path)
    assert counts(ds) == {("brain", 0): 2, ("brain", 1): 2}
    kaggle = Tree(tmp_path / "kaggle")
    for i in range(4):
        kaggle.image(f"head_ct/head_ct/{i:03d}.png", mode="L")
    kaggle.file("labels.csv", "id, hemorrhage\n0,1\n1,1\n2,0\n3,0\n")
    ds = load("headct", kaggle.root, tmp_path)
    assert counts(ds) == {("brain", 0): 2, ("brain", 1): 2}
    assert dict(zip(ds["image_path"], ds["label"]))["head_ct/head_ct/000.png"] == 1


def test_brain_ad_masks_and_label_folder_variant(tmp_path):
    for mask_folder in ("anomaly_mask", "label"):
        tree = Tree(tmp_path / mask_folder / "Brain_AD")
        tree.image("test/good/img/00000_96.png", mode="L")
        for name in ("00002_60.png", "00003_61.png"):
            tree.pair(f"test/Ungood/img/{name}", f"test/Ungood/{mask_folder}/{name}")
        ds = load("brain_ad", tree.root, tmp_path)
        assert counts(ds) == {("Brain", 0): 1, ("Brain", 1): 2}
        assert_paired(ds)


def test_his_same_names_in_both_folders(tmp_path):
    tree = Tree(tmp_path / "Histopathology_AD")
    for name in ("1000.png", "1001.png"):
        tree.image(f"test/good/img/{name}")
        tree.image(f"test/Ungood/img/{name}")
    ds = load("his", tree.root, tmp_path)
    assert counts(ds) == {("Histopathology", 0): 2, ("Histopathology", 1): 2}
    assert len(set(ds["image_path"])) == 4


@pytest.mark.parametrize(
    "name, image_dir, mask_dir, image_ext, mask_ext",
    [
        ("clinicdb", "images", "masks", ".png", ".png"),
        ("clinicdb", "Original", "Ground Truth", ".tif", ".tif"),  # the official release
        ("colondb", "images", "masks", ".png", ".png"),
        ("endo", "images", "masks", ".jpg", ".png"),
    ],
)
def test_anomaly_only_polyp_sets(tmp_path, name, image_dir, mask_dir, image_ext, mask_ext):
    tree = Tree(tmp_path / name)
    for i in (1, 2, 10, 11):  # numeric names sort as text; pairing is by name, so that is harmless
        tree.pair(f"{image_dir}/{i}{image_ext}", f"{mask_dir}/{i}{mask_ext}")
    tree.image("unrelated_folder/5.png")  # endoTect.py would read this as an abnormal class
    ds = load(name, tree.root, tmp_path)
    assert counts(ds) == {("colon", 1): 4}
    assert dataset_spec(name).anomaly_only
    assert_paired(ds)


def test_kvasir_jpeg_masks(tmp_path):
    tree = Tree(tmp_path / "Kvasir-SEG")
    for stem in ("cju0qkwl35piu0993l0dewei2", "cju0qoxqj9q6s0835b43399p4", "cju0roawvklrq0799vmjorwfv"):
        tree.pair(f"images/{stem}.jpg", f"masks/{stem}.jpg", mode="RGB")  # 3-channel JPEG masks
    tree.file("kavsir_bboxes.json", "{}")
    ds = load("kvasir", tree.root, tmp_path)
    assert counts(ds) == {("colon", 1): 3}
    assert_paired(ds)  # the 128 threshold removes the JPEG ringing...
    row = ds[0]
    assert mask_threshold(row["mask"]) == 128
    assert binarize_mask(row["mask"], threshold=1).sum() > load_mask(row).sum()  # ...that "> 0" would count


def test_isic_skin_and_official_layouts(tmp_path):
    tree = Tree(tmp_path / "ISBI")
    for i in (3, 12):
        tree.pair(
            f"skin/test/anomaly/ISIC_{i:07d}.jpg",
            f"skin/ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_{i:07d}_Segmentation.png",
        )
    ds = load("isic", tree.root, tmp_path)
    assert counts(ds) == {("skin", 1): 2}
    assert_paired(ds)
    official = Tree(tmp_path / "ISIC2016")
    for i in (3, 12):
        official.pair(
            f"ISBI2016_ISIC_Part1_Test_Data/ISIC_{i:07d}.jpg",
            f"ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_{i:07d}_Segmentation.png",
        )
    assert_paired(load("isic", official.root, tmp_path))


def test_tn3k(tmp_path):
    tree = Tree(tmp_path / "tn3k")
    for i in range(3):
        tree.pair(f"test-image/{i:04d}.jpg", f"test-mask/{i:04d}.jpg")
    tree.pair("trainval-image/0100.jpg", "trainval-mask/0100.jpg")
    ds = load("tn3k", tree.root, tmp_path)
    assert counts(ds) == {("thyroid", 1): 3}
    assert_paired(ds)
    assert counts(load("tn3k", tree.root, tmp_path, split="train")) == {("thyroid", 1): 1}


def test_adaclip_copy_of_a_medical_set(tmp_path):
    tree = Tree(tmp_path / "ISIC")
    for i in range(2):
        tree.pair(f"isic/test/defect/ISIC_{i:07d}.jpg", f"isic/ground_truth/defect/ISIC_{i:07d}_Segmentation.png")
    ds = load("isic", tree.root, tmp_path)
    assert counts(ds) == {("isic", 1): 2}
    assert_paired(ds)


# ------------------------------------------------------------------------------------- generic formats


def write_meta(root: Path, meta: dict, name: str = "meta.json") -> None:
    (root / name).write_text(json.dumps(meta, indent=4) + "\n")


def test_meta_json_capitalised_keys_and_root_prefixed_paths(tmp_path):
    tree = Tree(tmp_path / "data" / "br35")
    records = []
    for i in range(2):
        tree.image(f"no/no{i}.jpg")
        tree.image(f"yes/y{i}.jpg")
    absolute = str(tree.root)
    records = [
        {"img_path": f"{absolute}/no/no0.jpg", "mask_path": "", "cls_name": "brain", "specie_name": "no", "anomaly": 0},
        {"img_path": "data/br35//no/no1.jpg", "mask_path": "", "cls_name": "brain", "specie_name": "no", "anomaly": 0},
        {
            "img_path": f"{absolute}//yes/y0.jpg",
            "mask_path": "",
            "cls_name": "brain",
            "specie_name": "yes",
            "anomaly": 1,
        },
        {"img_path": "yes/y1.jpg", "mask_path": "", "cls_name": "brain", "specie_name": "", "anomaly": 1},
    ]
    write_meta(
        tree.root,
        {
            "Train": {
                "brain": [{"img_path": "", "mask_path": "", "cls_name": "brain", "specie_name": "", "anomaly": 0}]
            },
            "Test": {"brain": records},
        },
    )
    ds = load("meta_json", tree.root, tmp_path)
    assert ds["image_path"] == ["no/no0.jpg", "no/no1.jpg", "yes/y0.jpg", "yes/y1.jpg"]
    assert ds["label"] == [0, 0, 1, 1]
    assert ds["defect_type"] == ["good", "good", "yes", "anomaly"]
    assert all(m is None for m in ds["mask"])  # classification-only: anomalous without a mask
    with pytest.raises(DatasetLayoutError, match="no 'train' split|no images"):
        scan_dataset("meta_json", tree.root, split="train")  # only the placeholder record


def test_meta_json_pairs_masks_by_name_and_refuses_escapes(tmp_path):
    tree = Tree(tmp_path / "root")
    for i in range(2):
        tree.pair(f"bottle/test/crack/{i:03d}.png", f"bottle/ground_truth/crack/{i:03d}_mask.png")
    tree.image("bottle/test/good/000.png")

    def record(image, mask, anomaly=1):
        return {"img_path": image, "mask_path": mask, "cls_name": "bottle", "specie_name": "crack", "anomaly": anomaly}

    good = [record(f"bottle/test/crack/{i:03d}.png", f"bottle/ground_truth/crack/{i:03d}_mask.png") for i in range(2)]
    good.append(record("bottle/test/good/000.png", "", 0))
    write_meta(tree.root, {"train": {}, "test": {"bottle": good}})
    ds = load("meta_json", tree.root, tmp_path)
    assert counts(ds) == {("bottle", 0): 1, ("bottle", 1): 2}
    assert_paired(ds)

    swapped = [record(good[0]["img_path"], good[1]["mask_path"]), record(good[1]["img_path"], good[0]["mask_path"])]
    write_meta(tree.root, {"test": {"bottle": swapped}})
    with pytest.raises(DatasetLayoutError, match="does not belong to image"):
        scan_dataset("meta_json", tree.root)
    assert len(scan_dataset("meta_json", tree.root, check_mask_names=False)) == 2

    outside = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(outside)
    for escape in ("../secret.png", str(outside), "bottle/../../secret.png", "root/x/../../secret.png"):
        write_meta(tree.root, {"test": {"bottle": [record(escape, "", 0)]}})
        with pytest.raises(DatasetLayoutError, match="points outside the dataset root"):
            scan_dataset("meta_json", tree.root)
    with pytest.raises(DatasetLayoutError, match="outside the dataset root"):
        scan_dataset("meta_json", tree.root, meta_file="../secret.json")


def test_folder_loader(tmp_path):
    tree = Tree(tmp_path / "my_parts")
    for i in range(3):
        tree.image(f"ok/{i}.png")
    for defect in ("dent", "scratch"):
        for i in range(2):
            tree.pair(f"{defect}/{defect}{i}.png", f"masks/{defect}{i}_mask.png")
    ds = load("folder", tree.root, tmp_path, normal_dir="ok", abnormal_dir=["dent", "scratch"], mask_dir="masks")
    assert counts(ds) == {("my_parts", 0): 3, ("my_parts", 1): 4}
    assert set(ds["defect_type"]) == {"good", "dent", "scratch"}
    assert_paired(ds)
    no_masks = load("folder", tree.root, tmp_path, normal_dir="ok", abnormal_dir="dent", category="parts")
    assert counts(no_masks) == {("parts", 0): 3, ("parts", 1): 2} and all(m is None for m in no_masks["mask"])
    with pytest.raises(DatasetLayoutError, match="match no image"):  # masks of scratch/ have no image here
        scan_dataset("folder", tree.root, normal_dir="ok", abnormal_dir="dent", mask_dir="masks")
    with pytest.raises(DatasetLayoutError, match="outside the dataset root"):
        scan_dataset("folder", tree.root, normal_dir="../elsewhere")
    with pytest.raises(DatasetLayoutError, match="is not a folder"):
        scan_dataset("folder", tree.root, normal_dir="missing")
    with pytest.raises(ValueError, match="needs normal_dir"):
        scan_dataset("folder", tree.root)


# ---------------------------------------------------------------------------------------- errors, cache


def test_missing_or_wrong_folder_says_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)mvtec: data_dir .*nowhere does not exist.*ground_truth"):
        scan_dataset("mvtec", tmp_path / "nowhere")
    tree = Tree(tmp_path / "not_kvasir")
    tree.image("pictures/a.jpg")
    with pytest.raises(DatasetLayoutError) as error:
        scan_dataset("kvasir", tree.root)
    message = str(error.value)
    assert "`kvasir` (Kvasir-SEG)" in message and "<root>/images/" in message and "Found in" in message
    assert "pictures/" in message


def test_names_options_and_splits_are_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mvtec3d'; choose one of: mvtec, visa"):
        dataset_spec("mvtec3d")
    assert dataset_spec("DTD-Synthetic").name == "dtd_synthetic" and dataset_spec("ISBI").name == "isic"
    with pytest.raises(TypeError, match="does not take option"):
        scan_dataset("mvtec", tmp_path, protocol="official")
    with pytest.raises(ValueError, match="kvasir has no 'train' split"):
        scan_dataset("kvasir", tmp_path, split="train")


def test_registry_flags():
    paper = {n for n, s in DATASETS.items() if s.in_paper}
    assert paper == {
        "mvtec",
        "visa",
        "btad",
        "ksdd2",
        "dagm",
        "dtd_synthetic",  # the README's 6 industrial...
        "oct17",
        "brainmri",
        "brain_ad",
        "his",
        "clinicdb",
        "endo",
        "kvasir",
    }  # ...and 7 medical
    assert {n for n, s in DATASETS.items() if s.anomaly_only} == {
        "clinicdb",
        "colondb",
        "endo",
        "kvasir",
        "isic",
        "tn3k",
    }
    assert {n for n, s in DATASETS.items() if s.mask_threshold == 128} == {"kvasir", "tn3k"}


def test_cache_follows_the_folder(tmp_path):
    tree = Tree(tmp_path / "mvtec")
    make_mvtec_like(tree)
    first = load("mvtec", tree.root, tmp_path)
    again = load("mvtec", tree.root, tmp_path)
    assert again.cache_files == first.cache_files and str(tmp_path / "hf_cache") in first.cache_files[0]["filename"]
    tree.image("bottle/test/good/002.png")
    grown = load("mvtec", tree.root, tmp_path)
    assert len(grown) == len(first) + 1 and grown.cache_files != first.cache_files


# ------------------------------------------------------------------------------------------------ masks


def test_binarize_mask_rules(tmp_path):
    index = np.array([[0, 1], [3, 0]], np.uint8)
    assert binarize_mask(Image.fromarray(index, "L")).tolist() == [[False, True], [True, False]]  # > 0
    palette = Image.fromarray(index, "P")
    palette.putpalette([255, 255, 255] + [0, 0, 0] * 255)  # background index 0 drawn white: indices still rule
    assert binarize_mask(palette).tolist() == [[False, True], [True, False]]
    red = np.zeros((2, 2, 3), np.uint8)
    red[0, 0] = (255, 0, 0)
    assert binarize_mask(Image.fromarray(red, "RGB"), threshold=128).tolist() == [[True, False], [False, False]]
    sixteen = Image.fromarray(np.array([[0, 1], [256, 65535]], np.uint16))
    assert binarize_mask(sixteen).tolist() == [[False, True], [True, True]]
    assert binarize_mask(Image.new("1", (2, 2), 1)).all()
    assert binarize_mask(np.array([[0, 200], [100, 0]]), threshold=128).tolist() == [[False, True], [False, False]]
    jpeg = tmp_path / "m.jpg"
    Image.new("L", (8, 8), 255).save(jpeg)
    with Image.open(jpeg) as opened:
        assert mask_threshold(opened) == 128
    assert mask_threshold(Image.new("L", (8, 8))) == 1


def test_load_mask_shapes(tmp_path):
    image = Image.new("RGB", (6, 4))
    assert load_mask({"image": image, "mask": None}).shape == (4, 6)
    with pytest.raises(ValueError, match="does not belong to this image"):
        load_mask({"image": image, "mask": Image.new("L", (4, 6)), "image_path": "a/b.png"})


def test_readme_table_lists_every_dataset():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("<!-- section: datasets -->")[1].split("<!-- /section: datasets -->")[0]
    rows = {line.split("|")[1].strip().strip("`") for line in section.splitlines() if line.startswith("| `")}
    assert rows == set(DATASETS)


def test_non_utf8_file_names_are_refused_by_name(tmp_path):
    import os

    tree = Tree(tmp_path)
    tree.image("ok/0.png")
    tree.image("bad/1.png")
    raw = os.path.join(os.fsencode(tmp_path), b"bad", b"caf\xe9.png")  # Latin-1 "café": not valid UTF-8
    Image.new("RGB", (SIZE, SIZE)).save(os.fsdecode(raw))
    with pytest.raises(DatasetLayoutError, match=r"bad/caf\\xe9\.png is not valid UTF-8.*rename it"):
        load_anomaly_dataset("folder", tmp_path, normal_dir="ok", abnormal_dir="bad", cache_dir=tmp_path / "cache")


def test_links_and_fifos_the_scan_cannot_read_are_reported(tmp_path):
    import os

    tree = Tree(tmp_path)
    for k in range(2):
        tree.image(f"ok/{k}.png")
    tree.image("bad/0.png")
    os.symlink("missing.png", tmp_path / "bad" / "dangling.png")
    os.symlink("loop.png", tmp_path / "bad" / "loop.png")
    os.mkfifo(tmp_path / "bad" / "pipe.png")
    with pytest.warns(UserWarning, match="skipped 3 entries") as caught:
        samples = scan_dataset("folder", tmp_path, normal_dir="ok", abnormal_dir="bad")
    message = str(caught[0].message)
    for text in ("bad/dangling.png (dangling symbolic link)", "bad/loop.png (symbolic link loop)", "bad/pipe.png (FIFO)"):
        assert text in message
    assert [s.image for s in samples] == ["bad/0.png", "ok/0.png", "ok/1.png"]

    mvtec = tmp_path / "mvtec"
    Tree(mvtec).image("bottle/test/good/000.png")
    os.symlink("gone", mvtec / "cable")  # a category folder that is a dangling link
    with pytest.warns(UserWarning, match=r"cable \(dangling symbolic link\)"):
        assert len(scan_dataset("mvtec", mvtec)) == 1


def test_one_table_of_display_names():
    from visualad_hf.data import display_name
    from visualad_hf.model_card import BACKBONES, TRAINING_SETS
    from visualad_hf.trainer import DataArguments

    assert display_name("mvtec") == "MVTec-AD" and display_name("MVTec_AD") == "MVTec-AD"
    assert display_name("kvasir") == dataset_spec("kvasir").title  # no paper spelling: the title
    assert display_name("synthetic benchmark (target families)") == "synthetic benchmark (target families)"
    names = {spec.display_name for spec in DATASETS.values()}
    for facts in BACKBONES.values():  # the paper's table rows name registry datasets
        assert set(facts.paper_results) <= names, set(facts.paper_results) - names
    assert {key: name for key, (name, _) in TRAINING_SETS.items()} == {k: display_name(k) for k in TRAINING_SETS}
    args = DataArguments(train_dataset="visa", train_data_dir="x", eval_dataset="btad", eval_data_dir="y")
    assert (args.display_name("train"), args.display_name("eval")) == ("VisA", "BTAD")
