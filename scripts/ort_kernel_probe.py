"""What ONNX Runtime's CPU kernels do with the two forms that would close issue 12's decode gaps, checked on
one-node graphs against numpy (torch-free, ~5 seconds on 2 cores):

    python scripts/ort_kernel_probe.py

1. GroupQueryAttention with its own rotary (`do_rotary=1`, packed q/k/v, `position_ids`): onnxruntime-genai's
   form, one operator instead of prunevlm's `Split` + two `RotaryEmbedding` + `GroupQueryAttention`. Which
   positions does it rotate with, on a first prompt (no past) and on a decode step? prunevlm needs the given
   positions per token: left-padded batches start their rows at different positions, and FEATHER, FastV and
   `--positions original` skip positions.
2. MatMulNBits (4-bit, blocks of 32) with float zero points (HQQ's format, which `--llm-weights int4` now
   keeps exact with a small float branch instead) against uint8 zero points and none, at accuracy levels 0
   and 4, for one token (decode) and a 600-token prompt: right against numpy, and how fast.

Each line says what was measured; nothing here is assumed. Rerun it after an ONNX Runtime upgrade: if (1)
reports the given positions on a first prompt, or (2) float zero points as fast as uint8 ones, the export's
`--target onnxruntime` forms can change (export/llm.py `_fused_attention`, export/weights.py `_int4`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

HEADS, KV_HEADS, HEAD_DIM, CAPACITY, POSITIONS = 4, 2, 64, 32, 64


def _session(nodes, inputs, outputs, initializers=(), threads: int = 2):
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(nodes, "probe", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                                   helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# 1. GroupQueryAttention's rotary ---------------------------------------------------------------------------------
def _rotary_tables() -> tuple[np.ndarray, np.ndarray]:
    inverse = 1.0 / (10000 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM))
    angles = np.arange(POSITIONS)[:, None] * inverse[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _rotate(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE: x [B, S, heads, Dh] at positions [B, S]."""
    half = HEAD_DIM // 2
    c, s = cos[positions][:, :, None], sin[positions][:, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _reference(qkv, past_key, past_value, positions, bias, cos, sin):
    """numpy GroupQueryAttention: packed q/k/v [B, S, (H + 2 Hkv) Dh], rotary at `positions`, new keys and values
    written at P..P+S-1 of the buffers -> (output [B, S, H Dh], present key [B, Hkv, P+S, Dh])."""
    batch, seq, _ = qkv.shape
    total = bias.shape[-1]
    past = total - seq
    x = qkv.reshape(batch, seq, HEADS + 2 * KV_HEADS, HEAD_DIM)
    q = _rotate(x[:, :, :HEADS], positions, cos, sin)
    k = _rotate(x[:, :, HEADS:HEADS + KV_HEADS], positions, cos, sin)
    key = np.concatenate([past_key[:, :, :past], k.transpose(0, 2, 1, 3)], axis=2)
    value = np.concatenate([past_value[:, :, :past], x[:, :, HEADS + KV_HEADS:].transpose(0, 2, 1, 3)], axis=2)
    group = HEADS // KV_HEADS
    key, value = np.repeat(key, group, axis=1), np.repeat(value, group, axis=1)
    scores = q.transpose(0, 2, 1, 3) @ key.transpose(0, 1, 3, 2) / np.sqrt(HEAD_DIM) + bias
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = (probs @ value).transpose(0, 2, 1, 3).reshape(batch, seq, HEADS * HEAD_DIM)
    return out, key[:, ::group]


def probe_rotary(threads: int) -> list[str]:
    from onnx import TensorProto, helper

    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    value = helper.make_tensor_value_info
    inputs = [value("qkv", TensorProto.FLOAT, ["B", "S", width]),
              value("past_key", TensorProto.FLOAT, ["B", KV_HEADS, CAPACITY, HEAD_DIM]),
              value("past_value", TensorProto.FLOAT, ["B", KV_HEADS, CAPACITY, HEAD_DIM]),
              value("seqlens_k", TensorProto.INT32, ["B"]), value("total", TensorProto.INT32, []),
              value("cos", TensorProto.FLOAT, [POSITIONS, HEAD_DIM // 2]),
              value("sin", TensorProto.FLOAT, [POSITIONS, HEAD_DIM // 2]),
              value("position_ids", TensorProto.INT64, ["B", "S"]),
              value("bias", TensorProto.FLOAT, ["B", 1, "S", "T"])]
    node = helper.make_node(
        "GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total", "cos", "sin",
                                "position_ids", "bias"], ["out", "present_key", "present_value"],
        domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=1, rotary_interleaved=0,
        scale=HEAD_DIM**-0.5)
    session = _session([node], inputs, [value(n, TensorProto.FLOAT, None) for n in ("out", "present_key", "present_value")],
                       threads=threads)
    cos, sin = _rotary_tables()
    rng = np.random.default_rng(0)
    cases = [  # (what, past length, positions per row): rows that skip positions or start elsewhere
        ("first prompt, batch 1, positions 0 5 9", 0, [[0, 5, 9]]),
        ("first prompt, batch 1, positions 3 4 5", 0, [[3, 4, 5]]),
        ("first prompt, batch 2, rows 0 1 2 / 2 3 4", 0, [[0, 1, 2], [2, 3, 4]]),
        ("decode step, batch 2, past 4, positions 11 / 6", 4, [[11], [6]]),
    ]
    lines = []
    for what, past, given in cases:
        given = np.array(given, np.int64)
        batch, seq = given.shape
        total = past + seq
        qkv = rng.standard_normal((batch, seq, width)).astype(np.float32)
        past_key = rng.standard_normal((batch, KV_HEADS, CAPACITY, HEAD_DIM)).astype(np.float32)
        past_value = rng.standard_normal((batch, KV_HEADS, CAPACITY, HEAD_DIM)).astype(np.float32)
        bias = np.broadcast_to(np.triu(np.full((seq, total), -1e9, np.float32), k=past + 1), (batch, 1, seq, total))
        got_out, got_key, _ = session.run(None, {
            "qkv": qkv, "past_key": past_key, "past_value": past_value, "seqlens_k": np.full(batch, total - 1, np.int32),
            "total": np.array(total, np.int32), "cos": cos, "sin": sin, "position_ids": given,
            "bias": np.ascontiguousarray(bias)})
        readings = {"the given positions": given,
                    "position_ids[0][0] upward": np.broadcast_to(given[0, 0] + np.arange(seq), given.shape),
                    "0 upward (ignored)": np.broadcast_to(past + np.arange(seq), given.shape)}
        matched = []
        for reading, positions in readings.items():
            out, key = _reference(qkv, past_key, past_value, positions, bias, cos, sin)
            if np.abs(got_out - out).max() < 1e-4 and np.abs(got_key[:, :, :total] - key).max() < 1e-4:
                matched.append(reading)
        lines.append(f"GroupQueryAttention do_rotary, {what}: rotates with "
                     f"{' = '.join(matched) if matched else 'none of the given / first-row / default positions'}")
    return lines


# 2. MatMulNBits zero points ---------------------------------------------------------------------------------------
def probe_matmul_nbits(threads: int, repeats: int) -> list[str]:
    from onnx import TensorProto, helper, numpy_helper

    k, n, block = 576, 1536, 32
    blocks = k // block
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, blocks, block // 2)
    scales = rng.uniform(0.01, 0.02, (n, blocks)).astype(np.float32)
    integer = rng.integers(0, 16, (n, blocks)).astype(np.uint8)
    padded = np.concatenate([integer, np.zeros((n, blocks % 2), np.uint8)], axis=1)
    floats = rng.uniform(0, 15, (n, blocks)).astype(np.float32)
    zero_points = {  # label -> (the node's zero-point input, or None; the zero points as floats for numpy)
        "none": (None, np.full((n, blocks), 8.0, np.float32)),  # the kernel's default zero point is 8
        "uint8": ((padded[:, 0::2] | (padded[:, 1::2] << 4)).reshape(-1), integer.astype(np.float32)),
        "float": (floats.reshape(-1), floats),
    }

    def timed(what: str, node, initializers, weight=None):
        session = _session([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers, threads)
        for tokens in (1, 600):
            x = rng.standard_normal((tokens, k)).astype(np.float32)
            line = (f"{what}, {tokens:3d} token{'s' if tokens > 1 else ' '}: "
                    f"{_median_us(session, x, repeats if tokens == 1 else max(3, repeats // 20)):8.0f} us")
            if weight is not None:
                y, expected = session.run(None, {"x": x})[0], x @ weight
                line += f", max error {float(np.abs(y - expected).max() / np.abs(expected).max()):.1e} of max |numpy|"
            lines.append(line)

    lines: list[str] = []
    dense = rng.standard_normal((k, n)).astype(np.float32)  # the float MatMul the 4-bit one replaces
    timed(f"MatMul fp32 {k}x{n}", helper.make_node("MatMul", ["x", "w"], ["y"]), [numpy_helper.from_array(dense, "w")])
    for label, (stored, as_float) in zero_points.items():
        weight = (scales.repeat(block, 1) * (codes - as_float.repeat(block, 1))).T  # [K, N]
        initializers = [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(scales.reshape(-1), "s")]
        if stored is not None:
            initializers.append(numpy_helper.from_array(stored, "z"))
        for level in (0, 4):
            node = helper.make_node("MatMulNBits", ["x", "w", "s", "z"][:len(initializers) + 1], ["y"],
                                    domain="com.microsoft", K=k, N=n, bits=4, block_size=block, accuracy_level=level)
            timed(f"MatMulNBits 4-bit {k}x{n}, zero points {label:5s}, accuracy level {level}", node, initializers,
                  weight)
    return lines


def _median_us(session, x: np.ndarray, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per one-token case (default 200)")
    args = parser.parse_args(argv)
    if not 1 <= args.threads <= 256:
        parser.error(f"--threads {args.threads} is out of range: use 1..256")
    if not 1 <= args.repeats <= 100_000:
        parser.error(f"--repeats {args.repeats} is out of range: use 1..100000")
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, {args.threads} threads")
    for line in probe_rotary(args.threads) + probe_matmul_nbits(args.threads, args.repeats):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
