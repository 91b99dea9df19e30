"""seqio's decoder-only feature converter, with loss weights that can leave out segment kinds (rationales).

seqio's LMFeatureConverter weights every non-padding target 1. This subclass also packs the per-token
segment kind (the same packing as the targets: both features of an example have one length) and sets
the weight 0 where a token's kind is in `masked_kinds`; the model features are LMFeatureConverter's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import seqio
import tensorflow as tf

from megadoc_jax.data.store import SegmentKind
from megadoc_jax.seqio_interop.source import SEGMENT_KIND, TARGETS
from megadoc_jax.seqio_interop.tasks import SEGMENT_SHIFT


class SegmentMaskingLMFeatureConverter(seqio.LMFeatureConverter):
    """LMFeatureConverter whose decoder_loss_weights are 0 on tokens of the kinds in masked_kinds.
    Needs the examples' targets_segment_kind as the tasks of tasks.py give it (SegmentKind + 1); its length
    follows targets'."""

    TASK_FEATURES = {
        TARGETS: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        SEGMENT_KIND: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }

    def __init__(self, masked_kinds: Iterable[SegmentKind] = (SegmentKind.RATIONALE,), **kwargs) -> None:
        self.masked_kinds = tuple(SegmentKind(k) for k in masked_kinds)
        super().__init__(**kwargs)

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        # T5X passes the task feature lengths of the gin config ({"targets": L}); the kinds are per token.
        lengths = dict(task_feature_lengths)
        lengths.setdefault(SEGMENT_KIND, lengths[TARGETS])
        return super().__call__(ds, lengths)

    def _convert_example(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        converted = dict(super()._convert_example(features))
        # the Task's kinds are SegmentKind + SEGMENT_SHIFT (0 is padding); -1 matches nothing
        kinds = tf.constant([int(k) + SEGMENT_SHIFT for k in self.masked_kinds] or [-1], tf.int32)
        masked = tf.reduce_any(tf.equal(features[SEGMENT_KIND][..., None], kinds), axis=-1)
        converted["decoder_loss_weights"] *= 1 - tf.cast(masked, tf.int32)
        return converted
