"""The loop bench's teacher: a LiteLLM custom provider `oracle/<task>` that knows
the right answer to the bench's routing task (a company's product line -> team
table, arbitrary, so the base model sits near chance). It stands in for a big cloud
or local model; importing this module registers it."""

from __future__ import annotations

import json
import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before litellm loads: no cost-map fetch

import litellm  # noqa: E402
from litellm import CustomLLM  # noqa: E402
from litellm.types.utils import Choices, Message, ModelResponse, Usage  # noqa: E402

# Which team handles which product line: the company's own rule, nothing a model could know.
PRODUCTS = {"printer": 1, "laptop": 2, "router": 3, "phone": 4, "monitor": 1, "keyboard": 2, "camera": 3,
            "speaker": 4}


def team_for(text: str) -> int | None:
    return next((team for product, team in PRODUCTS.items() if product in text), None)


def _answer(messages: list, optional_params: dict) -> str:
    last = messages[-1]
    text = last.get("content") if isinstance(last, dict) else getattr(last, "content", "")
    if isinstance(text, list):
        text = " ".join(p.get("text", "") for p in text if isinstance(p, dict))
    team = team_for(text or "")
    rf = optional_params.get("response_format") or {}
    props = ((rf.get("json_schema") or {}).get("schema") or {}).get("properties") or {}
    value = {"schema_object_wrapper": team} if "schema_object_wrapper" in props else team
    return json.dumps(value)


class Oracle(CustomLLM):
    def completion(self, model, messages, api_base, custom_prompt_dict, model_response, print_verbose, encoding,
                   api_key, logging_obj, optional_params, *args, **kwargs) -> ModelResponse:
        return ModelResponse(model=f"oracle/{model}", choices=[Choices(index=0, finish_reason="stop", message=Message(
            role="assistant", content=_answer(messages, optional_params)))],
            usage=Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0))

    async def acompletion(self, model, messages, api_base, custom_prompt_dict, model_response, print_verbose,
                          encoding, api_key, logging_obj, optional_params, *args, **kwargs) -> ModelResponse:
        return self.completion(model, messages, api_base, custom_prompt_dict, model_response, print_verbose,
                               encoding, api_key, logging_obj, optional_params)


def register() -> None:
    if not any(p.get("provider") == "oracle" for p in litellm.custom_provider_map):
        litellm.custom_provider_map.append({"provider": "oracle", "custom_handler": Oracle()})
        from litellm.utils import custom_llm_setup

        custom_llm_setup()


register()
