"""Calibration data and quantized (Q/DQ) graphs for TensorRT, made with NVIDIA ModelOpt's ONNX PTQ.

    python -m calibration EXPORT_DIR --images DIR --precision int8|fp8

`calibration.api.run(CalibrationOptions(...))` is the same thing from Python. The quantized graphs sit next
to the fp32 ones (`vision.int8.onnx`, ...) and `calibration.json` records what was quantized, what stayed
fp32 and why, the calibration set's sha256 and the metrics against the fp32 graphs. The runtime does not
read them yet: they are the input of TensorRT engine builds.
"""
