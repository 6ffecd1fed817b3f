"""deeprebirth: make trained Caffe networks run faster on mobile CPUs (the DeepRebirth method, AAAI 2018)."""

__version__ = "0.1.0"
