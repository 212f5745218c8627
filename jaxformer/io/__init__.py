"""Model I/O: a trained model in and out of jaxformer, one file per format."""
