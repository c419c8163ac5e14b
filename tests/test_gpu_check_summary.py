"""bench/summarize.py: the one page a GPU check leaves must report what ran, what failed and every
target's verdict, and never call something that did not run (or cannot be read) a pass."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("summarize", ROOT / "bench" / "summarize.py")
summarize = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summarize)

JUNIT = """<?xml version="1.0"?><testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">
<testcase classname="tests.test_a" name="test_ok"/>
<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>
<testcase classname="tests.test_a" name="test_skip"><skipped/></testcase>
</testsuite></testsuites>"""


def bench(group, impl, mean, **extra):
    return {"group": group, "stats": {"mean": mean}, "extra_info": {"impl": impl, **extra}}


def test_summary_reports_failures_verdicts_and_unreadable_files(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "steps.tsv").write_text("step\tstatus\tseconds\nbuild\tok\t40\ncuda tests\tfailed (rc 1)\t30\n")
    (tmp_path / "raw" / "environment.txt").write_text("python 3.12 | torch 2.11\ngpu NVIDIA H100 sm_90\n")
    (tmp_path / "junit-cuda.xml").write_text(JUNIT)
    (tmp_path / "junit.xml").write_text(JUNIT[:80])  # killed while writing
    group = "election forward_backward N=2 B=128 K=100"
    (tmp_path / "bench-election.json").write_text(json.dumps({"benchmarks": [
        bench(group, "fused", 10e-6, launches=3, gpu_us=4.0), bench(group, "composition", 40e-6, launches=18, gpu_us=30.0)]}))
    student = "student loss forward_backward N=2 B=128 K=100 D=256"
    (tmp_path / "bench-student-loss.json").write_text(json.dumps({"benchmarks": [
        bench(student, "fused", 30e-6), bench(student, "eager", 45e-6), bench(student, "compiled", 20e-6)]}))
    def step(group, precision, engine, mode, mean, **extra):
        return {"group": "g", "stats": {"mean": mean}, "extra_info": {
            "group": group, "precision": precision, "engine": engine, "compiled": False, "mode": mode, **extra}}

    (tmp_path / "bench-engines.json").write_text(json.dumps({"benchmarks": [
        step("2xresnet32-cifar", "fp32", "streams", "independent", 0.010),
        step("2xresnet32-cifar", "fp32", "streams", "competitive", 0.011),
        step("2xresnet32-cifar", "fp32", "sequential", "competitive", 0.012),
        step("2xresnet32-cifar", "fp32", "graph", "competitive", 0.002),
        step("2xresnet32-cifar", "fp32", "graph", "independent", 0.0019),
        step("2xresnet32-cifar", "bf16", "sequential", "competitive", 0.010),
        step("2xresnet32-cifar", "bf16", "graph", "competitive", 0.004),
        step("2xresnet50-224", "bf16", "fused", "competitive", 0.200),
        step("resnet50-224", "bf16", "alone", "alone", 0.095, gpu_ms=90.0),
        step("resnet32-cifar", "fp32", "alone", "alone", 0.004, gpu_ms=0.8),
        step("resnet32-cifar", "fp32", "alone+graph", "alone", 0.0009, gpu_ms=0.85)]}))

    text = summarize.main(str(tmp_path))

    assert "CUDA tests: 1 passed, 1 failed, 0 errors, 1 skipped" in text
    assert "FAILED tests.test_a::test_bad" in text
    assert "other tests: junit.xml unreadable" in text
    assert "| cuda tests | failed (rc 1) | 30 |" in text and "- gpu NVIDIA H100 sm_90" in text
    lines = text.splitlines()
    row = lambda start: next(line for line in lines if line.startswith(start))  # noqa: E731
    assert "4.00x" in row("| election fwd+bwd N=2 ") and "PASS" in row("| election fwd+bwd N=2 ")
    assert "3 / 18" in row("| election fwd+bwd N=2 ")
    assert "| 4.0 / 30.0 µs (7.50x) |" in row("| election fwd+bwd N=2 ")  # device time beside the wall time
    assert row("| student loss fwd+bwd N=2 B=128 K=100 D=256: fused vs eager").endswith("| — |")  # none recorded
    assert "not run" in row("| election fwd+bwd N=3 ")
    assert "1.50x" in row("| student loss fwd+bwd N=2 B=128 K=100 D=256: fused vs eager")
    assert "FAIL" in row("| student loss fwd+bwd N=2 B=128 K=100 D=256: fused vs eager")
    assert "PASS" not in row("| student loss fwd+bwd N=2 B=128 K=100 D=256: fused vs compiled")
    assert "| 2xresnet32-cifar | fp32 | streams | 10.00 ms | 11.00 ms | 1.10x |" in text
    assert "fp32 CD step: best engine (graph) vs sequential eager | 6.00x | >= 5x | PASS |" in text
    assert "bf16 CD step: best engine (graph) vs sequential eager | 2.50x | >= 5x | FAIL |" in text
    assert "graph: CD step / independent step | 1.05x | <= 1.10x | PASS |" in text
    assert "(fused) vs one alone (alone) | 0.47x | >= 0.9x | FAIL |" in text
    assert "| resnet50-224 | bf16 | alone | 95.00 ms | — | — | 90.00 ms |" in text
    # serial floors: from the graphed step's device time where there is one, else the eager step's
    assert ("- 2xresnet32-cifar fp32: 2 x one network's graphed step's device time = 1.70 ms; sequential eager / "
            "floor = 7.06x (at most the gain without overlap); the best engine (graph, 2.00 ms) takes 1.18x the "
            "floor; per-network images/s at the floor: 2.35x of one network alone (eager)") in lines
    assert ("- 2xresnet50-224 bf16: 2 x one network's eager step's device time = 180.00 ms; the best engine (fused, "
            "200.00 ms) takes 1.11x the floor; per-network images/s at the floor: 0.53x of one network alone "
            "(eager)") in lines
    assert (tmp_path / "summary.md").read_text() == text


def test_summary_of_an_empty_folder_says_nothing_ran(tmp_path):
    text = summarize.main(str(tmp_path))
    assert "CUDA tests: not run" in text and "other tests: not run" in text
    assert "PASS" not in text and "FAIL" not in text
    assert "## Engine targets" not in text


def test_counts_of_a_step_that_timed_out_are_marked_partial(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "steps.tsv").write_text("step\tstatus\tseconds\ncuda tests\ttimed out after 150s\t165\n"
                                                "other tests\tskipped (deadline)\t0\n")
    (tmp_path / "junit-cuda.xml").write_text(JUNIT)  # pytest stopped by SIGINT writes what it ran
    text = summarize.main(str(tmp_path))
    assert ("CUDA tests: 1 passed, 1 failed, 0 errors, 1 skipped (cut short: the step timed out after 150s, "
            "the tests after that point did not run)") in text
    assert "other tests: not run, step skipped (deadline)" in text
