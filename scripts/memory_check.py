"""lamina's memory estimates (lamina.analysis.plan) against the resident memory of the real SmolLM2-135M.

    PYTHONPATH=. python3 scripts/memory_check.py            # every check below, each in a fresh process
    PYTHONPATH=. python3 scripts/memory_check.py --quick    # one training check (AdamW, no checkpointing)

Each check runs in a fresh subprocess (``MALLOC_MMAP_THRESHOLD_=65536``, so tensors above 64 KiB are
mapped and unmapped by glibc and the resident size follows the live bytes) and measures growth of the
resident set from just before the model is loaded, after a first load and release of it (the
imports, tokenizer and caches a load brings, about 100 MiB, are not the model's):

* inference: the growth after ``lamina.load("smollm2", dtype)`` (fp32, bf16) vs ``weight_bytes``;
* training: the peak resident size (``VmHWM``, reset after loading through ``/proc/self/clear_refs``)
  over two fp32 training steps of ``batch`` x ``seq_len`` tokens, minus the size before loading, vs
  ``training_memory(...).peak``, for AdamW and SGD (momentum), with and without activation checkpointing.

Prints one line per check and ``within 15%: yes/no`` (issue 19's tolerance). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TOLERANCE = 0.15


def _status(key: str) -> int:
    """Bytes of ``key`` (VmRSS, VmHWM) in /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _trim() -> None:
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def child(kind: str, dtype: str, optimizer: str, checkpointing: bool, batch: int, seq_len: int) -> dict:
    """One check in this (fresh) process: the measured growth in bytes and lamina's estimate."""
    import torch

    import lamina
    from lamina.analysis.plan import training_memory, weight_bytes

    torch.manual_seed(0)
    del lamina.load("smollm2", dtype=dtype).model  # a first load brings its imports and caches (~100 MiB)
    _trim()
    before = _status("VmRSS")
    loaded = lamina.load("smollm2", dtype=dtype)
    model = loaded.model
    cfg = model.config
    _trim()
    if kind == "inference":
        return {"measured": _status("VmRSS") - before, "estimate": weight_bytes(cfg, dtype)}
    model.train()
    model.activation_checkpointing = checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    optim = (
        torch.optim.AdamW(params, lr=1e-5)
        if optimizer == "adamw"
        else torch.optim.SGD(params, lr=1e-5, momentum=0.9)
    )
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size: loading's temporaries are not counted
    for _ in range(2):  # the second step has the optimizer states
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1).float(), x.flatten())
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        del loss
    estimate = training_memory(cfg, batch, seq_len, optimizer, checkpointing).peak
    return {"measured": _status("VmHWM") - before, "estimate": estimate}


CHECKS = [
    ("inference", "fp32", "adamw", False),
    ("inference", "bf16", "adamw", False),
    ("training", "fp32", "adamw", False),
    ("training", "fp32", "adamw", True),
    ("training", "fp32", "sgd", False),
    ("training", "fp32", "sgd", True),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one training check only (AdamW, no checkpointing)")
    p.add_argument("--batch", type=int, default=2, help="training sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="training tokens per sequence")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each check")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, dtype, opt, ckpt = json.loads(args.child)
        print(json.dumps(child(kind, dtype, opt, ckpt, args.batch, args.seq_len)))
        return 0
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    worst = 0.0
    for check in CHECKS[2:3] if args.quick else CHECKS:
        kind, dtype, opt, ckpt = check
        start = time.time()
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(check), "--batch", str(args.batch),
                              "--seq-len", str(args.seq_len)], env=env, capture_output=True, text=True)  # fmt: skip
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        err = r["estimate"] / r["measured"] - 1
        worst = max(worst, abs(err))
        what = (f"{kind} {dtype}" if kind == "inference" else
                f"training {args.batch}x{args.seq_len} {opt} {'with' if ckpt else 'without'} checkpointing")  # fmt: skip
        print(f"{what:<58} measured {r['measured'] / 2**20:8.1f} MiB  estimate {r['estimate'] / 2**20:8.1f} MiB"
              f"  {err:+6.1%}  ({time.time() - start:.0f} s)", flush=True)  # fmt: skip
    print(f"largest error {worst:.1%}; within {TOLERANCE:.0%}: {'yes' if worst <= TOLERANCE else 'no'}")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    raise SystemExit(main())
