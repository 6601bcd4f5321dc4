"""Pictures of a run: learning curves, the gate heatmap, score against Params %.

matplotlib with the Agg backend (no screen needed). Every function writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(history: list[dict], path: Path) -> Path | None:
    steps = [r for r in history if any(k.startswith("loss/") for k in r)]
    vals = [r for r in history if "val/avg" in r]
    if not steps:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2 if vals else 1, figsize=(11 if vals else 6, 4), squeeze=False)
    ax = axes[0][0]
    tasks = sorted({k[5:] for r in steps for k in r if k.startswith("loss/")})
    for t in tasks:
        xs = [r["step"] for r in steps if f"loss/{t}" in r]
        ys = [r[f"loss/{t}"] for r in steps if f"loss/{t}" in r]
        ax.plot(xs, ys, label=t)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("training loss per task")
    if vals:
        ax = axes[0][1]
        keys = sorted({k for r in vals for k in r if k.startswith("val/") and k.count("/") == 2
                       and k.split("/")[2] in ("accuracy", "CIDEr")})
        for k in keys:
            ax.plot([r["epoch"] for r in vals if k in r], [r[k] for r in vals if k in r], marker="o",
                    label=k[4:])
        ax.plot([r["epoch"] for r in vals], [r["val/avg"] for r in vals], "k--", marker="s", label="avg")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation score")
        ax.legend(fontsize=8)
        ax.set_title("validation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gate_means(gates: dict) -> tuple[list[int], list[str], np.ndarray]:
    """{'encoder.<layer>.<sub>': G} -> (layers, sub-layers, [sub, layer] mean gate value)."""
    layers = sorted({int(k.split(".")[1]) for k in gates})
    subs = sorted({k.split(".")[2] for k in gates}, reverse=True)
    grid = np.full((len(subs), len(layers)), np.nan)
    for k, g in gates.items():
        _, layer, sub = k.split(".")
        grid[subs.index(sub), layers.index(int(layer))] = float(g.float().mean())
    return layers, subs, grid


def plot_gate_heatmap(gates: dict, path: Path, title: str = "mean gate value G") -> Path | None:
    if not gates:
        return None
    layers, subs, grid = gate_means(gates)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(layers), 2.2))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(layers)), [str(i) for i in layers])
    ax.set_yticks(range(len(subs)), subs)
    ax.set_xlabel("encoder layer")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_score_vs_params(rows: list[dict], path: Path, score_key: str = "avg") -> Path | None:
    """rows: [{'method', 'params_percent', score_key}]"""
    rows = [r for r in rows if r.get(score_key) is not None]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["params_percent"], r[score_key], s=40)
        ax.annotate(r["method"], (r["params_percent"], r[score_key]), fontsize=8, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of all, log scale)")
    ax.set_ylabel(score_key)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(out: Path, history: list[dict], model=None, gates: dict | None = None) -> list[Path]:
    plots = Path(out) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    made = [plot_learning_curves(history, plots / "learning_curves.png")]
    if gates is None and model is not None:
        gates = model.gate_values()
    if gates:
        made.append(plot_gate_heatmap(gates, plots / "gate_heatmap.png"))
    return [p for p in made if p is not None]
