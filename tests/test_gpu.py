"""--gpu for evaluate and profile: a clear one-line refusal on a CPU-only Caffe; on a CUDA build with a GPU, the same
numbers as on the CPU. The GPU half skips where there is no GPU (CI, this project's machines): it is unverified."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import graph_from_text, save
from nets import squeezenet_v10

from deeprebirth.caffe.evaluate import evaluate_files
from deeprebirth.caffe.runtime import caffe_has_cuda, gpu_count, import_caffe
from deeprebirth.cli import main
from deeprebirth.errors import DeepRebirthError
from deeprebirth.measure.profile import profile_net

SMALL = squeezenet_v10(size=48, classes=10, fires=((4, 8),) * 8, conv1=8)


def cuda_ready() -> bool:
    import_caffe()
    return caffe_has_cuda() and gpu_count() > 0


def test_gpu_on_a_cpu_only_caffe_is_refused_in_one_line(tmp_path: Path) -> None:
    import_caffe()
    if caffe_has_cuda():
        pytest.skip("this Caffe has CUDA")
    with pytest.raises(DeepRebirthError, match="built without CUDA"):
        import_caffe(gpu=0)
    proto, model = save(graph_from_text(SMALL, seed=0), tmp_path, "net")
    result = CliRunner().invoke(main, ["profile", proto, "--weights", model, "--gpu", "0", "--rounds", "1"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "GPU 0: this Caffe was built without CUDA" in result.stderr and "(--gpu)" in result.stderr
    np.savez(tmp_path / "data.npz", x=np.zeros((2, 48, 48, 3), np.uint8), y=np.zeros(2, np.int64))
    result = CliRunner().invoke(main, ["evaluate", proto, model, "--data", str(tmp_path / "data.npz"), "--gpu", "0"])
    assert result.exit_code == 2 and "built without CUDA" in result.stderr


@pytest.mark.skipif(not cuda_ready(), reason="needs Caffe built with DEEPREBIRTH_CUDA=1 and a GPU")
def test_evaluate_and_profile_on_the_gpu_agree_with_the_cpu(tmp_path: Path) -> None:
    proto, model = save(graph_from_text(SMALL, seed=0), tmp_path, "net")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.integers(0, 256, (20, 48, 48, 3), dtype=np.uint8),
             y=rng.integers(0, 10, 20))
    cpu = evaluate_files(proto, model, tmp_path / "data.npz")
    gpu = evaluate_files(proto, model, tmp_path / "data.npz", reference=(proto, model), gpu=0)
    assert gpu.top1 == cpu.top1 and gpu.agreement == 1.0
    profile = profile_net(proto, model, rounds=2, warmup=1, gpu=0)
    assert profile.forward_ms > 0 and len(profile.layers) == len(profile_net(proto, model, rounds=1).layers)


def test_finetune_gpu_on_a_cpu_only_caffe_is_refused_in_one_line(tmp_path: Path) -> None:
    import_caffe()
    if caffe_has_cuda():
        pytest.skip("this Caffe has CUDA")
    proto, model = save(graph_from_text(SMALL, seed=0), tmp_path, "net")
    (tmp_path / "report.json").write_text('{"changes": []}')
    np.savez(tmp_path / "data.npz", x=np.zeros((4, 48, 48, 3), np.uint8), y=np.zeros(4, np.int64))
    result = CliRunner().invoke(main, ["finetune", proto, model, proto, model, "--report", str(tmp_path / "report.json"),
                                       "--data", str(tmp_path / "data.npz"), "--out", str(tmp_path / "out.caffemodel"),
                                       "--gpu", "0"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "GPU 0: this Caffe was built without CUDA" in result.stderr and "(--gpu)" in result.stderr
    assert not (tmp_path / "out.caffemodel").exists()


@pytest.mark.skipif(not cuda_ready(), reason="needs Caffe built with DEEPREBIRTH_CUDA=1 and a GPU")
def test_finetune_on_the_gpu_trains(tmp_path: Path) -> None:
    from deeprebirth.api import rewrite_files
    from deeprebirth.finetune import FinetuneOptions, finetune_files
    from deeprebirth.finetune.train import SolverOptions

    proto, model = save(graph_from_text(SMALL, seed=0), tmp_path, "net")
    slim, slim_model, report = tmp_path / "slim.prototxt", tmp_path / "slim.caffemodel", tmp_path / "report.json"
    rewrite_files(proto, slim, model, slim_model, report)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.integers(0, 256, (64, 48, 48, 3), dtype=np.uint8), y=rng.integers(0, 10, 64))
    result = finetune_files(proto, model, slim, slim_model, report, tmp_path / "data.npz", tmp_path / "out.caffemodel",
                            FinetuneOptions(budget="40it", batch=8, gpu=0, solver=SolverOptions("sgd", lr=0.01)))
    assert result.complete and result.steps[-1].loss_end < result.steps[-1].loss_start
