"""The report at a glance: one table that answers the study's questions in words, with the evidence behind
each answer, how sure it is, and a key figure beside it; the sections below hold the detail.

Pure functions of the facts (report.json): `rows` gives the table (also written to report.json as
`glance`), `figure` the key figure, one panel per question.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from matplotlib.figure import Figure
from scipy import stats as st

# What adds runs where a question has too few (each a command a user can type as it stands).
MORE_SWEEP = "`make sweep ARGS=sweep.budget_minutes=60` (a longer sweep: more configurations)"
MORE_BEST = "`python -m lenet_sweep.best` (races the best configurations over seeds)"
MORE_SINGLE = (
    "`python -m lenet_sweep.train model=modified_lenet optimizer=adam model.output_activation=softmax seed=1` "
    "(and relu, and more seeds)"
)
MORE_LONG = (
    "`python -m lenet_sweep.train model=lenet_search train.epochs=25 seed=1` (long runs of the family, with the "
    "configuration's model.* settings)"
)


def welch(a: Mapping[str, Any], b: Mapping[str, Any], confidence: float) -> Optional[tuple[float, float]]:
    """Welch's t interval of mean(a) - mean(b) from two stats() dicts; None when either has fewer than two
    values (no spread to go by) or both have none."""
    if (a.get("n") or 0) < 2 or (b.get("n") or 0) < 2 or a["std"] is None or b["std"] is None:
        return None
    va, vb = a["std"] ** 2 / a["n"], b["std"] ** 2 / b["n"]
    diff = a["mean"] - b["mean"]
    if va + vb == 0:
        return diff, diff
    df = (va + vb) ** 2 / (va**2 / (a["n"] - 1) + vb**2 / (b["n"] - 1))
    half = float(st.t.ppf((1 + confidence) / 2, df) * math.sqrt(va + vb))
    return diff - half, diff + half


def mean_interval(s: Mapping[str, Any], confidence: float) -> Optional[tuple[float, float]]:
    """t interval of the mean of a stats() dict; None with fewer than two values."""
    if (s.get("n") or 0) < 2 or s["std"] is None:
        return None
    half = float(st.t.ppf((1 + confidence) / 2, s["n"] - 1) * s["std"] / math.sqrt(s["n"]))
    return s["mean"] - half, s["mean"] + half


def _iv(interval: Optional[tuple[float, float]], confidence: float) -> str:
    lo, hi = interval
    return f"{confidence:.0%} interval [{lo:+.3f}, {hi:+.3f}]"


def _row(question: str, answer: str, evidence: str, sure: str, panel: str) -> dict[str, str]:
    return {"question": question, "answer": answer, "evidence": evidence, "how_sure": sure, "figure": panel}


def activation_row(facts: dict, confidence: float) -> dict[str, str]:
    """Softmax instead of ReLU output: the difference of the configurations' mean best val accuracy."""
    q = "Softmax instead of ReLU output?"
    rows = {r["value"]: r for r in facts["output_activation"]["sweep"]}
    singles = facts["output_activation"]["single_runs"]
    seeds = sum(s["runs"] for s in singles)
    if not {"relu", "softmax"} <= set(rows):
        relu = [s for s in singles if s["output_activation"] == "relu"]
        if relu:
            dead = sum(s["collapsed"] for s in relu)
            runs = sum(s["runs"] for s in relu)
            return _row(
                q,
                f"ReLU output: {dead} of {runs} single runs collapsed to chance",
                f"{seeds} single-run seeds; the sweep does not search the output",
                f"not enough runs to compare: {MORE_SINGLE}",
                "a",
            )
        return _row(q, "not answered: no run compares the two", "–", f"not enough runs: {MORE_SINGLE}", "a")
    soft, relu = rows["softmax"], rows["relu"]
    diff = (soft["score"]["mean"] or 0.0) - (relu["score"]["mean"] or 0.0)
    collapse = (
        "every ReLU configuration collapsed"
        if relu["collapsed"] == relu["configurations"]
        else f"{relu['collapsed']} of {relu['configurations']} ReLU configurations collapsed"
    )
    interval = welch(soft["score"], relu["score"], confidence)
    return _row(
        q,
        f"softmax: {diff:+.2f} best val accuracy; {collapse} to chance",
        f"{soft['configurations']} softmax and {relu['configurations']} ReLU configurations"
        + (f"; {seeds} single-run seeds" if seeds else ""),
        _iv(interval, confidence) if interval else f"not enough runs: {MORE_SWEEP}",
        "a",
    )


def dimension_row(question: str, groups: Sequence[dict], confidence: float, panel: str) -> dict[str, str]:
    """The dimension of `groups` whose values differ most: its best and worst values' means, Welch interval."""
    best: Optional[tuple[float, dict, dict, dict]] = None
    configs = 0
    for g in groups:
        rows = [r for r in g.get("rows", []) if r["score"]["n"]]
        configs = max(configs, sum(r["configurations"] for r in rows))
        if len(rows) < 2:
            continue
        hi = max(rows, key=lambda r: r["score"]["mean"])
        lo = min(rows, key=lambda r: r["score"]["mean"])
        gap = hi["score"]["mean"] - lo["score"]["mean"]
        if best is None or gap > best[0]:
            best = (gap, g, hi, lo)
    if best is None:
        searched = ", ".join(g["dimension"] for g in groups) or "none of its dimensions"
        return _row(
            question,
            "not answered: the sweep did not vary it" if not groups else "not answered: one value only",
            f"searched: {searched}",
            f"not enough runs: {MORE_SWEEP}",
            panel,
        )
    gap, g, hi, lo = best
    interval = welch(hi["score"], lo["score"], confidence)
    return _row(
        question,
        f"{g['dimension']}={hi['value']} best ({hi['score']['mean']:.3f}), {gap:+.3f} over {lo['value']}",
        f"{configs} working configurations over {', '.join(x['dimension'] for x in groups)}",
        (
            _iv(interval, confidence) + (" (overlaps 0: no clear difference)" if interval[0] <= 0 else "")
            if interval
            else f"not enough runs per value: {MORE_SWEEP}"
        ),
        panel,
    )


def epochs_row(facts: dict, confidence: float) -> dict[str, str]:
    """5, 10 or 25 epochs: the paired gains between budgets, each with its t interval."""
    q = "5, 10 or 25 epochs?"
    gains = [g for g in facts["epochs"]["gains"] if g["gain"]["n"]]
    if not gains:
        return _row(q, "not answered: no configuration trained long enough", "–", f"not enough runs: {MORE_SWEEP}", "d")
    words, sure = [], []
    for g in gains:
        words.append(f"{g['from']}→{g['to']}: {g['gain']['mean']:+.3f}")
        iv = mean_interval(g["gain"], confidence)
        sure.append(f"{g['from']}→{g['to']} [{iv[0]:+.3f}, {iv[1]:+.3f}]" if iv else f"{g['from']}→{g['to']}: n=1")
    evidence = "; ".join(f"{g['from']}→{g['to']}: {g['gain']['n']} paired configurations" for g in gains)
    if not any(mean_interval(g["gain"], confidence) for g in gains):  # one configuration per step says nothing
        return _row(
            q, f"too few to tell ({'; '.join(words)})", evidence, f"not enough runs: {MORE_SWEEP} or {MORE_BEST}", "d"
        )
    pays = [g for g in gains if (mean_interval(g["gain"], confidence) or (0, 0))[0] > 0]
    verdict = f"longer pays up to {pays[-1]['to']} epochs" if pays else "no budget step clearly pays"
    return _row(q, f"{verdict} ({'; '.join(words)})", evidence, f"{confidence:.0%} intervals: " + "; ".join(sure), "d")


def turning_row(facts: dict) -> dict[str, str]:
    """Where overfitting starts: the median epoch at which validation loss turned up, per family."""
    q = "Where does overfitting start?"
    fams = [f for f in facts["turning_points"] if f["runs"]]
    if not fams:
        return _row(q, "not answered: no run long enough", "–", f"not enough runs: {MORE_LONG}", "e")
    words, evidence, sure = [], [], []
    for f in fams:
        t = f["turning_epoch"]
        words.append(f"{f['family']}: epoch {t['median']:g}" if t["n"] else f"{f['family']}: not within its epochs")
        evidence.append(f"{f['turned']} of {f['runs']} runs of ≥{f['min_epochs']} epochs turned")
        sure.append(f"{f['family']}: range {t['min']:g}-{t['max']:g}" if t["n"] > 1 else "")
    if not all(sure):  # a family with fewer than two turns: say once what adds them
        sure = [x for x in sure if x] + [f"not enough runs for the rest: {MORE_LONG}"]
    return _row(q, "; ".join(words), "; ".join(evidence), "; ".join(sure), "e")


def importance_row(facts: dict) -> dict[str, str]:
    """Which hyperparameters matter: the largest share of the variance of validation accuracy."""
    q = "Which hyperparameters matter most?"
    imp = facts.get("importance") or {}
    whole = imp.get("all") or {}
    rows = whole.get("rows") or []
    counts = imp.get("counts", {})
    if whole.get("too_few") or not rows:
        reason = whole.get("too_few") or whole.get("note") or "no importance was computed"
        return _row(
            q, "not answered", f"{counts.get('scored', 0)} scored configurations", f"{reason}: {MORE_SWEEP}", "f"
        )
    top = rows[:2]
    return _row(
        q,
        "; ".join(f"{r['dimension']} ({r['share']:.0%} of the variance)" for r in top),
        f"{counts.get('scored', 0)} scored configurations ({counts.get('pruned', 0)} pruned, "
        f"{counts.get('failed', 0)} failed left out); {imp.get('evaluator', 'fanova')}",
        "; ".join(f"{r['dimension']} {_share_interval(r)}" for r in top)
        + f" ({imp.get('confidence', 0.9):.0%} bootstrap intervals)",
        "f",
    )


def _share_interval(r: Mapping[str, Any]) -> str:
    """A share's bootstrap interval, or that there is none (report.importance.bootstrap=0)."""
    if r.get("low") is None or r.get("high") is None:
        return "(no interval: report.importance.bootstrap=0)"
    return f"[{r['low']:.0%}, {r['high']:.0%}]"


def winner_row(facts: dict) -> dict[str, str]:
    """The exported winner's one test evaluation beside the study's best."""
    q = "What does the winner reach on test?"
    ms = facts["multi_seed"]
    study = max((r["study"] for r in facts["table_ii"] if r.get("study") is not None), default=None)
    if not ms or ms.get("test_accuracy") is None:
        return _row(q, "not yet: no finished `best` run", "–", f"not enough runs: {MORE_BEST}", "–")
    won = next((c for c in ms["candidates"] if c["winner"]), None)
    versus = f" (the study's best {study:.4f})" if study is not None else ""
    interval = (
        f"val {ms['val_mean']:.4f}, interval [{won['low']:.4f}, {won['high']:.4f}] over {won['seeds']} seeds"
        if won and won.get("low") is not None and math.isfinite(won["low"]) and math.isfinite(won["high"])
        else f"val {ms['val_mean']:.4f} ± {ms['val_std'] or 0:.4f}"
        if ms.get("val_mean") is not None
        else "–"
    )
    what = f"refit at {ms['refit_input_size']:.0f} px" if ms.get("exported") == "refit" else "the best racing model"
    return _row(
        q,
        f"test accuracy {ms['test_accuracy']:.4f}{versus}, evaluated once",
        f"trial {ms['winner_trial']}, {len(ms['candidates'])} candidates raced; exported: {what}",
        interval,
        "–",
    )


def cost_row(facts: dict) -> dict[str, str]:
    """What accuracy costs: along the trial-seconds front, what the cheapest and the most accurate member cost."""
    q = "What does accuracy cost?"
    members = ((facts.get("fronts") or {}).get("members") or {}).get("seconds") or []
    if not members:
        return _row(q, "not answered: no working configuration", "–", f"not enough runs: {MORE_SWEEP}", "–")
    cheap, top = members[0], max(members, key=lambda m: m["val_accuracy"])
    points = len((facts.get("fronts") or {}).get("points") or [])
    answer = (
        f"{top['val_accuracy']:.3f} for {top['cost']:.0f}s of training; {cheap['val_accuracy']:.3f} for "
        f"{cheap['cost']:.0f}s"
        if top is not cheap
        else f"the most accurate configuration ({top['val_accuracy']:.3f}) is also the cheapest ({top['cost']:.0f}s)"
    )
    return _row(
        q,
        answer,
        f"{len(members)} of {points} configurations on the seconds front (parameters and latency fronts below)",
        "one trial each: costs are measured, accuracies one seed",
        "–",
    )


def rows(facts: dict, confidence: float) -> list[dict[str, str]]:
    """The at-a-glance table, one row per question, in the order the sections follow."""
    return [
        activation_row(facts, confidence),
        dimension_row("Other filter counts or more conv layers?", facts["filters_and_layers"], confidence, "b"),
        dimension_row("Other dense widths?", facts["dense_widths"], confidence, "c"),
        epochs_row(facts, confidence),
        turning_row(facts),
        importance_row(facts),
        cost_row(facts),
        winner_row(facts),
    ]


def _bars(ax, labels: Sequence[str], means: Sequence[float], errors: Sequence[float], title: str) -> None:
    if not labels:
        ax.text(0.5, 0.5, "no evidence", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.bar(range(len(labels)), means, yerr=errors, color="tab:blue", alpha=0.8, capsize=3)
        ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
    ax.set_title(title, fontsize=9)


def _group_bars(ax, groups: Sequence[dict], title: str) -> None:
    """Mean best val accuracy per value of the group's most varied dimension, ± std."""
    shown = max(groups, key=lambda g: len([r for r in g.get("rows", []) if r["score"]["n"]]), default=None)
    rows_ = [r for r in (shown or {}).get("rows", []) if r["score"]["n"]]
    _bars(
        ax,
        [f"{r['value']}" for r in rows_],
        [r["score"]["mean"] for r in rows_],
        [r["score"]["std"] or 0.0 for r in rows_],
        f"{title}\n{shown['dimension'] if rows_ else ''}",
    )


def figure(facts: dict) -> Figure:
    """The key figure: one panel per question (a-f), mean best validation accuracy unless said otherwise."""
    fig = Figure(figsize=(12, 6.5))
    axes = fig.subplots(2, 3)
    sweep_rows = facts["output_activation"]["sweep"]
    _bars(
        axes[0][0],
        [f"{r['value']}" for r in sweep_rows],
        [r["score"]["mean"] or 0.0 for r in sweep_rows],
        [r["score"]["std"] or 0.0 for r in sweep_rows],
        "a. output activation",
    )
    _group_bars(axes[0][1], facts["filters_and_layers"], "b. filters / conv layers")
    _group_bars(axes[0][2], facts["dense_widths"], "c. dense widths")
    budgets = [b for b in facts["epochs"]["budgets"] if b["score"]["n"]]
    _bars(
        axes[1][0],
        [f"{b['epochs']}" for b in budgets],
        [b["score"]["mean"] for b in budgets],
        [b["score"]["std"] or 0.0 for b in budgets],
        "d. best val accuracy within k epochs",
    )
    fams = [f for f in facts["turning_points"] if f["turning_epoch"]["n"]]
    ax = axes[1][1]
    if fams:
        ax.boxplot([f["epochs"] for f in fams], vert=False)
        ax.set_yticks(range(1, len(fams) + 1), [f["family"][:24] for f in fams], fontsize=7)
        ax.set_xlabel("epoch of lowest validation loss", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no evidence", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("e. where validation loss turns up", fontsize=9)
    imp = ((facts.get("importance") or {}).get("all") or {}).get("rows") or []
    ax = axes[1][2]
    top = list(reversed(imp[:6]))
    if top:
        shares = [r["share"] for r in top]
        # report.importance.bootstrap=0 gives no interval (low/high None): no error bar then
        lows = [max(r["share"] - r["low"], 0.0) if r.get("low") is not None else 0.0 for r in top]
        highs = [max(r["high"] - r["share"], 0.0) if r.get("high") is not None else 0.0 for r in top]
        ax.barh(range(len(top)), shares, xerr=[lows, highs], color="tab:green", alpha=0.8, capsize=3)
        ax.set_yticks(range(len(top)), [r["dimension"][:28] for r in top], fontsize=7)
        ax.set_xlabel("share of the variance of val accuracy", fontsize=8)
    else:
        ax.text(0.5, 0.5, "too few configurations", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("f. importance (with intervals)", fontsize=9)
    fig.tight_layout()
    return fig
