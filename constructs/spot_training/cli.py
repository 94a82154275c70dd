"""`spot-training`: the platform's command-line tool.

    spot-training local-run --steps 12 --interrupt-at-step 5 --out out/local
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from spot_training.config import ConfigError, TrainingConfig


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def load_config(cdk_json: Path = Path("cdk.json")) -> TrainingConfig:
    """The same settings `cdk synth` uses: the `training` context of ./cdk.json (defaults without one)."""
    context = json.loads(cdk_json.read_text()).get("context", {}) if cdk_json.is_file() else {}
    return TrainingConfig.from_context(context)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def cmd_local_run(args: argparse.Namespace) -> int:
    from spot_training.local_run import LocalRunError, local_run, summary_text
    from spot_training.trainer_code import default_trainer_dir

    try:
        report = local_run(load_config(), steps=args.steps, interrupt_at=args.interrupt_at_step or [],
                           out=Path(args.out), trainer_dir=default_trainer_dir())
    except LocalRunError as error:
        raise CliError(str(error)) from None
    print(summary_text(report))
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0 if report["metric_definitions_ok"] else 1


def cmd_compare_runs(args: argparse.Namespace) -> int:
    reports = []
    for folder in (args.reference, args.candidate):
        path = Path(folder) / "report.json"
        if not path.is_file():
            raise CliError(f"{path}: no report.json (run local-run with --out {folder} first)")
        reports.append(json.loads(path.read_text()))
    reference, candidate = reports
    same_loss = reference["final_loss"] == candidate["final_loss"]
    same_parameters = reference["final_parameters_sha256"] == candidate["final_parameters_sha256"]
    print(f"final loss: reference {reference['final_loss']:.6f} ({reference['interruptions']} interruptions), "
          f"candidate {candidate['final_loss']:.6f} ({candidate['interruptions']} interruptions): "
          f"{'identical' if same_loss else 'DIFFERENT'}")
    print(f"final parameters: {'bit-identical' if same_parameters else 'DIFFERENT'}")
    return 0 if same_loss and same_parameters else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spot-training", description="Run, watch and size the SageMaker "
                                     "spot training pipeline.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    local = commands.add_parser("local-run", help="run the pipeline's training step on this machine, with "
                                "simulated spot interruptions",
                                description="Runs the same TrainingStep that `cdk synth` builds (config from "
                                "./cdk.json) on the local CPU: N emulated instances, checkpoints synced to a "
                                "local S3 folder, spot interruptions injected. Writes OUT/report.json.")
    local.add_argument("--steps", type=_positive, required=True, help="optimizer steps (pipeline parameter MaxSteps)")
    local.add_argument("--interrupt-at-step", type=_positive, action="append", metavar="K",
                       help="interrupt every instance once step K is reached; repeatable; none: no interruption")
    local.add_argument("--out", required=True, help="folder for instances, local S3, logs and report.json")
    local.set_defaults(handler=cmd_local_run)

    compare = commands.add_parser("compare-runs", help="compare two local-run reports (final loss, parameters)")
    compare.add_argument("reference", help="a local-run --out folder")
    compare.add_argument("candidate", help="another local-run --out folder")
    compare.set_defaults(handler=cmd_compare_runs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (CliError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
