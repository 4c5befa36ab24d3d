"""Multi-process training: ``train.num_processes > 1`` (DDP) or ``train.distributed=fsdp`` runs the
recipe under a launcher.

The task stays in the flow's process (holding the run-dir lock) and starts the launcher as a
subprocess, streaming its output into the task log line by line. Every rank runs the same
``recipe.fit_with_oom_retry`` from serialized references (a small JSON spec on disk); the Trainer
shards the batches, averages gradients, and only rank 0 reports to MLflow and writes checkpoints, the
adapter and its manifest, which ``tasks/train.py`` then reads as a single-process run would return it.

Launcher choice: on GPUs ``accelerate launch --multi_gpu`` (NCCL). On CPU we call ``torchrun``
(gloo) directly, which is what accelerate runs underneath: measured here, ``accelerate launch --cpu
--num_processes 2`` failed with "Default process group has not been initialized" while torchrun
trained 4-bit + LoRA + Trainer fine (non-reentrant gradient checkpointing is required for DDP
with frozen 4-bit weights; recipe.py uses it).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from qlora.config.schema import LoraSection, TrainConfig
from qlora.errors import ConfigError
from qlora.locks import threads_per_run
from qlora.refs import MlflowRun, QuantizedModel, TokenizedData
from tasks.training.selection import GenerationEval

log = logging.getLogger("qlora.distributed")
REPO = Path(__file__).resolve().parents[2]
ENTRY = "tasks.training.launch"  # the module each rank runs (main below)


class LaunchSpec(BaseModel):
    """Everything a rank needs, as references: what ``train_adapter`` takes, serialized."""

    base: QuantizedModel
    data: TokenizedData
    lora: LoraSection
    train: TrainConfig
    run_dir: str
    run: MlflowRun | None = None
    during: GenerationEval | None = None  # generation eval during training: rank 0 generates, the others wait


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
    """``accelerate launch`` on GPUs (DDP or FSDP), ``torchrun`` (gloo) on CPU; all run ``python -m tasks.training.launch``."""
    entry = ["-m", ENTRY, str(spec_path)]
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


def run_launcher(spec: LaunchSpec) -> None:
    """Start the launcher, stream its output into the task log, fail with its last lines."""
    import torch

    spec_path = Path(spec.run_dir) / "launch_spec.json"
    spec_path.write_text(spec.model_dump_json())
    n = spec.train.num_processes
    cmd = launcher_command(n, spec_path, torch.cuda.device_count(), spec.train.distributed)
    env = dict(os.environ)
    # The ranks import this checkout's packages whatever the worker's working directory is.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    # This run's threads (qlora/locks.py: cores available / training slots) shared by its n ranks.
    run_threads = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit() else threads_per_run(1)
    env["OMP_NUM_THREADS"] = str(max(1, run_threads // n))
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
    """Entry point of one rank: rebuild the references and run the recipe (the launching task holds the lock)."""
    from tasks.training.recipe import fit_with_oom_retry

    argv = sys.argv[1:] if argv is None else argv
    spec = LaunchSpec.model_validate_json(Path(argv[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"rank{rank} %(levelname)s %(name)s: %(message)s")
    # Only rank 0 reports to MLflow (the Trainer's callback also checks this; no run = no callback).
    fit_with_oom_retry(spec.base, spec.data, spec.lora, spec.train, Path(spec.run_dir), spec.run if rank == 0 else None,
                       during=spec.during)
    import torch.distributed as dist

    if dist.is_initialized():  # the Trainer (accelerate) set up the group; say what it was
        log.info("process group: backend %s, world size %d", dist.get_backend(), dist.get_world_size())
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
