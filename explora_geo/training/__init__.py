"""ExPLoRA pre-training with Lightning, as a torchgeo task, from a config to its outputs.

Modules, each importing only those listed before it:

- :mod:`~explora_geo.training.config`: :class:`PretrainConfig`, every setting of an ``explora-geo pretrain``
  run (the CLI flags and YAML keys map onto its fields), and what follows from it alone (world size, precision).
- :mod:`~explora_geo.training.setup`: builders of the run's pieces (backbone, objective, normalisation) and
  the one-line notices.
- :mod:`~explora_geo.training.task`: :class:`ExploraPretrainTask`, the torchgeo ``BaseTask`` (backbone +
  adapter, objective, AdamW with warm-up + cosine lr, per-step random state, loss history, held-out loss).
- :mod:`~explora_geo.training.datamodule`: :class:`ExploraPretrainDataModule`, the YAML-friendly data module
  (bands, patch size and normalisation come from the task).
- :mod:`~explora_geo.training.outputs`: :class:`PretrainOutputs`, the callback writing the files a finished
  run leaves.
- :mod:`~explora_geo.training.trainer`: :func:`build_trainer` and :func:`run_pretraining` (a config -> the
  same task, data module and a Trainer).
"""

from explora_geo.training.config import PretrainConfig
from explora_geo.training.datamodule import ExploraPretrainDataModule
from explora_geo.training.outputs import PretrainOutputs, write_outputs
from explora_geo.training.setup import build_objective
from explora_geo.training.task import (
    ExploraPretrainTask,
    NonFiniteLossError,
    rng_states,
    set_rng_states,
    warmup_cosine,
)
from explora_geo.training.trainer import build_trainer, run_pretraining

__all__ = ["ExploraPretrainDataModule", "ExploraPretrainTask", "NonFiniteLossError", "PretrainConfig",
           "PretrainOutputs", "build_objective", "build_trainer", "rng_states", "run_pretraining",
           "set_rng_states", "warmup_cosine", "write_outputs"]
