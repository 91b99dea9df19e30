"""seqio interop (docs/seqio.md): token stores as seqio Tasks and Mixtures, and our tokenizer as a seqio
Vocabulary. Needs the `seqio` extra (it pulls tensorflow); nothing else in megadoc_jax imports this package.
"""

from megadoc_jax.seqio_interop.converter import SegmentMaskingLMFeatureConverter
from megadoc_jax.seqio_interop.source import (
    DOCUMENT_FEATURES,
    SEGMENT_INDEX,
    SEGMENT_KIND,
    TARGETS,
    StoreDataSource,
    document_range,
)
from megadoc_jax.seqio_interop.tasks import (
    cut_documents,
    mixture_rates,
    output_features,
    register_config_mixture,
    register_store_task,
    shift_ids,
)
from megadoc_jax.seqio_interop.vocabulary import HFVocabulary, VocabularyError

__all__ = [
    "DOCUMENT_FEATURES",
    "SEGMENT_INDEX",
    "SEGMENT_KIND",
    "TARGETS",
    "HFVocabulary",
    "SegmentMaskingLMFeatureConverter",
    "StoreDataSource",
    "VocabularyError",
    "cut_documents",
    "document_range",
    "mixture_rates",
    "output_features",
    "register_config_mixture",
    "register_store_task",
    "shift_ids",
]
