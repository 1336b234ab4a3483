"""bench_aoti's table: one row per model, speed-ups as fxforge / aoti, and the verdict line names the models where
the package is faster (the timing itself runs in the script, not in CI: an AOTInductor compile takes minutes)."""


def row(model: str, fxforge_ms: float, aoti_ms: float) -> dict:
    return {"model": model, "ms": {"fxforge": fxforge_ms, "pt2": fxforge_ms * 1.2, "aoti": aoti_ms},
            "errors": {"fxforge": 1e-6, "pt2": 1e-6, "aoti": 2e-6},
            "builds": {"compile": 1.0, "export": 0.5, "aoti compile": 60.0}}


def test_render_says_where_aoti_is_faster(bench_aoti):
    text = bench_aoti.render([row("resnet18", 10.0, 8.0), row("mobilenet_v2", 4.0, 5.0)], ["- machine: test"], 1)
    lines = text.splitlines()
    assert "batch 1" in lines[0] and "- machine: test" in lines
    assert any(line.startswith("| resnet18 | 10.00 | 12.00 | 8.00 | 1.25x |") for line in lines)
    assert any(line.startswith("| mobilenet_v2 | 4.00 | 4.80 | 5.00 | 0.80x |") for line in lines)
    assert "faster than the FX runtime on: resnet18 (geometric-mean speed-up 1.00x" in text
