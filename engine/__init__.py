"""cm3leon-engine: train and serve CM3Leon-style multimodal models on our own kernels."""
__version__ = "0.1.0"
