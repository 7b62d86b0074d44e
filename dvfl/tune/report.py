"""A finished (or resumed) search's results: the trial table, the Pareto front and plot, the best config."""
from __future__ import annotations

import json
import math
import os
import posixpath
import re
from pathlib import Path

from dvfl.config import RunConfig
from dvfl import paths, storage
from dvfl.tune.search_config import FRONT_SUFFIX, TuneConfig, apply_params, experiment_dir, flatten, plain_value
from dvfl.tune.trial import TRIALS_DIR


RESULTS_JSON, RESULTS_MD, PARETO_PNG, BEST_CONFIG = "tune_results.json", "tune_results.md", "pareto.png", "best_config.yaml"
_COST: dict = {}


def student_cost(cfg: RunConfig, num_classes: int) -> dict:
    """GMACs per clip, parameters and width of the student a config trains (cached per model)."""
    from dvfl.pipeline import model_kwargs
    from dvfl.models import build_model
    from dvfl.profile import count_flops, count_params

    kwargs = model_kwargs(cfg.student, num_classes, cfg)
    key = json.dumps([cfg.student.model, kwargs], sort_keys=True)
    if key not in _COST:
        model = build_model(cfg.student.model, device="meta", **kwargs)
        _COST[key] = {"gmacs": count_flops(cfg.student.model, **kwargs)["gmacs_per_clip"],
                      "params": count_params(model)["params"], "width": int(getattr(model, "embed_dim", 0)) or None}
    return _COST[key]


def collect_trials(grid, t: TuneConfig, cfg: RunConfig, dataset_info: dict, exp: str | None = None) -> list[dict]:
    """One row per trial, from Tune's ResultGrid (also after a restore); ``exp``: the experiment
    (default: the search's own; the front's re-runs have theirs)."""
    num_classes = len(dataset_info["classes"])
    rows = []
    for result in grid:
        front = (result.config or {}).get("front")  # a front re-run: {"params", "seed", "of"}
        params = flatten(front["params"] if front else (result.config or {}))
        trial_cfg = apply_params(cfg, params)
        df = result.metrics_dataframe
        history = [] if df is None or "epoch" not in getattr(df, "columns", []) else \
            df.dropna(subset=["epoch"]).sort_values("epoch").drop_duplicates("epoch", keep="last").to_dict("records")
        dir_id = re.search(r"_([0-9a-f]{5}_\d{5})_", os.path.basename(result.path or ""))
        trial_id = (result.metrics or {}).get("trial_id") or (dir_id.group(1) if dir_id else None)
        record_file = storage.join(exp or experiment_dir(t, cfg), TRIALS_DIR, f"{trial_id}.json")
        record = storage.read_json(record_file) if storage.isfile(record_file) else {}
        epochs_run = int(max((h["epoch"] for h in history), default=0))
        scored = [h for h in history if h.get("val_top1") == h.get("val_top1")]  # (NaN != NaN: dropped)
        top1 = [h["val_top1"] for h in scored]
        best_i = max(range(len(top1)), key=lambda i: (top1[i], -i)) if top1 else None
        losses = [h.get("train_loss") for h in history]
        status = ("error" if result.error is not None else
                  "diverged" if losses and isinstance(losses[-1], float) and not math.isfinite(losses[-1]) else
                  "completed" if epochs_run >= cfg.optim.epochs else "stopped early")
        forwards = [h.get("teacher_forward_calls") for h in history]
        forwards = [int(f) for f in forwards if f == f and f is not None]
        rows.append({
            "trial_id": trial_id, "seed": front["seed"] if front else cfg.seed,
            "front_of": front["of"] if front else None,
            "status": status, "error": _error_text(result) if result.error is not None else None,
            "temperature": trial_cfg.kd.temperature, "alpha": trial_cfg.kd.alpha, "lr": trial_cfg.optim.lr,
            "unlabeled_weight": trial_cfg.kd.unlabeled_weight,
            "params_searched": {k: plain_value(v) for k, v in params.items()},
            **student_cost(trial_cfg, num_classes),
            "best_top1": top1[best_i] if best_i is not None else None,
            "best_epoch": int(scored[best_i]["epoch"]) if best_i is not None else None,
            "final_top1": top1[-1] if top1 else None, "epochs_run": epochs_run, "max_epochs": cfg.optim.epochs,
            "epoch_seconds": [round(float(h["epoch_seconds"]), 2) for h in history if "epoch_seconds" in h],
            "val_seconds": [round(float(h["val_seconds"]), 2) for h in history if h.get("val_seconds") == h.get("val_seconds")
                            and "val_seconds" in h],
            "teacher_mode": record.get("teacher_mode"), "starts": len(record.get("starts", [])),
            "teacher_forward_calls": max(forwards) if forwards else None,
            "path": result.path,
        })
    # trial id last: equal top-1 at one width is plausible, and cost_level_bests takes the first
    rows.sort(key=lambda r: (not usable(r), -(r["best_top1"] or 0.0), r["gmacs"], r["trial_id"] or ""))
    return rows


def usable(r: dict) -> bool:
    """A trial that may be chosen: it ran to the end or ASHA stopped it; an errored or diverged
    trial's epochs before the failure are not a recipe that works."""
    return r["status"] in ("completed", "stopped early") and r["best_top1"] is not None


def _error_text(result) -> str:
    """The trial's traceback as Tune stored it (``error.txt`` in the trial dir), else the repr."""
    from ray.tune.result import EXPR_ERROR_FILE

    if result.path:
        try:  # result.path is inside Tune's storage filesystem: a local path, or bucket/key on a store
            with result.filesystem.open_input_stream(posixpath.join(result.path, EXPR_ERROR_FILE)) as f:
                return f.read().decode().strip()
        except OSError:
            pass
    return repr(result.error)


class SearchFailed(RuntimeError):
    """Every trial of a search errored: nothing was found, and the command must not say otherwise."""


def require_finished(grid, what: str, max_epochs: int, expected: int | None = None, fresh: bool = False) -> None:
    """Tune returns the grid of an interrupted search (Ctrl+C, a job's stop signal) as if it had
    ended: its cut-off trials look stopped early, and trials it had not created yet are not in it
    (``expected``: how many the search makes). Nothing is chosen from such a grid. A trial ended
    when it errored, reported its last epoch, or its last result says ``done`` (set by Tune when its
    scheduler or stopper stopped it); Ray 2.60 marks the trials it cuts off TERMINATED as well
    (``runner.cleanup()`` after the interrupted loop), so their status says nothing. ``done`` alone
    is not enough: for a trial that returned, Tune sets it in place on a last result an experiment
    snapshot may already have saved, so a resumed search read that trial as unfinished for ever.
    ``fresh``: the command ran with --fresh, which its rerun must drop (it deleted what it resumes)."""
    again = "run the same command again" + (" without --fresh" if fresh else "") + " to resume it"
    unfinished = sum(1 for r in grid if r.error is None and not (r.metrics or {}).get("done")
                     and (r.metrics or {}).get("epoch", 0) < max_epochs)
    if expected is not None and len(grid) < expected:  # cut off before Tune had created them all (none, at its start)
        raise SearchFailed(f"the {what} was interrupted after {len(grid)} of its {expected} trial(s) had started: "
                           f"nothing is chosen from it; {again}")
    if unfinished:
        raise SearchFailed(f"the {what} was interrupted with {unfinished} of {len(grid)} trial(s) unfinished: nothing "
                           f"is chosen from it; {again}")


def report_errors(rows: list[dict], log=print, required: bool = True) -> None:
    """Say how many trials errored and show the first one's traceback; raise if none is usable
    (every trial errored or diverged: nothing was found), unless not ``required`` (the front's
    re-runs: the search found its best config without them, and says so)."""
    failed = sorted((r for r in rows if r["status"] == "error"), key=lambda r: r["trial_id"])
    if not required and rows and not any(usable(r) for r in rows):
        log(f"[tune] none of the front's {len(rows)} re-run(s) finished ("
            + (f"{len(failed)} errored, the rest diverged" if failed else "all diverged")
            + "): the front and the best config come from the single runs")
    if rows and not any(usable(r) for r in rows) and not failed and required:
        raise SearchFailed(f"all {len(rows)} trials diverged (their training loss stopped being finite): "
                           "nothing was found; lower optim.lr or its range")
    if not failed:
        return
    first = failed[0]
    tail = "\n".join(first["error"].splitlines()[-25:])
    log(f"[tune] {len(failed)} of {len(rows)} trial(s) errored. First error (trial {first['trial_id']}):\n{tail}")
    if len(failed) > 1:
        from ray.tune.result import EXPR_ERROR_FILE

        log("[tune] the other errored trials' logs: " + ", ".join(
            os.path.join(r["path"] or "?", EXPR_ERROR_FILE) for r in failed[1:]))
    if not required:
        return
    if len(failed) == len(rows):
        raise SearchFailed(f"all {len(rows)} trials errored (first error above; trial dir {first['path']})")
    if not any(usable(r) for r in rows):
        raise SearchFailed(f"no trial of {len(rows)} finished ({len(failed)} errored, the rest diverged; first error "
                           f"above; trial dir {first['path']})")


def pareto_front(rows: list[dict], key: str = "best_top1") -> list[int]:
    """Indices of the usable trials no other usable trial beats on both ``key`` (higher: the best
    validation top-1, or ``top1_mean`` of re-runs) and GMACs (lower)."""
    pts = [(r["gmacs"], r.get(key) if usable(r) else None) for r in rows]
    front = []
    for i, (g, a) in enumerate(pts):
        if a is None:
            continue
        dominated = any(b is not None and h <= g and b >= a and (h < g or b > a) for j, (h, b) in enumerate(pts) if j != i)
        if not dominated:
            front.append(i)
    return front


def markdown_table(rows: list[dict], t: TuneConfig) -> str:
    extra = sorted(k for k in t.space if k not in ("kd.temperature", "kd.alpha", "optim.lr", "student.embed_dim"))
    head = ["trial", "T", "width", "α", "lr", *extra, "GMACs/clip", "params", "best top-1 (epoch)", "last epoch",
            "epochs run", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 1 + "---:|" * (len(head) - 2) + "---|"]
    for r in rows:
        cells = [r["trial_id"], f"{r['temperature']:.2f}", str(r["width"]), f"{r['alpha']:.2f}", f"{r['lr']:.2e}",
                 *[_fmt(r["params_searched"].get(k)) for k in extra], f"{r['gmacs']:.4f}", f"{r['params'] / 1e6:.3f}M",
                 "—" if r["best_top1"] is None else f"{r['best_top1']:.1%} ({r.get('best_epoch', '?')})",
                 "—" if r.get("final_top1") is None else f"{r['final_top1']:.1%}",
                 f"{r['epochs_run']}/{r['max_epochs']}",
                 r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_level_bests(rows: list[dict]) -> list[dict]:
    """The best usable trial of each cost (GMACs per clip), cheapest first: the trials re-run with
    fresh seeds. A front drawn from single runs lets one lucky seed push a better cost level off the
    front and out of the re-runs; re-running every level's best lets the re-runs decide."""
    best: dict = {}
    for r in rows:  # sorted best first (collect_trials)
        if usable(r):
            best.setdefault(round(r["gmacs"], 9), r)
    return [best[g] for g in sorted(best)]


def rerun_spread(candidates: list[dict], reruns: list[dict]) -> list[dict]:
    """Each candidate's best top-1 per fresh student seed (its usable re-runs), with mean and
    min-max, set on its row; returns the candidates that were re-run. The search's own run stays out
    of these figures: it was chosen because it beat the other trials of its cost, so its score is
    biased upward."""
    spread = []
    for r in candidates:
        own = [f for f in reruns if f["front_of"] == r["trial_id"] and f["seed"] != r.get("seed")]
        runs = {f["seed"]: f["best_top1"] for f in own if usable(f)}
        if not runs:
            continue
        values = list(runs.values())
        # a seed that errored or diverged is said, not dropped from sight: the mean is over fewer seeds
        r.update(top1_by_seed={str(k): v for k, v in sorted(runs.items())}, top1_mean=sum(values) / len(values),
                 top1_min=min(values), top1_max=max(values),
                 failed_seeds={str(f["seed"]): f["status"] for f in sorted(own, key=lambda f: f["seed"])
                               if not usable(f)})
        spread.append(r)
    return spread


def choose(rows: list[dict], reruns: list[dict]) -> tuple[list[dict], list[dict], dict | None]:
    """(cost levels re-run, Pareto front, best trial). With re-runs the front is drawn from each
    cost level's best trial by its re-runs' mean top-1, and the best is the level with the highest
    mean (ties: the cheaper) among those none of whose re-runs failed (a recipe that diverges on a
    fresh seed is not the one to ship), if any; without, from the single runs (the best: the top row)."""
    levels = rerun_spread(cost_level_bests(rows), reruns)
    if levels:
        front = [levels[i] for i in pareto_front(levels, key="top1_mean")]
        steady = [r for r in levels if not r["failed_seeds"]] or levels
        best = max(steady, key=lambda r: (r["top1_mean"], -r["gmacs"]))
    else:
        front = [rows[i] for i in pareto_front(rows)]
        best = next((r for r in rows if usable(r)), None)
    for r in rows:
        r["pareto"] = any(r is f for f in front)
    return levels, front, best


def front_separation(spread: list[dict]) -> list[dict]:
    """Each pair of neighbouring re-run trials (by cost) re-run with two or more fresh seeds,
    ``separated`` when their seed ranges do not overlap. Overlapping ranges mean the search cannot
    tell them apart; one seed gives no range, so no verdict."""
    pts = sorted((r for r in spread if len(r["top1_by_seed"]) > 1), key=lambda r: r["gmacs"])
    return [{"trials": [a["trial_id"], b["trial_id"]], "widths": [a["width"], b["width"]],
             "temperatures": [a["temperature"], b["temperature"]],
             "ranges": [[a["top1_min"], a["top1_max"]], [b["top1_min"], b["top1_max"]]],
             "separated": a["top1_max"] < b["top1_min"] or b["top1_max"] < a["top1_min"]}
            for a, b in zip(pts, pts[1:])]


def separation_lines(pairs: list[dict]) -> str:
    def one(p):
        (lo_a, hi_a), (lo_b, hi_b) = p["ranges"]
        verdict = "separated" if p["separated"] else "**not** separated: the seed ranges overlap"
        return (f"* width {p['widths'][0]} (T {p['temperatures'][0]:.2g}) {lo_a:.1%}–{hi_a:.1%} vs width "
                f"{p['widths'][1]} (T {p['temperatures'][1]:.2g}) {lo_b:.1%}–{hi_b:.1%}: {verdict}")
    return "\n".join(one(p) for p in pairs)


def front_table(spread: list[dict]) -> str:
    head = ["trial", "T", "width", "α", "lr", "GMACs/clip", "search run (best of its cost)", "re-runs: top-1 per seed",
            "mean", "min–max", "front"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 3) + "---|---|"]
    for r in sorted(spread, key=lambda r: r["gmacs"]):
        per_seed = ", ".join([f"{v:.1%} (seed {k})" for k, v in r["top1_by_seed"].items()]
                             + [f"{why} (seed {k})" for k, why in r.get("failed_seeds", {}).items()])
        lines.append("| " + " | ".join([
            r["trial_id"], f"{r['temperature']:.2f}", str(r["width"]), f"{r['alpha']:.2f}", f"{r['lr']:.2e}",
            f"{r['gmacs']:.4f}",
            f"{r['best_top1']:.1%} (seed {r.get('seed')}, {r['epochs_run']}/{r['max_epochs']} epochs)",
            per_seed, f"{r['top1_mean']:.1%}", f"{r['top1_min']:.1%}–{r['top1_max']:.1%}",
            "yes" if r.get("pareto") else "no"]) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def plot_pareto(rows: list[dict], front: list[dict], path: str | Path, title: str, spread=()) -> None:
    """Every trial's single run (grey), the re-run cost levels (blue: mean, min-max over fresh seeds)
    and the Pareto front (red), through the re-runs' means when there are re-runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    pts = [(r["gmacs"], r["best_top1"], r) for r in rows if r["best_top1"] is not None]
    if pts:
        groups = (("completed", "o", "ran to the end"), ("stopped early", "x", "stopped early (ASHA)"),
                  ("diverged", "v", "diverged (stopped)"))
        for status, marker, label in groups:
            group = [p for p in pts if p[2]["status"] == status]
            if group:
                ax.scatter([p[0] for p in group], [p[1] for p in group], marker=marker, color="0.55", label=label, zorder=2)
        key = "top1_mean" if spread else "best_top1"
        fr = sorted((r["gmacs"], r[key]) for r in front)
        ax.plot([p[0] for p in fr], [p[1] for p in fr], "-o", color="tab:red", lw=1.5, ms=8, mfc="none", mew=2,
                label="Pareto front" + (" (re-runs' means)" if spread else ""), zorder=3)
        counts = sorted({len(r["top1_by_seed"]) for r in spread}) or [0]
        seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        for n, r in enumerate(spread):  # each cost level's re-runs: mean and min-max over fresh seeds
            ax.errorbar([r["gmacs"]], [r["top1_mean"]], yerr=[[r["top1_mean"] - r["top1_min"]],
                                                              [r["top1_max"] - r["top1_mean"]]],
                        fmt="s", color="tab:blue", ms=5, capsize=4, zorder=4,
                        label=f"best of its cost re-run, {seeds} fresh seed(s) (mean, min–max)" if n == 0 else None)
        seen: dict = {}
        for g, a, r in sorted(pts, key=lambda p: -p[1]):  # trials of one width: labels stacked downwards
            k = seen[g] = seen.get(g, -1) + 1
            ax.annotate(f"T={r['temperature']:.1f} α={r['alpha']:.2f}", (g, a), textcoords="offset points",
                        xytext=(4, 4 - 9 * k), fontsize=7, color="0.3")
    costs = sorted({p[0] for p in pts})
    if len(costs) > 1:  # widths grow GMACs by ~the square: a linear axis crowds the small ones
        ax.set_xscale("log")
        ax.set_xticks(costs, [f"{c:.3g}" for c in costs])
        ax.minorticks_off()
        ax.set_xlim(costs[0] / 1.4, costs[-1] * 2.2)  # room for the labels right of the widest point
    ax.set(xlabel="student GMACs per clip", ylabel="best validation top-1", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    # a local temporary file renamed over the target, or one PUT on an object store
    storage.write_with(path, lambda target: fig.savefig(target, dpi=110, format="png"))
    plt.close(fig)


def write_results(exp: str | Path, t: TuneConfig, cfg: RunConfig, rows: list[dict], *, wall_seconds: float,
                  front_rows=(), log=print, resumed: bool = False) -> dict:
    """tune_results.{json,md}, pareto.png and best_config.yaml in the experiment directory.

    With ``front_rows`` (each cost level's best trial re-run with fresh student seeds) the front is
    drawn from the re-runs' means and the best config is the level with the highest mean, not the
    luckiest single run (:func:`choose`)."""
    from dvfl.config import dump_config

    exp = os.fspath(exp)
    best_path = storage.join(exp, BEST_CONFIG)
    spread, front, best = choose(rows, list(front_rows))
    summary = {
        "experiment": t.experiment, "path": exp, "metric": t.metric, "mode": t.mode,
        "search": {**t.to_dict(), "run_config": paths.as_given(t.run_config)}, "asha": t.asha.enabled,
        "trials": len(rows),
        "stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "diverged": sum(r["status"] == "diverged" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "trial_epochs_run": sum(r["epochs_run"] for r in rows),
        "trial_epochs_if_all_ran_to_the_end": len(rows) * cfg.optim.epochs,
        # (a resumed search's: this command's, from its resume on; trials' own seconds are in the rows)
        "wall_seconds": round(wall_seconds, 1), "resumed": resumed, "best": best, "rows": rows,
        "best_chosen_by": "mean best validation top-1 over fresh-seed re-runs of each cost level's best trial, "
                          + ("among the levels none of whose re-runs errored or diverged"
                             if not (best or {}).get("failed_seeds") else "every level having a failed re-run")
        if spread else "best validation top-1 trial",
        "front_seeds": list(t.front_seeds), "front_reruns": list(front_rows),
        "front_separation": front_separation(spread),
        "best_config": best_path if best else None,
    }
    summary["trial_epochs_saved_by_asha"] = summary["trial_epochs_if_all_ran_to_the_end"] - summary["trial_epochs_run"]
    asha = (f"ASHA on {t.metric} per epoch: {summary['stopped_early']} of {len(rows)} stopped early"
            if t.asha.enabled else "ASHA off")
    md = (f"Trials of `{t.experiment}` sorted by best validation top-1 (its epoch in brackets; `distill.py` "
          f"ships the last epoch's weights, beside it; errored and diverged trials are never chosen) "
          f"({asha}; {summary['errors']} errored, {summary['diverged']} diverged; "
          f"{summary['trial_epochs_run']} of "
          f"{summary['trial_epochs_if_all_ran_to_the_end']} trial-epochs run). Width = student embed_dim; "
          "GMACs per clip at the trained input size.\n\n" + markdown_table(rows, t) + "\n")
    if spread:
        md += (f"\nThe best trial of each cost (student GMACs) re-run with fresh student seed(s) {list(t.front_seeds)} "
               f"(every epoch), best validation top-1 of each run. The search's own run (seed {cfg.seed}) is shown but "
               "left out of the mean and range: it is there because it beat the other trials of its cost, so its "
               "score is biased upward. The Pareto front is drawn from the re-runs' means, and the best config is "
               "the cost level with the highest mean among those none of whose re-runs errored or diverged (a "
               "level with a failed seed may be on the front and still not chosen):\n\n" + front_table(spread) + "\n")
        passed_over = [r for r in spread if r["failed_seeds"] and best is not None and r["top1_mean"] > best["top1_mean"]]
        if best is not None and best.get("failed_seeds"):  # (every level had one: the rule above had no level to pick)
            md += (f"\nEvery cost level had a failed re-run: the best config is the highest mean over the seeds "
                   f"that ran (trial {best['trial_id']}, failed seeds {', '.join(best['failed_seeds'])}).\n")
        if passed_over:
            md += "".join(f"\nPassed over for a failed re-run (seeds {', '.join(r['failed_seeds'])}): trial "
                          f"{r['trial_id']}, mean {r['top1_mean']:.1%} over its other seeds.\n" for r in passed_over)
        unrun = [r["trial_id"] for r in cost_level_bests(rows) if r not in spread]
        if unrun:
            md += (f"\nNo usable re-run of trial(s) {', '.join(unrun)} (errored, diverged or not run): "
                   "left out above.\n")
        if summary["front_separation"]:
            md += ("\nCost levels next to each other (of those re-run with two or more seeds), told apart by more "
                   "than seed noise when their re-runs' ranges do not overlap:\n\n"
                   + separation_lines(summary["front_separation"]) + "\n")
    elif front_rows:  # choose() fell back to the single runs: say so, the reader expects re-run means
        md += (f"\nEvery re-run with fresh student seed(s) {list(t.front_seeds)} errored or diverged (see the "
               "errors): the Pareto front and the best config come from the single runs above.\n")
    storage.write_text(storage.join(exp, RESULTS_MD), md)
    plot_pareto(rows, front, storage.join(exp, PARETO_PNG), f"{t.experiment}: top-1 vs cost ({len(rows)} trials)",
                spread=spread)
    if best:
        dump_config(apply_params(cfg, best["params_searched"]), best_path)
    storage.write_json(storage.join(exp, RESULTS_JSON), summary)  # last: it names best_config.yaml
    log("\n" + md)
    if best:
        log(f"[tune] best: trial {best['trial_id']} T={best['temperature']:.3g} width={best['width']} "
            f"α={best['alpha']:.3g} lr={best['lr']:.3g}: top-1 {best['best_top1']:.1%}"
            + (f" (mean of its re-runs {best['top1_mean']:.1%}) " if spread else " ") +
            f"-> {best_path} " + (f"(python pipelines/distill.py --config {best_path})" if cfg.teacher.mode != "none"
                                  else "(a student without a teacher: pipelines/distill.py distils, so give it "
                                       "teacher.mode cached to run this recipe there)"))
    # the front's re-runs are an experiment of their own beside the search's (FRONT_SUFFIX)
    curves = f"--logdir_spec search:{exp},front:{exp}{FRONT_SUFFIX}" if front_rows else f"--logdir {exp}"
    log(f"[tune] {storage.join(exp, RESULTS_JSON)}, {storage.join(exp, RESULTS_MD)}, {storage.join(exp, PARETO_PNG)}; "
        f"tensorboard {curves}")
    return summary
