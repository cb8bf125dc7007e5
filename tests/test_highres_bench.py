"""benchmarks/highres.py runs and writes its rows (a smoke run; timings here are not results)."""

import json

from benchmarks.highres import main


def test_highres_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "highres.json"
    assert main(["--sizes", "64", "--batches", "1", "--window", "0.01", "--rounds", "2", "--variants", "fused,plain",
                 "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["size"], r["batch"]) for r in rows] == [("fused", 64, 1), ("plain", 64, 1)]
    for r in rows:
        assert r["median_s"] > 0 and r["peak_bytes"] >= 0
        assert r["map_shapes"] == [[1, 128, 4, 4], [1, 224, 2, 2], [1, 320, 1, 1]]
    assert "img/s" in capsys.readouterr().out
