"""A fixed, varied set of English sentences for quality checks (no data download)."""
from __future__ import annotations

import random

_SUBJECTS = ["The committee", "A young engineer", "My neighbour", "The old lighthouse keeper", "Our team",
             "The city council", "A hungry fox", "The research group", "Her grandmother", "The startup",
             "A quiet student", "The orchestra", "The pilot", "Two hikers", "The chef", "The museum"]
_VERBS = ["announced", "discovered", "repaired", "painted", "questioned", "celebrated", "measured",
          "abandoned", "translated", "predicted", "described", "rebuilt", "ignored", "tested"]
_OBJECTS = ["a new bridge over the river", "the results of the election", "an ancient map of the coast",
            "the broken heating system", "a recipe for lemon cake", "the behaviour of distant stars",
            "the budget for next year", "a song about the sea", "the rules of chess", "a cure for the cold",
            "the price of electricity", "an unusual species of beetle", "the schedule of the trains",
            "a poem written in Latin", "the speed of the network", "the history of the castle"]
_TAILS = ["yesterday morning.", "after a long debate.", "despite the heavy rain.", "for the first time.",
          "with great enthusiasm.", "in front of a large crowd.", "without telling anyone.",
          "during the summer festival.", "to everyone's surprise.", "using only simple tools."]
_QUESTIONS = ["How do neural networks learn from data?", "Where is the nearest train station?",
              "Why is the sky blue during the day?", "What is the capital of Australia?",
              "Can quantization make models faster on a laptop?", "Who wrote the first computer program?",
              "Is it going to snow this weekend?", "Which vegetables grow well in shade?"]


def sentences(n: int = 240, seed: int = 0) -> list[str]:
    """n distinct sentences (statements and questions), the same for a given seed."""
    rng = random.Random(seed)
    out, seen = list(_QUESTIONS), set(_QUESTIONS)
    while len(out) < n:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out[:n]
