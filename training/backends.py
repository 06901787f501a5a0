"""Which trainer runs the LoRA: Unsloth on a CUDA GPU (when the `gpu` extra is installed), TRL + PEFT otherwise.

`auto` never surprises: it picks Unsloth only when both CUDA and the package are there. An explicit `unsloth`
where it cannot run is an error, not a silent fallback to a 10x slower path. Unsloth patches transformers/trl
when imported, so `prepare_backend` imports it before anything else pulls them in.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

from flywheel.foundation.errors import InputError

BACKENDS = ("auto", "unsloth", "trl")


@dataclass(frozen=True)
class Backend:
    name: str      # "unsloth" | "trl"
    device: str    # "cuda" | "mps" | "cpu"
    reason: str


def cuda_available() -> bool:
    import torch  # torch alone does not import transformers, so Unsloth can still come first

    return bool(torch.cuda.is_available())


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def select_backend(requested: str = "auto") -> Backend:
    if requested not in BACKENDS:
        raise InputError(f"backend: {requested!r} is not one of {', '.join(BACKENDS)}")
    cuda = cuda_available()
    has_unsloth = unsloth_installed()
    if requested == "unsloth":
        if not cuda:
            raise InputError("backend: 'unsloth' needs a CUDA GPU and none is available here; use backend=trl "
                             "(or auto) on this machine")
        if not has_unsloth:
            raise InputError("backend: 'unsloth' is not installed; `pip install -e .[gpu]` on the GPU machine, "
                             "or use backend=trl")
        return Backend("unsloth", "cuda", "requested")
    if requested == "trl":
        return Backend("trl", _device(cuda), "requested")
    if cuda and has_unsloth:
        return Backend("unsloth", "cuda", "auto: CUDA and unsloth present")
    why = "no CUDA" if not cuda else "unsloth not installed (gpu extra)"
    return Backend("trl", _device(cuda), f"auto: {why}")


def _device(cuda: bool) -> str:
    if cuda:
        return "cuda"
    import torch

    return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"


def prepare_backend(backend: Backend) -> list[str]:
    """Import Unsloth first when it is the backend. Returns warnings (e.g. transformers was imported earlier)."""
    warnings = []
    if backend.name == "unsloth":
        if "transformers" in sys.modules and "unsloth" not in sys.modules:
            warnings.append("transformers was imported before unsloth; some Unsloth patches may not apply "
                            "(run `flywheel train` in its own process for full speed)")
        import unsloth  # noqa: F401  (import for its patches)
    return warnings
