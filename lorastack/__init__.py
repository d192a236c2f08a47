"""lorastack: one small frozen base model, a library of LoRA experts, and the machinery to
train, route, compose, stack and serve them on an ordinary CPU."""

__version__ = "0.1.0"
