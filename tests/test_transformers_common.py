"""transformers' own common tests (ModelTesterMixin, ConfigTester, ImageProcessingTestMixin) run on VisualAD.

The mixins come from the pinned transformers source distribution at test time (`tests/transformers_sdist.py`), so
VisualAD is held to what transformers checks its own models with, on tiny backbones of every supported family.
`SKIPPED` lists each common test that cannot apply to VisualAD, with the reason; every other test runs. Tests that
transformers itself marks as needing hardware or packages absent here (CUDA, flash-attention, DeepSpeed, `@slow`)
skip through transformers' own decorators, with their own messages.
"""

from __future__ import annotations

import unittest
from typing import ClassVar

import pytest
import torch
from conftest import FAMILIES
from transformers_sdist import load_common_tests

from visualad_hf import VisualADConfig, VisualADImageProcessor, VisualADModel

common = load_common_tests()
ModelTesterMixin = common.test_modeling_common.ModelTesterMixin
floats_tensor = common.test_modeling_common.floats_tensor
ConfigTester = common.test_configuration_common.ConfigTester
ImageProcessingTestMixin = common.test_image_processing_common.ImageProcessingTestMixin
ImageProcessingTester = common.test_image_processing_common.ImageProcessingTester

# Each skipped common test, and why it cannot apply to VisualAD.
SKIPPED_MODEL_TESTS: dict[str, str] = {
    "test_model_get_set_embeddings": (
        "asserts that the input embedding is a token nn.Embedding and swaps in nn.Embedding(10, 10); an image "
        "model's input embedding is its patch-embedding convolution (transformers' own CLIP vision and DINOv2 tests "
        "replace this test for that reason); test_input_embeddings_are_the_backbone_patch_embedding checks ours"
    ),
    "test_correct_missing_keys": (
        "loads a bare backbone folder with VisualADModel.from_pretrained expecting fresh heads; VisualAD refuses "
        "that on purpose (untrained heads would score at random without a word) and names "
        "VisualADModel.from_backbone, the equivalent path, which tests/test_modeling.py checks leaves exactly the "
        "head tensors missing"
    ),
}
# Family-specific: the test cannot apply to VisualAD on that backbone.
SKIPPED_MODEL_TESTS_PER_FAMILY: dict[str, dict[str, str]] = {
    "radio": {
        "test_can_load_ignoring_mismatched_shapes": (
            "transformers' _config_zero_init sets every config field whose name contains '_std' to the float 1e-10; "
            "RadioConfig.norm_std is a 3-value list, which its strict dataclass refuses to hold a float, so the test "
            "cannot build its config (it passes on every other family)"
        ),
    },
}
_RGB_ONLY = (
    "calls the processor with do_convert_rgb=False; VisualAD's backbones take RGB only, so that setting is refused "
    "with ImageProcessorSettingError, in __init__ and per call (tests/test_image_processing.py)"
)
SKIPPED_IMAGE_PROCESSING_TESTS: dict[str, str] = {
    "test_call_numpy_4_channels": f"expects 4-channel pixel_values: it {_RGB_ONLY}",
    "test_image_processor_from_dict_with_kwargs_has_attributes": (
        f"its only kwarg is do_convert_rgb=False: it {_RGB_ONLY}; from_dict's attributes are checked by "
        "test_image_processor_from_dict_has_attributes"
    ),
    "test_new_models_require_torchvision_backend": (
        "a rule for models added to the transformers library; VisualAD ships only the PIL backend on purpose: "
        "torchvision is not a dependency, and the PIL path reproduces the authors' preprocessing exactly"
    ),
}

# The shared family parametrisation (conftest.FAMILIES: tiny random backbones of every supported family), cut to the
# 2 layers transformers' test_num_layers_is_small allows; inputs of 5x5 patches (a native 4x4 table resized).


def _tiny_backbone(family: str):
    return FAMILIES[family].vision_config(num_hidden_layers=2)


class VisualADModelTester:
    """What ModelTesterMixin asks of a model tester, for VisualAD heads on a tiny backbone of `family`."""

    def __init__(self, parent, family: str, batch_size: int = 2, grid: int = 5):
        self.parent = parent
        self.family = family
        self.batch_size = batch_size
        self.vision_config = _tiny_backbone(family)
        self.patch_size = FAMILIES[family].patch_size
        self.image_size = grid * self.patch_size
        self.hidden_size = self.vision_config.hidden_size
        self.num_hidden_layers = self.vision_config.num_hidden_layers
        self.num_attention_heads = self.vision_config.num_attention_heads
        self.is_training = True
        # The backbone sequence VisualAD runs: anomaly and normal tokens, the prefix (CLS, registers), patches.
        self.seq_length = 2 + self.get_config().num_prefix_tokens + grid**2

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
    pipeline_model_mapping: ClassVar[dict] = {}
    test_resize_embeddings = False
    test_torch_exportable = False  # the exporter mixin is not in the sdist (tests/transformers_sdist.py)
    test_can_init_all_missing_weights_before_2023 = True  # our config file has no copyright year: run it
    _is_composite = True  # a VisualAD config nests its backbone's (vision_config): run the composite-model tests
    has_attentions = True

    def setUp(self):
        self.model_tester = VisualADModelTester(self, self.family)
        self.config_tester = ConfigTester(self, config_class=VisualADConfig, has_text_modality=False)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:  # VisualAD's losses take masks (and image labels derived from them)
            batch, _, height, width = inputs_dict["pixel_values"].shape
            masks = torch.zeros(batch, height, width)
            masks[0, : height // 2, : width // 2] = 1.0
            inputs_dict["masks"] = masks
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()


def _model_test_class(family: str) -> type:
    name = "VisualAD" + "".join(part.capitalize() for part in family.split("_")) + "ModelTest"
    cls = type(name, (_VisualADModelTest, unittest.TestCase), {"family": family, "__module__": __name__})
    return _apply_skips(cls, {**SKIPPED_MODEL_TESTS, **SKIPPED_MODEL_TESTS_PER_FAMILY.get(family, {})})


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
    per_family = {key: reason for skips in SKIPPED_MODEL_TESTS_PER_FAMILY.values() for key, reason in skips.items()}
    assert set(SKIPPED_MODEL_TESTS_PER_FAMILY) <= set(FAMILIES)
    checks = ((SKIPPED_MODEL_TESTS, model_tests), (per_family, model_tests), (SKIPPED_IMAGE_PROCESSING_TESTS, image_tests))
    for skipped, names in checks:
        for key in skipped:
            assert any(name == key or name.startswith(key + "_") for name in names), key


@pytest.mark.parametrize("family", list(FAMILIES))
def test_input_embeddings_are_the_backbone_patch_embedding(family):
    """What test_model_get_set_embeddings checks, for an image model: the input embedding is the backbone's."""
    config, _ = VisualADModelTester(None, family).prepare_config_and_inputs_for_common()
    model = VisualADModel(config)
    try:
        expected = model.backbone.get_input_embeddings()
    except NotImplementedError:  # RADIO's model does not name one: neither does VisualAD on it
        with pytest.raises(NotImplementedError):
            model.get_input_embeddings()
    else:
        assert model.get_input_embeddings() is expected
        assert isinstance(expected, torch.nn.Module)
    assert model.get_output_embeddings() is None


def test_tiny_backbones_run_the_real_model():
    """The testers build what they claim: every family's tiny VisualAD model runs its forward."""
    for family in FAMILIES:
        tester = VisualADModelTester(None, family)
        config, inputs = tester.prepare_config_and_inputs_for_common()
        with torch.no_grad():
            out = VisualADModel(config).eval()(**inputs)
        assert out.anomaly_map.shape == (tester.batch_size, tester.image_size, tester.image_size)
