"""benchmarks/scan.py runs and reports every figure README's data page quotes (speed is measured there, not here)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import scan  # noqa: E402


def test_the_scan_benchmark_reports_headers_and_full_decodes(tmp_path):
    report = scan.main(["--pngs", "12", "--jpegs", "8", "--out", str(tmp_path / "scan.json")])
    for name in ("png_128px", "jpeg_500px"):
        figures = report[name]
        assert figures["images"] > 0
        assert all(figures[k] > 0 for k in ("headers_only", "full_1_thread", "full_all_threads"))
    assert (tmp_path / "scan.json").is_file()
