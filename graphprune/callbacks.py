"""A Keras ``fit`` callback that drives a PrunableModel's mask update, without importing Keras.

Keras (3, and tf-keras) accept any object with the callback hooks, so this class does not
subclass keras.callbacks.Callback and the core stays free of Keras.

    model.fit(x, y, callbacks=[graphprune.PruningCallback(pm, log_dir="logs")])

The Keras model must train ``pm.trainable_variables``: with tf-keras a layer holding ``pm`` tracks
them; with Keras 3, override ``train_step`` to apply gradients to them (Keras 3 only tracks its
own variables).
"""

from __future__ import annotations


class PruningCallback:
    """Calls ``prunable.update_masks()`` before every training batch (the reference toolkit's
    UpdatePruningStep), re-zeroes stored pruned weights (``apply_masks``) at each epoch end, and
    writes TensorBoard summaries then if ``log_dir`` is set."""

    def __init__(self, prunable, log_dir: str | None = None):
        self.prunable = prunable
        self.log_dir = log_dir
        self.model = None
        self.params = {}
        self._writer = None
        self.last_update = None

    def set_model(self, model):
        self.model = model

    def set_params(self, params):
        self.params = params

    def on_train_batch_begin(self, batch, logs=None):
        self.last_update = self.prunable.update_masks()

    def on_train_end(self, logs=None):
        # the last optimizer step may have moved pruned weights (momentum): re-zero them
        self.prunable.apply_masks()

    def on_epoch_end(self, epoch, logs=None):
        # momentum optimizers move pruned weights between updates: keep epoch checkpoints sparse
        self.prunable.apply_masks()
        if self.log_dir is None:
            return
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        self.prunable.write_summaries(writer=self._writer)
        self._writer.flush()

    def __getattr__(self, name):
        # Every other hook (on_train_begin, on_test_batch_end, ...) does nothing.
        if name.startswith("on_"):
            return _no_op
        raise AttributeError(name)


def _no_op(*args, **kwargs):
    return None
