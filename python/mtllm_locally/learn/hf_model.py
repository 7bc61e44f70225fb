"""A Hugging Face model directory made from the served GGUF, with no download.

    write_hf_model("model.gguf", "hf/")   # config.json, model.safetensors, tokenizer, chat template

What vLLM (or transformers) loads to serve our adapters on the same base: the weights
are the GGUF dequantized exactly as the trainer sees them (float32 by default, so the
base an adapter was trained on is the base it is served on), in transformers' own class
for the family (`torch_model.transformers_model`). The tokenizer is transformers' own
conversion of the GGUF's vocabulary; as transformers loads it back from the directory,
it must give llama.cpp's ids on probe texts, or nothing is put in place. Its chat
template is the one our engine serves (the GGUF's, or the family's built-in one when
the file has none). `mtllm_manifest.json` says where the
directory came from: the GGUF's name and fingerprint, the dtype, the Hugging Face name.

The directory is written next to its destination and renamed into place, and is private
to its owner like everything else made from the user's models.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .. import models
from ..errors import InvalidRequestError
from .export import hf_base_name, install_directory
from .torch_model import HF_CLASS, gguf_reader, read_config, transformers_model
from .trainer import Tokenization

MANIFEST = "mtllm_manifest.json"
# Texts that the saved tokenizer, as transformers loads it back, must split as llama.cpp
# does: digits, runs of spaces and newlines, non-Latin scripts, emoji, code. What this
# catches: a GGUF pre-tokenizer transformers does not know (it falls back to GPT-2's
# split silently), and a model type whose tokenizer class transformers imposes over
# tokenizer.json (Qwen2's, with its own split and NFC normalizer).
TOKENIZER_PROBES = ("Hello, world! It's 2024-01-05: 12345 + 0.678 = 1,000,000.",
                    "  two  spaces\n\n\tand a tab\r\n", "Ünïcödé ñ 中文 日本語 한국어 العربية 🎉🚀",
                    "def f(x):\n    return {\"a\": [x**2, None]}  # done")


def write_hf_model(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                   progress: bool = True) -> Path:
    """Write the Hugging Face model directory of the GGUF at `gguf_path` to `out_dir`
    (which must not exist, or be empty, or be an earlier export: that is replaced whole)."""
    path = models.check_gguf(gguf_path)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_earlier_export(out))):
        raise InvalidRequestError(f"{out} exists and is not an earlier Hugging Face export; choose a new directory")
    reader = gguf_reader(path)
    shape = read_config(reader)  # refuses an architecture transformers_model does not build
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        # Llama 3.1+ RoPE factors: HF's llama3 rope_type wants the parameters they were made
        # from, which the GGUF does not keep; a config without them would serve another model.
        raise InvalidRequestError("this GGUF has RoPE frequency factors (Llama 3.1+), which cannot be written "
                                  "as a transformers config; export the Hugging Face model it came from instead")
    stages = None
    if progress:  # the weights are the long part: seconds per hundred million parameters
        from tqdm.auto import tqdm

        stages = tqdm(total=3, desc="export-hf", unit="stage")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _stage(stages, "tokenizer")
        tok = Tokenization(str(path))
        from transformers import AutoTokenizer, GenerationConfig

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        tokenizer.chat_template = tok.template.source  # what our engine serves, built-in fallback included
        tokenizer.model_max_length = shape.n_ctx
        _stage(stages, "weights")
        model = transformers_model(path).to(dtype)  # dequantized exactly as the trainer sees it
        _stage(stages, "saving")
        stops = _end_of_generation(tok.model)
        special = {"bos_token_id": _token_id(tok.model.bos),
                   "pad_token_id": _token_id(_field(reader, "tokenizer.ggml.padding_token_id", -1))}
        model.config.update({**special, "eos_token_id": stops[0] if stops else None})
        # vLLM then stops where llama.cpp stops: at every end-of-generation token (Gemma's <end_of_turn> too)
        model.generation_config = GenerationConfig(**special, eos_token_id=stops if len(stops) > 1 else
                                                   stops[0] if stops else None)
        model.save_pretrained(tmp)
        _save_tokenizer(tokenizer, tmp)
        _check_tokenizer(tmp, tok, path.name)
        (tmp / MANIFEST).write_text(json.dumps({
            "kind": "hf_model", "source_gguf": path.name, "base": models.fingerprint(path),
            "dtype": str(dtype).removeprefix("torch."), "architecture": HF_CLASS[shape.arch],
            "hf_name": hf_base_name(reader, path), "chat_template": "builtin" if tok.template.is_fallback else "gguf",
        }, indent=2))
        _stage(stages, None)
        return install_directory(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if stages is not None:
            stages.close()


def _is_earlier_export(directory: Path) -> bool:
    try:  # (an adapter `mtllm-locally export` copied out has a manifest of this name too)
        return json.loads((directory / MANIFEST).read_text()).get("kind") == "hf_model"
    except (OSError, ValueError, AttributeError):
        return False


def _save_tokenizer(tokenizer, directory: Path) -> None:
    tokenizer.save_pretrained(directory)
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.pop("local_files_only", None)  # how we loaded it, not a property of the tokenizer
    # Load tokenizer.json as written, the tokenizer _check_tokenizer verifies: a family's own
    # class (GemmaTokenizer, Qwen2Tokenizer) rebuilds its split on loading, whatever the file
    # says. Under this name transformers 4.x (which a vLLM may pin) and 5.x both load it.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2))


def _check_tokenizer(directory: Path, tok: Tokenization, name: str) -> None:
    """The tokenizer transformers loads from `directory` must give llama.cpp's ids for
    the probe texts: otherwise a model served from it would not see the prompts we train on."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    for text, add_special in [(t, False) for t in TOKENIZER_PROBES] + [(TOKENIZER_PROBES[0], True)]:
        # with add_special: llama.cpp adds BOS where the GGUF asks; so must transformers
        ours = tok.model.tokenize(text, add_special, True)
        theirs = tokenizer.encode(text, add_special_tokens=add_special)
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise InvalidRequestError(
                f"transformers' tokenizer for {name} ({type(tokenizer).__name__}) splits {text!r} differently "
                f"from llama.cpp (from token {at}: {ours[at:at + 4]} vs {theirs[at:at + 4]}); a model served "
                "with it would not see the prompts we train on")


def _end_of_generation(vocab_model) -> list[int]:
    """The tokens llama.cpp stops at, the end-of-sequence token first."""
    eos = vocab_model.eos
    return ([eos] if eos >= 0 else []) + [t for t in range(vocab_model.n_vocab) if t != eos and vocab_model.is_eog(t)]


def _token_id(token: int) -> int | None:
    return int(token) if token is not None and token >= 0 else None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return f.contents() if f is not None else default


def _stage(bar, name: str | None) -> None:
    """Close the stage running (if any) and show the next (None: all done)."""
    if bar is None:
        return
    if bar.postfix:
        bar.update(1)
    bar.set_postfix_str(name or "", refresh=True)
