import pytest
import torch

torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_quantized_engine():
    """Some tests select a process-wide quantized engine on purpose; the next test starts from the same one."""
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine
