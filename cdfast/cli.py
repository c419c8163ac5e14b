"""The ``cdfast`` command: ``train`` runs a group, ``experiment`` a comparison grid, ``report`` writes
a grid's report, ``models`` lists the model names."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path

from cdfast.train.config import TrainConfig

EPILOG = """Settings come from the defaults, then --config FILE (YAML with the same keys, '-' or '_'),
then the flags given here. --resume DIR continues a run from its last checkpoint with the run's
own config.yaml; flags may then change only what does not alter the result (device, logging, ...)."""


def _base_type(tp):
    """(element type, is_list) of a dataclass field annotation such as ``int | None`` or ``list[str]``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return _base_type(args[0])
    if typing.get_origin(tp) is list:
        return args[0], True
    return tp, False


def _parser_for(kind, is_list: bool, optional: bool):
    def parse(text: str):
        if optional and text.lower() in ("none", "null", ""):
            return None
        if is_list:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        return kind(text)
    parse.__name__ = kind.__name__ + ("-list" if is_list else "")
    return parse


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind, is_list = _base_type(hints[f.name])
        optional = type(None) in typing.get_args(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if is_list else default
        help_text = f"{f.metadata['help']} (default: {shown})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=_parser_for(kind, is_list, optional), default=argparse.SUPPRESS,
                                choices=f.metadata.get("choices"), metavar=f.name.upper(), help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    field_names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in field_names}
    if args.resume:
        run = Path(args.resume)
        run_dir = run.parent if run.is_file() else run
        config_file = run_dir / "config.yaml"
        if not config_file.is_file():
            raise FileNotFoundError(f"cannot resume: {config_file} not found (is {run_dir} a cdfast run folder?)")
        base = TrainConfig.from_yaml(config_file)
    elif args.config:
        base = TrainConfig.from_yaml(args.config)
    else:
        base = TrainConfig()
    return dataclasses.replace(base, **overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from cdfast.train import Trainer

    cfg = config_from_args(args)
    trainer = Trainer(cfg, resume=args.resume)
    g = trainer.group
    print(f"cdfast: {cfg.mode} training ({'teachers=' + cfg.teachers + ', ' if cfg.mode == 'competitive' else ''}"
          f"features {'on' if g.feature_loss else 'off'}, perturbation {'on: ' + ','.join(g.pool.names) if g.perturb else 'off'}) "
          f"of {len(cfg.models)} networks [{', '.join(cfg.models)}] on {cfg.data} "
          f"({trainer.data.train_size} train / {trainer.data.test_size} test images, {trainer.data.num_classes} classes) "
          f"for {cfg.epochs} epochs on {trainer.device}, engine {g.engine.name}; outputs in {trainer.out}")
    if trainer.epoch:
        print(f"cdfast: resumed from epoch {trainer.epoch} (step {trainer.step})")
    summary = trainer.fit()
    if summary.get("epochs", 0) >= cfg.epochs:
        print(trainer.summary_table(summary))
        print(f"cdfast: done. In {trainer.out}: config.yaml, epochs.jsonl (per epoch), steps.csv (per step: "
              f"teacher, losses), checkpoint.pt, summary.txt"
              + (", accuracy.png, teacher_timeline.png" if cfg.plots else "")
              + (", tensorboard/" if cfg.tensorboard else ""))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from cdfast.experiment import Grid, run_grid
    from cdfast.report import write_report

    grid = Grid.from_yaml(args.config)
    out = Path(args.out or f"runs/experiment-{Path(args.config).stem}")
    overrides = {"progress": args.progress, **({"device": args.device} if args.device else {})}
    print(f"cdfast experiment: {len(grid.runs())} runs ({len(grid.groups)} groups, {len(grid.methods)} methods, "
          f"{len(grid.seeds)} seeds) in {out}; finished runs are skipped, interrupted ones resumed")
    results = run_grid(grid, out, overrides)
    report = write_report(out)
    print(f"cdfast experiment: results in {results}, report in {report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cdfast.report import write_report

    print(f"cdfast report: {write_report(args.grid_dir, args.out, args.title)}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from cdfast.models import available_models

    for family, names in available_models().items():
        print(f"{family}:\n  " + "\n  ".join(names))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdfast", description="Competitive Distillation, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a group of networks", epilog=EPILOG)
    train.add_argument("--config", help="YAML config file")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    add_config_flags(train)
    train.set_defaults(func=cmd_train)
    experiment = sub.add_parser(
        "experiment", help="run a comparison grid (methods x ablations x groups x seeds), then its report",
        description="Run every (group, method, seed) of a grid file; rerunning skips finished runs and resumes "
                    "interrupted ones. See configs/experiments/ for presets and cdfast/experiment.py for the format.")
    experiment.add_argument("--config", required=True, help="grid YAML file (base, groups, methods, seeds, report)")
    experiment.add_argument("--out", help="grid folder (default: runs/experiment-<config name>)")
    experiment.add_argument("--device", help="override the device of every run (cpu, cuda, auto)")
    experiment.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False,
                            help="per-epoch progress bars (default: off; one line per run and epoch)")
    experiment.set_defaults(func=cmd_experiment)
    report = sub.add_parser("report", help="write report.md and plots from a grid folder's results.jsonl")
    report.add_argument("grid_dir", help="the folder cdfast experiment wrote")
    report.add_argument("--out", help="where report.md and the PNGs go (default: the grid folder)")
    report.add_argument("--title", help="report title")
    report.set_defaults(func=cmd_report)
    models = sub.add_parser("models", help="list the model names build_model accepts")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cdfast.train import NonFiniteLossError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NonFiniteLossError as e:
        print(f"cdfast: error: {e}. The last good checkpoint is kept.", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        print(f"cdfast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cdfast: interrupted; the last checkpoint (if any) is intact, continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
