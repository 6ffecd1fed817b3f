"""Where the time goes: per-layer times in real Caffe (``profile``), whole-forward latency in any runtime
(``latency``) and per-layer times inside a deployment runtime (``layer_times``), all measured in one kind of worker
(``worker``)."""
