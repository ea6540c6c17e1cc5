"""``select-blocks`` / ``pretrain --unfreeze auto``: successive halving over equal-budget ExPLoRA trials on the
real T33UUU scene (tiny plain ViT on B04,B03,B02, CPU, few steps)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from explora_geo.block_selection import SearchSettings, default_candidates, parse_candidates, rungs, select_blocks
from explora_geo.cli import main
from explora_geo.errors import ExploraGeoError
from explora_geo.training import PretrainConfig

TINY = dict(embed_dim=32, depth=4, num_heads=2)


def tiny(data: Path, out: Path, **overrides: Any) -> PretrainConfig:
    settings: dict[str, Any] = dict(
        out=str(out), data=str(data), bands="B04,B03,B02", model="vit_tiny_patch16_224", model_kwargs=TINY,
        patch_size=8, img_size=32, weights="random", objective="mae", rank=4, batch_size=8, lr=2e-3,
        warmup_steps=2, accelerator="cpu", seed=0, mae=dict(decoder_dim=32, decoder_depth=1, decoder_heads=2))
    settings.update(overrides)
    return PretrainConfig.from_dict(settings)


def quiet(_: str) -> None:
    pass


def cli_args(data: Path, out: Path) -> list[str]:
    return ["select-blocks", "--data", str(data), "--bands", "B04,B03,B02", "--model", "vit_tiny_patch16_224",
            "--img-size", "32", "--patch-size", "8", "--weights", "random", "--batch-size", "8", "--lr", "2e-3",
            "--accelerator", "cpu", "--out", str(out)]


def test_rungs_and_default_candidates() -> None:
    assert rungs(8, 3, 2) == [2, 4, 8]  # 3 candidates: 3 -> 2 -> 1
    assert rungs(8, 5, 2) == [1, 2, 4, 8]
    assert rungs(3, 5, 2) == [1, 3]  # too short for more rungs
    assert rungs(5, 1, 2) == [5]
    assert default_candidates(24) == ["L", "L-1,L", "1,L", "1,L-1,L", "12,L"]
    assert default_candidates(2) == ["L", "L-1,L"]  # 1,L = L-1,L = 1,L-1,L on two blocks
    assert [c.blocks for c in parse_candidates(["L", "1,L", "none"], 12)] == [(11,), (0, 11), ()]


@pytest.mark.slow
def test_ranking_is_deterministic_and_a_candidate_that_cannot_learn_is_last(t33uuu_dir: Path,
                                                                             tmp_path: Path) -> None:
    """Rank 0: 'none' trains only norms and the cls token; it is ranked last, and two searches with the same
    seed give the same ranking and the same scores."""
    settings = SearchSettings(candidates=["none", "L", "1,L"], steps=8, val_samples=16)
    first = select_blocks(tiny(t33uuu_dir, tmp_path / "a", rank=0), settings, tmp_path / "a", echo=quiet)
    again = select_blocks(tiny(t33uuu_dir, tmp_path / "b", rank=0), settings, tmp_path / "b", echo=quiet)
    order = [r["unfreeze"] for r in first["ranking"]]
    assert order[-1] == "none" and first["best"] == order[0] and set(order) == {"none", "L", "1,L"}
    assert [(r["unfreeze"], r["score"], r["steps"]) for r in first["ranking"]] == \
        [(r["unfreeze"], r["score"], r["steps"]) for r in again["ranking"]]
    assert first["rungs"] == [2, 4, 8] and first["ranking"][0]["steps"] == 8 and first["ranking"][-1]["steps"] == 2
    best = first["ranking"][0]
    assert [s for s, _ in best["val_history"]] == [2, 4, 6, 8] and best["score"] == best["val_history"][-1][1]
    assert (tmp_path / "a" / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "a" / "search.json").read_text())["best"] == first["best"]
    assert not list((tmp_path / "a" / "trials").glob("*/checkpoints"))  # removed after the search


@pytest.mark.slow
def test_cli_prints_one_json_line_with_knn_and_prescreen(t33uuu_dir: Path, eurosat_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "search"
    rc = main([*cli_args(t33uuu_dir, out), "--candidates", "L", "1,L", "none", "--steps", "4", "--rank", "2",
               "--val-samples", "8", "--labels", str(eurosat_dir), "--file-bands", "eurosat", "--prescreen"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    ranking = result["ranking"]
    assert result["best"] == ranking[0]["unfreeze"] and len(ranking) == 3
    assert all(r["score_name"] == "knn_accuracy" and 0.0 <= r["score"] <= 1.0 for r in ranking)
    keys = [(-r["rung"], -r["knn_accuracy"], r["val_loss"]) for r in ranking]
    assert keys == sorted(keys)  # best first: furthest rung, then kNN accuracy, then held-out loss
    scores = result["prescreen"]["scores"]
    assert scores["none"] == 0.0 and scores["1,L"] > scores["L"] > 0.0
    assert set(result["prescreen"]["agreement"]) == {"spearman", "kendall"}
    assert Path(result["plot"]).is_file()


@pytest.mark.parametrize(("extra", "message"), [
    (["--steps", "0", "--candidates", "L"], "--steps 0 must be >= 1"),
    (["--steps", "2", "--candidates", "L", "5"], "candidate '5'.*depth 4"),
    (["--steps", "2", "--candidates", "L", "4"], "duplicate candidates 'L' and '4'"),
    (["--steps", "2", "--candidates", "L", "last"], "candidate 'last'.*malformed"),
    (["--steps", "2", "--candidates", "auto"], "candidate 'auto'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(t33uuu_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str], extra: list[str],
                                                          message: str) -> None:
    import re

    out = tmp_path / "search"
    args = cli_args(t33uuu_dir, out)
    args[args.index("vit_tiny_patch16_224")] = "vit_tiny_patch16_224"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(json.dumps({"model_kwargs": TINY}))
    assert main([*args, "--config", str(cfg), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()


def test_unknown_candidate_is_caught_before_any_training() -> None:
    with pytest.raises(ExploraGeoError, match="duplicate"):
        parse_candidates(["1,L", "[1, L]"], 12)


@pytest.mark.slow
def test_pretrain_unfreeze_auto_searches_then_trains_the_winner(t33uuu_dir: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(json.dumps({"model_kwargs": TINY, "search_candidates": ["L", "1,L"], "holdout": 0.25,
                               "val_samples": 8}))
    out = tmp_path / "run"
    rc = main(["pretrain", "--config", str(cfg), "--data", str(t33uuu_dir), "--bands", "B04,B03,B02",
               "--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8", "--weights", "random",
               "--batch-size", "8", "--lr", "2e-3", "--accelerator", "cpu", "--unfreeze", "auto",
               "--max-steps", "3", "--search-steps", "2", "--rank", "2", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    search = summary["block_search"]
    assert [r["unfreeze"] for r in search["ranking"]][0] == search["best"]
    assert summary["config"]["unfreeze"] == search["best"] and summary["steps"] == 3
    assert json.loads((out / "backbone.json").read_text())["explora"]["unfreeze"] == search["best"]
    assert (out / "block_search" / "search.png").is_file()
    assert search["holdout"] == 0.25 and search["val_samples"] == 8  # the run's held-out split scores the search
    # --resume keeps the blocks the search chose (no new search: search.json untouched)
    stamp = (out / "block_search" / "search.json").stat().st_mtime_ns
    assert main(["pretrain", "--config", str(cfg), "--data", str(t33uuu_dir), "--bands", "B04,B03,B02",
                 "--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8", "--weights", "random",
                 "--batch-size", "8", "--lr", "2e-3", "--accelerator", "cpu", "--unfreeze", "auto",
                 "--max-steps", "4", "--search-steps", "2", "--rank", "2", "--out", str(out), "--resume"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["steps"] == 4 and again["block_search"]["best"] == search["best"]
    assert (out / "block_search" / "search.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_parallel_trial_processes_give_the_sequential_ranking(t33uuu_dir: Path, tmp_path: Path) -> None:
    """The one-trial-per-device path (torch.multiprocessing processes; here two CPU processes standing in for
    two GPUs) gives the same ranking and scores as trials run one after the other."""
    settings = SearchSettings(candidates=["L", "1,L"], steps=2, val_samples=8)
    serial = select_blocks(tiny(t33uuu_dir, tmp_path / "s"), settings, tmp_path / "s", echo=quiet)
    parallel = select_blocks(tiny(t33uuu_dir, tmp_path / "p"), dataclasses.replace(settings, workers=2),
                             tmp_path / "p", echo=quiet)
    assert parallel["workers"] == 2 and serial["workers"] == 1
    assert [(r["unfreeze"], r["score"]) for r in parallel["ranking"]] == \
        [(r["unfreeze"], r["score"]) for r in serial["ranking"]]
