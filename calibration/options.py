"""Calibration configuration. The CLI flags map one to one onto `CalibrationOptions`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contract.errors import UserError

PRECISIONS = ("int8", "fp8")
# GPU families a Q/DQ graph is meant for, with their compute capability. FP8 tensor cores start at SM 8.9
# (Ada); Jetson Orin (SM 8.7, JetPack 6 / TensorRT 10.3) has INT8 but no FP8.
TARGETS = {"jetson-orin": (8, 7), "ada": (8, 9), "hopper": (9, 0)}
FP8_MIN_SM = (8, 9)
# ModelOpt's calibration algorithms for int8/fp8 activations (weights are always max-calibrated per channel).
METHODS = ("entropy", "max")
DEFAULT_METHOD = {"int8": "entropy", "fp8": "max"}  # ModelOpt's own defaults
DEFAULT_GRAPHS = ("vision", "projector")
DEFAULT_PROMPT = "Describe the image in detail."


class CalibrationError(UserError):
    """A calibration option, image set or calibration file the tool cannot use (one line, exit code 2)."""


@dataclass(frozen=True)
class CalibrationOptions:
    export_dir: Path  # directory written by `python -m export`
    precision: str  # one of PRECISIONS
    images: Path | None = None  # directory of calibration photos; or:
    calibration_data: Path | None = None  # a calibration .npz written by an earlier run (reproduces a build)
    graphs: tuple[str, ...] = DEFAULT_GRAPHS  # graph roles to quantize: the image graph, projector, llm
    out: Path | None = None  # where quantized graphs, calibration.json and the .npz go; None: export_dir
    target: str | None = None  # key of TARGETS; None: no particular GPU (FP8 then assumes Ada or newer)
    method: str | None = None  # key of METHODS; None: ModelOpt's default for the precision
    eval_images: Path | None = None  # held-out photos for the metrics; None: scikit-image's sample photos
    evaluate: bool = True  # measure top-k agreement, embedding cosine and latency after quantizing
    prompt: str = DEFAULT_PROMPT  # text around the image when calibrating the LLM graph (prefill inputs)
    latency_runs: int = 10  # timed runs per graph for the latency median (after 2 warm-up runs)

    def __post_init__(self) -> None:
        object.__setattr__(self, "graphs", tuple(self.graphs))
        if self.precision not in PRECISIONS:
            raise CalibrationError(f"--precision {self.precision!r} is not supported; use one of {', '.join(PRECISIONS)}")
        if self.target is not None and self.target not in TARGETS:
            raise CalibrationError(f"--target {self.target!r} is unknown; use one of {', '.join(TARGETS)}")
        if self.precision == "fp8" and self.target is not None and TARGETS[self.target] < FP8_MIN_SM:
            sm = ".".join(map(str, TARGETS[self.target]))
            raise CalibrationError(
                f"--precision fp8 cannot run on --target {self.target} (SM {sm} has no FP8 tensor cores; FP8 needs "
                "SM 8.9+, Ada or Hopper): use --precision int8 for Jetson Orin"
            )
        if self.method is not None and self.method not in METHODS:
            raise CalibrationError(f"--method {self.method!r} is unknown; use one of {', '.join(METHODS)}")
        if (self.images is None) == (self.calibration_data is None):
            raise CalibrationError("give either --images DIR or --calibration-data FILE.npz (exactly one)")
        if not self.graphs:
            raise CalibrationError("--graphs is empty; name at least one of vision, projector, llm")
        if len(set(self.graphs)) != len(self.graphs):
            raise CalibrationError(f"--graphs {','.join(self.graphs)} names a graph twice")
        if not self.prompt.strip():
            raise CalibrationError(f"--prompt {self.prompt!r} is empty; the LLM is calibrated on a prompt with the image")
        if not 1 <= self.latency_runs <= 1000:
            raise CalibrationError(f"--latency-runs {self.latency_runs} is out of range; use 1..1000")

    @property
    def calibration_method(self) -> str:
        return self.method or DEFAULT_METHOD[self.precision]

    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path(self.export_dir)
