"""Benchmark of a training step and of the CLS computation (paper Sec. 3.3; SPEC Sec. 4).

Writes train.step_ms_vanilla_224_b8 (a vanilla step, CLS off), train.cls_ms_224_b8 (mu of the four groups
plus the cumulative speeds, timed alone in-process: whole-step differences on shared machines swing by +-5%)
and train.cls_overhead_pct to bench/results.json. Runs on CUDA when there is one, else on the CPU.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import median_ms, update_results  # noqa: E402
from greedymm.balance import CLSTracker  # noqa: E402
from greedymm.model import mmtm_resnet18  # noqa: E402


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

    step_ms = median_ms(step, repeats=10 if not cuda else 50, warmup=2)
    cls_ms = median_ms(cls, repeats=50, warmup=5)  # gradients of the last step are still there
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    update_results({
        "train.step_ms_vanilla_224_b8": round(step_ms, 2),
        "train.cls_ms_224_b8": round(cls_ms, 3),
        "train.cls_overhead_pct": round(100 * cls_ms / step_ms, 3),
        "train.device": device_name,
    })
    print(f"{device_name}: step {step_ms:.1f} ms, CLS {cls_ms:.2f} ms ({100 * cls_ms / step_ms:.2f}%)")


if __name__ == "__main__":
    main()
