"""`spot-training`: the platform's command-line tool.

    spot-training start  [--outputs outputs.json | --pipeline-name NAME] [--parameter Name=Value ...] [--resume-from ARN]
    spot-training watch  EXECUTION_ARN
    spot-training report EXECUTION_ARN [--price-per-hour USD] [--chart timeline.png]
    spot-training size   [--instance-count 2 --run-hours 6 ...]
    spot-training local-run --steps 12 --interrupt-at-step 5 --out out/local
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spot_training.config.settings import ConfigError, TrainingConfig
from spot_training.operations.runs import OperationError


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def load_config(cdk_json: Path = Path("cdk.json"), overrides: Sequence[str] = ()) -> TrainingConfig:
    """The same settings `cdk synth` uses: the `training` context of ./cdk.json (defaults without one), with
    `training.<field>=<value>` overrides as `cdk synth -c` takes them."""
    context = json.loads(cdk_json.read_text()).get("context", {}) if cdk_json.is_file() else {}
    for item in overrides:
        name, _, value = item.partition("=")
        if not name.startswith("training.") or not _:
            raise CliError(f"-c {item}: must be training.<field>=<value>, as `cdk synth -c` takes it")
        context = {**context, name: value}
    return TrainingConfig.from_context(context)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be above 0 and below 1")
    return value


def _parameter_count(text: str) -> int:
    """`8e9`, `8B`, `70b`, `1.5B`, `500M` or `8030261248`."""
    cleaned = text.strip().upper().replace(",", "").replace("_", "")
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}.get(cleaned[-1:], 1)
    try:
        value = float(cleaned[:-1] if scale != 1 else cleaned) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a parameter count such as 8B, 8e9 or 8030261248") from None
    if not value >= 1e6 or value != value or value > 1e13:
        raise argparse.ArgumentTypeError(f"{text!r}: must be from 1M to 10T parameters")
    return int(value)


def cmd_local_run(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("torch", "transformers", "safetensors", "sagemaker_training", "sagemaker_pytorch_container")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise CliError(f"local-run needs the training image's packages ({', '.join(missing)} missing): "
                       "pip install -r requirements-image.txt, or run `make local`")
    from spot_training.local.jobs import LocalRunError, LocalRunStopped
    from spot_training.local.report import summary_text
    from spot_training.local.run import local_run
    from spot_training.definition.trainer_code import default_trainer_dir

    from spot_training.operations.runs import OperationError, parse_parameters

    try:
        parameters = parse_parameters(args.parameter or [])
    except OperationError as error:
        raise CliError(str(error)) from None
    try:
        report = local_run(load_config(overrides=args.context or []), steps=args.steps,
                           interrupt_at=args.interrupt_at_step or [], capacity_failure_at=args.capacity_failure_at_step,
                           interrupt_during_save=args.interrupt_during_save or [], out=Path(args.out),
                           trainer_dir=default_trainer_dir(), processes_per_host=args.processes_per_host,
                           restart=args.restart, parameters=parameters,
                           on_resume=lambda message: print(message, flush=True))
    except LocalRunStopped as stopped:
        print(str(stopped), file=sys.stderr)
        return 130
    except LocalRunError as error:
        raise CliError(str(error)) from None
    print(summary_text(report))
    print(f"report: {Path(args.out) / 'report.json'}")
    gate = (report.get("evaluation") or {}).get("gate", {})
    if gate and not gate["passed"]:  # the execution would end Failed at the gate's FailStep
        print(f"FAILED: step {gate['next']}: {gate['message']}", file=sys.stderr)
        return 1
    return 0 if report["metric_definitions_ok"] else 1


def _run_outputs(folder: str) -> tuple[float | None, int | None, Path]:
    """(final loss, interruptions, model folder) of a local-run --out folder (its report.json), or of a model
    folder (an exported model, for example a SageMaker job's output/model/ synced from S3: no loss)."""
    path = Path(folder)
    report = path / "report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        return data["final_loss"], data["interruptions"], Path(data["model_s3_path"])
    if any(path.glob("*.safetensors")):
        summary = path.parent / "data" / "summary.json"
        loss = json.loads(summary.read_text())["final_loss"] if summary.is_file() else None
        return loss, None, path
    raise CliError(f"{path}: neither a local-run --out folder (report.json) nor a model folder (*.safetensors)")


def _tensors(model_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def cmd_compare_runs(args: argparse.Namespace) -> int:
    """Exact (default): the same final loss and bit-identical parameters, what resume guarantees on CPU.
    --tolerance R: the final loss within R relative and every tensor within R in relative L2 norm
    (||a - b|| / ||a||), for GPU runs, where NCCL reduction order and attention kernels are not bit-exact."""
    import torch

    (loss_a, interruptions_a, model_a), (loss_b, interruptions_b, model_b) = (
        _run_outputs(args.reference), _run_outputs(args.candidate))
    tolerance = args.tolerance
    if loss_a is not None and loss_b is not None:
        difference = abs(loss_a - loss_b) / max(abs(loss_a), 1e-12)
        same_loss = loss_a == loss_b if tolerance is None else difference <= tolerance
        verdict = ("identical" if loss_a == loss_b else "DIFFERENT") if tolerance is None else \
            (f"within {tolerance:g}" if same_loss else f"DIFFERENT beyond {tolerance:g}") + f" (relative {difference:.2e})"
        counts = [f" ({n} interruptions)" if n is not None else "" for n in (interruptions_a, interruptions_b)]
        print(f"final loss: reference {loss_a:.6f}{counts[0]}, candidate {loss_b:.6f}{counts[1]}: {verdict}")
    else:
        same_loss = True
        print("final loss: not known for a model folder (no ../data/summary.json); parameters only")
    a, b = _tensors(model_a), _tensors(model_b)
    if sorted(a) != sorted(b) or any(a[name].shape != b[name].shape for name in a):
        print("final parameters: DIFFERENT (the models do not have the same tensors)")
        return 1
    if tolerance is None:
        same = all(torch.equal(a[name], b[name]) for name in a)
        print(f"final parameters: {'bit-identical' if same else 'DIFFERENT'}")
        return 0 if same_loss and same else 1
    worst_name, worst = max(((name, (torch.linalg.vector_norm((a[name].double() - b[name].double()))
                                     / torch.linalg.vector_norm(a[name].double()).clamp_min(1e-30)).item())
                             for name in a), key=lambda item: item[1])
    same = worst <= tolerance
    print(f"final parameters: {'within' if same else 'DIFFERENT beyond'} {tolerance:g} (largest relative L2 "
          f"difference {worst:.2e}, {worst_name})")
    return 0 if same_loss and same else 1


PRICES = Path(__file__).resolve().parent / "config" / "prices.json"


def aws_client(service: str, region: str):
    """One place that creates AWS clients (tests replace it with moto or stubbed clients)."""
    import boto3

    return boto3.client(service, region_name=region)


def _region(args: argparse.Namespace) -> str:
    import os

    region = args.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or load_config().region
    if not region:
        raise CliError("--region: not set; pass --region, set AWS_REGION, or set training.region in ./cdk.json")
    return region


def _pipeline_name(args: argparse.Namespace) -> str:
    from spot_training.operations.runs import pipeline_name_from_outputs

    return args.pipeline_name or pipeline_name_from_outputs(Path(args.outputs))


def cmd_start(args: argparse.Namespace) -> int:
    from spot_training.operations.runs import parse_parameters, start

    region = _region(args)
    if args.resume_run:
        from spot_training.operations.runs import resume_run

        if args.resume_from:
            raise OperationError("--resume-run and --resume-from: give one (--resume-from reruns one execution, "
                                 "--resume-run starts the run's next execution)")
        print(resume_run(aws_client("sagemaker", region), _pipeline_name(args), args.resume_run,
                         capacity=args.capacity, parameters=parse_parameters(args.parameter or [])))
        return 0
    if args.capacity != "spot":
        raise OperationError(f"--capacity {args.capacity}: goes with --resume-run RUN (a new run starts on spot; the "
                             "capacity ladder climbs it)")
    arn = start(aws_client("sagemaker", region), _pipeline_name(args), parameters=parse_parameters(args.parameter or []),
                resume_from=args.resume_from, display_name=args.display_name, s3=aws_client("s3", region))
    print(arn)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from spot_training.operations.runs import watch

    return watch(aws_client("sagemaker", _region(args)), args.execution_arn, interval=args.interval,
                 timeout=args.timeout)


def _group(args: argparse.Namespace) -> str:
    from spot_training.operations.models import group_from_outputs

    return args.group or group_from_outputs(Path(args.outputs))


def cmd_models(args: argparse.Namespace) -> int:
    from spot_training.operations.models import compare_text, describe, list_models, models_text, resolve_package

    region = _region(args)
    sagemaker, s3, group = aws_client("sagemaker", region), aws_client("s3", region), _group(args)
    if args.compare:
        account = None if all(p.startswith("arn:") for p in args.compare) else \
            aws_client("sts", region).get_caller_identity()["Account"]
        a, b = (describe(sagemaker, s3, resolve_package(group, p, region, account)) for p in args.compare)
        print(compare_text(a, b))
        return 0
    print(models_text(list_models(sagemaker, s3, group, status=args.status, limit=args.limit), group))
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    from spot_training.operations.models import resolve_package, set_status

    region = _region(args)
    group = _group(args)
    account = None if args.package.startswith("arn:") else aws_client("sts", region).get_caller_identity()["Account"]
    arn = resolve_package(group, args.package, region, account)
    print(f"{arn}: {set_status(aws_client('sagemaker', region), arn, args.command, args.reason)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from spot_training.operations.runs import load_prices, report, report_text, timeline_chart

    region = _region(args)
    if args.run:
        from spot_training.operations.runs import run_report, run_report_text

        if args.execution_arn or args.chart:
            raise CliError("--run: reports every execution of one run; drop the execution ARN and --chart")
        result = run_report(aws_client("sagemaker", region), _pipeline_name(args), args.run,
                            price_per_hour=args.price_per_hour, prices=load_prices(Path(args.price_file)))
        print(run_report_text(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, default=str))
        return 0
    if not args.execution_arn:
        raise CliError("report: give an execution ARN, or --run RUN for every execution of a run")
    result = report(aws_client("sagemaker", region), aws_client("s3", region), args.execution_arn,
                    price_per_hour=args.price_per_hour, prices=load_prices(Path(args.price_file)))
    print(report_text(result))
    if args.chart:
        timeline_chart(result, Path(args.chart))
        print(f"timeline chart: {args.chart}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, indent=2))
    return 0


def cmd_size(args: argparse.Namespace) -> int:
    import dataclasses

    from spot_training.config import sizing
    from spot_training.operations.runs import load_prices

    config = load_config()
    config = dataclasses.replace(config, **{k: v for k, v in (("method", args.method), ("lora_rank", args.lora_rank))
                                            if v is not None})
    base = config.workload()
    model = args.model_config or args.parameters
    if model:  # memory per GPU, then the sizing of a run of that model (its restart downloads)
        text, shape = memory_text(config, args)
        print(text)
        base = dataclasses.replace(base, model_parameters=shape.parameters, trained_parameters=(
            shape.lora_parameters(config.lora_rank) if config.method == "lora" else 0))
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(sizing.Workload)
                 if getattr(args, f.name, None) is not None}
    if "on_demand_price_per_instance_hour" not in overrides:
        overrides["on_demand_price_per_instance_hour"] = load_prices(Path(args.price_file)).get(args.instance_type)
    try:
        workload = dataclasses.replace(base, **overrides)
    except ValueError as error:
        name, _, rest = str(error).partition("=")
        raise CliError(f"{args.flag_names.get(name, name)}={rest}") from None
    print(sizing_text(workload, args.instance_type))
    if args.capacity_ladder:
        print(ladder_text(workload, config, args))
    if not model:
        print(platform_cost_text(config))
    return 0


def ladder_text(w, config: TrainingConfig, args: argparse.Namespace) -> str:
    """The capacity ladder for this workload, and spot-only against the ladder over synthetic capacity traces."""
    from spot_training.config import ladder

    if not 0 <= args.spot_unavailable <= 1 or args.spot_wait_hours <= 0:
        raise CliError(f"--spot-unavailable={args.spot_unavailable:g}, --spot-wait-hours={args.spot_wait_hours:g}: "
                       "the probability must be from 0 to 1 and the wait above 0")
    rungs = ladder.ladder(w, instance_type=args.instance_type, allowed_instance_types=config.instance_type_allow_list,
                          max_run_seconds=config.max_run_seconds)
    capacity = ladder.Capacity(spot_wait_hours=args.spot_wait_hours, spot_unavailable=args.spot_unavailable)
    lines = [f"capacity ladder (deadline {w.slo_hours:g} h after the run starts):"]
    for i, rung in enumerate(rungs, 1):
        budget = (f"MaxWaitTimeInSeconds {rung.max_wait_seconds} ({rung.hours:.1f} h: p90 completion plus "
                  f"{rung.wait_hours:.1f} h of capacity wait), MaxRuntimeInSeconds {rung.max_run_seconds}"
                  if rung.capacity == ladder.SPOT else f"the fallback: {ladder.on_demand_hours(w):.1f} h uninterrupted")
        lines.append(f"  {i}. {rung.name}: {budget}")
    lines.append(f"  simulation over 2000 synthetic capacity traces (spot capacity per type: none within the horizon "
                 f"with probability {capacity.spot_unavailable:g}, else after {capacity.spot_wait_hours:g} h on "
                 "average; on-demand there after provisioning):")
    for outcome in ladder.compare_strategies(w, rungs, capacity, spot_only_max_wait_seconds=config.max_wait_seconds):
        cost = f"${outcome.expected_cost:,.2f}" if outcome.expected_cost is not None else "unknown (no price)"
        p90 = f"{outcome.p90_hours:.1f} h" if outcome.p90_hours != float("inf") else "never (no capacity)"
        lines.append(f"    {outcome.strategy:<9}  P(SLO met) {outcome.probability_within_slo:6.1%}, expected cost {cost} "
                     f"per run, p90 completion {p90}, on-demand in {outcome.on_demand_share:.1%} of runs")
    return "\n".join(lines)


def memory_text(config: TrainingConfig, args: argparse.Namespace) -> tuple[str, Any]:
    """Memory per GPU for each allowed instance type and both strategies (the trainer's planner, memory.py)."""
    import dataclasses

    from spot_training.config import instance_types
    from spot_training.trainer import memory

    try:
        if args.model_config:
            path = Path(args.model_config)
            try:
                raw = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise CliError(f"--model-config={path}: not a readable JSON file ({error})") from None
            if not isinstance(raw, dict):
                raise CliError(f"--model-config={path}: must be a JSON object (a Hugging Face config.json)")
            shape = memory.ModelShape.from_config(raw, source=f"--model-config={path}")
            what = f"{path} ({shape.parameters:,} parameters)"
        else:
            shape = memory.ModelShape.from_parameters(args.parameters)
            what = (f"{shape.parameters:,} parameters (Llama 3 shaped: hidden {shape.hidden_size}, "
                    f"{shape.layers} layers, vocabulary {shape.vocab_size})")
    except memory.PlanError as error:
        raise CliError(str(error).replace("parameters=", "--parameters=", 1)) from None
    overrides = {k: v for k, v in (("per_device_batch_size", args.batch), ("sequence_length", args.sequence_length),
                                   ("activation_checkpointing", args.activation_checkpointing)) if v is not None}
    count = args.instance_count or config.instance_count
    types = args.instance_types or list(config.instance_type_allow_list)
    gib = memory.GIB
    lines = [f"model: {what}",
             f"per GPU at batch {overrides.get('per_device_batch_size', config.per_device_batch_size)} x "
             f"{overrides.get('sequence_length', config.sequence_length)} tokens, "
             f"{config.gradient_accumulation_steps} micro-steps per step, bf16 compute, AdamW, "
             + (f"LoRA rank {config.lora_rank} ({shape.lora_parameters(config.lora_rank):,} adapter parameters "
                "trained, the fp32 base frozen), " if config.method == "lora" else "")
             + f"{count} instance(s); GiB at the step's peak (grads: those alive then); fits: total <= "
             f"{memory.USABLE_FRACTION:.0%} of the GPU",
             f"{'instance type':<18} {'GPU':>5} {'strategy':<8} {'params':>7} {'optim':>7} {'grads':>7} "
             f"{'activ.':>7} {'logits':>7} {'working':>7} {'total':>7}  fits  peak"]
    for instance_type in types:
        gpu = instance_types.gpu_memory_bytes(instance_type)
        for strategy in ("ddp", "fsdp"):
            try:
                plan = dataclasses.replace(config, strategy=strategy, **overrides).memory_plan(shape, instance_type,
                                                                                                count)
            except ConfigError as error:
                raise CliError(str(error).replace("TrainingConfig.", "--").replace("_", "-", 2)) from None
            fits = {True: "yes", False: "NO", None: "? (GPU memory unknown)"}[plan.fits]
            cells = [plan.parameters, plan.optimizer, plan.gradients_held, plan.activations, plan.logits,
                     plan.working, plan.total]
            lines.append(f"{instance_type:<18} {(f'{gpu / gib:.0f}' if gpu else '?'):>5} {strategy:<8} "
                         + " ".join(f"{c / gib:7.1f}" for c in cells) + f"  {fits:<4}  {plan.phase}")
    return "\n".join(lines), shape


def platform_cost_text(config: TrainingConfig) -> str:
    """The deployment's fixed monthly cost (what it costs before any run), from the same endpoint list the
    networking construct builds."""
    from spot_training.config import sizing
    from spot_training.config.endpoints import interface_endpoints

    rows = sizing.platform_monthly_cost(az_count=config.az_count,
                                        interface_endpoints=len(interface_endpoints(config.mlflow, config.capacity_ladder)),
                                        pipelines=1 + len(config.teams))
    lines = [f"platform fixed cost per month (whether or not it trains): ${sum(usd for _, usd in rows):,.2f}"]
    lines += [f"  {item}: ${usd:,.2f}" for item, usd in rows]
    lines.append(f"  plus VPC flow log ingestion at ${sizing.FLOW_LOG_USD_PER_GB:.2f} per GB"
                 + (" and the MLflow tracking server's hours" if config.mlflow else ""))
    return "\n".join(lines)


def sizing_text(w, instance_type: str) -> str:
    from spot_training.config import sizing

    completion = sizing.simulate(w)
    cost = sizing.cost(w)
    young = sizing.young_daly_interval_minutes(w)
    lines = [
        f"workload: {w.instance_count} x {instance_type}, {w.run_hours:g} h per run, {w.runs_per_month:g} runs per month",
        f"  instance-hours per run:   {sizing.instance_hours_per_run(w):g}",
        f"  instance-hours per month: {sizing.instance_hours_per_month(w):g}",
    ]
    if cost:
        lines += [f"  cost per run:   on-demand ${cost['on_demand_per_run']:,.2f}, spot-effective "
                  f"${cost['spot_per_run']:,.2f} ({w.spot_fraction:.0%} of on-demand)",
                  f"  cost per month: on-demand ${cost['on_demand_per_month']:,.2f}, spot-effective "
                  f"${cost['spot_per_month']:,.2f}"]
    else:
        lines.append(f"  cost: no price for {instance_type}; pass --price-per-hour")
    lines += [
        f"  retries before an SLO breach ({w.slo_hours:g} h SLO): {sizing.retries_before_slo_breach(w)}",
        f"  checkpoint interval: Young/Daly optimum {young:.1f} min (save {w.checkpoint_save_seconds:g} s, "
        f"{w.job_interruptions_per_hour:g} interruptions/h for the job); recommended "
        f"{sizing.recommended_interval_minutes(w):.1f} min to keep lost work under {w.max_lost_work_minutes:g} min",
        restart_line(w),
        f"  Monte Carlo ({w.interruptions_per_instance_hour:g} interruptions per instance-hour, "
        f"{w.restart_minutes:.1f} min per restart, checkpoint every {w.checkpoint_interval_minutes:g} min):",
        f"    completion p50 {completion.p50_hours:.2f} h, p90 {completion.p90_hours:.2f} h, p99 {completion.p99_hours:.2f} h; "
        f"{completion.mean_interruptions:.2f} interruptions on average",
        f"    probability of finishing within the {w.slo_hours:g} h SLO: {completion.probability_within_slo:.1%}",
    ]
    return "\n".join(lines)


def restart_line(w) -> str:
    from spot_training.config import sizing

    if not w.model_parameters:
        return (f"  restart: {w.restart_minutes:.1f} min = {w.provisioning_minutes:g} min provisioning; the checkpoint "
                "download is not counted (model size unknown: pass --parameters or set training.model_parameters)")
    model = (f" + the model channel {sizing.MODEL_BYTES_PER_PARAMETER * w.model_parameters / 1e9:,.1f} GB"
             if w.model_channel == "File" else ", model channel FastFile: not downloaded")
    if w.trained_parameters:  # LoRA: small checkpoints, and the frozen base read again at every start
        model = (f"; LoRA: checkpoints of the {w.trained_parameters:,} adapter parameters, and the frozen base "
                 f"({w.base_read_bytes / 1e9:,.1f} GB bf16) read again at every start from the model channel)")
    return (f"  restart: {w.restart_minutes:.1f} min = {w.provisioning_minutes:g} min provisioning + "
            f"{(w.restore_bytes + w.base_read_bytes) / 1e9:,.1f} GB per instance at {w.restore_gb_per_second:g} GB/s "
            f"({w.keep_checkpoints} checkpoints x {w.checkpoint_bytes / 1e9:,.1f} GB: "
            f"{sizing.CHECKPOINT_BYTES_PER_PARAMETER} bytes per trained parameter{model})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spot-training", description="Run, watch and size the SageMaker "
                                     "spot training pipeline.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    aws = argparse.ArgumentParser(add_help=False)
    aws.add_argument("--region", help="AWS region (default: AWS_REGION, else the region in ./cdk.json)")

    start = commands.add_parser("start", parents=[aws], help="start a training run (or resume a failed one)",
                                description="Starts one pipeline execution and prints its ARN. With a preparation "
                                "step, it first lists the data URIs (s3:ListBucket) and passes their fingerprint as "
                                "DataFingerprint, so the step's cache re-prepares rewritten data; a data URI without "
                                "objects is refused.")
    where = start.add_mutually_exclusive_group()
    where.add_argument("--pipeline-name", help="the pipeline (default: PipelineName in --outputs)")
    where.add_argument("--outputs", default="outputs.json", help="a `cdk deploy --outputs-file` file")
    start.add_argument("--parameter", action="append", metavar="NAME=VALUE",
                       help="pipeline parameter override, e.g. InstanceCount=4; repeatable")
    start.add_argument("--resume-from", metavar="EXECUTION",
                       help="rerun a Failed or Stopped execution (ARN or id): same id, so it continues from its checkpoints")
    start.add_argument("--resume-run", metavar="RUN",
                       help="start the next execution of run RUN (its RunId: the id of its first execution, unless "
                       "given) from its checkpoints, with the parameters of its latest execution; refused while one "
                       "of its executions runs")
    start.add_argument("--capacity", choices=("spot", "on-demand"), default="spot",
                       help="with --resume-run: the spot pipeline (default; --parameter InstanceType=... picks another "
                       "allowed type) or the -on-demand pipeline (training.capacity_ladder=true)")
    start.add_argument("--display-name", help="execution display name (default: run-<timestamp>)")
    start.set_defaults(handler=cmd_start)

    watch = commands.add_parser("watch", parents=[aws], help="follow a run live; non-zero exit if it fails",
                                description="Follows an execution: execution, step and training-job status with "
                                "secondary status transitions (spot interruptions, restarts, downloading, training), "
                                "elapsed and billable time. On failure prints the real reason and exits 1.")
    watch.add_argument("execution_arn")
    watch.add_argument("--interval", type=float, default=30.0, help="seconds between polls (default 30)")
    watch.add_argument("--timeout", type=float, help="give up after this many seconds (exit 2)")
    watch.set_defaults(handler=cmd_watch)

    report = commands.add_parser("report", parents=[aws], help="cost, savings, interruptions and checkpoints of a run")
    report.add_argument("execution_arn", nargs="?", help="one execution (ARN)")
    report.add_argument("--run", metavar="RUN", help="every execution of run RUN (its RunId) in the spot and on-demand "
                        "pipelines: rung, capacity wait, billable time, and the run's realized savings")
    where = report.add_mutually_exclusive_group()
    where.add_argument("--pipeline-name", help="with --run: the pipeline (default: PipelineName in --outputs)")
    where.add_argument("--outputs", default="outputs.json", help="a `cdk deploy --outputs-file` file")
    report.add_argument("--price-per-hour", type=float, help="on-demand USD per instance-hour (overrides the price file)")
    report.add_argument("--price-file", default=str(PRICES), help="JSON of instance type -> USD per instance-hour")
    report.add_argument("--chart", metavar="PNG", help="also draw a timeline chart")
    report.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    report.set_defaults(handler=cmd_report)

    registry = argparse.ArgumentParser(add_help=False, parents=[aws])
    group = registry.add_mutually_exclusive_group()
    group.add_argument("--group", help="the model package group (default: ModelPackageGroupName in --outputs)")
    group.add_argument("--outputs", default="outputs.json", help="a `cdk deploy --outputs-file` file")
    models = commands.add_parser("models", parents=[registry], help="the registered models: metrics and lineage, "
                                 "or two compared", description="Lists the group's model packages, newest first, "
                                 "with their evaluation (fine-tuned and base validation loss, improvement) and lineage; "
                                 "--compare A B shows two side by side.")
    models.add_argument("--status", choices=("PendingManualApproval", "Approved", "Rejected"))
    models.add_argument("--limit", type=_positive, default=20)
    models.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two packages: ARNs or version numbers")
    models.set_defaults(handler=cmd_models)
    for decision in ("approve", "reject"):
        review = commands.add_parser(decision, parents=[registry], help=f"{decision} a registered model (needs the "
                                     "approver policy)", description=f"Sets a model package "
                                     f"{'Approved' if decision == 'approve' else 'Rejected'} (UpdateModelPackage), "
                                     "with the reason as its ApprovalDescription.")
        review.add_argument("package", help="the model package ARN or version number")
        review.add_argument("--reason", required=True, help="why (kept on the package)")
        review.set_defaults(handler=cmd_review)

    size = commands.add_parser("size", help="sizing math: instance-hours, cost, retries, checkpoint interval, "
                               "completion-time Monte Carlo", description="Defaults come from ./cdk.json.")
    size.add_argument("--instance-type", default=load_config().instance_type)
    model = size.add_mutually_exclusive_group()
    model.add_argument("--model-config", metavar="CONFIG_JSON", help="a Hugging Face config.json: print the memory "
                       "per GPU of each allowed instance type and strategy instead of the cost sizing")
    model.add_argument("--parameters", type=_parameter_count, metavar="N", help="the same for a Llama 3 shaped "
                       "model of N parameters (8e9, 8B and 8030261248 all work)")
    size.add_argument("--memory-instance-type", dest="instance_types", action="append", metavar="TYPE",
                      help="with --model-config/--parameters: plan this type (repeatable; default: the config's "
                      "allowed instance types)")
    size.add_argument("--batch", type=_positive, help="sequences per GPU (default: per_device_batch_size)")
    size.add_argument("--sequence-length", type=_positive, help="tokens per sequence (default: sequence_length)")
    size.add_argument("--activation-checkpointing", choices=("auto", "true", "false"))
    size.add_argument("--method", choices=("full", "lora"), help="what is trained (default: method): lora plans the "
                      "frozen base with the adapters' gradients and AdamW state only, and sizes checkpoints and restarts "
                      "on the adapters (the base is read again at each start)")
    size.add_argument("--lora-rank", type=_positive, help="LoRA rank (default: lora_rank)")
    size.add_argument("--instance-count", dest="instance_count", type=int)
    size.add_argument("--run-hours", dest="run_hours", type=float)
    size.add_argument("--runs-per-month", dest="runs_per_month", type=float)
    size.add_argument("--slo-hours", dest="slo_hours", type=float)
    size.add_argument("--price-per-hour", dest="on_demand_price_per_instance_hour", type=float)
    size.add_argument("--price-file", default=str(PRICES))
    size.add_argument("--spot-fraction", dest="spot_fraction", type=float, help="spot-effective share of on-demand (0.35)")
    size.add_argument("--interruptions-per-instance-hour", dest="interruptions_per_instance_hour", type=float)
    size.add_argument("--checkpoint-save-seconds", dest="checkpoint_save_seconds", type=float)
    size.add_argument("--checkpoint-interval-minutes", dest="checkpoint_interval_minutes", type=float)
    size.add_argument("--provisioning-minutes", dest="provisioning_minutes", type=float,
                      help="capacity wait and instance start per restart, before downloads (10)")
    size.add_argument("--restore-gb-per-second", dest="restore_gb_per_second", type=float,
                      help="checkpoint download rate into one instance (1.0 GB/s)")
    size.add_argument("--model-channel", dest="model_channel", choices=("FastFile", "File"),
                      help="input mode of the model channel (the pipeline's: FastFile)")
    size.add_argument("--max-lost-minutes", dest="max_lost_work_minutes", type=float)
    size.add_argument("--capacity-ladder", action="store_true", help="also print the capacity ladder (spot on each "
                      "allowed type, then on-demand) with its wait budgets, and P(SLO met) and expected cost of "
                      "spot-only against the ladder over synthetic capacity traces")
    size.add_argument("--spot-wait-hours", type=float, default=1.0, help="traces: mean wait for spot capacity when it "
                      "comes (default 1)")
    size.add_argument("--spot-unavailable", type=float, default=0.15, help="traces: probability that an instance "
                      "type's spot capacity does not come within the deadline (default 0.15)")
    size.set_defaults(handler=cmd_size, flag_names={a.dest: a.option_strings[0] for a in size._actions
                                                    if a.option_strings})

    local = commands.add_parser("local-run", help="run the pipeline's training step on this machine, with "
                                "simulated spot interruptions",
                                description="Runs the same steps that `cdk synth` builds (config from "
                                "./cdk.json) on the local CPU: the preparation, the training on N emulated "
                                "instances with checkpoints synced to a local S3 folder and spot interruptions "
                                "injected, then the evaluation and its gate, writing the registration request it would "
                                "send. Writes OUT/report.json; exits 1 when the gate refuses the model.")
    local.add_argument("--steps", type=_positive, required=True, help="optimizer steps (pipeline parameter MaxSteps)")
    local.add_argument("--interrupt-at-step", type=_positive, action="append", metavar="K",
                       help="interrupt every instance once step K is reached; repeatable; none: no interruption")
    local.add_argument("--interrupt-during-save", type=_positive, action="append", metavar="K",
                       help="interrupt every instance while the first checkpoint write of step K or later is in "
                       "progress (a reclaim in the middle of a save); repeatable. A save too quick to catch "
                       "(polled every 0.05 s) leaves the run uninterrupted, as the report then shows")
    local.add_argument("--capacity-failure-at-step", type=_positive, metavar="K",
                       help="once step K is reached the instances are reclaimed and spot capacity never comes back: the "
                       "job ends MaxWaitTimeExceeded, the capacity ladder decides as its controller does, and the run's "
                       "next execution (the on-demand pipeline's, same RunId) resumes from the run's checkpoints; needs "
                       "training.capacity_ladder=true")
    local.add_argument("-c", "--context", action="append", metavar="training.FIELD=VALUE",
                       help="override a setting of ./cdk.json, as `cdk synth -c` does; repeatable")
    local.add_argument("--out", required=True, help="folder for instances, local S3, logs and report.json; an "
                       "unfinished run there (local-run was stopped) is resumed from its checkpoints")
    local.add_argument("--restart", action="store_true", help="discard an unfinished run in --out and start over")
    local.add_argument("--parameter", action="append", metavar="NAME=VALUE",
                       help="a pipeline parameter for this execution, as `spot-training start` takes it (over the "
                       "CPU-sized local values); repeatable, e.g. EvaluationMinImprovement=0.5")
    local.add_argument("--processes-per-host", type=_positive, default=1, metavar="N",
                       help="training processes per emulated instance (default 1: the toolkit starts one per GPU, "
                       "and one on a CPU instance; N is passed as its sagemaker_mpi_num_of_processes_per_host "
                       "hyperparameter)")
    local.set_defaults(handler=cmd_local_run)

    compare = commands.add_parser("compare-runs", help="compare two runs: final loss and parameters, exactly or "
                                  "within a tolerance", description=cmd_compare_runs.__doc__)
    compare.add_argument("reference", help="a local-run --out folder, or a model folder (*.safetensors)")
    compare.add_argument("candidate", help="another local-run --out folder or model folder")
    compare.add_argument("--tolerance", type=_fraction, metavar="R", help="relative tolerance instead of "
                         "bit-identity, for GPU runs (take it from two runs of the same configuration without "
                         "interruptions: the spread that nondeterminism alone makes)")
    compare.set_defaults(handler=cmd_compare_runs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (CliError, ConfigError, OperationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # AWS errors: one line with the service's own message, no traceback
        import botocore.exceptions

        if isinstance(error, botocore.exceptions.ClientError):
            print(f"error: AWS {error.operation_name}: {error.response['Error'].get('Message', error)}", file=sys.stderr)
            return 1
        if isinstance(error, botocore.exceptions.BotoCoreError):
            print(f"error: AWS: {error}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
