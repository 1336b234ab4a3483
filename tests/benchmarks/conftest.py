"""The benchmark scripts build torchvision models at import: without torchvision (the oldest-torch CI venv, where
no torchvision build pairs with the CPU torch served there) their tests are skipped, saying why."""

import pytest


@pytest.fixture(autouse=True)
def _needs_torchvision() -> None:
    pytest.importorskip("torchvision", reason="the benchmark scripts import torchvision")
