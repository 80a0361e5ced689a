"""Benchmark of a training step and of the CLS computation (paper Sec. 3.3; SPEC Sec. 4).

Writes train.step_ms_vanilla_224_b8 (a vanilla step, CLS off), train.cls_ms_224_b8 (mu of the four groups
plus the cumulative speeds, timed alone in-process: whole-step differences on shared machines swing by +-5%)
and train.cls_overhead_pct to bench/results.json; beside the vanilla step, in the same invocation, the steps of the
baselines (SPEC Sec. 9): train.step_ms_rubi_224_b8 (RUBi's bias path and masked loss) and
train.step_ms_unimodal_224_b8 (one ResNet18 branch with SE blocks), and of the balancers (SPEC Sec. 12):
train.step_ms_ogm_ge_224_b8 (OGM-GE: coefficients, modulation, GE noise) and train.step_ms_gblend_224_b8 (Gradient
Blending's three-head loss), rounds interleaved so that drift on a shared machine hits them all alike, and
train.ogm_ge_hook_ms_224_b8 / train.ogm_ge_hook_overhead_pct (OGM-GE's after-backward hook timed alone, like the CLS).
Runs on CUDA when there is one, else on the CPU.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import statistics  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import median_ms, update_results  # noqa: E402
from greedymm.measures import CLSTracker  # noqa: E402
from greedymm.methods import Method, StepContext, make_method  # noqa: E402
from greedymm.models import FusionMode, UniModalNet, mmtm_resnet18  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    model = mmtm_resnet18(40).to(device)
    x0, x1 = torch.randn(2, 8, 3, 224, 224, device=device)
    y = torch.randint(0, 40, (8,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = CLSTracker(model.cls_groups())
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step() -> None:  # the vanilla step without the CLS: forward, both losses, backward, SGD
        y0, y1 = model(x0, x1)
        optimizer.zero_grad(set_to_none=True)
        (F.cross_entropy(y0, y) + F.cross_entropy(y1, y)).backward()
        optimizer.step()
        sync()

    def cls() -> None:  # what the trainer adds per step, ending with the host read of the speeds
        tracker.update(tracker.compute_mu(), regular=True).tolist()

    ctx = StepContext(epoch=0, step=1, batch=0, mode=FusionMode.FUSED, steps_per_epoch=None)

    def method_step(method: Method, net: torch.nn.Module = model):  # a step as the trainer takes it, CLS off
        extra = method.setup(net)
        params = list(net.parameters()) + (list(extra.to(device).parameters()) if extra is not None else [])
        opt = torch.optim.SGD(params, lr=0.1)

        def run() -> None:
            out = method.forward(net, x0, x1, ctx)
            loss, terms = method.loss(out, y, ctx)
            opt.zero_grad(set_to_none=True)
            method.backward(loss, terms, ctx)
            method.after_backward(net, out, y, ctx)
            opt.step()
            sync()
        return run

    ogm_ge = make_method("ogm_ge", {"ogm_alpha": 0.1})
    unimodal = UniModalNet.from_two_branch(model, 0).to(device)
    steps = {"vanilla": step, "rubi": method_step(make_method("rubi")),
             "unimodal": method_step(make_method("unimodal_m0"), unimodal), "ogm_ge": method_step(ogm_ge),
             "gblend": method_step(make_method("gblend"))}
    for fn in steps.values():
        fn()  # warm-up
    per_round = {name: [] for name in steps}
    for _ in range(7 if not cuda else 10):  # interleaved rounds: drift on a shared machine hits all alike
        for name, fn in steps.items():
            per_round[name].append(median_ms(fn, repeats=1 if not cuda else 10, warmup=0))
    step_ms = {name: statistics.median(times) for name, times in per_round.items()}
    cls_ms = median_ms(cls, repeats=50, warmup=5)  # gradients of the last step are still there
    with torch.no_grad():
        y0, y1 = model(x0, x1)

    def ogm_hook() -> None:  # what OGM-GE adds to a step: coefficients, modulation, GE noise (timed alone, as the CLS)
        ogm_ge.after_backward(model, {"y0": y0, "y1": y1}, y, ctx)
        sync()

    hook_ms = median_ms(ogm_hook, repeats=10 if not cuda else 50, warmup=2)
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    vanilla_ms = step_ms["vanilla"]
    update_results({
        "train.step_ms_vanilla_224_b8": round(vanilla_ms, 2),
        "train.step_ms_rubi_224_b8": round(step_ms["rubi"], 2),
        "train.step_ms_unimodal_224_b8": round(step_ms["unimodal"], 2),
        "train.step_ms_ogm_ge_224_b8": round(step_ms["ogm_ge"], 2),
        "train.step_ms_gblend_224_b8": round(step_ms["gblend"], 2),
        "train.ogm_ge_hook_ms_224_b8": round(hook_ms, 3),
        "train.ogm_ge_hook_overhead_pct": round(100 * hook_ms / vanilla_ms, 3),
        "train.cls_ms_224_b8": round(cls_ms, 3),
        "train.cls_overhead_pct": round(100 * cls_ms / vanilla_ms, 3),
        "train.device": device_name,
    })
    print(f"{device_name}: step {vanilla_ms:.1f} ms, CLS {cls_ms:.2f} ms ({100 * cls_ms / vanilla_ms:.2f}%)")
    for name in ("rubi", "unimodal", "ogm_ge", "gblend"):
        print(f"  {name}: step {step_ms[name]:.1f} ms ({step_ms[name] / vanilla_ms:.3f}x vanilla)")
    print(f"  ogm_ge hook alone: {hook_ms:.2f} ms ({100 * hook_ms / vanilla_ms:.2f}% of a vanilla step)")


if __name__ == "__main__":
    main()
