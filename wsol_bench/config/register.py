"""Put the schemas in Hydra's ConfigStore under the names the YAML files list in their defaults
(`- /schema_bench@_here_` in conf/config.yaml, `- /schema_dataset_voc@_here_` in
conf/dataset/voc.yaml, ...). Hydra then refuses a wrong type or an unknown key at compose time.
They are stored at the root of the store, outside any config group, so `--help` lists only the
groups a user selects from."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from wsol_bench.registry import Registry

from .bench import BenchConfig
from .datasets import DATASET_SCHEMAS
from .groups import (
    CheferPerturbationConfig,
    FaithfulnessConfig,
    MeasureConfig,
    MethodConfig,
    RoadConfig,
    SacoConfig,
    SegmentationConfig,
    SweepConfig,
)
from .trainer import TrainerConfig

SCHEMAS: Registry[type] = Registry("schema")
SCHEMAS.update({
    "schema_bench": BenchConfig,
    "schema_trainer": TrainerConfig,
    **{f"schema_dataset_{name}": schema for name, schema in DATASET_SCHEMAS.items()
       if name != "synthetic_two_class"},  # it shares synthetic's
    "schema_method": MethodConfig,
    "schema_measure": MeasureConfig,
    "schema_faithfulness": FaithfulnessConfig,
    "schema_faithfulness_chefer_perturbation": CheferPerturbationConfig,
    "schema_faithfulness_road": RoadConfig,
    "schema_faithfulness_saco": SacoConfig,
    "schema_sweep": SweepConfig,
    "schema_segmentation": SegmentationConfig,
})


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent: storing again replaces)."""
    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        store.store(name=name, node=node, provider="wsol_bench")
