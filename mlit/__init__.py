"""mLiT / mmLiT: Mixture-of-Experts lightweight vision transformers (models, data, training).

``mlit.create_model(name, num_classes=None, backend="auto", checkpoint=None)`` and
``mlit.list_models()`` are the model registry, ``mlit.doctor.run()`` the self-check of the kernels
on this machine (each imported on first use, so ``import mlit`` and ``mlit --version`` stay light).
"""

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "doctor", "list_models"]


def __getattr__(name):
    if name in ("create_model", "list_models"):
        from . import registry

        return getattr(registry, name)
    if name == "doctor":
        import importlib

        return importlib.import_module(".doctor", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
