"""Benchmark of the Colored-and-gray MNIST model (SPEC Sec. 10): one training step (forward, both losses, backward,
SGD) of `mmtm_digits` at batch 128 on 28x28 digits, for the default widths beside a half-width and a double-width
variant, side by side in one invocation.

Writes model.digits_step_ms_b128_<widths> for each and model.digits_device to bench/results.json. Runs on CUDA when
there is one, else on the CPU (with torch's thread count: OMP_NUM_THREADS=1 gives steadier CPU numbers on a
shared machine).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import median_ms, update_results  # noqa: E402
from greedymm.models.zoo import DIGIT_WIDTHS, mmtm_digits  # noqa: E402

CANDIDATES = ((8, 16, 32, 32), DIGIT_WIDTHS, (32, 64, 128, 128))


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(128, 3, 28, 28, generator=g).to(device)  # colored digit (m0)
    x1 = torch.rand(128, 1, 28, 28, generator=g).to(device)  # gray digit (m1)
    y = torch.randint(0, 10, (128,), generator=g).to(device)
    figures, lines = {}, []
    for widths in CANDIDATES:
        torch.manual_seed(0)
        model = mmtm_digits(10, channels=(3, 1), widths=widths).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step() -> None:
            y0, y1 = model(x0, x1)
            optimizer.zero_grad(set_to_none=True)
            (F.cross_entropy(y0, y) + F.cross_entropy(y1, y)).backward()
            optimizer.step()
            sync()

        ms = median_ms(step, repeats=20 if not cuda else 100, warmup=3)
        key = "x".join(str(w) for w in widths)
        figures[f"model.digits_step_ms_b128_{key}"] = round(ms, 2)
        params = sum(p.numel() for p in model.parameters())
        lines.append(f"widths {widths}: {ms:.1f} ms per step, {params} parameters")
    figures["model.digits_device"] = (torch.cuda.get_device_name() if cuda
                                      else f"cpu, {torch.get_num_threads()} thread(s)")
    update_results(figures)
    print(figures["model.digits_device"])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
