"""Running nets in Caffe: pycaffe and OpenCV dnn (``runtime``, ``reference``), the isolated child process every
Caffe run that may abort goes through (``isolation``), comparing two runs (``compare``), accuracy (``evaluate``),
data with Caffe's transform (``data``), and a net run one layer at a time over many images (``layer_by_layer``)."""
