"""The LSTM-GRU sequence model (Keras on TensorFlow), imported only where it is used.

Importing TensorFlow takes seconds, so nothing imports it at module level: ``tensorflow()``
loads and configures it on first use. Large batches are scored through one traced graph
(a ``tf.function`` with a fixed input signature), about 30 times cheaper per call than
``model.predict``. Small ones, a ``/predict`` request or a quiet micro-batch, run the same
arithmetic in numpy (``Forward``) from the trained weights: a traced call still costs about
2.6 ms for one row, numpy 0.7 ms; the two meet near 64 rows. The invariant tests hold
numpy's scores to Keras'.

A fitted model crosses between processes as its layers' weights and its two scalings;
``from_parts`` builds the same network around them, or, where only a few rows at a time are
scored (the predictor's HTTP API process), the numpy pass alone, without importing TensorFlow.
"""

import logging
import os
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
from scipy.special import expit

log = logging.getLogger(__name__)

TRAINING_THREADS = 2
"""Threads TensorFlow may use within and between operations where it trains: two cores."""
SERVING_THREADS = 1
"""Threads where it only scores, beside a busy consume loop: a parallel region waits for all
its threads, and on two cores beside a busy Python thread the whole model's 500-row score
had a p99 of 121 ms with two threads against 48 ms with one. With nothing else running,
one thread scores 500 rows as fast (10 ms against 12)."""
SEQUENCE_PARAMS = {"lstm_units": 32, "gru_units": 16, "static_units": 32, "head_units": 16,
                   "learning_rate": 2e-3, "batch_size": 512, "max_epochs": 8, "patience": 2}
CLIP_SIGMAS = 5.0
FORWARD_MAX_ROWS = 32
"""Batches up to this size are scored in numpy; larger ones through the traced graph."""

_loaded: ModuleType | None = None
_loading = threading.Lock()


def tensorflow(threads: int = TRAINING_THREADS) -> ModuleType:
    """TensorFlow, imported once, with bounded threads and deterministic kernels.

    The first call sets the threads for the life of the process.
    """
    global _loaded
    with _loading:
        if _loaded is None:
            # TensorFlow's C++ side logs harmless version-skew notices at ERROR level;
            # real failures still arrive as Python exceptions.
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            os.environ.setdefault("KERAS_BACKEND", "tensorflow")
            import tensorflow as tf

            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(threads)
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


class Forward:
    """The network of ``_network`` evaluated in numpy (float32) from its trained weights.

    Keras' LSTM and GRU (``reset_after``, Keras' default) with tanh and the logistic sigmoid:
    gates in Keras' order (LSTM i, f, c, o; GRU z, r, h). The input side of every step is
    one matrix product over the whole sequence; only the recurrent product runs per day.
    """

    def __init__(self, layers: dict[str, list[np.ndarray]]) -> None:
        weights = {name: [np.asarray(w, dtype=np.float32) for w in values]
                   for name, values in layers.items()}
        self.lstm, self.gru = weights["lstm"], weights["gru"]
        self.static, self.head, self.churn = weights["static"], weights["head"], weights["churn"]

    def __call__(self, sequences: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Churn probability of each row, as float32."""
        kernel, recurrent, bias = self.lstm
        inputs = sequences @ kernel + bias
        n, days, _ = inputs.shape
        h = np.zeros((n, recurrent.shape[0]), np.float32)
        c = np.zeros_like(h)
        states = np.empty((n, days, h.shape[1]), np.float32)
        u = h.shape[1]
        for day in range(days):
            gates = inputs[:, day] + h @ recurrent
            sigmoid = expit(gates)
            c = sigmoid[:, u:2 * u] * c + sigmoid[:, :u] * np.tanh(gates[:, 2 * u:3 * u])
            h = sigmoid[:, 3 * u:] * np.tanh(c)
            states[:, day] = h
        kernel, recurrent, bias = self.gru
        inputs = states @ kernel + bias[0]
        h = np.zeros((n, recurrent.shape[0]), np.float32)
        u = h.shape[1]
        for day in range(days):
            x, inner = inputs[:, day], h @ recurrent + bias[1]
            z_r = expit(x[:, :2 * u] + inner[:, :2 * u])
            z = z_r[:, :u]
            h = z * h + (1 - z) * np.tanh(x[:, 2 * u:] + z_r[:, u:] * inner[:, 2 * u:])
        static = _dense(rows, self.static, relu=True)
        joined = _dense(np.concatenate([h, static], axis=1), self.head, relu=True)
        return expit(_dense(joined, self.churn, relu=False))[:, 0]


def _dense(x: np.ndarray, weights: list[np.ndarray], relu: bool) -> np.ndarray:
    kernel, bias = weights
    out = x @ kernel + bias
    return np.maximum(out, 0) if relu else out


class SequenceModel:
    """A fitted LSTM-GRU network over the daily sequence plus the static features.

    ``network`` is None in a scoring-only model (``from_parts(..., network=False)``): every
    batch then goes through the numpy pass, which gives the same scores.
    """

    def __init__(self, network: Any | None, static: Scaling, sequence: Scaling,
                 layers: dict[str, list[np.ndarray]] | None = None,
                 shape: tuple[int, int, int] | None = None) -> None:
        self.network, self.static, self.sequence = network, static, sequence
        self._traced: Any = None
        if network is None:
            if layers is None or shape is None:
                raise ValueError("a model without its network needs its layers and shape")
            self.layers, self.shape = layers, shape
            self.forward = Forward(layers)
            return
        tf = tensorflow()
        self.layers = {layer.name: [np.asarray(w) for w in layer.get_weights()]
                       for layer in network.layers if layer.weights}
        _, days, channels = network.inputs[0].shape
        self.shape = (days, channels, network.inputs[1].shape[1])
        self.forward = Forward(self.layers)
        signature = [tf.TensorSpec([None, days, channels], tf.float32),
                     tf.TensorSpec([None, self.shape[2]], tf.float32)]
        # Calling the traced graph directly skips tf.function's dispatch: 2.9 ms for one row
        # against 3.6 ms, and a p99 of 3.4 ms against 13 ms on this box.
        self._traced = tf.function(self._call).get_concrete_function(*signature)
        self._constant = tf.constant

    def parts(self) -> dict[str, Any]:
        """The model as plain data: input shape, each layer's weights, the scalings."""
        return {"shape": self.shape, "layers": self.layers,
                "static": self.static, "sequence": self.sequence}

    @classmethod
    def from_parts(cls, parts: dict[str, Any], network: bool = True) -> "SequenceModel":
        """The model ``parts`` describes, in a network of its own to serve; with ``network``
        False, the numpy pass only (TensorFlow is not imported)."""
        if not network:
            return cls(None, parts["static"], parts["sequence"], parts["layers"], parts["shape"])
        tensorflow(SERVING_THREADS)
        import keras

        built = _network(keras, *parts["shape"])
        for name, weights in parts["layers"].items():
            built.get_layer(name).set_weights(weights)
        return cls(built, parts["static"], parts["sequence"])

    def _call(self, sequences: Any, rows: Any) -> Any:
        return self.network([sequences, rows], training=False)

    def predict(self, X: np.ndarray, S: np.ndarray) -> np.ndarray:
        """Churn probability of each row; safe to call from several threads."""
        if len(X) == 0:
            return np.zeros(0)
        sequences, rows = self.sequence.apply(S), self.static.apply(X)
        if len(X) <= FORWARD_MAX_ROWS or self._traced is None:
            return self.forward(sequences, rows).astype(np.float64)
        out = self._traced(self._constant(sequences), self._constant(rows))
        return np.asarray(out, dtype=np.float64)[:, 0]

    def predict_keras(self, X: np.ndarray, S: np.ndarray) -> np.ndarray:
        """The same through Keras itself (slow): what ``predict`` is checked against."""
        if self.network is None:
            raise RuntimeError("a scoring-only sequence model has no Keras network")
        out = self.network([self.sequence.apply(S), self.static.apply(X)], training=False)
        return np.asarray(out, dtype=np.float64)[:, 0]


def _network(keras: Any, days: int, channels: int, features: int) -> Any:
    p = SEQUENCE_PARAMS
    sequences = keras.Input((days, channels), name="daily_activity")
    rows = keras.Input((features,), name="static_features")
    # Forward reads the weights by these layer names.
    recurrent = keras.layers.LSTM(p["lstm_units"], return_sequences=True, name="lstm")(sequences)
    recurrent = keras.layers.GRU(p["gru_units"], name="gru")(recurrent)
    static = keras.layers.Dense(p["static_units"], activation="relu", name="static")(rows)
    joined = keras.layers.Concatenate()([recurrent, static])
    joined = keras.layers.Dense(p["head_units"], activation="relu", name="head")(joined)
    churn = keras.layers.Dense(1, activation="sigmoid", name="churn")(joined)
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
