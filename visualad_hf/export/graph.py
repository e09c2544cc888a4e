"""The module that is exported: model and post-processing in one graph, so a deployment needs only the graph and the
image processor's preprocessing."""

from __future__ import annotations

import torch
from torch import nn

from ..scoring import gaussian_smooth, topk_mean


class VisualADScoringGraph(nn.Module):
    """`pixel_values` `[B, 3, H, W]` -> `anomaly_map` `[B, H, W]` and `score` `[B]`, as the pipeline computes them.

    `anomaly_map` is the model's map smoothed with the config's Gaussian at model resolution, `score` the top-k mean
    of it (SPEC §4): the same functions as `VisualADImageProcessor.post_process_anomaly_detection`, with the values
    of the model config (the pipeline's single source of truth for them).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.gaussian_sigma = float(model.config.gaussian_sigma)
        self.topk_ratio = float(model.config.topk_ratio)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.model(pixel_values=pixel_values).anomaly_map
        smoothed = gaussian_smooth(maps.float(), self.gaussian_sigma)
        return smoothed, topk_mean(smoothed, self.topk_ratio)


__all__ = ["VisualADScoringGraph"]
