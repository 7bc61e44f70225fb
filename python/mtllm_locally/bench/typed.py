"""Typed bench: do typed `by llm()` calls complete, first time, without runaways?

One Jac program (`typed_program.jac`) makes 204 typed calls (22 with --quick), one at a time,
over eleven return shapes byllm produces: two enums (3-value sentiment, 5-value department),
an object (invoice: vendor, total, ISO date), a nested object (person with an address), an
object with optional fields (contact: phone and note `str | None = None`), a list of str
(keywords), a list of objects (`Ticket` with `items: list[Item]`, the shape that ran away in
issue 13), int, float, bool, and a ReAct tool call (`by llm(tools=[get_temperature])`). It runs
on `Model("mtllm_locally/default")` through byllm and LiteLLM exactly as a user's program does,
with every socket blocked, twice, each in its own work dir:

  before   MTLLM_LOCALLY_TYPED_GUARD=0: no budget-aware closing, no loop guard, no schema-derived
           default budget, retries identical to the first attempt (the old behaviour)
  after    the defaults

Each run's figures come from the program's own record of each call (value, declared type,
exception, wall time) and from its call store (.mtllm_locally/calls.sqlite3): the model turns
of each call, their finish reasons, tokens and, where the store has the column, `closed_by`
(the engine closed the value itself: "budget" or "loop").

Ratios (the "after" run):
  typed_complete_rate   calls that returned a value of the declared type from the first answer
                        (final turn: not a tool call, or byllm's finish_tool), that answer not cut
                        at the token limit unless the engine closed the value; / all calls; goal 1.0.
                        A call that raised (caught per call by the program) or never ran counts
                        against it.
  typed_retries         byllm retries: answers beyond the first, summed over the calls; goal 0
  p95_typed_latency_vs_median   p95 over every call of its latency / the median latency of its
                        own function; goal <= 3: no call runs away to the token limit. Relative
                        to its own function because the suite mixes shapes whose honest cost
                        differs 10x (a bool is 9 tokens, a ReAct call three model turns): over
                        the raw mix the median is a bool's and the p95 a ReAct call's. The raw
                        figure (p95_latency_vs_median_all_calls) and the worst function's own
                        p95/median are reported beside it.
  labelled_accuracy_after_vs_before   exact-match accuracy on the labelled calls (every shape
                        but keywords: inputs whose answer is stated in the text), after / before;
                        goal >= 1 (must not drop)
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from ..state.store import Store
from .offline import offline_pythonpath

GOALS = {"typed_complete_rate": "= 1.0", "typed_retries": "= 0", "p95_typed_latency_vs_median": "<= 3",
         "labelled_accuracy_after_vs_before": ">= 1"}
PROGRAM = Path(__file__).with_name("typed_program.jac")
MODEL = "mtllm_locally/default"
GUARD_ENV = "MTLLM_LOCALLY_TYPED_GUARD"

# shape -> the Jac function that serves it (its name in the store)
FUNCTIONS = {"sentiment": "classify_sentiment", "department": "route_department", "invoice": "extract_invoice",
             "person": "extract_person", "contact": "extract_contact", "keywords": "extract_keywords",
             "ticket": "summarize", "int": "quantity_ordered", "float": "price_of", "bool": "wants_refund",
             "tool": "warmest_city"}
SHAPES = tuple(FUNCTIONS)

# ----------------------------------------------------------------------------- the suite
# Every input but the keywords' states its answer plainly: that is the labelled subset.

_SENTIMENT = [
    ("I absolutely love this phone, best purchase ever!", "POSITIVE"),
    ("This is the worst laptop I have ever owned.", "NEGATIVE"),
    ("The store opens at 9 am on weekdays.", "NEUTRAL"),
    ("The service was wonderful and the staff were so kind.", "POSITIVE"),
    ("Terrible service, I will never come back.", "NEGATIVE"),
    ("The package contains two cables and a manual.", "NEUTRAL"),
    ("Fantastic movie, I enjoyed every minute of it.", "POSITIVE"),
    ("The food was cold and disgusting.", "NEGATIVE"),
    ("The meeting is scheduled for Tuesday.", "NEUTRAL"),
    ("This coffee is delicious, I am very happy with it.", "POSITIVE"),
    ("I hate this app, it crashes all the time.", "NEGATIVE"),
    ("The book has 320 pages.", "NEUTRAL"),
    ("Great product, works perfectly, highly recommended!", "POSITIVE"),
    ("Awful experience: the parcel arrived broken and nobody helped me.", "NEGATIVE"),
    ("The train leaves from platform 4.", "NEUTRAL"),
    ("What a lovely hotel, we had an amazing stay.", "POSITIVE"),
    ("Very disappointed, the shoes fell apart after a week.", "NEGATIVE"),
    ("This shirt is available in blue and grey.", "NEUTRAL"),
    ("The update made the app much faster, thank you so much!", "POSITIVE"),
    ("The movie was boring and far too long.", "NEGATIVE"),
    ("The report was sent to the team yesterday.", "NEUTRAL"),
    ("Excellent support, my problem was solved in minutes. Wonderful!", "POSITIVE"),
    ("Horrible customer support, rude and useless.", "NEGATIVE"),
    ("The office is on the third floor.", "NEUTRAL"),
]

_DEPARTMENT = [
    ("I was charged twice for my subscription this month.", "BILLING"),
    ("My parcel has not arrived and the tracking page shows no updates.", "SHIPPING"),
    ("The app crashes with error 500 every time I log in.", "TECHNICAL"),
    ("I would like a price quote for 50 licenses of your software.", "SALES"),
    ("Our lawyer needs a copy of the signed contract and its terms.", "LEGAL"),
    ("Please correct the wrong amount on my last invoice.", "BILLING"),
    ("The courier delivered my package to the wrong address.", "SHIPPING"),
    ("The website shows a blank page after the latest update.", "TECHNICAL"),
    ("Do you offer volume discounts if we buy 200 units?", "SALES"),
    ("Under GDPR I request the deletion of all my personal data.", "LEGAL"),
    ("My credit card was billed but the payment shows as failed.", "BILLING"),
    ("How long does delivery to Canada take, and which carrier do you use?", "SHIPPING"),
    ("I cannot reset my password, the reset link returns an error.", "TECHNICAL"),
    ("I am interested in upgrading to your enterprise plan, can a sales rep call me?", "SALES"),
    ("We believe your product infringes our trademark and want to discuss it with your legal team.", "LEGAL"),
    ("Why was I charged a late fee on my account?", "BILLING"),
    ("The box arrived damaged during shipping.", "SHIPPING"),
    ("The printer driver fails to install on Windows 11.", "TECHNICAL"),
    ("Can you send me a quote for 30 new laptops?", "SALES"),
    ("Please send us your privacy policy and data processing agreement for our legal review.", "LEGAL"),
    ("I need a refund for a duplicate payment on my invoice.", "BILLING"),
    ("My order shipped a week ago but the tracking number is invalid.", "SHIPPING"),
    ("The mobile app freezes when I open the settings screen.", "TECHNICAL"),
    ("What is the price of your premium package for a team of ten?", "SALES"),
]

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_INVOICES = [("Acme Corp", 120.50, "2024-03-03"), ("Globex", 89.99, "2024-01-15"), ("Initech", 1500.00, "2023-11-30"),
             ("Umbrella Ltd", 42.75, "2024-06-01"), ("Hooli", 310.20, "2024-02-29"),
             ("Stark Industries", 999.00, "2023-12-12"), ("Wayne Supplies", 64.10, "2024-04-18"),
             ("Cyberdyne", 2750.40, "2024-05-07"), ("Soylent Foods", 18.95, "2024-07-21"),
             ("Vandelay Imports", 455.00, "2024-08-09"), ("Bluth Company", 73.30, "2024-09-14"),
             ("Dunder Mifflin", 236.80, "2024-10-02"), ("Pied Piper", 5120.00, "2024-03-27"),
             ("Oscorp", 14.99, "2024-01-08"), ("Tyrell Corp", 860.25, "2023-10-19"),
             ("Wonka Sweets", 127.45, "2024-12-05"), ("Gringotts Bank", 700.00, "2024-11-11"),
             ("Nakatomi Trading", 333.33, "2024-02-02"), ("Prestige Worldwide", 58.60, "2024-06-23"),
             ("Los Pollos Hermanos", 91.15, "2024-05-30")]


def _long_date(iso: str) -> str:
    y, m, d = iso.split("-")
    return f"{_MONTHS[int(m) - 1]} {int(d)}, {y}"


def _invoice_text(i: int, vendor: str, total: float, iso: str) -> str:
    return [f"Invoice from {vendor}, dated {_long_date(iso)}. Total due: ${total:.2f}.",
            f"{vendor} - invoice date {iso} - amount payable {total:.2f} USD.",
            f"Please pay {vendor} the sum of ${total:.2f} for the invoice issued on {_long_date(iso)}.",
            f"INVOICE | Vendor: {vendor} | Date: {iso} | Total: {total:.2f} EUR"][i % 4]


_PEOPLE = [("Alice Martin", 34, "12 Rose Street", "Paris", "France"),
           ("Bob Schmidt", 42, "7 Linden Allee", "Berlin", "Germany"),
           ("Carla Rossi", 28, "3 Via Roma", "Rome", "Italy"),
           ("David Kim", 55, "88 Maple Avenue", "Toronto", "Canada"),
           ("Elena Garcia", 31, "21 Calle Mayor", "Madrid", "Spain"),
           ("Frank Olsen", 67, "5 Fjord Road", "Oslo", "Norway"),
           ("Grace Chen", 23, "160 Queen Street", "Sydney", "Australia"),
           ("Hiro Tanaka", 46, "2 Sakura Lane", "Tokyo", "Japan"),
           ("Ines Silva", 39, "9 Rua Augusta", "Lisbon", "Portugal"),
           ("Jack Wilson", 71, "44 Baker Street", "London", "England"),
           ("Karin Berg", 26, "15 Drottninggatan", "Stockholm", "Sweden"),
           ("Luis Moreno", 50, "70 Avenida Reforma", "Mexico City", "Mexico"),
           ("Mia Novak", 37, "11 Karlova", "Prague", "Czech Republic"),
           ("Nils Jansen", 29, "6 Prinsengracht", "Amsterdam", "Netherlands"),
           ("Olga Petrova", 61, "19 Nevsky Prospekt", "Saint Petersburg", "Russia"),
           ("Paul Dubois", 44, "27 Rue Neuve", "Brussels", "Belgium")]


def _person_text(i: int, name: str, age: int, street: str, city: str, country: str) -> str:
    return [f"{name} is {age} years old and lives at {street}, {city}, {country}.",
            f"Meet {name} ({age} years old), whose home address is {street} in {city}, {country}."][i % 2]


_CONTACTS = [  # name, phone or None, note or None
    ("Tom Becker", "555-0142", "prefers email after 5pm"), ("Maria Lopez", None, None),
    ("Sam Patel", "555-0199", None), ("Julia Weber", None, "met at the Berlin trade fair"),
    ("Omar Haddad", "555-0107", "speaks French and Arabic"), ("Lena Fischer", None, None),
    ("Chris Evans", "555-0163", None), ("Nora Lind", None, "allergic to peanuts"),
    ("Pedro Alves", "555-0120", "call only on weekdays"), ("Yuki Sato", None, None),
    ("Anna Kowalski", "555-0185", None), ("Ben Carter", None, "our main supplier contact"),
    ("Zoe Martin", "555-0131", "new customer since March"), ("Ivan Horvat", None, None),
    ("Emma Brown", "555-0174", None), ("Leo Rossi", None, "wants a callback next week")]


def _contact_text(name: str, phone: str | None, note: str | None) -> str:
    if phone and note:
        return f"Contact: {name}, phone {phone}. Note: {note}."
    if phone:
        return f"Add {name} to the address book, phone number {phone}."
    if note:
        return f"Contact {name}. Note: {note}."
    return f"New contact: {name}."


_KEYWORDS = [
    "Solar panels convert sunlight into electricity and are becoming cheaper every year.",
    "The football team won the championship after a dramatic penalty shootout.",
    "Regular exercise and a balanced diet reduce the risk of heart disease.",
    "The central bank raised interest rates to fight rising inflation.",
    "Volcanic eruptions can disrupt air travel because of the ash clouds they produce.",
    "The new smartphone has a faster processor, a larger battery and a better camera.",
    "Bees pollinate many crops, so their decline threatens global food production.",
    "The museum opened an exhibition of Renaissance paintings and sculptures.",
    "Electric cars need charging stations along highways for long trips.",
    "The chef prepared a traditional risotto with mushrooms and parmesan.",
    "Cloud computing lets companies rent servers instead of buying hardware.",
    "Heavy rain caused flooding in several villages along the river.",
    "The startup raised ten million dollars to build delivery drones.",
    "Learning a second language improves memory and concentration.",
    "The marathon runners passed the old bridge and the city hall.",
    "Astronomers discovered a new planet orbiting a distant star.",
]

_TICKETS = [  # customer, [(item, quantity)], urgent
    ("Anna Berg", [("chair", 3), ("desk", 2)], True),
    ("Mark Lee", [("monitor", 1)], False),
    ("Sofia Ricci", [("keyboard", 4), ("adapter", 4), ("cable", 10)], True),
    ("Peter Novak", [("lamp", 2), ("notebook", 20)], False),
    ("Hannah Vogel", [("printer", 1), ("toner cartridge", 3)], True),
    ("Diego Ruiz", [("mug", 12)], False),
    ("Olivia Smith", [("pen", 50), ("stapler", 2)], True),
    ("Tariq Aziz", [("laptop", 5), ("charger", 5)], False),
    ("Emily Clark", [("whiteboard", 1), ("marker", 8)], True),
    ("Jonas Meyer", [("headset", 6)], False),
    ("Laura Rossi", [("chair", 10), ("table", 2), ("lamp", 4)], True),
    ("Kenji Mori", [("router", 2), ("switch", 1)], False),
    ("Sara Holm", [("bookcase", 3)], True),
    ("Victor Hugo", [("webcam", 7), ("microphone", 2)], False),
    ("Nadia Karim", [("folder", 30), ("envelope", 100)], True),
    ("Oscar Diaz", [("desk", 1), ("monitor", 2)], False),
]


def _plural(item: str, qty: int) -> str:
    if qty == 1:
        return item
    if item.endswith(("s", "sh", "ch")):
        return item + "es"
    return item + "s"


def _ticket_text(i: int, customer: str, items: list, urgent: bool) -> str:
    listed = [f"{q} {_plural(n, q)}" for n, q in items]
    what = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
    urgency = ["This is urgent, we need them today.", "It is very urgent, please hurry!"][i % 2] if urgent else \
        ["No rush, next week is fine.", "This is not urgent."][i % 2]
    return f"Message from {customer}: please send us {what}. {urgency}"


_ORDERS = [(3, "boxes of printer paper"), (12, "office chairs"), (48, "coffee mugs"), (150, "pencils"),
           (7, "monitors"), (25, "notebooks"), (2, "standing desks"), (90, "envelopes"), (16, "keyboards"),
           (5, "laptops"), (300, "business cards"), (9, "desk lamps"), (60, "water bottles"), (4, "whiteboards"),
           (36, "USB cables"), (11, "headsets"), (200, "paper clips"), (8, "bookshelves"), (75, "folders"),
           (20, "plants")]


def _order_text(i: int, n: int, things: str) -> str:
    return [f"Please send {n} {things} to our office.", f"We need {n} {things} for the new team.",
            f"I'd like to order {n} {things}, thanks.", f"Order: {n} {things}, delivery to the main entrance."][i % 4]


_PRICES = [("blender", 49.99), ("desk lamp", 23.75), ("backpack", 64.50), ("coffee grinder", 89.00),
           ("umbrella", 12.30), ("headphones", 129.95), ("kettle", 34.20), ("yoga mat", 19.99),
           ("toaster", 27.45), ("bicycle helmet", 55.60), ("water filter", 8.75), ("office chair", 249.00),
           ("alarm clock", 15.25), ("frying pan", 42.80), ("travel mug", 11.40), ("keyboard", 74.99),
           ("wall clock", 31.10), ("tennis racket", 98.50), ("sleeping bag", 139.00), ("notebook", 3.95)]


def _price_text(i: int, product: str, price: float) -> str:
    return [f"The {product} costs ${price:.2f}.", f"Price: {price:.2f} EUR for one {product}.",
            f"You can buy a {product} for just {price:.2f} dollars.",
            f"Our {product} sells for ${price:.2f} today."][i % 4]


_REFUNDS = [
    ("I want my money back for this broken kettle.", True), ("What time do you open on Saturday?", False),
    ("Please refund my order 4411, it never arrived.", True), ("Thanks, the delivery was quick!", False),
    ("The jacket does not fit, I would like a full refund.", True), ("Can I change the color of my order?", False),
    ("I was charged twice, please give me a refund for the second charge.", True),
    ("Do you ship to Norway?", False), ("Refund me now, the product is defective.", True),
    ("I love the new design of your website.", False), ("I returned the shoes, when will I get my refund?", True),
    ("How do I reset my password?", False), ("Cancel my subscription and refund this month's payment.", True),
    ("Is the blue version back in stock?", False), ("The TV arrived cracked, I demand a refund.", True),
    ("Please add a gift note to my order.", False), ("I want to return this phone and get my money back.", True),
    ("Which payment methods do you accept?", False), ("Your service was not delivered, refund my fee please.", True),
    ("Great product, I will buy again.", False)]

_TEMPS = {"paris": 21, "oslo": 5, "madrid": 29, "london": 14, "cairo": 35, "moscow": -3, "tokyo": 18, "sydney": 25,
          "reykjavik": 2, "rome": 26, "berlin": 12, "lisbon": 23}  # = get_temperature in typed_program.jac
_TOOL_CITIES = [("Paris", "Oslo"), ("London", "Madrid"), ("Cairo", "Berlin"), ("Moscow", "Tokyo"),
                ("Reykjavik", "Sydney"), ("Rome", "Lisbon"), ("Oslo", "London", "Paris"),
                ("Berlin", "Cairo", "Tokyo"), ("Madrid", "Moscow"), ("Lisbon", "Reykjavik", "Berlin"),
                ("Sydney", "Rome"), ("Tokyo", "Paris", "Oslo")]


def suite(quick: bool = False) -> list[dict]:
    """The cases, round-robin over the shapes (so load on the machine spreads over all of
    them): {"i", "shape", "text", "label"}; label None for the unlabelled keywords."""
    by_shape: dict[str, list[tuple[str, dict | None]]] = {
        "sentiment": [(t, {"value": s}) for t, s in _SENTIMENT],
        "department": [(t, {"value": d}) for t, d in _DEPARTMENT],
        "invoice": [(_invoice_text(i, v, t, d), {"vendor": v, "total": t, "date": d})
                    for i, (v, t, d) in enumerate(_INVOICES)],
        "person": [(_person_text(i, *p), {"name": p[0], "age": p[1], "city": p[3], "country": p[4]})
                   for i, p in enumerate(_PEOPLE)],
        "contact": [(_contact_text(n, ph, no), {"name": n, "phone": ph, "has_note": no is not None})
                    for n, ph, no in _CONTACTS],
        "keywords": [(t, None) for t in _KEYWORDS],
        "ticket": [(_ticket_text(i, c, it, u), {"customer": c, "urgent": u, "items": [[n, q] for n, q in it]})
                   for i, (c, it, u) in enumerate(_TICKETS)],
        "int": [(_order_text(i, n, th), {"value": n}) for i, (n, th) in enumerate(_ORDERS)],
        "float": [(_price_text(i, p, v), {"value": v}) for i, (p, v) in enumerate(_PRICES)],
        "bool": [(t, {"value": b}) for t, b in _REFUNDS],
        "tool": [(", ".join(cs), {"value": max(cs, key=lambda c: _TEMPS[c.lower()]), "cities": list(cs)})
                 for cs in _TOOL_CITIES],
    }
    per_shape = 2 if quick else max(len(v) for v in by_shape.values())
    cases: list[dict] = []
    for j in range(per_shape):
        for shape in SHAPES:
            if j < len(by_shape[shape]):
                text, label = by_shape[shape][j]
                cases.append({"i": len(cases), "shape": shape, "text": text, "label": label})
    return cases


# ----------------------------------------------------------------------------- scoring
def _norm(s) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", str(s).lower()).split())


def _same_name(want: str, got) -> bool:
    return _norm(want) == _norm(got)


def _num(v) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(str(v).replace("$", "").replace(",", "").strip())
    except ValueError:
        return None


def _close(want: float, got) -> bool:
    g = _num(got)
    return g is not None and abs(g - want) < 0.006


def _singular(name) -> str:
    n = _norm(name)
    if n.endswith(("sses", "ches", "shes", "xes")):
        return n[:-2]
    if n.endswith("s") and not n.endswith("ss") and len(n) > 3:
        return n[:-1]
    return n


def score(shape: str, label: dict | None, value) -> dict[str, bool] | None:
    """Per labelled field: is the value right? None for an unlabelled case."""
    if label is None:
        return None
    obj = value if isinstance(value, dict) else {}
    if shape in ("sentiment", "department"):
        return {"value": value == label["value"]}
    if shape == "invoice":
        return {"vendor": _same_name(label["vendor"], obj.get("vendor")),
                "total": _close(label["total"], obj.get("total")),
                "date": str(obj.get("date", "")).strip() == label["date"]}
    if shape == "person":
        addr = obj.get("address") if isinstance(obj.get("address"), dict) else {}
        return {"name": _same_name(label["name"], obj.get("name")), "age": obj.get("age") == label["age"],
                "city": _norm(addr.get("city")) == _norm(label["city"]),
                "country": _norm(addr.get("country")) == _norm(label["country"])}
    if shape == "contact":
        phone, want = obj.get("phone"), label["phone"]
        digits = re.sub(r"\D", "", str(phone or ""))
        return {"name": _same_name(label["name"], obj.get("name")),
                "phone": (not digits) if want is None else digits == re.sub(r"\D", "", want),
                "has_note": bool(str(obj.get("note") or "").strip()) == label["has_note"]}
    if shape == "ticket":
        items = obj.get("items") if isinstance(obj.get("items"), list) else []
        got = Counter((_singular(it.get("name")), it.get("quantity")) for it in items if isinstance(it, dict))
        want = Counter((_singular(n), q) for n, q in label["items"])
        return {"customer": _same_name(label["customer"], obj.get("customer")),
                "urgent": obj.get("urgent") is label["urgent"],
                "items": got == want}
    if shape == "int":
        return {"value": isinstance(value, int) and not isinstance(value, bool) and value == label["value"]}
    if shape == "float":
        return {"value": _close(label["value"], value)}
    if shape == "bool":
        return {"value": value is label["value"]}
    if shape == "tool":  # names the warmest city, and no other
        named = {c for c in label["cities"] if re.search(rf"\b{_norm(c)}\b", _norm(value))}
        return {"value": named == {label["value"]}}
    raise ValueError(shape)


# ----------------------------------------------------------------------------- running
def _switch_known() -> bool:
    """Does the installed package know MTLLM_LOCALLY_TYPED_GUARD? (If not, before = after.)"""
    spec = importlib.util.find_spec("mtllm_locally")
    root = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if root is None:
        return False
    for p in root.rglob("*.py"):
        try:
            if GUARD_ENV in p.read_text(encoding="utf-8", errors="ignore"):
                return True
        except OSError:
            pass
    return False


def _run_program(workdir: Path, cases: list[dict], guard: bool, name: str, log, timeout_s: float) -> dict:
    """`jac run` the program in `workdir`; relay its progress; return what it recorded."""
    shutil.copy(PROGRAM, workdir / PROGRAM.name)
    suite_path, out_path = workdir / "suite.tsv", workdir / "results.jsonl"
    suite_path.write_text("".join(f"{c['i']}\t{c['shape']}\t{c['text']}\n" for c in cases), encoding="utf-8")
    env = dict(os.environ, BENCH_MODEL=MODEL, BENCH_SUITE=str(suite_path), BENCH_OUT=str(out_path),
               MTLLM_LOCALLY_LEARN="0",  # no training in the background: latency is the calls' own
               PYTHONPATH=offline_pythonpath(workdir, os.environ.get("PYTHONPATH")))
    for var in ("MTLLM_LOCALLY_STORE", "MTLLM_LOCALLY_CAPTURE", GUARD_ENV):  # the store in workdir, capture on
        env.pop(var, None)
    if not guard:
        env[GUARD_ENV] = "0"
    jac = Path(sys.executable).with_name("jac")
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(jac), "run", PROGRAM.name], cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace")
    tail: list[str] = []
    stdout: list[str] = []
    threading.Thread(target=lambda: stdout.extend(proc.stdout), daemon=True).start()
    killer = threading.Timer(timeout_s, proc.kill)
    killer.start()
    n, last_log = len(cases), time.perf_counter()
    try:
        for line in proc.stderr:
            line = line.rstrip("\n")
            tail = (tail + [line])[-60:]
            if line.startswith("#progress"):
                k = int(line.split()[1].split("/")[0])
                bad = not line.endswith(" ok")
                if bad or k == n or k % 20 == 0 or time.perf_counter() - last_log > 60:
                    log(f"      [{name}] {line[len('#progress '):]}  ({time.perf_counter() - t0:.0f} s)")
                    last_log = time.perf_counter()
            elif line.startswith("#warmup"):
                log(f"      [{name}] {line[1:]}")
        rc = proc.wait()
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - t0
    results = []
    if out_path.exists():
        for line in out_path.read_text(encoding="utf-8").splitlines():
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut short by a crash
    return {"rc": rc, "wall_s": wall, "timed_out": wall >= timeout_s, "results": results,
            "stderr_tail": "\n".join(tail[-20:]) if rc != 0 else "", "stdout_tail": "".join(stdout)[-500:]}


# ----------------------------------------------------------------------------- analysis
def _pct(xs: list[float], q: float) -> float:
    """Percentile with linear interpolation (numpy's default)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def _is_final(turn: dict) -> bool:
    """A turn that answers the call: not a tool call, or byllm's finish_tool."""
    try:
        calls = json.loads(turn.get("tool_calls_json") or "null") or []
    except json.JSONDecodeError:
        calls = []
    if not calls:
        return True
    names = [((c.get("function") or {}).get("name") if isinstance(c, dict) else None) or
             (c.get("name") if isinstance(c, dict) else None) for c in calls]
    return "finish_tool" in names


def analyse(workdir: Path, cases: list[dict], run: dict) -> tuple[dict, list[dict]]:
    """One run's figures from the program's records and its call store, and the per-call rows."""
    store_path = workdir / ".mtllm_locally" / "calls.sqlite3"
    calls, turns_of, has_closed_by, has_attempt = [], defaultdict(list), False, False
    if store_path.exists():
        # Which columns the program's own version wrote, read before Store() migrates the file to ours.
        ro = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
        try:
            cols = {r[1] for r in ro.execute("PRAGMA table_info(turns)")}
        finally:
            ro.close()
        has_closed_by, has_attempt = "closed_by" in cols, "attempt" in cols
        store = Store(store_path)
        try:
            calls = store.rows("SELECT * FROM calls ORDER BY created_at")
            for t in store.rows("SELECT * FROM turns ORDER BY invocation_id, turn_index"):
                turns_of[t["invocation_id"]].append(t)
        finally:
            store.close()
    by_fn = defaultdict(list)
    for c in calls:
        by_fn[c["function"]].append(c)
    results = {r["i"]: r for r in run["results"]}

    per_call = []
    for case in cases:
        r = results.get(case["i"])
        row = {"i": case["i"], "shape": case["shape"], "ran": r is not None, "ok": bool(r and r["ok"]),
               "type_ok": bool(r and r["type_ok"]), "error": r and r["error"], "latency_s": r and r.get("latency_s"),
               "value": r and r.get("value")}
        matched = []
        if r is not None:  # calls are sequential: the store's calls of this function inside the call's window
            matched = [c for c in by_fn.get(FUNCTIONS[case["shape"]], ())
                       if r["t_start"] - 0.01 <= c["created_at"] <= r["t_end"] + 0.01]
        turns = [t for c in matched for t in turns_of[c["invocation_id"]]]
        finals = [t for t in turns if _is_final(t)]
        row.update(
            in_store=bool(matched), turns=len(turns), final_turns=len(finals), retries=max(0, len(finals) - 1),
            store_attempts=max((t.get("attempt") or 1 for t in turns), default=0) if has_attempt else None,
            finish_reasons=[t.get("finish_reason") for t in finals],
            closed_by=[t.get("closed_by") for t in finals if t.get("closed_by")] if has_closed_by else None,
            completion_tokens=sum(t.get("completion_tokens") or 0 for t in turns),
            store_latency_s=sum(t.get("latency_ms") or 0 for t in turns) / 1000)
        if case["shape"] == "tool" and "finish_tool" in str(row["value"]):
            row["type_ok"] = False  # byllm handed back the raw text of a finish_tool call it could not parse
        # complete: a value of the declared type from the first answer the model gave, and that answer
        # whole (an answer cut at the token limit counts only if the engine closed the value itself)
        first = finals[0] if finals else {}
        cut = first.get("finish_reason") == "length" and not (has_closed_by and first.get("closed_by"))
        row["complete_first"] = row["ok"] and row["type_ok"] and (len(finals) == 1 and not cut or not matched)
        row["fields"] = score(case["shape"], case["label"], row["value"] if row["ok"] else None)
        row["correct"] = None if row["fields"] is None else bool(row["ok"] and all(row["fields"].values()))
        per_call.append(row)

    def summary(rows: list[dict]) -> dict:
        lat = [r["latency_s"] for r in rows if r["latency_s"] is not None]
        labelled = [r for r in rows if r["correct"] is not None]
        fields = Counter()
        fields_ok = Counter()
        for r in labelled:
            for f, ok in r["fields"].items():
                fields[f] += 1
                fields_ok[f] += ok
        closed = Counter(c for r in rows for c in (r["closed_by"] or ()))
        out = {
            "calls": len(rows), "ran": sum(r["ran"] for r in rows), "errors": sum(bool(r["error"]) for r in rows),
            "wrong_type": sum(r["ok"] and not r["type_ok"] for r in rows),
            "complete_first": sum(r["complete_first"] for r in rows),
            "typed_complete_rate": _ratio(sum(r["complete_first"] for r in rows), len(rows)),
            "retries": sum(r["retries"] for r in rows),
            "calls_retried": sum(r["retries"] > 0 for r in rows),
            "store_marked_retries": sum(max(0, (r["store_attempts"] or 1) - 1) for r in rows) if has_attempt else None,
            "length_finishes": sum(fr == "length" for r in rows for fr in r["finish_reasons"]),
            "closed_by": dict(closed) if has_closed_by else None,
            "median_latency_s": _pct(lat, 0.5), "p95_latency_s": _pct(lat, 0.95), "max_latency_s": max(lat, default=0),
            "p95_vs_median": _ratio(_pct(lat, 0.95), _pct(lat, 0.5)),
            "median_completion_tokens": _pct([r["completion_tokens"] for r in rows], 0.5),
            "max_completion_tokens": max((r["completion_tokens"] for r in rows), default=0),
            "labelled": len(labelled), "labelled_correct": sum(r["correct"] for r in labelled),
            "labelled_accuracy": _ratio(sum(r["correct"] for r in labelled), len(labelled)),
            "field_accuracy": {f: fields_ok[f] / fields[f] for f in fields},
        }
        return out

    shapes = {s: summary([r for r in per_call if r["shape"] == s]) for s in SHAPES
              if any(r["shape"] == s for r in per_call)}
    total = summary(per_call)
    shape_median = {s: v["median_latency_s"] for s, v in shapes.items()}
    rel = [r["latency_s"] / shape_median[r["shape"]] for r in per_call
           if r["latency_s"] is not None and shape_median.get(r["shape"], 0) > 0]
    total["p95_latency_vs_shape_median"] = _pct(rel, 0.95)
    total["worst_shape_p95_vs_median"] = max((v["p95_vs_median"] for v in shapes.values()
                                               if not math.isnan(v["p95_vs_median"])), default=float("nan"))
    kw = [r for r in per_call if r["shape"] == "keywords" and r["ok"] and isinstance(r["value"], list)]
    text_of = {c["i"]: _norm(c["text"]) for c in cases}
    in_text = [_norm(k) in text_of[r["i"]] for r in kw for k in r["value"] if isinstance(k, str) and _norm(k)]
    shapes.get("keywords", {}).update(
        mean_keywords=_ratio(sum(len(r["value"]) for r in kw), len(kw)),
        keywords_in_text=_ratio(sum(in_text), len(in_text)))
    return {"program": {"rc": run["rc"], "wall_s": run["wall_s"], "timed_out": run["timed_out"],
                        "stderr_tail": run["stderr_tail"]},
            "store": {"calls": len(calls), "closed_by_column": has_closed_by, "attempt_column": has_attempt,
                      "unmatched_calls": sum(r["ran"] and not r["in_store"] for r in per_call)},
            "total": total, "by_shape": shapes,
            "failures": [{k: r[k] for k in ("i", "shape", "error", "latency_s", "final_turns", "finish_reasons")}
                         for r in per_call if not r["complete_first"]][:40]}, per_call


def _clean(v):
    """NaN (a figure with nothing to measure, e.g. accuracy of an unlabelled shape) -> None, for JSON."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def _line(name: str, t: dict) -> str:
    closed = t["closed_by"]
    closed_s = "n/a (no closed_by column)" if closed is None else \
        (", ".join(f"{k} {v}" for k, v in closed.items()) or "0")
    return (f"{name}: {t['complete_first']}/{t['calls']} complete on the first answer, {t['retries']} retries "
            f"({t['calls_retried']} calls), {t['errors']} errors, {t['length_finishes']} answers cut at the "
            f"token limit, closed by the engine: {closed_s}; latency median {t['median_latency_s']:.2f} s, "
            f"p95 {t['p95_latency_s']:.2f} s, max {t['max_latency_s']:.1f} s; labelled accuracy "
            f"{t['labelled_correct']}/{t['labelled']}")


def run(quick: bool = False, log=print) -> dict:
    cases = suite(quick)
    work = Path(tempfile.mkdtemp(prefix="mtllm-typed-bench-"))
    known = _switch_known()
    log(f"typed bench: {len(cases)} typed calls over {len(SHAPES)} shapes, one at a time, on {MODEL} "
        f"(work dir {work})")
    if not known:
        log(f"      note: the installed package does not mention {GUARD_ENV}: 'before' and 'after' run the same code")
    timeout_s = 1800 if quick else 4 * 3600
    out: dict = {"goals": GOALS, "calls": len(cases), "shapes": list(SHAPES), "typed_guard_switch_known": known}
    for k, (name, guard) in enumerate((("before", False), ("after", True)), 1):
        wd = work / name
        wd.mkdir()
        how = f"{GUARD_ENV}=0 (the old behaviour)" if not guard else "the defaults"
        log(f"[{k}/2] {name}: jac run with {how}")
        r = _run_program(wd, cases, guard, name, log, timeout_s)
        res, per_call = analyse(wd, cases, r)
        (wd / "calls.json").write_text(json.dumps(per_call, indent=1, default=repr))
        if r["rc"] != 0:
            log(f"      [{name}] the program exited with {r['rc']}{' (timed out)' if r['timed_out'] else ''}:\n"
                + r["stderr_tail"])
        log(f"      {r['wall_s']:.0f} s wall. " + _line(name, res["total"]))
        out[name] = res
    b, a = out["before"]["total"], out["after"]["total"]
    acc_b, acc_a = b["labelled_accuracy"], a["labelled_accuracy"]
    out["ratios"] = {
        "typed_complete_rate": a["typed_complete_rate"],
        "typed_retries": float(a["retries"]),
        "p95_typed_latency_vs_median": a["p95_latency_vs_shape_median"],
        "p95_latency_vs_median_all_calls": a["p95_vs_median"],
        "worst_function_p95_vs_median": a["worst_shape_p95_vs_median"],
        "labelled_accuracy_after_vs_before":
            _ratio(acc_a, acc_b) if acc_b > 0 else (1.0 if acc_a == 0 else float("inf")),
    }
    out["before_ratios"] = {"typed_complete_rate": b["typed_complete_rate"], "typed_retries": float(b["retries"]),
                            "p95_typed_latency_vs_median": b["p95_latency_vs_shape_median"],
                            "p95_latency_vs_median_all_calls": b["p95_vs_median"],
                            "worst_function_p95_vs_median": b["worst_shape_p95_vs_median"]}
    log("\nper shape (before -> after): complete on the first answer / retries / cut at the limit / closed by the "
        "engine / median and p95 latency / labelled accuracy")
    for s in SHAPES:
        sb, sa = out["before"]["by_shape"].get(s), out["after"]["by_shape"].get(s)
        if not sb or not sa:
            continue

        def cell(v: dict) -> str:
            closed = "-" if v["closed_by"] is None else sum(v["closed_by"].values())
            acc = f"{v['labelled_correct']}/{v['labelled']}" if v["labelled"] else "-"
            return (f"{v['complete_first']:>3}/{v['calls']:<3} {v['retries']:>3} {v['length_finishes']:>3} "
                    f"{closed!s:>3} "
                    f"{v['median_latency_s']:6.2f} {v['p95_latency_s']:6.2f} {acc:>6}")
        log(f"  {s:10s} {cell(sb)}  ->  {cell(sa)}")
    log(f"\nlabelled accuracy {acc_b:.3f} -> {acc_a:.3f}; latency p95/median over all calls "
        f"{b['p95_vs_median']:.2f} -> {a['p95_vs_median']:.2f} (p95 of latency / its shape's median "
        f"{b['p95_latency_vs_shape_median']:.2f} -> {a['p95_latency_vs_shape_median']:.2f}; worst shape's p95/median "
        f"{b['worst_shape_p95_vs_median']:.2f} -> {a['worst_shape_p95_vs_median']:.2f})")
    out["before"], out["after"] = _clean(out["before"]), _clean(out["after"])
    out["work_dir"] = str(work)
    return out
