"""Benchmark JSON files keep the statistics, not every raw timing (those ran to 9 MB per file)."""


def pytest_benchmark_update_json(config, benchmarks, output_json):
    for bench in output_json["benchmarks"]:
        bench["stats"].pop("data", None)
