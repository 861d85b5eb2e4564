"""tools/scaling.py --quick on 1 and 2 CPU ranks: the JSON it prints and writes, and its plots."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_grid_writes_json_and_plots(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "scaling.py"), "--out", str(tmp_path), "--quick",
                          "--ranks", "1,2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    printed = json.loads(res.stdout)
    assert printed == json.loads((tmp_path / "scaling.json").read_text())
    points = printed["points"]
    assert {(p["layout"], p["ranks"]) for p in points} == {("dp", 1), ("dp", 2)}
    for p in points:
        assert p["kind"] == "measured" and p["tokens_per_s"] > 0
        assert len(p["peak_mib"]) == len(p["estimate_mib"]) == p["ranks"]
        assert all(m > 0 for m in p["peak_mib"])
    dp2 = next(p for p in points if p["layout"] == "dp" and p["ranks"] == 2)
    assert dp2["tokens_per_step"] == 2 * 128  # weak scaling: one row per DP rank
    proj = printed["projection"]
    assert proj["kind"] == "projection" and proj["ranks"] == 64 and proj["tokens_per_s"] > 0
    for name in ("throughput.png", "memory.png"):
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
