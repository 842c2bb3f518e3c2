"""{{name}}: a genpipe plugin for the `llm-step` world, in Python.

It answers with the prompt's words in reverse order, charging `credits_per_token` (a setting,
default 1) for each word and streaming four words at a time. Replace `generate` with your own.
"""

import wit_world
from componentize_py_types import Err
from wit_world.imports import config, credits, output, status
from wit_world.imports.genpipe_plugin_types import StepError_Cancelled, StepError_InvalidInput


class WitWorld(wit_world.WitWorld):
    def generate(self, request: wit_world.LlmRequest) -> wit_world.LlmResponse:
        price = int(config.get("credits_per_token") or "1")
        words = list(reversed(request.prompt.split()))[: request.max_tokens]
        if not words:
            raise Err(StepError_InvalidInput("the prompt is empty; give a few words"))
        status.report(status.Stage.PREPARING, 0.0, "reversing the prompt")
        kept, pending = [], []
        for i, word in enumerate(words):
            if status.cancelled():
                raise Err(StepError_Cancelled())
            if price > 0:
                try:
                    credits.charge(price, "token")
                except Err:
                    break  # the budget ran out: return what was paid for
            token = word if i + 1 == len(words) else word + " "
            kept.append(token)
            pending.append(token)
            if len(pending) == 4:
                output.emit("".join(pending))
                pending = []
            status.report(status.Stage.GENERATING, (i + 1) / len(words), "writing")
        if pending:
            output.emit("".join(pending))
        usage = wit_world.TokenUsage(prompt_tokens=len(request.prompt.split()), completion_tokens=len(kept))
        return wit_world.LlmResponse(text="".join(kept), usage=usage)
