"""`mtllm-locally` / `python -m mtllm_locally`: inspect a model and chat with it."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mtllm-locally", description="Local LLM runtime for Jac's by llm()")
    ap.add_argument("--model", default=None, help="GGUF path, or 'default' (embedded SmolLM2-135M)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="model metadata as JSON")
    g = sub.add_parser("chat", help="one chat turn, streamed")
    g.add_argument("message")
    g.add_argument("--system", default=None)
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args(argv)

    from . import Engine, MtllmError

    try:
        with Engine(args.model) as eng:
            if args.cmd == "info":
                info = asdict(eng.info)
                info["n_ctx"] = eng.n_ctx
                print(json.dumps(info, indent=2))
            elif args.cmd == "chat":
                msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [
                    {"role": "user", "content": args.message}]
                for chunk in eng.stream(messages=msgs, max_tokens=args.max_tokens, temperature=args.temperature):
                    print(chunk.text, end="", flush=True)
                print()
    except MtllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
