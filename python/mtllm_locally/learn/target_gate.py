"""The target gate: before a task's traffic moves to a vLLM server, the candidate is judged
there, on the examples the local gate used, as served (the same prompts and schema, greedy).

vLLM serves the unquantized base while our adapters were trained on the dequantized GGUF,
and it decodes with its own grammar engine: the local verdict does not carry over by itself.
The candidate passes on the server when its score there is within `max_drop` of its local
score and still beats the deployed version's (local) score by the policy's margin.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from ..demonstrations import Demonstration
from ..state.policy import TaskPolicy
from ..state.registry import AdapterVersion, Registry
from ..state.remote import Deployer
from .dataset import Example
from .gate import EvalResult, agreement, evaluate_remote


def remote_completion(deployer: Deployer, name: str):
    """One chat call to `name` on the deployer's server through LiteLLM (the route calls take)."""
    import litellm

    s = deployer.settings

    def complete(kw: dict) -> str:
        r = litellm.completion(model=f"hosted_vllm/{name}", api_base=deployer.target.api_base,
                               api_key=s.api_key(), timeout=s.timeout_s, **kw)
        return r.choices[0].message.content or ""
    return complete


def push(registry: Registry, v: AdapterVersion, serves: dict, policy: TaskPolicy, judged: Sequence[Example],
         budgets: Sequence[int], shown: Sequence[Demonstration], candidate: EvalResult, baseline: EvalResult,
         log=print) -> dict:
    """Load the candidate on the task's vLLM server and judge it there. Returns the record kept
    in the version's metrics: `state` is "served" (loaded, passed: promote), "rejected"
    (judged worse there: do not promote) or "unavailable" (could not be loaded or reached)."""
    settings = policy.remote
    v = dataclasses.replace(v, metrics={**v.metrics, "serves": serves})  # what the gate chose to serve
    if any(ex.tools for ex in judged):
        return {"state": "unavailable", "reason": "tool-calling tasks are served in process"}
    try:
        deployer = Deployer(registry, settings)
    except Exception as e:
        return {"state": "unavailable", "reason": str(e)}
    demos = tuple(shown) if serves.get("demonstrations") else ()

    def gate(dep: Deployer, name: str, version: AdapterVersion) -> dict:
        remote = evaluate_remote(remote_completion(dep, name), judged, budgets, demos)
        floor = max(candidate.score - settings.max_drop, baseline.score + policy.margin)
        passed = remote.score >= floor
        return {"passed": passed, "score": remote.score, "exact": remote.exact, "n": remote.n,
                "local_score": candidate.score, "baseline_score": baseline.score,
                "agreement_with_local": agreement(remote, candidate),
                "reason": f"{remote.score:.3f} on the server {'>=' if passed else '<'} {floor:.3f} "
                          f"(local {candidate.score:.3f} - max_drop {settings.max_drop}, baseline "
                          f"{baseline.score:.3f} + margin {policy.margin})"}
    try:
        name, verdict = deployer.push(v, gate)
    except Exception as e:
        log(f"{v.adapter_id}: not pushed to {deployer.key}: {type(e).__name__}: {e}")
        return {"state": "unavailable", "target": deployer.key, "reason": f"{type(e).__name__}: {e}"}
    record = {"target": deployer.key, "name": name, **(verdict or {"reason": "target gate off"})}
    passed = verdict is None or verdict.get("passed")
    record["state"] = "served" if passed else "unavailable" if verdict.get("failed") else "rejected"
    log(f"{v.adapter_id}: on {deployer.key} as {name}: {record['state']} ({record['reason']})")
    return record
