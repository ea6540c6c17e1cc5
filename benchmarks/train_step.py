"""Train-step cost of ExPLoRA versus full fine-tuning of the same ViT (issue 5's benchmark).

Both configurations run the same training step on the same model and data: ``forward_features`` on a batch
of random images, a mean-squared-error regression loss toward a fixed random target of the token features
(the SSL heads/decoders are left out: they cost the same in both and are not part of the adapter), backward,
``AdamW.step()`` (the fused kernel, on CPU and CUDA alike) and ``zero_grad(set_to_none=True)``.

- ExPLoRA: the paper's D-[L]-r64 parameterisation (last block unfrozen, LoRA r=64 on the Q and V rows of
  every other block's fused qkv, all norms, cls token), built with ``explora_geo.adapter.apply_explora``.
- full: every parameter trains.

CPU (default): ViT-B/16 at 224 px, batch 8, one thread (``--threads``: on a shared machine, multi-threaded
OpenMP kernels mostly measure the other processes' load, while the ratios of these matmul-bound steps barely
depend on the thread count). Each configuration lives in its own subprocess; the driver makes them take
steps in turn (ExPLoRA, full, full, ExPLoRA, ExPLoRA, full, ...), so that the load of other processes on a
shared machine falls on both alike. Step time = median over the steps after warm-up. Memory = the peak
resident set size during training minus the RSS once the model, optimizer, batch and target exist (the peak
is reset through ``/proc/self/clear_refs`` at that point). Optimizer state = bytes of the tensors in
``optimizer.state``. The process CPU time per step is printed too; the ratios on the last line use
wall-clock time.

``--gpu``: ViT-L/16 at 224 px in bf16 autocast on CUDA: images/s and peak allocated GPU memory (minus the
memory of the loaded model); it refuses to run without a GPU.

The last line is ``time_ratio=<x> mem_ratio=<y> optimizer_state_ratio=<z>`` (ExPLoRA / full).
Targets: time <= 0.75, memory <= 0.7, optimizer state <= 0.12.

Usage: ``python benchmarks/train_step.py [--quick] [--gpu] [--steps N] [--warmup N] [--threads N]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

MODES = ("explora", "full")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (ViT-Ti at 64 px, batch 2, 2 steps)")
    parser.add_argument("--gpu", action="store_true", help="CUDA, bf16 autocast, ViT-L/16 (needs a GPU)")
    parser.add_argument("--model", default=None, help="timm name (default: vit_base_patch16_224; ViT-L on GPU)")
    parser.add_argument("--img-size", type=int, default=None, help="input size in px (default 224)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 8 on CPU, 64 on GPU)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per configuration (default 6)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per configuration (default 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1; 0 = torch's choice, one per core)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = {"model": "vit_tiny_patch16_224", "img_size": 64, "batch": 2, "steps": 2, "warmup": 1}
    gpu = {"model": "vit_large_patch16_224", "img_size": 224, "batch": 64, "steps": 10, "warmup": 3}
    cpu = {"model": "vit_base_patch16_224", "img_size": 224, "batch": 8, "steps": 6, "warmup": 1}
    defaults = quick if args.quick else gpu if args.gpu else cpu
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# --------------------------------------------------------------------------------------------------------
# Worker: one configuration in this process, one step per "step" line on stdin
# --------------------------------------------------------------------------------------------------------

def _rss_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def build(mode: str, args: argparse.Namespace, device: str) -> Any:
    """The model of ``mode`` on ``device`` (random init: no download)."""
    import timm
    import torch

    from explora_geo.adapter import ExploraConfig, apply_explora

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=0, img_size=args.img_size)
    if mode == "explora":
        apply_explora(model, ExploraConfig(unfreeze="L", rank=64, targets=("q", "v")))
    return model.to(device).train()


def _send(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def worker(mode: str, args: argparse.Namespace) -> None:
    """Set up ``mode``, then answer each ``step`` line on stdin with one timed training step and ``finish``
    with the memory and optimizer-state figures (JSON lines on stdout)."""
    import torch

    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device; none is available here (run without --gpu on CPU).")
    if args.threads and not args.gpu:
        torch.set_num_threads(args.threads)
    model = build(mode, args, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=True)
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen).to(device)
    with torch.no_grad():
        tokens = model.forward_features(x[:1]).shape[1:]
    target = torch.randn(args.batch, *tokens, generator=gen).to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.gpu)

    def step() -> None:
        with autocast:
            out = model.forward_features(x)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes("VmRSS")
        _reset_peak_rss()
    _send({"ready": mode})
    for line in sys.stdin:
        if line.strip() != "step":
            break
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        _send({"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start})
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_bytes("VmHWM")
    _send({
        "mode": mode, "device": device, "threads": torch.get_num_threads(),
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "train_mem_bytes": peak - base,
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for s in opt.state.values()
                                     for t in s.values() if torch.is_tensor(t) and t.dim() > 0),
    })


# --------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------

class Worker:
    """A configuration running in its own interpreter, stepped over a pipe."""

    def __init__(self, mode: str, argv: list[str]) -> None:
        self.mode = mode
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--worker", mode],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.mode} died with status {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args)
        return
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device; none is available here (run without --gpu on CPU).")
    from tqdm import tqdm

    workers = {m: Worker(m, argv) for m in MODES}
    try:
        for w in workers.values():
            w.ask("")  # wait until set up
        steps: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        for i in tqdm(range(args.warmup + args.steps), desc="steps (each: ExPLoRA + full)", file=sys.stderr):
            for mode in MODES if i % 2 == 0 else MODES[::-1]:
                steps[mode].append(workers[mode].ask("step"))
        final = {m: w.ask("finish") for m, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    for mode in MODES:
        measured = steps[mode][args.warmup:]
        final[mode]["step_s"] = statistics.median(s["wall_s"] for s in measured)
        final[mode]["cpu_step_s"] = statistics.median(s["cpu_s"] for s in measured)
        r = final[mode]
        print(f"{mode:>7}: step {r['step_s']:.3f} s ({args.batch / r['step_s']:.2f} img/s, CPU time "
              f"{r['cpu_step_s']:.3f} s), train mem {r['train_mem_bytes'] / 2**20:.0f} MiB, optimizer state "
              f"{r['optimizer_state_bytes'] / 2**20:.1f} MiB, trainable {r['trainable_params']:,} of "
              f"{r['total_params']:,}, steps {[round(s['wall_s'], 3) for s in steps[mode]]}", flush=True)
    e, f = final["explora"], final["full"]
    unit = "GPU peak allocated" if args.gpu else "peak RSS"
    print(f"{args.model} {args.img_size}px batch {args.batch} on {e['device']} ({e['threads']} threads): "
          f"ExPLoRA {args.batch / e['step_s']:.2f} img/s vs full {args.batch / f['step_s']:.2f} img/s; "
          f"training memory ({unit} minus model) {e['train_mem_bytes'] / 2**20:.0f} vs "
          f"{f['train_mem_bytes'] / 2**20:.0f} MiB; process CPU-time ratio "
          f"{e['cpu_step_s'] / f['cpu_step_s']:.3f}")
    print(f"time_ratio={e['step_s'] / f['step_s']:.3f} "
          f"mem_ratio={e['train_mem_bytes'] / f['train_mem_bytes']:.3f} "
          f"optimizer_state_ratio={e['optimizer_state_bytes'] / f['optimizer_state_bytes']:.3f}")


if __name__ == "__main__":
    main()
