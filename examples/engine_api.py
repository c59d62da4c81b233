"""The three stages of AST on the embedded digits through the public API.

Trains experts, distils 10 images per class with all five AST techniques,
evaluates the result on fresh ConvNets and compares it with a random real
subset of the same size trained with the same protocol.

    python examples/engine_api.py                 # about 90 s on 2 CPU cores
    python examples/engine_api.py distill.ipc=1   # any config override
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import astkit

CONFIG = Path(__file__).parent / "configs" / "digits.toml"


def main(extra: list[str]) -> None:
    t0 = time.perf_counter()
    config = astkit.RunConfig.load(CONFIG, overrides=["plugins=ast", "out=runs/example-api", *extra])
    engine = astkit.Engine(config)
    experts = engine.train_experts()
    print(f"experts: test accuracy {[round(t.test_accuracy[-1], 3) for t in experts]}, "
          f"Avg_Var {[round(t.avg_var, 3) for t in experts]}")
    distilled = engine.distill(experts)
    result = engine.evaluate(distilled)["convnet"]
    print(f"distilled (ipc {config.distill.ipc}, learned lr {distilled.lr:.4f}): "
          f"{result.mean:.4f} ± {result.std:.4f} over {len(result.accuracies)} nets")
    for lr in (config.distill.lr_teacher, distilled.lr):  # the baseline gets both lrs, to be fair
        baseline = engine.evaluate(engine.real_subset(config.distill.ipc, lr=lr))["convnet"]
        print(f"random real subset, same size and protocol, lr {lr:.4f}: {baseline.mean:.4f} ± {baseline.std:.4f}")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
