"""scBERT's Performer model, its heads and its checkpoint reader."""

from .checkpoint import (
    Checkpoint,
    CheckpointError,
    build_model,
    checkpoint_payload,
    load_checkpoint,
    save_checkpoint,
)
from .errors import ModelInputError
from .fast_attention import fast_path_enabled, plain_attention
from .performer_pytorch import (
    BlockLinear,
    ClassificationHead,
    FastAttention,
    Gene2VecPositionalEmbedding,
    Performer,
    PerformerLM,
    SelfAttention,
    gaussian_orthogonal_random_matrix,
    generalized_kernel,
    linear_attention,
    softmax_kernel,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "build_model",
    "checkpoint_payload",
    "load_checkpoint",
    "save_checkpoint",
    "BlockLinear",
    "ClassificationHead",
    "FastAttention",
    "Gene2VecPositionalEmbedding",
    "Performer",
    "PerformerLM",
    "ModelInputError",
    "fast_path_enabled",
    "plain_attention",
    "SelfAttention",
    "gaussian_orthogonal_random_matrix",
    "generalized_kernel",
    "linear_attention",
    "softmax_kernel",
]
