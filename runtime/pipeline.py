"""encode -> project -> prefill -> decode, with per-stage timings.

    image --preprocess--> pixel_values --vision--> image_features, keep_indices --projector--> image_embeds
    prompt --chat template, tokenizer--> ids --embedding table--> text embeds  (image slot: K positions)
    spliced embeds --llm prefill--> logits --decode loop (KV cache bound in place)--> tokens --> text
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

from runtime.backends.onnxruntime import OrtRunner, check_files
from runtime.errors import InputError, ManifestError
from runtime.generation import Generator, SamplingOptions
from runtime.manifest import Manifest
from runtime.preprocess import ImageSource, load_image, preprocess
from runtime.prompt import render_chat_template, user_message


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
    kept_indices: np.ndarray  # [K] patch indices (raster order) handed to the LLM
    prompt_tokens: int  # LLM input length, image tokens included
    finish_reason: str  # "eos", "length" (max_new_tokens) or "max_seq_len"
    timings: Timings  # shared by every result of one batch
    logits: list[np.ndarray] | None = None  # per generated token [V], when asked for


class Pipeline:
    """An export directory loaded for inference. `Pipeline.load(dir)`, then `generate` or `stream`."""

    def __init__(self, directory: Path, manifest: Manifest, runners: dict[str, OrtRunner]):
        self.directory = directory
        self.manifest = manifest
        self.runners = runners
        self.tokenizer = Tokenizer.from_file(str(directory / manifest.prompt.tokenizer))
        embeddings = np.load(directory / manifest.llm.embeddings, mmap_mode="r")
        if embeddings.shape != (manifest.llm.vocab_size, manifest.llm.hidden_size):
            raise ManifestError(
                f"{manifest.llm.embeddings} has shape {embeddings.shape}, expected "
                f"{(manifest.llm.vocab_size, manifest.llm.hidden_size)}: re-export"
            )
        self.generator = Generator(runners["llm"], manifest.llm, np.asarray(embeddings))

    @classmethod
    def load(cls, directory: str | Path, backend: str = "onnxruntime", providers: list[str] | None = None,
             threads: int = 0) -> "Pipeline":
        """Load an export directory. backend: 'onnxruntime' (CPU by default, CUDA when onnxruntime-gpu is
        installed). Every file is checked against the manifest before any session starts."""
        directory = Path(directory)
        manifest = Manifest.read(directory)
        if backend not in ("onnxruntime", "ort"):
            raise InputError(f"backend {backend!r} is not available; use 'onnxruntime'")
        for name in ("vision", "projector", "llm"):
            if name not in manifest.graphs:
                raise ManifestError(f"manifest in {directory} has no {name!r} graph")
            check_files(directory, manifest.graphs[name])
        for name in (manifest.prompt.tokenizer, manifest.llm.embeddings):
            if not (directory / name).is_file():
                raise ManifestError(f"{directory / name} is missing: the export directory is incomplete, re-export it")
        # Only the LLM graph runs back to back (decode steps); the others run once per query.
        runners = {name: OrtRunner(directory, spec, providers, threads, spin=(name == "llm")).activate()
                   for name, spec in manifest.graphs.items()}
        return cls(directory, manifest, runners)

    # --- pieces ------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of `prompt` in the checkpoint's chat template, with one image placeholder token."""
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a str, got {type(prompt).__name__} {prompt!r:.80}")
        if not prompt.strip():
            raise InputError(f"prompt {prompt!r} is empty; give a question or instruction about the image")
        spec = self.manifest.prompt
        if spec.image_token in prompt:
            raise InputError(f"the prompt contains the image placeholder {spec.image_token!r}; the image is added for you")
        text = render_chat_template(spec.chat_template, user_message(prompt), **spec.special_tokens)
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        if ids.count(spec.image_token_id) != 1:
            raise ManifestError(f"the chat template produced {ids.count(spec.image_token_id)} image tokens, expected 1")
        return ids

    def encode_images(self, images: Sequence[ImageSource], timings: Timings) -> tuple[np.ndarray, np.ndarray]:
        """-> image_embeds [B, K, D], keep_indices [B, K]."""
        start = time.perf_counter()
        pixel_values = preprocess([load_image(image) for image in images], self.manifest.preprocess)
        timings.preprocess += time.perf_counter() - start
        start = time.perf_counter()
        vision = self.runners["vision"].infer({"pixel_values": pixel_values})
        timings.vision += time.perf_counter() - start
        start = time.perf_counter()
        projected = self.runners["projector"].infer(
            {"image_features": vision["image_features"], "keep_indices": vision["keep_indices"]}
        )
        timings.projector += time.perf_counter() - start
        return projected["image_embeds"], vision["keep_indices"]

    def splice(self, prompt_ids: list[list[int]], image_embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Text embeddings with each prompt's image placeholder replaced by its K image embeddings, left-padded
        to one length. -> inputs_embeds [B, S, D], attention_mask [B, S]."""
        image_id = self.manifest.prompt.image_token_id
        table = self.generator.embeddings
        rows = []
        for ids, image in zip(prompt_ids, image_embeds):
            at = ids.index(image_id)
            rows.append(np.concatenate([table[ids[:at]], image, table[ids[at + 1:]]]).astype(np.float32))
        length = max(len(r) for r in rows)
        if length >= self.manifest.llm.max_seq_len:
            raise InputError(
                f"the prompt takes {length} tokens (with {image_embeds.shape[1]} image tokens); this export handles "
                f"at most {self.manifest.llm.max_seq_len - 1} before the answer: shorten the prompt"
            )
        embeds = np.zeros((len(rows), length, table.shape[1]), np.float32)
        embeds[:] = table[self.manifest.llm.pad_token_id]
        mask = np.zeros((len(rows), length), np.int64)
        for i, row in enumerate(rows):
            embeds[i, length - len(row):] = row
            mask[i, length - len(row):] = 1
        return embeds, mask

    # --- generation ----------------------------------------------------------------------------------
    def generate(self, image, prompt, max_new_tokens: int = 64, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 on_text: Callable[[int, str], None] | None = None, return_logits: bool = False):
        """Answer `prompt` about `image`. One image and prompt -> Result; lists of equal length -> list[Result].

        image: a path, a PIL image or an HxWx3 uint8 array. Greedy unless do_sample. Stops at EOS, after
        max_new_tokens, or at the export's max sequence length. on_text(row, piece) receives the text as it
        is generated.
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
        results = list(self._run(images, prompts, max_new_tokens, sampling, on_text, return_logits))
        return results[0] if single else results

    def stream(self, image, prompt: str, max_new_tokens: int = 64, **sampling) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated."""
        pieces: list[str] = []
        runner = self._run([image], [prompt], max_new_tokens, SamplingOptions(**sampling),
                           lambda row, piece: pieces.append(piece), False, lazy=True)
        for _ in runner:
            yield from pieces
            pieces.clear()
        yield from pieces

    def _run(self, images, prompts, max_new_tokens, sampling, on_text, return_logits, lazy: bool = False):
        """Generator behind generate() and stream(): with lazy=True it yields after every token (None),
        then the results; otherwise it yields only the results."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
        began = time.perf_counter()
        timings = Timings()
        start = time.perf_counter()
        ids = [self.prompt_ids(p) for p in prompts]
        timings.preprocess += time.perf_counter() - start
        image_embeds, keep_indices = self.encode_images(images, timings)
        inputs_embeds, mask = self.splice(ids, image_embeds)
        start = time.perf_counter()
        state, logits = self.generator.prefill(inputs_embeds, mask)
        timings.prefill = time.perf_counter() - start

        batch = len(prompts)
        budget = min(max_new_tokens, self.manifest.llm.max_seq_len - inputs_embeds.shape[1])
        tokens: list[list[int]] = [[] for _ in range(batch)]
        kept_logits: list[list[np.ndarray]] = [[] for _ in range(batch)]
        texts = [""] * batch
        done = np.zeros(batch, bool)
        eos = set(self.manifest.llm.eos_token_ids)
        for step_tokens, step_logits in self.generator.decode_n_tokens(state, logits, budget, sampling):
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
            if lazy:
                yield None
        timings.decode_steps = state.step_times
        timings.decode_graph = state.graph_times[1:]  # [0] is the prefill call
        timings.total = time.perf_counter() - began
        for row in range(batch):
            text = self.tokenizer.decode(tokens[row], skip_special_tokens=True)
            if on_text is not None and len(text) > len(texts[row]):
                on_text(row, text[len(texts[row]):])
            if tokens[row] and tokens[row][-1] in eos:
                reason = "eos"
            elif len(tokens[row]) < max_new_tokens:
                reason = "max_seq_len"
            else:
                reason = "length"
            yield Result(text=text, token_ids=tokens[row], kept_indices=keep_indices[row],
                         prompt_tokens=int(mask[row].sum()), finish_reason=reason, timings=timings,
                         logits=kept_logits[row] if return_logits else None)
