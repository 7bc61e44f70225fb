"""The alternative we compare against: llama-cpp-python's high-level `Llama`, run in
its own process (it loads its own copy of libllama/libggml). Reads a JSON job on
stdin, prints a JSON result on stdout."""

import json
import sys
import time


def main():
    job = json.load(sys.stdin)
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=job["model"], n_ctx=job["n_ctx"], n_threads=job["n_threads"],
                n_threads_batch=job["n_threads"], n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0
    out = {"load_s": load_s, "runs": []}
    for run in job["runs"]:
        tokens = llm.tokenize(run["prompt"].encode(), add_bos=False, special=True)
        llm.reset()  # a fresh request: no reuse of the previous prompt's KV
        t_start = time.perf_counter()
        t_first = None
        n = 0
        for _tok in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
            n += 1
            if t_first is None:
                t_first = time.perf_counter()
            if n >= run["max_tokens"]:
                break
        t_end = time.perf_counter()
        out["runs"].append({"n_prompt": len(tokens), "n_gen": n, "ttft_s": t_first - t_start,
                            "total_s": t_end - t_start, "decode_s": t_end - t_first})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
