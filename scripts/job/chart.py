"""The training-curves chart a run leaves in `output_dir`: training loss, learning rate and the eval
metrics against the optimizer step, from the Trainer's `state.log_history`.

A panel with nothing to draw says why (for instance: the run ended before the first log), so that an
empty chart is never mistaken for a run that learned nothing.
"""

from __future__ import annotations

FEW_POINTS = 20  # below this many points a curve is drawn with markers, so that one point still shows


def is_timing(key: str) -> bool:
    """Metrics that measure speed, not the model (`eval_runtime`, `eval_samples_per_second`, ...)."""
    return any(t in key for t in ("runtime", "per_second", "model_preparation_time"))


def series(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the chart draws: `(step, value)` points for "loss", "learning_rate" and every eval metric
    (`eval_loss`, `eval_accuracy`, ...), from the log entries that have them."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        if "step" not in entry:
            continue
        for key, value in entry.items():
            training = key in ("loss", "learning_rate")
            if (training or (key.startswith("eval_") and not is_timing(key))) and isinstance(value, (int, float)):
                curves.setdefault(key, []).append((entry["step"], value))
    return curves


def why_nothing_logged(logging_strategy, logging_steps, global_step: int) -> str:
    """Why a run's history holds no training loss, in words for the chart."""
    strategy = getattr(logging_strategy, "value", logging_strategy)
    if strategy == "no":
        return "logging_strategy is 'no'"
    if strategy == "steps":
        return f"logging every {logging_steps} steps, and the run took {global_step} steps: lower --logging_steps"
    return f"logging_strategy '{strategy}' logged nothing in the run's {global_step} steps"


def draw(log_history: list[dict], title: str = "", baseline: float | None = None, missing: str = ""):
    """The chart as a matplotlib Figure. `baseline` (the majority-class accuracy) is drawn dashed under the
    eval metrics; `missing` says why there is no training curve, written where the curve would be."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = series(log_history)
    eval_keys = sorted(k for k in curves if k.startswith("eval_") and k != "eval_loss")
    panels = 2 + bool(eval_keys)
    fig, axes = plt.subplots(panels, 1, figsize=(8, 2.6 * panels + 0.6), sharex=True)

    def plot(ax, key, label, **style):
        points = curves.get(key, [])
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < FEW_POINTS else None, label=label, **style)
        return bool(points)

    def say_why(ax, what):
        ax.text(
            0.5,
            0.5,
            f"no {what} logged" + (f":\n{missing}" if missing else ""),
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="gray",
        )

    ax = axes[0]
    if not plot(ax, "loss", "training loss", color="tab:blue"):
        say_why(ax, "training loss")
    plot(ax, "eval_loss", "eval loss", color="tab:orange")
    ax.set_ylabel("loss")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    ax.grid(alpha=0.3)

    ax = axes[1]
    if not plot(ax, "learning_rate", "learning rate", color="tab:green"):
        say_why(ax, "learning rate")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.grid(alpha=0.3)

    if eval_keys:
        ax = axes[2]
        for key in eval_keys:
            plot(ax, key, key[len("eval_") :])
            last_step, last_value = curves[key][-1]
            ax.annotate(
                f"{last_value:.3f}", (last_step, last_value), textcoords="offset points", xytext=(-10, 6), fontsize=8
            )
        if baseline is not None:
            ax.axhline(baseline, linestyle="--", color="gray", label=f"majority class ({baseline:.3f})")
        ax.margins(y=0.15)  # room for the value labels
        ax.set_ylabel("eval metrics")
        ax.legend(loc="best")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_history(
    log_history: list[dict], path: str, title: str = "", baseline: float | None = None, missing: str = ""
) -> str:
    """Draw the chart (`draw`) and save it as a PNG at `path`; returns `path`."""
    import matplotlib.pyplot as plt

    fig = draw(log_history, title, baseline, missing)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
