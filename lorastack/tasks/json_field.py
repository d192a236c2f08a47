"""Pull one field's value out of a JSON object given as a string."""

import json
import random

from .task import Fields, Task
from .words import ADJECTIVES, CITIES, COLORS, FIRST_NAMES, NOUNS

def _date(r: random.Random) -> str:
    return f"{r.randint(1950, 2030):04d}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"


# Keys and the kinds of values records hold. Why this many: trained on six keys with one-word
# values, the adapter answered 'born' or 'born1999-04-09' for a key it had never seen ("born",
# with a date). Users' records have their own keys, so the adapter must learn to copy whatever
# value follows the asked key; HELDOUT_KEYS (never generated) measure that in the README.
FIELDS = {
    "name": lambda r: r.choice(FIRST_NAMES),
    "city": lambda r: r.choice(CITIES),
    "color": lambda r: r.choice(COLORS),
    "item": lambda r: r.choice(NOUNS),
    "age": lambda r: r.randint(18, 90),
    "id": lambda r: r.randint(100, 9999),
    "date": _date,
    "created": _date,
    "birthday": _date,
    "owner": lambda r: f"{r.choice(FIRST_NAMES)} {r.choice(FIRST_NAMES)}son",
    "title": lambda r: f"The {r.choice(ADJECTIVES)} {r.choice(NOUNS)}",
    "price": lambda r: round(r.uniform(1, 500), 2),
    "count": lambda r: r.randint(0, 60),
    "status": lambda r: r.choice(("open", "closed", "pending", "shipped", "active")),
    "code": lambda r: f"{r.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}{r.randint(10, 99)}-{r.randint(100, 999)}",
    "user": lambda r: f"{r.choice(FIRST_NAMES).lower()}{r.randint(1, 99)}",
}
HELDOUT_KEYS = ("born", "email", "country", "zip", "due", "level")

# How the object is written: json.dumps' default spacing, compact (what APIs and most tools
# emit), or spaced inside the braces. Why: trained on one spacing only, the adapter misread
# compact records such as {"name":"Ana","born":"1999-04-09"} that users paste.
SPACINGS = ((", ", ": "), (",", ":"))


def make(rng: random.Random) -> tuple[Fields, str]:
    keys = rng.sample(list(FIELDS), rng.randint(3, 5))
    quoted = rng.random() < 0.5  # numbers as JSON numbers or as strings, as records come
    obj = {k: FIELDS[k](rng) for k in keys}
    obj = {k: str(v) if quoted and isinstance(v, (int, float)) else v for k, v in obj.items()}
    key = rng.choice(keys)
    text = json.dumps(obj, separators=rng.choice(SPACINGS))
    if rng.random() < 0.2:
        text = "{ " + text[1:-1] + " }"
    return {"key": key, "obj": text}, str(obj[key])


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
