"""The Dagster code location: assembled from the trueup config file, nothing hard-coded.

The config path comes from ``$TRUEUP_CONFIG``, else ``./trueup.yaml``, else the example shop's
``examples/trueup.yaml`` (so ``dagster dev -w workspace.yaml`` works in a fresh checkout).
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from assets.dead_letters import dead_letter_definitions
from assets.differences import reconciliation_definitions
from assets.external import external_assets
from assets.freshness import freshness_definitions
from assets.keys import check_distinct
from assets.lineage import mirror_assets, with_dead_letter_lineage
from assets.repairs import repair_definitions
from checks.gx import quality_definitions
from trueup import tracing
from trueup.config import CONFIG_ENV, DEFAULT_CONFIG, load_config

EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "trueup.yaml"


def _config_path() -> str:
    if os.environ.get(CONFIG_ENV):
        return os.environ[CONFIG_ENV]
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else str(EXAMPLE_CONFIG)


# every process that loads the code location (code server, each run's process) exports its
# diffs', backfills' and replays' spans when $TRUEUP_TRACES_EXPORTER asks
tracing.configure_from_env()
config = load_config(_config_path())
check_distinct(config)  # every builder below may take an asset key for the thing it names
reconciliations = reconciliation_definitions(config)
dead_letters = dead_letter_definitions(config)
quality = quality_definitions(config)
repairs = repair_definitions(config, quality.tables)
freshness = freshness_definitions(config)

defs = dg.Definitions(
    assets=[*with_dead_letter_lineage(external_assets(config), config), *mirror_assets(config),
            *(r.asset for r in reconciliations), *dead_letters.assets, *repairs.assets],
    asset_checks=[*quality.checks, *freshness.checks],
    jobs=[*(r.job for r in reconciliations), *dead_letters.jobs, *repairs.jobs, *quality.jobs,
          *freshness.jobs],
    schedules=[s for r in reconciliations for s in r.schedules],
    sensors=[*dead_letters.sensors, *repairs.sensors, *freshness.sensors],
    # every job is one step: a step process of its own would load this module a second time
    executor=dg.in_process_executor,
)
