"""lowbit's torch modules."""
from .fake_quantize import FakeQuantize
from .qat_linear import QATLinear
from .quant_embedding import QuantEmbedding
from .quant_linear import QuantLinear

__all__ = ["QuantLinear", "QuantEmbedding", "FakeQuantize", "QATLinear"]
