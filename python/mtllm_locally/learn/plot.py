"""Held-out accuracy per adapter version per task, as a PNG: each evaluated version's
score beside the score of what it was judged against, promoted versions marked."""

from __future__ import annotations

from pathlib import Path

from ..state.registry import Registry


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: str | Path) -> Path:
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_versions(registry: Registry, out: str | Path, *, timeline: list[dict] | None = None,
                  title: str = "held-out score per adapter version") -> Path:
    plt = _pyplot()

    versions = [v for v in registry.versions() if v.status in ("passed", "rejected")]
    promoted = {r["adapter_id"] for r in registry.log() if r["action"] == "promote"}
    tasks = sorted({v.task_key for v in versions}) or ["(no evaluated versions yet)"]
    panels = len(tasks) + (1 if timeline else 0)
    fig, axes = plt.subplots(panels, 1, figsize=(8, 3.2 * panels), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks):
        vs = [v for v in versions if v.task_key == task]
        xs = [v.version for v in vs]
        ax.plot(xs, [v.metrics.get("baseline_score", 0) for v in vs], "o--", color="grey",
                label="what served the task (baseline)")
        ax.plot(xs, [v.score for v in vs], "o-", color="tab:blue", label="candidate")
        for v in vs:
            if v.adapter_id in promoted:
                ax.scatter([v.version], [v.score], s=160, facecolors="none", edgecolors="tab:green", linewidths=2)
        ax.scatter([], [], s=160, facecolors="none", edgecolors="tab:green", label="promoted")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("adapter version")
        ax.set_ylabel("held-out score")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xticks(xs or [0])
        ax.legend(fontsize=8, loc="lower right")
    if timeline:
        ax = axes[-1, 0]
        ax.step([p["calls"] for p in timeline], [p["accuracy"] for p in timeline], where="post", color="tab:blue")
        ax.set_xlabel("calls made by the program")
        ax.set_ylabel("held-out accuracy served")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title("accuracy of the version serving the task, over time", fontsize=9)
    fig.suptitle(title)
    return _save(plt, fig, out)


def plot_losses(losses: list[float], out: str | Path, *, title: str = "training loss per step") -> Path:
    """Mean completion loss per training step (log scale: the plateau and its end show)."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.semilogy(range(1, len(losses) + 1), [max(x, 1e-5) for x in losses], color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("completion loss")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    return _save(plt, fig, out)


def plot_curves(curves: dict[str, list[dict]], out: str | Path, *,
                title: str = "accuracy vs labelled calls") -> Path:
    """One line per task: test accuracy of what the gate serves after n labelled calls
    (points: {"labelled", "accuracy", "served"}), each point labelled with what served."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(8, 4))
    for task, points in curves.items():
        xs, ys = [p["labelled"] for p in points], [p["accuracy"] for p in points]
        ax.plot(xs, ys, "o-", label=task)
        for x, y, p in zip(xs, ys, points):
            ax.annotate(p["served"].replace("demonstrations", "demos"), (x, y), fontsize=7,
                        textcoords="offset points", xytext=(4, -10))
    ax.set_xlabel("labelled calls of the task")
    ax.set_ylabel("accuracy on unseen inputs (exact match)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title)
    return _save(plt, fig, out)
