"""The callback's own cost on a non-sync step, measured directly (no training-loop noise).

    python benchmarks/per_step_cost.py

Times the optimizer step post-hook and the callback's per-batch hooks on a step where no sync is
due (k = 1e9), and compares them with a training step of the benchmark's small CNN. A Lightning
fit on this shared 2-core machine cannot resolve a 1% difference (its IQR is several percent);
this isolates the part that runs on every step.
"""

from __future__ import annotations

import timeit

import torch
from torch import nn

from lightning_lookahead import Lookahead, LookaheadCallback


class _FakeTrainer:
    loggers: list = []
    optimizers: list = []
    barebones = True  # the callback skips LightningModule.log (no Trainer behind this stand-in)
    global_step = 0


def main(n: int = 200_000) -> None:
    torch.set_num_threads(1)
    net = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    x, y = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    net(x)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    la = Lookahead(k=10**9, alpha=0.5)
    la.attach([opt], net)
    (hook,) = opt._optimizer_step_post_hooks.values()
    cb = LookaheadCallback(k=10**9)
    cb.lookahead = la
    _FakeTrainer.optimizers = [opt]  # the callback follows the trainer's optimizers on each batch
    t_hook = timeit.timeit(lambda: hook(opt, (), {}), number=n) / n
    t_cb = timeit.timeit(
        lambda: (cb.on_train_batch_start(_FakeTrainer, net, None, 0), cb.on_train_batch_end(_FakeTrainer, net, None, None, 0)),
        number=n,
    ) / n

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    step()
    t_step = min(timeit.repeat(step, number=20, repeat=5)) / 20
    total = t_hook + t_cb
    print(f"step post-hook (non-sync):      {t_hook * 1e9:8.0f} ns")
    print(f"callback batch hooks (non-sync): {t_cb * 1e9:8.0f} ns")
    print(f"training step (CNN, batch 40):   {t_step * 1e6:8.0f} us")
    print(f"non-sync overhead:               {100 * total / t_step:8.4f} %")


if __name__ == "__main__":
    main()
