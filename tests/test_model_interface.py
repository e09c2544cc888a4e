"""The model's transformers-facing interface, one regression test per failure transformers' common tests found.

forward's hidden states / attentions and its keyword arguments, loading a plain backbone folder, initialisation of
backbone tensors missing from a checkpoint, the processor's call-time flags, the config's `validate_*` methods, and
the integer top-k that lets a dynamic-shape `torch.export` be serialised.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_visualad_config
from transformers import AutoModel, CLIPVisionModel

from visualad_hf import VisualADConfig, VisualADImageProcessor, VisualADModel
from visualad_hf.configuration_visualad import VisualADConfigError
from visualad_hf.image_processing_visualad import ImageProcessorSettingError
from visualad_hf.scoring import topk_count, topk_mean

FAMILIES = ["clip", "dinov2", "dinov2_registers"]


def _model(kind: str = "clip", attn: str = "eager", **overrides) -> VisualADModel:
    torch.manual_seed(0)
    return VisualADModel._from_config(tiny_visualad_config(kind, **overrides), attn_implementation=attn).eval()


def _pixels(batch: int = 2, size: int = 70) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


# --- forward: hidden states, attentions, keyword arguments ---------------------------------------------------------


@pytest.mark.parametrize("kind", FAMILIES)
def test_hidden_states_are_the_backbone_sequence_with_the_two_tokens(kind):
    model = _model(kind)
    pixel_values = _pixels()
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True)
        sequence, token_position = model._embed(pixel_values)
        tokens = model.tokens(pixel_values.shape[0], token_position).to(sequence.dtype)
        kept, last = model.run_backbone_layers(
            torch.cat([tokens, sequence], dim=1), list(range(1, 5)), **model.backbone_layer_kwargs(pixel_values)
        )
    config = model.config
    assert len(out.hidden_states) == config.vision_config.num_hidden_layers + 1
    length = 2 + config.num_prefix_tokens + config.grid_size**2
    assert all(h.shape == (2, length, config.hidden_size) for h in out.hidden_states)
    for layer in range(1, 5):  # layer outputs are the sequences the heads read, tokens first
        torch.testing.assert_close(out.hidden_states[layer], kept[layer], rtol=0, atol=0)
    torch.testing.assert_close(out.hidden_states[-1], last, rtol=0, atol=0)
    torch.testing.assert_close(out.hidden_states[-1][:, :2], last[:, :2])
    assert out.attentions is None
    without = model(pixel_values)
    assert without.hidden_states is None
    torch.testing.assert_close(without.anomaly_map, out.anomaly_map, rtol=0, atol=0)


@pytest.mark.parametrize("kind", FAMILIES)
def test_attentions_cover_the_tokens_and_sum_to_one(kind):
    model = _model(kind)
    with torch.no_grad():
        out = model(_pixels(), output_attentions=True)
    config = model.config
    length = 2 + config.num_prefix_tokens + config.grid_size**2
    assert len(out.attentions) == config.vision_config.num_hidden_layers
    for attention in out.attentions:
        assert attention.shape == (2, config.vision_config.num_attention_heads, length, length)
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))


def test_output_flags_from_the_config_and_selected_layers():
    model = _model("clip")
    model.config.output_hidden_states = True
    with torch.no_grad():
        every = model(_pixels()).hidden_states
        picked = model(_pixels(), output_hidden_states=[0, 2]).hidden_states
    assert len(every) == 5
    assert [h is None for h in picked] == [False, True, False, True, True]
    torch.testing.assert_close(picked[2], every[2], rtol=0, atol=0)


def test_unknown_keyword_arguments_raise_type_error():
    model = _model("clip")
    with pytest.raises(TypeError, match="unexpected keyword argument 'pixel_mask'"):
        model(_pixels(), pixel_mask=torch.ones(2, 70, 70))
    with pytest.raises(TypeError, match="interpolate_pos_encoding"):
        model(_pixels(), interpolate_pos_encoding=True)


def test_return_dict_false_gives_the_tuple_of_set_fields():
    model = _model("clip")
    with torch.no_grad():
        as_tuple = model(_pixels(), return_dict=False)
        as_output = model(_pixels())
    assert len(as_tuple) == 3  # anomaly_map, layer_anomaly_maps, image_logits
    torch.testing.assert_close(as_tuple[0], as_output.anomaly_map, rtol=0, atol=0)


# --- loading -----------------------------------------------------------------------------------------------------


def test_from_pretrained_on_a_plain_backbone_folder_points_to_from_backbone(tmp_path):
    config = tiny_visualad_config("clip")
    CLIPVisionModel(config.vision_config).save_pretrained(tmp_path)
    with pytest.raises(VisualADConfigError, match=r"'clip_vision_model' model, which has no VisualAD heads.*"
                       r"VisualADModel\.from_backbone"):
        VisualADModel.from_pretrained(tmp_path)
    model = VisualADModel.from_backbone(str(tmp_path), feature_layers=[1, 2, 3, 4], image_size=70)  # the way
    assert isinstance(model, VisualADModel)


@pytest.mark.parametrize("kind", FAMILIES)
def test_backbone_tensors_missing_from_a_checkpoint_get_the_backbones_own_init(kind):
    """A VisualAD checkpoint without backbone tensors: those get the backbone class's init, not the generic 0.02."""
    config = tiny_visualad_config(kind)
    torch.manual_seed(0)
    loaded = VisualADModel.from_pretrained(None, config=config, state_dict={})
    torch.manual_seed(0)
    own = AutoModel.from_config(config.vision_config)
    for name, tensor in own.state_dict().items():
        ours = loaded.backbone.state_dict()[name]
        assert ours.shape == tensor.shape
        if tensor.numel() > 1 and tensor.float().std() > 0:  # random tensors: same distribution as the backbone's
            assert float(ours.float().std()) == pytest.approx(float(tensor.float().std()), rel=0.5), name
        else:  # constants (LayerNorm ones/zeros, ...)
            torch.testing.assert_close(ours, tensor, rtol=0, atol=0)
    if kind == "clip":  # CLIP's attention init, width**-0.5 * (2 * layers)**-0.5 (0.044 here), not the generic 0.02
        vision = config.vision_config
        clip_std = vision.hidden_size**-0.5 * (2 * vision.num_hidden_layers) ** -0.5
        q_std = float(loaded.backbone.encoder.layers[0].self_attn.q_proj.weight.std())
        assert q_std == pytest.approx(clip_std, rel=0.1) and abs(q_std - 0.02) > 0.01


# --- the image processor's call-time flags ------------------------------------------------------------------------


def test_call_time_do_convert_rgb_false_gets_the_same_clear_error_as_init():
    processor = VisualADImageProcessor(size={"height": 28, "width": 28})
    four_channels = np.random.default_rng(0).integers(0, 256, (30, 40, 4), dtype=np.uint8)
    with pytest.raises(ImageProcessorSettingError, match="do_convert_rgb cannot be False") as at_call:
        processor(four_channels, do_convert_rgb=False, image_mean=[0.0] * 4, image_std=[1.0] * 4)
    with pytest.raises(ImageProcessorSettingError, match="do_convert_rgb cannot be False") as at_init:
        VisualADImageProcessor(do_convert_rgb=False)
    assert str(at_call.value) == str(at_init.value)
    assert processor(four_channels, do_convert_rgb=True)["pixel_values"].shape == (1, 3, 28, 28)


# --- config invariants: public validate_* methods, never saved invalid ---------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("image_size", 71, "image_size=71 is not a positive multiple of the backbone's patch size 14; use e.g. 70"),
        ("topk_ratio", 5.0, r"topk_ratio=5.0 must lie in \(0, 1\]"),
        ("saf_type", "transformer", "saf_type='transformer' is unknown"),
        ("feature_layers", [2, 9], r"feature_layers \[9\] lie outside the backbone, which has layers 1..4"),
    ],
)
def test_an_invalid_config_is_never_saved(field, value, message, tmp_path):
    config = tiny_visualad_config("clip")
    setattr(config, field, value)
    with pytest.raises(VisualADConfigError, match=message):
        config.save_pretrained(tmp_path / "config")
    assert not (tmp_path / "config").exists()
    with pytest.raises(VisualADConfigError, match=message):
        tiny_visualad_config("clip", **{field: value})


def test_validators_are_public_methods_strict_runs():
    names = {validator.__name__ for validator in VisualADConfig.__class_validators__}
    assert {"validate_backbone", "validate_feature_layers", "validate_heads", "validate_input_size",
            "validate_scoring", "validate_normalization", "validate_position_interpolation"} <= names
    assert str(VisualADConfig.__dataclass_fields__["saf_type"].type) == "SafType"


# --- top-k with integer arithmetic, and a dynamic-shape export that can be saved ------------------------------------


@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.1, 0.02, 0.001, 0.25, 1.0])
def test_topk_count_equals_the_ceil_of_the_product(ratio):
    for size in (1, 2, 5, 99, 100, 101, 4900, 518 * 518, 512 * 512, 1024 * 1024):
        assert topk_count(ratio, size) == max(1, math.ceil(ratio * size)), size


def test_topk_count_is_exact_where_the_float_product_overshoots():
    assert 0.07 * 100 == pytest.approx(7) and math.ceil(0.07 * 100) == 8
    assert topk_count(0.07, 100) == 7
    with pytest.raises(ValueError, match="ratio"):
        topk_count(0.0, 100)
    maps = torch.arange(200.0).reshape(2, 10, 10)
    torch.testing.assert_close(topk_mean(maps, 0.07), maps.flatten(1).topk(7).values.mean(1))


def test_dynamic_shape_export_can_be_saved_and_loaded(tmp_path):
    model = _model("clip", attn="sdpa")
    batch, grid = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("grid", min=5, max=8)
    exported = torch.export.export(
        model, (_pixels(2, 70),), dynamic_shapes={"pixel_values": {0: batch, 2: 14 * grid, 3: 14 * grid}}, strict=False
    )
    path = tmp_path / "visualad.pt2"
    torch.export.save(exported, path)
    reloaded = torch.export.load(path).module()
    for pixel_values in (_pixels(1, 70), _pixels(3, 84)):
        with torch.no_grad():
            expected = model(pixel_values)
        got = reloaded(pixel_values)
        torch.testing.assert_close(got.anomaly_map, expected.anomaly_map)
        torch.testing.assert_close(got.image_logits, expected.image_logits)
