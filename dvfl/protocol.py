"""Evaluation protocols over several splits: UCF101/HMDB51 splits 1-3, UCF50 leave-one-group-out.

Each split (a UCF50 fold: its held-out group) is one run of the distillation pipeline
(:func:`dvfl.pipeline.run_all`) with ``data.split`` set and its own output dir, clips, teacher and
cache; ``{split}`` in a config path (``data/hmdb51_s{split}``) is where the split number goes.
The protocol's results (``protocol.json`` / ``protocol.md``) hold every split's figures and their
mean ± sample standard deviation; they are rewritten after every split, so an interrupted protocol
shows what finished (and the same command resumes: finished stages are reused).
"""
from __future__ import annotations

import os
import re
import statistics
from dataclasses import dataclass

from dvfl import paths, storage
from dvfl.config import (SPLIT_COUNTS, SPLIT_PLACEHOLDER, ConfigError, RunConfig, config_tree, load_config,
                         with_added_defaults)

RESULTS_JSON, RESULTS_MD = "protocol.json", "protocol.md"


@dataclass(frozen=True)
class Protocol:
    dataset: str
    kind: str  # "split" (official train/test splits) or "fold" (leave-one-group-out: fold N tests on group N)
    ids: tuple  # every split/fold the protocol has
    description: str


PROTOCOLS = {
    "ucf101": Protocol("ucf101", "split", tuple(range(1, SPLIT_COUNTS["ucf101"] + 1)), "UCF101 official splits 1-3"),
    "hmdb51": Protocol("hmdb51", "split", tuple(range(1, SPLIT_COUNTS["hmdb51"] + 1)), "HMDB51 official splits 1-3"),
    "ucf50": Protocol("ucf50", "fold", tuple(range(1, SPLIT_COUNTS["ucf50"] + 1)),
                      "UCF50 leave-one-group-out (25 folds, fold N tests on group N)"),
}
# config paths that must differ per split: one split's test videos are another's training videos
PER_SPLIT_FIELDS = ("data.clips", "teacher.cache", "teacher.path")


def protocol_for(dataset: str) -> Protocol:
    if not isinstance(dataset, str) or dataset not in PROTOCOLS:
        raise ConfigError(f"data.dataset is {dataset!r}, which has one fixed split (run pipelines/distill.py); "
                          f"protocols exist for {', '.join(PROTOCOLS)}")
    return PROTOCOLS[dataset]


def parse_ids(text: str, protocol: Protocol, flag: str) -> list[int]:
    """``1,2,3``, ``1-5``, ``all`` -> sorted distinct ids of the protocol, or a ConfigError naming the flag."""
    if text.strip() == "all":
        return list(protocol.ids)
    ids = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            ids += list(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: expected numbers like 1,2,3 or 1-5 or all") from None
    bad = sorted(set(ids) - set(protocol.ids))
    if bad or not ids:
        raise ConfigError(f"{flag} {text!r}: {protocol.description} has {protocol.kind}s "
                          f"{protocol.ids[0]}..{protocol.ids[-1]}, got {bad or 'none'}")
    return sorted(set(ids))


def _get(tree: dict, dotted: str):
    node = tree
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def split_configs(config_path, overrides, ids: list[int], check_paths: bool = True) -> list[RunConfig]:
    """One validated config per split, before any work starts (errors name the split and the field;
    ``check_paths=False``: the configs of splits not run now, whose inputs need not exist).

    ``output_dir`` without ``{split}`` gets a ``split<N>`` folder per split; ``data.clips``,
    ``teacher.cache`` and ``teacher.path`` must hold ``{split}`` or be empty (then each split's
    output dir holds its own clips, cache and trained teacher)."""
    tree = config_tree(config_path, overrides)
    for name in PER_SPLIT_FIELDS:
        value = _get(tree, name)
        if value and SPLIT_PLACEHOLDER not in str(value):
            raise ConfigError(
                f"{name} is {value} for every split: a protocol needs one per split (another split's test videos "
                f"are this split's training videos). Put {SPLIT_PLACEHOLDER} in it (e.g. --set "
                f"{name}={_example(str(value))}) or set it to null")
    dataset = str(_get(tree, "data.dataset"))
    classes = DATASET_CLASSES.get(dataset)
    # UCF101 holds UCF50's 50 classes, its groups included: a head of the other's count saw every fold's test group
    overlapping = {DATASET_CLASSES[d]: d for d in OVERLAPPING.get(dataset, ())}
    for name in ("student.checkpoint", "teacher.train.checkpoint"):
        value = _get(tree, name)
        if not value or SPLIT_PLACEHOLDER in str(value) or (name == "teacher.train.checkpoint" and _get(tree, "teacher.path")):
            continue
        rows = _head_classes(str(value))
        if rows is not None and rows == classes:
            # trained on this dataset, on a split whose training videos are another split's test
            # videos; a new head (reinit_head) does not undo that, and for the same class count
            # load_checkpoint keeps the head anyway
            raise ConfigError(
                f"{name} is {value} for every split, and its classifier has {rows} classes, {_get(tree, 'data.dataset')}'s "
                f"own: weights trained on this dataset saw another split's test videos. Put {SPLIT_PLACEHOLDER} in it "
                "for weights of each split's own training videos, or start from another dataset's weights (the "
                f"Kinetics-400 checkpoint with {name.replace('.checkpoint', '.reinit_head')}: true)")
        if rows is not None and rows in overlapping:
            raise ConfigError(
                f"{name} is {value}, and its classifier has {rows} classes, {overlapping[rows]}'s: {overlapping[rows]} and "
                f"{dataset} share videos (UCF101's classes and groups include all of UCF50's), so those weights saw "
                f"this protocol's test videos. Start from a dataset without them (the Kinetics-400 checkpoint with "
                f"{name.replace('.checkpoint', '.reinit_head')}: true)")
    template = str(tree.get("output_dir") or RunConfig().output_dir)
    per_split = template if SPLIT_PLACEHOLDER in template else storage.join(template, f"split{SPLIT_PLACEHOLDER}")
    configs = []
    for i in ids:
        try:
            configs.append(load_config(config_path, [*overrides, ("data.split", i), ("output_dir", per_split)],
                                       check_paths=check_paths, outputs=("data.clips",)))
        except ConfigError as exc:
            raise ConfigError(f"split {i}: {exc}") from None
    return configs


# the class counts of the protocol datasets: a start checkpoint with this head was trained on the dataset
DATASET_CLASSES = {"ucf101": 101, "hmdb51": 51, "ucf50": 50}
OVERLAPPING = {"ucf50": ("ucf101",), "ucf101": ("ucf50",)}  # datasets holding each other's videos


def _head_classes(path: str) -> int | None:
    """The class count of a checkpoint's classifier head; None without one, or for a file that
    cannot be read here (the run's own checks name it)."""
    from dvfl.models.checkpoint import CheckpointError, read_state_dict

    try:
        state = read_state_dict(path)
    except (CheckpointError, OSError, RuntimeError, ValueError):
        return None
    for key in ("head.weight", "head.fc.weight"):
        if key in state and state[key].ndim == 2:
            return int(state[key].shape[0])
    return None


def _example(value: str) -> str:
    stem, ext = os.path.splitext(value.rstrip("/"))
    stem = re.sub(r"_s\d+$", "", stem)  # data/ucf101_s1 -> data/ucf101_s{split}, not ..._s1_s{split}
    return f"{stem}_s{SPLIT_PLACEHOLDER}{ext}"


def results_dir(config_path, overrides, out: str | None = None) -> str:
    """``--out``, else the config's output_dir (``{split}`` in it read as ``all``)."""
    template = out or str(config_tree(config_path, overrides).get("output_dir") or RunConfig().output_dir)
    return paths.absolute(template.replace(SPLIT_PLACEHOLDER, "all"), paths.output_base())


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(protocol: Protocol, runs: list[dict]) -> dict:
    """Per model: mean and sample std (n-1) over the splits that ran; for folds also the pooled
    top-1 (every test video of every fold counted once)."""
    out = {}
    # every model any split ran, in order (a split whose clips hold an unlabelled pool trains one more)
    for role in dict.fromkeys(role for r in runs for role in r["models"]):
        rows = [r["models"][role] for r in runs if role in r["models"]]
        splits = [r["split"] for r in runs if role in r["models"]]
        top1_mean, top1_std = _mean_std([m["top1"] for m in rows])
        top5_mean, top5_std = _mean_std([m["top5"] for m in rows])
        agg = {"n": len(rows), "top1_mean": top1_mean, "top1_std": top1_std, "top5_mean": top5_mean,
               "top5_std": top5_std, "top1_per_split": [m["top1"] for m in rows], "splits": splits}
        if protocol.kind == "fold" and all(m.get("videos") for m in rows):
            videos = sum(m["videos"] for m in rows)
            agg["pooled_top1"] = sum(m["top1"] * m["videos"] for m in rows) / videos
            agg["pooled_videos"] = videos
        out[role] = agg
    return out


def _model_label(role: str, agg: dict, ran: list, kind: str) -> str:
    """The model's name, with how many of the splits that ran trained it where not all did."""
    from dvfl.pipeline import STUDENT_LABELS

    return STUDENT_LABELS.get(role, role) + (f" ({agg['n']} of {len(ran)} {kind}s)" if agg["n"] < len(ran) else "")


def _pct(mean: float, std: float | None) -> str:
    return f"{mean:.1%}" + (f" ± {100 * std:.1f}" if std is not None else "")


def write_results(out_dir: str, protocol: Protocol, asked: list[int], runs: list[dict], log=print) -> dict:
    """protocol.json + protocol.md (atomic): per-split figures, mean ± std, how many splits ran."""
    ran = [r["split"] for r in runs]
    report = {
        "protocol": protocol.description, "dataset": protocol.dataset, "kind": protocol.kind,
        f"{protocol.kind}s_asked": asked, f"{protocol.kind}s_run": ran,
        f"{protocol.kind}s_run_before": [i for i in ran if i not in asked],
        f"{protocol.kind}s_total": len(protocol.ids),
        "complete": sorted(ran) == list(protocol.ids),
        "std": "sample standard deviation (n-1) over the splits that ran; null for one split",
        "split_of_numbers": "test split of each run, evaluated once at its end",
        "runs": runs, "aggregate": aggregate(protocol, runs) if runs else {},
    }
    storage.makedirs(out_dir)
    storage.write_json(storage.join(out_dir, RESULTS_JSON), report)
    what = f"{len(ran)} of {len(protocol.ids)} {protocol.kind}s ran ({', '.join(map(str, ran))})"
    before = [i for i in ran if i not in asked]
    if before:
        what += f"; {len(before)} of them by earlier commands ({', '.join(map(str, before))})"
    missing = [i for i in asked if i not in ran]
    if missing:
        what += f"; {len(missing)} asked for not finished"
    lines = [f"# {protocol.description}", "", what + ".", "",
             "| model | top-1 mean ± std (points) | top-5 mean ± std | " + " | ".join(
                 f"{protocol.kind} {s}" for s in ran) + " |",
             "|---|---:|---:|" + "---:|" * len(ran)]
    for role, agg in report["aggregate"].items():
        per = {r["split"]: r["models"].get(role) for r in runs}
        lines.append(f"| {_model_label(role, agg, ran, protocol.kind)} | {_pct(agg['top1_mean'], agg['top1_std'])} | "
                     f"{_pct(agg['top5_mean'], agg['top5_std'])} | "
                     + " | ".join(f"{per[s]['top1']:.1%}" if per[s] else "-" for s in ran) + " |")
    pooled = {_model_label(r, a, ran, protocol.kind): a["pooled_top1"]
              for r, a in report["aggregate"].items() if "pooled_top1" in a}
    md = "\n".join(lines) + "\n\nTop-1 per " + protocol.kind + " on its test split (evaluated once, at the end); " \
        "std: sample standard deviation over the " + protocol.kind + "s that ran.\n"
    if pooled:
        md += "\nPooled top-1 (every test video of the folds that ran counted once): " + ", ".join(
            f"{label} {v:.1%}" for label, v in pooled.items()) + ".\n"
    storage.write_text(storage.join(out_dir, RESULTS_MD), md)
    log(f"[protocol] {what}: {storage.join(out_dir, RESULTS_JSON)}")
    return report


def _run_row(split: int, cfg: RunConfig, result: dict) -> dict:
    """A split's line of the protocol's results, from its run's results.json."""
    return {"split": split, "output_dir": cfg.output_dir, "clips": cfg.clips_dir,
            "models": {role: {"top1": row["top1_mean"], "top5": row["top5_mean"], "videos": row.get("videos"),
                              "seeds": row["seeds"], "top1_per_seed": row["top1_per_seed"]}
                       for role, row in result["models"].items()}}


def earlier_runs(configs: dict[int, RunConfig], log=print) -> list[dict]:
    """The splits not asked for this time that an earlier command finished in their folders with
    the configuration they would run with now (UCF50's 25 folds run a few at a time): their
    results count in the aggregate without running again. A folder whose results.json records
    another configuration, or none, is left out and said."""
    import json

    runs, other = [], []
    for i, cfg in sorted(configs.items()):
        path = storage.join(cfg.output_dir, "results.json")
        if not storage.isfile(path):
            continue
        try:
            from dvfl.pipeline import EVALUATION_METHOD, clips_fingerprint

            result = storage.read_json(path)
            # (a field added since, at its default, is not another configuration)
            recorded = with_added_defaults(result["config"], json.loads(json.dumps(RunConfig().to_dict())))
            same = (recorded == json.loads(json.dumps(cfg.as_given().to_dict()))
                    and result.get("evaluation_method") == EVALUATION_METHOD  # (none: an older version's)
                    # on the fold's clips as they are now: re-ingested since (e.g. by a newer decoder), not
                    # counted; deleted once its results were written (docs/protocols.md), still counted
                    and result.get("dataset_fingerprint") is not None
                    and clips_fingerprint(cfg) in (None, result["dataset_fingerprint"]))
            row = _run_row(i, cfg, result) if same else None
        except (OSError, ValueError, KeyError, TypeError):
            row = None
        if row is None:
            other.append(i)
        else:
            runs.append(row)
    if other:
        log(f"[protocol] not counted: the results of split(s) {', '.join(map(str, other))} in their folders come "
            "from another configuration, an older version's evaluation or clips ingested again since (or cannot be "
            "read); run them again to count them")
    return runs


def run_protocol(protocol: Protocol, configs: list[RunConfig], ids: list[int], out_dir: str, log=print,
                 others: dict[int, RunConfig] | None = None) -> dict:
    """Run the pipeline per split (in order), rewriting the protocol's results after each one;
    ``others``: the configs of the splits not asked for, whose finished runs (:func:`earlier_runs`,
    read again before each write: another command may be running other folds) count with them."""
    from dvfl import pipeline
    from dvfl.config import dump_config

    from dvfl.locks import folder_lock

    def write(own: list[dict], say=lambda *_: None, said=lambda *_: None) -> dict:
        # commands running other folds read each other's results and write these files too: one at a time
        # (a fold that finished between another command's read and its write was left out of the files)
        with folder_lock(storage.join(out_dir, RESULTS_JSON), "protocol results", wait=True, log=None):
            runs = sorted([*earlier_runs(others or {}, log=say), *own], key=lambda r: r["split"])
            return write_results(out_dir, protocol, ids, runs, log=said)

    own: list[dict] = []
    report = write(own, say=log)
    for n, (i, cfg) in enumerate(zip(ids, configs), 1):
        log(f"[protocol] {protocol.kind} {i} ({n}/{len(ids)}): clips {cfg.clips_dir}, results in {cfg.output_dir}")
        storage.makedirs(cfg.output_dir)
        pipeline.remove_report(cfg.output_dir)  # a split that fails must not leave an earlier run's beside its config
        dump_config(cfg, storage.join(cfg.output_dir, "config.yaml"))
        own.append(_run_row(i, cfg, pipeline.run_all(cfg, log)))
        report = write(own, said=log)
    return report


__all__ = ["PROTOCOLS", "Protocol", "protocol_for", "parse_ids", "split_configs", "results_dir", "aggregate",
           "write_results", "earlier_runs", "run_protocol"]
