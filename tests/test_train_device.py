"""TrainConfig.device: where training runs, and that it changes nothing else.

The CPU tests are the real ones (CI has no GPU): a bad device is refused, "cpu" named
explicitly trains exactly what the default trains on a machine without CUDA (same losses,
same adapter files byte for byte), bf16 autocast (the CUDA default for bf16=None) trains,
and a checkpoint made on one device resumes on another.
On a machine with CUDA the last test trains the same thing on the GPU and compares it with
the CPU (`python -m mtllm_locally.bench gpu` measures the speed)."""

import threading

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from mtllm_locally import InvalidRequestError  # noqa: E402
from mtllm_locally.learn.trainer import (  # noqa: E402
    CHECKPOINT_FILE, Tokenization, TrainConfig, TrainingCancelled, checkpoint_key, prepare_examples, resolve_device,
    train)

EXAMPLES = [{"messages": [{"role": "user", "content": f"Colour of item {i}: {['apple', 'sky', 'grass'][i % 3]}"}],
             "completion": ["red", "blue", "green"][i % 3]} for i in range(16)]
CFG = TrainConfig(epochs=2, batch_size=4, learning_rate=5e-3, bf16=False, min_steps=0)


def files(result) -> dict[str, bytes]:
    """Everything a training writes, by name."""
    out = {"adapter.gguf": result.gguf_path.read_bytes()}
    out.update({p.name: p.read_bytes() for p in sorted(result.peft_dir.iterdir())})
    return out


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "mps", "cpu:0", "", " cpu", None, 0])
def test_a_bad_device_is_refused(bad):
    with pytest.raises(InvalidRequestError, match="device"):
        TrainConfig(device=bad)


def test_a_cuda_device_torch_does_not_see_is_refused():
    with pytest.raises(InvalidRequestError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="here 'auto' is the GPU (compared by the CUDA test)")
def test_explicit_cpu_trains_exactly_what_the_default_trains(tiny_model_path, tmp_path):
    default = train(tiny_model_path, EXAMPLES, CFG, tmp_path / "default", progress=False)
    cpu = train(tiny_model_path, EXAMPLES, TrainConfig(**{**CFG.__dict__, "device": "cpu"}), tmp_path / "cpu",
                progress=False)
    assert cpu.losses == default.losses and cpu.steps == default.steps == 8
    a, b = files(default), files(cpu)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    # the metadata names the device that trained it
    assert "'device': 'cpu'" in gguf.GGUFReader(str(cpu.gguf_path)).fields["mtllm.train_config"].contents()


def test_bf16_autocast_trains(tiny_model_path, tmp_path):
    """bf16 (the default on CUDA with bf16=None) used to fail at the first step: the fused
    LoRA product accumulated a bf16 GEMM into fp32 in place."""
    fp32 = train(tiny_model_path, EXAMPLES, TrainConfig(**{**CFG.__dict__, "device": "cpu"}), tmp_path / "a",
                 progress=False)
    bf16 = train(tiny_model_path, EXAMPLES, TrainConfig(**{**CFG.__dict__, "device": "cpu", "bf16": True}),
                 tmp_path / "b", progress=False)
    assert np.isfinite(bf16.losses).all() and bf16.losses[-1] < bf16.losses[0] / 2
    assert abs(bf16.losses[0] - fp32.losses[0]) < 0.05 * fp32.losses[0]  # the same model, rounded


class StopAfter(threading.Event):
    def __init__(self, n):
        super().__init__()
        self.n = n

    def is_set(self):
        self.n -= 1
        return self.n < 0


def test_a_checkpoint_resumes_on_another_device(tiny_model_path, tmp_path):
    data = prepare_examples(Tokenization(tiny_model_path), EXAMPLES, CFG.max_length)
    key = lambda **kw: checkpoint_key(tiny_model_path, data, TrainConfig(**{**CFG.__dict__, **kw}))
    assert key(device="cpu") == key(device="cuda") == key(device="cuda:1") == key(device="auto", threads=3)
    assert key(device="cpu") != key(device="cpu", learning_rate=1e-3)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(TrainingCancelled, match="checkpoint at step 3"):
        train(tiny_model_path, EXAMPLES, TrainConfig(**{**CFG.__dict__, "device": "cpu"}), tmp_path / "a",
              cancel=StopAfter(3), progress=False, checkpoint_dir=ckpt)
    assert (ckpt / CHECKPOINT_FILE).is_file()
    res = train(tiny_model_path, EXAMPLES, CFG, tmp_path / "b", progress=False, checkpoint_dir=ckpt)  # device "auto"
    assert res.resumed_from == 3 and res.steps == 8


# CUDA vs CPU (losses, adapter values) is compared where a GPU is: `python -m mtllm_locally.bench gpu`
# (train.loss_max_rel_diff), run by scripts/gpu_check.sh; CI has no GPU, so it is not a skipped test here.
