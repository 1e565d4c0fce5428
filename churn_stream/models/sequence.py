"""The LSTM-GRU sequence model (Keras on TensorFlow), imported only where it is used.

Importing TensorFlow takes seconds, so nothing imports it at module level: ``tensorflow()``
loads and configures it on first use. Scoring goes through one traced graph (a ``tf.function``
with a fixed input signature), about 30 times cheaper per call than ``model.predict``.
"""

import logging
import os
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TF_THREADS = 2
"""Threads TensorFlow may use within and between operations; this box has two cores."""
SEQUENCE_PARAMS = {"lstm_units": 32, "gru_units": 16, "static_units": 32, "head_units": 16,
                   "learning_rate": 2e-3, "batch_size": 512, "max_epochs": 8, "patience": 2}
CLIP_SIGMAS = 5.0

_loaded: ModuleType | None = None
_loading = threading.Lock()


def tensorflow() -> ModuleType:
    """TensorFlow, imported once, with bounded threads and deterministic kernels."""
    global _loaded
    with _loading:
        if _loaded is None:
            # TensorFlow's C++ side logs harmless version-skew notices at ERROR level;
            # real failures still arrive as Python exceptions.
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            os.environ.setdefault("KERAS_BACKEND", "tensorflow")
            import tensorflow as tf

            try:
                tf.config.threading.set_intra_op_parallelism_threads(TF_THREADS)
                tf.config.threading.set_inter_op_parallelism_threads(TF_THREADS)
            except RuntimeError:
                log.warning("TensorFlow was initialised elsewhere; its thread pools stay as set")
            tf.config.experimental.enable_op_determinism()
            _loaded = tf
    return _loaded


class Scaling:
    """Signed log, then standardisation with clipping: robust to heavy tails and drift."""

    def __init__(self, values: np.ndarray, axis: tuple[int, ...], log_first: bool) -> None:
        self.log_first = log_first
        shaped = self._log(values.astype(np.float64))
        self.center = shaped.mean(axis=axis, keepdims=True)
        spread = shaped.std(axis=axis, keepdims=True)
        self.scale = np.where(spread > 1e-9, spread, 1.0)

    def _log(self, values: np.ndarray) -> np.ndarray:
        return np.sign(values) * np.log1p(np.abs(values)) if self.log_first else values

    def apply(self, values: np.ndarray) -> np.ndarray:
        shaped = (self._log(values.astype(np.float64)) - self.center) / self.scale
        return np.clip(shaped, -CLIP_SIGMAS, CLIP_SIGMAS).astype(np.float32)


class SequenceModel:
    """A fitted LSTM-GRU network over the daily sequence plus the static features."""

    def __init__(self, network: Any, static: Scaling, sequence: Scaling) -> None:
        tf = tensorflow()
        self.network, self.static, self.sequence = network, static, sequence
        _, days, channels = network.inputs[0].shape
        features = network.inputs[1].shape[1]
        signature = [tf.TensorSpec([None, days, channels], tf.float32),
                     tf.TensorSpec([None, features], tf.float32)]
        # Calling the traced graph directly skips tf.function's dispatch: 2.9 ms for one row
        # against 3.6 ms, and a p99 of 3.4 ms against 13 ms on this box.
        self._forward = tf.function(self._call).get_concrete_function(*signature)
        self._constant = tf.constant

    def _call(self, sequences: Any, rows: Any) -> Any:
        return self.network([sequences, rows], training=False)

    def predict(self, X: np.ndarray, S: np.ndarray) -> np.ndarray:
        """Churn probability of each row; safe to call from several threads."""
        if len(X) == 0:
            return np.zeros(0)
        out = self._forward(self._constant(self.sequence.apply(S)),
                            self._constant(self.static.apply(X)))
        return np.asarray(out, dtype=np.float64)[:, 0]


def _network(keras: Any, days: int, channels: int, features: int) -> Any:
    p = SEQUENCE_PARAMS
    sequences = keras.Input((days, channels), name="daily_activity")
    rows = keras.Input((features,), name="static_features")
    recurrent = keras.layers.LSTM(p["lstm_units"], return_sequences=True)(sequences)
    recurrent = keras.layers.GRU(p["gru_units"])(recurrent)
    static = keras.layers.Dense(p["static_units"], activation="relu")(rows)
    joined = keras.layers.Concatenate()([recurrent, static])
    joined = keras.layers.Dense(p["head_units"], activation="relu")(joined)
    churn = keras.layers.Dense(1, activation="sigmoid")(joined)
    return keras.Model([sequences, rows], churn)


def fit_sequence(
    X: np.ndarray, S: np.ndarray, y: np.ndarray,
    X_val: np.ndarray, S_val: np.ndarray, y_val: np.ndarray,
    seed: int, on_epoch: Callable[[int, int], None] | None = None,
) -> SequenceModel:
    """Train until validation loss stops improving; the best weights are kept (in memory)."""
    tensorflow()
    import keras

    keras.utils.set_random_seed(seed)
    p = SEQUENCE_PARAMS
    static = Scaling(X, axis=(0,), log_first=True)
    sequence = Scaling(S, axis=(0, 1), log_first=False)
    network = _network(keras, S.shape[1], S.shape[2], X.shape[1])
    network.compile(optimizer=keras.optimizers.Adam(p["learning_rate"]),
                    loss="binary_crossentropy")
    callbacks = [keras.callbacks.EarlyStopping(patience=p["patience"],
                                               restore_best_weights=True)]
    if on_epoch is not None:
        callbacks.append(keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, _logs: on_epoch(epoch + 1, p["max_epochs"])))
    network.fit([sequence.apply(S), static.apply(X)], y.astype(np.float32),
                validation_data=([sequence.apply(S_val), static.apply(X_val)],
                                 y_val.astype(np.float32)),
                epochs=p["max_epochs"], batch_size=p["batch_size"], shuffle=True,
                callbacks=callbacks, verbose=0)
    return SequenceModel(network, static, sequence)
