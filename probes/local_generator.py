"""Writers that need no key and no network: the rule tables, a sentence list, a local causal LM.

* RuleBasedReplies: the built-in RuleBasedGenerator (table paraphrases; for the built-in data set
  its own second answer as the variant). Attempt 0 uses the build seed itself, so a probe set built
  this way matches `probe_set.build_probe_set` with RuleBasedGenerator.
* SentenceReplies: non-responses drawn from the built-in list of unrelated sentences.
* LocalLMReplies: paraphrases and variants sampled from a causal LM (a built-in tiny model, a hub
  name or a local folder) through `rollout.hf_engine.generate`. A variant is the model's own
  continuation of the conversation, as "sampled from the initial model" in the design; a paraphrase
  continues "<text>\\nIn other words:" and keeps the first line. A base LM paraphrases far worse
  than an instruction-tuned LLM: this is a fallback, and the manifest says which generator wrote
  each category.
"""
from __future__ import annotations

import re
from typing import Sequence

from probes.builtin_generators import RuleBasedGenerator
from trainers.data.paraphrase import paraphrase
from probes.templates import ProbeRequest
from probes.writing import BuildProgress, OnReply, Reply

LOCAL_PARAPHRASE_PROMPT = "{text}\nIn other words:"
_TURN = re.compile(r"\n\s*\n|\b(Human|Assistant)\s*:", re.IGNORECASE)


def attempt_seed(seed: int, attempt: int) -> int:
    """Attempt 0 keeps the build seed; later attempts move to seeds far from it."""
    return seed + 104_729 * attempt


class RuleBasedReplies:
    def __init__(self, seed: int = 0, data_seed: int = 0):
        self.generator = RuleBasedGenerator(data_seed=data_seed)
        self.name = self.generator.name
        self.seed = seed

    def describe(self) -> dict:
        return {"kind": "rule tables", "data_seed": self.generator.data_seed}

    def write(self, requests: Sequence[ProbeRequest], attempt: int, progress: BuildProgress, on_reply: OnReply) -> None:
        seed = attempt_seed(self.seed, attempt)
        nonresponse_slots = [r.index for r in requests if r.kind == "nonresponse"]
        sentences = self.generator.nonresponses(max(nonresponse_slots) + 1, seed) if nonresponse_slots else []
        for position, request in enumerate(requests):
            if request.kind == "paraphrase":
                text = paraphrase(request.source, seed)
            elif request.kind == "variant":
                text = self.generator.variants([request.prompt], [request.source], seed)[0]
            else:
                text = sentences[request.index]
            on_reply(position, Reply(text))


class SentenceReplies:
    """Non-responses from the built-in sentence list (the same list RuleBasedGenerator draws from)."""

    name = "builtin-sentences"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._rules = RuleBasedGenerator()

    def describe(self) -> dict:
        return {"kind": "built-in sentence list"}

    def write(self, requests: Sequence[ProbeRequest], attempt: int, progress: BuildProgress, on_reply: OnReply) -> None:
        if any(r.kind != "nonresponse" for r in requests):
            raise ValueError("SentenceReplies writes non-responses only")
        if not requests:
            return
        sentences = self._rules.nonresponses(max(r.index for r in requests) + 1, attempt_seed(self.seed, attempt))
        for position, request in enumerate(requests):
            on_reply(position, Reply(sentences[request.index]))


def first_turn(text: str) -> str:
    """The generated text up to a blank line or a speaker label (the model starting the next turn)."""
    match = _TURN.search(text)
    return (text[:match.start()] if match else text).strip()


class LocalLMReplies:
    """Paraphrases and variants sampled from a local causal LM (loaded on first use)."""

    def __init__(self, model_name: str, seed: int = 0, lead: str = " ", max_new_tokens: int = 64,
                 temperature: float = 0.9, batch_size: int = 8):
        self.model_name, self.seed, self.lead = model_name, seed, lead
        self.max_new_tokens, self.temperature, self.batch_size = max_new_tokens, temperature, batch_size
        self.name = f"local-lm:{model_name}"
        self._model = self._tokenizer = None

    def describe(self) -> dict:
        return {"model": self.model_name, "sampling": "multinomial", "temperature": self.temperature,
                "temperature_step_per_attempt": 0.2, "max_new_tokens": self.max_new_tokens,
                "paraphrase_prompt": LOCAL_PARAPHRASE_PROMPT, "variant_prompt": "the conversation itself"}

    def _load(self):
        if self._model is None:
            from trainers.model.factory import load_model_and_tokenizer

            self._model, self._tokenizer = load_model_and_tokenizer(self.model_name, seed=self.seed)
        return self._model, self._tokenizer

    def _context(self, request: ProbeRequest) -> str:
        if request.kind == "paraphrase":
            return LOCAL_PARAPHRASE_PROMPT.format(text=request.source.strip())
        if request.kind == "variant":
            return request.prompt
        raise ValueError("LocalLMReplies writes paraphrases and variants only")

    def write(self, requests: Sequence[ProbeRequest], attempt: int, progress: BuildProgress, on_reply: OnReply) -> None:
        from rollout.hf_engine import generate

        if not requests:
            return
        model, tokenizer = self._load()
        limit = getattr(model.config, "max_position_embeddings", 2048) - self.max_new_tokens
        prompt_ids = [tokenizer(self._context(r))["input_ids"][-limit:] or [tokenizer.eos_token_id] for r in requests]
        generation = generate(model, tokenizer, prompt_ids, max_new_tokens=self.max_new_tokens, do_sample=True,
                              temperature=min(self.temperature + 0.2 * attempt, 2.0), batch_size=self.batch_size,
                              seed=attempt_seed(self.seed, attempt))
        for position, (request, text) in enumerate(zip(requests, generation.texts, strict=True)):
            text = first_turn(text)
            if request.kind == "paraphrase":
                text = text.split("\n", 1)[0].strip()
            on_reply(position, Reply(self.lead + text if text else ""))
