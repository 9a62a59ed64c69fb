"""The embedded zoo's task writer: parameterised task families over the zoo's skills, no LLM.

`ProceduralTaskWriter` follows the `agents.task_writer.TaskWriter` interface and rules (seed
families, harder and novel variants, valid by construction) in the zoo's prompt formats, which
are all its tiny models understand; with your own models the task writer must be an LLM.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agents.console import one_line
from agents.task_writer import REASON_CHARS
from agents.tasks import Rejection, TaskFamily
from coevo.zoo.skills import LETTERS


@dataclass(frozen=True)
class WordOp:
    keyword: str  # the zoo's prompt keyword
    verb: str  # for the instructions: "<verb> the word"
    expr: str  # checker expression around "{}" (the word so far)


# The zoo's formats (`coevo.zoo.skills`): the tiny models understand only these.
WORD_OPS = {
    "upper": WordOp("up", "upper-case", "{}.upper()"),
    "reverse": WordOp("rev", "reverse", "{}[::-1]"),
    "copy": WordOp("say", "repeat", "{}"),
}
CHAINS = (["reverse", "upper"], ["upper", "reverse"])
# Ten-letter slices of the alphabet for "novel" variants: shifted away from the zoo's LETTERS.
ALPHABETS = ("abcdefghij", "fghijklmno", "klmnopqrst", "qrstuvwxyz")
SEED_PARAMS: tuple[dict[str, Any], ...] = (
    # The base model's narrow slice of each skill, then the experts' domain (coevo.zoo.skills).
    {"ops": ["upper"], "word_lo": 3, "word_hi": 3, "alphabet": LETTERS},
    {"ops": ["upper"], "word_lo": 3, "word_hi": 5, "alphabet": LETTERS},
    {"ops": ["reverse"], "word_lo": 3, "word_hi": 3, "alphabet": LETTERS},
    {"ops": ["reverse"], "word_lo": 3, "word_hi": 5, "alphabet": LETTERS},
    {"ops": ["add"], "a_lo": 10, "a_hi": 59, "b_lo": 0, "b_hi": 3},
    {"ops": ["add"], "a_lo": 10, "a_hi": 59, "b_lo": 0, "b_hi": 9},
    {"ops": ["copy"], "word_lo": 2, "word_hi": 6, "alphabet": LETTERS},
)
ADD_DEFAULT = SEED_PARAMS[5]
WORDS_DEFAULT = {"word_lo": 3, "word_hi": 5, "alphabet": LETTERS}


def _apply(ops: list[str], word: str) -> str:
    for op in reversed(ops):  # `rev up w=` is rev(up(w)): the op next to the word goes first
        word = word.upper() if op == "upper" else word[::-1] if op == "reverse" else word
    return word


def check_params(params: Mapping[str, Any]) -> None:
    """Raise ValueError (one line) unless `params` describe a procedural family."""
    ops = params.get("ops")
    if ops == ["add"]:
        keys = ("a_lo", "a_hi", "b_lo", "b_hi")
        if not all(isinstance(params.get(k), int) for k in keys):
            raise ValueError(f"add params need integers {', '.join(keys)}, got {dict(params)}")
        if not (0 <= params["a_lo"] <= params["a_hi"] and 0 <= params["b_lo"] <= params["b_hi"]):
            raise ValueError(f"add ranges must be non-negative and lo <= hi, got {dict(params)}")
        return
    if not isinstance(ops, list) or not ops or any(op not in WORD_OPS for op in ops):
        raise ValueError(f"ops must be ['add'] or a list of {', '.join(WORD_OPS)}, got {ops!r}")
    lo, hi, alphabet = params.get("word_lo"), params.get("word_hi"), params.get("alphabet")
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
        raise ValueError(f"word lengths need 1 <= word_lo <= word_hi, got {lo!r}, {hi!r}")
    if not (isinstance(alphabet, str) and alphabet.isalpha() and alphabet.islower()):
        raise ValueError(f"alphabet must be lower-case letters, got {alphabet!r}")


def family_name(params: Mapping[str, Any]) -> str:
    if params["ops"] == ["add"]:
        return f"add-a{params['a_lo']}-{params['a_hi']}-b{params['b_lo']}-{params['b_hi']}"
    lo, hi, alphabet = params["word_lo"], params["word_hi"], params["alphabet"]
    name = "-".join(params["ops"]) + (f"-len{lo}" if lo == hi else f"-len{lo}-{hi}")
    return name if alphabet == LETTERS else f"{name}-letters-{alphabet[0]}-{alphabet[-1]}"


def _instance(params: Mapping[str, Any], rng: random.Random) -> dict[str, Any]:
    ops = params["ops"]
    if ops == ["add"]:
        a = rng.randint(params["a_lo"], params["a_hi"])
        b = rng.randint(params["b_lo"], params["b_hi"])
        return {"prompt": f"add {a} {b}=", "a": a, "b": b, "solution": str(a + b)}
    length = rng.randint(params["word_lo"], params["word_hi"])
    word = "".join(rng.choice(params["alphabet"]) for _ in range(length))
    keywords = " ".join(WORD_OPS[op].keyword for op in ops)
    return {"prompt": f"{keywords} {word}=", "word": word, "solution": _apply(ops, word)}


def make_instances(params: Mapping[str, Any], rng: random.Random, n: int) -> list[dict[str, Any]]:
    """Up to `n` instances with distinct prompts (fewer when the domain is smaller)."""
    found: dict[str, dict[str, Any]] = {}
    for _ in range(50 * n):
        if len(found) == n:
            break
        instance = _instance(params, rng)
        found.setdefault(instance["prompt"], instance)
    return list(found.values())


def _instructions(params: Mapping[str, Any]) -> str:
    # Short on boilerplate, with examples drawn from the parameters alone: equal parameters
    # give equal instructions, and the examples are what sets two families' signatures apart.
    examples = make_instances(params, random.Random(json.dumps(params, sort_keys=True)), 8)
    shown = ", ".join(f"`{x['prompt']}` -> `{x['solution']}`" for x in examples)
    if params["ops"] == ["add"]:
        return (
            f"Add two numbers: `add <a> <b>=` with a in {params['a_lo']}..{params['a_hi']}, "
            f"b in {params['b_lo']}..{params['b_hi']}; answer the sum. Examples: {shown}."
        )
    steps = [WORD_OPS[op].verb for op in reversed(params["ops"])]
    task = f"{steps[0].capitalize()} the word" + "".join(f", then {s} it" for s in steps[1:])
    keywords = " ".join(WORD_OPS[op].keyword for op in params["ops"])
    lo, hi = params["word_lo"], params["word_hi"]
    lengths = f"{lo}" if lo == hi else f"{lo} to {hi}"
    return (
        f"{task}: `{keywords} <word>=`, {lengths} letters from {params['alphabet']}; "
        f"answer the result. Examples: {shown}."
    )


def _checker(params: Mapping[str, Any]) -> str:
    ops = params["ops"]
    if ops == ["add"]:
        doc, expected = "a + b", 'str(int(instance["a"]) + int(instance["b"]))'
    else:
        expected = 'instance["word"]'
        for op in reversed(ops):
            expected = WORD_OPS[op].expr.format(expected)
        doc = " then ".join(WORD_OPS[op].verb for op in reversed(ops)) + " the word"
    return (
        "def check(answer, instance):\n"
        f'    """Exact match with {doc}, computed from the instance."""\n'
        f"    expected = {expected}\n"
        "    return answer.strip() == expected\n"
    )


def procedural_family(
    params: Mapping[str, Any],
    *,
    family_id: str,
    rng: random.Random,
    n_instances: int = 16,
    parent_id: str | None = None,
    action: str = "seed",
    generation: int = 0,
) -> TaskFamily:
    """The procedural family of `params`: instances drawn from `rng`, a checker that computes
    the answer from each instance's fields (`word`, or `a` and `b`)."""
    check_params(params)
    plain: dict[str, Any] = json.loads(json.dumps(params))  # a JSON copy, no caller aliasing
    return TaskFamily(
        family_id=family_id,
        name=family_name(plain),
        instructions=_instructions(plain),
        instances=make_instances(plain, rng, n_instances),
        checker=_checker(plain),
        params=plain,
        parent_id=parent_id,
        action=action,
        generation=generation,
        origin="procedural",
    )


def harder_params(params: Mapping[str, Any], *, max_word: int, max_number: int) -> dict[str, Any]:
    """One step harder, on the next band of the domain: words [lo, hi] -> [hi+1, 2*hi-lo+1]
    (as wide, all longer); for `add`, the smaller operand's range [lo, hi] -> [hi+1, 10*hi+9]
    (one more digit). ValueError past `max_word` / `max_number`."""
    params = dict(params)
    if params["ops"] == ["add"]:
        side = "b" if params["b_hi"] < params["a_hi"] else "a"
        hi = params[f"{side}_hi"]
        if 10 * hi + 9 > max_number:
            raise ValueError(f"already at the largest numbers (max_number {max_number})")
        params[f"{side}_lo"], params[f"{side}_hi"] = hi + 1, 10 * hi + 9
        return params
    lo, hi = params["word_lo"], params["word_hi"]
    if 2 * hi - lo + 1 > max_word:
        raise ValueError(f"already at the longest words (max_word {max_word})")
    params["word_lo"], params["word_hi"] = hi + 1, 2 * hi - lo + 1
    return params


def novel_params(params: Mapping[str, Any], rng: random.Random) -> dict[str, Any]:
    """A different family: another op, a composition of ops, or another alphabet (the kind is
    drawn uniformly among those that apply, then the variant uniformly within it)."""
    ops = list(params["ops"])
    if ops == ["add"]:
        options = {
            "op": [{"ops": [op], **WORDS_DEFAULT} for op in WORD_OPS],
            "chain": [{"ops": list(chain), **WORDS_DEFAULT} for chain in CHAINS],
        }
    else:
        words = {k: params[k] for k in ("word_lo", "word_hi", "alphabet")}
        options = {
            "op": [{"ops": [op], **words} for op in WORD_OPS if [op] != ops] + [dict(ADD_DEFAULT)],
            "chain": [
                {"ops": list(chain), **words}
                for chain in CHAINS
                if len(ops) == 1 and (ops[0] in chain or ops == ["copy"])
            ],
            "alphabet": [
                {**params, "ops": ops, "alphabet": alphabet}
                for alphabet in ALPHABETS
                if alphabet != params["alphabet"]
            ],
        }
    kind = rng.choice(sorted(k for k, v in options.items() if v))
    return dict(rng.choice(options[kind]))


class ProceduralTaskWriter:
    """The embedded default writer: parameterised families over the zoo's skills, no LLM.

    Ops `upper`, `reverse`, `copy` (words of `word_lo`..`word_hi` letters from `alphabet`), `add`
    (a in `a_lo`..`a_hi`, b in `b_lo`..`b_hi`) and compositions such as ["reverse", "upper"]
    (prompt `rev up <w>=`, answer reverse(upper(w))), in the zoo's prompt formats.
    """

    name = "procedural"

    def __init__(self, *, instances: int = 16, max_word: int = 16, max_number: int = 10**9) -> None:
        if instances < 1:
            raise ValueError(f"instances must be >= 1, got {instances}")
        self.instances = instances
        self.max_word = max_word
        self.max_number = max_number

    def seed(self, *, prefix: str, rng: random.Random) -> list[TaskFamily]:
        """Each skill on the base's narrow slice and on the experts' domain, plus copying."""
        return [
            procedural_family(
                params,
                family_id=f"{prefix}/seed/{family_name(params)}",
                rng=rng,
                n_instances=self.instances,
            )
            for params in SEED_PARAMS
        ]

    def propose(
        self,
        parent: TaskFamily,
        action: str,
        *,
        family_id: str,
        generation: int,
        rng: random.Random,
        feedback: str = "",
    ) -> TaskFamily | Rejection:
        """A harder or novel variant of a procedural parent (`feedback` is not needed: the
        variants are valid by construction)."""
        if action not in ("harder", "novel"):
            raise ValueError(f"action must be 'harder' or 'novel', got {action!r}")
        try:
            check_params(parent.params)
        except ValueError as err:
            reason = f"procedural writer cannot vary {parent.family_id}: {err}"
            return Rejection(None, "parse", one_line(reason, REASON_CHARS))
        try:
            if action == "harder":
                params = harder_params(
                    parent.params, max_word=self.max_word, max_number=self.max_number
                )
            else:
                params = novel_params(parent.params, rng)
        except ValueError as err:
            return Rejection(None, "validation", f"{parent.family_id} cannot get harder: {err}")
        return procedural_family(
            params,
            family_id=family_id,
            rng=rng,
            n_instances=self.instances,
            parent_id=parent.family_id,
            action=action,
            generation=generation,
        )


