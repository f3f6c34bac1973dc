"""Hyperparameter search over `lit-bigmodel fit` configs on Optuna (`lit-bigmodel tune`).

Example::

    from lit_bigmodel.tuning import tune

    study = tune("configs/sft_tiny.yaml", "configs/tune_sft_tiny.yaml", study_dir="runs/tune_sft_tiny")
"""

from lit_bigmodel.tuning.pruning import TrialPruning
from lit_bigmodel.tuning.settings import TuneSettings, parse_settings
from lit_bigmodel.tuning.space import Param, parse_params
from lit_bigmodel.tuning.study import tune

__all__ = ["Param", "TrialPruning", "TuneSettings", "parse_params", "parse_settings", "tune"]
