"""VisualADImageProcessor: the authors' preprocessing, image modes, EXIF, masks, smoothing, post-processing, loading."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import PARITY_DIR, png_header_only, tiny_visualad_config
from PIL import Image
from safetensors.torch import load_file
from scipy.ndimage import gaussian_filter
from transformers import AutoImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, OPENAI_CLIP_MEAN

from visualad_hf import VisualADImageProcessor
from visualad_hf.data.collator import VisualADCollator
from visualad_hf.image_processing_visualad import ImageLoadError, gaussian_smooth, load_image, to_pil_image

SIZE = 28
CLIP_MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def reference_pixels(rgb: Image.Image) -> torch.Tensor:
    """The authors' ToTensor + Normalize on an RGB image already at model size."""
    tensor = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float().div(255)
    return (tensor - CLIP_MEAN) / CLIP_STD


def resize_then_rgb(image: Image.Image) -> Image.Image:
    """The authors' transform: resize in the image's own mode (bicubic), then convert to RGB."""
    return image.resize((SIZE, SIZE), Image.Resampling.BICUBIC).convert("RGB")


@pytest.fixture(scope="module")
def processor():
    return VisualADImageProcessor(size=SIZE)


def random_image(mode: str, size=(23, 17), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 4, "YCbCr": 3, "HSV": 3}
    if mode in ("L", "P", "1"):
        base = Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), mode="L")
        return base.convert(mode) if mode != "P" else base.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    array = rng.integers(0, 256, (size[1], size[0], channels[mode]), dtype=np.uint8)
    return Image.fromarray(array, mode=mode)


# ------------------------------------------------------------------------------------------------ the authors' path
def test_parity_fixture_pixel_values():
    """RGB 120x90, grayscale and RGBA PNGs give the authors' pixel_values (their preprocessing, saved)."""
    expected = load_file(str(PARITY_DIR / "expected.safetensors"))["pixel_values"]
    processor = VisualADImageProcessor(size=70)
    paths = [str(PARITY_DIR / "images" / f"{index}.png") for index in range(3)]
    assert [Image.open(path).mode for path in paths] == ["RGB", "L", "RGBA"]
    from_paths = processor(paths)["pixel_values"]
    from_pil = processor([Image.open(path) for path in paths])["pixel_values"]
    assert from_paths.dtype == torch.float32 and from_paths.shape == (3, 3, 70, 70)
    torch.testing.assert_close(from_paths, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(from_pil, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "CMYK", "YCbCr"])
def test_resize_in_own_mode_then_rgb(processor, mode):
    image = random_image(mode)
    expected = reference_pixels(resize_then_rgb(image))
    torch.testing.assert_close(processor(image)["pixel_values"][0], expected, atol=1e-6, rtol=0)


def test_rgba_order_matters(processor):
    """Premultiplied-alpha resizing: converting first would give other numbers (why the order is kept)."""
    image = random_image("RGBA")
    converted_first = reference_pixels(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    assert (processor(image)["pixel_values"][0] - converted_first).abs().max() > 1e-2


@pytest.mark.parametrize(
    "image, converted",
    [
        (random_image("P"), lambda im: im.convert("RGB")),
        (random_image("1"), lambda im: im.convert("L")),
        (random_image("HSV"), lambda im: im.convert("RGB")),
    ],
    ids=["P", "1", "HSV"],
)
def test_modes_converted_before_resize(processor, image, converted):
    expected = reference_pixels(resize_then_rgb(converted(image)))
    torch.testing.assert_close(processor(image)["pixel_values"][0], expected, atol=1e-6, rtol=0)


def test_palette_with_transparency_goes_through_rgba(processor):
    image = random_image("P")
    image.info["transparency"] = 0
    assert to_pil_image(image).mode == "RGBA"
    expected = reference_pixels(resize_then_rgb(image.convert("RGBA")))
    torch.testing.assert_close(processor(image)["pixel_values"][0], expected, atol=1e-6, rtol=0)


def sixteen_bit_image() -> tuple[Image.Image, np.ndarray]:
    values = np.random.default_rng(1).integers(100, 4096, (17, 23)).astype(np.uint16)  # a 12-bit scan
    return Image.fromarray(values), values


def test_16_bit_range_scaling(processor):
    image, values = sixteen_bit_image()
    assert image.mode == "I;16"
    stretched = np.rint((values - values.min()) * (255.0 / (values.max() - values.min()))).astype(np.uint8)
    expected = reference_pixels(resize_then_rgb(Image.fromarray(stretched)))
    torch.testing.assert_close(processor(image)["pixel_values"][0], expected, atol=1e-6, rtol=0)
    # Pillow's own conversion would clip nearly everything to white.
    assert (np.asarray(image.convert("L")) == 255).mean() > 0.9


def test_16_bit_full_scale(processor):
    image, values = sixteen_bit_image()
    full = VisualADImageProcessor(size=SIZE, bit_depth_scaling="full")
    scaled = np.rint(values / 257.0).astype(np.uint8)
    expected = reference_pixels(resize_then_rgb(Image.fromarray(scaled)))
    torch.testing.assert_close(full(image)["pixel_values"][0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_modes(processor, mode):
    values = np.random.default_rng(2).integers(-500, 3000, (17, 23))
    image = Image.fromarray(values.astype(np.int32 if mode == "I" else np.float32), mode=mode)
    stretched = np.rint((values - values.min()) * (255.0 / (values.max() - values.min()))).astype(np.uint8)
    expected = reference_pixels(resize_then_rgb(Image.fromarray(stretched)))
    torch.testing.assert_close(processor(image)["pixel_values"][0], expected, atol=1e-6, rtol=0)


def test_arrays_and_tensors(processor):
    image = random_image("RGB")
    hwc = np.array(image)
    expected = processor(image)["pixel_values"]
    for variant in (hwc, np.moveaxis(hwc, -1, 0), torch.from_numpy(hwc).permute(2, 0, 1), torch.from_numpy(hwc)):
        torch.testing.assert_close(processor(variant)["pixel_values"], expected, atol=0, rtol=0)
    as_float = torch.from_numpy(hwc).permute(2, 0, 1).float() / 255  # torchvision's ToTensor convention
    torch.testing.assert_close(processor(as_float)["pixel_values"], expected, atol=0, rtol=0)
    batch = processor(torch.stack([torch.from_numpy(hwc).permute(2, 0, 1)] * 2))["pixel_values"]
    assert batch.shape == (2, 3, SIZE, SIZE)
    gray = np.array(random_image("L"))
    torch.testing.assert_close(
        processor(gray)["pixel_values"], processor(Image.fromarray(gray))["pixel_values"], atol=0, rtol=0
    )
    _, values = sixteen_bit_image()
    torch.testing.assert_close(
        processor(values)["pixel_values"], processor(Image.fromarray(values))["pixel_values"], atol=0, rtol=0
    )
    assert processor([image, gray], return_tensors="np")["pixel_values"].shape == (2, 3, SIZE, SIZE)


def test_bad_arrays(processor):
    with pytest.raises(ValueError, match="NaN"):
        processor(np.full((8, 8), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="channel axis"):
        processor(np.zeros((8, 9, 7), dtype=np.uint8))
    with pytest.raises(TypeError, match="Unsupported image type"):
        processor(12)


def exif_rotated_png(path, orientation: int) -> Image.Image:
    """A 40x20 image whose left half is white, saved with an EXIF orientation tag; returns the stored image."""
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = 255
    array[:5, :, 0] = 200  # a red band at the top, so that flips are visible too
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)
    return image


def test_exif_orientation(tmp_path, processor):
    stored = exif_rotated_png(tmp_path / "rotated.png", orientation=6)  # viewers rotate it 90 degrees clockwise
    loaded = load_image(tmp_path / "rotated.png")
    assert loaded.size == (20, 40)
    upright = stored.transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(np.asarray(loaded), np.asarray(upright))
    expected = reference_pixels(resize_then_rgb(upright))
    torch.testing.assert_close(processor(str(tmp_path / "rotated.png"))["pixel_values"][0], expected, atol=1e-6, rtol=0)
    # An opened PIL image with the tag is oriented the same way.
    torch.testing.assert_close(
        processor(Image.open(tmp_path / "rotated.png"))["pixel_values"][0], expected, atol=1e-6, rtol=0
    )


# ------------------------------------------------------------------------------------------------ masks
def reference_mask(binary: np.ndarray) -> torch.Tensor:
    resized = Image.fromarray(binary.astype(np.uint8) * 255).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(resized) / 255.0 > 0.5).float()


def test_masks(tmp_path, processor):
    images = [random_image("RGB", seed=seed) for seed in range(4)]
    binary = np.zeros((17, 23), dtype=bool)
    binary[3:9, 5:14] = True
    binary[12, 20] = True  # a single pixel: vanishes or survives exactly as the authors' resize decides
    Image.fromarray(binary.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    masks = [binary.astype(np.uint8), None, str(tmp_path / "mask.png"), torch.from_numpy(binary)[None]]
    out = processor(images, masks=masks)
    assert out["masks"].shape == (4, SIZE, SIZE) and out["masks"].dtype == torch.float32
    expected = reference_mask(binary)
    assert expected.sum() > 0
    for index in (0, 2, 3):
        torch.testing.assert_close(out["masks"][index], expected, atol=0, rtol=0)
    assert out["masks"][1].sum() == 0
    assert set(out["masks"].unique().tolist()) <= {0.0, 1.0}


def test_mask_threshold_and_errors(processor):
    image = random_image("RGB")
    faint = np.zeros((17, 23), dtype=np.uint8)
    faint[4:12, 4:12] = 60  # e.g. JPEG noise
    assert processor(image, masks=[faint])["masks"].sum() > 0  # the authors' "> 0"
    strict = VisualADImageProcessor(size=SIZE, mask_threshold=128)
    assert strict(image, masks=[faint])["masks"].sum() == 0
    with pytest.raises(ValueError, match="its image's size"):
        processor(image, masks=[np.zeros((5, 5), dtype=np.uint8)])
    with pytest.raises(ValueError, match="one per image"):
        processor([image, image], masks=[None])


def test_collator():
    processor = VisualADImageProcessor(size=SIZE)
    mask = np.zeros((17, 23), dtype=np.uint8)
    mask[2:10, 2:10] = 255
    rows = [
        {"image": random_image("RGB"), "mask": None, "label": 0, "category": "a", "image_path": "a/0.png"},
        {
            "image": random_image("L"),
            "mask": Image.fromarray(mask),
            "label": 1,
            "category": "b",
            "image_path": "b/1.png",
        },
    ]
    batch = VisualADCollator(processor)(rows)
    assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE)
    assert batch["labels"].tolist() == [0, 1] and batch["labels"].dtype == torch.long
    assert batch["category"] == ["a", "b"] and batch["image_path"] == ["a/0.png", "b/1.png"]
    torch.testing.assert_close(batch["masks"][1], reference_mask(mask > 0), atol=0, rtol=0)
    assert batch["masks"][0].sum() == 0
    assert "masks" not in VisualADCollator(processor, return_masks=False)(rows)
    rows[1]["mask"] = Image.fromarray(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="b/1.png"):
        VisualADCollator(processor)(rows)


# ------------------------------------------------------------------------------------------------ save / load
def test_save_load_round_trip(tmp_path):
    config = tiny_visualad_config("dinov2", gaussian_sigma=2.5, topk_ratio=0.05)
    processor = VisualADImageProcessor.from_model_config(config, bit_depth_scaling="full", mask_threshold=128)
    assert processor.size == {"height": 70, "width": 70}
    assert tuple(processor.image_mean) == tuple(IMAGENET_DEFAULT_MEAN)
    assert (processor.gaussian_sigma, processor.topk_ratio) == (2.5, 0.05)
    assert tuple(VisualADImageProcessor.from_model_config(tiny_visualad_config("clip")).image_mean) == tuple(
        OPENAI_CLIP_MEAN
    )
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    config.save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is VisualADImageProcessor
    for key in (
        "size",
        "image_mean",
        "image_std",
        "gaussian_sigma",
        "topk_ratio",
        "bit_depth_scaling",
        "mask_threshold",
    ):
        assert getattr(reloaded, key) == getattr(processor, key), key
    image = random_image("LA")
    torch.testing.assert_close(reloaded(image)["pixel_values"], processor(image)["pixel_values"], atol=0, rtol=0)


def test_invalid_settings():
    with pytest.raises(ValueError, match="bit_depth_scaling"):
        VisualADImageProcessor(bit_depth_scaling="auto")
    with pytest.raises(ValueError, match="topk_ratio"):
        VisualADImageProcessor(topk_ratio=0)
    with pytest.raises(ValueError, match="RGB"):
        VisualADImageProcessor(do_convert_rgb=False)


# ------------------------------------------------------------------------------------------------ smoothing
@pytest.mark.parametrize("height, width", [(1, 1), (2, 3), (5, 7), (16, 33), (40, 17), (70, 70)])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5, 4.0, 7.0])
def test_gaussian_smooth_matches_scipy(height, width, sigma):
    """Maps smaller than the kernel radius included: scipy's 'reflect' keeps reflecting."""
    maps = np.random.default_rng(height * 100 + width).normal(size=(3, height, width))
    expected = np.stack([gaussian_filter(m, sigma, mode="reflect", truncate=4.0) for m in maps])
    single = gaussian_smooth(torch.from_numpy(maps).float(), sigma).numpy()
    np.testing.assert_allclose(single, expected, atol=1e-5, rtol=0)
    exact = gaussian_smooth(torch.from_numpy(maps), sigma).numpy()
    np.testing.assert_allclose(exact, expected, atol=1e-12, rtol=0)


def test_gaussian_smooth_shapes_and_zero_sigma():
    maps = torch.randn(2, 3, 9, 11)
    smoothed = gaussian_smooth(maps, 2.0)
    assert smoothed.shape == maps.shape and smoothed.dtype == torch.float32
    torch.testing.assert_close(smoothed[1, 2], gaussian_smooth(maps[1, 2], 2.0))
    assert gaussian_smooth(maps, 0) is maps
    large = torch.randn(5, 300, 300, dtype=torch.float64)  # several cache-sized chunks on CPU
    expected = np.stack([gaussian_filter(m, 3.0) for m in large.numpy()])
    np.testing.assert_allclose(gaussian_smooth(large, 3.0).numpy(), expected, atol=1e-12, rtol=0)
    assert gaussian_smooth(maps.half(), 1.0).dtype == torch.float32
    with pytest.raises(ValueError):
        gaussian_smooth(maps, -1.0)


# ------------------------------------------------------------------------------------------------ post-processing
def test_post_process_reproduces_authors_scores():
    expected = load_file(str(PARITY_DIR / "expected.safetensors"))
    results = VisualADImageProcessor(size=70).post_process_anomaly_detection(expected["anomaly_map"])
    for index, result in enumerate(results):
        torch.testing.assert_close(result["anomaly_map"], expected["anomaly_map_blurred"][index], atol=1e-5, rtol=0)
        assert result["score"] == pytest.approx(expected["image_scores"][index].item(), abs=1e-5)


def test_post_process_scores_and_target_sizes():
    processor = VisualADImageProcessor(size=SIZE, gaussian_sigma=1.5, topk_ratio=0.05)
    maps = torch.randn(2, SIZE, SIZE)
    results = processor.post_process_anomaly_detection(maps, target_sizes=[(17, 23), (SIZE, SIZE)])
    smoothed = gaussian_smooth(maps, 1.5)
    k = math.ceil(0.05 * SIZE * SIZE)
    for index, result in enumerate(results):
        top = smoothed[index].flatten().sort(descending=True).values[:k].mean().item()
        assert result["score"] == pytest.approx(top, abs=1e-6)
    assert results[0]["anomaly_map"].shape == (17, 23)
    torch.testing.assert_close(results[1]["anomaly_map"], smoothed[1])
    resized = torch.nn.functional.interpolate(smoothed[:1, None], size=(17, 23), mode="bilinear", align_corners=False)
    torch.testing.assert_close(results[0]["anomaly_map"], resized[0, 0])
    unsmoothed = processor.post_process_anomaly_detection(maps, gaussian_sigma=0)
    torch.testing.assert_close(unsmoothed[0]["anomaly_map"], maps[0])
    with pytest.raises(ValueError, match="target sizes"):
        processor.post_process_anomaly_detection(maps, target_sizes=[(4, 4)])


# ------------------------------------------------------------------------------------------------ unreadable files
def test_unreadable_files(tmp_path):
    good = tmp_path / "good.png"
    random_image("RGB", size=(40, 40)).save(good)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:200])
    png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    cases = {
        "empty.png": "empty file",
        "text.png": "not an image",
        "truncated.png": "truncated",
        "bomb.png": "decompression bomb",
        "missing.png": "no such file",
    }
    for name, reason in cases.items():
        with pytest.raises(ImageLoadError, match=reason) as caught:
            load_image(tmp_path / name)
        assert caught.value.source == str(tmp_path / name)
    lazily_opened = Image.open(tmp_path / "truncated.png")  # a PIL image whose pixels are read on first use
    with pytest.raises(ImageLoadError, match="truncated") as caught:
        VisualADImageProcessor(size=SIZE)(lazily_opened)
    assert caught.value.source == str(tmp_path / "truncated.png")
    with pytest.raises(ImageLoadError, match="exceeds the limit of 1,000"):
        load_image(good, max_pixels=1000)
    assert load_image(good).size == (40, 40)
