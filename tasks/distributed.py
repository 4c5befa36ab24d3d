"""Multi-process (DDP) training: ``train.num_processes > 1`` runs stage 3 under a launcher.

The task stays in the flow's process and starts the launcher as a subprocess, streaming its output
into the task log line by line. Every rank runs the same ``train_adapter`` from serialized
references (a small JSON spec on disk); the Trainer shards the batches, averages gradients, and only
rank 0 reports to MLflow and writes checkpoints, the adapter and its manifest. The task then reads
the manifest rank 0 wrote, exactly as a single-process run would return it.

Launcher choice: on GPUs ``accelerate launch --multi_gpu`` (NCCL). On CPU we call ``torchrun``
(gloo) directly, which is what accelerate runs underneath: measured here, ``accelerate launch --cpu
--num_processes 2`` failed with "Default process group has not been initialized" while torchrun
trained 4-bit + LoRA + Trainer fine (non-reentrant gradient checkpointing is required for DDP
with frozen 4-bit weights; tasks/train.py already uses it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel

from qlora.config import LoraSection, TrainConfig
from qlora.errors import ConfigError
from qlora.refs import Adapter, MlflowRun, QuantizedModel, TokenizedData

log = logging.getLogger("qlora.distributed")
REPO = Path(__file__).resolve().parents[1]


class LaunchSpec(BaseModel):
    """Everything a rank needs, as references: what ``train_adapter`` takes, serialized."""

    base: QuantizedModel
    data: TokenizedData
    lora: LoraSection
    train: TrainConfig
    workdir: str
    run: MlflowRun | None = None


def _free_port() -> int:
    # Rendezvous port on loopback; a fixed 29500 collides when two flows train on one machine.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# accelerate's FSDP settings for QLoRA (the PEFT/accelerate "FSDP + QLoRA" recipe). The Trainer adds
# the rest itself: LoRA layers wrapped as their own units, mixed precision in the 4-bit storage dtype.
FSDP_FLAGS = [
    "--use_fsdp", "--fsdp_version", "1", "--fsdp_sharding_strategy", "FULL_SHARD",
    "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_backward_prefetch", "BACKWARD_PRE",
    "--fsdp_state_dict_type", "SHARDED_STATE_DICT", "--fsdp_use_orig_params", "false",
    # Rank 0 reads the checkpoint, the others start on the meta device; FSDP broadcasts the shards.
    "--fsdp_cpu_ram_efficient_loading", "true", "--fsdp_sync_module_states", "true",
    "--fsdp_offload_params", "false",
]


def launcher_command(num_processes: int, spec_path: Path, gpus: int, strategy: str = "ddp") -> list[str]:
    """``accelerate launch`` on GPUs (DDP or FSDP), ``torchrun`` (gloo) on CPU; all run ``python -m tasks.distributed``."""
    entry = ["-m", "tasks.distributed", str(spec_path)]
    port = str(_free_port())
    if strategy == "fsdp" and gpus == 0:
        raise ConfigError("train.distributed=fsdp needs CUDA GPUs (none visible); use train.distributed=ddp on CPU")
    if gpus > 0:
        if num_processes > gpus:
            raise ConfigError(f"train.num_processes={num_processes} but only {gpus} GPU(s) are visible; lower it")
        exe = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
        mode = FSDP_FLAGS if strategy == "fsdp" else ["--multi_gpu"]
        return [exe, "launch", *mode, "--num_machines", "1", "--num_processes", str(num_processes),
                "--main_process_port", port, *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes),
            "--master_addr", "127.0.0.1", "--master_port", port, *entry]


def launch_training(
    base: QuantizedModel,
    data: TokenizedData,
    lora: LoraSection,
    train: TrainConfig,
    workdir: str | Path,
    run: MlflowRun | None = None,
) -> Adapter:
    """Train in ``train.num_processes`` processes; one process means the plain in-process path."""
    from tasks.resilience import locked_run_dir
    from tasks.train import run_dir_for, train_adapter

    if train.num_processes <= 1 and train.distributed == "ddp":
        return train_adapter(base, data, lora, train, workdir, run)
    t0 = time.perf_counter()
    run_dir = run_dir_for(base, data, lora, train, workdir)
    # The parent holds the run-dir lock (issue 4) for all ranks: a second flow run of this config waits.
    with locked_run_dir(run_dir):
        manifest = run_dir / "adapter" / "manifest.json"
        if manifest.is_file():  # same answer train_adapter would give, without starting N processes
            log.info("adapter already trained for this exact config and data: %s", manifest.parent)
            return Adapter.model_validate_json(manifest.read_text())
        _run_launcher(run_dir, LaunchSpec(base=base, data=data, lora=lora, train=train, workdir=str(workdir), run=run))
        if not manifest.is_file():
            raise RuntimeError(f"distributed training finished but rank 0 wrote no {manifest}")
    ref = Adapter.model_validate_json(manifest.read_text())
    log.info("distributed training (%d processes) done in %.1f s: %d steps", train.num_processes, time.perf_counter() - t0, ref.global_step)
    return ref


def _run_launcher(run_dir: Path, spec: LaunchSpec) -> None:
    """Start the launcher, stream its output into the task log, fail with its last lines."""
    import torch

    spec_path = run_dir / "launch_spec.json"
    spec_path.write_text(spec.model_dump_json())
    n = spec.train.num_processes
    cmd = launcher_command(n, spec_path, torch.cuda.device_count(), spec.train.distributed)
    env = dict(os.environ)
    # The ranks import this checkout's packages whatever the worker's working directory is.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    log.info("launching %d training processes (%s): %s", n, spec.train.distributed, " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env, cwd=os.getcwd(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    for line in proc.stdout:  # stream: people watch training progress in the task log
        line = line.rstrip()
        if line:
            log.info("[ddp] %s", line)
            tail = (tail + [line])[-20:]
    rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"distributed training exited with status {rc}; last lines:\n" + "\n".join(tail))


def main(argv: list[str] | None = None) -> int:
    """Entry point of one rank: rebuild the references and run the ordinary ``train_adapter``."""
    # The lock-free body of train_adapter: the launching task already holds the run-dir lock.
    from tasks.train import _train_locked, run_dir_for

    argv = sys.argv[1:] if argv is None else argv
    spec = LaunchSpec.model_validate_json(Path(argv[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"rank{rank} %(levelname)s %(name)s: %(message)s")
    # Only rank 0 reports to MLflow (the Trainer's callback also checks this; no run = no callback).
    run = spec.run if rank == 0 else None
    run_dir = run_dir_for(spec.base, spec.data, spec.lora, spec.train, spec.workdir)
    _train_locked(spec.base, spec.data, spec.lora, spec.train, run_dir, run)
    import torch.distributed as dist

    if dist.is_initialized():  # the Trainer (accelerate) set up the group; say what it was
        log.info("process group: backend %s, world size %d", dist.get_backend(), dist.get_world_size())
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
