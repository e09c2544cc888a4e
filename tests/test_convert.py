"""`visualad convert`: reading every backbone layout safely, and a clear error for every wrong input."""

from __future__ import annotations

import collections
import errno
import json
import os
import pickle
import runpy
import sys
import zipfile

import pytest
import torch
from conftest import PARITY_DIR, tiny_vision_config
from safetensors.torch import save_file
from test_convert_parity import make_openai_clip, make_released_checkpoint
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel, Dinov2Model

from visualad_hf import VisualADModel
from visualad_hf.cli import main as cli_main
from visualad_hf.convert import (
    NO_DINOV2_CHECKPOINT,
    ConversionError,
    convert_checkpoint,
    infer_training_data,
    is_torchscript_archive,
    load_backbone,
    load_torchscript_tensors,
    openai_clip_to_hf,
    read_state_dict,
    save_converted,
)

WIDTH, DEPTH = 64, 2

# Building TorchScript test files is the only use of torch.jit here; its deprecation and tracer notes are expected.
pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small OpenAI-layout CLIP (plain state dict) and a matching released VisualAD checkpoint."""
    root = tmp_path_factory.mktemp("inputs")
    clip = make_openai_clip(width=WIDTH, depth=DEPTH, patch=14, native_grid=2)
    released = make_released_checkpoint(width=WIDTH, features=(1, 2), image_size=42, max_patches=16)
    torch.save(clip, root / "clip.pt")
    torch.save(released, root / "CLIP.pth")
    return {"root": root, "clip": clip, "released": released, "clip_path": root / "clip.pt", "ckpt": root / "CLIP.pth"}


@pytest.fixture(scope="module")
def reference_state(files):
    return convert_checkpoint(files["clip_path"], files["ckpt"]).model.state_dict()


def _assert_same_state(state, reference):
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name


def _save_released(path, released):
    torch.save(released, path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# TorchScript archives, read without running them


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, 2)
        self.ln_1 = nn.LayerNorm(width)
        layers = [("c_fc", nn.Linear(width, 4 * width)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(4 * width, width))]
        self.mlp = nn.Sequential(collections.OrderedDict(layers))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, depth: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[_Block(width) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class _Visual(nn.Module):
    def __init__(self, width: int, depth: int, patch: int, grid: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, depth)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).permute(2, 0, 1)
        x = self.transformer(self.ln_pre(x + self.positional_embedding[1:, None]))
        return self.ln_post(x[0]) @ self.proj


class _TinyOpenAIClip(nn.Module):
    """OpenAI CLIP's module tree (visual tower + a text-tower parameter and buffer), so its names match the release."""

    def __init__(self, width: int = WIDTH, depth: int = DEPTH, patch: int = 14, grid: int = 2):
        super().__init__()
        self.visual = _Visual(width, depth, patch, grid)
        self.token_embedding = nn.Embedding(10, 16)
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.register_buffer("input_resolution", torch.tensor(patch * grid))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image) * self.logit_scale.exp()


@pytest.mark.parametrize("how", ["trace-fp32", "script-fp16"])
def test_torchscript_archive_reads_the_same_tensors_as_torch_jit(how, tmp_path):
    torch.manual_seed(0)
    module = _TinyOpenAIClip().eval()
    if how == "trace-fp32":
        archive = torch.jit.trace(module, torch.randn(1, 3, 28, 28))
    else:
        archive = torch.jit.script(module.half())
    path = tmp_path / "ViT-tiny.pt"
    archive.save(str(path))
    assert is_torchscript_archive(path)

    ours = load_torchscript_tensors(path)
    reference = torch.jit.load(str(path)).state_dict()  # our own file: safe to run here, and the ground truth
    assert set(reference) <= set(ours)
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    assert ours["visual.transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * WIDTH, WIDTH)


def test_torchscript_and_plain_state_dict_convert_identically(files, tmp_path):
    torch.manual_seed(0)
    module = _TinyOpenAIClip().eval()
    torch.jit.trace(module, torch.randn(1, 3, 28, 28)).save(str(tmp_path / "ts.pt"))
    torch.save(module.state_dict(), tmp_path / "plain.pt")
    scripted = convert_checkpoint(tmp_path / "ts.pt", files["ckpt"])
    plain = convert_checkpoint(tmp_path / "plain.pt", files["ckpt"])
    assert scripted.backbone.layout == "OpenAI CLIP TorchScript archive"
    assert plain.backbone.layout == "OpenAI CLIP state dict"
    _assert_same_state(scripted.model.state_dict(), plain.model.state_dict())


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_torchscript_archive_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"visual": _RunsCode(marker)}, protocol=2))
        archive.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("evil/code/__torch__.py", "def forward(self): pass\n")
    with pytest.raises(ConversionError, match=r"evil\.pt.*posix\.system|evil\.pt.*os\.system|evil\.pt.*does not allow"):
        load_backbone(path)
    assert not marker.exists()


def test_pickle_that_needs_unsafe_loading_is_refused(files, tmp_path):
    marker = tmp_path / "pwned"
    released = dict(files["released"], anomaly_token=_RunsCode(marker))
    path = tmp_path / "CLIP.pth"
    torch.save(released, path)
    with pytest.raises(ConversionError, match="weights_only=True.*never falls back to unsafe loading"):
        convert_checkpoint(files["clip_path"], path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Other backbone layouts give the same model


def test_state_dict_variants_convert_identically(files, reference_state, tmp_path):
    clip = files["clip"]
    visual_only = {k[len("visual.") :]: v for k, v in clip.items() if k.startswith("visual.")}
    variants = {
        "visual_only.pt": visual_only,
        "wrapped.pth": {"state_dict": clip, "epoch": 3},
        "half.bin": {k: v.half() for k, v in clip.items()},
    }
    for name, content in variants.items():
        torch.save(content, tmp_path / name)
    save_file({k: v.contiguous() for k, v in clip.items()}, tmp_path / "clip.safetensors")
    for name in [*variants, "clip.safetensors"]:
        state = convert_checkpoint(tmp_path / name, files["ckpt"]).model.state_dict()
        if name == "half.bin":
            # fp16 storage rounds the backbone; the converted model is still fp32 and exact for the stored values.
            assert all(t.dtype == torch.float32 for t in state.values())
            continue
        _assert_same_state(state, reference_state)


def _hf_vision_model(files) -> CLIPVisionModel:
    config, state = openai_clip_to_hf(files["clip"])
    model = CLIPVisionModel(config)
    model.load_state_dict(state)
    return model


def test_hugging_face_folders_convert_like_the_openai_file(files, reference_state, tmp_path):
    vision = _hf_vision_model(files)
    vision.save_pretrained(tmp_path / "clip-vision")
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    text["vocab_size"] = 49408
    full = CLIPModel(CLIPConfig(vision_config=vision.config.to_dict(), text_config=text, projection_dim=16))
    full.vision_model.load_state_dict(vision.state_dict())
    full.save_pretrained(tmp_path / "clip-full")
    for folder in ("clip-vision", "clip-full"):
        converted = convert_checkpoint(tmp_path / folder, files["ckpt"])
        assert converted.backbone.layout == "Hugging Face CLIP"
        _assert_same_state(converted.model.state_dict(), reference_state)


def test_hugging_face_weights_file_points_to_its_folder(files, tmp_path):
    _hf_vision_model(files).save_pretrained(tmp_path / "hf")
    with pytest.raises(ConversionError, match="Hugging Face CLIP weights; pass the folder"):
        load_backbone(tmp_path / "hf" / "model.safetensors")


def test_hub_id_offline_says_how_to_get_it(files):
    with pytest.raises(ConversionError, match="offline mode"):
        convert_checkpoint("openai/clip-vit-large-patch14-336", files["ckpt"])


@pytest.mark.parametrize("backbone", ["ViT-L-14-336px.pt", "ViT-L/14@336px"])
def test_missing_openai_file_gives_the_download_url(backbone, files):
    url = r"openaipublic\.azureedge\.net/clip/models/3035c92b.*/ViT-L-14-336px\.pt"
    with pytest.raises(ConversionError, match=r"no such file\. Download .*" + url):
        convert_checkpoint(backbone, files["ckpt"])


# ---------------------------------------------------------------------------------------------------------------------
# Wrong backbones


def test_not_a_clip_checkpoint(files, tmp_path):
    torch.save({"encoder.weight": torch.zeros(3), "head.bias": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match=r"other\.pt: not a ViT CLIP checkpoint.*visual\.conv1\.weight"):
        convert_checkpoint(tmp_path / "other.pt", files["ckpt"])


def test_resnet_clip_is_named(files, tmp_path):
    resnet = {"visual.layer1.0.conv1.weight": torch.zeros(1), "visual.attnpool.positional_embedding": torch.zeros(1)}
    torch.save(resnet, tmp_path / "rn50.pt")
    with pytest.raises(ConversionError, match="ResNet CLIP"):
        convert_checkpoint(tmp_path / "rn50.pt", files["ckpt"])


def test_dinov2_backbones_say_no_released_checkpoint_exists(files, tmp_path):
    hub_style = {
        "cls_token": torch.zeros(1, 1, 8),
        "patch_embed.proj.weight": torch.zeros(8, 3, 14, 14),
        "blocks.0.attn.qkv.weight": torch.zeros(24, 8),
    }
    torch.save(hub_style, tmp_path / "dinov2_vitl14.pth")
    Dinov2Model(tiny_vision_config("dinov2")).save_pretrained(tmp_path / "dinov2-folder")
    for backbone in (tmp_path / "dinov2_vitl14.pth", tmp_path / "dinov2-folder", "facebook/dinov2-large"):
        with pytest.raises(ConversionError) as error:
            convert_checkpoint(backbone, files["ckpt"])
        assert NO_DINOV2_CHECKPOINT in str(error.value)
    released = dict(files["released"], backbone="dinov2_vitl14")
    with pytest.raises(ConversionError, match="No released DINOv2 VisualAD checkpoint exists"):
        convert_checkpoint(files["clip_path"], _save_released(tmp_path / "dino.pth", released))


def test_unreadable_weights_file(files, tmp_path):
    (tmp_path / "broken.pt").write_text("not a checkpoint")
    with pytest.raises(ConversionError, match=r"broken\.pt: not a PyTorch weights file"):
        convert_checkpoint(tmp_path / "broken.pt", files["ckpt"])
    (tmp_path / "CLIP.pth").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(ConversionError, match=r"CLIP\.pth: a Git LFS pointer.*git lfs pull"):
        convert_checkpoint(files["clip_path"], tmp_path / "CLIP.pth")


def test_missing_and_unexpected_backbone_tensors_are_listed(files, tmp_path):
    clip = dict(files["clip"])
    del clip["visual.transformer.resblocks.1.ln_2.bias"]
    torch.save(clip, tmp_path / "missing.pt")
    with pytest.raises(ConversionError, match=r"lacks 1 tensors: visual\.transformer\.resblocks\.1\.ln_2\.bias"):
        convert_checkpoint(tmp_path / "missing.pt", files["ckpt"])
    clip = dict(files["clip"], **{"visual.transformer.resblocks.0.attn.extra": torch.zeros(1)})
    torch.save(clip, tmp_path / "extra.pt")
    with pytest.raises(ConversionError, match=r"unexpected tensors.*visual\.transformer\.resblocks\.0\.attn\.extra"):
        convert_checkpoint(tmp_path / "extra.pt", files["ckpt"])


def test_head_count_rule_and_override(files, tmp_path):
    torch.save(make_openai_clip(width=96, depth=1), tmp_path / "w96.pt")
    with pytest.raises(ConversionError, match="not a multiple of 64.*--num-heads"):
        load_backbone(tmp_path / "w96.pt")
    with pytest.raises(ConversionError, match="--num-heads 5 does not divide the width 96"):
        load_backbone(tmp_path / "w96.pt", num_heads=5)
    assert load_backbone(tmp_path / "w96.pt", num_heads=3).config.num_attention_heads == 3
    _hf_vision_model(files).save_pretrained(tmp_path / "hf")
    with pytest.raises(ConversionError, match="contradicts"):
        load_backbone(tmp_path / "hf", num_heads=4)


# ---------------------------------------------------------------------------------------------------------------------
# Wrong VisualAD checkpoints


def _convert_with(files, tmp_path, released):
    return convert_checkpoint(files["clip_path"], _save_released(tmp_path / "CLIP.pth", released))


def test_width_mismatch(files, tmp_path):
    with pytest.raises(ConversionError, match="heads have width 128 but the backbone has width 64"):
        _convert_with(files, tmp_path, make_released_checkpoint(width=128))


def test_feature_layer_beyond_depth(files, tmp_path):
    with pytest.raises(ConversionError, match=r"names layers \[3\], but the backbone has layers 1\.\.2"):
        _convert_with(files, tmp_path, make_released_checkpoint(width=WIDTH, features=(1, 3)))


def test_anchor_count_mismatch(files, tmp_path):
    released = make_released_checkpoint(width=WIDTH, num_anchors=4)
    released["cross_attn_config"] = dict(released["cross_attn_config"], num_anchors=5)
    with pytest.raises(ConversionError, match=r"num_anchors=5, anchor_queries rows \[4\]"):
        _convert_with(files, tmp_path, released)


def test_missing_and_unexpected_head_keys_are_listed(files, tmp_path):
    released = make_released_checkpoint(width=WIDTH)
    del released["cross_attn"]["layer_attentions.layer_2.k_norm.bias"]
    released["cross_attn"]["layer_attentions.layer_7.anchor_queries"] = torch.zeros(4, WIDTH)
    with pytest.raises(ConversionError) as error:
        _convert_with(files, tmp_path, released)
    message = str(error.value)
    assert "missing layer_attentions.layer_2.k_norm.bias" in message
    assert "unexpected layer_attentions.layer_7.anchor_queries" in message

    released = make_released_checkpoint(width=WIDTH)
    released["layer_transforms"]["layer_1"]["mlp.6.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"layer_transforms\['layer_1'\].*unexpected mlp\.6\.weight"):
        _convert_with(files, tmp_path, released)

    released = make_released_checkpoint(width=WIDTH)
    del released["normal_token"]
    with pytest.raises(ConversionError, match="missing normal_token"):
        _convert_with(files, tmp_path, released)


def test_wrong_tensor_shape_names_the_released_entry(files, tmp_path):
    released = make_released_checkpoint(width=WIDTH)
    released["cross_attn"]["layer_attentions.layer_1.q_proj.weight"] = torch.zeros(WIDTH, 32)
    entry = r"cross_attn\['layer_attentions\.layer_1\.q_proj\.weight'\]"
    with pytest.raises(ConversionError, match=entry + r" has shape \[64, 32\], expected \[64, 64\]"):
        _convert_with(files, tmp_path, released)


def test_image_size_must_fit_patches_and_position_table(files, tmp_path):
    with pytest.raises(ConversionError, match="not a positive multiple of the backbone's patch size 14"):
        _convert_with(files, tmp_path, make_released_checkpoint(width=WIDTH, image_size=50))
    with pytest.raises(ConversionError, match="more than max_patches=16"):
        _convert_with(files, tmp_path, make_released_checkpoint(width=WIDTH, image_size=70, max_patches=16))


def test_swapped_arguments_are_explained(files):
    with pytest.raises(ConversionError, match="This is a VisualAD checkpoint; pass it as --checkpoint"):
        load_backbone(files["ckpt"])
    with pytest.raises(ConversionError, match="pass them as --backbone"):
        convert_checkpoint(files["clip_path"], files["clip_path"])


# ---------------------------------------------------------------------------------------------------------------------
# Command line and output folder


def test_cli_writes_a_loadable_folder_and_push_fails_clearly_offline(files, tmp_path, capsys):
    output = tmp_path / "out"
    status = cli_main(
        ["convert", "--backbone", str(files["clip_path"]), "--checkpoint", str(files["ckpt"]), "--output", str(output),
         "--dtype", "bfloat16", "--push-to-hub", "someone/visualad-test"]
    )  # fmt: skip
    assert status == 1  # the folder is complete, only the upload failed
    error = capsys.readouterr().err
    assert f"The model is complete in {output}" in error and f"hf upload someone/visualad-test {output}" in error
    assert error.strip().splitlines()[-1].startswith("visualad convert: error: Not uploaded to someone/visualad-test")
    written = {path.name for path in output.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= written
    model = VisualADModel.from_pretrained(output)
    assert model.dtype == torch.bfloat16
    assert json.loads((output / "preprocessor_config.json").read_text())["size"] == {"height": 42, "width": 42}


def test_cli_reports_errors_without_a_traceback(files, tmp_path, capsys):
    status = cli_main(
        ["convert", "--backbone", str(files["clip_path"]), "--checkpoint", str(tmp_path / "nope.pth"),
         "--output", str(tmp_path / "o")]
    )  # fmt: skip
    assert status == 2  # the dispatcher's status for errors a user can fix (VisualADError)
    assert "visualad convert: error: --checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_training_data_from_released_folder_names():
    assert infer_training_data("VisualAD/weight/train_on_visa/CLIP.pth") == "visa"
    assert infer_training_data("weight/train_on_mvtec/CLIP.pth") == "mvtec"
    assert infer_training_data("CLIP.pth") is None


@pytest.mark.filterwarnings("ignore:'visualad_hf.convert' found in sys.modules:RuntimeWarning")
def test_python_dash_m_entry_point(tmp_path, monkeypatch, capsys):
    """`python -m visualad_hf.convert ...`, run in-process through runpy (the same `__main__` path, no subprocess)."""
    output = tmp_path / "converted"
    argv = ["visualad_hf.convert", "--backbone", str(PARITY_DIR / "clip_openai.pt"),
            "--checkpoint", str(PARITY_DIR / "visualad_official.pth"), "--output", str(output)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("visualad_hf.convert", run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 0
    assert "feature layers [1, 2, 3, 4]" in capsys.readouterr().out
    assert (output / "model.safetensors").is_file()


def test_read_state_dict_drops_non_tensors(tmp_path):
    torch.save({"visual.conv1.weight": torch.zeros(2), "note": "hello"}, tmp_path / "mixed.pt")
    assert set(read_state_dict(tmp_path / "mixed.pt")) == {"visual.conv1.weight"}


# ---------------------------------------------------------------------------------------------------------------------
# Writing the folder: whole or not at all


def _convert_argv(files, output, *extra):
    return ["convert", "--backbone", str(files["clip_path"]), "--checkpoint", str(files["ckpt"]),
            "--output", str(output), *extra]  # fmt: skip


def _disk_full_safetensors(tensors, filename, metadata=None):
    """What safetensors does when the disk fills: part of the file written, then its own error type."""
    from safetensors import SafetensorError

    with open(filename, "wb") as handle:
        handle.write(b"\0" * 1000)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _leftovers(parent):
    return sorted(path.name for path in parent.iterdir() if path.name.startswith("."))


def test_full_disk_while_writing_weights_is_one_line_and_leaves_nothing(files, tmp_path, capsys, monkeypatch):
    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _disk_full_safetensors)
    output = tmp_path / "out"
    assert cli_main(_convert_argv(files, output)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == (
        f"visualad convert: error: the disk is full while writing {output}; free some space and run the same command "
        "again (finished results were kept)"
    )
    assert not any(line.startswith("Traceback") for line in lines)
    assert not output.exists() and _leftovers(tmp_path) == []


def test_full_disk_keeps_the_previous_folder_untouched(files, tmp_path, capsys, monkeypatch):
    output = tmp_path / "out"
    assert cli_main(_convert_argv(files, output)) == 0
    before = {path.name: path.read_bytes() for path in output.iterdir()}

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".staging" / "README.md"))

    monkeypatch.setattr("huggingface_hub.ModelCard.save", full)  # the last file written: everything else is done
    assert cli_main(_convert_argv(files, output, "--final-layernorm", "checkpoint")) == 1
    assert f"the disk is full while writing {output};" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before
    assert _leftovers(tmp_path) == []


def test_other_write_errors_are_not_called_a_full_disk(files, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def broken(*_args, **_kwargs):
        raise SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)")

    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", broken)
    with pytest.raises(SafetensorError, match="os error 13"):
        save_converted(convert_checkpoint(files["clip_path"], files["ckpt"]), tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_reconverting_replaces_the_folder_as_a_whole(files, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "stale.txt").write_text("from an older run")
    save_converted(convert_checkpoint(files["clip_path"], files["ckpt"], final_layernorm="checkpoint"), output)
    assert not (output / "stale.txt").exists()
    assert json.loads((output / "config.json").read_text())["final_layernorm_source"] == "checkpoint"


# ---------------------------------------------------------------------------------------------------------------------
# Flags


def test_summary_names_the_final_layernorm_and_old_output_spelling_still_works(files, tmp_path, capsys):
    output = tmp_path / "out"
    argv = ["convert", "--backbone", str(files["clip_path"]), "--checkpoint", str(files["ckpt"]), "--out", str(output)]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    assert "note: --out is deprecated and will be removed in the next release; use --output." in captured.err
    assert "final LayerNorm: backbone: the backbone's own final LayerNorm (CLIP's ln_post)" in captured.out
    assert "--final-layernorm checkpoint for the other one" in captured.out
    assert (output / "model.safetensors").is_file()


def test_final_layernorm_choice_changes_exactly_the_layernorm(files):
    clip, released = files["clip"], files["released"]
    default = convert_checkpoint(files["clip_path"], files["ckpt"]).model.state_dict()
    trained = convert_checkpoint(files["clip_path"], files["ckpt"], final_layernorm="checkpoint").model.state_dict()
    changed = {name for name in default if not torch.equal(default[name], trained[name])}
    assert changed == {"backbone.post_layernorm.weight", "backbone.post_layernorm.bias"}
    assert torch.equal(default["backbone.post_layernorm.weight"], clip["visual.ln_post.weight"])
    assert torch.equal(trained["backbone.post_layernorm.bias"], released["ln_post_bias"])
    with pytest.raises(ConversionError, match="final_layernorm='trained' is not one of backbone, checkpoint"):
        convert_checkpoint(files["clip_path"], files["ckpt"], final_layernorm="trained")


def test_checkpoint_layernorm_is_checked_even_when_not_installed(files, tmp_path):
    released = dict(files["released"], ln_post_weight=torch.ones(WIDTH + 1))
    with pytest.raises(ConversionError, match=r"ln_post_weight has shape \[65\], expected \[64\]"):
        _convert_with(files, tmp_path, released)


def test_unknown_final_layernorm_on_the_command_line(files, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(_convert_argv(files, tmp_path / "o", "--final-layernorm", "trained"))
    assert exit_info.value.code == 2
    assert "argument --final-layernorm: invalid choice: 'trained'" in capsys.readouterr().err


def test_old_uploader_name_forwards_to_the_one_uploader(tmp_path):
    from visualad_hf.convert import push_folder_to_hub
    from visualad_hf.hub import HubUploadError

    warns = pytest.warns(DeprecationWarning, match="use visualad_hf.hub.push_folder")
    with warns, pytest.raises(HubUploadError, match="HF_HUB_OFFLINE=1 forbids network access"):
        push_folder_to_hub(tmp_path, "someone/visualad-test")
