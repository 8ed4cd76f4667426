"""The perception loop (runtime/watch.py, runtime/sources.py, `python -m runtime --camera/--video-stream/--frames`)
on the tiny K=32 export: latest frame wins, the `every` rate, the deadline, choices against greedy decoding,
the prompt-prefix KV cache against a full prefill, real video files and photos, a 1,000-frame soak, faults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from contract.errors import InputError
from runtime import sources
from runtime.pipeline import Timings
from runtime.watch import choice_token_ids
from tests.helpers import ROOT, assert_one_line, assert_refused, cli

PROMPT = "Is there a cat in the picture?"
CHOICES = ["yes", "no", "maybe"]


@pytest.fixture(scope="module")
def pipe(pipeline):
    return pipeline(32)


@pytest.fixture(scope="module")
def frames(photos) -> list[np.ndarray]:
    """Real photos, 96x96 (the model resizes them to 336 anyway)."""
    return [np.asarray(Image.fromarray(p).resize((96, 96))) for p in photos.values()]


def reference_probs(pipe, frame, prompt=PROMPT, choices=CHOICES) -> np.ndarray:
    """softmax over the choices' first-token logits of the full generate path's first step."""
    result = pipe.generate(frame, prompt, max_new_tokens=1, return_logits=True)
    scores = result.logits[0][choice_token_ids(pipe, pipe.prompt_ids(prompt), choices)].astype(np.float64)
    return np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()


def fast_source(frames, count: int, period_s: float, produced: list):
    """A live source faster than the model: frame i (photo i mod n) every period_s, its time recorded."""
    for i in range(count):
        produced.append(time.time())
        yield frames[i % len(frames)]
        time.sleep(period_s)


def resident_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- latest frame wins, every, deadline --------------------------------------------------------------

def test_latest_frame_wins(pipe, frames):
    produced: list[float] = []
    loop = pipe.watch(fast_source(frames, 300, 0.002, produced), PROMPT, choices=CHOICES)
    answers = list(loop)
    stats = loop.stats
    print(f"seen {stats.seen} answered {stats.answered} dropped {stats.dropped}")
    assert stats.seen == 300 and stats.answered == len(answers) and stats.dropped > stats.answered
    assert stats.answered + stats.dropped + stats.corrupt == stats.seen
    indices = [a.frame_index for a in answers]
    assert indices == sorted(set(indices)), f"frame order not monotonic: {indices}"
    assert [a.dropped for a in answers] == [i - j - 1 for i, j in zip(indices, [-1] + indices[:-1])]
    for before, answer in zip(answers, answers[1:]):
        ready = before.captured_at + before.age_s  # the model was free from then on: it took the newest frame
        newest = max(i for i, t in enumerate(produced) if t <= ready)
        assert answer.frame_index >= newest - 1, f"answered frame {answer.frame_index}, frame {newest} was newer"
    for answer in answers[:8]:  # the answer is about the frame it names
        expected = reference_probs(pipe, frames[answer.frame_index % len(frames)])
        got = np.array([answer.choice_probs[c] for c in CHOICES])
        assert np.abs(got - expected).max() < 1e-5, (got, expected)


def test_every_limits_the_query_rate(pipe, frames):
    every = 0.15
    loop = pipe.watch(fast_source(frames, 400, 0.002, []), PROMPT, choices=CHOICES, every=every)
    taken = [a.captured_at + a.age_s - a.timings.total for a in loop]  # when the loop took each frame
    gaps = np.diff(taken)
    print(f"{len(taken)} answers, gaps {np.round(gaps, 3).tolist()}")
    assert len(taken) >= 3 and gaps.min() >= every - 0.01, gaps


def test_deadline_stops_decoding_within_one_step(pipe, frames):
    """Once the budget is spent no decode step starts: an answer overruns by at most one step. A frame whose
    prefill alone spent the budget (a busy machine) has just its first token; most frames decode a while."""
    first = next(iter(pipe.watch(frames[:1], PROMPT, max_new_tokens=1, latest=False))).timings.total
    deadline_ms = 1000 * first + 150  # room for some decode steps (a few ms each), far from 400 of them
    loop = pipe.watch(frames[:4], "Describe the picture.", max_new_tokens=400, deadline_ms=deadline_ms, latest=False)
    decoded = 0
    for answer in loop:
        t = answer.timings
        overrun = t.total - deadline_ms / 1000
        step = max(t.decode_steps, default=0.0)
        print(f"frame {answer.frame_index}: {len(answer.token_ids)} tokens, total {t.total * 1e3:.1f} ms, "
              f"budget {deadline_ms:.1f} ms, overrun {overrun * 1e3:.2f} ms, longest step {step * 1e3:.2f} ms")
        assert answer.finish_reason == "deadline" and len(answer.token_ids) == len(t.decode_steps) + 1
        if t.decode_steps:
            decoded += 1
            assert overrun <= step + 0.002, "the answer ran past its budget by more than one decode step"
        full = pipe.generate(frames[answer.frame_index], "Describe the picture.", max_new_tokens=len(answer.token_ids))
        assert answer.token_ids == full.token_ids  # whole greedy tokens, cut short
    assert decoded >= 2, "the budget left no time to decode on most frames"


# --- choices, prefix cache ---------------------------------------------------------------------------

def test_choices_equal_greedy_first_token_among_them(pipe, frames):
    ids = pipe.prompt_ids(PROMPT)
    choice_ids = choice_token_ids(pipe, ids, CHOICES)
    text = pipe.tokenizer.decode(ids, skip_special_tokens=False)
    for choice, token in zip(CHOICES, choice_ids):  # the token the model generates after "ASSISTANT:"
        assert pipe.tokenizer.encode(text + " " + choice).ids[:len(ids) + 1] == ids + [token]
    worst = 0.0
    for answer in pipe.watch(frames, PROMPT, choices=CHOICES, latest=False):
        result = pipe.generate(frames[answer.frame_index], PROMPT, max_new_tokens=1, return_logits=True)
        greedy = CHOICES[int(np.argmax(result.logits[0][choice_ids]))]
        expected = reference_probs(pipe, frames[answer.frame_index])
        worst = max(worst, float(np.abs(np.array(list(answer.choice_probs.values())) - expected).max()))
        assert answer.choice == answer.text == greedy and answer.finish_reason == "choice"
        assert answer.timings.decode_steps == []  # one prefill, no decode
    print(f"worst probability difference vs generate: {worst:.2e}")
    assert worst < 1e-5


@pytest.mark.parametrize("choices, named", [(["yes", "yes please"], "'yes' and 'yes please'"),
                                            (["yes"], "at least 2"), (["yes", ""], "non-empty")])
def test_bad_choices_refused(pipe, frames, choices, named):
    with pytest.raises(InputError) as error:
        pipe.watch(frames, PROMPT, choices=choices)
    assert_one_line(error, named)


def test_prefix_cache_gives_the_same_tokens(pipe, frames):
    ids = pipe.prompt_ids("Describe the picture.")
    at = ids.index(pipe.modality("image").placeholder_id)
    assert at > 0, "the chat template puts no text before the image: nothing to cache"
    visual, _ = pipe.encode(frames[:1], "image", Timings())
    _, full = pipe.generator.prefill(*pipe.splice([ids], visual))
    prefix = pipe.generator.compute_prefix(pipe.generator.embeddings[ids[:at]][None])
    _, cached = pipe.generator.prefill(*pipe.splice([ids[at:]], visual), prefix)
    print(f"prefix of {at} tokens: max |logits difference| {np.abs(full - cached).max():.2e}")
    assert np.abs(full - cached).max() < 1e-4
    reference = [pipe.generate(f, "Describe the picture.", max_new_tokens=12).token_ids for f in frames]
    for prefix_cache in (True, False):
        answers = list(pipe.watch(frames, "Describe the picture.", max_new_tokens=12, latest=False,
                                  prefix_cache=prefix_cache))
        assert [a.token_ids for a in answers] == reference


# --- real files through the CLI and the API ----------------------------------------------------------

def write_video(path, frames: list[np.ndarray], rate: int = 8):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_video_file_through_the_cli(tiny_export, frames, tmp_path):
    import json

    video = write_video(tmp_path / "clip.mp4", frames + frames[:1])
    run = cli("runtime", tiny_export(32), "--video-stream", video, "--prompt", PROMPT, "--choices", "yes,no")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split(" | ")[0] for line in lines] == [f"frame {i}" for i in range(6)], run.stdout  # every frame
    assert "frames seen 6 | answered 6 | dropped 0" in run.stderr and "capture-to-answer" in run.stderr, run.stderr
    run = cli("runtime", tiny_export(32), "--video-stream", video, "--prompt", "Describe it.", "--max-new-tokens", 3,
              "--deadline-ms", 5000, "--jsonl", tmp_path / "answers.jsonl")
    assert run.returncode == 0 and run.stdout == "", run.stderr
    records = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["frame_index"] for r in records] == list(range(6)) and all(len(r["token_ids"]) <= 3 for r in records)


def test_ctrl_c_stops_the_cli_cleanly(tiny_export, frames, tmp_path):
    video = write_video(tmp_path / "slow.mp4", frames * 8, rate=2)  # 20 s at its own rate
    process = subprocess.Popen([sys.executable, "-m", "runtime", str(tiny_export(32)), "--video-stream", str(video),
                                "--realtime", "--prompt", PROMPT, "--choices", "yes,no"], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert first.startswith("frame 0 | "), first + err
    assert process.returncode == 130 and err.rstrip().endswith("interrupted") and "frames seen" in err, err


def test_folder_of_photos(pipe, photos, tmp_path):
    for name, photo in photos.items():
        Image.fromarray(photo).save(tmp_path / f"{name}.jpg")
    (tmp_path / "coffee.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # sorts between chelsea and coffee.jpg
    (tmp_path / "notes.txt").write_text("not an image")
    loop = pipe.watch(tmp_path, PROMPT, choices=CHOICES)
    answers = list(loop)
    names = sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".txt")
    assert [a.frame_index for a in answers] == [i for i, n in enumerate(names) if n != "coffee.png"]
    assert loop.stats.corrupt == 1 and answers[names.index("coffee.png")].dropped == 1
    for answer in answers:
        expected = reference_probs(pipe, tmp_path / names[answer.frame_index])
        assert np.abs(np.array(list(answer.choice_probs.values())) - expected).max() < 1e-5


# --- soak and faults ---------------------------------------------------------------------------------

def test_soak_1000_frames_flat_memory_no_leftovers(pipe):
    threads, fds = threading.active_count(), open_fds()
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(7)]
    resident = {}
    loop = pipe.watch((tiles[i % 7] for i in range(1000)), PROMPT, choices=["yes", "no"], latest=False)
    for answer in loop:
        if answer.frame_index + 1 in (100, 1000):
            resident[answer.frame_index + 1] = resident_mb()
    print(f"resident memory: frame 100 {resident[100]:.1f} MB, frame 1000 {resident[1000]:.1f} MB")
    assert loop.stats.answered == 1000
    assert resident[1000] - resident[100] < 4, "resident memory grew over the soak"
    assert threading.active_count() == threads and open_fds() == fds, "a thread or a file descriptor was left"


def test_source_that_raises_mid_stream(pipe, frames):
    closed = []

    def failing():
        try:
            yield from frames[:3]
            raise RuntimeError("sensor fault")
        finally:
            closed.append(True)

    threads = threading.active_count()
    answers = []
    with pytest.raises(RuntimeError, match="sensor fault"):
        for answer in pipe.watch(failing(), PROMPT, choices=CHOICES, latest=False):
            answers.append(answer)
    assert [a.frame_index for a in answers] == [0, 1, 2] and closed == [True]
    assert threading.active_count() == threads


def test_corrupt_frame_skipped_and_counted(pipe, frames):
    stream = [frames[0], np.zeros((4, 4, 3), np.float32), frames[1]]  # a frame no decoder gives
    loop = pipe.watch(stream, PROMPT, choices=CHOICES, latest=False)
    answers = list(loop)
    assert [(a.frame_index, a.dropped) for a in answers] == [(0, 0), (2, 1)]
    assert (loop.stats.seen, loop.stats.answered, loop.stats.corrupt) == (3, 2, 1)


def test_break_stops_the_capture_thread(pipe, frames):
    closed = []

    def endless():
        try:
            while True:
                yield frames[0]
                time.sleep(0.001)
        finally:
            closed.append(True)

    threads = threading.active_count()
    for answer in pipe.watch(endless(), PROMPT, choices=CHOICES):
        if answer.frame_index > 20:
            break
    assert threading.active_count() == threads and closed == [True]


class FakeCapture:
    """cv2.VideoCapture stand-in: opens once, gives two BGR frames, then every read and reopen fails."""

    opened = 0

    def __init__(self, target):
        FakeCapture.opened += 1
        self.frames = 2 if FakeCapture.opened == 1 else 0

    def isOpened(self):
        return FakeCapture.opened == 1

    def read(self):
        if self.frames:
            self.frames -= 1
            return True, np.full((32, 32, 3), 128, np.uint8)
        return False, None

    def release(self):
        pass


def test_camera_disconnect_gives_up_after_bounded_reconnects(pipe, monkeypatch):
    FakeCapture.opened = 0
    monkeypatch.setattr(sources, "_import_cv2", lambda: type("cv2", (), {"VideoCapture": FakeCapture}))
    camera = sources.Camera(0, reconnects=2, delay_s=0.01)
    loop = pipe.watch(camera, PROMPT, choices=CHOICES, latest=False)
    answers = []
    with pytest.raises(InputError) as error:
        for answer in loop:
            answers.append(answer)
    assert_one_line(error, "camera 0 disconnected", "2 reconnect attempts")
    assert len(answers) == 2 and loop.stats.reconnects == 2


def test_camera_that_does_not_exist(tiny_export, pipe):
    with pytest.raises(InputError) as error:
        pipe.watch(7, PROMPT)
    assert_one_line(error, "camera 7 cannot be opened")
    assert_refused(cli("runtime", tiny_export(32), "--camera", 7, "--prompt", PROMPT), "camera 7 cannot be opened")


def test_close_without_iterating_releases_the_source(pipe, frames, tmp_path):
    video = write_video(tmp_path / "clip.mp4", frames)
    threads, fds = threading.active_count(), open_fds()
    loop = pipe.watch(video, PROMPT, choices=CHOICES)
    assert open_fds() > fds  # the file is open from pipe.watch() on: a bad source fails there
    loop.close()
    assert threading.active_count() == threads and open_fds() == fds
    with pytest.raises(InputError) as error:
        next(iter(loop))
    assert_one_line(error, "already iterated or closed")
