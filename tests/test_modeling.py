"""VisualADConfig / VisualADModel: structure, exactness of the backbone path, gradients, save/load, validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vision_config, tiny_visualad_config
from transformers import AutoConfig, AutoModel, CLIPConfig, CLIPModel, CLIPVisionConfig, Dinov2Config

from visualad_hf import VisualADConfig, VisualADModel, VisualADOutput
from visualad_hf.modeling_visualad import topk_mean

BACKBONES = ["clip", "dinov2", "dinov2_registers"]


def _inputs(batch: int = 2, size: int = 70, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, size, size, generator=generator)
    masks = (torch.rand(batch, size, size, generator=generator) > 0.8).float()
    masks[0] = 0  # first image normal
    labels = masks.flatten(1).amax(1)
    return pixel_values, labels, masks


def _model(kind: str = "clip", attn: str | None = None, **overrides) -> VisualADModel:
    torch.manual_seed(0)
    config = tiny_visualad_config(kind, **overrides)
    if attn is None:
        return VisualADModel(config).eval()
    return VisualADModel._from_config(config, attn_implementation=attn).eval()


# --- trainable parameters (SPEC §6) -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vision_config",
    [
        None,  # default: CLIP ViT-L/14@336
        Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14, image_size=518),
    ],
    ids=["clip-vit-l14-336", "dinov2-vit-l14"],
)
def test_trainable_parameter_count_matches_paper(vision_config):
    config = VisualADConfig(vision_config=vision_config)
    with torch.device("meta"):
        model = VisualADModel(config)
    assert model.num_parameters(only_trainable=True) == 31_522_836
    groups = model.parameter_groups()
    count = {name: sum(p.numel() for p in params) for name, params in groups.items()}
    assert count == {
        "tokens": 2048,
        "final_layernorm": 2048,
        "spatial_cross_attention": 23_121_940,
        "self_alignment": 8_396_800,
    }


# --- the backbone path is the backbone, unchanged ---------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", BACKBONES)
def test_manual_backbone_loop_reproduces_backbone_hidden_states(kind, attn):
    """Our embedding + layer loop on the unmodified sequence equals the backbone's own forward (native size)."""
    model = _model(kind, attn=attn, image_size=56)
    pixel_values = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        sequence, _ = model._embed(pixel_values)
        kept, last = model.run_backbone_layers(sequence, keep_layers=[1, 2, 3, 4])
        reference = model.backbone(pixel_values, output_hidden_states=True)
    for layer in (1, 2, 3, 4):
        torch.testing.assert_close(kept[layer], reference.hidden_states[layer], atol=0, rtol=0)
    torch.testing.assert_close(last, reference.hidden_states[-1], atol=0, rtol=0)


@pytest.mark.parametrize("kind", BACKBONES)
def test_backbone_interpolation_mode_matches_backbone_at_other_sizes(kind):
    model = _model(kind, image_size=70, position_interpolation="backbone")
    pixel_values = torch.randn(1, 3, 70, 70)
    kwargs = {"interpolate_pos_encoding": True} if kind == "clip" else {}
    with torch.no_grad():
        sequence, _ = model._embed(pixel_values)
        _, last = model.run_backbone_layers(sequence, keep_layers=[])
        reference = model.backbone(pixel_values, output_hidden_states=True, **kwargs)
    torch.testing.assert_close(last, reference.hidden_states[-1], atol=0, rtol=0)


def test_clip_default_position_interpolation_is_bilinear():
    """SPEC §1: the 4x4 native grid is resized to 5x5 bilinearly (align_corners=False), CLS row kept."""
    model = _model("clip")
    assert model.config.resolved_position_interpolation == "bilinear"
    pixel_values = torch.randn(1, 3, 70, 70)
    with torch.no_grad():
        sequence, cls_position = model._embed(pixel_values)
        embeddings = model.backbone.embeddings
        table = embeddings.position_embedding.weight
        grid = table[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(grid, size=(5, 5), mode="bilinear", align_corners=False)
        positions = torch.cat([table[:1], resized.permute(0, 2, 3, 1).reshape(25, -1)])
        patches = embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        expected = torch.cat([embeddings.class_embedding.expand(1, 1, -1), patches], 1) + positions
    torch.testing.assert_close(sequence, expected)
    torch.testing.assert_close(cls_position, table[0])


def test_sdpa_and_eager_agree():
    pixel_values, _, _ = _inputs()
    with torch.no_grad():
        eager = _model("clip", attn="eager")(pixel_values).anomaly_map
        sdpa = _model("clip", attn="sdpa")(pixel_values).anomaly_map
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


# --- outputs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BACKBONES)
def test_output_shapes_and_definitions(kind):
    model = _model(kind)
    pixel_values, labels, masks = _inputs(batch=3)
    with torch.no_grad():
        out = model(pixel_values, labels=labels, masks=masks)
    assert isinstance(out, VisualADOutput)
    assert out.anomaly_map.shape == (3, 70, 70)
    assert out.layer_anomaly_maps.shape == (3, 4, 5, 5)
    assert out.image_logits.shape == (3,)
    upsampled = F.interpolate(out.layer_anomaly_maps, size=(70, 70), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.anomaly_map, upsampled.sum(1))
    k = math.ceil(0.01 * (70 * 70))  # 49; note 0.01 * 70 * 70 rounds up to 49.00000000000001
    torch.testing.assert_close(out.image_logits, out.anomaly_map.flatten(1).sort(1, descending=True).values[:, :k].mean(1))
    # each layer map is a difference of two cosines
    assert out.layer_anomaly_maps.abs().max() <= 2.0
    for name in ("loss", "loss_cls", "loss_seg", "loss_ctr"):
        assert torch.isfinite(getattr(out, name))
    torch.testing.assert_close(out.loss, out.loss_cls + out.loss_seg + out.loss_ctr)


def test_batch_of_one_equals_rows_of_a_batch():
    model = _model("clip")
    pixel_values, _, _ = _inputs(batch=3)
    with torch.no_grad():
        batched = model(pixel_values)
        singles = [model(pixel_values[i : i + 1]) for i in range(3)]
    torch.testing.assert_close(batched.anomaly_map, torch.cat([s.anomaly_map for s in singles]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.image_logits, torch.cat([s.image_logits for s in singles]), atol=1e-5, rtol=1e-5)


def test_losses_follow_spec():
    model = _model("clip")
    pixel_values, labels, masks = _inputs(batch=2)
    with torch.no_grad():
        out = model(pixel_values, labels=labels, masks=masks)
    up = F.interpolate(out.layer_anomaly_maps, size=(70, 70), mode="bilinear", align_corners=False)
    p = torch.sigmoid(up)
    expected_seg = 0.0
    for layer in range(4):
        probs = torch.stack([1 - p[:, layer], p[:, layer]], 1)
        onehot = torch.stack([1 - masks, masks], 1).clamp(1e-5, 1 - 1e-5)
        p_t = (onehot * probs).sum(1) + 1e-5
        focal = (-((1 - p_t) ** 2) * p_t.log()).mean()
        inter = (p[:, layer] * masks).flatten(1).sum(1)
        dice = 1 - ((2 * inter + 1) / (p[:, layer].flatten(1).sum(1) + masks.flatten(1).sum(1) + 1)).mean()
        expected_seg = expected_seg + focal + dice
    torch.testing.assert_close(out.loss_seg, expected_seg)
    torch.testing.assert_close(out.loss_cls, F.binary_cross_entropy_with_logits(out.image_logits, labels))


def test_masks_are_resized_and_labels_derived_from_masks():
    model = _model("clip")
    pixel_values, labels, masks = _inputs(batch=2)
    with torch.no_grad():
        reference = model(pixel_values, labels=labels, masks=masks)
        derived = model(pixel_values, masks=masks)
        big = F.interpolate(masks[:, None], size=(140, 140), mode="nearest")[:, 0]
        resized = model(pixel_values, labels=labels, masks=big)
    torch.testing.assert_close(derived.loss, reference.loss)
    torch.testing.assert_close(resized.loss_seg, reference.loss_seg)


def test_labels_without_masks_skip_segmentation_loss():
    model = _model("clip")
    pixel_values, labels, _ = _inputs(batch=2)
    out = model(pixel_values, labels=labels)
    assert out.loss_seg is None
    torch.testing.assert_close(out.loss, out.loss_cls + out.loss_ctr)


def test_non_square_input_gives_non_square_maps():
    model = _model("clip")
    with torch.no_grad():
        out = model(torch.randn(1, 3, 70, 84))
    assert out.layer_anomaly_maps.shape == (1, 4, 5, 6)
    assert out.anomaly_map.shape == (1, 70, 84)


def test_bad_inputs_raise_clear_errors():
    model = _model("clip")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 71, 70))
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        model(torch.randn(3, 70, 70))
    small = _model("clip", max_patches=30)
    with pytest.raises(ValueError, match="max_patches"):
        small(torch.randn(1, 3, 84, 84))


def test_topk_mean():
    maps = torch.arange(200.0).reshape(2, 10, 10)
    torch.testing.assert_close(topk_mean(maps, 0.05), torch.tensor([97.0, 197.0]))
    torch.testing.assert_close(topk_mean(maps, 0.001), torch.tensor([99.0, 199.0]))  # at least one pixel


# --- gradients -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BACKBONES)
def test_only_spec_parameters_receive_gradients(kind):
    model = _model(kind).train()
    pixel_values, labels, masks = _inputs()
    model(pixel_values, labels=labels, masks=masks).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    layernorm = "backbone.post_layernorm" if kind == "clip" else "backbone.layernorm"
    allowed = ("tokens.", "spatial_cross_attention.", "self_alignment.", layernorm + ".")
    assert all(name.startswith(allowed) for name in with_grad), sorted(with_grad)
    assert {"tokens.anomaly_token", "tokens.normal_token", f"{layernorm}.weight", f"{layernorm}.bias"} <= with_grad
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(name.startswith(allowed) for name in trainable)
    # gradients reach the tokens through the frozen layers, not only through the SCA residual
    assert any(name.startswith("spatial_cross_attention.0.") for name in with_grad)


def test_gradient_checkpointing_gives_identical_gradients():
    pixel_values, labels, masks = _inputs()
    grads = []
    for checkpointing in (False, True):
        model = _model("clip", sca_dropout=0.0, saf_dropout=0.0).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.backbone_layers)
        model(pixel_values, labels=labels, masks=masks).loss.backward()
        grads.append(torch.cat([model.tokens.anomaly_token.grad, model.tokens.normal_token.grad]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("saf_type", ["linear", "mlp_residual", "adapter", "leakyrelu"])
def test_saf_variants_run_and_train_one_step(saf_type):
    model = _model("clip", saf_type=saf_type).train()
    pixel_values, labels, masks = _inputs()
    before = {n: p.detach().clone() for n, p in model.self_alignment.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(pixel_values, labels=labels, masks=masks).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    changed = [n for n, p in model.self_alignment.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "the SAF parameters did not move"
    if saf_type == "adapter":  # up-projection starts at zero, so the adapter starts as the identity
        fresh = _model("clip", saf_type="adapter")
        x = torch.randn(2, 25, 64)
        torch.testing.assert_close(fresh.self_alignment[0](x), x)


# --- save / load, Auto classes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BACKBONES)
def test_save_pretrained_round_trip_is_bit_exact(kind, tmp_path):
    model = _model(kind, saf_type="adapter" if kind == "dinov2" else "mlp", anomaly_threshold=0.25)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, VisualADModel)
    assert _comparable(loaded.config) == _comparable(model.config)
    assert loaded.config.anomaly_threshold == 0.25
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.num_parameters(only_trainable=True) == model.num_parameters(only_trainable=True)
    pixel_values, _, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(model(pixel_values).anomaly_map, loaded(pixel_values).anomaly_map)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), VisualADConfig)


def test_trainable_token_positions_are_saved(tmp_path):
    model = _model("clip", train_token_position_embeddings=True)
    assert model.tokens.position_embeddings is not None and model.tokens.position_embeddings.requires_grad
    model.save_pretrained(tmp_path)
    loaded = VisualADModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.tokens.position_embeddings, model.tokens.position_embeddings)


# --- from_backbone ----------------------------------------------------------------------------------------------


def test_from_backbone_full_clip_checkpoint(tmp_path):
    vision = tiny_vision_config("clip")
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 100,
                "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    clip = CLIPModel(CLIPConfig(vision_config=vision.to_dict(), text_config=text, projection_dim=16))
    clip.save_pretrained(tmp_path)
    model = VisualADModel.from_backbone(str(tmp_path), feature_layers=[2, 4], image_size=70)
    assert model.config.vision_config.model_type == "clip_vision_model"
    for name, tensor in clip.vision_model.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], tensor), name
    std = model.tokens.anomaly_token.std().item()
    assert 0.5 * 0.1 / 8 < std < 2 * 0.1 / 8  # N(0, (0.1/sqrt(d))^2)
    assert model.spatial_cross_attention[0].residual_scale.item() == pytest.approx(0.01)
    assert torch.count_nonzero(model.spatial_cross_attention[0].out_proj.bias) == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.num_parameters(only_trainable=True) == VisualADModel(model.config).num_parameters(only_trainable=True)


@pytest.mark.parametrize("saf_type", ["mlp", "linear", "mlp_residual", "adapter", "leakyrelu"])
def test_from_backbone_initialises_every_head_tensor(saf_type, tmp_path):
    """Heads missing from a backbone checkpoint get the SPEC initialisation, never leftover memory."""
    from transformers import CLIPVisionModel

    CLIPVisionModel(tiny_vision_config("clip")).save_pretrained(tmp_path)
    model = VisualADModel.from_backbone(str(tmp_path), feature_layers=[1, 2, 3, 4], image_size=70, saf_type=saf_type)
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter).all() and parameter.abs().max() < 10, name
    xavier_bound = math.sqrt(6 / (64 + 64))
    for module in model.spatial_cross_attention:
        for projection in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
            assert 0.5 * xavier_bound < projection.weight.abs().max() <= xavier_bound
        assert torch.count_nonzero(module.out_proj.bias) == 0
        assert torch.equal(module.q_norm.weight, torch.ones(64)) and torch.count_nonzero(module.k_norm.bias) == 0
        assert 0.01 < module.anchors.std() < 0.03 and 0.01 < module.position_embeddings.std() < 0.03
        assert module.residual_scale.item() == pytest.approx(0.01)
    for module in model.self_alignment:
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(torch.count_nonzero(linear.bias) == 0 for linear in linears)
        if saf_type in ("mlp", "linear", "mlp_residual"):
            assert all(0.5 * xavier_bound < linear.weight.abs().max() <= xavier_bound for linear in linears)
        if saf_type == "adapter":
            assert torch.count_nonzero(module.up.weight) == 0 and module.scale.item() == pytest.approx(1e-3)


def test_from_backbone_dinov2_with_trainable_token_positions(tmp_path):
    from transformers import Dinov2Model

    backbone = Dinov2Model(tiny_vision_config("dinov2"))
    backbone.save_pretrained(tmp_path)
    model = VisualADModel.from_backbone(
        str(tmp_path), feature_layers=[2, 4], image_size=70, train_token_position_embeddings=True
    )
    assert torch.equal(model.backbone.embeddings.position_embeddings, backbone.embeddings.position_embeddings)
    cls_position = backbone.embeddings.position_embeddings[0, 0]
    assert torch.equal(model.tokens.position_embeddings, cls_position.expand(2, -1))


def test_from_backbone_offline_without_cache_explains(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(OSError, match="hf download"):
        VisualADModel.from_backbone("openai/clip-vit-large-patch14-336")


def test_from_backbone_rejects_other_architectures(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs a ViT backbone of a supported family: CLIP ViT"):
        VisualADModel.from_backbone(str(tmp_path))


# --- config validation ------------------------------------------------------------------------------------------


def test_config_defaults_follow_spec():
    config = VisualADConfig()
    assert config.vision_config.model_type == "clip_vision_model"
    assert (config.hidden_size, config.vision_config.num_hidden_layers, config.patch_size) == (1024, 24, 14)
    assert config.vision_config.hidden_act == "quick_gelu"
    assert config.feature_layers == [6, 12, 18, 24]
    assert (config.num_anchors, config.max_patches, config.image_size, config.grid_size) == (4, 1536, 518, 37)
    assert (config.topk_ratio, config.gaussian_sigma, config.res_scale_init, config.sca_dropout) == (0.01, 4.0, 0.01, 0.1)
    assert config.resolved_position_interpolation == "bilinear"
    assert config.train_token_position_embeddings is False
    dinov2 = VisualADConfig(vision_config=Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16))
    assert dinov2.resolved_position_interpolation == "backbone"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"feature_layers": [2, 5]}, r"feature_layers \[5\] lie outside the backbone, which has layers 1..4"),
        ({"feature_layers": [0]}, "outside the backbone"),
        ({"feature_layers": []}, "feature_layers is empty"),
        ({"feature_layers": [2, 2]}, "repeats a layer"),
        ({"saf_type": "transformer"}, "saf_type='transformer' is unknown"),
        ({"image_size": 280, "max_patches": 300}, r"20x20 grid of 400 patches, more than max_patches=300"),
        ({"image_size": 75}, "not a positive multiple of the backbone's patch size 14; use e.g. 70"),
        ({"position_interpolation": "nearest"}, "position_interpolation='nearest' is unknown"),
        ({"topk_ratio": 0.0}, "topk_ratio"),
    ],
)
def test_config_validation_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_visualad_config("clip", **overrides)


def test_unsupported_backbone_config_is_rejected():
    from transformers import ViTConfig

    with pytest.raises(ValueError, match="not supported"):
        VisualADConfig(vision_config=ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2))


def test_config_round_trip_keeps_nested_backbone(tmp_path):
    config = tiny_visualad_config("dinov2_registers", saf_type="leakyrelu", anomaly_threshold=1.5,
                                  threshold_calibration={"method": "normal_percentile", "percentile": 99.0})
    config.save_pretrained(tmp_path)
    loaded = VisualADConfig.from_pretrained(tmp_path)
    assert _comparable(loaded) == _comparable(config)
    assert loaded.vision_config.model_type == "dinov2_with_registers"
    assert loaded.num_prefix_tokens == 3
    from_dict = VisualADConfig(vision_config=tiny_vision_config("clip").to_dict(), feature_layers=[4], image_size=70)
    assert isinstance(from_dict.vision_config, CLIPVisionConfig)


def _comparable(config) -> dict:
    """Config as a dict, without the bookkeeping that saving adds (source path, resolved dtype)."""
    def clean(d):
        return {k: clean(v) if isinstance(v, dict) else v for k, v in d.items() if k not in ("_name_or_path", "dtype")}

    return clean(config.to_dict())


def test_spatial_cross_attention_matches_spec_formula():
    """SPEC §2 written literally (values projected per patch, U computed once per token) equals our module."""
    model = _model("clip")
    sca = model.spatial_cross_attention[0].eval()
    with torch.no_grad():
        sca.residual_scale.fill_(0.7)  # make the residual branch visible
        tokens, patches = torch.randn(3, 2, 64), torch.randn(3, 25, 64)
        q = sca.q_norm(sca.anchors @ sca.q_proj.weight.T)
        k = sca.k_norm((patches + sca.position_embeddings[:25]) @ sca.k_proj.weight.T)
        v = patches @ sca.v_proj.weight.T
        u = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(64), dim=-1) @ v
        expected = []
        for t in range(2):
            g = torch.sigmoid(sca.gate(tokens[:, t]))
            mixed = (g[:, :, None] * u).sum(1)
            expected.append(tokens[:, t] + 0.7 * sca.out_proj(mixed))
        torch.testing.assert_close(sca(tokens, patches), torch.stack(expected, 1), atol=1e-5, rtol=1e-5)


def test_set_attn_implementation_switches_the_backbone(caplog):
    model = _model("clip", attn="sdpa")
    pixel_values, _, _ = _inputs()
    with torch.no_grad():
        sdpa = model(pixel_values).anomaly_map
        model.set_attn_implementation("eager")
        eager = model(pixel_values).anomaly_map
    assert model.config._attn_implementation == "eager"
    assert model.backbone.config._attn_implementation == "eager"
    assert "does not support setting its attention implementation" not in caplog.text
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)
