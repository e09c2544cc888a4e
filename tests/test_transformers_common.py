"""transformers' own common tests (ModelTesterMixin, ConfigTester, ImageProcessingTestMixin) run on VisualAD.

The mixins come from the pinned transformers source distribution at test time (`tests/transformers_sdist.py`), so
VisualAD is held to what transformers checks its own models with, on tiny backbones of every supported family.
`SKIPPED` lists each common test that cannot apply to VisualAD, with the reason; every other test runs. Tests that
transformers itself marks as needing hardware or packages absent here (CUDA, flash-attention, DeepSpeed, `@slow`)
skip through transformers' own decorators, with their own messages.
"""

from __future__ import annotations

import unittest

import pytest
import torch
from conftest import tiny_vision_config
from transformers_sdist import load_common_tests

from visualad_hf import VisualADConfig, VisualADImageProcessor, VisualADModel

common = load_common_tests()
ModelTesterMixin = common.test_modeling_common.ModelTesterMixin
floats_tensor = common.test_modeling_common.floats_tensor
ConfigTester = common.test_configuration_common.ConfigTester
ImageProcessingTestMixin = common.test_image_processing_common.ImageProcessingTestMixin
ImageProcessingTester = common.test_image_processing_common.ImageProcessingTester

# Each skipped common test, and why it cannot apply to VisualAD.
SKIPPED_MODEL_TESTS: dict[str, str] = {}
SKIPPED_IMAGE_PROCESSING_TESTS: dict[str, str] = {}

# Tiny backbones: 2 layers, width 32; 20 px inputs on patch 4 give a 5x5 grid (a native 4x4 table resized).
TINY_BACKBONE = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=4)
FAMILIES = {
    "clip": dict(image_size=16),
    "dinov2": dict(image_size=16),
    "dinov2_registers": dict(image_size=16),
}


def _tiny_backbone(family: str):
    overrides = {**TINY_BACKBONE, **FAMILIES[family]}
    if family != "clip":
        overrides.pop("intermediate_size")
        overrides["mlp_ratio"] = 2
    return tiny_vision_config(family, **overrides)


class VisualADModelTester:
    """What ModelTesterMixin asks of a model tester, for VisualAD heads on a tiny backbone of `family`."""

    def __init__(self, parent, family: str, batch_size: int = 2, image_size: int = 20):
        self.parent = parent
        self.family = family
        self.batch_size = batch_size
        self.image_size = image_size
        self.vision_config = _tiny_backbone(family)
        self.hidden_size = self.vision_config.hidden_size
        self.num_hidden_layers = self.vision_config.num_hidden_layers
        self.num_attention_heads = self.vision_config.num_attention_heads
        self.patch_size = self.vision_config.patch_size
        self.is_training = True
        prefix = 1 + int(getattr(self.vision_config, "num_register_tokens", 0) or 0)
        # The backbone sequence VisualAD runs: anomaly and normal tokens, CLS (+ registers), patches.
        self.seq_length = 2 + prefix + (image_size // self.patch_size) ** 2

    def get_config(self) -> VisualADConfig:
        return VisualADConfig(
            vision_config=self.vision_config.to_dict(),
            feature_layers=[1, 2],
            num_anchors=2,
            max_patches=32,
            image_size=self.image_size,
        )

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        return self.get_config(), pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


def _apply_skips(cls: type, skipped: dict[str, str]) -> type:
    """Mark the listed tests (and their `parameterized` expansions) as skipped, with the reason."""
    for name in dir(cls):
        base = next((key for key in skipped if name == key or name.startswith(key + "_")), None)
        if base is not None and name.startswith("test_"):
            setattr(cls, name, unittest.skip(skipped[base])(getattr(cls, name)))
    return cls


class _VisualADModelTest(ModelTesterMixin):
    family = "clip"
    all_model_classes = (VisualADModel,)
    pipeline_model_mapping = {}
    test_resize_embeddings = False
    test_torch_exportable = False  # the exporter mixin is not in the sdist (tests/transformers_sdist.py)
    has_attentions = True

    def setUp(self):
        self.model_tester = VisualADModelTester(self, self.family)
        self.config_tester = ConfigTester(self, config_class=VisualADConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()


def _model_test_class(family: str) -> type:
    name = "VisualAD" + "".join(part.capitalize() for part in family.split("_")) + "ModelTest"
    cls = type(name, (_VisualADModelTest, unittest.TestCase), {"family": family, "__module__": __name__})
    return _apply_skips(cls, SKIPPED_MODEL_TESTS)


for _family in FAMILIES:
    _cls = _model_test_class(_family)
    globals()[_cls.__name__] = _cls
del _family, _cls


class VisualADImageProcessingTester(ImageProcessingTester):
    def __init__(self, parent, **kwargs):
        kwargs.setdefault("size", {"height": 28, "width": 28})
        kwargs.setdefault("min_resolution", 16)
        kwargs.setdefault("max_resolution", 48)
        super().__init__(parent, **kwargs)

    def _get_image_processing_classes(self):
        # transformers finds a model's processors from its test folder's name; VisualAD registers only a PIL one.
        return {"pil": VisualADImageProcessor}


@pytest.mark.filterwarnings("ignore::UserWarning")
class VisualADImageProcessingTest(ImageProcessingTestMixin, unittest.TestCase):
    image_processor_tester_class = VisualADImageProcessingTester


_apply_skips(VisualADImageProcessingTest, SKIPPED_IMAGE_PROCESSING_TESTS)


def test_every_skip_names_a_common_test():
    """A skip entry whose test transformers renamed or removed would hide nothing; keep the lists exact."""
    model_tests = set(dir(ModelTesterMixin))
    image_tests = set(dir(ImageProcessingTestMixin))
    for skipped, names in ((SKIPPED_MODEL_TESTS, model_tests), (SKIPPED_IMAGE_PROCESSING_TESTS, image_tests)):
        for key in skipped:
            assert any(name == key or name.startswith(key + "_") for name in names), key


def test_tiny_backbones_run_the_real_model():
    """The testers build what they claim: every family's tiny VisualAD model runs its forward."""
    for family in FAMILIES:
        tester = VisualADModelTester(None, family)
        config, inputs = tester.prepare_config_and_inputs_for_common()
        with torch.no_grad():
            out = VisualADModel(config).eval()(**inputs)
        assert out.anomaly_map.shape == (tester.batch_size, tester.image_size, tester.image_size)
