"""The converter itself: a backbone plus a released checkpoint -> a `VisualADModel`, and that model -> a folder.

Which final LayerNorm the converted model holds is a choice (`final_layernorm`), because the authors' own code
disagrees with itself (SPEC §1): their released evaluation script `test.py`, which produced the paper's table,
never loads the checkpoint's trained `ln_post_weight` / `ln_post_bias` and so evaluates with the backbone's own
final LayerNorm, while their `train.py` trains that LayerNorm and uses it in its forward. The default, `"backbone"`,
reproduces `test.py` (the paper's numbers); `"checkpoint"` reproduces `train.py`'s forward and losses (to continue
training from where they stopped).
"""

from __future__ import annotations

import errno
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..configuration_visualad import VisualADConfig
from ..hub import no_progress_bars, push_folder, quiet_transformers_logging, staged_folder
from ..modeling_visualad import VisualADModel
from .common import ConversionError, file_sha256, listing
from .openai_clip import OPENAI_VIT_L14_336_SHA256, ClipBackbone, load_backbone
from .released import checkpoint_info, load_visualad_checkpoint, visualad_head_to_hf

FinalLayerNorm = Literal["backbone", "checkpoint"]
FINAL_LAYERNORM_CHOICES: tuple[str, ...] = ("backbone", "checkpoint")
DEFAULT_FINAL_LAYERNORM: FinalLayerNorm = "backbone"
# What each choice means, in the words the model card and the converter's summary use.
FINAL_LAYERNORM_DESCRIPTIONS = {
    "backbone": (
        "the backbone's own final LayerNorm (CLIP's ln_post), as the authors' released evaluation script test.py "
        "uses it: test.py never loads the checkpoint's trained ln_post_weight/ln_post_bias, and it produced the "
        "paper's table"
    ),
    "checkpoint": (
        "the final LayerNorm trained with the heads (the checkpoint's ln_post_weight/ln_post_bias), as the authors' "
        "train.py uses it in its forward and losses; their released evaluation test.py did not load it, so scores "
        "differ from the paper's"
    ),
}
UPLOAD_MESSAGE = "Add VisualAD converted from the authors' release"


@dataclass
class ConvertedCheckpoint:
    """A converted model and where its weights came from."""

    model: VisualADModel
    backbone: ClipBackbone = field(repr=False)
    checkpoint_path: str
    checkpoint_sha256: str
    checkpoint_info: dict[str, Any]
    final_layernorm: FinalLayerNorm = DEFAULT_FINAL_LAYERNORM

    def provenance(self) -> dict[str, Any]:
        """What the model card records about the conversion."""
        official = self.backbone.sha256 == OPENAI_VIT_L14_336_SHA256
        source = Path(self.backbone.source)
        return {
            "backbone_source": source.name if source.exists() else self.backbone.source,
            "backbone_layout": self.backbone.layout,
            "backbone_sha256": self.backbone.sha256,
            "backbone_is_official_openai_vit_l14_336": official,
            "checkpoint_source": Path(self.checkpoint_path).name,
            "checkpoint_sha256": self.checkpoint_sha256,
            "final_layernorm": self.final_layernorm,
            "final_layernorm_description": FINAL_LAYERNORM_DESCRIPTIONS[self.final_layernorm],
            **{f"checkpoint_{key}": value for key, value in self.checkpoint_info.items()},
        }


def convert_checkpoint(
    backbone: str | os.PathLike | ClipBackbone,
    checkpoint: str | os.PathLike,
    *,
    final_layernorm: FinalLayerNorm = DEFAULT_FINAL_LAYERNORM,
    num_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
) -> ConvertedCheckpoint:
    """Build a `VisualADModel` from CLIP backbone weights and a released VisualAD checkpoint (SPEC §8).

    Args:
        backbone: OpenAI CLIP weights file, Hugging Face folder or Hub id (or an already loaded `ClipBackbone`).
        checkpoint: the authors' `CLIP.pth`.
        final_layernorm: `"backbone"` (default): keep the backbone's own final LayerNorm, as the authors' released
            evaluation `test.py` does, which reproduces their published numbers; `"checkpoint"`: install the trained
            one stored in the checkpoint, as their `train.py` forward does. The checkpoint's LayerNorm is checked
            against the backbone either way, and the choice is recorded in `config.final_layernorm_source`.
        num_heads: attention heads of an OpenAI-layout backbone, when OpenAI's `width // 64` rule does not hold.
        dtype: parameter dtype of the converted model (the released runs are fp32).
    """
    if final_layernorm not in FINAL_LAYERNORM_CHOICES:
        raise ConversionError(
            f"final_layernorm={final_layernorm!r} is not one of {', '.join(FINAL_LAYERNORM_CHOICES)}: 'backbone' "
            "reproduces the authors' released evaluation (the paper's numbers), 'checkpoint' their training forward."
        )
    checkpoint_path = os.fspath(checkpoint)
    released = load_visualad_checkpoint(checkpoint_path)  # first: small, and its errors are the common ones
    if not isinstance(backbone, ClipBackbone):
        backbone = load_backbone(backbone, num_heads=num_heads, revision=revision, token=token, cache_dir=cache_dir)
    config, head, origin = visualad_head_to_hf(released, backbone.config, source=checkpoint_path)
    config.final_layernorm_source = final_layernorm

    state_dict = {f"backbone.{name}": tensor for name, tensor in backbone.state_dict.items()}
    state_dict.update(head)  # the checkpoint's trained final LayerNorm replaces the backbone's ...
    origin = {**{f"backbone.{name}": f"{backbone.source}: {name}" for name in backbone.state_dict}, **origin}
    _check_against_model(config, state_dict, origin, checkpoint_path)  # ... so that its shape is checked too
    if final_layernorm == "backbone":  # ... and is put back where the released evaluation keeps the backbone's
        state_dict.update({f"backbone.{name}": tensor for name, tensor in backbone.final_layernorm().items()})
    state_dict = {name: tensor.to(dtype).contiguous() for name, tensor in state_dict.items()}

    with quiet_transformers_logging(), no_progress_bars():  # loading from memory: nothing to report
        model, info = VisualADModel.from_pretrained(
            None, config=config, state_dict=state_dict, dtype=dtype, output_loading_info=True
        )
    problems = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"]) + info["error_msgs"]
    if problems:  # `_check_against_model` makes this unreachable unless the model itself changed.
        raise RuntimeError(f"Converted weights did not load cleanly: {listing(problems)}")
    sha256, info = file_sha256(checkpoint_path), checkpoint_info(released)
    return ConvertedCheckpoint(model.eval(), backbone, checkpoint_path, sha256, info, final_layernorm)


def _check_against_model(
    config: VisualADConfig, state_dict: Mapping[str, torch.Tensor], origin: Mapping[str, str], source: str
) -> None:
    """Every parameter present, none extra, every shape right; errors name the released entries."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in VisualADModel(config).state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(origin.get(name, name) for name in set(state_dict) - set(expected))
    wrong = [
        f"{origin.get(name, name)} has shape {list(state_dict[name].shape)}, expected {list(shape)}"
        for name, shape in expected.items()
        if name in state_dict and tuple(state_dict[name].shape) != shape
    ]
    if missing or unexpected or wrong:
        parts = [f"missing {listing(missing)}"] if missing else []
        parts += [f"unexpected {listing(unexpected)}"] if unexpected else []
        if wrong:
            more = f" (… {len(wrong) - 8} more)" if len(wrong) > 8 else ""
            parts.append(f"shape mismatch: {'; '.join(wrong[:8])}{more}")
        raise ConversionError(
            f"{source}: the checkpoint does not fit the backbone (width {config.hidden_size}, "
            f"{config.vision_config.num_hidden_layers} layers): {' | '.join(parts)}."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Writing the folder


def save_converted(
    converted: ConvertedCheckpoint,
    output_dir: str | os.PathLike,
    *,
    training_data: str | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write the model (safetensors + config.json), `preprocessor_config.json` and a model card into `output_dir`.

    The folder is built beside `output_dir` and swapped in whole (`hub.staged_folder`): an error or a full disk
    leaves whatever was there before untouched and no partial files behind. A full disk is raised as
    `OSError(ENOSPC)` naming `output_dir` (also when safetensors reports it in its own error type), which the
    command line prints as one line.
    """
    from ..image_processing_visualad import VisualADImageProcessor
    from ..model_card import create_model_card

    output = Path(output_dir)
    try:
        with staged_folder(output) as staging:
            converted.model.save_pretrained(staging)
            VisualADImageProcessor.from_model_config(converted.model.config).save_pretrained(staging)
            card = create_model_card(
                converted.model.config,
                base_model=converted.backbone.base_model,
                training_data=training_data,
                source="converted",
                conversion=converted.provenance(),
                model_name=model_name,
                repo_id=repo_id,
            )
            card.save(staging / "README.md")
    except Exception as error:
        full = _disk_full(error)
        if full is None:
            raise
        raise OSError(full, os.strerror(full), os.fspath(output)) from error
    return output


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# safetensors (Rust) reports I/O failures in its own exception type, with the OS error only in the text.
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)|No space left on device|Disk quota exceeded")


def _disk_full(error: BaseException) -> int | None:
    """The errno when `error` (or what caused it) is a full disk or quota, else None."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return error.errno
        match = _OS_ERROR_IN_TEXT.search(str(error))
        if match:
            number = int(match.group(1)) if match.group(1) else errno.ENOSPC
            if "Disk quota" in match.group(0):
                number = errno.EDQUOT
            if number in _DISK_FULL_ERRNOS:
                return number
        error = error.__cause__ or error.__context__
    return None


def infer_training_data(checkpoint_path: str | os.PathLike) -> str | None:
    """`visa` / `mvtec` from the released folder names (`weight/train_on_visa/CLIP.pth`), else None."""
    match = re.search(r"train_on_(visa|mvtec)", os.fspath(checkpoint_path).lower())
    return match.group(1) if match else None


def push_folder_to_hub(
    folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None
) -> str:
    """Deprecated name of `visualad_hf.hub.push_folder` (the one uploader), kept for one release."""
    warnings.warn(
        "visualad_hf.convert.push_folder_to_hub is deprecated; use visualad_hf.hub.push_folder", DeprecationWarning,
        stacklevel=2,
    )
    return push_folder(folder, repo_id, private=private, token=token, commit_message=UPLOAD_MESSAGE)


__all__ = [
    "DEFAULT_FINAL_LAYERNORM",
    "FINAL_LAYERNORM_CHOICES",
    "FINAL_LAYERNORM_DESCRIPTIONS",
    "UPLOAD_MESSAGE",
    "ConvertedCheckpoint",
    "convert_checkpoint",
    "infer_training_data",
    "push_folder_to_hub",
    "save_converted",
]
