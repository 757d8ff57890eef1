"""Model-level evaluation: perplexity with llama.cpp's protocol, prompt / generation
speed, and the real material (SmolLM2, Jane Austen) they run on."""
from .perplexity import Perplexity, perplexity

__all__ = ["Perplexity", "perplexity"]
