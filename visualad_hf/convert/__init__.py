"""Convert the authors' released VisualAD checkpoint into a `visualad_hf` model folder (SPEC §8).

Two inputs:

- the backbone: OpenAI CLIP weights (`ViT-L-14-336px.pt`, a TorchScript archive, or a plain state dict saved as
  `.pt`/`.pth`/`.bin`/`.safetensors`), or the same weights in Hugging Face layout (a local `CLIPModel` /
  `CLIPVisionModel` folder, or a Hub id such as `openai/clip-vit-large-patch14-336`);
- the VisualAD checkpoint (`CLIP.pth`): tokens, the trained final LayerNorm, and one SAF and one SCA per feature layer.

Nothing in either file is executed, and nothing a file declares is believed before it is checked: pickles load with
`torch.load(weights_only=True)` (never an unsafe fallback), TorchScript archives are read by a restricted unpickler
that bounds every declared size by the file's own size before allocating (`torchscript`).

Which final LayerNorm the converted model holds: by default the backbone's own, as the authors' released evaluation
`test.py` (the paper's numbers) has it; `final_layernorm="checkpoint"` installs the trained one, as their `train.py`
forward has it (see `converter`). The package's parts:

- `torchscript`: the safe TorchScript reader and its size limits;
- `weights`: any weights file -> tensors (safetensors, `torch.save`, TorchScript);
- `openai_clip`: OpenAI CLIP names -> `CLIPVisionModel` names, loading a CLIP backbone (the only family with
  released checkpoints);
- `released`: the released `CLIP.pth` -> `VisualADModel` head names;
- `converter`: both together -> a model, and the model -> a folder.

    visualad convert --backbone ViT-L-14-336px.pt --checkpoint CLIP.pth --output visualad-clip
    python -m visualad_hf.convert --backbone openai/clip-vit-large-patch14-336 --checkpoint CLIP.pth --output out
"""

from .common import ConversionError, file_sha256
from .converter import (
    DEFAULT_FINAL_LAYERNORM,
    FINAL_LAYERNORM_CHOICES,
    FINAL_LAYERNORM_DESCRIPTIONS,
    ConvertedCheckpoint,
    convert_checkpoint,
    infer_training_data,
    push_folder_to_hub,
    save_converted,
)
from .openai_clip import (
    HUB_VIT_L14_336,
    NO_DINOV2_CHECKPOINT,
    OPENAI_VIT_L14_336_SHA256,
    OPENAI_VIT_L14_336_URL,
    ClipBackbone,
    load_backbone,
    openai_clip_to_hf,
)
from .released import load_visualad_checkpoint, visualad_head_to_hf
from .torchscript import ArchiveLimits, is_torchscript_archive, load_torchscript_tensors
from .weights import read_state_dict

__all__ = [
    "DEFAULT_FINAL_LAYERNORM",
    "FINAL_LAYERNORM_CHOICES",
    "FINAL_LAYERNORM_DESCRIPTIONS",
    "HUB_VIT_L14_336",
    "NO_DINOV2_CHECKPOINT",
    "OPENAI_VIT_L14_336_SHA256",
    "OPENAI_VIT_L14_336_URL",
    "ArchiveLimits",
    "ClipBackbone",
    "ConversionError",
    "ConvertedCheckpoint",
    "convert_checkpoint",
    "file_sha256",
    "infer_training_data",
    "is_torchscript_archive",
    "load_backbone",
    "load_torchscript_tensors",
    "load_visualad_checkpoint",
    "openai_clip_to_hf",
    "push_folder_to_hub",
    "read_state_dict",
    "save_converted",
    "visualad_head_to_hf",
]
