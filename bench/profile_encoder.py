"""Where the memory build's time goes on a GPU, per stage (forward / gather+normalize / device-to-host copy).

    python bench/profile_encoder.py            # OPT-1.3B shapes, random weights, bf16 on cuda

Prints one JSON object as its last line: seconds per stage summed over the batches.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.memory_build import build_opt, padded, random_examples  # noqa: E402
from pema.formats.keys import normalize  # noqa: E402
from pema.owner.encode import length_batches, teacher_forced_inputs  # noqa: E402
from pema.owner.respond import ContextTap  # noqa: E402


def main() -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("profile_encoder.py needs a CUDA device")
    dev = torch.device("cuda")
    model = build_opt("opt-1.3b", dev, torch.bfloat16)
    examples = random_examples(2000, 50272, 70, 56, seed=0)
    batches = length_batches(examples, 16384)
    inputs = [padded(b, 0) for b in batches]
    tap = ContextTap(model)
    t = {"forward": 0.0, "gather_normalize": 0.0, "d2h_pageable": 0.0, "d2h_pinned": 0.0, "host_prep": 0.0}

    def lap(name, start):
        torch.cuda.synchronize()
        t[name] += time.perf_counter() - start

    for rep in range(2):  # first pass warms up; only the second is kept
        t = dict.fromkeys(t, 0.0)
        for batch, (ids, mask) in zip(batches, inputs):
            s = time.perf_counter()
            padded(batch, 0)
            lap("host_prep", s)
            s = time.perf_counter()
            with torch.no_grad(), tap:
                model.base_model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
                hidden = tap.hidden()
                lap("forward", s)
                s = time.perf_counter()
                layout = teacher_forced_inputs(batch, 0)
                rows, cols = torch.from_numpy(layout.rows).to(dev), torch.from_numpy(layout.cols).to(dev)
                keys = normalize(hidden[rows, cols], tap.norm_type, tap.eps).half()
                lap("gather_normalize", s)
            s = time.perf_counter()
            keys.cpu().numpy()
            lap("d2h_pageable", s)
            s = time.perf_counter()
            torch.empty(keys.shape, dtype=keys.dtype, pin_memory=True).copy_(keys).numpy()
            lap("d2h_pinned", s)
    entries = sum(len(e.target_ids) for e in examples)
    result = {"device": torch.cuda.get_device_name(), "entries": entries, "batches": len(batches),
              **{k: round(v, 4) for k, v in t.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
