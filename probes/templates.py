"""Prompt templates for LLM-written probes, and the requests they are rendered from.

Three kinds of request cover the derived categories: `paraphrase` (paraphrase_chosen,
paraphrase_rejected), `variant` (another answer to the conversation) and `nonresponse` (a sentence
that answers nothing). A template is a `str.format` string; the fields each kind may use are listed
in FIELDS, and a YAML file can replace any of the defaults:

    max_words: 50
    paraphrase: |
      Say this differently, at most {max_words} words: {text}
"""
from __future__ import annotations

import string
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping

# derived category -> the template kind that writes it
CATEGORY_KIND = {
    "paraphrase_chosen": "paraphrase",
    "paraphrase_rejected": "paraphrase",
    "variant": "variant",
    "nonresponse": "nonresponse",
}
DERIVED_CATEGORIES = tuple(CATEGORY_KIND)

# fields a template of each kind may use; the first one listed is required
FIELDS = {
    "paraphrase": ("text", "max_words"),
    "variant": ("prompt", "chosen", "max_words"),
    "nonresponse": ("topic", "index", "max_words"),
}

# nonresponse requests cycle through these so that the sentences are about different things
TOPICS = (
    "a city's public transport", "an animal's habits", "the weather at sea", "an old building",
    "a kitchen tool", "a planet or moon", "a musical instrument", "a small village festival",
    "a tree or flower", "a sport's rules", "a river", "a famous bridge", "a type of bread",
    "an insect", "a museum exhibit", "a mountain", "a board game", "a kind of fabric",
    "a lighthouse", "a bird's migration",
)

DEFAULT_PARAPHRASE = (
    "Rewrite the following response in different words. Keep its meaning, its tone and its point of "
    "view (do not answer it, improve it or comment on it), and use at most {max_words} words. "
    "Reply with the rewritten response only.\n\nResponse:\n{text}"
)
DEFAULT_VARIANT = (
    "Below is a conversation between a human and an AI assistant. Write the assistant's next reply: "
    "another answer to the human's last message, in at most {max_words} words. Reply with the "
    "answer's text only, without a speaker label and without continuing the conversation."
    "\n\nConversation:\n{prompt}"
)
DEFAULT_NONRESPONSE = (
    "Write one ordinary, self-contained sentence stating a fact or a small observation about "
    "{topic}. It must not answer, greet or address anyone. At most {max_words} words. Reply with "
    "the sentence only."
)


@dataclass(frozen=True)
class ProbeRequest:
    """One derived probe to write: `index` is the prompt's position in the probe set."""

    category: str
    index: int
    source: str = ""   # what a reply must not copy: the text to rephrase, or the chosen answer for a variant
    prompt: str = ""   # the conversation (variants)

    @property
    def kind(self) -> str:
        return CATEGORY_KIND[self.category]


@dataclass(frozen=True)
class PromptTemplates:
    paraphrase: str = DEFAULT_PARAPHRASE
    variant: str = DEFAULT_VARIANT
    nonresponse: str = DEFAULT_NONRESPONSE
    max_words: int = 50

    def __post_init__(self):
        if not isinstance(self.max_words, int) or isinstance(self.max_words, bool) or self.max_words < 1:
            raise ValueError(f"max_words must be a positive integer, got {self.max_words!r}")
        for kind, allowed in FIELDS.items():
            template = getattr(self, kind)
            if not isinstance(template, str) or not template.strip():
                raise ValueError(f"template {kind!r} must be a non-empty string")
            try:
                used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
            except ValueError as error:
                raise ValueError(f"template {kind!r} is not a valid format string: {error}") from None
            unknown = sorted(name for name in used if name not in allowed)
            if unknown:
                raise ValueError(f"template {kind!r} uses unknown field(s) {unknown}; allowed: {list(allowed)}")
            if allowed[0] not in used:
                raise ValueError(f"template {kind!r} must contain {{{allowed[0]}}}")

    def render(self, request: ProbeRequest) -> str:
        values = {"max_words": self.max_words}
        if request.kind == "paraphrase":
            values["text"] = request.source.strip()
        elif request.kind == "variant":
            values.update(prompt=request.prompt.strip(), chosen=request.source.strip())
        else:
            values.update(topic=TOPICS[request.index % len(TOPICS)], index=request.index)
        return getattr(self, request.kind).format(**values)

    def to_dict(self) -> dict:
        return asdict(self)


def load_templates(path: str | Path | None) -> PromptTemplates:
    """The default templates, with any of them (and max_words) replaced from a YAML file."""
    if path is None:
        return PromptTemplates()
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping of template names to strings")
    known = set(FIELDS) | {"max_words"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    try:
        return replace(PromptTemplates(), **dict(data))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
