"""Small reference networks and model builders that need no hub."""

from lit_bigmodel.nets.builders import ModelSource, build_model, max_positions
from lit_bigmodel.nets.cnn_discriminator import CNNDiscriminator
from lit_bigmodel.nets.hf_generator import HFCausalLMGenerator
from lit_bigmodel.nets.lstm import LSTMGenerator

__all__ = ["CNNDiscriminator", "HFCausalLMGenerator", "LSTMGenerator", "ModelSource", "build_model", "max_positions"]
