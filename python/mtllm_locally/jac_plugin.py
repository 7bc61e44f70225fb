"""Jac plugin (entry point group `jac`): `jac run prog.jac` with
`Model(model_name="mtllm_locally/default")` — or `default_model = "mtllm_locally/default"`
under [plugins.byllm.model] in jac.toml — runs in-process, every `by llm()` call is
captured with byllm's verdict on it, and the learning loop improves the program's
functions (the process's runtime from wiring.py, which wires both loops).

jaclang runs hooks last-registered-first and the first result wins, so a plugin
registered before byllm would never run. Loading this module registers byllm's
plugin first (jaclang then skips byllm's own entry point), so ours always wraps it.
"""

from __future__ import annotations

import logging

from jaclang.jac0core.runtime import hookimpl, plugin_manager

from .wiring import register_provider, runtime

register_provider()

log = logging.getLogger("mtllm_locally.jac")


def _register_byllm_first() -> None:
    if "byllm" in plugin_manager._name2plugin:
        return
    try:
        from byllm.plugin import JacRuntime as ByllmRuntime
    except Exception as e:  # byllm missing: nothing to wrap
        log.debug("byllm not importable: %s", e)
        return
    plugin_manager.register(ByllmRuntime, name="byllm")


_register_byllm_first()


def _describe(mt_run) -> tuple[str | None, dict | None]:
    try:
        mtir = mt_run.mtir
        fn = getattr(mtir.caller, "__qualname__", None) or getattr(mtir.caller, "__name__", None)
        inputs = {str(k): v for k, v in (mtir.args or {}).items()}
        return fn, inputs
    except Exception:
        return None, None


def _verdict(mt_run, error: Exception | None) -> None:
    """Record byllm's verdict on the call (accepted, or the exception it raised)."""
    fn, inputs = _describe(mt_run)
    inv = getattr(mt_run, "_invocation_id", None)
    rt = runtime()
    rt.finish_call(inv, accepted=error is None, inputs=inputs, function=fn,
                   error=None if error is None else f"{type(error).__name__}: {error}")
    if inv and error is None:
        rt.last_invocation.set(inv)


class JacRuntime:
    @staticmethod
    @hookimpl
    def call_llm(model, mt_run):
        try:
            result = model.invoke(mt_run=mt_run)
        except Exception as e:
            _verdict(mt_run, e)
            raise
        _verdict(mt_run, None)
        return result

    @staticmethod
    @hookimpl
    async def acall_llm(model, mt_run):
        try:
            result = await model.ainvoke(mt_run=mt_run)
        except Exception as e:
            _verdict(mt_run, e)
            raise
        _verdict(mt_run, None)
        return result
