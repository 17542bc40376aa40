"""Offline zero-shot tasks built from the held-out articles of the embedded corpus (``wiki_offline``).

The articles are the validation split of the Wikipedia summaries: the run's own split (language and
``data.validation_fraction``) when it trained on ``wiki_offline``, else the default split (5%), so no
task item comes from a document the model was trained on. Every random choice is drawn from
``random.Random(f"{seed}:{title}")``: an article's item depends only on the seed and the article, and the
``limit`` items kept are the first in an order fixed by the SHA-256 of ``seed:title``.

- ``lambada``: last-word prediction in the style of LAMBADA. The passage is the longest run of whole
  sentences from the start of a summary with at most 60 words (at least 15) whose last word is
  alphabetic, at least 3 letters long and follows a single plain space; the model reads the passage
  without that word and scores " word". The three distractors are other words (alphabetic, 3+ letters,
  distinct ignoring case) of the same passage, so copying a word from the context does not win by itself.
  ``greedy_acc`` is LAMBADA's own metric: the word is the greedy continuation, token by token.
- ``description``: which description belongs to this title. Context ``"{title}:"``, choices
  ``" {description}"`` with the article's short description (e.g. "Painting by Georges Seurat") and three
  descriptions of other held-out articles, distinct ignoring case.

Both are 4-way (chance 0.25) and report ``acc`` (highest total log-likelihood) and ``acc_norm`` (highest
log-likelihood per character of the choice, lm-evaluation-harness's normalisation).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from adaptive.errors import DataError
from adaptive.model.transformer import AdaptiveLM
from adaptive.recipe import Recipe
from adaptive.registry import ComponentSpec, Registry
from adaptive.train.config import DataConfig
from adaptive.train.tokenizer import TextTokenizer

from adaptive.eval.scoring import loglikelihood

CHOICES = 4
MIN_WORDS, MAX_WORDS = 15, 60
SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")
STRIP = ".,;:!?\"'()[]"


@dataclass(frozen=True)
class Article:
    title: str
    extract: str
    description: str


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    answer: int


def held_out_articles(recipe: Recipe, registry: Registry) -> list[Article]:
    """The validation-split articles of ``wiki_offline``, in the data file's order."""
    own = recipe.data.source.name == "wiki_offline"
    language = recipe.data.source.options().get("language", "en-us") if own else "en-us"
    fraction = recipe.data.validation_fraction if own else DataConfig().validation_fraction
    source = registry.build("dataset", ComponentSpec(name="wiki_offline", language=language),
                            validation_fraction=fraction)
    held = set(source.documents("validation"))
    data_file = getattr(source, "data_file", None)
    if data_file is None:
        raise DataError("tasks: the registered wiki_offline source does not expose its data file (data_file())")
    raw = json.loads(data_file().read_text(encoding="utf-8"))
    articles = (Article(title, a.get("extract", ""), a.get("description", "") or "") for title, a in raw.items()
                if isinstance(a, dict))
    return [a for a in articles if a.extract in held]


def rng_for(seed: int, title: str) -> random.Random:
    return random.Random(f"{seed}:{title}")


def last_word_item(article: Article, seed: int) -> Item | None:
    """The LAMBADA-style item of one article, or None when it has no suitable passage."""
    text = article.extract
    cuts = [m.start() for m in SENTENCE_END.finditer(text)]
    for cut in reversed(cuts):
        passage = text[:cut]
        words = passage.split()
        target = words[-1] if words else ""
        context = passage[: len(passage) - len(target) - 1]
        if not (MIN_WORDS <= len(words) <= MAX_WORDS and len(target) >= 3 and target.isalpha()
                and passage.endswith(f" {target}") and context == context.rstrip()):
            continue  # the word must follow one plain space, so context + " " + word is the passage
        pool = unique_words(context, exclude=target)
        if len(pool) < CHOICES - 1:
            continue
        rng = rng_for(seed, article.title)
        return shuffled(rng, [f" {w}" for w in rng.sample(pool, CHOICES - 1)], context, f" {target}")
    return None


def unique_words(text: str, exclude: str) -> list[str]:
    seen, out = {exclude.lower()}, []
    for raw in text.split():
        word = raw.strip(STRIP)
        if len(word) >= 3 and word.isalpha() and word.lower() not in seen:
            seen.add(word.lower())
            out.append(word)
    return out


def shuffled(rng: random.Random, distractors: list[str], context: str, right: str) -> Item:
    choices = [right, *distractors]
    rng.shuffle(choices)
    return Item(context, tuple(choices), choices.index(right))


def description_items(articles: list[Article], seed: int) -> list[tuple[str, Item]]:
    pool = [a for a in articles if a.description.strip()]
    items = []
    for article in pool:
        rng = rng_for(seed, article.title)
        taken = {article.description.lower()}
        distractors = []
        for j in rng.sample(range(len(pool)), min(len(pool), 16)):
            text = pool[j].description
            if text.lower() not in taken and len(distractors) < CHOICES - 1:
                taken.add(text.lower())
                distractors.append(f" {text}")
        if len(distractors) == CHOICES - 1:
            items.append((article.title, shuffled(rng, distractors, f"{article.title}:", f" {article.description}")))
    return items


def lambada_items(articles: list[Article], seed: int) -> list[tuple[str, Item]]:
    found = ((a.title, last_word_item(a, seed)) for a in articles)
    return [(title, item) for title, item in found if item is not None]


TASKS: dict[str, Callable[[list[Article], int], list[tuple[str, Item]]]] = {
    "lambada": lambada_items,
    "description": description_items,
}


def build_task(name: str, articles: list[Article], seed: int = 0, limit: int | None = None) -> list[Item]:
    """The items of task ``name``: the first ``limit`` (all by default) in the seeded order."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (valid: {', '.join(TASKS)})")
    keyed = TASKS[name](articles, seed)
    keyed.sort(key=lambda pair: hashlib.sha256(f"{seed}:{pair[0]}".encode()).hexdigest())
    return [item for _, item in keyed[:limit]]


def score_task(model: AdaptiveLM, tok: TextTokenizer, items: list[Item], *, max_len: int, batch_tokens: int = 8192,
               advance: Callable[[int], None] | None = None) -> dict:
    """``acc``, ``acc_norm`` and ``greedy_acc`` (the right choice is the greedy continuation) of the items."""
    requests = [(item.context, choice) for item in items for choice in item.choices]
    scores = loglikelihood(model, tok, requests, max_len=max_len, batch_tokens=batch_tokens, advance=advance)
    acc = acc_norm = greedy = 0
    for n, item in enumerate(items):
        row = scores[n * CHOICES:(n + 1) * CHOICES]
        logprobs = [s.logprob for s in row]
        per_char = [s.logprob / max(len(c), 1) for s, c in zip(row, item.choices)]
        acc += logprobs.index(max(logprobs)) == item.answer
        acc_norm += per_char.index(max(per_char)) == item.answer
        greedy += row[item.answer].is_greedy
    n = max(len(items), 1)
    return {"items": len(items), "chance": 1 / CHOICES, "acc": acc / n, "acc_norm": acc_norm / n,
            "greedy_acc": greedy / n}
