"""What a finished `lit-bigmodel tune` study leaves behind: ``best.yaml``, three pictures and a summary table.

``best.yaml`` is the full CLI config with the best trial's values (and the seed every trial used), so
``lit-bigmodel fit -c <study_dir>/best.yaml`` trains that trial again. The pictures come from
``optuna.visualization.matplotlib``: ``history.png``, ``parallel_coordinate.png``, ``importances.png``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState

from lit_bigmodel.tuning.settings import TuneSettings
from lit_bigmodel.tuning.trial import BaseConfig

PICTURES = {
    "history.png": "plot_optimization_history",
    "parallel_coordinate.png": "plot_parallel_coordinate",
    "importances.png": "plot_param_importances",
}


def write_outputs(study: optuna.Study, base: BaseConfig, settings: TuneSettings, study_dir: str) -> None:
    """Write ``best.yaml`` and the pictures into ``study_dir`` and print the summary table.

    Example::

        write_outputs(study, BaseConfig.load("configs/sft_tiny.yaml"), settings, "runs/tune")
    """
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        write_best_config(study.best_trial, base, os.path.join(study_dir, "best.yaml"))
    notes = write_pictures(study, study_dir)
    print(summary_table(study, settings))
    for note in notes:
        print(note)


def write_best_config(trial: optuna.trial.FrozenTrial, base: BaseConfig, path: str) -> None:
    """The config with ``trial``'s values, as YAML that ``lit-bigmodel fit -c`` reads."""
    header = f"# best trial {trial.number} of the study: {trial.value!r}\n"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(header + base.dump(base.with_values(trial.params)))


def write_pictures(study: optuna.Study, study_dir: str) -> list[str]:
    """Save each picture Optuna can draw for this study; the notes say which could not be drawn and why."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    notes = []
    for name, function in PICTURES.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes: Any = getattr(optuna_plots, function)(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.savefig(os.path.join(study_dir, name), dpi=110, bbox_inches="tight")
            plt.close(figure)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            notes.append(f"{name} not drawn: {' '.join(str(err).split())}")
    return notes


def summary_table(study: optuna.Study, settings: TuneSettings) -> str:
    """Trials best first (then pruned, then failed): number, state, value, steps and values."""
    keys = [param.key for param in settings.params]
    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.FAIL: 2}
    sign = 1.0 if settings.direction == "minimize" else -1.0
    trials = [t for t in study.get_trials(deepcopy=False) if t.state in order]
    trials.sort(key=lambda t: (order[t.state], sign * t.value if t.value is not None else 0.0, t.number))
    header = ["trial", "state", settings.monitor, "steps", *[key.rsplit(".", 1)[-1] for key in keys]]
    rows = [header]
    for t in trials:
        value = t.value if t.value is not None else _last(t.intermediate_values)
        rows.append(
            [
                str(t.number), t.state.name, "-" if value is None else f"{value:.5g}",
                str(t.user_attrs.get("global_step", "-")), *[_short(t.params.get(key, "-")) for key in keys],
            ]
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    counts = {state.name: sum(t.state == state for t in trials) for state in order}
    tally = ", ".join(f"{n} {name.lower()}" for name, n in counts.items())
    return "\n".join([f"Study {study.study_name!r}: {tally}", *lines])


def _last(values: dict[int, float]) -> float | None:
    return values[max(values)] if values else None


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
