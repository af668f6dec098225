"""The report's sections, in the order they are read: `build` calls one function per section, each writing
its heading, sentences, tables and figures from the facts (and, for figures, the evidence). A section
without evidence says so in one sentence instead of leaving a gap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.figure import Figure
from omegaconf import DictConfig

from lenet_sweep import data as D
from lenet_sweep import plots
from lenet_sweep.report import glance
from lenet_sweep.report.document import Doc, acc, pm, share, short_value, span
from lenet_sweep.report.evidence import Evidence
from lenet_sweep.report.facts import configurations
from lenet_sweep.tracking import store
from lenet_sweep.tracking.artifacts import to_float


def build(ev: Evidence, facts: dict, cfg: DictConfig, store_uri: str) -> Doc:
    """The report's blocks, from the evidence and the facts computed from it."""
    doc = Doc()
    header(doc, ev, facts, cfg, store_uri)
    answers_section(doc, facts)
    table_i_section(doc, facts)
    table_ii_section(doc, ev, facts)
    activation_section(doc, facts)
    dimension_section(doc, "More filters or more conv layers?", facts["filters_and_layers"], facts)
    dimension_section(doc, "Other dense widths?", facts["dense_widths"], facts)
    epochs_section(doc, facts)
    turning_section(doc, facts, cfg)
    other_dimensions_section(doc, facts)
    curves_section(doc, ev, cfg)
    importance_section(doc, facts)
    per_hyperparameter_section(doc, ev)
    fronts_section(doc, facts)
    winner_section(doc, facts)
    confusion_section(doc, facts)
    misclassified_section(doc, ev, facts, cfg)
    data_section(doc, ev, facts)
    provenance_section(doc, ev, facts)
    return doc


# ---- the sentences -------------------------------------------------------------------------------


def no_evidence(dimension: str) -> str:
    """The sentence of a dimension that no working configuration sets."""
    return f"no finished configuration outside the collapsed ones sets {dimension}"


def answers(facts: dict) -> list[str]:
    """The report's short answers, one or more per question."""
    return [
        *activation_sentences(facts),
        *dimension_sentences(facts["filters_and_layers"]),
        *dimension_sentences(facts["dense_widths"]),
        *epochs_sentences(facts),
        *turning_sentences(facts),
        *winner_sentences(facts),
    ]


def activation_sentences(facts: dict) -> list[str]:
    """How often each output activation collapsed, in the sweep and in single runs."""
    ch = facts["chance"]
    rows = facts["output_activation"]["sweep"]
    out = []
    for r in rows:
        failed = f"; {r['failed']} more trial(s) failed (diverged or crashed)" if r["failed"] else ""
        out.append(
            f"{r['dimension']}={r['value']}: {share(r['collapsed'], r['configurations'])} sweep "
            f"configurations collapsed to chance (best val accuracy < {ch['threshold']:.3f}); "
            f"best val accuracy {pm(r['score'])}{failed}"
        )
    by_value = {r["value"]: r["score"] for r in rows}
    if {"relu", "softmax"} <= set(by_value) and by_value["relu"]["n"] > 1 and by_value["softmax"]["n"] > 1:
        a, b = by_value["softmax"], by_value["relu"]
        se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
        out.append(
            f"softmax minus relu: {a['mean'] - b['mean']:+.4f} ± {se:.4f} (difference of means ± its "
            "standard error; the other hyperparameters vary between configurations)"
        )
    for s in facts["output_activation"]["single_runs"]:
        out.append(
            f"{s['model']} ({s['optimizer']}, {s['output_activation']} output, {s['budget']} epochs), single "
            f"runs: {share(s['collapsed'], s['runs'])} seeds collapsed to chance, "
            f"{s['dead_at_epoch_1']} with validation loss at ln {ch['classes']} = {ch['ln_classes']:.4f} "
            f"after epoch 1; test accuracy {pm(s['test_accuracy'])}"
        )
    return out or ["no dimension of this sweep sets the output activation, and no single run trained on its data"]


def dimension_sentences(groups: Sequence[dict]) -> list[str]:
    """Per dimension: the rank correlation of a continuous one, the spread between the best and the worst
    value of another (values with one configuration say nothing alone), or that nothing sets it."""
    out = []
    for g in groups:
        if not _has_evidence(g):
            out.append(no_evidence(g["dimension"]))
            continue
        if g.get("continuous"):
            out.append(_continuous_sentence(g))
            continue
        rows = [r for r in g["rows"] if r["score"]["n"] > 1]
        if len(rows) < 2:
            continue
        hi = max(rows, key=lambda r: r["score"]["mean"])
        lo = min(rows, key=lambda r: r["score"]["mean"])
        out.append(
            f"{g['dimension']}: highest mean at {hi['value']} ({pm(hi['score'])}), lowest at "
            f"{lo['value']} ({pm(lo['score'])}): {hi['score']['mean'] - lo['score']['mean']:+.4f}"
        )
    return out


def _has_evidence(g: dict) -> bool:
    """Whether a working configuration sets the dimension of `g` (a by_value result)."""
    return bool(g["continuous"]["n"]) if g.get("continuous") else bool(g["rows"])


def _continuous_sentence(g: dict) -> str:
    c = g["continuous"]
    rho = "–" if c["spearman"] is None else f"{c['spearman']:+.2f}"
    return (
        f"{g['dimension']} ({c['min']:.3g} to {c['max']:.3g}, continuous): rank correlation with "
        f"best val accuracy {rho} (n={c['n']})"
    )


def epochs_sentences(facts: dict) -> list[str]:
    """The paired gains between budgets, and each retrained candidate's score per budget over seeds."""
    e = facts["epochs"]
    if not any(b["score"]["n"] for b in e["budgets"]) and not e["retrainings"]:
        return ["no finished configuration outside the collapsed ones has a per-epoch history to compare budgets with"]
    out = [
        f"{g['from']} -> {g['to']} epochs: best val accuracy gains {pm(g['gain'])}, paired per sweep "
        "configuration trained that long"
        for g in e["gains"]
    ]
    for r in e["retrainings"]:
        out.append(
            f"trial {r['trial']} over {r['seeds']} seeds: "
            + "; ".join(f"{b['epochs']} epochs {pm(b['score'])}" for b in r["by_budget"])
        )
    return out


def turning_sentences(facts: dict) -> list[str]:
    """Per model family: how often validation loss turned up, and where."""
    out = []
    for f in facts["turning_points"]:
        t = f["turning_epoch"]
        where = f" at epoch {t['median']:g} (median; range {t['min']:g}-{t['max']:g})" if t["n"] else ""
        study = f"; the study saw ~{f['study']}" if f["study"] else ""
        short = f"; {f['too_short']} shorter run(s) not counted" if f["too_short"] else ""
        out.append(
            f"{f['family']}: validation loss turned up in {share(f['turned'], f['runs'])} runs of at "
            f"least {f['min_epochs']} epochs{where}{study}{short}"
        )
    return out or ["no run outside the collapsed ones has a per-epoch history to find a turning point in"]


def winner_sentences(facts: dict) -> list[str]:
    """The winner over seeds and its one test evaluation, or that `best` has not run (or did not finish)."""
    ms, cut = facts["multi_seed"], facts["best_cut_off"]
    resume = (
        [
            f"the latest `best` run, {cut['run_id']}, ended {cut['status']} before it finished"
            + (f" ({cut['reason']})" if cut["reason"] else "")
            + ": rerun `python -m lenet_sweep.best` with the same settings to resume it (its finished "
            "retrainings are kept)"
        ]
        if cut
        else []
    )
    if not ms:
        return resume or [
            "no `best` run for this sweep yet: `python -m lenet_sweep.best` chooses, confirms over seeds "
            "and tests the winner once"
        ]
    won = next((c for c in ms["candidates"] if c["winner"]), None)
    out = [
        f"winner: trial {ms['winner_trial']}, val accuracy {acc(ms['val_mean'])} ± {acc(ms['val_std'])} over "
        f"{won['seeds'] if won else ms['seeds']} seeds; test accuracy {acc(ms['test_accuracy'])} "
        "(evaluated once)"
    ]
    if ms.get("exported") == "refit":
        out.append(
            f"exported: the winner refitted at {ms['refit_input_size']:.0f} px for {ms['refit_epochs']:.0f} epochs "
            f"(val accuracy {acc(ms['refit_val_accuracy'])}); the test accuracy is this model's"
        )
    elif ms.get("exported") == "racing":
        out.append(
            f"exported: the winner's best racing model; its refit at {ms['refit_input_size']:.0f} px scored "
            f"val accuracy {acc(ms['refit_val_accuracy'])}, below the winner's interval, so it was not used"
        )
    if ms["optimism"]["n"]:
        out.append(
            f"the sweep's one-seed scores of the retrained configurations were "
            f"{ms['optimism']['mean']:+.4f} above their means over new seeds (n={ms['optimism']['n']})"
        )
    return out + resume


def _left_out(facts: dict) -> str:
    return (
        f"Left out here: {facts['collapsed_left_out']} configuration(s) that collapsed to chance (see the "
        "output question), so a dead output does not count against a filter count, a width or a budget."
    )


# ---- the sections --------------------------------------------------------------------------------


def header(doc: Doc, ev: Evidence, facts: dict, cfg: DictConfig, store_uri: str) -> None:
    """The title, what was swept, and how to read the numbers."""
    sw, ms = facts["sweep"], facts["multi_seed"]
    doc.heading(1, f"Sweep report: {sw['name']}")
    counts = ", ".join(f"{sw[k]} {k}" for k in ("finished", "failed", "killed", "running") if sw[k])
    minutes = f" in {sw['seconds'] / 60:.1f} minutes" if sw["seconds"] else ""
    doc.para(
        f"Sweep {sw['name']!r} (MLflow run {sw['run_id']}, {sw['status']}) in experiment "
        f"{cfg.mlflow.experiment!r} of {store.redact(store_uri)}: {sw['tuner']} search over "
        f"{len(sw['dimensions'])} dimensions, {sw['trials']} trials ({counts}){minutes}."
        + (
            f" {sw['pruned']} of the finished trials were pruned (at chance or diverging: stopped at once, "
            "scored as they stood)"
            + (
                f", saving about {sw['pruned_seconds_saved'] / 60:.1f} minutes of training"
                if sw.get("pruned_seconds_saved")
                else ""
            )
            + "."
            if sw.get("pruned")
            else ""
        )
        + (
            f" {len(sw['inherited_trials'])} trials inherited from sweep {sw['warm_start']!r} (not retrained: "
            f"trials {', '.join(sw['inherited_trials'][:12])}{' ...' if len(sw['inherited_trials']) > 12 else ''} "
            "hold that sweep's results)."
            if sw.get("inherited_trials")
            else ""
        )
    )
    seeds = (
        "Each sweep trial trains with its own seed (the sweep's seed plus its trial number), so a spread "
        "over configurations mixes seeds and the other hyperparameters; spreads over seeds alone come "
        "from `best`'s retrainings and from single runs with several seeds."
    )
    if (sw["executions"] or 1) > 1:
        seeds += (
            f" This sweep ran {sw['executions']} executions per trial (each its own seed): scores are "
            "their mean, while per-epoch views (curves, budgets, turning points, the first epoch's loss) "
            "read the first execution's history."
        )
    doc.para(
        "Every number here is computed from what MLflow holds; nothing was trained or evaluated to write "
        "it. Scores are best-epoch validation accuracies (chosen on validation); test accuracies are the "
        "ones recorded by `best`, `train` and `reproduce`, each evaluated once. " + seeds
    )
    if ms.get("stale"):
        doc.para(
            f"Note: the best run {ms['run_id']} started before {ms['stale']} of the sweep's trials ended "
            "(the sweep went on afterwards): rerun `best` to choose among all of them."
        )


def answers_section(doc: Doc, facts: dict) -> None:
    """The study's questions at a glance: one table (answer in words, evidence, how sure) and the key figure,
    one panel per question; the sections below hold the numbers behind each answer."""
    doc.heading(2, "Answers in short")
    doc.para(
        "Each question answered in words, with the evidence it rests on and how sure it is (an interval, or "
        "the command that adds the runs it lacks); the figure column names the key figure's panel, and the "
        "sections below give the detail."
    )
    doc.table(
        ["question", "answer", "evidence", "how sure", "figure"],
        [[r["question"], r["answer"], r["evidence"], r["how_sure"], r["figure"]] for r in facts["glance"]],
    )
    doc.figure("glance.png", glance.figure(facts), "Key figure: one panel per question (a-f)")


def table_i_section(doc: Doc, facts: dict) -> None:
    """Table I: the study's package versions beside ours."""
    doc.heading(2, "Table I: packages")
    doc.para(
        "The study's versions are its Table I, as conf/report.yaml holds them (report.study_packages); "
        "ours are the versions the sweep (or the winner's retraining, or a single run) recorded."
    )
    doc.table(["package", "study", "ours"], [[r["package"], r["study"], r["ours"]] for r in facts["table_i"]])


def table_ii_section(doc: Doc, ev: Evidence, facts: dict) -> None:
    """Table II: the study's test accuracies beside our single runs, the winner and the sweep's top trial."""
    ms = facts["multi_seed"]
    doc.heading(2, "Table II: test accuracy")
    rows = [
        [
            r["model"],
            r["optimizer"],
            r["study_budget"],
            acc(r["study"]),
            r["output_activation"],
            r["budget"],
            # a sweep-only store has no single runs: say what adds them rather than "– (n=0)"
            pm(r["ours"]) if r["ours"]["n"] else "not run yet: `make reproduce`",
            " ".join(str(s) for s in r["seeds"]) or "–",
            share(r["collapsed"], len(r["seeds"])) if r["seeds"] else "–",
            span(r["epochs"]) if r["seeds"] else "–",
        ]
        for r in facts["table_ii"]
    ]
    if ms:
        rows.append(
            [
                f"sweep winner (trial {ms['winner_trial']})",
                "",
                "",
                "",
                "",
                "",
                f"{acc(ms['test_accuracy'])} (once, by best)",
                ms["winner_seed"],
                "",
                "",
            ]
        )
    if "best_trial_test_accuracy" in ev.parent.data.metrics:
        rows.append(
            [
                "sweep's top trial (one seed)",
                "",
                "",
                "",
                "",
                "",
                f"{acc(ev.parent.data.metrics['best_trial_test_accuracy'])} (once, by "
                "benchmarks/sweep_best_on_test.py)",
                "",
                "",
                "",
            ]
        )
    doc.table(
        [
            "model",
            "optimizer",
            "study epochs",
            "study test accuracy",
            "our output",
            "our epochs",
            "ours: mean ± std (n seeds)",
            "seeds",
            "collapsed",
            "epochs run",
        ],
        rows,
    )
    doc.para(
        "Our rows are single runs (`train`, `reproduce`) on the sweep's data, one per seed (the latest run "
        "of a seed), grouped by output activation and epochs: compare with the study only where the "
        "epochs match."
        if facts["output_activation"]["single_runs"]
        else "No single runs of the study's models on this data yet: `make reproduce` (or `python -m "
        "lenet_sweep.train model=... seed=N`) adds them, one row per model over its seeds."
    )


def activation_section(doc: Doc, facts: dict) -> None:
    """Softmax or ReLU output: collapses per value, in the sweep and in single runs."""
    ch, oa = facts["chance"], facts["output_activation"]
    doc.heading(2, "Softmax or ReLU output?")
    doc.items(activation_sentences(facts))
    doc.table(
        [
            "dimension",
            "value",
            "configurations",
            "trials",
            "collapsed",
            "val loss = ln C at epoch 1",
            "failed trials",
            "best val accuracy",
        ],
        [
            [
                r["dimension"],
                r["value"],
                r["configurations"],
                r["trials"],
                r["collapsed"],
                r["dead_at_epoch_1"],
                r["failed"],
                pm(r["score"]),
            ]
            for r in oa["sweep"]
        ],
    )
    doc.table(
        [
            "model",
            "optimizer",
            "output",
            "epochs",
            "seeds",
            "collapsed",
            "val loss = ln C at epoch 1",
            "best val accuracy",
            "test accuracy",
        ],
        [
            [
                s["model"],
                s["optimizer"],
                s["output_activation"],
                s["budget"],
                " ".join(map(str, s["seeds"])),
                s["collapsed"],
                s["dead_at_epoch_1"],
                pm(s["score"]),
                pm(s["test_accuracy"]),
            ]
            for s in oa["single_runs"]
        ],
    )
    doc.para(
        f"Chance: {ch['classes']} classes, accuracy {ch['chance_accuracy']:.4f}, loss ln {ch['classes']} = "
        f"{ch['ln_classes']:.4f}. Collapsed: best validation accuracy below {ch['threshold']:.4f} (chance + "
        "report.chance_margin). Failed trials (diverged or crashed) have no score and are counted apart."
    )
    if oa["sweep"]:
        dim = oa["sweep"][0]["dimension"]
        groups: dict[str, list[float]] = {}
        for c in facts["configurations"]:
            groups.setdefault(str(c["values"].get(dim)), []).append(c["score"])
        doc.figure(
            "output_activation.png",
            plots.groups_side_by_side(groups, "best val accuracy", "output activation (one point per configuration)"),
            "Best validation accuracy per configuration, by output activation.",
        )


def dimension_section(doc: Doc, title: str, groups: Sequence[dict], facts: dict) -> None:
    """One question over the dimensions it reads (filters and conv layers, dense widths)."""
    doc.heading(2, title)
    lines = dimension_sentences(groups) if groups else ["no dimension of this sweep varies it"]
    unanswered = [g for g in groups if not _has_evidence(g)]
    if len(unanswered) < len(groups) and len(lines) == len(unanswered):  # each one set compares no values
        lines.append("too few configurations per value")
    doc.items(lines)
    dimension_tables(doc, groups)
    doc.para(_left_out(facts) + " Values with one configuration are shown but not compared.")


def dimension_tables(doc: Doc, groups: Sequence[dict]) -> None:
    """Score per value, one table per dimension (none for a continuous one)."""
    for g in groups:
        doc.table(
            [g["dimension"], "configurations", "trials", "failed trials", "best val accuracy", "median", "max"],
            [
                [
                    short_value(r["value"]),
                    r["configurations"],
                    r["trials"],
                    r["failed"],
                    pm(r["score"]),
                    r["score"]["median"],
                    r["score"]["max"],
                ]
                for r in g["rows"]
            ],
        )


def epochs_section(doc: Doc, facts: dict) -> None:
    """5, 10 or 25 epochs: best validation accuracy within each budget."""
    doc.heading(2, "5, 10 or 25 epochs?")
    doc.items(epochs_sentences(facts))
    doc.table(
        ["epochs", "best val accuracy within them (sweep configurations trained that long)"],
        [[b["epochs"], pm(b["score"])] for b in facts["epochs"]["budgets"]],
    )
    doc.para(
        "A run counts for a budget of k epochs if it trained k epochs or stopped early before k (early "
        "stopping would have stopped it there with any budget); one whose budget ran out before k does "
        "not. The rows above are different subsets of configurations (fewer were given more epochs); the "
        f"paired gains compare the same configurations. Sweep configurations count with their fresh trial: "
        f"{facts['continued']} were continued over Hyperband rounds, each round restarting from an earlier "
        "epoch's weights, which is not one training run. " + _left_out(facts)
    )
    dimension_tables(doc, facts["epochs_dimension"])


def turning_section(doc: Doc, facts: dict, cfg: DictConfig) -> None:
    """Where overfitting starts: the epoch of minimum validation loss per model family."""
    doc.heading(2, "Where does overfitting start?")
    doc.items(turning_sentences(facts))
    doc.table(
        [
            "family",
            "runs",
            "turned",
            "turning epoch",
            "median",
            "epochs run where it did not turn",
            "shorter runs",
            "study",
        ],
        [
            [
                f["family"],
                f["runs"],
                f["turned"],
                pm(f["turning_epoch"]),
                f["turning_epoch"]["median"],
                " ".join(map(str, f["not_turned_epochs_run"])) or "–",
                f["too_short"],
                f["study"],
            ]
            for f in facts["turning_points"]
        ],
    )
    doc.para(
        "Turning point: the epoch of minimum validation loss, counted as a turn when validation loss is "
        "higher at a later epoch of the run. Runs: each sweep configuration's fresh trial, each retraining "
        f"of `best`, each single run, if it trained at least {cfg.report.turning_min_epochs} epochs "
        "(report.turning_min_epochs); collapsed runs left out."
    )
    if any(f["epochs"] for f in facts["turning_points"]):
        doc.figure(
            "turning_points.png",
            plots.turning_points(
                {f["family"]: f["epochs"] for f in facts["turning_points"]}, "where validation loss turns up"
            ),
            "Epoch of minimum validation loss, runs whose validation loss then rose.",
        )


def other_dimensions_section(doc: Doc, facts: dict) -> None:
    """The dimensions no question reads (learning rates, dropout, ...), if the sweep has any."""
    if facts["other_dimensions"]:
        doc.heading(2, "The other hyperparameters")
        doc.items(dimension_sentences(facts["other_dimensions"]))
        dimension_tables(doc, facts["other_dimensions"])


def curves_section(doc: Doc, ev: Evidence, cfg: DictConfig) -> None:
    """The study's four figures for the best configurations."""
    doc.heading(2, "Learning curves of the best configurations")
    doc.para(
        "Loss, magnified loss (from epoch 2), accuracy, and validation loss against validation accuracy: "
        "the study's four figures, for the best configurations by validation accuracy. Dotted lines: a "
        "Hyperband round took over there, from an earlier epoch's weights."
    )
    shown = configurations(ev)[: cfg.report.top_trials]
    if not shown:
        doc.para("report.top_trials=0: no learning curves shown.")
    for i, c in enumerate(shown, start=1):
        title = f"#{i} trial {c.ids}: best val accuracy {c.score:.4f}"
        if not c.history:
            doc.para(f"{title}: no per-epoch history recorded (history.csv or per-epoch metrics).")
            continue
        doc.figure(
            f"curves_{i}.png",
            plots.trial_curves(c.history, title, c.restarts),
            f"{title}; {' '.join(f'{k}={short_value(v)}' for k, v in c.values.items())}",
        )


EVALUATOR_NAMES = {"fanova": "fANOVA", "mean_decrease_impurity": "mean decrease in impurity"}


def importance_section(doc: Doc, facts: dict) -> None:
    """Which hyperparameters matter: each one's share of the variance of validation accuracy with its
    bootstrap interval, over all scored configurations and over the best ones; edge warnings."""
    imp = facts["importance"]
    n, every, top = imp["counts"], imp["all"], imp["top"]
    doc.heading(2, "Which hyperparameters matter?")
    failed = f" {n['failed']} trial(s) ended without a score: counted here, left out." if n["failed"] else ""
    doc.para(
        f"Each hyperparameter's share of the variance of best validation accuracy it explains alone (Optuna's "
        f"{EVALUATOR_NAMES.get(imp['evaluator'], imp['evaluator'])} on the sweep's configurations, shares "
        f"summing to 1), with a {imp['confidence']:.0%} bootstrap interval over configurations "
        f"({imp['bootstrap']} resamples). Over all {n['scored']} scored configurations (collapsed ones "
        f"included: collapsing is part of what a hyperparameter does; {n['pruned']} pruned, with the score "
        f"they had when stopped), and over the best {imp['top_fraction']:.0%} ({n['top']}): what moves "
        f"the score overall, and what separates the best configurations.{failed}"
    )
    for label, part in (("All configurations", every), (f"The best {imp['top_fraction']:.0%}", top)):
        why = part["too_few"] or part["note"]
        if why and (part is every or not (every["too_few"] or every["note"])):  # one reason is enough
            doc.para(f"{label}: no shares, {why}.")
    top_rows = {r["dimension"]: r for r in top["rows"]}
    doc.table(
        [
            "hyperparameter",
            f"share, all (n={every['configurations']})",
            f"{imp['confidence']:.0%} interval",
            f"share, best {imp['top_fraction']:.0%} (n={top['configurations']})",
            f"{imp['confidence']:.0%} interval",
        ],
        [
            [r["dimension"], _percent(r["share"]), _interval(r), *_top_cells(top_rows.get(r["dimension"]))]
            for r in every["rows"]
        ],
    )
    if imp["left_out"]:
        doc.para("Left out: " + "; ".join(f"{d['dimension']} ({d['why']})" for d in imp["left_out"]) + ".")
    if imp["edges"]:
        doc.para("The best configuration sits at an edge of the searched range (report.importance.edge_fraction):")
        doc.items([e["message"] for e in imp["edges"]])


def _percent(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _interval(row: dict) -> str:
    return "–" if row["low"] is None else f"[{_percent(row['low'])}, {_percent(row['high'])}]"


def _top_cells(row: Optional[dict]) -> list[str]:
    return ["–", "–"] if row is None else [_percent(row["share"]), _interval(row)]


def per_hyperparameter_section(doc: Doc, ev: Evidence) -> None:
    """Every finished trial's score against each hyperparameter it records."""
    doc.heading(2, "Validation accuracy against each hyperparameter")
    dims = [*ev.space, "tuner/epochs"]
    by_trial = [{d: t.param(d) for d in dims if d in t.params} | {"val": t.score} for t in ev.finished]
    names = [d for d in dims if any(r.get(d) is not None for r in by_trial)]
    if not names:
        doc.para("No finished trial records a value of any dimension of this sweep.")
        return
    doc.figure(
        "val_accuracy_vs_hyperparameters.png",
        plots.score_by_value(by_trial, names, "val", "best validation accuracy per trial"),
        "Best validation accuracy of every finished trial against each hyperparameter.",
    )


FRONT_NAMES = {  # front -> how the report names it, and how it writes its cost
    "seconds": ("trial seconds", lambda x: f"{x:.1f}s"),
    "parameters": ("parameters", lambda x: f"{x:,.0f} parameters"),
    "latency_batch_1": ("latency at batch 1", lambda x: f"{1000 * x:.3g} ms per image"),
    "latency_batch_32": ("latency at batch 32", lambda x: f"{1000 * x:.3g} ms per image"),
}


def _or_dash(value: Optional[float], write) -> str:
    return "–" if value is None else write(value)


def fronts_sentences(fr: dict) -> list[str]:
    """Per front: how many configurations are on it, its cheapest member and its most accurate one."""
    out = []
    for name, members in fr["members"].items():
        label, write = FRONT_NAMES[name]
        if not members:
            timed = name.startswith("latency")
            out.append(f"{label}: no configuration " + ("was timed" if timed else "has a recorded or countable one"))
            continue
        cheap, top = members[0], members[-1]
        out.append(
            f"{label}: {len(members)} configuration(s) on the front; the cheapest (trials {cheap['id']}) reaches "
            f"val accuracy {cheap['val_accuracy']:.4f} at {write(cheap['cost'])}"
            + (
                f", the most accurate (trials {top['id']}) {top['val_accuracy']:.4f} at {write(top['cost'])}"
                if top is not cheap
                else ""
            )
        )
    return out


def fronts_section(doc: Doc, facts: dict) -> None:
    """What accuracy costs: the Pareto fronts of validation accuracy against trial seconds, parameters and
    inference latency, as a figure and a table of their members."""
    fr = facts["fronts"]
    doc.heading(2, "What does accuracy cost?")
    if not fr["configurations"]:
        doc.para("No finished configuration outside the collapsed ones: there is no accuracy to weigh against a cost.")
        return
    doc.items(fronts_sentences(fr))
    left = f"; {fr['cap_left_out']} more left out by report.fronts.max_measured" if fr["cap_left_out"] else ""
    doc.para(
        "Each point is one configuration, at the best validation accuracy of its trials; it is on a front when "
        "no other configuration reaches as high an accuracy for less (equal points both stay). Costs: trial "
        "seconds, the trial_seconds each of its finished trials recorded (wall clock, setup and logging "
        "included), summed over its Hyperband rounds; parameters, counted on its model built from its "
        f"recorded config ({fr['classes']} classes); latency, seconds per image of inference on this "
        f"machine's CPU ({fr['cores']} cores), the median of {fr['repeats']} calls after {fr['warmup']} "
        "warm-up calls at batch 1 and at batch 32, on the model built from its recorded config with random "
        "weights (latency does not depend on the weights). Latency was measured only for the best "
        f"configuration and the members of the seconds and parameter fronts ({len(fr['measured'])} models"
        f"{left}): its fronts are among those."
        + (
            f" Left out: {fr['collapsed_left_out']} configuration(s) that collapsed to chance."
            if fr["collapsed_left_out"]
            else ""
        )
    )
    if fr["unbuilt"]:
        first, why = next(iter(fr["unbuilt"].items()))
        doc.para(
            f"{len(fr['unbuilt'])} configuration(s) have no parameter count or latency: their recorded config "
            f"does not build a model here (trials {first}: {why})."
        )
    if fr["latency_failed"]:
        first, why = next(iter(fr["latency_failed"].items()))
        doc.para(f"{len(fr['latency_failed'])} model(s) could not be timed (trials {first}: {why}).")
    ex = fr["export"]
    if ex.get("parameters") is not None:
        doc.para(
            f"The exported winner of `best`: {ex['parameters']:,.0f} parameters, model.keras "
            f"{ex['model_bytes'] / 2**20:.2f} MB, "
            f"{_or_dash(ex['latency_batch_1'], FRONT_NAMES['latency_batch_1'][1])} at batch 1 and "
            f"{_or_dash(ex['latency_batch_32'], FRONT_NAMES['latency_batch_32'][1])} at batch 32 (timed by `best`, "
            "on the machine it ran on; its model card says the same)."
        )
    panels = [
        {
            "cost": cost,
            "points": [(scale * p[name], p["val_accuracy"]) for p in fr["points"] if p[name] is not None],
            "front": [(scale * m["cost"], m["val_accuracy"]) for m in fr["members"][name]],
        }
        for name, cost, scale in (
            ("seconds", "trial seconds", 1.0),
            ("parameters", "parameters", 1.0),
            ("latency_batch_1", "ms per image at batch 1 (measured ones)", 1000.0),
        )
    ]
    doc.figure(
        "cost_fronts.png",
        plots.cost_fronts(panels, "best val accuracy", "what accuracy costs (one point per configuration)"),
        "Best validation accuracy of every configuration against what it cost: grey, every configuration; red, "
        "the front (no other configuration is as accurate for less).",
    )
    by_id = {p["id"]: p for p in fr["points"]}
    doc.table(
        [
            "front",
            "trials",
            "val accuracy",
            "trial seconds",
            "parameters",
            "ms/image, batch 1",
            "ms/image, batch 32",
            "hyperparameters",
        ],
        [
            [
                FRONT_NAMES[name][0],
                m["id"],
                m["val_accuracy"],
                _or_dash(p["seconds"], lambda x: f"{x:.1f}"),
                _or_dash(p["parameters"], lambda x: f"{x:,.0f}"),
                _or_dash(p["latency_batch_1"], lambda x: f"{1000 * x:.3g}"),
                _or_dash(p["latency_batch_32"], lambda x: f"{1000 * x:.3g}"),
                " ".join(f"{k}={short_value(v)}" for k, v in p["values"].items()),
            ]
            for name, members in fr["members"].items()
            for m in members
            for p in [by_id[m["id"]]]
        ],
    )


def winner_section(doc: Doc, facts: dict) -> None:
    """The winner over seeds: `best`'s candidates, their means over new seeds."""
    doc.heading(2, "The winner over seeds")
    doc.items(winner_sentences(facts))
    doc.table(
        [
            "sweep rank",
            "trial",
            "sweep val (one seed)",
            "val mean ± std",
            "interval",
            "seeds",
            "failed",
            "per seed",
            "winner",
            "why it stopped",
            "hyperparameters",
        ],
        [
            [
                c["sweep_rank"],
                f"{c['trial']} (inherited)" if c["trial"] in facts["sweep"].get("inherited_trials", ()) else c["trial"],
                c["sweep_val_accuracy"],
                f"{acc(c['mean'])} ± {acc(c['std'])}",
                f"[{c['low']:.4f}, {c['high']:.4f}]" if math.isfinite(c["low"]) and math.isfinite(c["high"]) else "–",
                c["seeds"],
                c["failed"],
                c["per_seed"],
                "yes" if c["winner"] else "",
                c["stopped"],
                c["hyperparameters"],
            ]
            for c in facts["multi_seed"].get("candidates", [])
        ],
    )


def confusion_section(doc: Doc, facts: dict) -> None:
    """The winner's one test evaluation: confusion matrix, most confused pairs, per-class accuracy."""
    ms, cf = facts["multi_seed"], facts["confusion"]
    doc.heading(2, "Test: confusion matrix and the most confused classes")
    if not cf:
        doc.para(
            f"The winner's test accuracy, {acc(ms['test_accuracy'])}, was recorded without its confusion "
            "matrix (evaluation/confusion_matrix.json)."
            if ms.get("test_accuracy") is not None
            else "No test evaluation for this sweep yet (`python -m lenet_sweep.best` makes the one)."
        )
        return
    doc.para(f"The winner on the test split, evaluated once: {cf['images']} images, accuracy {cf['accuracy']:.4f}.")
    doc.table(
        ["classes", "total confusions", "first as second", "second as first", "share of their test images"],
        [
            [f"{p['a']} / {p['b']}", p["total"], p["a_as_b"], p["b_as_a"], f"{100 * p['share']:.1f}%"]
            for p in cf["pairs"]
        ],
    )
    doc.figure(
        "confusion_matrix.png",
        plots.confusion_figure(np.array(cf["matrix"]), cf["names"], "test confusion of the winner"),
        "Test confusion matrix of the winner (rows: true class; shares of the row, counts written in).",
    )
    doc.table(
        ["class", "name", "test images", "correct", "accuracy"],
        [[r["class"], r["name"], r["images"], r["correct"], r["accuracy"]] for r in cf["per_class"]],
    )


def misclassified_section(doc: Doc, ev: Evidence, facts: dict, cfg: DictConfig) -> None:
    """The winner's most confident test mistakes, as images."""
    doc.heading(2, "Misclassified test images of the winner")
    wrong = sum(r.get("correct") == "0" for r in ev.predictions)
    grid, missing = misclassified_grid(ev, cfg.report.misclassified, cfg.report.grid_columns)
    if grid is not None:
        doc.figure(
            "misclassified.png",
            grid,
            f"The winner's {min(wrong, cfg.report.misclassified)} most "
            f"confident mistakes of {wrong} on the test split: true class -> predicted (score).",
        )
    if missing:
        doc.para(f"{missing} misclassified image(s) could not be read under {ev.data_root} (moved?): not shown.")
    if not ev.predictions:
        doc.para(
            "No test predictions recorded (evaluation/test_predictions.csv of the best run)."
            if facts["multi_seed"]
            else "No best run yet."
        )
    elif not wrong:
        doc.para("No misclassified test images.")


def misclassified_grid(ev: Evidence, n: int, columns: int) -> tuple[Optional[Figure], int]:
    """The winner's `n` most confident mistakes as an image grid (None if none), and how many files
    could not be read."""
    from PIL import Image

    wrong = sorted((r for r in ev.predictions if r.get("correct") == "0"), key=lambda r: -to_float(r.get("score")))
    names = {}
    if ev.confusion:
        names = dict(zip(ev.confusion["classes"], ev.confusion.get("names") or ev.confusion["classes"]))
    images, titles, missing = [], [], 0
    for row in wrong:
        if len(images) == n:
            break
        if not row.get("path"):  # a row cut short: no file to show
            missing += 1
            continue
        path = Path(row["path"])
        if not path.is_absolute() and ev.data_root:
            path = Path(ev.data_root).expanduser() / path
        try:
            rgb = D.read_rgb(path)
        except D.DECODE_ERRORS:
            missing += 1
            continue
        images.append(np.asarray(Image.fromarray(rgb).resize((96, 96))))
        label, predicted = row.get("label", "?"), row.get("predicted", "?")
        titles.append(
            f"{names.get(label, label)}\n-> {names.get(predicted, predicted)} ({to_float(row.get('score')):.2f})"
        )
    if not images:
        return None, missing
    return plots.image_grid(np.stack(images), titles, columns, "misclassified test images"), missing


def data_section(doc: Doc, ev: Evidence, facts: dict) -> None:
    """The data check: class counts per split, their balance, the files left out."""
    d = facts["data"]
    doc.heading(2, "Data check (representativeness)")
    if not d:
        doc.para(
            "No data summary recorded for this sweep (sweeps log data/summary.json on their parent run; "
            "older sweeps have it only on `best`'s retrainings)."
        )
        return
    doc.para(f"Class counts per split ({d['counts_are']} files). Imbalance: largest class / smallest class.")
    splits = d["splits"]
    doc.table(
        ["class", "name", *splits],
        [[c["class"], c["name"], *(c[s] for s in splits)] for c in d["classes"]]
        + [["all", "", *(d["balance"][s]["total"] for s in splits)]],
    )
    doc.table(
        ["split", "images", "smallest class", "largest class", "imbalance"],
        [[s, b["total"], b["min"], b["max"], f"{b['ratio']:.2f}"] for s, b in d["balance"].items()],
    )
    reasons = "; ".join(f"{k}: {v}" for k, v in d["skipped_reasons"].items())
    shown = f" (the first {len(d['skipped_files'])} below)" if d["skipped_listed"] > len(d["skipped_files"]) else ""
    doc.para(
        f"Files left out: {d['skipped']}" + (f" ({reasons})" if reasons else "") + shown + ". Sweeps and "
        "`best`'s retrainings decode train and validation only; test files are decoded once, by `best`."
    )
    doc.table(
        ["split", "path", "reason"], [[r.get("split"), r.get("path"), r.get("reason")] for r in d["skipped_files"]]
    )
    if ev.sample_images:
        doc.figure("sample_images.png", ev.sample_images, "Training images as the models saw them.")


def provenance_section(doc: Doc, ev: Evidence, facts: dict) -> None:
    """Which runs the report read, and where its numbers and code are."""
    sw, ms = facts["sweep"], facts["multi_seed"]
    doc.heading(2, "Provenance")
    doc.items(
        [
            f"sweep run {sw['run_id']} (commit {sw['commit'] or '–'})",
            *([f"best run {ms['run_id']}"] if ms else []),
            f"{len(ev.singles)} single run(s) on the sweep's data in the experiment",
            "numbers: report.json beside this file; code: lenet_sweep/report/",
        ]
    )
