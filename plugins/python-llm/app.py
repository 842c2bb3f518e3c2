"""python-llm: a rule-based `llm-step` plugin in Python (componentize-py).

It tells a short fable built from the prompt: the prompt's longest words become its hero, its
place and its treasure, and a seeded walk through sentence templates does the rest. It streams
the fable `chunk_tokens` words at a time (a setting, default 6), charges `credits_per_token` (a
setting, default 1) for every word before keeping it, stops cleanly when the budget runs out,
honours `max_tokens`, `temperature` (how often it takes a less likely template) and `seed`, and
checks for cancellation between words.
"""

import wit_world
from componentize_py_types import Err
from wit_world.imports import config, credits, log, output, status
from wit_world.imports.genpipe_plugin_types import StepError_Cancelled, StepError_InvalidInput

OPENINGS = [
    "Once upon a time there lived a {hero} who dreamed of {treasure}.",
    "Long ago, beyond {place}, a {hero} kept a secret about {treasure}.",
    "In the quiet of {place}, a young {hero} found a map to {treasure}.",
]
MIDDLES = [
    "Every morning the {hero} walked to {place} and asked the wind about {treasure}.",
    "A crow told the {hero} that {treasure} was hidden where nobody looked.",
    "The {hero} met a kind stranger who laughed and pointed toward {place}.",
    "Storms came and went, yet the {hero} kept searching for {treasure}.",
    "Some said {place} was cursed, but the {hero} did not believe them.",
]
ENDINGS = [
    "At last the {hero} understood that {treasure} had been at home all along.",
    "And so the {hero} came back from {place} wiser, if not richer.",
    "When the {hero} finally found {treasure}, it was smaller and better than imagined.",
]


class Random:
    """A small seeded generator (SplitMix64), so that a seed always tells the same fable."""

    def __init__(self, seed: int):
        self.state = seed & 0xFFFFFFFFFFFFFFFF

    def next(self) -> float:
        self.state = (self.state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return ((z ^ (z >> 31)) >> 11) / float(1 << 53)

    def pick(self, choices: list, temperature: float) -> str:
        # Temperature 0 always takes the first template; higher values spread the choice.
        if temperature <= 0:
            return choices[0]
        weights = [1.0 / (1 + i) ** (1.0 / temperature) for i in range(len(choices))]
        target = self.next() * sum(weights)
        for choice, weight in zip(choices, weights):
            target -= weight
            if target <= 0:
                return choice
        return choices[-1]


def number(key: str, default: int) -> int:
    value = config.get(key)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise Err(StepError_InvalidInput(f"the setting `{key}` = '{value}' is not a whole number"))


class WitWorld(wit_world.WitWorld):
    def generate(self, request: wit_world.LlmRequest) -> wit_world.LlmResponse:
        price = number("credits_per_token", 1)
        chunk_tokens = max(1, number("chunk_tokens", 6))
        words = sorted({w.strip(".,;:!?\"'").lower() for w in request.prompt.split()} - {""}, key=lambda w: (-len(w), w))
        if not words:
            raise Err(StepError_InvalidInput("the prompt is empty; give a few words to build the fable from"))
        names = {"hero": words[0], "place": words[min(1, len(words) - 1)], "treasure": words[min(2, len(words) - 1)]}
        status.report(status.Stage.PREPARING, 0.0, f"a fable about a {names['hero']}")
        rng = Random(request.seed)
        sentences = [rng.pick(OPENINGS, request.temperature)]
        sentences += [rng.pick(MIDDLES, request.temperature) for _ in range(3)]
        sentences.append(rng.pick(ENDINGS, request.temperature))
        tokens = " ".join(s.format(**names) for s in sentences).split(" ")[: request.max_tokens]

        kept, pending = [], []
        for i, token in enumerate(tokens):
            if status.cancelled():
                raise Err(StepError_Cancelled())
            if price > 0:
                try:
                    credits.charge(price, "token")
                except Err:
                    log.log(log.Level.INFO, f"the budget ran out after {len(kept)} words")
                    break
            token = token if i + 1 == len(tokens) else token + " "
            kept.append(token)
            pending.append(token)
            if len(pending) >= chunk_tokens:
                output.emit("".join(pending))
                pending = []
                status.report(status.Stage.GENERATING, (i + 1) / len(tokens), f"{i + 1} of {len(tokens)} words")
        if pending:
            output.emit("".join(pending))
        usage = wit_world.TokenUsage(prompt_tokens=len(request.prompt.split()), completion_tokens=len(kept))
        return wit_world.LlmResponse(text="".join(kept), usage=usage)
