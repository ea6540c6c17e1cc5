"""Streaming a prepared store: ``StoreDataModule`` batches, ``pretrain --data STORE`` (normalisation from the
store's statistics, exact resume), two gloo processes, and many files under a low open-file limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_data_store import REPO, read_t33uuu, stream_raw, write_crop
from test_training import StopAt, quiet, tiny_config

from explora_geo.data.catalog import build_catalog
from explora_geo.data.prepare import prepare_store
from explora_geo.data.stats import normalization_from_stats
from explora_geo.data.streaming import StoreDataModule
from explora_geo.errors import ExploraGeoError
from explora_geo.normalization import Normalization
from explora_geo.training import run_pretraining

BANDS = ["B02", "B03", "B04", "B08"]


@pytest.fixture(scope="module")
def store(t33uuu_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 patches of 32 px from two real T33UUU crops (4 bands, uint16)."""
    pixels, transform, crs = read_t33uuu(t33uuu_dir)
    root = tmp_path_factory.mktemp("stream")
    data = root / "data"
    data.mkdir()
    write_crop(data / "a.tif", pixels, transform, crs, 0, 0, 256)
    write_crop(data / "b.tif", pixels, transform, crs, 400, 900, 192)
    prepare_store(build_catalog(data, bands=BANDS), root / "store", patches=96, patch_size=32, workers=2,
                  progress=False)
    return root / "store"


def test_batches_follow_the_pretraining_contract(store: Path) -> None:
    raw = {s["patch_id"]: s for s in stream_raw(store)}
    norm = Normalization("meanstd", ("B08", "B02"), mean=(2000.0, 1000.0), std=(500.0, 250.0))
    dm = StoreDataModule(store, bands=["B08", "B02"], batch_size=10, normalization=norm, patch_size=32, seed=1)
    assert "96 patches of 32 px" in dm.describe()
    files = dm.meta["files"]
    seen = []
    for batch in dm.train_dataloader():
        assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (2, 32, 32)
        assert batch["valid_mask"].dtype == torch.bool and batch["valid_mask"].shape[1:] == (32, 32)
        assert batch["rejected"].eq(0).all() and batch["index"].shape[1] == 2
        for k, (_, pid) in enumerate(batch["index"].tolist()):
            sample = raw[pid]
            expected = (sample["image"][[3, 0]].astype(np.float32) - np.array([2000, 1000], np.float32)[:, None, None]
                        ) / np.array([500, 250], np.float32)[:, None, None]
            valid = sample["valid_mask"]
            np.testing.assert_allclose(batch["image"][k].numpy()[:, valid], expected[:, valid], rtol=1e-5)
            assert files[int(batch["source"][k])] == sample["source"]
            seen.append(pid)
    assert sorted(seen) == sorted(raw)  # one epoch = the whole store, each patch once
    assert seen != sorted(seen)  # shuffled


def test_store_band_and_patch_size_mismatches_name_both_sides(store: Path) -> None:
    with pytest.raises(ExploraGeoError, match="holds bands B02,B03,B04,B08 but the model needs B04,B11 \\(B11 "
                                              "missing\\)"):
        StoreDataModule(store, bands=["B04", "B11"], batch_size=4)
    with pytest.raises(ExploraGeoError, match="holds 32 px patches but the model takes 96 px; pass --img-size 32"):
        StoreDataModule(store, bands=BANDS, batch_size=4, patch_size=96)


def store_config(store: Path, out: Path, **overrides: Any) -> Any:
    return tiny_config(store, out, bands=",".join(BANDS), **overrides)


def test_pretrain_from_a_store_uses_its_statistics_and_resumes_exactly(store: Path, tmp_path: Path) -> None:
    kwargs = {"max_steps": 16, "checkpoint_every": 2, "batch_size": 8, "workers": 2}  # 12 batches per epoch
    full = run_pretraining(store_config(store, tmp_path / "full", **kwargs), echo=quiet)
    assert full is not None and full["steps"] == 16
    sidecar = json.loads((tmp_path / "full" / "backbone.json").read_text())
    expected = normalization_from_stats(json.loads((store / "stats.json").read_text()), "satmae", bands=BANDS)
    assert sidecar["normalization"] == expected.to_dict()  # no --stats: the store's own statistics
    part = tmp_path / "part"
    run_pretraining(store_config(store, part, **kwargs), callbacks=[StopAt(13)], echo=quiet)  # into epoch 2
    ckpt = torch.load(part / "checkpoints" / "last.ckpt", weights_only=False)
    assert 12 <= ckpt["global_step"] < 16
    resumed = run_pretraining(store_config(store, part, resume=True, **kwargs), echo=quiet)
    assert resumed is not None and [s for s, _ in resumed["loss_history"]] == list(range(16))
    assert torch.allclose(torch.tensor(resumed["loss_history"]), torch.tensor(full["loss_history"]), atol=1e-6)
    with pytest.raises(ExploraGeoError, match="model needs B02,B03,B04,B08,B11"):
        run_pretraining(tiny_config(store, tmp_path / "bad", bands="B02,B03,B04,B08,B11"), echo=quiet)


DDP_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from explora_geo.data.streaming import StoreDataModule

dist.init_process_group("gloo")
dm = StoreDataModule(sys.argv[1], bands=["B02"], batch_size=4, num_workers=1, seed=0)
ids = [int(pid) for batch in dm.train_dataloader() for pid in batch["index"][:, 1]]
with open(os.path.join(sys.argv[2], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(ids, f)
dist.destroy_process_group()
"""


def test_two_gloo_processes_stream_disjoint_samples(store: Path, tmp_path: Path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517",
           "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(script), str(store), str(tmp_path)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    ranks = [set(json.loads((tmp_path / f"rank{r}.json").read_text())) for r in range(2)]
    assert ranks[0] and ranks[1] and not ranks[0] & ranks[1]
    assert len(ranks[0]) == len(ranks[1])  # ranks stay in step
    assert len(ranks[0] | ranks[1]) >= 96 - 2 * 4 * 2  # at most a batch per rank and worker left out


LIMIT_SCRIPT = """
import resource, sys
from pathlib import Path
# soft AND hard: LitData's loader raises the soft limit up to the hard one by itself
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
sys.path.insert(0, sys.argv[3])
from explora_geo.data.catalog import build_catalog
from explora_geo.data.prepare import prepare_store
from explora_geo.data.streaming import StoreDataModule

if __name__ == "__main__":
    summary = prepare_store(build_catalog(sys.argv[1], bands=["B02", "B08"]), sys.argv[2], patches=128,
                            patch_size=32, workers=2, progress=False)
    assert summary["patches_unreadable"] == 0 and not summary["files_skipped"], summary
    dm = StoreDataModule(sys.argv[2], bands=["B08", "B02"], batch_size=16, num_workers=2)
    sources = {int(s) for batch in dm.train_dataloader() for s in batch["source"]}
    print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], summary["patches_written"], len(sources))
"""


def test_64_files_under_a_limit_of_128_open_files(t33uuu_dir: Path, tmp_path: Path) -> None:
    pixels, transform, crs = read_t33uuu(t33uuu_dir)
    data = tmp_path / "data"
    data.mkdir()
    for k in range(64):
        write_crop(data / f"tile_{k:02d}.tif", pixels, transform, crs, (k // 16) * 96, (k % 16) * 96, 96)
    script = tmp_path / "limit.py"
    script.write_text(textwrap.dedent(LIMIT_SCRIPT))
    done = subprocess.run([sys.executable, str(script), str(data), str(tmp_path / "store"), str(REPO)],
                          capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    limit, written, sources = (int(v) for v in done.stdout.split()[-3:])
    assert limit == 128 and written == 128 and sources > 40  # most of the 64 files were read (55 expected)
