"""VisualAD for the Hugging Face stack.

Importing the package registers the model with `AutoConfig`/`AutoModel`, the image processor with
`AutoImageProcessor`, and the `"anomaly-detection"` pipeline task.
"""

from transformers import AutoConfig, AutoModel

from .configuration_visualad import VisualADConfig
from .modeling_visualad import VisualADModel, VisualADOutput, VisualADPreTrainedModel

AutoConfig.register(VisualADConfig.model_type, VisualADConfig, exist_ok=True)
AutoModel.register(VisualADConfig, VisualADModel, exist_ok=True)

__version__ = "0.1.0"

__all__ = ["VisualADConfig", "VisualADModel", "VisualADOutput", "VisualADPreTrainedModel", "__version__"]
