"""RWSAN (Residual Weight-Sharing Attention Network, Qin, Hu & Zhuang, IEEE TMM 2022) for Hugging Face transformers.

Importing the package registers the model with the `Auto*` classes, so that `AutoConfig`, `AutoModel` and
`AutoModelForVisualQuestionAnswering` resolve `model_type="rwsan"`, and marks the classes for `auto_map`, so that
`save_pretrained` writes the code beside the weights for `trust_remote_code=True` users without this package, and
registers the "vqa-features" pipeline task.
"""

from transformers import AutoConfig, AutoModel, AutoModelForVisualQuestionAnswering, AutoProcessor

from .configuration_rwsan import RWSANConfig
from .modeling_rwsan import RWSANForVQA, RWSANForVQAOutput, RWSANModel, RWSANModelOutput, RWSANPreTrainedModel
from .pipeline_rwsan import RWSANVQAPipeline, register_pipeline, save_for_pipeline
from .processing_rwsan import RWSANProcessor

AutoConfig.register(RWSANConfig.model_type, RWSANConfig)
AutoModel.register(RWSANConfig, RWSANModel)
AutoModelForVisualQuestionAnswering.register(RWSANConfig, RWSANForVQA)
AutoProcessor.register(RWSANConfig, RWSANProcessor)
register_pipeline()
RWSANConfig.register_for_auto_class()
RWSANModel.register_for_auto_class("AutoModel")
RWSANForVQA.register_for_auto_class("AutoModelForVisualQuestionAnswering")

__all__ = [
    "RWSANConfig",
    "RWSANForVQA",
    "RWSANForVQAOutput",
    "RWSANModel",
    "RWSANModelOutput",
    "RWSANPreTrainedModel",
    "RWSANProcessor",
    "RWSANVQAPipeline",
    "register_pipeline",
    "save_for_pipeline",
]
