"""The training curves of a run folder: metrics.jsonl drawn into training_curves.png, one panel per kind of metric.

    python train.py --plot-only runs/default        # train.py also redraws them at every checkpoint
"""

from __future__ import annotations

from pathlib import Path

from cli import UsageError
from run_folder import read_jsonl

PLOTS = (  # panel title -> metrics drawn in it
    ("reward", ("reward", "stage_format", "stage_tool_call", "stage_evidence", "stage_answer", "stage_judge")),
    ("answers and calls (training rollouts)", ("exact_match", "answered", "well_formed", "tool_calls")),
    ("evaluation (greedy, held out)", ("eval_em", "eval_f1", "eval_format", "eval_answered", "eval_la_bleu")),
    ("dead groups and replacements", ("dead_fraction", "dead_in_batch", "extra_rollouts_per_prompt")),
    ("policy update", ("kl_ref", "approx_kl", "clip_fraction")),
    ("response length (tokens)", ("response_tokens",)),
    ("iStar PRM, before its update", ("istar_pair_accuracy", "istar_outcome_correlation", "istar_dpo_loss",
                                      "istar_log_ratio_mean")),
)


def plot(folder: Path) -> Path:
    """Draw the training curves of metrics.jsonl into training_curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not (folder / "metrics.jsonl").exists():
        raise UsageError(f"--plot-only {folder}: no metrics.jsonl there")
    rows = read_jsonl(folder / "metrics.jsonl")
    panels = [(title, names) for title, names in PLOTS if any(name in row for row in rows for name in names)]
    columns = max(1, (len(panels) + 1) // 2)
    figure, axes = plt.subplots(2, columns, figsize=(5 * columns, 8), squeeze=False)
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    for axis, (title, names) in zip(axes.flat, panels):
        for name in names:
            points = [(row["step"], row[name]) for row in rows if isinstance(row.get(name), (int, float))]
            if points:
                axis.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3, label=name)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    figure.tight_layout()
    path = folder / "training_curves.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
