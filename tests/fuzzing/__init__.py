"""Random valid Caffe nets, and a mutation fuzzer for prototxt text and caffemodel bytes.

One package for three users: the hypothesis properties (tests/test_properties.py), the CI-sized fuzz
(tests/test_fuzz.py) and the long fuzz run (``python -m benchmarks.fuzz``). Three modules, each usable alone:

    nets       the generator of random valid nets, driven by a seeded ``random.Random`` (reproducible fuzz seeds)
               or by hypothesis' ``draw`` (so failing nets shrink to small ones), through the ``Chooser`` interface
    mutators   byte, line, number and structure mutations of the nets' files, and fuzz cases made from them
    harness    one case through the real CLI, judged by the contract below; the fuzz loop; Caffe in a worker

Every net the generator writes is one real Caffe accepts and runs: the properties run them in pycaffe, and Caffe
aborts the whole process on a net it refuses, so "valid" here means valid for Caffe, not only for deeprebirth.

The fuzzer's contract (what ``harness.run_case`` checks): any input bytes end either in written outputs that load
again, or in exit code 2 with one ``error: ...`` line on stderr and no output file at all. Anything else (another
exception, a traceback, exit 3, a hang, a stray temp file, an output we cannot read back) is a crash.
"""
