"""Generic chat requests that no library task covers: the negatives routing is calibrated on.

`auto` must send a request to an expert only when the request is that expert's job, so
abstention is fitted on requests a person might send that are *not* any task: questions,
advice, writing, facts — including near misses that share surface features with tasks
(numbers, dates, lists, capitals). Two disjoint sets, each made from its own templates and
fillers, so evaluation never sees a calibration prompt or even its phrasing:

- `calibration_prompts()` — fitted on by the routers (written here, no user data);
- `heldout_prompts(n)` — the "unrelated" column of `lorastack eval-routing`.
"""

from __future__ import annotations

import itertools
import random

from .task import stable_seed

_CAL_TEMPLATES = (
    "What is the capital of {place}?", "Write a short poem about {topic}.", "Explain how {thing} works.",
    "Give me three tips for {activity}.", "Tell me a joke about {topic}.", "What are the benefits of {activity}?",
    "Describe {topic} in one sentence.", "Why do people enjoy {activity}?", "Who invented {thing}?",
    "Summarize the history of {thing} in two sentences.", "How do I get better at {activity}?",
    "Is {activity} good for children?", "Write a thank-you note to a friend who helped me with {activity}.",
    "What should I pack for a trip to {place}?", "Name a famous landmark in {place}.",
    "How many people live in {place}?", "What year was {thing} invented?", "Can you recommend a book about {topic}?",
    "List some words that rhyme with {word}.", "What does the word '{word}' mean?",
    "Translate '{word}' into French.", "Compare {thing} and {topic} in a few words.",
    "I feel tired after {activity}. Any advice?", "Plan a weekend in {place} for me.",
)
_EVAL_TEMPLATES = (
    "Could you tell me something interesting about {place}?", "Compose a haiku on {topic}.",
    "In simple terms, what is {thing}?", "What mistakes do beginners make when {activity}?",
    "Give me a fun fact about {topic}.", "Is it safe to go {activity} alone?", "When did {thing} become popular?",
    "Suggest a name for a cat that loves {topic}.", "What language do people speak in {place}?",
    "Write two sentences to convince me to try {activity}.", "How much does {thing} usually cost?",
    "What is the opposite of '{word}'?", "Use the word '{word}' in a sentence.", "Which season is best for visiting {place}?",
    "My friend says {thing} is overrated. What do you think?", "What equipment do I need for {activity}?",
    "Draft a tweet about {topic}.", "What is the weather usually like in {place} in {month}?",
    "How did {thing} change everyday life?", "Tell me a bedtime story involving {topic}.",
    "Write a short story about {topic} set in {place}.", "Is {activity} popular in {place}?",
    "What would a world without {thing} look like?", "Explain {thing} to a five-year-old.",
    "Plan a {month} holiday in {place} with some {activity}.",
)
_FILL = {
    "cal": {
        "place": "France Japan Brazil Kenya Canada Norway Egypt Peru India Chile Spain Ghana".split(),
        "topic": ["the sea", "autumn leaves", "friendship", "coffee", "the moon", "old trains", "rainy days", "music"],
        "thing": ["the internet", "a bicycle", "the telephone", "solar panels", "a refrigerator", "the printing press", "vaccines"],
        "activity": ["running", "cooking", "gardening", "learning a language", "swimming", "public speaking", "chess"],
        "word": "happy ocean bright sleep garden quick".split(),
        "month": ["March"],
    },
    "eval": {
        "place": "Italy Mexico Vietnam Morocco Sweden Argentina Ireland Thailand Poland Australia Iceland Nepal".split(),
        "topic": ["dinosaurs", "winter mornings", "honeybees", "jazz", "lighthouses", "volcanoes", "kindness", "pirates",
                  "robots", "desert nights", "owls", "city parks"],
        "thing": ["electricity", "the steam engine", "television", "email", "the microwave oven", "GPS", "paper money",
                  "antibiotics", "the radio", "contact lenses", "the compass", "satellites"],
        "activity": ["hiking", "baking bread", "painting", "cycling to work", "meditation", "camping", "playing guitar",
                     "knitting", "rock climbing", "bird watching", "journaling", "yoga"],
        "word": "brave gentle ancient loud narrow generous hollow swift tender fragile".split(),
        "month": ["January", "July", "October"],
    },
}
# Hand-written near misses for the held-out set: numbers, dates, lists and records that are
# not a library task's job.
_EVAL_EXTRA = (
    "How many legs does a spider have?", "What happened in 1969?", "Is 2024 a leap year?",
    "What is the tallest mountain in the world?", "Who wrote Romeo and Juliet?", "What time zone is Tokyo in?",
    "Why do leaves change colour in autumn?", "Recommend three films for a rainy evening.",
    "What is a good breakfast before a long run?", "Explain the rules of tennis briefly.",
    "How do airplanes stay in the air?", "What is the difference between weather and climate?",
    "Write a limerick about a forgetful wizard.", "What are the primary colours?",
    "How long does it take to boil an egg?", "Give me a motivational quote.", "What is machine learning?",
    "How should I store fresh herbs?", "What do pandas eat?", "Can dogs see colours?",
)


def _render(templates: tuple[str, ...], fill: dict[str, list[str]], seed: str) -> list[tuple[str, int]]:
    """Every template with several filler draws, in a fixed shuffled order, with its template's index."""
    rng = random.Random(stable_seed("generic", seed))
    out: dict[str, int] = {}
    for (i, t), _ in itertools.product(enumerate(templates), range(60)):
        out.setdefault(t.format(**{k: rng.choice(v) for k, v in fill.items()}), i)
    items = list(out.items())
    rng.shuffle(items)
    return items


def calibration_set(n: int = 1000) -> list[tuple[str, int]]:
    """(prompt, template index) pairs the routers calibrate abstention on. The template index
    lets calibration leave a whole phrasing out (a new phrasing is what users send)."""
    return _render(_CAL_TEMPLATES, _FILL["cal"], "cal")[:n]


def calibration_prompts(n: int = 1000) -> list[str]:
    """Generic requests the routers calibrate abstention on (never used for evaluation)."""
    return [p for p, _ in calibration_set(n)]


def heldout_prompts(n: int = 400) -> list[str]:
    """Unrelated requests for evaluation: phrasings and fillers disjoint from calibration."""
    return (list(_EVAL_EXTRA) + [p for p, _ in _render(_EVAL_TEMPLATES, _FILL["eval"], "eval")])[:n]
