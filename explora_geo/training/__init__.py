"""ExPLoRA pre-training with Lightning, from a config to its outputs.

Modules, each importing only those above it:

- :mod:`~explora_geo.training.config`: :class:`PretrainConfig`, every setting of a run (the CLI flags and the
  YAML keys map onto its fields), and what follows from it alone (world size, precision).
- :mod:`~explora_geo.training.module`: :class:`ExploraPretrainModule`, the LightningModule (objective, AdamW
  with warm-up + cosine lr and the objective's weight-decay schedule, loss history, per-step random state).
- :mod:`~explora_geo.training.setup`: :func:`prepare_run`, the adapted backbone with its source weights, the
  objective, the data module and the learning rate for a config.
- :mod:`~explora_geo.training.outputs`: :func:`write_outputs`, the files a finished run leaves.
- :mod:`~explora_geo.training.trainer`: :func:`build_trainer` and :func:`run_pretraining`.
"""

from explora_geo.training.config import PretrainConfig
from explora_geo.training.module import (
    ExploraPretrainModule,
    NonFiniteLossError,
    rng_states,
    set_rng_states,
    warmup_cosine,
)
from explora_geo.training.outputs import write_outputs
from explora_geo.training.setup import Run, build_objective, prepare_run
from explora_geo.training.trainer import build_trainer, run_pretraining

__all__ = [
    "ExploraPretrainModule",
    "NonFiniteLossError",
    "PretrainConfig",
    "Run",
    "build_objective",
    "build_trainer",
    "prepare_run",
    "rng_states",
    "run_pretraining",
    "set_rng_states",
    "warmup_cosine",
    "write_outputs",
]
