"""PyTorch VisualAD: language-free zero-shot anomaly detection on a frozen ViT (CVPR 2026).

The computation follows the authors' released implementation (see `SPEC.md` §1–§5): two learnable tokens are put in
front of a frozen backbone's sequence, each feature layer's patches are re-mapped by a Self-Alignment Function (SAF),
the last-layer tokens are refined per layer by a Spatial-Aware Cross-Attention (SCA), and each layer's map is
`cos(patch, anomaly) - cos(patch, normal)`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput
from transformers.utils import logging as transformers_logging
from transformers.utils.output_capturing import capture_outputs

from .backbones import BackboneAdapter, backbone_adapter, layer_class_names, vision_config_of
from .configuration_visualad import VisualADConfig
from .few_shot import ReferenceMixin, VisualADReferenceBank
from .scoring import topk_mean

logger = transformers_logging.get_logger(__name__)

# Loss constants of the released code (SPEC §5).
FOCAL_GAMMA = 2.0
FOCAL_SMOOTH = 1e-5
DICE_SMOOTH = 1.0
CONTRASTIVE_MARGIN = 0.5
COSINE_EPS = 1e-8


@dataclass
class VisualADOutput(ModelOutput):
    r"""
    Output of [`VisualADModel`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            `loss_cls + loss_seg + loss_ctr` (the terms that could be computed), when `labels` or `masks` are given.
        loss_cls (`torch.FloatTensor`, *optional*):
            Binary cross-entropy of `image_logits` against the image labels.
        loss_seg (`torch.FloatTensor`, *optional*):
            Sum over feature layers of focal + dice loss of each upsampled layer map against the masks.
        loss_ctr (`torch.FloatTensor`, *optional*):
            Hinge on the cosine between the enhanced anomaly and normal tokens of the deepest feature layer.
        anomaly_map (`torch.FloatTensor` of shape `(batch_size, height, width)`):
            Sum of the layer maps, each upsampled bilinearly to the input size. Not smoothed: the image processor's
            `post_process_anomaly_detection` applies the Gaussian smoothing used for inference scores.
        layer_anomaly_maps (`torch.FloatTensor` of shape `(batch_size, num_feature_layers, grid_height, grid_width)`):
            One map per feature layer on the patch grid, in the order of `config.feature_layers`.
        image_logits (`torch.FloatTensor` of shape `(batch_size,)`):
            Training-time image logit: mean of the top `topk_ratio` fraction of `anomaly_map`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
            The backbone's hidden states as VisualAD runs it: the input of its first layer (after the pre-norm, if
            any), then the output of every layer, each of shape `(batch_size, 2 + num_prefix_tokens + num_patches,
            hidden_size)`. The sequence is `[anomaly token, normal token, prefix tokens (CLS, registers), patches]`,
            so the backbone's own outputs for the same image differ (its tokens attend to the two extra ones).
            `output_hidden_states=[i, ...]` keeps only those indices (others are `None`).
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True`):
            Every backbone layer's attention weights, `(batch_size, num_heads, sequence_length, sequence_length)`
            over the same sequence (the two tokens first). Only the eager attention implementation computes them
            (load with `attn_implementation="eager"`); SDPA and flash attention return none.
    """

    loss: torch.FloatTensor | None = None
    loss_cls: torch.FloatTensor | None = None
    loss_seg: torch.FloatTensor | None = None
    loss_ctr: torch.FloatTensor | None = None
    anomaly_map: torch.FloatTensor | None = None
    layer_anomaly_maps: torch.FloatTensor | None = None
    image_logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class VisualADTokens(nn.Module):
    """The anomaly token `t_a` and the normal token `t_n`, placed in front of the backbone sequence.

    Their position embedding is the one the backbone adapter gives: the CLS position embedding for CLIP and DINOv2
    (the released code copies it and never trains it), see `visualad_hf.backbones` for the other families; with
    `train_token_position_embeddings` each token gets its own learnable position instead.
    """

    def __init__(self, config: VisualADConfig):
        super().__init__()
        hidden_size = config.hidden_size
        self.anomaly_token = nn.Parameter(torch.empty(hidden_size))
        self.normal_token = nn.Parameter(torch.empty(hidden_size))
        self.position_embeddings = (
            nn.Parameter(torch.zeros(2, hidden_size)) if config.train_token_position_embeddings else None
        )

    def forward(self, batch_size: int, token_position: torch.Tensor) -> torch.Tensor:
        tokens = torch.stack([self.anomaly_token, self.normal_token])
        positions = self.position_embeddings if self.position_embeddings is not None else token_position
        tokens = tokens + positions.to(tokens.dtype)
        return tokens.unsqueeze(0).expand(batch_size, -1, -1)


class VisualADSpatialCrossAttention(nn.Module):
    """Spatial-Aware Cross-Attention (SCA) of one feature layer (SPEC §2).

    Learnable anchors attend over the layer's patches (keys carry a learnable position table); each token then takes a
    sigmoid-gated mix of the anchor summaries as a scaled residual. The summaries do not depend on the token, so they
    are computed once for both tokens.
    """

    def __init__(self, config: VisualADConfig):
        super().__init__()
        hidden_size = config.hidden_size
        self.scale = hidden_size**-0.5
        self.anchors = nn.Parameter(torch.empty(config.num_anchors, hidden_size))
        self.position_embeddings = nn.Parameter(torch.empty(config.max_patches, hidden_size))
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.q_norm = nn.LayerNorm(hidden_size)
        self.k_norm = nn.LayerNorm(hidden_size)
        self.gate = nn.Linear(hidden_size, config.num_anchors)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.residual_scale = nn.Parameter(torch.empty(1))
        self.dropout = nn.Dropout(config.sca_dropout)

    def summarize(self, patches: torch.Tensor) -> torch.Tensor:
        """Anchor summaries `U` of shape `(batch, num_anchors, hidden)` from patches `(batch, num_patches, hidden)`."""
        num_patches = patches.shape[1]
        if num_patches > self.position_embeddings.shape[0]:
            raise ValueError(
                f"{num_patches} patches exceed the SCA position table of {self.position_embeddings.shape[0]} rows "
                "(config.max_patches); use a smaller input or a model with a larger max_patches."
            )
        queries = self.q_norm(self.q_proj(self.anchors))
        keys = self.k_norm(self.k_proj(patches + self.position_embeddings[:num_patches]))
        weights = torch.softmax(torch.matmul(keys, queries.T).transpose(1, 2) * self.scale, dim=-1)
        # weights @ (patches @ W_v) == (weights @ patches) @ W_v (v_proj has no bias): projecting the num_anchors
        # summaries instead of all patches saves num_patches / num_anchors of the value projection's work.
        return self.v_proj(torch.matmul(self.dropout(weights), patches))

    def forward(self, tokens: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Enhance `tokens` `(batch, num_tokens, hidden)` with the layer's `patches`."""
        summaries = self.summarize(patches)
        gates = torch.sigmoid(self.gate(tokens))
        mixed = torch.matmul(gates, summaries)
        return tokens + self.residual_scale * self.dropout(self.out_proj(mixed))


class VisualADSelfAlignmentMLP(nn.Module):
    """SAF `"mlp"` (released): Linear → GELU → Dropout → Linear → Dropout, no residual."""

    def __init__(self, config: VisualADConfig):
        super().__init__()
        hidden, inner = config.hidden_size, config.saf_hidden_size or config.hidden_size
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(config.saf_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.activation(self.fc1(hidden_states)))
        return self.dropout(self.fc2(hidden_states))


class VisualADSelfAlignmentLinear(nn.Module):
    """SAF `"linear"`: one Linear followed by dropout."""

    def __init__(self, config: VisualADConfig):
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.saf_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc(hidden_states))


class VisualADSelfAlignmentResidualMLP(nn.Module):
    """SAF `"mlp_residual"`: `x + MLP(LayerNorm(x))`."""

    def __init__(self, config: VisualADConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.hidden_size)
        self.mlp = VisualADSelfAlignmentMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.mlp(self.layer_norm(hidden_states))


class VisualADSelfAlignmentAdapter(nn.Module):
    """SAF `"adapter"`: `x + s * up(GELU(z) * sigmoid(gate(z)))` with `z = down(LayerNorm(x))`; `up` starts at zero."""

    def __init__(self, config: VisualADConfig):
        super().__init__()
        hidden, inner = config.hidden_size, config.saf_hidden_size or config.hidden_size
        self.layer_norm = nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, inner)
        self.gate = nn.Linear(inner, inner)
        self.up = nn.Linear(inner, hidden)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(config.saf_dropout)
        self.scale = nn.Parameter(torch.empty(1))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        reduced = self.down(self.layer_norm(hidden_states))
        mixed = self.activation(reduced) * torch.sigmoid(self.gate(reduced))
        return hidden_states + self.scale * self.dropout(self.up(mixed))


class VisualADSelfAlignmentLeakyReLU(nn.Module):
    """SAF `"leakyrelu"`: (Linear → LeakyReLU(0.01) → Dropout) twice."""

    def __init__(self, config: VisualADConfig):
        super().__init__()
        hidden, inner = config.hidden_size, config.saf_hidden_size or config.hidden_size
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)
        self.activation = nn.LeakyReLU(0.01)
        self.dropout = nn.Dropout(config.saf_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.activation(self.fc1(hidden_states)))
        return self.dropout(self.activation(self.fc2(hidden_states)))


SELF_ALIGNMENT_CLASSES = {
    "mlp": VisualADSelfAlignmentMLP,
    "linear": VisualADSelfAlignmentLinear,
    "mlp_residual": VisualADSelfAlignmentResidualMLP,
    "adapter": VisualADSelfAlignmentAdapter,
    "leakyrelu": VisualADSelfAlignmentLeakyReLU,
}


def focal_loss(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Two-class focal loss of the released code on anomaly probabilities `p` and binary targets (SPEC §5)."""
    anomalous = targets.clamp(FOCAL_SMOOTH, 1.0 - FOCAL_SMOOTH)
    p_t = anomalous * probabilities + (1.0 - anomalous) * (1.0 - probabilities) + FOCAL_SMOOTH
    return (-((1.0 - p_t) ** FOCAL_GAMMA) * p_t.log()).mean()


def dice_loss(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft dice loss on the anomaly channel, averaged over images (SPEC §5)."""
    probabilities, targets = probabilities.flatten(1), targets.flatten(1)
    intersection = (probabilities * targets).sum(1)
    dice = (2.0 * intersection + DICE_SMOOTH) / (probabilities.sum(1) + targets.sum(1) + DICE_SMOOTH)
    return 1.0 - dice.mean()


class VisualADPreTrainedModel(PreTrainedModel):
    config_class = VisualADConfig
    config: VisualADConfig
    # Lets `from_pretrained(<plain CLIP/DINOv2 checkpoint>, config=...)` land the weights in `self.backbone`.
    base_model_prefix = "backbone"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = layer_class_names()
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    # VisualAD runs the backbone's layers itself: the backbone's own recorders (its `_can_record_outputs`, which
    # transformers installs on the backbone's layers and attention modules) fill these; VisualAD adds none.
    _can_record_outputs: ClassVar[dict[str, list]] = {"hidden_states": [], "attentions": []}

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses from class names: our SCA is a 4-query matmul that no attention backend handles, so
        # `set_attn_implementation` only concerns the backbone, which supports every backend it was loaded with.
        return True

    @classmethod
    def is_custom_code(cls) -> bool:
        # For code outside the library transformers skips, when initialising missing weights, every module without
        # parameters of its own (the SAF MLP container here, CLIPAttention/CLIPMLP in the backbone), assuming remote
        # code writes parameters in place. VisualAD initialises only through transformers' guarded `init` functions
        # (they never overwrite loaded tensors), so it is initialised as library code is: the backbone's tensors
        # missing from a checkpoint then get the backbone's own `_init_weights` (CLIP's scaled std, not 0.02).
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        config = self.config
        if isinstance(module, VisualADTokens):
            std = config.token_init_std or 0.1 / math.sqrt(config.hidden_size)
            init.normal_(module.anomaly_token, std=std)
            init.normal_(module.normal_token, std=std)
            if module.position_embeddings is not None:
                init.zeros_(module.position_embeddings)  # set to the adapter's token position by `from_backbone`
        elif isinstance(module, VisualADSpatialCrossAttention):
            init.normal_(module.anchors, std=config.initializer_range)
            init.normal_(module.position_embeddings, std=config.initializer_range)
            for projection in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
                init.xavier_uniform_(projection.weight)
            init.zeros_(module.out_proj.bias)
            _init_linear_like_torch(module.gate)
            for norm in (module.q_norm, module.k_norm):
                init.ones_(norm.weight)
                init.zeros_(norm.bias)
            init.constant_(module.residual_scale, config.res_scale_init)
        elif isinstance(module, (VisualADSelfAlignmentMLP, VisualADSelfAlignmentLinear)):
            for linear in (m for m in module.children() if isinstance(m, nn.Linear)):
                init.xavier_uniform_(linear.weight)
                init.zeros_(linear.bias)
        elif isinstance(module, VisualADSelfAlignmentAdapter):
            for linear in (module.down, module.gate):
                init.xavier_uniform_(linear.weight)
                init.zeros_(linear.bias)
            init.zeros_(module.up.weight)
            init.zeros_(module.up.bias)
            init.constant_(module.scale, 1e-3)
        elif isinstance(module, VisualADSelfAlignmentLeakyReLU):
            for linear in (module.fc1, module.fc2):
                init.kaiming_uniform_(linear.weight, a=0.01, nonlinearity="leaky_relu")
                init.zeros_(linear.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


def _init_linear_like_torch(linear: nn.Linear) -> None:
    """PyTorch's default `nn.Linear` initialisation, through the guarded `init` functions."""
    init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
    bound = 1 / math.sqrt(linear.in_features)
    init.uniform_(linear.bias, -bound, bound)


class VisualADModel(ReferenceMixin, VisualADPreTrainedModel):
    """VisualAD: a frozen ViT backbone plus the trainable tokens, final LayerNorm, SCA and SAF modules.

    Only the tokens, the backbone's final LayerNorm and the per-layer SCA/SAF modules are trainable; the rest of the
    backbone is frozen but stays differentiable, so gradients reach the tokens through it.
    """

    def __init__(self, config: VisualADConfig):
        super().__init__(config)
        from transformers import AutoModel

        self.backbone = AutoModel.from_config(config.vision_config)
        adapter = config.backbone_adapter
        # VisualAD trains the backbone's final norm (SPEC §1); a family without one (RADIO) gets a fresh LayerNorm.
        self.added_layernorm = (
            nn.LayerNorm(config.hidden_size, eps=adapter.layer_norm_eps)
            if adapter.final_norm(self.backbone) is None
            else None
        )
        self.tokens = VisualADTokens(config)
        self.spatial_cross_attention = nn.ModuleList(
            VisualADSpatialCrossAttention(config) for _ in config.feature_layers
        )
        saf_class = SELF_ALIGNMENT_CLASSES[config.saf_type]
        self.self_alignment = nn.ModuleList(saf_class(config) for _ in config.feature_layers)
        self.reference_bank = VisualADReferenceBank(config)  # few-shot mode (visualad_hf/few_shot.py); empty: zero-shot
        self.post_init()
        self.freeze_backbone()

    # ----------------------------------------------------------------------------------------------------------------
    # Backbone access: every family-specific detail is the adapter's (`visualad_hf.backbones`).

    @property
    def backbone_adapter(self) -> BackboneAdapter:
        return self.config.backbone_adapter

    @property
    def backbone_layers(self) -> nn.ModuleList:
        return self.backbone_adapter.layers(self.backbone)

    @property
    def final_layernorm(self) -> nn.Module:
        """The final norm VisualAD trains: the backbone's own (CLIP `post_layernorm`, DINOv2 `layernorm`, ...), or the
        LayerNorm added for a family without one."""
        own = self.backbone_adapter.final_norm(self.backbone)
        return own if own is not None else self.added_layernorm

    def train(self, mode: bool = True) -> VisualADModel:
        # Training-time augmentations inside the frozen backbone (DINOv3's RoPE jitter) stay off: the backbone must
        # see at training time the positions it sees at inference.
        super().train(mode)
        for module in self.backbone_adapter.eval_only_modules(self.backbone):
            module.eval()
        return self

    def freeze_backbone(self) -> None:
        """Freeze the backbone except its final LayerNorm (SPEC §6)."""
        self.backbone.requires_grad_(False)
        self.final_layernorm.requires_grad_(True)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by part, for per-part learning rates (SPEC §6: tokens 1e-3, the rest 1e-4)."""
        return {
            "tokens": [p for p in self.tokens.parameters() if p.requires_grad],
            "final_layernorm": [p for p in self.final_layernorm.parameters() if p.requires_grad],
            "spatial_cross_attention": [p for p in self.spatial_cross_attention.parameters() if p.requires_grad],
            "self_alignment": [p for p in self.self_alignment.parameters() if p.requires_grad],
        }

    # ----------------------------------------------------------------------------------------------------------------

    def _embed(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone input sequence `[prefix tokens, patches]` with positions, and the two tokens' position embedding."""
        adapter = self.backbone_adapter
        sequence = adapter.embed(self.backbone, pixel_values, self.config.resolved_position_interpolation)
        return sequence, adapter.token_position(self.backbone)

    def backbone_layer_kwargs(self, pixel_values: torch.Tensor) -> dict:
        """What every backbone layer needs for this input besides the sequence (DINOv3: its RoPE tables)."""
        return self.backbone_adapter.layer_kwargs(self.backbone, pixel_values)

    def run_backbone_layers(
        self, hidden_states: torch.Tensor, keep_layers: list[int], **layer_kwargs
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Run the backbone's pre-norm (if any) and all its layers, unchanged, on any token sequence.

        `layer_kwargs` are what `backbone_layer_kwargs(pixel_values)` returns (empty for CLIP and DINOv2). Returns the
        sequences after each 1-indexed layer in `keep_layers` and the sequence after the last layer.
        """
        return self.backbone_adapter.run_layers(self.backbone, hidden_states, keep_layers, layer_kwargs)

    def layer_anomaly_maps(
        self, kept: dict[int, torch.Tensor], last_hidden_state: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The VisualAD heads: one map per feature layer from the backbone outputs (SPEC §1-§4).

        Args:
            kept: sequences after each feature layer, as returned by `run_backbone_layers`.
            last_hidden_state: the sequence after the backbone's last layer (its first two rows are the tokens).
            grid: patch grid `(height, width)`.

        Returns:
            The maps `(batch, num_feature_layers, *grid)` and, per layer, the normalised enhanced tokens
            `(batch, 2, hidden)` (anomaly, normal).
        """
        layernorm = self.final_layernorm
        patch_start = 2 + self.config.num_prefix_tokens
        token_features = layernorm(last_hidden_state[:, :2])
        layer_maps, enhanced_tokens = [], []
        for layer, cross_attention, self_alignment in zip(
            self.config.feature_layers, self.spatial_cross_attention, self.self_alignment
        ):
            patches = layernorm(kept[layer][:, patch_start:])
            enhanced = F.normalize(cross_attention(token_features, patches), dim=-1, eps=COSINE_EPS)
            aligned = F.normalize(self_alignment(patches), dim=-1, eps=COSINE_EPS)
            similarity = torch.matmul(aligned, enhanced.transpose(1, 2))
            layer_maps.append((similarity[..., 0] - similarity[..., 1]).reshape(-1, *grid))
            enhanced_tokens.append(enhanced)
        return torch.stack(layer_maps, dim=1), enhanced_tokens

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must have shape (batch, 3, height, width), got {tuple(pixel_values.shape)}; "
                "prepare images with VisualADImageProcessor."
            )
        height, width = pixel_values.shape[-2:]
        patch = self.config.patch_size
        if height % patch or width % patch:
            raise ValueError(
                f"Input size {height}x{width} is not a multiple of the patch size {patch}; "
                f"resize to a multiple (the model was configured for {self.config.image_size}x{self.config.image_size})."
            )
        return height // patch, width // patch

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        has_mask: torch.Tensor | None = None,
        output_hidden_states: bool | list[int] | None = None,
        output_attentions: bool | None = None,
    ) -> VisualADOutput:
        r"""
        Any other keyword argument is a TypeError (nothing is silently ignored); `return_dict=False` gives a tuple.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
                Images prepared by [`VisualADImageProcessor`]; height and width must be multiples of the patch size.
            labels (`torch.Tensor` of shape `(batch_size,)`, *optional*):
                Image labels (0 normal, 1 anomalous) for the classification loss. Derived from `masks` when omitted.
            masks (`torch.Tensor` of shape `(batch_size, height, width)`, *optional*):
                Ground-truth masks for the segmentation loss; resized bilinearly to the input size when they differ,
                then thresholded at 0.5. Normal images have all-zero masks.
            has_mask (`torch.Tensor` of shape `(batch_size,)`, *optional*):
                Which images' `masks` are known (bool; default all). An anomalous image without a ground-truth mask
                has an unknown mask, not an all-normal one: it is left out of the segmentation loss and still counts
                in the classification and contrastive losses (`VisualADCollator` sets this flag).
            output_hidden_states (`bool` or `list[int]`, *optional*), output_attentions (`bool`, *optional*):
                Also return the backbone's hidden states / attention weights over the sequence with the two tokens
                (see [`VisualADOutput`]); default: the config's `output_hidden_states` / `output_attentions`.
        """
        grid_height, grid_width = self._check_pixel_values(pixel_values)
        batch_size, _, height, width = pixel_values.shape

        sequence, token_position = self._embed(pixel_values)
        tokens = self.tokens(batch_size, token_position).to(sequence.dtype)
        feature_layers = self.config.feature_layers
        kept, hidden_states = self.run_backbone_layers(
            torch.cat([tokens, sequence], dim=1), feature_layers, **self.backbone_layer_kwargs(pixel_values)
        )

        layer_anomaly_maps, enhanced_tokens = self.layer_anomaly_maps(kept, hidden_states, (grid_height, grid_width))
        layer_anomaly_maps = self.apply_reference(kept, layer_anomaly_maps)  # few-shot bank, if set
        upsampled = F.interpolate(layer_anomaly_maps, size=(height, width), mode="bilinear", align_corners=False)
        anomaly_map = upsampled.sum(dim=1)
        image_logits = topk_mean(anomaly_map, self.config.topk_ratio)

        loss = loss_cls = loss_seg = loss_ctr = None
        if labels is not None or masks is not None:
            deepest = enhanced_tokens[max(range(len(feature_layers)), key=lambda i: feature_layers[i])]
            loss_cls, loss_seg, loss_ctr = self._losses(upsampled, image_logits, deepest, labels, masks, has_mask)
            loss = sum(term for term in (loss_cls, loss_seg, loss_ctr) if term is not None)

        return VisualADOutput(
            loss=loss,
            loss_cls=loss_cls,
            loss_seg=loss_seg,
            loss_ctr=loss_ctr,
            anomaly_map=anomaly_map,
            layer_anomaly_maps=layer_anomaly_maps,
            image_logits=image_logits,
        )

    def _losses(
        self,
        upsampled_maps: torch.Tensor,
        image_logits: torch.Tensor,
        deepest_tokens: torch.Tensor,
        labels: torch.Tensor | None,
        masks: torch.Tensor | None,
        has_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """`L_cls`, `L_seg` (None without masks) and `L_ctr` of SPEC §5."""
        size = upsampled_maps.shape[-2:]
        if masks is not None:
            masks = masks.to(upsampled_maps.dtype)
            if masks.ndim == 4:
                masks = masks[:, 0]
            if masks.shape[-2:] != size:
                masks = F.interpolate(masks[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            masks = (masks > 0.5).to(upsampled_maps.dtype)
            if labels is None:
                labels = masks.flatten(1).amax(dim=1)

        loss_cls = F.binary_cross_entropy_with_logits(image_logits, labels.to(image_logits.dtype))
        loss_seg = None
        if masks is not None:
            probabilities = torch.sigmoid(upsampled_maps)
            if has_mask is not None:  # images with an unknown mask take no part in L_seg
                known = has_mask.to(device=masks.device, dtype=torch.bool)
                probabilities, masks = probabilities[known], masks[known]
            if masks.shape[0] == 0:
                loss_seg = upsampled_maps.sum() * 0.0  # no known mask in the batch; keeps the graph whole (DDP)
            else:
                loss_seg = sum(
                    focal_loss(probabilities[:, i], masks) + dice_loss(probabilities[:, i], masks)
                    for i in range(probabilities.shape[1])
                )
        cosine = F.cosine_similarity(deepest_tokens[:, 0], deepest_tokens[:, 1], dim=-1)
        loss_ctr = F.relu(cosine + CONTRASTIVE_MARGIN).mean()
        return loss_cls, loss_seg, loss_ctr

    # ----------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Loading replaces parameters and drops `requires_grad=False`; freeze the backbone again.
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.freeze_backbone()
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if source is not None:
            model._load_reference_from(source, kwargs)  # reference_bank.safetensors, if the folder has one
        return loaded

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        # The few-shot bank is a file beside the weights (few_shot.py); with push_to_hub, upload after it is written.
        hub = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "private", "create_pr") if key in kwargs}
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            self._save_reference_to_folder(save_directory)
            if push_to_hub:
                repo_id = hub.pop("repo_id", None) or Path(save_directory).name
                self.push_to_hub(repo_id, token=kwargs.get("token"), **hub)

    @classmethod
    def from_backbone(
        cls,
        pretrained_backbone: str,
        *,
        dtype: torch.dtype = torch.float32,
        cache_dir: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        **config_overrides,
    ) -> VisualADModel:
        """Fresh VisualAD heads on a pretrained backbone.

        Args:
            pretrained_backbone: a Hub id (e.g. `openai/clip-vit-large-patch14-336`, `facebook/dinov2-large`,
                `facebook/dinov3-vitl16-pretrain-lvd1689m`, `google/siglip2-large-patch16-512`) or a local folder
                with a checkpoint of a supported family (`visualad_hf.backbones`), full multi-tower checkpoints
                (CLIP, SigLIP) included.
            dtype: parameter dtype (fp32 by default, the training precision of the released runs).
            **config_overrides: `VisualADConfig` fields, e.g. `feature_layers=[6, 12, 18, 24]`, `image_size=518`.

        The input normalisation is read from the folder's preprocessor_config.json when it has one (and the family
        normalises there; RADIO normalises with its config's constants), else the family's published constants.
        """
        hub_kwargs = {"cache_dir": cache_dir, "revision": revision, "token": token, "local_files_only": local_files_only}
        try:
            backbone_config = AutoConfig.from_pretrained(pretrained_backbone, **hub_kwargs)
        except OSError as error:
            raise OSError(backbone_load_error_message(pretrained_backbone, error)) from error
        backbone_config = vision_config_of(backbone_config, pretrained_backbone)
        normalization = _preprocessor_normalization(backbone_config, pretrained_backbone, hub_kwargs)
        if normalization is not None:
            config_overrides = {"image_mean": normalization[0], "image_std": normalization[1], **config_overrides}
        config = VisualADConfig(vision_config=backbone_config, **config_overrides)
        # The heads are missing from a backbone checkpoint by design: replace transformers' load report by our check.
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            model, info = cls.from_pretrained(
                pretrained_backbone, config=config, dtype=dtype, output_loading_info=True, **hub_kwargs
            )
        except OSError as error:
            raise OSError(backbone_load_error_message(pretrained_backbone, error)) from error
        finally:
            transformers_logging.set_verbosity(verbosity)
        # Tensors the backbone class itself may miss by design (e.g. RADIO's identity layer scales) get its own init.
        optional = [re.compile(pattern) for pattern in type(model.backbone)._keys_to_ignore_on_load_missing or []]
        missing_backbone = sorted(
            key
            for key in info["missing_keys"]
            if key.startswith("backbone.") and not any(p.search(key[len("backbone.") :]) for p in optional)
        )
        if missing_backbone:
            raise ValueError(
                f"{pretrained_backbone!r} did not provide {len(missing_backbone)} backbone weights, e.g. "
                f"{missing_backbone[:5]}; is it a {backbone_config.model_type} checkpoint?"
            )
        logger.info(
            "Loaded backbone %s; initialised %d VisualAD head tensors; ignored %d unrelated checkpoint tensors.",
            pretrained_backbone,
            len(info["missing_keys"]),
            len(info["unexpected_keys"]),
        )
        if model.tokens.position_embeddings is not None:
            with torch.no_grad():
                position = model.backbone_adapter.token_position(model.backbone)
                model.tokens.position_embeddings.copy_(position.expand(2, -1))
        return model


def _preprocessor_normalization(
    backbone_config: PreTrainedConfig, source: str, hub_kwargs: dict
) -> tuple[list[float], list[float]] | None:
    """Mean/std from the backbone's own preprocessor_config.json, when it has one that normalises."""
    from transformers.utils import cached_file

    try:
        path = cached_file(
            source,
            "preprocessor_config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )
    except OSError:
        return None
    if path is None:
        return None
    try:
        processor = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path}: the backbone's preprocessor_config.json is not valid JSON ({error}); fix or delete it "
            "(the family's published normalisation is used without it)."
        ) from error
    if not isinstance(processor, dict):
        return None
    return backbone_adapter(backbone_config).normalization_from_preprocessor(processor)


def backbone_load_error_message(source: str, error: Exception) -> str:
    from huggingface_hub import is_offline_mode

    reason = "offline mode (HF_HUB_OFFLINE=1) forbids downloading it" if is_offline_mode() else "it could not be downloaded"
    return (
        f"Could not load the backbone {source!r}: it is not a local folder, it is not in the Hugging Face cache, and "
        f"{reason}. Download it once where there is network (`hf download {source}`), or pass the path of a local "
        f"folder with its config.json and weights. (Underlying error: {type(error).__name__}: {str(error)[:300]})"
    )


__all__ = ["VisualADModel", "VisualADOutput", "VisualADPreTrainedModel", "backbone_load_error_message"]
