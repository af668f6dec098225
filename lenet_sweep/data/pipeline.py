"""tf.data input: decoded uint8 splits as batches scaled to [0, 1] on the fly."""

from __future__ import annotations

from typing import Any, Optional

from lenet_sweep.data.decode import DecodedSplit


def make_dataset(split: DecodedSplit, batch_size: int, shuffle: bool, seed: int = 0, epoch: Optional[Any] = None):
    """Batches of (float32 images in [0, 1], int32 labels), in a new order every epoch when `shuffle`.

    Epoch e's order is a permutation drawn from (seed, e) alone, e read from `epoch` (an int64
    `tf.Variable` a callback sets as each epoch begins: `trial.EpochCounter`) as each batch is drawn, so a
    training resumed at epoch e sees exactly the batches an uninterrupted one saw. That holds because Keras
    starts a new iterator after `on_epoch_begin` when `fit` has no `steps_per_epoch`, as every run trains;
    with `steps_per_epoch` (the speed benchmark's partial epochs) prefetched batches may straddle two epochs.
    Gathering each batch by index keeps one copy of the images in memory.
    """
    import tensorflow as tf

    images = tf.constant(split.images)
    labels = tf.constant(split.labels)
    n = len(split.labels)
    ds = tf.data.Dataset.range(n).batch(batch_size)
    if shuffle:
        if epoch is None:
            raise ValueError("a shuffled dataset needs the epoch variable its order is drawn from")
        ds = ds.map(
            lambda idx: tf.random.experimental.index_shuffle(
                idx, tf.stack([tf.constant(seed, tf.int64), epoch.read_value()]), n - 1
            )
        )
    ds = ds.map(
        lambda idx: (tf.cast(tf.gather(images, idx), tf.float32) / 255.0, tf.gather(labels, idx)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return ds.prefetch(tf.data.AUTOTUNE)
