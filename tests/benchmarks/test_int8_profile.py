"""benchmarks/int8_profile.py: both peers profiled on the same input, one table of ops per forward."""


import pytest
import torch


@pytest.mark.skipif("x86" not in torch.backends.quantized.supported_engines, reason="needs the x86 engine")
def test_profiles_both_peers_op_by_op(int8_profile, capsys):
    times = int8_profile.main(["resnet18", "--image-size", "32", "--forwards", "2", "--calibration-batches", "1",
                               "--rows", "5"])
    assert set(times) == {"ao_x86", "fx_x86"}
    # resnet18's 20 convs run as int8 kernels in both peers (fxforge fuses the residual adds into 8 of them)
    ao_convs = sum(calls for op, (_, calls) in times["ao_x86"].items() if op.startswith("quantized::conv2d"))
    fx_convs = sum(calls for op, (_, calls) in times["fx_x86"].items() if op.startswith("quantized::conv2d"))
    assert ao_convs == fx_convs == 20
    table = capsys.readouterr().out.splitlines()
    assert table[1] == "| op | ao_x86 | fx_x86 | fx_x86 - ao_x86 |" and len(table) == 3 + 5 + 1
