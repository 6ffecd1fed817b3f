"""Deploy targets: the net as ONNX (the project's own exporter), MNN (MNN's Caffe converter) or ncnn (ONNX via
pnnx), each checked against real Caffe in its runtime (``check.py``) and timed there (``deeprebirth.measure.profile``).

``api.export_files`` is what ``deeprebirth export`` calls; ``onnx.to_onnx`` is the exporter itself.
"""
