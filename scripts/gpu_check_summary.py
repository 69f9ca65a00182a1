"""Print gpu_check.sh's one summary table from the files its steps wrote into the output folder.

Reads ``cuda_tests.xml`` (pytest's JUnit report), ``kernels.json`` (scripts/bench_attention_stats.py --json) and
``long_video.jsonl`` (scripts/bench_long_video.py --json); a missing file is a row saying which step did not
write it, so a timed-out or failed step shows up in the table instead of vanishing.

    python scripts/gpu_check_summary.py gpu_check_out
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def test_rows(folder: Path) -> list[tuple[str, str, str, str, str]]:
    path = folder / "cuda_tests.xml"
    if not path.is_file():
        return [("cuda tests", "-", "-", "-", f"not run ({path.name} missing)")]
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = int(suite.get("tests", 0))
    bad = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    status = "FAIL" if bad else ("skipped (no GPU)" if skipped == n else "ok")
    return [("cuda tests", "-", f"{n - bad - skipped} passed", f"{bad} failed, {skipped} skipped", status)]


def kernel_rows(folder: Path, cpu_mode: bool) -> list[tuple[str, str, str, str, str]]:
    path = folder / "kernels.json"
    if not path.is_file():
        return [("kernels", "-", "-", "-", "skipped (no GPU)" if cpu_mode else f"not run ({path.name} missing)")]
    out = []
    for r in json.loads(path.read_text()):
        if "median_s" in r:
            out.append((f"kernels: {r['method']}", str(r["L"]), f"{r['median_s']:.4g} s", f"{r['peak_mib']:.0f} MiB", "ok"))
        else:
            note = f"skipped: {r['skipped']}" if "skipped" in r else f"ERROR: {r.get('error')}"
            out.append((f"kernels: {r['method']}", str(r["L"]), "-", "-", note[:80]))
    return out


def long_video_rows(folder: Path) -> list[tuple[str, str, str, str, str]]:
    path = folder / "long_video.jsonl"
    if not path.is_file():
        return [("long video", "-", "-", "-", f"not run ({path.name} missing)")]
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "time_s" in r:
            out.append((f"long video: {r['cell']}", str(r["L"]), f"{r['time_s']:.4g} s", f"{r['peak_mib']:.0f} MiB", "ok"))
        else:
            note = f"skipped: {r['skipped']}" if "skipped" in r else f"ERROR: {r.get('error')}"
            out.append((f"long video: {r['cell']}", str(r.get("L")), "-", "-", note[:80]))
    return out


def main(argv: list[str]) -> int:
    cpu_mode = "--cpu-mode" in argv
    args = [a for a in argv if a != "--cpu-mode"]
    if len(args) != 1:
        print("usage: gpu_check_summary.py OUTPUT_FOLDER [--cpu-mode]", file=sys.stderr)
        return 2
    folder = Path(args[0])
    rows = test_rows(folder) + kernel_rows(folder, cpu_mode) + long_video_rows(folder)
    print("| step | L | time / passed | memory / failed | status |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 1 if any(r[4].startswith(("FAIL", "ERROR", "not run")) for r in rows) else 0

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
