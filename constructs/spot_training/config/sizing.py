"""The sizing model: capacity, cost, retries, checkpoint interval and completion time under interruptions.

Used by `spot-training size` and by the synth-time guardrails, so both say the same thing.

- instance-hours per run = instance_count x run_hours; per month = that x runs_per_month.
- spot-effective price = spot_fraction x on-demand (default 35%).
- retries before an SLO breach = floor(slo_hours / run_hours) - 1.
- checkpoint interval: Young's first-order optimum tau = sqrt(2 x C x MTBF) (Young 1974; Daly 2006), where C
  is the time a save blocks training and MTBF = 1 / (instance_count x interruptions per instance-hour),
  capped so that the worst-case lost work per interruption (one interval) stays under the target.
- restart time after an interruption = provisioning (capacity wait, instance and container start) + what
  SageMaker downloads to every instance before the trainer starts, at the instance's download rate:
  the whole checkpoint prefix (SageMaker restores all of it to every instance: CheckpointConfig), that is up
  to `keep_checkpoints` checkpoints of `CHECKPOINT_BYTES_PER_PARAMETER` bytes per parameter, plus the model
  channel when it is in File mode (FastFile, the pipeline's choice, streams it: nothing before the start, and
  a resume does not read the base weights at all).
- Monte Carlo: interruptions arrive as a Poisson process at the job's rate; each one loses the work since
  the last checkpoint and costs a restart; every interval of work costs C more. Gives completion-time
  percentiles and the probability of meeting the SLO.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics

# A checkpoint holds the fp32 weights (4 bytes per parameter) and AdamW's two fp32 moments (8): DCP of
# get_state_dict(model, optimizer), whatever the strategy or world size. Measured by benchmarks/planner.py
# (the trainer's own step folders) and tests/test_memory_planner.py: 12.0 bytes per parameter and a few KiB.
CHECKPOINT_BYTES_PER_PARAMETER = 12
# The base model as safetensors in bf16 (Hugging Face's published Llama 3 weights): 2 bytes per parameter.
MODEL_BYTES_PER_PARAMETER = 2
# SageMaker documents no rate for its checkpoint restore or File-mode channel copy. The best measured S3
# download into one instance is ~6.3 GB/s (p3dn.24xlarge, 100 Gbps, many parallel requests: dvassallo
# s3-benchmark, 2019, github.com/dvassallo/s3-benchmark); the SageMaker agent is one copier per instance.
# 1 GB/s is the planning figure: read yours from a restarted job's "Downloading" secondary status time.
RESTORE_GB_PER_SECOND = 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Workload:
    instance_count: int = 2
    run_hours: float = 6.0
    runs_per_month: float = 4.0
    slo_hours: float = 24.0
    on_demand_price_per_instance_hour: float | None = None
    spot_fraction: float = 0.35
    interruptions_per_instance_hour: float = 0.05
    checkpoint_save_seconds: float = 30.0
    provisioning_minutes: float = 10.0
    model_parameters: int = 0           # 0: unknown (restart time without downloads)
    trained_parameters: int = 0         # LoRA: the adapters' parameters; 0: every parameter is trained (full)
    keep_checkpoints: int = 2
    restore_gb_per_second: float = RESTORE_GB_PER_SECOND
    model_channel: str = "FastFile"
    max_lost_work_minutes: float = 10.0
    checkpoint_interval_minutes: float = 10.0

    def __post_init__(self) -> None:
        for name in ("instance_count", "run_hours", "runs_per_month", "slo_hours", "spot_fraction",
                     "checkpoint_interval_minutes", "max_lost_work_minutes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be above 0")
        for name in ("interruptions_per_instance_hour", "checkpoint_save_seconds", "provisioning_minutes",
                     "model_parameters"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be 0 or more")
        if self.spot_fraction > 1:
            raise ValueError(f"spot_fraction={self.spot_fraction}: must be at most 1")
        if self.restore_gb_per_second <= 0:
            raise ValueError(f"restore_gb_per_second={self.restore_gb_per_second}: must be above 0")
        if self.keep_checkpoints < 2:
            raise ValueError(f"keep_checkpoints={self.keep_checkpoints}: must be at least 2")
        if self.model_channel not in ("File", "FastFile"):
            raise ValueError(f"model_channel={self.model_channel}: must be File or FastFile")

    @property
    def checkpoint_bytes(self) -> int:
        """What one checkpoint holds: 12 bytes per trained parameter (the fp32 weight and AdamW's two moments;
        tests/trainer/test_lora.py counts them in real checkpoints, full and LoRA)."""
        return CHECKPOINT_BYTES_PER_PARAMETER * (self.trained_parameters or self.model_parameters)

    @property
    def restore_bytes(self) -> int:
        """What every instance downloads before a restarted job trains: the checkpoint prefix (the kept
        checkpoints; one more, partly written, when the interruption lands during a save) and a File-mode
        model channel."""
        model = MODEL_BYTES_PER_PARAMETER * self.model_parameters if self.model_channel == "File" else 0
        return self.keep_checkpoints * self.checkpoint_bytes + model

    @property
    def base_read_bytes(self) -> int:
        """What a LoRA restart reads of the base model besides (its checkpoint holds only the adapters, so every
        start reads the frozen base: bf16 safetensors streamed from the model channel); 0 for full training, whose
        checkpoint replaces the base."""
        return MODEL_BYTES_PER_PARAMETER * self.model_parameters if self.trained_parameters else 0

    @property
    def restart_minutes(self) -> float:
        return self.provisioning_minutes + (self.restore_bytes + self.base_read_bytes) / (
            self.restore_gb_per_second * 1e9) / 60

    @property
    def job_interruptions_per_hour(self) -> float:
        """Any instance reclaimed interrupts the whole job."""
        return self.instance_count * self.interruptions_per_instance_hour


@dataclasses.dataclass(frozen=True)
class Completion:
    p50_hours: float
    p90_hours: float
    p99_hours: float
    mean_interruptions: float
    probability_within_slo: float
    training_hours_p90: float


def instance_hours_per_run(w: Workload) -> float:
    return w.instance_count * w.run_hours


def instance_hours_per_month(w: Workload) -> float:
    return instance_hours_per_run(w) * w.runs_per_month


def retries_before_slo_breach(w: Workload) -> int:
    return max(0, math.floor(w.slo_hours / w.run_hours) - 1)


def young_daly_interval_minutes(w: Workload) -> float:
    """sqrt(2 C M), C = save cost, M = mean time between job interruptions; infinite without interruptions."""
    if w.job_interruptions_per_hour == 0:
        return math.inf
    mtbf_minutes = 60 / w.job_interruptions_per_hour
    return math.sqrt(2 * (w.checkpoint_save_seconds / 60) * mtbf_minutes)


def recommended_interval_minutes(w: Workload) -> float:
    """Young/Daly's optimum, capped so one interval (the worst-case loss) stays under the target."""
    return min(young_daly_interval_minutes(w), w.max_lost_work_minutes)


def one_run(w: Workload, rng: random.Random) -> tuple[float, float, int]:
    """One simulated run once capacity is there: (wall hours, training hours, interruptions)."""
    tau, save_hours = w.checkpoint_interval_minutes / 60, w.checkpoint_save_seconds / 3600
    rate, restart = w.job_interruptions_per_hour, w.restart_minutes / 60
    done = wall = training = 0.0
    interruptions = 0
    while done < w.run_hours:
        # Wall time needed from here to finish, saving every tau of work.
        remaining = w.run_hours - done
        needed = remaining + math.floor(remaining / tau) * save_hours
        gap = rng.expovariate(rate) if rate > 0 else math.inf
        if gap >= needed:
            wall += needed
            training += needed
            break
        # Interrupted after `gap`: keep the work up to the last completed save.
        saved_intervals = math.floor(gap / (tau + save_hours))
        done += saved_intervals * tau
        wall += gap + restart
        training += gap
        interruptions += 1
    return wall, training, interruptions


def simulate(w: Workload, *, trials: int = 4000, seed: int = 0) -> Completion:
    rng = random.Random(seed)
    walls, trainings, counts = [], [], []
    for _ in range(trials):
        wall, training, interruptions = one_run(w, rng)
        walls.append(wall)
        trainings.append(training)
        counts.append(interruptions)
    walls.sort()
    trainings.sort()

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))]

    return Completion(p50_hours=pct(walls, 0.5), p90_hours=pct(walls, 0.9), p99_hours=pct(walls, 0.99),
                      mean_interruptions=statistics.fmean(counts),
                      probability_within_slo=sum(x <= w.slo_hours for x in walls) / trials,
                      training_hours_p90=pct(trainings, 0.9))


def cost(w: Workload) -> dict[str, float] | None:
    if w.on_demand_price_per_instance_hour is None:
        return None
    on_demand = instance_hours_per_month(w) * w.on_demand_price_per_instance_hour
    return {"on_demand_per_run": instance_hours_per_run(w) * w.on_demand_price_per_instance_hour,
            "spot_per_run": instance_hours_per_run(w) * w.on_demand_price_per_instance_hour * w.spot_fraction,
            "on_demand_per_month": on_demand, "spot_per_month": on_demand * w.spot_fraction}


def guardrail_findings(w: Workload, *, use_spot: bool, max_run_seconds: int, max_wait_seconds: int,
                       retry_attempts: int) -> list[str]:
    """What in the deployment's limits the sizing model says will not hold, each as one sentence."""
    findings = []
    if w.checkpoint_interval_minutes > w.max_lost_work_minutes:
        findings.append(f"checkpoint_interval_minutes={w.checkpoint_interval_minutes:g} can lose up to "
                        f"{w.checkpoint_interval_minutes:g} minutes of work per interruption, more than "
                        f"max_lost_work_minutes={w.max_lost_work_minutes:g}")
    if retry_attempts * w.run_hours > w.slo_hours:
        findings.append(f"retry_attempts={retry_attempts} x expected_run_hours={w.run_hours:g} = "
                        f"{retry_attempts * w.run_hours:g} h exceeds slo_hours={w.slo_hours:g}")
    if use_spot:
        completion = simulate(w, trials=2000)
        if completion.p90_hours * 3600 > max_wait_seconds:
            findings.append(f"max_wait_seconds={max_wait_seconds} does not cover the 90th-percentile completion "
                            f"time with interruptions ({completion.p90_hours * 3600:.0f} s)")
        if completion.training_hours_p90 * 3600 > max_run_seconds:
            findings.append(f"max_run_seconds={max_run_seconds} does not cover the 90th-percentile training "
                            f"time with interruptions ({completion.training_hours_p90 * 3600:.0f} s)")
    elif w.run_hours * 3600 > max_run_seconds:
        findings.append(f"max_run_seconds={max_run_seconds} is below expected_run_hours={w.run_hours:g}")
    return findings


# Fixed monthly prices, us-east-1, 2026 (approximate; each from the service's public pricing page):
KMS_KEY_USD_MONTH = 1.00            # AWS KMS pricing: each customer managed key, per month
ALARM_USD_MONTH = 0.10              # Amazon CloudWatch pricing: standard-resolution alarm metric, per month
CUSTOM_METRIC_USD_MONTH = 0.30      # Amazon CloudWatch pricing: custom metric, first 10,000, per month
FLOW_LOG_USD_PER_GB = 0.50          # Amazon CloudWatch pricing: vended logs (VPC flow logs) ingestion, first 10 TB
ALARMS_PER_PIPELINE = 3             # spot_training.cdk.alarms: execution failed, running too long, monitor errors


def platform_monthly_cost(*, az_count: int, interface_endpoints: int, pipelines: int) -> list[tuple[str, float]]:
    """What the deployed platform costs per month whether or not it trains: (item, USD) rows. Keys: the
    artifact key, the flow log key, the run identity's key (shared by the teams' pipelines) and one alarm key per
    pipeline; alarms and the monitor's custom metric per pipeline; interface endpoints per AZ. Flow log ingestion
    depends on traffic and is not included, nor the Lambda invocations (one per execution, one per ended
    execution with the capacity ladder: within Lambda's free tier)."""
    from spot_training.config.endpoints import ENDPOINT_USD_PER_AZ_MONTH

    keys = 3 + pipelines
    return [
        (f"{interface_endpoints} interface endpoints x {az_count} AZs", interface_endpoints * az_count * ENDPOINT_USD_PER_AZ_MONTH),
        (f"{keys} KMS keys", keys * KMS_KEY_USD_MONTH),
        (f"{ALARMS_PER_PIPELINE * pipelines} CloudWatch alarms", ALARMS_PER_PIPELINE * pipelines * ALARM_USD_MONTH),
        (f"{pipelines} custom metric(s) of the alarm monitor", pipelines * CUSTOM_METRIC_USD_MONTH),
    ]
