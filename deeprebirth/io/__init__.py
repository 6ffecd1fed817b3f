"""Caffe's files: prototxt read and write (``caffe_io``, the one door: V1 upgrade, phase filter, input forms), the
caffemodel wire format (``caffemodel``), atomic output (``atomic``) and the digest of inputs (``fingerprint``)."""
