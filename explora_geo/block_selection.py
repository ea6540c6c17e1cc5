"""Automatic choice of the blocks ExPLoRA unfreezes: ``explora-geo select-blocks``, ``pretrain --unfreeze auto``.

The paper picks the unfrozen blocks by ablation. Here the choice is a search:

- **Trials.** Every candidate unfreeze spec (paper notation: ``L``, ``1,L``, ``L-1,L`` ...) is a pre-training
  run with the same objective, data, LoRA rank and seed, laid out over the same ``steps`` (same learning-rate
  schedule): equal budgets. Trials are ordinary pre-training runs (:func:`explora_geo.training.run_pretraining`).
- **Successive halving.** All candidates train to the first rung (``steps / eta**(R-1)`` optimiser steps), are
  scored, and only the best ``1/eta`` continue (exact resume from their checkpoint) to the next rung, and so on
  up to ``steps``. Candidates that stop early are ranked below those that went further.
- **Score.** The objective's loss on held-out patches: the bottom ``holdout`` fraction of every raster's rows
  never yields a training patch, and the same ``val_samples`` patches, under the same masks / crops, score every
  candidate at every validation (``val_loss``, lower is better). With labelled chips (``labels``), the kNN
  top-1 accuracy of the adapted backbone's features (:func:`explora_geo.downstream.probe.knn_select`, k chosen on
  a validation split of the chips) ranks first and the held-out loss breaks ties.
- **Pre-screen (optional, zero cost).** Before any training, one backward pass of the SSL loss on target
  batches with every block trainable gives, per block, the L1 norm of the loss gradient over the block's
  weights. To first order, one Adam step of size ``lr`` on block ``b`` lowers the target loss by about
  ``lr * |grad_b|_1`` (Adam's update is close to ``lr * sign(grad)``), so the candidate score is the sum over its
  blocks: the loss reduction its unfrozen blocks can buy at the start. It needs target data only (no
  source-domain statistics, which released checkpoints do not carry); how well it agrees with the trials'
  ranking is measured (Spearman and Kendall rank correlations) and reported with every search that runs it.
- **Devices.** With several GPUs, the trials of a rung run one per GPU in processes started by
  ``torch.multiprocessing``; otherwise one after the other.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from explora_geo.atomic import atomic_paths, write_text_atomic
from explora_geo.errors import ExploraGeoError
from explora_geo.training import PretrainConfig, run_pretraining

__all__ = ["Candidate", "SearchSettings", "default_candidates", "model_depth", "parse_candidates",
           "pretrain_with_search", "prescreen_scores", "rungs", "select_blocks"]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One unfreeze spec: as written (``spec``) and resolved against the model's depth (0-based ``blocks``)."""

    spec: str
    blocks: tuple[int, ...]

    @property
    def slug(self) -> str:
        """A folder name for the trial."""
        return "none" if not self.blocks else "blocks_" + "_".join(str(b + 1) for b in self.blocks)


@dataclasses.dataclass
class SearchSettings:
    """Settings of a block search (the rest comes from the :class:`PretrainConfig` of the trials).

    Args:
        candidates: unfreeze specs (``None``: :func:`default_candidates` for the model's depth).
        steps: optimiser steps of a full trial (every candidate's schedule is laid out over it).
        eta: successive-halving factor (keep the best ``1/eta`` at each rung).
        holdout: fraction of every raster's rows kept out of training for the score.
        val_samples: held-out patches per validation.
        labels: chip folder (one sub-folder per class) for the kNN score; file_bands: its band order
            (``eurosat`` for EuroSAT's B8A-last files), as in ``probe``.
        prescreen: compute the zero-cost pre-screen and its agreement with the trials.
        prescreen_keep: keep only the best ``prescreen_keep`` candidates of the pre-screen for the trials.
        prescreen_batches: target batches of the pre-screen.
        workers: parallel trial processes (``None``: one per GPU when several are present, else 1).
    """

    candidates: Sequence[str] | None = None
    steps: int = 100
    eta: int = 2
    holdout: float = 0.2
    val_samples: int = 64
    labels: str | None = None
    file_bands: str | None = None
    prescreen: bool = False
    prescreen_keep: int | None = None
    prescreen_batches: int = 2
    workers: int | None = None

    def check(self) -> None:
        """Raises ExploraGeoError on a bad value (one line)."""
        if int(self.steps) < 1:
            raise ExploraGeoError(f"--steps {self.steps} must be >= 1: each candidate trains that many steps.")
        if int(self.eta) < 2:
            raise ExploraGeoError(f"--eta {self.eta} must be >= 2 (keep the best 1/eta at each rung).")
        if not 0.0 < float(self.holdout) < 1.0 or int(self.val_samples) < 1:
            raise ExploraGeoError(f"--holdout {self.holdout} / --val-samples {self.val_samples}: the score needs "
                                  "a held-out fraction in (0, 1) and at least one held-out patch.")
        if self.prescreen_keep is not None and int(self.prescreen_keep) < 1:
            raise ExploraGeoError(f"--prescreen-keep {self.prescreen_keep} must be >= 1.")


# --------------------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------------------

def model_depth(config: PretrainConfig) -> int:
    """Number of blocks of the model ``config`` builds (built on the meta device: no memory, no weights)."""
    from explora_geo.training.setup import band_spec, build_backbone

    preset, names = band_spec(config.bands)
    with torch.device("meta"):
        backbone, _, _ = build_backbone(config, preset, names)
    return len(backbone.blocks)


def default_candidates(depth: int) -> list[str]:
    """The paper's ablation set for a model of ``depth`` blocks: ``L``, ``L-1,L``, ``1,L``, ``1,L-1,L`` and a
    middle block with the last (``M,L``); duplicates for shallow models are dropped."""
    specs = ["L", "L-1,L", "1,L", "1,L-1,L", f"{max(depth // 2, 1)},L"]
    return [c.spec for c in parse_candidates(specs, depth, drop_duplicates=True)]


def parse_candidates(specs: Sequence[str], depth: int, *, drop_duplicates: bool = False) -> list[Candidate]:
    """Resolve ``specs`` against ``depth``.

    Raises:
        ExploraGeoError: a malformed spec, a block outside ``1..depth``, two specs naming the same blocks, or
            no spec (one line each).
    """
    from explora_geo.adapter import resolve_unfreeze

    if not specs:
        raise ExploraGeoError("no candidates; pass --candidates with unfreeze specs, e.g. L 1,L L-1,L.")
    out: list[Candidate] = []
    seen: dict[tuple[int, ...], str] = {}
    for spec in specs:
        text = str(spec).strip()
        if text.lower() == "auto":
            raise ExploraGeoError("candidate 'auto' is the search itself; pass unfreeze specs such as L or 1,L.")
        try:
            blocks = resolve_unfreeze(text, depth)
        except ExploraGeoError as err:
            raise ExploraGeoError(f"candidate {text!r}: {str(err).replace('--unfreeze ', '')}") from None
        if blocks in seen:
            if drop_duplicates:
                continue
            raise ExploraGeoError(f"duplicate candidates {seen[blocks]!r} and {text!r} (both unfreeze blocks "
                                  f"{_one_based(blocks)} of {depth}); pass each block set once.")
        seen[blocks] = text
        out.append(Candidate(text, blocks))
    return out


def _one_based(blocks: Sequence[int]) -> str:
    return "none" if not blocks else ",".join(str(b + 1) for b in blocks)


def rungs(steps: int, n_candidates: int, eta: int) -> list[int]:
    """Optimiser steps at the end of each rung: ``[b, b*eta, b*eta**2, ..., steps]`` with as many rungs as
    halving needs to reach one candidate (fewer when ``steps`` is too short)."""
    wanted = 1 + max(math.ceil(math.log(max(n_candidates, 1), eta) - 1e-9), 0)
    possible = 1 + int(math.floor(math.log(max(steps, 1), eta) + 1e-9))
    count = max(1, min(wanted, possible))
    first = max(1, steps // eta ** (count - 1))
    bounds = [first * eta**k for k in range(count - 1)] + [steps]
    return sorted(set(b for b in bounds if b <= steps))


# --------------------------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------------------------

class _StopAt(L.Callback):
    """Ends ``fit`` once the optimiser step reaches ``step`` (the rung boundary)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class _KnnScore(L.Callback):
    """kNN top-1 accuracy of the adapted backbone on labelled chips when ``fit`` ends (rank 0)."""

    def __init__(self, labels: str, file_bands: str | None, seed: int) -> None:
        self.labels, self.file_bands, self.seed = labels, file_bands, seed
        self.accuracy: float | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.accuracy = knn_accuracy(pl_module, self.labels, file_bands=self.file_bands, seed=self.seed)


@torch.no_grad()
def knn_accuracy(task: Any, labels: str, *, file_bands: str | None = None, seed: int = 0,
                 batch_size: int = 64) -> float:
    """Validation top-1 of the weighted kNN (``probe``'s) on the cls + mean patch token of ``task.model``.

    The chips are read in the model's band order with the task's normalisation at its input size, split
    (seeded, stratified) into train / validation halves; k is chosen among ``probe``'s values on validation.
    """
    from torch.utils.data import DataLoader

    from explora_geo.downstream.labeled import ChipDataset, scan_chip_folder, stratified_split
    from explora_geo.downstream.probe import extract_features, feature_matrix, knn_select
    from explora_geo.objectives.masking import img_size_of

    model = task.model
    index = scan_chip_folder(labels)
    train_idx, val_idx, _ = stratified_split(index.labels, (0.5, 0.5, 0.0), seed=seed)
    dataset = ChipDataset(index, bands=list(model.band_names), file_bands=file_bands,
                          normalization=task.normalization, img_size=img_size_of(model))
    was_training = model.training
    feats = extract_features(model, DataLoader(dataset, batch_size=batch_size), n_last=1,
                             device=next(model.parameters()).device, progress=False)
    model.train(was_training)
    x = feature_matrix(feats, "cls1+avg")
    _, scores = knn_select(x[train_idx], feats.labels[train_idx], x[val_idx], feats.labels[val_idx],
                           len(index.classes))
    return max(scores.values())


def _trial_config(base: PretrainConfig, candidate: Candidate, settings: SearchSettings, out: Path,
                  val_every: int) -> PretrainConfig:
    return dataclasses.replace(
        base, out=str(out / "trials" / candidate.slug), unfreeze=candidate.spec, max_steps=int(settings.steps),
        holdout=float(settings.holdout), val_samples=int(settings.val_samples), val_every=val_every,
        checkpoint_every=val_every, resume=False, overwrite=True)


def _run_rung(job: dict[str, Any]) -> dict[str, Any]:
    """Train one candidate up to a rung boundary (resuming its previous rung) and score it."""
    config: PretrainConfig = job["config"]
    if job["resume"]:
        config = dataclasses.replace(config, resume=True, overwrite=False)
    callbacks: list[L.Callback] = [_StopAt(job["stop"])]
    knn = None
    if job["labels"]:
        knn = _KnnScore(job["labels"], job["file_bands"], config.seed)
        callbacks.append(knn)
    result = run_pretraining(config, callbacks=callbacks, outputs=False, echo=_quiet)
    assert result is not None
    result["knn_accuracy"] = knn.accuracy if knn is not None else None
    return result


def _quiet(_: str) -> None:
    pass


def _rung_worker(index: int, jobs: list[dict[str, Any]], results: list[str]) -> None:
    """``torch.multiprocessing`` entry: job ``index`` on GPU ``index`` (one CPU process each on CPU); the
    result goes to a JSON file."""
    job = dict(jobs[index])
    cpu = str(job["config"].accelerator) == "cpu"
    job["config"] = dataclasses.replace(job["config"], devices=1 if cpu else [index], strategy="auto")
    write_text_atomic(Path(results[index]), json.dumps(_run_rung(job)))


def _device_workers(config: PretrainConfig, requested: int | None) -> int:
    if requested is not None:
        return max(1, int(requested))
    gpu = config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return torch.cuda.device_count() if gpu and torch.cuda.device_count() > 1 else 1


def _run_jobs(jobs: list[dict[str, Any]], workers: int, scratch: Path) -> list[dict[str, Any]]:
    """Run the rung's jobs: one per device in parallel processes when ``workers > 1``, else in turn."""
    if workers <= 1:
        return [_run_rung(job) for job in jobs]
    import torch.multiprocessing as mp

    results: list[dict[str, Any]] = []
    for start in range(0, len(jobs), workers):
        chunk = jobs[start:start + workers]
        files = [str(scratch / f"result_{start + i}.json") for i in range(len(chunk))]
        mp.start_processes(_rung_worker, args=(chunk, files), nprocs=len(chunk), start_method="spawn")
        results.extend(json.loads(Path(f).read_text()) for f in files)
    return results


# --------------------------------------------------------------------------------------------------------
# Pre-screen
# --------------------------------------------------------------------------------------------------------

def prescreen_scores(config: PretrainConfig, candidates: Sequence[Candidate], *, batches: int = 2,
                     holdout: float = 0.2) -> tuple[list[float], list[float]]:
    """Zero-cost pre-screen (module docstring): ``(per-block |grad|_1, per-candidate score)``.

    The model is built with every block trainable and no LoRA; the SSL loss of ``batches`` training batches
    (the same patches the trials train on first, under the trials' step-0 random state) is back-propagated
    once; nothing is updated.
    """
    from explora_geo.training import ExploraPretrainDataModule, ExploraPretrainTask
    from explora_geo.training.setup import echo_to
    from explora_geo.training.task import _seeded
    from explora_geo.training.trainer import data_settings, task_settings

    depth = model_depth(config)
    settings = {**task_settings(config), "unfreeze": list(range(depth)), "rank": 0}
    with echo_to(_quiet):
        L.seed_everything(config.seed, workers=True, verbose=False)
        task = ExploraPretrainTask(**settings)
        data = ExploraPretrainDataModule(**{**data_settings(config), "holdout": holdout, "val_samples": 1})
        inner = data.build(task.data_spec(), max_steps=batches)
    loader = inner.train_dataloader()
    task.objective.set_max_steps(max(int(config.max_steps), 1))
    task.train()
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        with _seeded(int(config.seed) * 1_000_003 + i * 31, torch.device("cpu")):
            loss = task.objective(batch, 0, max(int(config.max_steps), 1))["loss"]
        (loss / batches).backward()
    per_block = []
    for block in task.model.blocks:
        grads = [p.grad for p in block.parameters() if p.grad is not None]
        per_block.append(float(sum(g.abs().sum() for g in grads)) if grads else 0.0)
    return per_block, [sum(per_block[b] for b in c.blocks) for c in candidates]


def rank_agreement(a: Sequence[float], b: Sequence[float]) -> dict[str, float | None]:
    """Spearman and Kendall rank correlations of two score lists (``None`` for fewer than 3 items)."""
    from torchmetrics.functional import kendall_rank_corrcoef, spearman_corrcoef

    if len(a) < 3:
        return {"spearman": None, "kendall": None}
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return {"spearman": round(float(spearman_corrcoef(x, y)), 4),
            "kendall": round(float(kendall_rank_corrcoef(x, y)), 4)}


# --------------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------------

def select_blocks(config: PretrainConfig, settings: SearchSettings, out: str | Path, *,
                  echo: Any = None) -> dict[str, Any]:
    """Rank unfreeze candidates by successive halving over equal-budget trials (module docstring).

    Args:
        config: the pre-training settings every trial shares (model, weights, objective, rank, data, batch,
            devices, seed, ...); its ``unfreeze``, ``max_steps`` and ``out`` are replaced per trial.
        settings: the search.
        out: folder for the trials (``trials/<candidate>/``: logs), ``search.json`` and ``search.png``.
        echo: progress lines (default: stderr).

    Returns:
        ``{"ranking": [{"unfreeze", "blocks", "score", "score_name", "val_loss", "knn_accuracy", "steps",
        "rung", "prescreen"}, ...] (best first), "best", "rungs", "steps", "eta", "prescreen", "plot", ...}``.

    Raises:
        ExploraGeoError: bad candidates (unknown, duplicate, outside the model's depth), ``steps < 1``, bad
            data; one line each, before any training.
    """
    import sys

    say = echo or (lambda m: print(m, file=sys.stderr, flush=True))
    settings.check()
    depth = model_depth(config)
    specs = list(settings.candidates) if settings.candidates else default_candidates(depth)
    candidates = parse_candidates(specs, depth)
    if settings.labels is not None:
        from explora_geo.downstream.labeled import scan_chip_folder

        scan_chip_folder(settings.labels)  # a bad folder fails now, not after the first rung
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    prescreen: dict[str, Any] | None = None
    if settings.prescreen:
        per_block, scores = prescreen_scores(config, candidates, batches=settings.prescreen_batches,
                                             holdout=settings.holdout)
        prescreen = {"per_block_grad_l1": per_block,
                     "scores": {c.spec: s for c, s in zip(candidates, scores, strict=True)}}
        say("pre-screen (first-order |grad|_1 of the SSL loss per block): "
            + ", ".join(f"{c.spec}={s:.4g}" for c, s in zip(candidates, scores, strict=True)))
        if settings.prescreen_keep is not None and settings.prescreen_keep < len(candidates):
            order = sorted(range(len(candidates)), key=lambda i: -scores[i])[:settings.prescreen_keep]
            prescreen["dropped"] = [candidates[i].spec for i in range(len(candidates)) if i not in order]
            candidates = [candidates[i] for i in sorted(order)]

    bounds = rungs(int(settings.steps), len(candidates), int(settings.eta))
    val_every = math.gcd(*bounds) if len(bounds) > 1 else bounds[0]
    workers = _device_workers(config, settings.workers)
    state = {c.spec: {"candidate": c, "steps": 0, "rung": -1, "val": {}, "knn": {}, "val_loss": None,
                      "knn_accuracy": None} for c in candidates}
    alive = list(candidates)
    for rung, stop in enumerate(bounds):
        say(f"rung {rung + 1}/{len(bounds)}: {len(alive)} candidate(s) train to step {stop} "
            f"({'parallel on ' + str(workers) + ' devices' if workers > 1 else 'one after the other'})")
        jobs = [{"config": _trial_config(config, c, settings, out, val_every), "stop": stop, "resume": rung > 0,
                 "labels": settings.labels, "file_bands": settings.file_bands} for c in alive]
        for c, result in zip(alive, _run_jobs(jobs, workers, out), strict=True):
            entry = state[c.spec]
            entry.update(steps=int(result["steps"]), rung=rung)
            entry["val"].update({int(s): float(v) for s, v in result["val_history"]})
            if not entry["val"] or max(entry["val"]) < entry["steps"]:
                raise ExploraGeoError(f"trial {c.spec!r} has no held-out loss at step {entry['steps']}; raise "
                                      "--val-samples or --holdout.")
            entry["val_loss"] = entry["val"][max(entry["val"])]
            if result.get("knn_accuracy") is not None:
                entry["knn"][entry["steps"]] = entry["knn_accuracy"] = float(result["knn_accuracy"])
            say(f"  {c.spec}: held-out loss {entry['val_loss']:.5f}"
                + (f", kNN top-1 {entry['knn_accuracy']:.3f}" if entry["knn_accuracy"] is not None else "")
                + f" at step {entry['steps']}")
        alive = sorted(alive, key=lambda c: _key(state[c.spec]))
        if rung < len(bounds) - 1:
            alive = alive[:max(1, math.ceil(len(alive) / settings.eta))]

    ranked = sorted(state.values(), key=lambda e: (-e["rung"], _key(e)))
    score_name = "knn_accuracy" if settings.labels else "val_loss"
    ranking = [{"unfreeze": e["candidate"].spec, "blocks": [b + 1 for b in e["candidate"].blocks],
                "score": e[score_name], "score_name": score_name, "val_loss": e["val_loss"],
                "knn_accuracy": e["knn_accuracy"], "steps": e["steps"], "rung": e["rung"] + 1,
                "val_history": [[s, e["val"][s]] for s in sorted(e["val"])]} for e in ranked]
    if prescreen is not None:
        for item in ranking:
            item["prescreen"] = prescreen["scores"][item["unfreeze"]]
        # agreement: pre-screen scores (higher = better) against the trial ranking (position 0 = best)
        trial = [-float(i) for i in range(len(ranking))]
        prescreen["agreement"] = rank_agreement([r["prescreen"] for r in ranking], trial)
    plot = _plot(ranking, out / "search.png", settings.labels is not None)
    for folder in (out / "trials").glob("*/checkpoints"):
        shutil.rmtree(folder, ignore_errors=True)  # trial checkpoints are only needed between rungs
    result = {"ranking": ranking, "best": ranking[0]["unfreeze"], "depth": depth, "rungs": bounds,
              "steps": int(settings.steps), "eta": int(settings.eta), "holdout": float(settings.holdout),
              "val_samples": int(settings.val_samples), "labels": settings.labels, "workers": workers,
              "prescreen": prescreen, "plot": str(plot), "out": str(out)}
    write_text_atomic(out / "search.json", json.dumps(result, indent=2))
    return result


def _key(entry: dict[str, Any]) -> tuple[float, float]:
    knn = entry["knn_accuracy"]
    return (-knn if knn is not None else 0.0, entry["val_loss"] if entry["val_loss"] is not None else math.inf)


def _plot(ranking: list[dict[str, Any]], path: Path, with_knn: bool) -> Path:
    """PNG: held-out loss against step for every candidate (and kNN accuracy at each rung with labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=100)
    for item in ranking:
        steps, values = zip(*item["val_history"], strict=True) if item["val_history"] else ((), ())
        label = f"{item['unfreeze']}" + (f" (kNN {item['knn_accuracy']:.3f})" if with_knn and
                                         item["knn_accuracy"] is not None else "")
        ax.plot(steps, values, marker="o", lw=1.2, label=label)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("held-out SSL loss")
    ax.set_title("select-blocks: score per candidate (best first in the legend)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_paths(path) as (tmp,):
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path


def pretrain_with_search(config: PretrainConfig, settings: SearchSettings | None = None, *,
                         echo: Any = None) -> dict[str, Any] | None:
    """``pretrain --unfreeze auto``: :func:`select_blocks` (in ``out/block_search``), then the full run with the
    winner; ``summary.json`` records the search under ``block_search``.

    ``--resume`` reuses the search already in ``out/block_search``. Default search:
    ``config.search_candidates`` (else :func:`default_candidates`), ``config.search_steps`` steps per
    candidate (else a tenth of ``max_steps``, at least 2), scored on ``config.holdout`` / ``config.val_samples``
    (else 0.2 and 64 patches)."""
    if str(config.unfreeze).strip().lower() != "auto":
        raise ExploraGeoError(f"pretrain_with_search needs unfreeze='auto', got {config.unfreeze!r}.")
    out = Path(config.out)
    if settings is None:
        settings = SearchSettings(steps=config.search_steps or max(2, config.max_steps // 10),
                                  candidates=config.search_candidates, holdout=config.holdout or 0.2,
                                  val_samples=config.val_samples or 64)
    from explora_geo.training.trainer import _resume_path

    _resume_path(config, out)  # refuse an --out that holds a run before searching
    previous = out / "block_search" / "search.json"
    if config.resume and previous.is_file():  # a resumed run keeps the blocks its search chose
        search = json.loads(previous.read_text())
    else:
        search = select_blocks(dataclasses.replace(config, unfreeze="L"), settings, out / "block_search",
                               echo=echo)
    final = dataclasses.replace(config, unfreeze=search["best"])
    return run_pretraining(final, echo=echo, summary_extra={"block_search": search})

