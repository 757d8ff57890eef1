"""lowbit's torch modules."""
from .fake_quantize import FakeQuantize
from .fused import FusedMember, FusedProjection, fuse_projections
from .qat_linear import QATLinear
from .quant_embedding import QuantEmbedding
from .quant_linear import QuantLinear
from .tied_embedding import TiedQuantEmbedding

__all__ = ["FusedMember", "FusedProjection", "fuse_projections", "QuantLinear", "QuantEmbedding", "TiedQuantEmbedding", "FakeQuantize", "QATLinear"]
