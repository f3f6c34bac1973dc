"""Small reference networks and model builders that need no hub."""

from lit_bigmodel.nets.builders import ModelSource, build_model, max_positions

__all__ = ["ModelSource", "build_model", "max_positions"]
