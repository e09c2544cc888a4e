"""VisualAD for the Hugging Face stack.

Importing the package registers the model with `AutoConfig`/`AutoModel`, the image processor with
`AutoImageProcessor`, and the `"anomaly-detection"` pipeline task.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_visualad import VisualADConfig
from .export.runtime import ExportedVisualADModel
from .image_processing_visualad import VisualADImageProcessor
from .modeling_visualad import VisualADModel, VisualADOutput, VisualADPreTrainedModel
from .pipeline_anomaly_detection import AnomalyDetectionPipeline

AutoConfig.register(VisualADConfig.model_type, VisualADConfig, exist_ok=True)
AutoModel.register(VisualADConfig, VisualADModel, exist_ok=True)
AutoImageProcessor.register(VisualADConfig, image_processor_classes={"pil": VisualADImageProcessor}, exist_ok=True)
# Exported folders (visualad_hf.export) first: the loader refuses a non-exported folder at once, with an OSError that
# makes the pipeline go on to AutoModel.
PIPELINE_REGISTRY.register_pipeline(
    "anomaly-detection",
    pipeline_class=AnomalyDetectionPipeline,
    pt_model=(ExportedVisualADModel, AutoModel),
    type="image",
)

__version__ = "0.1.0"

__all__ = [
    "AnomalyDetectionPipeline",
    "VisualADConfig",
    "VisualADImageProcessor",
    "VisualADModel",
    "VisualADOutput",
    "VisualADPreTrainedModel",
    "__version__",
]
