"""Which merges to make: candidate merges priced by a Caffe profile (``candidates``) or measured on a deployment
runtime (``runtime_plan``), each lossy merge's measured accuracy risk (``risk``) and which of them a fine-tuning
budget can recover (``recoverable``)."""
