"""
bench.py: time l3d's training step, the one train() takes, on random inputs.

Prints the memory plan and the attention kernel in use, when the first step finished and how much of
it was compilation, then the steady ms/step, samples/s, peak memory and, on CUDA, the model FLOPs
utilisation by l3d.model_flops. Every flag of l3d.py applies (--res, --batch, --perceptual,
--memory-budget, --no-compile, ...):
    python bench.py --res 224                  # the paper's 224 step: batch 16, perceptual 0.5
    python bench.py --res 224 --perceptual 0   # MSE only
    python bench.py --res 518                  # batch 6
    python bench.py --tiny
Without MatConvNet's VGG-19 file in the cache (or --vgg) the perceptual loss runs on random weights,
at the same cost, and says so: the bench never downloads.
"""

import resource
import time
from pathlib import Path

import torch
from torch._functorch import config as functorch_config
from torch.utils._python_dispatch import TorchDispatchMode  # the hook FlopCounterMode is built on

import l3d


def attention_backend(device, dtype, head_dim=64, tokens=256):
    """The name of the kernel that l3d.attention runs for these inputs, seen at dispatch, not guessed."""

    class Seen(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Seen.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    q = torch.randn(1, 2, tokens, head_dim, device=device, dtype=dtype)
    with Seen():
        l3d.attention(q, q, q)
    return next((op for op in Seen.ops if "attention" in op), "math: " + " ".join(Seen.ops))


def bench(args):
    started = time.time()
    rank, world, device, model, opt = l3d.build(args)
    cfg, cuda = model.config, device.type == "cuda"
    perceptual = None
    if args.perceptual > 0:
        vgg = Path(args.vgg or l3d.cached(l3d.VGG19_URL))
        if vgg.is_file():
            perceptual = l3d.PerceptualLoss(vgg).to(device)
        else:  # the cost is the same with any weights
            l3d.print0(f"bench: no VGG-19 weights at {vgg}, so the perceptual loss runs on random ones")
            perceptual = l3d.PerceptualLoss(random_weights=True).to(device)
    train_step = l3d.make_train_step(model, opt, args, device, world, perceptual)
    R, b = cfg.image_size, args.batch
    k, c2w = torch.tensor([R * 1.0, R * 1.0, R / 2, R / 2]), torch.eye(4)
    batch = (torch.rand(b, 2, 3, R, R), k.expand(b, 2, 4), torch.rand(b, 6, 3, R, R), k.expand(b, 6, 4),
             c2w.expand(b, 2, 4, 4), c2w.expand(b, 6, 4, 4))
    batch = [x.to(device) for x in batch]

    def timed(steps):
        start = time.time()
        for _ in range(steps):
            loss = train_step(batch, args.lr)[0]
        loss.item()  # waits for the GPU, once, as train() does at its log steps
        return (time.time() - start) / steps

    ready = time.time()
    first = timed(1)  # compilation, allocator, kernel selection
    timed(2)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dt = timed(args.bench_steps)
    compiled = args.compile and cuda
    plan = ("every block recomputed" if args.grad_checkpoint else
            f"activation budget {functorch_config.activation_memory_budget}" if compiled else
            "every activation kept")
    kernel = attention_backend(device, torch.bfloat16 if cuda else torch.float32, cfg.head_dim)
    l3d.print0(f"bench: {cfg.model} at {R}, batch {b} x {world} rank(s), perceptual {args.perceptual}, "
               f"{device}, compiled blocks {compiled}, memory: {plan}, attention {kernel}")
    line = (f"bench: first step done {ready - started + first:.1f} s after start (compile and warm-up "
            f"{first - dt:.1f} s), {dt * 1000:.1f} ms/step, {b * world / dt:.1f} samples/s")
    if cuda:
        achieved = 3 * l3d.model_flops(cfg) * b / dt  # backward costs twice the forward
        line += (f", peak memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB, "
                 f"MFU {100 * achieved / (args.peak_tflops * 1e12):.1f}% of {args.peak_tflops:.0f} TFLOP/s")
    else:
        line += f", peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB"
    l3d.print0(line)
    if world > 1:
        torch.distributed.destroy_process_group()


def parse_args(argv=None):
    """l3d.py's flags and presets, and the bench's own two."""
    ap = l3d.make_parser("Time l3d's training step on random inputs (see the docstring of bench.py).")
    ap.add_argument("--bench-steps", type=int, default=10, help="timed steps, after 3 untimed ones")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 peak for MFU (H100, H200: 989)")
    ap.set_defaults(init="none")  # the bench loads no weights: --res 518 needs no 224 checkpoint here
    return l3d.parse_args(argv, ap)


if __name__ == "__main__":
    bench(parse_args())
