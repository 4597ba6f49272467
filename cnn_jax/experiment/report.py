"""Tables, plots and claims of experiments that compare nets, keyed by net name (the
records of cnn_jax.experiment.nets): any families of the zoo's table side by side.

    table(runs, note)                            # Table 6's shape, a row per net
    plot_curves(runs, path, title)               # Fig. 6's shape, a panel per family
    compare(runs, "resnet_beats_plain", "...", worse="plain56", better="resnet56", points=10)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib
import numpy as np

from cnn_jax.experiment.command import claim, figure, mean_std
from cnn_jax.experiment.nets import mean_train_errors, training_error


def nets_in(runs: list[dict]) -> list[dict]:
    """One record per net (its first seed's), in the order the runs list them."""
    seen: dict = {}
    for r in runs:
        seen.setdefault(r["name"], r)
    return list(seen.values())


def compare(runs: list[dict], name: str, statement: str, worse: str, better: str,
            points: float, no_worse: bool = False) -> Optional[dict]:
    """The claim that net `worse` trains worse than net `better` by more than `points`
    (`no_worse`: that `better` is at most `points` above `worse`), decided on their final
    training errors averaged over seeds; None where a net was not trained."""
    err = mean_train_errors(runs)
    if worse not in err or better not in err:
        return None
    labels = {r["name"]: r.get("label", r["name"]) for r in runs}
    a, b = labels[worse], labels[better]
    margin = err[worse] - err[better]
    return claim(name, statement, {a: round(err[worse], 2), b: round(err[better], 2)},
                 f"{b} <= {a} + {points:g} points" if no_worse else f"{a} > {b} + {points:g} points",
                 margin >= -points if no_worse else margin > points,
                 len({r["seed"] for r in runs}), unit=" %")


def table(runs: list[dict], note: str, paper_column: bool = True) -> str:
    """Table 6's shape: a row per net (family, layers, params), our errors (mean +- std
    over seeds) and, where asked, the paper's test error."""
    lines = ["| method | layers | params | ours: training error (%) | ours: test error (%) |" +
             (" paper: test error (%) |" if paper_column else ""),
             "|---|---:|---:|---:|---:|" + ("---:|" if paper_column else "")]
    for first in nets_in(runs):
        rs = [r for r in runs if r["name"] == first["name"]]
        test = mean_std(100 * np.array([r["final_test_error"] for r in rs]))
        paper = first.get("paper_error")
        lines.append(f"| {first['label'].rsplit('-', 1)[0]} | {first['depth']} | "
                     f"{first['params'] / 1e6:.2f}M | {mean_std([training_error(r) for r in rs])} "
                     f"| {test} (n={len(rs)}) |" +
                     (f" {paper if paper is not None else '-'} |" if paper_column else ""))
    return "\n".join(lines + ["", note])


def plot_curves(runs: list[dict], path: Path, title: str, test_curves: bool = True,
                milestones: tuple = (), titles: Optional[dict] = None,
                ylabel: Optional[str] = None) -> None:
    """Fig. 6 (and Fig. 4): a panel per family, the nets by depth in colour; training
    error dashed (the mean over seeds, each seed faint), test error solid; the final
    error on a training subset as a star; learning-rate drops dotted. `titles`: family
    -> the panel's title."""
    families = list(dict.fromkeys(r["family"] for r in runs))
    depths = sorted({r["depth"] for r in runs})
    colours = dict(zip(depths, matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85,
                                                                         len(depths)))))
    with figure(path, title, 1, len(families), figsize=(6 * len(families), 4.5),
                sharey=True, squeeze=False) as axes:
        for ax, family in zip(axes[0], families):
            for first in nets_in([r for r in runs if r["family"] == family]):
                rs = [r for r in runs if r["name"] == first["name"]]
                curves(ax, rs, colours[first["depth"]], first["label"], test_curves)
            for m in milestones:
                if m < max(r["curve"]["step"][-1] for r in runs):
                    ax.axvline(m, color="grey", linestyle=":", linewidth=1)
            ax.set_title((titles or {}).get(family, f"{first['label'].rsplit('-', 1)[0]} nets"))
            ax.set_xlabel("iterations")
            ax.grid(alpha=0.3)
            ax.legend()
        axes[0][0].set_ylabel(ylabel or ("error (%)  -- dashed: training, solid: test"
                                         if test_curves else "training error (%)"))


def curves(ax, rs: list[dict], colour, name: str, test_curves: bool) -> None:
    """One net's curves over its seeds."""
    steps = np.array(rs[0]["curve"]["step"])
    train = 100 * np.array([r["curve"]["train_error"] for r in rs])
    for seed_curve in train if len(rs) > 1 else ():
        ax.plot(steps, seed_curve, "--", color=colour, linewidth=0.6, alpha=0.35)
    ax.plot(steps, train.mean(0), "--", color=colour, linewidth=1.5,
            label=f"{name} training" if not test_curves else None)
    if rs[0].get("final_train_set_error") is not None:
        ax.plot(steps[-1], np.mean([training_error(r) for r in rs]), "*", color=colour,
                markersize=11, markeredgecolor="k", label=f"{name}: final, whole subset")
    if test_curves:
        key = next(k for k in rs[0]["curve"] if k.endswith("_error") and k != "train_error")
        evals = 100 * np.mean([r["curve"][key] for r in rs], axis=0)
        ax.plot(rs[0]["curve"]["eval_step"], evals, "-o" if len(evals) < 4 else "-",
                color=colour, linewidth=2, markersize=4, label=name)
