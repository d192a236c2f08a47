"""Pull one field's value out of a JSON object given as a string."""

import json
import random

from .task import Example, Task
from .words import CITIES, COLORS, FIRST_NAMES, NOUNS

FIELDS = {
    "name": lambda r: r.choice(FIRST_NAMES),
    "city": lambda r: r.choice(CITIES),
    "color": lambda r: r.choice(COLORS),
    "item": lambda r: r.choice(NOUNS),
    "age": lambda r: str(r.randint(18, 90)),
    "id": lambda r: str(r.randint(100, 9999)),
}


def make(rng: random.Random) -> Example:
    keys = rng.sample(list(FIELDS), rng.randint(3, 5))
    obj = {k: FIELDS[k](rng) for k in keys}
    key = rng.choice(keys)
    return f'What is the value of "{key}" in {json.dumps(obj)}?', obj[key]


TASK = Task("json_field", "Extract one field's value from a JSON object string.", make)
