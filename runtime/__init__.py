"""prunevlm runtime: runs an export directory with ONNX Runtime (no torch, no transformers)."""

from contract.errors import InputError, ManifestError, UserError

__all__ = ["InputError", "ManifestError", "UserError"]
