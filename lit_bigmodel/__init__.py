"""lit_bigmodel: Lightning components for fine-tuning, distilling and adversarially training big models.

Optional dependencies (deepspeed, wandb) are imported only where they are used.
"""

from lit_bigmodel.distillation import DistillationModule
from lit_bigmodel.errors import ConfigurationError, DataError, LitBigModelError, MissingPathError, OutputExistsError
from lit_bigmodel.losses import (
    attention_loss,
    causal_lm_loss,
    discriminator_loss,
    distillation_loss,
    hidden_state_loss,
    policy_gradient_loss,
)
from lit_bigmodel.nets.builders import build_model
from lit_bigmodel.objectives import (
    CausalLMObjective,
    ClassificationObjective,
    DistillationObjective,
    LossTerms,
    Objective,
)
from lit_bigmodel.schedules import LRSchedule
from lit_bigmodel.seqgan import SeqGANModule
from lit_bigmodel.sft import SFTModule

__version__ = "0.1.0"

__all__ = [
    "CausalLMObjective",
    "ClassificationObjective",
    "ConfigurationError",
    "DataError",
    "DistillationModule",
    "DistillationObjective",
    "LRSchedule",
    "LitBigModelError",
    "LossTerms",
    "MissingPathError",
    "Objective",
    "OutputExistsError",
    "SFTModule",
    "SeqGANModule",
    "attention_loss",
    "build_model",
    "causal_lm_loss",
    "discriminator_loss",
    "distillation_loss",
    "hidden_state_loss",
    "policy_gradient_loss",
]
