"""TensorRT engines from an export directory: a static compatibility lint (runs anywhere), trtexec commands.

`python -m engines lint EXPORT_DIR` checks every graph of an export against TensorRT's documented ONNX
support (see engines.trt_onnx_ops). Nothing here imports TensorRT at module level: the lint and the trtexec
command generator run on machines without a GPU.
"""
