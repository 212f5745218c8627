"""The Transformer of "Attention Is All You Need" in JAX/Flax. `jaxformer.load(path)` gives a Translator."""


def load(path, *, step=None, average_last=None):
    """The `Translator` of a run directory or an export directory (see `jaxformer.io.load`)."""
    from jaxformer.io import load as load_model

    return load_model(path, step=step, average_last=average_last)
