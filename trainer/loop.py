"""The training loop: a small Trainer around a Hugging Face causal LM, DDP or FSDP2, and the Checkpointer."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

import environment
import log_format
import lora
import memory
import modeling
from checkpointing import CheckpointLayoutError, Checkpointer
from data import BlockDataset, load_tokens
from environment import Topology
from settings import TrainSettings
from tracking import Tracker

log = logging.getLogger("trainer")


def learning_rate_factor(step: int, settings: TrainSettings) -> float:
    """Linear warmup, then cosine decay to `min_learning_rate_ratio` of the peak at max_steps."""
    if step < settings.warmup_steps:
        return (step + 1) / (settings.warmup_steps + 1)
    progress = (step - settings.warmup_steps) / max(1, settings.max_steps - settings.warmup_steps)
    floor = settings.min_learning_rate_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    def __init__(self, settings: TrainSettings, topology: Topology) -> None:
        self.settings, self.topology = settings, topology
        if settings.deterministic:  # before any CUDA work: cuBLAS reads its workspace setting once
            switched = environment.make_deterministic()
            if topology.is_main:
                print(f"[determinism] on: {', '.join(switched)}", flush=True)
        self.device = torch.device(f"cuda:{topology.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        # Weight loading and checkpoint I/O run on a gloo group of their own (see Checkpointer).
        self.io_group = dist.new_group(backend="gloo")
        self.bf16 = settings.mixed_precision == "bf16" or (settings.mixed_precision == "auto"
                                                            and self.device.type == "cuda")
        before = _resident_bytes()
        _reset_peak_resident()
        started = time.perf_counter()
        self._build_model()
        # Every rank reports its own start-up: host memory is where a whole-model load used to show (eight
        # copies per p4d node); benchmarks/scale.py reads these lines.
        print(f"[startup] rank={topology.rank} seconds={time.perf_counter() - started:.2f} "
              f"rss_before_bytes={before} peak_rss_bytes={_peak_resident()}", flush=True)
        # DDP computes under autocast; FSDP's MixedPrecisionPolicy already gathers bf16 weights for compute.
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 and self.strategy == "ddp"
                         else contextlib.nullcontext())
        trained = [p for p in self.model.parameters() if p.requires_grad]  # the adapters only, with LoRA
        decay = [p for p in trained if p.dim() >= 2]
        no_decay = [p for p in trained if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=settings.learning_rate, betas=(0.9, 0.95), eps=1e-8)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: learning_rate_factor(step, settings))
        source = {"model_dir": settings.model_dir, "vocab_size": self.model_config.vocab_size}
        self.data = BlockDataset(load_tokens(settings.train_dir, self.tokenizer, **source), settings.sequence_length,
                                 settings.seed)
        if settings.validation_dir:
            self.validation = BlockDataset(load_tokens(settings.validation_dir, self.tokenizer, **source),
                                           settings.sequence_length, settings.seed)
            origin = "the validation channel"
        else:
            self.data, self.validation = self.data.split(settings.validation_holdout_fraction)
            origin = f"held out of train ({settings.validation_holdout_fraction:g})"
        if topology.is_main:
            validation = f"{self.validation.num_blocks} blocks from {origin}" if self.validation else "none"
            print(f"[data] train={self.data.num_blocks} blocks of {self.data.block} tokens validation={validation}",
                  flush=True)
        self.tracker = Tracker(settings.mlflow_tracking_uri, settings.mlflow_experiment, settings, topology.is_main)
        self.checkpointer = Checkpointer(settings.checkpoint_dir, topology, keep=settings.keep_checkpoints,
                                         interval_minutes=settings.checkpoint_interval_minutes,
                                         every_steps=settings.checkpoint_every_steps,
                                         async_save=settings.async_checkpoint, device=self.device, group=self.io_group,
                                         on_complete=self.tracker.log_checkpoint)
        self.step, self.samples_seen, self.resumed_from = 0, 0, None
        self.stop_requested = False
        self.last_loss = float("nan")
        signal.signal(signal.SIGTERM, self._on_sigterm)

    # ---- setup ------------------------------------------------------------------------------------
    def _build_model(self) -> None:
        """The model on the meta device, sharded (FSDP) or not (DDP), then each rank's part allocated and the base
        weights read into it (see modeling.py): no rank ever holds the whole model under FSDP."""
        s, t = self.settings, self.topology
        self.model_config = modeling.read_config(s.model_dir)
        files = modeling.weight_files(s.model_dir)
        self.tokenizer = modeling.load_tokenizer(s.model_dir)
        with modeling.no_init_warnings():
            model = modeling.empty_model(self.model_config)
        self.parameter_count = modeling.parameter_count(model)
        self.lora_config = None
        if s.method == "lora":  # adapters on the meta device too, before sharding (lora.py)
            self.lora_config = lora.config(s.lora_rank, s.lora_alpha, s.lora_dropout, s.lora_target_modules)
            lora.inject(model, self.lora_config)
        # The adapters as injected (0: full training): what the memory plan counts as trained.
        self.lora_parameters = sum(p.numel() for n, p in model.named_parameters() if lora.is_adapter(n))
        self.strategy, why = self._choose_strategy()
        self.activation_checkpointing = memory.checkpointing_on(s.activation_checkpointing, self.strategy)
        self._check_fit()  # before any storage is allocated or weights read
        if self.activation_checkpointing:
            model.config.use_cache = False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.strategy == "fsdp":
            model = modeling.shard(model, bf16=self.bf16)
        modeling.materialize(model, self.device)
        # A restart resumes from a checkpoint that overwrites every parameter: reading the base weights first
        # would only cost their download-speed read (minutes at 70B). They are read later if no checkpoint loads.
        # A LoRA checkpoint holds the adapters only: the base weights are always read.
        self.weights_deferred = bool(files) and self.lora_config is None and self._checkpoint_on_every_rank()
        if files and not self.weights_deferred:
            modeling.load_weights(model, s.model_dir, self.io_group)
        elif not files:
            log.warning("model_dir=%s holds no weights: initialising the model randomly from config.json (seed %d)",
                        s.model_dir, s.seed)
            modeling.init_random(model, s.seed)
        if self.lora_config is not None:
            lora.init_adapters(model, s.seed, modeling._assign)
        self.raw_model = model
        self.model = model if self.strategy == "fsdp" else DDP(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None, gradient_as_bucket_view=True)
        if t.is_main and self.lora_config is not None:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"[lora] rank {s.lora_rank}, alpha {s.lora_alpha:g}, dropout {s.lora_dropout:g}, modules "
                  f"{s.lora_target_modules}: {trainable:,} trainable parameters beside the frozen base", flush=True)
        if t.is_main:
            print(f"[model] {self.parameter_count:,} parameters, strategy {self.strategy} ({why}), activation "
                  f"checkpointing {'on' if self.activation_checkpointing else 'off'}, "
                  f"{'bf16' if self.bf16 else 'fp32'}, weights {self._weights_origin(files)}", flush=True)

    def _checkpoint_on_every_rank(self) -> bool:
        """Whether every rank sees a complete checkpoint to resume from (all must agree: weight loading is
        collective)."""
        from checkpointing import marked_steps

        flag = torch.tensor([float(bool(marked_steps(Path(self.settings.checkpoint_dir))))])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.io_group)
        return bool(flag.item())

    def _weights_origin(self, files: list) -> str:
        if self.weights_deferred:
            return f"from the checkpoint (the {len(files)} base safetensors file(s) are not read)"
        return f"from {len(files)} safetensors file(s)" if files else "random"

    def _device_memory(self) -> int | None:
        """Bytes of one GPU: the setting when given, else the device's; None on CPU without the setting."""
        if self.settings.gpu_memory_gib:
            return int(self.settings.gpu_memory_gib * memory.GIB)
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).total_memory
        return None

    def _shape(self) -> memory.ModelShape | str:
        try:
            return memory.ModelShape.from_config(self.model_config.to_dict())
        except memory.PlanError as error:
            return str(error)

    def _choose_strategy(self) -> tuple[str, str]:
        s, t = self.settings, self.topology
        if s.strategy != "auto":
            return s.strategy, "set"
        gpu_bytes = self._device_memory()
        if gpu_bytes is None:  # CPU runs: the host's memory shared by the local processes
            gpu_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // t.local_world_size
        shape = self._shape()
        if isinstance(shape, str):
            return ("fsdp" if t.world_size > 1 else "ddp"), f"auto, no memory plan: {shape}"
        ddp = memory.plan(shape, strategy="ddp", world_size=t.world_size, batch=s.per_device_batch_size,
                          sequence_length=s.sequence_length, activation_checkpointing=s.activation_checkpointing == "true",
                          bf16=self.bf16, accumulation=s.gradient_accumulation_steps, gpu_bytes=gpu_bytes,
                          lora_parameters=self.lora_parameters)
        return memory.strategy_for(ddp, t.world_size), (f"auto: ddp needs {ddp.total / memory.GIB:.1f} GiB per device "
                                                         f"of {gpu_bytes / memory.GIB:.1f} GiB")

    def _check_fit(self) -> None:
        """Stop in one line, before any weights are read, when the memory plan for this world size exceeds the
        GPU (or `gpu_memory_gib`), naming the settings that would fit. A model the planner cannot describe,
        or a CPU run without `gpu_memory_gib`, is not checked."""
        s, t = self.settings, self.topology
        gpu_bytes, shape = self._device_memory(), self._shape()
        if gpu_bytes is None or isinstance(shape, str):
            return
        problem = memory.fit_error(shape, strategy=self.strategy, world_size=t.world_size,
                                   gpus_per_instance=t.local_world_size, batch=s.per_device_batch_size,
                                   sequence_length=s.sequence_length,
                                   activation_checkpointing="true" if self.activation_checkpointing else "false",
                                   bf16=self.bf16, accumulation=s.gradient_accumulation_steps, gpu_bytes=gpu_bytes,
                                   lora_parameters=self.lora_parameters)
        if problem:
            raise memory.DoesNotFit(f"the model does not fit GPU memory: {problem}")

    def _on_sigterm(self, signum, frame) -> None:
        # SageMaker's stop signal (120 s grace on StopTrainingJob). Finish the step in progress, then
        # stop on every rank at once; no last-moment save (spot reclaims may not wait for it).
        self.stop_requested = True

    # ---- checkpoint state ------------------------------------------------------------------------------
    def _lora_metadata(self) -> dict[str, Any] | None:
        s = self.settings
        return {"rank": s.lora_rank, "alpha": s.lora_alpha, "target_modules": s.lora_target_modules} \
            if self.lora_config is not None else None

    def _metadata(self) -> dict[str, Any]:
        return {"last_loss": self.last_loss, "method": self.settings.method, "lora": self._lora_metadata()}

    def _state_options(self) -> StateDictOptions:
        """With LoRA, what changes: the adapters (the frozen base is read from the base model at every start)."""
        return StateDictOptions(ignore_frozen_params=self.lora_config is not None,
                                strict=self.lora_config is None)

    def _state(self, include_rng: bool = True) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self._state_options())
        if self.lora_config is not None:  # a frozen weight tied to another (lm_head) escapes ignore_frozen_params
            model_state = {name: value for name, value in model_state.items() if lora.is_adapter(name)}
        state = {"model": model_state, "optim": optim_state, "scheduler": self.scheduler.state_dict(),
                 "progress": {"step": self.step, "samples_seen": self.samples_seen}}
        if include_rng:
            rng = {"torch": torch.get_rng_state()}
            if self.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.device)
            state[f"rng_rank{self.topology.rank}"] = rng
        return state

    def _state_for(self, manifest: dict[str, Any]) -> dict[str, Any]:
        method = manifest.get("method", "full")
        if method != self.settings.method:  # a checkpoint holds what its method trains: the base or not
            raise CheckpointLayoutError(f"the checkpoint {manifest.get('step', '?')} in {self.settings.checkpoint_dir} was "
                                     f"written by a method={method} run and this run is method={self.settings.method}; "
                                     "resume with the same method, or start a new run (another RunId)")
        if manifest.get("lora", self._lora_metadata()) != self._lora_metadata():  # other shapes or scaling
            raise CheckpointLayoutError(f"the checkpoint {manifest.get('step', '?')} in {self.settings.checkpoint_dir} "
                                        f"holds adapters {manifest['lora']}, this run's are {self._lora_metadata()}; "
                                        "resume with the same LoRA settings, or start a new run (another RunId)")
        # Dropout RNG streams are per rank: they carry over only when the world size is unchanged.
        return self._state(include_rng=manifest["world_size"] == self.topology.world_size)

    def _apply(self, state: dict[str, Any], manifest: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self._state_options())
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.samples_seen = int(state["progress"]["step"]), int(state["progress"]["samples_seen"])
        rng = state.get(f"rng_rank{self.topology.rank}")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        else:
            self._seed_dropout()
        self.resumed_from = self.step
        self.last_loss = float(manifest.get("last_loss", self.last_loss))  # a run resumed at its end reports it

    def _seed_dropout(self) -> None:
        torch.manual_seed(self.settings.seed + 7919 * (self.topology.rank + 1) + self.step)

    # ---- training ---------------------------------------------------------------------------------
    def train(self) -> int:
        """Returns the process exit code: 0 when done or stopped by SIGTERM."""
        self._seed_dropout()
        self.checkpointer.load_latest(self._state_for, self._apply)
        if self.weights_deferred and self.resumed_from is None:  # every checkpoint was damaged: start afresh
            if self.topology.is_main:
                print("[model] no checkpoint could be loaded: reading the base weights now", flush=True)
            modeling.load_weights(self.raw_model, self.settings.model_dir, self.io_group)
            self.weights_deferred = False
        if self.topology.is_main:
            start = f"resuming at step {self.step}" if self.resumed_from is not None else "starting at step 0"
            print(f"[start] {start} of {self.settings.max_steps}, world size {self.topology.world_size}, "
                  f"strategy {self.strategy}, device {self.device.type}", flush=True)
        _reset_peak_resident()  # from here on the peak is training's (benchmarks/scale.py reads [memory])
        while self.step < self.settings.max_steps:
            started = time.perf_counter()
            loss = self._run_step()
            if self.step % self.settings.log_every_steps == 0 or self.step == self.settings.max_steps:
                self._log_step(loss, started)
            if self.settings.eval_every_steps and self.validation and self.step % self.settings.eval_every_steps == 0:
                self._evaluate()
            if self.checkpointer.poll(self.step, self._state, stop_requested=self.stop_requested,
                                      metadata=self._metadata()):
                if self.topology.is_main:  # before the wait: a save in flight may outlast the stop's grace
                    print(f"[stop] SIGTERM: stopping after step {self.step}"
                          + (", once the checkpoint in flight is written" if self.checkpointer.pending else ""),
                          flush=True)
                self.checkpointer.wait()
                if self.topology.is_main:
                    print(f"[stop] SIGTERM: stopped after step {self.step}; the next start resumes from the newest "
                          "complete checkpoint", flush=True)
                self.tracker.finish("KILLED")
                return 0
        print(f"[memory] rank={self.topology.rank} training_peak_rss_bytes={_peak_resident()}", flush=True)
        if self.validation:
            self._evaluate()
        # A restart after this point only rewrites the model.
        self.checkpointer.save(self.step, self._state, metadata=self._metadata())
        self.checkpointer.wait()
        self._save_model()
        self.tracker.finish("FINISHED")
        return 0

    def _run_step(self) -> torch.Tensor:
        s, t = self.settings, self.topology
        self.model.train()
        micro_samples = t.world_size * s.per_device_batch_size
        parts = [self.data.batch_parts(self.samples_seen + micro * micro_samples + t.rank * s.per_device_batch_size,
                                       s.per_device_batch_size) for micro in range(s.gradient_accumulation_steps)]
        # The loss is the mean over every trained target of the step, on every rank: each micro-step's sum is
        # divided by the step's trained-target count across micro-steps and ranks (one all-reduce of the counts,
        # read from the masks before any forward). DDP and FSDP average gradients over ranks, hence x world size.
        count = torch.tensor(sum(int(trained.sum()) if trained is not None else tokens[:, 1:].numel()
                                 for tokens, trained, _ in parts), device=self.device, dtype=torch.float32)
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        scale = t.world_size / count.clamp(min=1)
        total = torch.zeros((), device=self.device)
        for micro, (tokens, trained, positions) in enumerate(parts):
            last = micro == s.gradient_accumulation_steps - 1
            with self._gradient_sync(last):
                loss_sum, _ = self._loss_sum(tokens, trained, positions)
            (loss_sum * scale).backward()
            total += loss_sum.detach()
        if s.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.max_grad_norm)
        self.last_learning_rate = self.optimizer.param_groups[0]["lr"]
        self.checkpointer.wait_for_staging()  # an async save may still be copying the weights we update now
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples_seen += micro_samples * s.gradient_accumulation_steps
        return total * scale  # summed over ranks and divided by the world size (_log_step): the step's mean

    def _loss_sum(self, tokens: torch.Tensor, trained: torch.Tensor | None,
                  positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the next-token cross-entropy over the trained targets, their count) of a batch of
        `sequence_length + 1` token blocks; packed examples (positions given) attend only within themselves."""
        tokens = tokens.to(self.device, non_blocking=True)
        inputs: dict[str, torch.Tensor] = {"input_ids": tokens[:, :-1]}
        if positions is not None:
            positions = positions.to(self.device)
            inputs.update(position_ids=positions, attention_mask=modeling.packed_attention_mask(
                positions, torch.bfloat16 if self.bf16 else torch.float32))
        with self.autocast:
            logits = self.model(**inputs).logits
        return modeling.next_token_loss_sum(logits, tokens, trained)

    def _gradient_sync(self, enabled: bool):
        """DDP: skip the gradient all-reduce on all but the last micro-step of an accumulation (its gradients
        are whole on every rank anyway). FSDP: reduce-scatter on every micro-step, so that gradients accumulate
        sharded. Skipping the sync there (`set_requires_gradient_sync(False)`) keeps a full unsharded fp32
        gradient per parameter on every rank until the last micro-step (torch 2.8 `_fsdp_param.py`,
        `unsharded_accumulated_grad`): the whole fp32 model more per rank, +30 GiB per GPU for 8B. torchtitan
        reduce-scatters every micro-step too."""
        if isinstance(self.model, DDP):
            return contextlib.nullcontext() if enabled else self.model.no_sync()
        return contextlib.nullcontext()

    def _log_step(self, loss: torch.Tensor, started: float) -> None:
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        value = loss.item() / self.topology.world_size
        # Timed after .item(): on GPU the step's kernels run asynchronously, and only this sync says they ended.
        seconds = time.perf_counter() - started
        self.last_loss = value
        s = self.settings
        tokens = self.topology.world_size * s.per_device_batch_size * s.gradient_accumulation_steps * s.sequence_length
        if self.topology.is_main:
            learning_rate = self.last_learning_rate
            print(log_format.train_line(step=self.step, loss=value, learning_rate=learning_rate,
                                        tokens_per_second=tokens / seconds), flush=True)
            self._append_metrics({"step": self.step, "loss": value, "learning_rate": learning_rate,
                                  "tokens_per_second": tokens / seconds, "resumed_from": self.resumed_from})
            self.tracker.log_metrics({"loss": value, "learning_rate": learning_rate,
                                      "tokens_per_second": tokens / seconds}, step=self.step)

    def _append_metrics(self, record: dict[str, Any]) -> None:
        folder = Path(self.settings.output_data_dir)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def _evaluate(self) -> None:
        self.model.eval()
        s, t = self.settings, self.topology
        sums = torch.zeros(2, device=self.device)  # loss sum, trained targets
        for index in range(s.eval_batches):
            first = (index * t.world_size + t.rank) * s.per_device_batch_size
            loss_sum, count = self._loss_sum(*self.validation.batch_parts(first, s.per_device_batch_size))
            sums += torch.stack([loss_sum, count.to(loss_sum.dtype)])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        value = (sums[0] / sums[1].clamp(min=1)).item()
        if t.is_main:
            print(log_format.validation_line(step=self.step, loss=value), flush=True)
            self._append_metrics({"step": self.step, "validation_loss": value})
            self.tracker.log_metrics({"validation_loss": value}, step=self.step)

    def _save_model(self) -> None:
        """The fine-tuned model in Hugging Face format: safetensors files written by the first instance's ranks,
        gathered one tensor at a time (modeling.export); rank 0 adds config, tokenizer and the run summary."""
        t = self.topology
        out = Path(self.settings.output_model_dir)
        files = modeling.export(self.raw_model, self.model_config, str(out), rank=t.rank, writers=t.local_world_size)
        if self.lora_config is not None:  # and the adapter alone, in peft's format, beside the merged model
            lora.export_adapter(self.raw_model, self.lora_config, out / lora.ADAPTER_DIR, self.settings.model_dir,
                                modeling._full, write=t.is_main)
        if t.is_main:
            # The base model's config, not the live one: activation checkpointing set use_cache=False on that
            # (transformers 4.56 keeps the object given to from_config), and generate() would then run without
            # a KV cache. The base's generation_config.json (end-of-turn ids, sampling defaults) comes along.
            config = modeling.read_config(self.settings.model_dir)
            config.architectures = [modeling.class_name(self.raw_model)]
            config.save_pretrained(out)
            generation = Path(self.settings.model_dir) / "generation_config.json"
            if generation.is_file():
                shutil.copyfile(generation, out / "generation_config.json")
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(out)
            summary = {"final_step": self.step, "final_loss": self.last_loss, "resumed_from": self.resumed_from,
                       "world_size": t.world_size, "strategy": self.strategy}
            Path(self.settings.output_data_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.settings.output_data_dir) / "summary.json").write_text(json.dumps(summary))
            print(f"[done] step {self.step}, model written to {out} ({len(files)} safetensors file(s))", flush=True)
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (Linux), in bytes; 0 elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _resident_bytes() -> int:
    return _status_kib("VmRSS")


def _peak_resident() -> int:
    return _status_kib("VmHWM")


def _reset_peak_resident() -> None:
    """Restart VmHWM from the current RSS (proc(5): writing 5 to clear_refs resets the peak RSS)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
