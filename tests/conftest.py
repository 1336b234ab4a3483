import os

import pytest
import torch
from hypothesis import settings

torch.manual_seed(0)

# Property tests draw the same examples on every run (derandomized): a CI run must not fail on a graph nobody
# has seen. ``make fuzz`` picks the "fuzz" profile (FXFORGE_HYPOTHESIS_PROFILE=fuzz): new random examples every
# run, with hypothesis' example database, so that a failure found there replays until it is fixed.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("fuzz", derandomize=False)
settings.load_profile(os.environ.get("FXFORGE_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _restore_quantized_engine():
    """Some tests select a process-wide quantized engine on purpose; the next test starts from the same one."""
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine
