"""CrossMAE / MAE pretraining and the backbone API used by every transfer task.

The public names are imported lazily so that ``python -m crossmae.<module>`` runs each module once.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "ARCHS": "models", "MAE": "models", "CrossMAE": "models", "create_model": "models",
    "BackboneLoadError": "backbone", "LoadReport": "backbone", "export_encoder": "backbone",
    "load_backbone": "backbone", "load_encoder_state_dict": "backbone", "load_into": "backbone",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'crossmae' has no attribute {name!r}")
