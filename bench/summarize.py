"""One page from a gpu-check folder: steps, tests, and every performance target with its measured ratio.

    python bench/summarize.py OUT     # writes OUT/summary.md and prints it

Reads ``raw/steps.tsv``, ``raw/environment.txt``, ``junit-cuda.xml``, ``raw/junit-cuda-compile.xml``,
``junit.xml`` and the
pytest-benchmark JSON files that ``bench/gpu_check.sh`` writes; anything missing or unreadable
is reported as such, never as a pass.
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
    """The op targets on wall time (synced per call, the issue's measure), with each side's launches and
    device time: a device-time ratio far above the wall-time one says the host, not the kernels, sets
    the pace (a CUDA graph removes the host's share)."""
    lines = ["| target | measured | needed | verdict | launches (fast / slow) | device time (fast / slow) |",
             "|---|---|---|---|---|---|"]
    for what, file, group, fast, slow, needed in TARGETS:
        benchmarks = load_benchmarks(out, file)
        a, b = mean_of(benchmarks, group, fast), mean_of(benchmarks, group, slow)
        if a is None or b is None:
            lines.append(f"| {what} | not run | >= {needed:g}x | — | — | — |")
            continue
        ratio = b[0] / a[0]
        launches = f"{a[1].get('launches', '?')} / {b[1].get('launches', '?')}"
        ga, gb = a[1].get("gpu_us"), b[1].get("gpu_us")
        device = f"{ga:.1f} / {gb:.1f} µs ({gb / ga:.2f}x)" if ga and gb else "—"
        verdict = "PASS" if ratio >= needed else "FAIL"
        lines.append(f"| {what} | {ratio:.2f}x ({1e6 * a[0]:.1f} vs {1e6 * b[0]:.1f} µs) | >= {needed:g}x | "
                     f"{verdict} | {launches} | {device} |")
    return lines


def target_forms(out: Path) -> list[str]:
    """The election op against F.cross_entropy with label smoothing, ignored labels, class probabilities."""
    rows = [b for b in load_benchmarks(out, "bench-election.json") if b.get("extra_info", {}).get("form")]
    if not rows:
        return []
    means: dict[str, dict[str, float]] = {}
    for b in rows:
        means.setdefault(b["extra_info"]["form"], {})[b["extra_info"]["impl"]] = b["stats"]["mean"]
    lines = ["", "Election fwd+bwd by target form, N=4 B=128 K=100 (cdfast vs torch composition):", ""]
    for form, m in sorted(means.items()):
        if "cdfast" in m and "torch" in m:
            lines.append(f"- {form}: {1e6 * m['cdfast']:.1f} vs {1e6 * m['torch']:.1f} µs ({m['torch'] / m['cdfast']:.2f}x)")
    return lines


def host_overhead(out: Path) -> list[str]:
    lines = []
    for file, what in (("bench-election.json", "election"), ("bench-student-loss.json", "student loss")):
        rows = [b for b in load_benchmarks(out, file) if "host overhead" in (b.get("group") or "")
                and b.get("extra_info", {}).get("seconds_per_call") is not None]
        if rows:
            lines += ["", f"Host cost per {what} fwd+bwd call (many calls, one sync):", ""]
        for b in rows:
            info = b["extra_info"]
            shape = f"N={info['n']} B={info['b']} K={info['k']}" + (f" D={info['d']}" if "d" in info else "")
            lines.append(f"- {shape} {info['impl']}: {1e6 * info['seconds_per_call']:.1f} µs")
    return lines


def tests_line(out: Path, name: str, what: str, status: str = "ok") -> str:
    """The counts of one junit file; ``status`` is its step's (a timed-out step's counts are partial)."""
    path = out / name
    if not path.is_file():
        return f"{what}: not run" + ("" if status == "ok" else f", step {status}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:  # a run killed while writing its XML
        return f"{what}: {name} unreadable ({err})"
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    get = lambda k: sum(int(suite.get(k, 0)) for suite in suites)  # noqa: E731
    failed = [f"{case.get('classname')}::{case.get('name')}" for suite in suites for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    line = (f"{what}: {get('tests') - get('failures') - get('errors') - get('skipped')} passed, "
            f"{get('failures')} failed, {get('errors')} errors, {get('skipped')} skipped")
    if status.startswith("timed out"):  # pytest stopped by SIGINT still writes what it ran
        line += f" (cut short: the step {status}, the tests after that point did not run)"
    return line + ("".join(f"\n  - FAILED {name}" for name in failed[:20]))


def engine_timings(out: Path) -> tuple[dict, dict]:
    """From bench-engines.json: mean step seconds and device seconds per step (where profiled), both
    keyed by (group, precision, engine[+compile], mode)."""
    time, gpu = {}, {}
    for b in load_benchmarks(out, "bench-engines.json"):
        i = b.get("extra_info", {})
        key = (i.get("group"), i.get("precision"), i.get("engine", "?") + ("+compile" if i.get("compiled") else ""),
               i.get("mode"))
        time[key] = b["stats"]["mean"]
        if i.get("gpu_ms") is not None:
            gpu[key] = i["gpu_ms"] / 1e3
    return time, gpu


def fastest(time: dict, group: str, precision: str, mode: str) -> tuple[str | None, float | None]:
    """The engine with the lowest step time for (group, precision, mode), and that time."""
    cands = {k[2]: t for k, t in time.items() if k[0] == group and k[1] == precision and k[3] == mode}
    return min(cands.items(), key=lambda kv: kv[1]) if cands else (None, None)


def engines_table(out: Path) -> list[str]:
    time, gpu = engine_timings(out)
    if not time:
        return []
    lines = ["", "## Engines (step time; images/s per network)", "",
             "| group | precision | engine | independent | competitive | CD / independent | GPU time of a step |",
             "|---|---|---|---|---|---|---|"]
    rows = sorted({k[:3] for k in time}, key=lambda k: tuple(map(str, k)))
    cell = lambda t: f"{1e3 * t:.2f} ms" if t else "—"  # noqa: E731
    for group, precision, engine in rows:
        at = lambda mode, d: d.get((group, precision, engine, mode))  # noqa: E731
        ind, cd = at("independent", time) or at("alone", time), at("competitive", time)  # alone: one network
        device = at("competitive", gpu) or at("alone", gpu)
        ratio = f"{cd / ind:.2f}x" if ind and cd else "—"
        lines.append(f"| {group} | {precision} | {engine} | {cell(ind)} | {cell(cd)} | {ratio} | {cell(device)} |")
    lines += ["", "GPU time of a step: the summed device time of its launches (torch.profiler; of the "
              "competitive step, or of the one network alone). Close to the step's wall time: GPU-bound."]
    return lines


def engine_targets(out: Path) -> list[str]:
    """The graph engine issue's targets, from bench-engines.json (group steps and networks alone)."""
    time, gpu = engine_timings(out)
    if not time:
        return []
    lines = ["", "## Engine targets", "", "| target | measured | needed | verdict |", "|---|---|---|---|"]
    for precision in ("fp32", "bf16"):  # each against the sequential engine in the same precision
        seq = time.get(("2xresnet32-cifar", precision, "sequential", "competitive"))
        best_name, best_t = fastest(time, "2xresnet32-cifar", precision, "competitive")
        if seq and best_t:
            ratio = seq / best_t
            lines.append(f"| 2x ResNet-32 B=128 {precision} CD step: best engine ({best_name}) vs sequential eager | "
                         f"{ratio:.2f}x | >= 5x | {'PASS' if ratio >= 5 else 'FAIL'} |")
        elif precision == "fp32":
            lines.append("| 2x ResNet-32 B=128 fp32 CD step: best engine vs sequential eager | not run | >= 5x | — |")
    name, t = fastest(time, "2xresnet32-cifar", "fp32", "competitive")
    if name and ("2xresnet32-cifar", "fp32", name, "independent") in time:
        ratio = t / time[("2xresnet32-cifar", "fp32", name, "independent")]
        lines.append(f"| 2x ResNet-32 fp32, {name}: CD step / independent step | {ratio:.2f}x | <= 1.10x | "
                     f"{'PASS' if ratio <= 1.10 else 'FAIL'} |")
    else:
        lines.append("| 2x ResNet-32 fp32: CD step / independent step (best engine) | not run | <= 1.10x | — |")
    group_name, group_t = fastest(time, "2xresnet50-224", "bf16", "competitive")
    # the yardstick: one network trained alone the usual way, eager (its graphed step is the floor below)
    alone_name, alone_t = "alone", time.get(("resnet50-224", "bf16", "alone", "alone"))
    if group_t and alone_t:
        ratio = alone_t / group_t  # per-network images/s of the group over images/s of one network alone
        lines.append(f"| 2x ResNet-50 bf16 B=128: per-network images/s ({group_name}) vs one alone ({alone_name}) | "
                     f"{ratio:.2f}x | >= 0.9x | {'PASS' if ratio >= 0.9 else 'FAIL'} |")
    else:
        lines.append("| 2x ResNet-50 bf16: per-network images/s vs one ResNet-50 alone | not run | >= 0.9x | — |")
    lines += floor_lines(time, gpu)
    return lines


def floor_lines(time: dict, gpu: dict) -> list[str]:
    """How far the targets are reachable. N times one network's own GPU time (the device time of its
    step captured whole in a CUDA graph; else that graphed step's wall time, else the device time of
    its eager step) is what the N networks cost one after another with no host overhead at all:
    the serial floor (of training alone: the CD step adds its election and distillation losses).
    Going below it needs the networks' work overlapped (streams) or batched (the fused engine's
    kernels), which pays only where one network leaves the GPU partly idle."""
    lines = []
    for alone, group, n, precision in (("resnet32-cifar", "2xresnet32-cifar", 2, "fp32"),
                                       ("resnet50-224", "2xresnet50-224", 2, "bf16")):
        key = (alone, precision, "alone+graph", "alone")
        candidates = [(gpu.get(key), "graphed step's device time"), (time.get(key), "graphed step"),
                      (gpu.get((alone, precision, "alone", "alone")), "eager step's device time")]
        floor, source = next(((t, what) for t, what in candidates if t), (None, None))
        if not floor:
            continue
        seq = time.get((group, precision, "sequential", "competitive"))
        best_name, best_t = fastest(time, group, precision, "competitive")
        if not lines:
            lines = ["", "Serial floors: N networks trained one after another with no host overhead (N x one "
                     "network's own GPU time); only overlapped or batched work goes below it.", ""]
        text = f"- {group} {precision}: {n} x one network's {source} = {1e3 * n * floor:.2f} ms"
        if seq:
            text += f"; sequential eager / floor = {seq / (n * floor):.2f}x (at most the gain without overlap)"
        if best_t:
            text += f"; the best engine ({best_name}, {1e3 * best_t:.2f} ms) takes {best_t / (n * floor):.2f}x the floor"
        eager_alone = time.get((alone, precision, "alone", "alone"))
        if eager_alone:
            text += f"; per-network images/s at the floor: {eager_alone / (n * floor):.2f}x of one network alone (eager)"
        lines.append(text)
    return lines


def read_lines(out: Path, *names: str) -> list[str]:
    for name in names:
        if (out / name).is_file():
            return (out / name).read_text(errors="replace").splitlines()
    return []


def main(out: str) -> str:
    out = Path(out)
    env = read_lines(out, "raw/environment.txt", "environment.txt")[:5]
    lines = ["# gpu-check summary", "", *[f"- {line}" for line in env], ""]
    steps = read_lines(out, "raw/steps.tsv", "steps.tsv")[1:]
    rows = [r.split("\t") for r in steps if r.strip()]
    if rows:
        lines += ["| step | status | seconds |", "|---|---|---|", *[f"| {' | '.join(r)} |" for r in rows], ""]
    status = {r[0]: r[1] for r in rows if len(r) > 1}
    lines += [tests_line(out, "junit-cuda.xml", "CUDA tests", status.get("cuda tests", "ok")), "",
              tests_line(out, "raw/junit-cuda-compile.xml", "CUDA tests that compile",
                         status.get("cuda compile tests", "ok")), "",
              tests_line(out, "junit.xml", "other tests", status.get("other tests", "ok")), "",
              "## Targets", "", *targets_table(out), *host_overhead(out), *target_forms(out), *engine_targets(out), *engines_table(out)]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else "."))
