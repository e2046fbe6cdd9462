"""Fitting a grid GP's hyperparameters: the optimiser loop behind :meth:`GridGP.fit
<kronegp.GridGP.fit>` (Adam or L-BFGS on ``−log p(y_O) / n_observed``, early stopping), on
any layout: on a sharded one every rank takes the same steps (the loss and the gradients are
replicated) and rank 0 shows the progress bar."""

from __future__ import annotations

import math
from typing import Optional

import torch

from kronegp.models._representation import checked_lml, estimated
from kronegp.models.paths import nonfinite_message
from kronegp.solvers.report import one_warning

__all__ = ["fit"]


def fit(model, iters: int, optimizer: str, lr: Optional[float], progress: bool, *, patience: Optional[int],
        min_delta: float, cuda_graph: Optional[bool]) -> list[float]:
    """Run :meth:`GridGP.fit <kronegp.GridGP.fit>` (its docstring says what the arguments do)."""
    from tqdm.auto import tqdm

    if optimizer not in ("adam", "lbfgs"):
        raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got {optimizer!r}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    model.__dict__.pop("_step_chunk", None)  # plan the step for the memory free now
    model.layout.step_chunk(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=0.1 if lr is None else lr)
        patience = 10 if patience is None else patience
    else:
        opt = torch.optim.LBFGS(
            params, lr=1.0 if lr is None else lr, max_iter=10, line_search_fn="strong_wolfe", history_size=20
        )
        patience = 2 if patience is None else patience
    last = {"loss": math.inf}

    def closure():
        loss = model.loss_backward(cuda_graph)
        value = float(loss)
        if not math.isfinite(value):
            raise FloatingPointError(nonfinite_message("GridGP.fit", value, model.hyperparameters()))
        last["loss"] = value
        return loss

    model.train()
    bar = tqdm(range(iters), disable=not progress or not model.layout.reports, desc=f"{type(model).__name__} ({model.path})")
    with one_warning("GridGP.fit", stacklevel=5):  # solves that fall short: one warning per fit
        best, waited = math.inf, 0
        for _ in bar:
            opt.step(closure)
            # The last evaluation is at the accepted point (L-BFGS's line search ends there).
            loss = last["loss"]
            model.history.append(loss)
            bar.set_postfix(loss=f"{loss:.5g}", cg=model.cg_iterations)
            if loss < best - min_delta:
                best, waited = loss, 0
            else:
                waited += 1
                if waited >= patience:
                    break
        if iters and estimated(model.y.dtype):
            # the representation error at the fitted hyperparameters, once per fit: one more evaluation
            # (the step itself never makes it; NOTES.md, "The float32 likelihood's representation error")
            checked_lml(model, model._lml, once=False)
    bar.close()
    model.eval()
    return model.history
