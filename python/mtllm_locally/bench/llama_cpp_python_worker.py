"""The alternative we compare against: llama-cpp-python's high-level `Llama`, run in
its own process (it loads its own copy of libllama/libggml). Reads a JSON job on
stdin, prints a JSON result on stdout."""

import json
import sys
import time


def _generate(llm, prompt: str, max_tokens: int) -> dict:
    tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    llm.reset()  # a fresh request: no reuse of the previous prompt's KV
    t_start = time.perf_counter()
    t_first = None
    n = 0
    for _tok in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
        n += 1
        if t_first is None:
            t_first = time.perf_counter()
        if n >= max_tokens:
            break
    t_end = time.perf_counter()
    return {"n_prompt": len(tokens), "n_gen": n, "ttft_s": t_first - t_start,
            "total_s": t_end - t_start, "decode_s": t_end - t_first}


def main():
    job = json.load(sys.stdin)
    from llama_cpp import Llama

    kw = dict(n_ctx=job["n_ctx"], n_threads=job["n_threads"], n_threads_batch=job["n_threads"], n_batch=512,
              verbose=False)
    out = {}
    if job.get("runs"):
        t0 = time.perf_counter()
        llm = Llama(model_path=job["model"], **kw)
        out["load_s"] = time.perf_counter() - t0
        out["runs"] = [_generate(llm, r["prompt"], r["max_tokens"]) for r in job["runs"]]
    if job.get("reload_adapters"):
        # llama-cpp-python's only way to serve another adapter: a new Llama.
        times = []
        for i, path in enumerate(job["reload_adapters"]):
            t0 = time.perf_counter()
            llm = Llama(model_path=job["model"], lora_path=path, **kw)
            times.append(time.perf_counter() - t0)
            del llm
        out["reload_s"] = times
    if job.get("typed_calls"):
        from llama_cpp import LlamaGrammar  # noqa: F401  (its JSON-schema grammar path)

        llm = Llama(model_path=job["model"], **kw)
        rf = {"type": "json_object", "schema": job["schema"]}
        llm.create_chat_completion(messages=job["typed_calls"][0], response_format=rf, temperature=0.0, max_tokens=48)
        t0 = time.perf_counter()
        texts = []
        for msgs in job["typed_calls"]:
            r = llm.create_chat_completion(messages=msgs, response_format=rf, temperature=0.0, max_tokens=48)
            texts.append(r["choices"][0]["message"]["content"])
        out["typed_s"] = time.perf_counter() - t0
        out["typed_texts"] = texts
        # llama.cpp's GBNF sampler cost per token: same prompt with and without the grammar.
        msgs = job["typed_calls"][0]
        t0 = time.perf_counter()
        r = llm.create_chat_completion(messages=msgs, temperature=0.0, max_tokens=48)
        free = (time.perf_counter() - t0, r["usage"]["completion_tokens"])
        t0 = time.perf_counter()
        r = llm.create_chat_completion(messages=msgs, response_format=rf, temperature=0.0, max_tokens=48)
        constrained = (time.perf_counter() - t0, r["usage"]["completion_tokens"])
        out["grammar_ms_per_token"] = 1000 * (constrained[0] / constrained[1] - free[0] / free[1])
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
