"""Loading models, metadata, tokenization and the errors bad files must raise."""

import pytest

from mtllm_locally import Engine, EngineConfig, InvalidRequestError, ModelLoadError


def test_metadata_of_tiny_model(tiny_engine):
    info = tiny_engine.info
    assert info.architecture == "llama"
    assert info.name == "tiny-random-llama"
    assert info.n_vocab == 49152
    assert info.n_ctx_train == 1024
    assert info.n_embd == 64 and info.n_layer == 2
    assert "<|im_start|>" in info.chat_template
    assert tiny_engine.n_ctx == 1024


def test_tokenize_roundtrip(tiny_engine):
    text = "Hello, world! Ünïcødé ✓ 123"
    ids = tiny_engine.tokenize(text, add_special=False)
    assert len(ids) > 3
    assert tiny_engine.detokenize(ids) == text


def test_special_tokens_parse_only_when_asked(tiny_engine):
    as_special = tiny_engine.tokenize("<|im_start|>", add_special=False, parse_special=True)
    as_text = tiny_engine.tokenize("<|im_start|>", add_special=False, parse_special=False)
    assert as_special == [1]
    assert len(as_text) > 1


def test_detokenize_rejects_out_of_range_ids(tiny_engine):
    with pytest.raises(InvalidRequestError, match="out of range"):
        tiny_engine.detokenize([49152])


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        Engine(tmp_path / "nope.gguf")


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="not a file"):
        Engine(tmp_path)


def test_not_a_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        Engine(p)


def test_truncated_gguf(tmp_path, tiny_model_path):
    data = open(tiny_model_path, "rb").read()
    p = tmp_path / "truncated.gguf"
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match="cannot load GGUF"):
        Engine(p)


def test_corrupt_header(tmp_path, tiny_model_path):
    data = bytearray(open(tiny_model_path, "rb").read(4096))
    data[8:16] = b"\xff" * 8  # absurd tensor count
    p = tmp_path / "corrupt.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError):
        Engine(p)


@pytest.mark.parametrize("bad", [dict(n_ctx=-1), dict(n_ctx=8), dict(n_batch=0), dict(max_running=0),
                                 dict(max_queued=-1), dict(n_threads=-2)])
def test_bad_engine_config(bad):
    with pytest.raises(InvalidRequestError):
        EngineConfig(**bad)


def test_gpu_layers_without_a_gpu_backend_say_so(tiny_model_path, caplog):
    """n_gpu_layers on a llama.cpp with no GPU backend still serves (on the CPU), and says why
    nothing was offloaded instead of leaving the user to wonder about the speed."""
    from mtllm_locally import _engine

    with caplog.at_level("WARNING", logger="mtllm_locally"):
        with Engine(tiny_model_path, n_gpu_layers=99, n_ctx=256, flash_attn=False) as eng:
            assert eng.generate([1, 2, 3], max_tokens=3, ignore_eos=True).completion_tokens == 3
    warned = [r.getMessage() for r in caplog.records if "no GPU backend" in r.getMessage()]
    assert len(warned) == (0 if _engine.supports_gpu_offload() else 1)
    caplog.clear()
    with caplog.at_level("WARNING", logger="mtllm_locally"):
        Engine(tiny_model_path, n_ctx=256, flash_attn=False).close()
    assert not [r for r in caplog.records if "no GPU backend" in r.getMessage()]
