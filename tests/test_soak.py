"""A short soak run (#14) on every change: one sandbox device through a random
sequence of updates (good and broken, app-only and host OS), refused revisions,
rollbacks, restarts, reboots and power cuts at random instants, the model of
tests/soak/model.py checked after every step. `tools/soak --steps N` runs it long.

Deselect with ``-m 'not soak'``. A failure prints the seed, the steps and the
device's logs; ``tools/soak --seed S --steps N`` replays the same step list.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.device import need_root_tools
from tests.soak.driver import Soak

pytestmark = [pytest.mark.root, pytest.mark.soak]

FIXED_SEED = 14


@pytest.mark.parametrize(
    ("seed", "steps"),
    [(FIXED_SEED, 30), (random.SystemRandom().randrange(1 << 32), 12)],
    ids=["fixed-seed", "random-seed"],
)
def test_soak(tmp_path: Path, demo_trees: Path, seed: int, steps: int) -> None:
    need_root_tools()
    counts = Soak(tmp_path, seed, say=lambda line: print(line, flush=True)).run(steps)
    assert counts["steps"] == steps
    # (the summary line, with the seed, is in the captured output: pytest -s shows it)
