"""prunevlm runtime: runs an export directory with ONNX Runtime or TensorRT (no torch, no transformers).

    from runtime import Pipeline
    pipe = Pipeline.load("exports/llava15-k64")

`Pipeline`, `Result` and `Timings` are loaded on first use, so `import runtime` (for its errors, say)
imports no backend.
"""

from contract.errors import InputError, ManifestError, UserError

__all__ = ["InputError", "ManifestError", "Pipeline", "Result", "Timings", "UserError"]

_LAZY = {"Pipeline", "Result", "Timings"}  # names of runtime.pipeline


def __getattr__(name: str):
    if name in _LAZY:
        from runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
