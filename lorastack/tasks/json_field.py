"""Pull one field's value out of a JSON object given as a string."""

import json
import random

from .task import Fields, Task
from .words import CITIES, COLORS, FIRST_NAMES, NOUNS

FIELDS = {
    "name": lambda r: r.choice(FIRST_NAMES),
    "city": lambda r: r.choice(CITIES),
    "color": lambda r: r.choice(COLORS),
    "item": lambda r: r.choice(NOUNS),
    "age": lambda r: str(r.randint(18, 90)),
    "id": lambda r: str(r.randint(100, 9999)),
}


def make(rng: random.Random) -> tuple[Fields, str]:
    keys = rng.sample(list(FIELDS), rng.randint(3, 5))
    obj = {k: FIELDS[k](rng) for k in keys}
    key = rng.choice(keys)
    return {"key": key, "obj": json.dumps(obj)}, obj[key]


TEMPLATES = (
    'What is the value of "{key}" in {obj}?',
    '{obj}\nReturn the value of the field "{key}".',
    'Extract the "{key}" field from this JSON: {obj}',
    "Given the record {obj}, what is its {key}?",
    'Look up key "{key}" in {obj}',
    "From the object {obj} read the {key} value.",
)
PARAPHRASES = (
    "Here is a customer record: {obj}. Tell me the {key}.",
    'In the JSON {obj}, which value does "{key}" hold?',
    "{obj} -- I only need the {key} from this.",
)

TASK = Task("json_field", "Extract one field's value from a JSON object string.", make, TEMPLATES, PARAPHRASES)
