"""The original notebook's model in Keras itself, for the benchmarks that time the notebook.

Torch-free on purpose: benchmarks/keras_notebook.py imports it from a TensorFlow-only virtual
environment. TensorFlow is never a dependency of fmnist; the caller passes its ``keras``.
"""


def build(keras):
    """The notebook's CNN, compiled as the notebook compiled it (Adam at Keras' defaults,
    categorical cross-entropy on one-hot labels); fmnist's NotebookCNN is its PyTorch twin."""
    model = keras.Sequential([
        keras.layers.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dropout(0.25),
        keras.layers.Dense(128, activation="relu"), keras.layers.Dropout(0.5),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    return model
