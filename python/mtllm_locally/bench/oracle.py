"""The loop bench's teacher: a LiteLLM custom provider `oracle/<task>` that knows
the right answers to the bench's two tasks. It stands in for a big cloud or local
model; importing this module registers it.

    route         a ticket -> the team for the product it mentions (the company's own
                  arbitrary table, so the base model sits near chance)
    read_invoice  an invoice's text -> {vendor, total, date}: the vendor copied, the
                  amount as a number, the date in the company's format (ISO, whatever
                  the text wrote)
"""

from __future__ import annotations

import json
import os
import random
import re

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before litellm loads: no cost-map fetch

import litellm  # noqa: E402
from litellm import CustomLLM  # noqa: E402
from litellm.types.utils import Choices, Message, ModelResponse, Usage  # noqa: E402

# Which team handles which product line: the company's own rule, nothing a model could know.
PRODUCTS = {"printer": 1, "laptop": 2, "router": 3, "phone": 4, "monitor": 1, "keyboard": 2, "camera": 3,
            "speaker": 4}


def team_for(text: str) -> int | None:
    return next((team for product, team in PRODUCTS.items() if product in text), None)


VENDORS = ("Acme Corp", "Globex Ltd", "Initech", "Umbrella Supplies", "Stark Parts", "Wayne Freight",
           "Hooli Cloud", "Vandelay Imports", "Soylent Foods", "Tyrell Systems", "Cyberdyne Labs", "Wonka Sweets",
           "Pied Piper", "Gringotts Bank", "Oceanic Air", "Nakatomi Trading")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
TEMPLATES = ("Invoice from {vendor}, dated {date}. Total due: {amount} USD.",
             "{vendor} - invoice #{no}, issued {date}. Amount payable {amount} EUR within 30 days.",
             "Please pay {amount} GBP to {vendor} (invoice {no} of {date}).",
             "Bill #{no} | {vendor} | {date} | grand total {amount}")


def invoices(n: int, seed: int) -> list[tuple[str, dict]]:
    """n invoice texts and the answer the company wants for each."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        y, m, d = rng.randint(2023, 2026), rng.randint(1, 12), rng.randint(1, 28)
        date = rng.choice((f"{MONTHS[m - 1]} {d}, {y}", f"{d:02d}/{m:02d}/{y}", f"{d} {MONTHS[m - 1][:3]} {y}",
                           f"{y}-{m:02d}-{d:02d}"))
        cents = rng.randint(1000, 500000)
        amount = f"{cents / 100:,.2f}" if rng.random() < 0.5 else f"{cents / 100:.2f}"
        vendor = rng.choice(VENDORS)
        text = rng.choice(TEMPLATES).format(vendor=vendor, date=date, amount=amount, no=rng.randint(100, 9999))
        out.append((text, {"vendor": vendor, "total": cents / 100, "date": f"{y}-{m:02d}-{d:02d}"}))
    return out


def invoice_for(text: str) -> dict | None:
    vendor = next((v for v in VENDORS if v in text), None)
    amount = re.search(r"(\d{1,3}(?:,\d{3})+|\d+)\.(\d\d)", text)
    date = None
    for pattern, order in ((r"(\d{4})-(\d\d)-(\d\d)", "ymd"), (r"(\d\d)/(\d\d)/(\d{4})", "dmy"),
                           (r"([A-Z][a-z]+) (\d{1,2}), (\d{4})", "Mdy"), (r"(\d{1,2}) ([A-Z][a-z]{2}) (\d{4})", "dMy")):
        m = re.search(pattern, text)
        if m:
            parts = dict(zip(order, m.groups()))
            month = parts.get("m") or next(i + 1 for i, name in enumerate(MONTHS) if name.startswith(parts["M"][:3]))
            date = f"{int(parts['y']):04d}-{int(month):02d}-{int(parts['d']):02d}"
            break
    if vendor is None or amount is None or date is None:
        return None
    return {"vendor": vendor, "total": float(amount.group(1).replace(",", "") + "." + amount.group(2)), "date": date}


def _answer(messages: list, optional_params: dict) -> str:
    last = messages[-1]
    text = last.get("content") if isinstance(last, dict) else getattr(last, "content", "")
    if isinstance(text, list):
        text = " ".join(p.get("text", "") for p in text if isinstance(p, dict))
    rf = optional_params.get("response_format") or {}
    props = ((rf.get("json_schema") or {}).get("schema") or {}).get("properties") or {}
    answer = invoice_for(text or "") if "vendor" in props else team_for(text or "")
    value = {"schema_object_wrapper": answer} if "schema_object_wrapper" in props else answer
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
