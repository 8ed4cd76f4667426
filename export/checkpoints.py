"""Finding a checkpoint: a local directory, a Hugging Face id already in the local cache, or a built-in
synthetic model (`tiny`, `bench`) that is built once, saved with `save_pretrained` and then loaded back
exactly like a real checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, ContextManager

from contract.errors import ExportError
from contract.files import DISK_FULL

CACHE_DIR = Path(os.environ.get("PRUNEVLM_CACHE") or Path.home() / ".cache" / "prunevlm")  # empty: unset


Step = Callable[[str], ContextManager]
"""Wraps a slow step (building, downloading) and is told what it is, e.g. `export.api.Progress.step`."""


def resolve(model: str, synthetic: dict[str, Callable[[Path], None]], key: str,
            step: Step = contextlib.nullcontext) -> Path:
    """Directory holding the checkpoint `model` (see module doc). `synthetic` maps built-in names to
    builders that write a checkpoint into a directory; `key` versions their cache entries. Only the slow
    paths go through `step`, so a bad `model` is refused before anything is reported as started."""
    if model in synthetic:
        return _synthetic(model, synthetic[model], key, step)
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        if not path.is_dir():
            raise ExportError(f"--model {model!r} is not a directory (expected a Hugging Face checkpoint directory)")
        if not (path / "config.json").is_file():
            raise ExportError(f"--model {model!r} has no config.json: not a Hugging Face checkpoint directory")
        return path
    return _from_hub_cache(model, sorted(synthetic), step)


def _from_hub_cache(model_id: str, builtins: list[str], step: Step) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except HFValidationError:
        raise ExportError(f"--model {model_id!r} is neither a directory nor a valid Hugging Face model id") from None
    except LocalEntryNotFoundError:
        pass
    if not offline:
        try:
            with step(f"downloading {model_id!r} from the Hugging Face Hub"):
                return Path(snapshot_download(model_id))
        except Exception as exc:  # network errors come in many types; all mean "not available"
            reason = f"download failed: {type(exc).__name__}"
        else:  # pragma: no cover
            raise AssertionError("unreachable")
    else:
        reason = "HF_HUB_OFFLINE is set"
    from huggingface_hub.constants import HF_HUB_CACHE

    raise ExportError(
        f"model {model_id!r} is not in the Hugging Face cache ({HF_HUB_CACHE}) and {reason}; "
        f"pass a local checkpoint directory, or {' or '.join(f'--model {b}' for b in builtins)} for a built-in "
        "random-weight model"
    )


def _unreadable_errors() -> tuple[type[BaseException], ...]:
    """What transformers, safetensors, tokenizers and huggingface_hub raise for a checkpoint whose files are
    broken (truncated or corrupt weights, invalid JSON, a config field of the wrong type, missing shards)."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    return (OSError, ValueError, RuntimeError, SafetensorError, StrictDataclassError)


@contextlib.contextmanager
def reading(path: Path, what: str = "checkpoint"):
    """Turns a broken checkpoint file into one ExportError line naming the directory."""
    try:
        yield
    except ExportError:
        raise
    except _unreadable_errors() as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "ignore_mismatched_sizes" in first:  # transformers printed the details above; say it in our line
            first = "weights whose shapes differ from what config.json describes"
        raise ExportError(f"cannot read the {what} in {str(path)!r}: {first[:300]}") from None


def load_model(model_class, path: Path, **kwargs):
    """`model_class.from_pretrained(path)` (fp32, SDPA), refusing a checkpoint that is missing weights or has
    weights of other shapes: transformers would initialise those randomly and only warn."""
    import torch

    with reading(path):
        model, info = model_class.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa",
                                                  output_loading_info=True, **kwargs)
    for kind in ("missing_keys", "mismatched_keys"):
        keys = sorted(map(str, info.get(kind) or ()))
        if keys:
            raise ExportError(f"the checkpoint in {str(path)!r} has {len(keys)} {kind.replace('_', ' ')} "
                              f"(e.g. {keys[0]}): its weight files are incomplete or from another model")
    return model.eval()


def for_family(family, model: str, step: Step = contextlib.nullcontext) -> Path:
    """`resolve` with a family module's built-in models, cached per family and toolkit version."""
    from contract.manifest import TOOLKIT_VERSION

    return resolve(model, family.SYNTHETIC, key=f"{family.NAME}-{TOOLKIT_VERSION}", step=step)


SYNTHETIC_VERSION = 4  # bump when the built-in checkpoints change, so cached ones are rebuilt


def _synthetic(name: str, build: Callable[[Path], None], key: str, step: Step) -> Path:
    def build_marked(directory: Path) -> None:
        build(directory)
        _mark_random_weights(directory / "config.json")

    return cached(f"{key}-{name}-v{SYNTHETIC_VERSION}", build_marked, step, f"the built-in {name!r} checkpoint")


def cached(name: str, build: Callable[[Path], None], step: Step, what: str) -> Path:
    """CACHE_DIR/name, written by `build(directory)` the first time: into a temporary directory that is renamed
    into place when complete (an interrupted or failed build leaves nothing), under a lock, so that processes
    started together (two exports, test workers) build it once and the others wait for it."""
    from filelock import FileLock, Timeout

    target = CACHE_DIR / name
    if target.is_dir():
        return target
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        lock = FileLock(CACHE_DIR / f".{name}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            with step(f"waiting for another process to finish building {what}"):
                lock.acquire()
    except OSError as exc:
        raise ExportError(f"cannot build {what}: the cache directory {str(CACHE_DIR)!r} (PRUNEVLM_CACHE) is not a "
                          f"writable directory ({exc.strerror})") from None
    try:
        if target.is_dir():  # built by the process that held the lock before
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=CACHE_DIR))
        try:
            with step(f"building {what}"):
                build(tmp)
            tmp.rename(target)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in DISK_FULL:
                raise ExportError(f"the disk is full while building {what} in {str(CACHE_DIR)!r} (PRUNEVLM_CACHE) "
                                  f"({exc.strerror})") from None
            raise
    finally:
        lock.release()
    return target


RANDOM_WEIGHTS_KEY = "prunevlm_random_weights"


def _mark_random_weights(config_file: Path) -> None:
    """Record in the checkpoint itself that its weights are random, so every export of it says so."""
    config = json.loads(config_file.read_text())
    config[RANDOM_WEIGHTS_KEY] = True
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def has_random_weights(config) -> bool:
    return bool(getattr(config, RANDOM_WEIGHTS_KEY, False))
