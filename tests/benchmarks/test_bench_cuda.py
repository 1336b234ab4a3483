"""benchmarks/bench_cuda.py runs on a GPU machine; its dry run checks the script's logic here: every peer built
and measured on the CPU (torch.compile skipped), the tables rendered and written between the markers."""


import pytest


def test_dry_run_measures_every_peer_and_writes_its_block(bench_cuda, tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    out.write_text("# results\n\nnotes kept\n")
    summary = tmp_path / "short.md"
    rows = bench_cuda.main(["--dry-run", "--models", "resnet18", "--batch-sizes", "1,2", "--image-size", "32",
                            "--warmup", "0", "--repeats", "1", "--out", str(out), "--summary", str(summary)])
    cells = {(r.batch_size, peer): cell for r in rows for peer, cell in r.cells.items()}
    assert len(cells) == 2 * len(bench_cuda.PEERS)
    for (_, peer), cell in cells.items():
        if peer.startswith("compile_"):
            assert cell.error == "skipped (dry run)"
        else:
            assert cell.error is None and cell.ms > 0 and cell.build_s >= 0
    assert cells[1, "fx_cuda"].sqnr_db >= 40 and cells[1, "fx_bf16"].sqnr_db < cells[1, "fx_cuda"].sqnr_db
    text = out.read_text()
    assert text.startswith("# results\n\nnotes kept\n") and text.count(bench_cuda.BEGIN) == 1
    block = text.split(bench_cuda.BEGIN)[1].split(bench_cuda.END)[0]
    assert "| resnet18 | 2 |" in block and "### SQNR vs eager fp32" in block
    short = summary.read_text().splitlines()
    assert short[0].startswith("| model | bs | compile r-o fp16 ms | fxforge cuda ms") and len(short) == 4
    assert capsys.readouterr().out.rstrip().endswith(short[-1])  # the short table is printed last


def test_without_a_gpu_the_real_run_refuses_with_a_hint(bench_cuda):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        bench_cuda.parse_args([])


def test_unknown_peers_are_rejected(bench_cuda):
    with pytest.raises(SystemExit):
        bench_cuda.parse_args(["--dry-run", "--peers", "eager_fp32,tensorrt"])
