"""torch deprecates creating quantized tensors (``quantize_per_tensor``/``_per_channel``, dtype quint8/qint8), which
fxforge's int8 reference graph and the fbgemm/qnnpack kernels are built on (docs/limitations.md). The warning is
torch's business with fxforge, not the user's: fxforge's own calls that create such tensors run inside
``quantized_tensors_quietly()``, which ignores that one message there and nowhere else. (torch issues it once per
process, at the first quantized tensor: the first of fxforge's calls consumes it.)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

MESSAGE = "torch.quantize_per_tensor, torch.quantize_per_channel"  # the start of torch's deprecation message


@contextlib.contextmanager
def quantized_tensors_quietly() -> Iterator[None]:
    """Within the block, torch's deprecation warning for creating quantized tensors is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=MESSAGE, category=UserWarning)
        yield
