"""encode -> project -> prefill -> decode, with per-stage timings.

    image --layout: tiles--> pixel_values --vision--> image_features, keep_indices --projector--> image_embeds
          --layout: order--> visual tokens [T, D]
    prompt --chat template, tokenizer--> ids --embedding table--> text embeds  (placeholder: T positions)
    spliced embeds --llm prefill--> logits --decode loop (KV cache bound in place)--> tokens --> text
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from contract import names
from contract.errors import InputError, ManifestError
from contract.layouts import token_sources
from contract.manifest import Manifest, check_files, verify_files
from contract.positions import prefill_position_ids
from runtime.backends.base import HostSplicer, Runner, Splicer, to_numpy
from runtime.files import EmbeddingTable, read_tokenizer
from runtime.generation import Block, Generator, SamplingOptions
from runtime.layout import make_layout
from runtime.prompt import check_prompt_text, refuse_control_tokens, render_chat_template, user_message

MAX_THREADS = 1024  # intra-op threads a session may ask for (0: ONNX Runtime's default, all cores)
# Pipeline.load's backend names -> module of runtime.backends, imported only when it is asked for.
BACKENDS = {"onnxruntime": "onnxruntime", "ort": "onnxruntime", "trt": "tensorrt", "tensorrt": "tensorrt"}


@dataclass
class Timings:
    """Seconds per stage for one generate() call (the whole batch)."""

    preprocess: float = 0.0  # image loading, resizing, normalising, prompt tokenising
    vision: float = 0.0
    projector: float = 0.0
    prefill: float = 0.0
    decode_steps: list[float] = field(default_factory=list)  # one LLM call per generated token after the first
    decode_graph: list[float] = field(default_factory=list)  # the part of each decode step spent in the graph
    total: float = 0.0

    @property
    def time_to_first_token(self) -> float:
        return self.preprocess + self.vision + self.projector + self.prefill

    @property
    def decode_tokens_per_s(self) -> float:
        return len(self.decode_steps) / sum(self.decode_steps) if self.decode_steps else 0.0

    @property
    def decode_overhead_fraction(self) -> float:
        """Share of decode time spent outside the LLM graph (embedding lookup, feeds, token choice)."""
        total = sum(self.decode_steps)
        return (total - sum(self.decode_graph)) / total if total else 0.0

    def as_dict(self) -> dict:
        steps = self.decode_steps
        return {
            "preprocess_s": self.preprocess,
            "vision_s": self.vision,
            "projector_s": self.projector,
            "prefill_s": self.prefill,
            "time_to_first_token_s": self.time_to_first_token,
            "decode_steps": len(steps),
            "decode_step_mean_s": float(np.mean(steps)) if steps else 0.0,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "decode_overhead_fraction": self.decode_overhead_fraction,
            "total_s": self.total,
        }


@dataclass
class Result:
    text: str
    token_ids: list[int]  # generated tokens, EOS included when it was generated
    kept_indices: np.ndarray  # kept patch indices per sub-image, raster order: [K], or [S, K] for tiles/frames
    prompt_tokens: int  # LLM input length, image tokens included
    finish_reason: str  # "eos", "length" (max_new_tokens), "max_seq_len", "deadline" or "stopped"
    timings: Timings  # shared by every result of one batch
    logits: list[np.ndarray] | None = None  # per generated token [V], when asked for
    # In-LLM pruning (FEATHER, FastV): per prune point, the kept tokens as indices into the item's unpruned
    # tokens in layout order (contract.layouts.token_sources; LLaVA-1.5: patch indices), ascending.
    kept_stages: list[np.ndarray] = field(default_factory=list)


def _count(visual) -> int:
    """Visual tokens of one item ([T, D] on the host, or a device view [1, K, D])."""
    return int(np.prod(visual.shape[:-1]))


class Pipeline:
    """An export directory loaded for inference. `Pipeline.load(dir)`, then `generate` or `stream`.

    runners: graph name -> an active runtime.backends.base.Runner (ONNX Runtime session, TensorRT engine);
    splicer: the backend's splice step (HostSplicer: numpy on the host; TensorRT: device copies).
    """

    def __init__(self, directory: Path, manifest: Manifest, runners: dict[str, Runner],
                 splicer: Splicer = HostSplicer(), backend: str = "onnxruntime"):
        self.directory = directory
        self.manifest = manifest
        self.runners = runners
        self.splicer = splicer
        self.backend = backend  # "onnxruntime" or "tensorrt" (what the runners are)
        self.tokenizer = read_tokenizer(directory / manifest.prompt.tokenizer)
        # Read row by row with pread, not memory-mapped: survives the file being replaced (runtime/files.py).
        embeddings = EmbeddingTable(directory / manifest.llm.embeddings, manifest.llm.vocab_size,
                                    manifest.llm.hidden_size)
        top = max(self.tokenizer.get_vocab(with_added_tokens=True).values(), default=0)
        if top >= manifest.llm.vocab_size:
            raise ManifestError(f"{directory / manifest.prompt.tokenizer} has token id {top}, beyond the "
                                f"{manifest.llm.vocab_size}-row embedding table: re-export")
        pruning = manifest.llm_pruning
        blocks = [Block(runners[key], layers, {m: runners[keys[i]] for m, keys in pruning.select.items()}
                        if pruning and i < len(pruning.layers) else {})
                  for i, (key, layers) in enumerate(manifest.blocks())]
        self.generator = Generator(blocks, manifest.llm, embeddings)
        self.layouts = {name: make_layout(m, manifest, directory) for name, m in manifest.modalities.items()}
        # Per modality, the window of an unpruned item: (sub-image, patch) of each token in layout order
        # (needed for original positions and in-LLM pruning; None where the layout has no fixed window).
        self.sources = {}
        for name, m in manifest.modalities.items():
            try:
                self.sources[name] = {s: w for w, s in enumerate(token_sources(m.layout, manifest.method.grid))}
            except ValueError:
                self.sources[name] = None

    @classmethod
    def load(cls, directory: str | Path, backend: str = "onnxruntime", providers: list[str] | None = None,
             threads: int = 0, cuda_graphs: bool = False, verify: bool = False) -> "Pipeline":
        """Load an export directory. backend: 'onnxruntime' (CPU by default, CUDA when onnxruntime-gpu is
        installed) or 'trt' (the TensorRT engines in DIR/engines, see runtime/backends/tensorrt.py;
        cuda_graphs: replay captured CUDA graphs). Every file is checked before any session starts; verify:
        also every file's sha256 against the manifest (catches a same-size corrupt file; reads the whole export)."""
        if backend not in BACKENDS:
            raise InputError(f"backend {backend!r} is not available; use 'onnxruntime' or 'trt'")
        if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or not 0 <= threads <= MAX_THREADS:
            raise InputError(f"threads={threads!r} must be an integer in 0..{MAX_THREADS} (0: all cores)")
        directory = Path(directory)
        manifest = Manifest.read(directory)
        if verify:  # every file's sha256 against the manifest (reads every byte of the export)
            verify_files(directory, manifest)
        needed = {key for key, _ in manifest.blocks()} | {g for m in manifest.modalities.values() for g in m.graphs}
        if manifest.llm_pruning is not None:
            needed |= {key for keys in manifest.llm_pruning.select.values() for key in keys}
        for name in sorted(needed):
            if name not in manifest.graphs:
                raise ManifestError(f"manifest in {directory} has no {name!r} graph")
            check_files(directory, manifest.graphs[name])
        newlines = [m.layout.newline for m in manifest.modalities.values() if hasattr(m.layout, "newline")]
        for name in (manifest.prompt.tokenizer, manifest.llm.embeddings, *newlines):
            if not (directory / name).is_file():
                raise ManifestError(f"{directory / name} is missing: the export directory is incomplete, re-export it")
        if BACKENDS[backend] == "tensorrt":  # engines of `python -m engines build`; stale or foreign ones refused
            from runtime.backends import tensorrt

            runners, splicer = tensorrt.load(directory, manifest, cuda_graphs)
        else:
            from runtime.backends import onnxruntime

            runners, splicer = onnxruntime.load(directory, manifest, providers, threads)
        try:
            return cls(directory, manifest, runners, splicer, BACKENDS[backend])
        except BaseException:  # device buffers and sessions are released, not left to the garbage collector
            for runner in runners.values():
                runner.deactivate()
            raise

    def close(self) -> None:
        """Release the sessions or engines (device buffers, CUDA graphs) and the embedding table's file now,
        rather than when the garbage collector gets to them. The pipeline cannot be used afterwards."""
        for runner in self.runners.values():
            runner.deactivate()
        close = getattr(self.generator.embeddings, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- pieces ------------------------------------------------------------------------------------
    def modality(self, name: str):
        if name not in self.manifest.modalities:
            raise InputError(f"modality {name!r} is not in this export; it takes {sorted(self.manifest.modalities)}")
        return self.manifest.modalities[name]

    def prompt_ids(self, prompt: str, modality: str = "image") -> list[int]:
        """Token ids of `prompt` in the checkpoint's chat template, with one placeholder token for the item.
        The text is checked first (type, length bound, UTF-8, control tokens: runtime/prompt.py)."""
        prompt = check_prompt_text(prompt, self.tokenizer, self.manifest.llm.max_seq_len)
        if not prompt.strip():
            raise InputError(f"prompt {prompt!r} is empty; give a question or instruction about the {modality}")
        spec = self.modality(modality)
        for other in self.manifest.modalities.values():
            if other.placeholder in prompt:
                raise InputError(f"the prompt contains the placeholder {other.placeholder!r}; the {modality} is added for you")
        refuse_control_tokens(prompt, self.tokenizer)
        messages = user_message(prompt, content_type=spec.content_type)
        text = render_chat_template(self.manifest.prompt.chat_template, messages, **self.manifest.prompt.special_tokens)
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        if ids.count(spec.placeholder_id) != 1:
            raise ManifestError(f"the chat template produced {ids.count(spec.placeholder_id)} {spec.placeholder!r} tokens, expected 1")
        return ids

    def encode(self, sources: Sequence, modality: str, timings: Timings) -> tuple[list, list[np.ndarray]]:
        """Images (or videos) -> per item: its tokens in LLM order [T, D] (where the splicer keeps them: a
        numpy array on the host, or a device view), and the kept indices [S, K]."""
        spec = self.modality(modality)
        layout = self.layouts[modality]
        start = time.perf_counter()
        cut = [layout.tiles(source) for source in sources]
        pixel_values = np.concatenate([pixels for pixels, _ in cut])  # [sum S, 3, H, W]
        timings.preprocess += time.perf_counter() - start
        start = time.perf_counter()
        vision = self.runners[spec.vision].infer_bound({names.PIXEL_VALUES: pixel_values})
        timings.vision += time.perf_counter() - start
        start = time.perf_counter()
        projected = self.runners[spec.projector].infer_bound(
            {names.IMAGE_FEATURES: vision[names.IMAGE_FEATURES], names.KEEP_INDICES: vision[names.KEEP_INDICES]}
        )
        timings.projector += time.perf_counter() - start
        keep = to_numpy(vision[names.KEEP_INDICES])  # [sum S, K]
        items, at = [], 0
        for pixels, size in cut:
            items.append((slice(at, at + len(pixels)), size))  # the item's sub-images
            at += len(pixels)
        tokens = self.splicer.tokens(layout, projected[names.IMAGE_EMBEDS], keep, items)
        return tokens, [keep[part] for part, _ in items]

    def _placements(self, prompt_ids: list[list[int]], counts: list[int], modality: str) -> tuple[int, list[tuple[int, int]]]:
        """Length of the spliced rows, and per row (first position of the row, of its item's tokens)."""
        placeholder = self.modality(modality).placeholder_id
        lengths = [len(ids) - 1 + n for ids, n in zip(prompt_ids, counts)]
        length = max(lengths)
        if length >= self.manifest.llm.max_seq_len:
            raise InputError(
                f"the prompt takes {length} tokens (with {max(counts)} visual tokens); this export "
                f"handles at most {self.manifest.llm.max_seq_len - 1} before the answer: shorten the prompt"
            )
        starts = [length - n for n in lengths]
        return length, [(start, start + ids.index(placeholder)) for start, ids in zip(starts, prompt_ids)]

    def splice(self, prompt_ids: list[list[int]], visual: list, modality: str = "image") -> tuple[object, np.ndarray]:
        """Text embeddings with each prompt's placeholder replaced by its item's tokens (from `encode`),
        left-padded to one length. -> inputs_embeds [B, S, D] (numpy, or the LLM's device buffer), attention_mask [B, S].

            row:  pad ... pad | text before the placeholder | visual tokens (T) | text after it
            mask:  0  ...  0  |  1 ...                                                    ... 1
        """
        table = self.generator.embeddings
        counts = [_count(v) for v in visual]
        length, placed = self._placements(prompt_ids, counts, modality)
        text = np.empty((len(prompt_ids), length, table.shape[1]), np.float32)  # [B, S, D]
        text[:] = table[self.manifest.llm.pad_token_id]
        mask = np.zeros((len(prompt_ids), length), np.int64)
        gaps = []
        for row, (ids, n, tokens, (start, at)) in enumerate(zip(prompt_ids, counts, visual, placed)):
            before = at - start
            text[row, start:at] = table[ids[:before]]
            text[row, at + n:] = table[ids[before + 1:]]
            mask[row, start:] = 1
            gaps.append((row, at, tokens))
        return self.splicer.fill(text, gaps), mask

    def window(self, keep: np.ndarray, modality: str) -> np.ndarray:
        """Kept indices [S, K] of one item -> the window index (its place among the item's unpruned tokens,
        contract.layouts.token_sources) of each of its visual tokens, in the order they reach the LLM [T]."""
        sources = self.sources[modality]
        if sources is None:
            raise ManifestError(f"layout {self.modality(modality).layout.name} has no fixed token window")
        layout = self.layouts[modality]
        markers = np.stack([np.broadcast_to(np.arange(len(keep))[:, None], keep.shape), keep], axis=-1)  # [S, K, 2]
        order = layout.assemble(markers, keep, (0, 0))  # [T, 2]: (sub-image, patch) in LLM order
        return np.array([sources[(int(s), int(p))] for s, p in order], np.int64)

    def prefill(self, prompt_ids: list[list[int]], visual: list, keep: list[np.ndarray], modality: str = "image",
                prefix=None):
        """Splice, then the LLM prefill with the export's positions and pruning. prompt_ids: per row the ids
        after the prefix (if any); keep: per row the item's kept indices [S, K] (from `encode`).
        -> (decode state, logits [B, V], attention mask [B, S] of the unpruned sequence)."""
        inputs_embeds, mask = self.splice(prompt_ids, visual, modality)
        counts = [_count(v) for v in visual]
        _, placed = self._placements(prompt_ids, counts, modality)
        position_ids = window = None
        original = self.manifest.method.positions == "original"
        if original or self.manifest.llm_pruning is not None:
            windows = [self.window(k, modality) for k in keep]
            full = len(self.sources[modality])
            if original:
                offset = 0 if prefix is None else prefix.length
                position_ids = prefill_position_ids(mask) + offset * mask
                for row, ((_, at), w, n) in enumerate(zip(placed, windows, counts)):
                    first = position_ids[row, at]
                    position_ids[row, at:at + n] = first + w  # each kept token at its unpruned position
                    position_ids[row, at + n:] += full - n  # the text after the item continues from there
            if self.manifest.llm_pruning is not None:
                if any(not np.array_equal(w, np.arange(full)) for w in windows):
                    raise ManifestError("in-LLM pruning needs every visual token in layout order: re-export")
                window = np.stack([at + np.arange(n) for (_, at), n in zip(placed, counts)])  # [B, n]
        state, logits = self.generator.prefill(inputs_embeds, mask, prefix, position_ids, window, modality)
        return state, logits, mask

    # --- generation ----------------------------------------------------------------------------------
    def generate(self, image, prompt, max_new_tokens: int = 64, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 on_text: Callable[[int, str], None] | None = None, return_logits: bool = False,
                 modality: str = "image", deadline_ms: float | None = None,
                 should_stop: Callable[[int], bool] | None = None):
        """Answer `prompt` about `image`. One image and prompt -> Result; lists of equal length -> list[Result].

        image: a path, a PIL image or an HxWx3 uint8 array (or a video, with modality="video" on a video
        export). Greedy unless do_sample. Stops at EOS, after max_new_tokens, or at the export's max sequence
        length (finish_reason "eos", "length", "max_seq_len"). on_text(row, piece) receives the text as it is
        generated. deadline_ms: a latency budget from the call's start; once spent, no further decode step
        starts (finish_reason "deadline"; the answer has at least its first token, whole tokens only).
        should_stop(row) is asked after each token of a live row; True ends that row ("stopped").
        """
        single = isinstance(prompt, str)
        if single:
            images, prompts = [image], [prompt]
        elif isinstance(prompt, (list, tuple)) and isinstance(image, (list, tuple)):
            images, prompts = list(image), list(prompt)
        else:
            raise InputError(
                f"got an image of type {type(image).__name__} and a prompt of type {type(prompt).__name__}; give "
                "one image and a str prompt, or a list of images and a list of prompts"
            )
        if len(images) != len(prompts) or not prompts:
            raise InputError(f"got {len(images)} images and {len(prompts)} prompts; give one image per prompt")
        sampling = SamplingOptions(do_sample, temperature, top_k, top_p, seed)
        results = list(self._run(images, prompts, max_new_tokens, sampling, on_text, return_logits, modality,
                                 deadline_ms=deadline_ms, should_stop=should_stop))
        return results[0] if single else results

    def watch(self, source, prompt: str, *, choices: Sequence[str] | None = None, max_new_tokens: int = 64,
              deadline_ms: float | None = None, every: float = 0.0, **options):
        """Answer `prompt` about the frames of `source` (camera index, URL, video file, folder, iterable of
        frames), newest frame first: iterate the returned runtime.watch.Watch for Answers. See runtime/watch.py."""
        from runtime.watch import Watch

        return Watch(self, source, prompt, choices=choices, max_new_tokens=max_new_tokens, deadline_ms=deadline_ms,
                     every=every, **options)

    def stream(self, image, prompt: str, max_new_tokens: int = 64, modality: str = "image",
               **sampling) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated."""
        pieces: list[str] = []
        runner = self._run([image], [prompt], max_new_tokens, SamplingOptions(**sampling),
                           lambda row, piece: pieces.append(piece), False, modality, lazy=True)
        for _ in runner:
            yield from pieces
            pieces.clear()
        yield from pieces

    def _run(self, images, prompts, max_new_tokens, sampling, on_text, return_logits, modality: str,
             lazy: bool = False, deadline_ms: float | None = None, should_stop: Callable[[int], bool] | None = None):
        """Generator behind generate() and stream(): with lazy=True it yields after every token (None),
        then the results; otherwise it yields only the results."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
        max_new_tokens = int(max_new_tokens)  # numpy integers accepted, plain int from here on
        if deadline_ms is not None and (isinstance(deadline_ms, bool) or not isinstance(deadline_ms, numbers.Real)
                                        or not deadline_ms > 0):
            raise InputError(f"deadline_ms={deadline_ms!r} must be a number of milliseconds > 0, or None")
        began = time.perf_counter()
        deadline = None if deadline_ms is None else began + float(deadline_ms) / 1000
        timings = Timings()
        start = time.perf_counter()
        ids = [self.prompt_ids(p, modality) for p in prompts]
        timings.preprocess += time.perf_counter() - start
        visual, keep_indices = self.encode(images, modality, timings)
        start = time.perf_counter()
        state, logits, mask = self.prefill(ids, visual, keep_indices, modality)
        timings.prefill = time.perf_counter() - start

        batch = len(prompts)
        budget = min(max_new_tokens, self.manifest.llm.max_seq_len - mask.shape[1])
        tokens: list[list[int]] = [[] for _ in range(batch)]
        kept_logits: list[list[np.ndarray]] = [[] for _ in range(batch)]
        texts = [""] * batch
        done = np.zeros(batch, bool)
        reasons: list[str | None] = [None] * batch  # set when a row ends before the generator's own limits
        eos = set(self.manifest.llm.eos_token_ids)
        for step, (step_tokens, step_logits) in enumerate(self.generator.decode_n_tokens(state, logits, budget, sampling)):
            for row in np.flatnonzero(~done):
                token = int(step_tokens[row])
                tokens[row].append(token)
                if return_logits:
                    kept_logits[row].append(step_logits[row].copy())
                done[row] = token in eos
                if on_text is not None:
                    text = self.tokenizer.decode(tokens[row], skip_special_tokens=True)
                    if not text.endswith("\ufffd") and len(text) > len(texts[row]):
                        on_text(int(row), text[len(texts[row]):])
                        texts[row] = text
                if not done[row] and should_stop is not None and should_stop(int(row)):
                    done[row], reasons[row] = True, "stopped"
                    state.finished[row] = True  # the generator feeds it padding and stops when all rows are done
            if lazy:
                yield None
            another_step = step + 1 < budget and not done.all()  # else the answer ends here for its own reason
            if deadline is not None and another_step and time.perf_counter() >= deadline:
                for row in np.flatnonzero(~done):
                    reasons[row] = "deadline"
                break
        timings.decode_steps = state.step_times
        timings.decode_graph = state.graph_times[1:]  # [0] is the prefill call
        timings.total = time.perf_counter() - began
        for row in range(batch):
            text = self.tokenizer.decode(tokens[row], skip_special_tokens=True)
            if on_text is not None and len(text) > len(texts[row]):
                on_text(row, text[len(texts[row]):])
            if reasons[row] is not None:
                reason = reasons[row]
            elif tokens[row] and tokens[row][-1] in eos:
                reason = "eos"
            elif len(tokens[row]) < max_new_tokens:
                reason = "max_seq_len"
            else:
                reason = "length"
            kept = keep_indices[row]
            yield Result(text=text, token_ids=tokens[row], kept_indices=kept[0] if len(kept) == 1 else kept,
                         prompt_tokens=int(mask[row].sum()), finish_reason=reason, timings=timings,
                         logits=kept_logits[row] if return_logits else None,
                         kept_stages=[stage.row(row) for stage in state.stages])
