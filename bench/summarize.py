"""One page from a gpu-check folder: steps, tests, and every performance target with its measured ratio.

    python bench/summarize.py OUT     # writes OUT/summary.md and prints it

Reads ``steps.tsv``, ``junit.xml`` and the pytest-benchmark JSON files that
``bench/gpu_check.sh`` writes; anything missing is reported as not run.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# (what, bench file, group must contain, fast impl, slow impl, target ratio slow/fast)
TARGETS = [
    (f"election fwd+bwd N={n} B=128 K=100: cdfast vs torch composition", "bench-election.json",
     f"election forward_backward N={n} B=128 K=100", "fused", "composition", 3.0)
    for n in (2, 3, 4)
] + [
    (f"student loss fwd+bwd {size}: fused vs {other}", "bench-student-loss.json",
     f"student loss forward_backward {size}", "fused", other, ratio)
    for size in ("N=2 B=128 K=100 D=256", "N=4 B=128 K=100 D=256", "N=4 B=256 K=1000 D=2048")
    for other, ratio in (("eager", 2.0), ("compiled", 1.0))
]


def load_benchmarks(out: Path, name: str) -> list[dict]:
    path = out / name
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text())["benchmarks"]
    except (json.JSONDecodeError, KeyError):
        return []


def mean_of(benchmarks: list[dict], group: str, impl: str) -> tuple[float, dict] | None:
    for b in benchmarks:
        if group in (b.get("group") or "") and b.get("extra_info", {}).get("impl") == impl:
            return b["stats"]["mean"], b.get("extra_info", {})
    return None


def targets_table(out: Path) -> list[str]:
    lines = ["| target | measured | needed | verdict | launches (fast / slow) |", "|---|---|---|---|---|"]
    for what, file, group, fast, slow, needed in TARGETS:
        benchmarks = load_benchmarks(out, file)
        a, b = mean_of(benchmarks, group, fast), mean_of(benchmarks, group, slow)
        if a is None or b is None:
            lines.append(f"| {what} | not run | >= {needed:g}x | — | — |")
            continue
        ratio = b[0] / a[0]
        launches = f"{a[1].get('launches', '?')} / {b[1].get('launches', '?')}"
        verdict = "PASS" if ratio >= needed else "FAIL"
        lines.append(f"| {what} | {ratio:.2f}x ({1e6 * a[0]:.1f} vs {1e6 * b[0]:.1f} µs) | >= {needed:g}x | "
                     f"{verdict} | {launches} |")
    return lines


def host_overhead(out: Path) -> list[str]:
    rows = [b for b in load_benchmarks(out, "bench-election.json") if "host overhead" in (b.get("group") or "")]
    if not rows:
        return []
    lines = ["", "Host cost per election fwd+bwd call (many calls, one sync):", ""]
    for b in rows:
        info = b["extra_info"]
        lines.append(f"- N={info['n']} B={info['b']} K={info['k']} {info['impl']}: "
                     f"{1e6 * info['seconds_per_call']:.1f} µs")
    return lines


def tests_line(out: Path) -> str:
    path = out / "junit.xml"
    if not path.is_file():
        return "tests: not run"
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    get = lambda k: int(suite.get(k, 0))  # noqa: E731
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    line = (f"tests: {get('tests') - get('failures') - get('errors') - get('skipped')} passed, "
            f"{get('failures')} failed, {get('errors')} errors, {get('skipped')} skipped")
    return line + ("".join(f"\n  - FAILED {name}" for name in failed[:20]))


def main(out: str) -> str:
    out = Path(out)
    env = (out / "environment.txt").read_text().splitlines()[:3] if (out / "environment.txt").exists() else []
    lines = ["# gpu-check summary", "", *[f"- {line}" for line in env], ""]
    if (out / "steps.tsv").exists():
        rows = [r.split("\t") for r in (out / "steps.tsv").read_text().splitlines()[1:] if r.strip()]
        lines += ["| step | status | seconds |", "|---|---|---|", *[f"| {' | '.join(r)} |" for r in rows], ""]
    lines += [tests_line(out), "", "## Targets", "", *targets_table(out), *host_overhead(out)]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else "."))
