"""The Transformer of "Attention Is All You Need" in JAX/Flax. `jaxformer.load(path)` gives a Translator."""


def load(path, *, step=None, average_last=None, best=False, average_best=None, average_from_best=None):
    """The `Translator` of a run directory or an export directory (see `jaxformer.io.load`); of a run,
    `best=True` gives its best checkpoint by validation, `average_best=K` the average of its K best
    (train.best_metric, kept by train.keep_best) and `average_from_best=K` that of its best and the K - 1
    kept after it. On a CPU, when
    JAX has not started yet, every core becomes a JAX device first (`parallel.use_every_cpu_core`), so that
    the Translator's searches use them all, as the CLI's do; computations of one's own still default to
    device 0."""
    from jaxformer import parallel
    from jaxformer.io import load as load_model

    parallel.use_every_cpu_core()
    return load_model(path, step=step, average_last=average_last, best=best, average_best=average_best,
                      average_from_best=average_from_best)
