"""Checks every front end applies to a source model's tensors before export."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import UserError


def require_finite(path: Path | str, tensors: Iterable[tuple[str, Any]], what: str) -> None:
    """Refuse a model whose floating-point tensors hold NaN or infinity, naming the first such tensor.

    ``tensors`` gives ``(name, tensor)`` pairs (torch tensors or arrays); ``what`` names them in
    the message (``"tensor"``, ``"initializer"``).
    """
    for name, tensor in tensors:
        values = np.asarray(tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else tensor)
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            bad = int(values.size - np.isfinite(values).sum())
            raise UserError(f"{path}: {what} '{name}' holds {bad} NaN or infinite value(s) of {values.size}; "
                            "the model cannot be exported (did its training diverge?)")
