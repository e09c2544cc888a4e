"""Backbone adapters: every family runs VisualAD the same way (SPEC §1, issue 12).

One parametrisation over `conftest.FAMILIES` (tiny random configs): the adapter's path reproduces the backbone's own
hidden states, the two tokens train, only the VisualAD parts and the final norm learn, save/load is exact,
`from_backbone` reads a plain folder, and the processor and model card carry the family's facts.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES
from transformers import AutoModel

from visualad_hf import VisualADConfig, VisualADImageProcessor, VisualADModel
from visualad_hf.backbones import ADAPTERS, backbone_adapter, supported_model_types
from visualad_hf.model_card import create_model_card

NAMES = list(FAMILIES)


def _config(name: str, size_in_patches: int = 5, **overrides) -> VisualADConfig:
    family = FAMILIES[name]
    defaults = {"feature_layers": [1, 2, 3, 4], "image_size": size_in_patches * family.patch_size}
    return VisualADConfig(vision_config=family.vision_config(), **{**defaults, **overrides})


def _model(name: str, attn: str | None = None, **overrides) -> VisualADModel:
    torch.manual_seed(0)
    config = _config(name, **overrides)
    if attn is None:
        return VisualADModel(config).eval()
    return VisualADModel._from_config(config, attn_implementation=attn).eval()


def _inputs(size: int, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, size, size, generator=generator)
    masks = (torch.rand(batch, size, size, generator=generator) > 0.8).float()
    masks[0] = 0
    return pixel_values, masks.flatten(1).amax(1), masks


def _backbone_path(model: VisualADModel, pixel_values: torch.Tensor, keep=(1, 2, 3, 4)):
    sequence, token_position = model._embed(pixel_values)
    kept, last = model.run_backbone_layers(sequence, list(keep), **model.backbone_layer_kwargs(pixel_values))
    return sequence, token_position, kept, last


# --- the backbone path is the backbone, unchanged -------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", NAMES)
def test_adapter_layers_reproduce_the_backbones_hidden_states(name, attn):
    """At the native size, with each family's default interpolation, the adapter's embedding and layer loop on the
    unmodified sequence equal the backbone's own forward."""
    family = FAMILIES[name]
    model = _model(name, attn=attn, size_in_patches=4)
    pixel_values = torch.randn(2, 3, family.native_size, family.native_size)
    with torch.no_grad():
        _, _, kept, last = _backbone_path(model, pixel_values)
        reference = family.hidden_states(model.backbone, pixel_values)
    for layer in (1, 2, 3, 4):
        torch.testing.assert_close(kept[layer], reference[layer], atol=1e-5, rtol=0)
    torch.testing.assert_close(last, reference[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("clip", "siglip")])
def test_backbone_positions_at_another_size_match_the_backbone(name):
    """Off the native grid, families whose positions only their own code computes (RoPE, CPE, NaFlex) and DINOv2
    still reproduce the backbone exactly (5x5 patches instead of the native 4x4)."""
    family = FAMILIES[name]
    model = _model(name, size_in_patches=5)
    assert model.config.resolved_position_interpolation == "backbone"
    size = 5 * family.patch_size
    pixel_values = torch.randn(1, 3, size, size)
    with torch.no_grad():
        _, _, _, last = _backbone_path(model, pixel_values, keep=[])
        reference = family.hidden_states(model.backbone, pixel_values)
    torch.testing.assert_close(last, reference[-1], atol=1e-5, rtol=0)


def test_siglip_backbone_interpolation_is_the_backbones_own_bicubic():
    model = _model("siglip", size_in_patches=5)
    pixel_values = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        _, _, _, last = _backbone_path(model, pixel_values, keep=[])
        reference = model.backbone(pixel_values, interpolate_pos_encoding=True, output_hidden_states=True)
    torch.testing.assert_close(last, reference.hidden_states[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_tokens_go_in_front_and_patches_start_after_the_prefix(name):
    model = _model(name)
    adapter = model.backbone_adapter
    pixel_values, _, _ = _inputs(model.config.image_size)
    with torch.no_grad():
        sequence, _ = model._embed(pixel_values)
    assert sequence.shape[1] == adapter.num_prefix_tokens + 25
    assert model.config.num_prefix_tokens == adapter.num_prefix_tokens


# --- training ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", NAMES)
def test_one_training_step_reaches_both_tokens(name, attn):
    model = _model(name, attn=attn).train()
    pixel_values, labels, masks = _inputs(model.config.image_size)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(pixel_values, labels=labels, masks=masks).loss
    assert torch.isfinite(loss)
    loss.backward()
    for token in (model.tokens.anomaly_token, model.tokens.normal_token):
        assert token.grad is not None and token.grad.abs().sum() > 0
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert {"tokens.anomaly_token", "tokens.normal_token"} <= moved
    assert any(n.startswith("spatial_cross_attention.") for n in moved)
    assert any(n.startswith("self_alignment.") for n in moved)


@pytest.mark.parametrize("name", NAMES)
def test_only_visualad_parts_and_the_final_norm_are_trainable(name):
    model = _model(name).train()
    pixel_values, labels, masks = _inputs(model.config.image_size)
    model(pixel_values, labels=labels, masks=masks).loss.backward()
    expected = {
        id(p)
        for part in (model.tokens, model.spatial_cross_attention, model.self_alignment, model.final_layernorm)
        for p in part.parameters()
    }
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == expected
    with_grad = {id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad <= expected
    assert {id(p) for p in model.final_layernorm.parameters()} <= with_grad
    groups = model.parameter_groups()
    assert {id(p) for params in groups.values() for p in params} == expected


@pytest.mark.parametrize("name", NAMES)
def test_gradient_checkpointing_gives_identical_token_gradients(name):
    """Per-call layer arguments (DINOv3's RoPE tables) survive the checkpointed recomputation."""
    pixel_values, labels, masks = _inputs(5 * FAMILIES[name].patch_size)
    grads = []
    for checkpointing in (False, True):
        model = _model(name, sca_dropout=0.0, saf_dropout=0.0).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.backbone_layers)
        model(pixel_values, labels=labels, masks=masks).loss.backward()
        grads.append(torch.cat([model.tokens.anomaly_token.grad, model.tokens.normal_token.grad]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_dinov3_rope_augmentation_stays_off_in_training():
    """DINOv3's RoPE module jitters/rescales coordinates in train(); the frozen backbone must not see that."""
    model = _model("dinov3", sca_dropout=0.0, saf_dropout=0.0).train()
    assert model.backbone.rope_embeddings.training is False
    assert model.backbone.model.layer[0].training is True  # the rest follows train(), for gradient checkpointing
    pixel_values, _, _ = _inputs(model.config.image_size)
    with torch.no_grad():
        first, second = model(pixel_values).anomaly_map, model(pixel_values).anomaly_map
        eval_map = model.eval()(pixel_values).anomaly_map
    assert torch.equal(first, second) and torch.equal(first, eval_map)


# --- token positions, prefix counts, final norms: the per-family decisions -------------------------------------


def test_token_position_embeddings_per_family():
    clip, dinov2, siglip = _model("clip"), _model("dinov2"), _model("siglip")
    assert torch.equal(clip._embed(torch.zeros(1, 3, 70, 70))[1], clip.backbone.embeddings.position_embedding.weight[0])
    dinov2_cls = dinov2.backbone.embeddings.position_embeddings[0, 0]
    assert torch.equal(dinov2._embed(torch.zeros(1, 3, 70, 70))[1], dinov2_cls)
    table = siglip.backbone.embeddings.position_embedding.weight
    torch.testing.assert_close(siglip._embed(torch.zeros(1, 3, 80, 80))[1], table.mean(0))
    for name in ("dinov3", "radio"):  # no absolute position on CLS there, so none on the tokens either
        model = _model(name)
        assert torch.count_nonzero(model._embed(torch.zeros(1, 3, 80, 80))[1]) == 0


def test_prefix_token_counts():
    counts = {name: _config(name).num_prefix_tokens for name in NAMES}
    assert counts == {
        "clip": 1,
        "dinov2": 1,
        "dinov2_registers": 3,
        "dinov3": 5,
        "siglip": 0,
        "siglip2_naflex": 0,
        "radio": 4,
    }


def test_radio_gets_a_fresh_final_layernorm():
    model = _model("radio")
    assert model.final_layernorm is model.added_layernorm
    assert torch.equal(model.added_layernorm.weight, torch.ones(64))
    assert model.added_layernorm.eps == model.config.vision_config.layer_norm_eps
    assert _model("clip").added_layernorm is None


@pytest.mark.parametrize("name", ["dinov3", "radio", "siglip2_naflex"])
def test_table_interpolation_is_refused_where_the_backbone_owns_positions(name):
    with pytest.raises(ValueError, match="does not apply to .* backbones"):
        _config(name, position_interpolation="bilinear")


def test_unsupported_model_type_lists_every_family():
    from transformers import ViTConfig

    with pytest.raises(ValueError, match="not supported") as error:
        VisualADConfig(vision_config=ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2))
    for model_type in supported_model_types():
        assert model_type in str(error.value)


def test_non_square_patches_are_refused():
    with pytest.raises(ValueError, match="not square"):
        VisualADConfig(vision_config=FAMILIES["dinov3"].vision_config(patch_size=[16, 8]), feature_layers=[1])


def test_default_image_size_follows_the_patch():
    assert VisualADConfig().image_size == 518  # SPEC §1, patch 14
    for name in ("dinov3", "siglip", "radio"):
        config = VisualADConfig(vision_config=FAMILIES[name].vision_config(), feature_layers=[4])
        assert (config.image_size, config.grid_size) == (512, 32)


def test_registry_covers_each_model_type_once():
    types = [t for adapter in ADAPTERS for t in adapter.model_types]
    assert len(types) == len(set(types)) == len(supported_model_types())
    for name in NAMES:
        assert backbone_adapter(FAMILIES[name].vision_config()).card.family


# --- save / load, from_backbone ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_save_pretrained_round_trip_is_bit_exact(name, tmp_path):
    model = _model(name)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, VisualADModel)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[key]), key
    assert loaded.num_parameters(only_trainable=True) == model.num_parameters(only_trainable=True)
    pixel_values, _, _ = _inputs(model.config.image_size)
    with torch.no_grad():
        assert torch.equal(model(pixel_values).anomaly_map, loaded(pixel_values).anomaly_map)


@pytest.mark.parametrize("name", NAMES)
def test_from_backbone_loads_a_plain_saved_folder(name, tmp_path):
    family = FAMILIES[name]
    torch.manual_seed(1)
    backbone = AutoModel.from_config(family.vision_config()).eval()
    backbone.save_pretrained(tmp_path)
    model = VisualADModel.from_backbone(str(tmp_path), feature_layers=[2, 4], image_size=5 * family.patch_size)
    for key, tensor in backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], tensor), key
    for name_, parameter in model.named_parameters():
        assert torch.isfinite(parameter).all(), name_
    assert model.config.image_mean is None  # no preprocessor_config.json: the family's constants
    processor = VisualADImageProcessor.from_model_config(model.config)
    assert tuple(processor.image_mean) == pytest.approx(family.image_mean)
    pixel_values, labels, masks = _inputs(model.config.image_size)
    assert torch.isfinite(model.train()(pixel_values, labels=labels, masks=masks).loss)


@pytest.mark.parametrize("name", NAMES)
def test_from_backbone_reads_the_folders_normalisation(name, tmp_path):
    family = FAMILIES[name]
    AutoModel.from_config(family.vision_config()).save_pretrained(tmp_path)
    custom = {"do_normalize": True, "image_mean": [0.1, 0.2, 0.3], "image_std": 0.25}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(custom))
    model = VisualADModel.from_backbone(str(tmp_path), feature_layers=[4], image_size=5 * family.patch_size)
    processor = VisualADImageProcessor.from_model_config(model.config)
    if name == "radio":  # RADIO normalises with its config's constants; its processor file does not normalise
        assert model.config.image_mean is None
        assert processor.image_mean == pytest.approx(list(family.image_mean))
    else:
        assert processor.image_mean == pytest.approx([0.1, 0.2, 0.3])
        assert processor.image_std == pytest.approx([0.25] * 3)


def test_from_backbone_full_siglip_checkpoint(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    vision = FAMILIES["siglip"].vision_config()
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 100}
    full = SiglipModel(SiglipConfig(vision_config=vision.to_dict(), text_config=text))
    full.save_pretrained(tmp_path)
    model = VisualADModel.from_backbone(str(tmp_path), feature_layers=[4], image_size=80)
    assert model.config.vision_config.model_type == "siglip_vision_model"
    for key, tensor in full.vision_model.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], tensor), key


@pytest.mark.parametrize("name", NAMES)
def test_processor_uses_the_family_normalisation_and_resampling(name):
    config = _config(name)
    processor = VisualADImageProcessor.from_model_config(config)
    assert tuple(processor.image_mean) == pytest.approx(FAMILIES[name].image_mean)
    assert int(processor.resample) == config.backbone_adapter.resample
    assert processor.size == {"height": config.image_size, "width": config.image_size}


# --- the paper's trainable count at ViT-L shape (SPEC §6) ----------------------------------------------------------


VIT_L = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16}


@pytest.mark.parametrize(
    "name, vision",
    [
        ("clip", {}),
        ("dinov2", {"patch_size": 14, "image_size": 518, "mlp_ratio": 4}),
        ("dinov2_registers", {"patch_size": 14, "image_size": 518, "mlp_ratio": 4, "num_register_tokens": 4}),
        ("dinov3", {"intermediate_size": 4096, "num_register_tokens": 4, "image_size": 224}),
        ("siglip", {"intermediate_size": 4096, "image_size": 512}),
        ("siglip2_naflex", {"intermediate_size": 4096, "num_patches": 256}),
        ("radio", {"mlp_ratio": 4.0, "num_cls_tokens": 3, "num_registers": 7}),
    ],
)
def test_trainable_parameters_at_vit_l_shape(name, vision):
    """31,522,836 for every family at width 1024 with 4 feature layers: each final norm (RADIO's added one included)
    is a plain LayerNorm of 2 x 1024 parameters."""
    vision_config = None if name == "clip" else FAMILIES[name].vision_config(**{**VIT_L, **vision})
    config = VisualADConfig(vision_config=vision_config)
    with torch.device("meta"):
        model = VisualADModel(config)
    assert model.num_parameters(only_trainable=True) == 31_522_836
    assert sum(p.numel() for p in model.final_layernorm.parameters()) == 2048


def test_trainable_parameters_of_the_radio_config_backbone():
    """radio_visa.yaml's C-RADIOv4-H is ViT-H/16 (width 1280, 32 layers): the count grows with the width (SCA and
    SAF are d x d per feature layer), 47,267,860 with its 4 feature layers."""
    vision = FAMILIES["radio"].vision_config(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                                             mlp_ratio=4.0, num_cls_tokens=3, num_registers=7)
    config = VisualADConfig(vision_config=vision, feature_layers=[8, 16, 24, 32])
    with torch.device("meta"):
        model = VisualADModel(config)
    assert model.num_parameters(only_trainable=True) == 47_267_860


# --- model card -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_model_card_states_the_family_and_its_licence(name):
    config = _config(name)
    card = create_model_card(config)
    facts = config.backbone_adapter.card
    assert card.data.license == FAMILIES[name].license == facts.license
    assert facts.tag in card.data.tags
    assert f"{facts.family} (width 64, 4 layers" in card.text
    if facts.license == "other":
        metadata = card.data.to_dict()
        assert metadata["license_name"] == facts.license_name and metadata["license_link"] == facts.license_link
    if not facts.paper_results:
        assert "it has no numbers for a" in card.text
        assert "DINOv2 ViT-L/14 (values x100" not in card.text


def test_dinov3_card_names_the_dinov3_license():
    config = VisualADConfig(vision_config=FAMILIES["dinov3"].vision_config(**VIT_L, intermediate_size=4096))
    card = create_model_card(config, base_model="facebook/dinov3-vitl16-pretrain-lvd1689m")
    assert card.data.license == "other" and card.data.to_dict()["license_name"] == "dinov3-license"
    assert "frozen DINOv3 ViT-L/16" in card.text and "[DINOv3 License](" in card.text
    assert "PIL bilinear resize" in card.text


# --- training configs for the new families --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, family, epochs",
    [("dinov3_visa", "dinov3", 4), ("siglip2_visa", "siglip", 1), ("radio_visa", "radio", 4)],
)
def test_new_family_configs_hold_the_spec_recipe(name, family, epochs):
    from pathlib import Path

    from visualad_hf.trainer import parse_args

    configs = Path(__file__).resolve().parents[1] / "training" / "configs"
    model_args, data_args, args = parse_args(["--config", str(configs / f"{name}.yaml")])
    _, reference_data, reference = parse_args(["--config", str(configs / "clip_visa.yaml")])
    card = {adapter.card.tag: adapter.card for adapter in ADAPTERS}[family]
    assert model_args.backbone == card.hub_id
    assert model_args.image_size == 512 and len(model_args.feature_layers) == 4
    assert max(model_args.feature_layers) == card.reference_shape[1]  # the deepest feature layer is the last layer
    assert args.num_train_epochs == epochs
    assert vars(data_args) == vars(reference_data)
    recipe = ("per_device_train_batch_size", "gradient_accumulation_steps", "seed", "token_learning_rate",
              "learning_rate", "min_learning_rate", "adam_beta1", "adam_beta2", "weight_decay",
              "max_token_grad_norm", "lr_scheduler_type", "mixed_precision")
    assert {key: getattr(args, key) for key in recipe} == {key: getattr(reference, key) for key in recipe}
    assert args.output_dir.endswith(f"visualad-{name.split('_')[0]}-visa")


@pytest.mark.parametrize("name", ["dinov3", "siglip", "radio"])
def test_converter_says_no_checkpoint_was_released_for_the_family(name, tmp_path):
    from visualad_hf.convert import ConversionError, load_backbone

    AutoModel.from_config(FAMILIES[name].vision_config()).save_pretrained(tmp_path)
    card = backbone_adapter(FAMILIES[name].vision_config()).card
    for source in (tmp_path, card.hub_id):
        with pytest.raises(ConversionError, match=f"No released {card.short_name} VisualAD checkpoint exists"):
            load_backbone(source)


def test_radio_checkpoint_without_layer_scales_loads_with_identity_scales(tmp_path):
    """C-RADIO has no LayerScale: its checkpoints lack the (identity) `lambda1` tensors, which RADIO's own class
    allows; from_backbone accepts that and gives them RADIO's own init, not VisualAD's or leftover memory."""
    from safetensors.torch import load_file, save_file

    AutoModel.from_config(FAMILIES["radio"].vision_config()).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layer_scale" not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    model = VisualADModel.from_backbone(str(tmp_path), feature_layers=[4], image_size=80)
    scales = [p for n, p in model.backbone.named_parameters() if "layer_scale" in n]
    assert scales and all(torch.equal(p, torch.ones_like(p)) for p in scales)
