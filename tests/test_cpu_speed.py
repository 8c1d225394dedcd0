"""The CPU speed options of the torch backend: bf16 with channels-last UNets, and the thread policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.cli_helpers import assert_one_line_error, run_cli
from unclip.engine.cpu_threads import CHECK_S, CpuThreadPolicy
from unclip.errors import UnclipError

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]
# The trained demo model at its defaults, bf16 against fp32 (uint8 levels). Measured: mean 0.56, max 30,
# 4.9 % of values off by more than 2 levels (edges of shapes move by a pixel); a wrong image is ~60.
BF16_MEAN_LEVELS = 2.0
BF16_SHARE_OFF = 0.15


@pytest.mark.cpu_bf16
def test_torch_bf16_on_cpu_is_bf16_channels_last_and_close_to_fp32():
    import unclip

    fp32 = unclip.load("demo").generate(PROMPTS, seed=0, num_images=2, output_type="np")
    pipe = unclip.load("demo", dtype="bf16")
    decoder = pipe.backend.networks["decoder"]
    conv = next(m for m in decoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.dtype == torch.bfloat16
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.backend.channels_last == ("decoder", "super_res_first", "super_res_last")  # the UNets
    seen = {}
    decoder.register_forward_pre_hook(lambda _m, args: seen.update(
        channels_last=args[0].is_contiguous(memory_format=torch.channels_last), dtype=args[0].dtype))
    diff = np.abs(pipe.generate(PROMPTS, seed=0, num_images=2, output_type="np") - fp32) * 255
    assert seen == {"channels_last": True, "dtype": torch.bfloat16}
    assert 0 < float(diff.mean()) <= BF16_MEAN_LEVELS  # > 0: it really ran in bf16
    assert float((diff > 2).mean()) <= BF16_SHARE_OFF


@pytest.mark.cpu_bf16
def test_cli_bf16_on_cpu_writes_images(tmp_path):
    result = run_cli("generate", "a red circle on a blue background", "--dtype", "bf16", "--device", "cpu",
                     "--out", str(tmp_path / "out"), "--prior-steps", "2", "--decoder-steps", "2",
                     "--super-res-steps", "2")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0000.png"]


def test_bf16_refused_where_the_cpu_has_no_native_bf16(tmp_path, monkeypatch):
    from unclip.engine import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    result = run_cli("generate", "a red circle", "--model", "tiny", "--dtype", "bf16",
                     "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "--dtype bf16 on --device cpu needs a CPU with native bf16", "--dtype fp32")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kwargs,message", [
    (dict(dtype="fp16"), "--dtype fp16 is the GPU fast path and needs --device cuda"),
    (dict(dtype="bf16", cuda_graphs=True), "--cuda-graphs is the GPU fast path and needs --device cuda"),
    (dict(dtype="bf16", kernels=True), "--kernels is the GPU fast path and needs --device cuda"),
])
def test_cpu_keeps_the_gpu_only_options_gpu_only(kwargs, message, monkeypatch):
    import unclip
    from unclip.engine import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # the GPU-only check, on any CPU
    with pytest.raises(UnclipError, match=message):
        unclip.load("tiny", **kwargs)


# -- the thread policy -----------------------------------------------------------------------------

def test_threads_follow_the_cores_other_processes_leave():
    policy = CpuThreadPolicy(max_threads=2, cores=2)
    # others' load in cores -> threads: a core counts as free when less than half of it is taken
    assert [policy.threads_for(x) for x in (0.0, 0.4, 0.6, 1.0, 1.7, 3.0)] == [2, 2, 1, 1, 1, 1]
    assert CpuThreadPolicy(max_threads=4, cores=8).threads_for(5.2) == 3


def test_update_reads_the_window_and_sets_torch_threads(monkeypatch):
    """A window in which others used 1.5 cores drops torch to 1 thread; a quiet one restores it."""
    from unclip.engine import cpu_threads

    clock = {"wall": 100.0, "busy": 1000.0, "ours": 10.0}
    monkeypatch.setattr(cpu_threads.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(cpu_threads.time, "process_time", lambda: clock["ours"])
    monkeypatch.setattr(cpu_threads, "busy_cpu_seconds", lambda: clock["busy"])
    calls = []
    monkeypatch.setattr(cpu_threads.torch, "set_num_threads", calls.append)
    policy = CpuThreadPolicy(max_threads=2, cores=2)

    def window(seconds: float, ours: float, others: float) -> None:
        clock["wall"] += seconds
        clock["ours"] += ours * seconds
        clock["busy"] += (ours + others) * seconds
        policy.update()

    window(CHECK_S / 2, ours=2.0, others=1.5)  # too short a window: no decision yet
    assert calls == [] and policy.threads == 2
    window(CHECK_S, ours=2.0, others=1.5)
    assert calls == [1] and policy.threads == 1
    window(CHECK_S, ours=1.0, others=0.9)  # still busy
    assert calls == [1]
    window(CHECK_S, ours=1.0, others=0.1)
    assert calls == [1, 2] and policy.threads == 2
    window(60.0, ours=0.0, others=2.0)  # the pipeline sat idle: a stale window decides nothing
    assert calls == [1, 2]


def test_policy_is_on_for_the_cpu_torch_backend(tiny_components):
    from unclip.engine.backends.torch_backend import TorchBackend

    backend = TorchBackend(tiny_components)
    assert isinstance(backend.threads, CpuThreadPolicy)
    assert backend.threads.max_threads == torch.get_num_threads()
