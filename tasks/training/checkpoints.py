"""What training leaves on disk and how a re-run finds it: the run-dir lock, valid-checkpoint
selection (a truncated or half-written newest checkpoint is skipped), and the FSDP adapter gather/save.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from pathlib import Path

log = logging.getLogger("qlora.train")

# A checkpoint is usable only when all of these load. The adapter file is parsed (header + sizes),
# the torch files are checked as intact zip archives without unpickling anything.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REQUIRED = (ADAPTER_WEIGHTS, "optimizer.pt", "scheduler.pt", "trainer_state.json")
# What the Trainer writes instead under FSDP (accelerate's save_fsdp_model / save_fsdp_optimizer).
FSDP_MODEL, FSDP_OPTIMIZER = "pytorch_model_fsdp_0", "optimizer_0"


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from, or None when it is complete and loadable."""
    if (ckpt / FSDP_MODEL).is_dir():
        return _fsdp_checkpoint_problem(ckpt)
    for name in REQUIRED:
        if not (ckpt / name).is_file():
            return f"{name} missing"
    try:
        from safetensors import safe_open

        with safe_open(str(ckpt / ADAPTER_WEIGHTS), framework="pt") as f:
            for k in f.keys():  # reading every tensor catches a file truncated after a valid header
                f.get_tensor(k)
    except Exception as e:  # noqa: BLE001 - any parse failure means "not loadable"
        return f"{ADAPTER_WEIGHTS} unreadable ({type(e).__name__}: {e})"
    return _torch_and_state_problem(ckpt, ("optimizer.pt", "scheduler.pt"))


def _fsdp_checkpoint_problem(ckpt: Path) -> str | None:
    """An FSDP checkpoint (train.distributed=fsdp, SHARDED_STATE_DICT): model and optimizer folders written
    by torch.distributed.checkpoint, complete once their ``.metadata`` exists."""
    for name in (FSDP_MODEL, FSDP_OPTIMIZER):
        if not (ckpt / name).is_dir():
            return f"{name} missing"
        if not (ckpt / name / ".metadata").is_file():
            return f"{name}/.metadata missing (sharded save did not finish)"
    for name in ("scheduler.pt", "trainer_state.json"):
        if not (ckpt / name).is_file():
            return f"{name} missing"
    return _torch_and_state_problem(ckpt, ("scheduler.pt",))


def _torch_and_state_problem(ckpt: Path, torch_files: tuple[str, ...]) -> str | None:
    for name in torch_files:
        try:
            with zipfile.ZipFile(ckpt / name) as z:
                bad = z.testzip()
            if bad is not None:
                return f"{name} corrupt (member {bad})"
        except (zipfile.BadZipFile, OSError) as e:
            return f"{name} unreadable ({e})"
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        int(state["global_step"])
    except (ValueError, KeyError, TypeError) as e:
        return f"trainer_state.json unparseable ({type(e).__name__}: {e})"
    return None


def latest_valid_checkpoint(run_dir: Path) -> str | None:
    """Newest checkpoint-N that is complete; newer broken ones are skipped with a warning naming the defect."""
    found = []
    for d in Path(run_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    for _, d in sorted(found, reverse=True):
        problem = checkpoint_problem(d)
        if problem is None:
            return str(d)
        log.warning("skipping checkpoint %s: %s; falling back to the previous checkpoint", d, problem)
    return None


def training_ended_at(checkpoint: str | Path) -> bool:
    """Whether ``checkpoint`` was saved as training ended: at max_steps, or as early stopping stopped it (the saved
    TrainerControl says so). A run killed after that save and before its adapter was written has nothing left to
    train; transformers 5, resumed there, would still run one more step (it checks for the end only after a step)."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    control = (state.get("stateful_callbacks") or {}).get("TrainerControl") or {}
    stopped = bool((control.get("args") or {}).get("should_training_stop"))
    return stopped or 0 < int(state.get("max_steps") or 0) <= int(state["global_step"])


def gather_fsdp_adapter(trainer) -> dict:
    """The LoRA tensors of the FSDP-wrapped model, unsharded, on rank 0 (CPU); empty on other ranks.

    Gathered on the root FSDP module. Not through ``save_pretrained``: peft 0.21 selects adapter keys by
    walking ``named_modules()``, whose names carry FSDP's ``_fsdp_wrapped_module.`` segments, so it
    matched none of the (clean) state-dict keys. Measured on an H100: that, and also ``Trainer.save_model``
    with FULL_STATE_DICT, wrote an adapter file with no tensors in it.
    """
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    wrapped = trainer.model_wrapped
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
        state = wrapped.state_dict()
    # PEFT's on-disk names: the adapter name ("default") dropped, e.g. ...q_proj.lora_A.weight
    adapter = {k.replace(".default.", "."): v for k, v in state.items() if "lora_" in k and ".default." in k}
    if trainer.is_world_process_zero() and not adapter:
        raise RuntimeError(f"FSDP state dict has no LoRA tensors ({len(state)} keys, e.g. {list(state)[:3]})")
    return adapter


def save_adapter_tensors(model, tensors: dict, out: Path) -> None:
    """What ``PeftModel.save_pretrained`` writes: adapter_model.safetensors + adapter_config.json."""
    import copy

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    cfg = copy.deepcopy(model.peft_config["default"])
    cfg.inference_mode = True
    cfg.save_pretrained(str(out))
