"""Write tests/data/rc5-metrics-numpy<major>.pt with the numpy (and torch) of the running interpreter.

A 3.0.0rc5 snapshot pickled its numpy float64 metrics under whatever numpy was installed:
numpy 1.x names the scalar ``numpy.core.multiarray.scalar``, numpy 2.x
``numpy._core.multiarray.scalar``. The tests hold one of each, made by the real numpy
versions (not hand-edited): run this once with numpy 1.26 and once with numpy 2.x.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).parents[1] / "tests" / "data"


def main() -> None:
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    metadata = {
        "epoch": 5,
        "metrics": {"test.rmse": np.float64(3.25), "test.mAP": np.float64(0.5)},
        "losses": {"train.total_loss": 0.01},
    }
    path = DATA / f"rc5-metrics-numpy{np.__version__.split('.')[0]}.pt"
    torch.save({"metadata": metadata, "model": torch.nn.DataParallel(model).state_dict()}, path)
    print(f"wrote {path} (numpy {np.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
