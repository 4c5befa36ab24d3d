"""What generation eval during training costs: the share of the training loop spent generating and scoring
the during-training slice (``eval.every_steps``), on the demo job through the real training stage.

``python -m bench.generation_eval [EVERY_STEPS]`` (default: the demo's ``eval.every_steps``, else its
``save_steps``) trains the demo recipe for two eval intervals with generation eval on and reports
``generation_eval_s / train_runtime_s`` (the Trainer's own loop time, evals included). Goal: <= 10%.
Two intervals, not the demo's whole run: each interval costs the same one eval, so the share is
the same and the measurement takes a minute instead of several.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(every_steps: int | None = None) -> dict:
    from flows.stages import generation_eval
    from qlora.config.files import load_config
    from tasks.quantize import prepare_quantized_model
    from tasks.tokenize import tokenize_dataset
    from tasks.train import train_adapter

    demo = load_config(REPO / "configs" / "demo.yaml", [])
    every = every_steps or demo.eval.every_steps or demo.train.save_steps
    work = Path(tempfile.mkdtemp(prefix="bench-geneval-"))
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"eval.every_steps={every}", f"train.max_steps={2 * every}",
                                                        f"workdir={work}", f"model.name_or_path={REPO / '.qlora' / 'demo-base'}",
                                                        f"data.path={REPO / 'data' / 'demo' / 'reverse_words.jsonl'}"])
    data = tokenize_dataset(cfg.data, cfg.model, work)
    base = prepare_quantized_model(cfg.model, cfg.quantization, work)
    a = train_adapter(base, data, cfg.lora, cfg.train, work, during=generation_eval(cfg.train, cfg.eval, cfg.registry.gate_metric, data))
    return {"every_steps": every, "steps": a.global_step, "during_samples": cfg.eval.during_samples,
            "train_runtime_s": round(a.train_runtime_s, 2), "generation_eval_s": round(a.generation_eval_s, 2),
            "share": round(a.generation_eval_s / a.train_runtime_s, 4)}


if __name__ == "__main__":
    out = run(int(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(json.dumps(out, indent=2))
