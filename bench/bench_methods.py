"""Benchmark of every registered method's training step beside vanilla's (issue 19: the field's balancers' cost), on
a small model: the MMTM CNN of the tests' size class (widths 16, 32, 64, 32 px, batch 32, 10 classes) and its
late_concat counterpart.

Writes methods.step_ms_<method>_<fusion>_convnet32_b32 and methods.ratio_<method>_<fusion> (its step over vanilla's on
the same fusion, same invocation) to bench/results.json, and methods.device. A step is what the trainer runs, the
CLS off: the method's mode, forward, loss, backward, after-backward hook and the SGD step; each method first takes one
step and, where it has one, its end-of-epoch update (PMR's prototypes), so that its steady state is timed. Rounds are
interleaved so that drift on a shared machine hits every method alike. Runs on CUDA when there is one, else on the CPU.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import statistics  # noqa: E402
from typing import Callable, Dict  # noqa: E402

import torch  # noqa: E402

from bench.common import median_ms, update_results  # noqa: E402
from greedymm.methods import Method, StepContext, make_method, methods  # noqa: E402
from greedymm.models import FusionMode, as_fusion, mmtm_convnet  # noqa: E402

SIZE, BATCH, CLASSES = 32, 32, 10


def method_step(method: Method, net: torch.nn.Module, x0: torch.Tensor, x1: torch.Tensor, y: torch.Tensor,
                sync: Callable[[], None]) -> Callable[[], None]:
    """One training step of `method` as the trainer takes it (no CLS), after one untimed step and epoch end."""
    extra = method.setup(net)
    params = list(net.parameters()) + (list(extra.to(x0.device).parameters()) if extra is not None else [])
    opt = torch.optim.SGD(params, lr=0.01)
    ctx = StepContext(epoch=1, step=1, batch=0, mode=FusionMode.FUSED, steps_per_epoch=None)  # past any warm-up

    def run(regular: bool = False) -> dict:
        ctx.mode = FusionMode.FUSED if regular else method.next_mode(ctx)
        out = method.forward(net, x0, x1, ctx)
        loss, terms = method.loss(out, y, ctx)
        opt.zero_grad(set_to_none=True)
        method.backward(loss, terms, ctx)
        logs = method.after_backward(net, out, y, ctx)
        opt.step()
        sync()
        ctx.step += 1
        return logs

    logs = run(regular=True)  # a regular step: running means, scores, prototype sums
    method.observe(ctx, {**{k: float(v) for k, v in logs.items()}, "d_speed": 0.5, "skipped": False})
    record = {"epoch": 1, **{f"{split}_{t}": 1.0 for split in ("train", "val")
                             for t in ("loss0", "loss1", "loss_fused")}}
    method.end_epoch(record, ctx)  # an epoch's end (PMR's prototypes; Gradient Blending's first window)
    return run


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(0)
    x0, x1 = (torch.randn(BATCH, 3, SIZE, SIZE, generator=g).to(device) for _ in range(2))
    y = (torch.arange(BATCH) % CLASSES).to(device)
    steps: Dict[str, Callable[[], None]] = {}
    for fusion in ("mmtm", "late_concat"):
        for name, cls in methods().items():
            if not cls.multimodal:
                continue
            torch.manual_seed(0)
            net = as_fusion(mmtm_convnet(CLASSES), fusion).to(device)
            steps[f"{name}_{fusion}"] = method_step(make_method(name), net, x0, x1, y, sync)
    for fn in steps.values():
        fn()  # warm-up
    per_round = {key: [] for key in steps}
    for _ in range(7 if not cuda else 10):
        for key, fn in steps.items():
            per_round[key].append(median_ms(fn, repeats=1 if not cuda else 10, warmup=0))
    step_ms = {key: statistics.median(times) for key, times in per_round.items()}
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    figures = {"methods.device": device_name}
    for key, ms in step_ms.items():
        fusion = key.split("_")[-1] if key.endswith("mmtm") else "late_concat"
        figures[f"methods.step_ms_{key}_convnet32_b32"] = round(ms, 2)
        figures[f"methods.ratio_{key}"] = round(ms / step_ms[f"vanilla_{fusion}"], 3)
    update_results(figures)
    for key, ms in step_ms.items():
        print(f"{key:<24} {ms:8.2f} ms  {figures[f'methods.ratio_{key}']:.3f}x vanilla")


if __name__ == "__main__":
    main()
